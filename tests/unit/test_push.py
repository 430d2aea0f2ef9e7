"""push-package: file checks, the script each host runs, its evaluation, refusals before any
copy, and the whole flow over the fake transport."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest

from homeclust import cli, push
from homeclust.errors import UsageError
from homeclust.inventory import Node
from homeclust.platforms import platform_of
from homeclust.transport import CommandResult
from tests.unit.factsbuilder import recorded
from tests.unit.fakes import Call, FakeCluster, FakeConnector, FakeHost

DEBIAN = platform_of(recorded("debian12-worker").facts())
CENTOS7 = platform_of(recorded("centos7-worker").facts())
ROCKY9 = platform_of(recorded("rocky9-master").facts())

DEB = push.DEB_MAGIC + b"\n2.0\n" + b"x" * 200
RPM = push.RPM_MAGIC + b"\x03\x00" + b"y" * 200

INVENTORY = """\
[cluster]
name = "push-test"
[ssh]
key = "/nonexistent/key"
[master]
name = "master"
address = "10.0.0.1"
private_address = "192.168.10.1"
[[workers]]
name = "worker1"
private_address = "192.168.10.2"
[[workers]]
name = "worker2"
private_address = "192.168.10.3"
"""


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- the file


def test_package_format_comes_from_the_content(tmp_path: Path) -> None:
    assert push.read_package(write(tmp_path, "a_1_all.deb", DEB)).format == "deb"
    assert push.read_package(write(tmp_path, "a-1.noarch.rpm", RPM)).format == "rpm"
    # a name without the usual suffix is fine; its content decides
    assert push.read_package(write(tmp_path, "download", RPM)).format == "rpm"


@pytest.mark.parametrize(("name", "data", "message"), [
    ("a.deb", RPM, "named .deb but its content is a .rpm package"),
    ("a.rpm", DEB, "named .rpm but its content is a .deb package"),
    ("a.deb", b"#!/bin/sh\necho hi\n", "not a .deb or .rpm package"),
    ("a.deb", b"", "not a .deb or .rpm package"),
])
def test_bad_files_are_usage_errors(tmp_path: Path, name: str, data: bytes, message: str
                                    ) -> None:
    with pytest.raises(UsageError, match=message):
        push.read_package(write(tmp_path, name, data))


def test_missing_file_and_directory_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        push.read_package(tmp_path / "nope.deb")
    with pytest.raises(UsageError, match="not a regular file"):
        push.read_package(tmp_path)


def test_format_problems_name_each_host_that_cannot_take_the_file(tmp_path: Path) -> None:
    rpm = push.read_package(write(tmp_path, "a.rpm", RPM))
    assert push.format_problems(rpm, {"worker1": DEBIAN, "worker2": ROCKY9}) == [
        "worker1 runs debian12, which installs .deb packages"]
    assert push.format_problems(rpm, {"worker2": CENTOS7}) == []


# --------------------------------------------------------------------------- the script


@pytest.mark.parametrize("platform", [DEBIAN, CENTOS7, ROCKY9])
def test_push_script_is_valid_shell_and_checks_the_copy(tmp_path: Path, platform: object
                                                        ) -> None:
    data = DEB if platform is DEBIAN else RPM
    package = push.read_package(write(tmp_path, "tool_1.0_all.deb" if data is DEB
                                      else "tool-1.0-1.noarch.rpm", data))
    script = push.push_script(package, platform)  # type: ignore[arg-type]
    sh = shutil.which("dash") or "sh"
    assert subprocess.run([sh, "-n"], input=script, text=True).returncode == 0
    assert package.sha256 in script
    assert base64.encodebytes(data).decode() in script
    if platform is DEBIAN:
        assert "apt-get install -y -q --allow-downgrades" in script
        assert "dpkg-deb -f" in script
    else:
        tool = "yum" if platform is CENTOS7 else "dnf"
        assert f"{tool} install -y -q" in script
    logged = push.log_form(package, script)
    assert base64.encodebytes(data).decode() not in logged
    assert f"<{len(data)} bytes of {package.path.name}>" in logged


def test_push_script_really_writes_the_file_and_verifies_it(tmp_path: Path) -> None:
    """Run the copy part of the script for real (install stubbed out)."""
    package = push.read_package(write(tmp_path, "tool_1.0_all.deb", DEB))
    script = push.push_script(package, DEBIAN)
    copy_part = script.split("[ \"$(sha256sum", 1)[0]
    check = ('[ "$(sha256sum "$d"/tool_1.0_all.deb | cut -c1-64)" = '
             f'{package.sha256} ] && echo intact')
    done = subprocess.run(["sh", "-c", copy_part.replace("/var/tmp/", f"{tmp_path}/") + check],
                          capture_output=True, text=True)
    assert done.stdout.strip() == "intact", done.stderr


def test_odd_file_names_are_not_sent_to_the_shell(tmp_path: Path) -> None:
    package = push.read_package(write(tmp_path, "we ird;rm -rf.deb", DEB))
    assert package.remote_name == "package.deb"
    assert "we ird" not in push.push_script(package, DEBIAN)


# --------------------------------------------------------------------------- evaluation


def test_evaluate_reports_the_installed_version() -> None:
    out = f"{push.MARKER} package tool 1.0-1\nSetting up tool (1.0-1) ...\n" \
          f"{push.MARKER} installed 1.0-1\n"
    assert push.evaluate("worker1", 0, out) == push.PushResult(
        "worker1", "installed", "tool", "1.0-1", "1.0-1")


def test_evaluate_failures() -> None:
    failed = push.evaluate("worker1", 100, f"{push.MARKER} package tool 1.0-1\n"
                                           "E: Unable to locate package libfoo\n")
    assert failed.status == "failed" and failed.error == "E: Unable to locate package libfoo"
    older = push.evaluate("worker1", 0, f"{push.MARKER} package tool 1.0-1\n"
                                        f"{push.MARKER} installed 2.0-1\n")
    assert older.status == "failed" and "is at 2.0-1 after installing 1.0-1" in (older.error or "")


# --------------------------------------------------------------------------- the whole flow


class PushingHost(FakeHost):
    def run(self, script: str, *, timeout: float | None = None,
            interruptible: bool = True) -> CommandResult:
        if script.startswith("# homeclust:push-package"):
            self.cluster.calls.append(Call(self.node.name, "push-package", 0.0))
            return CommandResult(0, f"{push.MARKER} package tool 1.0-1\n"
                                    f"{push.MARKER} installed 1.0-1\n", "", 0.0)
        return super().run(script, timeout=timeout, interruptible=interruptible)


class PushingConnector(FakeConnector):
    def open(self, node: Node) -> FakeHost:
        super().open(node)
        return PushingHost(self.cluster, node)


def test_push_installs_on_each_named_host_through_one_lock(tmp_path: Path) -> None:
    inv = write(tmp_path, "inventory.toml", INVENTORY.encode())
    deb = write(tmp_path, "tool_1.0-1_all.deb", DEB)
    cluster = FakeCluster()
    results = push.push_package(inv, deb, ["worker1,worker2"], connector=PushingConnector(cluster))
    assert [(r.host, r.status, r.installed) for r in results] == [
        ("worker1", "installed", "1.0-1"), ("worker2", "installed", "1.0-1")]
    assert sorted(c.host for c in cluster.calls if c.purpose == "push-package") == [
        "worker1", "worker2"]
    assert cluster.locks == ["master"] and cluster.lock_released == ["master"]


def test_a_file_of_the_wrong_family_is_refused_before_anything_is_copied(tmp_path: Path
                                                                         ) -> None:
    inv = write(tmp_path, "inventory.toml", INVENTORY.encode())
    rpm = write(tmp_path, "tool-1.0-1.noarch.rpm", RPM)
    cluster = FakeCluster()  # the fake hosts run Debian 12
    with pytest.raises(UsageError, match="worker1 runs debian12") as info:
        push.push_package(inv, rpm, ["worker1"], connector=PushingConnector(cluster))
    assert info.value.exit_code == 2
    assert set(cluster.purposes()) == {"facts"} and cluster.locks == []


def test_cli_exits_2_on_a_bad_file_without_contacting_anything(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]
                                                               ) -> None:
    inv = write(tmp_path, "inventory.toml", INVENTORY.encode())
    bogus = write(tmp_path, "tool.deb", b"not a package")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["-i", str(inv), "push-package", str(bogus), "--host", "worker1"])
    assert exit_info.value.code == 2
    assert "not a .deb or .rpm package" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["-i", str(inv), "push-package", str(bogus)])  # --host is required
    assert exit_info.value.code == 2
    good = write(tmp_path, "tool_1_all.deb", DEB)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["-i", str(inv), "push-package", str(good), "--host", "worker9"])
    assert exit_info.value.code == 2
    assert "unknown host 'worker9'" in capsys.readouterr().err
