"""iptables rulesets, rendered in the exact form ``iptables-save`` prints them.

Rendering in canonical form means the live table read back from a host can
be compared line by line with what homeclust wants: any difference is drift.

Who owns what: the nat step owns the ``nat`` table, the firewall step the
``filter`` table.  Each is loaded with ``iptables-restore`` of that table alone
(the kernel swaps the whole table at once; the other tables are untouched),
and each step replaces only its own table's section in the persistent rules
file, so re-running one step never undoes the other -- unlike the guide, whose
firewall section starts by flushing the NAT rules the previous section added.

Interface names go into the rules unquoted (``iptables-restore`` has no
quoting for them, and a name starting with ``-`` would read as an option):
only plain names are rendered, anything else is refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network

from homeclust.errors import UnsafeValueError
from homeclust.facts import normalize_iptables
from homeclust.inventory import Inventory, Node
from homeclust.quoting import require_interface

#: Chains other tools manage inside our tables; ignored when comparing (fail2ban
#: creates f2b-<jail> chains and jumps to them from INPUT).
FOREIGN_CHAIN_PREFIXES = ("f2b-",)

_BUILTIN_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
}


def _table(name: str, policies: dict[str, str], rules: Iterable[str]) -> str:
    lines = [f"*{name}"]
    lines += [f":{chain} {policies.get(chain, 'ACCEPT')} [0:0]" for chain in _BUILTIN_CHAINS[name]]
    lines += list(rules)
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _source(network: IPv4Network | IPv6Network) -> str:
    return "" if network.prefixlen == 0 else f"-s {network} "


def _log(chain: str, label: str) -> str:
    return f'-A {chain} -m limit --limit 5/min -j LOG --log-prefix "homeclust-{label}-drop: "'


def _public_accepts(inventory: Inventory, *, version: int) -> list[str]:
    """The master's public-side accepts: ``public_tcp_ports`` open to all, except the SSH
    port, which is open only to the ``ssh_from`` networks of this IP version."""
    interface = require_interface(inventory.master.public_interface)
    fw = inventory.firewall
    rules = []
    for port in fw.public_tcp_ports:
        sources = ([_source(net) for net in fw.ssh_from if net.version == version]
                   if port == inventory.ssh.port else [""])
        rules += [f"-A INPUT {source}-i {interface} -p tcp -m tcp --dport {port} -j ACCEPT"
                  for source in sources]
    return rules


def render_nat_table(inventory: Inventory) -> str:
    """The master's nat table: masquerade the private network out of the public side."""
    public = require_interface(inventory.master.public_interface)
    return _table("nat", {}, [
        f"-A POSTROUTING -s {inventory.cluster.private_network} -o {public} -j MASQUERADE",
    ])


def render_filter_table(inventory: Inventory, node: Node) -> str:
    """The guide's default-deny policies, corrected (see module docstring of the step)."""
    private = inventory.cluster.private_network
    established = "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    rules = [
        "-A INPUT -i lo -j ACCEPT",
        f"-A INPUT {established}",
        f"-A INPUT -s {private} -i {require_interface(node.private_interface)} -j ACCEPT",
    ]
    if node.is_master:
        m = inventory.master
        fw = inventory.firewall
        rules += _public_accepts(inventory, version=4)
        if fw.log_dropped:
            rules.append(_log("INPUT", "input"))
        inside, outside = require_interface(m.private_interface), require_interface(m.public_interface)
        rules += [
            f"-A FORWARD {established}",
            f"-A FORWARD -s {private} -i {inside} -o {outside} -j ACCEPT",
        ]
        if fw.log_dropped:
            rules.append(_log("FORWARD", "forward"))
    elif inventory.firewall.log_dropped:
        rules.append(_log("INPUT", "input"))
    return _table("filter", {"INPUT": "DROP", "FORWARD": "DROP"}, rules)


#: The only addresses the private interface accepts IPv6 from: the cluster speaks
#: IPv4, so IPv6 there is link-local (neighbour discovery, MLD) or nothing.
LINK_LOCAL6 = "fe80::/10"
#: ICMPv6 errors, needed from anywhere (path MTU discovery breaks without packet-too-big).
_ICMP6_ERRORS = (1, 2, 3, 4)  # unreachable, packet too big, time exceeded, parameter problem
#: Neighbour discovery (router/neighbour solicitation and advertisement): valid only
#: with hop limit 255, which proves the sender is on the link (RFC 4861).
_ICMP6_NDP = (133, 134, 135, 136)
#: Multicast listener discovery (queries, reports v1, done, reports v2): link-local only.
_ICMP6_MLD = (130, 131, 132, 143)
_ICMP6_ECHO_REQUEST = 128


def _icmp6(icmp_type: int, *, source: str = "", extra: str = "") -> str:
    return (f"-A INPUT {source}-p ipv6-icmp -m icmp6 --icmpv6-type {icmp_type} {extra}"
            "-j ACCEPT")


def render_filter6_table(inventory: Inventory, node: Node) -> str:
    """The IPv6 counterpart: the same default-deny, so IPv6 is no way around the IPv4 rules.

    The cluster itself speaks IPv4; IPv6 gets loopback, established traffic,
    the ICMPv6 that IPv6 needs (errors from anywhere, neighbour discovery only
    from the link itself, MLD only from link-local addresses, echo requests
    rate-limited; every other ICMPv6 message is dropped), DHCPv6 replies,
    link-local sources on the private interface (not anything that arrives
    there: IPv4 accepts only the private network on it), and SSH on the public
    side only from IPv6 networks listed in ``[firewall] ssh_from``.  Nothing is
    forwarded.  Written as ``ip6tables-save`` prints it back (checked on
    Debian 12 with iptables-nft and -legacy).
    """
    link_local = f"-s {LINK_LOCAL6} "
    rules = [
        "-A INPUT -i lo -j ACCEPT",
        "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        *(_icmp6(t) for t in _ICMP6_ERRORS),
        *(_icmp6(t, extra="-m hl --hl-eq 255 ") for t in _ICMP6_NDP),
        *(_icmp6(t, source=link_local) for t in _ICMP6_MLD),
        _icmp6(_ICMP6_ECHO_REQUEST, extra="-m limit --limit 10/sec --limit-burst 20 "),
        # Before the private-interface accept below, which would take the rest.
        "-A INPUT -p ipv6-icmp -j DROP",
        f"-A INPUT {link_local}-p udp -m udp --dport 546 -j ACCEPT",
        f"-A INPUT {link_local}-i {require_interface(node.private_interface)} -j ACCEPT",
    ]
    if node.is_master:
        rules += _public_accepts(inventory, version=6)
    if inventory.firewall.log_dropped:
        rules.append(_log("INPUT", "input6"))
    return _table("filter", {"INPUT": "DROP", "FORWARD": "DROP"}, rules)


def comparable(table_text: str | None) -> str:
    """A table as homeclust compares it: normalized, other tools' chains left out."""
    if not table_text:
        return ""
    kept = []
    for line in normalize_iptables(table_text).splitlines():
        words = line.split()
        if line.startswith(":") and words[0][1:].startswith(FOREIGN_CHAIN_PREFIXES):
            continue
        if line.startswith("-A ") and (
            words[1].startswith(FOREIGN_CHAIN_PREFIXES)
            or ("-j" in words and words[words.index("-j") + 1].startswith(FOREIGN_CHAIN_PREFIXES))
        ):
            continue
        kept.append(line)
    return "\n".join(kept) + "\n"


_TABLE_START = re.compile(r"^\*(\w+)\s*$")


def split_rules_file(text: str) -> list[tuple[str | None, str]]:
    """Split an iptables-save file into (table or None for loose text, text) blocks."""
    blocks: list[tuple[str | None, str]] = []
    current: str | None = None
    lines: list[str] = []
    for line in text.splitlines(keepends=True):
        match = _TABLE_START.match(line)
        if match and current is None:
            if lines:
                blocks.append((None, "".join(lines)))
            current, lines = match.group(1), [line]
        elif current is not None:
            lines.append(line)
            if line.strip() == "COMMIT":
                blocks.append((current, "".join(lines)))
                current, lines = None, []
        else:
            lines.append(line)
    if lines:
        blocks.append((current, "".join(lines)))
    return blocks


def replace_table(current: str | None, table: str, rendered: str) -> str:
    """The persistent rules file with ``table`` replaced by ``rendered``, the rest kept.

    Comment lines of iptables-save (timestamps) are dropped so the file is
    stable from run to run; tables we do not own are kept verbatim.
    """
    kept: dict[str, str] = {}
    order: list[str] = []
    for name, text in split_rules_file(current or ""):
        if name is None:
            continue
        if name not in kept:
            order.append(name)
        body = "".join(line for line in text.splitlines(keepends=True)
                       if not line.startswith("#"))
        kept[name] = body if body.endswith("\n") else body + "\n"
    if table not in kept:
        order.append(table)
    kept[table] = rendered
    # filter first, then nat, then anything else, for a predictable file.
    rank = {"filter": 0, "nat": 1}
    order.sort(key=lambda n: rank.get(n, 2))
    return "# Managed by homeclust (nat and firewall steps; each owns its table).\n" + "".join(
        kept[name] for name in order
    )


_HEREDOC_END = "HOMECLUST_RULES_EOF"


def restore_command(rendered: str, *, ipv6: bool = False, keep_foreign: bool = False) -> str:
    """Load one table atomically (tables not in the input are left alone).

    The table goes through quoted here-documents, so the shell expands nothing
    in it; a line equal to the delimiter would end one early and run the rest
    as commands, so such a table is refused.

    ``keep_foreign``: the chains of other tools (fail2ban's ``f2b-*`` with
    their bans) and the rules jumping to them are read from the live table at
    that moment and loaded again with ours, so re-applying the firewall never
    lifts a ban.  Their jumps come first, as fail2ban inserts them.
    """
    if _HEREDOC_END in rendered.splitlines() or not rendered.endswith("\n"):
        raise UnsafeValueError("refusing to load a table that would end its here-document early")
    tool = "ip6tables" if ipv6 else "iptables"
    if not keep_foreign:
        return f"{tool}-restore <<'{_HEREDOC_END}'\n{rendered}{_HEREDOC_END}"
    lines = rendered.splitlines(keepends=True)
    header = "".join(line for line in lines if line.startswith(("*", ":")))
    body = "".join(line for line in lines if not line.startswith(("*", ":")))
    table = lines[0].strip().lstrip("*")
    names = "|".join(prefix.rstrip("-") + "-" for prefix in FOREIGN_CHAIN_PREFIXES)
    return (
        f"hc_live=$({tool}-save -t {table} 2>/dev/null)\n"
        "{\n"
        f"cat <<'{_HEREDOC_END}'\n{header}{_HEREDOC_END}\n"
        f"printf '%s\\n' \"$hc_live\" | grep -E '^:({names})' | "
        "sed -E 's/\\[[0-9]+:[0-9]+\\]$/[0:0]/'\n"
        f"printf '%s\\n' \"$hc_live\" | grep -E '^-A [A-Z]+ .*-j ({names})'\n"
        f"printf '%s\\n' \"$hc_live\" | grep -E '^-A ({names})'\n"
        f"cat <<'{_HEREDOC_END}'\n{body}{_HEREDOC_END}\n"
        f"}} | {tool}-restore"
    )


def chain_policy(table_text: str | None, chain: str) -> str | None:
    for line in (table_text or "").splitlines():
        if line.startswith(f":{chain} "):
            return line.split()[1]
    return None


def chain_rules(table_text: str | None, chain: str) -> list[str]:
    return [line for line in (table_text or "").splitlines() if line.startswith(f"-A {chain} ")]
