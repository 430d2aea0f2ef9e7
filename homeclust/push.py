"""``homeclust push-package FILE --host NAME[,NAME]``: the guide's copy-and-install path.

The guide downloads a package on the master, copies it to a worker with
``scp`` and installs it with ``rpm -ivh``.  Here one package file from the
admin's machine is copied to each named host -- to workers through the
master, over the master's SSH connection (the only way in) -- and installed
with the platform's own tool, so its dependencies come from the host's
package sources (on workers: the master's repository).  Then the installed
version is read back and reported.

Refused before anything is copied (exit 2): a file that is not a ``.deb`` or
``.rpm`` package (by content, and its name must agree), and a file whose
format does not match a host's family.  A host that fails to install is
exit 1; the others are still done.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shlex
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from homeclust import DEFAULT_FORKS, api
from homeclust.errors import HomeclustError, UsageError
from homeclust.output import LineReporter, QuietReporter
from homeclust.platforms import Platform, platform_of
from homeclust.runlog import RunLog
from homeclust.runner import LOCK_PATH, Runner, lock_owner
from homeclust.transport import Connector, SshConnector

PackageFormat = Literal["deb", "rpm"]

#: ``ar`` archive whose first member is debian-binary / the RPM lead's magic number.
DEB_MAGIC = b"!<arch>\ndebian-binary"
RPM_MAGIC = b"\xed\xab\xee\xdb"
#: Sent inside one script (base64): packages, not disk images.
MAX_SIZE = 256 * 1024 * 1024
MARKER = "@@homeclust-push@@"


@dataclass(frozen=True)
class PackageFile:
    path: Path
    format: PackageFormat
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def remote_name(self) -> str:
        """The file's name on the host: its own if plain, else a neutral one."""
        name = self.path.name
        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+~%-]*", name) and name.endswith(
                f".{self.format}"):
            return name
        return f"package.{self.format}"


def read_package(path: Path) -> PackageFile:
    """The package file, or UsageError saying what is wrong with it (nothing contacted)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise UsageError(f"push-package: {path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"push-package: {path}: {exc.strerror}") from None
    if not path.is_file():
        raise UsageError(f"push-package: {path}: not a regular file")
    if size > MAX_SIZE:
        raise UsageError(f"push-package: {path}: {size} bytes; at most {MAX_SIZE} "
                         "(put big packages in [repo] packages instead)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"push-package: {path}: {exc.strerror}") from None
    found: PackageFormat | None = ("deb" if data.startswith(DEB_MAGIC)
                                   else "rpm" if data.startswith(RPM_MAGIC) else None)
    if found is None:
        raise UsageError(f"push-package: {path}: not a .deb or .rpm package (by its content)")
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("deb", "rpm") and suffix != found:
        raise UsageError(f"push-package: {path}: named .{suffix} but its content is a "
                         f".{found} package")
    return PackageFile(path, found, data)


def format_problems(package: PackageFile, platforms: dict[str, Platform]) -> list[str]:
    """Hosts whose package format is not the file's, as sentences (empty: all fit)."""
    return [f"{host} runs {platform.name}, which installs .{platform.package_format} packages"
            for host, platform in platforms.items() if platform.package_format != package.format]


def push_script(package: PackageFile, platform: Platform) -> str:
    """Write the file to a private temporary directory on the host, install it with the
    platform's tool (dependencies from the host's package sources), report versions."""
    encoded = base64.encodebytes(package.data).decode()
    file = f'"$d"/{shlex.quote(package.remote_name)}'
    if platform.family == "debian":
        options = ("-y -q --allow-downgrades -o Dpkg::Options::=--force-confdef "
                   "-o Dpkg::Options::=--force-confold")
        install = f"DEBIAN_FRONTEND=noninteractive apt-get install {options} {file}"
        # Try with the current package lists first, like every install homeclust does.
        install = f"{install} || {{ apt-get update -q && {install}; }}"
        describe = (f'name=$(dpkg-deb -f {file} Package) && '
                    f'version=$(dpkg-deb -f {file} Version)')
        installed = "dpkg-query -W -f='${Version}\\n' \"$name\""
    else:
        tool = "yum" if platform.major == 7 else "dnf"
        install = f"{tool} install -y -q {file}"
        describe = (f"name=$(rpm -qp --nosignature --qf '%{{NAME}}' {file}) && "
                    f"version=$(rpm -qp --nosignature --qf '%{{VERSION}}-%{{RELEASE}}' {file})")
        installed = "rpm -q --qf '%{VERSION}-%{RELEASE}\\n' \"$name\""
    return f"""\
d=$(mktemp -d /var/tmp/homeclust-push.XXXXXX) || exit 1
trap 'rm -rf "$d"' EXIT
base64 -d > {file} <<'HOMECLUST_PACKAGE_EOF' || exit 1
{encoded}HOMECLUST_PACKAGE_EOF
[ "$(sha256sum {file} | cut -c1-64)" = {package.sha256} ] || {{ echo "the copy is damaged"; exit 1; }}
{describe} || exit 1
echo "{MARKER} package $name $version"
{install} || exit 1
echo "{MARKER} installed $({installed})"
"""


def log_form(package: PackageFile, script: str) -> str:
    """The script as the run log shows it: the package's bytes left out."""
    encoded = base64.encodebytes(package.data).decode()
    return script.replace(encoded, f"<{len(package.data)} bytes of {package.path.name}>\n")


@dataclass
class PushResult:
    host: str
    status: Literal["installed", "failed"]
    package: str | None = None
    version: str | None = None  # the file's
    installed: str | None = None  # what the host has now
    error: str | None = None


def evaluate(host: str, exit_code: int, output: str) -> PushResult:
    """What one host's push script reported (pure)."""
    name = version = installed = None
    for line in output.splitlines():
        words = line.split()
        if len(words) >= 4 and words[:2] == [MARKER, "package"]:
            name, version = words[2], words[3]
        elif len(words) >= 2 and words[:2] == [MARKER, "installed"]:
            installed = " ".join(words[2:]) or None
    lines = [line for line in output.strip().splitlines() if not line.startswith(MARKER)]
    if exit_code != 0:
        return PushResult(host, "failed", name, version, installed,
                          "; ".join(lines[-3:]) or f"exit {exit_code}")
    if installed is None or version is None or version not in installed.split():
        return PushResult(host, "failed", name, version, installed,
                          f"{name} is at {installed or 'nothing'} after installing {version} "
                          "(is a newer version installed?)")
    return PushResult(host, "installed", name, version, version)


def push_package(inventory_path: str | Path, file: Path, hosts: Sequence[str], *,
                 forks: int = DEFAULT_FORKS,
                 as_json: bool = False, connector: Connector | None = None
                 ) -> list[PushResult]:
    """Copy and install ``file`` on ``hosts``; UsageError (nothing copied) on bad input."""
    package = read_package(file)
    prepared = api.prepare(inventory_path, api.Options(hosts=hosts, forks=forks))
    if not hosts:
        raise UsageError("push-package: name the hosts with --host NAME[,NAME]")
    reporter = QuietReporter() if as_json else LineReporter()
    runlog = RunLog.for_run(prepared.inventory.state_dir, "push-package")
    owned = connector is None
    connector = connector or SshConnector(prepared.inventory, on_retry=reporter.message,
                                          on_first_use=api.first_use_notice(reporter))
    runner = Runner(prepared.inventory, [], prepared.nodes, connector=connector,
                    reporter=reporter, runlog=runlog, forks=forks)
    try:
        gathered = runner.gather_all()
        results = [PushResult(host, "failed", error=error)
                   for host, error in gathered.host_errors.items()]
        platforms = {node.name: platform_of(runner.facts[node.name])
                     for node in prepared.nodes if node.name in runner.facts}
        problems = format_problems(package, platforms)
        if problems:
            raise UsageError(f"push-package: {file.name} is a .{package.format} package, but "
                             + "; ".join(problems), hint="nothing was copied")
        if not platforms:
            return results
        lock = connector.open(prepared.inventory.master_node).hold_lock(
            LOCK_PATH, lock_owner(), runner.run_id)
        try:
            def push(node_name: str) -> None:
                node = prepared.inventory.node(node_name)
                try:
                    host = connector.open(node)
                    script = push_script(package, platforms[node_name])
                    reporter.message(f"{node_name}: copying {file.name} "
                                     f"({len(package.data)} bytes) and installing it")
                    done = runner.run_script(host, "push-package", script,
                                             log_script=log_form(package, script))
                    result = evaluate(node_name, done.exit_code, done.stdout + done.stderr)
                except HomeclustError as exc:
                    result = PushResult(node_name, "failed", error=str(exc))
                results.append(result)

            with ThreadPoolExecutor(max_workers=max(1, min(forks, len(platforms)))) as pool:
                list(pool.map(push, list(platforms)))
        finally:
            lock.release()
    finally:
        if owned:
            connector.close()
        runlog.close()
    order = {node.name: index for index, node in enumerate(prepared.nodes)}
    return sorted(results, key=lambda r: order.get(r.host, len(order)))


def execute(inventory_path: str | Path, file: Path, hosts: Sequence[str], *, forks: int,
            as_json: bool) -> int:
    """The CLI command: push, print the outcome, return the exit code (0 all installed,
    1 a host failed; bad input raises UsageError, exit 2)."""
    results = push_package(inventory_path, file, hosts, forks=forks, as_json=as_json)
    failed = any(r.status != "installed" for r in results)
    if as_json:
        print(json.dumps({"file": str(file), "results": [asdict(r) for r in results]}, indent=2))
        return 1 if failed else 0
    rows = [(r.host, r.package or "?", r.installed or "-",
             "installed" if r.status == "installed" else f"FAILED: {r.error or ''}")
            for r in results]
    widths = [max(len(row[i]) for row in [("host", "package", "installed", ""), *rows])
              for i in range(3)]
    for row in [("host", "package", "installed", ""), *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
              + "  " + row[3])
    return 1 if failed else 0
