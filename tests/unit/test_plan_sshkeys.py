"""ssh-keys planning from recorded facts of both families: users, key pairs, the mesh files,
what is guarded, what is refused, what a run with --host can know."""

from __future__ import annotations

import pytest

from homeclust.changes import CommandChange, FileChange, PackagesChange, as_account, render_batch
from homeclust.errors import StepError
from homeclust.render.ssh import (
    AUTHORIZED_BEGIN,
    KNOWN_HOSTS,
    SSH_CONFIG,
    SSH_CONFIG_DROPIN,
)
from homeclust.steps.base import PlanContext, StepPlan
from homeclust.steps.sshkeys import SshKeysStep, accounts_fact, mesh_probe
from tests.unit.factsbuilder import FileRecord, LinkRecord
from tests.unit.meshfacts import INV, converged, facts, fresh, lab_inventory, mesh

STEP = SshKeysStep()
ROOT_KEY = "/root/.ssh/id_ed25519_homeclust"
HPC_KEY = "/home/hpc/.ssh/id_ed25519_homeclust"
ADMIN = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJLOwqWrAeCW8q88qYEOV5RHmV1ApMtza9n1P+hRr2Wt admin"


def plan(builder_facts: object, node: str, master: object = None, inv: object = INV,
         **cluster: object) -> StepPlan:
    ctx_cluster = dict(cluster)
    if master is not None:
        ctx_cluster["master"] = master
    return STEP.plan(PlanContext(inv, inv.node(node), builder_facts,  # type: ignore[arg-type, attr-defined]
                                 ctx_cluster))  # type: ignore[arg-type]


def files(result: StepPlan) -> dict[str, FileChange]:
    return {c.path: c for c in result.all_changes if isinstance(c, FileChange)}


@pytest.mark.parametrize("name", ["debian12-master", "rocky9-master"])
def test_fresh_master_creates_the_users_and_generates_the_key_pairs(name: str) -> None:
    result = plan(facts(fresh(name)), "master")
    commands = [c for c in result.changes if isinstance(c, CommandChange)]
    text = "\n".join(c.command for c in commands)
    assert "groupadd -g 2000 hpc" in text
    assert "useradd -m -d /home/hpc -u 2000 -g 2000 -s /bin/bash" in text
    for key, account in ((ROOT_KEY, "root"), (HPC_KEY, "hpc")):
        generate = next(c for c in commands if key in c.description)
        assert 'ssh-keygen -q -t ed25519 -N ""' in generate.command
        # Generated once, never replaced; a cluster user's by the user, in their own home.
        test = f"[ -f {key} ] && [ ! -L {key} ]"
        assert generate.unless == as_account(account, test)
        assert generate.command.startswith("hc_run_as hpc sh -c " if account == "hpc"
                                           else "rm -f ")
        assert f"-C {account}@try-km-homeclust{'-master-only' if account == 'root' else ''} " \
            in generate.command
    # The keys' public halves are not known yet: authorizing them is planned after.
    assert result.incomplete and result.guard is None and not result.guarded
    assert not any(AUTHORIZED_BEGIN in (c.content or "") for c in files(result).values())
    package = next(c for c in result.changes if isinstance(c, PackagesChange))
    assert package.packages == (("openssh-client",) if name.startswith("debian")
                                else ("openssh-clients",))


def test_the_master_accepts_no_cluster_key_for_root_its_file_changed_under_a_guard() -> None:
    """Root's trust goes from the master to the workers only: a cluster key block in the
    master's root ``authorized_keys`` (an older homeclust wrote one) is removed."""
    old_block = (f"{AUTHORIZED_BEGIN}\nfrom=\"192.168.10.0/24\" ssh-ed25519 "
                 "AAAAC3NzaC1lZDI1NTE5AAAAIHytqL+Xy5mIHRXEqJhFwihRjl4eteMLLrA4KJeNUkIC "
                 "root@try-km-homeclust\n# END homeclust cluster key\n")
    master = mesh("master").but(files={"/root/.ssh/authorized_keys": FileRecord(
        (ADMIN + "\n" + old_block + "# kept\n").encode(), 0o600)})
    result = plan(facts(master), "master")
    assert not result.incomplete
    assert result.guard is not None and result.guard.rollback_after > 0
    assert [c.path for c in result.guarded] == ["/root/.ssh/authorized_keys"]  # type: ignore[union-attr]
    root_file = result.guarded[0]
    assert isinstance(root_file, FileChange)
    assert root_file.content == ADMIN + "\n# kept\n"  # every other line stays
    assert result.changes == ()  # everything else was already in place
    # Without a block there is nothing to do.
    clean = mesh("master").but(files={"/root/.ssh/authorized_keys": FileRecord(
        (ADMIN + "\n").encode(), 0o600)})
    assert plan(facts(clean), "master").descriptions() == []


def test_a_cluster_users_authorized_keys_is_not_guarded() -> None:
    master = mesh("master").but(files={"/home/hpc/.ssh/authorized_keys": None})
    result = plan(facts(master), "master")
    assert result.guard is None
    change = files(result)["/home/hpc/.ssh/authorized_keys"]
    assert (change.owner, change.group, change.mode) == ("hpc", "hpc", 0o600)


def test_the_ssh_user_homeclust_logs_in_as_is_guarded_too() -> None:
    inv = lab_inventory(ssh={"user": "hpc", "key": "/nonexistent"})
    master = mesh("master").but(files={"/home/hpc/.ssh/authorized_keys": None})
    result = plan(facts(master), "master", inv=inv)
    assert [c.path for c in result.guarded] == ["/home/hpc/.ssh/authorized_keys"]  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["debian12-worker", "centos7-worker"])
def test_fresh_worker_gets_the_masters_key_pairs_as_secrets(name: str) -> None:
    master = facts(mesh("master"))
    result = plan(facts(fresh(name)), "worker1", master)
    planned = files(result)
    private = planned[HPC_KEY]
    assert private.secret and private.mode == 0o600 and private.owner == "hpc"
    assert private.run_as == "hpc" and planned[HPC_KEY + ".pub"].run_as == "hpc"
    assert private.content == master.file_text(HPC_KEY)
    assert "placeholder" not in private.diff()  # the diff never shows a secret
    assert "placeholder" not in render_batch(result.changes, redact=True)
    assert planned[HPC_KEY + ".pub"].content == master.file_text(HPC_KEY + ".pub")
    # Root's private key never leaves the master; root here accepts it from the master.
    assert ROOT_KEY not in planned and ROOT_KEY + ".pub" not in planned
    assert [c.path for c in result.guarded] == ["/root/.ssh/authorized_keys"]  # type: ignore[union-attr]
    root_file = result.guarded[0]
    assert isinstance(root_file, FileChange)
    root_pub = (master.file_text(ROOT_KEY + ".pub") or "").split()
    assert f'from="192.168.10.1" {root_pub[0]} {root_pub[1]} root@try-km-homeclust-master-only' \
        in (root_file.content or "")
    config = SSH_CONFIG if name.startswith("centos7") else SSH_CONFIG_DROPIN
    assert "IdentityFile ~/.ssh/id_ed25519_homeclust" in (planned[config].content or "")


def test_worker_before_the_master_has_keys_waits_with_a_warning() -> None:
    result = plan(facts(fresh("debian12-worker")), "worker1", facts(fresh("debian12-master")))
    assert any("master has no cluster key pair yet for root, hpc" in w for w in result.warnings)
    assert ROOT_KEY not in files(result) and not result.guarded


def test_known_hosts_from_every_nodes_facts_and_what_a_host_subset_cannot_know() -> None:
    master, worker = facts(mesh("master")), facts(mesh("worker"))
    # All nodes' facts: the file lists each node's host keys under name and address.
    captured = {"master": master, "worker1": worker}
    everyone = plan(facts(fresh("debian12-worker")), "worker1", **captured)
    content = files(everyone)[KNOWN_HOSTS].content or ""
    assert content.count("master,192.168.10.1 ") == 3 and content.count("worker1,192.168.10.2 ") == 3
    assert any("host keys of worker2, worker3 are unknown" in w for w in everyone.warnings)
    # --host worker1: the other workers' facts are not read; what the file says stays.
    subset = plan(worker, "worker1", master)
    assert KNOWN_HOSTS not in files(subset)
    assert subset.changes == () and subset.guard is None


def test_a_reinstalled_nodes_new_host_key_replaces_its_old_entries_everywhere() -> None:
    master = facts(mesh("master"))
    new_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBJGQF9Sx6DOHBqQIieqFjwlzIPk0vMkSogZBKc6NEWK\n"
    reinstalled = facts(mesh("worker").but(files={
        "/etc/ssh/ssh_host_ed25519_key.pub": new_key,
        "/etc/ssh/ssh_host_rsa_key.pub": None, "/etc/ssh/ssh_host_ecdsa_key.pub": None}))
    result = plan(master, "master", worker1=reinstalled)
    content = files(result)[KNOWN_HOSTS].content or ""
    assert [line for line in content.splitlines() if line.startswith("worker1,")] == [
        "worker1,192.168.10.2 " + new_key.strip()]
    assert content.count("worker2,192.168.10.3 ") == 3  # unselected nodes keep their keys


def test_uid_taken_by_another_account_is_refused_naming_node_and_owner() -> None:
    taken = fresh("debian12-worker").but(x_accounts=(
        "@passwd\nroot:x:0:0:root:/root:/bin/bash\nalice:x:2000:2000::/home/alice:/bin/bash\n"
        "@group\n@paths\n"))
    with pytest.raises(StepError) as info:
        plan(facts(taken), "worker2", facts(mesh("master")))
    assert "worker2: cluster user hpc: uid 2000 is already taken by 'alice'" in str(info.value)
    assert "nothing was changed" in str(info.value)


@pytest.mark.parametrize(("accounts", "message"), [
    ("hpc:x:1500:1500::/home/hpc:/bin/bash\n@group\n", "exists with uid 1500"),
    ("hpc:x:2000:2000::/srv/hpc:/bin/bash\n@group\nhpc:x:2000:\n", "exists with home /srv/hpc"),
    ("@group\nstaff:x:2000:\n", "gid 2000 is already taken by group 'staff'"),
])
def test_existing_accounts_that_differ_are_refused(accounts: str, message: str) -> None:
    text = "@passwd\nroot:x:0:0:root:/root:/bin/bash\n" + accounts
    with pytest.raises(StepError, match=message):
        plan(facts(fresh("debian12-master").but(x_accounts=text + "\n@paths\n")), "master")


def test_a_shell_change_is_applied_not_refused() -> None:
    accounts = mesh("master").sections["x-accounts"].replace(
        "/home/hpc:/bin/bash", "/home/hpc:/bin/sh")
    result = plan(facts(mesh("master").but(x_accounts=accounts)), "master")
    assert [c.command for c in result.changes if isinstance(c, CommandChange)] == [
        "usermod -s /bin/bash hpc"]
    assert len(result.changes) == 1


def test_accounts_are_asked_about_by_name_and_id_only() -> None:
    command = accounts_fact(INV).command
    assert "getent passwd root hpc 2000" in command
    assert "getent group hpc 2000" in command
    assert all(line.split()[:2] != ["getent", "passwd"] or len(line.split()) > 2
               for line in command.splitlines())


def test_converged_hosts_of_both_families_plan_nothing() -> None:
    master = facts(converged("debian12-master"))
    for name, node in (("debian12-master", "master"), ("debian12-worker", "worker1"),
                       ("rocky9-master", "master"), ("centos7-worker", "worker1")):
        result = plan(facts(converged(name)), node, master if node != "master" else None)
        assert result.descriptions() == [], (name, result.descriptions())


def test_mesh_probe_is_one_row_per_account_naming_what_fails() -> None:
    ctx = PlanContext(INV, INV.node("worker3"), facts(mesh("worker")), {})
    root, hpc = STEP.probes(ctx)
    assert (root.name, hpc.name) == ("ssh mesh (root)", "ssh mesh (hpc)")
    assert "BatchMode=yes" in hpc.script and "UserKnownHostsFile=/dev/null" in hpc.script
    assert "'hpc worker1'" in hpc.script and "'hpc 192.168.10.2'" in hpc.script
    assert "'hpc worker3'" not in hpc.script  # every *other* node
    ok = "".join(f"ok hpc {t}\n" for t in ("master", "192.168.10.1", "worker1", "192.168.10.2",
                                           "worker2", "192.168.10.3"))
    assert hpc.evaluate(0, ok).status == "pass"
    bad = ok.replace("ok hpc 192.168.10.3", "fail hpc 192.168.10.3 Host key verification failed.")
    item = hpc.evaluate(0, bad)
    assert item.status == "fail" and item.host == "worker3"
    assert item.detail == "worker2 by address: Host key verification failed."
    missing = hpc.evaluate(1, ok.replace("ok hpc master\n", ""))
    assert missing.detail == "master by name: no answer"
    assert mesh_probe(ctx, "root").evaluate(0, ok).status == "fail"  # hpc's results are not root's


# --------------------------------------------------------------------------- root's trust


def test_a_worker_holding_roots_cluster_key_loses_it() -> None:
    """An older homeclust copied root's key pair to every worker: root on any worker was root
    everywhere.  A worker keeps no copy (the removal never reads through a link either)."""
    old = mesh("master")
    worker = mesh("worker").but(files={
        ROOT_KEY: old.files[ROOT_KEY],
        ROOT_KEY + ".pub": LinkRecord("/etc/ssh/ssh_host_ed25519_key.pub")})
    result = plan(facts(worker), "worker1", facts(mesh("master")))
    removed = {c.path: c for c in result.changes if isinstance(c, FileChange) and c.content is None}
    assert set(removed) == {ROOT_KEY, ROOT_KEY + ".pub"}
    assert all(c.run_as is None for c in removed.values())
    assert removed[ROOT_KEY].secret and "placeholder" not in result.diff()
    assert "hc_absent /root/.ssh/id_ed25519_homeclust;" in render_batch(list(removed.values()))


def test_a_root_key_made_by_an_older_homeclust_is_replaced_once_and_workers_wait_for_it() -> None:
    old_pub = mesh("master").file_text(ROOT_KEY + ".pub").replace("-master-only", "")
    master = facts(mesh("master").but(files={ROOT_KEY + ".pub": old_pub}))
    result = plan(master, "master")
    rotate = next(c for c in result.changes if isinstance(c, CommandChange))
    assert "an older homeclust copied it to every worker" in rotate.description
    assert "rm -f /root/.ssh/id_ed25519_homeclust /root/.ssh/id_ed25519_homeclust.pub && " \
           "ssh-keygen" in rotate.command and "root@try-km-homeclust-master-only" in rotate.command
    assert rotate.unless == ("[ -f /root/.ssh/id_ed25519_homeclust ] && grep -q -- "
                             "root@try-km-homeclust-master-only /root/.ssh/id_ed25519_homeclust.pub")
    assert result.incomplete == "authorize the new cluster keys of root once they are generated"
    # A worker planned from that master does not authorize the old key again.
    worker = plan(facts(mesh("worker")), "worker1", master)
    assert "/root/.ssh/authorized_keys" not in files(worker)
    assert any("no cluster key pair yet for root" in w for w in worker.warnings)


def test_a_users_key_linked_elsewhere_on_the_master_is_replaced_by_a_new_pair() -> None:
    master = mesh("master").but(files={
        HPC_KEY: LinkRecord(ROOT_KEY, account="hpc"),
        "/home/hpc/hostfile": LinkRecord("/etc/shadow", account="hpc")})
    result = plan(facts(master), "master")
    generate = next(c for c in result.changes if isinstance(c, CommandChange))
    assert generate.description == (f"replace the symbolic link {HPC_KEY} (to {ROOT_KEY}) with "
                                    "a new cluster key pair of hpc")
    assert generate.command.startswith("hc_run_as hpc sh -c 'rm -f ")
    assert result.incomplete


def test_the_facts_of_a_users_files_come_from_their_own_read_and_only_for_their_paths() -> None:
    """What runs as the account cannot speak for root's files: records about other paths in
    its block are dropped."""
    query = STEP.fact_query(INV)
    assert ("hpc", HPC_KEY) in query.account_secret_paths
    assert ("hpc", "/home/hpc/.ssh/authorized_keys") in query.account_paths
    assert not any(p.startswith("/home/") for p in query.paths | query.secret_paths)
    forged = mesh("master").but(files={
        "/etc/ssh/ssh_known_hosts": FileRecord(b"forged\n", account="hpc"),
        "/home/hpc/.ssh/authorized_keys": FileRecord(b"theirs\n", 0o600, "hpc", "hpc",
                                                     account="hpc")})
    parsed = facts(forged)
    assert parsed.file_text("/home/hpc/.ssh/authorized_keys") == "theirs\n"
    assert "/etc/ssh/ssh_known_hosts" not in parsed.files  # not the root-read one either


def test_root_reaches_the_workers_from_the_master_and_the_master_refuses_it_from_a_worker(
        ) -> None:
    from homeclust.steps.sshkeys import mesh_trust

    worker = INV.node("worker2")
    assert mesh_trust(INV, worker, "root").reach == ()
    assert [n.name for n in mesh_trust(INV, worker, "root").refused] == ["master"]
    assert [n.name for n in mesh_trust(INV, INV.master_node, "root").reach] == [
        "worker1", "worker2", "worker3"]
    assert [n.name for n in mesh_trust(INV, worker, "hpc").reach] == [
        "master", "worker1", "worker3"]

    probe = mesh_probe(PlanContext(INV, worker, facts(mesh("worker")), {}), "root")
    assert "'root master'" in probe.script and "'root 192.168.10.1'" in probe.script
    assert "'root worker1'" not in probe.script
    refused = ("fail root master root@master: Permission denied (publickey).\n"
               "fail root 192.168.10.1 root@192.168.10.1: Permission denied (publickey).\n")
    item = probe.evaluate(0, refused)
    assert item.status == "pass" and "refused by master" in item.detail
    accepted = refused.replace("fail root master root@master: Permission denied (publickey).",
                               "ok root master")
    item = probe.evaluate(0, accepted)
    assert item.status == "fail" and item.detail == "master by name: accepted root from worker2"
    timeout = refused.replace("Permission denied (publickey).", "Connection timed out")
    assert "no refusal seen" in probe.evaluate(0, timeout).detail
