"""Shared helpers for the end-to-end tests: run homeclust for real, look at nodes.

``homeclust(...)`` runs the real command line in a subprocess (the same entry
point a user types), with ``--json`` where a test reads the outcome.  Nodes
are observed with ``lab.exec`` (nsenter, no SSH), so what a test asserts does
not depend on the code under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from homeclust.lab import Lab

REPO_ROOT = Path(__file__).resolve().parents[2]
GUIDE_INVENTORY = REPO_ROOT / "inventory.toml"
#: Appended to every lab cluster name the tests create, so two test runs on one
#: machine (two checkouts, two people) never share or tear down each other's labs.
CLUSTER_SUFFIX = os.environ.get("HOMECLUST_TEST_CLUSTER_SUFFIX", "")


def lab_cluster_name(name: str) -> str:
    """The lab cluster name a test uses for ``name`` (with this run's suffix)."""
    return f"{name}{CLUSTER_SUFFIX}"


def inventory_copy(tmp_dir: Path, cluster: str, workers: int | None = None,
                   **tables: dict[str, Any]) -> Path:
    """The guide's inventory under another cluster name (maybe fewer workers, other tables)."""
    raw = tomllib.loads(GUIDE_INVENTORY.read_text())
    raw["cluster"]["name"] = lab_cluster_name(cluster)
    if workers is not None:
        raw["workers"] = raw["workers"][:workers]
    for table, values in tables.items():
        raw.setdefault(table, {}).update(values)
    path = tmp_dir / f"{lab_cluster_name(cluster)}.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def homeclust(inventory: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "homeclust", "-i", str(inventory), *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
    )


def homeclust_json(inventory: Path, *args: str, timeout: float = 900) -> tuple[int, dict[str, Any]]:
    done = homeclust(inventory, *args, "--json", timeout=timeout)
    try:
        data = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise AssertionError(
            f"homeclust {' '.join(args)} printed no JSON (exit {done.returncode}):\n"
            f"{done.stdout}\n{done.stderr}") from None
    return done.returncode, data


def wait_for_check(inventory: Path, *args: str, seconds: float = 90) -> dict[str, Any]:
    """``check`` until it passes (no ``up`` in between): after a boot, daemons such as
    slurmd take a few seconds to register with their controller."""
    deadline = time.monotonic() + seconds
    while True:
        code, data = homeclust_json(inventory, "check", *args, timeout=600)
        if code == 0 or time.monotonic() > deadline:
            assert code == 0, failed_checks(data)
            return data
        time.sleep(3)


def statuses(data: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {(o["host"], o["step"]): o["status"] for o in data["outcomes"]}


def failed_checks(data: dict[str, Any]) -> list[str]:
    return [f"{c['host']} {c['check']}: {c['detail']} ({c['hint']})"
            for c in data["checks"] if c["status"] == "fail"]


def sh(lab: Lab, node: str, script: str, *, check: bool = True, timeout: float = 60) -> str:
    done = lab.exec(node, ["sh", "-c", script], check=False, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{node}: {script!r} failed ({done.returncode}):\n"
                             f"{done.stdout}{done.stderr}")
    return done.stdout


MANAGED_FILES = (
    "/etc/network/interfaces", "/etc/dhcp/dhclient.conf", "/etc/resolv.conf", "/etc/hosts",
    "/etc/hostname", "/etc/iptables/rules.v4", "/etc/sysctl.d/90-homeclust-nat.conf",
    "/etc/modules-load.d/homeclust-nat.conf",
)


def snapshot(lab: Lab, node: str) -> dict[str, str]:
    """What homeclust manages on a node, read without homeclust: rules, sysctls, files, routes."""
    files = " ".join(MANAGED_FILES)
    return {
        "iptables": sh(lab, node, "iptables-save | grep -v '^#' | sed 's/\\[[0-9]*:[0-9]*\\]//'"),
        "sysctl": sh(lab, node, "sysctl net.ipv4.ip_forward; "
                                "sysctl net.netfilter.nf_conntrack_tcp_timeout_established"),
        "files": sh(lab, node, f"for f in {files}; do [ -e $f ] && sha256sum $f; done; true"),
        "addresses": sh(lab, node, "ip -o -4 addr show | awk '{print $2, $4}'"),
        "routes": sh(lab, node, "ip -4 route show"),
        "hostname": sh(lab, node, "hostname"),
    }


def http_get_body(lab: Lab, node: str, url: str) -> str:
    """Fetch ``url`` from inside ``node`` with bash's /dev/tcp (no client installed)."""
    rest = url.removeprefix("http://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    script = (f"exec 3<>/dev/tcp/{host}/{port or 80} && "
              f"printf 'GET /{path} HTTP/1.0\\r\\nHost: {hostport}\\r\\n\\r\\n' >&3 && cat <&3")
    out = sh(lab, node, f"timeout 10 bash -c {shell_quote(script)}")
    return out.replace("\r\n", "\n").split("\n\n", 1)[-1].strip()


def shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def tcp_connects(lab: Lab, where: str, address: str, port: int, *, timeout: int = 3) -> bool:
    """Whether a TCP connection from ``where`` (a node, "internet" or "admin") succeeds."""
    probe = ["timeout", str(timeout + 2), "bash", "-c", f"exec 3<>/dev/tcp/{address}/{port}"]
    if where == "internet":
        done = lab.exec_internet(probe, check=False, timeout=timeout + 10)
    elif where == "admin":
        done = lab.exec_admin(probe, check=False, timeout=timeout + 10)
    else:
        done = lab.exec(where, probe, check=False, timeout=timeout + 10)
    return done.returncode == 0
