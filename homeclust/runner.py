"""The runner: connect, gather facts, plan, apply, verify, report.

* The master is connected first (it is every worker's gateway); ``up`` then
  takes the cluster lock on it, so two runs never interleave.
* Facts: one round trip per host; workers are connected and read in parallel
  (bounded by ``--forks``) over the master's connection.
* ``plan`` (and ``up --dry-run``) stops after planning: nothing but the
  read-only facts script is ever sent.
* ``up`` runs every step on the master, then on the workers in parallel.  A
  failed worker does not stop the others; its later steps are skipped and
  named.  Without a working master, no worker is touched.
* Each applied step is verified: facts are read again and the step is planned
  again; a step whose plan is still not empty did not converge and fails.
* Steps that can cut the admin off carry a guard and go through
  :mod:`homeclust.safety` (armed rollback, confirmation over a new connection).
* ``check`` plans too: an empty plan is "in sync", anything else is drift; then
  each step's posture checks and behaviour probes run.
"""

from __future__ import annotations

import getpass
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Protocol

from homeclust import safety
from homeclust.changes import parse_batch_output, render_batch
from homeclust.errors import FactError, HomeclustError, StepError
from homeclust.facts import HostFacts, gather_script, parse_facts
from homeclust.inventory import Inventory, Node
from homeclust.platforms import ALL_NETWORK_FACT_PATHS, platform_of
from homeclust.runlog import RunLog
from homeclust.steps import REGISTRY
from homeclust.steps.base import CheckItem, PlanContext, Step, StepPlan
from homeclust.transport import CommandResult, Connector, Host, LockHandle

Mode = Literal["apply", "plan", "check", "facts"]
StepStatus = Literal["unchanged", "changed", "pending", "failed", "skipped"]

LOCK_PATH = "/run/homeclust.lock"
FACTS_TIMEOUT = 120.0


@dataclass
class StepOutcome:
    host: str
    step: str
    status: StepStatus
    changes: list[str] = field(default_factory=list)
    diff: str = ""
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    duration: float = 0.0


@dataclass
class RunResult:
    mode: Mode
    hosts: list[str]
    steps: list[str]
    outcomes: list[StepOutcome] = field(default_factory=list)
    host_errors: dict[str, str] = field(default_factory=dict)
    checks: list[CheckItem] = field(default_factory=list)
    log_path: str | None = None
    duration: float = 0.0

    def outcome(self, host: str, step: str) -> StepOutcome | None:
        for outcome in self.outcomes:
            if outcome.host == host and outcome.step == step:
                return outcome
        return None

    @property
    def failed(self) -> bool:
        return bool(self.host_errors) or any(o.status == "failed" for o in self.outcomes) or any(
            c.status == "fail" for c in self.checks
        )

    @property
    def pending(self) -> bool:
        return any(o.status == "pending" for o in self.outcomes)

    def exit_code(self) -> int:
        """0 ok; 1 a host, step or check failed; 3 ``plan`` found changes."""
        if self.failed:
            return 1
        if self.mode == "plan" and self.pending:
            return 3
        return 0


class Reporter(Protocol):
    def start(self, hosts: Sequence[str], steps: Sequence[str], mode: Mode) -> None: ...

    def host_status(self, host: str, text: str) -> None: ...

    def step_status(self, host: str, step: str, status: str) -> None: ...

    def message(self, text: str) -> None: ...

    def finish(self, result: RunResult) -> None: ...


class NullReporter:
    def start(self, hosts: Sequence[str], steps: Sequence[str], mode: Mode) -> None:
        pass

    def host_status(self, host: str, text: str) -> None:
        pass

    def step_status(self, host: str, step: str, status: str) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def finish(self, result: RunResult) -> None:
        pass


def fact_paths() -> tuple[str, ...]:
    """Every file any registered step reads, plus every network config location."""
    paths = set(ALL_NETWORK_FACT_PATHS)
    for step in REGISTRY.values():
        paths.update(step.fact_paths)
    return tuple(sorted(paths))


class Runner:
    def __init__(
        self,
        inventory: Inventory,
        steps: Sequence[Step],
        nodes: Sequence[Node],
        *,
        connector: Connector,
        reporter: Reporter | None = None,
        runlog: RunLog | None = None,
        forks: int = 10,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.inventory = inventory
        self.steps = list(steps)
        self.nodes = list(nodes)
        self.connector = connector
        self.reporter = reporter or NullReporter()
        self.runlog = runlog or RunLog(None)
        self.forks = max(1, forks)
        self.sleep = sleep
        self.facts: dict[str, HostFacts] = {}
        self._facts_lock = threading.Lock()
        self._paths = fact_paths()

    # ------------------------------------------------------------------ plumbing

    def run_script(self, host: Host, purpose: str, script: str,
                   timeout: float | None = None) -> CommandResult:
        """Run a tagged script on ``host`` and log it (the tag names its purpose)."""
        tagged = f"# homeclust:{purpose}\n{script}"
        try:
            result = host.run(tagged, timeout=timeout)
        except HomeclustError as exc:
            self.runlog.command(host.node.name, purpose, tagged, None, error=str(exc))
            raise
        self.runlog.command(host.node.name, purpose, tagged, result)
        return result

    def gather(self, host: Host) -> HostFacts:
        result = self.run_script(host, "facts", gather_script(self._paths), FACTS_TIMEOUT)
        if result.exit_code != 0:
            raise FactError(
                f"{host.node.name}: the facts script failed (exit {result.exit_code}): "
                f"{result.stderr.strip() or result.stdout.strip()[-500:]}"
            )
        facts = parse_facts(result.stdout)
        platform_of(facts)  # unsupported systems fail here, before any step plans
        with self._facts_lock:
            self.facts[host.node.name] = facts
        return facts

    def context(self, node: Node) -> PlanContext:
        with self._facts_lock:
            return PlanContext(self.inventory, node, self.facts[node.name], dict(self.facts))

    def steps_for(self, node: Node) -> list[Step]:
        return [s for s in self.steps if s.targets(self.inventory, node)]

    @property
    def targeted_master(self) -> bool:
        return any(n.is_master for n in self.nodes)

    @property
    def workers(self) -> list[Node]:
        return [n for n in self.nodes if not n.is_master]

    # ------------------------------------------------------------------ entry points

    def plan(self) -> RunResult:
        return self._run("plan")

    def apply(self) -> RunResult:
        return self._run("apply")

    def check(self) -> RunResult:
        return self._run("check")

    def gather_all(self) -> RunResult:
        """Only connect and read facts (``homeclust facts``); see ``self.facts``."""
        return self._run("facts")

    def _run(self, mode: Mode) -> RunResult:
        started = time.monotonic()
        result = RunResult(mode, [n.name for n in self.nodes], [s.name for s in self.steps],
                           log_path=str(self.runlog.path) if self.runlog.path else None)
        self.reporter.start(result.hosts, result.steps, mode)
        self.runlog.event("run-start", mode=mode, hosts=result.hosts, steps=result.steps,
                          inventory=str(self.inventory.path))
        lock: LockHandle | None = None
        try:
            master_node = self.inventory.master_node
            try:
                self.reporter.host_status(master_node.name, "connecting")
                master = self.connector.open(master_node)
                if mode == "check":
                    result.checks.append(CheckItem(master_node.name, "ssh from admin", "pass",
                                                   f"{self.inventory.master.address}"))
                if mode == "apply":
                    lock = master.hold_lock(LOCK_PATH, _lock_owner())
                self.reporter.host_status(master_node.name, "reading facts")
                self.gather(master)
                self.reporter.host_status(master_node.name, "ready")
            except HomeclustError as exc:
                self._fail_all(result, f"master {master_node.name}: {exc}")
                if mode == "check":
                    result.checks.append(CheckItem(
                        master_node.name, "ssh from admin", "fail", exc.message,
                        exc.hint or "is the master up and `[master] address` right?"))
                return result

            self._gather_workers(result, mode)
            if mode == "facts":
                return result

            if mode in ("plan", "check"):
                for node in self.nodes:
                    if node.name in result.host_errors:
                        continue
                    self._plan_host(node, result, mode)
                if mode == "check":
                    self._probe_all(result)
                return result

            if self.targeted_master:
                lock = self._pipeline(master_node, result, lock)
            master_failure = next(
                (o for o in result.outcomes if o.host == master_node.name and o.status == "failed"),
                None,
            )
            pending_workers = [w for w in self.workers if w.name not in result.host_errors]
            if master_failure is not None:
                for worker in pending_workers:
                    for step in self.steps_for(worker):
                        self._record(result, StepOutcome(
                            worker.name, step.name, "skipped",
                            error=f"not attempted: master failed at {master_failure.step}"))
                return result
            with ThreadPoolExecutor(max_workers=self.forks) as pool:
                list(pool.map(lambda w: self._pipeline(w, result, None), pending_workers))
            return result
        finally:
            if lock is not None:
                lock.release()
            result.duration = time.monotonic() - started
            self.runlog.event("run-end", exit_code=result.exit_code(),
                              duration=round(result.duration, 3))
            self.reporter.finish(result)

    # ------------------------------------------------------------------ phases

    def _fail_all(self, result: RunResult, message: str) -> None:
        for node in self.nodes:
            self._host_error(result, node, message)

    def _host_error(self, result: RunResult, node: Node, message: str) -> None:
        result.host_errors[node.name] = message
        self.reporter.host_status(node.name, f"failed: {message}")
        self.runlog.event("host-error", host=node.name, error=message)
        for step in self.steps_for(node):
            self._record(result, StepOutcome(node.name, step.name, "skipped",
                                             error=f"not attempted: {message}"))

    def _gather_workers(self, result: RunResult, mode: Mode) -> None:
        def one(node: Node) -> None:
            try:
                self.reporter.host_status(node.name, "connecting")
                host = self.connector.open(node)
                if mode == "check":
                    result.checks.append(CheckItem(
                        node.name, f"ssh via {self.inventory.master.name}", "pass",
                        str(node.private_address)))
                self.reporter.host_status(node.name, "reading facts")
                self.gather(host)
                self.reporter.host_status(node.name, "ready")
            except HomeclustError as exc:
                self._host_error(result, node, str(exc))
                if mode == "check":
                    result.checks.append(CheckItem(
                        node.name, f"ssh via {self.inventory.master.name}", "fail", exc.message,
                        exc.hint or ""))

        with ThreadPoolExecutor(max_workers=self.forks) as pool:
            list(pool.map(one, self.workers))

    def _record(self, result: RunResult, outcome: StepOutcome) -> None:
        with self._facts_lock:
            result.outcomes.append(outcome)
        self.reporter.step_status(outcome.host, outcome.step, outcome.status)
        self.runlog.event("step", host=outcome.host, step=outcome.step, status=outcome.status,
                          changes=outcome.changes, warnings=outcome.warnings, error=outcome.error,
                          diff=outcome.diff, duration=round(outcome.duration, 3))

    def _plan_step(self, step: Step, node: Node) -> StepPlan:
        return step.plan(self.context(node))

    def _plan_host(self, node: Node, result: RunResult, mode: Mode) -> None:
        for step in self.steps_for(node):
            started = time.monotonic()
            try:
                plan = self._plan_step(step, node)
            except HomeclustError as exc:
                self._record(result, StepOutcome(node.name, step.name, "failed", error=str(exc)))
                if mode == "check":
                    result.checks.append(CheckItem(node.name, step.name, "fail", exc.message,
                                                   exc.hint or ""))
                continue
            status: StepStatus = "pending" if plan.has_changes else "unchanged"
            self._record(result, StepOutcome(
                node.name, step.name, status, plan.descriptions(), plan.diff(),
                list(plan.warnings), duration=time.monotonic() - started))
            if mode == "check":
                ctx = self.context(node)
                if plan.has_changes:
                    result.checks.append(CheckItem(
                        node.name, f"{step.name} in sync", "fail",
                        "drift: " + "; ".join(plan.descriptions()),
                        f"see the diff with `homeclust plan --only {step.name} --host {node.name}`;"
                        f" fix with `homeclust up --only {step.name} --host {node.name}`"))
                else:
                    result.checks.append(CheckItem(node.name, f"{step.name} in sync", "pass"))
                for warning in plan.warnings:
                    result.checks.append(CheckItem(node.name, step.name, "warn", warning))
                result.checks.extend(step.posture(ctx))

    def _probe_all(self, result: RunResult) -> None:
        def one(node: Node) -> None:
            if node.name in result.host_errors:
                return
            try:
                host = self.connector.open(node)
            except HomeclustError as exc:
                result.checks.append(CheckItem(node.name, "probes", "fail", exc.message))
                return
            ctx = self.context(node)
            # Every selected step, not only those targeting the node: the nat step
            # runs on the master, but its proof (egress) is on every worker.
            for step in self.steps:
                for probe in step.probes(ctx):
                    try:
                        out = self.run_script(host, f"probe:{probe.name}", probe.script,
                                              probe.timeout)
                        item = probe.evaluate(out.exit_code, out.stdout)
                    except HomeclustError as exc:
                        item = CheckItem(node.name, probe.name, "fail", exc.message)
                    with self._facts_lock:
                        result.checks.append(item)

        with ThreadPoolExecutor(max_workers=self.forks) as pool:
            list(pool.map(one, self.nodes))

    def _pipeline(self, node: Node, result: RunResult, lock: LockHandle | None
                  ) -> LockHandle | None:
        """Apply every step to one host, in order; stop at the first failure."""
        failed_at: str | None = None
        for step in self.steps_for(node):
            if failed_at is not None:
                self._record(result, StepOutcome(node.name, step.name, "skipped",
                                                 error=f"not attempted: {failed_at} failed"))
                continue
            self.reporter.step_status(node.name, step.name, "running")
            started = time.monotonic()
            try:
                outcome, lock = self._apply_step(step, node, lock)
            except HomeclustError as exc:
                outcome = StepOutcome(node.name, step.name, "failed", error=str(exc))
            outcome.duration = time.monotonic() - started
            self._record(result, outcome)
            if outcome.status == "failed":
                failed_at = step.name
        self.reporter.host_status(node.name, "failed" if failed_at else "done")
        return lock

    def _apply_step(self, step: Step, node: Node, lock: LockHandle | None
                    ) -> tuple[StepOutcome, LockHandle | None]:
        plan = self._plan_step(step, node)
        if not plan.has_changes:
            return StepOutcome(node.name, step.name, "unchanged", warnings=list(plan.warnings)), lock
        host = self.connector.open(node)
        warnings = list(plan.warnings)
        if plan.guard is not None:
            txn_id = safety.new_txn_id(step.name)
            guarded = safety.apply_guarded(
                host=host, node=node, connector=self.connector,
                run=lambda h, purpose, script, timeout: self.run_script(h, purpose, script, timeout),
                txn_id=txn_id, changes=plan.changes, guard=plan.guard,
                verify=lambda fresh: self._verify(step, node, fresh),
                sleep=self.sleep,
            )
            output = guarded.outcomes_output
            if node.is_master and lock is not None:
                # The old connection (and the lock it held) was replaced.
                lock.release()
                lock = guarded.host.hold_lock(LOCK_PATH, _lock_owner())
        else:
            batch = render_batch(plan.changes)
            applied = self.run_script(host, f"apply:{step.name}", batch)
            output = applied.stdout
            if applied.exit_code != 0:
                failed = [
                    (plan.changes[o.index].description, o.output)
                    for o in parse_batch_output(applied.stdout, len(plan.changes))
                    if o.status == "failed"
                ]
                what = failed[0] if failed else ("the batch", applied.stdout[-800:])
                raise StepError(f"{node.name}: {step.name}: {what[0]} failed:\n{what[1].strip()}")
            remaining = self._verify(step, node, host)
            if remaining:
                raise StepError(
                    f"{node.name}: {step.name} applied but the host still differs: "
                    + "; ".join(remaining),
                    hint="the run log has every command and its output",
                )
        for outcome in parse_batch_output(output, len(plan.changes)):
            if outcome.status == "warned":
                warnings.append(outcome.output.splitlines()[-1] if outcome.output else "warning")
        return StepOutcome(node.name, step.name, "changed", plan.descriptions(), plan.diff(),
                           warnings), lock

    def _verify(self, step: Step, node: Node, host: Host) -> list[str]:
        """Read the facts again and re-plan: what is left is what did not converge."""
        self.gather(host)
        again = self._plan_step(step, node)
        return again.descriptions()


def _lock_owner() -> str:
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()} pid {os.getpid()} since {time.ctime()}"
