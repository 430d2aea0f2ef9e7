"""Thin, careful wrappers around the system tools the lab drives.

Every external command runs with a timeout and turns failure into a
:class:`~homeclust.errors.LabError` that shows the command and its output.
Processes are tracked by PID *and* start time (a PID file alone could name a
recycled PID), and only those are ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

from homeclust.errors import LabError

NETNS_DIR = Path("/run/netns")

# The processes this Python process started, so they can be reaped (and only
# they: waitpid(-1) would steal the exit status of other code's subprocesses).
_spawned: dict[int, subprocess.Popen[bytes]] = {}
DEFAULT_TIMEOUT = 30.0

REQUIRED_TOOLS = ("ip", "nsenter", "systemd-nspawn", "debootstrap", "mount", "umount",
                  "socat", "dnsmasq", "ssh-keygen")


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, raise LabError on failure or timeout."""
    try:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, input=input,
            env=dict(env) if env is not None else None, check=False,
        )
    except subprocess.TimeoutExpired:
        raise LabError(f"command timed out after {timeout:g} s: {_show(argv)}") from None
    except FileNotFoundError:
        raise LabError(
            f"command not found: {argv[0]}", hint="run scripts/setup to install the lab's tools"
        ) from None
    if check and result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        raise LabError(
            f"command failed (exit {result.returncode}): {_show(argv)}"
            + (f"\n{output}" if output else "")
        )
    return result


def _show(argv: Sequence[str]) -> str:
    return " ".join(argv)


def missing_tools(tools: Iterable[str] = REQUIRED_TOOLS) -> list[str]:
    return [tool for tool in tools if shutil.which(tool) is None]


# --------------------------------------------------------------------------
# Network namespaces
# --------------------------------------------------------------------------


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def netns_add(name: str) -> None:
    run(["ip", "netns", "add", name])


def netns_delete(name: str) -> None:
    if netns_exists(name):
        run(["ip", "netns", "delete", name])


def netns_inode(name: str) -> int | None:
    try:
        return os.stat(NETNS_DIR / name).st_ino
    except OSError:
        return None


def ip_batch(netns: str, commands: Sequence[str]) -> None:
    """Run several ``ip`` commands in one process inside ``netns`` (fast, all-or-error)."""
    run(["ip", "-n", netns, "-batch", "-"], input="\n".join(commands) + "\n")


def in_netns(netns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped to run in a named network namespace (keeps this mount namespace)."""
    return ["nsenter", f"--net={netns_path(netns)}", "--", *argv]


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessId:
    """A process identified beyond doubt: its PID and its start time in clock ticks."""

    pid: int
    start: int

    def to_text(self) -> str:
        return f"{self.pid} {self.start}\n"

    @classmethod
    def from_text(cls, text: str) -> ProcessId | None:
        fields = text.split()
        if len(fields) != 2 or not all(f.isdigit() for f in fields):
            return None
        return cls(int(fields[0]), int(fields[1]))


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after it.
    after = raw[raw.rfind(")") + 2 :].split()
    return after  # after[0] is field 3 (state)


def process_start(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22: starttime


def identify(pid: int) -> ProcessId | None:
    start = process_start(pid)
    return ProcessId(pid, start) if start is not None else None


def is_running(proc: ProcessId | None) -> TypeGuard[ProcessId]:
    """True while the very process we started exists and is not a zombie."""
    if proc is None:
        return False
    fields = _stat_fields(proc.pid)
    if fields is None or int(fields[19]) != proc.start:
        return False
    return fields[0] not in ("Z", "X")


def read_pidfile(path: Path) -> ProcessId | None:
    try:
        return ProcessId.from_text(path.read_text())
    except OSError:
        return None


def write_pidfile(path: Path, proc: ProcessId) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(proc.to_text())
    tmp.replace(path)


def children(pid: int) -> list[int]:
    result: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return result
    for task in tasks:
        with contextlib.suppress(OSError):
            result.extend(int(c) for c in (task / "children").read_text().split())
    return result


def spawn(
    argv: Sequence[str], log_file: Path, pidfile: Path, *, cwd: Path | None = None
) -> ProcessId:
    """Start a long-running process detached from us, logging to ``log_file``.

    Its own session, so a Ctrl-C in the terminal that ran ``lab up`` does not
    reach it; the PID file is written at once so ``down`` finds it even if we crash.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        try:
            process = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=cwd, close_fds=True,
            )
        except FileNotFoundError:
            raise LabError(
                f"command not found: {argv[0]}", hint="run scripts/setup to install the lab's tools"
            ) from None
    _spawned[process.pid] = process
    proc = identify(process.pid) or ProcessId(process.pid, -1)
    write_pidfile(pidfile, proc)
    return proc


def terminate(proc: ProcessId | None, timeout: float = 10.0) -> bool:
    """SIGTERM the process we started, wait, SIGKILL if needed.  True if it had been running."""
    if not is_running(proc):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    if wait_gone([proc], timeout):
        return True
    kill([proc])
    wait_gone([proc], 5.0)
    return True


def end_all(procs: Sequence[ProcessId | None], timeout: float = 10.0) -> int:
    """SIGTERM every process of ``procs`` still running, wait, SIGKILL the rest.

    Returns how many were running.
    """
    running = [p for p in procs if is_running(p)]
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
    if not wait_gone(running, timeout):
        kill(running)
        wait_gone(running, 5.0)
    return len(running)


def kill(procs: Iterable[ProcessId | None]) -> None:
    for proc in procs:
        if is_running(proc):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)


def wait_gone(procs: Sequence[ProcessId | None], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(is_running(p) for p in procs):
        _reap()
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _reap() -> None:
    """Collect exited processes we started so they do not linger as zombies."""
    for pid, process in list(_spawned.items()):
        if process.poll() is not None:
            del _spawned[pid]


def processes_in_netns(inodes: set[int]) -> list[ProcessId]:
    """Every process whose network namespace is one of ``inodes`` (the lab's own)."""
    found: list[ProcessId] = []
    for entry in _proc_pids():
        try:
            inode = os.stat(f"/proc/{entry}/ns/net").st_ino
        except OSError:
            continue
        if inode in inodes:
            proc = identify(entry)
            if proc is not None:
                found.append(proc)
    return found


def processes_mentioning(text: str, programs: Iterable[str],
                         python_module: str = "homeclust.lab") -> list[ProcessId]:
    """Lab processes in the root namespace whose PID file was never written.

    The crash fallback: a process of one of ``programs`` (or ``python -m
    python_module ...``) whose command line names ``text``, the lab's own
    state directory.  Anything else (a homeclust run or an ssh session that
    merely mentions a lab file) is left alone.
    """
    names = set(programs)
    me = os.getpid()
    found: list[ProcessId] = []
    for pid in _proc_pids():
        if pid == me:
            continue
        try:
            argv = [a.decode(errors="replace")
                    for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if not argv or not argv[0]:
            continue
        ours = os.path.basename(argv[0]) in names or argv[1:3] == ["-m", python_module]
        if ours and any(text in arg for arg in argv[1:]):
            proc = identify(pid)
            if proc is not None:
                found.append(proc)
    return found


def _proc_pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


# --------------------------------------------------------------------------
# Mounts
# --------------------------------------------------------------------------


def mount_points() -> list[Path]:
    """Mount points of this mount namespace (octal escapes in mountinfo decoded)."""
    points: list[Path] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if len(fields) > 4:
            points.append(Path(_unescape(fields[4])))
    return points


def _unescape(text: str) -> str:
    return text.encode().decode("unicode_escape") if "\\" in text else text


def is_mounted(path: Path) -> bool:
    return path in mount_points()


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below ``root``, deepest first (the order to unmount them)."""
    found = [p for p in mount_points() if p == root or root in p.parents]
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def mount_overlay(lower: Path, upper: Path, work: Path, target: Path) -> None:
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    run(["mount", "-t", "overlay", "overlay", "-o", options, str(target)])


def unmount(path: Path) -> None:
    """Unmount ``path``; fall back to a lazy unmount if something still holds it."""
    if not is_mounted(path):
        return
    result = run(["umount", str(path)], check=False)
    if result.returncode != 0 and is_mounted(path):
        run(["umount", "--lazy", str(path)])


def remove_tree(path: Path) -> None:
    """Delete a lab directory -- never while anything is still mounted under it."""
    if not path.exists():
        return
    still = mounts_under(path)
    if still:
        raise LabError(
            f"refusing to delete {path}: still mounted: {', '.join(map(str, still))}"
        )
    shutil.rmtree(path)
