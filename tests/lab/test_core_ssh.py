"""The core against real sshd on the lab: facts through the master, failures, host keys, sudo."""

from __future__ import annotations

import json
import time
from pathlib import Path

import paramiko
import pytest
import tomli_w

from homeclust import api
from homeclust.errors import HostKeyChangedError
from homeclust.inventory import load_inventory
from homeclust.lab import Lab
from homeclust.runlog import RunLog
from homeclust.runner import Runner
from homeclust.transport import SshConnector
from tests.lab.helpers import homeclust, homeclust_json, sh, statuses

pytestmark = pytest.mark.lab


def facts_run(inventory_path: Path, log: Path) -> Runner:
    inventory = load_inventory(inventory_path)
    connector = SshConnector(inventory)
    runner = Runner(inventory, [], inventory.nodes, connector=connector, runlog=RunLog(log))
    try:
        runner.gather_all()
    finally:
        connector.close()
        runner.runlog.close()
    return runner


def test_facts_reach_every_worker_through_the_master_in_one_round_trip(
        lab: Lab, lab_inventory_path: Path, tmp_path: Path) -> None:
    runner = facts_run(lab_inventory_path, tmp_path / "log.jsonl")
    assert sorted(runner.facts) == ["master", "worker1", "worker2", "worker3"]
    for name, facts in runner.facts.items():
        assert facts.hostname == name
        assert facts.os.id == "debian"
    # Workers saw our session come from the master's private address: we jumped through it.
    for name in ("worker1", "worker2", "worker3"):
        peer = runner.facts[name].ssh_peer
        assert peer is not None and str(peer.client_address) == "192.168.10.1"
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    commands = [e for e in events if e["event"] == "command"]
    assert sorted(e["host"] for e in commands) == ["master", "worker1", "worker2", "worker3"]
    assert {e["purpose"] for e in commands} == {"facts"}
    # Host keys were pinned, one per node, each different.
    keys = [line.split()[2] for line in lab.known_hosts_path.read_text().splitlines() if line]
    assert len(keys) == 4 and len(set(keys)) == 4


def test_cli_facts_json(lab_inventory_path: Path) -> None:
    done = homeclust(lab_inventory_path, "facts", "--host", "worker3", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert list(data["facts"]) == ["worker3"]
    assert data["facts"]["worker3"]["interfaces"]["eth0"]["addresses"] == ["192.168.10.4/24"]


def test_worker_with_sshd_stopped_is_reported_and_the_others_complete(
        lab: Lab, lab_inventory_path: Path) -> None:
    sh(lab, "worker2", "systemctl stop ssh.service ssh.socket 2>/dev/null; true")
    try:
        started = time.monotonic()
        code, data = homeclust_json(lab_inventory_path, "plan")
        elapsed = time.monotonic() - started
        assert code == 1
        assert "worker2" in data["host_errors"]
        assert "could not connect" in data["host_errors"]["worker2"]
        assert set(data["host_errors"]) == {"worker2"}
        others = {o["host"] for o in data["outcomes"] if o["status"] != "skipped"}
        assert others == {"master", "worker1", "worker3"}
        assert elapsed < 60, f"a dead worker must not stall the run ({elapsed:.0f} s)"
    finally:
        sh(lab, "worker2", "systemctl start ssh.service")
        lab.wait_ssh("worker2")


def test_changed_host_key_is_refused_with_a_way_out(lab: Lab, lab_inventory_path: Path,
                                                    tmp_path: Path) -> None:
    data = load_inventory(lab_inventory_path)
    pinned = tmp_path / "known_hosts"
    other = paramiko.RSAKey.generate(2048)
    pinned.write_text(f"192.168.10.3 {other.get_name()} {other.get_base64()}\n")
    raw = _raw_inventory(lab_inventory_path)
    raw["ssh"]["known_hosts"] = str(pinned)
    path = tmp_path / "inventory.toml"
    path.write_text(tomli_w.dumps(raw))
    runner = facts_run(path, tmp_path / "log.jsonl")
    assert "worker2" not in runner.facts and "worker1" in runner.facts
    connector = SshConnector(load_inventory(path))
    try:
        with pytest.raises(HostKeyChangedError) as info:
            connector.open(data.nodes[2])
    finally:
        connector.close()
    message = str(info.value)
    assert "worker2" in message and "has changed" in message
    assert "homeclust accept-host-key worker2" in message


def _raw_inventory(path: Path) -> dict:  # type: ignore[type-arg]
    import tomllib

    return tomllib.loads(path.read_text())


def test_admin_user_with_passwordless_sudo(lab: Lab, lab_inventory_path: Path,
                                           tmp_path: Path) -> None:
    """`[ssh] user` other than root: every command runs through `sudo -n`."""
    key = lab.admin_key_path.with_suffix(".pub").read_text()
    setup = (
        "id hcadmin >/dev/null 2>&1 || useradd -m -s /bin/bash hcadmin; "
        "id hcnopw >/dev/null 2>&1 || useradd -m -s /bin/bash hcnopw; "
        "for u in hcadmin hcnopw; do mkdir -p /home/$u/.ssh; "
        f"printf '%s\\n' '{key.strip()}' > /home/$u/.ssh/authorized_keys; "
        "chown -R $u:$u /home/$u/.ssh; chmod 700 /home/$u/.ssh; done; "
        "echo 'hcadmin ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/hcadmin; "
        "echo 'hcnopw ALL=(ALL) ALL' > /etc/sudoers.d/hcnopw"
    )
    sh(lab, "master", setup)
    try:
        for user, expect_ok in (("hcadmin", True), ("hcnopw", False)):
            raw = _raw_inventory(lab_inventory_path)
            raw["ssh"]["user"] = user
            path = tmp_path / f"{user}.toml"
            path.write_text(tomli_w.dumps(raw))
            code, data = homeclust_json(path, "plan", "--host", "master", "--only", "firewall")
            if expect_ok:
                assert code in (0, 3), data
                assert data["host_errors"] == {}
            else:
                assert code == 1
                assert "sudo asks for a password" in data["host_errors"]["master"]
    finally:
        sh(lab, "master", "rm -f /etc/sudoers.d/hcadmin /etc/sudoers.d/hcnopw; "
                          "userdel -r hcadmin 2>/dev/null; userdel -r hcnopw 2>/dev/null; true")


def test_plan_sends_nothing_but_the_facts_script(lab_inventory_path: Path) -> None:
    inventory = load_inventory(lab_inventory_path)
    result = api.run("plan", lab_inventory_path, api.Options())
    assert result.log_path is not None
    events = [json.loads(line) for line in Path(result.log_path).read_text().splitlines()]
    purposes = {e["purpose"] for e in events if e["event"] == "command"}
    assert purposes == {"facts"}
    assert len([e for e in events if e["event"] == "command"]) == len(inventory.nodes)


def test_a_second_run_is_refused_while_one_holds_the_lock(lab: Lab,
                                                         lab_inventory_path: Path) -> None:
    inventory = load_inventory(lab_inventory_path)
    connector = SshConnector(inventory)
    try:
        master = connector.open(inventory.master_node)
        lock = master.hold_lock("/run/homeclust.lock", "another admin, pid 4242", "other-run")
        done = homeclust(lab_inventory_path, "up", "--only", "firewall", "--host", "master")
        assert done.returncode == 1
        assert "another homeclust run holds the cluster lock" in done.stdout + done.stderr
        assert "another admin, pid 4242" in done.stdout + done.stderr
        # plan and check only read: they do not need the lock.
        assert homeclust(lab_inventory_path, "plan", "--only", "firewall").returncode in (0, 3)
        lock.release()
    finally:
        connector.close()
    # Released (here: by closing the channel; a crashed run's connection drops the same way):
    # the next run takes the lock.  The master's firewall is the change (pristine lab).
    try:
        code, data = homeclust_json(lab_inventory_path, "up", "--only", "firewall", "--host",
                                    "master")
        assert code == 0, data
        assert statuses(data)[("master", "firewall")] == "changed"
    finally:
        lab.reset("master")  # the other lab tests expect a pristine master
