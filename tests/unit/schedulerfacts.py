"""Facts of hosts for the scheduler steps (torque, slurm), fresh and after the step.

The scheduler's own fact sections (its packages, units and ``x-`` sections)
live in ``tests/fixtures/scheduler/NAME-KIND.txt``: the Debian 12 ones were
captured on the lab after the slurm step ran (only the munge key is replaced
by a fixed test key), the RHEL ones are hand-recorded in the form rpm,
systemctl, ``qmgr -c 'print server'`` and ``pbsnodes -a`` print (there is no
RHEL lab).  Files homeclust writes come from the reviewed golden files, as in
:func:`tests.unit.factsbuilder.converged`.
"""

from __future__ import annotations

import base64
import re

from homeclust.facts import FactQuery, HostFacts
from homeclust.inventory import Inventory
from homeclust.runner import fact_query
from homeclust.steps import REGISTRY
from tests.unit.factsbuilder import (
    MARKER,
    FactsBuilder,
    FileRecord,
    converged,
    fixture_text,
    golden_text,
    inventory,
    recorded,
)

#: A munge key as homeclust generates them (base64 text, 512 characters); a test value.
TEST_KEY = base64.b64encode(bytes(range(256)) + bytes(range(128))).decode()
#: What Debian's munge package leaves: 128 random bytes.
BINARY_KEY = bytes(range(128, 256))

INV_TORQUE = inventory()
INV_SLURM = inventory(scheduler={"kind": "slurm"})
#: The master each recorded worker is planned with (same family, as Slurm requires).
MASTER_OF = {"debian12-worker": "debian12-master", "centos7-worker": "rocky9-master"}
FAMILY = {"debian12-master": "debian12", "debian12-worker": "debian12",
          "rocky9-master": "rhel", "centos7-worker": "rhel"}


def query(inv: Inventory = INV_SLURM) -> FactQuery:
    """What a run of every step asks (both schedulers' facts included)."""
    return fact_query(inv, REGISTRY.values())


def fixture_sections(name: str, kind: str) -> dict[str, str]:
    text = fixture_text(f"scheduler/{name}-{kind}.txt")
    parts = re.split(rf"\n{re.escape(MARKER)} ([^\n]*)\n", text)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def with_fixture(base: FactsBuilder, name: str, kind: str) -> FactsBuilder:
    """``base`` plus the scheduler's sections: packages and units added, x- sections set."""
    sections = fixture_sections(name, kind)
    out = base.add_lines("packages", *sections.pop("packages").splitlines())
    units = out.sections.get("units", "").strip()
    out = out.but(units=(units + "\n\n" if units else "") + sections.pop("units").strip() + "\n")
    for name, text in sections.items():
        out = out.but(**{name.replace("-", "_"): text})  # type: ignore[arg-type]
    return out


def fresh(name: str, kind: str) -> FactsBuilder:
    """A recorded host before the step: its size and nothing of the scheduler yet."""
    size = fixture_sections(name, kind)["x-node-size"]
    return recorded(name).but(x_node_size=size)


def after(name: str, kind: str) -> FactsBuilder:
    """A recorded host after every step up to and including ``kind``'s."""
    # Read as munge, whose directory /etc/munge is.
    key = FileRecord(TEST_KEY.encode(), 0o400, "munge", "munge", secret=True, account="munge")
    files: dict[str, str | FileRecord] = {"/etc/munge/munge.key": key}
    if kind == "slurm":
        files["/etc/slurm/slurm.conf"] = golden_text(
            f"slurm/{FAMILY[name]}/etc/slurm/slurm.conf")
    else:
        files["/etc/torque/server_name"] = golden_text("torque/etc/torque/server_name")
        files["/etc/torque/mom/config"] = golden_text("torque/etc/torque/mom/config")
        if name.endswith("master"):
            files["/var/lib/torque/server_priv/nodes"] = golden_text(
                "torque/var/lib/torque/server_priv/nodes")
    return with_fixture(converged(name), name, kind).but(files=files)


def facts(builder: FactsBuilder) -> HostFacts:
    return builder.facts(query())
