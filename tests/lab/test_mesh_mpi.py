"""ssh-keys and mpi on the lab: the key mesh as the cluster users see it, MPI jobs with real
data, idempotency, the admin's keys, a worker added, reboots, a wiped Open MPI, a
reinstalled worker.

One lab of its own (master + 3 workers) whose inventory first lists only two workers;
the tests run in file order and build on each other.  homeclust pins host keys in a
known_hosts file of this module's own, so resetting a node (new disk, new host key)
looks to homeclust exactly like a reinstalled machine.  What the tests assert is
observed inside the nodes (nsenter), as the cluster user where it matters.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import tomli_w

from homeclust.lab import Lab, LabInfo
from tests.lab.helpers import (
    failed_checks,
    homeclust,
    homeclust_json,
    inventory_copy,
    sh,
    statuses,
    wait_for_check,
)

pytestmark = pytest.mark.lab

WORKERS = ("worker1", "worker2", "worker3")
HAND_ADDED = ('command="/bin/true" ssh-ed25519 '
              "AAAAC3NzaC1lZDI1NTE5AAAAIBJGQF9Sx6DOHBqQIieqFjwlzIPk0vMkSogZBKc6drnG backup@nas")


class Mesh:
    """The module's lab and its two inventories (two workers, then all three)."""

    def __init__(self, lab: Lab, two: Path, three: Path) -> None:
        self.lab, self.two, self.three = lab, two, three


@pytest.fixture(scope="module")
def mesh(lab_factory: Callable[[Path], tuple[Lab, LabInfo]],
         tmp_path_factory: pytest.TempPathFactory) -> Mesh:
    tmp = tmp_path_factory.mktemp("mesh")
    lab, _ = lab_factory(inventory_copy(tmp, "mesh"))
    raw = tomllib.loads(lab.inventory_path.read_text())
    raw["ssh"]["known_hosts"] = str(tmp / "known_hosts")  # ours: lab.reset leaves it alone
    three = tmp / "three.toml"
    three.write_text(tomli_w.dumps(raw))
    raw["workers"] = raw["workers"][:2]
    two = tmp / "two.toml"
    two.write_text(tomli_w.dumps(raw))
    for node in ("master", "worker1"):
        sh(lab, node, f"mkdir -p /root/.ssh && printf '%s\\n' '{HAND_ADDED}' "
                      ">> /root/.ssh/authorized_keys")
    return Mesh(lab, two, three)


def as_hpc(lab: Lab, node: str, command: str) -> str:
    return sh(lab, node, f"runuser -u hpc -- sh -c '{command}' </dev/null", timeout=120)


def ssh_from(lab: Lab, node: str, target: str) -> str:
    """``ssh TARGET hostname`` as hpc; BatchMode turns any prompt into a failure."""
    return as_hpc(lab, node, f"ssh -o BatchMode=yes {target} hostname").strip()


def test_fresh_up_then_check_passes(mesh: Mesh) -> None:
    code, data = homeclust_json(mesh.two, "up", timeout=1200)
    assert code == 0, (data["host_errors"], [o for o in data["outcomes"] if o["error"]])
    assert statuses(data)[("master", "ssh-keys")] == "changed"
    code, data = homeclust_json(mesh.two, "check", timeout=600)
    assert code == 0, failed_checks(data)
    passed = {(c["host"], c["check"]) for c in data["checks"] if c["status"] == "pass"}
    for node in ("master", "worker1", "worker2"):
        assert (node, "ssh mesh (hpc)") in passed and (node, "ssh mesh (root)") in passed
    assert ("master", "mpi data exchange (hpc)") in passed
    # The same account on every node; worker3 is not in this inventory yet.
    ids = {n: sh(mesh.lab, n, "id hpc").strip() for n in ("master", "worker1", "worker2")}
    assert set(ids.values()) == {"uid=2000(hpc) gid=2000(hpc) groups=2000(hpc)"}
    assert sh(mesh.lab, "worker3", "id hpc", check=False) == ""


def test_the_cluster_user_reaches_every_node_by_name_and_address_without_a_prompt(
        mesh: Mesh) -> None:
    for target, expected in (("worker1", "worker1"), ("192.168.10.2", "worker1"),
                             ("master", "master"), ("192.168.10.1", "master")):
        assert ssh_from(mesh.lab, "worker2", target) == expected
    # The private key never left the cluster's hands: mode 600, the user's own.
    assert sh(mesh.lab, "worker2", "stat -c '%a %U' /home/hpc/.ssh/id_ed25519_homeclust"
              ).strip() == "600 hpc"


def test_a_second_up_changes_nothing(mesh: Mesh) -> None:
    code, data = homeclust_json(mesh.two, "up")
    assert code == 0, data["host_errors"]
    assert set(statuses(data).values()) == {"unchanged"}, statuses(data)


def test_the_admins_key_and_a_hand_added_key_survive(mesh: Mesh) -> None:
    admin = mesh.lab.admin_key_path.with_suffix(".pub").read_text().split()[1]
    for node in ("master", "worker1"):
        keys = sh(mesh.lab, node, "cat /root/.ssh/authorized_keys")
        assert admin in keys and HAND_ADDED in keys
        # Root's cluster key is accepted on the workers, from the master only; the master
        # accepts none for root.
        assert keys.count("BEGIN homeclust cluster key") == (node != "master")
        assert ('from="192.168.10.1" ssh-ed25519 ' in keys) == (node != "master")


def test_open_mpi_reads_the_pin_to_the_private_network(mesh: Mesh) -> None:
    for node in ("master", "worker2"):
        out = as_hpc(mesh.lab, node, "ompi_info --all --parsable")
        assert "mca:btl:tcp:param:btl_tcp_if_include:value:192.168.10.0/24" in out
        assert "mca:oob:tcp:param:oob_tcp_if_include:value:192.168.10.0/24" in out


def test_adding_a_worker_updates_every_node_and_the_next_job(mesh: Mesh) -> None:
    code, data = homeclust_json(mesh.three, "up", timeout=1200)
    assert code == 0, (data["host_errors"], [o for o in data["outcomes"] if o["error"]])
    for node in ("master", "worker1", "worker2", "worker3"):
        known = sh(mesh.lab, node, "cat /etc/ssh/ssh_known_hosts")
        assert "worker3,192.168.10.4 ssh-ed25519 " in known
        assert "worker3 slots=" in sh(mesh.lab, node, "cat /etc/openmpi/openmpi-default-hostfile")
    assert "worker3 slots=" in sh(mesh.lab, "master", "cat /home/hpc/hostfile")
    for target in ("worker1", "192.168.10.2"):
        assert ssh_from(mesh.lab, "worker3", target) == "worker1"
    # A plain job, no flags: the default hostfile now spans worker3 too.
    hosts = as_hpc(mesh.lab, "master", "mpirun --map-by ppr:1:node hostname")
    assert sorted(hosts.split()) == ["master", "worker1", "worker2", "worker3"]


def test_check_passes_again_after_rebooting_the_master_and_a_worker(mesh: Mesh) -> None:
    mesh.lab.reboot("master")
    mesh.lab.reboot("worker2")
    wait_for_check(mesh.three)


def test_wiped_open_mpi_is_restored_on_that_node_alone(mesh: Mesh) -> None:
    before = {n: sh(mesh.lab, n, "cat /etc/openmpi/openmpi-mca-params.conf")
              for n in ("master", "worker1", "worker3")}
    sh(mesh.lab, "worker2", "DEBIAN_FRONTEND=noninteractive apt-get purge -y -q openmpi-common "
                            ">/dev/null 2>&1; ! command -v mpirun", timeout=300)
    code, data = homeclust_json(mesh.three, "up", "--only", "mpi", "--host", "worker2",
                                timeout=900)
    assert code == 0, (data["host_errors"], [o for o in data["outcomes"] if o["error"]])
    assert statuses(data) == {("worker2", "mpi"): "changed"}
    assert "btl_tcp_if_include = 192.168.10.0/24" in sh(
        mesh.lab, "worker2", "cat /etc/openmpi/openmpi-mca-params.conf")
    assert {n: sh(mesh.lab, n, "cat /etc/openmpi/openmpi-mca-params.conf")
            for n in before} == before
    code, data = homeclust_json(mesh.three, "check", "--only", "mpi", timeout=600)
    assert code == 0, failed_checks(data)


def test_a_reinstalled_worker_is_refused_then_accepted_and_the_mesh_works_again(
        mesh: Mesh) -> None:
    mesh.lab.reset("worker2")  # new disk, new host key
    code, data = homeclust_json(mesh.three, "up", "--only", "ssh-keys")
    assert code == 1
    assert "has changed" in data["host_errors"]["worker2"]
    assert "homeclust accept-host-key worker2" in data["host_errors"]["worker2"]
    fingerprint = sh(mesh.lab, "worker2", "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub"
                     ).split()[1]
    wrong = homeclust(mesh.three, "accept-host-key", "worker2", "--fingerprint", "SHA256:nope")
    assert wrong.returncode == 1 and fingerprint in wrong.stderr
    done = homeclust(mesh.three, "accept-host-key", "worker2", "--fingerprint", fingerprint)
    assert done.returncode == 0, done.stderr
    code, data = homeclust_json(mesh.three, "up", timeout=1200)
    assert code == 0, (data["host_errors"], [o for o in data["outcomes"] if o["error"]])
    new_key = sh(mesh.lab, "worker2", "cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub").strip()
    for node in ("master", "worker1", "worker3"):
        assert f"worker2,192.168.10.3 ssh-ed25519 {new_key}" in sh(
            mesh.lab, node, "cat /etc/ssh/ssh_known_hosts")
    assert ssh_from(mesh.lab, "worker3", "worker2") == "worker2"
    code, data = homeclust_json(mesh.three, "check", timeout=600)
    assert code == 0, failed_checks(data)
