"""End-to-end tests of the lab's outside world: as hard, and as cheap to re-run, as the real one.

* The package mirror caches: a second ``apt-get update && apt-get install
  --download-only`` fetches nothing from the real archive, and the relay is
  no open proxy.
* The slow-uplink switch: a download through a shaped uplink takes as long
  as the rate says; the delay holds back each answer.
* The home router (``dhcp="router"``): leases keyed by client identity, one
  address.  Changing the client id and asking again without releasing the
  old lease gets nothing; releasing under the old configuration first hands
  the address to the new identity.  dhclient is driven by hand inside the
  master (not through homeclust's network step), so that lab's master runs
  bookworm whatever the suite's release (test_lab_releases.py boots a trixie
  master, dhcpcd, on a home router).

Two labs of this module's own (a master each, a few seconds to build): one
with the default DHCP server for the mirror and uplink tests, one home-router
lab for the DHCP tests, which take the master's address away for a while.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from homeclust.lab import Lab
from homeclust.lab.aptcache import AptCacheStats
from homeclust.lab.lab import ssh_banner
from tests.lab.conftest import start_lab
from tests.lab.helpers import inventory_copy, sh

pytestmark = pytest.mark.lab

PACKAGE = "tcpdump"  # small (~0.6 MB with its library), not in the rootfs
APT_RUN = (
    # Everything apt has is thrown away first, so every index and .deb is asked for again.
    "apt-get clean && rm -rf /var/lib/apt/lists/* && apt-get update -q "
    f"&& apt-get install -y -q --download-only {PACKAGE}"
)


@pytest.fixture(scope="module")
def world_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A master-only lab with the default (reserved) DHCP server."""
    inventory = inventory_copy(tmp_path_factory.mktemp("world"), "labworld", workers=0)
    the_lab, _ = start_lab(inventory)
    try:
        yield the_lab
    finally:
        the_lab.down()


def settled_stats(the_lab: Lab) -> AptCacheStats:
    """The relay's counters once its log stops growing (a request's line lands just
    after its answer, so apt can be done a moment before the last line is there)."""
    last = the_lab.apt_cache_stats()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = the_lab.apt_cache_stats()
        if now == last:
            return now
        last = now
    return last


# ---------------------------------------------------------------------------
# The package mirror
# ---------------------------------------------------------------------------


def test_a_second_apt_run_downloads_nothing_from_upstream(world_lab: Lab) -> None:
    first_started = time.monotonic()
    # The first run asks for fresh index files (the shared cache may hold some that are
    # about to pass their 10 minutes): the second one then finds everything fresh.
    sh(world_lab, "master", APT_RUN.replace(
        "apt-get update", "apt-get -o Acquire::http::No-Cache=true update"), timeout=600)
    first_seconds = time.monotonic() - first_started
    after_first = settled_stats(world_lab)
    # The first run may have found the shared cache warm already (an earlier lab,
    # an earlier test run): what matters is that the second needs nothing more.
    assert after_first.requests > 0 and after_first.errors == 0

    second_started = time.monotonic()
    sh(world_lab, "master", APT_RUN, timeout=600)
    second_seconds = time.monotonic() - second_started
    second = settled_stats(world_lab) - after_first

    assert second.upstream_bytes == 0, second.describe()
    assert second.upstream_requests == 0 and second.misses == 0, second.describe()
    assert second.hits == second.requests > 5, second.describe()  # indexes + the .debs
    assert second.client_bytes > 1_000_000  # all of it really served, from the cache
    debs = sh(world_lab, "master", f"ls /var/cache/apt/archives/ | grep '^{PACKAGE}_'")
    assert debs.strip().endswith(".deb")
    print(f"first apt run {first_seconds:.1f} s, second {second_seconds:.1f} s: "
          f"{second.describe()}")


def test_the_mirror_is_no_open_proxy(world_lab: Lab) -> None:
    def status_line(request_target: str, method: str = "GET", host: str = "deb.debian.org") -> str:
        request = f"{method} {request_target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        script = (f"exec 3<>/dev/tcp/deb.debian.org/80 && printf %s {shlex.quote(request)} >&3 "
                  "&& head -n 1 <&3")
        return sh(world_lab, "master", f"timeout 20 bash -c {shlex.quote(script)}").strip()

    before = settled_stats(world_lab)
    assert status_line("http://example.org/", host="example.org").startswith("HTTP/1.1 403")
    assert status_line("/debian/../../etc/passwd").startswith("HTTP/1.1 403")
    assert status_line("/ubuntu/dists/jammy/InRelease").startswith("HTTP/1.1 403")
    assert status_line("/debian/dists/bookworm/InRelease", method="POST").startswith(
        "HTTP/1.1 403")
    assert status_line("/debian/dists/bookworm/InRelease", method="HEAD").startswith(
        "HTTP/1.1 200")
    delta = settled_stats(world_lab) - before
    assert delta.refused == 4 and delta.upstream_requests <= 1  # only the HEAD may ask


# ---------------------------------------------------------------------------
# The slow uplink
# ---------------------------------------------------------------------------


def _package_url(the_lab: Lab) -> tuple[str, int]:
    """URL and size of PACKAGE's .deb, from the node's own package lists."""
    sh(the_lab, "master", "apt-get update -q", timeout=300)
    uris = sh(the_lab, "master", f"apt-get download --print-uris {PACKAGE}")
    match = re.search(r"'(http://deb\.debian\.org/\S+\.deb)' \S+ (\d+) ", uris)
    assert match, uris
    return match.group(1), int(match.group(2))


def _timed_download(the_lab: Lab, url: str) -> float:
    started = time.monotonic()
    sh(the_lab, "master", f"/usr/lib/apt/apt-helper download-file {shlex.quote(url)} /tmp/x.deb",
       timeout=120)
    return time.monotonic() - started


def test_a_download_through_a_slow_uplink_takes_as_long_as_the_rate_says(
    world_lab: Lab,
) -> None:
    url, size = _package_url(world_lab)
    fast = _timed_download(world_lab, url)  # also puts it in the cache: upstream's speed drops out
    rate = 1_000_000
    expected = size * 8 / rate
    try:
        world_lab.set_uplink("1mbit")
        status = world_lab.status().uplink
        assert status == "1 Mbit/s each way", status  # both ends shaped, as the kernel says
        slow = _timed_download(world_lab, url)
    finally:
        world_lab.set_uplink(None)
    assert slow >= 0.7 * expected, f"{size} bytes in {slow:.1f} s at 1 Mbit/s"
    assert slow <= 2 * expected + 2, f"{size} bytes in {slow:.1f} s at 1 Mbit/s"
    assert world_lab.status().uplink == "unlimited"
    again = _timed_download(world_lab, url)
    assert again < 0.5 * expected, f"still slow after --off: {again:.1f} s"
    print(f"{size} bytes: {fast:.2f} s at full speed, {slow:.2f} s at 1 Mbit/s "
          f"(expected {expected:.2f} s), {again:.2f} s after --off")


def test_the_uplink_delay_holds_back_each_answer(world_lab: Lab) -> None:
    url, _ = _package_url(world_lab)
    _timed_download(world_lab, url)
    try:
        world_lab.set_uplink(None, delay_ms=1500)
        assert world_lab.uplink().delay_ms == 1500
        delayed = _timed_download(world_lab, url)
    finally:
        world_lab.set_uplink(None)
    assert delayed >= 1.5
    assert _timed_download(world_lab, url) < 1.0


# ---------------------------------------------------------------------------
# The home router
# ---------------------------------------------------------------------------

# What Debian's ifupdown runs for "iface eth0 inet dhcp" (see /sbin/ifup): with
# -i, dhclient sends a DUID-based client id even when dhclient.conf names none.
DHCLIENT = ("dhclient -4 -v -i -pf /run/dhclient.eth0.pid -lf /var/lib/dhcp/dhclient.eth0.leases "
            "-I -df /var/lib/dhcp/dhclient6.eth0.leases")
NEW_CLIENT_ID = "cluster-master"
NO_ADDRESS_WAIT = 15  # seconds the new identity asks in vain (3 DHCPDISCOVERs or so)


class RouterMaster:
    """Drive the router lab master's DHCP client by hand, as ifup/ifdown would."""

    def __init__(self, the_lab: Lab, installer_conf: str) -> None:
        self.lab = the_lab
        self.installer_conf = installer_conf

    def run(self, script: str, timeout: float = 60) -> str:
        return sh(self.lab, "master", script, timeout=timeout)

    def use_config(self, client_id: str | None) -> None:
        """The installer's dhclient.conf, or the guide's change: send a client id."""
        text = self.installer_conf
        if client_id:
            text += (f'\ninterface "eth0" {{\n    send dhcp-client-identifier "{client_id}";\n}}\n')
        self.lab.exec("master", ["sh", "-c", "cat > /etc/dhcp/dhclient.conf"], input=text)

    def up(self, wait: float) -> None:
        """``ifup``: dhclient until it is bound, or ``wait`` seconds pass."""
        self.run(f"timeout {wait:g} {DHCLIENT} -1 eth0 || true", timeout=wait + 30)

    def down(self) -> None:
        """``ifdown``: dhclient -r releases the lease under the configuration in force."""
        self.run(f"{DHCLIENT} -r eth0")

    def address(self) -> str | None:
        shown = self.run("ip -4 -o addr show dev eth0")
        match = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", shown)
        return match.group(1) if match else None

    def lease_owners(self) -> list[str | None]:
        """Client ids of the router's leases of the master's address."""
        return [lease.client_id for lease in self.lab.dhcp_leases()
                if lease.address == self.lab.master_public_address]

    def router_log(self) -> str:
        return self.lab.paths.log("dnsmasq-queries").read_text(errors="replace")

    def restore(self) -> None:
        """Back to how the master booted: installer config, bound, dhclient running."""
        if self.address():
            self.down()  # releases the lease if this config's identity holds it
        else:
            self.run(f"{DHCLIENT} -x eth0 || true")
        self.use_config(None)
        self.run(f"timeout 30 {DHCLIENT} eth0", timeout=60)  # daemonizes once bound
        assert self.address() == str(self.lab.master_public_address)


@pytest.fixture(scope="module")
def router_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    inventory = inventory_copy(tmp_path_factory.mktemp("router"), "labrouter", workers=0)
    the_lab, _ = start_lab(inventory, dhcp="router", release="bookworm")  # dhclient by hand
    try:
        yield the_lab
    finally:
        the_lab.down()


@pytest.fixture
def router_master(router_lab: Lab) -> Iterator[RouterMaster]:
    installer_conf = router_lab.exec("master", ["cat", "/etc/dhcp/dhclient.conf"]).stdout
    master = RouterMaster(router_lab, installer_conf)
    try:
        yield master
    finally:
        master.restore()


def test_router_lab_gives_the_master_its_one_address_without_a_reservation(
    router_lab: Lab, router_master: RouterMaster
) -> None:
    status = router_lab.status()
    assert status.dhcp == "router" and status.phase == "up"
    conf = router_lab.paths.dnsmasq_conf.read_text()
    assert "dhcp-host" not in conf
    address = router_lab.master_public_address
    assert f"dhcp-range={address},{address}," in conf
    # The installer's dhclient.conf names no client id ...
    active = [line for line in router_master.installer_conf.splitlines()
              if not line.lstrip().startswith("#")]
    assert not [line for line in active if "dhcp-client-identifier" in line]
    # ... yet the lease is keyed by one: the DUID-based id of ifupdown's `dhclient -i`.
    (owner,) = router_master.lease_owners()
    assert owner is not None and owner.startswith("ff:") and owner != NEW_CLIENT_ID
    assert router_master.address() == str(address)
    assert ssh_banner(("127.0.0.1", router_lab.ssh_port))  # the admin's forward reaches it


def test_new_client_id_without_releasing_the_old_lease_gets_no_address(
    router_lab: Lab, router_master: RouterMaster
) -> None:
    (old_owner,) = router_master.lease_owners()
    log_before = len(router_master.router_log())
    # The guide's change, then ifdown/ifup with the *new* configuration.
    router_master.use_config(NEW_CLIENT_ID)
    router_master.down()
    assert router_master.lease_owners() == [old_owner]  # the release was not the lease's owner's
    started = time.monotonic()
    router_master.up(wait=NO_ADDRESS_WAIT)
    assert time.monotonic() - started >= NO_ADDRESS_WAIT - 1
    assert router_master.address() is None, "the new identity got an address"
    assert router_master.lease_owners() == [old_owner]  # the old lease keeps the only address
    log = router_master.router_log()[log_before:]
    assert re.search(rf"DHCPRELEASE\(eth0\) {re.escape(str(router_lab.master_public_address))} "
                     r"\S+ unknown lease", log), log
    assert "no address available" in log, log
    assert not ssh_banner(("127.0.0.1", router_lab.ssh_port))  # the admin has lost the master


def test_releasing_under_the_old_configuration_hands_the_address_to_the_new_identity(
    router_lab: Lab, router_master: RouterMaster
) -> None:
    (old_owner,) = router_master.lease_owners()
    assert old_owner != NEW_CLIENT_ID
    # ifdown with the *old* configuration first: the old identity releases its lease.
    router_master.down()
    assert router_master.lease_owners() == []
    router_master.use_config(NEW_CLIENT_ID)
    started = time.monotonic()
    router_master.up(wait=NO_ADDRESS_WAIT)
    took = time.monotonic() - started
    assert router_master.address() == str(router_lab.master_public_address)
    assert router_master.lease_owners() == [NEW_CLIENT_ID]
    assert took < 10
    assert ssh_banner(("127.0.0.1", router_lab.ssh_port))


def test_router_lab_master_keeps_its_address_across_a_reboot(
    router_lab: Lab, router_master: RouterMaster
) -> None:
    (owner,) = router_master.lease_owners()
    router_lab.reboot("master")  # waits for SSH through the admin's forward
    assert router_master.lease_owners() == [owner]  # same DUID: same identity, same lease
    assert router_master.address() == str(router_lab.master_public_address)
    assert Lab.from_state(router_lab.cluster).status().dhcp == "router"


def test_lab_state_file_records_the_dhcp_mode(router_lab: Lab) -> None:
    assert '"dhcp": "router"' in Path(router_lab.paths.state_file).read_text()
