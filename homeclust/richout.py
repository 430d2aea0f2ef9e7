"""The terminal view: a live host x step table while running, a coloured report after.

Imported only when stdout is a terminal (see :mod:`homeclust.api`); the data
comes from the same builders as the plain output (:mod:`homeclust.output`), so
both say the same thing.  For big clusters the live view counts hosts per step
and status instead of drawing a row per host.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from homeclust.output import (
    PER_HOST_ROWS,
    STATUS_LABELS,
    all_or_hosts,
    check_details,
    check_rows,
    compress_hosts,
    counts,
    details,
    step_rows,
    verdict,
)
from homeclust.runner import Mode, RunResult

_STYLES = {
    "unchanged": "green", "changed": "yellow", "pending": "yellow", "failed": "bold red",
    "rolled-back": "bold red", "skipped": "dim", "running": "cyan", "waiting": "dim",
}
_DETAIL_STYLES = {"change": "yellow", "diff-header": "bold", "warning": "yellow",
                  "notice": "yellow", "error": "red", "skipped": "dim"}
#: The live view draws a row per host up to this many hosts, then counts instead.
LIVE_PER_HOST = 2 * PER_HOST_ROWS


def _cell(status: str) -> Text:
    return Text(STATUS_LABELS.get(status, status), style=_STYLES.get(status, ""))


class LiveReporter:
    """Host x step table updated in place (counts per step for big clusters)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._lock = threading.Lock()
        self.hosts: list[str] = []
        self.steps: list[str] = []
        self.cells: dict[tuple[str, str], str] = {}
        self.host_text: dict[str, str] = {}
        self.messages: list[str] = []
        self.live: Live | None = None

    def _table(self) -> RenderableType:
        table = Table(box=None, pad_edge=False, show_edge=False)
        if len(self.hosts) <= LIVE_PER_HOST:
            table.add_column("host", style="bold")
            for step in self.steps:
                table.add_column(step)
            table.add_column("")
            for host in self.hosts:
                row: list[RenderableType] = [host]
                row += [_cell(self.cells.get((host, s), "waiting")) for s in self.steps]
                row.append(Text(self.host_text.get(host, ""), style="dim"))
                table.add_row(*row)
        else:
            table.add_column("step", style="bold")
            table.add_column(f"{len(self.hosts)} hosts")
            for step in self.steps:
                tally = Counter(self.cells.get((h, step), "waiting") for h in self.hosts)
                text = Text()
                for status, number in sorted(tally.items()):
                    text.append(f"{number} ", style="bold")
                    text.append(f"{STATUS_LABELS.get(status, status)}  ",
                                style=_STYLES.get(status, ""))
                table.add_row(step, text)
        if self.messages:
            return Group(table, Text("\n".join(self.messages[-5:]), style="dim"))
        return table

    def start(self, hosts: Sequence[str], steps: Sequence[str], mode: Mode) -> None:
        self.hosts, self.steps = list(hosts), list(steps)
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


def render_rich(console: Console, result: RunResult, *, show_diff: bool) -> None:
    """The final report, coloured, from the same data as :func:`output.render_plain`."""
    if result.mode == "check":
        console.print(_check_table(result))
        for line in check_details(result):
            console.print(Text(line, style="red" if line.startswith("✗") else "yellow"))
    else:
        console.print(_summary_table(result))
    for kind, text in details(result, show_diff=show_diff):
        if kind == "diff":
            console.print(Syntax(text, "diff", theme="ansi_dark", word_wrap=False))
        elif kind == "change" and result.mode == "check":
            continue
        else:
            console.print(Text(text, style=_DETAIL_STYLES.get(kind, "")))
    style = {"ok": "green", "failed": "bold red", "changes pending": "yellow",
             "interrupted": "bold red"}[verdict(result)]
    console.print(Text(f"{verdict(result)}: {counts(result)} in {result.duration:.1f} s",
                       style=style))
    if result.log_path:
        console.print(Text(f"log: {result.log_path}", style="dim"), soft_wrap=True)


def _summary_table(result: RunResult) -> Table:
    table = Table(title=f"homeclust {'up' if result.mode == 'apply' else result.mode}",
                  title_justify="left")
    table.add_column("host", style="bold")
    for step in result.steps:
        table.add_column(step)
    for row in step_rows(result):
        cells: list[RenderableType] = [row.label]
        for step, status in zip(result.steps, row.cells, strict=True):
            cell = Text("-", style="dim") if status == "-" else _cell(status)
            if len(row.hosts) == 1:
                outcome = result.outcome(row.hosts[0], step)
                if outcome is not None and outcome.status in ("changed", "pending") \
                        and outcome.changes:
                    cell.append(f" ({len(outcome.changes)})")
                if outcome is not None and outcome.warnings:
                    cell.append(" !", style="yellow")
            cells.append(cell)
        table.add_row(*cells)
    return table


def _check_table(result: RunResult) -> Table:
    """Small clusters: check x host matrix; big ones: one column of who failed."""
    table = Table(title="homeclust check", title_justify="left")
    table.add_column("check")
    marks = {"pass": Text("✓", style="green"), "fail": Text("✗", style="bold red"),
             "warn": Text("!", style="yellow")}
    rows = check_rows(result)
    if len(result.hosts) <= PER_HOST_ROWS:
        for host in result.hosts:
            table.add_column(host, justify="center")
        for row in rows:
            cells: list[RenderableType] = [row.name]
            for host in result.hosts:
                status = ("fail" if host in row.failed else "warn" if host in row.warned
                          else "pass" if host in row.passed else "")
                cells.append(marks[status] if status else Text(""))
            table.add_row(*cells)
        return table
    table.add_column("")
    table.add_column("hosts")
    for row in rows:
        if row.failed:
            where = Text(f"failed on {compress_hosts(row.failed)}", style="red")
        elif row.warned:
            where = Text(f"warning on {compress_hosts(row.warned)}", style="yellow")
        else:
            where = Text(all_or_hosts(row.passed, result.hosts), style="green")
        table.add_row(row.name, marks[row.status], where)
    return table
