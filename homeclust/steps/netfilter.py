"""Shared planning for the two steps that own iptables tables (nat and firewall).

Both need the same things besides their own table: the platform's package and
service that load the saved rules at boot, no competing firewall manager, and
their table's section of the persistent rules file.
"""

from __future__ import annotations

from homeclust.changes import Change, CommandChange, PackagesChange, ServiceChange, unified_diff
from homeclust.render.iptables import comparable, replace_table, restore_command
from homeclust.steps.base import PlanContext, file_change, missing_packages


def persistence_changes(ctx: PlanContext) -> list[Change]:
    """Install and enable the boot-time rules loader; silence competing managers."""
    facts, platform = ctx.facts, ctx.platform
    changes: list[Change] = []
    missing = missing_packages(facts, platform.firewall_packages)
    if missing:
        changes.append(PackagesChange(missing, platform.install_command(missing),
                                      platform.firewall_preseed))
    for unit in platform.conflicting_firewall_services:
        if facts.service_enabled(unit) or facts.service_active(unit):
            changes.append(ServiceChange(unit, enable=False, action="stop", mask=True))
    if missing or not facts.service_enabled(platform.firewall_service):
        changes.append(ServiceChange(platform.firewall_service, enable=True))
    return changes


def table_changes(ctx: PlanContext, table: str, rendered: str, *, after_restore: str = ""
                  ) -> tuple[list[Change], bool]:
    """Changes loading ``rendered`` live and saving it in the rules file.

    Returns the changes and whether the live table differs (the guard-worthy part).
    """
    facts, platform = ctx.facts, ctx.platform
    changes: list[Change] = []
    live, wanted = comparable(facts.iptables.get(table)), comparable(rendered)
    live_differs = live != wanted
    if live_differs:
        command = restore_command(rendered)
        if after_restore:
            command += f"\n{after_restore}"
        changes.append(CommandChange(
            f"load the {table} table (iptables-restore)", command,
            diff=unified_diff(live, wanted, f"iptables -t {table} (live)",
                              f"iptables -t {table} (wanted)")))
    path = platform.firewall_rules_path
    saved = replace_table(facts.file_text(path), table, rendered)
    change = file_change(facts, path, saved, mode=0o600)
    if change is not None:
        changes.append(change)
    return changes, live_differs
