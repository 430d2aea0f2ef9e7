"""Run logs and diffs keep secrets: private files, redacted contents, no secret in a diff."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

from homeclust.changes import FileChange, render_batch
from homeclust.facts import REDACTED
from homeclust.runlog import RunLog
from homeclust.runner import Runner
from homeclust.transport import CommandResult
from tests.unit.fakes import FakeCluster, FakeConnector, TouchStep
from tests.unit.test_runner import inventory


def test_the_state_directory_is_private_and_logs_are_0600(tmp_path: Path) -> None:
    """Hole 9: logs were 0644 in a 0755 directory, with the hosts' configuration inside."""
    state = tmp_path / "state" / "homeclust" / "mycluster"
    state.mkdir(parents=True, mode=0o755)
    log = RunLog.for_run(state, "up")
    log.event("run-start")
    log.close()
    assert log.path is not None
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_secret_files_are_never_in_a_diff_nor_in_the_logged_script() -> None:
    key = FileChange("/etc/munge/munge.key", "s3cr3t\n", "0ld-s3cr3t\n", 0o400, "munge", "munge",
                     secret=True)
    assert "s3cr3t" not in key.diff() and "contents differ (secret: not shown)" in key.diff()
    encoded = base64.b64encode(b"s3cr3t\n").decode()
    assert encoded in render_batch([key])
    assert encoded not in render_batch([key], redact=True)


def test_the_run_log_holds_facts_with_secret_contents_redacted(tmp_path: Path) -> None:
    secret = base64.b64encode(b"psk=hunter2\n").decode()
    facts = ("\n@@homeclust-fact@@ os-release\nID=debian\nVERSION_ID=\"12\"\n"
             "\n@@homeclust-fact@@ files\n"
             f"S\t/etc/NetworkManager/system-connections/wifi\t600\troot\troot\t\n{secret}\n"
             "\n@@homeclust-fact@@ end\n")

    class Host:
        node = inventory(0).master_node

        def run(self, script: str, *, timeout: float | None = None,
                interruptible: bool = True) -> CommandResult:
            return CommandResult(0, facts, "", 0.0)

    log = RunLog(tmp_path / "run.jsonl")
    runner = Runner(inventory(0), [TouchStep("alpha")], inventory(0).nodes,
                    connector=FakeConnector(FakeCluster()), runlog=log)
    gathered = runner.gather(Host())  # type: ignore[arg-type]
    log.close()
    assert gathered.file_text("/etc/NetworkManager/system-connections/wifi") == "psk=hunter2\n"
    text = (tmp_path / "run.jsonl").read_text()
    assert secret not in text and "hunter2" not in text and REDACTED in text
