"""Fact parsers and platform detection, from recorded outputs of both platform families."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from ipaddress import IPv4Address, IPv4Interface, IPv6Address
from pathlib import Path

import pytest

from homeclust.errors import FactError
from homeclust.facts import (
    COMMANDS,
    REDACTED,
    Fact,
    FactQuery,
    Route,
    ServiceState,
    SshPeer,
    Sysctl,
    Transaction,
    gather_script,
    normalize_iptables,
    parse_facts,
    parse_iptables_save,
    parse_iptables_version,
    parse_os_release,
    parse_packages,
    parse_routes,
    parse_units,
    redact_facts_output,
    summarize,
)
from homeclust.platforms import Platform, detect, platform_of
from tests.unit.factsbuilder import (
    FIXTURES,
    FileRecord,
    build,
    builder,
    dpkg_lines,
    parse_recorded,
    recorded,
    recorded_text,
    rpm_lines,
    unit_lines,
)

RECORDINGS = sorted(p.stem for p in (FIXTURES / "facts").glob("*.txt"))


def os_release(id_: str, version: str, like: str = "", pretty: str = "") -> str:
    lines = [f'PRETTY_NAME="{pretty or id_ + " " + version}"', f"ID={id_}"]
    if like:
        lines.append(f'ID_LIKE="{like}"')
    if version:
        lines.append(f'VERSION_ID="{version}"')
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- recordings


def test_all_five_recordings_are_present() -> None:
    assert RECORDINGS == ["centos7-worker", "debian12-master", "debian12-worker",
                          "rocky9-master", "ubuntu2204-master"]


@pytest.mark.parametrize("name", RECORDINGS)
def test_recording_round_trips_through_the_builder(name: str) -> None:
    """The builder prints exactly what the script printed (and every sha256 matches)."""
    text = recorded_text(name)
    assert parse_recorded(text).build() == text


@pytest.mark.parametrize("name", RECORDINGS)
def test_recording_parses_completely(name: str) -> None:
    facts = parse_facts(recorded_text(name))
    assert facts.hostname and facts.interfaces and facts.routes
    assert facts.services and facts.files and facts.commands and facts.ssh_peer
    assert set(facts.sysctls) == {"net.ipv4.ip_forward", "net.netfilter.nf_conntrack_max",
                                  "net.netfilter.nf_conntrack_tcp_timeout_established"}
    assert facts.transactions == ()
    summary = summarize(facts)
    assert summary["hostname"] == facts.hostname


# --------------------------------------------------------------------------- os-release


@pytest.mark.parametrize(("name", "expected"), [
    ("debian12-master", Platform("debian12", "debian", 12, "apt", "ifupdown", True)),
    ("debian12-worker", Platform("debian12", "debian", 12, "apt", "ifupdown", True)),
    ("ubuntu2204-master", Platform("ubuntu22.04", "debian", 22, "apt", "netplan", True)),
    ("centos7-worker", Platform("centos7", "rhel", 7, "yum", "ifcfg", False)),
    ("rocky9-master", Platform("rocky9", "rhel", 9, "dnf", "nm-keyfile", True)),
])
def test_platform_of_recordings(name: str, expected: Platform) -> None:
    assert platform_of(recorded(name).facts()) == expected


@pytest.mark.parametrize(("release", "name", "family", "backend"), [
    (os_release("debian", "11"), "debian11", "debian", "ifupdown"),
    (os_release("debian", "13"), "debian13", "debian", "ifupdown"),
    (os_release("ubuntu", "20.04", "debian"), "ubuntu20.04", "debian", "netplan"),
    (os_release("ubuntu", "24.04", "debian"), "ubuntu24.04", "debian", "netplan"),
    (os_release("rocky", "8.9", "rhel centos fedora"), "rocky8", "rhel", "nm-ifcfg"),
    (os_release("almalinux", "8.10", "rhel centos fedora"), "almalinux8", "rhel", "nm-ifcfg"),
    (os_release("rhel", "8.9", "fedora"), "rhel8", "rhel", "nm-ifcfg"),
    (os_release("rhel", "9.4", "fedora"), "rhel9", "rhel", "nm-keyfile"),
    (os_release("almalinux", "9.4", "rhel centos fedora"), "almalinux9", "rhel", "nm-keyfile"),
    (os_release("centos", "9", "rhel fedora"), "centos9", "rhel", "nm-keyfile"),
    (os_release("centos", "7", "rhel fedora"), "centos7", "rhel", "ifcfg"),
    (os_release("ol", "8.9", "fedora"), "ol8", "rhel", "nm-ifcfg"),
    (os_release("debian", "", pretty="Debian GNU/Linux trixie/sid"), "debian", "debian", "ifupdown"),
])
def test_supported_releases(release: str, name: str, family: str, backend: str) -> None:
    platform = detect(parse_os_release(release))
    assert (platform.name, platform.family, platform.network_backend) == (name, family, backend)
    assert platform.package_manager == {"debian": "apt", "rhel": "yum" if name == "centos7"
                                        else "dnf"}[family]


@pytest.mark.parametrize("release", [
    os_release("arch", "", pretty="Arch Linux"),
    os_release("debian", "9", pretty="Debian GNU/Linux 9 (stretch)"),
    os_release("debian", "10", pretty="Debian GNU/Linux 10 (buster)"),
    os_release("ubuntu", "18.04", "debian", pretty="Ubuntu 18.04.6 LTS"),
    os_release("centos", "6", "rhel fedora", pretty="CentOS release 6.10"),
    os_release("alpine", "3.19.1", pretty="Alpine Linux v3.19"),
    os_release("opensuse-leap", "15.5", "suse opensuse", pretty="openSUSE Leap 15.5"),
    # Derivatives that configure their network differently from their base:
    os_release("raspbian", "12", "debian", pretty="Raspbian GNU/Linux 12 (bookworm)"),
    os_release("kali", "2024.1", "debian", pretty="Kali GNU/Linux Rolling"),
    os_release("amzn", "2023", "fedora", pretty="Amazon Linux 2023"),
    os_release("amzn", "2", "centos rhel fedora", pretty="Amazon Linux 2"),
    os_release("fedora", "39", pretty="Fedora Linux 39 (Server Edition)"),
    os_release("linuxmint", "21.3", "ubuntu debian", pretty="Linux Mint 21.3"),
])
def test_unsupported_releases_are_a_clear_fact_error(release: str) -> None:
    parsed = parse_os_release(release)
    with pytest.raises(FactError) as error:
        detect(parsed)
    assert parsed.pretty_name in str(error.value)
    assert error.value.hint and "Debian 11-13" in error.value.hint


def test_unsupported_release_fails_from_raw_facts_too() -> None:
    facts = parse_facts(build(os_release='NAME="Arch Linux"\nPRETTY_NAME="Arch Linux"\nID=arch\n'
                                         "BUILD_ID=rolling\n"))
    with pytest.raises(FactError, match="Arch Linux"):
        platform_of(facts)


def test_os_release_quoting_comments_and_missing_id() -> None:
    parsed = parse_os_release("# comment\nID='rocky'\nID_LIKE=\"RHEL centos fedora\"\n"
                              "VERSION_ID=9.3\nBROKEN LINE\n")
    assert (parsed.id, parsed.id_like, parsed.version_id, parsed.major) == (
        "rocky", ("rhel", "centos", "fedora"), "9.3", 9)
    assert parsed.pretty_name == "rocky"
    with pytest.raises(FactError, match="ID"):
        parse_os_release('NAME="Something"\n')
    with pytest.raises(FactError):
        parse_facts(build(os_release=""))


# --------------------------------------------------------------------------- interfaces


def test_links_addresses_and_routes_of_a_lab_master() -> None:
    facts = recorded("debian12-master").facts()
    assert sorted(facts.interfaces) == ["eth0", "eth1", "lo"]  # "eth0@if7" is eth0
    eth0 = facts.interfaces["eth0"]
    assert (eth0.mac, eth0.up) == ("6a:3c:1e:5b:20:01", True)
    assert eth0.addresses == (IPv4Interface("10.77.0.10/24"),)
    assert facts.interfaces["eth1"].addresses == (IPv4Interface("192.168.10.1/24"),)
    assert facts.interfaces["lo"].mac == "00:00:00:00:00:00"
    assert facts.default_routes() == (Route("default", IPv4Address("10.77.0.1"), "eth0", None),)
    assert facts.interface_with_address(IPv4Address("10.77.0.10")) == "eth0"
    assert facts.interface_with_address(IPv4Address("10.77.0.11")) is None
    assert facts.addresses_of("eth9") == ()


def test_routes_of_networkd_with_metrics_and_host_routes() -> None:
    facts = recorded("ubuntu2204-master").facts()
    assert facts.routes == (
        Route("default", IPv4Address("10.77.0.1"), "eth0", "dhcp"),
        Route("10.77.0.0/24", None, "eth0", "kernel"),
        Route("10.77.0.1/32", None, "eth0", "dhcp"),
        Route("192.168.10.0/24", None, "eth1", "kernel"),
    )
    # "inet 10.77.0.10/24 metric 100 brd …": networkd's metric does not confuse the parser.
    assert facts.addresses_of("eth0") == (IPv4Interface("10.77.0.10/24"),)


def test_down_and_no_carrier_links_and_secondary_addresses() -> None:
    facts = parse_facts(build(
        os_release=os_release("debian", "12"),
        links=(
            "2: eth0: <NO-CARRIER,BROADCAST,MULTICAST,UP> mtu 1500 qdisc fq_codel state DOWN mode "
            "DEFAULT group default qlen 1000\\    link/ether 52:54:00:00:00:01 brd ff:ff:ff:ff:ff:ff\n"
            "3: eth1: <BROADCAST,MULTICAST> mtu 1500 qdisc noop state DOWN mode DEFAULT group default "
            "qlen 1000\\    link/ether 52:54:00:00:00:02 brd ff:ff:ff:ff:ff:ff\\    altname enp2s0\n"
        ),
        addresses=(
            "2: eth0    inet 192.168.10.2/24 brd 192.168.10.255 scope global eth0\\       "
            "valid_lft forever preferred_lft forever\n"
            "2: eth0    inet 192.168.10.99/24 brd 192.168.10.255 scope global secondary eth0:1\\       "
            "valid_lft forever preferred_lft forever\n"
        ),
    ))
    assert facts.interfaces["eth0"].up is True  # administratively up, cable out
    assert facts.interfaces["eth1"].up is False
    assert facts.interfaces["eth1"].mac == "52:54:00:00:00:02"
    assert facts.addresses_of("eth0") == (IPv4Interface("192.168.10.2/24"),
                                          IPv4Interface("192.168.10.99/24"))
    assert facts.addresses_of("eth1") == ()


def test_route_lines_that_are_not_routes_are_skipped() -> None:
    routes = parse_routes(
        "default via 192.168.10.1 dev eth0 onlink \n"
        "nexthop garbage\n"
        "\n"
        "blackhole 10.9.0.0/16 proto static \n"
    )
    assert routes[0] == Route("default", IPv4Address("192.168.10.1"), "eth0", None)
    assert [r.destination for r in routes] == ["default", "blackhole"]


# --------------------------------------------------------------------------- iptables


def test_iptables_version_and_backend() -> None:
    assert parse_iptables_version("iptables v1.8.9 (nf_tables)\n") == ("nf_tables", "1.8.9")
    assert parse_iptables_version("iptables v1.8.9 (legacy)\n") == ("legacy", "1.8.9")
    assert parse_iptables_version("iptables v1.4.21\n") == ("legacy", "1.4.21")
    assert parse_iptables_version("") == (None, None)
    assert recorded("debian12-master").facts().iptables_backend == "nf_tables"
    assert recorded("centos7-worker").facts().iptables_backend == "legacy"
    assert recorded("rocky9-master").facts().iptables_backend is None  # iptables not installed


def test_fresh_hosts_without_rules_have_no_tables() -> None:
    assert recorded("debian12-master").facts().iptables == {}
    assert recorded("rocky9-master").facts().iptables == {}


def test_iptables_save_is_split_per_table_without_comments_and_counters() -> None:
    tables = parse_iptables_save((FIXTURES / "iptables/rocky9-master-converged.save").read_text())
    assert sorted(tables) == ["filter", "nat"]
    assert tables["nat"] == (
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        ":POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -s 192.168.10.0/24 -o eth0 -j MASQUERADE\n"
        "COMMIT\n"
    )
    assert "Generated" not in tables["filter"] and "5230" not in tables["filter"]
    assert tables["filter"].startswith("*filter\n:INPUT DROP [0:0]\n")


def test_legacy_state_match_reads_as_conntrack() -> None:
    filter_table = recorded("centos7-worker").facts().iptables["filter"]
    assert "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT" in filter_table
    assert "-m state" not in filter_table


BASE_RULE = "-A INPUT -i eth0 -p tcp -m tcp --dport 22 -j ACCEPT"


@pytest.mark.parametrize(("one", "other"), [
    # counters and comments
    ("*filter\n:INPUT DROP [0:0]\nCOMMIT\n",
     "# Generated by iptables-save v1.4.21 on Mon Mar  4 10:15:02 2024\n*filter\n"
     ":INPUT DROP [4511:330102]\nCOMMIT\n# Completed on Mon Mar  4 10:15:02 2024\n"),
    # -m state (legacy, the guide) vs -m conntrack (what homeclust writes)
    ("-A INPUT -m state --state RELATED,ESTABLISHED -j ACCEPT",
     "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
    # implicit -m tcp / -m udp
    ("-A INPUT -i eth0 -p tcp --dport 22 -j ACCEPT", BASE_RULE),
    ("-A INPUT -p udp --dport 53 -j ACCEPT", "-A INPUT -p udp -m udp --dport 53 -j ACCEPT"),
    # the default log level, spelled three ways or left out
    ('-A INPUT -j LOG --log-prefix "x: " --log-level 4', '-A INPUT -j LOG --log-prefix "x: "'),
    ('-A INPUT -j LOG --log-prefix "x: " --log-level warning', '-A INPUT -j LOG --log-prefix "x: "'),
    # blank lines and trailing spaces
    (BASE_RULE + "   \n\n", BASE_RULE),
])
def test_spellings_of_the_same_rules_normalize_equal(one: str, other: str) -> None:
    assert normalize_iptables(one) == normalize_iptables(other)


@pytest.mark.parametrize("different", [
    "-A INPUT -i eth0 -p tcp -m tcp --dport 2222 -j ACCEPT",
    "-A INPUT -i eth1 -p tcp -m tcp --dport 22 -j ACCEPT",
    "-A INPUT -s 10.0.0.0/8 -i eth0 -p tcp -m tcp --dport 22 -j ACCEPT",
    "-A INPUT -i eth0 -p udp -m udp --dport 22 -j ACCEPT",
    "-A INPUT -i eth0 -p tcp -m tcp --dport 22 -j DROP",
    "-A FORWARD -i eth0 -p tcp -m tcp --dport 22 -j ACCEPT",
])
def test_a_genuinely_different_rule_does_not_normalize_equal(different: str) -> None:
    assert normalize_iptables(different) != normalize_iptables(BASE_RULE)


def test_other_log_levels_and_policies_stay_different() -> None:
    assert normalize_iptables('-A INPUT -j LOG --log-prefix "x: " --log-level 7') != \
        normalize_iptables('-A INPUT -j LOG --log-prefix "x: "')
    assert normalize_iptables(":INPUT DROP [1:2]") != normalize_iptables(":INPUT ACCEPT [1:2]")
    assert normalize_iptables("-A INPUT -m state --state NEW -j ACCEPT") != \
        normalize_iptables("-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")


# --------------------------------------------------------------------------- sysctls


def test_sysctls_rw_ro_and_absent() -> None:
    debian = recorded("debian12-master").facts().sysctls
    assert debian["net.ipv4.ip_forward"] == Sysctl("0", True)
    assert debian["net.netfilter.nf_conntrack_max"] == Sysctl("262144", False)
    ubuntu = recorded("ubuntu2204-master").facts().sysctls
    assert ubuntu["net.netfilter.nf_conntrack_max"] == Sysctl(None, False)
    assert ubuntu["net.netfilter.nf_conntrack_tcp_timeout_established"].value is None


def test_sysctl_values_with_several_fields_are_normalized() -> None:
    # /proc prints "32768<TAB>60999"; the script turns tabs into spaces.
    facts = parse_facts(build(os_release=os_release("debian", "12"),
                              sysctl="net.ipv4.ip_local_port_range\trw\t32768  60999 \n"
                                     "garbage\n"))
    assert facts.sysctls == {"net.ipv4.ip_local_port_range": Sysctl("32768 60999", True)}


# --------------------------------------------------------------------------- packages


def test_dpkg_only_installed_packages_count() -> None:
    packages = parse_packages(
        dpkg_lines({"iptables": "1.8.9-2", "hold-me": "1.0"}).replace("ii \thold-me", "hi \thold-me")
        + dpkg_lines({"iptables-persistent": "1.0.20"}, status="rc ")
        + dpkg_lines({"ufw": ""}, status="un ")
        + dpkg_lines({"netfilter-persistent": "1.0.20"}, status="iU ")
        + "ii \tlibc6:amd64\t2.36-9+deb12u4\n"
        + "malformed line\n"
    )
    assert packages == {"iptables": "1.8.9-2", "hold-me": "1.0", "libc6": "2.36-9+deb12u4"}


def test_packages_of_recordings() -> None:
    # Only the packages the steps ask about are recorded (the query names them).
    ubuntu = parse_packages(dpkg_lines({"netplan.io": "0.106.1-7ubuntu0.22.04.2"})
                            + dpkg_lines({"linux-image-5.15.0-91-generic": "5.15.0-91.101"}, "rc ")
                            + "dpkg-query: no packages found matching iptables-persistent\n")
    assert ubuntu == {"netplan.io": "0.106.1-7ubuntu0.22.04.2"}  # "rc": only config files left
    debian = recorded("debian12-master").facts().packages
    assert debian["iptables"] == "1.8.9-2" and "iptables-persistent" not in debian
    centos = recorded("centos7-worker").facts().packages
    assert centos["iptables-services"] == "1.4.21-35.el7"
    rocky = recorded("rocky9-master").facts().packages
    assert "iptables-nft" not in rocky
    assert parse_packages("package iptables-nft is not installed\n") == {}


def test_rpm_packages() -> None:
    assert parse_packages(rpm_lines({"iptables-services": "1.4.21-35.el7",
                                     "gpg-pubkey": "f4a80eb5-53a7ff4b"})) == {
        "iptables-services": "1.4.21-35.el7", "gpg-pubkey": "f4a80eb5-53a7ff4b"}


# --------------------------------------------------------------------------- services


def test_services_enabled_and_active() -> None:
    rocky = recorded("rocky9-master").facts()
    assert rocky.service_enabled("firewalld") and rocky.service_active("firewalld")
    assert not rocky.service_exists("iptables") and not rocky.service_active("iptables")
    centos = recorded("centos7-worker").facts()
    assert centos.service_enabled("iptables") and centos.service_active("iptables.service")
    debian = recorded("debian12-master").facts()
    assert not debian.service_exists("netfilter-persistent")
    assert recorded("ubuntu2204-master").facts().service_enabled("ufw")


def test_units_parse_every_name_masked_and_missing_units() -> None:
    units = parse_units(
        "Names=ssh.service sshd.service\nLoadState=loaded\nActiveState=active\n"
        "UnitFileState=enabled\n\n"
        "Names=firewalld.service\nLoadState=masked\nActiveState=inactive\nUnitFileState=\n\n"
        "Names=nginx.service\nLoadState=not-found\nActiveState=inactive\nUnitFileState=\n"
        "\nNames=munge.service\nLoadState=loaded\nActiveState=reloading\n"
        "UnitFileState=enabled-runtime\n")
    assert units["ssh.service"] == units["sshd.service"] == ServiceState("enabled", True)
    assert units["firewalld.service"] == ServiceState("masked", False)
    assert units["nginx.service"] == ServiceState("", False, loaded=False)
    assert units["munge.service"] == ServiceState("enabled-runtime", True)
    facts = parse_facts(build(os_release=os_release("debian", "12"), units=unit_lines({
        "sshd.service": ("enabled", True), "firewalld.service": ("masked", False),
        "nginx.service": None})))
    assert facts.service_enabled("sshd") and facts.service_active("sshd.service")
    assert not facts.service_enabled("firewalld") and facts.service_exists("firewalld")
    assert not facts.service_exists("nginx") and not facts.service_enabled("nginx")


# --------------------------------------------------------------------------- files


def test_files_carry_content_mode_and_owner() -> None:
    facts = recorded("rocky9-master").facts()
    keyfile = facts.files["/etc/NetworkManager/system-connections/eth0.nmconnection"]
    assert (keyfile.mode, keyfile.owner, keyfile.group) == (0o600, "root", "root")
    assert keyfile.text is not None and "interface-name=eth0\n" in keyfile.text
    assert facts.file_text("/etc/hostname") == "localhost.localdomain\n"
    assert facts.file_text("/etc/nonexistent") is None
    # A symlink (Ubuntu's resolv.conf) is reported as a link, never read through.
    ubuntu = recorded("ubuntu2204-master").facts()
    assert "/etc/resolv.conf" not in ubuntu.files
    assert ubuntu.links == {"/etc/resolv.conf": "../run/systemd/resolve/stub-resolv.conf"}


@pytest.mark.parametrize("empty_path", ["/etc/a-first", "/etc/z-last"])
def test_empty_files_are_empty_wherever_they_are_listed(empty_path: str) -> None:
    files = {"/etc/m-middle": "x = 1\n", empty_path: ""}
    facts = parse_facts(build(os_release=os_release("debian", "12"), files=files))
    assert facts.files[empty_path].content == b""
    assert facts.files[empty_path].text == ""
    assert facts.file_text("/etc/m-middle") == "x = 1\n"


def test_too_big_files_have_a_hash_but_no_content() -> None:
    big = FileRecord(b"x" * 10, mode=0o640, owner="root", group="adm", too_big=True)
    facts = parse_facts(build(os_release=os_release("debian", "12"),
                              files={"/var/log/big": big, "/etc/small": b"\x00\xffbinary"}))
    fact = facts.files["/var/log/big"]
    assert fact.content is None and fact.text is None
    assert fact.sha256 == big.sha256 and (fact.owner, fact.group, fact.mode) == ("root", "adm", 0o640)
    assert facts.files["/etc/small"].content == b"\x00\xffbinary"


def test_malformed_file_header_is_a_fact_error() -> None:
    text = build(os_release=os_release("debian", "12")).replace(
        "@@homeclust-fact@@ files\n", "@@homeclust-fact@@ files\nF\t/etc/hosts\t644\\troot\\troot\tabc\n")
    with pytest.raises(FactError, match="file fact"):
        parse_facts(text)


# --------------------------------------------------------------------------- ssh, end


def test_ssh_connection() -> None:
    assert recorded("debian12-worker").facts().ssh_peer == SshPeer(
        IPv4Address("192.168.10.1"), 40212, IPv4Address("192.168.10.2"), 22)
    facts = parse_facts(build(os_release=os_release("debian", "12"),
                              ssh_connection="2001:db8::5 50000 2001:db8::1 22\n"))
    # IPv6 sessions are parsed too: the firewall's lockout check covers them.
    assert facts.ssh_peer == SshPeer(IPv6Address("2001:db8::5"), 50000,
                                     IPv6Address("2001:db8::1"), 22)
    assert parse_facts(build(os_release=os_release("debian", "12"))).ssh_peer is None


def test_incomplete_output_is_a_fact_error() -> None:
    text = recorded("debian12-master").but(complete=False).build()
    with pytest.raises(FactError, match="incomplete"):
        parse_facts(text)
    full = recorded_text("rocky9-master")
    with pytest.raises(FactError, match="incomplete"):
        parse_facts(full[: full.index("@@homeclust-fact@@ packages")])
    with pytest.raises(FactError, match="incomplete"):
        parse_facts("")


def test_transactions_and_commands() -> None:
    facts = builder(os_release=os_release("debian", "12"), commands=["systemd-run", "iptables"],
                    transactions=["firewall-20240304110217-ab12cd\tarmed\t1709550167\t1709550150",
                                  "ssh-keys-20240304110217-ef34ab\trolledback\t\t1709550150",
                                  "garbage"]).facts()
    assert facts.transactions == (
        Transaction("firewall-20240304110217-ab12cd", "armed", 1709550167, 1709550150),
        Transaction("ssh-keys-20240304110217-ef34ab", "rolledback", None, 1709550150))
    assert facts.transactions[0].seconds_left == 17
    assert facts.has_command("systemd-run") and not facts.has_command("nmcli")


# --------------------------------------------------------------------------- the real script


def test_fact_query_rejects_names_that_need_quoting() -> None:
    for bad in ("relative/path", "/etc/$(reboot)", "/etc/a b", "/etc/x;y"):
        with pytest.raises(ValueError):
            FactQuery(paths=frozenset({bad}))
    with pytest.raises(ValueError):
        FactQuery(packages=frozenset({"nginx; reboot"}))
    with pytest.raises(ValueError):
        FactQuery(units=frozenset({"nginx"}))  # a full unit name is needed
    with pytest.raises(ValueError):
        FactQuery(sysctls=frozenset({"net.ipv4.ip_forward=1"}))
    with pytest.raises(ValueError):
        Fact("Bad Name", "true", str)


def test_queries_combine_and_conflicting_facts_are_refused() -> None:
    users = Fact("users", "getent passwd", str.splitlines)
    a = FactQuery(paths=frozenset({"/etc/a"}), units=frozenset({"a.service"}), extra=(users,))
    b = FactQuery(packages=frozenset({"b"}), netfilter=True, extra=(users,))
    both = a | b
    assert both.paths == {"/etc/a"} and both.units == {"a.service"} and both.packages == {"b"}
    assert both.netfilter and both.extra == (users,)
    with pytest.raises(ValueError, match="two different facts"):
        _ = a | FactQuery(extra=(Fact("users", "cat /etc/passwd", str.splitlines),))


def test_the_script_asks_only_for_what_the_query_names() -> None:
    """Facts cost what homeclust manages: nothing lists every unit or package."""
    small = gather_script(FactQuery())
    for costly in ("list-unit-files", "list-units", "rpm -q", "dpkg-query -W", "systemctl show",
                   "sec iptables-save", "sec files", "sec sysctl"):
        assert costly not in small, costly
    script = gather_script(FactQuery(packages=frozenset({"nginx", "munge"}),
                                     units=frozenset({"nginx.service"}), netfilter=True))
    assert "dpkg-query -W -f='${db:Status-Abbrev}\\t${Package}\\t${Version}\\n' -- munge nginx" \
        in script
    assert "rpm -q --qf" in script and "rpm -qa" not in script
    assert "systemctl show --no-pager -p Names -p LoadState -p UnitFileState -p ActiveState " \
        "-- nginx.service" in script
    assert "iptables-save" in script


@pytest.mark.skipif(not all(shutil.which(c) for c in ("stat", "sha256sum", "base64", "tr")),
                    reason="needs coreutils")
def test_gather_script_runs_and_its_sections_parse(tmp_path: Path) -> None:
    """Run the real (read-only) facts script here, on files made for the test.

    Only the sections made for the test are checked: this machine's interfaces
    and packages are whatever they are.
    """
    config = tmp_path / "conf"
    config.mkdir()
    (config / "a.conf").write_text("alpha = 1\n")
    (config / "b.conf").write_bytes(b"")
    (config / "c.conf").write_bytes(b"\x00\x01binary\n")
    os.chmod(config / "a.conf", 0o600)
    (config / "wifi.key").write_text("psk=hunter2\n")
    big = tmp_path / "big.bin"
    big.write_bytes(b"z" * (256 * 1024 + 1))
    words = Fact("words", f"cat {config}/a.conf; echo second line", str.split)
    query = FactQuery(
        paths=frozenset({f"{config}/*.conf", str(big), "/nonexistent/homeclust-*.conf"}),
        secret_paths=frozenset({f"{config}/*.key"}),
        packages=frozenset({"homeclust-no-such-package"}),
        sysctls=frozenset({"kernel.pid_max", "kernel.homeclust_no_such_key"}),
        extra=(words,),
    )
    result = subprocess.run(["/bin/sh", "-s", "10.77.0.50 51234 10.77.0.10 22"],
                            input=gather_script(query), capture_output=True, text=True,
                            timeout=60, check=True)
    facts = parse_facts(result.stdout, query)
    assert facts.file_text(f"{config}/a.conf") == "alpha = 1\n"
    assert facts.files[f"{config}/a.conf"].mode == 0o600
    assert facts.files[f"{config}/b.conf"].content == b""
    assert facts.files[f"{config}/c.conf"].content == b"\x00\x01binary\n"
    assert facts.files[str(big)].content is None
    assert len(facts.files[str(big)].sha256) == 64
    assert facts.files[f"{config}/a.conf"].sha256 == hashlib.sha256(b"alpha = 1\n").hexdigest()
    assert not any(p.startswith("/nonexistent") for p in facts.files)
    assert facts.ssh_peer == SshPeer(IPv4Address("10.77.0.50"), 51234, IPv4Address("10.77.0.10"), 22)
    assert "sha256sum" in facts.commands
    assert facts.packages == {}
    assert facts.get(words) == ["alpha", "=", "1", "second", "line"]
    # Whole values (a /proc/sys file read a byte at a time gives only its first digit).
    pid_max = Path("/proc/sys/kernel/pid_max").read_text().strip()
    assert facts.sysctls["kernel.pid_max"].value == pid_max and len(pid_max) > 1
    assert facts.sysctls["kernel.homeclust_no_such_key"] == Sysctl(None, False)
    assert facts.hostname == Path("/proc/sys/kernel/hostname").read_text().strip()
    # A secret file is read for planning, but its content never reaches the log.
    secret = facts.files[f"{config}/wifi.key"]
    assert secret.secret and secret.text == "psk=hunter2\n"
    assert not facts.files[f"{config}/a.conf"].secret
    logged = redact_facts_output(result.stdout)
    assert "aHVudGVyMg" not in logged and "psk=hunter2" not in logged and REDACTED in logged
    assert parse_facts(logged.replace(REDACTED, "-"), query).files[f"{config}/a.conf"].text \
        == "alpha = 1\n"


def test_a_fact_that_was_not_asked_for_is_an_error() -> None:
    facts = parse_facts(build(os_release=os_release("debian", "12")))
    with pytest.raises(FactError, match="not gathered"):
        facts.get(Fact("users", "getent passwd", str.splitlines))


@pytest.mark.parametrize(("output", "expected"), [
    ("none\n", "none"),  # bare metal: systemd-detect-virt prints "none" and exits 1
    ("none\nnone\n", "none"),  # … which an "|| echo none" fallback used to double
    ("kvm\n", "kvm"),
    ("systemd-nspawn\n", "systemd-nspawn"),
    ("", "none"),  # no systemd-detect-virt at all
])
def test_virtualization(output: str, expected: str) -> None:
    assert parse_facts(build(os_release=os_release("debian", "12"), virt=output)).virtualization \
        == expected


def test_recorded_virtualization() -> None:
    assert recorded("debian12-master").facts().virtualization == "systemd-nspawn"
    assert recorded("rocky9-master").facts().virtualization == "none"


def test_every_command_homeclust_asks_about_is_gathered() -> None:
    """``facts.has_command(X)`` is only meaningful if the script looks for X."""
    package = Path(__file__).resolve().parents[2] / "homeclust"
    asked = {
        name
        for source in package.rglob("*.py")
        for name in re.findall(r"has_command\(\s*[\"']([^\"']+)[\"']", source.read_text())
    }
    assert asked, "expected at least one has_command() call"
    assert asked <= set(COMMANDS), f"not gathered: {sorted(asked - set(COMMANDS))}"


# --------------------------------------------------------------------------- install commands


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="needs bash (function names with '-')")
def test_apt_install_retries_once_after_updating_the_lists(tmp_path: Path) -> None:
    platform = platform_of(recorded("debian12-master").facts())
    command = platform.install_command(["iptables-persistent", "iptables", "iptables"])
    assert "iptables iptables-persistent" in command  # sorted, no duplicates
    log = tmp_path / "apt.log"
    fake = (
        f"dpkg() {{ echo \"${{DEBIAN_FRONTEND:-unset}} dpkg $*\" >> {log}; }}\n"
        f"apt-get() {{ echo \"${{DEBIAN_FRONTEND:-unset}} $*\" >> {log};"
        f" [ \"$1\" = update ] && touch {tmp_path}/updated && return 0;"
        f" [ -e {tmp_path}/updated ]; }}\n"
    )
    # A clean environment: what the caller's shell exports must not change the outcome.
    subprocess.run(["/bin/bash", "-c", fake + command], check=True, timeout=10,
                   env={"PATH": "/usr/bin:/bin"})
    calls = log.read_text().splitlines()
    # An interrupted earlier install is finished first, then install, update, install.
    assert calls[0] == "noninteractive dpkg --configure -a --force-confdef --force-confold"
    calls = calls[1:]
    assert [c.split()[1] for c in calls] == ["install", "update", "install"]
    assert calls[0].startswith("noninteractive ") and calls[2].startswith("noninteractive ")
    assert "--force-confold" in calls[0] and "--no-install-recommends" in calls[0]


def test_rpm_install_commands() -> None:
    assert platform_of(recorded("centos7-worker").facts()).install_command(["b", "a"]) == (
        "yum install -y -q a b")
    assert platform_of(recorded("rocky9-master").facts()).install_command(["iptables-services"]) \
        == "dnf install -y -q iptables-services"


@pytest.mark.parametrize(("name", "packages", "rules", "service", "conflicts"), [
    ("debian12-master", ("iptables", "iptables-persistent"), "/etc/iptables/rules.v4",
     "netfilter-persistent", ("ufw", "firewalld")),
    ("ubuntu2204-master", ("iptables", "iptables-persistent"), "/etc/iptables/rules.v4",
     "netfilter-persistent", ("ufw", "firewalld")),
    ("centos7-worker", ("iptables", "iptables-services"), "/etc/sysconfig/iptables", "iptables",
     ("firewalld",)),
    ("rocky9-master", ("iptables-nft", "iptables-services"), "/etc/sysconfig/iptables", "iptables",
     ("firewalld",)),
])
def test_firewall_persistence_per_platform(name: str, packages: tuple[str, ...], rules: str,
                                           service: str, conflicts: tuple[str, ...]) -> None:
    platform = platform_of(recorded(name).facts())
    assert platform.firewall_packages == packages
    assert platform.firewall_rules_path == rules
    assert platform.firewall_service == service
    assert platform.conflicting_firewall_services == conflicts
    assert (platform.firewall_preseed is not None) == (platform.family == "debian")


def test_small_files_travel_in_one_blob_and_a_file_changed_meanwhile_is_an_error() -> None:
    """The script sends every small file's content in one base64 line (one process for
    all of them); the stat sizes split it.  Sizes that do not add up mean a file changed
    between stat and cat: an error, never a mix of two versions."""
    import base64 as b64

    files = ("F\t/etc/a\t644\troot\troot\t\n+3\n"
             "F\t/etc/b\t600\troot\troot\t\n+0\n"
             "F\t/etc/c\t644\troot\troot\t\n+4\n"
             f"B\t{b64.b64encode(b'abcdefg').decode()}\n")
    facts = parse_facts(build(os_release=os_release("debian", "12")).replace(
        "@@homeclust-fact@@ files\n", "@@homeclust-fact@@ files\n" + files))
    assert facts.files["/etc/a"].content == b"abc" and facts.files["/etc/b"].content == b""
    assert facts.files["/etc/c"].content == b"defg"
    assert facts.files["/etc/c"].sha256 == hashlib.sha256(b"defg").hexdigest()
    assert facts.files["/etc/b"].mode == 0o600
    changed = files.replace("+4", "+5")
    with pytest.raises(FactError, match="changed while the facts were read"):
        parse_facts(build(os_release=os_release("debian", "12")).replace(
            "@@homeclust-fact@@ files\n", "@@homeclust-fact@@ files\n" + changed))
