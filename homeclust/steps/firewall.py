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

from ipaddress import IPv4Address, IPv6Address

from homeclust.changes import Change
from homeclust.errors import StepError
from homeclust.facts import FactQuery
from homeclust.inventory import Inventory, Node
from homeclust.render.iptables import (
    chain_policy,
    chain_rules,
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
    if arrived_on == node.private_interface and (client.version == 6 or client in private):
        return None  # IPv6 on the private interface is accepted as a whole
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
        peer = facts.ssh_peer
        if peer is not None:
            arrived_on = facts.interface_with_address(peer.server_address)
            problem = admin_path_allowed(inventory, node, peer.client_address, arrived_on,
                                         peer.server_port)
            if problem:
                raise StepError(
                    f"{node.name}: refusing to apply a firewall that would lock you out: {problem}",
                    hint="fix [firewall] in the inventory; nothing was changed",
                )
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
            policy6 = chain_policy(facts.ip6tables.get("filter"), "INPUT")
            items.append(CheckItem(
                node.name, "IPv6 INPUT policy", "pass" if policy6 == "DROP" else "fail",
                f"INPUT {policy6 or 'no filter table'}", fix))
        if node.is_master:
            m = inventory.master
            wrong = []
            for rule in chain_rules(live, "FORWARD"):
                if "-j ACCEPT" not in rule or "RELATED,ESTABLISHED" in rule:
                    continue
                if f"-i {m.private_interface}" in rule and f"-o {m.public_interface}" in rule:
                    continue
                wrong.append(rule)
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
