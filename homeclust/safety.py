"""Safe apply: changes that can cut the admin off roll themselves back.

Modelled on ``iptables-apply`` and Junos ``commit confirmed``, avoiding the
confirm/timer race Ansible's ``iptables_state`` had:

1. One round trip *arms* a transaction on the host: the files the plan
   touches and the step's extra state are saved under ``/var/lib/homeclust/txn/ID``,
   a rollback script is written, and a timer that runs it is started detached
   from the SSH session (``systemd-run --on-active``, or ``setsid`` + ``sleep``
   where systemd is not running).  Then the changes are applied; commands that
   may drop the session (restarting an interface) run detached too.
2. homeclust waits for the change to settle and connects again through a
   *new* connection (a new TCP connection for the master; a new channel and
   SSH session through the master for a worker).  It re-reads the facts and
   re-plans the step: only a host that converged is confirmed.
3. Confirmation and rollback are exclusive: each starts with an atomic
   ``mv armed …``; whichever rename succeeds wins, the other does nothing.
4. If the new connection cannot be made in time, the host's own timer rolls
   back; homeclust waits for it, reconnects, and reports what happened.
"""

from __future__ import annotations

import contextlib
import secrets
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from homeclust.changes import Change, FileChange, render_batch
from homeclust.errors import ApplyError, ConnectError, HomeclustError, RolledBackError
from homeclust.facts import TXN_DIR
from homeclust.inventory import Node
from homeclust.steps.base import Guard
from homeclust.transport import CommandResult, Connector, Host

#: Seconds before the rollback timer fires that homeclust stops trying to confirm.
CONFIRM_MARGIN = 5.0
#: Seconds after the timer fires that homeclust gives the host to finish rolling back.
ROLLBACK_GRACE = 15.0

#: Runs a tagged script on a host (the runner's logged ``run_script``).
ScriptRunner = Callable[[Host, str, str, float | None], CommandResult]
Verifier = Callable[[Host], list[str]]


@dataclass(frozen=True)
class GuardedResult:
    host: Host  # the connection to keep using (the new one)
    outcomes_output: str


def new_txn_id(step: str) -> str:
    return f"{step}-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"


def _txn(txn_id: str) -> str:
    return f"{TXN_DIR}/{txn_id}"


def arm_script(txn_id: str, changes: Sequence[Change], guard: Guard) -> str:
    """Save state, write the rollback script, arm the timer, apply (pure)."""
    txn = _txn(txn_id)
    q_txn = shlex.quote(txn)
    paths = sorted({c.path for c in changes if isinstance(c, FileChange)})
    backup_lines = []
    restore_lines = []
    for index, path in enumerate(paths):
        q_path = shlex.quote(path)
        saved = f'"$HC_TXN/backup/file{index}"'
        backup_lines.append(
            f"if [ -e {q_path} ]; then cp -a {q_path} {saved}; "
            f"else : > {saved}.absent; fi"
        )
        restore_lines.append(
            f"if [ -e {saved}.absent ]; then rm -f {q_path}; else cp -a {saved} {q_path}; fi"
        )
    unit = f"homeclust-rollback-{txn_id}"
    rollback = "\n".join([
        "#!/bin/sh",
        f"HC_TXN={q_txn}",
        "export HC_TXN",
        "# Whoever renames 'armed' first wins: confirm or rollback, never both.",
        'mv "$HC_TXN/armed" "$HC_TXN/rolling-back" 2>/dev/null || exit 0',
        'exec >> "$HC_TXN/rollback.log" 2>&1',
        'echo "rollback started $(date)"',
        *restore_lines,
        guard.restore,
        'mv "$HC_TXN/rolling-back" "$HC_TXN/rolledback"',
        f"logger -t homeclust 'rolled back {txn_id}' 2>/dev/null || true",
        "exit 0",
    ])
    batch = render_batch(changes)
    after = int(guard.rollback_after)
    return f"""\
set -u
HC_TXN={q_txn}
export HC_TXN
umask 077
mkdir -p "$HC_TXN/backup" || exit 1
{chr(10).join(backup_lines)}
{guard.snapshot or ':'}
cat > "$HC_TXN/rollback.sh" <<'HOMECLUST_ROLLBACK_EOF'
{rollback}
HOMECLUST_ROLLBACK_EOF
: > "$HC_TXN/armed"
: > "$HC_TXN/detached.sh"
if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1; then
  systemd-run --quiet --unit={unit} --on-active={after}s --timer-property=AccuracySec=1s \\
    /bin/sh "$HC_TXN/rollback.sh" || exit 1
else
  setsid sh -c 'sleep {after}; exec /bin/sh "$HC_TXN/rollback.sh"' </dev/null >/dev/null 2>&1 &
  echo $! > "$HC_TXN/timer.pid"
fi
echo "@@homeclust-armed@@"
HC_DETACH="$HC_TXN/detached.sh"
export HC_DETACH
# The batch ends with "exit": run it in a subshell so this script goes on.
(
{batch}
)
rc=$?
if [ $rc -ne 0 ]; then
  echo "@@homeclust-apply-failed@@ rolling back now"
  /bin/sh "$HC_TXN/rollback.sh"
  exit 1
fi
if [ -s "$HC_TXN/detached.sh" ]; then
  # Runs outside this SSH session: it may drop the session (an interface restart).
  if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1; then
    systemd-run --quiet --unit=homeclust-apply-{txn_id} --collect \\
      /bin/sh -c '/bin/sh "$0/detached.sh" > "$0/apply.log" 2>&1; echo $? > "$0/apply.status"' \\
      "$HC_TXN" || exit 1
  else
    setsid /bin/sh -c 'sleep 1; /bin/sh "$0/detached.sh" > "$0/apply.log" 2>&1; \\
echo $? > "$0/apply.status"' "$HC_TXN" </dev/null >/dev/null 2>&1 &
  fi
else
  echo 0 > "$HC_TXN/apply.status"
fi
exit 0
"""


def status_script(txn_id: str) -> str:
    """Report the transaction state: ARMED, CONFIRMED, ROLLEDBACK, APPLY-FAILED or GONE."""
    q_txn = shlex.quote(_txn(txn_id))
    return f"""\
t={q_txn}
if [ ! -d "$t" ]; then echo GONE; exit 0; fi
if [ -e "$t/rolledback" ]; then echo ROLLEDBACK; cat "$t/rollback.log" 2>/dev/null; exit 0; fi
if [ -e "$t/rolling-back" ]; then echo ROLLING-BACK; exit 0; fi
if [ -e "$t/apply.status" ] && [ "$(cat "$t/apply.status")" != 0 ]; then
  echo APPLY-FAILED; cat "$t/apply.log" 2>/dev/null; exit 0
fi
if [ -e "$t/armed" ] && [ ! -e "$t/apply.status" ]; then echo APPLYING; exit 0; fi
if [ -e "$t/armed" ]; then echo ARMED; exit 0; fi
echo UNKNOWN
"""


def confirm_script(txn_id: str) -> str:
    q_txn = shlex.quote(_txn(txn_id))
    unit = f"homeclust-rollback-{txn_id}"
    return f"""\
t={q_txn}
if mv "$t/armed" "$t/confirmed" 2>/dev/null; then
  systemctl stop {unit}.timer >/dev/null 2>&1 || true
  [ -f "$t/timer.pid" ] && kill "$(cat "$t/timer.pid")" >/dev/null 2>&1
  rm -rf "$t"
  echo CONFIRMED
elif [ -e "$t/rolledback" ] || [ -e "$t/rolling-back" ]; then
  echo ROLLEDBACK
else
  echo UNKNOWN
fi
"""


def rollback_now_script(txn_id: str) -> str:
    """Start the rollback at once, detached (restoring may drop this session too)."""
    q_txn = shlex.quote(_txn(txn_id))
    return f"""\
t={q_txn}
systemctl stop homeclust-rollback-{txn_id}.timer >/dev/null 2>&1 || true
if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1; then
  systemd-run --quiet --unit=homeclust-rollback-now-{txn_id} --collect /bin/sh "$t/rollback.sh"
else
  setsid /bin/sh "$t/rollback.sh" </dev/null >/dev/null 2>&1 &
fi
echo STARTED
"""


def archive_script(txn_id: str) -> str:
    """Move a finished (rolled back) transaction out of the pending directory."""
    q_txn = shlex.quote(_txn(txn_id))
    return (
        f"mkdir -p /var/lib/homeclust/rolledback && "
        f"mv {q_txn} /var/lib/homeclust/rolledback/ 2>/dev/null; true"
    )


def apply_guarded(
    *,
    host: Host,
    node: Node,
    connector: Connector,
    run: ScriptRunner,
    txn_id: str,
    changes: Sequence[Change],
    guard: Guard,
    verify: Verifier,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> GuardedResult:
    """Apply ``changes`` under an armed rollback; return the confirmed new connection.

    Raises :class:`RolledBackError` when the host restored its previous state
    (could not confirm, or did not converge) and :class:`ApplyError` when the
    outcome is unknown.
    """
    started = clock()
    deadline = started + guard.rollback_after - CONFIRM_MARGIN
    try:
        armed = run(host, "arm", arm_script(txn_id, changes, guard), None)
    except ConnectError:
        # The session dropped while applying (e.g. the apply was not detached):
        # whatever happened, the armed timer decides; go and find out.
        armed = CommandResult(-1, "@@homeclust-armed@@", "", 0.0)
    if "@@homeclust-armed@@" not in armed.stdout:
        raise ApplyError(f"{node.name}: could not arm the rollback; nothing was changed:\n"
                         f"{armed.stdout.strip()}{armed.stderr.strip()}")
    if armed.exit_code == 1:
        raise ApplyError(
            f"{node.name}: applying failed and the previous state was restored:\n"
            f"{armed.stdout.strip()}"
        )
    if guard.settle:
        sleep(guard.settle)

    fresh: Host | None = None
    problems: list[str] = []
    while clock() < deadline:
        try:
            fresh = connector.reopen(node, within=max(1.0, deadline - clock()))
        except HomeclustError as exc:
            problems = [f"no new connection: {exc.message}"]
            break
        state = run(fresh, "txn-status", status_script(txn_id), 30.0).stdout
        if state.startswith("APPLYING"):
            sleep(1.0)
            continue
        if state.startswith(("ROLLEDBACK", "ROLLING-BACK", "APPLY-FAILED")):
            problems = [state.strip()]
            break
        problems = verify(fresh)
        if not problems:
            confirm = run(fresh, "confirm", confirm_script(txn_id), 30.0).stdout
            if confirm.startswith("CONFIRMED"):
                return GuardedResult(fresh, armed.stdout)
            problems = [f"confirmation lost the race: {confirm.strip()}"]
            break
        sleep(2.0)

    if fresh is not None and not any(p.startswith("ROLL") for p in problems):
        # Reachable but not converged (or out of time): roll back now.
        with contextlib.suppress(HomeclustError):  # if this fails the armed timer still fires
            run(fresh, "rollback", rollback_now_script(txn_id), 30.0)
    else:
        # Could not get in: the host's own timer rolls back.
        remaining = started + guard.rollback_after - clock()
        if remaining > 0:
            sleep(remaining)
    sleep(min(3.0, ROLLBACK_GRACE))
    try:
        after = connector.reopen(node, within=ROLLBACK_GRACE + guard.rollback_after)
    except HomeclustError as exc:
        raise ApplyError(
            f"{node.name}: change could not be confirmed ({'; '.join(problems)}) and the host "
            f"is still unreachable after its rollback time: {exc.message}",
            hint=f"check the console of {node.name}; the saved state is in {_txn(txn_id)}",
        ) from None
    state = ""
    for _ in range(int(ROLLBACK_GRACE)):
        state = run(after, "txn-status", status_script(txn_id), 30.0).stdout
        if not state.startswith(("ROLLING-BACK", "ARMED", "APPLYING")):
            break
        sleep(1.0)
    if state.startswith("ROLLEDBACK"):
        run(after, "txn-archive", archive_script(txn_id), 30.0)
        raise RolledBackError(
            f"{node.name}: change not confirmed ({'; '.join(problems) or 'timed out'}); "
            "the host rolled back to its previous state and is reachable",
        )
    raise ApplyError(
        f"{node.name}: change not confirmed ({'; '.join(problems)}); rollback state: "
        f"{state.strip() or 'unknown'}",
        hint=f"inspect {_txn(txn_id)} on {node.name}",
    )
