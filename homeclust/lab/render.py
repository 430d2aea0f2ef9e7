"""Pure renderers for every file the lab writes, and parsers for what it reads back.

No I/O here: each function takes values and returns text (or data), so all of
it is unit-tested (tests/unit/test_lab_units.py).  Values from the inventory
are quoted for their file, or refused where the file has no quoting (dnsmasq's
configuration, ``/etc/network/interfaces``).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from homeclust.errors import LabError
from homeclust.lab.plan import APT_RELAY_PORT, LabNode, LabPlan
from homeclust.quoting import (
    DNS_NAME_RE,
    dhclient_string,
    dnsmasq_client_id,
    require,
    require_hostname,
    require_interface,
)

# --------------------------------------------------------------------------
# Institute network services (inside the internet namespace)
# --------------------------------------------------------------------------


def render_dnsmasq_conf(plan: LabPlan, lease_file: Path, log_file: Path) -> str:
    """dnsmasq for the institute network: DHCP and DNS that answers for the lab only --
    no upstream, nothing leaves the lab.

    DHCP as ``plan.dhcp_mode`` says: "reserved" (an institute's server: the
    master's address reserved for its client id) or "router" (a home router:
    no reservation, leases keyed by client identity -- dnsmasq's default: the
    client id when one is sent, else the MAC -- and a pool of one address).
    """
    net = plan.institute_network
    # dnsmasq's configuration has no quoting: a ',' or a line break in a name would
    # add fields or options of its own.
    names = [require(name, DNS_NAME_RE, "the DNS name") for name in plan.master_public_names]
    lines = [
        "# homeclust lab: the institute network's DHCP and DNS server.",
        "# Runs inside the lab's internet namespace; generated, do not edit.",
        "interface=eth0",
        "bind-interfaces",
        # DNS for the lab only: no resolv.conf, no upstream servers, no /etc/hosts
        # of this machine; unknown names get an answer from here, not the world.
        "no-resolv",
        "no-poll",
        "no-hosts",
        "domain-needed",
        "bogus-priv",
        # The package source: apt's requests for the archive go to the internet
        # host, which relays them (see services.py), so the Host header stays right.
        # security.debian.org too: trixie nodes name it, as their installer does
        # (the relay fetches its /debian-security/ paths from deb.debian.org).
        f"address=/deb.debian.org/security.debian.org/{plan.internet_address}",
        f"host-record=internet,{plan.internet_address}",
        f"host-record=admin,{plan.admin_address}",
        f"host-record={','.join(names)},{plan.master_public_address}",
        "dhcp-authoritative",
        # Every address in the pool is the lab's to hand out; skip dnsmasq's
        # ping-before-offer delay.
        "no-ping",
        f"dhcp-range={plan.dhcp_range[0]},{plan.dhcp_range[1]},{net.netmask},12h",
        f"dhcp-option=option:router,{plan.internet_address}",
        f"dhcp-option=option:dns-server,{plan.internet_address}",
        f"dhcp-leasefile={lease_file}",
        "log-dhcp",
        "log-queries",
        f"log-facility={log_file}",
        # Track the process by the PID we started (run with --keep-in-foreground).
        "pid-file=",
        "user=root",
    ]
    if not plan.master_public_static and plan.dhcp_mode == "reserved":
        # The guide's BOOTPROTO=dhcp + DHCP_CLIENT_ID: the institute reserves the
        # master's public address for its client id, so it never changes.
        # The id in hex: exactly the bytes dhclient sends for the string id.
        lines.append(
            f"dhcp-host=id:{dnsmasq_client_id(plan.master_dhcp_client_id)},"
            f"{plan.master_public_address},{require_hostname(plan.master.name)}"
        )
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class DhcpLease:
    expires: int
    mac: str
    address: IPv4Address
    hostname: str
    client_id: str | None  # decoded to text when printable, else the hex form


def parse_dnsmasq_leases(text: str) -> list[DhcpLease]:
    """Parse dnsmasq's lease file (``expiry mac ip hostname client-id`` per line)."""
    leases: list[DhcpLease] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[0] == "duid":
            continue
        client_id = fields[4] if len(fields) > 4 and fields[4] != "*" else None
        leases.append(
            DhcpLease(
                expires=int(fields[0]),
                mac=fields[1],
                address=IPv4Address(fields[2]),
                hostname=fields[3],
                client_id=decode_client_id(client_id) if client_id else None,
            )
        )
    return leases


def decode_client_id(hex_colon: str) -> str:
    """dnsmasq writes client ids as ``63:6c:...``; give back the text a client sent."""
    try:
        raw = bytes(int(part, 16) for part in hex_colon.split(":"))
    except ValueError:
        return hex_colon
    if raw and all(0x21 <= b <= 0x7E for b in raw):
        return raw.decode("ascii")
    return hex_colon


# --------------------------------------------------------------------------
# A node's initial configuration (what an installer would have left)
# --------------------------------------------------------------------------

_INTERFACES_HEADER = """\
# This file describes the network interfaces available on your system
# and how to activate them. For more information, see interfaces(5).

source /etc/network/interfaces.d/*

# The loopback network interface
auto lo
iface lo inet loopback
"""


def render_interfaces(plan: LabPlan, node: LabNode) -> str:
    """``/etc/network/interfaces`` as a Debian installer would have written it.

    ``auto`` rather than the installer's ``allow-hotplug``: containers have no
    udev to raise hot-plug interfaces, so only ``auto`` ones come up at boot.
    """
    parts = [_INTERFACES_HEADER]
    require_interface(node.private_interface)
    if node.role == "master":
        public = require_interface(plan.master_public_interface)
        if plan.master_public_static:
            prefix = plan.institute_network.prefixlen
            parts.append(
                f"\n# The institute network\nauto {public}\niface {public} inet static\n"
                f"    address {plan.master_public_address}/{prefix}\n"
                f"    gateway {plan.internet_address}\n"
            )
        else:
            how = (" (address reserved by DHCP client id)" if plan.dhcp_mode == "reserved"
                   else "")
            parts.append(
                f"\n# The institute network{how}\n"
                f"auto {public}\niface {public} inet dhcp\n"
            )
        parts.append(
            f"\n# The cluster's private network\nauto {node.private_interface}\n"
            f"iface {node.private_interface} inet static\n"
            f"    address {node.private_address.with_prefixlen}\n"
        )
    else:
        parts.append(
            f"\n# The cluster's private network; the master is the gateway\n"
            f"auto {node.private_interface}\niface {node.private_interface} inet static\n"
            f"    address {node.private_address.with_prefixlen}\n"
            f"    gateway {node.gateway}\n"
        )
    return "".join(parts)


def render_dhclient_conf(base: str, interface: str, client_id: str) -> str:
    """Debian's dhclient.conf plus the client id the institute's reservation is keyed on."""
    text = base if base.endswith("\n") or not base else base + "\n"
    return (
        f"{text}\n"
        "# The institute's DHCP server reserves the master's public address for\n"
        "# this client id (the guide's DHCP_CLIENT_ID).\n"
        f"interface {dhclient_string(interface)} {{\n"
        f"    send dhcp-client-identifier {dhclient_string(client_id)};\n"
        "}\n"
    )


#: The DHCP clients ifupdown's ``inet dhcp`` runs, in the order it looks for them
#: (ifupdown 0.8.44): the first one installed is the one a node uses.
IFUPDOWN_DHCP_CLIENTS = ("dhclient", "udhcpc", "dhcpcd")


def ifupdown_dhcp_client(installed: Iterable[str]) -> str | None:
    """The DHCP client ifupdown runs on a node with the programs ``installed``."""
    present = set(installed)
    return next((client for client in IFUPDOWN_DHCP_CLIENTS if client in present), None)


#: dhcpcd keeps at most this many client id bytes (CLIENTID_MAX_LEN in if-options.h).
DHCPCD_CLIENT_ID_MAX = 48


def dhcpcd_client_id(client_id: str) -> str:
    """``client_id``'s bytes as dhcpcd.conf's ``clientid`` takes them unchanged.

    dhcpcd reads a ``clientid`` of the form ``01:02:03`` as hex and sends those
    bytes as they are; any other string gets a type byte 0 in front
    (if-options.c, parse_str with PARSE_HWADDR).  dhclient sends the guide's
    string id as its bytes with nothing in front, and the reservation is keyed
    on those: so the string goes in hex.  dhcpcd needs two bytes at least for
    the hex form and keeps 48 at most; an id outside that cannot be sent as-is.
    """
    raw = client_id.encode()
    if not 2 <= len(raw) <= DHCPCD_CLIENT_ID_MAX:
        raise LabError(
            f"dhcpcd cannot send the client id {client_id!r} as it is "
            f"({len(raw)} bytes; it takes 2 to {DHCPCD_CLIENT_ID_MAX})",
            hint="choose another [master] dhcp_client_id, or a bookworm master (dhclient)",
        )
    return ":".join(f"{byte:02x}" for byte in raw)


def render_dhcpcd_conf(base: str, interface: str, client_id: str) -> str:
    """The package's dhcpcd.conf plus an ``interface`` block sending the reserved client id.

    The block goes last: dhcpcd applies every option after ``interface NAME``
    to that interface alone, and an explicit ``clientid`` takes the place of
    the DUID-based id the package's global ``duid`` asks for.
    """
    text = base if base.endswith("\n") or not base else base + "\n"
    return (
        f"{text}\n"
        "# The institute's DHCP server reserves the master's public address for\n"
        "# this client id (the guide's DHCP_CLIENT_ID): its bytes in hex, which\n"
        "# dhcpcd sends as they are (as text it would put a type byte first).\n"
        f"interface {require_interface(interface)}\n"
        f"clientid {dhcpcd_client_id(client_id)}\n"
    )


def render_hosts(hostname: str) -> str:
    return (
        "127.0.0.1\tlocalhost\n"
        f"127.0.1.1\t{require_hostname(hostname)}\n"
        "\n"
        "# The following lines are desirable for IPv6 capable hosts\n"
        "::1     localhost ip6-localhost ip6-loopback\n"
        "ff02::1 ip6-allnodes\n"
        "ff02::2 ip6-allrouters\n"
    )


def render_resolv_conf(nameserver: IPv4Address) -> str:
    return f"nameserver {nameserver}\n"


# --------------------------------------------------------------------------
# The lab inventory
# --------------------------------------------------------------------------


def render_lab_inventory(
    raw: Mapping[str, Any],
    plan: LabPlan,
    key_path: Path,
    known_hosts_path: Path,
) -> dict[str, Any]:
    """The user's inventory with what differs in the lab replaced.

    Same cluster, nodes, interfaces and private addresses; the master is
    reached through the lab's loopback forward, as root with the lab's key.
    """
    data = copy.deepcopy(dict(raw))
    cluster = dict(data.get("cluster") or {})
    cluster["dns"] = [str(plan.internet_address)]
    data["cluster"] = cluster

    ssh = dict(data.get("ssh") or {})
    ssh["user"] = "root"
    ssh["key"] = str(key_path)
    ssh["known_hosts"] = str(known_hosts_path)
    # Lab nodes run sshd on the standard port; the master's port is the forward's.
    ssh.pop("port", None)
    data["ssh"] = ssh

    master = dict(data.get("master") or {})
    master["address"] = "127.0.0.1"
    master["port"] = plan.ssh_port
    data["master"] = master

    check = dict(data.get("check") or {})
    check["egress_url"] = plan.whoami_url
    check["expect_master_address"] = True
    data["check"] = check
    return data


# --------------------------------------------------------------------------
# known_hosts upkeep
# --------------------------------------------------------------------------


def known_hosts_patterns(host: str, port: int = 22) -> str:
    """How OpenSSH and paramiko name a host in known_hosts."""
    return host if port == 22 else f"[{host}]:{port}"


def forget_known_hosts(text: str, hosts: Iterable[str]) -> str:
    """``text`` without the lines for any of ``hosts`` (plain or hashed entries)."""
    wanted = set(hosts)
    kept: list[str] = []
    for line in text.splitlines(keepends=True):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            kept.append(line)
            continue
        names = fields[0]
        if names.startswith("@") and len(fields) > 1:  # @cert-authority / @revoked
            names = fields[1]
        if not any(_known_hosts_match(pattern, wanted) for pattern in names.split(",")):
            kept.append(line)
    return "".join(kept)


def _known_hosts_match(pattern: str, wanted: set[str]) -> bool:
    if not pattern.startswith("|1|"):
        return pattern in wanted
    try:
        _, _, salt_b64, digest_b64 = pattern.split("|", 3)
        salt = base64.b64decode(salt_b64)
        digest = base64.b64decode(digest_b64)
    except ValueError:
        return False
    return any(
        hmac.compare_digest(hmac.new(salt, host.encode(), hashlib.sha1).digest(), digest)
        for host in wanted
    )


# --------------------------------------------------------------------------
# Apt configuration baked into the rootfs
# --------------------------------------------------------------------------


def render_sources_list(suite: str) -> str:
    """The suites a fresh Debian server uses, from the archive the lab relays."""
    port = "" if APT_RELAY_PORT == 80 else f":{APT_RELAY_PORT}"
    return (
        f"deb http://deb.debian.org{port}/debian {suite} main\n"
        f"deb http://deb.debian.org{port}/debian {suite}-updates main\n"
        f"deb http://deb.debian.org{port}/debian-security {suite}-security main\n"
    )


#: The keyring deb822 sources name: what apt 3.0's ``modernize-sources`` writes for
#: Debian's archive (in trixie a link to debian-archive-keyring.pgp).
DEBIAN_ARCHIVE_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def render_debian_sources(suite: str) -> str:
    """``/etc/apt/sources.list.d/debian.sources`` (deb822): the same three suites.

    Trixie's installer (apt-setup 1:0.198) still writes a one-line
    ``sources.list`` from deb.debian.org and security.debian.org; apt 3.0 then
    asks on every update to run ``apt modernize-sources``, which turns it into
    this file with ``Signed-By`` (and keeps the original as ``sources.list.bak``).
    Debian's cloud and container images ship deb822 sources from the start.
    This is that modernized form, with the installer's mirrors: main only and
    no ``deb-src`` lines, like the bookworm nodes' ``sources.list``.
    """
    port = "" if APT_RELAY_PORT == 80 else f":{APT_RELAY_PORT}"
    return (
        f"Types: deb\nURIs: http://deb.debian.org{port}/debian/\n"
        f"Suites: {suite} {suite}-updates\nComponents: main\n"
        f"Signed-By: {DEBIAN_ARCHIVE_KEYRING}\n"
        "\n"
        f"Types: deb\nURIs: http://security.debian.org{port}/debian-security/\n"
        f"Suites: {suite}-security\nComponents: main\n"
        f"Signed-By: {DEBIAN_ARCHIVE_KEYRING}\n"
    )


APT_LAB_CONF = """\
// homeclust lab: the archive reaches the lab through this machine's package
// source, which may serve a snapshot whose Release files are past Valid-Until.
Acquire::Check-Valid-Until "false";
Acquire::Check-Date "false";
"""
