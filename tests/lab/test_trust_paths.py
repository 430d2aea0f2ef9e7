"""Trust boundaries on the lab: what a cluster user plants in their home, and what root on a
worker can reach.

One lab of its own (master + 2 workers, the cluster user ``hpc``).  A cluster user is not an
admin: links in their home must never make root read, copy or overwrite something else,
and must never stop an admin's run.  A worker is an old machine on a private network: root
there must not be root on the master.  Everything is observed inside the nodes (nsenter),
as the cluster user where it matters; the tests run in file order.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from homeclust.lab import Lab, LabInfo
from tests.lab.helpers import failed_checks, homeclust, homeclust_json, inventory_copy, sh, statuses

pytestmark = pytest.mark.lab

KEY = "/home/hpc/.ssh/id_ed25519_homeclust"
ROOT_KEY = "/root/.ssh/id_ed25519_homeclust"
NODES = ("master", "worker1", "worker2")


class Trust:
    def __init__(self, lab: Lab, inventory: Path) -> None:
        self.lab, self.inventory = lab, inventory


@pytest.fixture(scope="module")
def trust(lab_factory: Callable[[Path], tuple[Lab, LabInfo]],
          tmp_path_factory: pytest.TempPathFactory) -> Trust:
    lab, _ = lab_factory(inventory_copy(tmp_path_factory.mktemp("trust"), "trust", workers=2))
    code, data = homeclust_json(lab.inventory_path, "up", "--only", "network,ssh-keys",
                                timeout=900)
    assert code == 0, (data["host_errors"], [o for o in data["outcomes"] if o["error"]])
    return Trust(lab, lab.inventory_path)


def as_hpc(lab: Lab, node: str, command: str, *, check: bool = True) -> str:
    return sh(lab, node, f"runuser -u hpc -- sh -c '{command}' </dev/null", check=check)


def ssh_as_root(lab: Lab, node: str, target: str) -> tuple[bool, str]:
    done = lab.exec(node, ["sh", "-c", f"ssh -n -o BatchMode=yes -o ConnectTimeout=5 {target} "
                                       "id -u"], check=False, timeout=60)
    return done.returncode == 0 and done.stdout.strip() == "0", done.stdout + done.stderr


def run_log(done_stdout: str) -> str:
    """The run log of a ``--json`` run (its path is in the output)."""
    return Path(json.loads(done_stdout)["log"]).read_text()


def test_links_a_cluster_user_plants_give_them_nothing_and_stop_nobody(trust: Trust) -> None:
    lab = trust.lab
    size = sh(lab, "master", "stat -c %s /etc/shadow").strip()
    # The key linked to root's key; authorized_keys linked to /etc/shadow by a path padded
    # to the shadow file's size (a size check alone would pass it); on worker1, the public
    # key linked to /etc/shadow (a plain link).
    as_hpc(lab, "master", f"rm -f {KEY} ~/.ssh/authorized_keys && ln -s {ROOT_KEY} {KEY} && "
                          f"p=/etc/shadow && while [ ${{#p}} -lt {size} ]; do p=/$p; done && "
                          "ln -s $p ~/.ssh/authorized_keys")
    as_hpc(lab, "worker1", f"rm -f {KEY}.pub && ln -s /etc/shadow {KEY}.pub")
    shadow_line = sh(lab, "master", "head -1 /etc/shadow").strip()
    assert shadow_line.startswith("root:")

    plan = homeclust(trust.inventory, "plan", "--only", "ssh-keys", "--json")
    assert plan.returncode == 3, plan.stdout + plan.stderr
    done = homeclust(trust.inventory, "up", "--only", "ssh-keys", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(done.stdout)
    assert statuses(data)[("master", "ssh-keys")] == "changed"
    for output in (plan.stdout, done.stdout, plan.stderr, done.stderr,
                   run_log(plan.stdout), run_log(done.stdout)):
        assert shadow_line not in output and "root:*:" not in output and "root:!" not in output

    for node in NODES:
        files = sh(lab, node, f"stat -c '%F %U %a %n' {KEY} {KEY}.pub "
                              "/home/hpc/.ssh/authorized_keys")
        assert files.split("\n")[:3] == [f"regular file hpc 600 {KEY}",
                                         f"regular file hpc 644 {KEY}.pub",
                                         "regular file hpc 600 /home/hpc/.ssh/authorized_keys"]
        assert "root:" not in as_hpc(lab, node, "cat ~/.ssh/authorized_keys ~/.ssh/*.pub")
        # hpc holds its own key, never root's, on any node.
        assert sh(lab, node, f"cmp -s {KEY} {ROOT_KEY} && echo same || echo different"
                  ).strip() == "different"
    # The master's root key never left the master.
    for node in ("worker1", "worker2"):
        assert sh(lab, node, f"ls {ROOT_KEY} 2>&1 || true").strip().endswith(
            "No such file or directory")
    again = homeclust(trust.inventory, "plan", "--only", "ssh-keys")
    assert again.returncode == 0, again.stdout + again.stderr


def test_an_ssh_directory_linked_to_roots_is_replaced_and_roots_is_untouched(
        trust: Trust) -> None:
    lab = trust.lab
    before = sh(lab, "worker1", "stat -c '%U %a' /root/.ssh; sha256sum /root/.ssh/*")
    as_hpc(lab, "worker1", "rm -rf ~/.ssh && ln -s /root/.ssh ~/.ssh")
    done = homeclust(trust.inventory, "up", "--only", "ssh-keys", "--host", "worker1", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert sh(lab, "worker1", "stat -c '%F %U %a' /home/hpc/.ssh").strip() == "directory hpc 700"
    assert sh(lab, "worker1", "stat -c '%U %a' /root/.ssh; sha256sum /root/.ssh/*") == before
    assert as_hpc(lab, "worker1", "ssh -n -o BatchMode=yes worker2 hostname").strip() == "worker2"


def test_root_trusts_from_the_master_to_the_workers_only(trust: Trust) -> None:
    lab = trust.lab
    for target in ("worker1", "192.168.10.3"):
        ok, output = ssh_as_root(lab, "master", target)
        assert ok, output
    for node, target in (("worker1", "master"), ("worker1", "192.168.10.1"),
                         ("worker1", "worker2"), ("worker2", "master")):
        ok, output = ssh_as_root(lab, node, target)
        assert not ok and "Permission denied" in output, (node, target, output)
    # The cluster users keep their mesh, in every direction.
    for node, target in (("worker1", "master"), ("worker2", "worker1"), ("master", "worker2")):
        assert as_hpc(lab, node, f"ssh -n -o BatchMode=yes {target} hostname").strip() == target
    code, data = homeclust_json(trust.inventory, "check", "--only", "ssh-keys", timeout=600)
    assert code == 0, failed_checks(data)
    names = {(c["host"], c["check"]) for c in data["checks"] if c["status"] == "pass"}
    assert {("master", "ssh mesh (root)"), ("worker1", "ssh mesh (root)")} <= names


def test_a_root_key_an_older_homeclust_copied_to_the_workers_is_replaced(trust: Trust) -> None:
    """An older homeclust copied root's cluster key to every worker and let the master accept
    it: the next up makes a new key that stays on the master, and the old one opens
    nothing anywhere."""
    lab = trust.lab
    old = "/root/old_homeclust_key"
    cluster = lab.plan.cluster
    sh(lab, "master", f"rm -f {ROOT_KEY} {ROOT_KEY}.pub && ssh-keygen -q -t ed25519 -N '' "
                      f"-C root@{cluster}-homeclust -f {ROOT_KEY} && cp {ROOT_KEY} {old}")
    key = sh(lab, "master", f"cat {ROOT_KEY}")
    pub = sh(lab, "master", f"cat {ROOT_KEY}.pub").strip()
    block = ("# BEGIN homeclust cluster key (ssh-keys step; lines inside are replaced)\n"
             f'from="192.168.10.0/24" {pub}\n# END homeclust cluster key\n')
    for node in NODES:
        sh(lab, node, f"printf '%s' '{key}' > {old} && chmod 600 {old} && "
                      f"sed -i '/BEGIN homeclust cluster key/,/END homeclust cluster key/d' "
                      f"/root/.ssh/authorized_keys && printf '%s' '{block}' >> "
                      "/root/.ssh/authorized_keys")
    sh(lab, "worker1", f"cp {old} {ROOT_KEY} && printf '%s\\n' '{pub}' > {ROOT_KEY}.pub")
    ok, output = sh_ok(lab, "worker1", f"ssh -n -o BatchMode=yes -i {old} master id -u")
    assert ok, output  # the state an older homeclust left: root on a worker is root on the master

    done = homeclust(trust.inventory, "up", "--only", "ssh-keys", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert sh(lab, "master", f"cmp -s {ROOT_KEY} {old} && echo same || echo new").strip() == "new"
    assert sh(lab, "worker1", f"ls {ROOT_KEY} 2>&1 || true").strip().endswith(
        "No such file or directory")
    for node, target in (("worker1", "master"), ("worker1", "worker2"), ("worker2", "worker1"),
                         ("master", "worker1")):
        # The old key alone (-F /dev/null: not the cluster key ssh_config names).
        ok, output = sh_ok(lab, node, f"ssh -n -F /dev/null -o BatchMode=yes "
                                      f"-o IdentitiesOnly=yes -i {old} {target} id -u")
        assert not ok and "Permission denied" in output, (node, target, output)
    ok, output = ssh_as_root(lab, "master", "worker1")
    assert ok, output
    again = homeclust(trust.inventory, "plan", "--only", "ssh-keys")
    assert again.returncode == 0, again.stdout + again.stderr


def sh_ok(lab: Lab, node: str, script: str) -> tuple[bool, str]:
    done = lab.exec(node, ["sh", "-c", script], check=False, timeout=60)
    return done.returncode == 0, done.stdout + done.stderr
