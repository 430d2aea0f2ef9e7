"""The idempotency proof at the planning level: a host already in the target state
(recorded facts of both families after the steps ran) plans nothing, for every step.

The ssh-keys and mpi steps plan from the whole cluster (keys come from the master's
facts): their converged hosts are the lab-captured ones of :mod:`tests.unit.meshfacts`,
planned with the converged master of the same family beside them."""

from __future__ import annotations

import pytest

from homeclust.steps import REGISTRY
from homeclust.steps.base import PlanContext
from tests.unit import meshfacts
from tests.unit.factsbuilder import converged, inventory

INV = inventory()
HOSTS = [("debian12-master", "master"), ("debian12-worker", "worker1"),
         ("rocky9-master", "master"), ("centos7-worker", "worker2")]
MESH_STEPS = ("ssh-keys", "mpi")
CASES = [(step, name, node) for step in REGISTRY for name, node in HOSTS
         if REGISTRY[step].targets(INV, INV.node(node))]


def context(step: str, name: str, node: str) -> PlanContext:
    if step not in MESH_STEPS:
        return PlanContext(INV, INV.node(node), converged(name).facts())
    inv = meshfacts.INV
    master = "rocky9-master" if name.startswith(("rocky", "centos")) else "debian12-master"
    cluster = {"master": meshfacts.facts(meshfacts.converged(master))}
    node = "master" if node == "master" else "worker1"  # the captured worker
    return PlanContext(inv, inv.node(node), meshfacts.facts(meshfacts.converged(name)), cluster)


@pytest.mark.parametrize(("step", "name", "node"), CASES)
def test_converged_host_plans_nothing(step: str, name: str, node: str) -> None:
    result = REGISTRY[step].plan(context(step, name, node))
    assert result.changes == (), result.descriptions()
    assert result.guard is None
    assert not result.incomplete
