"""End-to-end tests of the lab's Debian releases: each node as its release's installer leaves it.

* Each release (trixie, bookworm) boots: ``/etc/os-release`` says so; the
  master's public side is leased by the release's own DHCP client (dhcpcd on
  trixie, dhclient on bookworm; the other one is not even installed), and the
  institute's reservation by client id holds at first boot: the DHCP server
  saw exactly the bytes of ``dhcp_client_id``.  The sources are the
  release's format (trixie: deb822 ``debian.sources``, no ``sources.list``),
  and the master installs from the three suites through the lab's relay.
  Each release gets a small lab of its own (a master and a worker): the
  session lab may have been through ``homeclust up`` by now.
* On a home router (``dhcp="router"``) a trixie master sends no configured
  client id: dhcpcd's DUID-based one, as the package leaves it.
* A mixed lab (trixie master and worker2, bookworm worker1) boots with each
  node on its release, every worker reachable through the master; reboot and
  reset keep each node's release (the lab's state records it), and ``up``
  with other releases is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from homeclust.errors import LabError
from homeclust.lab import Lab
from homeclust.lab.plan import RELEASES
from homeclust.lab.testing import connect, ssh_run
from tests.lab.conftest import start_lab
from tests.lab.helpers import inventory_copy, sh

pytestmark = pytest.mark.lab

#: What each release's installer leaves: (VERSION_ID, DHCP client, its package,
#: the other client and its package, the sources file, the file that must not exist).
INSTALLER = {
    "trixie": ("13", "dhcpcd", "dhcpcd-base", "dhclient", "isc-dhcp-client",
               "/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"),
    "bookworm": ("12", "dhclient", "isc-dhcp-client", "dhcpcd", "dhcpcd-base",
                 "/etc/apt/sources.list", "/etc/apt/sources.list.d/debian.sources"),
}
PACKAGE = "tcpdump"  # small, not in the rootfs


def os_release(lab: Lab, node: str) -> dict[str, str]:
    text = sh(lab, node, "cat /etc/os-release")
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {key: value.strip('"') for key, value in pairs}


def deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas = []
    for block in text.strip().split("\n\n"):
        fields = (line.split(":", 1) for line in block.splitlines()
                  if line.strip() and not line.startswith("#"))
        stanzas.append({key.strip(): value.strip() for key, value in fields})
    return stanzas


def installed(lab: Lab, node: str, package: str) -> bool:
    done = lab.exec(node, ["dpkg-query", "-W", "-f", "${Status}", package], check=False)
    return done.stdout.endswith("install ok installed")


@pytest.fixture(scope="module", params=RELEASES)
def release_lab(request: pytest.FixtureRequest,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A fresh lab, a master and one worker, every node on the parameter's release."""
    release: str = request.param
    inventory = inventory_copy(tmp_path_factory.mktemp(release), f"lab{release}", workers=1)
    the_lab, _ = start_lab(inventory, release=release)
    try:
        yield the_lab
    finally:
        the_lab.down()


def test_nodes_run_their_release_as_its_installer_leaves_it(release_lab: Lab) -> None:
    release = release_lab.plan.master.release
    version, client, package, other_client, other_package, sources, absent = INSTALLER[release]
    for node in release_lab.node_names:
        info = os_release(release_lab, node)
        assert (info["VERSION_CODENAME"], info["VERSION_ID"]) == (release, version), node
        assert installed(release_lab, node, package), f"{node}: {package} missing"
        assert not installed(release_lab, node, other_package), f"{node}: {other_package}"
        assert sh(release_lab, node, f"command -v {other_client} || true").strip() == ""
        assert sh(release_lab, node, f"test -e {absent} && echo present || true") == ""
        assert sh(release_lab, node, f"test -s {sources} && echo ok") == "ok\n"
    # The master's public side: leased by the release's own client, which keeps running.
    master = release_lab.plan.master.name
    running = sh(release_lab, master, f"pgrep -x {client} || true").split()
    assert running, f"no {client} running on the master"
    assert sh(release_lab, master, f"pgrep -x {other_client} || true") == ""
    address = sh(release_lab, master, "ip -4 -o addr show dev eth0")
    assert f"{release_lab.master_public_address}/24" in address and "dynamic" in address


def test_master_lease_carries_exactly_the_client_id_bytes(release_lab: Lab) -> None:
    # The lease file's client id in hex, decoded: "cluster-master" only when the
    # client sent those 14 bytes and nothing else (dhcpcd's text form would put a
    # 00 in front, its default a DUID-based ff:...).
    (lease,) = [lease for lease in release_lab.dhcp_leases()
                if lease.address == release_lab.master_public_address]
    assert lease.client_id == "cluster-master"
    conf = release_lab.paths.dnsmasq_conf.read_text()
    assert "dhcp-host=id:63:6c:75:73:74:65:72:2d:6d:61:73:74:65:72," in conf


def test_trixie_sources_are_deb822_signed_by_the_archive_keyring(release_lab: Lab) -> None:
    release = release_lab.plan.master.release
    if release != "trixie":
        text = sh(release_lab, "master", "cat /etc/apt/sources.list")
        suites = {line.split()[2] for line in text.splitlines() if line.startswith("deb ")}
        assert suites == {release, f"{release}-updates", f"{release}-security"}
        return
    stanzas = deb822_stanzas(sh(release_lab, "master",
                                "cat /etc/apt/sources.list.d/debian.sources"))
    suites = {suite for stanza in stanzas for suite in stanza["Suites"].split()}
    assert suites == {"trixie", "trixie-updates", "trixie-security"}
    for stanza in stanzas:
        assert stanza["Types"] == "deb" and stanza["Components"] == "main"
        keyring = stanza["Signed-By"]
        assert sh(release_lab, "master", f"test -s {keyring} && echo ok") == "ok\n"
    assert sh(release_lab, "master", "ls /etc/apt/sources.list.d") == "debian.sources\n"


def test_master_installs_from_all_three_suites_through_the_relay(release_lab: Lab) -> None:
    release = release_lab.plan.master.release
    lists = "/var/lib/apt/lists"
    before = set(sh(release_lab, "master", f"ls -A {lists}").split())
    stats_before = release_lab.paths.apt_cache_stats.stat().st_size
    try:
        done = release_lab.exec("master", ["sh", "-c", "apt-get update -q && apt-get install "
                                           f"-y -q --download-only {PACKAGE}"],
                                timeout=600, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "W:" not in done.stderr and "Notice:" not in done.stdout + done.stderr, done.stderr
        with open(release_lab.paths.apt_cache_stats) as log:
            log.seek(stats_before)
            records = [json.loads(line) for line in log if line.strip()]
        served = {r["path"] for r in records if r["status"] == 200}
        for dist in (f"/debian/dists/{release}/", f"/debian/dists/{release}-updates/",
                     f"/debian-security/dists/{release}-security/"):
            assert any(path.startswith(dist) for path in served), (dist, sorted(served))
        assert any(path.startswith("/debian") and path.endswith(".deb") for path in served)
    finally:
        # Leave the master as it was for the other tests: no lists, no .debs.
        after = set(sh(release_lab, "master", f"ls -A {lists}").split())
        for name in after - before:
            sh(release_lab, "master", f"rm -rf {lists}/{name}")
        sh(release_lab, "master", "apt-get clean && rm -f /var/cache/apt/*.bin")


# --------------------------------------------------------------------------- home router


@pytest.fixture(scope="module")
def trixie_router_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    inventory = inventory_copy(tmp_path_factory.mktemp("trouter"), "labtrouter", workers=0)
    the_lab, _ = start_lab(inventory, release="trixie", dhcp="router")
    try:
        yield the_lab
    finally:
        the_lab.down()


def test_trixie_master_on_a_home_router_sends_dhcpcds_own_client_id(
    trixie_router_lab: Lab,
) -> None:
    # The package's dhcpcd.conf as it is (dpkg's checksum of the conffile agrees):
    # no interface block, no clientid of ours.
    conffiles = sh(trixie_router_lab, "master", "dpkg-query -W -f '${Conffiles}' dhcpcd-base")
    (shipped,) = [line.split()[1] for line in conffiles.splitlines()
                  if line.split()[:1] == ["/etc/dhcpcd.conf"]]
    assert sh(trixie_router_lab, "master", "md5sum < /etc/dhcpcd.conf").split()[0] == shipped
    conf = sh(trixie_router_lab, "master", "cat /etc/dhcpcd.conf")
    active = [line.split()[0] for line in conf.splitlines()
              if line.strip() and not line.lstrip().startswith("#")]
    assert "clientid" not in active and "interface" not in active and "duid" in active
    (lease,) = [lease for lease in trixie_router_lab.dhcp_leases()
                if lease.address == trixie_router_lab.master_public_address]
    # RFC 4361: type 255, then IAID and DUID -- dhcpcd's default, not the inventory's id.
    assert lease.client_id is not None and lease.client_id.startswith("ff:")
    assert sh(trixie_router_lab, "master", "pgrep -x dhcpcd || true").split()


# --------------------------------------------------------------------------- mixed lab


@pytest.fixture(scope="module")
def mixed_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A trixie master and worker2, a bookworm worker1: a cluster that grew over years."""
    inventory = inventory_copy(tmp_path_factory.mktemp("mixed"), "labmixed", workers=2)
    the_lab, _ = start_lab(inventory, release="trixie", node_releases={"worker1": "bookworm"})
    try:
        yield the_lab
    finally:
        the_lab.down()


MIXED = {"master": "trixie", "worker1": "bookworm", "worker2": "trixie"}


def test_mixed_lab_runs_each_node_on_its_release(mixed_lab: Lab) -> None:
    for node, release in MIXED.items():
        assert os_release(mixed_lab, node)["VERSION_CODENAME"] == release, node
        assert installed(mixed_lab, node, INSTALLER[release][2]), node
    recorded = Lab.from_state(mixed_lab.cluster).status()
    assert {n.name: n.release for n in recorded.nodes} == MIXED
    assert all(n.running for n in recorded.nodes)
    described = recorded.describe()
    for node, release in MIXED.items():
        assert any(line.split()[:3] == [node, "master" if node == "master" else "worker",
                                        release] for line in described.splitlines()), described


def test_mixed_lab_workers_are_reachable_through_the_master(mixed_lab: Lab) -> None:
    master = connect(mixed_lab, "master")
    try:
        for worker in ("worker1", "worker2"):
            client = connect(mixed_lab, worker, via=master)
            status, out = ssh_run(client, ". /etc/os-release; hostname; echo $VERSION_CODENAME;"
                                  " echo $SSH_CONNECTION")
            client.close()
            assert status == 0
            hostname, codename, connection = out.split("\n")[:3]
            assert (hostname, codename) == (worker, MIXED[worker])
            assert connection.split()[0] == "192.168.10.1"  # through the master
    finally:
        master.close()


def test_mixed_lab_reboot_and_reset_keep_each_nodes_release(mixed_lab: Lab) -> None:
    sh(mixed_lab, "worker1", "echo kept > /root/kept && sync")
    Lab.from_state(mixed_lab.cluster).reboot("worker1")
    assert os_release(mixed_lab, "worker1")["VERSION_CODENAME"] == "bookworm"
    assert sh(mixed_lab, "worker1", "cat /root/kept") == "kept\n"
    sh(mixed_lab, "worker2", "echo gone > /root/gone")
    mixed_lab.reset("worker2")
    assert os_release(mixed_lab, "worker2")["VERSION_CODENAME"] == "trixie"
    assert sh(mixed_lab, "worker2", "test -e /root/gone && echo there || true") == ""
    mixed_lab.stop("worker1")
    mixed_lab.start("worker1")
    assert os_release(mixed_lab, "worker1")["VERSION_CODENAME"] == "bookworm"


def test_up_with_other_releases_is_refused(mixed_lab: Lab) -> None:
    source = Path(mixed_lab.paths.source_inventory)
    with pytest.raises(LabError, match=r"worker1 runs bookworm, not trixie"):
        Lab(source, release="trixie").up()
    with pytest.raises(LabError, match=r"master runs trixie, not bookworm"):
        Lab(source, release="bookworm", node_releases={"worker1": "bookworm"}).up()
    # The same releases: the lab that is up, untouched.
    assert Lab(source, release="trixie", node_releases={"worker1": "bookworm"}).up().already_up
