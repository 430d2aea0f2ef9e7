"""Facts: what a host looks like right now, gathered in one SSH round trip.

A fact is a shell command plus a pure parser.  :func:`gather_script` joins the
commands of every section into one POSIX shell script whose output is a series
of sections, each starting with a marker line; :func:`parse_facts` splits the
output and hands every section to its parser.  Parsers never do I/O, so they
are unit-tested from captured outputs of both platform families.

Facts cost what homeclust manages, not what the host has: a :class:`FactQuery`
(the union of what the run's steps declare) names the files, units,
packages and sysctls to report, whether the netfilter tables are needed, and
any step-specific :class:`Fact`.  A host with thousands of packages and unit
files answers as fast, and with as few bytes, as a minimal one.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, ip_address
from typing import Any, Generic, TypeVar, cast

from homeclust.changes import AS_ACCOUNT_SH
from homeclust.errors import FactError

MARKER = "@@homeclust-fact@@"

_T = TypeVar("_T")


@dataclass(frozen=True)
class Fact(Generic[_T]):
    """A step-specific fact: a read-only POSIX shell command and a pure parser of its output.

    ``name`` names the section (``x-NAME`` in the output) and the parsed value
    (:meth:`HostFacts.get`).  The command runs as root inside the facts script;
    it must never change anything and must not depend on the caller's shell.
    """

    name: str
    command: str
    parse: Callable[[str], _T] = field(compare=False)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", self.name):
            raise ValueError(f"fact names are lower-case words: {self.name!r}")


_PACKAGE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9+._-]*$")
_UNIT_NAME_RE = re.compile(r"^[A-Za-z0-9:_.@\\-]+\.(service|socket|timer|target|path|mount)$")
_SYSCTL_RE = re.compile(r"^[a-z0-9_]+(\.[a-zA-Z0-9_-]+)+$")
_ACCOUNT_RE = re.compile(r"^[a-z_][a-z0-9_-]*$")


@dataclass(frozen=True)
class FactQuery:
    """What one run needs to know about each host (the union of its steps' needs).

    ``paths`` are absolute paths or shell globs whose metadata and content are
    reported; contents of ``secret_paths`` (globs) are needed for planning but
    are never written to logs nor shown in diffs.  ``units`` are full unit
    names (``nginx.service``).
    """

    paths: frozenset[str] = frozenset()
    secret_paths: frozenset[str] = frozenset()
    #: ``(account, path)``: files in a directory that account controls (a cluster user's
    #: home), read *as that account*: a link or a directory it swaps in shows only what it
    #: could read itself, and its answer is checked to be about those paths alone.
    account_paths: frozenset[tuple[str, str]] = frozenset()
    account_secret_paths: frozenset[tuple[str, str]] = frozenset()
    units: frozenset[str] = frozenset()
    packages: frozenset[str] = frozenset()
    sysctls: frozenset[str] = frozenset()
    netfilter: bool = False
    virtualization: bool = False  # systemd-detect-virt (a process: only when a step asks)
    extra: tuple[Fact[Any], ...] = ()

    def __post_init__(self) -> None:
        for path in self.paths | self.secret_paths:
            _glob_word(path)
        for account, path in self.account_paths | self.account_secret_paths:
            if not _ACCOUNT_RE.match(account) or account == "root":
                raise ValueError(f"not an account to read files as: {account!r}")
            _glob_word(path)
        for unit in self.units:
            if not _UNIT_NAME_RE.match(unit):
                raise ValueError(f"fact units are full unit names: {unit!r}")
        for package in self.packages:
            if not _PACKAGE_NAME_RE.match(package):
                raise ValueError(f"not a package name: {package!r}")
        for key in self.sysctls:
            if not _SYSCTL_RE.match(key):
                raise ValueError(f"not a sysctl key: {key!r}")
        names = [fact.name for fact in self.extra]
        if len(names) != len(set(names)):
            raise ValueError(f"two different facts share a name: {sorted(names)}")

    def __or__(self, other: FactQuery) -> FactQuery:
        extra = {fact.name: fact for fact in self.extra}
        for fact in other.extra:
            if fact.name in extra and extra[fact.name] != fact:
                raise ValueError(f"two different facts are named {fact.name!r}")
            extra.setdefault(fact.name, fact)
        return FactQuery(
            paths=self.paths | other.paths,
            secret_paths=self.secret_paths | other.secret_paths,
            account_paths=self.account_paths | other.account_paths,
            account_secret_paths=self.account_secret_paths | other.account_secret_paths,
            units=self.units | other.units,
            packages=self.packages | other.packages,
            sysctls=self.sysctls | other.sysctls,
            netfilter=self.netfilter or other.netfilter,
            virtualization=self.virtualization or other.virtualization,
            extra=tuple(extra[name] for name in sorted(extra)),
        )

#: Commands whose presence steps and the runner care about.
COMMANDS: tuple[str, ...] = (
    "systemd-run", "systemctl", "flock", "iptables", "iptables-save", "iptables-restore",
    "ip6tables-save", "ip6tables-restore",
    "ip6tables", "ifup", "ifdown", "dhclient", "netplan", "nmcli", "hostnamectl", "apt-get",
    "dnf", "yum", "rpm", "dpkg-query", "sha256sum", "base64", "curl", "sudo", "bash",
    "resolvconf",
)

#: Files larger than this are reported by hash only (managed files are small configs).
MAX_FILE_CONTENT = 256 * 1024

#: Where guarded transactions keep their state on a host (see homeclust.safety).
TXN_DIR = "/var/lib/homeclust/txn"


@dataclass(frozen=True)
class OsRelease:
    id: str
    id_like: tuple[str, ...]
    version_id: str
    pretty_name: str

    @property
    def major(self) -> int:
        match = re.match(r"(\d+)", self.version_id)
        return int(match.group(1)) if match else 0


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str | None
    up: bool
    addresses: tuple[IPv4Interface, ...] = ()
    addresses6: tuple[IPv6Interface, ...] = ()


@dataclass(frozen=True)
class Route:
    destination: str  # "default" or a CIDR
    gateway: IPv4Address | None
    device: str | None
    protocol: str | None = None

    @property
    def is_default(self) -> bool:
        return self.destination == "default"


@dataclass(frozen=True)
class Sysctl:
    value: str | None  # None: the key does not exist here (module not loaded, no such key)
    writable: bool


@dataclass(frozen=True)
class FileFact:
    path: str
    mode: int
    owner: str
    group: str
    sha256: str
    content: bytes | None  # None when the file is larger than MAX_FILE_CONTENT
    secret: bool = False  # never logged, never shown in a diff

    @property
    def text(self) -> str | None:
        return None if self.content is None else self.content.decode("utf-8", "replace")


@dataclass(frozen=True)
class ServiceState:
    enabled: str  # enabled, disabled, static, masked, … or "" when unknown / not installed
    active: bool
    loaded: bool = True  # False: no such unit on this host


@dataclass(frozen=True)
class Transaction:
    """A guarded change found on a host (see homeclust.safety), by its state files."""

    id: str
    state: str  # armed, applying, confirmed, rolling-back, rolledback, rollback-failed, …
    deadline: int | None  # when the host's own rollback fires (epoch seconds), if armed
    now: int  # the host's clock when the facts were read

    @property
    def seconds_left(self) -> int | None:
        return None if self.deadline is None else self.deadline - self.now


@dataclass(frozen=True)
class SshPeer:
    """``$SSH_CONNECTION`` as the host saw our session: who we are, where we arrived."""

    client_address: IPv4Address | IPv6Address
    client_port: int
    server_address: IPv4Address | IPv6Address
    server_port: int


@dataclass(frozen=True)
class HostFacts:
    os: OsRelease
    hostname: str
    virtualization: str
    interfaces: Mapping[str, Interface]
    routes: tuple[Route, ...]
    iptables_backend: str | None  # "nf_tables", "legacy" or None when iptables is missing
    iptables: Mapping[str, str]  # table name -> normalized iptables-save text of that table
    ip6tables: Mapping[str, str]  # the same for ip6tables-save
    ipv6: bool  # the kernel has IPv6 (then it must be firewalled too)
    sysctls: Mapping[str, Sysctl]
    packages: Mapping[str, str]  # name -> version (installed only)
    services: Mapping[str, ServiceState]
    files: Mapping[str, FileFact]  # only regular files that exist
    commands: frozenset[str]
    ssh_peer: SshPeer | None
    transactions: tuple[Transaction, ...] = ()
    extra: Mapping[str, object] = field(default_factory=dict)
    #: Managed paths that are symbolic links -> their target (never read through: what a
    #: link means is the step's decision, see ``steps.base.file_change``).
    links: Mapping[str, str] = field(default_factory=dict)

    def get(self, fact: Fact[_T]) -> _T:
        """The parsed value of a step-specific fact (FactError when it was not asked for)."""
        if fact.name not in self.extra:
            raise FactError(f"fact {fact.name!r} was not gathered (missing from the fact query)")
        return cast(_T, self.extra[fact.name])

    def file_text(self, path: str) -> str | None:
        fact = self.files.get(path)
        return fact.text if fact else None

    def has_command(self, name: str) -> bool:
        return name in self.commands

    def addresses_of(self, interface: str) -> tuple[IPv4Interface, ...]:
        found = self.interfaces.get(interface)
        return found.addresses if found else ()

    def default_routes(self) -> tuple[Route, ...]:
        return tuple(r for r in self.routes if r.is_default)

    def interface_with_address(self, address: IPv4Address | IPv6Address) -> str | None:
        for iface in self.interfaces.values():
            if any(a.ip == address for a in iface.addresses) or any(
                    a.ip == address for a in iface.addresses6):
                return iface.name
        return None

    def service_enabled(self, unit: str) -> bool:
        state = self.services.get(_unit(unit))
        return state is not None and state.enabled in ("enabled", "enabled-runtime", "alias")

    def service_exists(self, unit: str) -> bool:
        state = self.services.get(_unit(unit))
        return state is not None and state.loaded

    def service_active(self, unit: str) -> bool:
        state = self.services.get(_unit(unit))
        return state is not None and state.active


def _unit(name: str) -> str:
    return name if "." in name else f"{name}.service"


# --------------------------------------------------------------------------- script


#: Shell function: the state of the guarded transaction in directory ``$1``, from its
#: state files (see homeclust.safety; the order of the tests is the precedence).
TXN_STATE_SH = """\
hc_txn_state() {
  if [ -e "$1/rollback-failed" ]; then echo rollback-failed
  elif [ -e "$1/rolledback" ]; then echo rolledback
  elif [ -e "$1/rolling-back" ]; then echo rolling-back
  elif [ -e "$1/confirmed" ]; then echo confirmed
  elif [ -e "$1/armed" ] && [ -e "$1/apply.status" ] && [ "$(cat "$1/apply.status")" != 0 ]; then
    echo apply-failed
  elif [ -e "$1/armed" ] && [ -e "$1/apply.status" ]; then echo armed
  elif [ -e "$1/armed" ]; then echo applying
  else echo preparing
  fi
}
"""


def gather_script(query: FactQuery) -> str:
    """The one shell script that reports every fact section ``query`` asks for.

    The script is POSIX sh, runs as root (through sudo when needed) and never
    changes anything.  ``$1`` is the caller's ``$SSH_CONNECTION`` (sudo would
    strip it from the environment).  Sections the query does not need are not
    run at all: nothing here scales with what the host has installed.
    """
    command_words = " ".join(shlex.quote(c) for c in COMMANDS)
    parts = [f"""\
export LC_ALL=C PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
sec() {{ printf '\\n{MARKER} %s\\n' "$1"; }}
{TXN_STATE_SH}sec os-release
while IFS= read -r line; do printf '%s\\n' "$line"; done < /etc/os-release 2>/dev/null
sec hostname; cat /proc/sys/kernel/hostname
sec ssh-connection; printf '%s\\n' "${{1:-}}"
sec links; ip -o link show 2>/dev/null
sec addresses; ip -o addr show 2>/dev/null
sec ipv6; [ -e /proc/net/if_inet6 ] && echo yes || echo no
sec routes; ip -4 route show table main 2>/dev/null
sec commands
for c in {command_words}; do command -v "$c" >/dev/null 2>&1 && printf '%s\\n' "$c"; done
sec transactions
now=
for t in {TXN_DIR}/*/; do
  [ -d "$t" ] || continue
  t=${{t%/}}
  now=${{now:-$(date +%s)}}
  printf '%s\\t%s\\t%s\\t%s\\n' "${{t##*/}}" "$(hc_txn_state "$t")" \\
    "$(cat "$t/deadline" 2>/dev/null)" "$now"
done
"""]
    if query.virtualization:
        parts.append("sec virt; systemd-detect-virt 2>/dev/null || true\n")
    if query.netfilter:
        # The backend (nf_tables or legacy) is in iptables-save's own header line.
        parts.append("""\
sec iptables-save; iptables-save 2>/dev/null
sec ip6tables-save; ip6tables-save 2>/dev/null
""")
    if query.sysctls:
        # /proc/sys files cannot be read a byte at a time (the shell's read builtin
        # gets the first byte only): one cat per key, nothing else.
        lines = ["sec sysctl"]
        for key in sorted(query.sysctls):
            path = "/proc/sys/" + key.replace(".", "/")
            lines.append(
                f"if [ -e {path} ]; then if [ -w {path} ]; then w=rw; else w=ro; fi; "
                f"printf '%s\\t%s\\t%s\\n' {key} \"$w\" \"$(cat {path} 2>/dev/null)\"; "
                f"else printf '%s\\tabsent\\t\\n' {key}; fi")
        parts.append("\n".join(lines) + "\n")
    if query.packages:
        words = " ".join(sorted(query.packages))
        # Only the packages asked for: dpkg/rpm say nothing (or "not installed") for the rest.
        parts.append(f"""\
sec packages
if command -v dpkg-query >/dev/null 2>&1; then
  dpkg-query -W -f='${{db:Status-Abbrev}}\\t${{Package}}\\t${{Version}}\\n' -- {words} 2>/dev/null
elif command -v rpm >/dev/null 2>&1; then
  rpm -q --qf 'ii \\t%{{NAME}}\\t%{{VERSION}}-%{{RELEASE}}\\n' -- {words} 2>/dev/null
fi
""")
    if query.units:
        words = " ".join(sorted(query.units))
        parts.append(f"""\
sec units
systemctl show --no-pager -p Names -p LoadState -p UnitFileState -p ActiveState -- {words} \\
  2>/dev/null
""")
    if query.paths or query.secret_paths or query.account_paths or query.account_secret_paths:
        parts.append("sec files\n")
    if query.paths or query.secret_paths:
        parts.append(files_reader(query.paths, query.secret_paths))
    accounts = sorted({a for a, _ in query.account_paths | query.account_secret_paths})
    if accounts:
        parts.append(AS_ACCOUNT_SH)
    for account in accounts:
        # The account's answer goes through root's base64: whatever runs as the account,
        # it cannot write a line of this output; the parser keeps its records only for
        # the paths asked of it.
        reader = files_reader({p for a, p in query.account_paths if a == account},
                              {p for a, p in query.account_secret_paths if a == account})
        parts.append(f"""\
if id -u {shlex.quote(account)} >/dev/null 2>&1; then
  printf 'U\\t%s\\t' {shlex.quote(account)}
  hc_as {shlex.quote(account)} sh -c {shlex.quote(reader)} 2>/dev/null | base64 -w0
  printf '\\n'
fi
""")
    for fact in query.extra:
        parts.append(f"sec x-{fact.name}\n(\n{fact.command}\n) 2>/dev/null\n")
    parts.append("sec end\n")
    return "".join(parts)

def files_reader(paths: Iterable[str], secret_paths: Iterable[str]) -> str:
    """Shell printing a record per regular file or link among ``paths`` (globs), as whoever
    runs it (root, or an account: see :class:`FactQuery`).

    One stat for every file and one ``cat | base64`` for every small non-secret one: a
    header line per file, then ``+SIZE`` (its content is in the B line), its own base64
    (secret files: the log redacts that line) or ``-`` with a checksum (too big).  A link
    is an ``L`` record with its target and is never read through: stat's own view decides
    (a file swapped for a link between the two is a link too).
    """
    secret_set = set(secret_paths)
    words = " ".join(sorted(set(paths) | secret_set))
    secret = "|".join(sorted(secret_set)) or "/nonexistent/homeclust-no-secrets"
    return f"""\
hc_link() {{
  hc_t=$(readlink -- "$1"); printf 'L\\t%s\\t' "$1"
  printf '%s' "$hc_t" | tr -c 'A-Za-z0-9/._@+,:=~-' '?'; printf '\\n'
}}
set --
for f in {words}; do
  case "$f" in *[!A-Za-z0-9/._@+-]*) continue;; esac
  if [ -L "$f" ]; then hc_link "$f"; continue; fi
  [ -f "$f" ] || continue
  set -- "$@" "$f"
done
if [ $# -gt 0 ]; then
  tab=$(printf '\\t')
  stats=$(stat --printf '%n\\t%a\\t%U\\t%G\\t%s\\t%F\\n' -- "$@")
  small=
  while IFS="$tab" read -r f mode owner group size type; do
    case "$type" in
      "symbolic link") hc_link "$f"; continue;;
      regular*) ;;
      *) continue;;
    esac
    case "$f" in {secret}) kind=S;; *) kind=F;; esac
    if [ "$size" -gt {MAX_FILE_CONTENT} ]; then
      printf '%s\\t%s\\t%s\\t%s\\t%s\\t%s\\n-\\n' "$kind" "$f" "$mode" "$owner" "$group" \\
        "$(sha256sum < "$f" | cut -c1-64)"
    elif [ $kind = S ]; then
      printf 'S\\t%s\\t%s\\t%s\\t%s\\t\\n' "$f" "$mode" "$owner" "$group"
      base64 -w0 < "$f"; printf '\\n'
    else
      printf 'F\\t%s\\t%s\\t%s\\t%s\\t\\n+%s\\n' "$f" "$mode" "$owner" "$group" "$size"
      small="$small $f"
    fi
  done <<HOMECLUST_STATS_EOF
$stats
HOMECLUST_STATS_EOF
  if [ -n "$small" ]; then printf 'B\\t'; cat $small | base64 -w0; printf '\\n'; fi
fi
"""


_SAFE_PATH_RE = re.compile(r"^/[A-Za-z0-9/._*?\[\]-]*$")


def _glob_word(path: str) -> str:
    """A fact path as a shell word; glob characters stay active, nothing else is special."""
    if not _SAFE_PATH_RE.match(path):
        raise ValueError(f"fact paths must be absolute and plain: {path!r}")
    return path


# --------------------------------------------------------------------------- parsing


def split_sections(output: str) -> dict[str, str]:
    sections: dict[str, str] = {}
    current: str | None = None
    lines: list[str] = []
    for line in output.splitlines():
        if line.startswith(MARKER + " "):
            if current is not None:
                sections[current] = "\n".join(lines).strip("\n")
            current = line[len(MARKER) + 1:].strip()
            lines = []
        elif current is not None:
            lines.append(line)
    if current is not None:
        sections[current] = "\n".join(lines).strip("\n")
    return sections


def parse_facts(output: str, query: FactQuery | None = None) -> HostFacts:
    """Turn the output of :func:`gather_script` into :class:`HostFacts`.

    ``query`` is the one the script was made from: its step-specific facts are
    parsed by their own parsers (an error there names the fact).
    """
    sections = split_sections(output)
    if "end" not in sections:
        raise FactError("facts output is incomplete (the script did not finish)")
    os_release = parse_os_release(sections.get("os-release", ""))
    links = parse_links(sections.get("links", ""))
    addresses = parse_addresses(sections.get("addresses", ""))
    # One `ip -o addr show` has both families (older outputs had a section each).
    addresses6 = parse_addresses6(sections.get("addresses6") or sections.get("addresses", ""))
    interfaces = {
        name: Interface(name, mac, up, tuple(addresses.get(name, ())),
                        tuple(addresses6.get(name, ())))
        for name, (mac, up) in links.items()
    }
    file_records = parse_files(sections.get("files", ""), query)
    backend, _ = parse_iptables_version(sections.get("iptables-version")
                                        or sections.get("iptables-save", ""))
    return HostFacts(
        os=os_release,
        hostname=sections.get("hostname", "").strip(),
        # Asked only when a step needs it (FactQuery.virtualization).
        virtualization=parse_virt(sections["virt"]) if "virt" in sections else "unknown",
        interfaces=interfaces,
        routes=parse_routes(sections.get("routes", "")),
        iptables_backend=backend,
        iptables=parse_iptables_save(sections.get("iptables-save", "")),
        ip6tables=parse_iptables_save(sections.get("ip6tables-save", "")),
        ipv6=sections.get("ipv6", "").strip() == "yes",
        sysctls=parse_sysctls(sections.get("sysctl", "")),
        packages=parse_packages(sections.get("packages", "")),
        services=parse_units(sections.get("units", "")),
        files=file_records.files,
        links=file_records.links,
        commands=frozenset(sections.get("commands", "").split()),
        ssh_peer=parse_ssh_connection(sections.get("ssh-connection", "")),
        transactions=parse_transactions(sections.get("transactions", "")),
        extra=_parse_extra(sections, query.extra if query else ()),
    )


def _parse_extra(sections: Mapping[str, str], facts: Iterable[Fact[Any]]) -> dict[str, object]:
    values: dict[str, object] = {}
    for fact in facts:
        try:
            values[fact.name] = fact.parse(sections.get(f"x-{fact.name}", ""))
        except (ValueError, KeyError, IndexError) as exc:
            raise FactError(f"cannot parse fact {fact.name!r}: {exc}") from None
    return values


def parse_os_release(text: str) -> OsRelease:
    values: dict[str, str] = {}
    for line in text.splitlines():
        if "=" not in line or line.lstrip().startswith("#"):
            continue
        key, _, raw = line.partition("=")
        try:
            parts = shlex.split(raw)
        except ValueError:
            parts = [raw.strip("\"'")]
        values[key.strip()] = parts[0] if parts else ""
    if "ID" not in values:
        raise FactError("cannot identify the operating system: /etc/os-release is missing ID")
    return OsRelease(
        id=values["ID"].lower(),
        id_like=tuple(values.get("ID_LIKE", "").lower().split()),
        version_id=values.get("VERSION_ID", ""),
        pretty_name=values.get("PRETTY_NAME", values["ID"]),
    )


def parse_virt(text: str) -> str:
    """``systemd-detect-virt``: its first word ("none" on bare metal or when it is missing).

    On bare metal it prints "none" *and* exits non-zero, so take one word only.
    """
    words = text.split()
    return words[0] if words else "none"


# The MAC group is optional as a whole, so the lazy ".*?" inside it must reach "link/":
# an optional group *after* a lazy ".*?" never matches (the regex succeeds earlier).
_LINK_RE = re.compile(
    r"^\d+:\s+([^:@\s]+)(?:@[^:\s]+)?:\s+<([^>]*)>(?:.*?link/\S+\s+([0-9a-f:]{17}))?"
)


def parse_links(text: str) -> dict[str, tuple[str | None, bool]]:
    """``ip -o link show`` -> {name: (mac, administratively up)}."""
    links: dict[str, tuple[str | None, bool]] = {}
    for line in text.splitlines():
        match = _LINK_RE.match(line)
        if not match:
            continue
        name, flags, mac = match.groups()
        links[name] = (mac, "UP" in flags.split(","))
    return links


_ADDR_RE = re.compile(r"^\d+:\s+(\S+)\s+inet\s+(\d+\.\d+\.\d+\.\d+/\d+)")
_ADDR6_RE = re.compile(r"^\d+:\s+(\S+)\s+inet6\s+([0-9a-fA-F:]+/\d+)")

_Address = TypeVar("_Address", IPv4Interface, IPv6Interface)


def _parse_ip_o_addr(text: str, pattern: re.Pattern[str], kind: type[_Address]
                     ) -> dict[str, list[_Address]]:
    found: dict[str, list[_Address]] = {}
    for line in text.splitlines():
        match = pattern.match(line)
        if match:
            found.setdefault(match.group(1), []).append(kind(match.group(2)))
    return found


def parse_addresses(text: str) -> dict[str, list[IPv4Interface]]:
    """``ip -o -4 addr show`` -> {interface: [address/prefix, …]}."""
    return _parse_ip_o_addr(text, _ADDR_RE, IPv4Interface)


def parse_addresses6(text: str) -> dict[str, list[IPv6Interface]]:
    """``ip -o -6 addr show`` -> {interface: [address/prefix, …]}."""
    return _parse_ip_o_addr(text, _ADDR6_RE, IPv6Interface)


def parse_routes(text: str) -> tuple[Route, ...]:
    """``ip -4 route show`` -> routes (destination, gateway, device, protocol)."""
    routes = []
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        destination = words[0]
        if destination not in ("default", "unreachable", "blackhole", "prohibit"):
            try:
                destination = str(IPv4Network(destination, strict=False))
            except ValueError:
                continue
        options = dict(zip(words[1::2], words[2::2], strict=False))
        gateway = options.get("via")
        routes.append(
            Route(
                destination=destination,
                gateway=IPv4Address(gateway) if gateway else None,
                device=options.get("dev"),
                protocol=options.get("proto"),
            )
        )
    return tuple(routes)


def parse_iptables_version(text: str) -> tuple[str | None, str | None]:
    # `iptables --version`, or the header line iptables-save prints.
    match = re.search(r"iptables(?:-save)? v([\d.]+)(?:\s+\((\w+)\))?", text)
    if not match:
        return None, None
    return match.group(2) or "legacy", match.group(1)


def parse_iptables_save(text: str) -> dict[str, str]:
    """Split ``iptables-save`` into normalized text per table."""
    tables: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), [])
            current.append(line.strip())
        elif current is not None and line.strip() and not line.startswith("#"):
            current.append(line.rstrip())
    return {name: normalize_iptables("\n".join(lines)) for name, lines in tables.items()}


_COUNTERS_RE = re.compile(r"\s*\[\d+:\d+\]$")


def normalize_iptables(text: str) -> str:
    """Canonical form of one or more ``iptables-save`` tables, for comparisons.

    Drops comments, blank lines and packet counters, and smooths over the few
    spellings that differ between iptables versions and backends for the rules
    homeclust writes (implicit ``-m tcp``, the default ``--log-level 4``).
    """
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(":"):
            line = _COUNTERS_RE.sub(" [0:0]", line)
            if not line.endswith("[0:0]"):
                line += " [0:0]"
        elif line.startswith("-A "):
            line = re.sub(r"-p (tcp|udp) (?!-m \1)", r"-p \1 -m \1 ", line)
            line = re.sub(r" --log-level (4|warning|warn)\b", "", line)
            line = re.sub(r"-m state --state ", "-m conntrack --ctstate ", line)
        out.append(line)
    return "\n".join(out) + ("\n" if out else "")


def parse_sysctls(text: str) -> dict[str, Sysctl]:
    found: dict[str, Sysctl] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        key, access = parts[0], parts[1]
        value = " ".join(parts[2:]).strip()
        if access == "absent":
            found[key] = Sysctl(None, False)
        else:
            found[key] = Sysctl(" ".join(value.split()), access == "rw")
    return found


def parse_packages(text: str) -> dict[str, str]:
    """Installed packages from dpkg-query (status ``ii``) or rpm (always installed)."""
    packages: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        status, name, version = parts
        if status.strip() in ("ii", "hi"):
            # Multi-arch packages are reported as name:arch; steps use bare names.
            packages[name.split(":")[0]] = version
    return packages


def parse_units(text: str) -> dict[str, ServiceState]:
    """``systemctl show -p Names -p LoadState -p UnitFileState -p ActiveState u1 u2 …``.

    One block of ``Key=value`` lines per unit, blocks separated by an empty
    line.  Every name of a unit (aliases too: ``sshd.service`` is
    ``ssh.service`` on Debian) maps to its state.
    """
    units: dict[str, ServiceState] = {}
    for block in re.split(r"\n\s*\n", text.strip()):
        props = dict(line.partition("=")[::2] for line in block.splitlines() if "=" in line)
        names = props.get("Names", "").split() or props.get("Id", "").split()
        if not names:
            continue
        load = props.get("LoadState", "")
        state = ServiceState(
            enabled=props.get("UnitFileState", "") or ("masked" if load == "masked" else ""),
            active=props.get("ActiveState", "") in ("active", "reloading"),
            loaded=load not in ("not-found", ""),
        )
        for name in names:
            units[name] = state
    return units


def parse_transactions(text: str) -> tuple[Transaction, ...]:
    """``id<TAB>state<TAB>deadline<TAB>now`` lines (see :data:`TXN_STATE_SH`)."""
    found = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 4 or not parts[0]:
            continue
        txn_id, state, deadline, now = parts
        found.append(Transaction(txn_id, state, int(deadline) if deadline.isdigit() else None,
                                 int(now) if now.isdigit() else 0))
    return tuple(found)


@dataclass(frozen=True)
class FileRecords:
    """What the ``files`` section says: regular files and symbolic links."""

    files: dict[str, FileFact]
    links: dict[str, str]


def parse_files(text: str, query: FactQuery | None = None) -> FileRecords:
    """File records: a header line (kind, path, mode, owner, group, sha256) and a content
    line: base64, ``-`` (too big: the header carries its checksum) or ``+SIZE`` (the
    content is in the next ``B`` line: every such file back to back, in header order).  A
    header without a checksum gets its content's.  ``L`` lines are links (path, target).

    ``U`` lines hold, in base64, the records an account read of its own files (see
    :class:`FactQuery`): only those about paths asked of that account are kept (with
    ``query``), and a file that changed while the account's files were read counts as
    absent (the account can always be rewriting its own files: that must not stop a run).
    """
    records = FileRecords({}, {})
    _parse_records(text.split("\n"), records, strict=True)
    for line in text.split("\n"):
        if not line.startswith("U\t"):
            continue
        _, account, encoded = [*line.split("\t"), "", ""][:3]
        try:
            inner = base64.b64decode(encoded, validate=True).decode("utf-8", "replace")
        except ValueError:
            continue
        theirs = FileRecords({}, {})
        _parse_records(inner.split("\n"), theirs, strict=False)
        asked = secret = None
        if query is not None:
            asked = [p for a, p in query.account_paths | query.account_secret_paths
                     if a == account]
            secret = [p for a, p in query.account_secret_paths if a == account]
        for path, fact in theirs.files.items():
            if asked is None or _matches(path, asked):
                records.files[path] = replace(fact, secret=fact.secret or _matches(
                    path, secret or []))
        for path, target in theirs.links.items():
            if asked is None or _matches(path, asked):
                records.links[path] = target
    return records


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


def _parse_records(lines: list[str], into: FileRecords, *, strict: bool) -> None:
    in_blob: list[tuple[list[str], int]] = []

    def take_blob(blob: bytes) -> None:
        if sum(size for _, size in in_blob) != len(blob):
            if strict:
                raise FactError("a managed file changed while the facts were read; run again")
            in_blob.clear()
            return
        offset = 0
        for parts, size in in_blob:
            into.files[parts[1]] = _file_fact(parts, blob[offset:offset + size])
            offset += size
        in_blob.clear()

    for i, line in enumerate(lines):
        if line.startswith("B\t"):
            take_blob(base64.b64decode(line[2:]))
            continue
        if line.startswith("L\t"):
            parts = line.split("\t")
            if len(parts) == 3 and parts[1].startswith("/"):
                into.links[parts[1]] = parts[2]
            continue
        if not line.startswith(("F\t", "S\t")):
            continue
        parts = line.split("\t")
        if len(parts) != 6:
            if strict:
                raise FactError(f"cannot parse file fact line: {line!r}")
            continue
        # The script prints a content line after every header; only an empty file's
        # (empty) line can be missing, when it is the last one and the section was stripped.
        encoded = lines[i + 1] if i + 1 < len(lines) else ""
        if encoded.startswith("+"):
            in_blob.append((parts, int(encoded[1:])))
            continue
        content = None if encoded == "-" else base64.b64decode(encoded)
        into.files[parts[1]] = _file_fact(parts, content)
    take_blob(b"")


def _file_fact(header: list[str], content: bytes | None) -> FileFact:
    kind, path, mode, owner, group, digest = header
    if not digest and content is not None:
        digest = hashlib.sha256(content).hexdigest()
    return FileFact(path, int(mode, 8), owner, group, digest, content, kind == "S")


REDACTED = "<secret: not logged>"


def redact_facts_output(output: str) -> str:
    """The facts output with the contents of secret files replaced, for the run log."""
    lines = output.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("S\t") and line.count("\t") == 5 and i + 1 < len(lines):
            lines[i + 1] = REDACTED
        elif line.startswith("U\t") and line.count("\t") == 2:
            # An account's own records (base64 as a whole): redacted inside, re-encoded.
            account, _, encoded = line[2:].partition("\t")
            try:
                inner = base64.b64decode(encoded, validate=True).decode("utf-8", "replace")
            except ValueError:
                inner = ""
            lines[i] = f"U\t{account}\t" + base64.b64encode(
                redact_facts_output(inner).encode()).decode()
    return "\n".join(lines)


def parse_ssh_connection(text: str) -> SshPeer | None:
    words = text.split()
    if len(words) != 4:
        return None
    try:
        return SshPeer(ip_address(words[0]), int(words[1]), ip_address(words[2]), int(words[3]))
    except ValueError:
        return None


def summarize(facts: HostFacts) -> dict[str, object]:
    """A readable digest of the facts (``homeclust facts``)."""
    return {
        "os": facts.os.pretty_name,
        "family_id": facts.os.id,
        "version": facts.os.version_id,
        "hostname": facts.hostname,
        "virtualization": facts.virtualization,
        "interfaces": {
            name: {
                "mac": iface.mac,
                "up": iface.up,
                "addresses": [str(a) for a in iface.addresses],
                "addresses6": [str(a) for a in iface.addresses6],
            }
            for name, iface in sorted(facts.interfaces.items())
        },
        "routes": [
            " ".join(
                x for x in (r.destination, f"via {r.gateway}" if r.gateway else "",
                            f"dev {r.device}" if r.device else "") if x
            )
            for r in facts.routes
        ],
        "iptables_backend": facts.iptables_backend,
        "iptables_tables": sorted(facts.iptables),
        "ipv6": facts.ipv6,
        "ip6tables_tables": sorted(facts.ip6tables),
        "sysctls": {k: v.value for k, v in sorted(facts.sysctls.items())},
        "packages": len(facts.packages),
        "active_services": sorted(u for u, s in facts.services.items() if s.active),
        "managed_files": {p: f.sha256[:12] for p, f in sorted(facts.files.items())},
        "ssh_client": str(facts.ssh_peer.client_address) if facts.ssh_peer else None,
        "transactions": {t.id: t.state for t in facts.transactions},
    }
