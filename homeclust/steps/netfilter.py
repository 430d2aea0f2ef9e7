"""Shared planning for the two steps that own iptables tables (firewall and nat).

Both need the same things besides their own table: the platform's packages and
service(s) that load the saved rules at boot, and their table's section of the
persistent rules file.  Only the firewall step silences competing firewall
managers (ufw, firewalld), and only inside its guarded change.
"""

from __future__ import annotations

from collections.abc import Sequence

from homeclust.changes import Change, CommandChange, PackagesChange, ServiceChange, unified_diff
from homeclust.facts import FactQuery
from homeclust.render.iptables import comparable, replace_table, restore_command
from homeclust.steps.base import PlanContext, file_change, missing_packages

#: Everything either family may use to persist and load rules, or to fight us.
NETFILTER_FACTS = FactQuery(
    paths=frozenset({"/etc/iptables/rules.v4", "/etc/iptables/rules.v6",
                     "/etc/sysconfig/iptables", "/etc/sysconfig/ip6tables"}),
    units=frozenset({"netfilter-persistent.service", "iptables.service", "ip6tables.service",
                     "ufw.service", "firewalld.service"}),
    packages=frozenset({"iptables", "iptables-persistent", "netfilter-persistent",
                        "iptables-nft", "iptables-services"}),
    netfilter=True,
)


def loader_packages(ctx: PlanContext) -> list[Change]:
    """Install the boot-time rules loader (nothing live changes: not guarded)."""
    facts, platform = ctx.facts, ctx.platform
    missing = missing_packages(facts, platform.firewall_packages)
    if not missing:
        return []
    return [PackagesChange(missing, platform.install_command(missing), platform.firewall_preseed)]


def loader_services(ctx: PlanContext, services: Sequence[str]) -> list[Change]:
    """Enable the boot-time rules loader(s) (after the rules files are written)."""
    missing = missing_packages(ctx.facts, ctx.platform.firewall_packages)
    return [ServiceChange(unit, enable=True) for unit in dict.fromkeys(services)
            if missing or not ctx.facts.service_enabled(unit)]


def competitor_changes(ctx: PlanContext) -> list[Change]:
    """Stop and mask firewall managers that would replace homeclust's rules."""
    facts = ctx.facts
    return [ServiceChange(unit, enable=False, action="stop", mask=True)
            for unit in ctx.platform.conflicting_firewall_services
            if facts.service_enabled(unit) or facts.service_active(unit)]


def table_changes(ctx: PlanContext, table: str, rendered: str, *, ipv6: bool = False,
                  keep_foreign: bool = False) -> tuple[list[Change], bool]:
    """Changes loading ``rendered`` live and saving it in the (IPv4 or IPv6) rules file.

    Returns the changes and whether the live table differs.  ``keep_foreign``:
    other tools' chains (fail2ban's bans) are carried over into the new table
    as they are on the host at that moment.
    """
    facts, platform = ctx.facts, ctx.platform
    tool = "ip6tables" if ipv6 else "iptables"
    changes: list[Change] = []
    live_tables = facts.ip6tables if ipv6 else facts.iptables
    live, wanted = comparable(live_tables.get(table)), comparable(rendered)
    live_differs = live != wanted
    if live_differs:
        changes.append(CommandChange(
            f"load the {tool} {table} table ({tool}-restore)",
            restore_command(rendered, ipv6=ipv6, keep_foreign=keep_foreign),
            diff=unified_diff(live, wanted, f"{tool} -t {table} (live)",
                              f"{tool} -t {table} (wanted)")))
    path = platform.firewall_rules6_path if ipv6 else platform.firewall_rules_path
    saved = replace_table(facts.file_text(path), table, rendered)
    change = file_change(facts, path, saved, mode=0o600)
    if change is not None:
        changes.append(change)
    return changes, live_differs
