"""Shared planning for the two steps that own iptables tables (nat and firewall).

Both need the same things besides their own table: the platform's package and
service(s) that load the saved rules at boot, no competing firewall manager,
and their table's section of the persistent rules file.
"""

from __future__ import annotations

from collections.abc import Sequence

from homeclust.changes import Change, CommandChange, PackagesChange, ServiceChange, unified_diff
from homeclust.render.iptables import comparable, replace_table, restore_command
from homeclust.steps.base import PlanContext, file_change, missing_packages


def persistence_changes(ctx: PlanContext, services: Sequence[str]) -> list[Change]:
    """Install and enable the boot-time rules loader(s); silence competing managers."""
    facts, platform = ctx.facts, ctx.platform
    changes: list[Change] = []
    missing = missing_packages(facts, platform.firewall_packages)
    if missing:
        changes.append(PackagesChange(missing, platform.install_command(missing),
                                      platform.firewall_preseed))
    for unit in platform.conflicting_firewall_services:
        if facts.service_enabled(unit) or facts.service_active(unit):
            changes.append(ServiceChange(unit, enable=False, action="stop", mask=True))
    for unit in dict.fromkeys(services):
        if missing or not facts.service_enabled(unit):
            changes.append(ServiceChange(unit, enable=True))
    return changes


def table_changes(ctx: PlanContext, table: str, rendered: str, *, ipv6: bool = False,
                  after_restore: str = "") -> tuple[list[Change], bool]:
    """Changes loading ``rendered`` live and saving it in the (IPv4 or IPv6) rules file.

    Returns the changes and whether the live table differs (the guard-worthy part).
    """
    facts, platform = ctx.facts, ctx.platform
    tool = "ip6tables" if ipv6 else "iptables"
    changes: list[Change] = []
    live_tables = facts.ip6tables if ipv6 else facts.iptables
    live, wanted = comparable(live_tables.get(table)), comparable(rendered)
    live_differs = live != wanted
    if live_differs:
        command = restore_command(rendered, ipv6=ipv6)
        if after_restore:
            command += f"\n{after_restore}"
        changes.append(CommandChange(
            f"load the {tool} {table} table ({tool}-restore)", command,
            diff=unified_diff(live, wanted, f"{tool} -t {table} (live)",
                              f"{tool} -t {table} (wanted)")))
    path = platform.firewall_rules6_path if ipv6 else platform.firewall_rules_path
    saved = replace_table(facts.file_text(path), table, rendered)
    change = file_change(facts, path, saved, mode=0o600)
    if change is not None:
        changes.append(change)
    return changes, live_differs
