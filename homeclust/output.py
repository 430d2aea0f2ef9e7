"""What the user sees: a live host x step view while running, then a summary.

* :class:`LiveReporter` -- a rich table refreshed in place on a terminal.
* :class:`LineReporter` -- one line per event when stdout is not a terminal
  (CI logs, pipes).
* :func:`render_result` -- the final table (changed / unchanged / failed per
  host and step), plan diffs, check results with hints, the log path.
* :func:`result_json` -- the same as data, for ``--json``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from homeclust.runner import Mode, RunResult

_STYLE = {
    "unchanged": ("ok", "green"),
    "changed": ("changed", "yellow"),
    "pending": ("would change", "yellow"),
    "failed": ("FAILED", "bold red"),
    "rolled-back": ("ROLLED BACK", "bold red"),
    "skipped": ("skipped", "dim"),
    "running": ("running…", "cyan"),
    "waiting": ("·", "dim"),
}


def _cell(status: str) -> Text:
    label, style = _STYLE.get(status, (status, ""))
    return Text(label, style=style)


class LiveReporter:
    """Host x step table, updated in place."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._lock = threading.Lock()
        self.hosts: list[str] = []
        self.steps: list[str] = []
        self.cells: dict[tuple[str, str], str] = {}
        self.host_text: dict[str, str] = {}
        self.messages: list[str] = []
        self.live: Live | None = None
        self.mode: Mode = "apply"

    def _table(self) -> RenderableType:
        table = Table(box=None, pad_edge=False, show_edge=False)
        table.add_column("host", style="bold")
        for step in self.steps:
            table.add_column(step)
        table.add_column("")
        for host in self.hosts:
            row: list[RenderableType] = [host]
            row += [_cell(self.cells.get((host, s), "waiting")) for s in self.steps]
            row.append(Text(self.host_text.get(host, ""), style="dim"))
            table.add_row(*row)
        if self.messages:
            return Group(table, Text("\n".join(self.messages[-5:]), style="dim"))
        return table

    def start(self, hosts: Sequence[str], steps: Sequence[str], mode: Mode) -> None:
        self.hosts, self.steps, self.mode = list(hosts), list(steps), mode
        self.live = Live(self._table(), console=self.console, refresh_per_second=8,
                         transient=True)
        self.live.start()

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._table())

    def host_status(self, host: str, text: str) -> None:
        with self._lock:
            self.host_text[host] = text.splitlines()[0][:60] if text else ""
            self._refresh()

    def step_status(self, host: str, step: str, status: str) -> None:
        with self._lock:
            self.cells[(host, step)] = status
            self._refresh()

    def message(self, text: str) -> None:
        with self._lock:
            self.messages.append(text)
            self._refresh()

    def finish(self, result: RunResult) -> None:
        with self._lock:
            if self.live is not None:
                self.live.stop()
                self.live = None
            for message in self.messages:
                self.console.print(Text(message, style="dim"))


class LineReporter:
    """Plain progress lines, for logs and pipes."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._lock = threading.Lock()

    def _say(self, text: str) -> None:
        with self._lock:
            self.console.print(text, highlight=False, markup=False)

    def start(self, hosts: Sequence[str], steps: Sequence[str], mode: Mode) -> None:
        self._say(f"{mode}: {', '.join(steps)} on {', '.join(hosts)}")

    def host_status(self, host: str, text: str) -> None:
        if text.startswith("failed"):
            self._say(f"{host}: {text}")

    def step_status(self, host: str, step: str, status: str) -> None:
        if status != "running":
            self._say(f"{host} {step}: {_STYLE.get(status, (status,))[0]}")

    def message(self, text: str) -> None:
        self._say(text)

    def finish(self, result: RunResult) -> None:
        pass


class QuietReporter(LineReporter):
    """Nothing while running (``--json``): the result is the output."""

    def _say(self, text: str) -> None:
        pass


def summary_table(result: RunResult) -> Table:
    table = Table(title=f"homeclust {'up' if result.mode == 'apply' else result.mode}",
                  title_justify="left")
    table.add_column("host", style="bold")
    for step in result.steps:
        table.add_column(step)
    for host in result.hosts:
        row: list[RenderableType] = [host]
        for step in result.steps:
            outcome = result.outcome(host, step)
            if outcome is None:
                row.append(Text("-", style="dim"))
                continue
            cell = _cell(outcome.status)
            if outcome.status in ("changed", "pending") and outcome.changes:
                cell.append(f" ({len(outcome.changes)})")
            if outcome.warnings:
                cell.append(" !", style="yellow")
            row.append(cell)
        table.add_row(*row)
    return table


def check_table(result: RunResult) -> Table:
    table = Table(title="homeclust check", title_justify="left")
    table.add_column("")
    table.add_column("host", style="bold")
    table.add_column("check")
    table.add_column("detail")
    marks = {"pass": Text("✓", style="green"), "fail": Text("✗", style="bold red"),
             "warn": Text("!", style="yellow")}
    order = {name: i for i, name in enumerate(result.hosts)}
    for item in sorted(result.checks, key=lambda c: order.get(c.host, 99)):
        detail = Text(item.detail)
        if item.status == "fail" and item.hint:
            detail.append(f"\nhint: {item.hint}", style="cyan")
        table.add_row(marks[item.status], item.host, item.name, detail)
    return table


def render_result(console: Console, result: RunResult, *, show_diff: bool) -> None:
    if result.mode == "check":
        console.print(check_table(result))
    else:
        console.print(summary_table(result))
    if show_diff:
        for outcome in result.outcomes:
            if outcome.status in ("pending", "changed") and outcome.diff:
                console.rule(f"{outcome.host} {outcome.step}", align="left")
                console.print(Syntax(outcome.diff, "diff", theme="ansi_dark", word_wrap=True))
    if result.mode != "check":  # check lists warnings in its table already
        for outcome in result.outcomes:
            for warning in outcome.warnings:
                console.print(Text(f"warning: {outcome.host} {outcome.step}: {warning}",
                                   style="yellow"))
    for host, text in result.notices:
        console.print(Text(f"{host}: {text}", style="yellow"))
    failures = [o for o in result.outcomes if o.status in ("failed", "rolled-back")]
    for host, error in result.host_errors.items():
        console.print(Text(f"{host}: {error}", style="red"))
    for outcome in failures:
        console.print(Text(f"{outcome.host} {outcome.step}: {outcome.error}", style="red"))
    skipped = [o for o in result.outcomes if o.status == "skipped"
               and o.host not in result.host_errors]
    for outcome in skipped:
        console.print(Text(f"{outcome.host} {outcome.step}: {outcome.error}", style="dim"))
    verdict = {0: ("ok", "green"), 1: ("failed", "bold red"),
               3: ("changes pending", "yellow"),
               130: ("interrupted", "bold red")}[result.exit_code()]
    counts = _counts(result)
    console.print(Text(f"{verdict[0]}: {counts} in {result.duration:.1f} s", style=verdict[1]))
    if result.log_path:
        console.print(Text(f"log: {result.log_path}", style="dim"))


def _counts(result: RunResult) -> str:
    if result.mode == "check":
        passed = sum(c.status == "pass" for c in result.checks)
        failed = sum(c.status == "fail" for c in result.checks)
        return f"{passed} passed, {failed} failed"
    tally: dict[str, int] = {}
    for outcome in result.outcomes:
        tally[outcome.status] = tally.get(outcome.status, 0) + 1
    names = {"pending": "to change"}
    return ", ".join(f"{n} {names.get(s, s)}" for s, n in sorted(tally.items())) or "nothing to do"


def result_json(result: RunResult) -> dict[str, Any]:
    return {
        "mode": "up" if result.mode == "apply" else result.mode,
        "exit_code": result.exit_code(),
        "duration": round(result.duration, 3),
        "hosts": result.hosts,
        "steps": result.steps,
        "host_errors": result.host_errors,
        "notices": [{"host": host, "text": text} for host, text in result.notices],
        "interrupted": result.interrupted,
        "outcomes": [
            {
                "host": o.host, "step": o.step, "status": o.status, "changes": o.changes,
                "diff": o.diff, "warnings": o.warnings, "error": o.error,
                "duration": round(o.duration, 3),
            }
            for o in result.outcomes
        ],
        "checks": [
            {"host": c.host, "check": c.name, "status": c.status, "detail": c.detail,
             "hint": c.hint}
            for c in result.checks
        ],
        "log": result.log_path,
    }
