"""What a step is: a name, its dependencies, its targets and a pure planner.

A step declares what it needs to know about a host (:meth:`Step.fact_query`:
files, units, packages, sysctls, step-specific facts -- only what it manages),
reads a :class:`PlanContext` (inventory + this host's facts + what is known
about the other hosts) and returns a :class:`StepPlan`: the changes that would
bring the host to the inventory's state, warnings, and -- for the part that
can cut someone off -- the ``guarded`` changes with a :class:`Guard` telling
the runner how to undo them if the host does not come back.  Everything else
(packages, files that are not live yet) is in ``changes`` and is applied and
checked *before* the guard's timer starts, so a slow mirror never rolls back a
good change.  Planning never does I/O.

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

from homeclust.changes import Change, FileChange, ServiceChange, diff_text
from homeclust.errors import StepError
from homeclust.facts import FactQuery, HostFacts
from homeclust.inventory import Inventory, Node
from homeclust.platforms import Platform, platform_of


@dataclass(frozen=True)
class PlanContext:
    inventory: Inventory
    node: Node
    facts: HostFacts
    #: Facts of the other hosts gathered in this run (the master's, at least, when reachable).
    cluster: Mapping[str, HostFacts] = field(default_factory=dict)
    #: Earlier steps of this run that have not been applied to this host yet: ``plan``
    #: plans every step from the facts as they are now, before any has run, so a step
    #: may count on one of these doing its part first.  Empty when applying (they ran).
    pending_steps: frozenset[str] = frozenset()
    #: Steps the user named with ``--only`` in ``up``/``plan`` (empty otherwise): a step
    #: asked for by name may do more than converge, e.g. the repo step then refreshes
    #: the master's package lists to pick up newer upstream versions.
    requested: frozenset[str] = frozenset()

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
    """How to survive the guarded part of a plan, which may cut someone off
    (see homeclust.safety).

    The engine saves and restores by itself the files the guarded changes
    write and the state (enabled/masked, running) of the units they touch.
    ``snapshot`` saves any further state into ``$HC_TXN/backup``;
    ``pre_restore`` runs first when rolling back, while the trial files are
    still in place (e.g. take an interface down with the configuration it was
    brought up with); ``restore`` runs after the files and units are back.
    ``rollback_after`` counts from the moment the guarded changes start: the
    host undoes them by itself unless homeclust confirms through a new
    connection in time.  ``settle`` is how long to wait before trying.
    """

    snapshot: str = ""
    pre_restore: str = ""
    restore: str = ""
    #: Prints what the trial state achieved (e.g. the addresses an interface got);
    #: captured before a rollback, so the report can say why the trial failed.
    trial: str = ""
    rollback_after: int = 30
    settle: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class StepPlan:
    """What a step would change on one host.

    ``changes`` are applied first, unguarded (packages, files that are not
    live yet, anything that cannot cut anyone off); ``guarded`` are applied
    after them under ``guard``, all at once, detached from the SSH session.

    ``incomplete`` (non-empty: what is still to come) says that the rest of
    the plan can only be made once ``changes`` have run, because they create
    what it is planned from -- a key pair generated on the host, a
    configuration file a package installs.  ``up`` then applies ``changes``,
    reads the facts again and plans once more; ``plan`` shows it as a pending
    change.
    """

    step: str
    host: str
    changes: tuple[Change, ...] = ()
    warnings: tuple[str, ...] = ()
    guard: Guard | None = None
    guarded: tuple[Change, ...] = ()
    incomplete: str = ""

    def __post_init__(self) -> None:
        if bool(self.guarded) != (self.guard is not None):
            raise StepError(f"{self.host}: {self.step}: guarded changes need a guard and a "
                            "guard needs guarded changes (planner bug)")
        if self.incomplete and not self.changes:
            raise StepError(f"{self.host}: {self.step}: a plan that is completed after its "
                            "changes ran needs changes (planner bug)")

    @property
    def has_changes(self) -> bool:
        return bool(self.changes or self.guarded)

    @property
    def all_changes(self) -> tuple[Change, ...]:
        return self.changes + self.guarded

    def descriptions(self) -> list[str]:
        then = [f"then: {self.incomplete}"] if self.incomplete else []
        return [c.description for c in self.all_changes] + then

    def diff(self) -> str:
        return diff_text(self.all_changes)

    def guarded_units(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.unit for c in self.guarded if isinstance(c, ServiceChange)))


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

    def fact_query(self, inventory: Inventory) -> FactQuery:
        """What this step needs to know about a host: only what it manages."""
        return FactQuery()

    def worker_packages(self, inventory: Inventory, platform: Platform) -> tuple[str, ...]:
        """Packages this step installs on workers running ``platform`` (the master's: the
        repo step serves them all from the master, each with its whole dependency closure).

        Asked of every step the inventory enables, whatever ``--only`` selects, so the
        repository never depends on which steps one run happens to include.  Names are
        the platform's own (``platform.family``, ``platform.major``: EL9 has
        ``iptables-nft`` where EL7 has ``iptables``).
        """
        return ()

    def enabled(self, inventory: Inventory) -> bool:
        """Whether this step exists for this inventory (e.g. torque vs slurm)."""
        return True

    def targets(self, inventory: Inventory, node: Node) -> bool:
        """Whether this step does anything on ``node``."""
        return True

    def preflight(self, ctx: PlanContext) -> None:
        """Raise :class:`StepError` if this step can never work on this host as the
        inventory asks (e.g. Torque on a platform without Torque packages).  ``up``
        asks every step on every host before it changes anything, so such a mismatch
        stops the run with nothing changed anywhere; :meth:`plan` should raise it too."""
        return None

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
                owner: str = "root", group: str = "root", secret: bool = False,
                run_as: str | None = None) -> FileChange | None:
    """The change that makes ``path`` hold ``content`` (None: absent), or None if it does.

    ``run_as``: the account that owns the file and the directory it is in (a cluster
    user's home): it writes the file itself (see :class:`FileChange`), and the facts
    were read as that account.  A managed path that is a symbolic link is never read
    through: it is replaced by the managed file (or removed) -- a step that manages a
    path where the platform means a link (``/etc/resolv.conf``) decides before calling.
    """
    current = facts.files.get(path)
    # A file is secret if the facts say so (read as secret) or the caller does.
    secret = secret or (current is not None and current.secret)
    link = facts.links.get(path)
    if link is not None:
        if content is None:
            return FileChange(path, None, None, reason=f"a symbolic link to {link}",
                              secret=secret, owner=run_as or "root", run_as=run_as)
        return FileChange(path, content, None, mode, owner, group,
                          f"replaces a symbolic link to {link}", secret=secret, run_as=run_as)
    if content is None:
        if current is None:
            return None
        return FileChange(path, None, current.text, reason="taken over by homeclust",
                          secret=secret, owner=run_as or "root", run_as=run_as)
    if current is None:
        return FileChange(path, content, None, mode, owner, group, secret=secret, run_as=run_as)
    if current.content is None:
        # Too big to be sent with the facts: known to differ only by its hash.
        if current.sha256 != hashlib.sha256(content.encode()).hexdigest():
            return FileChange(path, content, None, mode, owner, group,
                              "replaces a file too large to show as a diff", secret=secret,
                              run_as=run_as)
    elif current.content != content.encode():
        return FileChange(path, content, current.text, mode, owner, group, secret=secret,
                          run_as=run_as)
    reasons = []
    if current.mode != mode:
        reasons.append(f"mode {current.mode:o} -> {mode:o}")
    if (current.owner, current.group) != (owner, group):
        reasons.append(f"owner {current.owner}:{current.group} -> {owner}:{group}")
    if reasons:
        return FileChange(path, content, current.text, mode, owner, group, "; ".join(reasons),
                          secret=secret, run_as=run_as)
    return None


def missing_packages(facts: HostFacts, packages: Sequence[str]) -> tuple[str, ...]:
    return tuple(p for p in packages if p not in facts.packages)
