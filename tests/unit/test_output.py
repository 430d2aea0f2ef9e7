"""What the user reads: grouped summaries, the check matrix, plain text that is never cut."""

from __future__ import annotations

import io
import subprocess
import sys

from homeclust.output import (
    check_rows,
    compress_hosts,
    render_plain,
    result_json,
    step_rows,
)
from homeclust.runner import RunResult, StepOutcome
from homeclust.steps.base import CheckItem

STEPS = ["network", "firewall", "nat"]
HOSTS = ["master"] + [f"worker{i}" for i in range(1, 33)]


def noop(hosts: list[str] = HOSTS) -> RunResult:
    result = RunResult("apply", hosts, STEPS, duration=1.2)
    for host in hosts:
        for step in STEPS:
            if step == "nat" and host != "master":
                continue
            result.outcomes.append(StepOutcome(host, step, "unchanged"))
    return result


def test_host_names_compress_into_ranges() -> None:
    assert compress_hosts(HOSTS) == "master, worker1–worker32"
    assert compress_hosts(["worker1", "worker2", "worker4", "worker5", "worker6", "gpu"]) == \
        "worker1, worker2, worker4–worker6, gpu"
    assert compress_hosts(["node9", "node10", "node11"]) == "node9–node11"
    assert compress_hosts([]) == ""


def test_a_noop_run_on_33_nodes_fits_a_screen() -> None:
    rows = step_rows(noop())
    assert [(r.label, r.cells) for r in rows] == [
        ("master", ("unchanged", "unchanged", "unchanged")),
        ("worker1–worker32", ("unchanged", "unchanged", "-")),
    ]
    out = io.StringIO()
    render_plain(noop(), show_diff=False, stream=out)
    lines = out.getvalue().splitlines()
    assert len(lines) <= 8, lines
    assert lines[-1].startswith("ok: ")


def test_small_clusters_keep_one_row_per_host_and_changes_stay_in_full() -> None:
    result = noop(HOSTS[:4])
    assert [r.label for r in step_rows(result)] == HOSTS[:4]
    big = noop()
    big.outcomes[4] = StepOutcome("worker2", "network", "changed", ["update /etc/hosts"])
    rows = step_rows(big)
    assert ("worker2",) in [r.hosts for r in rows]
    out = io.StringIO()
    render_plain(big, show_diff=False, stream=out)
    assert "worker2 network changed: update /etc/hosts" in out.getvalue()


def test_check_on_33_nodes_is_a_matrix_with_failures_in_full() -> None:
    result = RunResult("check", HOSTS, STEPS, duration=2.0)
    for host in HOSTS:
        result.checks.append(CheckItem(host, "firewall in sync", "pass"))
        failed = host == "worker7"
        result.checks.append(CheckItem(host, "INPUT policy", "fail" if failed else "pass",
                                       "INPUT ACCEPT" if failed else "INPUT DROP",
                                       "homeclust up --only firewall --host worker7"))
    rows = check_rows(result)
    assert [(r.name, r.status, r.failed) for r in rows] == [
        ("firewall in sync", "pass", ()), ("INPUT policy", "fail", ("worker7",))]
    out = io.StringIO()
    render_plain(result, show_diff=False, stream=out)
    text = out.getvalue()
    assert len(text.splitlines()) < 10
    assert "✓ firewall in sync  all 33 hosts" in text
    assert "FAILED on worker7" in text
    assert "✗ worker7 INPUT policy: INPUT ACCEPT\n    hint: homeclust up --only firewall" in text


def test_piped_output_is_never_rewrapped() -> None:
    """A diff line cut in two is a corrupted diff; a log path cut in two is useless."""
    long_rule = "-A INPUT -s 10.0.0.0/8 -i eth0 -p tcp -m tcp --dport 22 " + "-m comment " * 20
    result = RunResult("plan", ["master"], ["firewall"], log_path="/very/" + "long/" * 30 + "x")
    result.outcomes.append(StepOutcome("master", "firewall", "pending", ["load"],
                                       f"--- live\n+++ wanted\n+{long_rule}\n"))
    code = (
        "import sys, io, json\n"
        "from homeclust.output import render_plain\n"
        "from homeclust.runner import RunResult, StepOutcome\n"
        f"r = RunResult('plan', ['master'], ['firewall'], log_path={result.log_path!r})\n"
        f"r.outcomes.append(StepOutcome('master', 'firewall', 'pending', ['load'], "
        f"{result.outcomes[0].diff!r}))\n"
        "render_plain(r, show_diff=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env={"COLUMNS": "40", "PATH": "/usr/bin:/bin"})
    assert f"+{long_rule}\n" in done.stdout
    assert f"log: {result.log_path}\n" in done.stdout
    assert result_json(result)["outcomes"][0]["diff"].endswith(f"+{long_rule}\n")
