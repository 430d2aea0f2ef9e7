"""Record the facts of freshly installed lab nodes, per Debian release, for the unit tests.

    .venv/bin/python -m tests.lab.capture_fresh_facts [--release trixie|bookworm ...]

For each release (default: every one the lab has) this builds a lab of its own
(cluster ``hcfresh-RELEASE`` plus ``$HOMECLUST_TEST_CLUSTER_SUFFIX``: the
guide's inventory with one worker and the tables of the converged recordings,
tests/unit/factsbuilder.py CONVERGED_TABLES), and before any ``homeclust up``
runs homeclust's facts script on the master and worker1 -- with ``Lab.exec``
(nsenter), asking what homeclust asks each of them (every step that targets
the node, as ``homeclust plan`` would) plus the files and packages that tell
the releases apart (DHCP client configuration, apt sources).  The outputs go
to ``tests/fixtures/lab-facts/debianNN-{master,worker}-fresh.txt`` (replacing
them), and the lab is torn down.  Run as root; review the diff.

The files section is written in the script's per-file form (each file's
checksum in its header, its content on the next line: what the converged
recordings hold and tests/unit/factsbuilder.py reads) rather than the one
base64 stream the script sends today; homeclust's parser reads both, and
:func:`per_file_form` changes nothing else.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import sys
import tempfile
import tomllib
from pathlib import Path

import tomli_w

from homeclust.facts import MARKER, FactQuery, gather_script, parse_facts
from homeclust.inventory import Inventory, load_inventory
from homeclust.lab import Lab
from homeclust.lab.plan import RELEASES
from homeclust.runner import fact_query
from homeclust.steps import resolve_steps
from tests.lab.capture_fixtures import node_sh, ssh_connection
from tests.unit.factsbuilder import CONVERGED_TABLES

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "lab-facts"
VERSIONS = {"bookworm": "12", "trixie": "13"}
#: Asked beside homeclust's own query: what differs between a fresh node of each release.
RELEASE_FACTS = FactQuery(
    paths=frozenset({"/etc/dhcpcd.conf", "/etc/dhcp/dhclient.conf", "/etc/apt/sources.list",
                     "/etc/apt/sources.list.d/*"}),
    packages=frozenset({"dhcpcd-base", "isc-dhcp-client", "ifupdown", "apt"}),
)


def log(message: str) -> None:
    print(f"[capture-fresh-facts] {message}", file=sys.stderr, flush=True)


def per_file_form(output: str) -> str:
    """``output`` with the files section's shared stream split into each file's own lines."""
    head, marker, rest = output.partition(f"\n{MARKER} files\n")
    if not marker:
        return output
    body, next_marker, tail = rest.partition(f"\n{MARKER} ")
    lines = body.split("\n")
    blob = b"".join(base64.b64decode(line[2:]) for line in lines if line.startswith("B\t"))
    out: list[str] = []
    offset = 0
    for index, line in enumerate(lines):
        if not line.startswith(("F\t", "S\t")):
            continue
        kind, path, mode, owner, group, digest = line.split("\t")
        content_line = lines[index + 1]
        if content_line.startswith("+"):
            size = int(content_line[1:])
            content = blob[offset:offset + size]
            offset += size
            digest, content_line = (hashlib.sha256(content).hexdigest(),
                                    base64.b64encode(content).decode())
        out += ["\t".join((kind, path, mode, owner, group, digest)), content_line]
    if offset != len(blob):
        raise SystemExit("the files section's stream does not match its headers")
    return f"{head}{marker}" + "\n".join(out) + f"\n{next_marker}{tail}"


def inventory_for(work: Path, cluster: str) -> Path:
    raw = tomllib.loads((REPO / "inventory.toml").read_text())
    raw["cluster"]["name"] = cluster
    raw["workers"] = raw["workers"][:1]
    for table, values in CONVERGED_TABLES.items():
        raw.setdefault(table, {}).update(values)
    path = work / f"{cluster}.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def node_query(inventory: Inventory, node_name: str) -> FactQuery:
    """What homeclust asks ``node_name`` in a run of every step, and RELEASE_FACTS."""
    node = next(n for n in inventory.nodes if n.name == node_name)
    steps = [s for s in resolve_steps(inventory) if s.targets(inventory, node)]
    return fact_query(inventory, steps) | RELEASE_FACTS


def capture(release: str, work: Path) -> None:
    cluster = f"hcfresh-{release}" + os.environ.get("HOMECLUST_TEST_CLUSTER_SUFFIX", "")
    lab = Lab(inventory_for(work, cluster), progress=log, release=release)
    try:
        lab.down()  # whatever an interrupted earlier capture left behind
        log(lab.up().summary().splitlines()[0])
        for node, role in (("master", "master"), ("worker1", "worker")):
            query = node_query(load_inventory(lab.inventory_path), node)
            facts = node_sh(lab, node, gather_script(query), ssh_connection(lab, node))
            recorded = per_file_form(facts)
            # Complete and parseable, and the same facts in either form, or no recording.
            if parse_facts(recorded, query) != parse_facts(facts, query):
                raise SystemExit(f"{node}: the per-file form changed the facts")
            target = OUT / f"debian{VERSIONS[release]}-{role}-fresh.txt"
            target.write_text(recorded)
            log(f"wrote {target.relative_to(REPO)}")
    finally:
        log(lab.down().summary())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", action="append", choices=RELEASES,
                        help="a release to record (repeatable; default: all)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        log("run as root (the lab needs namespaces, mounts and containers)")
        return 1
    with tempfile.TemporaryDirectory(prefix="hcfresh-") as work:
        for release in args.release or RELEASES:
            capture(release, Path(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
