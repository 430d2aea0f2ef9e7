"""torque step: the guide's Torque/PBS (``[scheduler] kind = "torque"``, the default).

Torque is packaged only for the RHEL family (EPEL; see
:mod:`homeclust.render.torque` for its layout).  Asked for on any other
platform, the step refuses in :meth:`TorqueStep.preflight` -- which ``up``
asks on every host before it changes anything -- naming the platform and
saying to set ``[scheduler] kind = "slurm"``: a clear error, never a half
install.  Like every other refusal the platform is only known from the facts,
so it is exit code 1 (a step failed), not 2 (which promises nothing was
contacted).

On the master: ``torque-server``, ``torque-scheduler``, ``torque-client``
(and ``torque-mom`` when it computes); ``server_name``; the nodes file from
the inventory (``np`` from ``slots``, or the node's CPUs when ``slots`` is not
given); the server database created once, non-interactively (``pbs_server -t
create`` asks before overwriting an existing database, so it runs only where
there is none, with stdin closed, and the server it starts is stopped again so
systemd owns it); then pbs_server and pbs_sched enabled and running, and the
server attributes and the default queue set with ``qmgr``.  On every compute
node: ``torque-mom`` and its ``$pbsserver``.  Everywhere: munge with the
cluster's key and ``trqauthd``.

The firewall needs nothing for Torque (ports 15001-15004 and the moms' reply
ports): the firewall step accepts everything from the private network on the
private interface and nothing of it on the public side.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from homeclust.changes import Change, CommandChange
from homeclust.errors import StepError
from homeclust.facts import Fact, FactQuery
from homeclust.inventory import Inventory, Node
from homeclust.platforms import Platform
from homeclust.render.torque import (
    MOM_CONFIG_PATH,
    NODES_PATH,
    SERVER_NAME_PATH,
    SERVERDB_PATH,
    ServerConfig,
    missing_setup,
    parse_print_server,
    render_mom_config,
    render_nodes,
    render_server_name,
    server_setup,
)
from homeclust.steps.base import CheckItem, PlanContext, Probe, Step, StepPlan, file_change
from homeclust.steps.batch import (
    MUNGE_KEY_FACT,
    MUNGE_UNIT,
    NODE_SIZE,
    SCHEDULER_PACKAGE_NAMES,
    cluster_user,
    compute_nodes,
    job_readiness,
    keep_running,
    munge_changes,
    package_changes,
    size_of,
    slots_of,
    worker_packages,
)

TRQAUTHD = "trqauthd.service"
PBS_SERVER = "pbs_server.service"
PBS_SCHED = "pbs_sched.service"
PBS_MOM = "pbs_mom.service"

#: Up to 30 s for a starting pbs_server to answer qmgr.
_WAIT_SERVER = ("i=0; until qmgr -c 'list server' >/dev/null 2>&1; do i=$((i+1)); "
                "[ $i -ge 30 ] && break; sleep 1; done")


@dataclass(frozen=True)
class ServerState:
    """The master's pbs_server: whether its database exists, and its configuration
    (None when pbs_server is not running or did not answer)."""

    database: bool
    config: ServerConfig | None


def parse_server_state(text: str) -> ServerState:
    lines = text.splitlines()
    database = "#homeclust:serverdb" in lines
    answered = "#homeclust:answered" in lines
    body = "\n".join(line for line in lines if not line.startswith("#homeclust:"))
    return ServerState(database, parse_print_server(body) if answered else None)


TORQUE_SERVER = Fact(
    "torque-server",
    f"[ -e {SERVERDB_PATH} ] && echo '#homeclust:serverdb'\n"
    "if systemctl is-active --quiet pbs_server; then\n"
    "  i=0; until out=$(timeout 10 qmgr -c 'print server'); do\n"
    "    i=$((i+1)); [ $i -ge 10 ] && break; sleep 1; done\n"
    "  [ -n \"$out\" ] && printf '%s\\n#homeclust:answered\\n' \"$out\"\n"
    "fi\ntrue",
    parse_server_state,
)


def parse_pbsnodes(text: str) -> dict[str, str]:
    """``pbsnodes -a`` -> {node: state}."""
    states: dict[str, str] = {}
    name: str | None = None
    for line in text.splitlines():
        if line and not line[0].isspace():
            name = line.strip()
        elif name is not None and line.strip().startswith("state = "):
            states[name] = line.split("=", 1)[1].strip()
    return states


TORQUE_NODES = Fact(
    "torque-nodes",
    "command -v pbsnodes >/dev/null 2>&1 && timeout 10 pbsnodes -a; true",
    parse_pbsnodes,
)

#: pbsnodes states of a node that takes or runs jobs.
HEALTHY = frozenset({"free", "job-exclusive", "busy"})


def nodes_file(ctx: PlanContext) -> tuple[list[tuple[str, int]], list[str]]:
    """(name, np) of every compute node, and warnings about nodes left out.

    A node without facts in this run keeps its line from the master's current file.
    """
    current = {}
    for line in (ctx.facts.file_text(NODES_PATH) or "").splitlines():
        words = line.split()
        if len(words) >= 2 and words[1].startswith("np=") and words[1][3:].isdigit():
            current[words[0]] = int(words[1][3:])
    nodes, warnings = [], []
    for node in compute_nodes(ctx.inventory):
        slots = slots_of(node, size_of(ctx, node))
        if slots is None:
            slots = current.get(node.name)
        if slots is None:
            warnings.append(f"{node.name} is left out of the Torque nodes file: this run has "
                            "no facts from it (run `homeclust up` with it reachable)")
            continue
        nodes.append((node.name, slots))
    return nodes, warnings


def qmgr_script(commands: list[str]) -> str:
    """Wait for pbs_server to answer, then send ``commands`` one by one (stop at the first
    failure).  ``create queue`` of a queue that exists is no failure: a run interrupted
    half-way, or a queue someone created by hand, must not block the rest."""
    steps = [_WAIT_SERVER]
    for command in commands:
        if command.startswith("create queue "):
            listed = shlex.quote("list queue " + command.split()[2])
            steps.append(f"{{ qmgr -c {shlex.quote(command)} || qmgr -c {listed} >/dev/null; }}")
        else:
            steps.append(f"qmgr -c {shlex.quote(command)}")
    return " && ".join(steps)


class TorqueStep(Step):
    name = "torque"
    summary = "Torque/PBS: pbs_server and pbs_sched on the master, pbs_mom on compute nodes"
    depends_on = ("network", "nat", "repo", "ssh-keys")

    def enabled(self, inventory: Inventory) -> bool:
        return inventory.scheduler.kind == "torque"

    def fact_query(self, inventory: Inventory) -> FactQuery:
        return FactQuery(
            paths=frozenset({SERVER_NAME_PATH, MOM_CONFIG_PATH, NODES_PATH}),
            account_secret_paths=MUNGE_KEY_FACT,
            units=frozenset({MUNGE_UNIT, TRQAUTHD, PBS_SERVER, PBS_SCHED, PBS_MOM}),
            packages=SCHEDULER_PACKAGE_NAMES,
            extra=(NODE_SIZE, TORQUE_SERVER, TORQUE_NODES),
        )

    def worker_packages(self, inventory: Inventory, platform: Platform) -> tuple[str, ...]:
        return worker_packages("torque", platform)

    def preflight(self, ctx: PlanContext) -> None:
        platform = ctx.platform
        if not platform.torque_packaged:
            raise StepError(
                f"{ctx.node.name}: Torque/PBS is not packaged for {ctx.facts.os.pretty_name} "
                f"({platform.name}): set [scheduler] kind = \"slurm\" in {ctx.inventory.path}",
                hint="Torque comes from EPEL, for the RHEL family only; Slurm is packaged "
                "for both families. Nothing was changed.")

    def plan(self, ctx: PlanContext) -> StepPlan:
        self.preflight(ctx)
        facts, node, inventory = ctx.facts, ctx.node, ctx.inventory
        master = inventory.master.name
        changes: list[Change] = []
        warnings: list[str] = []
        packages, new = package_changes(ctx, "torque")
        changes += packages
        changes += munge_changes(ctx, packages_new=new)
        server_name = file_change(facts, SERVER_NAME_PATH, render_server_name(master))
        if server_name is not None:
            changes.append(server_name)
        config: list[Change] = [server_name] if server_name else []
        changes += keep_running(ctx, TRQAUTHD, config=config, restart=new)
        if node.is_master:
            changes += self._server(ctx, config, new, warnings)
        if node.compute:
            mom = file_change(facts, MOM_CONFIG_PATH, render_mom_config(master))
            if mom is not None:
                changes.append(mom)
            changes += keep_running(ctx, PBS_MOM, config=config + ([mom] if mom else []),
                                    restart=new)
        return StepPlan(self.name, node.name, tuple(changes), tuple(warnings))

    def _server(self, ctx: PlanContext, config: list[Change], new: bool,
                warnings: list[str]) -> list[Change]:
        facts = ctx.facts
        changes: list[Change] = []
        nodes, left_out = nodes_file(ctx)
        warnings += left_out
        nodes_change = file_change(facts, NODES_PATH, render_nodes(nodes))
        if nodes_change is not None:
            changes.append(nodes_change)
        state = facts.get(TORQUE_SERVER)
        if not state.database:
            changes.append(CommandChange(
                "create pbs_server's database (pbs_server -t create, once)",
                # No database, so no question; stdin closed in case there is one after all.
                "systemctl stop pbs_server >/dev/null 2>&1; "
                f"pbs_server -t create </dev/null && {{ {_WAIT_SERVER}; }} && qterm -t quick; "
                "i=0; while pgrep -x pbs_server >/dev/null; do i=$((i+1)); "
                "[ $i -ge 30 ] && break; sleep 1; done; "
                f"[ -e {SERVERDB_PATH} ]"))
        changes += keep_running(ctx, PBS_SERVER,
                                config=config + ([nodes_change] if nodes_change else []),
                                restart=new or not state.database)
        changes += keep_running(ctx, PBS_SCHED, restart=new)
        wanted = server_setup(ctx.inventory.master.name)
        fresh = not state.database or not facts.service_active(PBS_SERVER)
        if state.config is None and not fresh:
            warnings.append("pbs_server runs but did not answer `qmgr -c 'print server'`: "
                            "its attributes and queue are not checked")
            return changes
        missing = wanted if state.config is None else missing_setup(wanted, state.config)
        if missing:
            changes.append(CommandChange("configure pbs_server: " + "; ".join(missing),
                                         qmgr_script(missing)))
        return changes

    def posture(self, ctx: PlanContext) -> list[CheckItem]:
        node = ctx.node
        items = job_readiness(ctx, "torque", _unavailable(ctx) if node.is_master else [])
        if not node.compute:
            return items
        state = ctx.facts.get(TORQUE_NODES).get(node.name)
        fix = f"homeclust up --only torque --host {node.name}"
        if state is None:
            items.append(CheckItem(node.name, "torque node", "fail",
                                   "pbs_server does not list this node (or did not answer)", fix))
        elif _healthy(state):
            items.append(CheckItem(node.name, "torque node", "pass", state))
        else:
            items.append(CheckItem(node.name, "torque node", "fail", state, fix))
        return items

    def probes(self, ctx: PlanContext) -> list[Probe]:
        user = cluster_user(ctx.inventory)
        if not ctx.node.is_master or user is None or _unavailable(ctx):
            return []
        nodes = [n.name for n in compute_nodes(ctx.inventory)]
        return [job_probe(ctx.node, user.name, nodes)] if nodes else []


def _healthy(state: str) -> bool:
    return {s.strip() for s in state.split(",")} <= HEALTHY


def _unavailable(ctx: PlanContext) -> list[str]:
    """Compute nodes pbs_server (as the master sees it) does not show free or busy."""
    states = ctx.facts.get(TORQUE_NODES)
    return [node.name for node in compute_nodes(ctx.inventory)
            if node.name not in states or not _healthy(states[node.name])]


def job_probe(master: Node, user: str, nodes: list[str]) -> Probe:
    """A one-line job as ``user`` on one slot of every compute node: ``pbsdsh -u
    hostname`` prints each node's name into the job's output, which Torque copies
    back to the master; ``qsub -W block=true`` waits for the job to end."""
    # Everything as the user, in a directory of the user's own: the output file is the
    # user's, and root reading it back would follow whatever the user put there.
    job = (f"d=$(mktemp -d) && cd \"$d\" || exit 1; echo 'pbsdsh -u hostname' | "
           f"qsub -W block=true -N homeclust-check -j oe -o \"$d/out\" "
           f"-l nodes={len(nodes)}:ppn=1,walltime=00:02:00; rc=$?; cat \"$d/out\" 2>/dev/null; "
           "cd / && rm -rf \"$d\"; exit $rc")
    script = (f"cd /tmp && timeout 150 runuser -u {shlex.quote(user)} -- sh -c "
              f"{shlex.quote(job)} 2>&1")

    def evaluate(code: int, output: str) -> CheckItem:
        ran = sorted({line.strip() for line in output.splitlines() if line.strip() in nodes})
        missing = [n for n in nodes if n not in ran]
        if code != 0 or missing:
            tail = " ".join(output.strip().splitlines()[-3:])
            return CheckItem(master.name, "torque job", "fail",
                             f"qsub as {user} (exit {code}) did not run on "
                             f"{', '.join(missing) or 'every node'}: {tail}",
                             "see `pbsnodes -a` and /var/log/torque on the master; the user "
                             "must exist on every node with SSH between the nodes")
        return CheckItem(master.name, "torque job", "pass", f"ran as {user} on {', '.join(ran)}")

    return Probe("torque job", script, evaluate, timeout=180.0)
