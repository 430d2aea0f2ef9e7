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
import posixpath
import shlex

from homeclust.changes import Change, CommandChange
from homeclust.errors import StepError
from homeclust.facts import FactQuery, HostFacts
from homeclust.inventory import Inventory
from homeclust.platforms import ALL_NETWORK_FACT_PATHS, SECRET_NETWORK_FACT_PATHS
from homeclust.render.network import (
    InterfaceSpec,
    addresses_command,
    bringup_command,
    interface_files,
    interface_specs,
    render_hostname,
    render_hosts,
    takedown_command,
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
    address = spec.static_address
    if address not in iface.addresses:
        problems.append(f"lacks {address}")
    problems += [f"stray address {a}" for a in iface.addresses if a != address]
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


RESOLV_CONF = "/etc/resolv.conf"

#: Where a resolver daemon keeps the file ``/etc/resolv.conf`` links to, when the platform
#: makes it a link (Ubuntu's systemd-resolved, Debian with resolvconf or systemd-resolved).
_RESOLVERS = (("/run/systemd/resolve/", "systemd-resolved"), ("/run/resolvconf/", "resolvconf"),
              ("/run/NetworkManager/", "NetworkManager"))


def resolver_owning_resolv_conf(facts: HostFacts) -> str | None:
    """The resolver that owns ``/etc/resolv.conf`` when it is a link into its runtime
    directory (``../run/...`` or ``/run/...``); None for a file or any other link, which
    the step replaces with the file it manages."""
    target = facts.links.get(RESOLV_CONF)
    if target is None:
        return None
    resolved = posixpath.normpath(posixpath.join("/etc", target))
    return next((name for prefix, name in _RESOLVERS if resolved.startswith(prefix)), None)


class NetworkStep(Step):
    name = "network"
    summary = "interface configuration, hostnames, /etc/hosts"

    def fact_query(self, inventory: Inventory) -> FactQuery:
        return FactQuery(
            paths=frozenset({"/etc/hosts", "/etc/hostname", *ALL_NETWORK_FACT_PATHS}),
            # NetworkManager keyfiles and netplan YAML can hold Wi-Fi/802.1X secrets.
            secret_paths=frozenset(SECRET_NETWORK_FACT_PATHS),
        )

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
        warnings = list(rendered.warnings)
        wanted = dict(rendered.files)
        resolver = resolver_owning_resolv_conf(facts)
        if RESOLV_CONF in wanted and resolver is not None:
            # The platform means this link: a resolver writes the file it points to.
            del wanted[RESOLV_CONF]
            warnings.append(
                f"{RESOLV_CONF} is {resolver}'s (a link to {facts.links[RESOLV_CONF]}): "
                f"homeclust leaves it alone; give {resolver} the DNS servers "
                f"{', '.join(str(d) for d in inventory.cluster.dns)} yourself")
        config_changes = {
            path: change for path, file_spec in wanted.items()
            if (change := file_change(facts, path, file_spec.content, mode=file_spec.mode))
        }
        changes: list[Change] = []
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
        live_files: set[str] = set()
        for spec in specs:
            deps = set(rendered.depends.get(spec.name, ()))
            live = live_differences(spec, facts, inventory)
            config_changed = bool(deps & set(config_changes))
            if config_changed or live:
                reapply.append(spec.name)
                live_files |= deps
                why = "configuration changed" if config_changed else ", ".join(live)
                reasons.append(f"{spec.name}: {why}")
        # Files that decide how an interface comes up are written under the guard,
        # between taking the interface down (old configuration) and bringing it up.
        changes += [c for path, c in config_changes.items() if path not in live_files]
        if not reapply:
            return StepPlan(self.name, node.name, tuple(changes), tuple(warnings))
        backend = platform.network_backend
        guarded: list[Change] = [
            CommandChange(f"take down {', '.join(reapply)} with the configuration "
                          f"{'it runs' if len(reapply) == 1 else 'they run'} now",
                          takedown_command(backend, reapply)),
            *(c for path, c in config_changes.items() if path in live_files),
            CommandChange(f"bring up {', '.join(reapply)} ({'; '.join(reasons)})",
                          bringup_command(backend, reapply)),
        ]
        guard = Guard(
            pre_restore=takedown_command(backend, reapply),
            restore=bringup_command(backend, reapply),
            trial=addresses_command(reapply),
            rollback_after=ROLLBACK_AFTER,
            settle=3.0,
            reason=f"re-applying {', '.join(reapply)} may cut the SSH session",
        )
        return StepPlan(self.name, node.name, tuple(changes), tuple(warnings), guard,
                        tuple(guarded))

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
