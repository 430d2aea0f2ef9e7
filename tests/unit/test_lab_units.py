"""Unit tests for the lab's pure parts: plan, renderers, parsers, recipe hash."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import re
import tomllib
import uuid
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest
import tomli_w
from click.testing import CliRunner

from homeclust.cli import cli
from homeclust.errors import LabError, UsageError
from homeclust.facts import parse_facts
from homeclust.inventory import Inventory, load_inventory
from homeclust.lab import render, uplink
from homeclust.lab.lab import Lab, LabStatus, NodeStatus, describe_releases
from homeclust.lab.nodes import nspawn_argv, write_first_boot_files
from homeclust.lab.plan import (
    RELEASES,
    LabPlan,
    choose_institute_network,
    cluster_slug,
    default_ssh_port,
    machine_name,
    make_plan,
    namespaces_for,
    state_dir_for,
)
from homeclust.lab.rootfs import BASE_PACKAGES, Recipe, recipe_for
from homeclust.lab.services import lab_services
from homeclust.lab.state import LabPaths, LabState
from homeclust.lab.supervisor import SupervisorSpec
from homeclust.lab.system import ProcessId
from homeclust.quoting import dnsmasq_client_id
from tests.lab import capture_fresh_facts as fresh_facts
from tests.unit.factsbuilder import parse_recorded

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
    assert "address=/deb.debian.org/security.debian.org/10.77.0.1" in lines
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


def dhcpcd_sent_client_id(conf: str, interface: str) -> bytes | None:
    """The client id dhcpcd sends on ``interface`` for ``conf``, read as dhcpcd 10.1 does.

    if-options.c: options after ``interface NAME`` are that interface's; a
    ``clientid`` value of hex pairs (":" or "-" separated, two bytes at least) is
    those bytes, anything else a string with a type byte 0 in front.
    """
    block: str | None = None
    sent: bytes | None = None
    for line in conf.splitlines():
        words = line.split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "interface":
            block = words[1].strip()
        elif words[0] == "clientid" and block in (None, interface):
            value = words[1].strip() if len(words) > 1 else ""
            pairs = value.replace(":", "").replace("-", "")
            hex_form = (len(pairs) >= 4 and len(pairs) % 2 == 0
                        and all(c in "0123456789abcdefABCDEF" for c in pairs))
            sent = bytes.fromhex(pairs) if hex_form else b"\0" + value.strip('"').encode()
    return sent


@pytest.mark.parametrize("client_id", [
    "cluster-master", "ab", "01:52:54:00:12:34:56", "cafe", "m" * 48,
])
def test_dhcpcd_conf_sends_exactly_the_client_id_bytes(client_id: str) -> None:
    base = "hostname\nduid\npersistent\nslaac private\n"
    text = render.render_dhcpcd_conf(base, "eth0", client_id)
    assert text.startswith(base)
    assert dhcpcd_sent_client_id(text, "eth0") == client_id.encode()  # as dhclient sends it
    assert dhcpcd_sent_client_id(text, "eth1") is None  # the private side: dhcpcd's own
    assert text.rstrip("\n").splitlines()[-2:] == [
        "interface eth0", f"clientid {dnsmasq_client_id(client_id)}"]


def test_a_text_clientid_would_get_a_type_byte_in_front() -> None:
    # The reason for the hex form: the same id as text is not what the server reserved.
    assert dhcpcd_sent_client_id("interface eth0\nclientid cluster-master\n", "eth0") == (
        b"\0cluster-master")


@pytest.mark.parametrize("client_id", ["m", "m" * 49])
def test_dhcpcd_cannot_send_some_client_ids_as_they_are(client_id: str) -> None:
    with pytest.raises(LabError, match=f"{len(client_id)} bytes; it takes 2 to 48"):
        render.render_dhcpcd_conf("", "eth0", client_id)


def test_ifupdown_runs_the_first_dhcp_client_it_finds() -> None:
    assert render.ifupdown_dhcp_client(["dhcpcd"]) == "dhcpcd"
    assert render.ifupdown_dhcp_client(["dhclient"]) == "dhclient"
    assert render.ifupdown_dhcp_client(["dhcpcd", "dhclient"]) == "dhclient"
    assert render.ifupdown_dhcp_client([]) is None


def test_hosts_and_resolv_conf() -> None:
    assert "127.0.1.1\tworker1\n" in render.render_hosts("worker1")
    assert render.render_resolv_conf(IPv4Address("10.77.0.1")) == "nameserver 10.77.0.1\n"


def deb822(text: str) -> list[dict[str, str]]:
    stanzas = []
    for block in text.strip().split("\n\n"):
        fields = [line.split(":", 1) for line in block.splitlines() if not line.startswith("#")]
        stanzas.append({key: value.strip() for key, value in fields})
    return stanzas


def test_debian_sources_are_deb822_with_the_three_suites_signed_by_the_keyring() -> None:
    stanzas = deb822(render.render_debian_sources("trixie"))
    assert [(s["URIs"], s["Suites"]) for s in stanzas] == [
        ("http://deb.debian.org/debian/", "trixie trixie-updates"),
        ("http://security.debian.org/debian-security/", "trixie-security"),
    ]
    for stanza in stanzas:
        assert set(stanza) == {"Types", "URIs", "Suites", "Components", "Signed-By"}
        assert (stanza["Types"], stanza["Components"]) == ("deb", "main")
        assert stanza["Signed-By"] == "/usr/share/keyrings/debian-archive-keyring.gpg"


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


def test_an_unused_remove_field_leaves_a_recipes_hash_as_it_was() -> None:
    recipe = Recipe()
    before = {k: v for k, v in dataclasses.asdict(recipe).items() if k != "remove"}
    canonical = json.dumps(before, sort_keys=True)
    assert recipe.fingerprint() == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert Recipe(remove=("etc/motd",)).fingerprint() != recipe.fingerprint()


def test_each_release_has_its_own_recipe() -> None:
    bookworm, trixie = recipe_for("bookworm"), recipe_for("trixie")
    assert bookworm == Recipe()  # unchanged: the cached bookworm rootfs stays valid
    assert bookworm.fingerprint() != trixie.fingerprint()
    assert (bookworm.suite, trixie.suite) == ("bookworm", "trixie")
    # Each release's DHCP client as its installer leaves it; nothing else differs.
    assert set(trixie.packages) ^ set(bookworm.packages) == {"dhcpcd-base", "isc-dhcp-client"}
    assert "dhcpcd-base" in trixie.packages
    # trixie: deb822 sources only (debootstrap's one-line sources.list removed).
    assert "etc/apt/sources.list" in trixie.remove and "etc/apt/sources.list" not in trixie.files
    assert trixie.files["etc/apt/sources.list.d/debian.sources"] == (
        render.render_debian_sources("trixie"))
    assert bookworm.files["etc/apt/sources.list"] == render.render_sources_list("bookworm")
    assert not bookworm.remove
    shared = set(bookworm.files) & set(trixie.files)
    assert {path: bookworm.files[path] for path in shared} == {
        path: trixie.files[path] for path in shared}
    assert set(RELEASES) == {"trixie", "bookworm"}
    with pytest.raises(LabError, match="no rootfs recipe for release 'buster'"):
        recipe_for("buster")


@pytest.mark.parametrize("role", ["master", "worker"])
@pytest.mark.parametrize("version, release", [("12", "bookworm"), ("13", "trixie")])
def test_recorded_fresh_nodes_are_what_the_lab_makes(
    tmp_path: Path, version: str, release: str, role: str
) -> None:
    """tests/fixtures/lab-facts/debianNN-ROLE-fresh.txt: recorded from fresh lab nodes
    (tests/lab/capture_fresh_facts.py); re-record them when the lab's files change."""
    text = (REPO / f"tests/fixtures/lab-facts/debian{version}-{role}-fresh.txt").read_text()
    recorded = parse_recorded(text)  # factsbuilder's own reader: round trip and checksums
    node = "master" if role == "master" else "worker1"
    inventory = load_inventory(fresh_facts.inventory_for(tmp_path, "hcfresh"))
    facts = parse_facts(text, fresh_facts.node_query(inventory, node))
    assert (facts.os.id, facts.os.version_id, facts.hostname) == ("debian", version, node)
    assert f"({release})" in facts.os.pretty_name
    client, other = (("dhcpcd-base", "isc-dhcp-client") if release == "trixie"
                     else ("isc-dhcp-client", "dhcpcd-base"))
    assert client in facts.packages and other not in facts.packages
    assert set(recorded.files) == set(facts.files)
    if release == "trixie":
        assert facts.file_text("/etc/apt/sources.list.d/debian.sources") == (
            render.render_debian_sources("trixie"))
        assert "/etc/apt/sources.list" not in facts.files
        dhcpcd = facts.file_text("/etc/dhcpcd.conf") or ""
        sent = dhcpcd_sent_client_id(dhcpcd, "eth0")
        assert sent == (b"cluster-master" if role == "master" else None)
    else:
        assert facts.file_text("/etc/apt/sources.list") == render.render_sources_list("bookworm")
        assert "/etc/dhcpcd.conf" not in facts.files
        dhclient = facts.file_text("/etc/dhcp/dhclient.conf") or ""
        assert ('send dhcp-client-identifier "cluster-master";' in dhclient) is (role == "master")


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


def fake_root(path: Path, programs: tuple[str, ...], files: dict[str, str]) -> Path:
    """A node's root with ``programs`` in /usr/sbin (merged /usr) and ``files``."""
    (path / "usr/sbin").mkdir(parents=True)
    (path / "sbin").symlink_to("usr/sbin")
    for program in programs:
        (path / "usr/sbin" / program).write_text("#!/bin/sh\n")
    for relative, content in files.items():
        (path / relative).parent.mkdir(parents=True, exist_ok=True)
        (path / relative).write_text(content)
    return path


DHCLIENT_BASE = "# Debian's dhclient.conf\nsend host-name = gethostname();\n"
DHCPCD_BASE = "# A sample configuration for dhcpcd.\nhostname\nduid\npersistent\n"


@pytest.mark.parametrize("mode", ["reserved", "router"])
def test_first_boot_gives_the_client_id_to_the_nodes_own_dhcp_client(
    inventory: Inventory, tmp_path: Path, mode: str
) -> None:
    plan = make_plan(inventory, LAB_NET, 20222, tmp_path, dhcp_mode=mode)
    files = {"etc/dhcp/dhclient.conf": DHCLIENT_BASE, "etc/dhcpcd.conf": DHCPCD_BASE}
    reserved = mode == "reserved"
    # bookworm: dhclient.  trixie: dhcpcd.  Both: dhclient, as ifupdown picks it.
    for programs, configured in ((("dhclient",), "dhclient"), (("dhcpcd",), "dhcpcd"),
                                 (("dhcpcd", "dhclient"), "dhclient")):
        root = fake_root(tmp_path / mode / "-".join(programs), programs, files)
        write_first_boot_files(plan, plan.master, root, "ssh-ed25519 AAAA lab")
        dhclient = (root / "etc/dhcp/dhclient.conf").read_text()
        dhcpcd = (root / "etc/dhcpcd.conf").read_text()
        if reserved and configured == "dhclient":
            assert 'send dhcp-client-identifier "cluster-master";' in dhclient
            assert dhcpcd == DHCPCD_BASE
        elif reserved:
            assert dhcpcd_sent_client_id(dhcpcd, "eth0") == b"cluster-master"
            assert dhclient == DHCLIENT_BASE
        else:  # a home router: each client's packaged configuration, untouched
            assert (dhclient, dhcpcd) == (DHCLIENT_BASE, DHCPCD_BASE)
    for worker in plan.nodes[1:]:  # workers are static: no DHCP client configuration
        root = fake_root(tmp_path / mode / worker.name, ("dhcpcd",), files)
        write_first_boot_files(plan, worker, root, "ssh-ed25519 AAAA lab")
        assert (root / "etc/dhcpcd.conf").read_text() == DHCPCD_BASE


def test_first_boot_without_a_known_dhcp_client_is_an_error(
    inventory: Inventory, tmp_path: Path
) -> None:
    plan = make_plan(inventory, LAB_NET, 20222, tmp_path)
    root = fake_root(tmp_path / "udhcpc", ("udhcpc",), {})
    with pytest.raises(LabError, match=r"no DHCP client the lab can give a client id \(udhcpc\)"):
        write_first_boot_files(plan, plan.master, root, "ssh-ed25519 AAAA lab")


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


def test_plan_gives_every_node_the_lab_release_unless_named(inventory: Inventory,
                                                            tmp_path: Path) -> None:
    plan = make_plan(inventory, LAB_NET, 20222, tmp_path)
    assert {n.release for n in plan.nodes} == {"trixie"}  # the current stable by default
    assert plan.releases == ("trixie",)
    mixed = make_plan(inventory, LAB_NET, 20222, tmp_path, release="bookworm",
                      node_releases={"master": "trixie", "worker3": "trixie"})
    assert [(n.name, n.release) for n in mixed.nodes] == [
        ("master", "trixie"), ("worker1", "bookworm"), ("worker2", "bookworm"),
        ("worker3", "trixie")]
    assert mixed.releases == ("trixie", "bookworm")
    # Nothing else about the plan depends on releases.
    assert dataclasses.replace(mixed, nodes=plan.nodes) == dataclasses.replace(
        plan, nodes=plan.nodes)
    assert [dataclasses.replace(n, release="trixie") for n in mixed.nodes] == list(plan.nodes)


@pytest.mark.parametrize("release, node_releases, message", [
    ("buster", {}, r"unknown lab release 'buster'.*one of: trixie, bookworm"),
    ("trixie", {"worker9": "bookworm"}, r"no node named 'worker9' in the inventory's cluster"),
    ("trixie", {"worker1": "sid"}, r"unknown release for node worker1: 'sid'"),
])
def test_bad_releases_are_refused_naming_what_is_wrong(
    inventory: Inventory, tmp_path: Path, release: str, node_releases: dict[str, str],
    message: str
) -> None:
    with pytest.raises(LabError) as raised:
        make_plan(inventory, LAB_NET, 20222, tmp_path, release=release,
                  node_releases=node_releases)
    assert re.search(message, str(raised.value), re.S), str(raised.value)


def test_lab_state_of_a_lab_before_releases_is_a_bookworm_lab(tmp_path: Path) -> None:
    paths = LabPaths(tmp_path)
    old = {"cluster": "c", "source_inventory": "i", "institute_network": "10.77.0.0/24",
           "ssh_port": 1, "rootfs": "/r", "phase": "up", "version": 1, "dhcp": "reserved"}
    paths.state_file.write_text(json.dumps(old))
    loaded = LabState.load(paths)
    assert loaded is not None
    assert (loaded.release, loaded.node_releases, loaded.rootfs_of("bookworm")) == (
        "bookworm", {}, "/r")
    with pytest.raises(LabError, match="no trixie rootfs recorded"):
        loaded.rootfs_of("trixie")
    mixed = dataclasses.replace(loaded, release="trixie", node_releases={"worker1": "bookworm"},
                                rootfs_by_release={"trixie": "/t", "bookworm": "/b"})
    mixed.save(paths)
    assert LabState.load(paths) == mixed
    assert (mixed.rootfs_of("trixie"), mixed.rootfs_of("bookworm")) == ("/t", "/b")
    paths.state_file.write_text(json.dumps({**old, "from_the_future": 1}))
    with pytest.raises(LabError, match="cannot read the lab state"):
        LabState.load(paths)


def test_status_and_summary_name_each_nodes_release() -> None:
    assert describe_releases([("master", "trixie"), ("worker1", "trixie")]) == "trixie"
    assert describe_releases([("master", "trixie"), ("worker1", "bookworm"),
                              ("worker2", "trixie")]) == (
        "trixie (master, worker2), bookworm (worker1)")
    status = LabStatus(cluster="c", phase="up", nodes=(
        NodeStatus("master", "master", True, 7, release="trixie"),
        NodeStatus("worker1", "worker", False, None, release="bookworm")))
    lines = status.describe().splitlines()
    assert [line.split()[:3] for line in lines if line.startswith("    ")][:2] == [
        ["master", "master", "trixie"], ["worker1", "worker", "bookworm"]]


@pytest.mark.parametrize("args, message", [
    (["--release", "buster"], "unknown lab release 'buster'"),
    (["--node-release", "worker9=bookworm"], "no node named 'worker9'"),
    (["--node-release", "worker1"], "'worker1' is not NODE=RELEASE"),
    (["--node-release", "worker1=sid"], "unknown release for node worker1: 'sid'"),
])
def test_lab_up_with_a_bad_release_is_a_usage_error_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    def never(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the bad option reached Lab.up")

    monkeypatch.setattr(Lab, "up", never)
    raw = tomllib.loads(GUIDE_INVENTORY.read_text())
    raw["cluster"]["name"] = f"hcunit-badrelease-{uuid.uuid4().hex[:8]}"
    inventory = tmp_path / "inventory.toml"
    inventory.write_text(tomli_w.dumps(raw))
    result = CliRunner().invoke(cli, ["-i", str(inventory), "lab", "up", *args])
    assert isinstance(result.exception, UsageError), result.output
    assert result.exception.exit_code == 2
    assert message in str(result.exception)
    assert not state_dir_for(raw["cluster"]["name"]).exists()


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
