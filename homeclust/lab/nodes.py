"""Lab nodes: a disk (overlay over the cached rootfs), first-boot files, power on/off.

A node's disk is an overlay: the cached rootfs below, the node's own upper
directory on top.  Whatever the node writes lands in its upper directory, so a
stop/start (a reboot) keeps it, and wiping the upper directory gives a
pristine node in seconds.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from pathlib import Path

from homeclust.errors import LabError
from homeclust.lab import render
from homeclust.lab.cgroups import remove_node_cgroups
from homeclust.lab.plan import LabNode, LabPlan
from homeclust.lab.state import LabPaths, NodePaths
from homeclust.lab.supervisor import SupervisorSpec, wait_propagate_gone
from homeclust.lab.system import (
    is_mounted,
    is_running,
    kill,
    mount_overlay,
    read_pidfile,
    remove_tree,
    spawn,
    unmount,
    wait_gone,
)

STOP_TIMEOUT = 30.0


def nspawn_argv(node: LabNode, root: Path) -> list[str]:
    argv = [
        "systemd-nspawn", "--directory", str(root), "--boot",
        f"--machine={node.machine}", f"--hostname={node.name}",
        "--register=no", "--keep-unit",
        # Boot messages go to the node's log; the node has no interactive console.
        "--console=read-only",
        # The node's own /etc decides these, as on a real machine.
        "--resolv-conf=off", "--timezone=off", "--link-journal=no",
        "--capability=CAP_NET_ADMIN,CAP_NET_RAW",
    ]
    argv += [f"--network-veth-extra={link.host_name}:{link.node_interface}" for link in node.links]
    return argv


def mount_disk(node_paths: NodePaths, rootfs: Path) -> None:
    for directory in (node_paths.upper, node_paths.work, node_paths.merged, node_paths.run):
        directory.mkdir(parents=True, exist_ok=True)
    if not is_mounted(node_paths.merged):
        mount_overlay(rootfs, node_paths.upper, node_paths.work, node_paths.merged)


def wipe_disk(node_paths: NodePaths) -> None:
    unmount(node_paths.merged)
    for directory in (node_paths.upper, node_paths.work):
        remove_tree(directory)


def write_first_boot_files(
    plan: LabPlan, node: LabNode, root: Path, admin_public_key: str
) -> None:
    """What the installer and the admin left on a freshly installed machine."""
    def write(relative: str, content: str, mode: int = 0o644) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        os.chmod(path, mode)

    write("etc/hostname", f"{node.name}\n")
    write("etc/hosts", render.render_hosts(node.name))
    write("etc/machine-id", f"{uuid.uuid4().hex}\n", 0o444)
    write("etc/network/interfaces", render.render_interfaces(plan, node))
    write("etc/resolv.conf", render.render_resolv_conf(plan.internet_address))
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(ssh_dir, 0o700)
    write("root/.ssh/authorized_keys", admin_public_key.strip() + "\n", 0o600)
    # The institute reserves the master's public address for its client id: the
    # node's own DHCP client (the one ifupdown runs) is told to send it.  On a
    # home router (dhcp_mode "router") the master keeps its client's packaged
    # configuration: no client id there (dhclient -i and dhcpcd's `duid` still
    # send a DUID-based one, as on any Debian install).
    if node.role == "master" and not plan.master_public_static and plan.dhcp_mode == "reserved":
        client = render.ifupdown_dhcp_client(
            name for name in render.IFUPDOWN_DHCP_CLIENTS if _installed(root, name))
        interface, client_id = plan.master_public_interface, plan.master_dhcp_client_id
        if client == "dhclient":
            base = _read(root / "etc/dhcp/dhclient.conf")
            write("etc/dhcp/dhclient.conf", render.render_dhclient_conf(base, interface, client_id))
        elif client == "dhcpcd":
            base = _read(root / "etc/dhcpcd.conf")
            write("etc/dhcpcd.conf", render.render_dhcpcd_conf(base, interface, client_id))
        else:
            raise LabError(
                f"lab node {node.name} has no DHCP client the lab can give a client id "
                f"({client or 'none found'})",
                hint="the node's rootfs needs dhclient (isc-dhcp-client) or dhcpcd (dhcpcd-base)",
            )


def _installed(root: Path, program: str) -> bool:
    """Whether ``program`` is in the node's /usr/sbin or /sbin (never looking outside ``root``)."""
    candidates = [root / "usr/sbin" / program]
    if not (root / "sbin").is_symlink():  # merged /usr: /sbin is a link to usr/sbin
        candidates.append(root / "sbin" / program)
    # lexists: an absolute link inside the rootfs would point into this machine.
    return any(os.path.lexists(path) for path in candidates)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def is_node_running(node_paths: NodePaths) -> bool:
    return is_running(read_pidfile(node_paths.supervisor_pid))


def power_on(plan: LabPlan, node: LabNode, paths: LabPaths) -> None:
    """Start the node's supervisor, which boots the container and keeps it booted."""
    node_paths = paths.node(node.name)
    if is_node_running(node_paths):
        return
    spec = SupervisorSpec(
        machine=node.machine,
        switch_netns=plan.switch_netns,
        nspawn_argv=tuple(nspawn_argv(node, node_paths.merged)),
        links=tuple((link.host_name, link.bridge) for link in node.links),
        nspawn_pidfile=str(node_paths.nspawn_pid),
        leader_pidfile=str(node_paths.leader_pid),
    )
    node_paths.run.mkdir(parents=True, exist_ok=True)
    for stale in (node_paths.nspawn_pid, node_paths.leader_pid):
        stale.unlink(missing_ok=True)
    node_paths.supervisor_spec.write_text(spec.to_json())
    spawn(
        [sys.executable, "-m", "homeclust.lab", "supervise", str(node_paths.supervisor_spec)],
        paths.log(node.name),
        node_paths.supervisor_pid,
        cwd=Path("/"),
    )


def power_off(nodes: list[tuple[str, NodePaths]], timeout: float = STOP_TIMEOUT) -> list[str]:
    """Shut nodes down cleanly (all at once), force what does not stop; unmount their disks.

    Returns the names of the nodes that were running.
    """
    running: list[str] = []
    supervisors = []
    for name, node_paths in nodes:
        supervisor = read_pidfile(node_paths.supervisor_pid)
        if is_running(supervisor):
            running.append(name)
            os.kill(supervisor.pid, signal.SIGTERM)
            supervisors.append(supervisor)
    wait_gone(supervisors, timeout)
    for _name, node_paths in nodes:
        # Whatever is still alive now gets killed: the container's init first
        # (that ends every process of the container), then nspawn, then us.
        leftovers = [read_pidfile(p) for p in (
            node_paths.leader_pid, node_paths.nspawn_pid, node_paths.supervisor_pid)]
        if any(is_running(p) for p in leftovers):
            kill(leftovers)
            wait_gone(leftovers, 10.0)
    for _name, node_paths in nodes:
        spec_file = node_paths.supervisor_spec
        if spec_file.exists():
            machine = SupervisorSpec.from_json(spec_file.read_text()).machine
            wait_propagate_gone(machine)
            remove_node_cgroups(machine)  # the supervisor does this, unless it was killed
        unmount(node_paths.merged)
    return running


def leader_pid(node_name: str, node_paths: NodePaths) -> int:
    """PID of the node's init (its namespaces are the node's), or LabError if it is down."""
    if not is_node_running(node_paths):
        raise LabError(f"lab node {node_name} is not running", hint=f"homeclust lab start {node_name}")
    leader = read_pidfile(node_paths.leader_pid)
    if leader is None or not is_running(leader):
        raise LabError(f"lab node {node_name} is still starting (no init process yet)")
    return leader.pid


def stop_one(name: str, node_paths: NodePaths) -> bool:
    return bool(power_off([(name, node_paths)]))

