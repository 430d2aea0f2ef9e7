"""fail2ban's sshd jail on the master (pure renderer, golden-file tested).

Written as ``/etc/fail2ban/jail.d/homeclust.local``: ``.local`` files in
``jail.d`` are read last, so these values win over ``jail.conf``, the
distribution's ``jail.d/*.conf`` (Debian's enables the sshd jail with a log
file that does not exist without rsyslog) and ``jail.local``.
"""

from __future__ import annotations

from homeclust.inventory import Inventory

JAIL_PATH = "/etc/fail2ban/jail.d/homeclust.local"


def render_jail(inventory: Inventory, *, auth_log: str | None) -> str:
    """The sshd jail: the inventory's ``maxretry`` and ``bantime``, the log source the
    host has (``auth_log``, or the journal when there is no such file).

    Bans go into the iptables filter table (``iptables-multiport``: a chain
    ``f2b-sshd`` and a jump from INPUT), which the firewall step carries over
    whenever it reloads its table and does not count as drift.  The nodes of
    the private network and the host itself are never banned: a worker
    misconfigured for SSH must not lose the master.
    """
    f2b = inventory.monitor.fail2ban
    if auth_log is None:
        source = ("# sshd logs only to the journal here (there is no auth log file).\n"
                  "backend = systemd\n")
    else:
        source = (f"# sshd's messages are in {auth_log} (a system logger writes them).\n"
                  f"backend = auto\nlogpath = {auth_log}\n")
    return f"""\
# Managed by homeclust (monitor step): edit [monitor] in the inventory, not this file.
[DEFAULT]
# Bans go into the iptables filter table (chain f2b-sshd), which homeclust's
# firewall step keeps whenever it reloads its rules.
banaction = iptables-multiport
banaction_allports = iptables-allports
# Never ban this host itself or the cluster's private network.
ignoreip = 127.0.0.0/8 ::1 {inventory.cluster.private_network}

[sshd]
enabled = true
port = {inventory.ssh.port}
{source}maxretry = {f2b.maxretry}
findtime = 600
bantime = {f2b.bantime}
"""
