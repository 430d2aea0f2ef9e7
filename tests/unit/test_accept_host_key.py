"""accept-host-key: the pin changes only after confirmation, and only to the offered key."""

from __future__ import annotations

import threading
from pathlib import Path

import paramiko
import pytest

from homeclust import api
from homeclust.errors import HostKeyChangedError
from homeclust.inventory import Node
from homeclust.transport import PinnedHostKeys, fingerprint, pin_name

INVENTORY = """\
[cluster]
name = "t"
[ssh]
key = "/nonexistent"
known_hosts = "{known_hosts}"
[master]
name = "master"
address = "10.0.0.5"
private_address = "192.168.10.1"
[[workers]]
name = "worker2"
private_address = "192.168.10.3"
"""

OLD = paramiko.RSAKey.generate(1024)
NEW = paramiko.RSAKey.generate(1024)


class OfferingConnector:
    """Offers ``key`` for every node; pins live in the real known_hosts file."""

    def __init__(self, path: Path, key: paramiko.PKey) -> None:
        self.keys = PinnedHostKeys(path)
        self.key = key
        self.cancel = threading.Event()

    def offered_host_key(self, node: Node) -> paramiko.PKey:
        return self.key


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    known = tmp_path / "known_hosts"
    known.write_text(f"192.168.10.3 {OLD.get_name()} {OLD.get_base64()}\n")
    inv = tmp_path / "inventory.toml"
    inv.write_text(INVENTORY.format(known_hosts=known))
    return inv, known


def accept(inv: Path, known: Path, **kwargs: object) -> tuple[api.HostKeyOffer, bool]:
    connector = OfferingConnector(known, NEW)
    return api.accept_host_key(inv, "worker2", connector=connector,  # type: ignore[arg-type]
                               **kwargs)  # type: ignore[arg-type]


def pinned(known: Path) -> list[str]:
    return [k.get_base64() for k in PinnedHostKeys(known).pinned("192.168.10.3")]


def test_declined_changes_nothing(setup: tuple[Path, Path]) -> None:
    inv, known = setup
    seen: list[api.HostKeyOffer] = []

    def decline(offer: api.HostKeyOffer) -> bool:
        seen.append(offer)
        return False

    _, accepted = accept(inv, known, fingerprint=None, confirm=decline)
    assert not accepted and pinned(known) == [OLD.get_base64()]
    assert seen[0].offered == f"ssh-rsa {fingerprint(NEW)}"
    assert seen[0].pinned == (f"ssh-rsa {fingerprint(OLD)}",)


def test_confirmed_replaces_the_pin(setup: tuple[Path, Path]) -> None:
    inv, known = setup
    _, accepted = accept(inv, known, fingerprint=None, confirm=lambda o: True)
    assert accepted and pinned(known) == [NEW.get_base64()]
    # Accepting again finds nothing to do.
    offer, again = accept(inv, known, fingerprint=None, confirm=lambda o: False)
    assert again and offer.already_pinned


def test_fingerprint_must_match_the_offered_key(setup: tuple[Path, Path]) -> None:
    inv, known = setup
    with pytest.raises(HostKeyChangedError, match="not accepted"):
        accept(inv, known, fingerprint=fingerprint(OLD), confirm=lambda o: True)
    assert pinned(known) == [OLD.get_base64()]
    _, accepted = accept(inv, known, fingerprint=fingerprint(NEW), confirm=lambda o: False)
    assert accepted and pinned(known) == [NEW.get_base64()]


def test_pin_names_follow_known_hosts_syntax() -> None:
    assert pin_name("192.168.10.3", 22) == "192.168.10.3"
    assert pin_name("127.0.0.1", 2222) == "[127.0.0.1]:2222"
