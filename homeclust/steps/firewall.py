"""firewall step: the guide's default-deny policies, applied atomically and safely.

Master: INPUT and FORWARD drop by default; loopback, established/related,
everything from the private network on the private interface, SSH on the
public side only from ``[firewall] ssh_from``, the other ``public_tcp_ports``
open, forwarding only private -> public (return traffic rides on the
established rule), optional rate-limited LOG of drops.  Workers: loopback,
established, everything from the private network.

What the guide does that this step does not: flush the NAT table (the nat step
owns it), open 80/443 to the institute network "for package downloads"
(downloads are outgoing; their replies are established traffic).

The filter table is loaded with one ``iptables-restore`` (the kernel swaps it
at once: there is never a moment with DROP but no SSH accept) under an armed
rollback, and confirmed over a new SSH connection.  A configuration that would
drop the admin's own SSH path is refused before anything is sent.
"""

from __future__ import annotations

import shlex
from ipaddress import IPv4Address, IPv6Address, IPv6Network

from homeclust.changes import Change
from homeclust.errors import StepError
from homeclust.facts import FactQuery
from homeclust.inventory import Inventory, Node
from homeclust.render.iptables import (
    LINK_LOCAL6,
    chain_policy,
    chain_rules,
    comparable,
    render_filter6_table,
    render_filter_table,
)
from homeclust.steps.base import CheckItem, Guard, PlanContext, Step, StepPlan
from homeclust.steps.netfilter import (
    NETFILTER_FACTS,
    competitor_changes,
    loader_packages,
    loader_services,
    table_changes,
)

ROLLBACK_AFTER = 30


def admin_path_allowed(inventory: Inventory, node: Node, client: IPv4Address | IPv6Address,
                       arrived_on: str | None, server_port: int) -> str | None:
    """Why the rendered policy would cut the session described, or None if it would not."""
    private = inventory.cluster.private_network
    # As rendered: on the private interface IPv4 from the private network, IPv6 from
    # link-local addresses only.
    accepted_there = private if client.version == 4 else IPv6Network(LINK_LOCAL6)
    if arrived_on == node.private_interface and client in accepted_there:
        return None
    if node.is_master and arrived_on == inventory.master.public_interface:
        fw = inventory.firewall
        if server_port != inventory.ssh.port:
            return (f"your session arrives on port {server_port}, but the firewall opens SSH "
                    f"on port {inventory.ssh.port} ([ssh] port)")
        if server_port not in fw.public_tcp_ports:
            return (f"SSH port {server_port} is not in [firewall] public_tcp_ports, so the "
                    "public side would be closed to SSH")
        if not any(client.version == net.version and client in net for net in fw.ssh_from):
            return (f"your address {client} is not in [firewall] ssh_from "
                    f"({', '.join(map(str, fw.ssh_from))})")
        return None
    if arrived_on == "lo":
        return None
    return (f"your session from {client} arrives on {arrived_on or 'an unknown interface'}, "
            "which the firewall would close")


def refuse_lockout(ctx: PlanContext) -> None:
    """Raise a StepError if loading the rendered tables could cut the admin's SSH session.

    When the session's origin is unknown (no ``$SSH_CONNECTION`` in the facts)
    the check cannot be made: a change to the live tables is refused rather
    than risked -- a refused change is safer than a lockout.
    """
    inventory, node, facts = ctx.inventory, ctx.node, ctx.facts
    peer = facts.ssh_peer
    if peer is None:
        if not _live_tables_differ(ctx):
            return  # nothing will be loaded: nothing can cut the session
        raise StepError(
            f"{node.name}: refusing to change the firewall: the origin of the SSH session is "
            "unknown (no $SSH_CONNECTION on the host), so homeclust cannot check that the "
            "new rules keep it open",
            hint="connect over plain SSH (not through a ForceCommand or a shell that drops "
            "$SSH_CONNECTION); nothing was changed")
    arrived_on = facts.interface_with_address(peer.server_address)
    problem = admin_path_allowed(inventory, node, peer.client_address, arrived_on,
                                 peer.server_port)
    if problem:
        raise StepError(
            f"{node.name}: refusing to apply a firewall that would lock you out: {problem}",
            hint="fix [firewall] in the inventory; nothing was changed",
        )


def _live_tables_differ(ctx: PlanContext) -> bool:
    """Whether the live filter table(s) differ from what would be loaded."""
    facts = ctx.facts
    if comparable(facts.iptables.get("filter")) != comparable(
            render_filter_table(ctx.inventory, ctx.node)):
        return True
    return facts.ipv6 and comparable(facts.ip6tables.get("filter")) != comparable(
        render_filter6_table(ctx.inventory, ctx.node))


def _options(rule: str) -> dict[str, tuple[bool, str]]:
    """An iptables-save rule as option -> (negated, value), values as single tokens.

    Matching on tokens, not substrings: "-i eth1" must not match "-i eth10".
    """
    words = shlex.split(rule)
    found: dict[str, tuple[bool, str]] = {}
    negate = False
    for index, word in enumerate(words):
        if word == "!":
            negate = True
            continue
        if word.startswith("-") and index + 1 < len(words) and not words[index + 1].startswith("-"):
            found.setdefault(word, (negate, words[index + 1]))
        negate = False
    return found


def _established_only(options: dict[str, tuple[bool, str]]) -> bool:
    for option in ("--ctstate", "--state"):
        negated, value = options.get(option, (True, ""))
        if not negated and value and set(value.split(",")) <= {"RELATED", "ESTABLISHED"}:
            return True
    return False


def forward_accepts_beyond_one_way(table_text: str | None, inside: str, outside: str
                                   ) -> list[str]:
    """FORWARD rules that accept more than new connections inside -> outside (and replies)."""
    wrong = []
    for rule in chain_rules(table_text, "FORWARD"):
        options = _options(rule)
        if options.get("-j", (False, ""))[1] != "ACCEPT" or _established_only(options):
            continue
        if options.get("-i") == (False, inside) and options.get("-o") == (False, outside):
            continue
        wrong.append(rule)
    return wrong


class FirewallStep(Step):
    name = "firewall"
    summary = "default-deny iptables policies, persistent, with lockout protection"
    depends_on = ("network",)

    def fact_query(self, inventory: Inventory) -> FactQuery:
        return NETFILTER_FACTS

    def plan(self, ctx: PlanContext) -> StepPlan:
        inventory, node, facts = ctx.inventory, ctx.node, ctx.facts
        for iface in {node.private_interface} | (
                {inventory.master.public_interface} if node.is_master else set()):
            if iface not in facts.interfaces:
                raise StepError(f"{node.name}: interface {iface} does not exist",
                                hint="run the network step first, or fix the inventory")
        refuse_lockout(ctx)
        platform = ctx.platform
        services = [platform.firewall_service]
        if facts.ipv6:
            services.append(platform.firewall6_service)
        # Competing managers go first: stopping ufw resets the policies to ACCEPT.
        guarded: list[Change] = competitor_changes(ctx)
        table, _ = table_changes(ctx, "filter", render_filter_table(inventory, node),
                                 keep_foreign=True)
        guarded += table
        snapshot = ['iptables-save -t filter > "$HC_TXN/backup/iptables.rules"']
        restore = ['iptables-restore < "$HC_TXN/backup/iptables.rules"']
        if facts.ipv6:
            # Without this, IPv6 would be a way around every IPv4 rule.
            table6, _ = table_changes(ctx, "filter", render_filter6_table(inventory, node),
                                      ipv6=True, keep_foreign=True)
            guarded += table6
            snapshot.append('ip6tables-save -t filter > "$HC_TXN/backup/ip6tables.rules"')
            restore.append('ip6tables-restore < "$HC_TXN/backup/ip6tables.rules"')
        # The loaders are enabled last, once the files they load say what we want.
        guarded += loader_services(ctx, services)
        if not guarded:
            return StepPlan(self.name, node.name, tuple(loader_packages(ctx)))
        guard = Guard(
            snapshot="\n".join(snapshot),
            restore="\n".join(restore),
            rollback_after=ROLLBACK_AFTER,
            reason="a new filter table may block SSH",
        )
        return StepPlan(self.name, node.name, tuple(loader_packages(ctx)), (), guard,
                        tuple(guarded))

    def posture(self, ctx: PlanContext) -> list[CheckItem]:
        """Independent of drift: is the live policy default-deny, is forwarding one-way?"""
        node, facts, inventory = ctx.node, ctx.facts, ctx.inventory
        live = facts.iptables.get("filter")
        items = []
        fix = f"homeclust up --only firewall --host {node.name}"
        for chain in ("INPUT", "FORWARD"):
            policy = chain_policy(live, chain)
            items.append(CheckItem(
                node.name, f"{chain} policy", "pass" if policy == "DROP" else "fail",
                f"{chain} {policy or 'no filter table'}", fix))
        if facts.ipv6:
            live6 = facts.ip6tables.get("filter")
            for chain in ("INPUT", "FORWARD"):
                policy6 = chain_policy(live6, chain)
                items.append(CheckItem(
                    node.name, f"IPv6 {chain} policy", "pass" if policy6 == "DROP" else "fail",
                    f"{chain} {policy6 or 'no filter table'}", fix))
        if node.is_master:
            m = inventory.master
            wrong = forward_accepts_beyond_one_way(live, m.private_interface, m.public_interface)
            if facts.ipv6:
                # Nothing is forwarded over IPv6 at all.
                wrong += [f"(IPv6) {rule}" for rule in forward_accepts_beyond_one_way(
                    facts.ip6tables.get("filter"), "", "")]
            items.append(CheckItem(
                node.name, "forwarding one-way", "fail" if wrong else "pass",
                "accepts " + "; ".join(wrong) if wrong else
                f"new connections only {m.private_interface} -> {m.public_interface}; "
                "replies via conntrack",
                "remove the extra FORWARD accepts: homeclust up --only firewall"))
        services = dict.fromkeys([ctx.platform.firewall_service] + (
            [ctx.platform.firewall6_service] if facts.ipv6 else []))
        disabled = [unit for unit in services if not facts.service_enabled(unit)]
        items.append(CheckItem(
            node.name, "rules persist at boot", "fail" if disabled else "pass",
            f"{', '.join(disabled)} not enabled" if disabled else f"{', '.join(services)} enabled",
            fix))
        return items
