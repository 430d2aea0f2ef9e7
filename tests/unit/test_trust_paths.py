"""Root never acts through paths a cluster user controls: run for real, under ``sh``, here.

A cluster user owns their home.  What they plant there -- a symbolic link to root's key or to
``/etc/shadow``, a link at the path the write helper would use, ``~/.ssh`` swapped for a link
to a directory of root's -- must never make root read, copy, overwrite or chown anything
else, and must never stop the run.  Each test builds that situation in a scratch directory
of its own in ``/var/tmp`` (a home owned by an unprivileged account of this machine,
``daemon``; a "vault" directory of root's standing for ``/root/.ssh`` or ``/etc``), gathers
the facts with
the real facts script, plans with the real step and runs the part of the batch that concerns
the home with the real shell.  Nothing outside that directory is written.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from homeclust.changes import Change, CommandChange, FileChange, render_batch
from homeclust.facts import FactQuery, HostFacts, gather_script, parse_facts
from homeclust.inventory import Inventory, UserSpec
from homeclust.steps import sshkeys
from homeclust.steps.base import PlanContext, StepPlan
from homeclust.steps.mpi import MpiStep
from homeclust.steps.sshkeys import SshKeysStep
from tests.unit.meshfacts import lab_inventory

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, another account)"),
    pytest.mark.skipif(not all(shutil.which(c) for c in ("stat", "base64", "setpriv",
                                                         "ssh-keygen")),
                       reason="needs coreutils, util-linux and ssh-keygen"),
]

ACCOUNT = "daemon"  # an unprivileged account every Debian/RHEL machine has
VAULT_TEXT = "root:$6$SECRET-HASH-OF-ROOT:19000:0:99999:7:::\n" * 4
KEY = "id_ed25519_homeclust"


def account_ids() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(ACCOUNT)
    except KeyError:
        pytest.skip(f"no account {ACCOUNT!r} here")
    return entry.pw_uid, entry.pw_gid


@dataclasses.dataclass
class Sandbox:
    home: Path
    vault: Path  # root's, mode 700: stands for /root/.ssh or /etc
    secret: Path  # a root-only file in the vault
    uid: int
    gid: int

    def owned(self, path: Path, mode: int) -> Path:
        os.lchown(path, self.uid, self.gid)
        if not path.is_symlink():
            path.chmod(mode)
        return path

    def padded_link(self, link: Path) -> str:
        """A link to the secret whose target is exactly as long as the secret (so the
        size stat reports for the link matches what reading through it gives)."""
        target = "/" * (len(VAULT_TEXT) - len(str(self.secret))) + str(self.secret)
        assert len(target) == len(VAULT_TEXT)
        link.symlink_to(target)
        self.owned(link, 0o777)
        return target

    def vault_state(self) -> list[tuple[str, int, int, int, str]]:
        return [(p.name, p.stat().st_uid, p.stat().st_gid, p.stat().st_mode & 0o7777,
                 p.read_text()) for p in sorted([self.vault, *self.vault.iterdir()])
                if p.is_file()] + [("vault", self.vault.stat().st_uid, 0,
                                    self.vault.stat().st_mode & 0o7777, "")]


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory of root's that the account may walk through (pytest's own are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="homeclust-trust-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def sandbox(base: Path, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    uid, gid = account_ids()
    vault = base / "vault"
    vault.mkdir(mode=0o700)
    secret = vault / "shadow"
    secret.write_text(VAULT_TEXT)
    secret.chmod(0o600)
    home = base / "home"
    home.mkdir()
    box = Sandbox(home, vault, secret, uid, gid)
    box.owned(home, 0o755)
    # The cluster user of the inventory is this machine's unprivileged account, living in
    # the sandbox's home; its account is taken as it is (creating users is not tested here).
    monkeypatch.setattr(UserSpec, "home", property(lambda self: str(home)))
    monkeypatch.setattr(sshkeys, "account_changes", lambda *args: [])
    return box


def inventory_with_account() -> Inventory:
    inv = lab_inventory()
    return dataclasses.replace(inv, users=(UserSpec(ACCOUNT, *account_ids(), "/bin/sh"),))


def gather(query: FactQuery) -> tuple[str, HostFacts]:
    done = subprocess.run(["/bin/sh", "-s", "10.77.0.50 51234 10.77.0.10 22"],
                          input=gather_script(query), capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout, parse_facts(done.stdout, query)


def in_home(plan: StepPlan, home: Path) -> list[Change]:
    """The planned changes that concern the sandbox's home (nothing else is run here)."""
    return [c for c in plan.all_changes
            if (isinstance(c, FileChange) and c.path.startswith(f"{home}/"))
            or (isinstance(c, CommandChange) and str(home) in c.command)]


def run_batch(changes: list[Change]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/sh"], input=render_batch(changes), capture_output=True,
                          text=True, timeout=60)


def assert_never_seen(text: str) -> None:
    """Neither the vault's secret nor its base64 appear in ``text``."""
    assert "SECRET-HASH-OF-ROOT" not in text
    assert base64.b64encode(VAULT_TEXT.encode()).decode()[:24] not in text


# --------------------------------------------------------------------------- facts


def test_the_facts_report_a_link_as_a_link_and_never_read_through_it(sandbox: Sandbox,
                                                                      base: Path) -> None:
    plain = sandbox.home / "hostfile"
    plain.symlink_to(sandbox.secret)
    padded = sandbox.home / "authorized_keys"
    padded_target = sandbox.padded_link(padded)
    secret_link = sandbox.home / KEY
    secret_link.symlink_to(sandbox.secret)
    # A link the platform means (Ubuntu's /etc/resolv.conf), relative, to a readable file.
    run = base / "run"
    run.mkdir()
    (run / "stub-resolv.conf").write_text("nameserver 127.0.0.53\n")
    resolv = base / "resolv.conf"
    resolv.symlink_to("run/stub-resolv.conf")
    regular = base / "hosts"
    regular.write_text("127.0.0.1 localhost\n")
    query = FactQuery(paths=frozenset({str(plain), str(padded), str(resolv), str(regular)}),
                      secret_paths=frozenset({str(secret_link)}))

    output, facts = gather(query)  # a plain link no longer makes the whole read fail

    assert_never_seen(output)
    assert facts.file_text(str(regular)) == "127.0.0.1 localhost\n"
    assert not {str(plain), str(padded), str(secret_link), str(resolv)} & set(facts.files)
    assert facts.links == {str(plain): str(sandbox.secret), str(padded): padded_target,
                           str(secret_link): str(sandbox.secret),
                           str(resolv): "run/stub-resolv.conf"}


# --------------------------------------------------------------------------- the write helper


def test_a_link_planted_at_the_write_helpers_temp_path_is_never_followed(
        sandbox: Sandbox) -> None:
    """``<path>.homeclust-tmp.<pid>`` was guessable: with a link there, root's ``>`` and
    ``chown`` overwrote and gave away whatever it pointed to."""
    before = sandbox.vault_state()
    target = sandbox.home / "hostfile"
    change = FileChange(str(target), "master slots=4\n", None, owner=ACCOUNT, group=ACCOUNT)
    shell = subprocess.Popen(["/bin/sh"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    planted = sandbox.home / f"hostfile.homeclust-tmp.{shell.pid}"
    planted.symlink_to(sandbox.secret)
    sandbox.owned(planted, 0o777)
    shell.communicate(render_batch([change]), timeout=60)

    assert sandbox.vault_state() == before  # not overwritten, not chowned, same mode
    assert planted.is_symlink()


def test_root_never_writes_into_a_directory_someone_else_controls(sandbox: Sandbox) -> None:
    """The helper refuses a root write whose directory is not root's alone (the steps write
    users' files as the user); ``run_as`` writes it as its owner."""
    before = sandbox.vault_state()
    target = sandbox.home / "hostfile"
    as_root = run_batch([FileChange(str(target), "master slots=4\n", None, owner=ACCOUNT,
                                    group=ACCOUNT)])
    assert as_root.returncode == 1 and not target.exists()
    assert f"{sandbox.home} is not root's alone" in as_root.stdout
    # As the account: written, the account's own, through nothing.
    (sandbox.home / "link-dir").symlink_to(sandbox.vault)
    changes: list[Change] = [
        FileChange(str(target), "master slots=4\n", None, owner=ACCOUNT, group=ACCOUNT,
                   run_as=ACCOUNT),
        FileChange(str(sandbox.home / "link-dir" / "shadow"), "x\n", None, owner=ACCOUNT,
                   group=ACCOUNT, run_as=ACCOUNT),
    ]
    done = run_batch(changes)
    assert target.read_text() == "master slots=4\n"
    assert (target.stat().st_uid, target.stat().st_mode & 0o777) == (sandbox.uid, 0o644)
    assert done.returncode == 1 and "Permission denied" in done.stdout  # not through the link
    assert sandbox.vault_state() == before


# --------------------------------------------------------------------------- ssh-keys


def plan_master(step: SshKeysStep | MpiStep, inv: Inventory) -> tuple[str, StepPlan]:
    output, facts = gather(step.fact_query(inv))
    return output, step.plan(PlanContext(inv, inv.master_node, facts, {}))


def test_a_key_linked_to_roots_key_is_replaced_by_the_users_own(sandbox: Sandbox) -> None:
    """Live on a lab: ``ln -s /root/.ssh/id_ed25519_homeclust ~/.ssh/id_ed25519_homeclust`` made
    root copy its own key into the user's file (and to every worker)."""
    ssh_dir = sandbox.home / ".ssh"
    ssh_dir.mkdir()
    sandbox.owned(ssh_dir, 0o700)
    (ssh_dir / KEY).symlink_to(sandbox.secret)
    sandbox.owned(ssh_dir / KEY, 0o777)
    before = sandbox.vault_state()

    output, plan = plan_master(SshKeysStep(), inventory_with_account())
    assert_never_seen(output)
    assert_never_seen(plan.diff() + "\n".join(plan.descriptions()))
    done = run_batch(in_home(plan, sandbox.home))
    assert done.returncode == 0, done.stdout

    key = ssh_dir / KEY
    assert not key.is_symlink() and key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY")
    assert (key.stat().st_uid, key.stat().st_mode & 0o777) == (sandbox.uid, 0o600)
    assert sandbox.vault_state() == before


def test_an_ssh_directory_linked_to_a_directory_of_roots_is_replaced(sandbox: Sandbox) -> None:
    (sandbox.vault / KEY).write_text("ROOT'S OWN KEY\n")
    (sandbox.vault / KEY).chmod(0o600)
    (sandbox.home / ".ssh").symlink_to(sandbox.vault)
    sandbox.owned(sandbox.home / ".ssh", 0o777)
    before = sandbox.vault_state()

    output, plan = plan_master(SshKeysStep(), inventory_with_account())
    assert "ROOT'S OWN KEY" not in output
    done = run_batch(in_home(plan, sandbox.home))
    assert done.returncode == 0, done.stdout

    ssh_dir = sandbox.home / ".ssh"
    assert ssh_dir.is_dir() and not ssh_dir.is_symlink()
    assert (ssh_dir.stat().st_uid, ssh_dir.stat().st_mode & 0o777) == (sandbox.uid, 0o700)
    assert (ssh_dir / KEY).stat().st_uid == sandbox.uid
    assert sandbox.vault_state() == before


def test_an_ssh_directory_swapped_for_a_link_after_the_facts_is_not_chowned_through(
        sandbox: Sandbox) -> None:
    """``~/.ssh`` owned by root when the facts are read (the plan gives it to the user); the
    user swaps in a link to a directory of root's before the change runs."""
    ssh_dir = sandbox.home / ".ssh"
    ssh_dir.mkdir(mode=0o755)
    _, plan = plan_master(SshKeysStep(), inventory_with_account())
    assert any("make" in d and ".ssh" in d for d in plan.descriptions()), plan.descriptions()
    ssh_dir.rmdir()
    ssh_dir.symlink_to(sandbox.vault)
    sandbox.owned(ssh_dir, 0o777)
    before = sandbox.vault_state()

    run_batch(in_home(plan, sandbox.home))

    assert sandbox.vault_state() == before  # neither chowned, chmodded nor written into
    assert not (sandbox.vault / KEY).exists()


# --------------------------------------------------------------------------- mpi


def test_a_hostfile_linked_to_a_secret_neither_leaks_it_nor_stops_the_run(
        sandbox: Sandbox) -> None:
    """Live on a lab: ``~/hostfile`` linked to ``/etc/shadow``: a plain link failed every run
    on the master ("a managed file changed while the facts were read"), a padded one put
    the file in the plan's diff and the log."""
    sandbox.padded_link(sandbox.home / "hostfile")
    before = sandbox.vault_state()

    output, plan = plan_master(MpiStep(), inventory_with_account())
    assert_never_seen(output)
    assert_never_seen(plan.diff())
    hostfile = next(c for c in in_home(plan, sandbox.home) if isinstance(c, FileChange))
    done = run_batch([hostfile])
    assert done.returncode == 0, done.stdout

    written = sandbox.home / "hostfile"
    assert not written.is_symlink() and written.read_text() == hostfile.content
    assert written.stat().st_uid == sandbox.uid
    assert sandbox.vault_state() == before


# --------------------------------------------------------------------------- torque's check


def test_the_torque_check_reads_the_jobs_output_as_the_user(sandbox: Sandbox) -> None:
    """The job's output file is the user's: root reading it back (``cat`` in /tmp, a fixed
    name) followed a link the user put there into any file.  Here qsub is a stand-in that,
    as the user, links the output path to the vault's secret instead of running a job;
    runuser is emulated with setpriv so that the stand-in is found."""
    from homeclust.steps.torque import job_probe

    inv = inventory_with_account()
    probe = job_probe(inv.master_node, ACCOUNT, ["master"])
    fake = sandbox.vault.parent / "bin"
    fake.mkdir()
    (fake / "qsub").write_text(
        "#!/bin/sh\nwhile [ $# -gt 0 ]; do [ \"$1\" = -o ] && out=$2; shift; done\n"
        f"ln -sf {sandbox.secret} \"$out\"\n")
    (fake / "runuser").write_text(  # runuser -u USER -- CMD..., keeping PATH
        '#!/bin/sh\nu=$2; shift 3\n'
        'exec setpriv --reuid="$u" --regid="$(id -g "$u")" --clear-groups -- "$@"\n')
    for tool in ("qsub", "runuser"):
        (fake / tool).chmod(0o755)
    done = subprocess.run(["/bin/sh"], input=probe.script, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"})
    assert_never_seen(done.stdout + done.stderr)
    assert not Path("/tmp/homeclust-check.out").is_symlink()


@pytest.mark.parametrize(("layout", "allowed"), [
    ({"a": (0o755, "root")}, True),
    ({"a": (0o775, "root")}, True),  # writable by root's group only
    ({"a": (0o2775, "staff")}, True),  # Debian's root-equivalent staff (/usr/local)
    ({"a": (0o775, ACCOUNT)}, False),  # another group could swap what it holds
    ({"a": (0o1777, "root"), "a/b": (0o755, "root")}, True),  # sticky (/tmp) above
    ({"a": (0o1777, "root")}, False),  # ... but not the directory written into
    ({"a": (0o757, "root")}, False),
])
def test_root_writes_only_where_every_directory_is_roots_alone(
        base: Path, layout: dict[str, tuple[int, str]], allowed: bool) -> None:
    import grp

    for relative, (mode, group) in layout.items():
        directory = base / relative
        directory.mkdir()
        try:
            os.chown(directory, 0, grp.getgrnam(group).gr_gid)
        except KeyError:
            pytest.skip(f"no group {group} here")
        directory.chmod(mode)
    target = base / max(layout, key=len) / "file.conf"
    done = run_batch([FileChange(str(target), "x\n", None)])
    assert (done.returncode == 0) == allowed, done.stdout
    assert target.exists() == allowed
    if not allowed:
        assert "is not root's alone" in done.stdout
