"""The idempotency proof at the planning level: a host already in the target state
(recorded facts of both families after the steps ran) plans nothing, for every step."""

from __future__ import annotations

import pytest

from homeclust.steps import REGISTRY
from homeclust.steps.base import PlanContext
from tests.unit.factsbuilder import CONVERGED_TABLES, converged, inventory, repo_master_for

INV = inventory(**CONVERGED_TABLES)
HOSTS = [("debian12-master", "master"), ("debian12-worker", "worker1"),
         ("rocky9-master", "master"), ("centos7-worker", "worker2")]
CASES = [(step, name, node) for step in REGISTRY for name, node in HOSTS
         if REGISTRY[step].targets(INV, INV.node(node))]


@pytest.mark.parametrize(("step", "name", "node"), CASES)
def test_converged_host_plans_nothing(step: str, name: str, node: str) -> None:
    # Workers see their master's facts too (the repo step points them at its repository).
    cluster = {} if node == "master" else {"master": repo_master_for(name).facts()}
    result = REGISTRY[step].plan(PlanContext(INV, INV.node(node), converged(name).facts(), cluster))
    assert result.changes == (), result.descriptions()
    assert result.guard is None
