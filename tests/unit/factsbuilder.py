"""Build raw facts-script output for tests, and the inventories tests plan against.

The facts script (:func:`homeclust.facts.gather_script`) prints a series of
sections, each introduced by ``\\n@@homeclust-fact@@ NAME\\n`` and ending with
an ``end`` section.  Tests never construct :class:`~homeclust.facts.HostFacts`
directly: they build the *text* the script would print and hand it to
:func:`homeclust.facts.parse_facts`, so the parsers run on every test and the
test data stays in the shape real hosts produce.

Two ways to get that text:

* :func:`build` from keyword arguments (every section optional);
* :func:`recorded` loads a recorded output from ``tests/fixtures/facts`` as a
  :class:`FactsBuilder`, whose :meth:`FactsBuilder.but` returns a copy with some
  sections or files replaced (drift, converged states), and
  :meth:`FactsBuilder.build` prints it again.

The marker and the section layout are spelled out here on purpose rather than
imported from homeclust: if the script's format changes, these tests must
notice, not follow along.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from homeclust.facts import FactQuery, HostFacts, parse_facts
from homeclust.inventory import Inventory, load_inventory, parse_inventory

MARKER = "@@homeclust-fact@@"

#: The sections in the order gather_script prints them.
SECTIONS = (
    "os-release", "hostname", "virt", "ssh-connection", "links", "addresses", "addresses6",
    "ipv6", "routes", "commands", "transactions", "iptables-version", "iptables-save",
    "ip6tables-save", "sysctl", "packages", "units", "files", "end",
)

#: Files the script sends by hash only are those larger than this (MAX_FILE_CONTENT).
TOO_BIG = 256 * 1024

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
GOLDEN = ROOT / "golden"


@dataclass(frozen=True)
class FileRecord:
    """One file as the facts script reports it (``F\\tpath\\tmode\\towner\\tgroup\\tsha256``)."""

    content: bytes
    mode: int = 0o644
    owner: str = "root"
    group: str = "root"
    too_big: bool = False  # report "-" instead of the content, as for files over 256 KiB
    digest: str | None = None  # default: the sha256 of content
    secret: bool = False  # an "S" record: read for planning, never logged
    #: Read as this account (its ``U`` block) instead of as root: a cluster user's files.
    account: str | None = None

    @property
    def sha256(self) -> str:
        return self.digest or hashlib.sha256(self.content).hexdigest()

    @property
    def text(self) -> str:
        return self.content.decode()


@dataclass(frozen=True)
class LinkRecord:
    """A managed path that is a symbolic link (``L\tpath\ttarget``): never read through."""

    target: str
    account: str | None = None


Record = FileRecord | LinkRecord
FileArg = str | bytes | Record | None


def as_record(value: str | bytes | Record) -> Record:
    if isinstance(value, FileRecord | LinkRecord):
        return value
    return FileRecord(value.encode() if isinstance(value, str) else value)


def file_lines(files: Mapping[str, Record]) -> str:
    """The ``files`` section: a header line and a content line per file (or one line per
    link), sorted by path, root's first; then one ``U`` line per account with, in base64,
    the records it read of its own files."""
    out = []
    for path in sorted(p for p, r in files.items() if r.account is None):
        record = files[path]
        if isinstance(record, LinkRecord):
            out.append(f"L\t{path}\t{record.target}")
            continue
        kind = "S" if record.secret else "F"
        out.append(f"{kind}\t{path}\t{record.mode:o}\t{record.owner}\t{record.group}\t"
                   f"{record.sha256}")
        too_big = record.too_big or len(record.content) > TOO_BIG
        out.append("-" if too_big else base64.b64encode(record.content).decode())
    for account in sorted({r.account for r in files.values() if r.account is not None}):
        inner = file_lines({p: replace(r, account=None) for p, r in files.items()
                            if r.account == account})
        out.append(f"U\t{account}\t{base64.b64encode(inner.encode()).decode()}")
    return "".join(line + "\n" for line in out)


def sysctl_lines(values: Mapping[str, tuple[str, str] | None]) -> str:
    """``key -> (access, value)`` (access ``rw``/``ro``) or ``None`` for an absent key."""
    out = []
    for key, item in values.items():
        if item is None:
            out.append(f"{key}\tabsent\t")
        else:
            access, value = item
            out.append(f"{key}\t{access}\t{value}")
    return "".join(line + "\n" for line in out)


def dpkg_lines(packages: Mapping[str, str], status: str = "ii ") -> str:
    """What ``dpkg-query -W -f='${db:Status-Abbrev}\\t${Package}\\t${Version}\\n'`` prints."""
    return "".join(f"{status}\t{name}\t{version}\n" for name, version in packages.items())


def unit_lines(units: Mapping[str, tuple[str, bool] | None]) -> str:
    """What ``systemctl show -p Names -p LoadState -p UnitFileState -p ActiveState`` prints:
    ``unit -> (unit file state, active)``, or ``None`` for a unit that does not exist."""
    blocks = []
    for unit, state in units.items():
        if state is None:
            blocks.append(f"Names={unit}\nLoadState=not-found\nActiveState=inactive\n"
                          "UnitFileState=\n")
        else:
            enabled, active = state
            load = "masked" if enabled == "masked" else "loaded"
            blocks.append(f"Names={unit}\nLoadState={load}\n"
                          f"ActiveState={'active' if active else 'inactive'}\n"
                          f"UnitFileState={enabled}\n")
    return "\n".join(blocks)


def set_units(text: str, units: Mapping[str, tuple[str, bool] | None]) -> str:
    """A ``units`` section with some units' blocks replaced or added."""
    blocks = [b for b in re.split(r"\n\s*\n", text.strip()) if b.strip()]
    kept = [b for b in blocks if not any(line in (f"Names={u}" for u in units)
                                         for line in b.splitlines())]
    return "\n".join([*(b + "\n" for b in kept), unit_lines(units)])


def rpm_lines(packages: Mapping[str, str]) -> str:
    """What ``rpm -qa --qf 'ii \\t%{NAME}\\t%{VERSION}-%{RELEASE}\\n'`` prints."""
    return "".join(f"ii \t{name}\t{version}\n" for name, version in packages.items())


def _body(text: str) -> str:
    """A section body as a command prints it: empty, or lines each ending in a newline."""
    if not text:
        return ""
    return text if text.endswith("\n") else text + "\n"


@dataclass(frozen=True)
class FactsBuilder:
    """Sections of one facts output (``files`` kept as records, the rest as text)."""

    sections: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, Record] = field(default_factory=dict)
    complete: bool = True  # False: no "end" section (the script was cut off)

    def but(self, *, files: Mapping[str, FileArg] | None = None, complete: bool | None = None,
            **sections: str) -> FactsBuilder:
        """A copy with sections replaced (``iptables_save="..."``: underscores for dashes)
        and files added, replaced, or removed (value ``None``)."""
        new_sections = dict(self.sections)
        for key, text in sections.items():
            name = key.replace("_", "-")
            if (name not in SECTIONS and not name.startswith("x-")) or name in ("files", "end"):
                raise KeyError(f"unknown facts section {name!r}")
            new_sections[name] = text
        new_files = dict(self.files)
        for path, value in (files or {}).items():
            if value is None:
                new_files.pop(path, None)
            else:
                new_files[path] = as_record(value)
        return replace(self, sections=new_sections, files=new_files,
                       complete=self.complete if complete is None else complete)

    def add_lines(self, section: str, *lines: str) -> FactsBuilder:
        """A copy with ``lines`` appended to a text section (e.g. a stray route)."""
        name = section.replace("_", "-")
        if name not in SECTIONS or name in ("files", "end"):
            raise KeyError(f"unknown facts section {name!r}")
        current = _body(self.sections.get(name, ""))
        sections = dict(self.sections)
        sections[name] = current + "".join(line + "\n" for line in lines)
        return replace(self, sections=sections)

    def build(self) -> str:
        parts = []
        for name in SECTIONS:
            if name == "end":
                # Step-specific facts come last, before the end marker.
                for extra in sorted(n for n in self.sections if n.startswith("x-")):
                    parts.append(f"\n{MARKER} {extra}\n{_body(self.sections[extra])}")
                if self.complete:
                    parts.append(f"\n{MARKER} end\n")
                continue
            body = file_lines(self.files) if name == "files" else _body(self.sections.get(name, ""))
            parts.append(f"\n{MARKER} {name}\n{body}")
        return "".join(parts)

    def with_units(self, units: Mapping[str, tuple[str, bool] | None]) -> FactsBuilder:
        """A copy where these units have this state (``None``: no such unit)."""
        return self.but(units=set_units(self.sections.get("units", ""), units))

    def facts(self, query: FactQuery | None = None) -> HostFacts:
        """The parsed facts (the parser runs on the built text); ``query`` parses
        step-specific facts (``x-`` sections; default: those of the repo and monitor
        steps, whose planners always read theirs)."""
        return parse_facts(self.build(), query if query is not None else repo_monitor_query())

    def file_text(self, path: str) -> str:
        record = self.files[path]
        assert isinstance(record, FileRecord)
        return record.text


def build(*, os_release: str = "", hostname: str = "", virt: str = "none", ssh_connection: str = "",
          links: str = "", addresses: str = "", addresses6: str = "", ipv6: str = "no",
          routes: str = "", iptables_version: str = "",
          iptables_save: str = "", ip6tables_save: str = "",
          sysctl: str | Mapping[str, tuple[str, str] | None] = "",
          packages: str = "", units: str = "",
          commands: Iterable[str] = (), transactions: Iterable[str] = (),
          files: Mapping[str, str | bytes | Record] | None = None, complete: bool = True) -> str:
    """Raw facts output from keyword arguments (see the module docstring)."""
    return builder(
        os_release=os_release, hostname=hostname, virt=virt, ssh_connection=ssh_connection,
        links=links, addresses=addresses, addresses6=addresses6, ipv6=ipv6, routes=routes,
        iptables_version=iptables_version, iptables_save=iptables_save,
        ip6tables_save=ip6tables_save, sysctl=sysctl, packages=packages, units=units,
        commands=commands, transactions=transactions, files=files, complete=complete,
    ).build()


def builder(*, os_release: str = "", hostname: str = "", virt: str = "none",
            ssh_connection: str = "", links: str = "", addresses: str = "",
            addresses6: str = "", ipv6: str = "no", routes: str = "",
            iptables_version: str = "", iptables_save: str = "", ip6tables_save: str = "",
            sysctl: str | Mapping[str, tuple[str, str] | None] = "", packages: str = "",
            units: str = "", commands: Iterable[str] = (),
            transactions: Iterable[str] = (),
            files: Mapping[str, str | bytes | Record] | None = None,
            complete: bool = True) -> FactsBuilder:
    """Like :func:`build`, but returns the :class:`FactsBuilder` (for further changes)."""
    sections = {
        "os-release": os_release,
        "hostname": hostname,
        "virt": virt,
        "ssh-connection": ssh_connection,
        "links": links,
        "addresses": addresses,
        "addresses6": addresses6,
        "ipv6": ipv6,
        "routes": routes,
        "iptables-version": iptables_version,
        "iptables-save": iptables_save,
        "ip6tables-save": ip6tables_save,
        "sysctl": sysctl if isinstance(sysctl, str) else sysctl_lines(sysctl),
        "packages": packages,
        "units": units,
        "commands": "".join(c + "\n" for c in commands),
        "transactions": "".join(t + "\n" for t in transactions),
    }
    records = {path: as_record(value) for path, value in (files or {}).items()}
    return FactsBuilder(sections, records, complete)


def parse_recorded(text: str) -> FactsBuilder:
    """Split a recorded output back into a builder (the inverse of :meth:`FactsBuilder.build`).

    Deliberately independent of homeclust's own parser: it reads the format
    as documented, so a recorded fixture round-trips byte for byte, and it
    checks each file's sha256 against its content.
    """
    parts = re.split(rf"\n{re.escape(MARKER)} ([^\n]*)\n", text)
    if parts[0].strip():
        raise ValueError("a facts output starts with its first section marker")
    bodies = dict(zip(parts[1::2], parts[2::2], strict=True))
    unknown = {n for n in bodies if not n.startswith("x-")} - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections in the recording: {sorted(unknown)}")
    files = _parse_file_records(bodies.pop("files", ""))
    complete = "end" in bodies
    bodies.pop("end", None)
    return FactsBuilder(bodies, files, complete)


def _parse_file_records(body: str, account: str | None = None) -> dict[str, Record]:
    files: dict[str, Record] = {}
    lines = body.split("\n")
    for index, line in enumerate(lines):
        if line.startswith("U\t"):
            _, owner, encoded = line.split("\t")
            files.update(_parse_file_records(base64.b64decode(encoded).decode(), owner))
            continue
        if line.startswith("L\t"):
            _, path, target = line.split("\t")
            files[path] = LinkRecord(target, account)
            continue
        if not line.startswith(("F\t", "S\t")):
            continue
        kind, path, mode, owner, group, digest = line.split("\t")
        encoded = lines[index + 1]
        too_big = encoded == "-"
        content = b"" if too_big else base64.b64decode(encoded)
        if not too_big and hashlib.sha256(content).hexdigest() != digest:
            raise ValueError(f"{path}: sha256 in the recording does not match its content")
        files[path] = FileRecord(content, int(mode, 8), owner, group, too_big,
                                 digest if too_big else None, kind == "S", account)
    return files


def recorded(name: str) -> FactsBuilder:
    """A recorded facts output from ``tests/fixtures/facts/NAME.txt``."""
    return parse_recorded((FIXTURES / "facts" / f"{name}.txt").read_text())


def recorded_text(name: str) -> str:
    return (FIXTURES / "facts" / f"{name}.txt").read_text()


def fixture_text(relative: str) -> str:
    return (FIXTURES / relative).read_text()


# --------------------------------------------------------------------------- inventories

#: The cluster of the guide: one master (DHCP on eth0, 192.168.10.1 on eth1), workers on eth0.
BASE_INVENTORY: dict[str, Any] = {
    "cluster": {"name": "testclust", "private_network": "192.168.10.0/24", "dns": ["8.8.8.8"]},
    "ssh": {"user": "root", "key": "/nonexistent/homeclust-test-key"},
    "master": {
        "name": "master",
        "address": "cluster-master.example.org",
        "public_interface": "eth0",
        "public_boot": "dhcp",
        "dhcp_client_id": "cluster-master",
        "private_interface": "eth1",
        "private_address": "192.168.10.1",
        "slots": 4,
    },
    "workers": [
        {"name": "worker1", "private_address": "192.168.10.2", "interface": "eth0", "slots": 4},
        {"name": "worker2", "private_address": "192.168.10.3", "interface": "eth0", "slots": 4},
    ],
}


def inventory(**tables: Mapping[str, Any] | list[Any]) -> Inventory:
    """The base inventory with whole tables merged in (``firewall={"ssh_from": [...]}``)."""
    data: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else list(v))
                            for k, v in BASE_INVENTORY.items()}
    for name, value in tables.items():
        if isinstance(value, Mapping) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **value}
        else:
            data[name] = value
    return parse_inventory(data, Path("test.toml"))


# --------------------------------------------------------------------------- golden files


class GoldenUpdateInCI(RuntimeError):
    """HOMECLUST_UPDATE_GOLDEN=1 in CI: a run that rewrites its own expectations proves nothing."""


def golden_update_requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether golden files are to be rewritten (``HOMECLUST_UPDATE_GOLDEN=1``).

    Refused when ``CI`` is set: in CI a golden test must compare, never write.
    """
    if environ.get("HOMECLUST_UPDATE_GOLDEN") != "1":
        return False
    if "CI" in environ:
        raise GoldenUpdateInCI(
            "HOMECLUST_UPDATE_GOLDEN=1 is refused in CI (CI is set): golden files are "
            "updated on purpose on a developer's machine, and the diff reviewed")
    return True


def check_golden(relative: str, actual: str) -> None:
    """Compare ``actual`` with ``tests/golden/RELATIVE`` exactly.

    ``HOMECLUST_UPDATE_GOLDEN=1`` rewrites the file instead: do that only on
    purpose, and read the diff before committing it.  Never in CI.
    """
    path = GOLDEN / relative
    if golden_update_requested():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
        return
    assert path.exists(), f"no golden file {path}: run with HOMECLUST_UPDATE_GOLDEN=1, then review it"
    assert actual == path.read_text(), f"{relative} differs from its golden file"


# --------------------------------------------------------------------------- converged hosts


def golden_text(relative: str) -> str:
    return (GOLDEN / relative).read_text()


#: Converged Debian hosts, captured from the lab (tests/fixtures/lab/README.md).
LAB = FIXTURES / "lab"
LAB_NODES = {"debian12-master": "master", "debian12-worker": "worker1"}


def lab_inventory() -> Inventory:
    """The inventory of the lab the Debian fixtures were captured from."""
    return load_inventory(LAB / "inventory.toml")


def lab_text(node: str, relative: str) -> str:
    """A captured file: ``lab_text("master", "iptables-save.txt")``,
    ``lab_text("worker1", "files/etc/hosts")``."""
    return (LAB / node / relative).read_text()


def converged_inventory(name: str) -> Inventory:
    """The inventory ``converged(name)`` is converged for."""
    return lab_inventory() if name in LAB_NODES else inventory()


def converged(name: str) -> FactsBuilder:
    """A host after homeclust's network, nat and firewall steps, as the facts script sees it.

    Planning on these facts (with :func:`converged_inventory`) must change
    nothing: the idempotency proof of the planners.

    * Debian (``debian12-master``, ``debian12-worker``): the raw facts output
      captured from a lab node after ``homeclust up`` by ``scripts/capture-fixtures``
      -- what homeclust really left behind, not its renderers' output fed back.
    * RHEL family (``rocky9-master``, ``centos7-worker``): hand-written, as there
      is no RHEL lab: the recorded fresh host with the reviewed golden files,
      hand-recorded ``iptables-save`` output of the loaded tables
      (``tests/fixtures/iptables/NAME-converged*.save``), and the packages,
      services, sysctls and hostname the steps leave behind.
    """
    if name in LAB_NODES:
        return parse_recorded(lab_text(LAB_NODES[name], "facts.txt"))
    fresh = recorded(name)
    save = fixture_text(f"iptables/{name}-converged.save")
    nat_files: dict[str, FileArg] = {}
    if name.endswith("master"):
        dash = "no-dash" if name.startswith("centos7") else "dash"
        nat_files = {
            "/etc/sysctl.d/90-homeclust-nat.conf":
                golden_text(f"nat/{dash}/etc/sysctl.d/90-homeclust-nat.conf"),
            "/etc/modules-load.d/homeclust-nat.conf":
                golden_text("nat/etc/modules-load.d/homeclust-nat.conf"),
        }
    role = "master" if name.endswith("master") else "worker"
    rules = FileRecord(golden_text(f"iptables/rules-{role}.v4").encode(), 0o600)
    rules6 = FileRecord(golden_text(f"iptables/rules-{role}.v6").encode(), 0o600)
    master_sysctls = {
        "net.ipv4.ip_forward": ("rw", "1"),
        "net.netfilter.nf_conntrack_max": ("rw", "131072"),
        "net.netfilter.nf_conntrack_tcp_timeout_established": ("rw", "86400"),
    }
    if name == "rocky9-master":
        keyfiles = "network/nm-keyfile/master/etc/NetworkManager/system-connections/"
        directory = "/etc/NetworkManager/system-connections/"
        return fresh.but(
            files={
                directory + "eth0.nmconnection": None,
                directory + "eth1.nmconnection": None,
                directory + "homeclust-eth0.nmconnection": FileRecord(
                    golden_text(keyfiles + "homeclust-eth0.nmconnection").encode(), 0o600),
                directory + "homeclust-eth1.nmconnection": FileRecord(
                    golden_text(keyfiles + "homeclust-eth1.nmconnection").encode(), 0o600),
                "/etc/hosts": golden_text("network/hosts/rocky9-master/etc/hosts"),
                "/etc/hostname": "master\n",
                "/etc/sysconfig/iptables": rules,
                "/etc/sysconfig/ip6tables": rules6,
                **nat_files,
            },
            hostname="master\n",
            iptables_version="iptables v1.8.10 (nf_tables)\n",
            iptables_save=save,
            ip6tables_save=fixture_text(f"iptables/{name}-converged6.save"),
            sysctl=sysctl_lines(master_sysctls),
            commands="".join(c + "\n" for c in (
                "systemd-run", "systemctl", "flock", "iptables", "iptables-save", "iptables-restore",
                "ip6tables", "nmcli", "hostnamectl", "dnf", "yum", "rpm", "sha256sum", "base64",
                "curl", "sudo", "bash")),
        ).add_lines(
            "packages", *rpm_lines({"iptables-nft": "1.8.10-4.el9_4",
                                    "iptables-services": "1.8.10-4.el9_4"}).splitlines(),
        ).with_units({"firewalld.service": ("masked", False),
                      "iptables.service": ("enabled", True),
                      "ip6tables.service": ("enabled", True)})
    if name == "centos7-worker":
        return fresh.but(
            files={
                "/etc/sysconfig/network-scripts/ifcfg-eth0": golden_text(
                    "network/ifcfg/worker2/etc/sysconfig/network-scripts/ifcfg-eth0"),
                "/etc/hosts": golden_text("network/hosts/centos7-worker/etc/hosts"),
                "/etc/sysconfig/iptables": rules,
            },
            # The network service's ifup: no NetworkManager "proto static metric 100".
            routes="default via 192.168.10.1 dev eth0 \n"
                   "192.168.10.0/24 dev eth0 proto kernel scope link src 192.168.10.3 \n",
            iptables_save=save,
        )
    raise KeyError(f"no converged state for {name}")


# --------------------------------------------------------------------------- iptables-save edits


def _table_span(save: str, table: str) -> tuple[int, int]:
    """Start and end (after COMMIT\\n) of ``table`` in an iptables-save text."""
    start = save.index(f"*{table}\n")
    end = save.index("COMMIT\n", start) + len("COMMIT\n")
    return start, end


def edit_table(save: str, table: str, *, chains: Iterable[str] = (),
               first_rules: Iterable[str] = (), rules: Iterable[str] = (),
               policy: tuple[str, str] | None = None) -> str:
    """``save`` with chain declarations and rules added to ``table`` (``first_rules``
    before its first rule, ``rules`` after its last), or a built-in chain's policy
    changed (``policy=("INPUT", "ACCEPT")``)."""
    start, end = _table_span(save, table)
    lines = save[start:end].splitlines(keepends=True)
    if policy is not None:
        chain, target = policy
        lines = [re.sub(rf"^:{chain} \S+ ", f":{chain} {target} ", line) for line in lines]
    last_chain = max(i for i, line in enumerate(lines) if line.startswith(":"))
    lines[last_chain + 1:last_chain + 1] = [c + "\n" for c in (*chains, *first_rules)]
    lines[-1:-1] = [r + "\n" for r in rules]
    return save[:start] + "".join(lines) + save[end:]


def drop_table(save: str, table: str) -> str:
    """``save`` without ``table`` (as after a reboot that did not load it)."""
    start, end = _table_span(save, table)
    return save[:start] + save[end:]


def repo_monitor_query() -> FactQuery:
    """The fact query of the repo and monitor steps on the base inventory."""
    from homeclust.steps import REGISTRY

    return REGISTRY["repo"].fact_query(inventory()) | REGISTRY["monitor"].fact_query(inventory())


# --------------------------------------------------------------------------- repo and monitor

#: The inventory the repo and monitor steps' converged hosts were made for: the base one
#: with a small repository (the Debian hosts were captured on a lab with these tables).
CONVERGED_TABLES: dict[str, Any] = {"repo": {"packages": ["jq"]}, "monitor": {"tools": ["tcpdump"]}}

#: What the repo and monitor steps manage, per role (file paths).
REPO_MONITOR_FILES = {
    "master": ("/etc/nginx/nginx.conf", "/var/lib/homeclust/repo/manifest",
               "/var/lib/homeclust/repo/signing-key.asc",
               "/var/lib/homeclust/repo/signing-key.pub.asc",
               "/srv/homeclust-repo/debian/InRelease", "/etc/fail2ban/jail.d/homeclust.local"),
    "worker": ("/etc/apt/keyrings/homeclust-repo.asc",
               "/etc/apt/sources.list.d/homeclust.sources", "/etc/apt/sources.list",
               "/var/lib/apt/lists/192.168.10.1_debian_._InRelease"),
}


def repo_converged(name: str) -> FactsBuilder:
    """A host after every step up to repo and monitor (for :data:`CONVERGED_TABLES`).

    Debian: the facts a lab node reported after `homeclust up` of those steps
    (``tests/fixtures/lab-facts``).  RHEL (no lab): :func:`converged` plus the
    repository and fail2ban state made from golden files and hand-written
    manifests (``tests/fixtures/repo``).
    """
    if name.startswith("debian12"):
        role = "master" if name.endswith("master") else "worker"
        return parse_recorded(fixture_text(f"lab-facts/debian12-{role}-converged.txt"))
    base = converged(name)
    if name == "rocky9-master":
        return base.but(
            files={
                "/etc/nginx/nginx.conf": golden_text("repo/rhel/etc/nginx/nginx.conf"),
                "/var/lib/homeclust/repo/manifest": fixture_text("repo/rocky9-manifest"),
                "/etc/fail2ban/jail.d/homeclust.local": golden_text("fail2ban/journal.local"),
                "/etc/pki/rpm-gpg/RPM-GPG-KEY-EPEL-9": fixture_text("repo/RPM-GPG-KEY-EPEL-9"),
            },
            x_repo_state=fixture_text("repo/rocky9-repo-state"),
            x_http_listeners="192.168.10.1:80\n",
        ).add_lines("packages", *rpm_lines({
            "epel-release": "9-7.el9", "nginx": "1:1.20.1-14.el9_2.1",
            "createrepo_c": "0.20.1-2.el9", "dnf-plugins-core": "4.3.0-11.el9_3",
            "tcpdump": "14:4.99.0-7.el9", "fail2ban-server": "1.0.2-12.el9",
            "fail2ban-systemd": "1.0.2-12.el9"}).splitlines(),
        ).with_units({"nginx.service": ("enabled", True), "fail2ban.service": ("enabled", True)})
    if name == "centos7-worker":
        return base.but(files={
            "/etc/yum.repos.d/homeclust.repo":
                golden_text("repo/rhel/centos7/etc/yum.repos.d/homeclust.repo"),
            "/etc/pki/rpm-gpg/RPM-GPG-KEY-EPEL-7": fixture_text("repo/RPM-GPG-KEY-EPEL-7"),
        }).add_lines("packages", *rpm_lines({"tcpdump": "14:4.9.2-4.el7_7.1"}).splitlines())
    raise KeyError(f"no converged repo/monitor state for {name}")


def repo_master_for(name: str) -> FactsBuilder:
    """The converged master whose repository a converged ``name`` uses (same release):
    the lab's Debian master, the Rocky 9 master, or a CentOS 7 master made from the Rocky
    one (a worker's plan reads only the master's release, manifest and keys)."""
    if name.startswith("debian12"):
        return repo_converged("debian12-master")
    if name.startswith("rocky9"):
        return repo_converged("rocky9-master")
    if name.startswith("centos7"):
        return repo_converged("rocky9-master").but(
            os_release=recorded("centos7-worker").sections["os-release"],
            files={"/etc/pki/rpm-gpg/RPM-GPG-KEY-EPEL-9": None,
                   "/etc/pki/rpm-gpg/RPM-GPG-KEY-EPEL-7": fixture_text("repo/RPM-GPG-KEY-EPEL-7"),
                   "/var/lib/homeclust/repo/manifest": fixture_text("repo/centos7-manifest")})
    raise KeyError(f"no repository master for {name}")


def _without_table(text: str, table: str) -> str:
    """iptables-save text (or a rules file) without one table's block."""
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.strip() == f"*{table}":
            skipping = True
            continue
        if skipping:
            if line.strip() == "COMMIT":
                skipping = False
            continue
        out.append(line)
    return "".join(out)


def after_firewall(name: str) -> FactsBuilder:
    """A recorded host after the firewall step only: the converged filter tables, rules files
    with the filter table alone, the loader installed and enabled -- but no NAT yet."""
    fresh, done = recorded(name), converged(name)
    rules_files = ("/etc/iptables/rules.v4", "/etc/sysconfig/iptables")
    files: dict[str, FileArg] = {
        path: FileRecord(_without_table(done.file_text(path), "nat").encode(), 0o600)
        for path in rules_files if path in done.files}
    for path in ("/etc/sysctl.d/90-homeclust-nat.conf", "/etc/modules-load.d/homeclust-nat.conf"):
        files[path] = fresh.files.get(path)
    return done.but(files=files,
                    iptables_save=_without_table(done.sections["iptables-save"], "nat"),
                    sysctl=fresh.sections.get("sysctl", ""))
