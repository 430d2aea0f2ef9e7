"""Interface configuration files for every supported network backend (pure).

One description of what each interface should be (:class:`InterfaceSpec`,
derived from the inventory) is rendered into the backend's own files:

* ``ifupdown`` (Debian): ``/etc/network/interfaces`` (+ ``dhclient.conf`` for
  the DHCP client id, ``/etc/resolv.conf`` for static DNS)
* ``netplan`` (Ubuntu): ``/etc/netplan/60-homeclust.yaml``
* ``ifcfg`` (CentOS 7, network service) and ``nm-ifcfg`` (RHEL 8):
  ``/etc/sysconfig/network-scripts/ifcfg-IFACE``
* ``nm-keyfile`` (RHEL 9): ``/etc/NetworkManager/system-connections/homeclust-IFACE.nmconnection``

plus ``/etc/hosts`` (a managed block) and ``/etc/hostname`` for all.
Existing files that configure the same interfaces are taken over: they are
listed as files to remove, so two configurations never fight.

Every value is quoted for the file it goes to (:mod:`homeclust.quoting`);
interface and host names, which have no quoting in ``/etc/network/interfaces``,
``/etc/hosts`` or file names, are refused unless plain.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from typing import Literal

from homeclust.errors import StepError
from homeclust.inventory import Inventory, Node
from homeclust.platforms import NetworkBackend
from homeclust.quoting import (
    dhclient_string,
    ifcfg_value,
    keyfile_value,
    require_hostname,
    require_interface,
    yaml_string,
)

MANAGED = "# Managed by homeclust (network step): edit the inventory, not this file."


@dataclass(frozen=True)
class InterfaceSpec:
    name: str
    role: Literal["public", "private"]
    method: Literal["dhcp", "static"]
    address: IPv4Interface | None = None
    gateway: IPv4Address | None = None
    dns: tuple[IPv4Address, ...] = ()
    client_id: str | None = None

    def __post_init__(self) -> None:
        # The name is a word in /etc/network/interfaces and iptables rules and part of
        # file names: no quoting exists there, so only plain names get this far.
        require_interface(self.name)

    @property
    def static_address(self) -> IPv4Interface:
        """The address of a static interface (a planner bug if there is none)."""
        if self.address is None:
            raise StepError(f"{self.name}: a static interface without an address (bug)")
        return self.address

    @property
    def comment(self) -> str:
        """One line of text about the interface, for comments in the files."""
        if self.role == "public":
            # ascii(): a client id is shown, never able to end the comment line.
            shown = self.client_id if _plain(self.client_id) else ascii(self.client_id)
            how = f"DHCP, client id {shown}" if self.method == "dhcp" else "static"
            return f"public side: institute network ({how})"
        return "private cluster network"


def _plain(text: str | None) -> bool:
    return text is not None and re.fullmatch(r"[A-Za-z0-9._:-]+", text) is not None


@dataclass(frozen=True)
class FileSpec:
    content: str | None  # None: remove the file
    mode: int = 0o644


def interface_specs(inventory: Inventory, node: Node) -> list[InterfaceSpec]:
    """What each of the node's interfaces must look like."""
    network = inventory.cluster.private_network
    private = IPv4Interface(f"{node.private_address}/{network.prefixlen}")
    if node.is_master:
        m = inventory.master
        if m.public_boot == "dhcp":
            public = InterfaceSpec(m.public_interface, "public", "dhcp", client_id=m.dhcp_client_id)
        else:
            public = InterfaceSpec(m.public_interface, "public", "static", m.public_address,
                                   m.public_gateway, inventory.cluster.dns)
        return [public, InterfaceSpec(m.private_interface, "private", "static", private)]
    return [
        InterfaceSpec(node.private_interface, "private", "static", private,
                      inventory.master.private_address, inventory.cluster.dns)
    ]


# --------------------------------------------------------------------------- ifupdown

_STANZA_START = re.compile(
    r"^(auto|allow-\S+|iface|mapping|source|source-directory|no-auto-down|no-scripts|rename)\b"
)


def _ifupdown_stanzas(text: str) -> list[tuple[str, list[str], str]]:
    """Split /etc/network/interfaces into (keyword, words, text) stanzas (comments dropped)."""
    stanzas: list[tuple[str, list[str], list[str]]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if _STANZA_START.match(stripped) and not line[:1].isspace():
            words = stripped.split()
            stanzas.append((words[0], words[1:], [stripped]))
        elif stanzas:
            stanzas[-1][2].append("    " + stripped)
    return [(k, w, "\n".join(lines)) for k, w, lines in stanzas]


def ifupdown_managed_elsewhere(text: str, names: Sequence[str]) -> bool:
    """Whether a file (e.g. in interfaces.d) configures any of ``names``."""
    for keyword, words, _ in _ifupdown_stanzas(text):
        if keyword == "iface" and words and words[0] in names:
            return True
        if (keyword == "auto" or keyword.startswith("allow-")) and set(words) & set(names):
            return True
    return False


def render_ifupdown(specs: Sequence[InterfaceSpec], current: str | None) -> str:
    """/etc/network/interfaces: our interfaces, plus any other interface the file had."""
    managed = {s.name for s in specs}
    kept: list[str] = []
    has_source = False
    for keyword, words, text in _ifupdown_stanzas(current or ""):
        if keyword in ("source", "source-directory"):
            has_source = has_source or "interfaces.d" in " ".join(words)
            if "interfaces.d" in " ".join(words):
                continue
            kept.append(text)
        elif keyword == "iface" and words and (words[0] in managed or words[0] == "lo"):
            continue
        elif keyword == "auto" or keyword.startswith("allow-"):
            others = [w for w in words if w not in managed and w != "lo"]
            if others:
                kept.append(f"{keyword} {' '.join(others)}")
        else:
            kept.append(text)
    out = [MANAGED, "", "source /etc/network/interfaces.d/*", "", "auto lo",
           "iface lo inet loopback"]
    for spec in specs:
        # "auto", not "allow-hotplug": hotplug needs udev events that containers
        # and some minimal installs never deliver.
        out += ["", f"# {spec.comment}", f"auto {spec.name}"]
        if spec.method == "dhcp":
            out.append(f"iface {spec.name} inet dhcp")
            continue
        out.append(f"iface {spec.name} inet static")
        out.append(f"    address {spec.address}")
        if spec.gateway:
            out.append(f"    gateway {spec.gateway}")
        if spec.dns:
            out.append(f"    dns-nameservers {' '.join(map(str, spec.dns))}")
    if kept:
        out += ["", "# kept from the previous configuration (not managed by homeclust)", *kept]
    return "\n".join(out) + "\n"


def render_dhclient_conf(specs: Sequence[InterfaceSpec]) -> str | None:
    """Debian's default dhclient.conf plus the client id for DHCP interfaces."""
    dhcp = [s for s in specs if s.method == "dhcp" and s.client_id]
    if not dhcp:
        return None
    lines = [
        MANAGED,
        "option rfc3442-classless-static-routes code 121 = array of unsigned integer 8;",
        "send host-name = gethostname();",
        "request subnet-mask, broadcast-address, time-offset, routers,",
        "        domain-name, domain-name-servers, domain-search, host-name,",
        "        dhcp6.name-servers, dhcp6.domain-search, dhcp6.fqdn, dhcp6.sntp-servers,",
        "        netbios-name-servers, netbios-scope, interface-mtu,",
        "        rfc3442-classless-static-routes, ntp-servers;",
    ]
    for spec in dhcp:
        lines += ["", f"interface {dhclient_string(spec.name)} {{",
                  f"    send dhcp-client-identifier {dhclient_string(spec.client_id or '')};",
                  "}"]
    return "\n".join(lines) + "\n"


def render_resolv_conf(dns: Sequence[IPv4Address]) -> str:
    return MANAGED + "\n" + "".join(f"nameserver {server}\n" for server in dns)


# --------------------------------------------------------------------------- netplan


def render_netplan(specs: Sequence[InterfaceSpec]) -> str:
    lines = [MANAGED, "network:", "  version: 2", "  renderer: networkd", "  ethernets:"]
    for spec in specs:
        # Quoted: a plain YAML key such as "1e3" or "on" would not be a string.
        lines.append(f"    {yaml_string(spec.name)}:")
        if spec.method == "dhcp":
            lines += ["      dhcp4: true", "      dhcp-identifier: mac"]
            continue
        lines += ["      dhcp4: false", f"      addresses: [{spec.address}]"]
        if spec.gateway:
            lines += ["      routes:", "        - to: default", f"          via: {spec.gateway}"]
        if spec.dns:
            lines += ["      nameservers:", f"        addresses: [{', '.join(map(str, spec.dns))}]"]
    return "\n".join(lines) + "\n"


def netplan_defines(text: str, names: Sequence[str]) -> bool:
    """Whether a netplan file defines one of ``names`` (a key at ethernet level, maybe quoted)."""
    return any(re.search(rf"^\s+([\"']?){re.escape(name)}\1:\s*$", text, re.MULTILINE)
               for name in names)


# --------------------------------------------------------------------------- RHEL


def render_ifcfg(spec: InterfaceSpec, *, nm_controlled: bool) -> str:
    # CentOS 7 sources this file as shell: every value from the inventory is one quoted word.
    lines = [MANAGED, f"# {spec.comment}", "TYPE=Ethernet", f"DEVICE={ifcfg_value(spec.name)}",
             f"NAME={ifcfg_value(spec.name)}", "ONBOOT=yes",
             f"NM_CONTROLLED={'yes' if nm_controlled else 'no'}"]
    if spec.method == "dhcp":
        lines += ["BOOTPROTO=dhcp", "DEFROUTE=yes", "PEERDNS=yes"]
        if spec.client_id:
            lines.append(f"DHCP_CLIENT_ID={ifcfg_value(spec.client_id)}")
    else:
        lines += ["BOOTPROTO=none", f"IPADDR={spec.static_address.ip}",
                  f"PREFIX={spec.static_address.network.prefixlen}"]
        if spec.gateway:
            lines += [f"GATEWAY={spec.gateway}", "DEFROUTE=yes"]
        else:
            lines.append("DEFROUTE=no")
        if spec.dns:
            lines += [f"DNS{i}={server}" for i, server in enumerate(spec.dns, start=1)]
            lines.append("PEERDNS=yes")
        else:
            lines.append("PEERDNS=no")
    return "\n".join(lines) + "\n"


def ifcfg_device(text: str) -> str | None:
    for key in ("DEVICE", "NAME"):
        match = re.search(rf"^{key}=[\"']?([^\"'\s]+)", text, re.MULTILINE)
        if match:
            return match.group(1)
    return None


def render_nm_keyfile(spec: InterfaceSpec) -> str:
    lines = [MANAGED, "[connection]", f"id={keyfile_value('homeclust-' + spec.name)}",
             "type=ethernet", f"interface-name={keyfile_value(spec.name)}", "autoconnect=true",
             "autoconnect-priority=100", "", "[ethernet]", "", "[ipv4]"]
    if spec.method == "dhcp":
        lines.append("method=auto")
        if spec.client_id:
            lines.append(f"dhcp-client-id={keyfile_value(spec.client_id)}")
    else:
        gateway = f",{spec.gateway}" if spec.gateway else ""
        lines += ["method=manual", f"address1={spec.static_address}{gateway}"]
        if spec.dns:
            lines.append("dns=" + "".join(f"{server};" for server in spec.dns))
        if not spec.gateway:
            lines.append("never-default=true")
    lines += ["", "[ipv6]", "method=auto" if spec.role == "public" else "method=ignore"]
    return "\n".join(lines) + "\n"


def nm_keyfile_interface(text: str) -> str | None:
    match = re.search(r"^interface-name=(\S+)", text, re.MULTILINE)
    return match.group(1) if match else None


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class NetworkFiles:
    """Files to write (or remove) plus how to (re)apply each interface."""

    files: dict[str, FileSpec]
    #: interface -> files whose change requires re-applying that interface
    depends: dict[str, tuple[str, ...]]
    warnings: tuple[str, ...] = ()


def interface_files(backend: NetworkBackend, specs: Sequence[InterfaceSpec],
                    existing: Mapping[str, str], *, has_resolvconf: bool = False) -> NetworkFiles:
    """Render ``specs`` for ``backend``; ``existing`` maps current config paths to content."""
    names = [s.name for s in specs]
    files: dict[str, FileSpec] = {}
    depends: dict[str, tuple[str, ...]] = {}
    warnings: list[str] = []
    if backend == "ifupdown":
        main = "/etc/network/interfaces"
        files[main] = FileSpec(render_ifupdown(specs, existing.get(main)))
        for path, text in existing.items():
            if path.startswith("/etc/network/interfaces.d/") and \
                    ifupdown_managed_elsewhere(text, names):
                files[path] = FileSpec(None)
        dhclient = render_dhclient_conf(specs)
        extra = [p for p, f in files.items() if f.content is None]
        for spec in specs:
            deps = [main, *extra]
            if spec.method == "dhcp" and dhclient is not None:
                deps.append("/etc/dhcp/dhclient.conf")
            depends[spec.name] = tuple(deps)
        if dhclient is not None:
            files["/etc/dhcp/dhclient.conf"] = FileSpec(dhclient)
        dns = next((s.dns for s in specs if s.method == "static" and s.dns), ())
        if dns and not has_resolvconf and not any(s.method == "dhcp" for s in specs):
            files["/etc/resolv.conf"] = FileSpec(render_resolv_conf(dns))
    elif backend == "netplan":
        ours = "/etc/netplan/60-homeclust.yaml"
        files[ours] = FileSpec(render_netplan(specs), 0o600)
        for path, text in existing.items():
            if path.startswith("/etc/netplan/") and path != ours and netplan_defines(text, names):
                files[path] = FileSpec(None)
        for spec in specs:
            depends[spec.name] = tuple(files)
            if spec.method == "dhcp" and spec.client_id:
                warnings.append(
                    f"netplan cannot send the DHCP client id {spec.client_id!r} on {spec.name}; "
                    "it identifies the master by its MAC address instead"
                )
    elif backend in ("ifcfg", "nm-ifcfg"):
        nm = backend == "nm-ifcfg"
        for spec in specs:
            path = f"/etc/sysconfig/network-scripts/ifcfg-{spec.name}"
            files[path] = FileSpec(render_ifcfg(spec, nm_controlled=nm))
            deps = [path]
            for other, text in existing.items():
                if other.startswith("/etc/sysconfig/network-scripts/ifcfg-") and other != path \
                        and ifcfg_device(text) == spec.name:
                    files[other] = FileSpec(None)
                    deps.append(other)
                if nm and other.startswith("/etc/NetworkManager/system-connections/") and \
                        nm_keyfile_interface(text) == spec.name:
                    files[other] = FileSpec(None)
                    deps.append(other)
            depends[spec.name] = tuple(deps)
    else:  # nm-keyfile
        for spec in specs:
            path = f"/etc/NetworkManager/system-connections/homeclust-{spec.name}.nmconnection"
            files[path] = FileSpec(render_nm_keyfile(spec), 0o600)
            deps = [path]
            for other, text in existing.items():
                if other == path:
                    continue
                if (other.startswith("/etc/NetworkManager/system-connections/")
                        and nm_keyfile_interface(text) == spec.name) or (
                        other.startswith("/etc/sysconfig/network-scripts/ifcfg-")
                        and ifcfg_device(text) == spec.name):
                    files[other] = FileSpec(None)
                    deps.append(other)
            depends[spec.name] = tuple(deps)
    return NetworkFiles(files, depends, tuple(warnings))


def takedown_command(backend: NetworkBackend, interfaces: Sequence[str]) -> str:
    """Take ``interfaces`` down with the configuration that is on disk *now*.

    Runs before new files are written (and, in a rollback, before the old ones
    are put back): a DHCP client must release its lease under the identity it
    obtained it with.  A router that keys leases by client identity ignores a
    release sent under a new client id, keeps the old lease, and may have no
    address left for the new identity.  Never fails: an interface that is
    already down is fine.
    """
    for name in interfaces:
        require_interface(name)  # also part of a pid file's path below
    if backend in ("nm-ifcfg", "nm-keyfile"):
        # NetworkManager releases the lease of the active profile on disconnect.
        return "; ".join(f"nmcli device disconnect {shlex.quote(i)} >/dev/null 2>&1"
                         for i in interfaces) + "; true"
    if backend == "netplan":
        # systemd-networkd sends the release (SendRelease= defaults to yes) on link down.
        return "; ".join(f"networkctl down {shlex.quote(i)} >/dev/null 2>&1 || "
                         f"ip link set {shlex.quote(i)} down" for i in interfaces) + "; true"
    down = "ifdown --force" if backend == "ifupdown" else "ifdown"
    steps = []
    for name in interfaces:
        q = shlex.quote(name)
        # A dhclient that ifdown did not know about would keep (and later re-add) its lease.
        pidfile = shlex.quote(f"/run/dhclient.{name}.pid")
        steps.append(
            f"{down} {q} >/dev/null 2>&1; "
            f"if [ -f {pidfile} ]; then kill \"$(cat {pidfile})\" 2>/dev/null; rm -f {pidfile}; fi; "
            f"ip addr flush dev {q}"
        )
    return "; ".join(steps) + "; true"


def bringup_command(backend: NetworkBackend, interfaces: Sequence[str]) -> str:
    """Bring ``interfaces`` up with the configuration on disk now (new, or restored)."""
    for name in interfaces:
        require_interface(name)
    if backend == "netplan":
        return "netplan generate && netplan apply"
    if backend in ("nm-ifcfg", "nm-keyfile"):
        # Reload first: NetworkManager must see files written (or put back) since.
        connects = " && ".join(f"nmcli device connect {shlex.quote(i)}" for i in interfaces)
        return f"nmcli connection reload && {connects}"
    prefix = ""
    if backend == "ifcfg":
        # CentOS 7 installs NetworkManager too: make it re-read NM_CONTROLLED=no
        # before the network scripts take the interface over.
        prefix = ("if nmcli -t general status >/dev/null 2>&1; then "
                  "nmcli connection reload; fi; ")
    return prefix + " && ".join(f"ifup {shlex.quote(name)}" for name in interfaces)


def addresses_command(interfaces: Sequence[str]) -> str:
    """What the interfaces got (for the report when a trial configuration is rolled back)."""
    for name in interfaces:
        require_interface(name)
    return "; ".join(
        f"printf '%s: %s\\n' {shlex.quote(i)} "
        f"\"$(ip -o -4 addr show dev {shlex.quote(i)} 2>/dev/null | awk '{{print $4}}' | "
        f"tr '\\n' ' ' | sed 's/ *$//')\"" for i in interfaces)


# --------------------------------------------------------------------------- names

HOSTS_BEGIN = "# BEGIN homeclust: cluster nodes (network step)"
HOSTS_END = "# END homeclust"
_DEFAULT_HOSTS = (
    "127.0.0.1\tlocalhost\n"
    "::1\t\tlocalhost ip6-localhost ip6-loopback\n"
    "ff02::1\t\tip6-allnodes\n"
    "ff02::2\t\tip6-allrouters\n"
)


def render_hosts(inventory: Inventory, current: str | None) -> str:
    """/etc/hosts with a managed block of every node.

    Lines elsewhere in the file that map a node's name (Debian's ``127.0.1.1
    worker1``) are dropped: a node resolving its own name to loopback breaks
    MPI and the schedulers.
    """
    # /etc/hosts has no quoting: a name with a space would map a second name.
    names = {require_hostname(n.name) for n in inventory.nodes}
    kept: list[str] = []
    inside = False
    for line in (current if current is not None else _DEFAULT_HOSTS).splitlines():
        if line.strip() == HOSTS_BEGIN:
            inside = True
            continue
        if inside:
            if line.strip() == HOSTS_END:
                inside = False
            continue
        entry, hash_, comment = line.partition("#")
        words = entry.split()
        if len(words) >= 2 and names & {w.split(".")[0] for w in words[1:]}:
            # Drop the node names only: "127.0.0.1 localhost master" keeps localhost.
            others = [w for w in words[1:] if w.split(".")[0] not in names]
            if others:
                kept.append(f"{words[0]}\t{' '.join(others)}" + (f"  #{comment}" if hash_ else ""))
            continue
        kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    block = [HOSTS_BEGIN] + [f"{n.private_address}\t{n.name}" for n in inventory.nodes] + [HOSTS_END]
    return "\n".join([*kept, *block]) + "\n"


def render_hostname(node: Node) -> str:
    return require_hostname(node.name) + "\n"
