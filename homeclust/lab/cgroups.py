"""A control group of its own for every lab node.

With ``--keep-unit`` (there may be no systemd on this machine to ask for a
scope), systemd-nspawn makes the container's cgroup tree below the cgroup it
was started in.  Two nodes started from the same cgroup would share one tree,
and each node's systemd would create and delete the other's unit cgroups
("Failed at step CGROUP spawning ...: No such file or directory").  So each
node's nspawn starts in ``<hierarchy>/homeclust-lab/<machine>``, removed again
when the node stops.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
LAB_GROUP = "homeclust-lab"


def hierarchies(root: Path = CGROUP_ROOT) -> list[Path]:
    """The hierarchies systemd uses: the unified one, and ``name=systemd`` on v1/hybrid hosts."""
    if (root / "cgroup.procs").exists():  # pure cgroup v2
        return [root]
    return [path for path in (root / "systemd", root / "unified") if (path / "cgroup.procs").exists()]


def node_cgroups(machine: str, root: Path = CGROUP_ROOT) -> list[Path]:
    return [hierarchy / LAB_GROUP / machine for hierarchy in hierarchies(root)]


def join_node_cgroups(machine: str) -> None:
    """Move the calling process into the node's own cgroups (created if needed).

    Called in the child between fork and exec of systemd-nspawn.
    """
    for group in node_cgroups(machine):
        group.mkdir(parents=True, exist_ok=True)
        (group / "cgroup.procs").write_text(f"{os.getpid()}\n")


def remove_node_cgroups(machine: str) -> None:
    """Remove the node's cgroup trees (deepest first); busy ones stay, silently."""
    for group in node_cgroups(machine):
        if not group.exists():
            continue
        for directory, _subdirs, _files in sorted(os.walk(group), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        with contextlib.suppress(OSError):
            os.rmdir(group.parent)  # homeclust-lab itself, once no lab uses it
