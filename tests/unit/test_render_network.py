"""Network renderers: golden files for every backend, /etc/hosts, taking over old configs.

Golden files live in ``tests/golden/network/BACKEND/CASE/<absolute path>`` and
are compared exactly.  Regenerate them only on purpose, with
``HOMECLUST_UPDATE_GOLDEN=1``, and read the diff before committing it.
"""

from __future__ import annotations

import subprocess
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pytest

from homeclust.inventory import Inventory
from homeclust.platforms import NetworkBackend
from homeclust.render.network import (
    HOSTS_BEGIN,
    HOSTS_END,
    FileSpec,
    InterfaceSpec,
    addresses_command,
    bringup_command,
    interface_files,
    interface_specs,
    render_hostname,
    render_hosts,
    render_ifupdown,
    takedown_command,
)
from tests.unit.factsbuilder import check_golden, inventory, recorded

INV = inventory()
STATIC_INV = inventory(master={"public_boot": "static", "public_address": "10.77.0.10/24",
                               "public_gateway": "10.77.0.1"})
NO_EXISTING: dict[str, str] = {}

#: What each backend writes, with modes: the independent half of every golden test.
EXPECTED_FILES: dict[tuple[NetworkBackend, str], dict[str, int]] = {
    ("ifupdown", "master"): {"/etc/network/interfaces": 0o644, "/etc/dhcp/dhclient.conf": 0o644},
    ("ifupdown", "worker1"): {"/etc/network/interfaces": 0o644, "/etc/resolv.conf": 0o644},
    ("netplan", "master"): {"/etc/netplan/60-homeclust.yaml": 0o600},
    ("netplan", "worker1"): {"/etc/netplan/60-homeclust.yaml": 0o600},
    ("ifcfg", "master"): {"/etc/sysconfig/network-scripts/ifcfg-eth0": 0o644,
                          "/etc/sysconfig/network-scripts/ifcfg-eth1": 0o644},
    ("ifcfg", "worker1"): {"/etc/sysconfig/network-scripts/ifcfg-eth0": 0o644},
    ("ifcfg", "worker2"): {"/etc/sysconfig/network-scripts/ifcfg-eth0": 0o644},
    ("nm-ifcfg", "master"): {"/etc/sysconfig/network-scripts/ifcfg-eth0": 0o644,
                             "/etc/sysconfig/network-scripts/ifcfg-eth1": 0o644},
    ("nm-ifcfg", "worker1"): {"/etc/sysconfig/network-scripts/ifcfg-eth0": 0o644},
    ("nm-keyfile", "master"): {
        "/etc/NetworkManager/system-connections/homeclust-eth0.nmconnection": 0o600,
        "/etc/NetworkManager/system-connections/homeclust-eth1.nmconnection": 0o600,
    },
    ("nm-keyfile", "worker1"): {
        "/etc/NetworkManager/system-connections/homeclust-eth0.nmconnection": 0o600,
    },
}


def specs(inv: Inventory, name: str) -> list[InterfaceSpec]:
    return interface_specs(inv, inv.node(name))


# --------------------------------------------------------------------------- specs


def test_master_specs_follow_the_inventory() -> None:
    public, private = specs(INV, "master")
    assert public == InterfaceSpec("eth0", "public", "dhcp", client_id="cluster-master")
    assert private == InterfaceSpec("eth1", "private", "static", IPv4Interface("192.168.10.1/24"))


def test_worker_spec_uses_the_master_as_gateway_and_the_inventory_dns() -> None:
    (spec,) = specs(INV, "worker1")
    assert spec.address == IPv4Interface("192.168.10.2/24")
    assert spec.gateway == IPv4Address("192.168.10.1")
    assert spec.dns == (IPv4Address("8.8.8.8"),)


def test_static_public_master_spec() -> None:
    public, _ = specs(STATIC_INV, "master")
    assert public.method == "static"
    assert public.address == IPv4Interface("10.77.0.10/24")
    assert public.gateway == IPv4Address("10.77.0.1")
    assert public.client_id is None


# --------------------------------------------------------------------------- golden files


@pytest.mark.parametrize(("backend", "node"), sorted(EXPECTED_FILES))
def test_interface_files_match_golden(backend: NetworkBackend, node: str) -> None:
    rendered = interface_files(backend, specs(INV, node), NO_EXISTING)
    assert {path: spec.mode for path, spec in rendered.files.items()} == EXPECTED_FILES[backend, node]
    for path, spec in rendered.files.items():
        assert spec.content is not None
        check_golden(f"network/{backend}/{node}{path}", spec.content)


@pytest.mark.parametrize("backend", ["ifupdown", "netplan", "ifcfg", "nm-ifcfg", "nm-keyfile"])
def test_static_public_master_matches_golden(backend: NetworkBackend) -> None:
    rendered = interface_files(backend, specs(STATIC_INV, "master"), NO_EXISTING)
    for path, spec in rendered.files.items():
        assert spec.content is not None
        check_golden(f"network/{backend}/master-static{path}", spec.content)


# Independent expectations on the golden content (the guide, DESIGN.md), so a golden
# file regenerated from a wrong renderer still fails here.


def test_ifupdown_uses_auto_not_allow_hotplug_and_sends_the_client_id() -> None:
    files = interface_files("ifupdown", specs(INV, "master"), NO_EXISTING).files
    interfaces = files["/etc/network/interfaces"].content or ""
    assert "allow-hotplug" not in interfaces
    assert "auto eth0\niface eth0 inet dhcp\n" in interfaces
    assert "auto eth1\niface eth1 inet static\n    address 192.168.10.1/24\n" in interfaces
    assert "gateway" not in interfaces  # the master's default route comes from DHCP only
    assert "source /etc/network/interfaces.d/*" in interfaces
    dhclient = files["/etc/dhcp/dhclient.conf"].content or ""
    assert 'interface "eth0" {\n    send dhcp-client-identifier "cluster-master";\n}' in dhclient
    assert "eth1" not in dhclient


def test_ifupdown_worker_has_gateway_and_dns() -> None:
    files = interface_files("ifupdown", specs(INV, "worker1"), NO_EXISTING).files
    interfaces = files["/etc/network/interfaces"].content or ""
    assert "    gateway 192.168.10.1\n" in interfaces
    assert "    dns-nameservers 8.8.8.8\n" in interfaces
    # Without resolvconf, dns-nameservers does nothing: resolv.conf is written directly.
    resolv = files["/etc/resolv.conf"].content or ""
    assert [line for line in resolv.splitlines() if not line.startswith("#")] == ["nameserver 8.8.8.8"]


def test_ifupdown_leaves_resolv_conf_to_resolvconf_when_installed() -> None:
    files = interface_files("ifupdown", specs(INV, "worker1"), NO_EXISTING, has_resolvconf=True).files
    assert "/etc/resolv.conf" not in files


def test_static_public_master_on_ifupdown_gets_gateway_dns_and_no_dhclient_conf() -> None:
    files = interface_files("ifupdown", specs(STATIC_INV, "master"), NO_EXISTING).files
    interfaces = files["/etc/network/interfaces"].content or ""
    assert "    address 10.77.0.10/24\n    gateway 10.77.0.1\n" in interfaces
    assert "/etc/dhcp/dhclient.conf" not in files
    assert "nameserver 8.8.8.8" in (files["/etc/resolv.conf"].content or "")


def test_netplan_worker_routes_through_the_master() -> None:
    content = interface_files("netplan", specs(INV, "worker1"), NO_EXISTING).files[
        "/etc/netplan/60-homeclust.yaml"].content or ""
    assert "addresses: [192.168.10.2/24]" in content
    assert "- to: default\n          via: 192.168.10.1" in content
    assert "nameservers:\n        addresses: [8.8.8.8]" in content


def test_netplan_master_warns_that_it_cannot_send_the_client_id() -> None:
    rendered = interface_files("netplan", specs(INV, "master"), NO_EXISTING)
    content = rendered.files["/etc/netplan/60-homeclust.yaml"].content or ""
    assert "    \"eth0\":\n      dhcp4: true" in content
    assert "via" not in content  # no static default route on the master
    assert len(rendered.warnings) == 1 and "cluster-master" in rendered.warnings[0]


@pytest.mark.parametrize(("backend", "nm"), [("ifcfg", "no"), ("nm-ifcfg", "yes")])
def test_ifcfg_like_the_guide(backend: NetworkBackend, nm: str) -> None:
    files = interface_files(backend, specs(INV, "master"), NO_EXISTING).files
    public = _keyvalues(files["/etc/sysconfig/network-scripts/ifcfg-eth0"].content)
    assert public["DEVICE"] == "eth0" and public["ONBOOT"] == "yes"
    assert public["BOOTPROTO"] == "dhcp" and public["DHCP_CLIENT_ID"] == "cluster-master"
    assert public["NM_CONTROLLED"] == nm
    private = _keyvalues(files["/etc/sysconfig/network-scripts/ifcfg-eth1"].content)
    assert (private["IPADDR"], private["PREFIX"]) == ("192.168.10.1", "24")
    assert private["DEFROUTE"] == "no" and "GATEWAY" not in private
    worker = _keyvalues(interface_files(backend, specs(INV, "worker1"), NO_EXISTING).files[
        "/etc/sysconfig/network-scripts/ifcfg-eth0"].content)
    assert worker["GATEWAY"] == "192.168.10.1" and worker["DNS1"] == "8.8.8.8"
    assert worker["DEFROUTE"] == "yes"


def test_nm_keyfile_sends_client_id_and_worker_gets_gateway_and_dns() -> None:
    files = interface_files("nm-keyfile", specs(INV, "master"), NO_EXISTING).files
    directory = "/etc/NetworkManager/system-connections/"
    public = files[directory + "homeclust-eth0.nmconnection"].content or ""
    assert "interface-name=eth0\n" in public
    assert "[ipv4]\nmethod=auto\ndhcp-client-id=cluster-master\n" in public
    private = files[directory + "homeclust-eth1.nmconnection"].content or ""
    assert "address1=192.168.10.1/24\n" in private and "never-default=true" in private
    worker = interface_files("nm-keyfile", specs(INV, "worker1"), NO_EXISTING).files[
        directory + "homeclust-eth0.nmconnection"].content or ""
    assert "address1=192.168.10.2/24,192.168.10.1\n" in worker
    assert "dns=8.8.8.8;\n" in worker
    assert "never-default" not in worker


def _keyvalues(text: str | None) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (text or "").splitlines()
             if "=" in line and not line.startswith("#"))
    return {k: v for k, v in pairs}


# --------------------------------------------------------------------------- taking over


def test_ifupdown_takes_over_the_installer_file() -> None:
    current = recorded("debian12-master").file_text("/etc/network/interfaces")
    rendered = render_ifupdown(specs(INV, "master"), current)
    assert rendered == interface_files("ifupdown", specs(INV, "master"), NO_EXISTING).files[
        "/etc/network/interfaces"].content
    assert "kept from the previous configuration" not in rendered


def test_ifupdown_keeps_other_interfaces_and_is_idempotent() -> None:
    current = (
        "source /etc/network/interfaces.d/*\n"
        "auto lo eth2\n"
        "iface lo inet loopback\n"
        "allow-hotplug eth0\n"
        "iface eth0 inet dhcp\n"
        "iface eth2 inet static\n"
        "\taddress 172.16.0.5/24\n"
        "\tmtu 9000\n"
    )
    once = render_ifupdown(specs(INV, "master"), current)
    check_golden("network/ifupdown/master-kept-eth2/etc/network/interfaces", once)
    assert "auto eth2\niface eth2 inet static\n    address 172.16.0.5/24\n    mtu 9000\n" in once
    assert "allow-hotplug" not in once
    assert once.count("iface eth0") == 1
    assert render_ifupdown(specs(INV, "master"), once) == once


@pytest.mark.parametrize("snippet", [
    "auto eth0\niface eth0 inet dhcp\n",
    "allow-hotplug eth1\n",
    "iface eth1 inet static\n    address 192.168.10.1/24\n",
])
def test_interfaces_d_snippet_for_our_interface_is_removed(snippet: str) -> None:
    existing = {"/etc/network/interfaces.d/50-cloud-init": snippet,
                "/etc/network/interfaces.d/eth2": "auto eth2\niface eth2 inet dhcp\n"}
    rendered = interface_files("ifupdown", specs(INV, "master"), existing)
    assert rendered.files["/etc/network/interfaces.d/50-cloud-init"] == FileSpec(None)
    assert "/etc/network/interfaces.d/eth2" not in rendered.files
    # Removing it changes how the interfaces come up: both depend on it.
    for name in ("eth0", "eth1"):
        assert "/etc/network/interfaces.d/50-cloud-init" in rendered.depends[name]


def test_other_netplan_file_defining_our_interface_is_removed() -> None:
    existing = {
        "/etc/netplan/00-installer-config.yaml":
            recorded("ubuntu2204-master").file_text("/etc/netplan/00-installer-config.yaml"),
        "/etc/netplan/50-wifi.yaml": "network:\n  version: 2\n  wifis:\n    wlan0:\n      dhcp4: true\n",
        "/etc/netplan/60-homeclust.yaml": "network: {}\n",
    }
    rendered = interface_files("netplan", specs(INV, "master"), existing)
    assert rendered.files["/etc/netplan/00-installer-config.yaml"] == FileSpec(None)
    assert "/etc/netplan/50-wifi.yaml" not in rendered.files
    assert rendered.files["/etc/netplan/60-homeclust.yaml"].content is not None


@pytest.mark.parametrize("backend", ["ifcfg", "nm-ifcfg", "nm-keyfile"])
def test_other_ifcfg_with_our_device_is_removed(backend: NetworkBackend) -> None:
    existing = {
        "/etc/sysconfig/network-scripts/ifcfg-System_eth0": 'NAME="System eth0"\nDEVICE="eth0"\n',
        "/etc/sysconfig/network-scripts/ifcfg-lo": "DEVICE=lo\nNAME=loopback\n",
        "/etc/sysconfig/network-scripts/ifcfg-eth2": "DEVICE=eth2\nBOOTPROTO=dhcp\n",
    }
    rendered = interface_files(backend, specs(INV, "worker1"), existing)
    assert rendered.files["/etc/sysconfig/network-scripts/ifcfg-System_eth0"] == FileSpec(None)
    assert "/etc/sysconfig/network-scripts/ifcfg-lo" not in rendered.files
    assert "/etc/sysconfig/network-scripts/ifcfg-eth2" not in rendered.files
    assert "/etc/sysconfig/network-scripts/ifcfg-System_eth0" in rendered.depends["eth0"]


@pytest.mark.parametrize("backend", ["nm-ifcfg", "nm-keyfile"])
def test_other_keyfile_with_our_interface_is_removed(backend: NetworkBackend) -> None:
    master = recorded("rocky9-master")
    directory = "/etc/NetworkManager/system-connections/"
    existing = {
        directory + "eth0.nmconnection": master.file_text(directory + "eth0.nmconnection"),
        directory + "eth1.nmconnection": master.file_text(directory + "eth1.nmconnection"),
        directory + "wifi.nmconnection": "[connection]\nid=wifi\ntype=wifi\ninterface-name=wlan0\n",
    }
    rendered = interface_files(backend, specs(INV, "master"), existing)
    assert rendered.files[directory + "eth0.nmconnection"] == FileSpec(None)
    assert rendered.files[directory + "eth1.nmconnection"] == FileSpec(None)
    assert directory + "wifi.nmconnection" not in rendered.files
    assert directory + "eth0.nmconnection" in rendered.depends["eth0"]
    assert directory + "eth1.nmconnection" not in rendered.depends["eth0"]


def test_our_own_keyfile_is_not_removed() -> None:
    path = "/etc/NetworkManager/system-connections/homeclust-eth0.nmconnection"
    rendered = interface_files("nm-keyfile", specs(INV, "worker1"), {path: "interface-name=eth0\n"})
    assert rendered.files[path].content is not None


# --------------------------------------------------------------------------- re-apply


def run_with_stubs(tmp_path: Path, command: str, tools: tuple[str, ...]) -> list[str]:
    """Run ``command`` under sh with ``tools`` replaced by stubs that log their arguments."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    for tool in tools:
        stub = stubs / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n')
        stub.chmod(0o755)
    subprocess.run(["/bin/sh", "-c", command], check=True, timeout=10,
                   env={"PATH": f"{stubs}:/usr/bin:/bin"})
    return log.read_text().splitlines() if log.exists() else []


def test_ifupdown_takes_down_flushes_then_brings_up(tmp_path: Path) -> None:
    down = run_with_stubs(tmp_path, takedown_command("ifupdown", ["eth0", "eth1"]),
                          ("ifdown", "ifup", "ip"))
    assert down == ["ifdown --force eth0", "ip addr flush dev eth0",
                    "ifdown --force eth1", "ip addr flush dev eth1"]
    (tmp_path / "calls.log").unlink()
    assert run_with_stubs(tmp_path, bringup_command("ifupdown", ["eth0", "eth1"]),
                          ("ifdown", "ifup", "ip")) == ["ifup eth0", "ifup eth1"]


def test_takedown_never_fails(tmp_path: Path) -> None:
    # An interface that is already down is not an error: a rollback must go on.
    for backend in ("ifupdown", "ifcfg", "nm-keyfile", "netplan"):
        subprocess.run(["/bin/sh", "-c", takedown_command(backend, ["eth9"])], check=True,
                       timeout=10, env={"PATH": "/nonexistent"}, capture_output=True)


def test_ifcfg_uses_plain_ifdown_and_reloads_networkmanager_first(tmp_path: Path) -> None:
    assert run_with_stubs(tmp_path, takedown_command("ifcfg", ["eth0"]),
                          ("ifdown", "ip")) == ["ifdown eth0", "ip addr flush dev eth0"]
    (tmp_path / "calls.log").unlink()
    assert run_with_stubs(tmp_path, bringup_command("ifcfg", ["eth0"]), ("nmcli", "ifup")) == [
        "nmcli -t general status", "nmcli connection reload", "ifup eth0"]


def test_networkmanager_disconnects_then_reloads_and_connects(tmp_path: Path) -> None:
    assert run_with_stubs(tmp_path, takedown_command("nm-keyfile", ["eth0", "eth1"]),
                          ("nmcli",)) == ["nmcli device disconnect eth0",
                                          "nmcli device disconnect eth1"]
    (tmp_path / "calls.log").unlink()
    assert run_with_stubs(tmp_path, bringup_command("nm-ifcfg", ["eth0", "eth1"]), ("nmcli",)) \
        == ["nmcli connection reload", "nmcli device connect eth0", "nmcli device connect eth1"]


def test_netplan_releases_with_networkctl_then_applies(tmp_path: Path) -> None:
    assert run_with_stubs(tmp_path, takedown_command("netplan", ["eth0"]),
                          ("networkctl", "ip")) == ["networkctl down eth0"]
    (tmp_path / "calls.log").unlink()
    assert run_with_stubs(tmp_path, bringup_command("netplan", ["eth0"]), ("netplan",)) == [
        "netplan generate", "netplan apply"]


def test_addresses_command_reports_each_interface(tmp_path: Path) -> None:
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "ip").write_text('#!/bin/sh\n[ "$6" = eth0 ] && echo "2: eth0 inet 10.77.0.10/24 '
                              'brd 10.77.0.255 scope global eth0"\ntrue\n')
    (stubs / "ip").chmod(0o755)
    out = subprocess.run(["/bin/sh", "-c", addresses_command(["eth0", "eth1"])], check=True,
                         capture_output=True, text=True, timeout=10,
                         env={"PATH": f"{stubs}:/usr/bin:/bin"}).stdout
    assert out == "eth0: 10.77.0.10/24\neth1: \n"


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(("fixture", "node"), [
    ("debian12-master", "master"), ("debian12-worker", "worker1"),
    ("rocky9-master", "master"), ("centos7-worker", "worker2"), ("ubuntu2204-master", "master"),
])
def test_hosts_matches_golden_and_is_idempotent(fixture: str, node: str) -> None:
    current = recorded(fixture).file_text("/etc/hosts")
    rendered = render_hosts(INV, current)
    check_golden(f"network/hosts/{fixture}/etc/hosts", rendered)
    assert render_hosts(INV, rendered) == rendered


def test_hosts_drops_loopback_names_of_nodes_and_keeps_the_rest() -> None:
    current = recorded("debian12-worker").file_text("/etc/hosts")
    rendered = render_hosts(INV, current)
    lines = rendered.splitlines()
    assert "127.0.1.1\tworker1" not in lines
    assert not any(line.startswith("127.0.1.1") for line in lines)
    assert "127.0.0.1\tlocalhost" in lines
    assert "::1     localhost ip6-localhost ip6-loopback" in lines
    block = lines[lines.index(HOSTS_BEGIN) + 1:lines.index(HOSTS_END)]
    assert block == ["192.168.10.1\tmaster", "192.168.10.2\tworker1", "192.168.10.3\tworker2"]


def test_hosts_replaces_a_stale_block_and_drops_fqdn_lines_of_nodes() -> None:
    current = (
        "127.0.0.1 localhost\n"
        "10.0.0.9 worker2.cluster.example.org worker2  # old address\n"
        "10.0.0.20 nas\n"
        f"{HOSTS_BEGIN}\n192.168.10.9\tworker9\n{HOSTS_END}\n"
    )
    rendered = render_hosts(INV, current)
    assert "worker9" not in rendered and "10.0.0.9" not in rendered
    assert "10.0.0.20 nas" in rendered
    assert rendered.count(HOSTS_BEGIN) == 1
    assert rendered == render_hosts(INV, rendered)


def test_hosts_without_a_file_starts_from_the_defaults() -> None:
    rendered = render_hosts(INV, None)
    assert rendered.startswith("127.0.0.1\tlocalhost\n")
    assert "192.168.10.2\tworker1\n" in rendered


def test_hostname() -> None:
    assert render_hostname(INV.node("worker2")) == "worker2\n"


def test_hosts_keeps_other_names_on_a_line_that_also_names_a_node() -> None:
    current = ("127.0.0.1   localhost localhost.localdomain master  # set by hand\n"
               "::1         localhost master.example.org\n"
               "10.77.0.10  cluster-master.example.org master\n")
    rendered = render_hosts(INV, current)
    lines = rendered.splitlines()
    assert lines[:3] == ["127.0.0.1\tlocalhost localhost.localdomain  # set by hand",
                         "::1\tlocalhost",
                         "10.77.0.10\tcluster-master.example.org"]
    assert render_hosts(INV, rendered) == rendered
