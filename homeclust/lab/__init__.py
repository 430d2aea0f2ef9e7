"""``homeclust lab``: a virtual replica of the cluster on one Linux machine.

Real hosts, no VM and no Docker: one ``systemd-nspawn --boot`` container per
node (real systemd, real sshd) over a Debian rootfs built once per release
with debootstrap (trixie or bookworm, per node: ``Lab(..., release="trixie",
node_releases={"worker2": "bookworm"})``), wired by veths into two bridges -- the institute network and the
private network -- in namespaces of the lab's own, with an "internet" host
that serves DHCP, DNS, a what-is-my-address page and the package archive
(a caching relay: aptcache.py).  The world can be made harder: a home
router's DHCP server (``Lab(..., dhcp="router")``) and a slow uplink
(``Lab.set_uplink``, uplink.py).  See :class:`homeclust.lab.lab.Lab`.
"""

from homeclust.lab.aptcache import AptCacheStats
from homeclust.lab.lab import DownReport, Lab, LabInfo, LabStatus, NodeStatus
from homeclust.lab.uplink import Uplink

__all__ = ["AptCacheStats", "DownReport", "Lab", "LabInfo", "LabStatus", "NodeStatus", "Uplink"]
