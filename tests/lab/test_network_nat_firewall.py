"""network, nat and firewall on the lab: behaviour, idempotency, reboots, drift, rollback.

The tests run in file order on one lab, starting from pristine nodes: first the
real `up`, then what it must have achieved, then re-runs, drift, reboots and
deliberate breakage.  Behaviour is observed from the lab's own hosts (the
"internet" host, the admin host, inside nodes), not through homeclust.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from homeclust import api
from homeclust.lab import Lab
from homeclust.render import iptables as iptables_render
from homeclust.render import network as render_network
from homeclust.steps import firewall as firewall_step
from homeclust.steps import network as network_step
from tests.lab.helpers import (
    REPO_ROOT,
    failed_checks,
    homeclust,
    homeclust_json,
    http_get_body,
    sh,
    snapshot,
    statuses,
    tcp_connects,
)

pytestmark = pytest.mark.lab

NODES = ("master", "worker1", "worker2", "worker3")
#: The steps this module tests (plan and check too: the later steps are not set up here).
STEPS = "network,nat,firewall"


@pytest.fixture(scope="module")
def fresh(lab: Lab) -> Iterator[Lab]:
    """Pristine nodes (as after installation) for this module."""
    for node in NODES:
        lab.reset(node)
    yield lab


@pytest.fixture(scope="module")
def configured(fresh: Lab, lab_inventory_path: Path) -> Lab:
    """The lab after `homeclust up --only network,nat,firewall` from pristine nodes."""
    code, data = homeclust_json(lab_inventory_path, "up", "--only", STEPS, timeout=1200)
    assert code == 0, (data["host_errors"], [o for o in data["outcomes"] if o["error"]])
    changed = statuses(data)
    for node in NODES:
        assert changed[(node, "network")] == "changed"
        assert changed[(node, "firewall")] == "changed"
    assert changed[("master", "nat")] == "changed"
    return fresh


def test_fresh_nodes_cannot_reach_the_outside_before_nat(fresh: Lab) -> None:
    # The control for the NAT test below: without the master, no way out.
    assert not tcp_connects(fresh, "worker1", str(fresh.internet_address), 80)


def test_fresh_master_answers_ssh_over_ipv6(fresh: Lab) -> None:
    # The control for the test below: IPv6 reaches sshd until the firewall closes it.
    assert _ssh_over_ipv6_link_local(fresh)


def _ipv6_ula_ssh(lab: Lab) -> bool:
    """From worker1, SSH to the master over IPv6 with unique local (not link-local)
    addresses added on the private side for the occasion."""
    sh(lab, "master", "ip -6 addr add fd00:77::1/64 dev eth1 nodad")
    sh(lab, "worker1", "ip -6 addr add fd00:77::2/64 dev eth0 nodad")
    try:
        return tcp_connects(lab, "worker1", "fd00:77::1", 22)
    finally:
        sh(lab, "master", "ip -6 addr del fd00:77::1/64 dev eth1", check=False)
        sh(lab, "worker1", "ip -6 addr del fd00:77::2/64 dev eth0", check=False)


def test_fresh_master_answers_ssh_from_a_private_side_ula(fresh: Lab) -> None:
    # The control for test_ipv6_on_the_private_side_is_link_local_only.
    assert _ipv6_ula_ssh(fresh)


def test_up_configures_the_cluster_and_check_passes(configured: Lab,
                                                    lab_inventory_path: Path) -> None:
    code, data = homeclust_json(lab_inventory_path, "check", "--only", STEPS)
    assert code == 0, failed_checks(data)
    names = {(c["host"], c["check"]) for c in data["checks"] if c["status"] == "pass"}
    for node in NODES:
        assert (node, "firewall in sync") in names
        assert (node, "egress") in names or (node, "egress (NAT)") in names
    assert ("master", "forwarding one-way") in names


def test_worker_reaches_the_outside_seen_with_the_masters_address(configured: Lab) -> None:
    for worker in ("worker1", "worker2", "worker3"):
        seen = http_get_body(configured, worker, configured.whoami_url)
        assert seen == str(configured.master_public_address)
    # and the master itself is seen with its own address
    assert http_get_body(configured, "master", configured.whoami_url) == str(
        configured.master_public_address)


def test_the_institute_side_cannot_open_connections_to_workers(configured: Lab) -> None:
    master = str(configured.master_public_address)
    route = ["ip", "route", "replace", "192.168.10.0/24", "via", master]
    configured.exec_internet(route)
    try:
        # With a route through the master, only the firewall stands in the way.
        for worker_address in ("192.168.10.2", "192.168.10.3", "192.168.10.4"):
            assert not tcp_connects(configured, "internet", worker_address, 22)
    finally:
        configured.exec_internet(["ip", "route", "del", "192.168.10.0/24"], check=False)
    # Workers are not reachable from the admin side either.
    assert not tcp_connects(configured, "admin", "192.168.10.2", 22)


def test_master_public_side_accepts_only_what_the_firewall_allows(configured: Lab) -> None:
    master = str(configured.master_public_address)
    assert tcp_connects(configured, "internet", master, 22)
    # A service listening on the master: reachable from the private side only.
    listener = subprocess.Popen(
        ["nsenter", "-t", _leader(configured), "-n", "--", "socat",
         "TCP-LISTEN:8080,fork,reuseaddr", "SYSTEM:echo hello"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not tcp_connects(configured, "master", "127.0.0.1", 8080):
            assert time.monotonic() < deadline, "the test listener did not start"
            time.sleep(0.2)
        assert tcp_connects(configured, "worker1", "192.168.10.1", 8080)
        assert not tcp_connects(configured, "internet", master, 8080)
        assert not tcp_connects(configured, "admin", master, 8080)
    finally:
        listener.terminate()
        listener.wait(10)


def _ssh_over_ipv6_link_local(lab: Lab) -> bool:
    """From the internet host, connect to the master's SSH over IPv6 (link-local on eth0)."""
    words = sh(lab, "master", "ip -o -6 addr show dev eth0 scope link").split()
    address = words[3].split("/")[0]
    probe = ["timeout", "8", "socat", "-u", "OPEN:/dev/null",
             f"TCP6:[{address}%eth0]:22,connect-timeout=3"]
    return lab.exec_internet(probe, check=False, timeout=15).returncode == 0


def test_ipv6_is_no_way_around_the_firewall(configured: Lab) -> None:
    assert tcp_connects(configured, "internet", str(configured.master_public_address), 22)
    assert not _ssh_over_ipv6_link_local(configured)
    assert ":INPUT DROP" in sh(configured, "master", "ip6tables-save -t filter")


def test_ipv6_on_the_private_side_is_link_local_only(configured: Lab) -> None:
    """IPv4 accepts only the private network on the private interface; IPv6 only link-local
    sources (neighbour discovery), not whatever else arrives there."""
    words = sh(configured, "master", "ip -o -6 addr show dev eth1 scope link").split()
    master_link_local = words[3].split("/")[0]
    assert tcp_connects(configured, "worker1", f"{master_link_local}%eth0", 22)
    assert not _ipv6_ula_ssh(configured)


def _leader(lab: Lab) -> str:
    from homeclust.lab import nodes as lab_nodes

    return str(lab_nodes.leader_pid("master", lab.paths.node("master")))


def test_master_sends_its_dhcp_client_id(configured: Lab) -> None:
    leases = [lease for lease in configured.dhcp_leases()
              if str(lease.address) == str(configured.master_public_address)]
    assert leases, configured.dhcp_leases()
    assert "cluster-master" in str(leases[0].client_id)


def test_hostnames_and_hosts_file(configured: Lab) -> None:
    for node in NODES:
        hosts = sh(configured, node, "cat /etc/hosts")
        for other, address in (("master", "192.168.10.1"), ("worker3", "192.168.10.4")):
            assert f"{address}\t{other}" in hosts
        assert "127.0.1.1" not in hosts
        assert sh(configured, node, "getent hosts worker2").split()[0] == "192.168.10.3"
    assert sh(configured, "worker2", "ip -4 route show default").startswith(
        "default via 192.168.10.1 dev eth0")


def test_second_up_changes_nothing_and_plan_is_clean(configured: Lab,
                                                     lab_inventory_path: Path) -> None:
    before = {node: snapshot(configured, node) for node in NODES}
    code, data = homeclust_json(lab_inventory_path, "up", "--only", STEPS)
    assert code == 0, data
    assert set(statuses(data).values()) == {"unchanged"}, statuses(data)
    done = homeclust(lab_inventory_path, "plan", "--only", STEPS)
    assert done.returncode == 0, done.stdout + done.stderr
    after = {node: snapshot(configured, node) for node in NODES}
    assert after == before


def test_warning_for_read_only_conntrack_max(configured: Lab, lab_inventory_path: Path) -> None:
    code, data = homeclust_json(lab_inventory_path, "plan", "--only", "nat")
    assert code == 0
    warnings = [w for o in data["outcomes"] for w in o["warnings"]]
    assert any("nf_conntrack_max is read-only" in w for w in warnings)


def test_hand_added_rule_is_drift_and_up_removes_it(configured: Lab,
                                                    lab_inventory_path: Path) -> None:
    sh(configured, "worker1", "iptables -I INPUT -p tcp --dport 9999 -j ACCEPT")
    code, data = homeclust_json(lab_inventory_path, "check", "--only", STEPS)
    assert code == 1
    assert any(c["host"] == "worker1" and c["check"] == "firewall in sync"
               and c["status"] == "fail" for c in data["checks"])
    done = homeclust(lab_inventory_path, "plan", "--only", "firewall")
    assert done.returncode == 3 and "--dport 9999" in done.stdout
    code, data = homeclust_json(lab_inventory_path, "up", "--only", "firewall")
    assert code == 0, data
    assert statuses(data)[("worker1", "firewall")] == "changed"
    assert statuses(data)[("worker2", "firewall")] == "unchanged"
    assert "9999" not in sh(configured, "worker1", "iptables-save")
    assert homeclust(lab_inventory_path, "check", "--only", STEPS).returncode == 0


def test_one_step_on_one_host_leaves_the_rest_intact(configured: Lab,
                                                     lab_inventory_path: Path) -> None:
    nat_before = sh(configured, "master", "iptables-save -t nat | grep MASQUERADE")
    sh(configured, "worker2", "iptables -P INPUT ACCEPT")  # a "hardware change" broke it
    done = subprocess.run(
        [sys.executable, "-m", "invoke", "firewall", "--host", "worker2"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600, stdin=subprocess.DEVNULL,
        env={**_env(), "HOMECLUST_INVENTORY": str(lab_inventory_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert ":INPUT DROP" in sh(configured, "worker2", "iptables-save -t filter")
    assert sh(configured, "master", "iptables-save -t nat | grep MASQUERADE") == nat_before
    code, data = homeclust_json(lab_inventory_path, "up", "--only", "nat")
    assert code == 0 and set(statuses(data).values()) == {"unchanged"}


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_reboots_keep_everything(configured: Lab, lab_inventory_path: Path) -> None:
    before = {node: snapshot(configured, node) for node in ("master", "worker2")}
    configured.reboot("master")
    configured.reboot("worker2")
    code, data = homeclust_json(lab_inventory_path, "check", "--only", STEPS)
    assert code == 0, failed_checks(data)
    after = {node: snapshot(configured, node) for node in ("master", "worker2")}
    for node in before:
        assert after[node]["iptables"] == before[node]["iptables"]
        assert after[node]["files"] == before[node]["files"]
        assert after[node]["addresses"] == before[node]["addresses"]
        assert after[node]["sysctl"] == before[node]["sysctl"]
    assert http_get_body(configured, "worker2", configured.whoami_url) == str(
        configured.master_public_address)


def _inventory_copy(lab_inventory_path: Path, tmp_path: Path, **changes: object) -> Path:
    import tomllib

    raw = tomllib.loads(lab_inventory_path.read_text())
    for dotted, value in changes.items():
        table, key = dotted.split("__")
        raw.setdefault(table, {})[key] = value
    path = tmp_path / "inventory.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def test_inventory_that_would_lock_the_admin_out_is_refused(
        configured: Lab, lab_inventory_path: Path, tmp_path: Path) -> None:
    rules = "iptables-save | grep -v '^#' | sed 's/\\[[0-9]*:[0-9]*\\]//'"
    before = sh(configured, "master", rules)
    path = _inventory_copy(lab_inventory_path, tmp_path, firewall__ssh_from=["203.0.113.0/24"])
    code, data = homeclust_json(path, "up", "--only", "firewall", "--host", "master")
    assert code == 1
    error = next(o["error"] for o in data["outcomes"] if o["host"] == "master")
    assert "lock you out" in error and str(configured.admin_address) in error
    assert sh(configured, "master", rules) == before


def test_firewall_that_blocks_ssh_is_rolled_back(configured: Lab, lab_inventory_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A ruleset that passes every check but drops new SSH: the host undoes it by itself."""
    real = iptables_render.render_filter_table

    def blocks_new_ssh(inventory, node):  # type: ignore[no-untyped-def]
        table = real(inventory, node)
        # Drop new SSH connections before anything accepts them.
        return table.replace("-A INPUT -i lo -j ACCEPT",
                             "-A INPUT -p tcp -m conntrack --ctstate NEW -m tcp --dport 22 -j DROP\n"
                             "-A INPUT -i lo -j ACCEPT", 1)

    monkeypatch.setattr(firewall_step, "render_filter_table", blocks_new_ssh)
    monkeypatch.setattr(firewall_step, "ROLLBACK_AFTER", 20)
    before = sh(configured, "master", "iptables-save -t filter | grep -v '^#' | sed 's/\\[.*\\]//'")
    result = api.run("up", lab_inventory_path,
                     api.Options(only=("firewall",), hosts=("master",)))
    outcome = result.outcome("master", "firewall")
    assert outcome is not None and outcome.status == "rolled-back", outcome
    assert "rolled back" in (outcome.error or "")
    assert "a fresh plan shows the same changes as before" in (outcome.error or "")
    assert result.exit_code() == 1
    after = sh(configured, "master", "iptables-save -t filter | grep -v '^#' | sed 's/\\[.*\\]//'")
    assert after == before
    assert "--dport 22 -j DROP" not in after
    # Reachable with a brand-new connection, and nothing pending on the host.
    monkeypatch.undo()
    code, data = homeclust_json(lab_inventory_path, "plan", "--only", "firewall")
    assert code == 0, data
    assert sh(configured, "master", "ls /var/lib/homeclust/txn 2>/dev/null | wc -l").strip() == "0"


def test_network_change_that_strands_a_worker_is_rolled_back(
        configured: Lab, lab_inventory_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """worker3 gets a config it cannot be reached with; it restores its old one by itself."""
    real = render_network.interface_specs

    def wrong_address(inventory, node):  # type: ignore[no-untyped-def]
        specs = real(inventory, node)
        if node.name != "worker3":
            return specs
        from dataclasses import replace
        from ipaddress import IPv4Interface

        return [replace(specs[0], address=IPv4Interface("192.168.10.99/24"))]

    monkeypatch.setattr(network_step, "interface_specs", wrong_address)
    monkeypatch.setattr(network_step, "ROLLBACK_AFTER", 25)
    before = snapshot(configured, "worker3")
    result = api.run("up", lab_inventory_path,
                     api.Options(only=("network",), hosts=("worker3",)))
    outcome = result.outcome("worker3", "network")
    assert outcome is not None and outcome.status == "rolled-back", outcome
    assert "rolled back" in (outcome.error or "")
    # The report says what the trial configuration got.
    assert "trial state: eth0: 192.168.10.99/24" in (outcome.error or "")
    monkeypatch.undo()
    after = snapshot(configured, "worker3")
    assert after["addresses"] == before["addresses"]
    assert after["files"] == before["files"]
    assert after["routes"] == before["routes"]
    assert homeclust(lab_inventory_path, "check", "--only", STEPS, "--host", "worker3").returncode == 0
