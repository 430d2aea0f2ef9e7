"""invoke tasks: the same operations as the ``homeclust`` CLI, for ``invoke``/``inv`` users.

    invoke up                        # the whole cluster
    invoke plan --host worker2
    invoke check
    invoke firewall --host worker2   # re-run one step on one node

One task per registered step (each with ``--host``), plus ``up``, ``plan`` and
``check``.  They call :func:`homeclust.api.execute`, exactly as the CLI does;
the inventory is ``./inventory.toml`` unless ``--inventory`` (or the
``HOMECLUST_INVENTORY`` environment variable) says otherwise.
"""

from __future__ import annotations

import os
from typing import Any

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import Task, task

from homeclust import DEFAULT_FORKS, api
from homeclust.errors import HomeclustError
from homeclust.steps import REGISTRY

DEFAULT_INVENTORY = os.environ.get("HOMECLUST_INVENTORY", "inventory.toml")

_HELP = {
    "host": "Only these hosts, comma-separated (workers are reached through the master).",
    "only": "Only these steps, comma-separated.",
    "skip": "Leave these steps out, comma-separated.",
    "inventory": "Inventory file (default: inventory.toml or $HOMECLUST_INVENTORY).",
    "dry_run": "Plan only; change nothing.",
    "forks": "Workers configured in parallel.",
}


def _help(*names: str) -> dict[str, str]:
    return {name: _HELP[name] for name in names}


def _split(value: str) -> tuple[str, ...]:
    return tuple(v for v in (value or "").split(",") if v)


def _execute(command: api.Command, inventory: str, **options: Any) -> None:
    try:
        code = api.execute(command, inventory, api.Options(**options))
    except HomeclustError as exc:
        raise Exit(f"error: {exc}", code=exc.exit_code) from None
    if code:
        raise Exit(code=code)


@task(help=_help("host", "only", "skip", "inventory", "dry_run", "forks"))
def up(c: Context, host: str = "", only: str = "", skip: str = "",
       inventory: str = DEFAULT_INVENTORY, dry_run: bool = False,
       forks: int = DEFAULT_FORKS) -> None:
    """Bring the cluster to the state the inventory describes."""
    _execute("up", inventory, hosts=_split(host), only=_split(only), skip=_split(skip),
             dry_run=dry_run, diff=dry_run, forks=forks)


@task(help=_help("host", "only", "inventory"))
def plan(c: Context, host: str = "", only: str = "", inventory: str = DEFAULT_INVENTORY) -> None:
    """Show what `up` would change; exit code 3 when something would."""
    _execute("plan", inventory, hosts=_split(host), only=_split(only))


@task(help=_help("host", "only", "inventory"))
def check(c: Context, host: str = "", only: str = "", inventory: str = DEFAULT_INVENTORY) -> None:
    """Prove the cluster works (reachability, NAT egress, firewall posture, drift)."""
    _execute("check", inventory, hosts=_split(host), only=_split(only))


@task(name="accept-host-key", help={
    "node": "The reinstalled node.", "inventory": _HELP["inventory"],
    "fingerprint": "Accept only this fingerprint (SHA256:…, read on the node), without asking."})
def accept_host_key(c: Context, node: str, fingerprint: str = "",
                    inventory: str = DEFAULT_INVENTORY) -> None:
    """Accept a reinstalled node's new SSH host key (then run `invoke up`)."""
    try:
        offer, accepted = api.accept_host_key(
            inventory, node, fingerprint=fingerprint or None,
            confirm=lambda offer: input(f"{offer.node} now offers {offer.offered} (pinned: "
                                        f"{', '.join(offer.pinned) or 'nothing'}). Accept? [y/N] "
                                        ).strip().lower() in ("y", "yes"))
    except HomeclustError as exc:
        raise Exit(f"error: {exc}", code=exc.exit_code) from None
    if not accepted:
        raise Exit(f"{offer.node}: not accepted; nothing changed", code=1)
    print(f"{offer.node}: {offer.offered} is pinned; next: invoke up")


def _step_task(name: str, summary: str) -> Task[Any]:
    def run_step(c: Context, host: str = "", inventory: str = DEFAULT_INVENTORY,
                 dry_run: bool = False) -> None:
        _execute("up", inventory, hosts=_split(host), only=(name,), dry_run=dry_run,
                 diff=dry_run)

    run_step.__name__ = name.replace("-", "_")
    run_step.__doc__ = f"Run the {name} step: {summary}."
    return Task(run_step, name=name, help=_help("host", "inventory", "dry_run"))


ns = Collection(up, plan, check, accept_host_key, *(_step_task(n, s.summary) for n, s in REGISTRY.items()))
