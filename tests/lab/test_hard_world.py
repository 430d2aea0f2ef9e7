"""homeclust against a world as hard as the real one: a slow mirror, a home router.

* **A mirror slower than any guard.**  A worker without package lists must
  run ``apt-get update`` through a 2 Mbit/s uplink (tens of seconds) before its
  firewall persistence package installs.  The firewall step's 30 s rollback
  timer is armed only after that, right before the filter table is loaded:
  the change is confirmed, and a fresh ``plan`` agrees with the report.  (The
  reviewer's reproduction: the timer fired mid-batch, the batch went on, and
  homeclust reported a rollback that had not happened.)
* **A DHCP server like a home router**: leases keyed by client identity, no
  reservation, a pool of one address.  The network step gives the master the
  guide's ``dhcp_client_id``; it takes the interface down with its *old*
  configuration first (releasing the old lease), so the new identity gets the
  address and the change is confirmed -- instead of rolling back every time.

Each test has a small lab of its own (a master and one worker).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.lab.conftest import start_lab
from tests.lab.helpers import homeclust, homeclust_json, inventory_copy, sh, statuses

pytestmark = pytest.mark.lab


def events(log: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in Path(log).read_text().splitlines()]


def test_a_mirror_slower_than_any_guard_never_rolls_back_a_good_change(tmp_path: Path) -> None:
    lab, _ = start_lab(inventory_copy(tmp_path, "slowmirror", workers=1))
    try:
        inventory = lab.inventory_path
        # The network step first, at full speed: it installs nothing.
        code, data = homeclust_json(inventory, "up", "--only", "network", timeout=600)
        assert code == 0, data
        # worker1 has no package lists: its firewall step must fetch them first.
        sh(lab, "worker1", "apt-get clean; rm -rf /var/lib/apt/lists/*")
        lab.set_uplink("2mbit")
        code, data = homeclust_json(inventory, "up", "--only", "firewall,nat", timeout=1200)
        lab.set_uplink(None)
        assert code == 0, (data["host_errors"], [o for o in data["outcomes"] if o["error"]])
        assert statuses(data)[("worker1", "firewall")] == "changed"
        # The report matches the host: installed, live, persistent, nothing pending.
        assert "ii" in sh(lab, "worker1", "dpkg-query -W -f='${db:Status-Abbrev}' "
                                          "iptables-persistent")
        assert ":INPUT DROP" in sh(lab, "worker1", "iptables-save -t filter")
        assert sh(lab, "worker1", "ls /var/lib/homeclust/txn 2>/dev/null || true").strip() == ""
        assert homeclust_json(inventory, "plan", "--only", "network,firewall,nat")[0] == 0
        # The slow part ran before the guard: the package install took longer than the
        # timer, the guarded part (arm .. confirm) well under it.
        log = events(str(data["log"]))
        worker = [e for e in log if e.get("host") == "worker1" and e["event"] == "command"]
        install = next(e for e in worker if e["purpose"] == "apply:firewall")
        arm = next(e for e in worker if e["purpose"] == "arm")
        confirm = next(e for e in worker if e["purpose"] == "confirm")
        assert float(install["duration"]) > 30, install["duration"]  # type: ignore[arg-type]
        assert worker.index(install) < worker.index(arm)
        assert float(confirm["time"]) - float(arm["time"]) < 20  # type: ignore[arg-type]
    finally:
        lab.set_uplink(None)
        lab.down()


def test_the_master_takes_its_client_id_on_a_home_router(tmp_path: Path) -> None:
    lab, _ = start_lab(inventory_copy(tmp_path, "homerouter", workers=1), dhcp="router")
    try:
        inventory = lab.inventory_path
        before = [lease.client_id for lease in lab.dhcp_leases()]
        assert "cluster-master" not in before  # the installer's identity holds the address
        code, data = homeclust_json(inventory, "up", "--only", "network", timeout=900)
        assert code == 0, (data["host_errors"], [o for o in data["outcomes"] if o["error"]])
        assert statuses(data)[("master", "network")] == "changed"
        # The one address of the pool went to the guide's client id, and the master
        # kept its public address (the admin reaches it there).
        leases = [lease for lease in lab.dhcp_leases() if lease.client_id == "cluster-master"]
        assert [str(lease.address) for lease in leases] == [str(lab.master_public_address)]
        assert str(lab.master_public_address) in sh(lab, "master", "ip -o -4 addr show dev eth0")
        assert homeclust_json(inventory, "plan", "--only", "network")[0] == 0
        # It survives a reboot (the lease is renewed under the same identity).
        lab.reboot("master")
        assert homeclust(inventory, "check", "--only", "network").returncode == 0
    finally:
        lab.down()
