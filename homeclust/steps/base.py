"""What a step is: a name, its dependencies, its targets and a pure planner.

A step reads an :class:`PlanContext` (inventory + this host's facts + what is
known about the other hosts) and returns a :class:`StepPlan`: the changes that
would bring the host to the inventory's state, warnings, and -- for steps
that can cut the admin off -- a :class:`Guard` telling the runner how to undo
them if the host does not come back.  Planning never does I/O.

``check`` builds on the same planner: a host whose plan is empty is in sync;
otherwise the plan *is* the drift.  Steps may add behaviour probes: a script
run on the host plus a pure evaluation of its output.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from homeclust.changes import Change, FileChange, diff_text
from homeclust.facts import HostFacts
from homeclust.inventory import Inventory, Node
from homeclust.platforms import Platform, platform_of


@dataclass(frozen=True)
class PlanContext:
    inventory: Inventory
    node: Node
    facts: HostFacts
    #: Facts of the other hosts gathered in this run (the master's, at least, when reachable).
    cluster: Mapping[str, HostFacts] = field(default_factory=dict)

    @property
    def platform(self) -> Platform:
        return platform_of(self.facts)

    @property
    def master_facts(self) -> HostFacts | None:
        if self.node.is_master:
            return self.facts
        return self.cluster.get(self.inventory.master.name)


@dataclass(frozen=True)
class Guard:
    """How to survive a change that may cut the admin off (see homeclust.safety).

    Files changed by the plan are always backed up and restored; ``snapshot``
    saves any further state into ``$HC_TXN/backup`` and ``restore`` brings it
    back (after the files).  ``rollback_after`` is when the host undoes the
    change by itself unless homeclust confirms through a new connection.
    """

    snapshot: str = ""
    restore: str = ""
    rollback_after: int = 30
    settle: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class StepPlan:
    step: str
    host: str
    changes: tuple[Change, ...] = ()
    warnings: tuple[str, ...] = ()
    guard: Guard | None = None

    @property
    def has_changes(self) -> bool:
        return bool(self.changes)

    def descriptions(self) -> list[str]:
        return [c.description for c in self.changes]

    def diff(self) -> str:
        return diff_text(self.changes)


CheckStatus = Literal["pass", "fail", "warn"]


@dataclass(frozen=True)
class CheckItem:
    host: str
    name: str
    status: CheckStatus
    detail: str = ""
    hint: str = ""


@dataclass(frozen=True)
class Probe:
    """A behaviour test run on a host: ``script`` plus a pure ``evaluate``."""

    name: str
    script: str
    evaluate: Callable[[int, str], CheckItem]
    timeout: float = 30.0


class Step(ABC):
    """Base class of every step; subclasses are registered in homeclust.steps."""

    name: ClassVar[str]
    summary: ClassVar[str]
    depends_on: ClassVar[tuple[str, ...]] = ()
    #: Files (globs allowed) this step needs in the facts.
    fact_paths: ClassVar[tuple[str, ...]] = ()

    def enabled(self, inventory: Inventory) -> bool:
        """Whether this step exists for this inventory (e.g. torque vs slurm)."""
        return True

    def targets(self, inventory: Inventory, node: Node) -> bool:
        """Whether this step does anything on ``node``."""
        return True

    @abstractmethod
    def plan(self, ctx: PlanContext) -> StepPlan:
        """The changes that bring the host to the inventory's state (pure)."""

    def posture(self, ctx: PlanContext) -> list[CheckItem]:
        """Extra pure checks on live state for ``homeclust check`` (beyond drift)."""
        return []

    def probes(self, ctx: PlanContext) -> list[Probe]:
        """Behaviour tests for ``homeclust check``, run on ``ctx.node`` -- asked for every
        node in the run, also those the step does not target."""
        return []


# --------------------------------------------------------------------------- planning helpers


def file_change(facts: HostFacts, path: str, content: str | None, *, mode: int = 0o644,
                owner: str = "root", group: str = "root") -> FileChange | None:
    """The change that makes ``path`` hold ``content`` (None: absent), or None if it does."""
    current = facts.files.get(path)
    if content is None:
        if current is None:
            return None
        return FileChange(path, None, current.text, reason="taken over by homeclust")
    if current is None:
        return FileChange(path, content, None, mode, owner, group)
    if current.content is None:
        # Too big to be sent with the facts: known to differ only by its hash.
        if current.sha256 != hashlib.sha256(content.encode()).hexdigest():
            return FileChange(path, content, None, mode, owner, group,
                              "replaces a file too large to show as a diff")
    elif current.content != content.encode():
        return FileChange(path, content, current.text, mode, owner, group)
    reasons = []
    if current.mode != mode:
        reasons.append(f"mode {current.mode:o} -> {mode:o}")
    if (current.owner, current.group) != (owner, group):
        reasons.append(f"owner {current.owner}:{current.group} -> {owner}:{group}")
    if reasons:
        return FileChange(path, content, current.text, mode, owner, group, "; ".join(reasons))
    return None


def missing_packages(facts: HostFacts, packages: Sequence[str]) -> tuple[str, ...]:
    return tuple(p for p in packages if p not in facts.packages)
