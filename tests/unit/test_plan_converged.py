"""The idempotency proof at the planning level: a host already in the target state
(recorded facts of both families after the steps ran) plans nothing, for every step.

The ssh-keys and mpi steps plan from the whole cluster (keys come from the master's
facts): their converged hosts are the lab-captured ones of :mod:`tests.unit.meshfacts`,
planned with the converged master of the same family beside them.  The scheduler steps
(torque, slurm) likewise, from :mod:`tests.unit.schedulerfacts`, each under the
inventory that enables it."""

from __future__ import annotations

import pytest

from homeclust.inventory import Inventory
from homeclust.steps import REGISTRY
from homeclust.steps.base import PlanContext
from tests.unit import meshfacts
from tests.unit.factsbuilder import converged
from tests.unit.schedulerfacts import INV_SLURM, INV_TORQUE, MASTER_OF, after, query

INV = INV_TORQUE  # the default inventory: kind = "torque"
HOSTS = [("debian12-master", "master"), ("debian12-worker", "worker1"),
         ("rocky9-master", "master"), ("centos7-worker", "worker2")]
MESH_STEPS = ("ssh-keys", "mpi")
SCHEDULER_STEPS = ("torque", "slurm")
#: Torque is not packaged on Debian: refused before planning (see test_plan_torque).
REFUSED = {("torque", "debian12-master"), ("torque", "debian12-worker")}


def inventory_for(step: str) -> Inventory:
    return INV_SLURM if step == "slurm" else INV


CASES = [(step, name, node) for step in REGISTRY for name, node in HOSTS
         if REGISTRY[step].enabled(inventory_for(step)) and (step, name) not in REFUSED
         and REGISTRY[step].targets(inventory_for(step), inventory_for(step).node(node))]


def context(step: str, name: str, node: str) -> PlanContext:
    if step in MESH_STEPS:
        inv = meshfacts.INV
        master = "rocky9-master" if name.startswith(("rocky", "centos")) else "debian12-master"
        cluster = {"master": meshfacts.facts(meshfacts.converged(master))}
        node = "master" if node == "master" else "worker1"  # the captured worker
        return PlanContext(inv, inv.node(node), meshfacts.facts(meshfacts.converged(name)),
                           cluster)
    if step in SCHEDULER_STEPS:
        # Workers are planned knowing their master (its munge key, its scheduler config).
        inv = inventory_for(step)
        beside = {inv.master.name: after(MASTER_OF[name], step).facts(query())
                  } if name in MASTER_OF else {}
        return PlanContext(inv, inv.node(node), after(name, step).facts(query()), beside)
    return PlanContext(INV, INV.node(node), converged(name).facts())


@pytest.mark.parametrize(("step", "name", "node"), CASES)
def test_converged_host_plans_nothing(step: str, name: str, node: str) -> None:
    result = REGISTRY[step].plan(context(step, name, node))
    assert result.changes == (), result.descriptions()
    assert result.guard is None
    assert not result.incomplete


def test_every_step_is_proven_on_both_families() -> None:
    for step in REGISTRY:
        families = {"debian" if name.startswith("debian") else "rhel"
                    for s, name, _ in CASES if s == step}
        assert families == ({"rhel"} if step == "torque" else {"debian", "rhel"}), step
