"""The idempotency proof at the planning level: a host already in the target state
(recorded facts of both families after the steps ran) plans nothing, for every step."""

from __future__ import annotations

import pytest

from homeclust.facts import HostFacts
from homeclust.inventory import Inventory
from homeclust.steps import REGISTRY
from homeclust.steps.base import PlanContext
from tests.unit.factsbuilder import converged
from tests.unit.schedulerfacts import INV_SLURM, INV_TORQUE, MASTER_OF, after, query

HOSTS = [("debian12-master", "master"), ("debian12-worker", "worker1"),
         ("rocky9-master", "master"), ("centos7-worker", "worker2")]
#: Steps an inventory enables; Torque is not packaged on Debian (refused, see test_plan_torque).
INVENTORIES: dict[str, Inventory] = {"slurm": INV_SLURM}
REFUSED = {("torque", "debian12-master"), ("torque", "debian12-worker")}


def inventory_for(step: str) -> Inventory:
    return INVENTORIES.get(step, INV_TORQUE)


def facts_after(step: str, name: str) -> HostFacts:
    if step in ("torque", "slurm"):
        return after(name, step).facts(query())
    return converged(name).facts(query())


CASES = [(step, name, node) for step in REGISTRY for name, node in HOSTS
         if REGISTRY[step].enabled(inventory_for(step)) and (step, name) not in REFUSED
         and REGISTRY[step].targets(inventory_for(step), inventory_for(step).node(node))]


@pytest.mark.parametrize(("step", "name", "node"), CASES)
def test_converged_host_plans_nothing(step: str, name: str, node: str) -> None:
    inv = inventory_for(step)
    facts = facts_after(step, name)
    # Workers are planned knowing their master (its munge key, its scheduler config).
    cluster = {inv.master.name: facts_after(step, MASTER_OF[name])} if name in MASTER_OF else {}
    result = REGISTRY[step].plan(PlanContext(inv, inv.node(node), facts, cluster))
    assert result.changes == (), result.descriptions()
    assert result.guard is None


def test_every_step_is_proven_on_both_families() -> None:
    for step in REGISTRY:
        families = {"debian" if name.startswith("debian") else "rhel"
                    for s, name, _ in CASES if s == step}
        assert families == ({"rhel"} if step == "torque" else {"debian", "rhel"}), step
