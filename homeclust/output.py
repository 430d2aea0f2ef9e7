"""What the user sees, without any terminal library: summaries, plain text, JSON.

Output must stay readable at any size and exact when piped:

* :func:`step_rows` groups hosts whose results are identical ("worker1–worker32:
  ok ok ok"), so a no-op run on 33 nodes fits a screen; changes and failures
  are always listed in full, host by host.
* :func:`check_rows` turns ``check`` results into one row per check with the
  hosts that failed it, instead of one line per host and check.
* :func:`render_plain` writes text that is never re-wrapped (a diff line cut
  in two is a corrupted diff) -- for pipes, logs and CI.
* :class:`LineReporter` prints progress only when something happens (a change,
  a failure, a retry), not one line per host and step.

The terminal view (live table, colours) lives in :mod:`homeclust.richout`,
imported only when stdout is a terminal: scripts and ``--json`` never pay for
loading a terminal library.
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from homeclust.runner import Mode, RunResult

#: How each step status is shown.
STATUS_LABELS = {
    "unchanged": "ok",
    "changed": "changed",
    "pending": "would change",
    "failed": "FAILED",
    "rolled-back": "ROLLED BACK",
    "skipped": "skipped",
    "running": "running…",
    "waiting": "·",
}

#: Up to this many hosts the summary shows one row per host; above it, identical rows merge.
PER_HOST_ROWS = 8

_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def compress_hosts(names: Sequence[str]) -> str:
    """``worker1, worker2, worker3, worker7`` -> ``worker1–worker3, worker7`` (order kept)."""
    parts: list[str] = []
    run: list[tuple[str, int, str]] = []

    def flush() -> None:
        if len(run) >= 3:
            parts.append(f"{run[0][2]}–{run[-1][2]}")
        else:
            parts.extend(name for _, _, name in run)
        run.clear()

    for name in names:
        match = _NUMBERED.match(name)
        if match:
            prefix, number = match.group(1), int(match.group(2))
            if run and run[-1][0] == prefix and run[-1][1] + 1 == number:
                run.append((prefix, number, name))
                continue
            flush()
            run.append((prefix, number, name))
        else:
            flush()
            parts.append(name)
    flush()
    return ", ".join(parts)


@dataclass(frozen=True)
class StepRow:
    """Hosts that ended every step the same way (one row of the summary)."""

    hosts: tuple[str, ...]
    cells: tuple[str, ...]  # one status per step ("-": the step does not apply)

    @property
    def label(self) -> str:
        return compress_hosts(self.hosts)


def step_rows(result: RunResult, *, per_host: int = PER_HOST_ROWS) -> list[StepRow]:
    """The summary rows: one per host for small runs, identical hosts merged for big ones."""
    rows: list[StepRow] = []
    for host in result.hosts:
        cells = []
        for step in result.steps:
            outcome = result.outcome(host, step)
            cells.append("-" if outcome is None else outcome.status)
        rows.append(StepRow((host,), tuple(cells)))
    if len(rows) <= per_host:
        return rows
    merged: dict[tuple[str, ...], list[str]] = {}
    for row in rows:
        merged.setdefault(row.cells, []).extend(row.hosts)
    return [StepRow(tuple(hosts), cells) for cells, hosts in merged.items()]


@dataclass(frozen=True)
class CheckRow:
    """One check over every host it ran on."""

    name: str
    passed: tuple[str, ...]
    failed: tuple[str, ...]
    warned: tuple[str, ...]

    @property
    def status(self) -> str:
        return "fail" if self.failed else "warn" if self.warned else "pass"


def check_rows(result: RunResult) -> list[CheckRow]:
    """Checks in the order they were first reported, each with its hosts by outcome."""
    order: dict[str, dict[str, list[str]]] = {}
    for item in result.checks:
        slot = order.setdefault(item.name, {"pass": [], "fail": [], "warn": []})
        slot[item.status].append(item.host)
    host_rank = {name: i for i, name in enumerate(result.hosts)}

    def sort(hosts: list[str]) -> tuple[str, ...]:
        return tuple(sorted(dict.fromkeys(hosts), key=lambda h: host_rank.get(h, 999)))

    return [CheckRow(name, sort(s["pass"]), sort(s["fail"]), sort(s["warn"]))
            for name, s in order.items()]


def counts(result: RunResult) -> str:
    if result.mode == "check":
        passed = sum(c.status == "pass" for c in result.checks)
        failed = sum(c.status == "fail" for c in result.checks)
        return f"{passed} passed, {failed} failed"
    tally: dict[str, int] = {}
    for outcome in result.outcomes:
        tally[outcome.status] = tally.get(outcome.status, 0) + 1
    names = {"pending": "to change"}
    return ", ".join(f"{n} {names.get(s, s)}" for s, n in sorted(tally.items())) or "nothing to do"


def verdict(result: RunResult) -> str:
    return {0: "ok", 1: "failed", 3: "changes pending", 130: "interrupted"}[result.exit_code()]


def details(result: RunResult, *, show_diff: bool) -> list[tuple[str, str]]:
    """What deserves more than a table cell, as (kind, text): changes, diffs, warnings,
    notices, failures.  ``kind`` is one of change, diff-header, diff, warning, notice,
    error, skipped."""
    out: list[tuple[str, str]] = []
    for outcome in result.outcomes:
        if outcome.status in ("changed", "pending", "rolled-back") and outcome.changes:
            verb = {"changed": "changed", "pending": "would change",
                    "rolled-back": "attempted"}[outcome.status]
            out.append(("change", f"{outcome.host} {outcome.step} {verb}: "
                                  + "; ".join(outcome.changes)))
    if show_diff:
        for outcome in result.outcomes:
            if outcome.status in ("pending", "changed") and outcome.diff:
                out.append(("diff-header", f"--- {outcome.host} {outcome.step}"))
                out.append(("diff", outcome.diff))
    if result.mode != "check":  # check lists warnings in its matrix already
        for outcome in result.outcomes:
            for warning in outcome.warnings:
                out.append(("warning", f"warning: {outcome.host} {outcome.step}: {warning}"))
    for host, text in result.notices:
        out.append(("notice", f"{host}: {text}"))
    for host, error in result.host_errors.items():
        out.append(("error", f"{host}: {error}"))
    for outcome in result.outcomes:
        if outcome.status in ("failed", "rolled-back"):
            out.append(("error", f"{outcome.host} {outcome.step}: {outcome.error}"))
    skipped = [o for o in result.outcomes if o.status == "skipped"
               and o.host not in result.host_errors]
    # Skips share their reason: one line per reason, hosts merged.
    reasons: dict[tuple[str, str], list[str]] = {}
    for outcome in skipped:
        reasons.setdefault((outcome.step, outcome.error or ""), []).append(outcome.host)
    for (step, reason), hosts in reasons.items():
        out.append(("skipped", f"{compress_hosts(hosts)} {step}: {reason}"))
    return out


def check_details(result: RunResult) -> list[str]:
    """Every failed check in full, with its hint (and warnings), host by host."""
    lines = []
    for item in result.checks:
        if item.status == "fail":
            lines.append(f"✗ {item.host} {item.name}: {item.detail}"
                         + (f"\n    hint: {item.hint}" if item.hint else ""))
        elif item.status == "warn":
            lines.append(f"! {item.host} {item.name}: {item.detail}")
    return lines


# --------------------------------------------------------------------------- plain text


def render_plain(result: RunResult, *, show_diff: bool, stream: TextIO | None = None) -> None:
    """The final report as plain text: never wrapped, never coloured (pipes, logs, CI)."""
    out = stream or sys.stdout
    write: Callable[[str], Any] = lambda line: out.write(line + "\n")  # noqa: E731
    title = "up" if result.mode == "apply" else result.mode
    if result.mode == "check":
        checks = check_rows(result)
        width = max([len(r.name) for r in checks] + [5])
        write(f"homeclust check: {len(result.hosts)} hosts")
        for row in checks:
            if row.failed:
                where = f"FAILED on {compress_hosts(row.failed)}"
            elif row.warned:
                where = f"warning on {compress_hosts(row.warned)}"
            else:
                where = all_or_hosts(row.passed, result.hosts)
            mark = {"pass": "✓", "fail": "✗", "warn": "!"}[row.status]
            write(f"{mark} {row.name:<{width}}  {where}")
        for line in check_details(result):
            write(line)
    else:
        rows = step_rows(result)
        width = max([len(r.label) for r in rows] + [4])
        write(f"homeclust {title}")
        write(f"{'host':<{width}}  " + "  ".join(f"{s:<12}" for s in result.steps).rstrip())
        for step_row in rows:
            cells = "  ".join(f"{STATUS_LABELS.get(c, c):<12}" for c in step_row.cells).rstrip()
            write(f"{step_row.label:<{width}}  {cells}")
    for kind, text in details(result, show_diff=show_diff):
        if kind == "diff":
            out.write(text if text.endswith("\n") else text + "\n")
        elif kind == "change" and result.mode == "check":
            continue  # check shows drift in its matrix and diffs
        else:
            write(text)
    write(f"{verdict(result)}: {counts(result)} in {result.duration:.1f} s")
    if result.log_path:
        write(f"log: {result.log_path}")


def all_or_hosts(hosts: Sequence[str], every: Sequence[str]) -> str:
    if len(hosts) == len(every) and len(every) > 1:
        return f"all {len(every)} hosts"
    return compress_hosts(hosts)


# --------------------------------------------------------------------------- reporters


class LineReporter:
    """Plain progress for logs and pipes: only what happens, not every "ok"."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()

    def _say(self, text: str) -> None:
        with self._lock:
            self.stream.write(text + "\n")
            self.stream.flush()

    def start(self, hosts: Sequence[str], steps: Sequence[str], mode: Mode) -> None:
        self._say(f"{'up' if mode == 'apply' else mode}: {', '.join(steps)} on "
                  f"{compress_hosts(hosts)}")

    def host_status(self, host: str, text: str) -> None:
        if text.startswith("failed"):
            self._say(f"{host}: {text}")

    def step_status(self, host: str, step: str, status: str) -> None:
        if status in ("changed", "failed", "rolled-back"):
            self._say(f"{host} {step}: {STATUS_LABELS.get(status, status)}")

    def message(self, text: str) -> None:
        self._say(text)

    def finish(self, result: RunResult) -> None:
        pass


class QuietReporter(LineReporter):
    """Nothing while running (``--json``): the result is the output."""

    def _say(self, text: str) -> None:
        pass


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
