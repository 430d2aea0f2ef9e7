"""The lab's plan: every name and address of one lab, derived from the inventory.

Pure: nothing here touches the machine.  The same inventory, institute network
and SSH port always give the same plan, which is what lets ``lab down`` find
everything a crashed ``lab up`` created from the cluster name alone.

Topology (all inside namespaces the lab owns)::

    root namespace (admin side)       127.0.0.1:<ssh_port> --unix socket--+
                                                                         |
    <prefix>-admin  eth0 = admin address   (forwards to master:22) <-----+
    <prefix>-inet   eth0 = internet address (dnsmasq, what-is-my-address, apt relay)
    <prefix>-sw     br-inst (institute network) + br-priv (private network)
    node containers (systemd-nspawn), veth host ends in <prefix>-sw
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_address
from pathlib import Path

from homeclust.errors import LabError
from homeclust.inventory import Inventory

STATE_ROOT = Path("/var/lib/homeclust-lab")
CACHE_ROOT = Path("/var/cache/homeclust-lab")

INSTITUTE_BRIDGE = "br-inst"
PRIVATE_BRIDGE = "br-priv"
#: The internet host's port on the institute bridge (in the switch namespace).
INTERNET_SWITCH_PORT = "inet0"
WHOAMI_PORT = 8080
APT_RELAY_PORT = 80

# Institute networks the lab may use, in order of preference; the first that
# overlaps neither the cluster's private network nor any network of this
# machine wins (the lab's addresses live in its own namespaces, but overlapping
# would still confuse anyone reading addresses in logs).
INSTITUTE_CANDIDATES = tuple(
    IPv4Network(n)
    for n in (
        "10.77.0.0/24", "10.78.0.0/24", "10.79.0.0/24", "172.30.77.0/24",
        "172.31.77.0/24", "100.77.0.0/24",
    )
)

_MACHINE_NAME_MAX = 64

#: How the institute network's DHCP server treats the master's public interface:
#: "reserved" -- an institute's server: the master's address is reserved for its
#: client id (the inventory's dhcp_client_id), whatever else happens;
#: "router" -- a home router: no reservation, leases keyed by client identity
#: (client id when sent, else MAC), and a pool of exactly one address, so a
#: client that changes its identity gets nothing while its old lease lives.
DHCP_MODES = ("reserved", "router")

#: The Debian releases a lab node can run, each from a rootfs of its own
#: (rootfs.py); the first is the default: the current stable.
RELEASES = ("trixie", "bookworm")
DEFAULT_RELEASE = RELEASES[0]


@dataclass(frozen=True)
class LabLink:
    """One virtual cable: a veth whose host end sits on a bridge in the switch namespace."""

    host_name: str  # name of the veth end in the switch namespace (at most 15 chars)
    node_interface: str  # name of the other end inside the node (eth0, eth1, ...)
    bridge: str


@dataclass(frozen=True)
class LabNode:
    """One lab node: a systemd-nspawn container standing in for one machine."""

    name: str
    role: str  # "master" or "worker"
    machine: str  # systemd-nspawn machine name, unique on this machine
    links: tuple[LabLink, ...]
    private_interface: str
    private_address: IPv4Interface
    gateway: IPv4Address | None  # workers: the master's private address
    release: str = DEFAULT_RELEASE  # one of RELEASES: the Debian release the node runs


@dataclass(frozen=True)
class LabPlan:
    cluster: str
    prefix: str
    state_dir: Path
    institute_network: IPv4Network
    internet_address: IPv4Address
    admin_address: IPv4Address
    master_public_address: IPv4Address
    master_public_static: bool  # True when the inventory says public_boot = "static"
    master_public_interface: str
    master_dhcp_client_id: str
    master_public_names: tuple[str, ...]  # DNS names the lab gives the master's public address
    dhcp_range: tuple[IPv4Address, IPv4Address]
    ssh_port: int
    nodes: tuple[LabNode, ...]
    dhcp_mode: str = "reserved"  # one of DHCP_MODES

    @property
    def releases(self) -> tuple[str, ...]:
        """The releases the lab's nodes run, each once, the master's first."""
        return tuple(dict.fromkeys(node.release for node in self.nodes))

    @property
    def switch_netns(self) -> str:
        return f"{self.prefix}-sw"

    @property
    def internet_netns(self) -> str:
        return f"{self.prefix}-inet"

    @property
    def admin_netns(self) -> str:
        return f"{self.prefix}-admin"

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.switch_netns, self.internet_netns, self.admin_netns)

    @property
    def whoami_url(self) -> str:
        return f"http://{self.internet_address}:{WHOAMI_PORT}/"

    @property
    def master(self) -> LabNode:
        return self.nodes[0]

    def node(self, name: str) -> LabNode:
        for node in self.nodes:
            if node.name == name:
                return node
        names = ", ".join(n.name for n in self.nodes)
        raise LabError(f"no lab node named {name!r}", hint=f"lab nodes: {names}")


def cluster_slug(cluster: str) -> str:
    """The cluster name as it may appear in namespace and machine names."""
    slug = re.sub(r"[^a-z0-9-]+", "-", cluster.lower()).strip("-")
    return slug or "cluster"


def lab_prefix(cluster: str) -> str:
    return f"hclab-{cluster_slug(cluster)}"


def state_dir_for(cluster: str, root: Path = STATE_ROOT) -> Path:
    return root / cluster


def namespaces_for(cluster: str) -> tuple[str, ...]:
    """The namespaces a lab of this cluster creates (what ``down`` removes after a crash)."""
    prefix = lab_prefix(cluster)
    return (f"{prefix}-sw", f"{prefix}-inet", f"{prefix}-admin")


def machine_name(cluster: str, node: str) -> str:
    """A systemd-nspawn machine name for ``node``: readable, valid, unique per cluster."""
    name = f"{lab_prefix(cluster)}-{node}"
    if len(name) <= _MACHINE_NAME_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: _MACHINE_NAME_MAX - 9]}-{digest}"


def choose_institute_network(
    private_network: IPv4Network,
    host_networks: Iterable[IPv4Network],
    candidates: Iterable[IPv4Network] = INSTITUTE_CANDIDATES,
) -> IPv4Network:
    """The first candidate that overlaps neither the private network nor the host's networks."""
    taken = [private_network, *host_networks]
    for candidate in candidates:
        if not any(candidate.overlaps(net) for net in taken):
            return candidate
    raise LabError(
        "no free network for the lab's institute network",
        hint="every candidate overlaps the private network or one of this machine's networks",
    )


def make_plan(
    inventory: Inventory,
    institute_network: IPv4Network,
    ssh_port: int,
    state_root: Path = STATE_ROOT,
    dhcp_mode: str = "reserved",
    release: str = DEFAULT_RELEASE,
    node_releases: Mapping[str, str] | None = None,
) -> LabPlan:
    """Every name and address of the lab for ``inventory``.

    Every node runs ``release`` except those ``node_releases`` names (node ->
    release): a mixed lab, as a cluster that grew over the years.
    """
    cluster = inventory.cluster.name
    master = inventory.master
    private_prefix = inventory.cluster.private_network.prefixlen
    check_dhcp_mode(dhcp_mode, static_master=master.public_boot == "static")
    releases = node_release_map(inventory, release, node_releases or {})

    if master.public_boot == "static":
        # Replicate the inventory's public subnet; its gateway plays the internet host.
        if master.public_address is None or master.public_gateway is None:
            raise LabError("a static public side needs public_address and public_gateway")
        institute_network = master.public_address.network
        internet = master.public_gateway
        master_public = master.public_address.ip
        admin = _first_free(institute_network, {internet, master_public})
    else:
        hosts = list(institute_network.hosts())
        if len(hosts) < 200:
            raise LabError(f"institute network {institute_network} is too small (need a /24)")
        internet, admin, master_public = hosts[0], hosts[1], hosts[9]
    hosts = list(institute_network.hosts())
    dhcp_range = (hosts[99], hosts[min(198, len(hosts) - 1)]) if len(hosts) > 120 else (
        hosts[-20], hosts[-1])
    if dhcp_mode == "router":
        # The router's whole pool is the master's address: the admin's forward
        # still finds the master, and a second identity finds nothing left.
        dhcp_range = (master_public, master_public)

    nodes: list[LabNode] = []
    master_links = (
        LabLink("n0p0", master.public_interface, INSTITUTE_BRIDGE),
        LabLink("n0p1", master.private_interface, PRIVATE_BRIDGE),
    )
    nodes.append(
        LabNode(
            name=master.name,
            role="master",
            machine=machine_name(cluster, master.name),
            links=master_links,
            private_interface=master.private_interface,
            private_address=IPv4Interface(f"{master.private_address}/{private_prefix}"),
            gateway=None,
            release=releases[master.name],
        )
    )
    for index, worker in enumerate(inventory.workers, start=1):
        nodes.append(
            LabNode(
                name=worker.name,
                role="worker",
                machine=machine_name(cluster, worker.name),
                links=(LabLink(f"n{index}p0", worker.interface, PRIVATE_BRIDGE),),
                private_interface=worker.interface,
                private_address=IPv4Interface(f"{worker.private_address}/{private_prefix}"),
                gateway=master.private_address,
                release=releases[worker.name],
            )
        )

    public_names = [master.name]
    if not _is_ip(master.address) and master.address not in public_names:
        public_names.append(master.address)

    return LabPlan(
        cluster=cluster,
        prefix=lab_prefix(cluster),
        state_dir=state_dir_for(cluster, state_root),
        institute_network=institute_network,
        internet_address=internet,
        admin_address=admin,
        master_public_address=master_public,
        master_public_static=master.public_boot == "static",
        master_public_interface=master.public_interface,
        master_dhcp_client_id=master.dhcp_client_id,
        master_public_names=tuple(public_names),
        dhcp_range=dhcp_range,
        ssh_port=ssh_port,
        nodes=tuple(nodes),
        dhcp_mode=dhcp_mode,
    )


def check_dhcp_mode(mode: str, *, static_master: bool) -> None:
    if mode not in DHCP_MODES:
        raise LabError(f"unknown lab DHCP mode {mode!r}", hint=f"one of: {', '.join(DHCP_MODES)}")
    if mode == "router" and static_master:
        raise LabError(
            "DHCP mode 'router' needs a master whose public side uses DHCP",
            hint='the inventory says [master] public_boot = "static"; use the default mode',
        )


def check_release(release: str, what: str = "lab release") -> None:
    if release not in RELEASES:
        raise LabError(f"unknown {what} {release!r}", hint=f"one of: {', '.join(RELEASES)}")


def node_release_map(
    inventory: Inventory, release: str, node_releases: Mapping[str, str]
) -> dict[str, str]:
    """Each node's release: ``release`` unless ``node_releases`` names the node.

    A release that is not one of :data:`RELEASES`, or a node the inventory does
    not have, is a LabError naming it (checked before the lab creates anything).
    """
    check_release(release)
    names = [inventory.master.name, *(w.name for w in inventory.workers)]
    unknown = sorted(set(node_releases) - set(names))
    if unknown:
        raise LabError(
            f"no node named {', '.join(map(repr, unknown))} in the inventory's cluster "
            f"{inventory.cluster.name}",
            hint=f"nodes: {', '.join(names)}",
        )
    for node, node_release in node_releases.items():
        check_release(node_release, what=f"release for node {node}:")
    return {name: node_releases.get(name, release) for name in names}


def _first_free(network: IPv4Network, used: set[IPv4Address]) -> IPv4Address:
    for host in network.hosts():
        if host not in used:
            return host
    raise LabError(f"no free address left in {network} for the lab's admin host")


def _is_ip(text: str) -> bool:
    """An address literal (IPv4 or IPv6) is no DNS name for the lab to serve."""
    try:
        ip_address(text)
    except ValueError:
        return False
    return True


def default_ssh_port(cluster: str) -> int:
    """A stable loopback port per cluster (20000-29999), so it survives a ``lab down``/``up``."""
    digest = int(hashlib.sha256(cluster.encode()).hexdigest(), 16)
    return 20000 + digest % 10000
