"""The speed floor of ``scripts/bench``: a hand-batched Fabric script doing homeclust's
no-op checks in one round trip per host, and nothing else.

It is what a careful admin would write by hand for "is the cluster still as I
left it": one ``fabric.Connection`` to the master, every worker through it as
gateway, one shell script per host that prints the managed files' hashes, the
live netfilter tables, the sysctls, addresses, routes, packages and units the
network/firewall/nat steps manage, compared with what was recorded when the
cluster was converged.  No inventory validation, no lock, no run log, no
planning, no report: the cost of the SSH round trips themselves.  homeclust's
no-op ``up`` must stay within a small factor of it (see homeclust.bench).

    python -m homeclust.benchfloor INVENTORY EXPECTED.json [--record] [--forks N]

Exit code 0 when every host matches (or was recorded), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fabric import Connection

FILES = ("/etc/network/interfaces", "/etc/dhcp/dhclient.conf", "/etc/resolv.conf", "/etc/hosts",
         "/etc/hostname", "/etc/iptables/rules.v4", "/etc/iptables/rules.v6",
         "/etc/sysctl.d/90-homeclust-nat.conf", "/etc/modules-load.d/homeclust-nat.conf")

SCRIPT = f"""\
export LC_ALL=C
for f in {' '.join(FILES)}; do [ -f "$f" ] && sha256sum "$f"; done
iptables-save -t filter | grep -v '^#' | sed 's/\\[[0-9]*:[0-9]*\\]//'
iptables-save -t nat | grep -v '^#' | sed 's/\\[[0-9]*:[0-9]*\\]//'
ip6tables-save -t filter | grep -v '^#' | sed 's/\\[[0-9]*:[0-9]*\\]//'
sysctl -n net.ipv4.ip_forward net.netfilter.nf_conntrack_tcp_timeout_established 2>/dev/null
ip -o -4 addr show | awk '{{print $2, $4}}'
ip -4 route show
hostname
dpkg-query -W -f='${{Package}} ${{Status}}\\n' iptables iptables-persistent 2>/dev/null
systemctl is-enabled netfilter-persistent ufw firewalld 2>/dev/null
true
"""


def connections(inventory_path: Path) -> list[tuple[str, Connection]]:
    """The master's connection (opened) and every worker's through it, by name."""
    raw = tomllib.loads(inventory_path.read_text())
    ssh, master = raw.get("ssh", {}), raw["master"]
    kwargs = {"key_filename": ssh["key"], "look_for_keys": False, "allow_agent": False}
    gateway = Connection(master["address"], user=ssh.get("user", "root"),
                         port=master.get("port", 22), connect_kwargs=kwargs)
    gateway.client.load_host_keys(ssh["known_hosts"])
    gateway.open()  # before fanning out: workers share this transport
    workers = []
    for worker in raw.get("workers", []):
        conn = Connection(worker["private_address"], user=ssh.get("user", "root"),
                          gateway=gateway, connect_kwargs=kwargs)
        conn.client.load_host_keys(ssh["known_hosts"])
        workers.append((worker["name"], conn))
    return [(master["name"], gateway), *workers]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="homeclust.benchfloor")
    parser.add_argument("inventory", type=Path)
    parser.add_argument("expected", type=Path)
    parser.add_argument("--record", action="store_true", help="write what the hosts say now")
    parser.add_argument("--forks", type=int, default=16)
    options = parser.parse_args(argv)
    hosts = connections(options.inventory)

    def ask(item: tuple[str, Connection]) -> tuple[str, str]:
        name, conn = item
        result = conn.run(SCRIPT, hide=True, warn=True, in_stream=False)
        return name, result.stdout

    try:
        answers = dict([ask(hosts[0])])
        with ThreadPoolExecutor(max_workers=options.forks) as pool:
            answers.update(pool.map(ask, hosts[1:]))
    finally:
        for _, conn in reversed(hosts):
            conn.close()
    if options.record:
        options.expected.write_text(json.dumps(answers, indent=1))
        return 0
    expected = json.loads(options.expected.read_text())
    drift = [name for name, text in answers.items() if expected.get(name) != text]
    print("in sync" if not drift else f"drift on {', '.join(drift)}")
    return 1 if drift else 0


if __name__ == "__main__":
    sys.exit(main())
