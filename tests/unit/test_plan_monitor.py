"""monitor step planning from recorded facts of both families: tools everywhere, fail2ban's
sshd jail on the master with the log source the host has, checks."""

from __future__ import annotations

import pytest

from homeclust.changes import FileChange, PackagesChange, ServiceChange
from homeclust.inventory import Inventory
from homeclust.render.fail2ban import JAIL_PATH
from homeclust.steps import REGISTRY
from homeclust.steps.base import PlanContext, StepPlan
from tests.unit.factsbuilder import (
    CONVERGED_TABLES,
    FactsBuilder,
    golden_text,
    inventory,
    recorded,
    repo_converged,
)

INV = inventory(**CONVERGED_TABLES)
STEP = REGISTRY["monitor"]


def plan(facts: FactsBuilder, node: str = "master", inv: Inventory = INV) -> StepPlan:
    return STEP.plan(PlanContext(inv, inv.node(node), facts.facts()))


def installs(result: StepPlan) -> list[tuple[str, ...]]:
    return [tuple(sorted(c.packages)) for c in result.changes if isinstance(c, PackagesChange)]


def test_debian12_master_reads_the_journal_and_installs_its_reader() -> None:
    result = plan(recorded("debian12-master"))
    jail = result.changes[0]
    assert isinstance(jail, FileChange) and jail.path == JAIL_PATH
    assert jail.content == golden_text("fail2ban/journal.local")
    assert installs(result) == [("fail2ban", "python3-systemd", "tcpdump")]
    services = [c for c in result.changes if isinstance(c, ServiceChange)]
    assert [(s.enable, s.action, s.when_changed) for s in services] == [
        (True, "start", ()), (None, "restart", (JAIL_PATH,))]


def test_a_host_with_an_auth_log_reads_that_file_without_the_journal_reader() -> None:
    result = plan(recorded("debian12-master").but(x_auth_logs="/var/log/auth.log\n"))
    jail = result.changes[0]
    assert isinstance(jail, FileChange)
    assert jail.content == golden_text("fail2ban/auth-log.local")
    assert installs(result) == [("fail2ban", "tcpdump")]


def test_rhel_master_gets_epel_and_fail2ban_server_banning_through_iptables() -> None:
    result = plan(recorded("rocky9-master"))
    assert installs(result) == [("epel-release",),
                                ("fail2ban-server", "fail2ban-systemd", "tcpdump")]
    jail = result.changes[0]
    assert isinstance(jail, FileChange)
    # never firewalld's banaction (the firewall step masks firewalld)
    assert "banaction = iptables-multiport" in (jail.content or "").splitlines()
    secure = plan(recorded("rocky9-master").but(x_auth_logs="/var/log/secure\n"))
    assert secure.changes[0].content == golden_text("fail2ban/secure.local")  # type: ignore[union-attr]


@pytest.mark.parametrize(("name", "node"), [("debian12-worker", "worker1"),
                                            ("centos7-worker", "worker2")])
def test_workers_get_only_the_tools(name: str, node: str) -> None:
    result = plan(recorded(name), node)
    assert result.descriptions() == ["install tcpdump"]
    assert STEP.worker_packages(INV, None) == ("tcpdump",)  # type: ignore[arg-type]


def test_inventory_values_reach_the_jail() -> None:
    inv = inventory(monitor={"tools": ["tcpdump"], "fail2ban": {"maxretry": 2, "bantime": 60}})
    jail = plan(recorded("debian12-master"), inv=inv).changes[0]
    assert isinstance(jail, FileChange)
    lines = (jail.content or "").splitlines()
    assert "maxretry = 2" in lines and "bantime = 60" in lines


def test_converged_master_plans_nothing_and_a_stopped_fail2ban_is_started() -> None:
    master = repo_converged("debian12-master")
    assert plan(master).changes == ()
    stopped = master.with_units({"fail2ban.service": ("enabled", False)})
    assert plan(stopped).descriptions() == ["enable and start fail2ban.service"]


def test_a_changed_jail_is_rewritten_and_fail2ban_restarted() -> None:
    edited = repo_converged("debian12-master").but(files={JAIL_PATH: "[sshd]\nenabled = false\n"})
    assert plan(edited).descriptions() == [f"update {JAIL_PATH}",
                                           f"restart fail2ban.service (if {JAIL_PATH} changed)"]


def test_probe_reports_the_jail_and_its_bans() -> None:
    master = PlanContext(INV, INV.master_node, repo_converged("debian12-master").facts())
    (probe,) = STEP.probes(master)
    assert probe.script.startswith("fail2ban-client status sshd")
    status = ("Status for the jail: sshd\n|- Filter\n|  |- Currently failed:\t0\n"
              "|  `- Journal matches:\t_SYSTEMD_UNIT=sshd.service + _COMM=sshd\n"
              "`- Actions\n   |- Currently banned:\t1\n   |- Total banned:\t1\n"
              "   `- Banned IP list:\t10.77.0.1\n")
    item = probe.evaluate(0, status)
    assert (item.status, item.detail) == ("pass",
                                          "active, reading the journal; 1 address(es) banned now")
    down = probe.evaluate(255, "ERROR   Failed to access socket path: /var/run/fail2ban/"
                               "fail2ban.sock. Is fail2ban running?\n")
    assert down.status == "fail" and "Is fail2ban running?" in down.detail
    worker = PlanContext(INV, INV.node("worker1"), repo_converged("debian12-worker").facts())
    assert STEP.probes(worker) == []
