"""Renderers of the key mesh: managed blocks, authorized_keys, ssh_known_hosts, ssh_config."""

from __future__ import annotations

import pytest

from homeclust.render.blocks import BlockError, block_body, replace_block
from homeclust.render.ssh import (
    AUTHORIZED_BEGIN,
    AUTHORIZED_END,
    SSH_CONFIG,
    PublicKey,
    cluster_host_patterns,
    includes_dropins,
    parse_known_hosts_block,
    parse_public_key,
    render_authorized_keys,
    render_known_hosts,
    render_ssh_config_block,
    render_ssh_config_dropin,
)
from tests.unit.factsbuilder import check_golden
from tests.unit.meshfacts import CENTOS7_SSH_CONFIG, INV, RHEL9_SSH_CONFIG, lab_inventory, mesh

ADMIN = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJLOwqWrAeCW8q88qYEOV5RHmV1ApMtza9n1P+hRr2Wt admin@laptop"
BY_HAND = 'command="/usr/bin/rsync --server" ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 backup@nas'
CLUSTER_KEY = PublicKey("ssh-ed25519",
                        "AAAAC3NzaC1lZDI1NTE5AAAAIHytqL+Xy5mIHRXEqJhFwihRjl4eteMLLrA4KJeNUkIC")


def test_block_is_replaced_where_it_stands_and_nothing_else_changes() -> None:
    text = f"{ADMIN}\n{AUTHORIZED_BEGIN}\nold key\n{AUTHORIZED_END}\n{BY_HAND}\n\n# note\n"
    out = replace_block(text, AUTHORIZED_BEGIN, AUTHORIZED_END, ["new key"])
    assert out == f"{ADMIN}\n{AUTHORIZED_BEGIN}\nnew key\n{AUTHORIZED_END}\n{BY_HAND}\n\n# note\n"
    assert block_body(out, AUTHORIZED_BEGIN, AUTHORIZED_END) == ["new key"]


def test_block_is_appended_after_a_last_line_without_newline() -> None:
    out = replace_block(ADMIN, AUTHORIZED_BEGIN, AUTHORIZED_END, ["k"])
    assert out == f"{ADMIN}\n{AUTHORIZED_BEGIN}\nk\n{AUTHORIZED_END}\n"
    assert replace_block(None, "B", "E", ["k"]) == "B\nk\nE\n"


@pytest.mark.parametrize("text", [
    f"{ADMIN}\n{AUTHORIZED_BEGIN}\nk\n",  # BEGIN without END: where would the block stop?
    f"{AUTHORIZED_BEGIN}\nk\n{AUTHORIZED_END}\n{AUTHORIZED_BEGIN}\nk\n{AUTHORIZED_END}\n",
])
def test_broken_markers_are_refused_rather_than_guessed(text: str) -> None:
    with pytest.raises(BlockError):
        replace_block(text, AUTHORIZED_BEGIN, AUTHORIZED_END, ["k"])


def test_authorized_keys_keeps_the_admins_and_hand_added_keys() -> None:
    current = f"{ADMIN}\n{BY_HAND}"  # no newline at the end, as editors sometimes leave it
    out = render_authorized_keys(current, CLUSTER_KEY, INV, "hpc")
    check_golden("ssh/authorized_keys", out)
    assert out.startswith(f"{ADMIN}\n{BY_HAND}\n")
    # The cluster key opens the nodes to each other only.
    assert f'from="192.168.10.0/24" {CLUSTER_KEY} hpc@try-km-homeclust' in out
    assert render_authorized_keys(out, CLUSTER_KEY, INV, "hpc") == out


def test_public_keys_are_read_strictly() -> None:
    assert parse_public_key(f"{CLUSTER_KEY} root@master\n") == CLUSTER_KEY
    for bad in ("", "ssh-ed25519", "garbage AAAA", "ssh-ed25519 not*base64"):
        assert parse_public_key(bad) is None


def test_known_hosts_lists_every_host_key_under_name_and_address() -> None:
    master = mesh("master")
    keys = {"master": [parse_public_key(master.file_text(f"/etc/ssh/ssh_host_{t}_key.pub"))
                       for t in ("ed25519", "rsa", "ecdsa")]}
    current = "# the admin's own entry\nnas,10.0.0.9 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO\n"
    out = render_known_hosts(current, INV, keys)  # type: ignore[arg-type]
    check_golden("ssh/ssh_known_hosts", out)
    assert out.startswith(current)
    lines = [line for line in out.splitlines() if line.startswith("master,192.168.10.1 ")]
    assert len(lines) == 3
    assert parse_known_hosts_block(
        (block := out.splitlines())[block.index(
            "# BEGIN homeclust cluster nodes (ssh-keys step; lines inside are replaced)") + 1:-1]
    ) == {"master": sorted(keys["master"])}  # type: ignore[type-var]


def test_ssh_config_dropin_and_the_block_for_a_config_without_include() -> None:
    assert includes_dropins(mesh("master").file_text(SSH_CONFIG))  # Debian 12, as captured
    assert includes_dropins(RHEL9_SSH_CONFIG)
    assert not includes_dropins(CENTOS7_SSH_CONFIG)
    assert not includes_dropins(None)
    check_golden("ssh/ssh_config.d/40-homeclust.conf", render_ssh_config_dropin(INV))
    block = render_ssh_config_block(CENTOS7_SSH_CONFIG, INV)
    check_golden("ssh/centos7/ssh_config", block)
    assert block.startswith(CENTOS7_SSH_CONFIG + "\n")
    assert render_ssh_config_block(block, INV) == block


def test_many_nodes_are_split_over_several_host_lines() -> None:
    big = lab_inventory(workers=[{"name": f"node{i}", "private_address": f"192.168.10.{i + 1}"}
                                 for i in range(1, 40)])
    text = render_ssh_config_dropin(big)
    host_lines = [line for line in text.splitlines() if line.startswith("Host ")]
    assert len(host_lines) == 3  # 80 patterns, 32 per line
    assert sum(len(line.split()) - 1 for line in host_lines) == len(cluster_host_patterns(big))
    assert text.count("IdentityFile ~/.ssh/id_ed25519_homeclust") == 3
