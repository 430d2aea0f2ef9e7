"""Benchmark: homeclust's speed and memory on the virtual lab (``scripts/bench``).

Measured on a lab of its own (cluster ``hcbench``, so it never touches the
tests' or the demo's lab), from pristine nodes:

* the first ``up`` (network, nat, firewall from an installer's state),
* the second ``up`` (nothing to change: what users run most),
* ``plan`` and ``check``,

each as a separate ``homeclust`` process: wall time, peak resident memory, and
SSH round trips per host (commands in the run log).  Targets scale with the
node count; missing one makes the exit code 1.  ``--ansible`` also times
ansible-core doing a comparable idempotent run (facts, the same managed files,
a sysctl, reading the rules) over the same jump host.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from homeclust.lab import Lab

REPO = Path(__file__).resolve().parents[1]
STEPS = "network,nat,firewall"
ANSIBLE_VENV = Path("/var/cache/homeclust-lab/bench-ansible-venv")


@dataclass
class Measurement:
    name: str
    seconds: float
    peak_rss_mb: float
    round_trips: int  # the most commands any one host received
    exit_code: int
    target_seconds: float | None = None
    target_round_trips: int | None = None
    target_rss_mb: float | None = None

    @property
    def missed(self) -> list[str]:
        missed = []
        if self.target_seconds is not None and self.seconds > self.target_seconds:
            missed.append(f"{self.name}: {self.seconds:.1f} s > {self.target_seconds:.1f} s")
        if self.target_round_trips is not None and self.round_trips > self.target_round_trips:
            missed.append(f"{self.name}: {self.round_trips} round trips per host > "
                          f"{self.target_round_trips}")
        if self.target_rss_mb is not None and self.peak_rss_mb > self.target_rss_mb:
            missed.append(f"{self.name}: {self.peak_rss_mb:.0f} MB > {self.target_rss_mb:.0f} MB")
        return missed


def bench_inventory(workers: int, directory: Path) -> Path:
    """The repository's inventory, renamed to hcbench, with ``workers`` workers."""
    raw = tomllib.loads((REPO / "inventory.toml").read_text())
    raw["cluster"]["name"] = "hcbench"
    raw["workers"] = [
        {"name": f"worker{i}", "private_address": f"192.168.10.{i + 1}", "interface": "eth0",
         "slots": 8}
        for i in range(1, workers + 1)
    ]
    path = directory / "inventory.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def timed(argv: list[str], cwd: Path = REPO) -> tuple[float, float, int, str]:
    """Run ``argv``; wall seconds, peak RSS in MB of that process tree, exit code, stdout."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT if cwd != REPO
                                   else subprocess.DEVNULL,
                                   stdin=subprocess.DEVNULL, cwd=cwd)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode()
    return time.monotonic() - started, usage.ru_maxrss / 1024, process.returncode, text


def homeclust_run(name: str, inventory: Path, *args: str) -> tuple[Measurement, dict[str, Any]]:
    seconds, rss, code, out = timed(
        [sys.executable, "-m", "homeclust", "-i", str(inventory), *args, "--json"])
    data = json.loads(out)
    trips = 0
    if data.get("log"):
        events = [json.loads(line) for line in Path(data["log"]).read_text().splitlines()]
        per_host = Counter(e["host"] for e in events if e["event"] == "command")
        trips = max(per_host.values(), default=0)
    return Measurement(name, seconds, rss, trips, code), data


def ansible_run(lab: Lab, inventory: Path, forks: int) -> Measurement | None:
    """ansible-core doing a comparable idempotent run; None if it cannot be installed."""
    python = ANSIBLE_VENV / "bin" / "python"
    if not (ANSIBLE_VENV / "bin" / "ansible-playbook").exists():
        print("installing ansible-core for the comparison …", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(ANSIBLE_VENV)], check=True)
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", "ansible-core"],
                              check=False)
        if done.returncode != 0:
            print("ansible-core could not be installed; skipping the comparison")
            return None
    from homeclust.inventory import load_inventory

    inv = load_inventory(lab.inventory_path)
    # Ansible runs Python on every node (homeclust needs only sh): give it one,
    # from the lab's package relay (workers through the master's NAT).
    for node in inv.nodes:
        if lab.exec(node.name, ["sh", "-c", "command -v python3"], check=False).returncode:
            print(f"installing python3 on {node.name} for Ansible …", flush=True)
            lab.exec(node.name, ["sh", "-c", "apt-get install -y -q python3-minimal >/dev/null "
                                 "|| { apt-get update -q >/dev/null && apt-get install -y -q "
                                 "python3-minimal >/dev/null; }"], timeout=600)
    key = inv.ssh.key
    work = Path(tempfile.mkdtemp(prefix="hcbench-ansible-"))
    ssh_opts = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
    jump = (f"-o ProxyCommand=\"ssh {ssh_opts} -i {key} -p {inv.master.port} -W %h:%p "
            f"root@{inv.master.address}\"")
    lines = ["[master]",
             f"{inv.master.name} ansible_host={inv.master.address} ansible_port={inv.master.port}",
             "[workers]"]
    lines += [f"{w.name} ansible_host={w.private_address}" for w in inv.workers]
    lines += ["[workers:vars]", f"ansible_ssh_common_args='{jump}'",
              "[all:vars]", "ansible_user=root", f"ansible_ssh_private_key_file={key}",
              "ansible_python_interpreter=/usr/bin/python3"]
    (work / "hosts").write_text("\n".join(lines) + "\n")
    # The files homeclust manages, with the content they have now: Ansible should
    # find nothing to change, like homeclust's second run.
    tasks: list[dict[str, Any]] = []
    for node in inv.nodes:
        for path in ("/etc/network/interfaces", "/etc/hosts", "/etc/hostname",
                     "/etc/iptables/rules.v4", "/etc/iptables/rules.v6"):
            content = lab.exec(node.name, ["cat", path], check=False).stdout
            local = work / "files" / node.name / path.lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text(content)
    for path in ("/etc/network/interfaces", "/etc/hosts", "/etc/hostname",
                 "/etc/iptables/rules.v4", "/etc/iptables/rules.v6"):
        tasks.append({"name": f"file {path}", "ansible.builtin.copy": {
            "src": f"files/{{{{ inventory_hostname }}}}{path}", "dest": path}})
    tasks.append({"name": "live rules", "ansible.builtin.command": "iptables-save -t filter",
                  "changed_when": False})
    playbook: list[dict[str, Any]] = [
        {"hosts": "master", "gather_facts": True, "tasks": [
            {"name": "forwarding", "ansible.builtin.command": "sysctl -n net.ipv4.ip_forward",
             "changed_when": False}]},
        {"hosts": "all", "gather_facts": True, "tasks": tasks},
    ]
    (work / "site.yml").write_text(json.dumps(playbook))  # JSON is YAML
    seconds, rss, code, out = timed(
        ["env", f"ANSIBLE_FORKS={forks}", "ANSIBLE_HOST_KEY_CHECKING=False",
         str(ANSIBLE_VENV / "bin" / "ansible-playbook"), "-i", "hosts", "site.yml"], cwd=work)
    shutil.rmtree(work, ignore_errors=True)
    if code != 0:
        print(f"ansible-playbook failed (exit {code}):\n{out[-2000:]}")
    return Measurement(f"ansible idempotent run (forks {forks})", seconds, rss, 0, code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--ansible", action="store_true", help="also time ansible-core")
    parser.add_argument("--keep", action="store_true", help="leave the bench lab up")
    options = parser.parse_args(argv)
    nodes = options.workers + 1
    directory = Path(tempfile.mkdtemp(prefix="hcbench-"))
    lab = Lab(bench_inventory(options.workers, directory),
              progress=lambda m: print(f"[lab] {m}", flush=True))
    results: list[Measurement] = []
    try:
        lab.down()
        info = lab.up()
        print(info.summary().splitlines()[0])
        inventory = lab.inventory_path
        first, data = homeclust_run("first up (from pristine)", inventory, "up", "--only", STEPS)
        first.target_seconds = 60 + 3 * nodes
        results.append(first)
        if first.exit_code != 0:
            print(json.dumps(data["host_errors"] or data["outcomes"], indent=1)[:3000])
        again, data = homeclust_run("second up (nothing to change)", inventory, "up", "--only",
                                    STEPS)
        again.target_seconds, again.target_round_trips = 2 + 0.25 * nodes, 1
        again.target_rss_mb = 120 + 3 * nodes
        changed = [o for o in data["outcomes"] if o["status"] != "unchanged"]
        if changed:
            print(f"second up changed something: {changed[:3]}")
            again.exit_code = again.exit_code or 1
        results.append(again)
        plan, _ = homeclust_run("plan", inventory, "plan", "--only", STEPS)
        plan.target_seconds, plan.target_round_trips = 2 + 0.25 * nodes, 1
        results.append(plan)
        check, _ = homeclust_run("check", inventory, "check", "--only", STEPS)
        check.target_seconds = 5 + 0.5 * nodes
        results.append(check)
        if options.ansible:
            measured = ansible_run(lab, inventory, forks=min(nodes, 10))
            if measured is not None:
                results.append(measured)
    finally:
        if not options.keep:
            print(lab.down().summary())
        shutil.rmtree(directory, ignore_errors=True)

    print(f"\nhomeclust bench: 1 master + {options.workers} workers")
    print(f"{'run':<42} {'seconds':>8} {'peak MB':>8} {'trips/host':>10}  exit  target")
    missed: list[str] = []
    for m in results:
        target = " ".join(x for x in (
            f"<{m.target_seconds:.0f}s" if m.target_seconds else "",
            f"<={m.target_round_trips} trips" if m.target_round_trips else "",
            f"<{m.target_rss_mb:.0f}MB" if m.target_rss_mb else "") if x)
        trips = str(m.round_trips) if m.round_trips else "-"
        print(f"{m.name:<42} {m.seconds:8.2f} {m.peak_rss_mb:8.0f} {trips:>10}  {m.exit_code:>4}  "
              f"{target}")
        missed += m.missed
        if m.exit_code != 0 and not m.name.startswith("ansible"):
            missed.append(f"{m.name}: exit code {m.exit_code}")
    ours = next((m for m in results if m.name.startswith("second up")), None)
    theirs = next((m for m in results if m.name.startswith("ansible")), None)
    if ours and theirs and theirs.exit_code == 0:
        print(f"\nsecond up vs Ansible: {theirs.seconds / ours.seconds:.1f}x faster")
    if missed:
        print("\nmissed targets:\n  " + "\n  ".join(missed))
        return 1
    print("\nall targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
