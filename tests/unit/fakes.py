"""A fake transport for runner tests: hosts answer scripts by their purpose tag.

Every script the runner sends starts with ``# homeclust:<purpose>``; the fake
records (host, purpose, time) for each and answers facts from an in-memory
state, so tests can assert ordering, parallelism and that ``plan`` sends
nothing but the read-only facts script.
"""

from __future__ import annotations

import base64
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from homeclust.changes import CHANGE_MARKER, CommandChange
from homeclust.errors import ConnectError
from homeclust.facts import MARKER
from homeclust.inventory import Inventory, Node
from homeclust.steps.base import PlanContext, Step, StepPlan
from homeclust.transport import CommandResult

OS_RELEASE = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'


def facts_output(hostname: str, files: dict[str, str], transactions: str = "") -> str:
    parts = [f"\n{MARKER} os-release\n{OS_RELEASE}", f"\n{MARKER} hostname\n{hostname}\n",
             f"\n{MARKER} transactions\n{transactions}", f"\n{MARKER} files\n"]
    for path, content in sorted(files.items()):
        encoded = base64.b64encode(content.encode()).decode()
        parts.append(f"F\t{path}\t644\troot\troot\t{'0' * 64}\n{encoded}\n")
    parts.append(f"\n{MARKER} end\n")
    return "".join(parts)


@dataclass
class Call:
    host: str
    purpose: str
    start: float
    end: float = 0.0


@dataclass
class FakeCluster:
    """State of every fake host: its files, and knobs to make things go wrong."""

    files: dict[str, dict[str, str]] = field(default_factory=dict)
    #: host -> lines of the facts' transactions section (guarded changes left on it)
    transactions: dict[str, str] = field(default_factory=dict)
    unreachable: set[str] = field(default_factory=set)
    failing_commands: set[tuple[str, str]] = field(default_factory=set)  # (host, marker text)
    ignore_apply: set[str] = field(default_factory=set)  # hosts that "apply" but change nothing
    apply_hook: Callable[[str], None] | None = None
    calls: list[Call] = field(default_factory=list)
    locks: list[str] = field(default_factory=list)
    lock_released: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def purposes(self, host: str | None = None) -> list[str]:
        return [c.purpose for c in self.calls if host is None or c.host == host]


class FakeHost:
    def __init__(self, cluster: FakeCluster, node: Node) -> None:
        self.cluster = cluster
        self.node = node

    def run(self, script: str, *, timeout: float | None = None,
            interruptible: bool = True) -> CommandResult:
        purpose = script.splitlines()[0].removeprefix("# homeclust:")
        call = Call(self.node.name, purpose, time.monotonic())
        with self.cluster._lock:
            self.cluster.calls.append(call)
        try:
            if purpose == "facts":
                files = self.cluster.files.setdefault(self.node.name, {})
                return CommandResult(0, facts_output(
                    self.node.name, files, self.cluster.transactions.get(self.node.name, "")),
                    "", 0.0)
            if purpose.startswith("apply:"):
                if self.cluster.apply_hook:
                    self.cluster.apply_hook(self.node.name)
                return self._apply(script)
            return CommandResult(0, "", "", 0.0)
        finally:
            call.end = time.monotonic()

    def _apply(self, script: str) -> CommandResult:
        """Pretend to run the batch: each ``touch`` command creates its file."""
        out = []
        for index, path in enumerate(re.findall(r"# fake-touch (\S+)", script)):
            if (self.node.name, path) in self.cluster.failing_commands:
                out.append(f"boom\n{CHANGE_MARKER} {index} failed")
                return CommandResult(1, "\n".join(out) + "\n", "", 0.0)
            if self.node.name not in self.cluster.ignore_apply:
                self.cluster.files.setdefault(self.node.name, {})[path] = "done\n"
            out.append(f"{CHANGE_MARKER} {index} changed")
        return CommandResult(0, "\n".join(out) + "\n", "", 0.0)

    def hold_lock(self, path: str, owner: str, run_id: str, *, wait: float = 0.0) -> FakeLock:
        self.cluster.locks.append(self.node.name)
        return FakeLock(self.cluster, self.node.name)

    def close(self) -> None:
        pass


class FakeLock:
    def __init__(self, cluster: FakeCluster, host: str) -> None:
        self.cluster = cluster
        self.host = host

    def release(self) -> None:
        self.cluster.lock_released.append(self.host)


class FakeConnector:
    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster
        self.opened: list[str] = []
        self.cancel = threading.Event()

    def open(self, node: Node) -> FakeHost:
        self.opened.append(node.name)
        if node.name in self.cluster.unreachable:
            raise ConnectError(f"{node.name}: connection refused")
        return FakeHost(self.cluster, node)

    def reopen(self, node: Node, *, within: float) -> FakeHost:
        return self.open(node)

    def close(self) -> None:
        pass


class TouchStep(Step):
    """A step that wants a file to exist on every targeted host."""

    summary = "test step"

    def __init__(self, name: str, depends_on: tuple[str, ...] = (), master_only: bool = False
                 ) -> None:
        self.name = name  # type: ignore[misc]
        self.depends_on = depends_on  # type: ignore[misc]
        self.master_only = master_only

    @property
    def path(self) -> str:
        return f"/etc/{self.name}.done"

    def targets(self, inventory: Inventory, node: Node) -> bool:
        return node.is_master or not self.master_only

    def plan(self, ctx: PlanContext) -> StepPlan:
        if self.path in ctx.facts.files:
            return StepPlan(self.name, ctx.node.name)
        change = CommandChange(f"touch {self.path}", f"# fake-touch {self.path}\ntouch {self.path}")
        return StepPlan(self.name, ctx.node.name, (change,))
