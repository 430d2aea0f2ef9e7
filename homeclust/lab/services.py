"""The lab's background services: institute network services and the admin's way in.

=======================  ==========================  ===================================
service                  runs in                     does
=======================  ==========================  ===================================
apt-cache                machine's own namespace     Unix socket -> Debian's archive,
                                                     caching (aptcache.py)
apt-relay                internet namespace          <internet>:80 -> that socket
dnsmasq                  internet namespace          DHCP + DNS of the institute network
whoami                   internet namespace          answers with the caller's address
admin-ssh-forward        admin namespace             Unix socket -> master's public :22
admin-ssh-listen         machine's own namespace     127.0.0.1:<port> -> that socket
=======================  ==========================  ===================================

The archive relay caches what it fetches in a directory shared by every lab
on the machine (``/var/cache/homeclust-lab/apt-cache``), so a second lab run
downloads nothing it already has.

Unix sockets are files, not network addresses: they connect the namespaces
without giving the machine's own namespace any route into the lab.  So the
admin reaches only the master's SSH port, and the master sees the admin's
connection coming from the admin host's institute address, as on real hardware.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from homeclust.lab.plan import APT_RELAY_PORT, CACHE_ROOT, WHOAMI_PORT, LabPlan
from homeclust.lab.state import LabPaths
from homeclust.lab.system import in_netns

#: The archive relay's cache, shared by every lab on this machine.
APT_CACHE_DIR = CACHE_ROOT / "apt-cache"


@dataclass(frozen=True)
class Service:
    name: str
    where: str  # "host" or the namespace it runs in (for status output)
    argv: tuple[str, ...]


def lab_services(plan: LabPlan, paths: LabPaths, python: str = sys.executable,
                 apt_cache_dir: Path = APT_CACHE_DIR) -> list[Service]:
    """The services in start order (each one's dependencies come before it)."""
    apt_sock = paths.socket("apt-relay")
    ssh_sock = paths.socket("admin-ssh")
    inet, admin = plan.internet_netns, plan.admin_netns
    return [
        Service("apt-cache", "host", (
            python, "-m", "homeclust.lab", "aptcache", "--socket", str(apt_sock),
            "--cache", str(apt_cache_dir), "--stats", str(paths.apt_cache_stats),
            "--uplink", str(paths.uplink),
        )),
        Service("apt-relay", inet, tuple(in_netns(inet, [
            "socat", f"TCP-LISTEN:{APT_RELAY_PORT},bind={plan.internet_address},fork,reuseaddr",
            f"UNIX-CONNECT:{apt_sock}",
        ]))),
        Service("dnsmasq", inet, tuple(in_netns(inet, [
            "dnsmasq", "--keep-in-foreground", f"--conf-file={paths.dnsmasq_conf}",
        ]))),
        Service("whoami", inet, tuple(in_netns(inet, [
            python, "-m", "homeclust.lab", "whoami", str(plan.internet_address), str(WHOAMI_PORT),
        ]))),
        Service("admin-ssh-forward", admin, tuple(in_netns(admin, [
            "socat", f"UNIX-LISTEN:{ssh_sock},fork,unlink-early,mode=600",
            f"TCP:{plan.master_public_address}:22,connect-timeout=10",
        ]))),
        Service("admin-ssh-listen", "host", (
            "socat", f"TCP-LISTEN:{plan.ssh_port},bind=127.0.0.1,reuseaddr,fork",
            f"UNIX-CONNECT:{ssh_sock}",
        )),
    ]
