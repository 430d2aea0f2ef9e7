"""The transport's host-side pieces, run for real, and its bounded waits.

* The run lock: the ``flock`` command homeclust sends to the master, run here
  under ``sh`` on a lock file in a temporary directory -- held while the
  session lives, refused to a second run, and reserved for one run by a
  claim while that run replaces its connection.
* Every command runs under ``timeout`` on the host: a script that outlives its
  limit is stopped there, not left running after homeclust gave up.
* ``exec_command`` waits for the server without a limit of its own; a server
  that never answers must not hang a run.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from homeclust.errors import ConnectError
from homeclust.inventory import parse_inventory
from homeclust.transport import SshHost, claim_script, lock_command, unclaim_script

pytestmark = pytest.mark.skipif(not shutil.which("flock") or not shutil.which("timeout"),
                                reason="needs util-linux flock and coreutils timeout")

NODE = parse_inventory({
    "master": {"name": "master", "address": "10.0.0.1", "private_address": "192.168.10.1"},
}, Path("t.toml")).master_node


class Session:
    """``lock_command`` running as an SSH session would: stdin open until we close it."""

    def __init__(self, lock: Path, owner: str, run_id: str, wait: float = 0.0) -> None:
        self.process = subprocess.Popen(
            ["sh", "-c", lock_command(str(lock), owner, run_id, wait)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.first = self.process.stdout.readline().strip()

    def rest(self) -> str:
        out, _ = self.process.communicate(timeout=10)
        return out

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.communicate(timeout=10)  # closes stdin: the held lock goes


def test_the_lock_is_held_while_the_session_lives_and_refused_to_others(tmp_path: Path) -> None:
    lock = tmp_path / "homeclust.lock"
    first = Session(lock, "alice@laptop pid 1", "run-a")
    assert first.first == "LOCKED"
    second = Session(lock, "bob@desk pid 2", "run-b")
    assert second.first == "BUSY"
    assert second.rest().strip() == "alice@laptop pid 1"
    first.close()  # a dead run's session closes the same way: no stale lock
    third = Session(lock, "bob@desk pid 2", "run-b")
    assert third.first == "LOCKED"
    third.close()


def test_a_claim_keeps_the_lock_for_its_run_across_a_new_connection(tmp_path: Path) -> None:
    """Hole 4: the master's connection is replaced during a guarded change; in between,
    no other run may take the lock, and the claiming run takes it again."""
    lock = tmp_path / "homeclust.lock"
    first = Session(lock, "alice pid 1", "run-a")
    assert first.first == "LOCKED"
    subprocess.run(["sh", "-c", claim_script(str(lock), "run-a", 60)], check=True)
    first.close()  # the old connection is gone
    other = Session(lock, "bob pid 2", "run-b")
    assert other.first.startswith("CLAIMED run-a ")
    assert 55 <= int(other.first.split()[-1]) <= 60
    assert other.rest().strip() == "alice pid 1"
    again = Session(lock, "alice pid 1", "run-a")  # the same run, its new connection
    assert again.first == "LOCKED"
    assert not (tmp_path / "homeclust.lock.claim").exists()  # taken over: claim gone
    again.close()


def test_an_expired_claim_or_someone_elses_unclaim_changes_nothing(tmp_path: Path) -> None:
    lock = tmp_path / "homeclust.lock"
    subprocess.run(["sh", "-c", claim_script(str(lock), "run-a", 0)], check=True)
    time.sleep(1.1)
    later = Session(lock, "bob pid 2", "run-b")  # the claiming run died long ago
    assert later.first == "LOCKED"
    later.close()
    subprocess.run(["sh", "-c", claim_script(str(lock), "run-a", 60)], check=True)
    subprocess.run(["sh", "-c", unclaim_script(str(lock), "run-b")], check=True)
    assert (tmp_path / "homeclust.lock.claim").exists()
    subprocess.run(["sh", "-c", unclaim_script(str(lock), "run-a")], check=True)
    assert not (tmp_path / "homeclust.lock.claim").exists()


def test_a_command_is_stopped_on_the_host_at_its_limit() -> None:
    """Hole 1: when homeclust gives up on a command, it must not go on running there."""
    host = SshHost(NODE, object(), sudo=False, command_timeout=900, channel_timeout=5)
    command = host._command(1).replace('"$SSH_CONNECTION"', "10.0.0.5 1 10.0.0.1 22")
    started = time.monotonic()
    done = subprocess.run(["sh", "-c", command], input="sleep 30; echo finished\n",
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 124 and "finished" not in done.stdout
    assert time.monotonic() - started < 5
    assert host._command(900).startswith("timeout -k 10 900 sh -s")
    sudo = SshHost(NODE, object(), sudo=True, command_timeout=900, channel_timeout=5)
    assert sudo._command(60).startswith("sudo -n -- timeout -k 10 60 sh -s")


class SilentChannel:
    """A channel whose server never answers the exec request (paramiko waits forever)."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    def exec_command(self, command: str) -> None:
        # paramiko's own wait ends only when the channel is closed.
        if not self.closed.wait(30):
            raise AssertionError("nobody closed the channel")
        raise EOFError("channel closed")

    def close(self) -> None:
        self.closed.set()


class Transport:
    def __init__(self, channel: SilentChannel) -> None:
        self.channel = channel

    def is_active(self) -> bool:
        return True

    def open_session(self, timeout: float) -> SilentChannel:
        return self.channel


class Connection:
    def __init__(self, transport: Any) -> None:
        self.transport = transport


def test_a_server_that_never_starts_the_command_does_not_hang_the_run() -> None:
    """Hole 12: exec_command had no time limit."""
    channel = SilentChannel()
    host = SshHost(NODE, Connection(Transport(channel)), sudo=False, command_timeout=900,
                   channel_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ConnectError, match="did not start the command within"):
        host.run("true")
    assert time.monotonic() - started < 5
