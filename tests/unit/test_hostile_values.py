"""Hostile inventory values: refused at load time, or inert data wherever they are written.

Two layers, each with property tests (hypothesis) over strings full of quotes,
``$()``, backticks, newlines, ``;``, ``}``, NUL and unicode:

* **inventory**: every field that reaches a shell script or a rendered file is
  either refused by :func:`parse_inventory` (an ``InventoryError`` naming the
  table and the key) or, if accepted, comes out of every artefact it reaches as
  exactly the same data;
* **renderers**: called directly with values the grammar would refuse, each
  renderer either refuses them (``UnsafeValueError``) or writes them so that
  the destination's own syntax reads back exactly the value.

"Reads back" is checked with parsers written here, independent of homeclust's
quoting: ISC dhclient's string lexer, GLib's key-file unescaping, YAML's
double-quoted scalars, shell (``shlex`` and ``sh`` for real: ifcfg files are
sourced, commands run with the real programs replaced by recorders, in a
temporary directory where a ``touch canary`` payload would leave a trace).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import http.server
import os
import re
import shlex
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from homeclust.errors import InventoryError, UnsafeValueError
from homeclust.inventory import Inventory, parse_inventory
from homeclust.lab import render as lab_render
from homeclust.lab.plan import make_plan
from homeclust.platforms import NetworkBackend, detect
from homeclust.render import iptables as iptables_render
from homeclust.render import network as net
from homeclust.steps.base import PlanContext
from homeclust.steps.nat import egress_probe
from tests.unit.factsbuilder import BASE_INVENTORY, recorded

# --------------------------------------------------------------------------- hostile strings

#: Pieces that mean something to a shell, printf, a config file or a terminal.
PIECES = [
    "'", '"', "`", "$(touch canary)", "`touch canary`", "${IFS}", "$HOME", ";", "&", "|", "\n",
    "\r", "\t", "\x00", "\x1b[2J", "}", "{", ")", "(", "\\", "\\n", " ", "#", "%s", "%n", "%%",
    "-", "--", "-j", "/", "..", "=", ",", "[", "]", "<", ">", "!", "*", "?", "~", ":", "@",
    "é", "\u2028", "\x85", "\ufeff", "💥", "yes", "0x1f", "HOMECLUST_RULES_EOF",
]
PLAIN = list("abcxyz0129-._")

hostile = st.one_of(
    st.lists(st.sampled_from(PIECES + PLAIN), min_size=1, max_size=8).map("".join),
    st.text(min_size=1, max_size=16),
)
#: A plain prefix and suffix around a hostile core: gets past "starts with a letter" checks.
wrapped = st.builds(lambda a, core, b: a + core + b, st.sampled_from(["", "a", "eth"]), hostile,
                    st.sampled_from(["", "0", "x"]))
values = st.one_of(hostile, wrapped)

SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
SLOW_SETTINGS = settings(max_examples=60, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- independent parsers


def dhclient_tokens(text: str) -> list[tuple[str, bytes]]:
    """ISC dhclient.conf tokens: ("str", bytes) for string literals, ("word"|"punct", ...) else.

    Strings follow conflex.c's read_string: ``\\t \\r \\n \\b``, ``\\[0-3]NN`` octal,
    ``\\xNN`` hex, any other escaped character stands for itself; an unescaped
    ``"`` ends the string.
    """
    data = text.encode()
    tokens: list[tuple[str, bytes]] = []
    i = 0
    while i < len(data):
        c = data[i:i + 1]
        if c.isspace():
            i += 1
        elif c == b"#":
            while i < len(data) and data[i:i + 1] != b"\n":
                i += 1
        elif c == b'"':
            i += 1
            out = bytearray()
            while True:
                if i >= len(data):
                    raise ValueError("unterminated string")
                ch = data[i:i + 1]
                if ch == b'"':
                    i += 1
                    break
                if ch == b"\\":
                    nxt = data[i + 1:i + 2]
                    simple = {b"t": 9, b"r": 13, b"n": 10, b"b": 8}
                    if nxt in simple:
                        out.append(simple[nxt])
                        i += 2
                    elif nxt in (b"0", b"1", b"2", b"3"):
                        digits = data[i + 1:i + 4]
                        if not re.fullmatch(rb"[0-7]{3}", digits):
                            raise ValueError(f"bad octal escape {digits!r}")
                        out.append(int(digits, 8))
                        i += 4
                    elif nxt == b"x":
                        out.append(int(data[i + 2:i + 4], 16))
                        i += 4
                    else:
                        out += nxt
                        i += 2
                else:
                    out += ch
                    i += 1
            tokens.append(("str", bytes(out)))
        elif c in b"{};,=()":
            tokens.append(("punct", c))
            i += 1
        else:
            start = i
            while i < len(data) and not data[i:i + 1].isspace() and data[i:i + 1] not in (
                    b"{", b"}", b";", b",", b"=", b"(", b")", b'"', b"#"):
                i += 1
            tokens.append(("word", data[start:i]))
    return tokens


def dhclient_interface_blocks(text: str) -> list[tuple[bytes, bytes]]:
    """(interface, client id) of every ``interface "X" { send dhcp-client-identifier "Y"; }``,
    and nothing else may follow the first ``interface`` keyword."""
    tokens = dhclient_tokens(text)
    start = tokens.index(("word", b"interface"))
    tail = tokens[start:]
    blocks = []
    while tail:
        head, tail = tail[:8], tail[8:]
        assert [kind for kind, _ in head] == ["word", "str", "punct", "word", "word", "str",
                                             "punct", "punct"], head
        assert head[0][1] == b"interface" and head[2][1] == b"{" and head[3][1] == b"send"
        assert head[4][1] == b"dhcp-client-identifier" and head[6][1] == b";"
        assert head[7][1] == b"}"
        blocks.append((head[1][1], head[5][1]))
    return blocks


def keyfile_parse(text: str) -> dict[str, dict[str, str]]:
    """A GLib key file: groups of key=value, values unescaped as g_key_file_get_string does."""
    groups: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.split("\n"):
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            assert line.endswith("]"), line
            assert line[1:-1] not in groups, f"duplicate group {line}"
            current = groups.setdefault(line[1:-1], {})
            continue
        assert current is not None, line
        key, sep, raw = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        key = key.strip()
        assert key not in current, f"duplicate key {key}"
        raw = raw.lstrip(" \t")
        value, i = [], 0
        while i < len(raw):
            if raw[i] == "\\":
                escape = raw[i + 1:i + 2]
                mapping = {"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
                assert escape in mapping, f"invalid escape in {line!r}"
                value.append(mapping[escape])
                i += 2
            else:
                value.append(raw[i])
                i += 1
        current[key] = "".join(value)
    return groups


def yaml_double_quoted(token: str) -> str:
    """Decode a YAML double-quoted scalar (the escapes our renderer may use)."""
    assert token.startswith('"') and token.endswith('"') and len(token) >= 2, token
    body, out, i = token[1:-1], [], 0
    while i < len(body):
        char = body[i]
        assert char != '"', f"unescaped quote in {token!r}"
        assert 0x20 <= ord(char) < 0x7F, f"raw {char!r} in {token!r}"
        if char == "\\":
            kind = body[i + 1]
            if kind in '"\\':
                out.append(kind)
                i += 2
            elif kind == "u":
                out.append(chr(int(body[i + 2:i + 6], 16)))
                i += 6
            elif kind == "U":
                out.append(chr(int(body[i + 2:i + 10], 16)))
                i += 10
            else:
                raise AssertionError(f"unexpected escape \\{kind} in {token!r}")
        else:
            out.append(char)
            i += 1
    return "".join(out)


def shell_assignments(text: str) -> dict[str, str]:
    """An ifcfg file read with shell word rules: each line one KEY=VALUE word."""
    found: dict[str, str] = {}
    for line in text.split("\n"):  # the shell ends lines at \n only
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        words = shlex.split(line)
        assert len(words) == 1 and "=" in words[0], f"not one assignment: {line!r}"
        key, _, value = words[0].partition("=")
        assert re.fullmatch(r"[A-Z0-9_]+", key), line
        found[key] = value
    return found


# --------------------------------------------------------------------------- running for real

RECORDER = """#!/bin/sh
# Records its name and arguments, NUL-terminated, one file per call.
n=$(ls "$HC_RECORD" | wc -l)
printf '%s\\0' "${0##*/}" "$@" > "$HC_RECORD/$(printf %04d "$n")"
"""
#: Shell builtins shadowed by functions (a builtin is found before PATH): a test
#: must never signal a real process of this machine (``kill "$(cat /run/dhclient...)"``).
SHADOWED_BUILTINS = ("kill",)


def run_recorded(script: str, commands: list[str]
                 ) -> tuple[list[list[str]], bool, subprocess.CompletedProcess[str]]:
    """Run ``script`` under sh in a fresh directory with ``commands`` replaced by recorders.

    Returns the recorded calls, whether a ``canary`` file appeared (a payload ran),
    and the finished process.
    """
    with tempfile.TemporaryDirectory(prefix="hc-hostile-") as tmp:
        work = Path(tmp)
        bin_dir = work / "bin"
        bin_dir.mkdir()
        for name in {*commands, *SHADOWED_BUILTINS}:
            (bin_dir / name).write_text(RECORDER)
            (bin_dir / name).chmod(0o755)
        record = work / "record"
        record.mkdir()
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HC_RECORD": str(record), "HOME": str(work),
               "LC_ALL": "C"}
        shadow = "".join(f'{name}() {{ "{bin_dir}/{name}" "$@"; }}\n' for name in SHADOWED_BUILTINS)
        done = subprocess.run(["/bin/sh", "-c", shadow + script], cwd=work, env=env,
                              capture_output=True, text=True, timeout=20, check=False)
        calls = [path.read_bytes().decode(errors="surrogateescape").split("\0")[:-1]
                 for path in sorted(record.iterdir())]
        return calls, (work / "canary").exists() or (bin_dir / "canary").exists(), done


def source_ifcfg(text: str, keys: list[str]) -> tuple[list[str], bool]:
    """Source an ifcfg file as CentOS 7's network scripts do; the values of ``keys``."""
    return _source_ifcfg(text, tuple(keys))


@functools.lru_cache(maxsize=4096)
def _source_ifcfg(text: str, keys: tuple[str, ...]) -> tuple[list[str], bool]:
    printed = " ".join(f'"${{{key}-}}"' for key in keys)
    with tempfile.TemporaryDirectory(prefix="hc-ifcfg-") as tmp:
        work = Path(tmp)
        (work / "ifcfg").write_text(text)
        done = subprocess.run(["/bin/sh", "-c", f". ./ifcfg && printf '%s\\0' {printed}"],
                              cwd=work, capture_output=True, timeout=20, check=True,
                              env={"PATH": "/usr/bin:/bin"})
        return done.stdout.decode().split("\0")[:-1], (work / "canary").exists()


# --------------------------------------------------------------------------- inventories


def base_data() -> dict[str, Any]:
    data = copy.deepcopy(BASE_INVENTORY)
    data["check"] = {"egress_url": "http://10.77.0.1:8080/"}
    data["users"] = [{"name": "alice"}]
    return data


def with_value(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = base_data()
    target: Any = data
    for part in path[:-1]:
        target = target.setdefault(part, {}) if isinstance(part, str) else target[part]
    target[path[-1]] = value
    return data


INV = parse_inventory(base_data(), Path("hostile.toml"))
PLATFORMS = {
    "debian": detect(recorded("debian12-master").facts().os),
    "rhel": detect(recorded("rocky9-master").facts().os),
    "centos7": detect(recorded("centos7-worker").facts().os),
}
BACKENDS: tuple[NetworkBackend, ...] = ("ifupdown", "netplan", "ifcfg", "nm-ifcfg",
                                             "nm-keyfile")


# --------------------------------------------------------------------------- artefact checks


def check_interface_files(inv: Inventory) -> None:
    """Every backend's files for every node read back the inventory's names and client id."""
    commands: list[str] = []
    all_names: list[str] = []
    for node in inv.nodes:
        specs = net.interface_specs(inv, node)
        names = [s.name for s in specs]
        for backend in BACKENDS:
            files = net.interface_files(backend, specs, {}).files
            for path, file_spec in files.items():
                content = file_spec.content or ""
                check_one_file(path, content, specs)
            commands += interface_commands(backend, names)
        all_names += names
        hosts = net.render_hosts(inv, None)
        block = hosts.split(net.HOSTS_BEGIN + "\n", 1)[1].split(net.HOSTS_END)[0]
        assert [line.split(" ") for line in block.rstrip("\n").replace("\t", " ").split("\n")] == [
            [str(n.private_address), n.name] for n in inv.nodes]
        assert net.render_hostname(node) == node.name + "\n"
    # One shell for all of them (each command ends in "; true" or an && chain of recorders).
    check_commands("\n".join(dict.fromkeys(commands)), sorted(set(all_names)))


def check_one_file(path: str, content: str, specs: list[net.InterfaceSpec]) -> None:
    names = [s.name for s in specs]
    if path == "/etc/network/interfaces":
        ifaces = []
        for line in content.split("\n"):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            assert words[0] in ("source", "auto", "iface", "address", "gateway",
                                "dns-nameservers"), line
            if words[0] == "iface":
                assert len(words) == 4 and words[2] == "inet", line
                ifaces.append(words[1])
        assert ifaces == ["lo", *names]
    elif path == "/etc/dhcp/dhclient.conf":
        blocks = dhclient_interface_blocks(content)
        assert blocks == [(s.name.encode(), (s.client_id or "").encode())
                          for s in specs if s.method == "dhcp" and s.client_id]
    elif path.endswith(".yaml"):
        keys = [line.strip()[:-1] for line in content.split("\n")
                if line.startswith("    ") and not line.startswith("     ")]
        assert [yaml_double_quoted(k) for k in keys] == names
    elif "/ifcfg-" in path:
        spec = next(s for s in specs if path.endswith("/ifcfg-" + s.name))
        assignments = shell_assignments(content)
        assert assignments["DEVICE"] == spec.name and assignments["NAME"] == spec.name
        keys = ["DEVICE", "NAME", "DHCP_CLIENT_ID"]
        sourced, canary = source_ifcfg(content, keys)
        assert not canary
        assert sourced == [spec.name, spec.name, spec.client_id if spec.method == "dhcp"
                           and spec.client_id else ""]
        if spec.client_id and spec.method == "dhcp":
            assert assignments["DHCP_CLIENT_ID"] == spec.client_id
    elif path.endswith(".nmconnection"):
        spec = next(s for s in specs if path.endswith(f"/homeclust-{s.name}.nmconnection"))
        groups = keyfile_parse(content)
        assert list(groups) == ["connection", "ethernet", "ipv4", "ipv6"]
        assert groups["connection"]["interface-name"] == spec.name
        assert groups["connection"]["id"] == f"homeclust-{spec.name}"
        if spec.method == "dhcp" and spec.client_id:
            assert groups["ipv4"]["dhcp-client-id"] == spec.client_id
            assert set(groups["ipv4"]) == {"method", "dhcp-client-id"}
    elif path == "/etc/resolv.conf":
        pass  # addresses only
    else:
        raise AssertionError(f"unchecked file {path}")


INTERFACE_TOOLS = ["ifdown", "ifup", "ip", "nmcli", "netplan", "networkctl", "kill", "rm"]


def interface_commands(backend: NetworkBackend, names: list[str]) -> list[str]:
    """Every shell command the network step builds from interface names."""
    return [net.takedown_command(backend, names), net.bringup_command(backend, names),
            net.addresses_command(names)]


def check_commands(command: str, names: list[str]) -> None:
    _check_commands(command, tuple(names))


@functools.lru_cache(maxsize=4096)
def _check_commands(command: str, names: tuple[str, ...]) -> None:
    """(Cached: the same command for the same names needs running once.)"""
    calls, canary, _ = run_recorded(command, INTERFACE_TOOLS)
    assert not canary
    assert calls, command
    for call in calls:
        tool, args = call[0], call[1:]
        if tool in ("ifdown", "ifup"):
            assert args[-1] in names and not args[-1].startswith("-"), call
        elif tool == "ip":
            assert args in ([*prefix, name, *suffix] for name in names for prefix, suffix in (
                (["addr", "flush", "dev"], []), (["link", "set"], ["down"]),
                (["-o", "-4", "addr", "show", "dev"], []))), call
        elif tool == "nmcli":
            assert args in ([["connection", "reload"], ["-t", "general", "status"]]
                            + [["device", verb, name] for name in names
                               for verb in ("connect", "disconnect")]), call
        elif tool == "networkctl":
            assert args[0] == "down" and args[1:] == [args[1]] and args[1] in names, call


def check_iptables(inv: Inventory) -> None:
    names = {inv.master.public_interface, inv.master.private_interface,
             *(w.interface for w in inv.workers)}
    tables = [iptables_render.render_nat_table(inv)]
    for node in inv.nodes:
        tables += [iptables_render.render_filter_table(inv, node),
                   iptables_render.render_filter6_table(inv, node)]
    for table in tables:
        for line in table.split("\n"):
            if not line.startswith("-A "):
                continue
            words = shlex.split(line)
            for option in ("-i", "-o"):
                if option in words:
                    value = words[words.index(option) + 1]
                    assert value in names | {"lo"} and not value.startswith("-"), line
        for keep_foreign in (False, True):
            check_restore(table, keep_foreign)


@functools.lru_cache(maxsize=4096)
def check_restore(table: str, keep_foreign: bool) -> None:
    """The here-documents hand the table over byte for byte (iptables-save, read for
    fail2ban's chains, is a recorder that prints nothing).  Cached per table."""
    command = iptables_render.restore_command(table, keep_foreign=keep_foreign)
    _, canary, done = run_recorded(command.replace("iptables-restore", "cat", 1),
                                   ["iptables-save"])
    assert not canary and done.stdout == table, done.stderr


def check_lab(inv: Inventory) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        plan = make_plan(inv, IPv4Network("10.77.0.0/24"), 20222, Path(tmp))
        conf = lab_render.render_dnsmasq_conf(plan, Path(tmp) / "leases", Path(tmp) / "log")
    lines = conf.split("\n")
    (reservation,) = [line for line in lines if line.startswith("dhcp-host=")]
    client, address, name = reservation.removeprefix("dhcp-host=id:").split(",")
    assert bytes(int(h, 16) for h in client.split(":")) == inv.master.dhcp_client_id.encode()
    assert (address, name) == (str(plan.master_public_address), inv.master.name)
    (record,) = [line for line in lines
                 if line.startswith("host-record=") and line.endswith(f",{plan.master_public_address}")]
    assert record.removeprefix("host-record=").split(",")[:-1] == list(plan.master_public_names)
    dhclient = lab_render.render_dhclient_conf("send host-name = gethostname();\n",
                                               inv.master.public_interface,
                                               inv.master.dhcp_client_id)
    assert dhclient_interface_blocks(dhclient) == [
        (inv.master.public_interface.encode(), inv.master.dhcp_client_id.encode())]
    for node in plan.nodes:
        for line in lab_render.render_interfaces(plan, node).split("\n"):
            words = line.split()
            if words and words[0] == "iface":
                assert len(words) == 4 and words[1] in ("lo", *(n.node_interface
                                                                for n in node.links)), line


def check_probe(inv: Inventory) -> None:
    url = inv.check.egress_url
    assert url is not None
    calls, canary = record_probe(inv)
    assert not canary
    ((tool, *args),) = calls
    assert tool == "timeout"
    assert args[:3] == ["10", "bash", "-c"]
    assert args[3] == PROBE_CODE, "the URL must not be part of the probe's code"
    hostport, _, path = url.removeprefix("http://").partition("/")
    host, _, port = hostport.partition(":")
    assert args[4:] == ["homeclust-egress", host, port or "80", "/" + path, hostport]


def record_probe(inv: Inventory) -> tuple[list[list[str]], bool]:
    node = inv.node("worker1")
    probe = egress_probe(PlanContext(inv, node, recorded("debian12-worker").facts()))
    calls, canary, _ = run_recorded(probe.script, ["timeout", "bash"])
    return calls, canary


def _probe_code() -> str:
    calls, _ = record_probe(INV)
    return calls[0][4]


PROBE_CODE = _probe_code()


APT_FLAGS = ("-y", "-q", "-o", "Dpkg::Options::=--force-confdef", "-o",
             "Dpkg::Options::=--force-confold", "--no-install-recommends")


def check_install(packages: tuple[str, ...]) -> None:
    for platform in PLATFORMS.values():
        command = platform.install_command(packages)
        calls, canary, _ = run_recorded(command, ["apt-get", "yum", "dnf"])
        assert not canary
        (call,) = calls
        assert call[0] in ("apt-get", "yum", "dnf") and call[1] == "install", call
        flags = APT_FLAGS if call[0] == "apt-get" else ("-y", "-q")
        assert tuple(call[2:2 + len(flags)]) == flags, call
        names = call[2 + len(flags):]
        names = names[1:] if names[:1] == ["--"] else names
        assert names == sorted(set(packages)), call
        assert not any(name.startswith("-") for name in names), call


def both(*checks: Callable[[Inventory], None]) -> Callable[[Inventory], None]:
    def run(inv: Inventory) -> None:
        for check in checks:
            check(inv)
    return run


def nothing(inv: Inventory) -> None:
    del inv


# --------------------------------------------------------------------------- layer 1: inventory

#: Every inventory field that reaches a script or a file, and what it reaches.
FIELDS: dict[str, tuple[tuple[Any, ...], Callable[[Inventory], None]]] = {
    "master.dhcp_client_id": (("master", "dhcp_client_id"), both(check_interface_files, check_lab)),
    "master.public_interface": (("master", "public_interface"),
                                both(check_interface_files, check_iptables, check_lab)),
    "master.private_interface": (("master", "private_interface"),
                                 both(check_interface_files, check_iptables)),
    "workers.interface": (("workers", 0, "interface"),
                          both(check_interface_files, check_iptables, check_lab)),
    "master.name": (("master", "name"), both(check_interface_files, check_lab)),
    "workers.name": (("workers", 0, "name"), check_interface_files),
    "master.address": (("master", "address"), check_lab),
    "check.egress_url": (("check", "egress_url"), check_probe),
    "repo.packages": (("repo", "packages"), lambda i: check_install(i.repo.packages)),
    "monitor.tools": (("monitor", "tools"), lambda i: check_install(i.monitor.tools)),
    "cluster.name": (("cluster", "name"), nothing),
    "ssh.user": (("ssh", "user"), nothing),
    # Cluster users: no step writes them yet; the grammar must hold already.
    "users.name": (("users", 0, "name"), nothing),
    "users.shell": (("users", 0, "shell"), nothing),
}


def _table_key(path: tuple[Any, ...]) -> tuple[str, str]:
    return str(path[0]), str(path[-1])


def refused_or_inert(field: str, value: Any) -> None:
    path, check = FIELDS[field]
    try:
        inv = parse_inventory(with_value(path, value), Path("hostile.toml"))
    except InventoryError as error:
        table, key = _table_key(path)
        assert error.table is not None and error.table.startswith(table)
        assert error.key == key
        assert error.exit_code == 2
        return
    check(inv)
    if field == "cluster.name":
        # A directory name of its own under the state directory, never a path.
        assert "/" not in inv.cluster.name and not inv.cluster.name.startswith(".")
        assert inv.state_dir.name == inv.cluster.name
    if field == "ssh.user":
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", inv.ssh.user) and inv.ssh.user[0] != "-"
    if field == "users.name":
        assert re.fullmatch(r"[a-z_][a-z0-9_-]*", inv.users[0].name)
    if field == "users.shell":
        assert re.fullmatch(r"/[A-Za-z0-9/._-]+", inv.users[0].shell)


@pytest.mark.parametrize("field", [f for f in FIELDS if f not in (
    "check.egress_url", "repo.packages", "monitor.tools")])
@SETTINGS
@given(value=values)
def test_hostile_value_is_refused_or_inert(field: str, value: str) -> None:
    refused_or_inert(field, value)


@SETTINGS
@given(value=values)
def test_hostile_egress_url_is_refused_or_inert(value: str) -> None:
    refused_or_inert("check.egress_url", value)
    refused_or_inert("check.egress_url", "http://" + value)
    refused_or_inert("check.egress_url", "http://10.77.0.1:8080/" + value)


@pytest.mark.parametrize("field", ["repo.packages", "monitor.tools"])
@SLOW_SETTINGS
@given(value=values)
def test_hostile_package_name_is_refused_or_inert(field: str, value: str) -> None:
    refused_or_inert(field, [value])


@pytest.mark.parametrize(("field", "value"), [
    # The reproduced holes, spelled out.
    ("check.egress_url", "http://x;touch${IFS}canary;/"),
    ("check.egress_url", "http://10.77.0.1:8080/'$(touch canary)'"),
    ("check.egress_url", "http://10.77.0.1:8080/%n%n%n"),
    ("master.dhcp_client_id", 'x";}send-host-name'),
    ("master.dhcp_client_id", "$(touch${IFS}canary)"),
    ("master.dhcp_client_id", "a`touch`"),
    ("master.public_interface", "-jACCEPT"),
    ("workers.interface", "eth0:1"),
    ("master.address", "x,10.0.0.1\ndhcp-range=1"),
    ("master.address", "-oProxyCommand=x"),
    ("ssh.user", "-oProxyCommand=x"),
    ("repo.packages", ["--allow-unauthenticated"]),
    ("monitor.tools", ["tcpdump;reboot"]),
    ("cluster.name", "..."),
    # "$" matches before a trailing newline: the grammars must match the whole value.
    ("master.name", "worker9\n"),
    ("check.egress_url", "http://10.77.0.1/\n"),
    ("users.name", "alice\n"),
    ("users.shell", "/bin/bash\n"),
])
def test_known_hostile_values_are_refused(field: str, value: Any) -> None:
    path, _ = FIELDS[field]
    with pytest.raises(InventoryError) as error:
        parse_inventory(with_value(path, value), Path("hostile.toml"))
    table, key = _table_key(path)
    assert f"[{table}" in str(error.value) and f"] {key}:" in str(error.value)


@pytest.mark.parametrize(("field", "value"), [
    ("check.egress_url", "http://whoami.example.org/"),
    ("check.egress_url", "http://10.77.0.1:8080/ip/v4.txt"),
    ("check.egress_url", "http://10.77.0.1"),
    ("master.dhcp_client_id", "cluster-master"),
    ("master.dhcp_client_id", "01:52:54:00:12:34:56"),
    ("master.public_interface", "enp3s0f1"),
    ("workers.interface", "eth0.100"),
    ("master.address", "cluster-master.example.org"),
    ("master.address", "2001:db8::10"),
    ("ssh.user", "admin_1"),
    ("repo.packages", ["libopenmpi-dev", "g++", "python3.11", "perl-Data_Dumper"]),
    ("cluster.name", "lab.2"),
])
def test_ordinary_values_pass_and_reach_their_files(field: str, value: Any) -> None:
    path, check = FIELDS[field]
    inv = parse_inventory(with_value(path, value), Path("ok.toml"))
    check(inv)


# --------------------------------------------------------------------------- layer 2: renderers


def dhcp_spec(client_id: str, name: str = "eth0") -> net.InterfaceSpec:
    return net.InterfaceSpec(name, "public", "dhcp", client_id=client_id)


@SLOW_SETTINGS
@given(client_id=values)
def test_renderers_write_any_client_id_as_data(client_id: str) -> None:
    spec = dhcp_spec(client_id)
    # dhclient.conf: a string literal whatever the id holds.
    dhclient = net.render_dhclient_conf([spec])
    assert dhclient is not None
    assert dhclient_interface_blocks(dhclient) == [(b"eth0", client_id.encode())]
    lab = lab_render.render_dhclient_conf("", "eth0", client_id)
    assert dhclient_interface_blocks(lab) == [(b"eth0", client_id.encode())]
    # ifcfg (sourced as shell): a quoted word, or refused when it cannot be one line.
    try:
        ifcfg = net.render_ifcfg(spec, nm_controlled=False)
    except UnsafeValueError:
        assert any(ord(c) < 0x20 or ord(c) == 0x7F for c in client_id)
    else:
        assert shell_assignments(ifcfg)["DHCP_CLIENT_ID"] == client_id
        sourced, canary = source_ifcfg(ifcfg, ["DHCP_CLIENT_ID", "DEVICE"])
        assert not canary and sourced == [client_id, "eth0"]
    # NetworkManager keyfile: GLib-escaped, or refused (NUL has no escape).
    try:
        keyfile = net.render_nm_keyfile(spec)
    except UnsafeValueError:
        assert any((ord(c) < 0x20 and c not in "\n\t\r") or ord(c) == 0x7F for c in client_id)
    else:
        groups = keyfile_parse(keyfile)
        assert groups["ipv4"] == {"method": "auto", "dhcp-client-id": client_id}
        assert groups["connection"]["interface-name"] == "eth0"
    # The comment naming the id in /etc/network/interfaces stays a comment.
    interfaces = net.render_ifupdown([spec], None)
    assert [line.split()[:2] for line in interfaces.split("\n") if line.startswith("iface")] == [
        ["iface", "lo"], ["iface", "eth0"]]


@SLOW_SETTINGS
@given(client_id=values)
def test_lab_dnsmasq_reservation_holds_any_client_id_as_bytes(client_id: str) -> None:
    inv = dataclasses.replace(INV, master=dataclasses.replace(INV.master, dhcp_client_id=client_id))
    check_lab(inv)


@SLOW_SETTINGS
@given(name=values)
def test_renderers_refuse_interface_names_they_cannot_write(name: str) -> None:
    """No quoting exists in /etc/network/interfaces, iptables-restore or file names."""
    try:
        spec = net.InterfaceSpec(name, "private", "static", IPv4Interface("192.168.10.1/24"))
        ifupdown = net.render_ifupdown([spec], None)
        rendered = {b: net.interface_files(b, [spec], {}).files for b in BACKENDS}
        commands = [c for b in BACKENDS for c in interface_commands(b, [name])]
    except UnsafeValueError:
        return
    # Accepted: then it is a plain name everywhere.
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}", name)
    assert f"iface {name} inet static" in ifupdown
    for files in rendered.values():
        for path, file_spec in files.items():
            check_one_file(path, file_spec.content or "", [spec])
    for command in commands:
        check_commands(command, [name])


@SETTINGS
@given(name=values)
def test_iptables_renderer_refuses_interface_names_it_cannot_write(name: str) -> None:
    inv = dataclasses.replace(INV, master=dataclasses.replace(INV.master, public_interface=name))
    try:
        check_iptables(inv)
    except UnsafeValueError:
        return
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}", name)


@SETTINGS
@given(name=values)
def test_hosts_and_hostname_refuse_names_they_cannot_write(name: str) -> None:
    workers = (dataclasses.replace(INV.workers[0], name=name), *INV.workers[1:])
    inv = dataclasses.replace(INV, workers=workers)
    try:
        hosts = net.render_hosts(inv, None)
        hostname = net.render_hostname(inv.node(name))
    except UnsafeValueError:
        return
    assert re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", name)
    assert f"{inv.workers[0].private_address}\t{name}\n" in hosts
    assert hostname == name + "\n"


@SLOW_SETTINGS
@given(url=values)
def test_egress_probe_passes_any_url_as_data(url: str) -> None:
    """Even a URL the grammar refuses never becomes code in the probe."""
    for candidate in (url, "http://" + url, "http://10.77.0.1:8080/" + url):
        inv = dataclasses.replace(INV, check=dataclasses.replace(INV.check, egress_url=candidate))
        try:
            calls, canary = record_probe(inv)
        except UnsafeValueError:
            continue
        assert not canary
        ((tool, *args),) = calls
        assert tool == "timeout" and args[:4] == ["10", "bash", "-c", PROBE_CODE]


@SETTINGS
@given(name=values)
def test_install_command_never_runs_a_package_name(name: str) -> None:
    try:
        check_install(("tcpdump", name))
    except UnsafeValueError:
        return
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name)


@SETTINGS
@given(names=st.lists(values, min_size=1, max_size=3))
def test_lab_dns_names_are_refused_or_plain(names: list[str]) -> None:
    inv = dataclasses.replace(INV, master=dataclasses.replace(INV.master, address=names[0]))
    try:
        check_lab(inv)
    except UnsafeValueError:
        return
    for name in inv.master.address, inv.master.name:
        assert re.fullmatch(r"[A-Za-z0-9.:-]+", name)


def test_restore_command_refuses_a_table_that_would_end_its_heredoc() -> None:
    table = iptables_render.render_filter_table(INV, INV.master_node)
    evil = table.replace("COMMIT\n", "HOMECLUST_RULES_EOF\ntouch canary\nCOMMIT\n")
    with pytest.raises(UnsafeValueError):
        iptables_render.restore_command(evil)


# --------------------------------------------------------------------------- the probe, for real


@pytest.fixture
def http_server() -> Iterator[tuple[int, list[str]]]:
    """An HTTP server on loopback that answers with the request path and records it."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            body = b"203.0.113.7"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("path", ["ip", "'$(touch${IFS}canary)'", "%n%s'`touch${IFS}canary`'",
                                  "a'\"\\\\x;touch${IFS}canary;'"])
def test_egress_probe_for_real_sends_the_path_as_data(http_server: tuple[int, list[str]],
                                                       path: str, tmp_path: Path) -> None:
    """The probe run by real bash against a loopback server: a hostile path (the
    grammar would refuse it; the probe must not care) reaches the server as bytes."""
    port, seen = http_server
    inv = dataclasses.replace(INV, check=dataclasses.replace(
        INV.check, egress_url=f"http://127.0.0.1:{port}/{path}", expect_master_address=False))
    probe = egress_probe(PlanContext(inv, inv.node("worker1"), recorded("debian12-worker").facts()))
    done = subprocess.run(["/bin/sh", "-c", probe.script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=30, check=False,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert not (tmp_path / "canary").exists(), "a payload in the URL ran"
    item = probe.evaluate(done.returncode, done.stdout)
    assert item.status == "pass", (item, done.stderr)
    assert "203.0.113.7" in item.detail
    assert seen == ["/" + path]


# --------------------------------------------------------------------------- the command line

CLI_INVENTORY = """
[master]
name = "master"
address = "127.0.0.1"
private_address = "192.168.10.1"
{master}
[[workers]]
name = "worker1"
private_address = "192.168.10.2"

[check]
{check}
"""


@pytest.mark.parametrize(("table", "key", "line"), [
    ("check", "egress_url", 'egress_url = "http://x;touch${IFS}/tmp/canary;/"'),
    ("check", "egress_url", "egress_url = \"http://10.0.0.1/'$(reboot)'\""),
    ("master", "dhcp_client_id", 'dhcp_client_id = "x\\";} send host-name \\"evil"'),
    ("master", "dhcp_client_id", 'dhcp_client_id = "$(reboot)"'),
])
@pytest.mark.parametrize("command", ["check", "up", "plan"])
def test_cli_refuses_a_hostile_inventory_with_exit_2_naming_the_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        table: str, key: str, line: str, command: str) -> None:
    monkeypatch.setattr("homeclust.api.SshConnector", lambda *a, **k: pytest.fail("connected"))
    path = tmp_path / "inventory.toml"
    path.write_text(CLI_INVENTORY.format(master=line if table == "master" else "",
                                         check=line if table == "check" else ""))
    from homeclust.cli import main

    with pytest.raises(SystemExit) as info:
        main(["-i", str(path), command])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"[{table}] {key}:" in err and str(path) in err
