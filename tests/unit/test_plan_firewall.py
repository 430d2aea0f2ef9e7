"""firewall step planning from recorded facts of both platform families, lockout protection."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from homeclust.changes import CommandChange, FileChange, PackagesChange, ServiceChange
from homeclust.errors import StepError
from homeclust.facts import HostFacts
from homeclust.inventory import Inventory
from homeclust.render.iptables import render_filter_table, split_rules_file
from homeclust.steps.base import PlanContext, StepPlan
from homeclust.steps.firewall import ROLLBACK_AFTER, FirewallStep
from tests.unit.factsbuilder import (
    after_firewall,
    converged,
    edit_table,
    fixture_text,
    golden_text,
    inventory,
    lab_inventory,
    lab_text,
    recorded,
    repo_master_for,
)

INV = inventory()
LAB = lab_inventory()  # converged Debian hosts are the lab's (tests/fixtures/lab)
STEP = FirewallStep()


def plan(facts: HostFacts, node: str = "master", inv: Inventory = INV) -> StepPlan:
    return STEP.plan(PlanContext(inv, inv.node(node), facts))


def files(plan: StepPlan) -> dict[str, FileChange]:
    return {c.path: c for c in plan.all_changes if isinstance(c, FileChange)}


def loads(plan: StepPlan) -> list[CommandChange]:
    return [c for c in plan.all_changes
            if isinstance(c, CommandChange) and "iptables-restore" in c.command]


def restore_input(command: str, live: str = "") -> str:
    """What ``command`` feeds to (ip6)iptables-restore, run for real under sh with the
    live table ``live`` (what (ip6)iptables-save prints on the host at that moment)."""
    with tempfile.TemporaryDirectory() as tmp:
        stubs = Path(tmp)
        for tool in ("iptables", "ip6tables"):
            (stubs / f"{tool}-save").write_text(f"#!/bin/sh\ncat <<'EOF'\n{live}EOF\n")
            (stubs / f"{tool}-restore").write_text(f"#!/bin/sh\ncat > {tmp}/restored\n")
        for stub in stubs.iterdir():
            stub.chmod(0o755)
        subprocess.run(["/bin/sh", "-c", command], check=True, timeout=10,
                       env={"PATH": f"{tmp}:/usr/bin:/bin"})
        return (stubs / "restored").read_text()


# --------------------------------------------------------------------------- fresh hosts


def test_fresh_debian_master() -> None:
    result = plan(recorded("debian12-master").facts())
    # The package is installed before the guard's timer starts: a slow mirror cannot
    # make the rollback fire on a good change.
    (packages,) = result.changes
    load, rules, load6, rules6, service = result.guarded
    assert isinstance(packages, PackagesChange) and packages.packages == ("iptables-persistent",)
    assert packages.preseed and "debconf-set-selections" in packages.preseed
    # One loader for both families on Debian, enabled once the rules files are written.
    assert service == ServiceChange("netfilter-persistent", enable=True)
    assert isinstance(load, CommandChange)
    assert restore_input(load.command) == golden_text("iptables/filter-master-default.rules")
    assert "-A INPUT -i eth0 -p tcp -m tcp --dport 22 -j ACCEPT" in load.diff
    assert isinstance(rules, FileChange) and rules.path == "/etc/iptables/rules.v4"
    assert rules.mode == 0o600 and rules.old is None
    assert [name for name, _ in split_rules_file(rules.content or "") if name] == ["filter"]
    # IPv6 is up on this host: it gets the same default-deny, or it would be a way around.
    assert isinstance(load6, CommandChange) and "| ip6tables-restore" in load6.command
    assert restore_input(load6.command) == golden_text("iptables/filter6-master.rules")
    assert isinstance(rules6, FileChange) and rules6.path == "/etc/iptables/rules.v6"
    assert rules6.content == golden_text("iptables/rules-master.v6")
    assert result.guard is not None
    assert "iptables-save" in result.guard.snapshot and "iptables-restore" in result.guard.restore
    assert "ip6tables-save" in result.guard.snapshot
    assert "ip6tables-restore" in result.guard.restore
    assert result.guard.rollback_after == ROLLBACK_AFTER


def test_fresh_rocky_master_masks_firewalld_and_uses_iptables_services() -> None:
    result = plan(recorded("rocky9-master").facts())
    (packages,) = result.changes
    firewalld, load, rules, load6, rules6, iptables, ip6tables = result.guarded
    assert isinstance(packages, PackagesChange)
    assert packages.packages == ("iptables-nft", "iptables-services")
    assert firewalld == ServiceChange("firewalld", enable=False, action="stop", mask=True)
    assert iptables == ServiceChange("iptables", enable=True)
    assert ip6tables == ServiceChange("ip6tables", enable=True)
    assert isinstance(load, CommandChange)
    assert isinstance(rules, FileChange) and rules.path == "/etc/sysconfig/iptables"
    assert rules.mode == 0o600
    assert isinstance(load6, CommandChange) and "ip6tables-restore" in load6.command
    assert isinstance(rules6, FileChange) and rules6.path == "/etc/sysconfig/ip6tables"
    assert result.guard is not None


def test_host_without_ipv6_gets_no_ipv6_rules() -> None:
    result = plan(recorded("centos7-worker").facts(), "worker2")
    assert not any("ip6tables" in c.description for c in result.all_changes)
    assert result.guard is not None and "ip6tables" not in result.guard.snapshot


def test_ipv6_drift_alone_is_planned_and_guarded() -> None:
    save6 = edit_table(lab_text("worker1", "ip6tables-save.txt"), "filter",
                       policy=("INPUT", "ACCEPT"))
    result = plan(converged("debian12-worker").but(ip6tables_save=save6).facts(), "worker1", LAB)
    assert result.changes == ()
    assert [c.description for c in result.guarded] == [
        "load the ip6tables filter table (ip6tables-restore)"]
    assert result.guard is not None


def test_centos7_worker_with_the_stock_ruleset() -> None:
    facts = recorded("centos7-worker").facts()
    result = plan(facts, "worker2")
    # iptables-services is installed and enabled, firewalld disabled: nothing to install.
    assert not any(isinstance(c, PackagesChange | ServiceChange) for c in result.all_changes)
    (load,) = loads(result)
    assert restore_input(load.command) == render_filter_table(INV, INV.node("worker2"))
    rules = files(result)["/etc/sysconfig/iptables"]
    assert rules.old == facts.file_text("/etc/sysconfig/iptables")
    assert "icmp-host-prohibited" not in (rules.content or "")
    # Both workers use eth0, so worker2's rules file is worker1's golden file.
    assert rules.content == golden_text("iptables/rules-worker.v4")
    assert result.guard is not None


def test_ubuntu_master_masks_ufw() -> None:
    result = plan(recorded("ubuntu2204-master").facts())
    services = [c for c in result.guarded if isinstance(c, ServiceChange)]
    # Masked inside the guard (rolled back with everything else), before our table is
    # loaded: stopping ufw resets the policies to ACCEPT.
    assert result.guarded[0] == ServiceChange("ufw", enable=False, action="stop", mask=True)
    assert [s.unit for s in services] == ["ufw", "netfilter-persistent"]


def test_iptables_persistent_left_in_rc_state_is_installed_again() -> None:
    facts = recorded("debian12-master").add_lines(
        "packages", "rc \tiptables-persistent\t1.0.20", "rc \tnetfilter-persistent\t1.0.20").facts()
    packages = [c for c in plan(facts).all_changes if isinstance(c, PackagesChange)]
    assert [p.packages for p in packages] == [("iptables-persistent",)]


# --------------------------------------------------------------------------- converged


def test_fail2ban_chains_are_not_drift() -> None:
    # As fail2ban leaves the table: its chain, and a jump to it first in INPUT.
    save = edit_table(
        lab_text("master", "iptables-save.txt"), "filter", chains=[":f2b-sshd - [0:0]"],
        first_rules=["-A INPUT -p tcp -m multiport --dports 22 -j f2b-sshd"],
        rules=["-A f2b-sshd -s 203.0.113.7/32 -j REJECT --reject-with icmp-port-unreachable",
               "-A f2b-sshd -j RETURN"])
    facts = converged("debian12-master").but(iptables_save=save).facts()
    assert "f2b-sshd" in facts.iptables["filter"]
    assert not plan(facts, inv=LAB).has_changes

def test_reloading_the_table_keeps_fail2bans_chains_and_bans() -> None:
    """A re-applied firewall never lifts a ban: the live f2b chains go into the new table."""
    live = (":INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            ":f2b-sshd - [12:720]\n"
            "-A INPUT -p tcp -m multiport --dports 22 -j f2b-sshd\n"
            "-A INPUT -j ACCEPT\n"
            "-A f2b-sshd -s 203.0.113.7/32 -j REJECT --reject-with icmp-port-unreachable\n"
            "-A f2b-sshd -j RETURN\n")
    (load, *_) = loads(plan(recorded("debian12-master").facts()))
    restored = restore_input(load.command, "*filter\n" + live + "COMMIT\n").splitlines()
    ours = golden_text("iptables/filter-master-default.rules").splitlines()
    assert restored[:4] == ours[:4]  # *filter and our policies
    assert restored[4:8] == [":f2b-sshd - [0:0]",
                             "-A INPUT -p tcp -m multiport --dports 22 -j f2b-sshd",
                             "-A f2b-sshd -s 203.0.113.7/32 -j REJECT --reject-with "
                             "icmp-port-unreachable", "-A f2b-sshd -j RETURN"]
    assert restored[8:] == ours[4:]  # then our rules; the stray ACCEPT is gone


# --------------------------------------------------------------------------- drift


def test_hand_added_input_rule_reloads_the_table_under_guard() -> None:
    save = fixture_text("iptables/rocky9-master-converged.save").replace(
        "-A INPUT -i eth0 -p tcp -m tcp --dport 22 -j ACCEPT\n",
        "-A INPUT -i eth0 -p tcp -m tcp --dport 22 -j ACCEPT\n"
        "-A INPUT -i eth0 -p tcp -m tcp --dport 8080 -j ACCEPT\n",
    )
    result = plan(converged("rocky9-master").but(iptables_save=save).facts())
    (load,) = result.guarded
    assert load in loads(result) and result.changes == ()
    assert result.guard is not None
    # plan shows what the reload removes, live -> wanted.
    assert "\n--A INPUT -i eth0 -p tcp -m tcp --dport 8080 -j ACCEPT\n" in result.diff()
    assert "\n+-A INPUT" not in result.diff()


def test_policy_switched_to_accept_is_drift() -> None:
    save = edit_table(lab_text("worker1", "iptables-save.txt"), "filter",
                      policy=("INPUT", "ACCEPT"))
    result = plan(converged("debian12-worker").but(iptables_save=save).facts(), "worker1", LAB)
    assert len(loads(result)) == 1 and result.guard is not None


def test_flushed_table_after_a_reboot_without_the_loader() -> None:
    result = plan(converged("debian12-worker").but(iptables_save="").facts(), "worker1", LAB)
    assert len(loads(result)) == 1


def test_edited_rules_file_is_rewritten_without_touching_the_live_table() -> None:
    rules = converged("debian12-master").file_text("/etc/iptables/rules.v4").replace(
        "--dport 22 -j ACCEPT", "--dport 22 -j ACCEPT\n-A INPUT -p icmp -j ACCEPT")
    result = plan(converged("debian12-master").but(files={"/etc/iptables/rules.v4": rules}).facts(),
                  inv=LAB)
    (change,) = result.guarded
    assert isinstance(change, FileChange) and change.path == "/etc/iptables/rules.v4"
    assert "-A INPUT -p icmp -j ACCEPT" in change.diff()
    # What the host loads at boot is guarded too: a reboot before confirmation rolls it back.
    assert result.guard is not None and not loads(result)


def test_disabled_loader_is_enabled_again() -> None:
    facts = converged("rocky9-master").with_units({"iptables.service": ("disabled", True)}).facts()
    (change,) = plan(facts).guarded
    assert change == ServiceChange("iptables", enable=True)


# --------------------------------------------------------------------------- lockout


def test_ssh_from_that_excludes_the_admin_is_refused_before_any_change() -> None:
    inv = inventory(firewall={"ssh_from": ["192.0.2.0/24", "198.51.100.0/24"]})
    for name in ("debian12-master", "rocky9-master", "ubuntu2204-master"):
        with pytest.raises(StepError) as error:
            plan(recorded(name).facts(), inv=inv)
        assert "lock you out" in error.value.message
        assert "10.77.0.50" in error.value.message and "ssh_from" in error.value.message
        assert error.value.hint and "nothing was changed" in error.value.hint


def test_ssh_port_missing_from_public_tcp_ports_is_refused() -> None:
    inv = inventory(firewall={"public_tcp_ports": [443]})
    with pytest.raises(StepError, match="public_tcp_ports"):
        plan(recorded("debian12-master").facts(), inv=inv)


def test_session_on_another_port_than_the_one_opened_is_refused() -> None:
    facts = recorded("rocky9-master").but(ssh_connection="10.77.0.50 52110 10.77.0.10 2222\n").facts()
    with pytest.raises(StepError, match="port 2222"):
        plan(facts)


def test_ssh_from_that_includes_the_admin_is_fine() -> None:
    inv = inventory(firewall={"ssh_from": ["192.0.2.0/24", "10.77.0.0/24"]})
    result = plan(recorded("debian12-master").facts(), inv=inv)
    (load,) = loads(result)
    assert "-A INPUT -s 10.77.0.0/24 -i eth0 -p tcp -m tcp --dport 22 -j ACCEPT\n" in \
        restore_input(load.command)


def test_session_arriving_on_the_private_side_is_fine_with_any_ssh_from() -> None:
    inv = inventory(firewall={"ssh_from": ["192.0.2.0/24"], "public_tcp_ports": [443]})
    facts = recorded("debian12-master").but(
        ssh_connection="192.168.10.2 39000 192.168.10.1 22\n").facts()
    assert loads(plan(facts, inv=inv))
    # Workers are always reached through the master's private address.
    assert loads(plan(recorded("debian12-worker").facts(), "worker1", inv))


def test_session_from_outside_the_private_network_on_the_private_side_is_refused() -> None:
    facts = recorded("debian12-master").but(
        ssh_connection="172.16.5.5 39000 192.168.10.1 22\n").facts()
    with pytest.raises(StepError, match=r"172\.16\.5\.5"):
        plan(facts)


def test_ipv6_session_needs_an_ipv6_ssh_from_network() -> None:
    session = "2001:db8::5 50000 2001:db8::1 22\n"
    addresses6 = "2: eth0    inet6 2001:db8::1/64 scope global \\       valid_lft forever\n"
    facts = recorded("debian12-master").but(ssh_connection=session,
                                            addresses6=addresses6).facts()
    with pytest.raises(StepError, match="2001:db8::5 is not in"):
        plan(facts)
    allowed = inventory(firewall={"ssh_from": ["0.0.0.0/0", "2001:db8::/32"]})
    result = plan(facts, inv=allowed)
    (load6,) = [c for c in result.guarded
                if isinstance(c, CommandChange) and "ip6tables-restore" in c.command]
    assert "-A INPUT -s 2001:db8::/32 -i eth0 -p tcp -m tcp --dport 22 -j ACCEPT" in load6.command


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("table", "key"), [("master", "public_interface"),
                                            ("master", "private_interface")])
def test_missing_master_interface_is_a_step_error_naming_it(table: str, key: str) -> None:
    inv = inventory(**{table: {key: "eno9"}})
    with pytest.raises(StepError, match="interface eno9 does not exist"):
        plan(recorded("rocky9-master").facts(), inv=inv)


def test_missing_worker_interface_is_a_step_error_naming_it() -> None:
    inv = inventory(workers=[{"name": "worker2", "private_address": "192.168.10.3",
                              "interface": "enp1s0"}])
    with pytest.raises(StepError, match="enp1s0"):
        plan(recorded("centos7-worker").facts(), "worker2", inv)


@pytest.mark.parametrize(("name", "node"), [
    ("debian12-master", "master"), ("debian12-worker", "worker1"), ("rocky9-master", "master"),
    ("centos7-worker", "worker2"), ("ubuntu2204-master", "master"),
])
def test_every_file_a_step_writes_is_read_back_by_the_facts(name: str, node: str) -> None:
    """Otherwise the step could never see its own work and would never converge."""
    import fnmatch

    from homeclust.steps import REGISTRY

    for step in REGISTRY.values():
        # Each scheduler step under the inventory that enables it.
        inv = INV if step.enabled(INV) else inventory(scheduler={"kind": "slurm"})
        if not step.targets(inv, inv.node(node)) or not step.enabled(inv):
            continue
        query = step.fact_query(inv)
        patterns = query.paths | query.secret_paths
        # The repo step plans a worker with its master's facts (it points it at them).
        cluster = ({"master": repo_master_for(name).facts()}
                   if step.name == "repo" and node != "master" else {})
        fresh = PlanContext(inv, inv.node(node), recorded(name).facts(query), cluster)
        try:
            step.preflight(fresh)
        except StepError:
            continue  # refused before planning (Torque on Debian): writes nothing
        try:
            planned = step.plan(fresh)
        except StepError:
            # nat refuses a fresh master: plan it as the firewall step leaves one.
            if name.startswith("ubuntu"):
                continue  # no converged Ubuntu state recorded
            planned = step.plan(PlanContext(inv, inv.node(node),
                                            after_firewall(name).facts(query), cluster))
        for change in planned.all_changes:
            if isinstance(change, FileChange):
                assert any(fnmatch.fnmatch(change.path, p) for p in patterns), (step.name, change.path)


# --------------------------------------------------------------------------- IPv6 lockout check


@pytest.mark.parametrize(("client", "allowed"), [
    ("fe80::5054:ff:fe12:3456", True),    # link-local: what the private side accepts
    ("2001:db8:10::5", False),            # a global address arriving on the private side
    ("fd00:10::5", False),                # unique local: not link-local either
])
def test_ipv6_session_on_the_private_side_needs_a_link_local_source(client: str,
                                                                    allowed: bool) -> None:
    """The IPv6 rules accept only link-local sources on the private interface; the lockout
    check must agree, or it would wave through a session the new rules drop."""
    addresses6 = "3: eth1    inet6 fd00:10::1/64 scope global \\       valid_lft forever\n"
    facts = recorded("debian12-master").but(ssh_connection=f"{client} 40000 fd00:10::1 22\n",
                                            addresses6=addresses6).facts()
    if allowed:
        assert loads(plan(facts))
    else:
        with pytest.raises(StepError, match="would lock you out"):
            plan(facts)


# --------------------------------------------------------------------------- unknown origin


def test_unknown_ssh_origin_refuses_a_firewall_change() -> None:
    """No $SSH_CONNECTION: the lockout check cannot be made, so no table is loaded."""
    facts = recorded("debian12-master").but(ssh_connection="").facts()
    assert facts.ssh_peer is None
    with pytest.raises(StepError, match="origin of the SSH session is unknown") as error:
        plan(facts)
    assert error.value.hint and "nothing was changed" in error.value.hint


def test_unknown_ssh_origin_is_fine_when_the_live_tables_are_right() -> None:
    # Nothing would be loaded, so nothing can cut the session: a rules-file fix still plans.
    facts = converged("debian12-master").but(ssh_connection="").facts()
    assert not plan(facts, inv=LAB).has_changes
    rules = converged("debian12-master").file_text("/etc/iptables/rules.v4") + "# edited\n"
    edited = converged("debian12-master").but(
        ssh_connection="", files={"/etc/iptables/rules.v4": rules}).facts()
    assert plan(edited, inv=LAB).descriptions() == ["update /etc/iptables/rules.v4"]


# --------------------------------------------------------------------------- posture


def posture(facts: HostFacts, node: str = "master") -> dict[str, tuple[str, str]]:
    items = STEP.posture(PlanContext(LAB, LAB.node(node), facts))
    return {item.name: (item.status, item.detail) for item in items}


def with_forward_rule(rule: str) -> HostFacts:
    save = edit_table(lab_text("master", "iptables-save.txt"), "filter", rules=[rule])
    return converged("debian12-master").but(iptables_save=save).facts()


def test_posture_of_a_converged_master_passes() -> None:
    items = posture(converged("debian12-master").facts())
    assert {name: status for name, (status, _) in items.items()} == {
        "INPUT policy": "pass", "FORWARD policy": "pass", "IPv6 INPUT policy": "pass",
        "IPv6 FORWARD policy": "pass", "forwarding one-way": "pass",
        "rules persist at boot": "pass"}


@pytest.mark.parametrize("rule", [
    # eth10 is not eth1, eth0x is not eth0: interface names are compared whole.
    "-A FORWARD -s 192.168.10.0/24 -i eth10 -o eth0 -j ACCEPT",
    "-A FORWARD -i eth1 -o eth0x -j ACCEPT",
    "-A FORWARD ! -i eth1 -o eth0 -j ACCEPT",
    "-A FORWARD -i eth0 -o eth1 -j ACCEPT",
    "-A FORWARD -j ACCEPT",
    # Not established-only, whatever a comment says.
    '-A FORWARD -m comment --comment "RELATED,ESTABLISHED" -j ACCEPT',
    "-A FORWARD -m conntrack --ctstate NEW,RELATED,ESTABLISHED -j ACCEPT",
])
def test_posture_flags_forward_accepts_beyond_private_to_public(rule: str) -> None:
    status, detail = posture(with_forward_rule(rule))["forwarding one-way"]
    assert status == "fail" and rule in detail


def test_posture_checks_the_ipv6_forward_policy() -> None:
    save6 = edit_table(lab_text("master", "ip6tables-save.txt"), "filter",
                       policy=("FORWARD", "ACCEPT"))
    facts = converged("debian12-master").but(ip6tables_save=save6).facts()
    assert posture(facts)["IPv6 FORWARD policy"][0] == "fail"


def test_posture_flags_any_ipv6_forward_accept() -> None:
    save6 = edit_table(lab_text("master", "ip6tables-save.txt"), "filter",
                       rules=["-A FORWARD -i eth1 -o eth0 -j ACCEPT"])
    facts = converged("debian12-master").but(ip6tables_save=save6).facts()
    status, detail = posture(facts)["forwarding one-way"]
    assert status == "fail" and "(IPv6) -A FORWARD -i eth1 -o eth0 -j ACCEPT" in detail
