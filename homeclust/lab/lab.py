"""The :class:`Lab`: a virtual replica of an inventory's cluster on this machine.

``Lab(inventory).up()`` builds (or reuses) the rootfs, wires the lab's
namespaces, starts the institute network's services and boots one
systemd-nspawn container per node; ``down()`` removes every namespace, mount
and process the lab created -- also when ``up`` crashed half-way, because
every name is derived from the cluster name and every process is recorded
(PID + start time) the moment it starts.

Each node runs a Debian release from a rootfs of its own (rootfs.py):
``Lab(inventory, release="bookworm")`` for Debian 12 everywhere (the default
is trixie, Debian 13, the current stable), and ``node_releases={"worker2":
"bookworm"}`` for a mixed lab.  The releases are recorded in the lab's state,
so ``status``, ``reboot``, ``reset``, ``stop``/``start`` and ``down`` of a lab
that is up need no more than its cluster name.

The lab can be made as hard as the real world: ``Lab(inventory,
dhcp="router")`` gives the institute network a home router's DHCP server
(no reservation, one address), and ``set_uplink("4mbit", delay_ms=100)``
makes the internet host -- and so the package mirror -- slow.  The mirror is
a caching relay (aptcache.py) whose counters ``apt_cache_stats()`` reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import tomli_w

from homeclust.errors import HomeclustError, LabError
from homeclust.inventory import Inventory, load_inventory
from homeclust.lab import nodes as lab_nodes
from homeclust.lab import render
from homeclust.lab import uplink as lab_uplink
from homeclust.lab.aptcache import AptCacheStats, summarize
from homeclust.lab.network import create_network, delete_network
from homeclust.lab.plan import (
    CACHE_ROOT,
    DEFAULT_RELEASE,
    STATE_ROOT,
    LabPlan,
    check_dhcp_mode,
    choose_institute_network,
    default_ssh_port,
    make_plan,
    namespaces_for,
    node_release_map,
    state_dir_for,
)
from homeclust.lab.rootfs import ensure_rootfs, recipe_for
from homeclust.lab.services import Service, lab_services
from homeclust.lab.state import LabPaths, LabState
from homeclust.lab.system import (
    end_all,
    in_netns,
    is_running,
    missing_tools,
    mounts_under,
    netns_exists,
    netns_inode,
    processes_in_netns,
    processes_mentioning,
    read_pidfile,
    remove_tree,
    run,
    spawn,
    unmount,
)

Progress = Callable[[str], None]

READY_TIMEOUT = 120.0
# Each node's systemd takes several inotify instances; the kernel default (128)
# runs out around the 25th container ("Too many open files").
INOTIFY_PER_NODE = 10
INOTIFY_BASE = 64
INOTIFY_SYSCTL = Path("/proc/sys/fs/inotify/max_user_instances")

# Runs inside a node's network namespace: is sshd answering on this address?
_SSH_BANNER_PROBE = (
    "import socket,sys\n"
    "s=socket.create_connection((sys.argv[1],22),timeout=2)\n"
    "s.settimeout(2)\n"
    "sys.exit(0 if s.recv(64).startswith(b'SSH-') else 1)\n"
)

_NODE_ENV = ("env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "HOME=/root", "LANG=C.UTF-8", "TERM=dumb", "DEBIAN_FRONTEND=noninteractive")


@dataclass(frozen=True)
class LabInfo:
    """What ``up`` built and how to use it."""

    cluster: str
    inventory_path: Path
    ssh_port: int
    admin_key: Path
    known_hosts: Path
    institute_network: IPv4Network
    internet_address: IPv4Address
    admin_address: IPv4Address
    master_public_address: IPv4Address
    master_public_by_dhcp: bool
    nodes: tuple[str, ...]
    elapsed: float  # seconds for the whole ``up``, rootfs build included
    rootfs_seconds: float  # seconds spent building the rootfs (0 when it was cached)
    already_up: bool = False
    dhcp: str = "reserved"  # plan.DHCP_MODES
    releases: tuple[tuple[str, str], ...] = ()  # (node, Debian release) in node order

    @property
    def rootfs_built(self) -> bool:
        return self.rootfs_seconds > 0

    def summary(self) -> str:
        verb = "already up" if self.already_up else f"{len(self.nodes)} nodes in {self.elapsed:.1f} s"
        cached = (f" (of which {self.rootfs_seconds:.0f} s building the rootfs, once)"
                  if self.rootfs_built else "")
        inv = self.inventory_path
        return "\n".join([
            f"lab up: {verb}{cached}",
            f"  cluster          {self.cluster}: {', '.join(self.nodes)}",
            f"  releases         {describe_releases(self.releases)}",
            f"  institute net    {self.institute_network}  internet host {self.internet_address}, "
            f"admin host {self.admin_address}, master {self.master_public_address}"
            + (_dhcp_words(self.dhcp) if self.master_public_by_dhcp else " (static)"),
            f"  master SSH       127.0.0.1:{self.ssh_port} (forwarded to {self.master_public_address}:22;"
            " workers only through the master)",
            f"  lab inventory    {inv}",
            "",
            "Use it:",
            f"  homeclust -i {inv} up",
            f"  homeclust -i {inv} check",
            "  homeclust lab ssh NODE        # a shell on a node (workers via the master)",
            "  homeclust lab status | reboot NODE | stop NODE | start NODE | reset NODE",
            "  homeclust lab uplink --rate 4mbit [--delay 100ms] | --off   # a slow uplink",
            "  homeclust lab down            # remove everything the lab created",
        ])


def describe_releases(releases: Sequence[tuple[str, str]]) -> str:
    """"trixie" for a lab of one release, else "trixie (master, worker1), bookworm (worker2)"."""
    by_release: dict[str, list[str]] = {}
    for node, release in releases:
        by_release.setdefault(release, []).append(node)
    if len(by_release) == 1:
        return next(iter(by_release))
    return ", ".join(f"{release} ({', '.join(nodes)})" for release, nodes in by_release.items())


def _dhcp_words(mode: str) -> str:
    if mode == "router":
        return " (DHCP from a home router: one address, no reservation)"
    return " (DHCP, reserved for its client id)"


@dataclass(frozen=True)
class NodeStatus:
    name: str
    role: str
    running: bool
    pid: int | None
    release: str = DEFAULT_RELEASE


@dataclass(frozen=True)
class LabStatus:
    cluster: str
    phase: str  # "down", "starting", "up"
    nodes: tuple[NodeStatus, ...] = ()
    services: tuple[tuple[str, str, bool], ...] = ()  # (name, where, running)
    namespaces: tuple[tuple[str, bool], ...] = ()
    inventory_path: Path | None = None
    ssh_port: int | None = None
    dhcp: str | None = None  # plan.DHCP_MODES
    uplink: str | None = None  # what the uplink is (and whether the kernel agrees)
    apt_cache: AptCacheStats | None = None

    def describe(self) -> str:
        if self.phase == "down":
            return f"lab {self.cluster}: down"
        lines = [f"lab {self.cluster}: {self.phase}"]
        if self.inventory_path:
            lines.append(f"  inventory  {self.inventory_path}")
        if self.ssh_port:
            lines.append(f"  master SSH 127.0.0.1:{self.ssh_port}")
        if self.dhcp:
            lines.append(f"  DHCP       {self.dhcp}" + (
                " (home router: one address, leases keyed by client identity, no reservation)"
                if self.dhcp == "router" else " (master's address reserved for its client id)"))
        if self.uplink:
            lines.append(f"  uplink     {self.uplink}")
        if self.apt_cache is not None:
            lines.append(f"  apt cache  {self.apt_cache.describe()}")
        lines.append("  nodes:")
        for node in self.nodes:
            state = f"running (init pid {node.pid})" if node.running else "stopped"
            lines.append(f"    {node.name:<16} {node.role:<7} {node.release:<9} {state}")
        lines.append("  services:")
        for name, where, running in self.services:
            lines.append(f"    {name:<18} {where:<24} {'running' if running else 'NOT RUNNING'}")
        lines.append("  namespaces:")
        for name, exists in self.namespaces:
            lines.append(f"    {name:<24} {'present' if exists else 'MISSING'}")
        return "\n".join(lines)


@dataclass
class DownReport:
    nodes_stopped: list[str] = field(default_factory=list)
    processes_ended: int = 0
    namespaces_removed: list[str] = field(default_factory=list)
    mounts_removed: int = 0
    elapsed: float = 0.0

    def summary(self) -> str:
        if not (self.nodes_stopped or self.processes_ended or self.namespaces_removed
                or self.mounts_removed):
            return f"lab down: nothing was up ({self.elapsed:.1f} s)"
        return (
            f"lab down: stopped {len(self.nodes_stopped)} nodes, ended {self.processes_ended} "
            f"other processes, removed {len(self.namespaces_removed)} namespaces and "
            f"{self.mounts_removed} mounts in {self.elapsed:.1f} s"
        )


class Lab:
    """One cluster's lab.  Build it from an inventory path, or from the lab state."""

    def __init__(
        self,
        inventory_path: str | os.PathLike[str],
        *,
        state_root: Path = STATE_ROOT,
        cache_root: Path = CACHE_ROOT,
        progress: Progress | None = None,
        dhcp: str | None = None,
        release: str | None = None,
        node_releases: Mapping[str, str] | None = None,
    ) -> None:
        """``dhcp``: "reserved" (the default for a new lab) or "router" (see
        plan.DHCP_MODES); ``release``: the Debian release of every node
        (plan.RELEASES; a new lab's default: plan.DEFAULT_RELEASE);
        ``node_releases``: node name -> release for the nodes that run another.
        None takes what a lab that is up recorded.  A bad value is a LabError
        here, before anything is created."""
        self.source_path = Path(inventory_path).resolve()
        inventory = load_inventory(self.source_path)
        self._init(inventory.cluster.name, state_root, cache_root, progress)
        self._given_inventory: Inventory | None = inventory
        if dhcp is not None:
            check_dhcp_mode(dhcp, static_master=inventory.master.public_boot == "static")
        self._dhcp = dhcp
        node_release_map(inventory, release or DEFAULT_RELEASE, node_releases or {})
        self._release = release
        self._node_releases = dict(node_releases) if node_releases is not None else None

    @classmethod
    def from_state(
        cls,
        cluster: str,
        *,
        state_root: Path = STATE_ROOT,
        cache_root: Path = CACHE_ROOT,
        progress: Progress | None = None,
    ) -> Lab:
        """The lab of ``cluster`` as recorded on this machine (e.g. for ``down`` after a crash)."""
        lab = cls.__new__(cls)
        lab._init(cluster, state_root, cache_root, progress)
        lab._given_inventory = None
        lab._dhcp = None
        lab._release = None
        lab._node_releases = None
        lab.source_path = lab.paths.source_inventory
        return lab

    def _init(
        self, cluster: str, state_root: Path, cache_root: Path, progress: Progress | None
    ) -> None:
        self.cluster = cluster
        self.state_root = state_root
        self.cache_root = cache_root
        self.paths = LabPaths(state_dir_for(cluster, state_root))
        self.progress: Progress = progress or (lambda _msg: None)

    # ------------------------------------------------------------------
    # Properties
    # ------------------------------------------------------------------

    @property
    def inventory_path(self) -> Path:
        """The lab inventory (written by ``up``): point homeclust at this file."""
        return self.paths.inventory

    @property
    def admin_key_path(self) -> Path:
        return self.paths.admin_key

    @property
    def known_hosts_path(self) -> Path:
        return self.paths.known_hosts

    @property
    def internet_address(self) -> IPv4Address:
        return self.plan.internet_address

    @property
    def master_public_address(self) -> IPv4Address:
        return self.plan.master_public_address

    @property
    def admin_address(self) -> IPv4Address:
        return self.plan.admin_address

    @property
    def ssh_port(self) -> int:
        return self.plan.ssh_port

    @property
    def whoami_url(self) -> str:
        return self.plan.whoami_url

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(node.name for node in self.plan.nodes)

    @property
    def plan(self) -> LabPlan:
        """The plan of the lab that is up (LabError when there is none)."""
        state = self._state()
        if state is None:
            raise LabError(f"the lab of cluster {self.cluster} is not up",
                           hint="homeclust lab up")
        return make_plan(self._recorded_inventory(), state.network, state.ssh_port,
                         self.state_root, dhcp_mode=state.dhcp, release=state.release,
                         node_releases=state.node_releases)

    @property
    def apt_cache_dir(self) -> Path:
        """The archive relay's cache, shared by every lab using this cache root."""
        return self.cache_root / "apt-cache"

    def _services(self, plan: LabPlan) -> list[Service]:
        return lab_services(plan, self.paths, apt_cache_dir=self.apt_cache_dir)

    def _state(self) -> LabState | None:
        return LabState.load(self.paths)

    def _recorded_inventory(self) -> Inventory:
        if self.paths.source_inventory.exists():
            return load_inventory(self.paths.source_inventory)
        if self._given_inventory is not None:
            return self._given_inventory
        raise LabError(f"no inventory recorded for the lab of cluster {self.cluster}")

    # ------------------------------------------------------------------
    # up / down
    # ------------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One ``up`` or ``down`` at a time per cluster on this machine (others wait)."""
        self.state_root.mkdir(parents=True, exist_ok=True)
        with open(self.state_root / f".{self.cluster}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def up(self, *, ready_timeout: float = READY_TIMEOUT) -> LabInfo:
        """Bring the lab up: every node booted and answering SSH.  Idempotent."""
        with self._exclusive():
            return self._up(ready_timeout)

    def _up(self, ready_timeout: float) -> LabInfo:
        started = time.monotonic()
        self._preflight()
        if self._given_inventory is None:
            raise LabError("lab up needs an inventory", hint="homeclust -i INVENTORY lab up")
        state = self._state()
        if state is not None:
            return self._resume(state, started, ready_timeout)
        leftovers = [ns for ns in namespaces_for(self.cluster) if netns_exists(ns)]
        if leftovers:
            raise LabError(
                f"namespaces of an earlier lab are still there: {', '.join(leftovers)}",
                hint="homeclust lab down",
            )

        inventory = self._given_inventory
        network = choose_institute_network(inventory.cluster.private_network, host_networks())
        dhcp = self._dhcp or "reserved"
        release = self._release or DEFAULT_RELEASE
        node_releases = self._node_releases or {}
        plan = make_plan(inventory, network, self._free_port(), self.state_root, dhcp_mode=dhcp,
                         release=release, node_releases=node_releases)
        rootfs: dict[str, Path] = {}
        rootfs_seconds = 0.0
        for node_release in plan.releases:
            build_started = time.monotonic()
            rootfs[node_release], built = ensure_rootfs(
                recipe_for(node_release), cache_root=self.cache_root, progress=self.progress)
            rootfs_seconds += time.monotonic() - build_started if built else 0.0

        self.paths.root.mkdir(parents=True, exist_ok=True)
        remove_tree(self.paths.logs)  # the previous lab's logs; this one starts its own
        shutil.copyfile(self.source_path, self.paths.source_inventory)
        LabState(
            cluster=self.cluster, source_inventory=str(self.source_path),
            institute_network=str(plan.institute_network), ssh_port=plan.ssh_port,
            rootfs=str(rootfs.get(release, rootfs[plan.releases[0]])), phase="starting",
            dhcp=dhcp, release=release,
            node_releases={n: r for n, r in node_releases.items() if r != release},
            rootfs_by_release={r: str(path) for r, path in rootfs.items()},
        ).save(self.paths)
        try:
            self._build(plan, rootfs, ready_timeout)
        except BaseException:
            self.progress(f"lab up failed: removing what was created (logs kept in {self.paths.logs})")
            try:
                self._down()
            except HomeclustError as exc:
                self.progress(f"cleaning up failed too: {exc}")
            raise
        state = self._state()
        if state is None:
            raise LabError(f"the state of lab {self.cluster} vanished while it came up")
        dataclasses.replace(state, phase="up").save(self.paths)
        return self._info(plan, time.monotonic() - started, rootfs_seconds)

    def _build(self, plan: LabPlan, rootfs: Mapping[str, Path], ready_timeout: float) -> None:
        self._raise_inotify_limit(len(plan.nodes))
        for directory in (self.paths.run, self.paths.logs, self.paths.nodes):
            directory.mkdir(parents=True, exist_ok=True)
        self._ensure_admin_key()
        self.paths.known_hosts.write_text("")  # new nodes, new host keys

        create_network(plan)
        self.paths.dnsmasq_conf.write_text(render.render_dnsmasq_conf(
            plan, self.paths.dnsmasq_leases, self.paths.log("dnsmasq-queries")))
        self.paths.dnsmasq_leases.write_text("")
        self.paths.uplink.unlink(missing_ok=True)  # a new lab starts at full speed
        for service in self._services(plan):
            spawn(service.argv, self.paths.log(service.name), self.paths.pidfile(service.name),
                  cwd=Path("/"))

        public_key = self.paths.admin_key.with_suffix(".pub").read_text()
        for node in plan.nodes:
            node_paths = self.paths.node(node.name)
            lab_nodes.wipe_disk(node_paths)
            lab_nodes.mount_disk(node_paths, rootfs[node.release])
            lab_nodes.write_first_boot_files(plan, node, node_paths.merged, public_key)
            lab_nodes.power_on(plan, node, self.paths)

        self._wait_ready(plan, [n.name for n in plan.nodes], ready_timeout)
        self._check_services(plan)
        self._write_lab_inventory(plan)

    def _resume(self, state: LabState, started: float, ready_timeout: float) -> LabInfo:
        """``up`` on a lab that exists: start what is stopped, or say it is broken."""
        if self._dhcp is not None and self._dhcp != state.dhcp:
            raise LabError(
                f"the lab of cluster {self.cluster} is up with DHCP mode {state.dhcp!r}, "
                f"not {self._dhcp!r}",
                hint=f"homeclust lab down, then homeclust lab up --dhcp {self._dhcp}",
            )
        self._check_same_releases(state)
        plan = self.plan
        broken = [ns for ns in plan.namespaces if not netns_exists(ns)]
        broken += [s.name for s in self._services(plan)
                   if not is_running(read_pidfile(self.paths.pidfile(s.name)))]
        if state.phase != "up" or broken:
            what = ", ".join(broken) if broken else "it never finished starting"
            raise LabError(
                f"the lab of cluster {self.cluster} is partly up ({what})",
                hint="homeclust lab down, then homeclust lab up",
            )
        stopped = [n.name for n in plan.nodes
                   if not lab_nodes.is_node_running(self.paths.node(n.name))]
        for name in stopped:
            self._power_on(plan, name)
        if stopped:
            self._wait_ready(plan, stopped, ready_timeout)
        if self._given_inventory is not None and self.source_path != self.paths.source_inventory:
            recorded = self.paths.source_inventory.read_bytes()
            if self.source_path.exists() and self.source_path.read_bytes() != recorded:
                self.progress("note: the inventory changed since this lab was built; "
                              "run `homeclust lab down` and `lab up` to rebuild it")
        return self._info(plan, time.monotonic() - started, 0.0, already_up=not stopped)

    def _check_same_releases(self, state: LabState) -> None:
        """``up`` with releases other than those of the lab that is up is an error."""
        if self._release is None and self._node_releases is None:
            return
        inventory = self._recorded_inventory()
        recorded = node_release_map(inventory, state.release, state.node_releases)
        wanted = node_release_map(inventory, self._release or state.release,
                                  self._node_releases or {})
        if wanted != recorded:
            differ = ", ".join(f"{node} runs {recorded[node]}, not {wanted[node]}"
                               for node in recorded if recorded[node] != wanted[node])
            raise LabError(
                f"the lab of cluster {self.cluster} is up with other releases ({differ})",
                hint="homeclust lab down, then homeclust lab up with the releases you want",
            )

    def down(self) -> DownReport:
        """Remove every namespace, mount and process of this lab.  Idempotent, crash-safe."""
        with self._exclusive():
            return self._down()

    def _down(self) -> DownReport:
        started = time.monotonic()
        report = DownReport()
        namespaces = namespaces_for(self.cluster)
        inodes = {i for i in (netns_inode(ns) for ns in namespaces) if i is not None}

        node_dirs = sorted(self.paths.nodes.iterdir()) if self.paths.nodes.exists() else []
        report.nodes_stopped = lab_nodes.power_off(
            [(d.name, self.paths.node(d.name)) for d in node_dirs])

        pidfiles = sorted(self.paths.run.glob("*.pid")) if self.paths.run.exists() else []
        report.processes_ended += end_all([read_pidfile(p) for p in pidfiles], timeout=5.0)
        # Anything the PID files missed (a crash between start and record):
        # processes inside our namespaces, or naming our state directory.
        programs = {"socat", "dnsmasq", "systemd-nspawn"}
        strays = processes_in_netns(inodes) + processes_mentioning(str(self.paths.root), programs)
        strays = [p for p in {p.pid: p for p in strays}.values() if p.pid != os.getpid()]
        report.processes_ended += end_all(strays)

        for mount in mounts_under(self.paths.root):
            unmount(mount)
            report.mounts_removed += 1
        present = [ns for ns in namespaces if netns_exists(ns)]
        delete_network(namespaces)
        report.namespaces_removed = present

        for directory in (self.paths.nodes, self.paths.run):
            remove_tree(directory)
        for file in (self.paths.inventory, self.paths.known_hosts, self.paths.state_file):
            file.unlink(missing_ok=True)
        self.paths.source_inventory.unlink(missing_ok=True)
        report.elapsed = time.monotonic() - started
        return report

    # ------------------------------------------------------------------
    # Per-node power
    # ------------------------------------------------------------------

    def status(self) -> LabStatus:
        state = self._state()
        if state is None:
            return LabStatus(cluster=self.cluster, phase="down")
        plan = self.plan
        node_states = []
        for node in plan.nodes:
            node_paths = self.paths.node(node.name)
            running = lab_nodes.is_node_running(node_paths)
            leader = read_pidfile(node_paths.leader_pid) if running else None
            node_states.append(NodeStatus(node.name, node.role, running,
                                          leader.pid if leader and is_running(leader) else None,
                                          release=node.release))
        services = tuple(
            (s.name, s.where, is_running(read_pidfile(self.paths.pidfile(s.name))))
            for s in self._services(plan)
        )
        namespaces = tuple((ns, netns_exists(ns)) for ns in plan.namespaces)
        return LabStatus(
            cluster=self.cluster, phase=state.phase, nodes=tuple(node_states),
            services=services, namespaces=namespaces,
            inventory_path=self.paths.inventory if self.paths.inventory.exists() else None,
            ssh_port=plan.ssh_port, dhcp=state.dhcp,
            uplink=self._describe_uplink(plan) if all(e for _, e in namespaces) else None,
            apt_cache=self.apt_cache_stats(),
        )

    # ------------------------------------------------------------------
    # The world outside: uplink and package mirror
    # ------------------------------------------------------------------

    def set_uplink(self, rate: str | None, delay_ms: int = 0) -> lab_uplink.Uplink:
        """Make the lab's uplink slow: ``rate`` a tc rate ("4mbit"; None: unlimited),
        ``delay_ms`` added before each archive response.  Replaces any earlier setting.

        The rate is a tbf on both ends of the internet host's cable (inside the
        lab's namespaces); the delay is the archive relay's, as this kernel may
        lack netem (see uplink.py).
        """
        wanted = lab_uplink.make_uplink(rate, delay_ms)
        plan = self.plan
        missing = [ns for ns in plan.namespaces if not netns_exists(ns)]
        if missing:
            raise LabError(f"the lab's namespaces are missing: {', '.join(missing)}",
                           hint="homeclust lab down, then homeclust lab up")
        lab_uplink.apply_uplink(plan, self.paths.uplink, wanted)
        return wanted

    def uplink(self) -> lab_uplink.Uplink:
        """The uplink setting recorded by ``set_uplink`` (unlimited when never set)."""
        if self._state() is None:
            raise LabError(f"the lab of cluster {self.cluster} is not up", hint="homeclust lab up")
        return lab_uplink.recorded_uplink(self.paths.uplink)

    def _describe_uplink(self, plan: LabPlan) -> str:
        wanted = lab_uplink.recorded_uplink(self.paths.uplink)
        shown = lab_uplink.read_shaping(plan)
        text = wanted.describe()
        disagree = [f"{port}: {lab_uplink.format_rate(rate)}" for port, rate in shown.items()
                    if rate != wanted.rate_bps]
        if disagree:
            text += f" -- but the kernel shows {', '.join(disagree)}"
        return text

    def apt_cache_stats(self) -> AptCacheStats:
        """Counters of this lab's archive relay since ``up``: hits, misses, bytes from upstream.

        Take one before and one after an action and subtract them to see what
        that action cost, e.g. ``(after - before).upstream_bytes == 0``.
        """
        try:
            with open(self.paths.apt_cache_stats, encoding="utf-8", errors="replace") as log:
                return summarize(log)
        except FileNotFoundError:
            return AptCacheStats()

    def stop(self, node: str) -> None:
        """Power a node off (clean shutdown); its disk is kept."""
        plan = self.plan
        plan.node(node)
        lab_nodes.power_off([(node, self.paths.node(node))])

    def start(self, node: str, *, timeout: float = READY_TIMEOUT) -> None:
        """Power a node on and wait until its SSH answers."""
        plan = self.plan
        plan.node(node)
        self._power_on(plan, node)
        self.wait_ssh(node, timeout=timeout)

    def reboot(self, node: str, *, timeout: float = READY_TIMEOUT) -> None:
        """Stop and start a node: its files survive, like a real reboot."""
        self.stop(node)
        self.start(node, timeout=timeout)

    def reset(self, node: str, *, timeout: float = READY_TIMEOUT) -> None:
        """Make a node pristine again: stop it, wipe its disk, boot it fresh."""
        plan = self.plan
        lab_node = plan.node(node)
        node_paths = self.paths.node(node)
        lab_nodes.power_off([(node, node_paths)])
        lab_nodes.wipe_disk(node_paths)
        self._forget_host_keys(plan, node)
        lab_nodes.mount_disk(node_paths, self._rootfs(lab_node.release))
        lab_nodes.write_first_boot_files(
            plan, lab_node, node_paths.merged, self.paths.admin_key.with_suffix(".pub").read_text())
        lab_nodes.power_on(plan, lab_node, self.paths)
        self.wait_ssh(node, timeout=timeout)

    def _power_on(self, plan: LabPlan, node: str) -> None:
        node_paths = self.paths.node(node)
        lab_node = plan.node(node)
        lab_nodes.mount_disk(node_paths, self._rootfs(lab_node.release))
        lab_nodes.power_on(plan, lab_node, self.paths)

    def _rootfs(self, release: str) -> Path:
        """The cached rootfs this lab's nodes of ``release`` boot from."""
        state = self._state()
        if state is None:
            raise LabError(f"the lab of cluster {self.cluster} is not up", hint="homeclust lab up")
        return Path(state.rootfs_of(release))

    # ------------------------------------------------------------------
    # Looking inside (for tests and the demo)
    # ------------------------------------------------------------------

    def exec(
        self,
        node: str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as root inside ``node`` (all its namespaces), without SSH."""
        self.plan.node(node)
        pid = lab_nodes.leader_pid(node, self.paths.node(node))
        command = ["nsenter", "-t", str(pid), "-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w",
                   "--", *_NODE_ENV, *argv]
        return run(command, check=check, timeout=timeout, input=input)

    def exec_internet(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a command of this machine inside the internet host's namespace."""
        return run(in_netns(self.plan.internet_netns, argv), check=check, timeout=timeout)

    def exec_admin(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a command of this machine inside the admin host's namespace."""
        return run(in_netns(self.plan.admin_netns, argv), check=check, timeout=timeout)

    def dhcp_leases(self) -> list[render.DhcpLease]:
        """The institute DHCP server's leases (with the client id each client sent)."""
        try:
            return render.parse_dnsmasq_leases(self.paths.dnsmasq_leases.read_text())
        except FileNotFoundError:
            return []

    def wait_ssh(self, node: str, *, timeout: float = READY_TIMEOUT) -> None:
        """Wait until ``node``'s sshd answers (the master: through the admin's forward)."""
        plan = self.plan
        lab_node = plan.node(node)
        node_paths = self.paths.node(node)
        deadline = time.monotonic() + timeout
        while True:
            if not lab_nodes.is_node_running(node_paths):
                raise LabError(
                    f"lab node {node} stopped while booting",
                    hint=f"see its console log: {self.paths.log(node)}",
                )
            if self._ssh_answers(plan, lab_node.name, lab_node.role == "master"):
                return
            if time.monotonic() > deadline:
                raise LabError(
                    f"lab node {node} did not answer SSH within {timeout:g} s",
                    hint=f"see its console log: {self.paths.log(node)}",
                )
            time.sleep(0.2)

    def _ssh_answers(self, plan: LabPlan, node: str, is_master: bool) -> bool:
        if is_master:
            return ssh_banner(("127.0.0.1", plan.ssh_port))
        # Probe a worker from the master, the way homeclust reaches it (the master's
        # neighbour cache may still hold a failed entry from before a reboot); from
        # the worker itself when the master is down.
        try:
            pid = lab_nodes.leader_pid(plan.master.name, self.paths.node(plan.master.name))
        except LabError:
            try:
                pid = lab_nodes.leader_pid(node, self.paths.node(node))
            except LabError:
                return False
        address = str(plan.node(node).private_address.ip)
        probe = ["nsenter", "-t", str(pid), "-n", "--", sys.executable, "-c",
                 _SSH_BANNER_PROBE, address]
        return run(probe, check=False, timeout=10).returncode == 0

    # ------------------------------------------------------------------
    # Helpers
    # ------------------------------------------------------------------

    def _wait_ready(self, plan: LabPlan, names: list[str], timeout: float) -> None:
        with ThreadPoolExecutor(max_workers=min(16, len(names))) as pool:
            futures = [pool.submit(self.wait_ssh, name, timeout=timeout) for name in names]
            for future in futures:
                future.result()

    def _check_services(self, plan: LabPlan) -> None:
        for service in self._services(plan):
            if not is_running(read_pidfile(self.paths.pidfile(service.name))):
                raise _service_died(service, self.paths.log(service.name))

    def _preflight(self) -> None:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (namespaces, mounts, containers)",
                           hint="run as root, e.g. sudo homeclust lab up")
        missing = missing_tools()
        if missing:
            raise LabError(f"missing tools: {', '.join(missing)}",
                           hint="run scripts/setup (installs systemd-container, debootstrap, "
                                "dnsmasq-base, socat, iproute2, iptables)")

    def _free_port(self) -> int:
        first = default_ssh_port(self.cluster)
        for port in range(first, first + 200):
            if port_free(port):
                return port
        raise LabError(f"no free loopback port in {first}-{first + 199} for the master's SSH")

    def _raise_inotify_limit(self, nodes: int) -> None:
        running_elsewhere = _running_containers()
        needed = INOTIFY_BASE + INOTIFY_PER_NODE * (nodes + running_elsewhere)
        try:
            current = int(INOTIFY_SYSCTL.read_text())
        except (OSError, ValueError):
            return
        if current < needed:
            INOTIFY_SYSCTL.write_text(f"{needed}\n")
            self.progress(f"raised fs.inotify.max_user_instances from {current} to {needed} "
                          "(each node's systemd needs several)")

    def _ensure_admin_key(self) -> None:
        key = self.paths.admin_key
        if key.exists() and key.with_suffix(".pub").exists():
            return
        key.unlink(missing_ok=True)
        key.with_suffix(".pub").unlink(missing_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
             f"homeclust-lab-{self.cluster}", "-f", str(key)])

    def _write_lab_inventory(self, plan: LabPlan) -> None:
        with open(self.paths.source_inventory, "rb") as source:
            raw: dict[str, Any] = tomllib.load(source)
        data = render.render_lab_inventory(raw, plan, self.paths.admin_key,
                                           self.paths.known_hosts)
        header = (
            f"# homeclust lab inventory for cluster {plan.cluster!r}, written by "
            "`homeclust lab up`.\n"
            f"# Generated from {self.source_path}; the master is reached through the lab's\n"
            "# loopback forward. Removed by `homeclust lab down`.\n\n"
        )
        self.paths.inventory.write_text(header + tomli_w.dumps(data))
        load_inventory(self.paths.inventory)  # the lab's inventory must itself be valid

    def _forget_host_keys(self, plan: LabPlan, node: str) -> None:
        if not self.paths.known_hosts.exists():
            return
        lab_node = plan.node(node)
        hosts = {node, str(lab_node.private_address.ip)}
        if lab_node.role == "master":
            hosts |= {render.known_hosts_patterns("127.0.0.1", plan.ssh_port),
                      str(plan.master_public_address), *plan.master_public_names}
        text = self.paths.known_hosts.read_text()
        self.paths.known_hosts.write_text(render.forget_known_hosts(text, hosts))

    def _info(self, plan: LabPlan, elapsed: float, rootfs_seconds: float, *,
              already_up: bool = False) -> LabInfo:
        return LabInfo(
            cluster=plan.cluster, inventory_path=self.paths.inventory, ssh_port=plan.ssh_port,
            admin_key=self.paths.admin_key, known_hosts=self.paths.known_hosts,
            institute_network=plan.institute_network, internet_address=plan.internet_address,
            admin_address=plan.admin_address, master_public_address=plan.master_public_address,
            master_public_by_dhcp=not plan.master_public_static,
            nodes=tuple(n.name for n in plan.nodes), elapsed=elapsed, rootfs_seconds=rootfs_seconds,
            already_up=already_up, dhcp=plan.dhcp_mode,
            releases=tuple((n.name, n.release) for n in plan.nodes),
        )


def _service_died(service: Service, log: Path) -> LabError:
    try:
        tail = "\n".join(log.read_text().strip().splitlines()[-10:])
    except OSError:
        tail = ""
    return LabError(f"lab service {service.name} ({service.where}) is not running"
                    + (f"; its log says:\n{tail}" if tail else ""), hint=f"log: {log}")


def _running_containers() -> int:
    propagate = Path("/run/systemd/nspawn/propagate")
    try:
        return len(list(propagate.iterdir()))
    except OSError:
        return 0


def ssh_banner(address: tuple[str, int], timeout: float = 2.0) -> bool:
    """True if an SSH server answers at ``address`` (reads its banner, sends nothing)."""
    try:
        with socket.create_connection(address, timeout=timeout) as conn:
            conn.settimeout(timeout)
            return conn.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def host_networks() -> list[IPv4Network]:
    """This machine's own IPv4 networks (read only), which the lab must not overlap."""
    networks: list[IPv4Network] = []
    addrs = run(["ip", "-4", "-o", "addr", "show"], check=False).stdout
    for match in re.finditer(r"\binet (\d+\.\d+\.\d+\.\d+/\d+)", addrs):
        net = IPv4Network(match.group(1), strict=False)
        if not net.is_loopback:
            networks.append(net)
    routes = run(["ip", "-4", "route", "show"], check=False).stdout
    for line in routes.splitlines():
        first = line.split()[0] if line.split() else ""
        if first and first != "default":
            try:
                networks.append(IPv4Network(first if "/" in first else f"{first}/32",
                                            strict=False))
            except ValueError:
                continue
    return networks
