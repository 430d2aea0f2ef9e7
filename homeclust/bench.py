"""Benchmark: homeclust's speed and memory on the virtual lab, against targets (``scripts/bench``).

Everything is measured in one sitting, on labs of its own (clusters ``hcbench``
and ``hcbench32``, so it never touches the tests' or the demo's lab), each
command as its own process (wall time, peak RSS), medians of repeated runs
taken in turns so that load on the machine hits every contender alike:

* **1 master + 3 workers**: first ``up`` from pristine nodes (network,
  firewall, nat); then, on the converged cluster, no-op ``up``, ``plan`` and
  ``check``, the *floor* -- a hand-batched Fabric script doing the same checks
  in one round trip per host (:mod:`homeclust.benchfloor`) -- and Ansible
  (ansible-core, a comparable idempotent playbook).  Targets: no-op ``up``
  >= 10x faster than Ansible and within 1.2x of the floor; ``plan`` the same;
  ``check`` the same plus its probes.
* **facts payload**: bytes and time of one host's facts before and after the
  host gets a thousand more unit files and packages: they must not change.
* **1 master + 32 workers** (skip with ``--quick``): first ``up``, no-op
  ``up``/``plan``/``check`` and the floor; targets: no-op ``up`` <= 2 s and
  within 1.3x of the floor, no host lost; ``--forks`` 4/8/16/32 compared (the
  default is chosen from this); memory of the admin process, and no growth
  over five runs in one process.

Exit code 1 when a target is missed.  The labs are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from homeclust.lab import Lab
from homeclust.lab.testing import suite_release

REPO = Path(__file__).resolve().parents[1]
STEPS = "network,firewall,nat"
ANSIBLE_VENV = Path("/var/cache/homeclust-lab/bench-ansible-venv")
REPEAT = 5


@dataclass
class Sample:
    seconds: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def peak_mb(self) -> float:
        return max(self.rss_mb, default=0.0)

    @property
    def ok(self) -> bool:
        return bool(self.codes) and all(code == 0 for code in self.codes)


@dataclass
class Report:
    rows: list[tuple[str, str]] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)

    def line(self, name: str, value: str) -> None:
        self.rows.append((name, value))
        print(f"  {name:<58} {value}", flush=True)

    def target(self, ok: bool, what: str) -> None:
        print(f"    {'met ' if ok else 'MISSED'}  {what}", flush=True)
        if not ok:
            self.missed.append(what)


def timed(argv: list[str], cwd: Path = REPO, env: dict[str, str] | None = None
          ) -> tuple[float, float, int, str]:
    """Run ``argv``; wall seconds, peak RSS (MB) of that process, exit code, stdout."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.DEVNULL,
                                   stdin=subprocess.DEVNULL, cwd=cwd,
                                   env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(process.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode()
    return time.monotonic() - started, usage.ru_maxrss / 1024, code, text


def homeclust_argv(inventory: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "homeclust", "-i", str(inventory), *args]


def measure_turns(contenders: dict[str, list[str]], repeat: int = REPEAT,
                  check: Callable[[str, str], str | None] | None = None) -> dict[str, Sample]:
    """Each contender ``repeat`` times, in turns; ``check(name, stdout)`` may flag a run."""
    samples = {name: Sample() for name in contenders}
    for _ in range(repeat):
        for name, argv in contenders.items():
            seconds, rss, code, out = timed(argv)
            problem = check(name, out) if check else None
            if problem:
                print(f"    {name}: {problem}", flush=True)
                code = code or 1
            samples[name].seconds.append(seconds)
            samples[name].rss_mb.append(rss)
            samples[name].codes.append(code)
    return samples


def noop_problem(name: str, out: str) -> str | None:
    """A no-op run that changed, failed or lost a host is not a measurement of a no-op."""
    if not name.startswith("homeclust"):
        return None
    try:
        data = json.loads(out)
    except json.JSONDecodeError:
        return "printed no JSON"
    if data["host_errors"]:
        return f"lost hosts: {sorted(data['host_errors'])}"
    busy = [o for o in data["outcomes"] if o["status"] not in ("unchanged",)]
    if busy:
        return f"not a no-op: {busy[:2]}"
    if name.endswith("check") and any(c["status"] == "fail" for c in data["checks"]):
        return "check failed: " + "; ".join(
            f"{c['host']} {c['check']}" for c in data["checks"] if c["status"] == "fail")[:300]
    return None


def bench_inventory(name: str, workers: int, directory: Path) -> Path:
    """The repository's inventory under another cluster name, with ``workers`` workers."""
    raw = tomllib.loads((REPO / "inventory.toml").read_text())
    raw["cluster"]["name"] = name
    raw["workers"] = [
        {"name": f"worker{i}", "private_address": f"192.168.10.{i + 1}", "interface": "eth0",
         "slots": 8}
        for i in range(1, workers + 1)
    ]
    path = directory / f"{name}.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def round_trips(log: str | None) -> int:
    """The most commands any one host received in a run (from its run log)."""
    if not log:
        return 0
    events = [json.loads(line) for line in Path(log).read_text().splitlines()]
    per_host = Counter(e["host"] for e in events if e["event"] == "command")
    return max(per_host.values(), default=0)


# --------------------------------------------------------------------------- the lab


def converge(lab: Lab, report: Report, label: str) -> Path:
    inventory = lab.inventory_path
    seconds, rss, code, out = timed(homeclust_argv(inventory, "up", "--only", STEPS, "--json"))
    report.line(f"{label}: first up from pristine nodes", f"{seconds:6.1f} s  {rss:4.0f} MB")
    if code != 0:
        data = json.loads(out) if out.startswith("{") else {}
        raise SystemExit(f"the first up failed (exit {code}): "
                         f"{json.dumps(data.get('host_errors') or data.get('outcomes'))[:2000]}")
    return inventory


def facts_payload(lab: Lab, node: str) -> tuple[int, float]:
    """Bytes and seconds (median of 5) of homeclust's facts script on ``node``."""
    from homeclust.facts import gather_script
    from homeclust.inventory import load_inventory
    from homeclust.runner import fact_query
    from homeclust.steps import resolve_steps

    inventory = load_inventory(lab.inventory_path)
    script = gather_script(fact_query(inventory, resolve_steps(inventory, [STEPS])))
    sizes, times = [], []
    for _ in range(5):
        started = time.monotonic()
        out = lab.exec(node, ["sh", "-s", "10.77.0.50 1 10.77.0.10 22"], input=script).stdout
        times.append(time.monotonic() - started)
        # The transactions section carries the host's clock; everything else must match.
        sizes.append(len(out.encode()))
    return int(statistics.median(sizes)), statistics.median(times)


def bloat(lab: Lab, node: str, count: int = 1000) -> None:
    """Give ``node`` ``count`` more unit files and installed packages (a desktop-class host)."""
    script = f"""
set -e
for i in $(seq 1 {count}); do
  printf '[Unit]\\nDescription=bench filler %s\\n[Service]\\nExecStart=/bin/true\\n' $i \\
    > /etc/systemd/system/hcbench-filler-$i.service
  printf 'Package: hcbench-filler-%s\\nStatus: install ok installed\\nPriority: optional\\n\
Section: misc\\nInstalled-Size: 1\\nMaintainer: bench\\nArchitecture: all\\nVersion: 1.0\\n\
Description: bench filler\\n\\n' $i >> /var/lib/dpkg/status
done
systemctl daemon-reload
"""
    lab.exec(node, ["sh", "-c", script], timeout=600)


# --------------------------------------------------------------------------- Ansible


def ansible_argv(lab: Lab, inventory: Path, forks: int, work: Path) -> list[str] | None:
    """ansible-playbook doing a comparable idempotent run; None if it cannot be installed."""
    python = ANSIBLE_VENV / "bin" / "python"
    if not (ANSIBLE_VENV / "bin" / "ansible-playbook").exists():
        print("  installing ansible-core for the comparison …", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(ANSIBLE_VENV)], check=True)
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", "ansible-core"],
                              check=False)
        if done.returncode != 0:
            return None
    from homeclust.inventory import load_inventory

    inv = load_inventory(inventory)
    # Ansible needs Python on every node (homeclust needs only sh).
    for node in inv.nodes:
        if lab.exec(node.name, ["sh", "-c", "command -v python3"], check=False).returncode:
            print(f"  installing python3 on {node.name} for Ansible …", flush=True)
            lab.exec(node.name, ["sh", "-c", "apt-get install -y -q python3-minimal >/dev/null "
                                 "|| { apt-get update -q >/dev/null && apt-get install -y -q "
                                 "python3-minimal >/dev/null; }"], timeout=900)
    key = inv.ssh.key
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
    managed = ("/etc/network/interfaces", "/etc/hosts", "/etc/hostname",
               "/etc/iptables/rules.v4", "/etc/iptables/rules.v6")
    for node in inv.nodes:
        for path in managed:
            content = lab.exec(node.name, ["cat", path], check=False).stdout
            local = work / "files" / node.name / path.lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text(content)
    # The same things homeclust's no-op checks: managed files, packages, units, sysctls,
    # the live rules.  Ansible should find nothing to change.
    tasks: list[dict[str, Any]] = [
        {"name": f"file {path}", "ansible.builtin.copy": {
            "src": f"files/{{{{ inventory_hostname }}}}{path}", "dest": path}}
        for path in managed]
    tasks += [
        {"name": "packages", "ansible.builtin.apt": {
            "name": ["iptables", "iptables-persistent"], "state": "present"}},
        {"name": "loader", "ansible.builtin.systemd": {
            "name": "netfilter-persistent", "enabled": True}},
        {"name": "live rules", "ansible.builtin.command": "iptables-save -t filter",
         "changed_when": False},
    ]
    playbook: list[dict[str, Any]] = [
        {"hosts": "master", "gather_facts": False, "tasks": [
            {"name": "forwarding", "ansible.builtin.command": "sysctl -n net.ipv4.ip_forward",
             "changed_when": False}]},
        {"hosts": "all", "gather_facts": True, "tasks": tasks},
    ]
    (work / "site.yml").write_text(json.dumps(playbook))  # JSON is YAML
    return ["env", f"ANSIBLE_FORKS={forks}", "ANSIBLE_HOST_KEY_CHECKING=False",
            f"ANSIBLE_LOCAL_TEMP={work}/tmp", str(ANSIBLE_VENV / "bin" / "ansible-playbook"),
            "-i", str(work / "hosts"), str(work / "site.yml")]


# --------------------------------------------------------------------------- phases


def fresh_lab(name: str, workers: int, directory: Path) -> Lab:
    print(f"\n== 1 master + {workers} workers", flush=True)
    # The test suite's release (bookworm until the steps are ready for trixie).
    lab = Lab(bench_inventory(name, workers, directory), progress=lambda m: None,
              release=suite_release())
    lab.down()
    lab.up()
    return lab


def noop_contenders(inventory: Path, expected: Path, forks: int) -> dict[str, list[str]]:
    """homeclust's no-op up, plan and check, and the floor (its expected answers recorded
    now, from the converged cluster)."""
    floor = [sys.executable, "-m", "homeclust.benchfloor", str(inventory), str(expected),
             "--forks", str(forks)]
    subprocess.run([*floor, "--record"], check=True, cwd=REPO)
    return {
        "homeclust up": homeclust_argv(inventory, "up", "--only", STEPS, "--json"),
        "homeclust plan": homeclust_argv(inventory, "plan", "--only", STEPS, "--json"),
        "homeclust check": homeclust_argv(inventory, "check", "--only", STEPS, "--json"),
        "floor": floor,
    }


def small_cluster(directory: Path, report: Report, *, ansible: bool) -> dict[str, float]:
    lab = fresh_lab("hcbench", 3, directory)
    figures: dict[str, float] = {}
    try:
        inventory = converge(lab, report, "1+3")
        contenders = noop_contenders(inventory, directory / "floor-expected.json", 16)
        work = directory / "ansible"
        work.mkdir()
        argv = ansible_argv(lab, inventory, 4, work) if ansible else None
        if argv:
            contenders["ansible"] = argv
        samples = measure_turns(contenders, check=noop_problem)
        for name, sample in samples.items():
            report.line(f"1+3: {name} (median of {len(sample.seconds)})",
                        f"{sample.median:6.2f} s  {sample.peak_mb:4.0f} MB"
                        + ("" if sample.ok else "  (FAILED runs)"))
            figures[name] = sample.median
        floor, up = samples["floor"], samples["homeclust up"]
        for name in ("homeclust up", "homeclust plan"):
            sample = samples[name]
            report.target(sample.ok and sample.median <= 1.2 * floor.median,
                          f"1+3 {name} within 1.2x of the floor "
                          f"({sample.median / floor.median:.2f}x)")
        check = samples["homeclust check"]
        report.target(check.ok and check.median <= 1.2 * floor.median + 1.0,
                      f"1+3 homeclust check within 1.2x of the floor plus 1 s of probes "
                      f"({check.median:.2f} s)")
        if "ansible" in samples:
            ratio = samples["ansible"].median / up.median
            report.target(samples["ansible"].ok and ratio >= 10,
                          f"1+3 no-op up >= 10x faster than Ansible ({ratio:.1f}x)")
            figures["ansible ratio"] = ratio
        _, _, _, out = timed(homeclust_argv(inventory, "up", "--only", STEPS, "--json"))
        trips = round_trips(json.loads(out).get("log"))
        report.line("1+3: SSH round trips per host in a no-op up", str(trips))
        report.target(trips == 1, "one round trip per host in a no-op up")

        print("\n== facts payload", flush=True)
        before = facts_payload(lab, "worker1")
        bloat(lab, "worker1")
        after = facts_payload(lab, "worker1")
        report.line("facts of worker1 (bytes, ms)", f"{before[0]} B, {before[1] * 1000:.0f} ms")
        report.line("… with 1000 more unit files and packages",
                    f"{after[0]} B, {after[1] * 1000:.0f} ms")
        report.target(abs(after[0] - before[0]) <= 16 and after[1] <= before[1] * 1.5 + 0.02,
                      "facts payload independent of what the host has installed")
        figures["facts bytes"] = before[0]
    finally:
        lab.down()
    return figures


def big_cluster(directory: Path, report: Report) -> dict[str, float]:
    lab = fresh_lab("hcbench32", 32, directory)
    figures: dict[str, float] = {}
    try:
        inventory = converge(lab, report, "1+32")
        contenders = noop_contenders(inventory, directory / "floor32-expected.json", 32)
        samples = measure_turns(contenders, check=noop_problem)
        for name, sample in samples.items():
            report.line(f"1+32: {name} (median of {len(sample.seconds)})",
                        f"{sample.median:6.2f} s  {sample.peak_mb:4.0f} MB"
                        + ("" if sample.ok else "  (FAILED runs)"))
            figures[name] = sample.median
        floor, up = samples["floor"], samples["homeclust up"]
        report.target(up.ok, "1+32 no host lost, nothing changed, in every run")
        report.target(up.median <= 2.0, f"1+32 no-op up <= 2 s ({up.median:.2f} s)")
        report.target(up.median <= 1.3 * floor.median,
                      f"1+32 no-op up within 1.3x of the floor ({up.median / floor.median:.2f}x)")
        report.target(samples["homeclust plan"].median <= 1.3 * floor.median,
                      "1+32 plan within 1.3x of the floor")
        check = samples["homeclust check"]
        report.target(check.ok and check.median <= 1.3 * floor.median + 1.5,
                      f"1+32 check within 1.3x of the floor plus 1.5 s of probes "
                      f"({check.median:.2f} s)")
        figures["rss"] = up.peak_mb

        forks = measure_turns({f"forks {n}": homeclust_argv(
            inventory, "up", "--only", STEPS, "--json", "--forks", str(n))
            for n in (4, 8, 16, 32)}, repeat=3, check=lambda n, o: noop_problem("homeclust", o))
        for name, sample in forks.items():
            report.line(f"1+32: no-op up with --{name}",
                        f"{sample.median:6.2f} s")
            figures[name] = sample.median

        growth = memory_growth(inventory)
        report.line("1+32: admin RSS after 5 no-op runs in one process (MB)",
                    ", ".join(f"{m:.0f}" for m in growth))
        report.target(growth[-1] - growth[1] <= 8, "no memory growth per run")
    finally:
        lab.down()
    return figures


MEMORY_PROBE = """
import json, sys
from homeclust import api
def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096 / 2**20
out = []
for _ in range(5):
    result = api.run('up', sys.argv[1], api.Options(only=(sys.argv[2],), json=True))
    assert result.exit_code() == 0, result.host_errors
    out.append(rss())
print(json.dumps(out))
"""


def memory_growth(inventory: Path) -> list[float]:
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(inventory), STEPS],
                          capture_output=True, text=True, cwd=REPO, check=True)
    return [float(x) for x in json.loads(done.stdout.strip().splitlines()[-1])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the 1+3 cluster")
    parser.add_argument("--big", action="store_true", help="only the 1+32 cluster")
    parser.add_argument("--no-ansible", action="store_true", help="skip the Ansible baseline")
    options = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="hcbench-"))
    report = Report()
    started = time.monotonic()
    try:
        small = {} if options.big else small_cluster(directory, report,
                                                     ansible=not options.no_ansible)
        big = {} if options.quick else big_cluster(directory, report)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"\nbench done in {time.monotonic() - started:.0f} s")
    print("\nREADME speed table:\n")
    print(readme_table(small, big))
    if report.missed:
        print("\nmissed targets:\n  " + "\n  ".join(report.missed))
        return 1
    print("\nall targets met")
    return 0


def readme_table(small: dict[str, float], big: dict[str, float]) -> str:
    def cell(figures: dict[str, float], key: str) -> str:
        return f"{figures[key]:.2f} s" if key in figures else "–"

    lines = [
        "| no-op run (network, firewall, nat converged) | 1 master + 3 workers | "
        "1 master + 32 workers |",
        "| --- | --- | --- |",
    ]
    for key, label in (("homeclust up", "`homeclust up`"), ("homeclust plan", "`homeclust plan`"),
                       ("homeclust check", "`homeclust check` (with probes)"),
                       ("floor", "hand-batched Fabric script, same checks (the floor)"),
                       ("ansible", "Ansible (ansible-core), comparable playbook")):
        lines.append(f"| {label} | {cell(small, key)} | {cell(big, key)} |")
    if "ansible ratio" in small:
        lines.append(f"| homeclust up vs Ansible | {small['ansible ratio']:.0f}x faster | |")
    if "homeclust up" in small and "floor" in small:
        ratio_big = (f"{big['homeclust up'] / big['floor']:.2f}x" if "floor" in big else "–")
        lines.append(f"| homeclust up / floor | {small['homeclust up'] / small['floor']:.2f}x "
                     f"| {ratio_big} |")
    if "rss" in big:
        lines.append(f"| admin process peak memory | | {big['rss']:.0f} MB |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
