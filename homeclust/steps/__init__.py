"""The step registry: every step that exists, resolved by name, ordered by dependencies.

The run order comes from each step's declared ``depends_on`` (ties broken by
registry order), never from the order the user typed ``--only`` names in.
"""

from __future__ import annotations

from collections.abc import Sequence

from homeclust.errors import UsageError
from homeclust.inventory import Inventory
from homeclust.platforms import Platform
from homeclust.steps.base import Step
from homeclust.steps.firewall import FirewallStep
from homeclust.steps.monitor import MonitorStep
from homeclust.steps.mpi import MpiStep
from homeclust.steps.nat import NatStep
from homeclust.steps.network import NetworkStep
from homeclust.steps.repo import RepoStep
from homeclust.steps.slurm import SlurmStep
from homeclust.steps.sshkeys import SshKeysStep
from homeclust.steps.torque import TorqueStep


def worker_packages(inventory: Inventory, platform: Platform) -> tuple[str, ...]:
    """What the master's repository serves: the worker packages of every step this
    inventory enables (whatever one run selects) plus ``[repo] packages``."""
    names = set(inventory.repo.packages)
    for step in REGISTRY.values():
        if step.enabled(inventory):
            names.update(step.worker_packages(inventory, platform))
    return tuple(sorted(names))


#: Registry order is the documented order; dependencies must point backwards.
#: ``torque`` and ``slurm`` exclude each other (``[scheduler] kind``, see Step.enabled).
REGISTRY: dict[str, Step] = {
    step.name: step for step in (
        NetworkStep(), FirewallStep(), NatStep(), RepoStep(worker_packages), SshKeysStep(),
        MpiStep(), TorqueStep(), SlurmStep(), MonitorStep(),
    )
}


def _check_registry() -> None:
    seen: set[str] = set()
    for name, step in REGISTRY.items():
        for dep in step.depends_on:
            if dep not in REGISTRY:
                raise RuntimeError(f"step {name} depends on unknown step {dep}")
            if dep not in seen:
                raise RuntimeError(f"step {name} depends on later step {dep}")
        seen.add(name)


_check_registry()


def step_names() -> list[str]:
    return list(REGISTRY)


def _parse_names(values: Sequence[str] | None, option: str) -> list[str]:
    names: list[str] = []
    for value in values or ():
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            if part not in REGISTRY:
                import difflib

                close = difflib.get_close_matches(part, list(REGISTRY), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise UsageError(
                    f"{option}: unknown step {part!r}",
                    hint=f"{hint}steps: {', '.join(REGISTRY)}",
                )
            names.append(part)
    return names


def requested_steps(only: Sequence[str] | None) -> frozenset[str]:
    """The steps named with ``--only`` (see :attr:`PlanContext.requested`)."""
    return frozenset(_parse_names(only, "--only"))


def resolve_steps(inventory: Inventory, only: Sequence[str] | None = None,
                  skip: Sequence[str] | None = None) -> list[Step]:
    """The steps to run, in dependency order."""
    only_names = _parse_names(only, "--only")
    skip_names = set(_parse_names(skip, "--skip"))
    chosen = [
        step for name, step in REGISTRY.items()
        if (not only_names or name in only_names) and name not in skip_names
        and step.enabled(inventory)
    ]
    if only_names:
        disabled = [n for n in only_names if not REGISTRY[n].enabled(inventory)]
        if disabled:
            raise UsageError(f"--only: step {disabled[0]!r} is not enabled by this inventory")
    if not chosen:
        raise UsageError("no steps left to run (check --only and --skip)")
    return chosen
