"""nat step: the master forwards and masquerades the private network.

* ``net.ipv4.ip_forward`` and the conntrack tuning of the guide as a sysctl
  drop-in (persistent) and set live.  A key that is read-only where the master
  runs (``nf_conntrack_max`` inside a container's network namespace) is a
  warning, not a failure; conntrack keys carry systemd's ``-`` prefix so boot
  does not fail on them either, and ``nf_conntrack`` is loaded early at boot so
  the keys exist when systemd-sysctl runs.
* The nat table (``MASQUERADE`` of the private network out of the public
  interface) loaded live and saved in the persistent rules file.
* Forwarding is never turned on while the master's filter table -- live or as
  saved for the next boot -- lets the public side forward into the private
  network: the step runs after the firewall step and refuses when the
  FORWARD chain is not default-deny, so ``up --only nat`` on a fresh master
  (or after a firewall that was refused, failed or rolled back) changes
  nothing instead of opening the private network.  It never touches other
  firewall managers either: that is the firewall step's job, under its guard.

Unlike the guide, nothing is appended to ``/etc/sysctl.conf`` (appending is
not idempotent) and no table is flushed that another step owns.
"""

from __future__ import annotations

import shlex

from homeclust.changes import Change, CommandChange
from homeclust.errors import StepError
from homeclust.facts import FactQuery
from homeclust.inventory import Inventory, Node
from homeclust.quoting import http_request_part, shell_word
from homeclust.render.iptables import chain_policy, chain_rules, render_nat_table, split_rules_file
from homeclust.steps.base import CheckItem, PlanContext, Probe, Step, StepPlan, file_change
from homeclust.steps.netfilter import (
    NETFILTER_FACTS,
    loader_packages,
    loader_services,
    table_changes,
)

SYSCTL_PATH = "/etc/sysctl.d/90-homeclust-nat.conf"
MODULES_PATH = "/etc/modules-load.d/homeclust-nat.conf"


def desired_sysctls(inventory: Inventory) -> dict[str, str]:
    return {
        "net.ipv4.ip_forward": "1",
        "net.netfilter.nf_conntrack_max": str(inventory.nat.conntrack_max),
        "net.netfilter.nf_conntrack_tcp_timeout_established":
            str(inventory.nat.tcp_timeout_established),
    }


def render_sysctl_conf(inventory: Inventory, *, dash_prefix: bool) -> str:
    lines = [
        "# Managed by homeclust (nat step): the master forwards the private network.",
        "net.ipv4.ip_forward = 1",
        "# Connection tracking sized for long-lived HPC transfers.",
    ]
    if dash_prefix:
        lines.append("# '-': go on where a key is read-only (containers) or not loaded yet.")
    dash = "-" if dash_prefix else ""
    for key, value in desired_sysctls(inventory).items():
        if key.startswith("net.netfilter."):
            lines.append(f"{dash}{key} = {value}")
    return "\n".join(lines) + "\n"


def render_modules_conf() -> str:
    return (
        "# Managed by homeclust (nat step): load conntrack before systemd-sysctl runs,\n"
        "# so the net.netfilter keys of the nat drop-in exist at boot.\n"
        "nf_conntrack\n"
    )


class NatStep(Step):
    name = "nat"
    summary = "IP forwarding, conntrack tuning, MASQUERADE on the master"
    depends_on = ("network", "firewall")

    def fact_query(self, inventory: Inventory) -> FactQuery:
        return NETFILTER_FACTS | FactQuery(paths=frozenset({SYSCTL_PATH, MODULES_PATH}),
                                           sysctls=frozenset(desired_sysctls(inventory)))

    def targets(self, inventory: Inventory, node: Node) -> bool:
        return node.is_master

    def plan(self, ctx: PlanContext) -> StepPlan:
        inventory, facts, platform = ctx.inventory, ctx.facts, ctx.platform
        if ctx.inventory.master.public_interface not in facts.interfaces:
            raise StepError(
                f"{ctx.node.name}: public interface {inventory.master.public_interface} "
                "does not exist", hint="run the network step first, or fix [master] public_interface")
        changes: list[Change] = []
        warnings: list[str] = []
        open_forward = forward_not_default_deny(ctx)
        if open_forward and "firewall" not in ctx.pending_steps:
            raise StepError(
                f"{ctx.node.name}: refusing to turn on forwarding: {open_forward}, so the "
                "master would route the public side into the private network",
                hint="run the firewall step first: homeclust up --only firewall,nat; "
                "nothing was changed",
            )
        if open_forward:
            # `plan` before the firewall ran; `up` plans nat again after the firewall
            # step and refuses then if FORWARD is still not default-deny.
            warnings.append(f"forwarding waits for the firewall step ({open_forward} now)")
        changes += loader_packages(ctx)
        changes += loader_services(ctx, [platform.firewall_service])
        for path, content in (
            (SYSCTL_PATH, render_sysctl_conf(inventory, dash_prefix=platform.sysctl_dash_prefix)),
            (MODULES_PATH, render_modules_conf()),
        ):
            change = file_change(facts, path, content)
            if change is not None:
                changes.append(change)
        # MASQUERADE first: loading the nat table loads conntrack, whose keys follow.
        table, _ = table_changes(ctx, "nat", render_nat_table(inventory))
        changes += table
        for key, value in desired_sysctls(inventory).items():
            live = facts.sysctls.get(key)
            if live is not None and live.value == value:
                continue
            if live is not None and live.value is not None and not live.writable:
                if key == "net.ipv4.ip_forward":
                    raise StepError(
                        f"{ctx.node.name}: {key} is read-only here; the master cannot forward")
                warnings.append(
                    f"{key} is read-only on this host (inside a container?): "
                    f"stays {live.value}, inventory wants {value}")
                continue
            now = "absent" if live is None or live.value is None else live.value
            command = f"sysctl -q -w {shlex.quote(f'{key}={value}')}"
            if key.startswith("net.netfilter."):
                command = f"modprobe nf_conntrack >/dev/null 2>&1; {command}"
            changes.append(CommandChange(
                f"set {key} = {value} (now {now})", command,
                warn_on_failure=None if key == "net.ipv4.ip_forward"
                else f"could not set {key} (read-only here?)",
            ))
        return StepPlan(self.name, ctx.node.name, tuple(changes), tuple(warnings))

    def posture(self, ctx: PlanContext) -> list[CheckItem]:
        if not ctx.node.is_master:
            return []
        forward = ctx.facts.sysctls.get("net.ipv4.ip_forward")
        forwarding = forward is not None and forward.value == "1"
        masquerade = [r for r in chain_rules(ctx.facts.iptables.get("nat"), "POSTROUTING")
                      if "MASQUERADE" in r]
        items = [
            CheckItem(ctx.node.name, "ip forwarding", "pass" if forwarding else "fail",
                      f"net.ipv4.ip_forward = {forward.value if forward else '?'}",
                      "homeclust up --only nat"),
            CheckItem(ctx.node.name, "masquerade", "pass" if masquerade else "fail",
                      masquerade[0] if masquerade else "no MASQUERADE rule in nat POSTROUTING",
                      "homeclust up --only nat"),
        ]
        if forwarding:
            open_forward = forward_not_default_deny(ctx)
            items.append(CheckItem(
                ctx.node.name, "forwarding behind default-deny",
                "fail" if open_forward else "pass",
                f"forwarding is on but {open_forward}" if open_forward else
                "forwarding is on and FORWARD is default-deny, live and at boot",
                "homeclust up --only firewall"))
        return items

    def probes(self, ctx: PlanContext) -> list[Probe]:
        return [egress_probe(ctx)]


def forward_not_default_deny(ctx: PlanContext) -> str | None:
    """Why the master's FORWARD chain is not default-deny, live or at the next boot (or None)."""
    facts, platform = ctx.facts, ctx.platform
    live = chain_policy(facts.iptables.get("filter"), "FORWARD")
    if live != "DROP":
        return f"the live FORWARD policy is {live or 'ACCEPT (no filter table)'}"
    saved_file = facts.file_text(platform.firewall_rules_path)
    saved = dict(split_rules_file(saved_file or "")).get("filter")
    if chain_policy(saved, "FORWARD") != "DROP":
        where = platform.firewall_rules_path
        return (f"{where} would load FORWARD policy "
                f"{chain_policy(saved, 'FORWARD') or 'ACCEPT (no filter table)'} at boot")
    return None


#: The egress probe's code: fixed, the URL's parts come in as arguments ($1 host,
#: $2 port, $3 path, $4 Host header), never as code or as a printf format.
_EGRESS_CODE = (
    'exec 3<>"/dev/tcp/$1/$2" && '
    "printf 'GET %s HTTP/1.0\\r\\nHost: %s\\r\\nConnection: close\\r\\n\\r\\n' \"$3\" \"$4\" >&3 && "
    "cat <&3"
)


def egress_probe(ctx: PlanContext) -> Probe:
    """Reach the outside from this node; on the lab, see which address the outside saw.

    Uses bash's /dev/tcp so nothing needs to be installed on the node.  The
    probe runs as root on every node: the URL is handed to a fixed script as
    quoted arguments, so whatever it holds stays data.
    """
    inventory, node = ctx.inventory, ctx.node
    url = inventory.check.egress_url
    master = ctx.master_facts
    expected = None
    if inventory.check.expect_master_address and master is not None:
        addresses = master.addresses_of(inventory.master.public_interface)
        expected = str(addresses[0].ip) if addresses else None
    if url:
        hostport, _, path = url.removeprefix("http://").partition("/")
        host, _, port = hostport.partition(":")
        args = (host, port or "80", "/" + path, hostport)
        script = (f"timeout 10 bash -c {shlex.quote(_EGRESS_CODE)} homeclust-egress "
                  + " ".join(shell_word(http_request_part(arg)) for arg in args))
        target = url
    else:
        dns = inventory.cluster.dns[0]
        script = f"timeout 10 bash -c {shlex.quote(f'exec 3<>/dev/tcp/{dns}/53')} && echo connected"
        target = f"{dns}:53"

    def evaluate(code: int, output: str) -> CheckItem:
        name = "egress (NAT)" if not node.is_master else "egress"
        if code != 0:
            return CheckItem(node.name, name, "fail", f"cannot reach {target}",
                             "check the master's nat and firewall steps, and the worker's route"
                             if not node.is_master else "check the master's public network")
        body = output.replace("\r\n", "\n").split("\n\n", 1)[-1].strip() if url else ""
        if expected is not None:
            if body != expected:
                return CheckItem(node.name, name, "fail",
                                 f"{target} saw {body or 'nothing'}, not the master ({expected})",
                                 "traffic is not masqueraded by the master")
            return CheckItem(node.name, name, "pass", f"{target} sees the master's {expected}")
        return CheckItem(node.name, name, "pass", f"reached {target}" + (f", seen as {body}"
                                                                         if body else ""))

    return Probe("egress", script, evaluate, timeout=20.0)
