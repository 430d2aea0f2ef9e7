"""The guarded-apply state machine (homeclust.safety) with a fake host and clock.

The shell side (timer, atomic rename, restore) is proven on the lab; here:
who is asked what, in which order, and what is reported.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from homeclust import safety
from homeclust.changes import CommandChange, FileChange
from homeclust.errors import ApplyError, ConnectError, RolledBackError
from homeclust.inventory import Node, parse_inventory
from homeclust.steps.base import Guard
from homeclust.transport import CommandResult

NODE = parse_inventory({
    "master": {"name": "master", "address": "10.0.0.1", "private_address": "192.168.10.1"},
}, Path("t.toml")).master_node
CHANGES = (FileChange("/etc/x", "new\n", "old\n"), CommandChange("reload", "true"))
GUARD = Guard(snapshot="iptables-save > x", restore="iptables-restore < x", rollback_after=30)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Host:
    def __init__(self, name: str) -> None:
        self.name = name
        self.node = NODE


class Connector:
    def __init__(self, clock: Clock, failures: int = 0) -> None:
        self.clock = clock
        self.failures = failures
        self.reopened = 0

    def reopen(self, node: Node, *, within: float) -> Host:
        self.reopened += 1
        if self.failures:
            self.failures -= 1
            self.clock.now += within  # retried for the whole window, in vain
            raise ConnectError("master: timed out connecting")
        return Host(f"fresh{self.reopened}")

    def open(self, node: Node) -> Host:
        return Host("open")

    def close(self) -> None:
        pass


def scripted(answers: dict[str, Iterator[str]], log: list[tuple[str, str]]) -> safety.ScriptRunner:
    def run(host: object, purpose: str, script: str, timeout: float | None) -> CommandResult:
        log.append((getattr(host, "name", "?"), purpose))
        out = next(answers[purpose]) if purpose in answers else ""
        return CommandResult(0, out, "", 0.0)

    return run


def go(run: safety.ScriptRunner, connector: Any, clock: Clock, verify: list[list[str]]
       ) -> safety.GuardedResult:
    results = iter(verify)
    return safety.apply_guarded(
        host=cast(Any, Host("old")), node=NODE, connector=connector, run=run, txn_id="firewall-1",
        changes=CHANGES, guard=GUARD, verify=lambda h: next(results), sleep=clock.sleep,
        clock=clock)


def test_confirmed_over_a_new_connection() -> None:
    clock, log = Clock(), list[tuple[str, str]]()
    run = scripted({"arm": iter(["@@homeclust-armed@@\n"]), "txn-status": iter(["ARMED\n"]),
                    "confirm": iter(["CONFIRMED\n"])}, log)
    result = go(run, Connector(clock), clock, [[]])
    assert [p for _, p in log] == ["arm", "txn-status", "confirm"]
    assert log[0][0] == "old" and log[2][0] == "fresh1"  # confirmed through the new connection
    assert result.host.name == "fresh1"  # type: ignore[attr-defined]


def test_unreachable_after_change_waits_for_the_hosts_own_rollback() -> None:
    clock, log = Clock(), list[tuple[str, str]]()
    run = scripted({"arm": iter(["@@homeclust-armed@@\n"]),
                    "txn-status": iter(["ROLLEDBACK\nrollback started\n"])}, log)
    connector = Connector(clock, failures=1)
    with pytest.raises(RolledBackError, match="rolled back to its previous state"):
        go(run, connector, clock, [])
    assert [p for _, p in log] == ["arm", "txn-status", "txn-archive"]
    assert "confirm" not in [p for _, p in log]
    assert clock.now >= GUARD.rollback_after  # waited for the timer before looking


def test_not_converged_is_rolled_back_at_once() -> None:
    clock, log = Clock(), list[tuple[str, str]]()
    run = scripted({"arm": iter(["@@homeclust-armed@@\n"]),
                    "txn-status": iter(["ARMED\n"] * 20 + ["ROLLEDBACK\n"]),
                    "rollback": iter(["STARTED\n"])}, log)
    # verify keeps finding a missing address until the confirm window closes
    with pytest.raises(RolledBackError, match="eth0: lacks"):
        go(run, Connector(clock), clock, [["eth0: lacks 192.168.10.1/24"]] * 20)
    purposes = [p for _, p in log]
    assert "rollback" in purposes and "confirm" not in purposes


def test_confirm_losing_the_race_reports_rollback() -> None:
    clock, log = Clock(), list[tuple[str, str]]()
    run = scripted({"arm": iter(["@@homeclust-armed@@\n"]), "txn-status": iter(
        ["ARMED\n", "ROLLEDBACK\n"]), "confirm": iter(["ROLLEDBACK\n"])}, log)
    with pytest.raises(RolledBackError, match="lost the race"):
        go(run, Connector(clock), clock, [[]])


def test_failed_apply_restores_and_reports() -> None:
    clock, log = Clock(), list[tuple[str, str]]()

    def run(host: object, purpose: str, script: str, timeout: float | None) -> CommandResult:
        log.append(("", purpose))
        return CommandResult(1, "@@homeclust-armed@@\n@@homeclust-apply-failed@@ rolling back now",
                             "", 0.0)

    with pytest.raises(ApplyError, match="previous state was restored"):
        go(run, Connector(clock), clock, [])
    assert [p for _, p in log] == ["arm"]


def test_could_not_arm_changes_nothing() -> None:
    clock, log = Clock(), list[tuple[str, str]]()
    run = scripted({"arm": iter(["mkdir: cannot create directory: Read-only file system"])}, log)
    with pytest.raises(ApplyError, match="could not arm"):
        go(run, Connector(clock), clock, [])


def test_arm_script_backs_up_files_and_is_exclusive() -> None:
    script = safety.arm_script("firewall-1", CHANGES, GUARD)
    assert 'cp -a /etc/x "$HC_TXN/backup/file0"' in script
    assert 'mv "$HC_TXN/armed" "$HC_TXN/rolling-back" 2>/dev/null || exit 0' in script
    assert "--on-active=30s" in script and "setsid" in script
    # The timer is armed before anything is applied.
    assert script.index("systemd-run --quiet --unit=homeclust-rollback") < script.index("hc_file")
    confirm = safety.confirm_script("firewall-1")
    assert 'mv "$t/armed" "$t/confirmed"' in confirm
