"""mpi: golden files (MCA parameters, hostfile, profile.d) and plans on both families."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest

from homeclust.changes import FileChange, PackagesChange
from homeclust.render.mpi import (
    DISABLED_PREFIX,
    PROFILE_PATH,
    render_hostfile,
    render_mca_params,
    render_profile,
    render_user_hostfile,
)
from homeclust.steps.base import PlanContext, StepPlan
from homeclust.steps.mpi import MpiStep
from tests.unit.factsbuilder import check_golden, fixture_text
from tests.unit.meshfacts import INV, converged, facts, fresh, lab_inventory, mesh

STEP = MpiStep()
NET = IPv4Network("192.168.10.0/24")
DEBIAN_DEFAULT = fixture_text("openmpi/debian12-openmpi-mca-params.conf")
UPSTREAM_DEFAULT = fixture_text("openmpi/upstream-openmpi-mca-params.conf")


def plan(host_facts: object, node: str = "master", inv: object = INV) -> StepPlan:
    return STEP.plan(PlanContext(inv, inv.node(node), host_facts, {}))  # type: ignore[arg-type, attr-defined]


def files(result: StepPlan) -> dict[str, FileChange]:
    return {c.path: c for c in result.all_changes if isinstance(c, FileChange)}


def test_mca_params_debian_keeps_the_distributions_settings() -> None:
    assert not DEBIAN_DEFAULT.endswith("\n")  # Debian's file ends without a newline
    out = render_mca_params(DEBIAN_DEFAULT, NET)
    check_golden("mpi/debian/etc/openmpi/openmpi-mca-params.conf", out)
    assert out.startswith(DEBIAN_DEFAULT + "\n")
    assert "btl_tcp_if_include = 192.168.10.0/24\noob_tcp_if_include = 192.168.10.0/24\n" in out
    assert render_mca_params(out, NET) == out


def test_mca_params_rhel_from_open_mpis_own_default() -> None:
    out = render_mca_params(UPSTREAM_DEFAULT, NET)
    check_golden("mpi/rhel/etc/openmpi-x86_64/openmpi-mca-params.conf", out)
    assert render_mca_params(out, NET) == out


def test_mca_params_settings_that_would_contradict_the_block_are_commented_out() -> None:
    current = DEBIAN_DEFAULT + "\nbtl_tcp_if_exclude = lo,docker0\noob_tcp_if_include=eth1\n"
    out = render_mca_params(current, NET)
    assert DISABLED_PREFIX + "btl_tcp_if_exclude = lo,docker0\n" in out
    assert DISABLED_PREFIX + "oob_tcp_if_include=eth1\n" in out
    assert out.count("oob_tcp_if_include = ") == 1
    # A new network replaces the block where it stands.
    moved = render_mca_params(out, IPv4Network("10.9.0.0/16"))
    assert "btl_tcp_if_include = 10.9.0.0/16" in moved and "192.168.10.0/24" not in moved


def test_hostfile_lists_compute_nodes_with_their_slots() -> None:
    check_golden("mpi/openmpi-default-hostfile", render_hostfile(INV))
    check_golden("mpi/home/hpc/hostfile", render_user_hostfile(INV))
    no_master = lab_inventory(master={"slots": 128, "compute": False})
    lines = [line for line in render_hostfile(no_master).splitlines() if not line.startswith("#")]
    assert lines == ["worker1 slots=128", "worker2 slots=128", "worker3 slots=128"]


def test_profile_only_where_open_mpi_is_off_the_default_paths() -> None:
    assert render_profile(None) is None
    check_golden("mpi/rhel/etc/profile.d/homeclust-mpi.sh", render_profile("/usr/lib64/openmpi")
                 or "")


def test_fresh_debian_node_installs_first_and_edits_the_parameter_file_after() -> None:
    result = plan(facts(fresh("debian12-worker")), "worker1")
    assert isinstance(result.changes[0], PackagesChange)
    assert result.changes[0].packages == ("openmpi-bin", "python3-mpi4py")
    assert "/etc/openmpi/openmpi-mca-params.conf" not in files(result)  # not there yet
    assert "pin MPI to the private network" in result.incomplete
    assert "/etc/openmpi/openmpi-default-hostfile" in files(result)
    assert PROFILE_PATH not in files(result)  # Debian: mpirun is on the default PATH
    assert any("cluster user hpc does not exist here yet" in w for w in result.warnings)


def test_debian_node_with_open_mpi_gets_the_block_and_the_users_hostfile() -> None:
    installed = mesh("worker").but(files={
        "/etc/openmpi/openmpi-mca-params.conf": DEBIAN_DEFAULT, "/home/hpc/hostfile": None})
    result = plan(facts(installed), "worker1")
    assert not result.incomplete
    planned = files(result)
    assert planned["/etc/openmpi/openmpi-mca-params.conf"].content == render_mca_params(
        DEBIAN_DEFAULT, NET)
    user = planned["/home/hpc/hostfile"]
    assert (user.owner, user.group) == ("hpc", "hpc")


@pytest.mark.parametrize(("name", "packages", "python"), [
    ("rocky9-master", ("openmpi", "python3-mpi4py-openmpi"), "python3"),
    ("centos7-worker", ("openmpi", "mpi4py-openmpi"), "python"),
])
def test_rhel_plans(name: str, packages: tuple[str, ...], python: str) -> None:
    node = "master" if name.endswith("master") else "worker1"
    result = plan(facts(fresh(name)), node)
    installs = [c.packages for c in result.changes if isinstance(c, PackagesChange)]
    assert installs == [("epel-release",), packages]  # EPEL first: mpi4py comes from there
    planned = files(result)
    assert "/etc/openmpi-x86_64/openmpi-default-hostfile" in planned
    assert planned[PROFILE_PATH].content == render_profile("/usr/lib64/openmpi")
    assert "/etc/openmpi-x86_64/openmpi-mca-params.conf" in result.incomplete
    # Once installed, the file the package brought is edited where RHEL keeps it.
    done = facts(converged(name).but(files={
        "/etc/openmpi-x86_64/openmpi-mca-params.conf": UPSTREAM_DEFAULT}))
    edit = plan(done, node)
    assert [c.path for c in edit.changes] == [  # type: ignore[union-attr]
        "/etc/openmpi-x86_64/openmpi-mca-params.conf"]
    ctx = PlanContext(INV, INV.master_node, facts(converged(name)), {})
    if node == "master":
        _, exchange = STEP.probes(ctx)
        assert f" {python} /usr/local/libexec/homeclust/mpi-check.py" in exchange.script


def test_converged_hosts_of_both_families_plan_nothing() -> None:
    for name, node in (("debian12-master", "master"), ("debian12-worker", "worker1"),
                       ("rocky9-master", "master"), ("centos7-worker", "worker1")):
        assert plan(facts(converged(name)), node).descriptions() == [], name


def test_probes_run_on_the_master_as_a_cluster_user() -> None:
    master_ctx = PlanContext(INV, INV.master_node, facts(mesh("master")), {})
    job, exchange = STEP.probes(master_ctx)
    assert "runuser -l hpc -c" in job.script and "mpirun --map-by ppr:1:node hostname" in job.script
    assert "--host master:1,worker1:1,worker2:1,worker3:1 -np 4" in exchange.script
    assert STEP.probes(PlanContext(INV, INV.node("worker1"), facts(mesh("worker")), {})) == []
    assert job.evaluate(0, "worker2\nmaster\nworker1\nworker3\n").status == "pass"
    missing = job.evaluate(1, "master\nworker1\nworker3\nORTE was unable to reliably start\n")
    assert missing.status == "fail" and "no answer from worker2" in missing.detail
    good = ("exchange 1 ok 8388608 0.101\nexchange 2 ok 8388608 0.102\n"
            "exchange 3 ok 8388608 0.103\nrank 0 master\nrank 1 worker1\nrank 2 worker2\n"
            "rank 3 worker3\nresult ok\n")
    assert exchange.evaluate(0, good).status == "pass"
    corrupt = good.replace("exchange 2 ok", "exchange 2 corrupt").replace("result ok",
                                                                          "result failed")
    item = exchange.evaluate(1, corrupt)
    assert item.status == "fail" and "worker2: corrupt" in item.detail
    hung = exchange.evaluate(124, "exchange 1 ok 8388608 0.1\n")
    assert hung.status == "fail"


def test_the_check_program_exchanges_8_mib_and_verifies_it() -> None:
    program = files(plan(facts(fresh("debian12-master"))))[
        "/usr/local/libexec/homeclust/mpi-check.py"].content or ""
    compile(program, "mpi-check.py", "exec")  # valid Python (2.7-compatible subset)
    assert "SIZE = 8388608" in program and "Sendrecv" in program
    assert "incoming == pattern(1000 + peer)" in program


def test_plan_counts_on_ssh_keys_creating_the_user_when_it_runs_first() -> None:
    ctx = PlanContext(INV, INV.node("worker1"), facts(fresh("debian12-worker")), {},
                      pending_steps=frozenset({"ssh-keys"}))
    result = STEP.plan(ctx)
    assert files(result)["/home/hpc/hostfile"].owner == "hpc"
    assert not any("does not exist" in w for w in result.warnings)
