"""Safe apply: the part of a change that can cut someone off rolls itself back.

Modelled on ``iptables-apply`` and Junos ``commit confirmed``, avoiding the
confirm/timer race Ansible's ``iptables_state`` had.  The runner applies a
plan's unguarded changes (packages, files that are not live) first and checks
them; only then does this module take over the *guarded* changes:

**On the host** (one transaction directory ``/var/lib/homeclust/txn/ID``):

* *arm* (one round trip, fast): save every file the guarded changes write,
  the state of every unit they touch (enabled/masked, running) and the
  step's extra state (``Guard.snapshot``, e.g. the live filter table); stop
  if saving failed (nothing was changed).  Write ``rollback.sh`` and
  ``apply.sh``, make sure the boot-time recovery units exist, then start the
  rollback timer (``systemd-run --on-active``) and, right after it, the
  guarded changes -- detached from the SSH session, so a dropped session
  cannot interrupt them half-way.
* ``apply.sh`` and ``rollback.sh`` take the same ``flock``: a rollback never
  runs while changes are still being made; it stops a still-running apply
  first (an ``ifup`` waiting for DHCP), then undoes everything.
* confirm and rollback each start with an atomic ``mv armed …``: whichever
  rename succeeds wins, the other does nothing.
* rollback restores files, units and state, checks each, and ends in
  ``rolledback`` or ``rollback-failed`` (never "rolled back" when it did not).
* a host that reboots while armed rolls back at boot: an early unit puts the
  files and unit states back before the network and the rules loaders start,
  a late one re-runs the live part of the restore.

**On the admin side** (:class:`GuardedApply`, an explicit state machine): wait
until the host says the guarded changes finished, connect *again* (a
connection opened before they finished proves nothing), re-read the facts and
re-plan; only a host that converged is confirmed.  Anything else -- a failed
apply, a plan that still differs, an error while checking, Ctrl-C -- starts
the rollback at once over whatever connection works; an unreachable host rolls
back by itself when its timer fires.  Either way homeclust then learns the
final state, and a rollback is only reported as such when a fresh plan shows
exactly the changes it showed before the attempt.
"""

from __future__ import annotations

import enum
import secrets
import shlex
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from homeclust.changes import HOST_PATH, Change, FileChange, ServiceChange, render_batch
from homeclust.errors import ApplyError, HomeclustError, Interrupted, RolledBackError
from homeclust.facts import TXN_DIR, TXN_STATE_SH
from homeclust.inventory import Node
from homeclust.steps.base import Guard
from homeclust.transport import CommandResult, Connector, Host

#: Seconds before the host's timer fires that homeclust stops trying to confirm.
CONFIRM_MARGIN = 5.0
#: Seconds homeclust gives a host to finish a rollback it has started.
ROLLBACK_GRACE = 30.0
#: How often the admin side asks the host how the transaction is doing.
POLL_INTERVAL = 0.5

ARMED_MARKER = "@@homeclust-armed@@"
SNAPSHOT_FAILED = "@@homeclust-snapshot-failed@@"

#: Where units are installed, and what says systemd runs (module constants: the
#: tests run these scripts for real in a temporary directory).
UNIT_DIR = "/etc/systemd/system"
SYSTEMD_RUNTIME = "/run/systemd/system"

RECOVER_EARLY_UNIT = "homeclust-txn-recover-early.service"
RECOVER_LATE_UNIT = "homeclust-txn-recover-late.service"


class ScriptRunner(Protocol):
    """Runs a tagged script on a host (the runner's logged ``run_script``)."""

    def __call__(self, host: Host, purpose: str, script: str, timeout: float | None = None,
                 *, interruptible: bool = True, log_script: str | None = None
                 ) -> CommandResult: ...


def new_txn_id(step: str) -> str:
    return f"{step}-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"


def txn_dir(txn_id: str) -> str:
    return f"{TXN_DIR}/{txn_id}"


# --------------------------------------------------------------------------- host side (pure)


def _unit_name(unit: str) -> str:
    return unit if "." in unit else f"{unit}.service"


def _touched(changes: Sequence[Change]) -> tuple[list[str], list[str]]:
    """The files and units the guarded changes touch; a file's backup is named by its
    index in this order (``$HC_TXN/backup/fileN``, ``fileN.absent``)."""
    paths = sorted({c.path for c in changes if isinstance(c, FileChange)})
    units = sorted({_unit_name(c.unit) for c in changes if isinstance(c, ServiceChange)})
    return paths, units


def rollback_script(txn_id: str, changes: Sequence[Change], guard: Guard) -> str:
    """``rollback.sh``: undo the guarded changes, check that it worked, say so.

    ``HC_PHASE`` selects what runs: ``all`` (timer, rollback-now), ``early``
    (at boot, before the network and the rules loaders: files and unit
    enablement only) or ``late`` (at boot, once the system is up: the live part).
    """
    q_txn = shlex.quote(txn_dir(txn_id))
    paths, units = _touched(changes)
    file_lines = []
    for index, path in enumerate(paths):
        q_path = shlex.quote(path)
        saved = f'"$HC_TXN/backup/file{index}"'
        file_lines.append(
            f"if [ -e {saved}.absent ]; then rm -f {q_path}; "
            f"[ ! -e {q_path} ] || fail {shlex.quote('still present: ' + path)}; "
            f"else cp -a {saved} {q_path} && cmp -s {saved} {q_path} || "
            f"fail {shlex.quote('not restored: ' + path)}; fi"
        )
    unit_lines = [f"hc_unit_restore {shlex.quote(u)}" for u in units]
    return f"""#!/bin/sh
# homeclust rollback of {txn_id}: written when the change was armed.
export LC_ALL=C PATH={HOST_PATH}
HC_TXN={q_txn}
export HC_TXN
phase=${{HC_PHASE:-all}}
if [ "$phase" != late ]; then
  # Whoever renames 'armed' first wins: confirm or rollback, never both.
  mv "$HC_TXN/armed" "$HC_TXN/rolling-back" 2>/dev/null || exit 0
fi
exec >> "$HC_TXN/rollback.log" 2>&1
echo "rollback ($phase) started $(date)"
status=0
fail() {{ echo "FAILED: $*"; status=1; }}
hc_unit_restore() {{
  saved=$(grep "^$1 " "$HC_TXN/backup/units" | cut -d' ' -f2-)
  enabled=${{saved%% *}}; active=${{saved#* }}
  if [ "$phase" != late ]; then
    case "$enabled" in
      masked) systemctl mask "$1" >/dev/null 2>&1 ;;
      enabled) systemctl unmask "$1" >/dev/null 2>&1; systemctl enable "$1" >/dev/null 2>&1 ;;
      disabled) systemctl unmask "$1" >/dev/null 2>&1; systemctl disable "$1" >/dev/null 2>&1 ;;
      *) [ "$(systemctl is-enabled "$1" 2>/dev/null)" = masked ] && systemctl unmask "$1" >/dev/null 2>&1 ;;
    esac
    case "$enabled" in masked|enabled|disabled)
      [ "$(systemctl is-enabled "$1" 2>/dev/null)" = "$enabled" ] || fail "$1 is not $enabled again";;
    esac
  fi
  if [ "$phase" != early ]; then
    now=$(systemctl is-active "$1" 2>/dev/null)
    if [ "$active" = active ] && [ "$now" != active ]; then
      systemctl start "$1" >/dev/null 2>&1 || fail "$1 did not start again"
    elif [ "$active" != active ] && [ "$now" = active ]; then
      systemctl stop "$1" >/dev/null 2>&1 || fail "$1 did not stop again"
    fi
  elif [ "$active" = active ]; then
    systemctl --no-block start "$1" >/dev/null 2>&1
  fi
}}
if [ "$phase" = all ]; then
  # A still-running apply (an ifup waiting for DHCP) is stopped, not waited for.
  systemctl stop homeclust-apply-{txn_id}.service >/dev/null 2>&1
  flock "$HC_TXN/lock" true
  systemctl stop homeclust-rollback-{txn_id}.timer >/dev/null 2>&1
  {{
{guard.trial or ':'}
  }} > "$HC_TXN/trial" 2>&1
  {{
{guard.pre_restore or ':'}
  }} || echo "note: taking the trial state down reported an error (going on)"
fi
if [ "$phase" != late ]; then
{chr(10).join(file_lines) or ':'}
fi
if [ "$phase" != early ]; then
  {{
{guard.restore or ':'}
  }} || fail "restoring the saved state"
fi
{chr(10).join(unit_lines) or ':'}
if [ "$phase" = early ]; then
  # The live part runs once the system is up (homeclust-txn-recover-late).
  : > "$HC_TXN/restore-late"; [ $status = 0 ] || : > "$HC_TXN/early-failed"
  echo "rollback (early) done, status $status"; exit 0
fi
[ "$phase" = late ] && [ -e "$HC_TXN/early-failed" ] && status=1
rm -f "$HC_TXN/restore-late"
if [ $status = 0 ]; then
  mv "$HC_TXN/rolling-back" "$HC_TXN/rolledback"
  logger -t homeclust "rolled back {txn_id}" 2>/dev/null || true
else
  mv "$HC_TXN/rolling-back" "$HC_TXN/rollback-failed"
  logger -t homeclust "rollback of {txn_id} FAILED: see $HC_TXN/rollback.log" 2>/dev/null || true
fi
echo "rollback ($phase) done, status $status $(date)"
exit 0
"""


def _recovery_unit(description: str, order: str, phase: str, marker: str, wanted_by: str
                   ) -> str:
    """A oneshot unit running every transaction's rollback.sh in ``phase`` if ``marker``
    exists in its directory."""
    return f"""\
[Unit]
Description={description}
{order}
ConditionDirectoryNotEmpty={TXN_DIR}

[Service]
Type=oneshot
Environment=HC_PHASE={phase}
ExecStart=/bin/sh -c 'for t in {TXN_DIR}/*/; do [ -e "$$t/{marker}" ] && \
/bin/sh "$$t/rollback.sh"; done; true'

[Install]
WantedBy={wanted_by}
"""


def _recovery_units() -> dict[str, str]:
    """Boot-time units that roll back what a reboot interrupted (installed once per host):
    the early one before the network, the sysctls and the rules loaders start (files and
    unit states), the late one once the system is up (the live part)."""
    early_order = (
        "DefaultDependencies=no\nAfter=local-fs.target\n"
        "Before=sysinit.target systemd-sysctl.service network-pre.target "
        "netfilter-persistent.service iptables.service ip6tables.service "
        "NetworkManager.service networking.service network.service systemd-networkd.service\n"
        "Wants=network-pre.target")
    return {
        RECOVER_EARLY_UNIT: _recovery_unit(
            "Roll back homeclust changes that a reboot left unconfirmed (files, units)",
            early_order, "early", "armed", "sysinit.target"),
        RECOVER_LATE_UNIT: _recovery_unit(
            "Finish rolling back homeclust changes that a reboot left unconfirmed (live state)",
            "After=network.target network-online.target multi-user.target", "late",
            "restore-late", "multi-user.target"),
    }


def _install_recovery_units() -> str:
    """Shell function ``hc_install_units``: write and enable the recovery units if they
    differ (idempotent; a failure is returned, so arming stops before any change)."""
    lines = ["hc_install_units() {", "  changed=0"]
    for unit, content in _recovery_units().items():
        target = "sysinit.target" if unit == RECOVER_EARLY_UNIT else "multi-user.target"
        path = shlex.quote(f"{UNIT_DIR}/{unit}")
        wants = shlex.quote(f"{UNIT_DIR}/{target}.wants")
        lines += [
            f"  mkdir -p {wants} || return 1",
            f"  if [ \"$(cat {path} 2>/dev/null)\" != {shlex.quote(content.rstrip(chr(10)))} ]; "
            f"then printf '%s' {shlex.quote(content)} > {path}.tmp && mv -f {path}.tmp {path} "
            "|| return 1; changed=1; fi",
            f"  ln -sf ../{unit} {wants}/{unit} || return 1",
        ]
    lines += ["  [ $changed = 0 ] || systemctl daemon-reload", "}"]
    return "\n".join(lines)


def arm_script(txn_id: str, changes: Sequence[Change], guard: Guard, *,
               redact: bool = False) -> str:
    """Save state, write rollback.sh and apply.sh, start the timer and then the apply (pure).

    Prints ``@@homeclust-armed@@ <deadline>`` (host epoch seconds) when the
    guarded changes were started; ``@@homeclust-snapshot-failed@@`` (exit 1)
    when the current state could not be saved -- then nothing was changed.
    ``redact``: the form written to the run log (secret file contents left out).
    """
    q_txn = shlex.quote(txn_dir(txn_id))
    paths, units = _touched(changes)
    backups = []
    for index, path in enumerate(paths):
        q_path = shlex.quote(path)
        saved = f'"$HC_TXN/backup/file{index}"'
        backups.append(f"if [ -e {q_path} ]; then cp -a {q_path} {saved}; "
                       f"else : > {saved}.absent; fi || "
                       f"hc_snapshot_failed {shlex.quote('saving ' + path)}")
    for unit in units:
        q = shlex.quote(unit)
        backups.append(
            f"printf '%s %s %s\\n' {q} \"$(systemctl is-enabled {q} 2>/dev/null || true)\" "
            f"\"$(systemctl is-active {q} 2>/dev/null || true)\" >> \"$HC_TXN/backup/units\" "
            f"|| hc_snapshot_failed 'saving the state of {unit}'")
    if guard.snapshot:
        backups.append(f"{{\n{guard.snapshot}\n}} || hc_snapshot_failed 'saving the current state'")
    after = int(guard.rollback_after)
    batch = render_batch(changes, redact=redact)
    return f"""\
set -u
export LC_ALL=C PATH={HOST_PATH}
HC_TXN={q_txn}
export HC_TXN
umask 077
hc_snapshot_failed() {{
  echo "{SNAPSHOT_FAILED} $1; nothing was changed"; rm -rf "$HC_TXN"; exit 1
}}
command -v systemd-run >/dev/null 2>&1 && [ -d {SYSTEMD_RUNTIME} ] || {{
  echo "{SNAPSHOT_FAILED} guarded changes need systemd (systemd-run); nothing was changed"; exit 1
}}
rm -rf "$HC_TXN"
mkdir -p "$HC_TXN/backup" || hc_snapshot_failed "creating $HC_TXN"
: > "$HC_TXN/backup/units"
{chr(10).join(backups)}
cat > "$HC_TXN/rollback.sh" <<'HOMECLUST_ROLLBACK_EOF'
{rollback_script(txn_id, changes, guard)}HOMECLUST_ROLLBACK_EOF
cat > "$HC_TXN/batch.sh" <<'HOMECLUST_BATCH_EOF'
{batch}HOMECLUST_BATCH_EOF
cat > "$HC_TXN/apply.sh" <<'HOMECLUST_APPLY_EOF'
exec > "$HC_TXN/apply.log" 2>&1
# The same lock as rollback.sh: a rollback waits for (or stops) us, never interleaves.
flock "$HC_TXN/lock" sh -c '[ -e "$HC_TXN/armed" ] || exit 3; exec sh "$HC_TXN/batch.sh"'
echo $? > "$HC_TXN/apply.status"
HOMECLUST_APPLY_EOF
{_install_recovery_units()}
hc_install_units || hc_snapshot_failed "installing the boot-time recovery units"
# The timer starts right before the guarded changes, and covers only them.
deadline=$(( $(date +%s) + {after} ))
echo "$deadline" > "$HC_TXN/deadline"
: > "$HC_TXN/armed"
systemd-run --quiet --unit=homeclust-rollback-{txn_id} --on-active={after}s \\
  --timer-property=AccuracySec=1s /bin/sh "$HC_TXN/rollback.sh" || {{
  rm -f "$HC_TXN/armed"; hc_snapshot_failed "starting the rollback timer"; }}
systemd-run --quiet --unit=homeclust-apply-{txn_id} --collect \\
  --setenv=HC_TXN="$HC_TXN" /bin/sh "$HC_TXN/apply.sh" || {{
  systemctl stop homeclust-rollback-{txn_id}.timer >/dev/null 2>&1
  /bin/sh "$HC_TXN/rollback.sh"; hc_snapshot_failed "starting the change"; }}
echo "{ARMED_MARKER} $deadline"
exit 0
"""


def status_script(txn_id: str) -> str:
    """The transaction's state (first line), then what the apply, the trial and the
    rollback reported."""
    q_txn = shlex.quote(txn_dir(txn_id))
    return f"""\
{TXN_STATE_SH}t={q_txn}
if [ ! -d "$t" ]; then echo gone; exit 0; fi
hc_txn_state "$t"
echo "@@apply@@"; cat "$t/apply.log" 2>/dev/null
echo "@@trial@@"; cat "$t/trial" 2>/dev/null
echo "@@rollback@@"; tail -n 40 "$t/rollback.log" 2>/dev/null
true
"""


def confirm_script(txn_id: str) -> str:
    q_txn = shlex.quote(txn_dir(txn_id))
    return f"""\
{TXN_STATE_SH}t={q_txn}
if [ -e "$t/apply.status" ] && [ "$(cat "$t/apply.status")" = 0 ] && \\
   mv "$t/armed" "$t/confirmed" 2>/dev/null; then
  systemctl stop homeclust-rollback-{txn_id}.timer >/dev/null 2>&1
  rm -rf "$t"
  echo confirmed
elif [ -d "$t" ]; then
  hc_txn_state "$t"
else
  echo gone
fi
"""


def rollback_now_script(txn_id: str) -> str:
    """Start the rollback at once, detached (restoring may drop this session too)."""
    q_txn = shlex.quote(txn_dir(txn_id))
    return f"""\
t={q_txn}
systemctl stop homeclust-rollback-{txn_id}.timer >/dev/null 2>&1
systemd-run --quiet --unit=homeclust-rollback-now-{txn_id} --collect /bin/sh "$t/rollback.sh" \\
  || /bin/sh "$t/rollback.sh"
echo started
"""


def archive_script(txn_id: str, where: str) -> str:
    """Move a finished transaction out of the pending directory (kept for inspection)."""
    q_txn = shlex.quote(txn_dir(txn_id))
    target = shlex.quote(f"/var/lib/homeclust/{where}")
    return f"mkdir -p {target} && mv {q_txn} {target}/ 2>/dev/null; true"


# --------------------------------------------------------------------------- admin side


@dataclass(frozen=True)
class TxnStatus:
    """What ``status_script`` printed: the state and the reports that go with it."""

    state: str
    apply_log: str = ""
    trial: str = ""
    rollback_log: str = ""

    @classmethod
    def parse(cls, output: str) -> TxnStatus:
        state, _, rest = output.partition("\n")
        apply_log, _, rest = rest.partition("@@trial@@\n")
        trial, _, rollback_log = rest.partition("@@rollback@@\n")
        return cls(state.strip() or "unknown", apply_log.removeprefix("@@apply@@\n").strip(),
                   trial.strip(), rollback_log.strip())


class Phase(enum.Enum):
    """The admin side's states; :data:`TRANSITIONS` says where each one may lead."""

    ARM = "arm"
    AWAIT_APPLY = "await-apply"
    RECONNECT = "reconnect"
    VERIFY = "verify"
    CONFIRM = "confirm"
    ROLLBACK_NOW = "rollback-now"
    AWAIT_TIMER = "await-timer"
    AWAIT_ROLLBACK = "await-rollback"
    CHECK_ROLLBACK = "check-rollback"
    CONFIRMED = "confirmed"  # final
    ROLLED_BACK = "rolled-back"  # final
    FAILED = "failed"  # final: the host's state is not what was there before, or unknown


#: Phases that move the change forward; an interrupt there turns into a rollback.
FORWARD = frozenset({"arm", "await-apply", "reconnect", "verify", "confirm"})

TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.ARM: frozenset({Phase.AWAIT_APPLY, Phase.FAILED, Phase.ROLLBACK_NOW}),
    Phase.AWAIT_APPLY: frozenset({Phase.AWAIT_APPLY, Phase.RECONNECT, Phase.ROLLBACK_NOW,
                                  Phase.AWAIT_TIMER, Phase.AWAIT_ROLLBACK}),
    Phase.RECONNECT: frozenset({Phase.VERIFY, Phase.AWAIT_APPLY, Phase.AWAIT_TIMER,
                                Phase.ROLLBACK_NOW, Phase.AWAIT_ROLLBACK}),
    Phase.VERIFY: frozenset({Phase.CONFIRM, Phase.VERIFY, Phase.ROLLBACK_NOW, Phase.AWAIT_TIMER}),
    Phase.CONFIRM: frozenset({Phase.CONFIRMED, Phase.AWAIT_ROLLBACK, Phase.ROLLBACK_NOW,
                              Phase.AWAIT_TIMER}),
    Phase.ROLLBACK_NOW: frozenset({Phase.AWAIT_ROLLBACK, Phase.AWAIT_TIMER,
                                   Phase.ROLLBACK_NOW}),
    Phase.AWAIT_TIMER: frozenset({Phase.AWAIT_ROLLBACK, Phase.FAILED, Phase.AWAIT_TIMER}),
    Phase.AWAIT_ROLLBACK: frozenset({Phase.CHECK_ROLLBACK, Phase.FAILED, Phase.AWAIT_ROLLBACK}),
    Phase.CHECK_ROLLBACK: frozenset({Phase.ROLLED_BACK, Phase.FAILED, Phase.CHECK_ROLLBACK}),
    Phase.CONFIRMED: frozenset(),
    Phase.ROLLED_BACK: frozenset(),
    Phase.FAILED: frozenset(),
}


@dataclass(frozen=True)
class GuardedResult:
    host: Host  # the connection to keep using (the one that confirmed)
    apply_output: str  # apply.log: the batch's change markers and warnings


@dataclass
class GuardedApply:
    """Apply ``changes`` under ``guard`` on one host and drive the transaction to an end.

    ``verify(host)`` re-reads the facts over ``host`` and returns what the
    step would still change (empty: converged).  ``unchanged_since_arm(host)``
    re-reads them and returns why the host differs from how it was right
    before arming, or None when a fresh plan shows exactly the same guarded
    changes (the rollback really restored it).
    """

    host: Host
    node: Node
    connector: Connector
    run: ScriptRunner
    txn_id: str
    changes: Sequence[Change]
    guard: Guard
    verify: Callable[[Host], list[str]]
    unchanged_since_arm: Callable[[Host], str | None]
    cancel: threading.Event = field(default_factory=threading.Event)
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    #: Every phase visited, in order (tests and the run log read it).
    trail: list[Phase] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.armed = False  # the host said it armed (something may have changed)
        self.settled = False
        self.fresh: Host | None = None  # a connection opened after the apply finished
        self.deadline = 0.0  # local clock: stop trying to confirm
        self.fires_at = 0.0  # local clock: the host's timer fires
        self.problems: list[str] = []
        self.status = TxnStatus("unknown")
        self.interrupted = False

    # -- driver -----------------------------------------------------------------

    def execute(self) -> GuardedResult:
        handlers: dict[Phase, Callable[[], Phase]] = {
            Phase.ARM: self._arm,
            Phase.AWAIT_APPLY: self._await_apply,
            Phase.RECONNECT: self._reconnect,
            Phase.VERIFY: self._verify,
            Phase.CONFIRM: self._confirm,
            Phase.ROLLBACK_NOW: self._rollback_now,
            Phase.AWAIT_TIMER: self._await_timer,
            Phase.AWAIT_ROLLBACK: self._await_rollback,
            Phase.CHECK_ROLLBACK: self._check_rollback,
        }
        phase = Phase.ARM
        while TRANSITIONS[phase]:
            self.trail.append(phase)
            try:
                if phase.value in FORWARD and self.cancel.is_set():
                    raise Interrupted(f"{self.node.name}: interrupted")
                following = handlers[phase]()
            except (Interrupted, KeyboardInterrupt) as exc:
                following = self._on_interrupt(phase, exc)
            except HomeclustError as exc:
                # An error while checking (connect, facts, planning) is a reason to
                # roll back, never a reason to stop caring about the host.
                self.problems.append(f"{phase.value}: {exc.message}")
                following = self._recover(phase)
            if following not in TRANSITIONS[phase]:
                raise ApplyError(f"{self.node.name}: guarded apply went from {phase.value} to "
                                 f"{following.value}, which is not a transition (bug)")
            phase = following
        self.trail.append(phase)
        return self._finish(phase)

    def _recover(self, phase: Phase) -> Phase:
        if phase is Phase.ARM:
            # The arm command broke off: it may or may not have armed.  Roll back
            # whatever is there; if nothing was armed the host says so.
            self.fires_at = self.clock() + self.guard.rollback_after
            return Phase.ROLLBACK_NOW
        if phase is Phase.ROLLBACK_NOW:
            return Phase.AWAIT_TIMER
        if phase.value in FORWARD:
            return Phase.ROLLBACK_NOW
        return Phase.FAILED

    def _on_interrupt(self, phase: Phase, exc: BaseException) -> Phase:
        if self.interrupted:
            # A second interrupt while rolling back: stop waiting, say what happens next.
            raise Interrupted(
                f"{self.node.name}: interrupted again; the guarded change {self.txn_id} rolls "
                f"back by itself within {max(0, self.fires_at - self.clock()):.0f} s") from None
        self.interrupted = True
        self.problems.append("interrupted")
        if phase is Phase.ARM:
            self.fires_at = self.clock() + self.guard.rollback_after
        if phase.value in FORWARD:
            return Phase.ROLLBACK_NOW
        return phase  # already on the way back: carry on

    # -- phases -----------------------------------------------------------------

    def _script(self, host: Host, purpose: str, script: str, *, timeout: float = 30.0,
                interruptible: bool = True, log_script: str | None = None) -> str:
        return self.run(host, purpose, script, timeout, interruptible=interruptible,
                        log_script=log_script).stdout

    def _arm(self) -> Phase:
        started = self.clock()
        result = self.run(self.host, "arm", arm_script(self.txn_id, self.changes, self.guard),
                          60.0, log_script=arm_script(self.txn_id, self.changes, self.guard,
                                                      redact=True))
        # The host's timer started during that command: count from before it.
        self.fires_at = started + self.guard.rollback_after
        self.deadline = self.fires_at - CONFIRM_MARGIN
        if ARMED_MARKER in result.stdout:
            self.armed = True
            return Phase.AWAIT_APPLY
        reason = result.stdout.strip().replace(SNAPSHOT_FAILED, "").strip() or \
            result.stderr.strip() or f"exit {result.exit_code}"
        self.problems.append(f"could not arm: {reason}")
        return Phase.FAILED

    def _ask(self, host: Host, *, interruptible: bool = True) -> TxnStatus:
        self.status = TxnStatus.parse(self._script(host, "txn-status", status_script(self.txn_id),
                                                   interruptible=interruptible))
        return self.status

    def _await_apply(self) -> Phase:
        if self.clock() >= self.deadline:
            self.problems.append("the change did not finish in time")
            return Phase.ROLLBACK_NOW
        if self.guard.settle and not self.settled:
            self.settled = True
            self._pause(self.guard.settle)
        host = self.fresh or self.host
        try:
            status = self._ask(host)
        except Interrupted:
            raise
        except HomeclustError:
            # The old session is gone (an interface restart): ask over a new one.
            self.fresh = None
            return Phase.RECONNECT
        if status.state == "applying":
            self._pause(POLL_INTERVAL)
            return Phase.AWAIT_APPLY
        return self._follow(status)

    def _follow(self, status: TxnStatus) -> Phase:
        """Where a finished apply leads: verify it over a connection opened after it
        finished, roll back a failed one, or find out what the host already did."""
        if status.state == "armed":
            return Phase.RECONNECT if self.fresh is None else Phase.VERIFY
        if status.state == "apply-failed":
            self.problems.append("applying failed:\n" + _tail(status.apply_log))
            return Phase.ROLLBACK_NOW
        self.problems.append(f"the host reports {status.state}")
        return Phase.AWAIT_ROLLBACK

    def _reconnect(self) -> Phase:
        remaining = self.deadline - self.clock()
        if remaining <= 0:
            self.problems.append("no new connection before the rollback time")
            return Phase.AWAIT_TIMER
        try:
            fresh = self.connector.reopen(self.node, within=remaining)
        except Interrupted:
            raise
        except HomeclustError as exc:
            self.problems.append(f"no new connection: {exc.message}")
            return Phase.AWAIT_TIMER
        status = self._ask(fresh)
        if status.state == "applying":
            # Opened before the change finished: it proves nothing; ask again later.
            self.host = fresh
            self._pause(POLL_INTERVAL)
            return Phase.AWAIT_APPLY
        self.fresh = fresh
        return self._follow(status)

    def _verify(self) -> Phase:
        if self.fresh is None:
            return Phase.ROLLBACK_NOW
        remaining = self.verify(self.fresh)
        if not remaining:
            return Phase.CONFIRM
        if self.clock() + 2.0 >= self.deadline:
            self.problems.append("did not converge: " + "; ".join(remaining))
            return Phase.ROLLBACK_NOW
        # Some changes settle a moment after the command returns (a DHCP lease).
        self._pause(2.0)
        return Phase.VERIFY

    def _confirm(self) -> Phase:
        if self.fresh is None or self.clock() >= self.deadline:
            self.problems.append("out of time before confirming")
            return Phase.ROLLBACK_NOW
        answer = self._script(self.fresh, "confirm", confirm_script(self.txn_id)).strip()
        if answer == "confirmed":
            return Phase.CONFIRMED
        self.problems.append(f"confirmation lost the race (the host reports {answer})")
        return Phase.AWAIT_ROLLBACK

    def _rollback_now(self) -> Phase:
        for host in (self.fresh, self.host):
            if host is None:
                continue
            try:
                self._script(host, "rollback", rollback_now_script(self.txn_id),
                             interruptible=False)
            except HomeclustError:
                continue
            return Phase.AWAIT_ROLLBACK
        try:
            host = self.connector.reopen(self.node, within=max(
                1.0, min(15.0, self.fires_at - self.clock())))
            self._script(host, "rollback", rollback_now_script(self.txn_id), interruptible=False)
        except HomeclustError:
            return Phase.AWAIT_TIMER  # if this fails the armed timer still fires
        self.fresh = host
        return Phase.AWAIT_ROLLBACK

    def _await_timer(self) -> Phase:
        remaining = self.fires_at - self.clock()
        if remaining > 0:
            self.sleep(remaining)
        try:
            self.fresh = self.connector.reopen(self.node, within=ROLLBACK_GRACE +
                                               self.guard.rollback_after)
        except HomeclustError as exc:
            self.problems.append(f"still unreachable after its rollback time: {exc.message}")
            return Phase.FAILED
        return Phase.AWAIT_ROLLBACK

    def _await_rollback(self) -> Phase:
        give_up = self.clock() + ROLLBACK_GRACE + max(0.0, self.fires_at - self.clock())
        while True:
            host = self.fresh or self.host
            try:
                status = self._ask(host, interruptible=False)
            except HomeclustError:
                self.fresh = self.connector.reopen(
                    self.node, within=max(1.0, give_up - self.clock()))
                continue
            if status.state == "rolledback":
                return Phase.CHECK_ROLLBACK
            if status.state in ("rollback-failed", "confirmed", "gone"):
                self.problems.append(f"the host reports {status.state}")
                return Phase.FAILED
            if self.clock() >= give_up:
                self.problems.append(f"the rollback did not finish (the host reports "
                                     f"{status.state})")
                return Phase.FAILED
            self.sleep(POLL_INTERVAL)

    def _check_rollback(self) -> Phase:
        host = self.fresh or self.host
        self.fresh = host
        difference = self.unchanged_since_arm(host)
        self._script(host, "txn-archive", archive_script(self.txn_id, "rolledback"),
                     interruptible=False)
        if difference is None:
            return Phase.ROLLED_BACK
        self.problems.append(f"after the rollback the host still differs from before: "
                             f"{difference}")
        return Phase.FAILED

    def _pause(self, seconds: float) -> None:
        """Sleep while moving forward; an interrupt ends the pause at once."""
        if self.cancel.is_set():
            raise Interrupted(f"{self.node.name}: interrupted")
        self.sleep(seconds)
        if self.cancel.is_set():
            raise Interrupted(f"{self.node.name}: interrupted")

    # -- outcome ----------------------------------------------------------------

    def _finish(self, phase: Phase) -> GuardedResult:
        name = self.node.name
        why = "; ".join(self.problems) or "timed out"
        trial = f"\ntrial state: {self.status.trial}" if self.status.trial else ""
        if phase is Phase.CONFIRMED:
            if self.fresh is None:
                raise ApplyError(f"{name}: confirmed without a connection (bug)")
            return GuardedResult(self.fresh, self.status.apply_log)
        if phase is Phase.ROLLED_BACK:
            message = (f"{name}: change not confirmed ({why}); the host rolled back to its "
                       f"previous state (a fresh plan shows the same changes as before){trial}")
            if self.interrupted:
                raise Interrupted(message, rolled_back=True)
            raise RolledBackError(message)
        if not self.armed and self.status.state in ("gone", "unknown"):
            raise ApplyError(f"{name}: the guarded change was not armed, so nothing of it was "
                             f"changed ({why})")
        log = f"\nrollback log:\n{_tail(self.status.rollback_log)}" if self.status.rollback_log \
            else ""
        raise ApplyError(
            f"{name}: change not confirmed and NOT cleanly rolled back ({why}); the host's "
            f"transaction state: {self.status.state}{trial}{log}",
            hint=f"inspect {txn_dir(self.txn_id)} (or /var/lib/homeclust/rolledback) on {name}; "
            "`homeclust plan` shows how the host differs now",
        )


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
