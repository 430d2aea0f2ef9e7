"""The lab's wiring: namespaces, two bridges, and the infrastructure hosts' cables.

Everything is created inside namespaces the lab owns; the machine's own
network namespace gets no address, route, link or firewall rule.  The nodes'
cables are made by systemd-nspawn itself (``--network-veth-extra``) inside the
switch namespace and plugged in by the node supervisor.
"""

from __future__ import annotations

from homeclust.lab.plan import INSTITUTE_BRIDGE, INTERNET_SWITCH_PORT, PRIVATE_BRIDGE, LabPlan
from homeclust.lab.system import ip_batch, netns_add, netns_delete, netns_exists


def create_network(plan: LabPlan) -> None:
    """Namespaces for the switch, the internet host and the admin host, wired up."""
    for name in plan.namespaces:
        netns_add(name)
    prefix = plan.institute_network.prefixlen
    sw = plan.switch_netns
    ip_batch(sw, [
        "link set lo up",
        # Plain learning switches: no STP (ports forward at once), no addresses.
        f"link add {INSTITUTE_BRIDGE} type bridge stp_state 0",
        f"link add {PRIVATE_BRIDGE} type bridge stp_state 0",
        f"link set {INSTITUTE_BRIDGE} up",
        f"link set {PRIVATE_BRIDGE} up",
        f"link add {INTERNET_SWITCH_PORT} type veth peer name eth0 netns {plan.internet_netns}",
        f"link add admin0 type veth peer name eth0 netns {plan.admin_netns}",
        f"link set {INTERNET_SWITCH_PORT} master {INSTITUTE_BRIDGE} up",
        f"link set admin0 master {INSTITUTE_BRIDGE} up",
    ])
    # The internet host: no default route and no route to the private network,
    # so replies to a worker can only travel back through the master's NAT.
    ip_batch(plan.internet_netns, [
        "link set lo up",
        f"addr add {plan.internet_address}/{prefix} dev eth0",
        "link set eth0 up",
    ])
    ip_batch(plan.admin_netns, [
        "link set lo up",
        f"addr add {plan.admin_address}/{prefix} dev eth0",
        "link set eth0 up",
    ])


def delete_network(namespaces: tuple[str, ...]) -> None:
    """Remove the namespaces; their links (bridges, veths) go with them."""
    for name in namespaces:
        if netns_exists(name):
            netns_delete(name)
