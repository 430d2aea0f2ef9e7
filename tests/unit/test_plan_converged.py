"""The idempotency proof at the planning level: a host already in the target state plans
nothing, for every step -- Debian hosts as captured from the lab after `homeclust up`
(tests/fixtures/lab for network, nat and firewall, tests/fixtures/lab-facts for repo and
monitor), RHEL hosts hand-written (no RHEL lab).

The ssh-keys and mpi steps plan from the whole cluster (keys come from the master's
facts): their converged hosts are the lab-captured ones of :mod:`tests.unit.meshfacts`,
planned with the converged master of the same family beside them.  The scheduler steps
(torque, slurm) likewise, from :mod:`tests.unit.schedulerfacts`, each under the
inventory that enables it."""

from __future__ import annotations

import pytest

from homeclust.facts import parse_iptables_save
from homeclust.inventory import Inventory
from homeclust.steps import REGISTRY
from homeclust.steps.base import PlanContext
from tests.unit import meshfacts
from tests.unit.factsbuilder import (
    CONVERGED_TABLES,
    LAB,
    LAB_NODES,
    FileRecord,
    converged,
    converged_inventory,
    inventory,
    lab_text,
    repo_converged,
    repo_master_for,
)
from tests.unit.schedulerfacts import INV_SLURM, INV_TORQUE, MASTER_OF, after, query

HOSTS = [("debian12-master", "master"), ("debian12-worker", "worker1"),
         ("rocky9-master", "master"), ("centos7-worker", "worker2")]
MESH_STEPS = ("ssh-keys", "mpi")
#: Converged for CONVERGED_TABLES (Debian: captured on a lab of their own), workers
#: planned with their master beside them (the repo step points them at its repository).
REPO_STEPS = ("repo", "monitor")
SCHEDULERS = {"torque": INV_TORQUE, "slurm": INV_SLURM}
#: Torque is not packaged on Debian: refused before planning (see test_plan_torque).
REFUSED = {("torque", "debian12-master"), ("torque", "debian12-worker")}


def inventory_for(step: str, name: str) -> Inventory:
    return SCHEDULERS.get(step) or converged_inventory(name)


CASES = [(step, name, node) for step in REGISTRY for name, node in HOSTS
         if REGISTRY[step].enabled(inventory_for(step, name)) and (step, name) not in REFUSED
         and REGISTRY[step].targets(inventory_for(step, name),
                                    inventory_for(step, name).node(node))]


def context(step: str, name: str, node: str) -> PlanContext:
    if step in REPO_STEPS:
        inv = inventory(**CONVERGED_TABLES)
        cluster = {} if node == "master" else {"master": repo_master_for(name).facts()}
        return PlanContext(inv, inv.node(node), repo_converged(name).facts(), cluster)
    if step in MESH_STEPS:
        inv = meshfacts.INV
        master = "rocky9-master" if name.startswith(("rocky", "centos")) else "debian12-master"
        cluster = {"master": meshfacts.facts(meshfacts.converged(master))}
        node = "master" if node == "master" else "worker1"  # the captured worker
        return PlanContext(inv, inv.node(node), meshfacts.facts(meshfacts.converged(name)),
                           cluster)
    inv = inventory_for(step, name)
    if step in SCHEDULERS:
        # Workers are planned knowing their master (its munge key, its scheduler config).
        beside = {inv.master.name: after(MASTER_OF[name], step).facts(query())
                  } if name in MASTER_OF else {}
        return PlanContext(inv, inv.node(node), after(name, step).facts(query()), beside)
    return PlanContext(inv, inv.node(node), converged(name).facts())


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
            record = records[on_node]
            assert isinstance(record, FileRecord) and record.content == path.read_bytes(), on_node
    facts = converged(name).facts()
    for section, tables in (("iptables-save.txt", facts.iptables),
                            ("ip6tables-save.txt", facts.ip6tables)):
        assert parse_iptables_save(lab_text(node, section)) == dict(tables), section
