"""homeclust's pinned known_hosts, shared by runs at the same time: no run drops another's
pin (the host would be trusted on first use again), the first pin of a host wins, and a
first-use pin is told to the admin with its fingerprint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import paramiko
import pytest

from homeclust.transport import PinnedHostKeys, fingerprint


def key() -> paramiko.PKey:
    return paramiko.ECDSAKey.generate()


def on_disk(path: Path) -> dict[str, list[str]]:
    keys = paramiko.HostKeys(str(path))
    return {host: sorted(fingerprint(k) for k in found.values()) for host, found in keys.items()}


def test_two_runs_pinning_different_hosts_keep_both_pins(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    first, second = PinnedHostKeys(path), PinnedHostKeys(path)  # both read the file first
    k1, k2 = key(), key()
    first.pin("10.0.0.1", k1, "master")
    second.pin("192.168.10.2", k2, "worker1")
    assert on_disk(path) == {"10.0.0.1": [fingerprint(k1)], "192.168.10.2": [fingerprint(k2)]}
    # accept-host-key in a third run keeps what the others pinned meanwhile.
    third = PinnedHostKeys(path)
    k3 = key()
    first.pin("192.168.10.3", key(), "worker2")
    third.replace("192.168.10.2", k3, "worker1")
    assert set(on_disk(path)) == {"10.0.0.1", "192.168.10.2", "192.168.10.3"}
    assert on_disk(path)["192.168.10.2"] == [fingerprint(k3)]


def test_a_host_two_runs_meet_first_is_pinned_once_and_the_other_key_is_refused(
        tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    told: list[str] = []
    first, second, third = (PinnedHostKeys(path), PinnedHostKeys(path),
                            PinnedHostKeys(path, told.append))
    genuine, impostor = key(), key()
    first.pin("192.168.10.2", genuine, "worker1")
    with pytest.raises(paramiko.BadHostKeyException):
        second.pin("192.168.10.2", impostor, "worker1")
    assert on_disk(path) == {"192.168.10.2": [fingerprint(genuine)]}
    # The same key, seen by a third run, is simply known now: no first use to tell.
    third.pin("192.168.10.2", genuine, "worker1")
    assert told == []
    assert third.pinned("192.168.10.2")[0].asbytes() == genuine.asbytes()


def test_a_first_use_pin_is_told_with_its_fingerprint(tmp_path: Path) -> None:
    told: list[str] = []
    keys = PinnedHostKeys(tmp_path / "known_hosts", told.append)
    new = key()
    keys.pin("[127.0.0.1]:2222", new, "master")
    assert len(told) == 1
    assert told[0].startswith(f"master: first connection: pinned its host key "
                              f"{new.get_name()} {fingerprint(new)}")
    assert "ssh-keygen -lf /etc/ssh/ssh_host_ecdsa_key.pub" in told[0]


CHILD = """
import sys
from pathlib import Path
import paramiko
from homeclust.transport import PinnedHostKeys
keys = PinnedHostKeys(Path(sys.argv[1]))
sys.stdin.read()  # every run has read the file before any pins
for i in range(int(sys.argv[3])):
    keys.pin(f"192.168.{sys.argv[2]}.{i}", paramiko.ECDSAKey.generate(), f"node{i}")
"""


def test_runs_pinning_at_the_same_time_lose_no_pin(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    runs = [subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(n), "15"],
                             stdin=subprocess.PIPE, text=True) for n in range(6)]
    for run in runs:
        assert run.stdin is not None
        run.stdin.close()
    assert [run.wait(timeout=120) for run in runs] == [0] * 6
    assert len(on_disk(path)) == 6 * 15
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".known_hosts.")]
