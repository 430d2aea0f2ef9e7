"""The idempotency proof at the planning level: a host already in the target state
(recorded facts of both families after the steps ran) plans nothing, for every step."""

from __future__ import annotations

import pytest

from homeclust.steps import REGISTRY
from homeclust.steps.base import PlanContext
from tests.unit.factsbuilder import converged, inventory

INV = inventory()
HOSTS = [("debian12-master", "master"), ("debian12-worker", "worker1"),
         ("rocky9-master", "master"), ("centos7-worker", "worker2")]
CASES = [(step, name, node) for step in REGISTRY for name, node in HOSTS
         if REGISTRY[step].targets(INV, INV.node(node))]


@pytest.mark.parametrize(("step", "name", "node"), CASES)
def test_converged_host_plans_nothing(step: str, name: str, node: str) -> None:
    result = REGISTRY[step].plan(PlanContext(INV, INV.node(node), converged(name).facts()))
    assert result.changes == (), result.descriptions()
    assert result.guard is None
