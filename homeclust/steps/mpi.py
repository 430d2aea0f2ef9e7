"""mpi step: Open MPI on every node, pinned to the private network, with a default hostfile.

* Packages: Open MPI's runtime and mpi4py (:attr:`Platform.mpi_packages`).
  mpi4py is what lets ``homeclust check`` move real data with MPI without a
  compiler anywhere: a 2 MB package (plus Python where a node lacks it) on
  every node, against a compiler and Open MPI's headers (~200 MB on Debian)
  on the master and a binary to copy around.  On RHEL it comes from EPEL
  (``epel-release`` is installed first).
* ``openmpi-mca-params.conf`` (the platform's own file, edited as data):
  ``btl_tcp_if_include`` and ``oob_tcp_if_include`` = the private network.
  The file comes with the package, so on a node without Open MPI the step
  installs it first and plans the edit once the file is there.
* ``openmpi-default-hostfile``: the compute nodes and their slots; the same
  list in every cluster user's ``~/hostfile`` (read and written as that user: a
  link they put there never makes root read or write anything else).
* ``/etc/profile.d/homeclust-mpi.sh`` where Open MPI is off the default paths
  (RHEL).  Debian's ``mpirun`` is on the default PATH through alternatives.
* The check program (``/usr/local/libexec/homeclust/mpi-check.py``).

``check`` runs, on the master, as the first cluster user (``mpirun`` refuses
root): ``hostname`` on every compute node through the default hostfile, and
the 8 MiB exchange between the master and every worker.  Jobs start over SSH
as that user, so they rely on the ssh-keys step's mesh.
"""

from __future__ import annotations

import shlex

from homeclust.changes import Change, PackagesChange
from homeclust.errors import StepError
from homeclust.facts import Fact, FactQuery
from homeclust.inventory import Inventory
from homeclust.platforms import Platform
from homeclust.render.blocks import BlockError
from homeclust.render.mpi import (
    CHECK_BYTES,
    CHECK_PROGRAM,
    CHECK_PROGRAM_PATH,
    PROFILE_PATH,
    hostfile_lines,
    render_hostfile,
    render_mca_params,
    render_profile,
    render_user_hostfile,
)
from homeclust.steps.base import CheckItem, PlanContext, Probe, Step, StepPlan, file_change
from homeclust.steps.sshkeys import accounts_fact

MCA_FILE = "openmpi-mca-params.conf"
DEFAULT_HOSTFILE = "openmpi-default-hostfile"
#: Every package name any platform uses for Open MPI and mpi4py (facts are asked by name).
ALL_PACKAGES = ("openmpi-bin", "python3-mpi4py", "openmpi", "python3-mpi4py-openmpi",
                "mpi4py-openmpi", "epel-release")
#: Debian installs Open MPI's configuration in one place, RHEL per architecture.
SYSCONF_GLOBS = ("/etc/openmpi", "/etc/openmpi-*")

MACHINE = Fact("machine", "uname -m", lambda text: text.strip() or "x86_64")


def user_hostfile(home: str) -> str:
    return f"{home}/hostfile"


class MpiStep(Step):
    name = "mpi"
    summary = "Open MPI on every node, pinned to the private network, default hostfile"
    depends_on = ("repo", "ssh-keys")  # worker packages come from the repo

    def fact_query(self, inventory: Inventory) -> FactQuery:
        paths = {f"{d}/{f}" for d in SYSCONF_GLOBS for f in (MCA_FILE, DEFAULT_HOSTFILE)}
        paths |= {PROFILE_PATH, CHECK_PROGRAM_PATH}
        # Each user's ~/hostfile is read (and written) as that user: it is in their home.
        theirs = {(u.name, user_hostfile(u.home)) for u in inventory.users}
        return FactQuery(paths=frozenset(paths), account_paths=frozenset(theirs),
                         packages=frozenset(ALL_PACKAGES),
                         extra=(MACHINE, accounts_fact(inventory)))

    def worker_packages(self, inventory: Inventory, platform: Platform) -> tuple[str, ...]:
        return platform.mpi_packages

    def plan(self, ctx: PlanContext) -> StepPlan:
        inventory, node, facts, platform = ctx.inventory, ctx.node, ctx.facts, ctx.platform
        changes: list[Change] = []
        warnings: list[str] = []
        # Workers install from the master's repository, which serves EPEL's packages (the
        # repo step gives them EPEL's key): epel-release there would bring back upstream
        # package sources.
        groups = ((platform.mpi_repo_packages, platform.mpi_packages) if node.is_master
                  else (platform.mpi_packages,))
        for group in groups:
            missing = tuple(p for p in group if p not in facts.packages)
            if missing:
                changes.append(PackagesChange(missing, platform.install_command(missing)))
        openmpi_there = platform.mpi_packages[0] in facts.packages
        sysconfdir = platform.mpi_sysconfdir(facts.get(MACHINE))

        incomplete = ""
        if openmpi_there:
            mca_path = f"{sysconfdir}/{MCA_FILE}"
            try:
                content = render_mca_params(facts.file_text(mca_path),
                                            inventory.cluster.private_network)
            except BlockError as exc:
                raise StepError(f"{node.name}: {mca_path}: {exc}",
                                hint="fix the homeclust marker lines by hand; nothing was "
                                "changed") from None
            changes += _present(file_change(facts, mca_path, content))
        else:
            # The package installs the parameter file with the distribution's settings,
            # which stay: it is edited once it exists.
            incomplete = (f"pin MPI to the private network in {sysconfdir}/{MCA_FILE} once "
                          "Open MPI has installed it")
        changes += _present(file_change(facts, f"{sysconfdir}/{DEFAULT_HOSTFILE}",
                                        render_hostfile(inventory)))
        profile = render_profile(platform.mpi_prefix)
        if profile is not None:
            changes += _present(file_change(facts, PROFILE_PATH, profile))
        changes += _present(file_change(facts, CHECK_PROGRAM_PATH, CHECK_PROGRAM))

        accounts = facts.get(accounts_fact(inventory))
        for user in inventory.users:
            if accounts.user(user.name) is None and "ssh-keys" not in ctx.pending_steps:
                warnings.append(f"cluster user {user.name} does not exist here yet (the "
                                f"ssh-keys step creates it): ~/hostfile follows once it does")
                continue
            changes += _present(file_change(facts, user_hostfile(user.home),
                                            render_user_hostfile(inventory),
                                            owner=user.name, group=user.name,
                                            run_as=user.name))
        if not inventory.users and node.is_master:
            warnings.append("no [[users]] in the inventory: mpirun refuses to run as root, "
                            "so nobody can run MPI jobs (and check cannot test MPI)")
        if not hostfile_lines(inventory):
            warnings.append("no compute node: every node has compute = false")
        return StepPlan(self.name, node.name, tuple(changes), tuple(warnings),
                        incomplete=incomplete)

    def probes(self, ctx: PlanContext) -> list[Probe]:
        if not ctx.node.is_master or not ctx.inventory.users:
            return []
        return [hostname_probe(ctx), exchange_probe(ctx)]


def _present(change: Change | None) -> list[Change]:
    return [] if change is None else [change]


def _as_user(user: str, command: str) -> str:
    """``command`` in a login shell of ``user`` (profile.d applies, as when they log in)."""
    return f"cd / && runuser -l {shlex.quote(user)} -c {shlex.quote(command)}"


def hostname_probe(ctx: PlanContext) -> Probe:
    """``mpirun hostname`` as a cluster user, one process per compute node, through Open
    MPI's default hostfile alone: every compute node must answer."""
    inventory = ctx.inventory
    user = inventory.users[0].name
    expected = sorted(n.name for n in inventory.nodes if n.compute)
    command = "timeout 120 mpirun --map-by ppr:1:node hostname 2>&1"
    script = _as_user(user, command)

    def evaluate(code: int, output: str) -> CheckItem:
        answered = {line.strip().split(".")[0] for line in output.splitlines()}
        seen = sorted(answered & set(expected))
        missing = [n for n in expected if n not in answered]
        if code != 0 or missing:
            tail = " ".join(output.strip().splitlines()[-3:])[:300]
            return CheckItem(ctx.node.name, f"mpi job ({user})", "fail",
                             f"exit {code}; no answer from {', '.join(missing) or 'none'}; {tail}",
                             "homeclust up --only ssh-keys,mpi; see `homeclust check --only "
                             "ssh-keys` for the SSH mesh")
        return CheckItem(ctx.node.name, f"mpi job ({user})", "pass",
                         f"mpirun hostname answered from {', '.join(seen)} "
                         "(default hostfile, no flags but one process per node)")

    return Probe(f"mpi job ({user})", script, evaluate, timeout=150.0)


def exchange_probe(ctx: PlanContext) -> Probe:
    """One rank on the master and one on every worker (whether or not the master computes):
    8 MiB each way between the master and every worker, every byte checked."""
    inventory, platform = ctx.inventory, ctx.platform
    user = inventory.users[0].name
    nodes = [n.name for n in inventory.nodes]
    hosts = ",".join(f"{n}:1" for n in nodes)
    # The check's own allocation (--host) instead of the default hostfile, so that the
    # master takes part even when it does not compute.
    command = (f"timeout 150 mpirun --mca orte_default_hostfile none --host {hosts} "
               f"-np {len(nodes)} --map-by node {platform.mpi_python} {CHECK_PROGRAM_PATH} 2>&1")
    script = _as_user(user, command)
    name = f"mpi data exchange ({user})"

    def evaluate(code: int, output: str) -> CheckItem:
        exchanged = {}
        ranks = {}
        result = ""
        for line in output.splitlines():
            words = line.split()
            if len(words) == 5 and words[0] == "exchange" and words[1].isdigit():
                exchanged[int(words[1])] = (words[2], words[4])
            elif len(words) == 3 and words[0] == "rank" and words[1].isdigit():
                ranks[int(words[1])] = words[2].split(".")[0]
            elif len(words) == 2 and words[0] == "result":
                result = words[1]
        bad = [f"{ranks.get(r, f'rank {r}')}: {state}" for r, (state, _) in exchanged.items()
               if state != "ok"]
        missing = [n for n in nodes[1:] if n not in {ranks.get(r) for r in exchanged}]
        if code != 0 or result != "ok" or bad or missing or ranks.get(0) != nodes[0]:
            tail = " ".join(output.strip().splitlines()[-3:])[:300]
            what = "; ".join(bad + [f"{n}: no exchange" for n in missing]) or tail
            return CheckItem(ctx.node.name, name, "fail", f"exit {code}: {what}",
                             "homeclust up --only mpi; is MPI pinned to the private network?")
        mib = CHECK_BYTES / (1024 * 1024)
        times = ", ".join(f"{ranks.get(r, r)} {float(sec):.2f} s"
                          for r, (_, sec) in sorted(exchanged.items()))
        return CheckItem(ctx.node.name, name, "pass",
                         f"{mib:.0f} MiB each way between {nodes[0]} and every worker ({times})")

    return Probe(name, script, evaluate, timeout=180.0)
