"""monitor step: network tools everywhere, fail2ban guarding the master's SSH.

* ``[monitor] tools`` (tcpdump, nmap, iftop) on every node: the guide installs
  them on the master; on the workers they are what one needs to look at the
  private network (MPI, the scheduler).  Workers install them from the
  master's repository (they are this step's worker packages).
* fail2ban on the master only -- the door to the institute network; the
  workers are reachable only through it.  An sshd jail with the inventory's
  ``maxretry`` and ``bantime``, reading sshd's messages where the platform
  has them: the auth log file if a system logger writes one, else the journal
  (Debian 12 without rsyslog), which needs fail2ban's journal reader.
* Bans are iptables rules in the filter table (chain ``f2b-sshd``): the
  firewall step carries them over when it reloads the table, and ``check``
  does not count them as drift.  Dropped packets are logged by the firewall's
  rate-limited LOG rules (see the README for where to read them).
"""

from __future__ import annotations

import re

from homeclust.changes import Change, PackagesChange, ServiceChange
from homeclust.facts import Fact, FactQuery
from homeclust.inventory import Inventory
from homeclust.platforms import Platform
from homeclust.render.fail2ban import JAIL_PATH, render_jail
from homeclust.steps.base import (
    CheckItem,
    PlanContext,
    Probe,
    Step,
    StepPlan,
    file_change,
    missing_packages,
)

#: Where system loggers write authentication messages, on either family.
AUTH_LOGS = ("/var/log/auth.log", "/var/log/secure")
#: Every package name the step may install on either family (for the fact query).
_FAIL2BAN_PACKAGES = frozenset({"fail2ban", "python3-systemd", "fail2ban-server",
                                "fail2ban-systemd", "epel-release"})


def parse_auth_logs(text: str) -> frozenset[str]:
    return frozenset(line.strip() for line in text.splitlines() if line.strip() in AUTH_LOGS)


AUTH_LOG_FILES = Fact(
    "auth-logs", "for f in " + " ".join(AUTH_LOGS) + "; do [ -f \"$f\" ] && echo \"$f\"; done; true",
    parse_auth_logs)


def auth_log(ctx: PlanContext) -> str | None:
    """The auth log file fail2ban reads on this host, or None: the journal."""
    path = ctx.platform.auth_log_path
    return path if path in ctx.facts.get(AUTH_LOG_FILES) else None


class MonitorStep(Step):
    name = "monitor"
    summary = "tcpdump/nmap/iftop on every node; fail2ban sshd jail on the master"
    depends_on = ("network", "firewall", "repo")

    def fact_query(self, inventory: Inventory) -> FactQuery:
        return FactQuery(
            paths=frozenset({JAIL_PATH}),
            units=frozenset({"fail2ban.service"}),
            packages=frozenset(inventory.monitor.tools) | _FAIL2BAN_PACKAGES,
            extra=(AUTH_LOG_FILES,),
        )

    def worker_packages(self, inventory: Inventory, platform: Platform) -> tuple[str, ...]:
        return inventory.monitor.tools

    def plan(self, ctx: PlanContext) -> StepPlan:
        facts, platform = ctx.facts, ctx.platform
        changes: list[Change] = []
        if ctx.node.is_master:
            log = auth_log(ctx)
            # The jail first: installing fail2ban starts it, and on Debian 12 its
            # packaged sshd jail fails without the journal backend.
            jail = file_change(facts, JAIL_PATH, render_jail(ctx.inventory, auth_log=log))
            if jail is not None:
                changes.append(jail)
            for group in (platform.fail2ban_prerequisites,
                          ctx.inventory.monitor.tools
                          + platform.fail2ban_packages(journal=log is None)):
                missing = missing_packages(facts, group)
                if missing:
                    changes.append(PackagesChange(missing, platform.install_command(missing)))
            unit = "fail2ban.service"
            if not facts.service_enabled(unit) or not facts.service_active(unit):
                changes.append(ServiceChange(unit, enable=True, action="start"))
            if jail is not None:
                changes.append(ServiceChange(unit, action="restart", when_changed=(JAIL_PATH,)))
        else:
            missing = missing_packages(facts, ctx.inventory.monitor.tools)
            if missing:
                changes.append(PackagesChange(missing, platform.install_command(missing)))
        return StepPlan(self.name, ctx.node.name, tuple(changes))

    def probes(self, ctx: PlanContext) -> list[Probe]:
        """fail2ban's sshd jail answers on the master (and how many addresses it bans)."""
        if not ctx.node.is_master:
            return []
        node = ctx.node

        def evaluate(code: int, output: str) -> CheckItem:
            if code != 0 or "Status for the jail: sshd" not in output:
                return CheckItem(node.name, "fail2ban sshd jail", "fail",
                                 output.strip().splitlines()[-1] if output.strip()
                                 else f"fail2ban-client exit {code}",
                                 f"homeclust up --only monitor --host {node.name}; "
                                 "journalctl -u fail2ban")
            banned = re.search(r"Currently banned:\s*(\d+)", output)
            source = ("journal" if "Journal matches" in output
                      else "log file" if "File list" in output else "?")
            return CheckItem(node.name, "fail2ban sshd jail", "pass",
                             f"active, reading the {source}; "
                             f"{banned.group(1) if banned else '?'} address(es) banned now")

        return [Probe("fail2ban", "fail2ban-client status sshd 2>&1", evaluate)]
