"""Changes: the batch shell script run for real (dash and bash), its parsed outcomes, diffs.

Every file lives under pytest's ``tmp_path``; commands only touch files there.
``systemctl`` is replaced by a shell function defined before the batch (a
function wins over PATH), so service changes run without touching the machine.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from homeclust.changes import (
    CHANGE_MARKER,
    Change,
    ChangeOutcome,
    CommandChange,
    FileChange,
    PackagesChange,
    ServiceChange,
    change_shell,
    diff_text,
    parse_batch_output,
    render_batch,
)

SHELLS = [shell for shell in ("/bin/sh", "/bin/dash", "/bin/bash") if Path(shell).exists()]
if Path("/bin/sh").resolve() in {Path(s).resolve() for s in SHELLS if s != "/bin/sh"}:
    SHELLS.remove("/bin/sh")  # the same shell twice adds nothing

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root"),
    pytest.mark.skipif(not all(shutil.which(c) for c in ("base64", "cmp", "stat")),
                       reason="needs coreutils and diffutils"),
]


@dataclass
class Run:
    code: int
    output: str
    outcomes: list[ChangeOutcome]

    @property
    def statuses(self) -> list[str]:
        return [o.status for o in self.outcomes]


def run(changes: Sequence[Change], tmp_path: Path, shell: str, *, stop_on_failure: bool = True,
        before: str = "") -> Run:
    script = before + render_batch(changes, stop_on_failure=stop_on_failure)
    result = subprocess.run([shell], input=script, capture_output=True, text=True, timeout=30)
    assert result.stderr == ""  # the batch sends everything to stdout (exec 2>&1)
    return Run(result.returncode, result.stdout, parse_batch_output(result.stdout, len(changes)))


@pytest.fixture(params=SHELLS)
def shell(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def owner_of(path: Path) -> tuple[str, str, int]:
    st = path.stat()
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, st.st_mode & 0o7777


def other_user() -> tuple[str, str]:
    """A non-root user and group that exist here (Debian has daemon:daemon)."""
    for user, group in (("daemon", "daemon"), ("nobody", "nogroup"), ("nobody", "nobody")):
        try:
            pwd.getpwnam(user)
            grp.getgrnam(group)
        except KeyError:
            continue
        return user, group
    pytest.skip("no unprivileged user/group to chown to")


# --------------------------------------------------------------------------- files


def test_file_is_created_with_mode_and_owner_then_unchanged(tmp_path: Path, shell: str) -> None:
    user, group = other_user()
    path = tmp_path / "etc" / "app" / "app.conf"  # the directories do not exist yet
    content = "key = \"$HOME\" `id` $(reboot) \\n 'quoted'\nünïcode ✓\nno newline at the end"
    change = FileChange(str(path), content, None, mode=0o640, owner=user, group=group)

    first = run([change], tmp_path, shell)
    assert (first.code, first.statuses) == (0, ["changed"])
    assert path.read_text() == content
    assert owner_of(path) == (user, group, 0o640)
    inode = path.stat().st_ino

    second = run([change], tmp_path, shell)
    assert (second.code, second.statuses) == (0, ["unchanged"])
    assert path.stat().st_ino == inode  # not rewritten
    assert sorted(p.name for p in path.parent.iterdir()) == ["app.conf"]  # no temp file left


def test_mode_or_owner_difference_alone_is_a_change(tmp_path: Path, shell: str) -> None:
    path = tmp_path / "rules.v4"
    path.write_text("*filter\nCOMMIT\n")
    path.chmod(0o644)
    change = FileChange(str(path), "*filter\nCOMMIT\n", "*filter\nCOMMIT\n", mode=0o600)
    assert run([change], tmp_path, shell).statuses == ["changed"]
    assert owner_of(path) == ("root", "root", 0o600)
    assert run([change], tmp_path, shell).statuses == ["unchanged"]


def test_empty_file(tmp_path: Path, shell: str) -> None:
    path = tmp_path / "empty"
    path.write_text("something")
    change = FileChange(str(path), "", "something")
    assert run([change], tmp_path, shell).statuses == ["changed"]
    assert path.read_bytes() == b""
    assert run([change], tmp_path, shell).statuses == ["unchanged"]


def test_file_removal(tmp_path: Path, shell: str) -> None:
    path = tmp_path / "ifcfg-System_eth0"
    path.write_text("DEVICE=eth0\n")
    link = tmp_path / "dangling.yaml"
    link.symlink_to(tmp_path / "nowhere")
    changes: list[Change] = [FileChange(str(path), None, "DEVICE=eth0\n"), FileChange(str(link), None, None)]
    assert run(changes, tmp_path, shell).statuses == ["changed", "changed"]
    assert not path.exists() and not link.is_symlink()
    assert run(changes, tmp_path, shell).statuses == ["unchanged", "unchanged"]


def test_unwritable_file_fails_the_batch(tmp_path: Path, shell: str) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    changes: list[Change] = [FileChange(str(blocker / "file"), "x\n", None),
               CommandChange("after", f"touch {tmp_path}/after")]
    result = run(changes, tmp_path, shell)
    assert (result.code, result.statuses) == (1, ["failed", "not-run"])
    assert not (tmp_path / "after").exists()


# --------------------------------------------------------------------------- guards


def test_when_changed_runs_only_after_the_file_really_changed(tmp_path: Path, shell: str) -> None:
    config = tmp_path / "interfaces"
    marker = tmp_path / "reapplied"
    changes: list[Change] = [
        FileChange(str(config), "auto eth0\n", None),
        CommandChange("re-apply", f"echo reapplying; touch {marker}", when_changed=(str(config),)),
        CommandChange("unrelated trigger", f"touch {tmp_path}/other",
                      when_changed=(str(tmp_path / "some-other-file"),)),
    ]
    first = run(changes, tmp_path, shell)
    assert first.statuses == ["changed", "changed", "skipped"]
    assert marker.exists() and first.outcomes[1].output == "reapplying"
    assert not (tmp_path / "other").exists()
    marker.unlink()
    second = run(changes, tmp_path, shell)
    assert second.statuses == ["unchanged", "skipped", "skipped"]
    assert not marker.exists()


def test_when_changed_sees_removals_too(tmp_path: Path, shell: str) -> None:
    old = tmp_path / "eth0.nmconnection"
    old.write_text("[connection]\n")
    changes: list[Change] = [FileChange(str(old), None, "[connection]\n"),
               CommandChange("reload", "echo reloaded", when_changed=(str(old),))]
    assert run(changes, tmp_path, shell).statuses == ["changed", "changed"]
    assert run(changes, tmp_path, shell).statuses == ["unchanged", "skipped"]


def test_unless_skips_when_the_test_succeeds(tmp_path: Path, shell: str) -> None:
    done = tmp_path / "done"
    change = CommandChange("create once", f"echo ran >> {tmp_path}/log; touch {done}",
                           unless=f"test -e {done}")
    assert run([change], tmp_path, shell).statuses == ["changed"]
    assert run([change], tmp_path, shell).statuses == ["unchanged"]
    assert (tmp_path / "log").read_text() == "ran\n"


def test_unless_and_when_changed_together(tmp_path: Path, shell: str) -> None:
    config = tmp_path / "conf"
    change = CommandChange("restart", "echo restarted", unless="false",
                           when_changed=(str(config),))
    file = FileChange(str(config), "a\n", None)
    assert run([file, change], tmp_path, shell).statuses == ["changed", "changed"]
    assert run([file, change], tmp_path, shell).statuses == ["unchanged", "skipped"]
    guarded = CommandChange("restart", "echo restarted", unless="true", when_changed=(str(config),))
    config.unlink()
    assert run([file, guarded], tmp_path, shell).statuses == ["changed", "unchanged"]


# --------------------------------------------------------------------------- failures


def test_a_failing_command_stops_the_batch(tmp_path: Path, shell: str) -> None:
    changes: list[Change] = [
        CommandChange("first", "echo one"),
        CommandChange("breaks", "echo boom >&2; exit_code=3; (exit $exit_code)"),
        CommandChange("never", f"touch {tmp_path}/never"),
        FileChange(str(tmp_path / "never.conf"), "x\n", None),
    ]
    result = run(changes, tmp_path, shell)
    assert result.code == 1
    assert result.statuses == ["changed", "failed", "not-run", "not-run"]
    assert result.outcomes[0].output == "one"
    assert result.outcomes[1].output == "boom"  # stderr is captured with the change
    assert not (tmp_path / "never").exists() and not (tmp_path / "never.conf").exists()


def test_without_stop_on_failure_the_batch_goes_on(tmp_path: Path, shell: str) -> None:
    changes: list[Change] = [CommandChange("breaks", "false"), CommandChange("next", "echo next")]
    result = run(changes, tmp_path, shell, stop_on_failure=False)
    assert (result.code, result.statuses) == (0, ["failed", "changed"])


def test_warn_on_failure_warns_and_continues(tmp_path: Path, shell: str) -> None:
    changes: list[Change] = [
        CommandChange("set conntrack_max", "echo 'sysctl: permission denied'; false",
                      warn_on_failure="could not set net.netfilter.nf_conntrack_max"),
        CommandChange("next", "echo next"),
    ]
    result = run(changes, tmp_path, shell)
    assert (result.code, result.statuses) == (0, ["warned", "changed"])
    assert result.outcomes[0].output == (
        "sysctl: permission denied\nwarning: could not set net.netfilter.nf_conntrack_max")


# --------------------------------------------------------------------------- commands


def test_multi_line_command_with_a_heredoc(tmp_path: Path, shell: str) -> None:
    table = '*filter\n-A INPUT -j LOG --log-prefix "drop $USER: "\nCOMMIT\n'
    target = tmp_path / "restored"
    change = CommandChange("load", f"cat > {target} <<'HOMECLUST_RULES_EOF'\n{table}"
                                   "HOMECLUST_RULES_EOF\necho loaded")
    changes: list[Change] = [change, CommandChange("next", "true")]
    result = run(changes, tmp_path, shell)
    assert result.statuses == ["changed", "changed"]
    assert target.read_text() == table


def test_service_changes_run_through_systemctl(tmp_path: Path, shell: str) -> None:
    log = tmp_path / "systemctl.log"
    fake = f'systemctl() {{ echo "$*" >> {log}; }}\n'
    config = tmp_path / "jail.local"
    changes: list[Change] = [
        ServiceChange("firewalld", enable=False, action="stop", mask=True),
        ServiceChange("iptables", enable=True),
        FileChange(str(config), "[sshd]\n", None),
        ServiceChange("fail2ban", action="restart", when_changed=(str(config),)),
    ]
    result = run(changes, tmp_path, shell, before=fake)
    assert result.statuses == ["changed", "changed", "changed", "changed"]
    assert log.read_text().splitlines() == [
        "disable firewalld", "mask firewalld", "stop firewalld",
        "unmask iptables", "enable iptables",
        "restart fail2ban",
    ]
    log.unlink()
    again = run(changes, tmp_path, shell, before=fake)
    assert again.statuses == ["changed", "changed", "unchanged", "skipped"]
    assert "restart fail2ban" not in log.read_text()


def test_packages_change_runs_the_preseed_first(tmp_path: Path, shell: str) -> None:
    log = tmp_path / "order"
    change = PackagesChange(("iptables-persistent",), f"echo install >> {log}",
                            preseed=f"echo preseed >> {log}")
    assert run([change], tmp_path, shell).statuses == ["changed"]
    assert log.read_text() == "preseed\ninstall\n"
    failing = PackagesChange(("x",), f"echo install >> {log}", preseed="false")
    assert run([failing], tmp_path, shell).statuses == ["failed"]
    assert log.read_text() == "preseed\ninstall\n"  # no install after a failed preseed


# --------------------------------------------------------------------------- pure parts


def test_parse_batch_output_assigns_output_to_each_change() -> None:
    output = (
        "line one\nline two\n"
        f"\n{CHANGE_MARKER} 0 changed\n"
        f"\n{CHANGE_MARKER} 1 unchanged\n"
        "partial line without newline"
        f"\n{CHANGE_MARKER} 2 warned\n"
        "oops\n"
        f"\n{CHANGE_MARKER} 3 failed\n"
    )
    assert parse_batch_output(output, 6) == [
        ChangeOutcome(0, "changed", "line one\nline two"),
        ChangeOutcome(1, "unchanged", ""),
        ChangeOutcome(2, "warned", "partial line without newline"),
        ChangeOutcome(3, "failed", "oops"),
        ChangeOutcome(4, "not-run", ""),
        ChangeOutcome(5, "not-run", ""),
    ]


def test_parse_batch_output_of_nothing_is_all_not_run() -> None:
    assert [o.status for o in parse_batch_output("", 2)] == ["not-run", "not-run"]


def test_file_diffs() -> None:
    created = FileChange("/etc/hostname", "master\n", None)
    assert created.diff() == "--- /dev/null\n+++ /etc/hostname\n@@ -0,0 +1 @@\n+master\n"
    assert created.description == "create /etc/hostname"
    updated = FileChange("/etc/hosts", "127.0.0.1 localhost\n192.168.10.2 worker1\n",
                         "127.0.0.1 localhost\n127.0.1.1 worker1\n")
    assert updated.diff() == (
        "--- /etc/hosts\n+++ /etc/hosts\n@@ -1,2 +1,2 @@\n 127.0.0.1 localhost\n"
        "-127.0.1.1 worker1\n+192.168.10.2 worker1\n")
    assert updated.description == "update /etc/hosts"
    removed = FileChange("/etc/netplan/00-installer-config.yaml", None, "network:\n",
                         reason="taken over by homeclust")
    assert removed.diff() == (
        "--- /etc/netplan/00-installer-config.yaml\n+++ /dev/null\n@@ -1 +0,0 @@\n-network:\n")
    assert removed.description == "remove /etc/netplan/00-installer-config.yaml"
    mode_only = FileChange("/etc/iptables/rules.v4", "x\n", "x\n", mode=0o600,
                           reason="mode 644 -> 600")
    assert mode_only.diff() == (
        "--- /etc/iptables/rules.v4\n+++ /etc/iptables/rules.v4\n# mode 644 -> 600\n")
    assert mode_only.description == "update /etc/iptables/rules.v4 (mode 644 -> 600)"
    assert FileChange("/x", "same\n", "same\n").diff() == ""


def test_diff_text_lists_every_change() -> None:
    text = diff_text([
        FileChange("/etc/hostname", "master\n", None),
        PackagesChange(("iptables-nft", "iptables-services"), "dnf install -y …"),
        ServiceChange("firewalld", enable=False, action="stop", mask=True),
        ServiceChange("networking", action="restart", when_changed=("/etc/network/interfaces",)),
        CommandChange("set net.ipv4.ip_forward = 1 (now 0)", "sysctl -w net.ipv4.ip_forward=1"),
    ])
    assert text == (
        "--- /dev/null\n+++ /etc/hostname\n@@ -0,0 +1 @@\n+master\n"
        "# install iptables-nft iptables-services\n"
        "# mask and stop firewalld\n"
        "# restart networking (if /etc/network/interfaces changed)\n"
        "# set net.ipv4.ip_forward = 1 (now 0)\n"
    )


def test_change_shell_quotes_unit_names_and_paths() -> None:
    assert change_shell(ServiceChange("ifup@eth0.service", action="restart")) == (
        "systemctl restart ifup@eth0.service")
    assert change_shell(ServiceChange("odd name", enable=True)).startswith(
        "systemctl unmask 'odd name'")
    assert change_shell(ServiceChange("x")) == "true"
    assert change_shell(FileChange("/tmp/a b", None, None)) == "hc_absent '/tmp/a b'"


def test_file_path_with_a_space_is_written(tmp_path: Path) -> None:
    path = tmp_path / "dir with space" / "file name.conf"
    change = FileChange(str(path), "ok\n", None)
    assert run([change], tmp_path, "/bin/sh").statuses == ["changed"]
    assert path.read_text() == "ok\n"


from homeclust.facts import FileFact, HostFacts  # noqa: E402


def test_a_file_too_big_to_diff_is_compared_by_hash() -> None:
    import hashlib

    from homeclust.steps.base import file_change

    content = "x" * 10 + "\n"
    big = FileFact("/etc/big", 0o644, "root", "root", hashlib.sha256(b"other").hexdigest(), None)
    facts = parse_facts_with_file(big)
    change = file_change(facts, "/etc/big", content)
    assert change is not None and change.description.startswith("update /etc/big")
    same = FileFact("/etc/big", 0o644, "root", "root",
                    hashlib.sha256(content.encode()).hexdigest(), None)
    assert file_change(parse_facts_with_file(same), "/etc/big", content) is None


def parse_facts_with_file(fact: FileFact) -> HostFacts:
    from dataclasses import replace

    from tests.unit.factsbuilder import recorded

    facts = recorded("debian12-worker").facts()
    return replace(facts, files={**facts.files, "/etc/big": fact})
