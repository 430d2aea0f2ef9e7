"""The runner: connect, gather facts, plan, apply, verify, report.

A run goes through these phases, each a method of its own:

1. **connect the master** (every worker's gateway); ``up`` takes the cluster
   lock on it for the whole run, so two runs never interleave;
2. **gather** facts: one round trip per host, workers in parallel (bounded by
   ``--forks``) over the master's connection, asking only what the run's
   steps need (:class:`~homeclust.facts.FactQuery`);
3. **pending transactions** left on a host by an interrupted run: ``up``
   resolves them (rolls back what was never confirmed, waits for rollbacks
   under way) before planning; ``plan``/``check`` report them and never call
   such a host "in sync";
4. **plan** every step (``plan``/``check`` stop here: nothing but the
   read-only facts script is ever sent), or
5. **apply**: every step on the master, then on the workers in parallel.  A
   step's unguarded changes run first as one batch; if the step also has
   guarded changes, the facts are read again and the step re-planned -- the
   guarded part that is left goes through :mod:`homeclust.safety` (timer
   armed right before it, confirmation over a new connection).  Every step
   is verified by reading the facts again and re-planning: what is left did
   not converge.  A failed worker does not stop the others; its later steps
   are skipped and named.  Without a working master no worker is touched.
   Before any of it, every step is asked on every host whether it can work
   there at all (:meth:`~homeclust.steps.base.Step.preflight`): one refusal
   and nothing is changed anywhere;
6. ``check`` adds each step's posture checks and behaviour probes.

Ctrl-C or SIGTERM sets the run's cancel event: guarded changes in flight roll
back at once, nothing new starts, and the run ends with exit code 130.
"""

from __future__ import annotations

import getpass
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Literal, Protocol

from homeclust import DEFAULT_FORKS, safety
from homeclust.changes import Change, CommandChange, FileChange, parse_batch_output, render_batch
from homeclust.errors import FactError, HomeclustError, Interrupted, RolledBackError, StepError
from homeclust.facts import FactQuery, HostFacts, Transaction, gather_script, parse_facts, redact_facts_output
from homeclust.inventory import Inventory, Node
from homeclust.platforms import platform_of
from homeclust.runlog import RunLog
from homeclust.steps.base import CheckItem, PlanContext, Step, StepPlan
from homeclust.transport import (
    CommandResult,
    Connector,
    Host,
    LockHandle,
    claim_script,
    unclaim_script,
)

Mode = Literal["apply", "plan", "check", "facts"]
StepStatus = Literal["unchanged", "changed", "pending", "failed", "rolled-back", "skipped"]

LOCK_PATH = "/run/homeclust.lock"

FACTS_TIMEOUT = 120.0
#: Seconds to wait for our own previous lock session to go away after a reconnect.
RELOCK_WAIT = 30.0


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
    #: Things the run found and dealt with that belong to no step (host, text).
    notices: list[tuple[str, str]] = field(default_factory=list)
    log_path: str | None = None
    duration: float = 0.0
    interrupted: bool = False

    def outcome(self, host: str, step: str) -> StepOutcome | None:
        for outcome in self.outcomes:
            if outcome.host == host and outcome.step == step:
                return outcome
        return None

    @property
    def failed(self) -> bool:
        return bool(self.host_errors) or any(
            o.status in ("failed", "rolled-back") for o in self.outcomes) or any(
            c.status == "fail" for c in self.checks)

    @property
    def pending(self) -> bool:
        return any(o.status == "pending" for o in self.outcomes)

    def exit_code(self) -> int:
        """0 ok; 1 a host, step or check failed; 3 ``plan`` found changes; 130 interrupted."""
        if self.interrupted:
            return 130
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


def fact_query(inventory: Inventory, steps: Iterable[Step]) -> FactQuery:
    """What the run needs to know about each host: the union of its steps' needs."""
    query = FactQuery()
    for step in steps:
        query = query | step.fact_query(inventory)
    return query


def change_signature(changes: Iterable[Change]) -> list[tuple[str, str]]:
    """What a list of changes would do, for comparing two plans of the same step."""
    signature = []
    for change in changes:
        if isinstance(change, FileChange):
            signature.append((change.description, change.diff()))
        elif isinstance(change, CommandChange):
            signature.append((change.description, change.diff))
        else:
            signature.append((change.description, ""))
    return signature


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
        forks: int = DEFAULT_FORKS,
        sleep: Callable[[float], None] = time.sleep,
        requested: frozenset[str] = frozenset(),
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
        self.run_id = uuid.uuid4().hex[:12]
        self._facts_lock = threading.Lock()
        # Each host is asked only what the steps that target it manage (nat's sysctls
        # on the master, not on every worker).
        self._queries = {node.name: fact_query(inventory, self.steps_for(node))
                         for node in inventory.nodes}
        self._lock: LockHandle | None = None
        self._lock_ready = threading.Event()  # the master's lock was taken (or failed)
        self._lock_lost: str | None = None
        #: Steps named with --only: they may do more than converge in `up`/`plan`
        #: (PlanContext.requested); `check` only ever compares.
        self.requested = requested
        self._mode: Mode = "plan"

    @property
    def cancel(self) -> threading.Event:
        return self.connector.cancel

    # ------------------------------------------------------------------ plumbing

    def run_script(self, host: Host, purpose: str, script: str, timeout: float | None = None,
                   *, interruptible: bool = True, log_script: str | None = None
                   ) -> CommandResult:
        """Run a tagged script on ``host`` and log it (the tag names its purpose).

        ``log_script``: what the log shows instead of the script (secrets left out).
        """
        tagged = f"# homeclust:{purpose}\n{script}"
        logged = f"# homeclust:{purpose}\n{log_script}" if log_script is not None else tagged
        try:
            result = host.run(tagged, timeout=timeout, interruptible=interruptible)
        except HomeclustError as exc:
            self.runlog.command(host.node.name, purpose, logged, None, error=str(exc))
            raise
        if purpose == "facts":
            self.runlog.command(host.node.name, purpose, logged, CommandResult(
                result.exit_code, redact_facts_output(result.stdout), result.stderr,
                result.duration))
        else:
            self.runlog.command(host.node.name, purpose, logged, result)
        return result

    def gather(self, host: Host, *, interruptible: bool = True) -> HostFacts:
        query = self._queries[host.node.name]
        result = self.run_script(host, "facts", gather_script(query), FACTS_TIMEOUT,
                                 interruptible=interruptible)
        if result.exit_code != 0:
            raise FactError(
                f"{host.node.name}: the facts script failed (exit {result.exit_code}): "
                f"{result.stderr.strip() or result.stdout.strip()[-500:]}"
            )
        facts = parse_facts(result.stdout, query)
        platform_of(facts)  # unsupported systems fail here, before any step plans
        with self._facts_lock:
            self.facts[host.node.name] = facts
        return facts

    def context(self, node: Node, pending: Iterable[str] = ()) -> PlanContext:
        requested = self.requested if self._mode in ("apply", "plan") else frozenset()
        with self._facts_lock:
            return PlanContext(self.inventory, node, self.facts[node.name], dict(self.facts),
                               frozenset(pending), requested)

    def steps_for(self, node: Node) -> list[Step]:
        return [s for s in self.steps if s.targets(self.inventory, node)]

    @property
    def targeted_master(self) -> bool:
        return any(n.is_master for n in self.nodes)

    @property
    def workers(self) -> list[Node]:
        return [n for n in self.nodes if not n.is_master]

    def _parallel(self, work: Callable[[Node], None], nodes: Sequence[Node]) -> None:
        """``work`` on every node, ``--forks`` at a time.  On Ctrl-C the cancel event
        is set first, then the threads are waited for (they roll back what they armed)."""
        if not nodes:
            return
        pool = ThreadPoolExecutor(max_workers=min(self.forks, len(nodes)))
        try:
            for future in [pool.submit(work, node) for node in nodes]:
                future.result()
        except BaseException:
            self.cancel.set()
            raise
        finally:
            pool.shutdown(wait=True)

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
        self._mode = mode
        result = RunResult(mode, [n.name for n in self.nodes], [s.name for s in self.steps],
                           log_path=str(self.runlog.path) if self.runlog.path else None)
        self.reporter.start(result.hosts, result.steps, mode)
        self.runlog.event("run-start", mode=mode, hosts=result.hosts, steps=result.steps,
                          inventory=str(self.inventory.path), run_id=self.run_id)
        background: Future[None] | None = None
        try:
            master = self._open_master(result, mode)
            if master is None:
                return result
            # Workers are connected and read while the master is locked and read: reading
            # changes nothing, and a worker waits for the lock before resolving anything.
            background = self._in_background(
                lambda: self._parallel(lambda node: self._gather_worker(node, result, mode),
                                       self.workers))
            master_error = self._prepare_master(master, result, mode)
            background.result()
            if master_error is not None:
                self._master_failed(result, mode, master_error)
                return result
            if mode == "facts":
                return result
            if mode in ("plan", "check"):
                for node in self.nodes:
                    if node.name not in result.host_errors:
                        self._plan_host(node, result, mode)
                if mode == "check":
                    self._parallel(lambda node: self._probe_host(node, result), self.nodes)
                return result
            if self._preflight(result):
                self._apply_all(result)
            return result
        except (KeyboardInterrupt, Interrupted):
            self.cancel.set()
            if background is not None:
                wait([background])  # the workers notice the cancel and stop
            result.interrupted = True
            self._mark_interrupted(result)
            return result
        finally:
            self._lock_ready.set()
            if self._lock is not None:
                self._lock.release()
                self._lock = None
            result.duration = time.monotonic() - started
            self.runlog.event("run-end", exit_code=result.exit_code(),
                              duration=round(result.duration, 3))
            self.reporter.finish(result)

    # ------------------------------------------------------------------ phases

    def _in_background(self, work: Callable[[], None]) -> Future[None]:
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            return pool.submit(work)
        finally:
            pool.shutdown(wait=False)

    def _open_master(self, result: RunResult, mode: Mode) -> Host | None:
        """Connect the master (every worker's gateway) before anything fans out."""
        master_node = self.inventory.master_node
        try:
            self.reporter.host_status(master_node.name, "connecting")
            master = self.connector.open(master_node)
        except Interrupted:
            raise
        except HomeclustError as exc:
            self._master_failed(result, mode, exc)
            return None
        if mode == "check":
            result.checks.append(CheckItem(master_node.name, "ssh from admin", "pass",
                                           f"{self.inventory.master.address}"))
        return master

    def _prepare_master(self, master: Host, result: RunResult, mode: Mode
                        ) -> HomeclustError | None:
        """Take the run lock (``up``), read the master's facts, resolve what is pending;
        returns why the master is not usable (recorded once the workers are read)."""
        master_node = self.inventory.master_node
        try:
            if mode == "apply":
                self._lock = master.hold_lock(LOCK_PATH, lock_owner(), self.run_id)
            self._lock_ready.set()
            self._read(master_node, master, result, mode)
        except Interrupted:
            raise
        except HomeclustError as exc:
            self._lock_ready.set()
            return exc
        return None

    def _read(self, node: Node, host: Host, result: RunResult, mode: Mode) -> None:
        """Read a host's facts and deal with what an earlier run left pending there."""
        self.reporter.host_status(node.name, "reading facts")
        self.gather(host)
        self._pending(node, host, result, mode)
        self.reporter.host_status(node.name, "ready")

    def _master_failed(self, result: RunResult, mode: Mode, exc: HomeclustError) -> None:
        master_node = self.inventory.master_node
        self._fail_all(result, f"master {master_node.name}: {exc}")
        if mode == "check":
            result.checks.append(CheckItem(
                master_node.name, "ssh from admin", "fail", exc.message,
                exc.hint or "is the master up and `[master] address` right?"))

    def _gather_worker(self, node: Node, result: RunResult, mode: Mode) -> None:
        try:
            self.reporter.host_status(node.name, "connecting")
            host = self.connector.open(node)
            if mode == "check":
                result.checks.append(CheckItem(
                    node.name, f"ssh via {self.inventory.master.name}", "pass",
                    str(node.private_address)))
            self._read(node, host, result, mode)
        except Interrupted:
            raise
        except HomeclustError as exc:
            self._host_error(result, node, str(exc))
            if mode == "check":
                result.checks.append(CheckItem(
                    node.name, f"ssh via {self.inventory.master.name}", "fail", exc.message,
                    exc.hint or ""))

    def _fail_all(self, result: RunResult, message: str) -> None:
        for node in self.nodes:
            if node.name not in result.host_errors:
                self._host_error(result, node, message)

    def _host_error(self, result: RunResult, node: Node, message: str) -> None:
        with self._facts_lock:
            result.host_errors[node.name] = message
        self.reporter.host_status(node.name, f"failed: {message}")
        self.runlog.event("host-error", host=node.name, error=message)
        for step in self.steps_for(node):
            self._record(result, StepOutcome(node.name, step.name, "skipped",
                                             error=f"not attempted: {message}"))

    def _notice(self, result: RunResult, host: str, text: str) -> None:
        with self._facts_lock:
            result.notices.append((host, text))
        self.reporter.message(f"{host}: {text}")
        self.runlog.event("notice", host=host, text=text)

    def _record(self, result: RunResult, outcome: StepOutcome) -> None:
        with self._facts_lock:
            result.outcomes.append(outcome)
        self.reporter.step_status(outcome.host, outcome.step, outcome.status)
        self.runlog.event("step", host=outcome.host, step=outcome.step, status=outcome.status,
                          changes=outcome.changes, warnings=outcome.warnings, error=outcome.error,
                          diff=outcome.diff, duration=round(outcome.duration, 3))

    def _mark_interrupted(self, result: RunResult) -> None:
        done = {(o.host, o.step) for o in result.outcomes}
        for node in self.nodes:
            for step in self.steps_for(node):
                if (node.name, step.name) not in done:
                    self._record(result, StepOutcome(node.name, step.name, "skipped",
                                                     error="not attempted: interrupted"))

    # ------------------------------------------------------------------ pending transactions

    def _pending(self, node: Node, host: Host, result: RunResult, mode: Mode) -> None:
        """Deal with guarded changes an earlier, interrupted run left on the host."""
        transactions = self.facts[node.name].transactions
        if not transactions:
            return
        if mode == "apply":
            # Resolve only under the run lock (workers are read while it is being taken).
            self._lock_ready.wait()
            if self._lock is None:
                return
        if mode != "apply":
            # Read-only: say what will happen; the plan must not call the host in sync.
            for txn in transactions:
                self._notice(result, node.name, describe_transaction(txn))
            return
        for txn in transactions:
            self._notice(result, node.name, self._resolve(host, txn))
        self.gather(host)

    def _resolve(self, host: Host, txn: Transaction) -> str:
        """Bring a left-over transaction to an end; returns what was done."""
        if txn.state in ("armed", "applying", "apply-failed", "rolling-back"):
            if txn.state != "rolling-back":
                self.run_script(host, "rollback", safety.rollback_now_script(txn.id), 30.0,
                                interruptible=False)
            state = self._wait_rolled_back(host, txn.id)
            where = "rolledback" if state == "rolledback" else "failed"
            self.run_script(host, "txn-archive", safety.archive_script(txn.id, where), 30.0,
                            interruptible=False)
            if state == "rolledback":
                return (f"rolled back the unconfirmed change {txn.id} that an interrupted run "
                        "left (it would have rolled back by itself"
                        + (f" in {txn.seconds_left} s)" if (txn.seconds_left or 0) > 0 else ")"))
            return (f"the unconfirmed change {txn.id} left by an interrupted run did not roll "
                    f"back cleanly (state {state}); kept in /var/lib/homeclust/failed for "
                    "inspection; this run plans from the host's actual state")
        where = {"rolledback": "rolledback", "rollback-failed": "failed",
                 "confirmed": "confirmed"}.get(txn.state, "abandoned")
        self.run_script(host, "txn-archive", safety.archive_script(txn.id, where), 30.0,
                        interruptible=False)
        return describe_transaction(txn) + f" (moved to /var/lib/homeclust/{where})"

    def _wait_rolled_back(self, host: Host, txn_id: str) -> str:
        deadline = time.monotonic() + safety.ROLLBACK_GRACE + 90
        state = "unknown"
        while time.monotonic() < deadline:
            output = self.run_script(host, "txn-status", safety.status_script(txn_id), 30.0,
                                     interruptible=False).stdout
            state = safety.TxnStatus.parse(output).state
            if state in ("rolledback", "rollback-failed", "gone"):
                break
            self.sleep(safety.POLL_INTERVAL)
        return state

    # ------------------------------------------------------------------ plan / check

    def _plan_step(self, step: Step, node: Node, *, before_run: bool = False) -> StepPlan:
        """Plan ``step`` on ``node``; ``before_run``: the earlier steps of the run have
        not been applied yet (``plan`` and ``check``)."""
        pending: list[str] = []
        if before_run:
            pending = [s.name for s in self.steps_for(node)]
            pending = pending[:pending.index(step.name)] if step.name in pending else pending
        return step.plan(self.context(node, pending))

    def _plan_host(self, node: Node, result: RunResult, mode: Mode) -> None:
        pending = {t.id.rsplit("-", 2)[0]: t for t in self.facts[node.name].transactions
                   if t.state in ("armed", "applying", "apply-failed", "rolling-back")}
        for step in self.steps_for(node):
            started = time.monotonic()
            try:
                plan = self._plan_step(step, node, before_run=True)
            except HomeclustError as exc:
                self._record(result, StepOutcome(node.name, step.name, "failed", error=str(exc)))
                if mode == "check":
                    result.checks.append(CheckItem(node.name, step.name, "fail", exc.message,
                                                   exc.hint or ""))
                continue
            changes = plan.descriptions()
            txn = pending.get(step.name)
            if txn is not None:
                changes.insert(0, describe_transaction(txn))
            status: StepStatus = "pending" if changes else "unchanged"
            self._record(result, StepOutcome(
                node.name, step.name, status, changes, plan.diff(),
                list(plan.warnings), duration=time.monotonic() - started))
            if mode != "check":
                continue
            ctx = self.context(node)
            if changes:
                result.checks.append(CheckItem(
                    node.name, f"{step.name} in sync", "fail",
                    "drift: " + "; ".join(changes),
                    f"see the diff with `homeclust plan --only {step.name} --host {node.name}`;"
                    f" fix with `homeclust up --only {step.name} --host {node.name}`"))
            else:
                result.checks.append(CheckItem(node.name, f"{step.name} in sync", "pass"))
            for warning in plan.warnings:
                result.checks.append(CheckItem(node.name, step.name, "warn", warning))
            result.checks.extend(step.posture(ctx))

    def _probe_host(self, node: Node, result: RunResult) -> None:
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
                except Interrupted:
                    raise
                except HomeclustError as exc:
                    item = CheckItem(node.name, probe.name, "fail", exc.message)
                with self._facts_lock:
                    result.checks.append(item)

    # ------------------------------------------------------------------ apply

    def _preflight(self, result: RunResult) -> bool:
        """Ask every step on every reachable host whether it can work there at all,
        before anything is changed anywhere.  A refusal (e.g. Torque asked for on a
        platform without Torque packages) fails that step and skips everything else:
        a cluster is never left half set up for something that cannot be done."""
        refused: dict[str, list[str]] = {}  # step -> hosts
        for node in self.nodes:
            if node.name in result.host_errors:
                continue
            for step in self.steps_for(node):
                try:
                    step.preflight(self.context(node))
                except HomeclustError as exc:
                    self._record(result, StepOutcome(node.name, step.name, "failed",
                                                     error=str(exc)))
                    refused.setdefault(step.name, []).append(node.name)
        if not refused:
            return True
        done = {(o.host, o.step) for o in result.outcomes}
        what = "; ".join(f"{step} cannot be done on {_some(hosts)}"
                         for step, hosts in refused.items())
        why = f"not attempted: {what} (nothing was changed)"
        for node in self.nodes:
            if node.name in result.host_errors:
                continue
            for step in self.steps_for(node):
                if (node.name, step.name) not in done:
                    self._record(result, StepOutcome(node.name, step.name, "skipped",
                                                     error=why))
        return False

    def _apply_all(self, result: RunResult) -> None:
        master_node = self.inventory.master_node
        if self.targeted_master:
            self._pipeline(master_node, result)
        master_failure = next(
            (f"master failed at {o.step}" for o in result.outcomes if o.host == master_node.name
             and o.status in ("failed", "rolled-back")), None)
        if self._lock_lost:
            master_failure = f"the run lock could not be taken again: {self._lock_lost}"
            self._notice(result, master_node.name, master_failure)
        pending_workers = [w for w in self.workers if w.name not in result.host_errors]
        if master_failure is not None:
            for worker in pending_workers:
                for step in self.steps_for(worker):
                    self._record(result, StepOutcome(
                        worker.name, step.name, "skipped",
                        error=f"not attempted: {master_failure}"))
            if self._lock_lost:
                result.host_errors[master_node.name] = master_failure
            return
        self._parallel(lambda w: self._pipeline(w, result), pending_workers)

    def _pipeline(self, node: Node, result: RunResult) -> None:
        """Apply every step to one host, in order; stop at the first failure."""
        failed_at: str | None = None
        for step in self.steps_for(node):
            if failed_at is None and self._lock_lost:
                failed_at = "keeping the run lock"
            if failed_at is not None:
                self._record(result, StepOutcome(node.name, step.name, "skipped",
                                                 error=f"not attempted: {failed_at} failed"))
                continue
            self.reporter.step_status(node.name, step.name, "running")
            started = time.monotonic()
            try:
                outcome = self._apply_step(step, node)
            except (Interrupted, KeyboardInterrupt) as exc:
                rolled_back = isinstance(exc, Interrupted) and exc.rolled_back
                self._record(result, StepOutcome(
                    node.name, step.name, "rolled-back" if rolled_back else "failed",
                    error=str(exc) if isinstance(exc, Interrupted) else "interrupted",
                    duration=time.monotonic() - started))
                raise Interrupted(f"{node.name}: interrupted") from None
            except HomeclustError as exc:
                outcome = StepOutcome(node.name, step.name, "failed", error=str(exc))
            outcome.duration = time.monotonic() - started
            self._record(result, outcome)
            if outcome.status in ("failed", "rolled-back"):
                failed_at = step.name
        self.reporter.host_status(node.name, "failed" if failed_at else "done")

    def _apply_step(self, step: Step, node: Node) -> StepOutcome:
        plan = self._plan_step(step, node)
        if not plan.has_changes:
            return StepOutcome(node.name, step.name, "unchanged", warnings=list(plan.warnings))
        host = self.connector.open(node)
        warnings = list(plan.warnings)
        done: list[str] = []
        diff = ""
        if plan.incomplete:
            # These changes create what the rest is planned from (a generated key, a
            # file a package installs): apply them, look again, plan the rest.
            warnings += self._run_batch(host, step, node, plan.changes)
            done = [c.description for c in plan.changes]
            diff = plan.diff()
            self.gather(host)
            plan = self._plan_step(step, node)
            if plan.incomplete:
                raise StepError(
                    f"{node.name}: {step.name}: applied, but still cannot plan the rest: "
                    f"{plan.incomplete}", hint="the run log has every command and its output")
            warnings += [w for w in plan.warnings if w not in warnings]
            if not plan.has_changes:
                return StepOutcome(node.name, step.name, "changed", done, diff, warnings)
        armed = plan
        if plan.changes:
            warnings += self._run_batch(host, step, node, plan.changes)
            done += [c.description for c in plan.changes]
            if not plan.guarded:
                self._check_converged(step, node, host)
                return StepOutcome(node.name, step.name, "changed", done, diff + plan.diff(),
                                   warnings)
            # Packages and files are in place and checked before the guard's timer starts.
            self.gather(host)
            armed = self._plan_step(step, node)
            if armed.changes:
                raise StepError(
                    f"{node.name}: {step.name}: applied but the host still differs before the "
                    "guarded part: " + "; ".join(c.description for c in armed.changes),
                    hint="the run log has every command and its output")
            if not armed.guarded:
                return StepOutcome(node.name, step.name, "changed", done, diff + plan.diff(),
                                   warnings)
        try:
            warnings += self._run_guarded(step, node, host, armed)
        except RolledBackError as exc:
            what = f" (already done: {'; '.join(done)})" if done else ""
            return StepOutcome(node.name, step.name, "rolled-back", done, diff + plan.diff(),
                               warnings, error=f"{exc}{what}")
        return StepOutcome(node.name, step.name, "changed",
                           done + [c.description for c in armed.guarded], diff + plan.diff(),
                           warnings)

    def _run_batch(self, host: Host, step: Step, node: Node, changes: Sequence[Change]
                   ) -> list[str]:
        """Apply unguarded changes in one round trip; returns warnings."""
        applied = self.run_script(host, f"apply:{step.name}", render_batch(changes),
                                  log_script=render_batch(changes, redact=True))
        outcomes = parse_batch_output(applied.stdout, len(changes))
        if applied.exit_code != 0:
            failed = [(changes[o.index].description, o.output) for o in outcomes
                      if o.status == "failed"]
            what = failed[0] if failed else ("the batch", applied.stdout[-800:])
            raise StepError(f"{node.name}: {step.name}: {what[0]} failed:\n{what[1].strip()}")
        return [o.output.splitlines()[-1] if o.output else "warning"
                for o in outcomes if o.status == "warned"]

    def _check_converged(self, step: Step, node: Node, host: Host) -> None:
        remaining = self._verify(step, node, host)
        if remaining:
            raise StepError(
                f"{node.name}: {step.name} applied but the host still differs: "
                + "; ".join(remaining),
                hint="the run log has every command and its output",
            )

    def _run_guarded(self, step: Step, node: Node, host: Host, plan: StepPlan) -> list[str]:
        """The guarded part of a plan through the safety engine; returns warnings."""
        guard = plan.guard
        if guard is None:
            raise StepError(f"{node.name}: {step.name}: guarded changes without a guard (bug)")
        if node.is_master and self._lock is not None:
            # The master's connection is replaced below; the claim keeps the run
            # lock ours until we take it again over the new connection.
            self.run_script(host, "lock-claim", claim_script(
                LOCK_PATH, self.run_id, int(guard.rollback_after + safety.ROLLBACK_GRACE)),
                30.0)
        expected = change_signature(plan.guarded)

        def unchanged_since_arm(fresh: Host) -> str | None:
            self.gather(fresh, interruptible=False)
            again = self._plan_step(step, node)
            if change_signature(again.guarded) == expected:
                return None
            return ("now: " + ("; ".join(again.descriptions()) or "nothing to change")
                    + "; before: " + "; ".join(c.description for c in plan.guarded))

        engine = safety.GuardedApply(
            host=host, node=node, connector=self.connector, run=self.run_script,
            txn_id=safety.new_txn_id(step.name), changes=plan.guarded, guard=guard,
            verify=lambda fresh: self._verify(step, node, fresh),
            unchanged_since_arm=unchanged_since_arm, cancel=self.cancel, sleep=self.sleep,
        )
        try:
            result = engine.execute()
        finally:
            self.runlog.event("guarded", host=node.name, step=step.name, txn=engine.txn_id,
                              trail=[p.value for p in engine.trail], problems=engine.problems)
            if node.is_master and self._lock is not None:
                try:
                    self._relock()
                except HomeclustError as exc:
                    # Nothing more may be changed without the lock (our claim still
                    # keeps other runs out until it expires).
                    self._lock_lost = str(exc)
                    self.runlog.event("relock-failed", error=str(exc))
        return [o.output.splitlines()[-1] if o.output else "warning"
                for o in parse_batch_output(result.apply_output, len(plan.guarded))
                if o.status == "warned"]

    def _relock(self) -> None:
        """Take the run lock again over the master's current connection (our claim
        lets us in; nobody else got in meanwhile), then drop the claim."""
        old, self._lock = self._lock, None
        if old is not None:
            old.release()
        master = self.connector.open(self.inventory.master_node)
        self._lock = master.hold_lock(LOCK_PATH, lock_owner(), self.run_id, wait=RELOCK_WAIT)
        self.run_script(master, "lock-unclaim", unclaim_script(LOCK_PATH, self.run_id), 30.0,
                        interruptible=False)

    def _verify(self, step: Step, node: Node, host: Host) -> list[str]:
        """Read the facts again and re-plan: what is left is what did not converge."""
        self.gather(host)
        return self._plan_step(step, node).descriptions()


def _some(names: Sequence[str]) -> str:
    """``a, b, c`` -- or ``a, b and 7 more`` (one line, however big the cluster)."""
    if len(names) <= 3:
        return ", ".join(names)
    return f"{', '.join(names[:2])} and {len(names) - 2} more"


def describe_transaction(txn: Transaction) -> str:
    """One line about a guarded change found on a host."""
    left = txn.seconds_left
    if txn.state in ("armed", "applying", "apply-failed"):
        when = f"in {left} s" if left is not None and left > 0 else "any moment now"
        return (f"an unconfirmed change ({txn.id}) from an interrupted run is pending; the host "
                f"rolls it back by itself {when}")
    if txn.state == "rolling-back":
        return f"a change ({txn.id}) is being rolled back right now"
    if txn.state == "rolledback":
        return f"the change {txn.id} was not confirmed and was rolled back"
    if txn.state == "rollback-failed":
        return f"the rollback of the change {txn.id} FAILED (see its rollback.log)"
    if txn.state == "confirmed":
        return f"the change {txn.id} was confirmed"
    return f"a change ({txn.id}) was started but never armed (nothing of it was applied)"


def lock_owner() -> str:
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()} pid {os.getpid()} since {time.ctime()}"
