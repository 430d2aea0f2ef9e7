"""network step planning from recorded facts of both platform families."""

from __future__ import annotations

import pytest

from homeclust.changes import CommandChange, FileChange
from homeclust.errors import StepError
from homeclust.facts import HostFacts
from homeclust.inventory import Inventory
from homeclust.render.network import bringup_command, takedown_command
from homeclust.steps.base import PlanContext, StepPlan
from homeclust.steps.network import ROLLBACK_AFTER, NetworkStep
from tests.unit.factsbuilder import (
    FileRecord,
    LinkRecord,
    converged,
    golden_text,
    inventory,
    lab_inventory,
    recorded,
)

INV = inventory()
LAB = lab_inventory()  # converged Debian hosts are the lab's (tests/fixtures/lab)
STEP = NetworkStep()
KEYFILES = "/etc/NetworkManager/system-connections/"


def plan(facts: HostFacts, node: str, inv: Inventory = INV) -> StepPlan:
    return STEP.plan(PlanContext(inv, inv.node(node), facts))


def files(plan: StepPlan) -> dict[str, FileChange]:
    return {c.path: c for c in plan.all_changes if isinstance(c, FileChange)}


def commands(plan: StepPlan) -> list[CommandChange]:
    return [c for c in plan.all_changes if isinstance(c, CommandChange)]


def reapply(plan: StepPlan) -> CommandChange:
    """The guarded part: take down (old config), write the interface files, bring up."""
    assert plan.guard is not None and plan.guarded, plan.descriptions()
    first, *middle, last = plan.guarded
    assert isinstance(first, CommandChange) and first.description.startswith("take down ")
    assert isinstance(last, CommandChange) and last.description.startswith("bring up ")
    assert all(isinstance(c, FileChange) for c in middle), \
        "the interface files are written between taking down and bringing up"
    assert not any(isinstance(c, FileChange) and c.path == "/etc/hosts" for c in middle)
    return last


# --------------------------------------------------------------------------- fresh hosts


def test_fresh_debian_master_takes_over_the_installer_configuration() -> None:
    result = plan(recorded("debian12-master").facts(), "master")
    written = files(result)
    assert set(written) == {"/etc/network/interfaces", "/etc/dhcp/dhclient.conf", "/etc/hosts"}
    assert written["/etc/network/interfaces"].content == golden_text(
        "network/ifupdown/master/etc/network/interfaces")
    assert "allow-hotplug eth0" in (written["/etc/network/interfaces"].old or "")
    assert written["/etc/dhcp/dhclient.conf"].content == golden_text(
        "network/ifupdown/master/etc/dhcp/dhclient.conf")
    assert written["/etc/hosts"].content == golden_text("network/hosts/debian12-master/etc/hosts")
    # DHCP provides the master's resolv.conf; hostname and /etc/hostname are already right.
    assert not any("hostname" in c.command for c in commands(result))
    command = reapply(result)
    assert command.description.startswith("bring up eth0, eth1 (")
    assert command.command == bringup_command("ifupdown", ["eth0", "eth1"])
    assert result.guarded[0].command == takedown_command("ifupdown", ["eth0", "eth1"])  # type: ignore[union-attr]
    assert result.guard is not None
    # Rollback: down with the trial files still there, old files back, then up again.
    assert result.guard.pre_restore == takedown_command("ifupdown", ["eth0", "eth1"])
    assert result.guard.restore == bringup_command("ifupdown", ["eth0", "eth1"])
    assert "ip -o -4 addr show dev eth0" in result.guard.trial
    assert result.guard.rollback_after == ROLLBACK_AFTER
    # /etc/hosts is no risk to anyone's session: it is written before the guard.
    assert [c.description for c in result.changes] == ["update /etc/hosts"]
    assert result.warnings == ()


def test_fresh_debian_worker_gets_gateway_dns_and_no_dhclient_conf() -> None:
    facts = recorded("debian12-worker").facts()
    result = plan(facts, "worker1")
    written = files(result)
    assert set(written) == {"/etc/network/interfaces", "/etc/resolv.conf", "/etc/hosts"}
    assert written["/etc/resolv.conf"].content == golden_text(
        "network/ifupdown/worker1/etc/resolv.conf")
    assert written["/etc/resolv.conf"].old == "nameserver 192.168.10.1\n"
    assert "127.0.1.1" not in (written["/etc/hosts"].content or "")
    command = reapply(result)
    assert command.description.startswith("bring up eth0 (eth0: configuration changed")
    assert result.guard is not None
    # resolv.conf does not decide how eth0 comes up: written before the guard.
    assert "/etc/resolv.conf" in {c.path for c in result.changes if isinstance(c, FileChange)}


def test_debian_worker_with_resolvconf_leaves_resolv_conf_to_it() -> None:
    facts = recorded("debian12-worker").add_lines("commands", "resolvconf").facts()
    written = files(plan(facts, "worker1"))
    assert "/etc/resolv.conf" not in written
    assert "dns-nameservers 8.8.8.8" in (written["/etc/network/interfaces"].content or "")


def test_a_resolv_conf_a_resolver_owns_is_left_to_it_with_a_warning() -> None:
    """/etc/resolv.conf is a link where the platform means it (systemd-resolved's stub): the
    facts report the link (reading through it failed every run on Ubuntu) and the worker's
    file is left to the resolver, with the servers to give it named."""
    stub = recorded("debian12-worker").but(files={
        "/etc/resolv.conf": LinkRecord("../run/systemd/resolve/stub-resolv.conf")})
    result = plan(stub.facts(), "worker1")
    assert "/etc/resolv.conf" not in files(result)
    assert any(w == "/etc/resolv.conf is systemd-resolved's (a link to ../run/systemd/resolve/"
               "stub-resolv.conf): homeclust leaves it alone; give systemd-resolved the DNS "
               "servers 8.8.8.8 yourself" for w in result.warnings), result.warnings
    # A link anywhere else is not the platform's: the managed file replaces it.
    elsewhere = recorded("debian12-worker").but(files={
        "/etc/resolv.conf": LinkRecord("/home/hpc/resolv.conf")})
    replaced = files(plan(elsewhere.facts(), "worker1"))["/etc/resolv.conf"]
    assert replaced.description == ("update /etc/resolv.conf (replaces a symbolic link to "
                                    "/home/hpc/resolv.conf)")
    assert replaced.content == golden_text("network/ifupdown/worker1/etc/resolv.conf")


def test_ubuntus_resolv_conf_link_neither_fails_nor_is_touched() -> None:
    facts = recorded("ubuntu2204-master").facts()
    assert facts.links["/etc/resolv.conf"] == "../run/systemd/resolve/stub-resolv.conf"
    result = plan(facts, "master")
    assert "/etc/resolv.conf" not in files(result)


def test_fresh_rocky_master_replaces_installer_keyfiles_and_sets_the_hostname() -> None:
    result = plan(recorded("rocky9-master").facts(), "master")
    written = files(result)
    assert set(written) == {
        KEYFILES + "eth0.nmconnection", KEYFILES + "eth1.nmconnection",
        KEYFILES + "homeclust-eth0.nmconnection", KEYFILES + "homeclust-eth1.nmconnection",
        "/etc/hostname", "/etc/hosts",
    }
    assert written[KEYFILES + "eth0.nmconnection"].content is None
    assert written[KEYFILES + "eth1.nmconnection"].content is None
    for name in ("eth0", "eth1"):
        keyfile = written[KEYFILES + f"homeclust-{name}.nmconnection"]
        assert keyfile.mode == 0o600 and keyfile.old is None
        assert keyfile.content == golden_text(
            f"network/nm-keyfile/master{KEYFILES}homeclust-{name}.nmconnection")
    assert written["/etc/hostname"].content == "master\n"
    (hostname,) = [c for c in result.changes if isinstance(c, CommandChange)]
    assert "hostnamectl set-hostname master" in hostname.command
    assert "localhost.localdomain" in hostname.description
    command = reapply(result)
    assert command.command == bringup_command("nm-keyfile", ["eth0", "eth1"])


def test_fresh_centos7_worker_rewrites_the_installer_ifcfg_only() -> None:
    facts = recorded("centos7-worker").facts()
    result = plan(facts, "worker2")
    written = files(result)
    assert set(written) == {"/etc/sysconfig/network-scripts/ifcfg-eth0", "/etc/hosts"}
    ifcfg = written["/etc/sysconfig/network-scripts/ifcfg-eth0"]
    assert 'DEVICE="eth0"' in (ifcfg.old or "")
    assert ifcfg.content == golden_text(
        "network/ifcfg/worker2/etc/sysconfig/network-scripts/ifcfg-eth0")
    command = reapply(result)
    assert command.command == bringup_command("ifcfg", ["eth0"])
    # The network service brings eth0 up; NetworkManager (if running) only re-reads
    # NM_CONTROLLED=no first and never activates a connection itself.
    assert "nmcli device connect" not in command.command
    assert "then nmcli connection reload; fi" in command.command


def test_fresh_ubuntu_master_replaces_the_installer_netplan_and_warns_about_client_id() -> None:
    result = plan(recorded("ubuntu2204-master").facts(), "master")
    written = files(result)
    assert set(written) == {"/etc/netplan/00-installer-config.yaml",
                            "/etc/netplan/60-homeclust.yaml", "/etc/hosts"}
    assert written["/etc/netplan/00-installer-config.yaml"].content is None
    ours = written["/etc/netplan/60-homeclust.yaml"]
    assert ours.mode == 0o600
    assert ours.content == golden_text("network/netplan/master/etc/netplan/60-homeclust.yaml")
    assert len(result.warnings) == 1 and "client id" in result.warnings[0]
    assert "netplan apply" in reapply(result).command
    # The old netplan file is removed under the guard, after networkctl released the lease.
    assert "/etc/netplan/00-installer-config.yaml" in {
        c.path for c in result.guarded if isinstance(c, FileChange)}


# --------------------------------------------------------------------------- converged


def test_fqdn_hostname_counts_as_the_node_name() -> None:
    facts = converged("rocky9-master").but(hostname="master.example.org\n").facts()
    assert plan(facts, "master").changes == ()


# --------------------------------------------------------------------------- drift


def test_stray_default_route_on_a_worker_is_reapplied() -> None:
    facts = converged("debian12-worker").add_lines(
        "routes", "default via 192.168.10.254 dev eth0 metric 200 ").facts()
    result = plan(facts, "worker1", LAB)
    assert result.changes == ()  # nothing but the live state: all of it guarded
    change = reapply(result)
    assert len(result.guarded) == 2
    assert "stray default route via 192.168.10.254 dev eth0" in change.description


def test_worker_without_its_default_route_is_reapplied() -> None:
    facts = converged("centos7-worker").but(
        routes="192.168.10.0/24 dev eth0 proto kernel scope link src 192.168.10.3 \n").facts()
    change = reapply(plan(facts, "worker2"))
    assert "no default route via 192.168.10.1" in change.description


def test_default_route_through_the_masters_private_side_is_reapplied() -> None:
    facts = converged("debian12-master").add_lines(
        "routes", "default via 192.168.10.254 dev eth1 metric 50 ").facts()
    change = reapply(plan(facts, "master", LAB))
    assert change.description.startswith("bring up eth1 (eth1: default route via the private side")


def test_lost_private_address_reapplies_only_that_interface() -> None:
    fresh = converged("rocky9-master")
    addresses = "".join(line + "\n" for line in fresh.sections["addresses"].splitlines()
                        if " eth1 " not in line)
    change = reapply(plan(fresh.but(addresses=addresses).facts(), "master"))
    assert change.description == "bring up eth1 (eth1: lacks 192.168.10.1/24)"
    assert change.command == "nmcli connection reload && nmcli device connect eth1"


def test_extra_address_on_a_worker_is_reapplied() -> None:
    facts = converged("debian12-worker").add_lines(
        "addresses", "2: eth0    inet 192.168.10.77/24 brd 192.168.10.255 scope global secondary "
                     "eth0\\       valid_lft forever preferred_lft forever").facts()
    change = reapply(plan(facts, "worker1", LAB))
    assert "stray address 192.168.10.77/24" in change.description


def test_hand_edited_hosts_file_is_fixed_without_touching_the_interfaces() -> None:
    hosts = converged("debian12-worker").file_text("/etc/hosts")
    assert "192.168.10.3\tworker2" in hosts
    facts = converged("debian12-worker").but(files={
        "/etc/hosts": hosts.replace("192.168.10.3\tworker2", "192.168.10.30\tworker2")}).facts()
    (change,) = plan(facts, "worker1", LAB).changes
    assert isinstance(change, FileChange) and change.path == "/etc/hosts"
    assert "+192.168.10.3\tworker2" in change.diff()


def test_wrong_mode_of_a_keyfile_is_a_change() -> None:
    path = KEYFILES + "homeclust-eth0.nmconnection"
    content = golden_text(f"network/nm-keyfile/master{path}").encode()
    facts = converged("rocky9-master").but(files={path: FileRecord(content, 0o644)}).facts()
    changes = files(plan(facts, "master"))
    assert changes[path].content == content.decode()
    assert changes[path].reason == "mode 644 -> 600"


def test_interfaces_d_snippet_of_our_interface_is_removed_and_reapplied() -> None:
    snippet = "/etc/network/interfaces.d/eth0"
    facts = converged("debian12-worker").but(files={
        snippet: "allow-hotplug eth0\niface eth0 inet dhcp\n"}).facts()
    result = plan(facts, "worker1", LAB)
    assert files(result)[snippet].content is None
    assert files(result)[snippet].description == f"remove {snippet}"
    assert reapply(result).description == "bring up eth0 (eth0: configuration changed)"
    assert snippet in {c.path for c in result.guarded if isinstance(c, FileChange)}


def test_other_interface_snippets_are_left_alone() -> None:
    facts = converged("debian12-worker").but(files={
        "/etc/network/interfaces.d/eth2": "auto eth2\niface eth2 inet dhcp\n"}).facts()
    assert plan(facts, "worker1", LAB).changes == ()


# --------------------------------------------------------------------------- errors


def test_missing_interface_is_a_step_error_naming_it_and_what_exists() -> None:
    inv = inventory(master={"private_interface": "enp3s0"})
    with pytest.raises(StepError) as error:
        plan(recorded("debian12-master").facts(), "master", inv)
    assert "enp3s0" in error.value.message and "private side" in error.value.message
    assert "present: eth0, eth1" in error.value.message
    assert error.value.hint and "private_interface" in error.value.hint


def test_missing_worker_interface_names_the_inventory_key() -> None:
    inv = inventory(workers=[{"name": "worker1", "private_address": "192.168.10.2",
                              "interface": "eno1"}])
    with pytest.raises(StepError, match="eno1") as error:
        plan(recorded("debian12-worker").facts(), "worker1", inv)
    assert error.value.hint and "interface" in error.value.hint
