"""slurm step: Slurm as the cluster's batch scheduler (``[scheduler] kind = "slurm"``).

The scheduler the guide's cluster can run on Debian-family nodes, where Torque
is not packaged (on the RHEL family it comes from EPEL).  On every node: munge
with the cluster's one key (see :mod:`homeclust.steps.batch`), the Slurm
client commands and the same ``slurm.conf`` (see :mod:`homeclust.render.slurm`);
slurmctld on the master, slurmd on every compute node, all enabled.

* A changed ``slurm.conf`` is picked up by restarting slurmctld and slurmd
  where it changed (Slurm reads its node list only at start; ``scontrol
  reconfigure`` does not add nodes).
* Nodes come back by themselves after a reboot (``ReturnToService=2``).  What
  Slurm drains or downs on its own -- "Not responding", "Low RealMemory" after
  a wrong configuration, ... -- is resumed by the node's own run once its
  slurmd runs with the current file: each node reads its state with ``sinfo``
  in its facts.  A node an administrator drained (the reason is signed by
  another user than ``slurm``) is left alone and shows in ``check``.
* ``check``: every compute node idle (or busy), not drained, responding; a
  one-line job as the first cluster user (``[[users]]``) on every compute node.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from homeclust.changes import Change, CommandChange
from homeclust.errors import StepError
from homeclust.facts import Fact, FactQuery
from homeclust.inventory import Inventory, Node
from homeclust.platforms import SLURM_LAYOUTS, Platform, platform_of
from homeclust.render.slurm import (
    Proctrack,
    SlurmConfig,
    SlurmNode,
    cluster_name,
    parse_slurm_conf,
    real_memory,
    render_slurm_conf,
)
from homeclust.steps.base import CheckItem, PlanContext, Probe, Step, StepPlan, file_change
from homeclust.steps.batch import (
    MUNGE_KEY_FACT,
    MUNGE_UNIT,
    NODE_SIZE,
    SCHEDULER_PACKAGE_NAMES,
    cluster_user,
    compute_nodes,
    facts_of,
    is_container,
    job_readiness,
    keep_running,
    munge_changes,
    package_changes,
    size_of,
    slots_on,
    worker_packages,
)

SLURM_CONF = "/etc/slurm/slurm.conf"
SLURMCTLD = "slurmctld.service"
SLURMD = "slurmd.service"
#: Who signs the reasons Slurm gives when it drains or downs a node by itself.
SLURM_USER = "slurm"

#: States a node is resumed from when Slurm itself put it there.
RESUMABLE = frozenset({"down", "drained", "draining", "fail", "failing"})
#: States of a healthy node (free or running jobs).
HEALTHY = frozenset({"idle", "mixed", "allocated", "completing"})


@dataclass(frozen=True)
class NodeState:
    """A node as ``sinfo -N -o '%N|%T|%u|%E'`` shows it."""

    state: str  # as printed, e.g. "idle", "down*", "drained"
    user: str  # who set the reason ("Unknown" when there is none)
    reason: str  # "none" when there is none

    @property
    def flags(self) -> frozenset[str]:
        """The state's words without Slurm's suffix marks (``*`` not responding, ...)."""
        return frozenset(part.rstrip("*~#!%$@^-") for part in self.state.split("+"))

    @property
    def responding(self) -> bool:
        return "*" not in self.state

    @property
    def healthy(self) -> bool:
        return self.responding and self.flags <= HEALTHY

    @property
    def resumable(self) -> bool:
        """Down or drained by Slurm itself (not by an administrator)."""
        return bool(self.flags & RESUMABLE) and self.user == SLURM_USER

    def describe(self) -> str:
        why = f" ({self.reason}, set by {self.user})" if self.reason not in ("", "none") else ""
        return f"{self.state}{why}"


def parse_sinfo(text: str) -> dict[str, NodeState]:
    states: dict[str, NodeState] = {}
    for line in text.splitlines():
        parts = line.split("|", 3)
        if len(parts) == 4 and parts[0]:
            states.setdefault(parts[0], NodeState(parts[1], parts[2], parts[3]))
    return states


#: The controller's view of every node, asked on each node itself (so a node's own run
#: sees its state fresh after restarting its slurmd).  Nothing when Slurm is not set up.
SLURM_NODES = Fact(
    "slurm-nodes",
    f"[ -r {SLURM_CONF} ] && command -v sinfo >/dev/null 2>&1 && "
    "timeout 10 sinfo --noheader --Node --format='%N|%T|%u|%E'",
    parse_sinfo,
)

_DIRS = sorted({d for layout in SLURM_LAYOUTS.values() for d in (layout.state_dir,
                                                                  layout.spool_dir)})


def parse_owners(text: str) -> dict[str, str]:
    """``owner path`` lines -> {path: owner}."""
    owners: dict[str, str] = {}
    for line in text.splitlines():
        owner, _, path = line.partition(" ")
        if path:
            owners[path] = owner
    return owners


SLURM_DIRS = Fact(
    "slurm-dirs",
    f"for d in {' '.join(_DIRS)}; do [ -d \"$d\" ] && stat -c '%U %n' \"$d\"; done; true",
    parse_owners,
)

SLURM_ACCOUNT = Fact(
    "slurm-account",
    f"getent passwd {SLURM_USER} >/dev/null && echo present; true",
    lambda text: text.strip() == "present",
)


def desired_config(ctx: PlanContext) -> tuple[SlurmConfig, list[str]]:
    """The one slurm.conf of the cluster, and warnings about nodes left out of it."""
    inventory = ctx.inventory
    master = ctx.master_facts
    known = parse_slurm_conf(master.file_text(SLURM_CONF) if master else None)
    nodes: list[SlurmNode] = []
    oversubscribed: list[str] = []
    containers: list[str] = []
    unknown: list[str] = []
    warnings: list[str] = []
    for node in compute_nodes(inventory):
        facts = facts_of(ctx, node)
        size = size_of(ctx, node)
        if facts is None or size is None:
            before = known.nodes.get(node.name)
            if before is None:
                warnings.append(
                    f"{node.name} is left out of slurm.conf: it is not in it yet and this run "
                    "has no facts from it (run `homeclust up` with it reachable)")
                continue
            unknown.append(node.name)
            nodes.append(SlurmNode(node.name, node.private_address, before.cpus,
                                   before.real_memory))
            continue
        cpus = slots_on(node, size)
        if cpus > size.cpus:
            oversubscribed.append(node.name)
        if is_container(facts.virtualization):
            containers.append(node.name)
        before = known.nodes.get(node.name)
        nodes.append(SlurmNode(node.name, node.private_address, cpus, real_memory(
            size.memory_mib, before.real_memory if before is not None else None)))
    # What is not known about the nodes without facts stays as the master's file has it.
    # (The file says why in words that do not depend on which hosts this run reached:
    # a run with --host must write the very same file.)
    proctrack: Proctrack = "proctrack/cgroup"
    if containers or (unknown and known.proctrack == "proctrack/linuxproc"):
        proctrack = "proctrack/linuxproc"
    overrides = bool(oversubscribed) or bool(unknown and known.config_overrides)
    master_node = inventory.master_node
    # Every node has the master's family (preflight): its packages' paths.
    layout = platform_of(master).slurm_layout if master is not None else ctx.platform.slurm_layout
    config = SlurmConfig(
        cluster_name=cluster_name(inventory.cluster.name),
        controller=master_node.name,
        controller_address=master_node.private_address,
        nodes=tuple(nodes),
        proctrack=proctrack,
        config_overrides=overrides,
        state_dir=layout.state_dir,
        spool_dir=layout.spool_dir,
        slurmctld_pid=layout.slurmctld_pid,
        slurmd_pid=layout.slurmd_pid,
    )
    return config, warnings


class SlurmStep(Step):
    name = "slurm"
    summary = "Slurm: munge, slurm.conf, slurmctld on the master, slurmd on compute nodes"
    depends_on = ("network", "nat", "repo", "ssh-keys")

    def enabled(self, inventory: Inventory) -> bool:
        return inventory.scheduler.kind == "slurm"

    def fact_query(self, inventory: Inventory) -> FactQuery:
        return FactQuery(
            paths=frozenset({SLURM_CONF}),
            account_secret_paths=MUNGE_KEY_FACT,
            units=frozenset({MUNGE_UNIT, SLURMCTLD, SLURMD}),
            packages=SCHEDULER_PACKAGE_NAMES,
            virtualization=True,  # proctrack: cgroups on real hardware, not in containers
            extra=(NODE_SIZE, SLURM_NODES, SLURM_DIRS, SLURM_ACCOUNT),
        )

    def worker_packages(self, inventory: Inventory, platform: Platform) -> tuple[str, ...]:
        return worker_packages("slurm", platform)

    def preflight(self, ctx: PlanContext) -> None:
        platform = ctx.platform
        if not platform.slurm_packaged:
            raise StepError(
                f"{ctx.node.name}: homeclust cannot set up Slurm on {ctx.facts.os.pretty_name} "
                f"({platform.name}): its Slurm is older than 20.11",
                hint="use Ubuntu 22.04 or later, Debian 11 or later, or the RHEL family")
        master = ctx.master_facts
        if master is not None and not ctx.node.is_master:
            theirs = platform_of(master)
            if theirs.family != platform.family:
                raise StepError(
                    f"{ctx.node.name}: Slurm needs one platform family on every node "
                    f"(slurm.conf is the same everywhere, and the packages' paths differ): "
                    f"{ctx.inventory.master.name} is {theirs.name}, {ctx.node.name} is "
                    f"{platform.name}",
                    hint="install the same distribution family on every node")

    def plan(self, ctx: PlanContext) -> StepPlan:
        self.preflight(ctx)
        facts, node, platform = ctx.facts, ctx.node, ctx.platform
        layout = platform.slurm_layout
        changes: list[Change] = []
        packages, new = package_changes(ctx, "slurm")
        changes += packages
        prepared_by_packages = new and layout.packages_prepare
        if not facts.get(SLURM_ACCOUNT) and not prepared_by_packages:
            changes.append(CommandChange(
                f"create the system user {SLURM_USER} (slurmctld runs as it)",
                f"getent passwd {SLURM_USER} >/dev/null || useradd --system --user-group "
                f"--home-dir /var/lib/slurm --no-create-home "
                f"--shell \"$(command -v nologin || echo /bin/false)\" {SLURM_USER}"))
        changes += munge_changes(ctx, packages_new=new)
        config, warnings = desired_config(ctx)
        conf = file_change(facts, SLURM_CONF, render_slurm_conf(config))
        if conf is not None:
            changes.append(conf)
        owners = facts.get(SLURM_DIRS)
        if not prepared_by_packages:
            if node.is_master and owners.get(config.state_dir) != SLURM_USER:
                state_dir = shlex.quote(config.state_dir)
                changes.append(CommandChange(
                    f"make {config.state_dir} (slurmctld's state) belong to {SLURM_USER}",
                    f"mkdir -p {state_dir} && chown {SLURM_USER}:{SLURM_USER} {state_dir} && "
                    f"chmod 0755 {state_dir}"))
            if node.compute and config.spool_dir not in owners:
                changes.append(CommandChange(f"create {config.spool_dir} (slurmd's spool)",
                                             f"mkdir -p {shlex.quote(config.spool_dir)}"))
        if node.is_master:
            changes += keep_running(ctx, SLURMCTLD, config=[conf] if conf else [], restart=new)
        if node.compute:
            changes += keep_running(ctx, SLURMD, config=[conf] if conf else [], restart=new)
            changes += self._resume(ctx)
        return StepPlan(self.name, node.name, tuple(changes), tuple(warnings))

    def _resume(self, ctx: PlanContext) -> list[Change]:
        state = ctx.facts.get(SLURM_NODES).get(ctx.node.name)
        if state is None or not state.resumable:
            return []
        return [CommandChange(f"resume {ctx.node.name} in Slurm (now {state.describe()})",
                              resume_script(ctx.node.name))]

    def posture(self, ctx: PlanContext) -> list[CheckItem]:
        node = ctx.node
        items = job_readiness(ctx, "slurm", _unavailable(ctx) if node.is_master else [])
        if not node.compute:
            return items
        fix = f"homeclust up --only slurm --host {node.name}"
        state = ctx.facts.get(SLURM_NODES).get(node.name)
        if state is None:
            items.append(CheckItem(node.name, "slurm node", "fail",
                                   "the controller does not list this node (or did not answer)",
                                   fix))
        elif state.healthy:
            items.append(CheckItem(node.name, "slurm node", "pass", state.state))
        else:
            hint = (f"an administrator set this; when fixed: scontrol update "
                    f"nodename={node.name} state=resume"
                    if state.flags & RESUMABLE and not state.resumable else fix)
            items.append(CheckItem(node.name, "slurm node", "fail", state.describe(), hint))
        return items

    def probes(self, ctx: PlanContext) -> list[Probe]:
        user = cluster_user(ctx.inventory)
        if not ctx.node.is_master or user is None or _unavailable(ctx):
            return []
        nodes = [n.name for n in compute_nodes(ctx.inventory)]
        if not nodes:
            return []
        return [job_probe(ctx.node, user.name, nodes)]


def resume_script(node: str) -> str:
    """Resume ``node`` once its slurmd runs with the current slurm.conf, and restart that
    slurmd so it registers at once: a resumed node stays "not responding" (``idle*``)
    until the controller's next ping otherwise, up to minutes.  (slurmd's unit kills only
    the daemon: running job steps go on.)  Succeeds when the node is in service within
    15 s."""
    name = shlex.quote(node)
    return (
        f"scontrol update nodename={name} state=resume >/dev/null 2>&1; "
        "systemctl restart slurmd.service && ok=no && i=0 && "
        "while [ $i -lt 15 ]; do "
        f"s=$(sinfo --noheader --Node --nodes={name} --format=%T | head -n 1); "
        "case \"$s\" in ''|*'*'*|down*|drain*|fail*) ;; *) ok=yes; break;; esac; "
        "i=$((i+1)); sleep 1; done && "
        f"{{ [ $ok = yes ] || {{ echo \"{node} is still ${{s:-unknown}}\"; false; }}; }}")


def _unavailable(ctx: PlanContext) -> list[str]:
    """Compute nodes the controller (as the master sees it) does not show ready for a job:
    a test job would only wait for them."""
    states = ctx.facts.get(SLURM_NODES)
    return [node.name for node in compute_nodes(ctx.inventory)
            if node.name not in states or not states[node.name].healthy]


def job_probe(master: Node, user: str, nodes: list[str]) -> Probe:
    """A one-line job as ``user``: one task on every compute node, each prints its name."""
    node_list = ",".join(nodes)
    job = (f"srun --immediate=20 --chdir=/tmp --job-name=homeclust-check --time=2 "
           f"--nodes={len(nodes)} --ntasks-per-node=1 --nodelist={node_list} hostname")
    script = f"cd /tmp && timeout 120 runuser -u {shlex.quote(user)} -- {job} 2>&1"

    def evaluate(code: int, output: str) -> CheckItem:
        ran = sorted({line.strip() for line in output.splitlines() if line.strip() in nodes})
        missing = [n for n in nodes if n not in ran]
        if code != 0 or missing:
            tail = " ".join(output.strip().splitlines()[-3:])
            return CheckItem(master.name, "slurm job", "fail",
                             f"srun as {user} (exit {code}) did not run on "
                             f"{', '.join(missing) or 'every node'}: {tail}",
                             "see `sinfo -N` and `scontrol show node` on the master; the user "
                             "must exist on every node")
        return CheckItem(master.name, "slurm job", "pass",
                         f"ran as {user} on {', '.join(ran)}")

    return Probe("slurm job", script, evaluate, timeout=150.0)
