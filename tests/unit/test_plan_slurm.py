"""The slurm step planned from recorded facts of both families: rendered files (golden),
the install and set-up sequence, the munge key as a secret, node sizes, reboot recovery."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from homeclust.changes import CommandChange, FileChange, PackagesChange, ServiceChange, render_batch
from homeclust.errors import StepError
from homeclust.facts import HostFacts
from homeclust.inventory import Inventory
from homeclust.platforms import platform_of
from homeclust.render.slurm import parse_slurm_conf, real_memory
from homeclust.steps.base import PlanContext, StepPlan
from homeclust.steps.slurm import SlurmStep, parse_sinfo
from tests.unit.factsbuilder import FileRecord, check_golden, golden_text, inventory, recorded
from tests.unit.schedulerfacts import (
    BINARY_KEY,
    INV_SLURM,
    TEST_KEY,
    after,
    facts,
    fresh,
)

STEP = SlurmStep()
CONF = "/etc/slurm/slurm.conf"
KEY = "/etc/munge/munge.key"

DEBIAN = {"master": "debian12-master", "worker1": "debian12-worker", "worker2": "debian12-worker"}
RHEL = {"master": "rocky9-master", "worker1": "centos7-worker", "worker2": "centos7-worker"}


def cluster(names: Mapping[str, str], **overrides: HostFacts) -> dict[str, HostFacts]:
    """Fresh facts of every node (recorded hosts with their size), some replaced."""
    hosts = {node: facts(fresh(name, "slurm")) for node, name in names.items()}
    hosts.update(overrides)
    return hosts


def plan(node: str, hosts: Mapping[str, HostFacts], inv: Inventory = INV_SLURM) -> StepPlan:
    return STEP.plan(PlanContext(inv, inv.node(node), hosts[node], dict(hosts)))


def file_of(result: StepPlan, path: str) -> FileChange:
    found = [c for c in result.changes if isinstance(c, FileChange) and c.path == path]
    assert found, result.descriptions()
    return found[0]


# --------------------------------------------------------------------------- slurm.conf


@pytest.mark.parametrize(("family", "names"), [("debian12", DEBIAN), ("rhel", RHEL)])
def test_slurm_conf_is_rendered_from_inventory_and_facts(family: str,
                                                         names: Mapping[str, str]) -> None:
    hosts = cluster(names)
    content = file_of(plan("master", hosts), CONF).content
    assert content is not None
    check_golden(f"slurm/{family}/etc/slurm/slurm.conf", content)


def test_slurm_conf_is_the_same_on_every_node() -> None:
    hosts = cluster(DEBIAN)
    contents = {file_of(plan(node, hosts), CONF).content for node in DEBIAN}
    assert len(contents) == 1


def test_lab_nodes_in_containers_track_processes_without_cgroups() -> None:
    text = golden_text("slurm/debian12/etc/slurm/slurm.conf")
    assert "ProctrackType=proctrack/linuxproc" in text  # systemd-nspawn in the facts


def test_bare_metal_nodes_track_processes_with_cgroups() -> None:
    text = golden_text("slurm/rhel/etc/slurm/slurm.conf")
    assert "ProctrackType=proctrack/cgroup" in text  # systemd-detect-virt: none


def test_one_container_among_the_nodes_means_linuxproc_for_all() -> None:
    worker = fresh("centos7-worker", "slurm").but(virt="lxc\n")
    content = file_of(plan("master", cluster(RHEL, worker2=facts(worker))), CONF).content
    assert content is not None and "ProctrackType=proctrack/linuxproc" in content


def test_slots_in_the_inventory_become_cpus_and_may_exceed_the_hardware() -> None:
    # The guide's slots = 4 on 2-CPU lab nodes: the inventory wins, slurmd is told so.
    text = golden_text("slurm/debian12/etc/slurm/slurm.conf")
    assert "NodeName=worker1 NodeAddr=192.168.10.2 CPUs=4 " in text
    assert "SlurmdParameters=config_overrides" in text
    # slots = 4 on 16 and 8 CPUs: no override needed.
    assert "config_overrides" not in golden_text("slurm/rhel/etc/slurm/slurm.conf")


def test_without_slots_cpus_come_from_the_facts() -> None:
    base = inventory(scheduler={"kind": "slurm"})
    raw_workers = [{"name": w.name, "private_address": str(w.private_address),
                    "interface": w.interface} for w in base.workers]
    inv = inventory(scheduler={"kind": "slurm"}, workers=raw_workers)
    content = file_of(plan("master", cluster(RHEL), inv), CONF).content
    assert content is not None
    assert "NodeName=master NodeAddr=192.168.10.1 CPUs=4 " in content  # slots given
    assert "NodeName=worker1 NodeAddr=192.168.10.2 CPUs=8 " in content  # nproc
    assert "config_overrides" not in content


def test_real_memory_stays_below_memtotal_and_does_not_follow_every_mib() -> None:
    # slurmd drains a node reporting less than configured: a margin, in steps of 64 MiB.
    assert real_memory(24105) == 23360  # the lab's 24684084 kB
    assert real_memory(1) == 1
    # A kernel update takes 40 MiB: the value in the file still fits, it stays.
    assert real_memory(24105 - 40, current=23360) == 23360
    # Less memory than configured (a DIMM died): rewritten, or slurmd would drain the node.
    assert real_memory(23000, current=23360) == 22272
    # Much more memory (an upgrade): rewritten to use it.
    assert real_memory(48210, current=23360) == 46720


def test_a_kernel_update_that_shrinks_memtotal_changes_nothing() -> None:
    smaller = after("debian12-worker", "slurm").but(x_node_size="2\n24643124\n")  # -40 MiB
    hosts = {"master": facts(after("debian12-master", "slurm")), "worker1": facts(smaller)}
    assert plan("worker1", hosts).changes == ()


def test_master_without_compute_is_controller_only() -> None:
    inv = inventory(scheduler={"kind": "slurm"}, master={"compute": False})
    hosts = cluster(DEBIAN)
    master = plan("master", hosts, inv)
    content = file_of(master, CONF).content
    assert content is not None and "NodeName=master" not in content
    assert "SlurmctldHost=master(192.168.10.1)" in content
    installed = [p for c in master.changes if isinstance(c, PackagesChange) for p in c.packages]
    assert "slurmctld" in installed and "slurmd" not in installed
    assert not any(isinstance(c, ServiceChange) and c.unit == "slurmd.service"
                   for c in master.changes)


# --------------------------------------------------------------------------- sequence


def test_fresh_debian_master_installs_then_configures_then_starts() -> None:
    result = plan("master", cluster(DEBIAN))
    assert result.descriptions() == [
        "install munge slurm-client slurmctld slurmd",
        "generate the cluster's munge key",
        "enable munge.service",
        "restart munge.service",
        f"create {CONF}",
        "enable slurmctld.service",
        "restart slurmctld.service",
        "enable slurmd.service",
        "restart slurmd.service",
    ]
    # Debian's packages create the slurm user and its directories themselves.
    assert not any("useradd" in c.command for c in result.changes if isinstance(c, CommandChange))


def test_fresh_rhel_master_adds_epel_the_slurm_user_and_its_directories() -> None:
    result = plan("master", cluster(RHEL))
    assert result.descriptions()[:4] == [
        "install epel-release",
        "install munge slurm slurm-slurmctld slurm-slurmd",
        "create the system user slurm (slurmctld runs as it)",
        "generate the cluster's munge key",
    ]
    assert "make /var/spool/slurm/ctld (slurmctld's state) belong to slurm" in result.descriptions()
    assert "create /var/spool/slurm/d (slurmd's spool)" in result.descriptions()


def test_the_master_generates_the_key_on_the_host_and_never_sees_it_in_the_plan() -> None:
    generate = plan("master", cluster(DEBIAN)).changes[1]
    assert isinstance(generate, CommandChange)
    assert "/dev/urandom" in generate.command and "chmod 0400" in generate.command
    # By munge itself, in its own directory: root never writes through what is there.
    assert "hc_run_as munge sh -c " in generate.command and "chown" not in generate.command
    assert "mktemp /etc/munge/.munge.key.XXXXXX" in generate.command


def test_a_binary_key_from_the_package_is_replaced_once_by_a_text_key() -> None:
    binary = FileRecord(BINARY_KEY, 0o600, "munge", "munge", secret=True, account="munge")
    master = facts(fresh("debian12-master", "slurm").but(files={KEY: binary}))
    result = plan("master", cluster(DEBIAN, master=master))
    assert "replace the binary munge key with a new text key (homeclust copies keys as text)" \
        in result.descriptions()
    assert "restart munge.service" in result.descriptions()


def test_workers_get_the_masters_key_as_a_secret_file() -> None:
    hosts = cluster(DEBIAN)
    hosts["master"] = facts(after("debian12-master", "slurm"))
    result = plan("worker1", hosts)
    key = file_of(result, KEY)
    assert (key.content, key.mode, key.owner, key.group, key.secret) == (
        TEST_KEY, 0o400, "munge", "munge", True)
    assert TEST_KEY not in result.diff()
    assert TEST_KEY not in render_batch(result.changes, redact=True)
    assert hosts["master"].files[KEY].secret  # read as a secret: never logged
    # munged is restarted only if the key really changed on the host.
    restart = [c for c in result.changes if isinstance(c, ServiceChange)
               and c.unit == "munge.service" and c.action == "restart"]
    assert restart and restart[0].when_changed in ((), (KEY,))


def test_a_worker_whose_master_has_no_key_yet_fails_instead_of_inventing_one() -> None:
    result = plan("worker1", cluster(DEBIAN))
    install = [c for c in result.changes if isinstance(c, CommandChange) and "munge key" in
               c.description]
    assert install and install[0].description == (
        "install the master's munge key (once master has generated it)")
    assert install[0].command.endswith("false")


def test_a_changed_slurm_conf_restarts_the_daemons_that_read_it() -> None:
    worker = after("debian12-worker", "slurm")
    stale = golden_text("slurm/debian12/etc/slurm/slurm.conf").replace("CPUs=4", "CPUs=3")
    hosts = {"master": facts(after("debian12-master", "slurm")),
             "worker1": facts(worker.but(files={CONF: stale}))}
    result = plan("worker1", hosts)
    assert result.descriptions() == [
        f"update {CONF}", f"restart slurmd.service (if {CONF} changed)"]


# --------------------------------------------------------------------------- growing the cluster


def test_a_new_worker_lands_in_slurm_conf_on_every_node() -> None:
    inv3 = inventory(scheduler={"kind": "slurm"}, workers=[
        *[{"name": w.name, "private_address": str(w.private_address), "slots": 4}
          for w in INV_SLURM.workers],
        {"name": "worker3", "private_address": "192.168.10.4", "slots": 4}])
    hosts = {"master": facts(after("debian12-master", "slurm")),
             "worker1": facts(after("debian12-worker", "slurm")),
             "worker2": facts(after("debian12-worker", "slurm")),
             "worker3": facts(fresh("debian12-worker", "slurm"))}
    for node in ("master", "worker1", "worker2"):
        result = plan(node, hosts, inv3)
        conf = file_of(result, CONF)
        assert conf.content is not None
        assert "NodeName=worker3 NodeAddr=192.168.10.4 CPUs=4 RealMemory=23360" in conf.content
        daemon = "slurmctld.service" if node == "master" else "slurmd.service"
        assert f"restart {daemon} (if {CONF} changed)" in result.descriptions()


def test_nodes_without_facts_keep_their_lines_from_the_masters_file() -> None:
    # `up --host worker1`: worker2 was not asked; its line must not change.
    hosts = {"master": facts(after("debian12-master", "slurm")),
             "worker1": facts(after("debian12-worker", "slurm"))}
    result = plan("worker1", hosts)
    assert result.changes == ()


def test_a_new_node_without_facts_is_left_out_with_a_warning() -> None:
    inv3 = inventory(scheduler={"kind": "slurm"}, workers=[
        *[{"name": w.name, "private_address": str(w.private_address), "slots": 4}
          for w in INV_SLURM.workers],
        {"name": "worker3", "private_address": "192.168.10.4", "slots": 4}])
    hosts = {"master": facts(after("debian12-master", "slurm"))}
    result = plan("master", hosts, inv3)
    assert result.changes == ()
    assert any(w.startswith("worker3 is left out of slurm.conf") for w in result.warnings)


def test_the_file_homeclust_writes_can_be_read_back() -> None:
    known = parse_slurm_conf(golden_text("slurm/debian12/etc/slurm/slurm.conf"))
    assert known.nodes["worker2"].cpus == 4 and known.nodes["worker2"].real_memory == 23360
    assert known.proctrack == "proctrack/linuxproc" and known.config_overrides


# --------------------------------------------------------------------------- node states


def with_state(name: str, lines: str) -> HostFacts:
    return facts(after(name, "slurm").but(x_slurm_nodes=lines))


def test_a_node_slurm_downed_is_resumed_by_its_own_run() -> None:
    hosts = {"master": facts(after("debian12-master", "slurm")),
             "worker1": with_state("debian12-worker", "worker1|down*|slurm|Not responding\n")}
    result = plan("worker1", hosts)
    assert result.descriptions() == [
        "resume worker1 in Slurm (now down* (Not responding, set by slurm))"]
    command = result.changes[0]
    assert isinstance(command, CommandChange)
    assert "scontrol update nodename=worker1 state=resume" in command.command
    # ... and slurmd registers again at once, or the node stays "not responding" for minutes.
    assert "systemctl restart slurmd.service" in command.command


def test_a_node_an_administrator_drained_is_left_alone_and_check_says_so() -> None:
    worker = with_state("debian12-worker", "worker1|drained|root|broken fan\n")
    hosts = {"master": facts(after("debian12-master", "slurm")), "worker1": worker}
    assert plan("worker1", hosts).changes == ()
    ctx = PlanContext(INV_SLURM, INV_SLURM.node("worker1"), worker, hosts)
    [item] = STEP.posture(ctx)
    assert item.status == "fail" and "broken fan, set by root" in item.detail
    assert "state=resume" in item.hint


@pytest.mark.parametrize(("line", "status"), [
    ("worker1|idle|Unknown|none", "pass"),
    ("worker1|mixed|Unknown|none", "pass"),
    ("worker1|allocated|Unknown|none", "pass"),
    ("worker1|idle*|Unknown|none", "fail"),  # not responding
    ("worker1|down*|slurm|Not responding", "fail"),
    ("worker1|inval|slurm|Low RealMemory (reported:900 < 100.00% of configured:1000)", "fail"),
    ("worker2|idle|Unknown|none", "fail"),  # the controller does not list worker1
])
def test_check_reports_each_compute_node_state(line: str, status: str) -> None:
    worker = with_state("debian12-worker", line + "\n")
    ctx = PlanContext(INV_SLURM, INV_SLURM.node("worker1"), worker, {"worker1": worker})
    [item] = STEP.posture(ctx)
    assert (item.name, item.status) == ("slurm node", status)


def test_sinfo_output_is_parsed_once_per_node() -> None:
    states = parse_sinfo("master|idle|Unknown|none\nmaster|idle|Unknown|none\n"
                         "worker1|drained|slurm|Low RealMemory (reported:1|2)\n")
    assert set(states) == {"master", "worker1"}
    assert states["worker1"].reason == "Low RealMemory (reported:1|2)"
    assert states["worker1"].resumable


# --------------------------------------------------------------------------- check job


def test_check_submits_one_job_across_every_compute_node_as_the_cluster_user() -> None:
    inv = inventory(scheduler={"kind": "slurm"}, users=[{"name": "hpc"}])
    master = facts(after("debian12-master", "slurm"))
    [probe] = STEP.probes(PlanContext(inv, inv.node("master"), master, {"master": master}))
    assert "runuser -u hpc -- " in probe.script
    assert "--nodes=3 --ntasks-per-node=1 --nodelist=master,worker1,worker2" in probe.script
    assert probe.evaluate(0, "worker2\nmaster\nworker1\n").status == "pass"
    failed = probe.evaluate(1, "srun: error: Unable to allocate resources\n")
    assert failed.status == "fail" and "Unable to allocate" in failed.detail
    assert probe.evaluate(0, "master\nworker1\n").status == "fail"  # worker2 missing
    # Workers run no job of their own: one job, one line in check.
    worker = facts(after("debian12-worker", "slurm"))
    assert STEP.probes(PlanContext(inv, inv.node("worker1"), worker, {})) == []


def test_without_cluster_users_check_warns_instead_of_running_a_job() -> None:
    master = facts(after("debian12-master", "slurm"))
    ctx = PlanContext(INV_SLURM, INV_SLURM.node("master"), master, {"master": master})
    assert STEP.probes(ctx) == []
    assert [i.status for i in STEP.posture(ctx) if i.name == "slurm job"] == ["warn"]


# --------------------------------------------------------------------------- refusals


def test_mixed_platform_families_are_refused_before_anything_changes() -> None:
    hosts = {"master": facts(fresh("rocky9-master", "slurm")),
             "worker1": facts(fresh("debian12-worker", "slurm"))}
    ctx = PlanContext(INV_SLURM, INV_SLURM.node("worker1"), hosts["worker1"], hosts)
    with pytest.raises(StepError, match="one platform family on every node"):
        STEP.preflight(ctx)


def test_ubuntu_2004_slurm_is_too_old() -> None:
    focal = recorded("ubuntu2204-master").but(os_release=(
        'NAME="Ubuntu"\nVERSION_ID="20.04"\nID=ubuntu\nID_LIKE=debian\n'
        'PRETTY_NAME="Ubuntu 20.04.6 LTS"\n'))
    ctx = PlanContext(INV_SLURM, INV_SLURM.node("master"), facts(focal))
    with pytest.raises(StepError, match=r"older than 20\.11"):
        STEP.preflight(ctx)


def test_worker_packages_for_the_repo_step() -> None:
    # Not epel-release: workers get EPEL's packages from the master's repository.
    debian = platform_of(recorded("debian12-worker").facts())
    rocky = platform_of(recorded("rocky9-master").facts())
    assert STEP.worker_packages(INV_SLURM, debian) == ("munge", "slurm-client", "slurmd")
    assert STEP.worker_packages(INV_SLURM, rocky) == ("munge", "slurm", "slurm-slurmd")


def test_no_job_is_submitted_while_a_node_is_unavailable_check_says_why() -> None:
    inv = inventory(scheduler={"kind": "slurm"}, users=[{"name": "hpc"}])
    master = facts(after("debian12-master", "slurm").but(x_slurm_nodes=(
        "master|idle|Unknown|none\nworker1|drained|root|broken fan\nworker2|idle|Unknown|none\n")))
    ctx = PlanContext(inv, inv.node("master"), master, {"master": master})
    assert STEP.probes(ctx) == []  # srun would only wait for worker1
    [job] = [i for i in STEP.posture(ctx) if i.name == "slurm job"]
    assert job.status == "fail" and "(worker1)" in job.detail


@pytest.mark.parametrize("name", ["worker1 Weight=0", "worker1\nNodeName=evil", "../etc"])
def test_renderers_refuse_names_they_cannot_write(name: str) -> None:
    """Names go unquoted into slurm.conf and Torque's files: the host-name grammar only,
    even if the inventory's validation were bypassed."""
    from ipaddress import IPv4Address

    from homeclust.errors import HomeclustError
    from homeclust.render.slurm import SlurmConfig, SlurmNode, render_slurm_conf
    from homeclust.render.torque import render_mom_config, render_nodes

    config = SlurmConfig("c", "master", IPv4Address("192.168.10.1"),
                         (SlurmNode(name, IPv4Address("192.168.10.2"), 1, None),),
                         "proctrack/cgroup", False, "/s", "/d", "/p1", "/p2")
    with pytest.raises(HomeclustError):
        render_slurm_conf(config)
    with pytest.raises(HomeclustError):
        render_nodes([(name, 1)])
    with pytest.raises(HomeclustError):
        render_mom_config(name)
