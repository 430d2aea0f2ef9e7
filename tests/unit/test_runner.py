"""Runner semantics with a fake transport: order, parallelism, isolation, exit codes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from homeclust.changes import CommandChange
from homeclust.errors import StepError
from homeclust.inventory import Inventory, parse_inventory
from homeclust.runner import Runner
from homeclust.steps.base import PlanContext, StepPlan
from homeclust.transport import CommandResult
from tests.unit.fakes import Call, FakeCluster, FakeConnector, FakeHost, TouchStep


def inventory(workers: int = 3) -> Inventory:
    return parse_inventory({
        "master": {"name": "master", "address": "10.0.0.1", "private_address": "192.168.10.1"},
        "workers": [{"name": f"worker{i}", "private_address": f"192.168.10.{i + 1}"}
                    for i in range(1, workers + 1)],
    }, Path("test.toml"))


STEPS = [TouchStep("alpha"), TouchStep("beta", ("alpha",))]


def runner(cluster: FakeCluster, inv: Inventory | None = None, steps: list[TouchStep] | None = None,
           hosts: list[str] | None = None, forks: int = 10) -> Runner:
    inv = inv or inventory()
    return Runner(inv, steps or STEPS, inv.select(hosts), connector=FakeConnector(cluster),
                  forks=forks, sleep=lambda s: None)


def test_plan_sends_only_the_facts_script_and_exits_3_on_changes() -> None:
    cluster = FakeCluster()
    result = runner(cluster).plan()
    assert set(cluster.purposes()) == {"facts"}
    assert len(cluster.calls) == 4  # one round trip per host
    assert cluster.locks == []  # plan never takes the run lock
    assert result.exit_code() == 3
    assert {o.status for o in result.outcomes} == {"pending"}
    assert result.outcome("worker2", "beta").changes == ["touch /etc/beta.done"]  # type: ignore[union-attr]


def test_plan_on_converged_cluster_exits_0() -> None:
    cluster = FakeCluster(files={h: {"/etc/alpha.done": "", "/etc/beta.done": ""}
                                 for h in ("master", "worker1", "worker2", "worker3")})
    result = runner(cluster).plan()
    assert result.exit_code() == 0
    assert {o.status for o in result.outcomes} == {"unchanged"}


def test_up_applies_master_first_then_workers_and_verifies() -> None:
    cluster = FakeCluster()
    result = runner(cluster).apply()
    assert result.exit_code() == 0, result
    assert {o.status for o in result.outcomes} == {"changed"}
    applies = [c for c in cluster.calls if c.purpose.startswith("apply:")]
    master_done = max(c.end for c in applies if c.host == "master")
    assert all(c.start >= master_done for c in applies if c.host != "master")
    # Steps in dependency order on every host.
    for host in ("master", "worker1"):
        assert [c.purpose for c in applies if c.host == host] == ["apply:alpha", "apply:beta"]
    # Each applied step was verified by reading facts again.
    assert cluster.purposes("worker1").count("facts") == 3
    assert cluster.locks == ["master"] and cluster.lock_released == ["master"]
    # A second run changes nothing.
    before = len(cluster.calls)
    again = runner(cluster).apply()
    assert {o.status for o in again.outcomes} == {"unchanged"}
    assert [c.purpose for c in cluster.calls[before:]] == ["facts"] * 4


def test_workers_are_configured_in_parallel() -> None:
    barrier = threading.Barrier(3, timeout=5)
    def hook(host: str) -> None:
        if host != "master":
            barrier.wait()

    cluster = FakeCluster(apply_hook=hook)
    result = runner(cluster, steps=[TouchStep("alpha")]).apply()
    # With sequential workers the barrier would time out and break.
    assert not barrier.broken
    assert result.exit_code() == 0


def test_forks_bounds_parallelism() -> None:
    active = []
    peak = []
    lock = threading.Lock()

    def hook(host: str) -> None:
        if host == "master":
            return
        with lock:
            active.append(host)
            peak.append(len(active))
        threading.Event().wait(0.05)
        with lock:
            active.remove(host)

    cluster = FakeCluster(apply_hook=hook)
    runner(cluster, inventory(6), steps=[TouchStep("alpha")], forks=2).apply()
    assert max(peak) == 2


def test_unreachable_worker_is_reported_and_the_others_complete() -> None:
    cluster = FakeCluster(unreachable={"worker2"})
    result = runner(cluster).apply()
    assert result.exit_code() == 1
    assert "connection refused" in result.host_errors["worker2"]
    assert result.outcome("worker2", "alpha").status == "skipped"  # type: ignore[union-attr]
    for host in ("master", "worker1", "worker3"):
        assert result.outcome(host, "beta").status == "changed"  # type: ignore[union-attr]


def test_failed_step_skips_later_steps_on_that_host_only() -> None:
    cluster = FakeCluster(failing_commands={("worker1", "/etc/alpha.done")})
    result = runner(cluster).apply()
    assert result.exit_code() == 1
    alpha = result.outcome("worker1", "alpha")
    beta = result.outcome("worker1", "beta")
    assert alpha is not None and alpha.status == "failed" and "boom" in (alpha.error or "")
    assert beta is not None and beta.status == "skipped" and "alpha failed" in (beta.error or "")
    assert result.outcome("worker2", "beta").status == "changed"  # type: ignore[union-attr]


def test_failed_master_means_no_worker_is_touched() -> None:
    cluster = FakeCluster(failing_commands={("master", "/etc/alpha.done")})
    result = runner(cluster).apply()
    assert result.exit_code() == 1
    assert not [c for c in cluster.calls if c.host != "master" and c.purpose.startswith("apply")]
    skipped = result.outcome("worker3", "alpha")
    assert skipped is not None and "master failed at alpha" in (skipped.error or "")


def test_unreachable_master_fails_every_host_without_touching_any() -> None:
    cluster = FakeCluster(unreachable={"master"})
    result = runner(cluster).apply()
    assert result.exit_code() == 1
    assert set(result.host_errors) == {"master", "worker1", "worker2", "worker3"}
    assert cluster.calls == []


def test_step_that_does_not_converge_fails() -> None:
    cluster = FakeCluster(ignore_apply={"worker3"})
    result = runner(cluster, steps=[TouchStep("alpha")]).apply()
    outcome = result.outcome("worker3", "alpha")
    assert outcome is not None and outcome.status == "failed"
    assert "still differs" in (outcome.error or "")
    assert result.exit_code() == 1


def test_host_selection_still_connects_through_master() -> None:
    cluster = FakeCluster()
    result = runner(cluster, hosts=["worker2"]).apply()
    assert result.hosts == ["worker2"]
    assert {c.host for c in cluster.calls if c.purpose.startswith("apply")} == {"worker2"}
    assert cluster.purposes("master") == ["facts"]  # gateway + lock holder, not touched
    assert cluster.locks == ["master"]


def test_master_only_step_targets_only_master() -> None:
    cluster = FakeCluster()
    result = runner(cluster, steps=[TouchStep("solo", master_only=True)]).apply()
    assert [o.host for o in result.outcomes] == ["master"]


@pytest.mark.parametrize("failing", [True, False])
def test_check_reports_reachability_and_drift(failing: bool) -> None:
    files = {h: {"/etc/alpha.done": "", "/etc/beta.done": ""}
             for h in ("master", "worker1", "worker2", "worker3")}
    if failing:
        del files["worker1"]["/etc/beta.done"]
    cluster = FakeCluster(files=files)
    result = runner(cluster).check()
    assert set(cluster.purposes()) == {"facts"}
    names = {(c.host, c.name): c.status for c in result.checks}
    assert names[("master", "ssh from admin")] == "pass"
    assert names[("worker2", "ssh via master")] == "pass"
    assert names[("worker1", "beta in sync")] == ("fail" if failing else "pass")
    assert result.exit_code() == (1 if failing else 0)


class RefusingStep(TouchStep):
    """A step that cannot work on one host (like Torque on a platform without it)."""

    def preflight(self, ctx: PlanContext) -> None:
        if ctx.node.name == "worker2":
            raise StepError("worker2: gamma cannot work here")


def test_a_step_refused_on_one_host_stops_up_before_any_host_is_changed() -> None:
    cluster = FakeCluster()
    steps = [TouchStep("alpha"), RefusingStep("gamma", ("alpha",))]
    result = runner(cluster, steps=steps).apply()
    assert result.exit_code() == 1
    assert not [c for c in cluster.calls if c.purpose.startswith("apply:")]
    refused = result.outcome("worker2", "gamma")
    assert refused is not None and refused.status == "failed"
    assert refused.error == "worker2: gamma cannot work here"
    skipped = result.outcome("master", "alpha")
    assert skipped is not None and skipped.status == "skipped"
    assert skipped.error == "not attempted: gamma cannot be done on worker2 (nothing was changed)"
    assert len(result.outcomes) == 8  # every host x step accounted for


class SeedThenUseStep(TouchStep):
    """Plans its second file only once the first exists (a key generated on the host)."""

    def plan(self, ctx: PlanContext) -> StepPlan:
        seed, done = "/etc/seed", "/etc/uses-seed"
        if seed not in ctx.facts.files:
            make = CommandChange("make the seed", f"# fake-touch {seed}\ntouch {seed}")
            return StepPlan(self.name, ctx.node.name, (make,), incomplete="use the seed")
        if done in ctx.facts.files:
            return StepPlan(self.name, ctx.node.name)
        use = CommandChange("use the seed", f"# fake-touch {done}\ntouch {done}")
        return StepPlan(self.name, ctx.node.name, (use,))


def test_incomplete_plan_is_applied_then_planned_again_in_the_same_run() -> None:
    cluster = FakeCluster()
    steps = [SeedThenUseStep("seeded")]
    planned = runner(cluster, steps=steps).plan()  # type: ignore[arg-type]
    assert planned.outcome("master", "seeded").changes == [  # type: ignore[union-attr]
        "make the seed", "then: use the seed"]
    result = runner(cluster, steps=steps).apply()  # type: ignore[arg-type]
    assert result.exit_code() == 0, result
    outcome = result.outcome("worker1", "seeded")
    assert outcome is not None and outcome.changes == ["make the seed", "use the seed"]
    assert set(cluster.files["worker1"]) == {"/etc/seed", "/etc/uses-seed"}
    again = runner(cluster, steps=steps).apply()  # type: ignore[arg-type]
    assert {o.status for o in again.outcomes} == {"unchanged"}


def test_a_plan_still_incomplete_after_its_changes_fails_the_step() -> None:
    cluster = FakeCluster(ignore_apply={"worker1"})  # applies, but nothing appears
    result = runner(cluster, steps=[SeedThenUseStep("seeded")]).apply()  # type: ignore[list-item]
    outcome = result.outcome("worker1", "seeded")
    assert outcome is not None and outcome.status == "failed"
    assert "still cannot plan the rest: use the seed" in (outcome.error or "")
    assert result.outcome("worker2", "seeded").status == "changed"  # type: ignore[union-attr]


class RecordingStep(TouchStep):
    """Remembers which steps each plan was told were asked for by name."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.seen: list[frozenset[str]] = []

    def plan(self, ctx: PlanContext) -> StepPlan:
        self.seen.append(ctx.requested)
        return super().plan(ctx)


def test_steps_named_with_only_are_told_so_in_up_and_plan_but_never_in_check() -> None:
    inv = inventory(1)
    for mode in ("plan", "apply", "check"):
        step = RecordingStep("alpha")
        cluster = FakeCluster()
        run = Runner(inv, [step], inv.select(None), connector=FakeConnector(cluster),
                     sleep=lambda s: None, requested=frozenset({"alpha"}))
        getattr(run, mode)()
        expected = frozenset() if mode == "check" else frozenset({"alpha"})
        assert step.seen and set(step.seen) == {expected}, mode


# --------------------------------------------------------------------------- left-over transactions

CONVERGED = {h: {"/etc/alpha.done": "", "/etc/beta.done": ""}
             for h in ("master", "worker1", "worker2", "worker3")}


def test_plan_and_check_never_call_a_host_with_a_pending_rollback_in_sync() -> None:
    """Hole 5: an interrupted run's armed change will still change the host when its
    timer fires; until then the host is not in sync, and plan/check say so."""
    cluster = FakeCluster(files=CONVERGED, transactions={
        "worker2": "beta-20261126061500-ab12cd\tarmed\t1795673800\t1795673788\n"})
    planned = runner(cluster).plan()
    outcome = planned.outcome("worker2", "beta")
    assert outcome is not None and outcome.status == "pending"
    assert "rolls it back by itself in 12 s" in outcome.changes[0]
    assert planned.exit_code() == 3
    assert any(host == "worker2" and "interrupted run" in text
               for host, text in planned.notices)
    checked = runner(cluster).check()
    assert {(c.host, c.name): c.status for c in checked.checks}[("worker2", "beta in sync")] \
        == "fail"
    assert set(cluster.purposes()) == {"facts"}  # read-only: nothing was resolved


def test_up_resolves_what_an_interrupted_run_left_before_planning() -> None:
    cluster = FakeCluster(files=CONVERGED, transactions={
        "worker2": "beta-20261126061500-ab12cd\tarmed\t1795673800\t1795673788\n",
        "worker3": "alpha-20261126061000-ef34ab\trolledback\t\t1795673788\n"})

    original = FakeHost.run

    def answer(self: FakeHost, script: str, *, timeout: float | None = None,
               interruptible: bool = True) -> CommandResult:
        purpose = script.splitlines()[0].removeprefix("# homeclust:")
        if purpose == "txn-status":
            with cluster._lock:
                cluster.calls.append(Call(self.node.name, purpose, time.monotonic()))
            return CommandResult(0, "rolledback\n", "", 0.0)
        if purpose in ("rollback", "txn-archive"):
            with cluster._lock:
                cluster.calls.append(Call(self.node.name, purpose, time.monotonic()))
                cluster.transactions.pop(self.node.name, None)
            return CommandResult(0, "started\n", "", 0.0)
        return original(self, script, timeout=timeout, interruptible=interruptible)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FakeHost, "run", answer)
        result = runner(cluster).apply()
    assert result.exit_code() == 0, result
    assert cluster.purposes("worker2")[:4] == ["facts", "rollback", "txn-status", "txn-archive"]
    assert cluster.purposes("worker3")[:2] == ["facts", "txn-archive"]
    notices = dict(result.notices)
    assert "rolled back the unconfirmed change beta-" in notices["worker2"]
    assert "was not confirmed and was rolled back" in notices["worker3"]
    assert {o.status for o in result.outcomes} == {"unchanged"}
