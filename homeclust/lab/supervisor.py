"""Keeps one lab node running: the node's "power supply".

Started by the lab (``python -m homeclust.lab supervise SPEC.json``), one per
running node.  It

* starts ``systemd-nspawn --boot`` inside the lab's switch namespace, so the
  host ends of the node's veths are created there and nothing appears in the
  machine's own namespace, and in a cgroup of the node's own (cgroups.py);
* plugs those veth ends into their bridges as soon as nspawn creates them
  (before the node's own network configuration runs, so its first DHCP
  request is not lost);
* starts the container again when the node reboots itself (nspawn exits with
  133 on a reboot from inside; a real machine comes back);
* on SIGTERM shuts the node down cleanly and exits.

It records the PIDs of nspawn and of the container's init, so the lab can
enter the node (``Lab.exec``) and, after a crash, kill exactly those.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from homeclust.errors import LabError
from homeclust.lab.cgroups import join_node_cgroups, remove_node_cgroups
from homeclust.lab.system import children, identify, netns_path, write_pidfile

#: systemd-nspawn's exit status when the container rebooted.
REBOOT_STATUS = 133
LINK_TIMEOUT = 20.0
PROPAGATE_DIR = Path("/run/systemd/nspawn/propagate")


@dataclass(frozen=True)
class SupervisorSpec:
    machine: str
    switch_netns: str
    nspawn_argv: tuple[str, ...]
    links: tuple[tuple[str, str], ...]  # (veth host end, bridge)
    nspawn_pidfile: str
    leader_pidfile: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "machine": self.machine,
                "switch_netns": self.switch_netns,
                "nspawn_argv": list(self.nspawn_argv),
                "links": [list(link) for link in self.links],
                "nspawn_pidfile": self.nspawn_pidfile,
                "leader_pidfile": self.leader_pidfile,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> SupervisorSpec:
        data = json.loads(text)
        return cls(
            machine=data["machine"],
            switch_netns=data["switch_netns"],
            nspawn_argv=tuple(data["nspawn_argv"]),
            links=tuple((a, b) for a, b in data["links"]),
            nspawn_pidfile=data["nspawn_pidfile"],
            leader_pidfile=data["leader_pidfile"],
        )


def wait_propagate_gone(machine: str, timeout: float = 10.0) -> None:
    """nspawn removes its propagation directory a moment after exit; starting the
    same machine before that races and the new container exits at once."""
    path = PROPAGATE_DIR / machine
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if path.exists():
        # Left behind (nspawn refuses to rm -rf on a non-tmpfs /run); it is ours and empty.
        with contextlib.suppress(OSError):
            path.rmdir()


class Supervisor:
    def __init__(self, spec: SupervisorSpec) -> None:
        self.spec = spec
        self.stopping = False
        self.nspawn: subprocess.Popen[bytes] | None = None

    def log(self, message: str) -> None:
        print(f"[homeclust-lab supervisor] {message}", flush=True)

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True
        if self.nspawn is not None and self.nspawn.poll() is None:
            # SIGTERM makes nspawn shut the container down cleanly.
            self.nspawn.send_signal(signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        status = 0
        while not self.stopping:
            wait_propagate_gone(self.spec.machine)
            if self.stopping:
                break
            argv = ["nsenter", f"--net={netns_path(self.spec.switch_netns)}", "--",
                    *self.spec.nspawn_argv]
            machine = self.spec.machine
            remove_node_cgroups(machine)  # a fresh tree for every boot
            self.nspawn = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL,
                # Runs between fork and exec; fine here: the supervisor has one thread.
                preexec_fn=functools.partial(join_node_cgroups, machine),
            )
            proc = identify(self.nspawn.pid)
            if proc is not None:
                write_pidfile(Path(self.spec.nspawn_pidfile), proc)
            if self.stopping or not self.plug_links():
                self.nspawn.send_signal(signal.SIGTERM)
            else:
                self.record_leader()
            status = self.nspawn.wait()
            remove_node_cgroups(machine)
            if status != REBOOT_STATUS:
                break
            self.log("the node rebooted itself: starting it again")
        self.log(f"systemd-nspawn exited with status {status}")
        return 0 if status in (0, REBOOT_STATUS) or self.stopping else status

    def _nspawn(self) -> subprocess.Popen[bytes]:
        if self.nspawn is None:
            raise LabError("systemd-nspawn is not running (supervisor bug)")
        return self.nspawn

    def plug_links(self) -> bool:
        """Put each veth host end on its bridge as soon as nspawn has created it."""
        nspawn = self._nspawn()
        pending = dict(self.spec.links)
        deadline = time.monotonic() + LINK_TIMEOUT
        while pending:
            for host_end, bridge in list(pending.items()):
                result = subprocess.run(
                    ["ip", "-n", self.spec.switch_netns, "link", "set", host_end,
                     "master", bridge, "up"],
                    capture_output=True, text=True, timeout=10, check=False,
                )
                if result.returncode == 0:
                    del pending[host_end]
            if not pending:
                return True
            if nspawn.poll() is not None or self.stopping:
                return False
            if time.monotonic() > deadline:
                self.log(f"veths {', '.join(pending)} did not appear in {LINK_TIMEOUT:g} s")
                return False
            time.sleep(0.01)
        return True

    def record_leader(self) -> None:
        """The container's init is nspawn's child in a PID namespace of its own
        (nspawn's short-lived helper child shares ours); remember it for ``Lab.exec``."""
        nspawn = self._nspawn()
        own_pidns = os.stat("/proc/self/ns/pid").st_ino
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and nspawn.poll() is None:
            for kid in children(nspawn.pid):
                try:
                    if os.stat(f"/proc/{kid}/ns/pid").st_ino == own_pidns:
                        continue
                except OSError:
                    continue
                proc = identify(kid)
                if proc is not None:
                    write_pidfile(Path(self.spec.leader_pidfile), proc)
                    return
            time.sleep(0.01)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m homeclust.lab supervise SPEC.json", file=sys.stderr)
        return 2
    spec = SupervisorSpec.from_json(Path(argv[0]).read_text())
    return Supervisor(spec).run()
