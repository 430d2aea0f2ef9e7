"""The torque step planned from recorded RHEL facts (Rocky 9, CentOS 7): rendered files and
server set-up (golden), the whole install and set-up sequence, and the refusal on Debian."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from homeclust.changes import CommandChange, FileChange, PackagesChange
from homeclust.errors import StepError
from homeclust.facts import HostFacts
from homeclust.inventory import Inventory
from homeclust.platforms import platform_of
from homeclust.render.torque import (
    missing_setup,
    parse_print_server,
    render_mom_config,
    render_nodes,
    render_server_name,
    server_setup,
)
from homeclust.runner import Runner
from homeclust.steps.base import PlanContext, StepPlan
from homeclust.steps.torque import TorqueStep, parse_pbsnodes, parse_server_state
from tests.unit.factsbuilder import check_golden, inventory, recorded
from tests.unit.fakes import FakeCluster, FakeConnector, TouchStep
from tests.unit.schedulerfacts import INV_TORQUE, after, facts, fixture_sections, fresh

STEP = TorqueStep()
RHEL = {"master": "rocky9-master", "worker1": "centos7-worker", "worker2": "centos7-worker"}


def cluster(**overrides: HostFacts) -> dict[str, HostFacts]:
    hosts = {node: facts(fresh(name, "torque")) for node, name in RHEL.items()}
    hosts.update(overrides)
    return hosts


def plan(node: str, hosts: Mapping[str, HostFacts], inv: Inventory = INV_TORQUE) -> StepPlan:
    return STEP.plan(PlanContext(inv, inv.node(node), hosts[node], dict(hosts)))


def listing(result: StepPlan) -> str:
    """The plan as a reviewer reads it: every change in order, with its shell command or
    its file's mode, owner and content (secret contents left out)."""
    out = []
    for change in result.changes:
        out.append(f"- {change.description}\n")
        if isinstance(change, (CommandChange, PackagesChange)):
            out.append(f"    $ {change.command}\n")
        elif isinstance(change, FileChange):
            out.append(f"    mode {change.mode:o} {change.owner}:{change.group}\n")
            if not change.secret and change.content is not None:
                out += [f"    | {line}\n" for line in change.content.splitlines()]
    return "".join(out)


# --------------------------------------------------------------------------- rendered files


def test_torque_files_are_rendered_from_the_inventory() -> None:
    check_golden("torque/etc/torque/server_name", render_server_name("master"))
    check_golden("torque/etc/torque/mom/config", render_mom_config("master"))
    check_golden("torque/var/lib/torque/server_priv/nodes",
                 render_nodes([("master", 4), ("worker1", 4), ("worker2", 4)]))
    check_golden("torque/qmgr-setup.txt", "".join(c + "\n" for c in server_setup("master")))


def test_the_plan_writes_the_files_the_golden_tests_show() -> None:
    master = plan("master", cluster())
    files = {c.path: c.content for c in master.changes if isinstance(c, FileChange)}
    assert files["/var/lib/torque/server_priv/nodes"] == "master np=4\nworker1 np=4\nworker2 np=4\n"
    assert files["/etc/torque/server_name"] == "master\n"
    assert files["/etc/torque/mom/config"] == render_mom_config("master")


def test_np_comes_from_the_facts_when_slots_are_not_given() -> None:
    inv = inventory(workers=[{"name": "worker1", "private_address": "192.168.10.2"},
                             {"name": "worker2", "private_address": "192.168.10.3"}])
    files = {c.path: c.content for c in plan("master", cluster(), inv).changes
             if isinstance(c, FileChange)}
    assert files["/var/lib/torque/server_priv/nodes"] == "master np=4\nworker1 np=8\nworker2 np=8\n"


# --------------------------------------------------------------------------- sequences


@pytest.mark.parametrize(("name", "node", "golden"), [
    ("rocky9-master", "master", "plan-rocky9-master.txt"),
    ("centos7-worker", "worker2", "plan-centos7-worker.txt"),
    # Each release in the other role: a CentOS 7 server (yum), a Rocky 9 mom (dnf).
    ("centos7-worker", "master", "plan-centos7-as-master.txt"),
    ("rocky9-master", "worker2", "plan-rocky9-as-worker.txt"),
])
def test_fresh_rhel_hosts_plan_the_whole_install_and_set_up(name: str, node: str,
                                                            golden: str) -> None:
    hosts = cluster(**{node: facts(fresh(name, "torque"))})
    if node != "master":
        hosts["master"] = facts(after("rocky9-master", "torque"))
    check_golden(f"torque/{golden}", listing(plan(node, hosts)))


def test_the_server_database_is_created_once_without_a_question() -> None:
    create = [c for c in plan("master", cluster()).changes if isinstance(c, CommandChange)
              and "database" in c.description]
    assert len(create) == 1
    assert "pbs_server -t create </dev/null" in create[0].command
    assert "qterm" in create[0].command  # systemd owns the server afterwards
    # Once the database exists, never again (it would wipe queues and jobs).
    assert not any("database" in d for d in plan(
        "master", {"master": facts(after("rocky9-master", "torque"))}).descriptions())


def test_only_missing_server_settings_are_sent() -> None:
    printed = fixture_sections("rocky9-master", "torque")["x-torque-server"]
    half = "\n".join(line for line in printed.splitlines()
                     if "started" not in line and "allow_node_submit" not in line)
    master = facts(after("rocky9-master", "torque").but(x_torque_server=half))
    result = plan("master", {"master": master})
    assert result.descriptions() == [
        "configure pbs_server: set server allow_node_submit = True; "
        "set queue batch started = True"]


def test_a_server_that_does_not_answer_is_a_warning_not_a_reconfiguration() -> None:
    silent = facts(after("rocky9-master", "torque").but(x_torque_server="#homeclust:serverdb\n"))
    result = plan("master", {"master": silent})
    assert result.changes == ()
    assert any("did not answer" in w for w in result.warnings)


def test_print_server_is_read_as_qmgr_prints_it() -> None:
    state = parse_server_state(fixture_sections("rocky9-master", "torque")["x-torque-server"])
    assert state.database and state.config is not None
    assert missing_setup(server_setup("master"), state.config) == []
    lists = parse_print_server("set server managers = root@master\n"
                               "set server managers += admin@master\n")
    assert missing_setup(["set server managers += root@master"], lists) == []
    assert missing_setup(["set server managers += other@master"], lists) == [
        "set server managers += other@master"]
    assert missing_setup(["create queue batch"], lists) == ["create queue batch"]


def test_nodes_without_facts_keep_their_np_from_the_masters_file() -> None:
    master = after("rocky9-master", "torque")
    result = plan("master", {"master": facts(master)})
    assert result.changes == ()


# --------------------------------------------------------------------------- firewall


@pytest.mark.parametrize("node", ["master", "worker1"])
def test_scheduler_ports_are_open_on_the_private_side_only_without_any_new_rule(node: str) -> None:
    """Torque (15001-15004), Slurm (6817-6818, srun's replies) and munge need nothing from the
    firewall step: it accepts the whole private network on the private interface, and on the
    public side only SSH (the master's public_tcp_ports)."""
    from homeclust.render.iptables import chain_policy, chain_rules, render_filter_table

    inv = INV_TORQUE
    table = render_filter_table(inv, inv.node(node))
    private = inv.node(node).private_interface
    assert chain_policy(table, "INPUT") == "DROP"
    assert f"-A INPUT -s 192.168.10.0/24 -i {private} -j ACCEPT" in chain_rules(table, "INPUT")
    public_accepts = [r for r in chain_rules(table, "INPUT") if "-j ACCEPT" in r
                      and "--dport" in r]
    assert all("--dport 22 " in r + " " for r in public_accepts), public_accepts
    assert bool(public_accepts) == (node == "master")  # the master's public SSH, nothing else


# --------------------------------------------------------------------------- Debian: refused


def test_torque_on_debian_names_the_platform_and_the_way_out() -> None:
    ctx = PlanContext(INV_TORQUE, INV_TORQUE.node("master"), facts(recorded("debian12-master")))
    with pytest.raises(StepError) as raised:
        STEP.plan(ctx)
    message = raised.value.message
    assert "Debian GNU/Linux 12 (bookworm)" in message and "debian12" in message
    assert 'set [scheduler] kind = "slurm"' in message


def test_up_with_torque_on_debian_changes_nothing_anywhere_and_exits_1() -> None:
    inv = inventory()  # kind = "torque" (the default); the fake hosts run Debian 12
    cluster_ = FakeCluster()
    steps = [TouchStep("network"), STEP]
    result = Runner(inv, steps, inv.nodes, connector=FakeConnector(cluster_),
                    sleep=lambda s: None).apply()
    assert result.exit_code() == 1
    assert not [c for c in cluster_.calls if c.purpose.startswith("apply:")]
    assert cluster_.files == {"master": {}, "worker1": {}, "worker2": {}}
    torque = result.outcome("master", "torque")
    assert torque is not None and torque.status == "failed"
    assert 'kind = "slurm"' in (torque.error or "")
    network = result.outcome("worker1", "network")
    assert network is not None and network.status == "skipped"
    assert "nothing was changed" in (network.error or "")


# --------------------------------------------------------------------------- check


@pytest.mark.parametrize(("state", "status"), [
    ("free", "pass"), ("job-exclusive", "pass"), ("down", "fail"), ("offline", "fail"),
    ("down,offline", "fail"),
])
def test_check_reports_each_compute_node_state(state: str, status: str) -> None:
    text = f"worker2\n     state = {state}\n     np = 4\n"
    worker = facts(after("centos7-worker", "torque").but(x_torque_nodes=text))
    ctx = PlanContext(INV_TORQUE, INV_TORQUE.node("worker2"), worker, {})
    [item] = STEP.posture(ctx)
    assert (item.name, item.status) == ("torque node", status)


def test_pbsnodes_output_is_parsed() -> None:
    nodes = parse_pbsnodes(fixture_sections("rocky9-master", "torque")["x-torque-nodes"])
    assert nodes == {"master": "free", "worker1": "free", "worker2": "free"}


def test_check_job_runs_one_task_per_node_as_the_cluster_user() -> None:
    inv = inventory(users=[{"name": "hpc"}])
    master = facts(after("rocky9-master", "torque"))
    [probe] = STEP.probes(PlanContext(inv, inv.node("master"), master, {}))
    assert "runuser -u hpc -- sh -c" in probe.script
    assert "nodes=3:ppn=1" in probe.script and "pbsdsh -u hostname" in probe.script
    assert probe.evaluate(0, "worker1\nmaster\nworker2\n").status == "pass"
    assert probe.evaluate(0, "master\n").status == "fail"


def test_worker_packages_for_the_repo_step() -> None:
    # Not epel-release: workers get EPEL's packages from the master's repository.
    rocky = platform_of(recorded("rocky9-master").facts())
    debian = platform_of(recorded("debian12-worker").facts())
    assert STEP.worker_packages(INV_TORQUE, rocky) == ("munge", "torque-client", "torque-mom")
    assert STEP.worker_packages(INV_TORQUE, debian) == ()


def test_no_job_is_submitted_while_a_node_is_down() -> None:
    inv = inventory(users=[{"name": "hpc"}])
    text = "master\n     state = free\nworker1\n     state = down\nworker2\n     state = free\n"
    master = facts(after("rocky9-master", "torque").but(x_torque_nodes=text))
    ctx = PlanContext(inv, inv.node("master"), master, {})
    assert STEP.probes(ctx) == []
    [job] = [i for i in STEP.posture(ctx) if i.name == "torque job"]
    assert job.status == "fail" and "(worker1)" in job.detail
