"""Unit tests for the lab's pure parts: plan, renderers, parsers, recipe hash."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import tomllib
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest
import tomli_w

from homeclust.errors import LabError
from homeclust.inventory import Inventory, load_inventory
from homeclust.lab import render, uplink
from homeclust.lab.nodes import nspawn_argv, write_first_boot_files
from homeclust.lab.plan import (
    LabPlan,
    choose_institute_network,
    cluster_slug,
    default_ssh_port,
    machine_name,
    make_plan,
    namespaces_for,
)
from homeclust.lab.rootfs import BASE_PACKAGES, Recipe
from homeclust.lab.services import lab_services
from homeclust.lab.state import LabPaths, LabState
from homeclust.lab.supervisor import SupervisorSpec
from homeclust.lab.system import ProcessId

REPO = Path(__file__).resolve().parents[2]
GUIDE_INVENTORY = REPO / "inventory.toml"
LAB_NET = IPv4Network("10.77.0.0/24")


@pytest.fixture
def inventory() -> Inventory:
    return load_inventory(GUIDE_INVENTORY)


@pytest.fixture
def plan(inventory: Inventory, tmp_path: Path) -> LabPlan:
    return make_plan(inventory, LAB_NET, 20222, tmp_path)


def _static_inventory(tmp_path: Path) -> Inventory:
    raw = tomllib.loads(GUIDE_INVENTORY.read_text())
    raw["master"]["public_boot"] = "static"
    raw["master"]["public_address"] = "130.183.5.20/24"
    raw["master"]["public_gateway"] = "130.183.5.1"
    path = tmp_path / "static.toml"
    path.write_text(tomli_w.dumps(raw))
    return load_inventory(path)


# --------------------------------------------------------------------- plan


def test_plan_replicates_names_interfaces_and_private_addresses(plan: LabPlan) -> None:
    assert [n.name for n in plan.nodes] == ["master", "worker1", "worker2", "worker3"]
    master = plan.master
    assert [(link.node_interface, link.bridge) for link in master.links] == [
        ("eth0", "br-inst"), ("eth1", "br-priv")]
    assert master.private_address == IPv4Interface("192.168.10.1/24")
    worker3 = plan.node("worker3")
    assert worker3.private_address == IPv4Interface("192.168.10.4/24")
    assert worker3.gateway == IPv4Address("192.168.10.1")
    assert [(link.node_interface, link.bridge) for link in worker3.links] == [("eth0", "br-priv")]


def test_plan_addresses_on_the_institute_network(plan: LabPlan) -> None:
    assert plan.internet_address == IPv4Address("10.77.0.1")
    assert plan.admin_address == IPv4Address("10.77.0.2")
    assert plan.master_public_address == IPv4Address("10.77.0.10")
    assert plan.dhcp_range[0] in LAB_NET and plan.dhcp_range[1] in LAB_NET
    assert plan.master_public_address < plan.dhcp_range[0]
    assert plan.whoami_url == "http://10.77.0.1:8080/"
    assert plan.master_public_names == ("master", "cluster-master.example.org")


def test_plan_names_are_unique_and_short_enough(plan: LabPlan) -> None:
    host_ends = [link.host_name for node in plan.nodes for link in node.links]
    assert len(set(host_ends)) == len(host_ends)
    assert all(len(name) <= 15 for name in host_ends)
    assert plan.namespaces == namespaces_for("homeclust") == (
        "hclab-homeclust-sw", "hclab-homeclust-inet", "hclab-homeclust-admin")
    assert plan.master.machine == "hclab-homeclust-master"


def test_plan_unknown_node_is_a_lab_error(plan: LabPlan) -> None:
    with pytest.raises(LabError, match="worker9"):
        plan.node("worker9")


def test_static_public_boot_replicates_the_public_subnet(tmp_path: Path) -> None:
    plan = make_plan(_static_inventory(tmp_path), LAB_NET, 20222, tmp_path)
    assert plan.institute_network == IPv4Network("130.183.5.0/24")
    assert plan.internet_address == IPv4Address("130.183.5.1")
    assert plan.master_public_address == IPv4Address("130.183.5.20")
    assert plan.admin_address not in (plan.internet_address, plan.master_public_address)
    assert plan.master_public_static


def test_machine_name_is_valid_and_bounded() -> None:
    assert machine_name("homeclust", "worker1") == "hclab-homeclust-worker1"
    long = machine_name("c" * 60, "w" * 63)
    assert len(long) <= 64
    assert long != machine_name("c" * 60, "w" * 62 + "x")
    assert cluster_slug("My_Cluster.v2") == "my-cluster-v2"


def test_choose_institute_network_avoids_private_and_host_networks() -> None:
    private = IPv4Network("192.168.10.0/24")
    assert choose_institute_network(private, []) == IPv4Network("10.77.0.0/24")
    host = [IPv4Network("10.0.0.0/8")]
    chosen = choose_institute_network(private, host)
    assert not chosen.overlaps(host[0]) and not chosen.overlaps(private)
    with pytest.raises(LabError):
        choose_institute_network(private, [IPv4Network("0.0.0.0/0")])


def test_default_ssh_port_is_stable_per_cluster() -> None:
    assert default_ssh_port("homeclust") == default_ssh_port("homeclust")
    assert 20000 <= default_ssh_port("x") < 30000


# ----------------------------------------------------------------- dnsmasq


def test_dnsmasq_serves_the_lab_only(plan: LabPlan, tmp_path: Path) -> None:
    conf = render.render_dnsmasq_conf(plan, tmp_path / "leases", tmp_path / "log")
    lines = conf.splitlines()
    assert "no-resolv" in lines
    assert "no-hosts" in lines
    assert not any(line.startswith("server=") for line in lines)
    assert "address=/deb.debian.org/10.77.0.1" in lines
    # The client id as the bytes dhclient sends for "cluster-master" (no quoting in dnsmasq).
    assert ("dhcp-host=id:63:6c:75:73:74:65:72:2d:6d:61:73:74:65:72,10.77.0.10,master"
            in lines)
    assert "dhcp-option=option:router,10.77.0.1" in lines
    assert "dhcp-option=option:dns-server,10.77.0.1" in lines
    assert f"dhcp-leasefile={tmp_path / 'leases'}" in lines
    assert "host-record=master,cluster-master.example.org,10.77.0.10" in lines
    assert "interface=eth0" in lines and "bind-interfaces" in lines


def test_dnsmasq_without_reservation_for_a_static_master(tmp_path: Path) -> None:
    plan = make_plan(_static_inventory(tmp_path), LAB_NET, 20222, tmp_path)
    conf = render.render_dnsmasq_conf(plan, tmp_path / "leases", tmp_path / "log")
    assert "dhcp-host=" not in conf


def test_parse_dnsmasq_leases_decodes_the_client_id() -> None:
    text = (
        "1795659745 12:fe:bd:60:02:33 10.77.0.10 master "
        "63:6c:75:73:74:65:72:2d:6d:61:73:74:65:72\n"
        "1795659746 12:fe:bd:60:02:34 10.77.0.100 * *\n"
        "duid 00:01:00:01\n"
    )
    leases = render.parse_dnsmasq_leases(text)
    assert len(leases) == 2
    assert leases[0].address == IPv4Address("10.77.0.10")
    assert leases[0].client_id == "cluster-master"
    assert leases[0].hostname == "master"
    assert leases[1].client_id is None
    assert render.decode_client_id("01:12:fe:bd") == "01:12:fe:bd"


# -------------------------------------------------------- node first boot


def test_master_interfaces_dhcp_public_static_private(plan: LabPlan) -> None:
    text = render.render_interfaces(plan, plan.master)
    assert "auto eth0\niface eth0 inet dhcp\n" in text
    assert "auto eth1\niface eth1 inet static\n    address 192.168.10.1/24\n" in text
    assert "gateway" not in text
    assert "source /etc/network/interfaces.d/*" in text
    assert "iface lo inet loopback" in text


def test_worker_interfaces_static_with_master_as_gateway(plan: LabPlan) -> None:
    text = render.render_interfaces(plan, plan.node("worker2"))
    assert ("auto eth0\niface eth0 inet static\n    address 192.168.10.3/24\n"
            "    gateway 192.168.10.1\n") in text
    assert "dhcp" not in text


def test_static_master_interfaces(tmp_path: Path) -> None:
    plan = make_plan(_static_inventory(tmp_path), LAB_NET, 20222, tmp_path)
    text = render.render_interfaces(plan, plan.master)
    assert "iface eth0 inet static\n    address 130.183.5.20/24\n    gateway 130.183.5.1\n" in text


def test_dhclient_conf_sends_the_client_id() -> None:
    base = "send host-name = gethostname();\n"
    text = render.render_dhclient_conf(base, "eth0", "cluster-master")
    assert text.startswith(base)
    assert 'interface "eth0" {\n    send dhcp-client-identifier "cluster-master";\n}\n' in text


def test_hosts_and_resolv_conf() -> None:
    assert "127.0.1.1\tworker1\n" in render.render_hosts("worker1")
    assert render.render_resolv_conf(IPv4Address("10.77.0.1")) == "nameserver 10.77.0.1\n"


def test_sources_list_has_the_three_debian_suites() -> None:
    text = render.render_sources_list("bookworm")
    assert text.splitlines() == [
        "deb http://deb.debian.org/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm-updates main",
        "deb http://deb.debian.org/debian-security bookworm-security main",
    ]


# ---------------------------------------------------------- lab inventory


def test_lab_inventory_rewrites_only_what_differs(plan: LabPlan, tmp_path: Path) -> None:
    raw = tomllib.loads(GUIDE_INVENTORY.read_text())
    raw["ssh"]["port"] = 2222
    data = render.render_lab_inventory(raw, plan, tmp_path / "key", tmp_path / "known_hosts")
    assert data["master"]["address"] == "127.0.0.1"
    assert data["master"]["port"] == 20222
    assert data["ssh"] == {"user": "root", "key": str(tmp_path / "key"),
                           "known_hosts": str(tmp_path / "known_hosts")}
    assert data["cluster"]["dns"] == ["10.77.0.1"]
    assert data["check"] == {"egress_url": "http://10.77.0.1:8080/",
                             "expect_master_address": True}
    # Everything else is the user's cluster, unchanged.
    assert data["workers"] == raw["workers"]
    assert data["master"]["private_address"] == raw["master"]["private_address"]
    assert data["master"]["dhcp_client_id"] == "cluster-master"
    assert data["firewall"] == raw["firewall"]
    assert raw["master"]["address"] == "cluster-master.example.org"  # input untouched

    path = tmp_path / "lab.toml"
    path.write_text(tomli_w.dumps(data))
    lab_inventory = load_inventory(path)
    assert lab_inventory.master.address == "127.0.0.1"
    assert lab_inventory.master.port == 20222
    assert lab_inventory.ssh.port == 22
    assert lab_inventory.ssh.known_hosts == tmp_path / "known_hosts"
    assert lab_inventory.check.expect_master_address is True
    assert [w.name for w in lab_inventory.workers] == ["worker1", "worker2", "worker3"]


# ------------------------------------------------------------ known_hosts


def test_forget_known_hosts_plain_port_and_hashed() -> None:
    salt = b"0123456789abcdefghij"
    digest = hmac.new(salt, b"192.168.10.3", hashlib.sha1).digest()
    hashed = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"
    text = (
        "# comment\n"
        "[127.0.0.1]:20222 ssh-ed25519 AAAA1\n"
        "192.168.10.2 ssh-ed25519 AAAA2\n"
        f"{hashed} ssh-ed25519 AAAA3\n"
        "worker3,192.168.10.4 ssh-ed25519 AAAA4\n"
    )
    kept = render.forget_known_hosts(text, {"192.168.10.3", "worker3"})
    assert kept == "# comment\n[127.0.0.1]:20222 ssh-ed25519 AAAA1\n192.168.10.2 ssh-ed25519 AAAA2\n"
    master = render.known_hosts_patterns("127.0.0.1", 20222)
    assert master == "[127.0.0.1]:20222"
    assert "AAAA1" not in render.forget_known_hosts(text, {master})


# ----------------------------------------------------------------- rootfs


def test_recipe_fingerprint_is_stable_and_follows_the_recipe() -> None:
    base = Recipe()
    assert base.fingerprint() == Recipe().fingerprint()
    assert Recipe(packages=(*BASE_PACKAGES, "vim")).fingerprint() != base.fingerprint()
    assert Recipe(version=base.version + 1).fingerprint() != base.fingerprint()
    files = dict(base.files)
    files["etc/motd"] = "hello\n"
    assert Recipe(files=files).fingerprint() != base.fingerprint()


def test_recipe_is_a_fresh_minimal_server() -> None:
    packages = set(Recipe().packages)
    assert {"systemd", "openssh-server", "iproute2", "iptables", "ifupdown",
            "isc-dhcp-client"} <= packages
    assert not packages & {"iptables-persistent", "netfilter-persistent", "nginx", "openmpi-bin",
                           "slurm-wlm", "fail2ban", "torque-server", "tcpdump", "nmap"}
    files = Recipe().files
    assert "Check-Valid-Until" in files["etc/apt/apt.conf.d/99homeclust-lab"]
    assert "ssh-keygen -A" in files["etc/systemd/system/ssh-hostkeys.service"]
    assert files["etc/machine-id"] == ""


# ----------------------------------------------- processes and supervisor


def test_nspawn_argv_wires_each_interface(plan: LabPlan) -> None:
    argv = nspawn_argv(plan.master, Path("/x/root"))
    assert argv[:4] == ["systemd-nspawn", "--directory", "/x/root", "--boot"]
    assert "--network-veth-extra=n0p0:eth0" in argv
    assert "--network-veth-extra=n0p1:eth1" in argv
    assert "--machine=hclab-homeclust-master" in argv
    assert "--register=no" in argv


def test_supervisor_spec_round_trips() -> None:
    spec = SupervisorSpec("m", "sw", ("systemd-nspawn", "-D", "/r"), (("n0p0", "br-inst"),),
                          "/a.pid", "/b.pid")
    assert SupervisorSpec.from_json(spec.to_json()) == spec


def test_process_id_text() -> None:
    proc = ProcessId(123, 456)
    assert ProcessId.from_text(proc.to_text()) == proc
    assert ProcessId.from_text("garbage") is None


def test_services_keep_the_lab_off_the_machine_network(
    plan: LabPlan, tmp_path: Path
) -> None:
    services = {s.name: s for s in lab_services(plan, LabPaths(tmp_path), python="python3")}
    # In the machine's own namespace only loopback listens, and only the archive is dialled.
    assert "bind=127.0.0.1" in " ".join(services["admin-ssh-listen"].argv)
    # The archive relay listens on a Unix socket only; its upstream is the fixed default.
    relay = services["apt-cache"].argv
    assert relay[:4] == ("python3", "-m", "homeclust.lab", "aptcache")
    assert relay[relay.index("--socket") + 1] == str(tmp_path / "run" / "apt-relay.sock")
    assert "--upstream" not in relay
    assert services["apt-relay"].argv[-1] == f"UNIX-CONNECT:{tmp_path / 'run' / 'apt-relay.sock'}"
    for name in ("apt-relay", "dnsmasq", "whoami"):
        assert services[name].argv[:2] == ("nsenter", "--net=/run/netns/hclab-homeclust-inet")
    assert services["admin-ssh-forward"].argv[1] == "--net=/run/netns/hclab-homeclust-admin"
    assert "TCP:10.77.0.10:22" in " ".join(services["admin-ssh-forward"].argv)


# ------------------------------------------------------ DHCP: home router


def test_router_mode_pool_is_the_master_address_without_reservation(
    inventory: Inventory, tmp_path: Path
) -> None:
    plan = make_plan(inventory, LAB_NET, 20222, tmp_path, dhcp_mode="router")
    assert plan.dhcp_range == (plan.master_public_address, plan.master_public_address)
    conf = render.render_dnsmasq_conf(plan, tmp_path / "leases", tmp_path / "log")
    lines = conf.splitlines()
    assert "dhcp-range=10.77.0.10,10.77.0.10,255.255.255.0,12h" in lines
    assert not any(line.startswith("dhcp-host") for line in lines)
    # Leases keyed by client identity: dnsmasq's default, so nothing may switch it off.
    assert not any(line.startswith("dhcp-ignore-clid") for line in lines)


def test_reserved_mode_is_the_default(plan: LabPlan) -> None:
    assert plan.dhcp_mode == "reserved"
    assert plan.dhcp_range == (IPv4Address("10.77.0.100"), IPv4Address("10.77.0.199"))


def test_router_mode_interfaces_say_nothing_of_a_reservation(
    inventory: Inventory, tmp_path: Path
) -> None:
    plan = make_plan(inventory, LAB_NET, 20222, tmp_path, dhcp_mode="router")
    text = render.render_interfaces(plan, plan.master)
    assert "# The institute network\nauto eth0\niface eth0 inet dhcp\n" in text
    assert "reserved" not in text


def test_dhcp_mode_errors(inventory: Inventory, tmp_path: Path) -> None:
    with pytest.raises(LabError, match="unknown lab DHCP mode 'home'"):
        make_plan(inventory, LAB_NET, 20222, tmp_path, dhcp_mode="home")
    with pytest.raises(LabError, match="public side uses DHCP"):
        make_plan(_static_inventory(tmp_path), LAB_NET, 20222, tmp_path, dhcp_mode="router")


def test_router_mode_first_boot_dhclient_conf_is_the_installers(
    inventory: Inventory, tmp_path: Path
) -> None:
    base = "# Debian's dhclient.conf\nsend host-name = gethostname();\n"
    for mode, has_client_id in (("reserved", True), ("router", False)):
        plan = make_plan(inventory, LAB_NET, 20222, tmp_path, dhcp_mode=mode)
        root = tmp_path / mode
        (root / "etc/dhcp").mkdir(parents=True)
        (root / "etc/dhcp/dhclient.conf").write_text(base)
        write_first_boot_files(plan, plan.master, root, "ssh-ed25519 AAAA lab")
        text = (root / "etc/dhcp/dhclient.conf").read_text()
        assert ("dhcp-client-identifier" in text) is has_client_id, mode
        if not has_client_id:
            assert text == base


def test_lab_state_reads_states_written_before_the_dhcp_mode(tmp_path: Path) -> None:
    paths = LabPaths(tmp_path)
    state = LabState(cluster="c", source_inventory="i", institute_network="10.77.0.0/24",
                     ssh_port=1, rootfs="/r", phase="up", dhcp="router")
    state.save(paths)
    assert LabState.load(paths) == state
    data = json.loads(paths.state_file.read_text())
    del data["dhcp"]
    paths.state_file.write_text(json.dumps(data))
    loaded = LabState.load(paths)
    assert loaded is not None and loaded.dhcp == "reserved"


# ----------------------------------------------------------------- uplink


@pytest.mark.parametrize("text, bps", [
    ("4mbit", 4_000_000), ("4Mbit", 4_000_000), ("512kbit", 512_000), ("1.5mbit", 1_500_000),
    ("1gbit", 10**9), ("100kbps", 800_000), ("1mibit", 2**20), (" 2 mbit ", 2_000_000),
])
def test_parse_rate(text: str, bps: int) -> None:
    assert uplink.parse_rate(text) == bps


@pytest.mark.parametrize("text", ["4", "fast", "4 megabits", "-1mbit", "1kbit", ""])
def test_parse_rate_refuses(text: str) -> None:
    with pytest.raises(LabError):
        uplink.parse_rate(text)


def test_parse_delay() -> None:
    assert uplink.parse_delay("100ms") == 100
    assert uplink.parse_delay("1.5s") == 1500
    assert uplink.parse_delay("250") == 250
    for bad in ("soon", "-5ms", "2m", "61s"):
        with pytest.raises(LabError):
            uplink.parse_delay(bad)


def test_uplink_describe_and_record() -> None:
    assert uplink.Uplink().describe() == "unlimited"
    limited = uplink.make_uplink("4mbit", 100)
    assert limited.describe() == "4 Mbit/s each way, +100 ms before each archive response"
    assert uplink.Uplink.from_json(limited.to_json()) == limited
    assert uplink.Uplink.from_json("garbage") == uplink.Uplink()
    assert uplink.make_uplink(None, 0) == uplink.Uplink()
    assert uplink.format_rate(1_500_000) == "1.50 Mbit/s"
    assert uplink.format_rate(512_000) == "512 kbit/s"
    with pytest.raises(LabError):
        uplink.make_uplink(None, -1)


def test_tc_commands_shape_only_the_lab_namespaces(plan: LabPlan) -> None:
    ports = uplink.uplink_ports(plan)
    assert ports == [("hclab-homeclust-inet", "eth0"), ("hclab-homeclust-sw", "inet0")]
    slow = uplink.make_uplink("4mbit")
    for netns, device in ports:
        (argv,) = uplink.tc_commands(netns, device, slow, shaped_now=False)
        assert argv[:3] == ["tc", "-netns", netns]  # never the machine's own namespace
        assert argv[3:9] == ["qdisc", "replace", "dev", device, "root", "tbf"]
        assert argv[argv.index("rate") + 1] == "4000000bit"
    assert uplink.tc_commands("ns", "eth0", uplink.Uplink(), shaped_now=True) == [
        ["tc", "-netns", "ns", "qdisc", "del", "dev", "eth0", "root"]]
    assert uplink.tc_commands("ns", "eth0", uplink.Uplink(), shaped_now=False) == []


def test_tbf_parameters_hold_a_frame_and_half_a_second() -> None:
    burst, limit = uplink.tbf_parameters(4_000_000)
    assert burst >= 1514 and limit == 250_000
    burst, limit = uplink.tbf_parameters(10**9)
    assert burst == 1_250_000 and limit == 62_500_000
    burst, limit = uplink.tbf_parameters(64_000)
    assert burst == uplink.MIN_BURST and limit == 3 * burst


def test_parse_tbf_rate_from_tc_json() -> None:
    shown = ('[{"kind":"tbf","handle":"8002:","root":true,"refcnt":3,'
             '"options":{"rate":500000,"burst":16384,"lat":467232}}]')
    assert uplink.parse_tbf_rate(shown) == 4_000_000
    assert uplink.parse_tbf_rate('[{"kind":"noqueue","handle":"0:","root":true}]') is None
    assert uplink.parse_tbf_rate("") is None
    assert uplink.parse_tbf_rate("not json") is None


def test_a_build_keeps_other_recipes_rootfs_that_were_used_lately(tmp_path, monkeypatch):
    """Two checkouts (or two releases) with different recipes must not remove each other's
    cached rootfs on every build; only interrupted builds and long-unused ones go."""
    import os
    import time

    from homeclust.lab import rootfs

    monkeypatch.setattr(rootfs, "mount_points", lambda: [])
    keep = tmp_path / "rootfs-new"
    recent = tmp_path / "rootfs-recent"
    old = tmp_path / "rootfs-old"
    interrupted = tmp_path / "rootfs-new.tmp-12345"
    for entry in (keep, recent, old, interrupted):
        entry.mkdir()
    rootfs._mark_used(recent)
    rootfs._mark_used(old)
    long_ago = time.time() - rootfs.STALE_AFTER - 60
    os.utime(rootfs._used_stamp(old), (long_ago, long_ago))
    rootfs._remove_stale(tmp_path, keep=keep)
    assert keep.exists() and recent.exists()
    assert not old.exists() and not rootfs._used_stamp(old).exists()
    assert not interrupted.exists()
