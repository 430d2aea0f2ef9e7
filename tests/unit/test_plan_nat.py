"""nat step planning from recorded facts of both platform families."""

from __future__ import annotations

import pytest

from homeclust.changes import Change, CommandChange, FileChange, PackagesChange, ServiceChange
from homeclust.errors import StepError
from homeclust.facts import HostFacts
from homeclust.inventory import Inventory
from homeclust.render.iptables import render_nat_table, split_rules_file
from homeclust.steps.base import PlanContext, StepPlan
from homeclust.steps.nat import MODULES_PATH, SYSCTL_PATH, NatStep, render_modules_conf, render_sysctl_conf
from tests.unit.factsbuilder import (
    after_firewall,
    check_golden,
    converged,
    drop_table,
    golden_text,
    inventory,
    lab_inventory,
    lab_text,
    recorded,
    sysctl_lines,
)

INV = inventory()
LAB = lab_inventory()  # converged Debian hosts are the lab's (tests/fixtures/lab)
STEP = NatStep()


def plan(facts: HostFacts, inv: Inventory = INV) -> StepPlan:
    return STEP.plan(PlanContext(inv, inv.master_node, facts))


def files(plan: StepPlan) -> dict[str, FileChange]:
    return {c.path: c for c in plan.changes if isinstance(c, FileChange)}


def commands(plan: StepPlan) -> list[CommandChange]:
    return [c for c in plan.changes if isinstance(c, CommandChange)]


def kinds(changes: tuple[Change, ...]) -> list[str]:
    return [c.kind for c in changes]


# --------------------------------------------------------------------------- rendered files


def test_sysctl_drop_in_matches_golden() -> None:
    check_golden("nat/dash/etc/sysctl.d/90-homeclust-nat.conf",
                 render_sysctl_conf(INV, dash_prefix=True))
    check_golden("nat/no-dash/etc/sysctl.d/90-homeclust-nat.conf",
                 render_sysctl_conf(INV, dash_prefix=False))
    check_golden("nat/etc/modules-load.d/homeclust-nat.conf", render_modules_conf())


def settings(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line and
             not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def test_sysctl_drop_in_has_the_guide_values_and_dashes_only_where_systemd_knows_them() -> None:
    dash = settings(render_sysctl_conf(INV, dash_prefix=True))
    assert dash == {"net.ipv4.ip_forward": "1",
                    "-net.netfilter.nf_conntrack_max": "131072",
                    "-net.netfilter.nf_conntrack_tcp_timeout_established": "86400"}
    # CentOS 7's systemd 219 would read "-net…" as an unknown key.
    plain = settings(render_sysctl_conf(INV, dash_prefix=False))
    assert plain == {"net.ipv4.ip_forward": "1", "net.netfilter.nf_conntrack_max": "131072",
                     "net.netfilter.nf_conntrack_tcp_timeout_established": "86400"}
    tuned = settings(render_sysctl_conf(
        inventory(nat={"conntrack_max": 262144, "tcp_timeout_established": 3600}), dash_prefix=False))
    assert tuned["net.netfilter.nf_conntrack_max"] == "262144"
    assert tuned["net.netfilter.nf_conntrack_tcp_timeout_established"] == "3600"
    assert render_modules_conf().splitlines()[-1] == "nf_conntrack"


# --------------------------------------------------------------------------- after the firewall


def test_debian_master_after_the_firewall() -> None:
    result = plan(after_firewall("debian12-master").facts())
    assert result.guard is None and result.guarded == ()  # NAT cannot cut the admin off
    # The firewall step installed and enabled the loader; nat installs nothing.
    assert not any(isinstance(c, PackagesChange | ServiceChange) for c in result.changes)

    written = files(result)
    assert set(written) == {SYSCTL_PATH, MODULES_PATH, "/etc/iptables/rules.v4"}
    assert written[SYSCTL_PATH].content == golden_text("nat/dash/etc/sysctl.d/90-homeclust-nat.conf")
    assert written[SYSCTL_PATH].old is None
    assert written[MODULES_PATH].content == golden_text("nat/etc/modules-load.d/homeclust-nat.conf")
    rules = written["/etc/iptables/rules.v4"]
    assert rules.mode == 0o600
    # The firewall's filter table stays in the file; nat adds its own.
    assert [name for name, _ in split_rules_file(rules.content or "") if name] == ["filter", "nat"]

    loads = [c for c in commands(result) if "iptables-restore" in c.command]
    assert len(loads) == 1 and render_nat_table(INV) in loads[0].command
    assert "-A POSTROUTING -s 192.168.10.0/24 -o eth0 -j MASQUERADE" in loads[0].command

    sysctls = {c.description.split()[1]: c for c in commands(result) if "sysctl" in c.command}
    assert set(sysctls) == {"net.ipv4.ip_forward",
                            "net.netfilter.nf_conntrack_tcp_timeout_established"}
    forward = sysctls["net.ipv4.ip_forward"]
    assert "sysctl -q -w net.ipv4.ip_forward=1" in forward.command
    assert forward.warn_on_failure is None  # without forwarding there is no NAT: fail
    timeout = sysctls["net.netfilter.nf_conntrack_tcp_timeout_established"]
    assert "(now 432000)" in timeout.description
    assert "=86400" in timeout.command and timeout.warn_on_failure
    # MASQUERADE is loaded before the conntrack keys are set (loading it loads conntrack).
    assert result.changes.index(loads[0]) < result.changes.index(timeout)


def test_read_only_conntrack_max_is_a_warning_not_a_change() -> None:
    result = plan(after_firewall("debian12-master").facts())
    assert not any("nf_conntrack_max" in c.command for c in commands(result))
    assert len(result.warnings) == 1
    assert "net.netfilter.nf_conntrack_max" in result.warnings[0]
    assert "read-only" in result.warnings[0] and "262144" in result.warnings[0]


def test_rocky_master_after_the_firewall_sets_every_key() -> None:
    result = plan(after_firewall("rocky9-master").facts())
    assert not any(isinstance(c, PackagesChange | ServiceChange) for c in result.changes)
    assert set(files(result)) == {SYSCTL_PATH, MODULES_PATH, "/etc/sysconfig/iptables"}
    assert files(result)["/etc/sysconfig/iptables"].mode == 0o600
    # Here conntrack is loaded and writable: all three keys are set, no warning.
    assert sorted(c.description.split()[1] for c in commands(result) if "sysctl" in c.command) == [
        "net.ipv4.ip_forward", "net.netfilter.nf_conntrack_max",
        "net.netfilter.nf_conntrack_tcp_timeout_established"]
    assert result.warnings == ()


def test_centos7_keeps_the_firewalls_filter_table_and_has_no_dash_sysctls() -> None:
    """A CentOS 7 host (recorded as a worker) planned as a master: platform knowledge only."""
    facts = after_firewall("centos7-worker").facts()
    result = plan(facts)
    written = files(result)
    assert written[SYSCTL_PATH].content == golden_text(
        "nat/no-dash/etc/sysctl.d/90-homeclust-nat.conf")
    rules = written["/etc/sysconfig/iptables"]
    blocks = dict(split_rules_file(rules.content or ""))
    assert blocks["filter"] == dict(split_rules_file(rules.old or ""))["filter"]
    assert ":FORWARD DROP" in blocks["filter"]
    assert blocks["nat"] == render_nat_table(INV)


# --------------------------------------------------------------------------- never open forwarding


@pytest.mark.parametrize(("name", "why"), [
    ("debian12-master", "live FORWARD policy is ACCEPT (no filter table)"),
    ("rocky9-master", "live FORWARD policy is ACCEPT"),
    ("ubuntu2204-master", "live FORWARD policy is"),
    ("centos7-worker", "live FORWARD policy is ACCEPT"),
])
def test_nat_alone_on_a_fresh_master_is_refused(name: str, why: str) -> None:
    """Forwarding before a default-deny FORWARD chain would route the institute network
    into the private one (``up --only nat`` on a fresh master)."""
    with pytest.raises(StepError, match="refusing to turn on forwarding") as error:
        plan(recorded(name).facts())
    assert why in error.value.message
    assert "homeclust up --only firewall,nat" in (error.value.hint or "")


def test_nat_is_refused_while_the_saved_rules_would_not_be_default_deny_at_boot() -> None:
    """RHEL: iptables-services ships a stock filter table (FORWARD ACCEPT + REJECT rule);
    with it in the rules file, forwarding would be open after the next boot."""
    stock = recorded("centos7-worker").file_text("/etc/sysconfig/iptables")
    facts = after_firewall("centos7-worker").but(files={"/etc/sysconfig/iptables": stock}).facts()
    with pytest.raises(StepError, match=r"/etc/sysconfig/iptables would load FORWARD policy "
                                        r"ACCEPT at boot"):
        plan(facts)


def test_nat_never_touches_other_firewall_managers() -> None:
    facts = after_firewall("debian12-master").with_units(
        {"ufw.service": ("enabled", True), "firewalld.service": ("enabled", True)}).but(
        sysctl=sysctl_lines({"net.ipv4.ip_forward": ("rw", "0"),
                             "net.netfilter.nf_conntrack_max": None,
                             "net.netfilter.nf_conntrack_tcp_timeout_established": None})).facts()
    result = plan(facts)
    assert not any(isinstance(c, ServiceChange) and c.unit in ("ufw", "firewalld")
                   for c in result.changes)
    conntrack = [c for c in commands(result) if "nf_conntrack_max" in c.command]
    assert len(conntrack) == 1 and "(now absent)" in conntrack[0].description
    assert conntrack[0].command.startswith("modprobe nf_conntrack")


def test_posture_fails_when_forwarding_is_on_without_default_deny() -> None:
    facts = converged("debian12-master").but(iptables_save=(
        "*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n")).facts()
    items = {i.name: i for i in STEP.posture(PlanContext(INV, INV.master_node, facts))}
    assert items["forwarding behind default-deny"].status == "fail"
    ok = {i.name: i for i in STEP.posture(PlanContext(INV, INV.master_node,
                                                      converged("debian12-master").facts()))}
    assert ok["forwarding behind default-deny"].status == "pass"


# --------------------------------------------------------------------------- converged


def test_converged_lab_master_still_warns_about_the_read_only_key() -> None:
    result = plan(converged("debian12-master").facts(), LAB)
    assert len(result.warnings) == 1 and "nf_conntrack_max" in result.warnings[0]
    assert plan(converged("rocky9-master").facts()).warnings == ()


# --------------------------------------------------------------------------- drift


def test_wrong_sysctl_plans_exactly_that_sysctl() -> None:
    facts = converged("rocky9-master").but(sysctl=sysctl_lines({
        "net.ipv4.ip_forward": ("rw", "1"),
        "net.netfilter.nf_conntrack_max": ("rw", "131072"),
        "net.netfilter.nf_conntrack_tcp_timeout_established": ("rw", "432000"),
    })).facts()
    (change,) = plan(facts).changes
    assert isinstance(change, CommandChange)
    assert change.description == (
        "set net.netfilter.nf_conntrack_tcp_timeout_established = 86400 (now 432000)")


def test_forwarding_switched_off_plans_it_back_on() -> None:
    facts = converged("debian12-master").but(sysctl=sysctl_lines({
        "net.ipv4.ip_forward": ("rw", "0"),
        "net.netfilter.nf_conntrack_max": ("ro", "262144"),
        "net.netfilter.nf_conntrack_tcp_timeout_established": ("rw", "86400"),
    })).facts()
    (change,) = plan(facts, LAB).changes
    assert isinstance(change, CommandChange) and "net.ipv4.ip_forward=1" in change.command


def test_flushed_nat_table_is_reloaded_without_rewriting_the_file() -> None:
    without_nat = drop_table(lab_text("master", "iptables-save.txt"), "nat")
    facts = converged("debian12-master").but(iptables_save=without_nat).facts()
    assert "nat" not in facts.iptables
    (change,) = plan(facts, LAB).changes
    assert isinstance(change, CommandChange) and "iptables-restore" in change.command


def test_hand_edited_drop_in_is_rewritten() -> None:
    facts = converged("debian12-master").but(files={
        SYSCTL_PATH: "net.ipv4.ip_forward = 1\n"}).facts()
    (change,) = plan(facts, LAB).changes
    assert isinstance(change, FileChange) and change.path == SYSCTL_PATH
    assert "+-net.netfilter.nf_conntrack_max = 131072" in change.diff()


# --------------------------------------------------------------------------- errors


def test_read_only_ip_forward_is_a_step_error() -> None:
    facts = after_firewall("debian12-master").but(sysctl=sysctl_lines({
        "net.ipv4.ip_forward": ("ro", "0"),
        "net.netfilter.nf_conntrack_max": ("rw", "131072"),
        "net.netfilter.nf_conntrack_tcp_timeout_established": ("rw", "86400"),
    })).facts()
    with pytest.raises(StepError, match=r"net\.ipv4\.ip_forward is read-only"):
        plan(facts)


def test_read_only_ip_forward_that_is_already_on_is_fine() -> None:
    facts = converged("debian12-master").but(sysctl=sysctl_lines({
        "net.ipv4.ip_forward": ("ro", "1"),
        "net.netfilter.nf_conntrack_max": ("ro", "262144"),
        "net.netfilter.nf_conntrack_tcp_timeout_established": ("rw", "86400"),
    })).facts()
    assert plan(facts, LAB).changes == ()


def test_missing_public_interface_is_a_step_error_naming_it() -> None:
    inv = inventory(master={"public_interface": "eno1"})
    with pytest.raises(StepError, match="eno1"):
        plan(recorded("debian12-master").facts(), inv)


def test_nat_targets_only_the_master() -> None:
    assert STEP.targets(INV, INV.master_node)
    assert not any(STEP.targets(INV, node) for node in INV.worker_nodes)


def test_plan_before_the_firewall_ran_shows_nat_waiting_for_it() -> None:
    """`homeclust plan` on a fresh cluster: the firewall step of the same run comes first,
    so nat shows its changes (and why forwarding waits) instead of failing."""
    inv = INV
    ctx = PlanContext(inv, inv.master_node, recorded("debian12-master").facts(),
                      pending_steps=frozenset({"network", "firewall"}))
    result = STEP.plan(ctx)
    assert any("net.ipv4.ip_forward=1" in c.command for c in commands(result))
    assert any("forwarding waits for the firewall step" in w for w in result.warnings)
    # When applying, earlier steps have run: a FORWARD chain still open is refused.
    with pytest.raises(StepError, match="refusing to turn on forwarding"):
        STEP.plan(PlanContext(inv, inv.master_node, recorded("debian12-master").facts()))
