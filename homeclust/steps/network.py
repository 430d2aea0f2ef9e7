"""network step: persistent interface configuration, hostname and /etc/hosts.

Master: public interface by DHCP with the inventory's client id (or static),
private interface static.  Workers: static private address with the master as
gateway and the inventory's DNS servers.  Every node: its hostname and an
``/etc/hosts`` block naming every node.

Files come from :mod:`homeclust.render.network`; existing files configuring the
same interfaces are taken over (removed) so configurations never fight.  When an
interface's configuration changed, or its live state differs (address missing,
a stray default route), the interface is re-applied *detached* from the SSH
session under a guard: if homeclust cannot reconnect (through the master for
workers) and see the right addresses and routes within the rollback time, the
host restores its previous files and re-applies them by itself.
"""

from __future__ import annotations

import fnmatch
import shlex

from homeclust.changes import Change, CommandChange, FileChange
from homeclust.errors import StepError
from homeclust.facts import HostFacts
from homeclust.inventory import Inventory
from homeclust.render.network import (
    InterfaceSpec,
    interface_files,
    interface_specs,
    reapply_command,
    render_hostname,
    render_hosts,
    restore_command,
)
from homeclust.steps.base import CheckItem, Guard, PlanContext, Step, StepPlan, file_change

#: Seconds a host waits for homeclust to confirm a network change before undoing it.
ROLLBACK_AFTER = 90


def live_differences(spec: InterfaceSpec, facts: HostFacts, inventory: Inventory) -> list[str]:
    """How the running interface differs from ``spec`` (empty: as configured)."""
    iface = facts.interfaces.get(spec.name)
    if iface is None:
        return ["missing"]
    problems = []
    if not iface.up:
        problems.append("down")
    if spec.method == "dhcp":
        if not iface.addresses:
            problems.append("no DHCP address")
        return problems
    assert spec.address is not None
    if spec.address not in iface.addresses:
        problems.append(f"lacks {spec.address}")
    problems += [f"stray address {a}" for a in iface.addresses if a != spec.address]
    defaults = facts.default_routes()
    if spec.gateway is not None:
        if not any(r.gateway == spec.gateway and r.device == spec.name for r in defaults):
            problems.append(f"no default route via {spec.gateway}")
        problems += [
            f"stray default route via {r.gateway} dev {r.device}"
            for r in defaults if not (r.gateway == spec.gateway and r.device == spec.name)
        ]
    elif spec.role == "private":
        problems += [
            f"default route via the private side ({r.gateway})"
            for r in defaults if r.device == spec.name
        ]
    return problems


class NetworkStep(Step):
    name = "network"
    summary = "interface configuration, hostnames, /etc/hosts"
    fact_paths = ("/etc/hosts", "/etc/hostname")

    def plan(self, ctx: PlanContext) -> StepPlan:
        inventory, node, facts, platform = ctx.inventory, ctx.node, ctx.facts, ctx.platform
        specs = interface_specs(inventory, node)
        for spec in specs:
            if spec.name not in facts.interfaces:
                present = ", ".join(sorted(n for n in facts.interfaces if n != "lo")) or "none"
                raise StepError(
                    f"{node.name}: interface {spec.name} ({spec.role} side) does not exist; "
                    f"present: {present}",
                    hint="after a NIC change, set the interface name in the inventory "
                    f"({'[master] ' + spec.role + '_interface' if node.is_master else 'interface'})",
                )
        existing = {
            path: fact.text or ""
            for path, fact in facts.files.items()
            if any(fnmatch.fnmatch(path, pattern) for pattern in platform.network_fact_paths)
        }
        rendered = interface_files(platform.network_backend, specs, existing,
                                   has_resolvconf=facts.has_command("resolvconf"))
        changes: list[Change] = []
        for path, file_spec in rendered.files.items():
            change = file_change(facts, path, file_spec.content, mode=file_spec.mode)
            if change is not None:
                changes.append(change)
        changed = {c.path for c in changes if isinstance(c, FileChange)}

        for path, content in (("/etc/hostname", render_hostname(node)),
                              ("/etc/hosts", render_hosts(inventory, facts.file_text("/etc/hosts")))):
            change = file_change(facts, path, content)
            if change is not None:
                changes.append(change)
        if facts.hostname.split(".")[0] != node.name:
            name = shlex.quote(node.name)
            changes.append(CommandChange(
                f"set the hostname to {node.name} (now {facts.hostname or 'unset'})",
                f"hostnamectl set-hostname {name} 2>/dev/null || hostname {name}",
            ))

        reapply: list[str] = []
        reasons: list[str] = []
        for spec in specs:
            live = live_differences(spec, facts, inventory)
            config_changed = bool(changed & set(rendered.depends.get(spec.name, ())))
            if config_changed or live:
                reapply.append(spec.name)
                why = "configuration changed" if config_changed else ", ".join(live)
                reasons.append(f"{spec.name}: {why}")
        guard = None
        if reapply:
            backend = platform.network_backend
            changes.append(CommandChange(
                f"re-apply {', '.join(reapply)} ({'; '.join(reasons)})",
                reapply_command(backend, reapply),
                detached=True,
            ))
            guard = Guard(
                restore=restore_command(backend, reapply),
                rollback_after=ROLLBACK_AFTER,
                settle=3.0,
                reason=f"re-applying {', '.join(reapply)} may cut the SSH session",
            )
        return StepPlan(self.name, node.name, tuple(changes), rendered.warnings, guard)

    def posture(self, ctx: PlanContext) -> list[CheckItem]:
        items = []
        for spec in interface_specs(ctx.inventory, ctx.node):
            live = live_differences(spec, ctx.facts, ctx.inventory)
            addresses = ", ".join(str(a) for a in ctx.facts.addresses_of(spec.name)) or "none"
            items.append(CheckItem(
                ctx.node.name, f"{spec.name} ({spec.role})", "fail" if live else "pass",
                "; ".join(live) if live else addresses,
                f"homeclust up --only network --host {ctx.node.name}" if live else "",
            ))
        return items
