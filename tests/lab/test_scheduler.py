"""The batch scheduler on the lab (Debian 12: Slurm; Torque is refused there).

The tests run in file order on one lab, starting from pristine nodes: first
the refused Torque (nothing may change), then a real `up` (every step: the
ssh-keys step makes the cluster user ``hpc``) of a cluster of master, worker1
and worker2, what it achieved (jobs through Slurm as the cluster user),
re-runs, reboots, recovery of drained nodes, and worker3 joining.  Nodes are
observed from inside (``sh``/``lab.exec``), not through homeclust: sinfo, srun
as the user, the files themselves.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from homeclust.lab import Lab
from tests.lab.helpers import (
    failed_checks,
    homeclust,
    homeclust_json,
    sh,
    snapshot,
    statuses,
    tcp_connects,
    wait_for_check,
)

pytestmark = pytest.mark.lab

FIRST = ("master", "worker1", "worker2")
ALL = (*FIRST, "worker3")
CONF = "/etc/slurm/slurm.conf"
KEY = "/etc/munge/munge.key"


@pytest.fixture(scope="module")
def fresh(lab: Lab) -> Iterator[Lab]:
    """Pristine nodes (as after installation) for this module."""
    for node in ALL:
        lab.reset(node)
    yield lab


@pytest.fixture(scope="module")
def three_nodes(lab_inventory_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The lab's inventory before worker3 joins (worker3 is up, but not in it)."""
    raw = tomllib.loads(lab_inventory_path.read_text())
    raw["workers"] = [w for w in raw["workers"] if w["name"] != "worker3"]
    path = tmp_path_factory.mktemp("scheduler") / "three-nodes.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


@pytest.fixture(scope="module")
def torque_inventory(lab_inventory_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tomllib.loads(lab_inventory_path.read_text())
    raw["scheduler"] = {"kind": "torque"}
    path = tmp_path_factory.mktemp("scheduler") / "torque.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


@pytest.fixture(scope="module")
def configured(fresh: Lab, three_nodes: Path) -> Lab:
    code, data = homeclust_json(three_nodes, "up", timeout=1200)
    assert code == 0, (data["host_errors"], [o for o in data["outcomes"] if o["error"]])
    changed = statuses(data)
    assert all(changed[(node, "slurm")] == "changed" for node in FIRST)
    return fresh


def srun_as_user(lab: Lab, nodes: int) -> list[str]:
    """A job through Slurm as the cluster user, from the master, outside homeclust."""
    out = sh(lab, "master", f"cd /tmp && runuser -u hpc -- srun --immediate=60 -N {nodes} "
                            "--ntasks-per-node=1 hostname", timeout=120)
    return sorted(out.split())


def test_torque_on_debian_stops_before_changing_anything(fresh: Lab,
                                                         torque_inventory: Path) -> None:
    before = {node: snapshot(fresh, node) for node in FIRST}
    packages = {node: sh(fresh, node, "dpkg-query -W -f='${Package}\\n' | sort") for node in FIRST}
    code, data = homeclust_json(torque_inventory, "up")
    assert code == 1
    errors = {o["host"]: o["error"] for o in data["outcomes"] if o["step"] == "torque"}
    assert "Torque/PBS is not packaged for Debian GNU/Linux 12 (bookworm)" in errors["master"]
    assert 'set [scheduler] kind = "slurm"' in errors["master"]
    assert {o["status"] for o in data["outcomes"] if o["step"] != "torque"} == {"skipped"}
    for node in FIRST:
        assert snapshot(fresh, node) == before[node], node
        assert sh(fresh, node, "dpkg-query -W -f='${Package}\\n' | sort") == packages[node]


def test_up_runs_jobs_across_every_node_as_the_cluster_user(configured: Lab,
                                                            three_nodes: Path) -> None:
    assert srun_as_user(configured, 3) == list(FIRST)
    nodes = sh(configured, "master", "sinfo --noheader --Node --format='%N %T'").split("\n")
    assert sorted(line for line in nodes if line) == [f"{n} idle" for n in FIRST]
    # The one key everywhere, readable by munge only.
    keys = {sh(configured, node, f"sha256sum {KEY} | cut -c1-64; stat -c '%a %U %G' {KEY}")
            for node in FIRST}
    assert len(keys) == 1 and keys.pop().endswith("400 munge munge\n")
    # The same slurm.conf everywhere; the lab's containers track processes without cgroups.
    confs = {sh(configured, node, f"cat {CONF}") for node in FIRST}
    assert len(confs) == 1 and "ProctrackType=proctrack/linuxproc" in confs.pop()


def test_check_passes_with_every_node_idle_and_a_job_on_each(configured: Lab,
                                                              three_nodes: Path) -> None:
    code, data = homeclust_json(three_nodes, "check")
    assert code == 0, failed_checks(data)
    passed = {(c["host"], c["check"]): c["detail"] for c in data["checks"]
              if c["status"] == "pass"}
    for node in FIRST:
        assert passed[(node, "slurm node")] == "idle"
    assert passed[("master", "slurm job")] == "ran as hpc on master, worker1, worker2"


def test_second_up_changes_nothing(configured: Lab, three_nodes: Path) -> None:
    code, data = homeclust_json(three_nodes, "up")
    assert code == 0
    assert set(statuses(data).values()) == {"unchanged"}
    assert homeclust(three_nodes, "plan").returncode == 0


def test_the_controller_is_reachable_from_the_private_side_only(configured: Lab) -> None:
    assert tcp_connects(configured, "worker1", "192.168.10.1", 6817)
    assert not tcp_connects(configured, "internet", str(configured.master_public_address), 6817)


def test_after_rebooting_the_master_and_a_worker_check_passes_without_a_rerun(
        configured: Lab, three_nodes: Path) -> None:
    configured.reboot("master")
    configured.reboot("worker1")
    data = wait_for_check(three_nodes)
    assert any(c["check"] == "slurm job" and c["status"] == "pass" for c in data["checks"])
    assert srun_as_user(configured, 3) == list(FIRST)


def test_slurm_drained_nodes_are_resumed_and_an_administrators_drain_is_kept(
        configured: Lab, three_nodes: Path) -> None:
    # What Slurm does by itself is signed by its user; an administrator's drain by root.
    # (A DOWN node comes back by itself: ReturnToService=2 returns it as soon as its slurmd
    # answers.  A DRAIN stays until someone resumes it.)
    sh(configured, "master", "runuser -u slurm -- scontrol update nodename=worker2 state=drain "
                             "reason='Kill task failed'; scontrol update nodename=worker1 "
                             "state=drain reason='broken fan'")
    try:
        code, data = homeclust_json(three_nodes, "up")
        assert code == 0
        assert statuses(data)[("worker2", "slurm")] == "changed"
        assert statuses(data)[("worker1", "slurm")] == "unchanged"
        states = sh(configured, "master", "sinfo --noheader --Node --format='%N %T'")
        assert "worker2 idle" in states and "worker1 drained" in states
        code, data = homeclust_json(three_nodes, "check")
        assert code == 1
        failing = {(c["host"], c["check"]) for c in data["checks"] if c["status"] == "fail"}
        assert ("worker1", "slurm node") in failing and ("worker2", "slurm node") not in failing
    finally:
        sh(configured, "master", "scontrol update nodename=worker1 state=resume")


def test_a_new_worker_joins_slurm_conf_on_every_node_and_the_next_job(
        configured: Lab, lab_inventory_path: Path) -> None:
    code, data = homeclust_json(lab_inventory_path, "up", timeout=1200)
    assert code == 0, [o for o in data["outcomes"] if o["error"]]
    changed = statuses(data)
    assert changed[("worker3", "slurm")] == "changed"
    for node in FIRST:  # the new node is in their slurm.conf: rewritten, daemons restarted
        assert changed[(node, "slurm")] == "changed"
    confs = {sh(configured, node, f"cat {CONF}") for node in ALL}
    assert len(confs) == 1 and "NodeName=worker3 NodeAddr=192.168.10.4 " in confs.pop()
    data = wait_for_check(lab_inventory_path, seconds=60)
    assert srun_as_user(configured, 4) == list(ALL)
    assert homeclust(lab_inventory_path, "plan").returncode == 0
