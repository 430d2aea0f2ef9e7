"""``slurm.conf``: one file, the same on every node, rendered from the inventory and facts.

What it decides, and why:

* ``SlurmctldHost`` is the master by name and private address; every compute
  node (the workers, and the master unless ``compute = false``) is a
  ``NodeName`` line with its private address, its job slots as ``CPUs`` and
  ``RealMemory`` a little below its ``MemTotal``; one default partition,
  ``batch`` (Torque's default queue name), holds them all.
* ``RealMemory``: slurmd drains a node that reports less memory than
  configured, and ``MemTotal`` moves by some MiB with kernel and firmware
  updates (crashkernel reservations, for one).  So 97 % of it, rounded down to
  64 MiB -- a few percent the scheduler will not hand out -- and a value
  already in the file is kept while it is between 90 % and 100 % of
  ``MemTotal``: the file does not change after every kernel update, only when
  the node would be drained or got much more memory.
* ``CPUs`` larger than the node has (``slots = 128`` on a 2-core box, as in
  the guide's hostfile) makes slurmd refuse the node ("Low CPUs") unless
  ``SlurmdParameters=config_overrides``, which is set exactly when some node is
  configured with more CPUs than it has: the inventory's word wins, on purpose.
* ``ProctrackType``: ``proctrack/cgroup`` on real hardware and VMs;
  ``proctrack/linuxproc`` when any node runs in a container, where the cgroup
  controllers are the host's and read-only, and slurmd with cgroup tracking
  does not start.
* ``SlurmUser=slurm``: slurmctld does not run as root, and the reasons it
  gives for draining a node are signed ``slurm``, which tells them apart from
  an administrator's (see the slurm step: only the former are resumed).
* ``ReturnToService=2``: a node that was DOWN (rebooted, lost contact) is back
  in service as soon as it registers with a valid configuration.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Literal

from homeclust.quoting import require_hostname

Proctrack = Literal["proctrack/cgroup", "proctrack/linuxproc"]

#: Slurm's partition; jobs go here unless they name another.
PARTITION = "batch"


@dataclass(frozen=True)
class SlurmNode:
    name: str
    address: IPv4Address
    cpus: int
    real_memory: int | None  # MiB; None: unknown (Slurm's default, 1)


@dataclass(frozen=True)
class SlurmConfig:
    cluster_name: str
    controller: str
    controller_address: IPv4Address
    nodes: tuple[SlurmNode, ...]
    proctrack: Proctrack
    #: Some node is configured with more CPUs than it has: SlurmdParameters=config_overrides.
    config_overrides: bool
    state_dir: str
    spool_dir: str
    slurmctld_pid: str
    slurmd_pid: str


_PROCTRACK_WHY: dict[Proctrack, str] = {
    "proctrack/cgroup": "No compute node runs in a container: cgroup process tracking.",
    "proctrack/linuxproc": "Some compute node runs in a container, where cgroups are read-only.",
}


def real_memory(memory_mib: int, current: int | None = None) -> int:
    """``RealMemory`` for a node with ``memory_mib`` MiB of ``MemTotal``, given the value
    ``current`` the file has now (see above)."""
    if current is not None and memory_mib * 90 // 100 <= current <= memory_mib:
        return current
    return max(1, memory_mib * 97 // 100 // 64 * 64)


def cluster_name(name: str) -> str:
    """Slurm's cluster name: lower case (its accounting tables are named after it)."""
    return re.sub(r"[^a-z0-9_-]", "-", name.lower())


def render_slurm_conf(config: SlurmConfig) -> str:
    lines = [
        "# Managed by homeclust (slurm step): the same file on every node; edits are "
        "overwritten.",
        f"ClusterName={config.cluster_name}",
        f"SlurmctldHost={require_hostname(config.controller)}({config.controller_address})",
        "SlurmUser=slurm",
        f"StateSaveLocation={config.state_dir}",
        f"SlurmdSpoolDir={config.spool_dir}",
        f"SlurmctldPidFile={config.slurmctld_pid}",
        f"SlurmdPidFile={config.slurmd_pid}",
        "# No mail server on the cluster.",
        "MailProg=/bin/true",
        "# " + _PROCTRACK_WHY[config.proctrack],
        f"ProctrackType={config.proctrack}",
        "# A node that was DOWN (reboot, lost contact) is back when it registers.",
        "ReturnToService=2",
        "SchedulerType=sched/backfill",
        "# Jobs get CPUs, not whole nodes; memory is not a consumable (no --mem needed).",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
    ]
    if config.config_overrides:
        lines += ["# slots exceed the CPUs of some node: the configured CPUs count.",
                  "SlurmdParameters=config_overrides"]
    lines.append("")
    lines.append("# Compute nodes: job slots as CPUs, RealMemory 97 % of MemTotal (MiB).")
    for node in config.nodes:
        memory = f" RealMemory={node.real_memory}" if node.real_memory is not None else ""
        # Names go unquoted into slurm.conf: only the host-name grammar may (defence in depth).
        lines.append(f"NodeName={require_hostname(node.name)} NodeAddr={node.address} "
                     f"CPUs={node.cpus}{memory} State=UNKNOWN")
    if config.nodes:
        # ALL: every NodeName above, i.e. every compute node (a line that does not grow).
        lines.append(f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE "
                     "State=UP")
    return "\n".join(lines) + "\n"


_NODE_RE = re.compile(r"^NodeName=(\S+)\s.*?\bCPUs=(\d+)(?:\s+RealMemory=(\d+))?", re.M)
_PROCTRACK_RE = re.compile(r"^ProctrackType=(proctrack/cgroup|proctrack/linuxproc)\s*$", re.M)
_OVERRIDES_RE = re.compile(r"^SlurmdParameters=.*\bconfig_overrides\b", re.M)


@dataclass(frozen=True)
class KnownNode:
    """A node as an existing slurm.conf describes it."""

    cpus: int
    real_memory: int | None


@dataclass(frozen=True)
class KnownConfig:
    """What an existing slurm.conf says, for the nodes whose facts a run does not have."""

    nodes: dict[str, KnownNode]
    proctrack: Proctrack | None
    config_overrides: bool


def parse_slurm_conf(text: str | None) -> KnownConfig:
    if not text:
        return KnownConfig({}, None, False)
    nodes = {
        m.group(1): KnownNode(int(m.group(2)), int(m.group(3)) if m.group(3) else None)
        for m in _NODE_RE.finditer(text)
    }
    proctrack = _PROCTRACK_RE.search(text)
    return KnownConfig(nodes, proctrack.group(1) if proctrack else None,  # type: ignore[arg-type]
                       bool(_OVERRIDES_RE.search(text)))
