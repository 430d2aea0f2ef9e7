"""Capture the converged Debian fixtures from a real lab (``scripts/capture-fixtures``).

The unit tests prove "a converged host plans nothing" and compare rendered
tables with what the kernel prints back.  That proof is only worth something
if "converged" is what a host really looks like after ``homeclust up`` -- not
the renderers' own output fed back into the planner.  So this module:

1. builds a lab of its own (cluster ``hcfixtures``, plus
   ``$HOMECLUST_TEST_CLUSTER_SUFFIX``; two workers), from pristine nodes;
2. runs ``homeclust up --only network,nat,firewall`` on it, and ``plan``
   (which must find nothing to change, or the capture is refused);
3. reads from the master and worker1 -- with ``Lab.exec`` (nsenter), not
   through homeclust -- the live ``iptables-save`` / ``ip6tables-save``
   output, the managed files, and the raw output of homeclust's facts script;
4. writes them under ``tests/fixtures/lab/`` (replacing what was there) with
   the lab inventory the unit tests plan against, and tears the lab down.

Running it again regenerates everything (timestamps, counters, MAC addresses
and lease times differ from run to run; the rules and files must not).
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import tomli_w

from homeclust.facts import FactQuery, gather_script, parse_facts
from homeclust.inventory import load_inventory
from homeclust.lab import Lab
from homeclust.runner import fact_query
from homeclust.steps import resolve_steps

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "lab"
CLUSTER = "hcfixtures"
STEPS = "network,nat,firewall"
#: The nodes captured: one master, one worker.
NODES = ("master", "worker1")
MANAGED_FILES = (
    "/etc/network/interfaces", "/etc/dhcp/dhclient.conf", "/etc/resolv.conf", "/etc/hosts",
    "/etc/hostname", "/etc/iptables/rules.v4", "/etc/iptables/rules.v6",
    "/etc/sysctl.d/90-homeclust-nat.conf", "/etc/modules-load.d/homeclust-nat.conf",
)

README = """\
# Converged Debian 12 fixtures, captured from the lab

Made by `scripts/capture-fixtures` (tests/lab/capture_fixtures.py): a lab of
its own (cluster `hcfixtures`, the guide's inventory with two workers),
`homeclust up --only network,nat,firewall` from pristine nodes, `plan` clean,
then read from the nodes with `Lab.exec` (not through homeclust).  Do not
edit by hand: re-run the script to regenerate.

* `inventory.toml` -- the lab inventory the unit tests plan against (local key
  paths replaced by placeholders).
* `NODE/facts.txt` -- the raw output of homeclust's facts script on the node.
  `Lab.exec` is no SSH session, so its `ssh-connection` section is the session
  homeclust would have (admin host -> master public address; master private
  address -> worker), made from the lab's addresses.
* `NODE/iptables-save.txt`, `NODE/ip6tables-save.txt` -- the live tables.
* `NODE/files/...` -- the managed files, at their paths on the node.
"""


def log(message: str) -> None:
    print(f"[capture-fixtures] {message}", file=sys.stderr, flush=True)


def lab_inventory(work: Path, cluster: str) -> Path:
    """The guide's cluster with two workers, as cluster ``cluster``."""
    raw = tomllib.loads((REPO / "inventory.toml").read_text())
    raw["cluster"]["name"] = cluster
    raw["workers"] = raw["workers"][:2]
    path = work / f"{cluster}.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def homeclust(inventory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "homeclust", "-i", str(inventory), *args],
                          capture_output=True, text=True, timeout=1800, cwd=REPO,
                          stdin=subprocess.DEVNULL, check=False)


def node_sh(lab: Lab, node: str, script: str, *args: str) -> str:
    done = lab.exec(node, ["sh", "-c", script, "sh", *args], check=False, timeout=120)
    if done.returncode != 0:
        raise SystemExit(f"{node}: {script!r} failed ({done.returncode}): {done.stderr}")
    return done.stdout


def ssh_connection(lab: Lab, node: str) -> str:
    """``$SSH_CONNECTION`` of the session homeclust would have with ``node``."""
    plan = lab.plan
    if plan.node(node).role == "master":
        return f"{plan.admin_address} 50022 {plan.master_public_address} 22"
    master = plan.master.private_address.ip
    return f"{master} 50022 {plan.node(node).private_address.ip} 22"


def steps_query(lab: Lab) -> FactQuery:
    """What homeclust asks a host for when it runs the captured steps."""
    inventory = load_inventory(lab.inventory_path)
    return fact_query(inventory, resolve_steps(inventory, [STEPS]))


def capture_node(lab: Lab, node: str, out: Path) -> None:
    out.mkdir(parents=True)
    (out / "iptables-save.txt").write_text(node_sh(lab, node, "iptables-save"))
    (out / "ip6tables-save.txt").write_text(node_sh(lab, node, "ip6tables-save"))
    for path in MANAGED_FILES:
        encoded = node_sh(lab, node, 'if [ -f "$1" ]; then base64 < "$1"; else echo ABSENT; fi',
                          path)
        if encoded.strip() == "ABSENT":
            continue
        target = out / "files" / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base64.b64decode(encoded))
    query = steps_query(lab)
    facts = node_sh(lab, node, gather_script(query), ssh_connection(lab, node))
    parse_facts(facts, query)  # a complete, parseable output, or the capture fails here
    (out / "facts.txt").write_text(facts)


def sanitized_inventory(lab: Lab) -> str:
    """The lab inventory without this machine's paths."""
    raw = tomllib.loads(lab.inventory_path.read_text())
    raw["cluster"]["name"] = CLUSTER
    raw["ssh"]["key"] = "/nonexistent/hcfixtures-lab-key"
    raw["ssh"]["known_hosts"] = "/nonexistent/hcfixtures-known-hosts"
    header = ("# The lab inventory of the captured fixtures (scripts/capture-fixtures);\n"
              "# local key paths replaced.  Do not edit: re-run the script.\n")
    return header + tomli_w.dumps(raw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the lab running afterwards")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        log("run as root (the lab needs namespaces, mounts and containers)")
        return 1
    cluster = CLUSTER + os.environ.get("HOMECLUST_TEST_CLUSTER_SUFFIX", "")
    work = Path(tempfile.mkdtemp(prefix="hcfixtures-"))
    # The fixtures are Debian 12's (tests/fixtures/lab/README.md).
    lab = Lab(lab_inventory(work, cluster), progress=log, release="bookworm")
    try:
        lab.down()  # whatever an interrupted earlier capture left behind
        log(lab.up().summary().splitlines()[0])
        done = homeclust(lab.inventory_path, "up", "--only", STEPS)
        if done.returncode != 0:
            log(f"homeclust up failed ({done.returncode}):\n{done.stdout}{done.stderr}")
            return 1
        done = homeclust(lab.inventory_path, "plan", "--only", STEPS)
        if done.returncode != 0:
            log(f"the lab did not converge: plan exits {done.returncode}:\n{done.stdout}")
            return 1
        staging = work / "lab"
        staging.mkdir()
        for node in NODES:
            capture_node(lab, node, staging / node)
        (staging / "inventory.toml").write_text(sanitized_inventory(lab))
        (staging / "README.md").write_text(README)
        shutil.rmtree(OUT, ignore_errors=True)
        shutil.copytree(staging, OUT)
        log(f"wrote {OUT.relative_to(REPO)}")
        return 0
    finally:
        if not args.keep:
            log(lab.down().summary())
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
