"""The idempotency proof at the planning level: a host already in the target state plans
nothing, for every step -- Debian hosts as captured from the lab after `homeclust up`
(tests/fixtures/lab for network, nat and firewall), RHEL hosts hand-written (no RHEL lab).

The ssh-keys and mpi steps plan from the whole cluster (keys come from the master's
facts): their converged hosts are the lab-captured ones of :mod:`tests.unit.meshfacts`,
planned with the converged master of the same family beside them."""

from __future__ import annotations

import pytest

from homeclust.facts import parse_iptables_save
from homeclust.steps import REGISTRY
from homeclust.steps.base import PlanContext
from tests.unit import meshfacts
from tests.unit.factsbuilder import (
    LAB,
    LAB_NODES,
    converged,
    converged_inventory,
    lab_text,
)

HOSTS = [("debian12-master", "master"), ("debian12-worker", "worker1"),
         ("rocky9-master", "master"), ("centos7-worker", "worker2")]
MESH_STEPS = ("ssh-keys", "mpi")
CASES = [(step, name, node) for step in REGISTRY for name, node in HOSTS
         if REGISTRY[step].targets(converged_inventory(name), converged_inventory(name).node(node))]


def context(step: str, name: str, node: str) -> PlanContext:
    if step not in MESH_STEPS:
        inv = converged_inventory(name)
        return PlanContext(inv, inv.node(node), converged(name).facts())
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


@pytest.mark.parametrize("name", sorted(LAB_NODES))
def test_lab_capture_is_one_consistent_snapshot(name: str) -> None:
    """The captured facts, files and tables of a node come from the same converged lab."""
    node = LAB_NODES[name]
    records = converged(name).files
    captured = sorted((LAB / node / "files").rglob("*"))
    assert captured, "no captured files: run scripts/capture-fixtures"
    for path in captured:
        if path.is_file():
            on_node = "/" + str(path.relative_to(LAB / node / "files"))
            assert records[on_node].content == path.read_bytes(), on_node
    facts = converged(name).facts()
    for section, tables in (("iptables-save.txt", facts.iptables),
                            ("ip6tables-save.txt", facts.ip6tables)):
        assert parse_iptables_save(lab_text(node, section)) == dict(tables), section
