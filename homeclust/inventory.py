"""The inventory: a typed, validated model of ``inventory.toml``.

This is the only module that reads TOML.  Loading either returns a complete,
frozen :class:`Inventory` (every default filled in) or raises
:class:`~homeclust.errors.InventoryError` naming the file, the table and the key
that is wrong -- before any host is contacted.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any, Literal, TypeVar

from homeclust import quoting
from homeclust.errors import InventoryError, UsageError

Role = Literal["master", "worker"]

DEFAULT_INVENTORY = "inventory.toml"


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    private_network: IPv4Network
    dns: tuple[IPv4Address, ...]


@dataclass(frozen=True)
class SshSpec:
    user: str
    key: Path
    known_hosts: Path
    port: int
    connect_timeout: float
    command_timeout: float

    @property
    def uses_sudo(self) -> bool:
        """Every remote command runs through ``sudo -n`` unless we log in as root."""
        return self.user != "root"


@dataclass(frozen=True)
class MasterSpec:
    name: str
    address: str
    port: int
    public_interface: str
    public_boot: Literal["dhcp", "static"]
    public_address: IPv4Interface | None
    public_gateway: IPv4Address | None
    dhcp_client_id: str
    private_interface: str
    private_address: IPv4Address
    slots: int
    compute: bool
    #: Whether ``slots`` was written in the inventory (else it is the default, 1).
    slots_given: bool = False


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    private_address: IPv4Address
    interface: str
    slots: int
    slots_given: bool = False


@dataclass(frozen=True)
class NatSpec:
    conntrack_max: int
    tcp_timeout_established: int


@dataclass(frozen=True)
class FirewallSpec:
    ssh_from: tuple[IPv4Network | IPv6Network, ...]  # IPv6 networks open SSH over IPv6
    public_tcp_ports: tuple[int, ...]
    log_dropped: bool


@dataclass(frozen=True)
class RepoSpec:
    packages: tuple[str, ...]


@dataclass(frozen=True)
class SchedulerSpec:
    kind: Literal["torque", "slurm"]


@dataclass(frozen=True)
class Fail2banSpec:
    maxretry: int
    bantime: int


@dataclass(frozen=True)
class MonitorSpec:
    tools: tuple[str, ...]
    fail2ban: Fail2banSpec


@dataclass(frozen=True)
class UserSpec:
    """A person who runs jobs: the same account (name, uid, gid) on every node."""

    name: str
    uid: int
    gid: int
    shell: str

    @property
    def home(self) -> str:
        """Where the account lives on every node (useradd's default; not configurable)."""
        return f"/home/{self.name}"


@dataclass(frozen=True)
class CheckSpec:
    """How ``homeclust check`` probes egress from the workers.

    ``egress_url`` is an ``http://`` URL that answers with the caller's address
    (the lab provides one).  Without it, egress is probed with a TCP connection
    to the first DNS server on port 53.
    """

    egress_url: str | None
    expect_master_address: bool


@dataclass(frozen=True)
class Node:
    """What every step needs to know about one machine, master or worker."""

    name: str
    role: Role
    private_address: IPv4Address
    private_interface: str
    slots: int
    compute: bool
    #: ``slots`` was written in the inventory: schedulers use it instead of the CPUs
    #: they find (the default of 1 is for MPI hostfiles, not a node's size).
    slots_given: bool = False

    @property
    def is_master(self) -> bool:
        return self.role == "master"


@dataclass(frozen=True)
class Inventory:
    path: Path
    cluster: ClusterSpec
    ssh: SshSpec
    master: MasterSpec
    workers: tuple[WorkerSpec, ...]
    nat: NatSpec
    firewall: FirewallSpec
    repo: RepoSpec
    scheduler: SchedulerSpec
    monitor: MonitorSpec
    check: CheckSpec
    users: tuple[UserSpec, ...] = ()
    nodes: tuple[Node, ...] = field(init=False)

    def __post_init__(self) -> None:
        m = self.master
        master_node = Node(
            name=m.name,
            role="master",
            private_address=m.private_address,
            private_interface=m.private_interface,
            slots=m.slots,
            compute=m.compute,
            slots_given=m.slots_given,
        )
        workers = tuple(
            Node(
                name=w.name,
                role="worker",
                private_address=w.private_address,
                private_interface=w.interface,
                slots=w.slots,
                compute=True,
                slots_given=w.slots_given,
            )
            for w in self.workers
        )
        object.__setattr__(self, "nodes", (master_node, *workers))

    @property
    def master_node(self) -> Node:
        return self.nodes[0]

    @property
    def worker_nodes(self) -> tuple[Node, ...]:
        return self.nodes[1:]

    @property
    def state_dir(self) -> Path:
        """Where homeclust keeps this cluster's logs on the admin machine."""
        base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
        return Path(base) / "homeclust" / self.cluster.name

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise UsageError(
            f"unknown host {name!r}",
            hint=_suggest(name, [n.name for n in self.nodes], "hosts in the inventory"),
        )

    def select(self, names: Sequence[str] | None) -> tuple[Node, ...]:
        """The nodes named on the command line (all when ``names`` is empty), master first."""
        if not names:
            return self.nodes
        wanted = {self.node(name).name for name in names}
        return tuple(n for n in self.nodes if n.name in wanted)

    def ssh_target(self, node: Node) -> tuple[str, int]:
        """Address and port homeclust connects to (workers: as seen from the master)."""
        if node.is_master:
            return self.master.address, self.master.port
        return str(node.private_address), self.ssh.port


def _suggest(value: str, choices: Iterable[str], what: str) -> str:
    choices = list(choices)
    close = difflib.get_close_matches(value, choices, n=1)
    listing = ", ".join(choices) if choices else "(none)"
    if close:
        return f"did you mean {close[0]!r}? {what}: {listing}"
    return f"{what}: {listing}"


T = TypeVar("T")


class _Table:
    """Reads one TOML table, remembering which keys were used.

    ``finish()`` reports the first key nobody asked for, so a typo such as
    ``privat_address`` is an error instead of being silently ignored.
    """

    def __init__(self, path: Path, name: str, data: Any, label: str | None = None) -> None:
        self.path = str(path)
        self.name = name
        self.label = label or name
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise InventoryError(
                f"must be a table, got {type(data).__name__}", path=self.path, table=self.label
            )
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def error(self, key: str | None, message: str, hint: str | None = None) -> InventoryError:
        return InventoryError(message, path=self.path, table=self.label, key=key, hint=hint)

    def _get(self, key: str, kind: type | tuple[type, ...], default: Any, required: bool) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required:
                raise self.error(key, "is required")
            return default
        value = self.data[key]
        # bool is an int in Python; never accept true/false where a number is meant.
        if isinstance(value, bool) and kind is not bool and not (
            isinstance(kind, tuple) and bool in kind
        ):
            raise self.error(key, f"must be {_kind_name(kind)}, got {value!r}")
        if not isinstance(value, kind):
            raise self.error(key, f"must be {_kind_name(kind)}, got {value!r}")
        return value

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str:
        value = self._get(key, str, default, required)
        if value is not None and not value.strip():
            raise self.error(key, "must not be empty")
        return value  # type: ignore[no-any-return]

    def optional_string(self, key: str) -> str | None:
        value = self._get(key, str, None, False)
        return value  # type: ignore[no-any-return]

    def integer(self, key: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
        value: int = self._get(key, int, default, False)
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and at most {maximum}" if maximum is not None else ""
            raise self.error(key, f"must be at least {minimum}{upper}, got {value}")
        return value

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        value = self._get(key, (int, float), default, False)
        if value <= minimum:
            raise self.error(key, f"must be greater than {minimum}, got {value}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        return self._get(key, bool, default, False)  # type: ignore[no-any-return]

    def string_list(self, key: str, default: Sequence[str]) -> tuple[str, ...]:
        value = self._get(key, list, list(default), False)
        for item in value:
            if not isinstance(item, str) or not item.strip():
                raise self.error(key, f"must be a list of non-empty strings, got {item!r}")
        return tuple(value)

    def package_list(self, key: str, default: Sequence[str]) -> tuple[str, ...]:
        """Package names: they end up on a package manager's command line as root."""
        names = self.string_list(key, default)
        for name in names:
            if not quoting.is_package(name):
                raise self.error(
                    key, f"{name!r} is not a package name",
                    hint="letters, digits and '.', '_', '+', '-', starting with a letter or digit "
                    "(Debian's and RPM's package-name grammar)")
        return tuple(dict.fromkeys(names))  # a name listed twice is one package

    def int_list(self, key: str, default: Sequence[int]) -> tuple[int, ...]:
        value = self._get(key, list, list(default), False)
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= 65535:
                raise self.error(key, f"must be a list of TCP ports (1-65535), got {item!r}")
        return tuple(value)

    def choice(self, key: str, default: str, choices: Sequence[str]) -> str:
        value = self.string(key, default)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def address(self, key: str, *, required: bool = True) -> IPv4Address | None:
        raw = self._get(key, str, None, required)
        if raw is None:
            return None
        try:
            return IPv4Address(raw)
        except ValueError:
            raise self.error(key, f"is not an IPv4 address: {raw!r}") from None

    def required_address(self, key: str) -> IPv4Address:
        address = self.address(key, required=True)
        if address is None:  # _get raised "is required" already
            raise self.error(key, "is required")
        return address

    def network(self, key: str, default: str) -> IPv4Network:
        raw = self.string(key, default)
        return _parse_network(raw, lambda msg, hint=None: self.error(key, msg, hint))

    def sub(self, key: str) -> _Table:
        self.used.add(key)
        return _Table(Path(self.path), f"{self.name}.{key}", self.data.get(key), f"{self.label}.{key}")

    def finish(self) -> None:
        for key in self.data:
            if key not in self.used:
                raise self.error(
                    key, "unknown key", hint=_suggest(key, sorted(self.used), "known keys")
                )


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


def _parse_network(raw: str, error: Any) -> IPv4Network:
    network = _parse_any_network(raw, error, versions=(4,))
    if not isinstance(network, IPv4Network):  # _parse_any_network refused the others
        raise error(f"is not an IPv4 network in CIDR form: {raw!r}")
    return network


def _parse_any_network(raw: str, error: Any, versions: tuple[int, ...] = (4, 6)
                       ) -> IPv4Network | IPv6Network:
    """A network in CIDR form with its host bits zero, of one of ``versions``."""
    kind = " or ".join(f"IPv{v}" for v in versions)
    try:
        network = ip_network(raw, strict=True)
    except ValueError as exc:
        try:
            loose = ip_network(raw, strict=False)
        except ValueError:
            raise error(f"is not an {kind} network in CIDR form: {raw!r} ({exc})") from None
        if loose.version in versions:
            raise error(f"has host bits set: {raw!r}", f"did you mean {str(loose)!r}?") from None
        network = loose
    if network.version not in versions:
        raise error(f"is not an {kind} network in CIDR form: {raw!r}")
    return network


_TOP_LEVEL = ("cluster", "ssh", "master", "workers", "users", "nat", "firewall", "repo",
              "scheduler", "monitor", "check")

_USER_NAME_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_SHELL_RE = re.compile(r"^/[A-Za-z0-9/._-]+$")
#: Accounts every system has or that homeclust itself manages: never a cluster user.
_RESERVED_USERS = frozenset({
    "root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp",
    "proxy", "www-data", "backup", "list", "irc", "gnats", "nobody", "systemd-network",
    "systemd-resolve", "messagebus", "sshd", "munge", "slurm", "nginx", "adm", "operator",
    "halt", "shutdown", "ftp", "polkitd", "chrony", "tss", "_apt",
})
#: First uid/gid given to cluster users without an explicit one (above distributions'
#: ranges for people created by installers, 1000-1999).
FIRST_CLUSTER_UID = 2000


def load_inventory(path: str | os.PathLike[str] = DEFAULT_INVENTORY) -> Inventory:
    """Read, validate and resolve an inventory file."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise InventoryError(
            "file not found", path=str(file),
            hint="pass -i PATH, or create inventory.toml (see README: Inventory)",
        ) from None
    except OSError as exc:
        raise InventoryError(f"cannot read: {exc.strerror}", path=str(file)) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InventoryError("is not UTF-8 text", path=str(file)) from None
    except tomllib.TOMLDecodeError as exc:
        raise InventoryError(f"is not valid TOML: {exc}", path=str(file)) from None
    return parse_inventory(data, file)


def parse_inventory(data: Mapping[str, Any], path: Path) -> Inventory:
    """Validate an already-parsed TOML document (``path`` is used in messages and for
    resolving relative key paths)."""
    for key in data:
        if key not in _TOP_LEVEL:
            raise InventoryError(
                "unknown table", path=str(path), table=key,
                hint=_suggest(key, _TOP_LEVEL, "known tables"),
            )
    base_dir = path.parent if str(path.parent) else Path(".")

    cluster_t = _Table(path, "cluster", data.get("cluster"))
    cluster_name = cluster_t.string("name", "homeclust")
    if not quoting.CLUSTER_NAME_RE.fullmatch(cluster_name):
        raise cluster_t.error("name", f"must be letters, digits, '.', '_' or '-'; got {cluster_name!r}")
    network = cluster_t.network("private_network", "192.168.10.0/24")
    if network.prefixlen > 30:
        raise cluster_t.error("private_network", f"/{network.prefixlen} leaves no room for nodes")
    dns_raw = cluster_t.string_list("dns", ["8.8.8.8"])
    dns: list[IPv4Address] = []
    for item in dns_raw:
        try:
            dns.append(IPv4Address(item))
        except ValueError:
            raise cluster_t.error("dns", f"is not an IPv4 address: {item!r}") from None
    if not dns:
        raise cluster_t.error("dns", "needs at least one server (the workers resolve through it)")
    cluster_t.finish()
    cluster = ClusterSpec(cluster_name, network, tuple(dns))

    ssh_t = _Table(path, "ssh", data.get("ssh"))
    user = ssh_t.string("user", "root")
    if not quoting.USER_RE.fullmatch(user):
        raise ssh_t.error("user", f"{user!r} is not a user name",
                          hint="letters, digits, '_', '.' and '-', not starting with '-' or a digit")
    key_path = _resolve_path(ssh_t.string("key", "~/.ssh/id_ed25519"), base_dir)
    known_hosts_raw = ssh_t.optional_string("known_hosts")
    ssh_port = ssh_t.integer("port", 22, minimum=1, maximum=65535)
    connect_timeout = ssh_t.number("connect_timeout", 10.0)
    command_timeout = ssh_t.number("command_timeout", 900.0)
    ssh_t.finish()
    state_base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    known_hosts = (
        _resolve_path(known_hosts_raw, base_dir)
        if known_hosts_raw
        else Path(state_base) / "homeclust" / cluster_name / "known_hosts"
    )
    ssh = SshSpec(user, key_path, known_hosts, ssh_port, connect_timeout, command_timeout)

    master = _parse_master(path, data.get("master"), network, ssh_port)
    workers = _parse_workers(path, data.get("workers"), network)
    _check_unique(path, master, workers)

    nat_t = _Table(path, "nat", data.get("nat"))
    nat = NatSpec(
        conntrack_max=nat_t.integer("conntrack_max", 131072, minimum=1024),
        tcp_timeout_established=nat_t.integer("tcp_timeout_established", 86400, minimum=60),
    )
    nat_t.finish()

    fw_t = _Table(path, "firewall", data.get("firewall"))
    ssh_from = tuple(
        _parse_any_network(item, lambda msg, hint=None: fw_t.error("ssh_from", msg, hint))
        for item in fw_t.string_list("ssh_from", ["0.0.0.0/0"])
    )
    if not ssh_from:
        raise fw_t.error(
            "ssh_from", "is empty: nobody could reach the master's SSH from the public side",
            hint="list the networks your admin machine connects from, e.g. [\"0.0.0.0/0\"]",
        )
    firewall = FirewallSpec(
        ssh_from=ssh_from,
        public_tcp_ports=tuple(dict.fromkeys(fw_t.int_list("public_tcp_ports", [22]))),
        log_dropped=fw_t.boolean("log_dropped", True),
    )
    fw_t.finish()

    repo_t = _Table(path, "repo", data.get("repo"))
    repo = RepoSpec(packages=repo_t.package_list("packages", []))
    repo_t.finish()

    sched_t = _Table(path, "scheduler", data.get("scheduler"))
    scheduler = SchedulerSpec(kind=sched_t.choice("kind", "torque", ("torque", "slurm")))  # type: ignore[arg-type]
    sched_t.finish()

    mon_t = _Table(path, "monitor", data.get("monitor"))
    tools = mon_t.package_list("tools", ["tcpdump", "nmap", "iftop"])
    f2b_t = mon_t.sub("fail2ban")
    fail2ban = Fail2banSpec(
        maxretry=f2b_t.integer("maxretry", 5, minimum=1),
        bantime=f2b_t.integer("bantime", 3600, minimum=1),
    )
    f2b_t.finish()
    mon_t.finish()
    monitor = MonitorSpec(tools, fail2ban)

    check_t = _Table(path, "check", data.get("check"))
    egress_url = check_t.optional_string("egress_url")
    # Workers fetch it in `check` (as root): only a grammar with nothing special in it.
    if egress_url is not None and quoting.split_egress_url(egress_url) is None:
        raise check_t.error(
            "egress_url", f"must be a plain http:// URL (host[:port]/path), got {egress_url!r}",
            hint="host: a DNS name or IPv4 address; port: 1-65535; path: letters, digits "
            "and '/', '-', '.', '_', '~'",
        )
    check = CheckSpec(
        egress_url=egress_url,
        expect_master_address=check_t.boolean("expect_master_address", False),
    )
    check_t.finish()

    users = _parse_users(path, data.get("users"))

    return Inventory(
        path=path, cluster=cluster, ssh=ssh, master=master, workers=workers, nat=nat,
        firewall=firewall, repo=repo, scheduler=scheduler, monitor=monitor, check=check,
        users=users,
    )


def _parse_users(path: Path, data: Any) -> tuple[UserSpec, ...]:
    """``[[users]]``: name, optional uid/gid (default: 2000 + position), shell."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise InventoryError("must be an array of tables ([[users]])", path=str(path),
                             table="users")
    users: list[UserSpec] = []
    names: dict[str, str] = {}
    uids: dict[int, str] = {}
    gids: dict[int, str] = {}
    for index, item in enumerate(data, start=1):
        label = (f"users #{index} ({item['name']})" if isinstance(item, dict)
                 and isinstance(item.get("name"), str) else f"users #{index}")
        t = _Table(path, "users", item, label)
        name = t.string("name", required=True)
        if not _USER_NAME_RE.fullmatch(name):
            raise t.error("name", f"{name!r} is not a valid user name",
                          hint="lower-case letters, digits, '_' and '-', starting with a letter "
                          "or '_', at most 32 characters")
        if name in _RESERVED_USERS:
            raise t.error("name", f"{name!r} is a system account, not a person who runs jobs")
        default_id = FIRST_CLUSTER_UID + index - 1
        uid = t.integer("uid", default_id, minimum=1000, maximum=60000)
        gid = t.integer("gid", uid, minimum=1000, maximum=60000)
        shell = t.string("shell", "/bin/bash")
        if not _SHELL_RE.fullmatch(shell):
            raise t.error("shell", f"must be an absolute path to a shell, got {shell!r}")
        t.finish()
        if name in names:
            raise t.error("name", f"duplicate user name {name!r} (also {names[name]})")
        if uid in uids:
            raise t.error("uid", f"duplicate uid {uid} (also used by {uids[uid]})")
        if gid in gids:
            raise t.error("gid", f"duplicate gid {gid} (also used by {gids[gid]})")
        names[name], uids[uid], gids[gid] = label, label, label
        users.append(UserSpec(name, uid, gid, shell))
    return tuple(users)


def _resolve_path(raw: str, base_dir: Path) -> Path:
    expanded = Path(os.path.expanduser(raw))
    return expanded if expanded.is_absolute() else (base_dir / expanded).resolve()


def _check_name(table: _Table, key: str, value: str) -> str:
    if not quoting.is_hostname(value):
        raise table.error(
            key, f"{value!r} is not a valid host name",
            hint="use lower-case letters, digits and '-', at most 63 characters",
        )
    return value


def _check_interface(table: _Table, key: str, value: str) -> str:
    if not quoting.is_interface(value):
        raise table.error(
            key, f"{value!r} is not a valid interface name",
            hint="at most 15 letters, digits, '_', '.' and '-', not starting with '-' or '.'")
    return value


def _check_private(table: _Table, key: str, address: IPv4Address, network: IPv4Network) -> None:
    if address not in network:
        raise table.error(key, f"{address} is outside private_network {network}")
    if address == network.network_address:
        raise table.error(key, f"{address} is the network address of {network}")
    if address == network.broadcast_address:
        raise table.error(key, f"{address} is the broadcast address of {network}")


def _parse_master(path: Path, data: Any, network: IPv4Network, ssh_port: int) -> MasterSpec:
    if data is None:
        raise InventoryError("table is required", path=str(path), table="master")
    t = _Table(path, "master", data)
    name = _check_name(t, "name", t.string("name", required=True))
    address = t.string("address", required=True)
    if not (quoting.is_dns_name(address) or quoting.is_address(address)):
        raise t.error("address", f"{address!r} is neither a DNS name nor an IP address")
    port = t.integer("port", ssh_port, minimum=1, maximum=65535)
    public_interface = _check_interface(t, "public_interface", t.string("public_interface", "eth0"))
    private_interface = _check_interface(t, "private_interface", t.string("private_interface", "eth1"))
    if public_interface == private_interface:
        raise t.error("private_interface", f"is the same as public_interface ({public_interface})")
    public_boot = t.choice("public_boot", "dhcp", ("dhcp", "static"))
    public_address: IPv4Interface | None = None
    public_gateway: IPv4Address | None = None
    raw_public = t.optional_string("public_address")
    if raw_public is not None:
        try:
            public_address = IPv4Interface(raw_public)
        except ValueError:
            raise t.error(
                "public_address", f"must be an address with prefix, e.g. 10.0.0.5/24; got {raw_public!r}"
            ) from None
        if "/" not in raw_public:
            raise t.error("public_address", f"needs a prefix length, e.g. {raw_public}/24")
    public_gateway = t.address("public_gateway", required=False)
    if public_boot == "static":
        if public_address is None:
            raise t.error("public_address", "is required when public_boot = \"static\"")
        if public_gateway is None:
            raise t.error("public_gateway", "is required when public_boot = \"static\"")
        if public_gateway not in public_address.network:
            raise t.error(
                "public_gateway", f"{public_gateway} is not in the public subnet {public_address.network}"
            )
        if public_gateway == public_address.ip:
            raise t.error("public_gateway", "is the master's own public address")
        if public_address.network.overlaps(network):
            raise t.error(
                "public_address",
                f"public subnet {public_address.network} overlaps private_network {network}",
            )
    elif public_address is not None or public_gateway is not None:
        key = "public_address" if public_address is not None else "public_gateway"
        raise t.error(key, "is only used with public_boot = \"static\"")
    dhcp_client_id = t.string("dhcp_client_id", name)
    # It is written into dhclient.conf, ifcfg files (sourced as shell) and keyfiles.
    if not quoting.CLIENT_ID_RE.fullmatch(dhcp_client_id):
        raise t.error("dhcp_client_id", f"{dhcp_client_id!r} is not a client id",
                      hint="1-64 letters, digits, '.', '_', ':' and '-', starting with a letter "
                      "or digit")
    private_address = t.required_address("private_address")
    # The master's private address is every worker's gateway and DNS forwarder:
    # it must be a usable host address inside the private network.
    _check_private(t, "private_address", private_address, network)
    slots = t.integer("slots", 1, minimum=1)
    compute = t.boolean("compute", True)
    t.finish()
    return MasterSpec(
        name=name, address=address, port=port, public_interface=public_interface,
        public_boot=public_boot,  # type: ignore[arg-type]
        public_address=public_address, public_gateway=public_gateway,
        dhcp_client_id=dhcp_client_id, private_interface=private_interface,
        private_address=private_address, slots=slots, compute=compute,
        slots_given="slots" in data,
    )


def _parse_workers(path: Path, data: Any, network: IPv4Network) -> tuple[WorkerSpec, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        raise InventoryError(
            "must be an array of tables ([[workers]])", path=str(path), table="workers"
        )
    workers = []
    for index, item in enumerate(data, start=1):
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            label = f"workers #{index} ({item['name']})"
        else:
            label = f"workers #{index}"
        t = _Table(path, "workers", item, label)
        name = _check_name(t, "name", t.string("name", required=True))
        address = t.required_address("private_address")
        _check_private(t, "private_address", address, network)
        interface = _check_interface(t, "interface", t.string("interface", "eth0"))
        slots = t.integer("slots", 1, minimum=1)
        t.finish()
        workers.append(WorkerSpec(name, address, interface, slots, slots_given="slots" in item))
    return tuple(workers)


def _check_unique(path: Path, master: MasterSpec, workers: Sequence[WorkerSpec]) -> None:
    names: dict[str, str] = {master.name: "master"}
    addresses: dict[IPv4Address, str] = {master.private_address: f"master ({master.name})"}
    for index, worker in enumerate(workers, start=1):
        label = f"workers #{index} ({worker.name})"
        if worker.name in names:
            raise InventoryError(
                f"duplicate host name {worker.name!r} (also used by {names[worker.name]})",
                path=str(path), table=label, key="name",
            )
        names[worker.name] = label
        if worker.private_address in addresses:
            other = addresses[worker.private_address]
            what = "the master's private address, the workers' gateway" if other.startswith(
                "master") else f"used by {other}"
            raise InventoryError(
                f"duplicate address {worker.private_address} ({what})",
                path=str(path), table=label, key="private_address",
            )
        addresses[worker.private_address] = label


def inventory_summary(inventory: Inventory) -> dict[str, Any]:
    """The resolved inventory as plain data (for ``homeclust inventory`` and ``--json``)."""
    m = inventory.master
    return {
        "path": str(inventory.path),
        "cluster": {
            "name": inventory.cluster.name,
            "private_network": str(inventory.cluster.private_network),
            "dns": [str(d) for d in inventory.cluster.dns],
        },
        "ssh": {
            "user": inventory.ssh.user,
            "key": str(inventory.ssh.key),
            "known_hosts": str(inventory.ssh.known_hosts),
            "port": inventory.ssh.port,
            "sudo": inventory.ssh.uses_sudo,
            "connect_timeout": inventory.ssh.connect_timeout,
            "command_timeout": inventory.ssh.command_timeout,
        },
        "master": {
            "name": m.name,
            "address": m.address,
            "port": m.port,
            "public_interface": m.public_interface,
            "public_boot": m.public_boot,
            "public_address": str(m.public_address) if m.public_address else None,
            "public_gateway": str(m.public_gateway) if m.public_gateway else None,
            "dhcp_client_id": m.dhcp_client_id,
            "private_interface": m.private_interface,
            "private_address": str(m.private_address),
            "slots": m.slots,
            "compute": m.compute,
        },
        "workers": [
            {"name": w.name, "private_address": str(w.private_address),
             "interface": w.interface, "slots": w.slots}
            for w in inventory.workers
        ],
        "nat": {
            "conntrack_max": inventory.nat.conntrack_max,
            "tcp_timeout_established": inventory.nat.tcp_timeout_established,
        },
        "firewall": {
            "ssh_from": [str(n) for n in inventory.firewall.ssh_from],
            "public_tcp_ports": list(inventory.firewall.public_tcp_ports),
            "log_dropped": inventory.firewall.log_dropped,
        },
        "repo": {"packages": list(inventory.repo.packages)},
        "scheduler": {"kind": inventory.scheduler.kind},
        "users": [{"name": u.name, "uid": u.uid, "gid": u.gid, "shell": u.shell}
                  for u in inventory.users],
        "monitor": {
            "tools": list(inventory.monitor.tools),
            "fail2ban": {
                "maxretry": inventory.monitor.fail2ban.maxretry,
                "bantime": inventory.monitor.fail2ban.bantime,
            },
        },
        "check": {
            "egress_url": inventory.check.egress_url,
            "expect_master_address": inventory.check.expect_master_address,
        },
    }
