"""Fixtures for the end-to-end tests on the virtual lab (tests marked ``lab``).

* ``lab``: one lab per test session, built from the repository's
  ``inventory.toml`` (the guide's cluster: master + worker1..3), every node
  on the suite's release: ``$HOMECLUST_TEST_RELEASE`` (trixie or bookworm;
  bookworm when unset, for now: the lead flips the default once the steps are
  ready for trixie).  Whatever an
  interrupted earlier run left is removed first; the lab is torn down at the
  end of the session whatever happens.  If it cannot start, every test using
  it fails (never skips): a broken lab is a broken build.
* ``lab_info``: what ``Lab.up()`` returned (timings, addresses).
* ``lab_inventory_path`` / ``lab_inventory``: the lab inventory to point
  homeclust at (``homeclust -i PATH up``).
* ``lab_ssh``: ``lab_ssh(node)`` -> a connected paramiko client, as root with
  the lab's key; workers are reached through the master, like homeclust does.
* ``lab_factory``: ``lab_factory(inventory_path, release=None,
  node_releases=None, dhcp=None)`` -> (Lab, LabInfo): an extra lab (use
  another cluster name: ``helpers.inventory_copy``) for tests that break or
  tear down a lab, or that need a given release.  ``release``: every node's
  Debian release ("trixie" or "bookworm"; None: the suite's release);
  ``node_releases``: {node: release} for a mixed lab, e.g.
  ``lab_factory(inventory_copy(tmp, "mixed", workers=1), release="trixie",
  node_releases={"worker1": "bookworm"})``.  Every such lab is torn down at
  the end of the session.
* ``start_lab(inventory, ...)``: the same for a test that tears its lab down
  itself (same arguments).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import paramiko
import pytest

from homeclust.inventory import Inventory, load_inventory
from homeclust.lab import Lab, LabInfo
from homeclust.lab.testing import connect, suite_release
from tests.lab.helpers import CLUSTER_SUFFIX, GUIDE_INVENTORY, inventory_copy

_config: pytest.Config | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config


def progress(message: str) -> None:
    """Lab progress goes past pytest's capture: a first rootfs build takes a minute."""
    capture = _config.pluginmanager.getplugin("capturemanager") if _config else None
    if capture is None:
        print(f"[lab] {message}", file=sys.stderr, flush=True)
        return
    with capture.global_and_fixture_disabled():
        print(f"\n[lab] {message}", file=sys.stderr, flush=True)


def start_lab(
    inventory: Path,
    *,
    dhcp: str | None = None,
    release: str | None = None,
    node_releases: Mapping[str, str] | None = None,
) -> tuple[Lab, LabInfo]:
    """A fresh lab for ``inventory`` (``dhcp``: the lab's DHCP mode; ``release``: every
    node's release, None for the suite's; ``node_releases``: {node: release}), or pytest.fail."""
    if os.geteuid() != 0:
        pytest.fail("the lab tests need root (run scripts/test as root)", pytrace=False)
    the_lab = Lab(inventory, progress=progress, dhcp=dhcp, release=release or suite_release(),
                  node_releases=node_releases)
    try:
        the_lab.down()  # whatever an interrupted earlier run left behind
        info = the_lab.up()
    except Exception as exc:
        with contextlib.suppress(Exception):
            the_lab.down()
        pytest.fail(f"the lab could not start: {exc}", pytrace=False)
    except BaseException:  # Ctrl-C while building: still leave nothing behind
        with contextlib.suppress(Exception):
            the_lab.down()
        raise
    progress(info.summary().splitlines()[0])
    return the_lab, info


LabFactory = Callable[..., tuple[Lab, LabInfo]]


@pytest.fixture(scope="session")
def lab_factory() -> Iterator[LabFactory]:
    """Extra labs (other cluster names) for tests that break or tear down their lab,
    or need a given release: ``lab_factory(inventory, release=..., node_releases=...)``."""
    started: list[Lab] = []

    def make(
        inventory: Path,
        *,
        release: str | None = None,
        node_releases: Mapping[str, str] | None = None,
        dhcp: str | None = None,
    ) -> tuple[Lab, LabInfo]:
        the_lab, info = start_lab(inventory, dhcp=dhcp, release=release,
                                  node_releases=node_releases)
        started.append(the_lab)
        return the_lab, info

    yield make
    for the_lab in started:
        with contextlib.suppress(Exception):
            the_lab.down()


@pytest.fixture(scope="session")
def _lab_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, LabInfo]]:
    inventory = GUIDE_INVENTORY
    if CLUSTER_SUFFIX:
        inventory = inventory_copy(tmp_path_factory.mktemp("guide"), "homeclust")
    the_lab, info = start_lab(inventory)
    try:
        yield the_lab, info
    finally:
        progress(the_lab.down().summary())


@pytest.fixture(scope="session")
def lab(_lab_session: tuple[Lab, LabInfo]) -> Lab:
    return _lab_session[0]


@pytest.fixture(scope="session")
def lab_info(_lab_session: tuple[Lab, LabInfo]) -> LabInfo:
    return _lab_session[1]


@pytest.fixture(scope="session")
def lab_inventory_path(lab: Lab) -> Path:
    return lab.inventory_path


@pytest.fixture(scope="session")
def lab_inventory(lab_inventory_path: Path) -> Inventory:
    return load_inventory(lab_inventory_path)


@pytest.fixture
def lab_ssh(lab: Lab) -> Iterator[Callable[[str], paramiko.SSHClient]]:
    opened: list[paramiko.SSHClient] = []

    master: list[paramiko.SSHClient] = []

    def open_client(node: str) -> paramiko.SSHClient:
        if lab.plan.node(node).role != "master" and not master:
            master.append(connect(lab, lab.plan.master.name))
            opened.append(master[0])
        client = connect(lab, node, via=master[0] if master else None)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        client.close()

