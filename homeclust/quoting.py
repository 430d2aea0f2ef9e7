"""Grammars for inventory values, and quoting for every place a value is written to.

Inventory values end up in shell scripts run as root and in configuration
files that other programs parse (some of them, like ifcfg files, are sourced
as shell).  Two defences, both on purpose:

* a strict grammar per kind of value, checked when the inventory is loaded
  (:mod:`homeclust.inventory` refuses anything else with exit code 2, before any
  host is contacted);
* quoting for each destination in the renderers, so a renderer stays safe
  even when called with a value the grammar would have refused.  Where a
  destination has no quoting at all (``/etc/network/interfaces``, iptables
  interface names, ``/etc/hosts``, file names) the renderer refuses the value
  with :class:`~homeclust.errors.UnsafeValueError` instead.

Everything here is pure.
"""

from __future__ import annotations

import re
import shlex
from ipaddress import IPv4Address, ip_address

from homeclust.errors import UnsafeValueError

# --------------------------------------------------------------------------- grammars
#
# Always checked with ``fullmatch``: with ``match``, ``$`` also matches before a
# trailing newline, and "worker1\n" would pass for a host name.

#: A host name: one DNS label, lower case (nodes are addressed by it in /etc/hosts,
#: hostfiles and the schedulers' configuration).
HOSTNAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
#: What the kernel accepts as a device name (dev_valid_name: at most 15 bytes, no
#: '/', ':' or white space, not '.' or '..'), narrowed to characters that are plain
#: in every file and command they reach; never a leading '-' (it would read as an
#: option to iptables, ip, ifup ...).
INTERFACE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")
#: Cluster names become directory names (state, logs, lab) and lab machine names.
CLUSTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
#: DHCP client ids: text ids ("cluster-master") and the hex form ("01:52:54:00:12:34:56").
CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
#: POSIX-ish login names (useradd's default NAME_REGEX, plus upper case and '.').
USER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
#: The union of Debian's (``[a-z0-9][a-z0-9+.-]+``) and RPM's package-name grammar.
PACKAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")

_DNS_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
#: A DNS name (labels of letters, digits and inner '-'), as the master's address
#: or the host of ``[check] egress_url``.
DNS_NAME_RE = re.compile(rf"^(?=.{{1,253}}$){_DNS_LABEL}(\.{_DNS_LABEL})*$")
#: ``http://HOST[:PORT][/PATH]`` with HOST a DNS name or IPv4 address and PATH of
#: RFC 3986 unreserved characters and '/': nothing a shell, printf or HTTP treats specially.
EGRESS_URL_RE = re.compile(
    r"^http://(?P<host>[A-Za-z0-9.-]{1,253})(:(?P<port>[0-9]{1,5}))?(?P<path>/[A-Za-z0-9._~/-]*)?$"
)


def is_hostname(value: str) -> bool:
    return bool(HOSTNAME_RE.fullmatch(value))


def is_interface(value: str) -> bool:
    return bool(INTERFACE_RE.fullmatch(value))


def is_dns_name(value: str) -> bool:
    return bool(DNS_NAME_RE.fullmatch(value))


def is_address(value: str) -> bool:
    """An IPv4 or IPv6 address literal."""
    try:
        ip_address(value)
    except ValueError:
        return False
    return True


def is_ipv4(value: str) -> bool:
    try:
        IPv4Address(value)
    except ValueError:
        return False
    return True


def is_package(value: str) -> bool:
    return bool(PACKAGE_RE.fullmatch(value))


def split_egress_url(url: str) -> tuple[str, int, str] | None:
    """(host, port, path) of a URL in the ``egress_url`` grammar, or None if it is not one."""
    match = EGRESS_URL_RE.fullmatch(url)
    if not match:
        return None
    host = match.group("host")
    if not (is_dns_name(host) or is_ipv4(host)):
        return None
    port = int(match.group("port") or 80)
    if not 1 <= port <= 65535:
        return None
    return host, port, match.group("path") or "/"


# --------------------------------------------------------------------------- refusing


def require(value: str, pattern: re.Pattern[str], what: str) -> str:
    """``value`` if it matches ``pattern``; otherwise refuse it (no quoting exists there)."""
    if not pattern.fullmatch(value):
        raise UnsafeValueError(
            f"refusing to write {what} {value!r}: it cannot be written there safely",
            hint="the inventory grammar refuses such values; fix the inventory",
        )
    return value


def require_interface(value: str) -> str:
    return require(value, INTERFACE_RE, "the interface name")


def require_hostname(value: str) -> str:
    return require(value, HOSTNAME_RE, "the host name")


def _no_control(value: str, what: str, *, allow: str = "") -> None:
    for char in value:
        if (ord(char) < 0x20 or ord(char) == 0x7F) and char not in allow:
            raise UnsafeValueError(
                f"refusing to write {what} {value!r}: it contains the control character "
                f"{char!r}", hint="the inventory grammar refuses such values; fix the inventory")


# --------------------------------------------------------------------------- quoting


def shell_word(value: str) -> str:
    """One word of POSIX shell (``shlex.quote``): never code, whatever it holds.

    NUL is refused: no shell word can hold it (the script would be cut there).
    """
    if "\0" in value:
        raise UnsafeValueError(f"refusing to pass {value!r} to a shell: it contains NUL")
    return shlex.quote(value)


def http_request_part(value: str) -> str:
    """A piece of an HTTP request line or header: no control characters (a line
    break would start a header of its own)."""
    _no_control(value, "the HTTP request part")
    return value


def ifcfg_value(value: str) -> str:
    """A value of an ifcfg file (``KEY=VALUE``).

    CentOS 7's network scripts source these files as shell, NetworkManager's
    ifcfg-rh plugin parses them line by line with shell quoting rules: so the
    value is a single-quoted shell word, and control characters (a newline would
    end the line for NetworkManager) are refused.
    """
    _no_control(value, "the ifcfg value")
    return shlex.quote(value)


def dhclient_string(value: str) -> str:
    """A string literal of dhclient.conf, quotes included.

    ISC dhclient's lexer ends a string at an unescaped ``"``, takes ``\\X`` as X
    for characters without a meaning of their own, and ``\\NNN`` as an octal
    byte: so ``"`` and ``\\`` are backslash-escaped and every byte outside
    printable ASCII is written in octal.  Nothing in the value can end the
    string, the statement or the block.
    """
    out = []
    for byte in value.encode():
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def keyfile_value(value: str) -> str:
    """A value of a GLib key file (NetworkManager's keyfiles), as g_key_file_set_string writes it.

    ``\\`` ``\\n`` ``\\t`` ``\\r`` are escaped and a leading space becomes ``\\s``, so
    a value can never start a new line (a new key or ``[group]``).  NUL cannot be
    represented (GLib strings end at it): refused, like other control characters
    GLib would write raw.
    """
    _no_control(value, "the key file value", allow="\n\t\r")
    out = []
    for index, char in enumerate(value):
        if char == "\\":
            out.append("\\\\")
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif char == "\r":
            out.append("\\r")
        elif char == " " and index == 0:
            out.append("\\s")
        else:
            out.append(char)
    return "".join(out)


def yaml_string(value: str) -> str:
    """A YAML double-quoted scalar: always a string (never ``yes``, ``1e3`` or ``null``).

    Everything but printable ASCII is escaped (``\\uXXXX``/``\\UXXXXXXXX``), so
    no character can be taken as a line break (YAML also breaks lines at U+0085,
    U+2028 and U+2029) or end the scalar.
    """
    out = []
    for char in value:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= code < 0x7F:
            out.append(char)
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def dnsmasq_client_id(value: str) -> str:
    """A client id for dnsmasq's ``dhcp-host=id:...``: the bytes in hex, colon-separated.

    dnsmasq's configuration has no quoting (a ``,`` would start the next field),
    and the hex form is exactly the bytes dhclient sends for a string id.
    """
    return ":".join(f"{byte:02x}" for byte in value.encode())
