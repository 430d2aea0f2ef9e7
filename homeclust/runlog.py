"""The per-run log: every command, its output, exit code and duration, every change.

One JSON object per line in ``<state dir>/logs/<time>-<command>.jsonl`` on the
admin machine, written as the run goes (a crash keeps what happened so far).
The directory is private (0700) and each log 0600: logs hold the hosts'
configuration.  Secret file contents never reach them (the runner logs
redacted scripts and facts).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from homeclust.transport import CommandResult


def private_dir(path: Path) -> None:
    """Create ``path`` (and its parents) and make it and its homeclust parent 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    for directory in (path, path.parent):
        if directory.name and directory.exists() and directory.stat().st_uid == os.getuid():
            directory.chmod(0o700)


class RunLog:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file = None
        if path is not None:
            private_dir(path.parent)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.fchmod(descriptor, 0o600)
            self._file = os.fdopen(descriptor, "a", encoding="utf-8")

    @classmethod
    def for_run(cls, state_dir: Path, command: str) -> RunLog:
        # Unique even for runs started in the same second (scripts, tests).
        now = time.time()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
        millis = int(now * 1000) % 1000
        return cls(state_dir / "logs" / f"{stamp}.{millis:03d}-{command}-{os.getpid()}.jsonl")

    def event(self, kind: str, **data: Any) -> None:
        if self._file is None:
            return
        record = {"time": round(time.time(), 3), "event": kind, **data}
        line = json.dumps(record, default=str)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def command(self, host: str, purpose: str, script: str, result: CommandResult | None,
                error: str | None = None) -> None:
        self.event(
            "command",
            host=host,
            purpose=purpose,
            script=script,
            exit_code=None if result is None else result.exit_code,
            stdout=None if result is None else result.stdout,
            stderr=None if result is None else result.stderr,
            duration=None if result is None else round(result.duration, 3),
            error=error,
        )

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
