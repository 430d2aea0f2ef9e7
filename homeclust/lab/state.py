"""Where a lab keeps its files, and the small state file that survives a crash.

Layout of ``/var/lib/homeclust-lab/<cluster>/``::

    state.json              what is up: institute network, SSH port, releases and rootfs used
    source-inventory.toml   the inventory the lab was built from (for ``down`` after a crash)
    inventory.toml          the lab inventory: point homeclust at this one
    admin_key, admin_key.pub  the lab admin's SSH key (root on every node)
    known_hosts             the lab's pinned host keys (emptied when nodes are new)
    run/                    PID files, sockets, dnsmasq config and leases, uplink.json
    logs/                   one log per service and per node console; apt-cache.jsonl
    nodes/<name>/upper      the node's disk: overlay upper dir over the cached rootfs
    nodes/<name>/root       where that overlay is mounted while the node runs
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Network
from pathlib import Path

from homeclust.errors import LabError

STATE_VERSION = 1


@dataclass(frozen=True)
class LabPaths:
    root: Path

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def source_inventory(self) -> Path:
        return self.root / "source-inventory.toml"

    @property
    def inventory(self) -> Path:
        return self.root / "inventory.toml"

    @property
    def admin_key(self) -> Path:
        return self.root / "admin_key"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def nodes(self) -> Path:
        return self.root / "nodes"

    def pidfile(self, service: str) -> Path:
        return self.run / f"{service}.pid"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def socket(self, name: str) -> Path:
        return self.run / f"{name}.sock"

    @property
    def dnsmasq_conf(self) -> Path:
        return self.run / "dnsmasq.conf"

    @property
    def dnsmasq_leases(self) -> Path:
        return self.run / "dnsmasq.leases"

    @property
    def uplink(self) -> Path:
        """The uplink setting (uplink.py): read by the archive relay and by status."""
        return self.run / "uplink.json"

    @property
    def apt_cache_stats(self) -> Path:
        """The archive relay's JSON-lines log: one line per request (aptcache.py)."""
        return self.logs / "apt-cache.jsonl"

    def node(self, name: str) -> NodePaths:
        return NodePaths(self.nodes / name)


@dataclass(frozen=True)
class NodePaths:
    root: Path

    @property
    def upper(self) -> Path:
        return self.root / "upper"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def merged(self) -> Path:
        return self.root / "root"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def supervisor_pid(self) -> Path:
        return self.run / "supervisor.pid"

    @property
    def nspawn_pid(self) -> Path:
        return self.run / "nspawn.pid"

    @property
    def leader_pid(self) -> Path:
        return self.run / "leader.pid"

    @property
    def supervisor_spec(self) -> Path:
        return self.run / "supervisor.json"


@dataclass(frozen=True)
class LabState:
    """What ``up`` decided, written before anything is created."""

    cluster: str
    source_inventory: str  # the user's inventory path (informational)
    institute_network: str
    ssh_port: int
    rootfs: str  # the rootfs of ``release``
    phase: str  # "starting" while up() runs, "up" once every node answered
    version: int = STATE_VERSION
    dhcp: str = "reserved"  # plan.DHCP_MODES; absent in states written before it existed
    # The fields below are absent in states written before labs had releases:
    # those labs ran bookworm everywhere.
    release: str = "bookworm"  # plan.RELEASES: what every node runs unless node_releases says
    node_releases: dict[str, str] = field(default_factory=dict)  # node -> its own release
    rootfs_by_release: dict[str, str] = field(default_factory=dict)  # release -> rootfs path

    @property
    def network(self) -> IPv4Network:
        return IPv4Network(self.institute_network)

    def rootfs_of(self, release: str) -> str:
        """The rootfs the lab's nodes of ``release`` boot from."""
        if release in self.rootfs_by_release:
            return self.rootfs_by_release[release]
        if release == self.release:
            return self.rootfs
        raise LabError(f"the lab of cluster {self.cluster} has no {release} rootfs recorded",
                       hint="homeclust lab down, then homeclust lab up")

    def save(self, paths: LabPaths) -> None:
        paths.root.mkdir(parents=True, exist_ok=True)
        tmp = paths.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(paths.state_file)

    @classmethod
    def load(cls, paths: LabPaths) -> LabState | None:
        try:
            data = json.loads(paths.state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LabError(f"cannot read the lab state {paths.state_file}: {exc}") from None
        if data.get("version") != STATE_VERSION:
            raise LabError(
                f"{paths.state_file} was written by another homeclust version",
                hint="tear that lab down with the homeclust version that built it",
            )
        try:
            return cls(**data)
        except TypeError as exc:
            raise LabError(f"cannot read the lab state {paths.state_file}: {exc}",
                           hint="tear that lab down with the homeclust version that built it"
                           ) from None
