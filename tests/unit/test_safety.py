"""Safe apply (homeclust.safety), both halves.

* The host side runs **for real**: the arm, apply, confirm and rollback
  scripts under ``sh`` in a temporary transaction directory, with stand-ins
  only for what a test machine must not do (``systemd-run`` starts the apply
  in the background and records the timer instead of arming one;
  ``systemctl`` keeps unit states in a file).  Races, a batch that outlasts
  the timer, failed snapshots and failed restores are played out with real
  processes, files and locks.
* The admin side (:class:`~homeclust.safety.GuardedApply`) is an explicit
  state machine; it is driven here with scripted host answers and a fake
  clock, and every path must end in a state the host confirms.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from homeclust import safety
from homeclust.changes import HOST_PATH, Change, CommandChange, FileChange, ServiceChange
from homeclust.errors import ApplyError, ConnectError, FactError, Interrupted, RolledBackError
from homeclust.inventory import Node, parse_inventory
from homeclust.safety import GuardedApply, Phase
from homeclust.steps.base import Guard
from homeclust.transport import CommandResult

NODE = parse_inventory({
    "master": {"name": "master", "address": "10.0.0.1", "private_address": "192.168.10.1"},
}, Path("t.toml")).master_node

pytestmark = pytest.mark.skipif(not all(shutil.which(c) for c in ("flock", "cmp", "base64")),
                                reason="needs util-linux, diffutils and coreutils")


# =========================================================================== host side, for real

SYSTEMD_RUN_STUB = """#!/bin/sh
# Stand-in for systemd-run: a timer is recorded (the test fires it), anything else
# is started in the background in a process group of its own, like a transient unit.
unit=""; timer=""
while [ $# -gt 0 ]; do
  case "$1" in
    --unit=*) unit=${1#--unit=} ;;
    --on-active=*) timer=${1#--on-active=} ;;
    --setenv=*) export "${1#--setenv=}" ;;
    --*) ;;
    *) break ;;
  esac
  shift
done
if [ -n "$timer" ]; then
  echo "$unit $timer $*" >> "$HC_STUBS/timers"
  exit 0
fi
setsid "$@" > /dev/null 2>&1 &
echo $! > "$HC_STUBS/unit.$unit.pid"
exit 0
"""

SYSTEMCTL_STUB = """#!/bin/sh
# Stand-in for systemctl: unit states live in $HC_STUBS/units ("unit enabled active").
echo "systemctl $*" >> "$HC_STUBS/systemctl.log"
state() { grep "^$1 " "$HC_STUBS/units" 2>/dev/null | cut -d' ' -f"$2"; }
set_state() {
  line="$1 ${2:-$(state "$1" 2)} ${3:-$(state "$1" 3)}"
  { grep -v "^$1 " "$HC_STUBS/units" 2>/dev/null; echo "$line"; } > "$HC_STUBS/units.new"
  mv "$HC_STUBS/units.new" "$HC_STUBS/units"
}
unit() { case "$1" in *.*) echo "$1";; *) echo "$1.service";; esac; }
cmd=$1; shift
case "$cmd" in
  is-enabled) s=$(state "$(unit "$1")" 2); echo "${s:-disabled}"; [ "${s:-disabled}" = enabled ];;
  is-active) s=$(state "$(unit "$1")" 3); echo "${s:-inactive}"; [ "${s:-inactive}" = active ];;
  mask) set_state "$(unit "$1")" masked;;
  unmask) u=$(unit "$1"); [ "$(state "$u" 2)" = masked ] && set_state "$u" disabled; true;;
  enable) set_state "$(unit "$1")" enabled;;
  disable) set_state "$(unit "$1")" disabled;;
  start|stop)
    for u in "$@"; do
      u=$(unit "$u")
      case "$u" in homeclust-apply-*)
        # Stopping the apply unit ends its whole process group, like systemd does.
        pid=$(cat "$HC_STUBS/unit.${u%.service}.pid" 2>/dev/null) && kill -- -"$pid" 2>/dev/null
        continue;;
      esac
      case "$u" in homeclust-*) continue;; esac
      [ "$cmd" = start ] && set_state "$u" "" active || set_state "$u" "" inactive
    done;;
  daemon-reload|--no-block) ;;
esac
exit 0
"""


@dataclass
class HostSandbox:
    """A temporary 'host': transaction directory, unit directory, stubbed system tools."""

    root: Path
    stubs: Path
    txn_root: Path
    env: dict[str, str] = field(default_factory=dict)

    def sh(self, script: str, *, extra_env: dict[str, str] | None = None, timeout: float = 30
           ) -> subprocess.CompletedProcess[str]:
        script = script.replace(f"PATH={HOST_PATH}", f"PATH={self.stubs}:{HOST_PATH}")
        return subprocess.run(["/bin/sh"], input=script, capture_output=True, text=True,
                              timeout=timeout, env={**self.env, **(extra_env or {})})

    def txn(self, txn_id: str) -> Path:
        return self.txn_root / txn_id

    def state(self, txn_id: str) -> str:
        return safety.TxnStatus.parse(self.sh(safety.status_script(txn_id)).stdout).state

    def fire_timer(self, txn_id: str, phase: str = "all") -> subprocess.CompletedProcess[str]:
        """What the host's timer (or the boot-time recovery) does: run rollback.sh."""
        rollback = (self.txn(txn_id) / "rollback.sh").read_text()
        return self.sh(rollback, extra_env={"HC_PHASE": phase})

    def wait_applied(self, txn_id: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state(txn_id)
            if state != "applying":
                return state
            time.sleep(0.05)
        raise AssertionError("the apply did not finish")

    def units(self) -> dict[str, tuple[str, str]]:
        text = (self.stubs / "units").read_text() if (self.stubs / "units").exists() else ""
        return {line.split()[0]: (line.split()[1], line.split()[2]) for line in text.splitlines()}


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HostSandbox]:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in (("systemd-run", SYSTEMD_RUN_STUB), ("systemctl", SYSTEMCTL_STUB),
                       ("logger", "#!/bin/sh\nexit 0\n")):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    txn_root = tmp_path / "txn"
    (tmp_path / "systemd-runtime").mkdir()
    monkeypatch.setattr(safety, "TXN_DIR", str(txn_root))
    monkeypatch.setattr(safety, "UNIT_DIR", str(tmp_path / "units"))
    monkeypatch.setattr(safety, "SYSTEMD_RUNTIME", str(tmp_path / "systemd-runtime"))
    env = {"PATH": f"{stubs}:{HOST_PATH}", "HC_STUBS": str(stubs), "LC_ALL": "C"}
    sandbox = HostSandbox(tmp_path, stubs, txn_root, env)
    yield sandbox
    # Nothing the scripts started may outlive the test.
    for pidfile in stubs.glob("unit.*.pid"):
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.killpg(int(pidfile.read_text()), 9)


def arm(host: HostSandbox, txn_id: str, changes: list[Change], guard: Guard
        ) -> subprocess.CompletedProcess[str]:
    return host.sh(safety.arm_script(txn_id, changes, guard))


def test_arm_saves_starts_the_timer_then_the_change_and_confirm_keeps_it(host: HostSandbox
                                                                         ) -> None:
    target = host.root / "etc" / "rules"
    target.parent.mkdir()
    target.write_text("old\n")
    guard = Guard(rollback_after=30)
    done = arm(host, "fw-1", [FileChange(str(target), "new\n", "old\n")], guard)
    assert done.returncode == 0 and safety.ARMED_MARKER in done.stdout, done.stdout
    assert host.wait_applied("fw-1") == "armed"
    assert target.read_text() == "new\n"
    timers = (host.stubs / "timers").read_text().split()
    assert timers[:2] == ["homeclust-rollback-fw-1", "30s"]
    # The boot-time recovery units were installed, enabled once.
    units = host.root / "units"
    assert (units / safety.RECOVER_EARLY_UNIT).exists()
    assert (units / "sysinit.target.wants" / safety.RECOVER_EARLY_UNIT).is_symlink()
    rollback = (host.txn("fw-1") / "rollback.sh").read_text()
    assert host.sh(safety.confirm_script("fw-1")).stdout.strip() == "confirmed"
    assert not host.txn("fw-1").exists()
    assert "systemctl stop homeclust-rollback-fw-1.timer" in (
        host.stubs / "systemctl.log").read_text()
    # A timer that fired anyway (the stop raced it) finds nothing to undo.
    host.sh(rollback)
    assert target.read_text() == "new\n"


def test_confirm_and_rollback_racing_exactly_one_wins(host: HostSandbox) -> None:
    target = host.root / "conf"
    for attempt in range(12):
        target.write_text("old\n")
        txn_id = f"race-{attempt}"
        arm(host, txn_id, [FileChange(str(target), "new\n", "old\n")], Guard())
        assert host.wait_applied(txn_id) == "armed"
        rollback = (host.txn(txn_id) / "rollback.sh").read_text()
        results: dict[str, str] = {}

        def confirm(txn_id: str = txn_id, results: dict[str, str] = results) -> None:
            results["confirm"] = host.sh(safety.confirm_script(txn_id)).stdout.strip()

        def roll_back(script: str = rollback) -> None:
            host.sh(script)

        threads = [threading.Thread(target=confirm), threading.Thread(target=roll_back)]
        for thread in (threads if attempt % 2 else reversed(threads)):
            thread.start()
        for thread in threads:
            thread.join()
        if results["confirm"] == "confirmed":
            assert not host.txn(txn_id).exists()
            assert target.read_text() == "new\n"
        else:
            assert results["confirm"] in ("rolling-back", "rolledback")
            assert host.state(txn_id) == "rolledback"
            assert target.read_text() == "old\n"


def test_a_batch_that_outlasts_the_timer_is_stopped_and_fully_undone(host: HostSandbox) -> None:
    """The reviewer's slow-mirror case at the right depth: whatever the guarded batch is
    doing when the timer fires, the rollback stops it first and then restores, so the
    host ends where it was and says so."""
    target = host.root / "rules"
    target.write_text("old\n")
    late = host.root / "loaded-later"
    changes: list[Change] = [
        FileChange(str(target), "new\n", "old\n"),
        CommandChange("slow step", f"sleep 3; touch {late}"),
    ]
    assert safety.ARMED_MARKER in arm(host, "slow-1", changes, Guard()).stdout
    time.sleep(0.5)
    assert host.state("slow-1") == "applying"
    assert target.read_text() == "new\n"
    started = time.monotonic()
    host.fire_timer("slow-1")
    assert time.monotonic() - started < 2.5, "the rollback must not wait for the slow batch"
    assert host.state("slow-1") == "rolledback"
    assert target.read_text() == "old\n"
    time.sleep(3.2)
    assert not late.exists(), "the batch went on after the rollback"
    assert target.read_text() == "old\n"


def test_a_failed_snapshot_changes_nothing_and_arms_nothing(host: HostSandbox) -> None:
    target = host.root / "rules"
    target.write_text("old\n")
    done = arm(host, "snap-1", [FileChange(str(target), "new\n", "old\n")],
               Guard(snapshot="echo 'cannot save' >&2; false"))
    assert done.returncode == 1
    assert safety.SNAPSHOT_FAILED in done.stdout and "nothing was changed" in done.stdout
    assert not host.txn("snap-1").exists()
    assert not (host.stubs / "timers").exists()
    time.sleep(0.3)
    assert target.read_text() == "old\n"


def test_a_failed_restore_is_reported_as_failed_not_rolled_back(host: HostSandbox) -> None:
    target = host.root / "rules"
    target.write_text("old\n")
    arm(host, "bad-1", [FileChange(str(target), "new\n", "old\n")],
        Guard(restore="echo 'iptables-restore: line 3 failed'; false"))
    host.wait_applied("bad-1")
    host.fire_timer("bad-1")
    status = safety.TxnStatus.parse(host.sh(safety.status_script("bad-1")).stdout)
    assert status.state == "rollback-failed"
    assert "FAILED: restoring the saved state" in status.rollback_log
    assert "line 3 failed" in status.rollback_log


def test_a_failed_apply_is_reported_and_rolled_back(host: HostSandbox) -> None:
    target = host.root / "rules"
    target.write_text("old\n")
    created = host.root / "new-file"
    changes: list[Change] = [FileChange(str(target), "new\n", "old\n"),
                             FileChange(str(created), "x\n", None),
                             CommandChange("load", "echo 'Bad argument'; false")]
    arm(host, "fail-1", changes, Guard())
    assert host.wait_applied("fail-1") == "apply-failed"
    status = safety.TxnStatus.parse(host.sh(safety.status_script("fail-1")).stdout)
    assert "Bad argument" in status.apply_log
    host.sh(safety.rollback_now_script("fail-1"))
    deadline = time.monotonic() + 10
    while host.state("fail-1") != "rolledback" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host.state("fail-1") == "rolledback"
    assert target.read_text() == "old\n" and not created.exists()


def test_rollback_restores_masked_and_stopped_units(host: HostSandbox) -> None:
    (host.stubs / "units").write_text("ufw.service enabled active\n"
                                      "netfilter-persistent.service disabled inactive\n")
    rules = host.root / "rules.v4"
    changes: list[Change] = [ServiceChange("ufw", enable=False, action="stop", mask=True),
                             FileChange(str(rules), "*filter\nCOMMIT\n", None),
                             ServiceChange("netfilter-persistent", enable=True)]
    arm(host, "units-1", changes, Guard())
    assert host.wait_applied("units-1") == "armed"
    assert host.units() == {"ufw.service": ("masked", "inactive"),
                            "netfilter-persistent.service": ("enabled", "inactive")}
    host.fire_timer("units-1")
    assert host.state("units-1") == "rolledback"
    # ufw is enabled and running again: the host does not boot without its firewall.
    assert host.units() == {"ufw.service": ("enabled", "active"),
                            "netfilter-persistent.service": ("disabled", "inactive")}
    assert not rules.exists()


def test_a_reboot_while_armed_rolls_back_in_two_phases(host: HostSandbox) -> None:
    """At boot the transient timer is gone: the early unit restores files and unit
    states before the network and the loaders start, the late one the live state."""
    (host.stubs / "units").write_text("firewalld.service enabled active\n")
    rules = host.root / "iptables"
    rules.write_text("old\n")
    live = host.root / "live"
    changes: list[Change] = [ServiceChange("firewalld", enable=False, action="stop", mask=True),
                             FileChange(str(rules), "new\n", "old\n")]
    arm(host, "boot-1", changes, Guard(restore=f"echo restored > {live}"))
    host.wait_applied("boot-1")
    # "Reboot": the apply is long finished, the timer is gone; early recovery runs.
    host.fire_timer("boot-1", phase="early")
    assert rules.read_text() == "old\n"
    assert host.units()["firewalld.service"][0] == "enabled"
    assert not live.exists()  # the live part waits for the system to be up
    assert host.state("boot-1") == "rolling-back"
    assert (host.txn("boot-1") / "restore-late").exists()
    host.fire_timer("boot-1", phase="late")
    assert live.read_text() == "restored\n"
    assert host.state("boot-1") == "rolledback"
    assert host.units()["firewalld.service"] == ("enabled", "active")


def test_the_recovery_units_roll_back_only_armed_changes() -> None:
    units = safety._recovery_units()
    early = units[safety.RECOVER_EARLY_UNIT]
    assert "DefaultDependencies=no" in early
    for loader in ("netfilter-persistent.service", "iptables.service", "networking.service",
                   "NetworkManager.service", "systemd-sysctl.service"):
        assert loader in early.split("Before=")[1].split("\n[")[0]
    assert 'Environment=HC_PHASE=early' in early and '-e "$$t/armed"' in early
    late = units[safety.RECOVER_LATE_UNIT]
    assert 'Environment=HC_PHASE=late' in late and '-e "$$t/restore-late"' in late


def test_the_logged_arm_script_leaves_secrets_out() -> None:
    secret = FileChange("/etc/munge/munge.key", "s3cr3t-key-material\n", None, 0o400,
                        "munge", "munge", secret=True)
    full = safety.arm_script("keys-1", [secret], Guard())
    logged = safety.arm_script("keys-1", [secret], Guard(), redact=True)
    import base64
    encoded = base64.b64encode(b"s3cr3t-key-material\n").decode()
    assert encoded in full and encoded not in logged


# =========================================================================== admin side


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Host:
    def __init__(self, name: str, opened_at: float = 0.0) -> None:
        self.name = name
        self.node = NODE
        self.opened_at = opened_at


class Connector:
    def __init__(self, clock: Clock, failures: int = 0) -> None:
        self.clock = clock
        self.failures = failures
        self.reopened = 0
        self.cancel = threading.Event()

    def reopen(self, node: Node, *, within: float) -> Host:
        self.reopened += 1
        if self.failures:
            self.failures -= 1
            self.clock.now += within  # retried for the whole window, in vain
            raise ConnectError("master: timed out connecting")
        return Host(f"fresh{self.reopened}", self.clock.now)

    def open(self, node: Node) -> Host:
        return Host("open")

    def close(self) -> None:
        pass


Answer = str | Callable[[], str]


class Script:
    """Scripted host answers per purpose; the last answer repeats."""

    def __init__(self, answers: dict[str, list[Answer]]) -> None:
        self.answers = answers
        self.log: list[tuple[str, str]] = []

    def __call__(self, host: Any, purpose: str, script: str, timeout: float | None = None, *,
                 interruptible: bool = True, log_script: str | None = None) -> CommandResult:
        self.log.append((host.name, purpose))
        queue = self.answers.get(purpose, [""])
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        out = answer() if callable(answer) else answer
        code = 1 if out.startswith(safety.SNAPSHOT_FAILED) else 0
        return CommandResult(code, out, "", 0.0)

    def purposes(self) -> list[str]:
        return [p for _, p in self.log]


ARMED = f"{safety.ARMED_MARKER} 1700000030\n"
CHANGES: list[Change] = [FileChange("/etc/x", "new\n", "old\n"), CommandChange("reload", "true")]
GUARD = Guard(snapshot="iptables-save > x", restore="iptables-restore < x", rollback_after=30)


def engine(script: Script, clock: Clock, *, failures: int = 0,
           verify: list[list[str]] | Callable[[Any], list[str]] | None = None,
           unchanged: str | None = None) -> tuple[GuardedApply, Connector]:
    connector = Connector(clock, failures)
    results = iter(verify if isinstance(verify, list) else [[]])

    def verify_fn(host: Any) -> list[str]:
        if callable(verify):
            return verify(host)
        return next(results)

    return GuardedApply(
        host=Host("old"), node=NODE, connector=connector, run=script,  # type: ignore[arg-type]
        txn_id="firewall-1", changes=CHANGES, guard=GUARD, verify=verify_fn,
        unchanged_since_arm=lambda host: unchanged, sleep=clock.sleep, clock=clock,
    ), connector


def test_confirmed_only_over_a_connection_opened_after_the_apply_finished() -> None:
    clock = Clock()
    script = Script({"arm": [ARMED], "txn-status": ["applying\n", "applying\n", "armed\n"],
                     "confirm": ["confirmed\n"]})
    machine, _connector = engine(script, clock)
    result = machine.execute()
    assert machine.trail == [Phase.ARM, Phase.AWAIT_APPLY, Phase.AWAIT_APPLY, Phase.AWAIT_APPLY,
                             Phase.RECONNECT, Phase.VERIFY, Phase.CONFIRM, Phase.CONFIRMED]
    # Asked over the old session while applying; confirmed over a new one.
    assert script.log[1][0] == "old" and script.log[-1] == ("fresh1", "confirm")
    assert result.host.name == "fresh1"  # type: ignore[attr-defined]


def test_a_connection_opened_while_still_applying_proves_nothing() -> None:
    clock = Clock()
    script = Script({"arm": [ARMED],
                     "txn-status": [lambda: (_ for _ in ()).throw(ConnectError("gone")),
                                    "applying\n", "armed\n", "armed\n"],
                     "confirm": ["confirmed\n"]})
    machine, connector = engine(script, clock)
    result = machine.execute()
    assert connector.reopened == 2  # the first new connection saw "applying"
    assert result.host.name == "fresh2"  # type: ignore[attr-defined]


def test_unreachable_after_change_waits_for_the_hosts_own_rollback() -> None:
    clock = Clock()
    script = Script({"arm": [ARMED], "txn-status": ["armed\n", "rolledback\n"]})
    machine, _ = engine(script, clock, failures=1)
    with pytest.raises(RolledBackError, match="rolled back to its previous state"):
        machine.execute()
    assert "confirm" not in script.purposes() and "rollback" not in script.purposes()
    assert clock.now >= GUARD.rollback_after  # waited for the timer before looking
    assert machine.trail[-3:] == [Phase.AWAIT_ROLLBACK, Phase.CHECK_ROLLBACK, Phase.ROLLED_BACK]


def test_not_converged_is_rolled_back_at_once_and_the_report_says_why() -> None:
    clock = Clock()
    script = Script({"arm": [ARMED], "txn-status": ["armed\n", "armed\n", "rolling-back\n",
                                                    "rolledback\n@@apply@@\n@@trial@@\n"
                                                    "eth0: \n@@rollback@@\n"],
                     "rollback": ["started\n"]})
    machine, _ = engine(script, clock, verify=lambda host: ["eth0: lacks 192.168.10.1/24"])
    with pytest.raises(RolledBackError) as error:
        machine.execute()
    assert "eth0: lacks 192.168.10.1/24" in error.value.message
    assert "trial state: eth0:" in error.value.message
    purposes = script.purposes()
    assert "rollback" in purposes and "confirm" not in purposes


def test_a_rollback_that_leaves_the_host_different_is_a_failure_not_rolled_back() -> None:
    clock = Clock()
    script = Script({"arm": [ARMED], "txn-status": ["apply-failed\n@@apply@@\nboom\n",
                                                    "rolledback\n"]})
    machine, _ = engine(script, clock, unchanged="now: load the iptables filter table")
    with pytest.raises(ApplyError) as error:
        machine.execute()
    assert not isinstance(error.value, RolledBackError)
    assert "NOT cleanly rolled back" in error.value.message and "boom" in error.value.message
    assert machine.trail[-1] is Phase.FAILED


def test_a_failed_rollback_on_the_host_is_reported_as_failed() -> None:
    clock = Clock()
    script = Script({"arm": [ARMED], "txn-status": [
        "armed\n", "armed\n",
        "rollback-failed\n@@apply@@\n@@trial@@\n@@rollback@@\nFAILED: not restored: /etc/x\n"]})
    machine, _ = engine(script, clock, verify=lambda host: ["still differs"])
    with pytest.raises(ApplyError, match="NOT cleanly rolled back") as error:
        machine.execute()
    assert "not restored: /etc/x" in str(error.value)


def test_an_error_while_checking_rolls_back_and_learns_the_outcome() -> None:
    """Hole 3: a fact or step error inside the confirm loop used to escape."""
    clock = Clock()
    script = Script({"arm": [ARMED], "txn-status": ["armed\n", "armed\n", "rolledback\n"]})

    def broken(host: Any) -> list[str]:
        raise FactError("master: cannot parse fact 'users'")

    machine, _ = engine(script, clock, verify=broken)
    with pytest.raises(RolledBackError, match="cannot parse fact"):
        machine.execute()
    assert Phase.ROLLBACK_NOW in machine.trail and machine.trail[-1] is Phase.ROLLED_BACK


def test_interrupted_while_armed_rolls_back_now_and_says_so() -> None:
    clock = Clock()
    script = Script({"arm": [ARMED], "txn-status": ["armed\n", "armed\n", "rolledback\n"]})
    cancel: dict[str, GuardedApply] = {}

    def interrupted(host: Any) -> list[str]:
        cancel["m"].cancel.set()
        raise Interrupted("master: interrupted")

    machine, _ = engine(script, clock, verify=interrupted)
    cancel["m"] = machine
    with pytest.raises(Interrupted) as error:
        machine.execute()
    assert error.value.rolled_back
    assert "rollback" in script.purposes() and "confirm" not in script.purposes()


def test_could_not_arm_changes_nothing() -> None:
    clock = Clock()
    script = Script({"arm": [f"{safety.SNAPSHOT_FAILED} saving /etc/x; nothing was changed\n"]})
    machine, _ = engine(script, clock)
    with pytest.raises(ApplyError, match="nothing of it was changed"):
        machine.execute()
    assert script.purposes() == ["arm"]


def test_every_phase_has_a_handler_and_every_path_ends() -> None:
    final = {p for p, following in safety.TRANSITIONS.items() if not following}
    assert final == {Phase.CONFIRMED, Phase.ROLLED_BACK, Phase.FAILED}
    # Every non-final phase can reach a final one.
    for phase in safety.TRANSITIONS:
        seen, todo = set(), [phase]
        while todo:
            current = todo.pop()
            seen.add(current)
            todo += [p for p in safety.TRANSITIONS[current] if p not in seen]
        assert seen & final, phase
