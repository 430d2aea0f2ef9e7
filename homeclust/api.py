"""The library API behind both front ends: the ``homeclust`` CLI and ``tasks.py``.

Everything a front end does goes through :func:`execute` (up, plan, check) and
:func:`show_facts`, so the two can never drift apart.  Validation (inventory,
``--only``/``--skip``, ``--host``) happens in :func:`prepare`, before any
connection is opened.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from homeclust import DEFAULT_FORKS
from homeclust.errors import HostKeyChangedError, UsageError
from homeclust.facts import summarize
from homeclust.inventory import Inventory, Node, load_inventory
from homeclust.output import LineReporter, QuietReporter, render_plain, result_json
from homeclust.runlog import RunLog
from homeclust.runner import Reporter, Runner, RunResult
from homeclust.steps import requested_steps, resolve_steps
from homeclust.steps.base import Step
from homeclust.transport import Connector, SshConnector, pin_name
from homeclust.transport import fingerprint as key_fingerprint

if TYPE_CHECKING:
    from rich.console import Console

Command = Literal["up", "plan", "check"]


@dataclass(frozen=True)
class Options:
    only: Sequence[str] = ()
    skip: Sequence[str] = ()
    hosts: Sequence[str] = ()
    forks: int = DEFAULT_FORKS
    dry_run: bool = False
    diff: bool = False
    json: bool = False


@dataclass(frozen=True)
class Prepared:
    inventory: Inventory
    steps: list[Step]
    nodes: tuple[Node, ...]


def prepare(inventory_path: str | Path, options: Options) -> Prepared:
    """Load and validate everything the command line names; contacts nothing."""
    inventory = load_inventory(inventory_path)
    steps = resolve_steps(inventory, options.only, options.skip)
    names = [n.strip() for value in options.hosts for n in value.split(",") if n.strip()]
    nodes = inventory.select(names)
    if options.forks < 1:
        raise UsageError("--forks must be at least 1")
    return Prepared(inventory, steps, nodes)


def _terminal_console() -> Console | None:
    """A rich console when stdout is a terminal (the library is loaded only then)."""
    if not sys.stdout.isatty():
        return None
    from rich.console import Console

    return Console()


def _reporter(console: Console | None, options: Options) -> Reporter:
    if options.json:
        return QuietReporter()
    if console is not None:
        from homeclust.richout import LiveReporter

        return LiveReporter(console)
    return LineReporter()


def first_use_notice(reporter: Reporter) -> Callable[[str], None]:
    """Where a first-use host key pin is shown: with the run's progress, or -- with
    ``--json``, whose stdout is for machines -- on stderr; never only in the log."""
    if isinstance(reporter, QuietReporter):
        return lambda text: print(text, file=sys.stderr, flush=True)
    return reporter.message


def run(command: Command, inventory_path: str | Path, options: Options, *,
        console: Console | None = None, connector: Connector | None = None,
        reporter: Reporter | None = None) -> RunResult:
    """Run up/plan/check and return the result (nothing printed but progress)."""
    prepared = prepare(inventory_path, options)
    reporter = reporter or _reporter(console, options)
    mode = "plan" if command == "plan" or options.dry_run else (
        "check" if command == "check" else "apply")
    runlog = RunLog.for_run(prepared.inventory.state_dir, "up" if mode == "apply" else mode)
    owned = connector is None
    connector = connector or SshConnector(prepared.inventory, on_retry=reporter.message,
                                          on_first_use=first_use_notice(reporter))
    runner = Runner(prepared.inventory, prepared.steps, prepared.nodes, connector=connector,
                    reporter=reporter, runlog=runlog, forks=options.forks,
                    requested=requested_steps(options.only))
    try:
        if mode == "plan":
            return runner.plan()
        if mode == "check":
            return runner.check()
        return runner.apply()
    finally:
        if owned:
            connector.close()
        runlog.close()


def execute(command: Command, inventory_path: str | Path, options: Options) -> int:
    """Run a command and print its outcome; returns the documented exit code."""
    console = None if options.json else _terminal_console()
    result = run(command, inventory_path, options, console=console)
    if options.json:
        print(json.dumps(result_json(result), indent=2))
        return result.exit_code()
    # check shows drift as the diff of what `up` would change.
    show_diff = command in ("plan", "check") or options.diff
    if console is not None:
        from homeclust.richout import render_rich

        render_rich(console, result, show_diff=show_diff)
    else:
        render_plain(result, show_diff=show_diff)
    return result.exit_code()


def show_facts(inventory_path: str | Path, hosts: Sequence[str], *, as_json: bool) -> int:
    prepared = prepare(inventory_path, Options(only=(), hosts=hosts))
    reporter = QuietReporter() if as_json else LineReporter()
    connector = SshConnector(prepared.inventory, on_retry=reporter.message,
                             on_first_use=first_use_notice(reporter))
    runner = Runner(prepared.inventory, prepared.steps, prepared.nodes, connector=connector,
                    reporter=reporter, runlog=RunLog(None))
    try:
        result = runner.gather_all()
    finally:
        connector.close()
    data = {
        name: summarize(runner.facts[name]) if name in runner.facts else None
        for name in result.hosts
    }
    errors = result.host_errors
    if as_json:
        print(json.dumps({"facts": data, "errors": errors}, indent=2))
    else:
        for name, summary in data.items():
            print(f"== {name}")
            print(errors.get(name, "no facts") if summary is None
                  else json.dumps(summary, indent=2))
    return 1 if errors else 0


@dataclass(frozen=True)
class HostKeyOffer:
    """What ``accept-host-key`` found: the key a node offers and what is pinned for it."""

    node: str
    pinned_as: str
    offered: str  # "TYPE SHA256:…"
    pinned: tuple[str, ...]

    @property
    def already_pinned(self) -> bool:
        return self.offered in self.pinned


def accept_host_key(inventory_path: str | Path, name: str, *, fingerprint: str | None,
                    confirm: Callable[[HostKeyOffer], bool],
                    connector: SshConnector | None = None) -> tuple[HostKeyOffer, bool]:
    """Show the host key ``name`` offers now and, once confirmed, pin it instead of the old one.

    ``fingerprint`` (``SHA256:…``, e.g. read on the node's console with ``ssh-keygen -lf
    /etc/ssh/ssh_host_ed25519_key.pub``) confirms without asking; a different one is
    refused.  Otherwise ``confirm`` decides.  Returns the offer and whether it was
    accepted.  Only homeclust's pin changes here; the next ``up`` puts the key in every
    node's ``ssh_known_hosts``.
    """
    inventory = load_inventory(inventory_path)
    node = inventory.node(name)
    owned = connector is None
    connector = connector or SshConnector(inventory)
    try:
        key = connector.offered_host_key(node)
    finally:
        if owned:
            connector.close()
    hostname = pin_name(*inventory.ssh_target(node))
    offer = HostKeyOffer(
        node.name, hostname, f"{key.get_name()} {key_fingerprint(key)}",
        tuple(f"{k.get_name()} {key_fingerprint(k)}" for k in connector.keys.pinned(hostname)))
    if offer.already_pinned:
        return offer, True
    if fingerprint is not None:
        if fingerprint.strip() != key_fingerprint(key):
            raise HostKeyChangedError(
                f"{node.name} offers {offer.offered}, not {fingerprint.strip()}: not accepted",
                hint="compare with the fingerprint on the node's console: "
                "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub")
    elif not confirm(offer):
        return offer, False
    connector.keys.replace(hostname, key, node.name)
    return offer, True

