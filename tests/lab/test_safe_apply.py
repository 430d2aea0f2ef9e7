"""The safe-apply engine on the lab, at its riskiest moments.

Each test makes the master's firewall need a change (a stray live rule), and
slows the guarded part down with one extra guarded command (``sleep``) so
the test can act while the change is armed: Ctrl-C, a killed admin process,
a second run, a reboot of the master.  homeclust runs as its own process
(``python -c`` patching that one planner, then the real CLI), so signals,
locks and connections are the real ones.  What a test asserts is read from
the hosts with ``lab.exec``, independently of homeclust, and every test ends
with a fresh ``plan`` confirming what homeclust reported.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from homeclust.lab import Lab
from tests.lab.helpers import REPO_ROOT, homeclust, homeclust_json, sh, statuses, tcp_connects

pytestmark = pytest.mark.lab

#: The steps these tests set up (plan looks at them only: the later steps are not set up here).
BASE_STEPS = "network,firewall,nat"

STRAY_RULE = "-A INPUT -p tcp --dport 9999 -j ACCEPT"
RULES = "iptables-save -t filter | grep -v '^#' | sed 's/\\[[0-9]*:[0-9]*\\]//'"
TXNS = "ls /var/lib/homeclust/txn 2>/dev/null"

#: Runs the real CLI with the firewall's guarded part slowed down by SLOW seconds.
PATCHED_CLI = textwrap.dedent("""
    import sys
    from dataclasses import replace
    from homeclust.changes import CommandChange
    from homeclust.steps.firewall import FirewallStep

    real = FirewallStep.plan
    def slow(self, ctx):
        plan = real(self, ctx)
        if plan.guarded and ctx.node.is_master:
            plan = replace(plan, guarded=plan.guarded + (
                CommandChange("wait (test)", "sleep {slow}"),))
        return plan
    FirewallStep.plan = slow
    from homeclust.cli import main
    main(sys.argv[1:])
""")


def _default_sigint() -> None:
    # A shell without job control (cron, nohup, `cmd &` in a script) starts its
    # background commands with SIGINT ignored, and Python then never turns Ctrl-C
    # into KeyboardInterrupt: the tests that send SIGINT set its disposition themselves.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def patched(inventory: Path, *args: str, slow: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PATCHED_CLI.format(slow=slow), "-i", str(inventory), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL, preexec_fn=_default_sigint)


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def armed(lab: Lab) -> bool:
    names = sh(lab, "master", TXNS, check=False).split()
    return any(sh(lab, "master", f"test -e /var/lib/homeclust/txn/{n}/armed && echo y",
                  check=False).strip() == "y" for n in names)


@pytest.fixture(scope="module")
def converged(lab: Lab, lab_inventory_path: Path) -> Lab:
    """The lab with network, firewall and nat in place (whatever ran before)."""
    code, data = homeclust_json(lab_inventory_path, "up", "--only", "network,firewall,nat",
                                timeout=1200)
    assert code == 0, data
    return lab


@pytest.fixture
def drifted(converged: Lab) -> Iterator[str]:
    """The master's live filter table has a stray rule: the next firewall run reloads it.
    Yields the rules as they were before the stray rule (what `up` restores)."""
    good = sh(converged, "master", RULES)
    sh(converged, "master", f"iptables {STRAY_RULE.replace('-A', '-I', 1)}")
    yield good
    sh(converged, "master", "iptables -D INPUT -p tcp --dport 9999 -j ACCEPT", check=False)


def test_ctrl_c_while_armed_rolls_back_now_and_exits_130(
        converged: Lab, drifted: str, lab_inventory_path: Path) -> None:
    before = sh(converged, "master", RULES)
    run = patched(lab_inventory_path, "up", "--only", "firewall", "--host", "master", "--json",
                  slow=15)
    try:
        wait_for(lambda: armed(converged), 120, "the master's change to be armed")
        time.sleep(1)
        assert "9999" not in sh(converged, "master", RULES)  # the new table is live
        started = time.monotonic()
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, out + err
    assert time.monotonic() - started < 20, "rolled back now, not when the timer fired"
    assert '"interrupted": true' in out and "rolled back" in out
    # The host is exactly as before the run, and nothing is left pending.
    assert sh(converged, "master", RULES) == before
    assert sh(converged, "master", TXNS, check=False).strip() == ""
    # A fresh plan agrees: the stray rule is still there to be removed, nothing else.
    code, data = homeclust_json(lab_inventory_path, "plan", "--only", "firewall",
                                "--host", "master")
    assert code == 3 and statuses(data)[("master", "firewall")] == "pending"
    # The next up converges; long after every timer could have fired, plan is clean.
    assert homeclust_json(lab_inventory_path, "up", "--only", "firewall")[0] == 0
    time.sleep(31)
    assert homeclust_json(lab_inventory_path, "plan", "--only", BASE_STEPS)[0] == 0


def test_killed_admin_the_host_rolls_back_alone_and_the_next_run_says_so(
        converged: Lab, drifted: str, lab_inventory_path: Path) -> None:
    before = sh(converged, "master", RULES)
    run = patched(lab_inventory_path, "up", "--only", "firewall", "--host", "master",
                  slow=60)
    try:
        wait_for(lambda: armed(converged), 120, "the master's change to be armed")
        run.send_signal(signal.SIGKILL)  # no handler runs: like a lost laptop
        run.wait(timeout=10)
        # Another run right away is refused: the dead run's guarded change is pending.
        busy = homeclust(lab_inventory_path, "up", "--only", "network")
        assert busy.returncode == 1
        assert "in the middle of a guarded change" in busy.stdout + busy.stderr
        # The master's own timer undoes the change.
        wait_for(lambda: sh(converged, "master", RULES) == before, 60,
                 "the master to roll back by itself")
    finally:
        if run.poll() is None:
            run.kill()
    # Once the reservation ends, the next run reports what happened and converges.
    deadline = time.monotonic() + 90
    while True:
        code, data = homeclust_json(lab_inventory_path, "up", "--only", "firewall")
        if code == 0 or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert code == 0, data
    notes = [n["text"] for n in data["notices"] if n["host"] == "master"]
    assert any("rolled back" in n for n in notes), notes
    assert sh(converged, "master", TXNS, check=False).strip() == ""
    assert "9999" not in sh(converged, "master", RULES)
    assert homeclust_json(lab_inventory_path, "plan", "--only", BASE_STEPS)[0] == 0


def test_a_second_run_during_a_guarded_master_change_is_refused_and_the_first_succeeds(
        converged: Lab, drifted: str, lab_inventory_path: Path) -> None:
    run = patched(lab_inventory_path, "up", "--only", "firewall", "--host", "master", "--json",
                  slow=8)
    try:
        wait_for(lambda: armed(converged), 120, "the master's change to be armed")
        second = homeclust(lab_inventory_path, "up", "--only", "network")
        assert second.returncode == 1
        assert "lock" in second.stdout + second.stderr
        out, err = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            run.kill()
    # The first run replaced its master connection while confirming and kept its lock.
    assert run.returncode == 0, out + err
    assert '"status": "changed"' in out
    assert "9999" not in sh(converged, "master", RULES)
    assert homeclust_json(lab_inventory_path, "plan", "--only", BASE_STEPS)[0] == 0


def test_a_reboot_while_armed_comes_back_in_the_previous_state(
        converged: Lab, drifted: str, lab_inventory_path: Path) -> None:
    before_rules = sh(converged, "master", RULES)
    # The saved rules change too, so the reboot would load the new ones without recovery.
    sh(converged, "master", "echo '# stray comment' >> /etc/iptables/rules.v4")
    before_file = sh(converged, "master", "sha256sum /etc/iptables/rules.v4")
    run = patched(lab_inventory_path, "up", "--only", "firewall", "--host", "master", "--json",
                  slow=60)
    try:
        wait_for(lambda: armed(converged), 120, "the master's change to be armed")
        time.sleep(1)
        assert sh(converged, "master", "sha256sum /etc/iptables/rules.v4") != before_file
        converged.reboot("master")
        out, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    # Back in the previous state: files and live rules as before, the change rolled back.
    assert sh(converged, "master", "sha256sum /etc/iptables/rules.v4") == before_file
    assert sh(converged, "master", RULES) == before_rules
    assert sh(converged, "master", TXNS, check=False).strip() == ""
    assert run.returncode == 1, out + err
    assert '"status": "rolled-back"' in out, out
    code, _ = homeclust_json(lab_inventory_path, "up", "--only", "firewall")
    assert code == 0
    assert homeclust_json(lab_inventory_path, "plan", "--only", BASE_STEPS)[0] == 0


def test_nat_alone_on_a_fresh_master_never_opens_the_private_network(
        lab: Lab, lab_inventory_path: Path) -> None:
    """Hole 7: `up --only nat` on a fresh lab used to route the institute into the
    private network, persistently."""
    lab.reset("master")
    try:
        done = homeclust(lab_inventory_path, "up", "--only", "nat")
        assert done.returncode == 1
        assert "refusing to turn on forwarding" in done.stdout + done.stderr
        assert sh(lab, "master", "cat /proc/sys/net/ipv4/ip_forward").strip() == "0"
        assert sh(lab, "master", "ls /etc/sysctl.d/90-homeclust-nat.conf 2>/dev/null || true") \
            == ""
        master = str(lab.master_public_address)
        lab.exec_internet(["ip", "route", "replace", "192.168.10.0/24", "via", master])
        try:
            assert not tcp_connects(lab, "internet", "192.168.10.2", 22)
        finally:
            lab.exec_internet(["ip", "route", "del", "192.168.10.0/24"], check=False)
        # Nothing was left that a reboot would turn on either.
        lab.reboot("master")
        assert sh(lab, "master", "cat /proc/sys/net/ipv4/ip_forward").strip() == "0"
    finally:
        lab.reset("master")
