"""The key mesh's files (pure): authorized keys, known hosts, the client configuration.

* ``~/.ssh/authorized_keys`` of every cluster user gets a managed block holding
  that account's cluster public key, restricted with ``from="<private network>"``:
  the key opens the nodes to each other only, and nothing else in the file is
  touched (the admin's own keys stay).  Root's key stays on the master: the
  workers' root accepts it from the master's private address alone, the master's
  root accepts no cluster key.
* ``/etc/ssh/ssh_known_hosts`` (read by every account's ``ssh``) gets a block
  with every node's host keys under its name and its private address, so no
  ``ssh`` between nodes ever asks about a host key.
* The client configuration names the cluster key (``~/.ssh/id_ed25519_homeclust``,
  a file of its own so nobody's existing key is replaced or copied around) for
  the cluster's names and addresses: a drop-in in ``/etc/ssh/ssh_config.d`` where
  ``ssh_config`` includes that directory, else a block in ``ssh_config`` itself
  (CentOS 7).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from homeclust.inventory import Inventory
from homeclust.render.blocks import block_body, remove_block, replace_block

KEY_NAME = "id_ed25519_homeclust"

AUTHORIZED_BEGIN = "# BEGIN homeclust cluster key (ssh-keys step; lines inside are replaced)"
AUTHORIZED_END = "# END homeclust cluster key"
KNOWN_HOSTS_BEGIN = "# BEGIN homeclust cluster nodes (ssh-keys step; lines inside are replaced)"
KNOWN_HOSTS_END = "# END homeclust cluster nodes"
SSH_CONFIG_BEGIN = "# BEGIN homeclust cluster key (ssh-keys step; lines inside are replaced)"
SSH_CONFIG_END = "# END homeclust cluster key"

SSH_CONFIG = "/etc/ssh/ssh_config"
SSH_CONFIG_DROPIN = "/etc/ssh/ssh_config.d/40-homeclust.conf"
KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"

#: Key types a host or user public key may have (what ``ssh-keygen`` writes).
_KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521", "ssh-dss", "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
})
_BASE64_RE = re.compile(r"^[A-Za-z0-9+/]+={0,3}$")
_INCLUDE_RE = re.compile(r"^\s*include\s+(.*)$", re.IGNORECASE)


@dataclass(frozen=True, order=True)
class PublicKey:
    """``TYPE BASE64`` of an OpenSSH public key (the comment is not kept)."""

    type: str
    data: str

    def __str__(self) -> str:
        return f"{self.type} {self.data}"


def parse_public_key(text: str | None) -> PublicKey | None:
    """The key of a ``.pub`` file (first line ``TYPE BASE64 [comment]``), or None."""
    if not text:
        return None
    words = text.strip().split("\n", 1)[0].split()
    if len(words) < 2 or words[0] not in _KEY_TYPES or not _BASE64_RE.match(words[1]):
        return None
    return PublicKey(words[0], words[1])


def key_comment(user: str, cluster: str) -> str:
    """The comment of a cluster key: says whose it is and who made it.

    Root's says that it stays on the master: older homeclust releases copied root's key
    to every worker, and a root key without this comment is replaced by a new one."""
    if user == "root":
        return f"root@{cluster}-homeclust-master-only"
    return f"{user}@{cluster}-homeclust"


def key_comment_of(text: str | None) -> str | None:
    """The comment of a ``.pub`` file's key (None: no key, or no comment)."""
    if parse_public_key(text) is None or text is None:
        return None
    words = text.strip().split("\n", 1)[0].split()
    return " ".join(words[2:]) or None


def render_authorized_keys(current: str | None, key: PublicKey, inventory: Inventory,
                           user: str, *, source: str | None = None) -> str:
    """``authorized_keys`` with the cluster key block; every other line as it was.

    The key is accepted from the private network, or from ``source`` alone (root's key,
    accepted from the master's private address only)."""
    origin = source or inventory.cluster.private_network
    line = f'from="{origin}" {key} {key_comment(user, inventory.cluster.name)}'
    return replace_block(current, AUTHORIZED_BEGIN, AUTHORIZED_END, [line])


def remove_authorized_block(current: str | None) -> str | None:
    """``authorized_keys`` without the cluster key block (None: it has none)."""
    if block_body(current, AUTHORIZED_BEGIN, AUTHORIZED_END) is None:
        return None
    return remove_block(current, AUTHORIZED_BEGIN, AUTHORIZED_END)


def known_hosts_entries(inventory: Inventory, host_keys: Mapping[str, Sequence[PublicKey]]
                        ) -> list[str]:
    """One ``name,address TYPE KEY`` line per node and host key, in inventory order."""
    lines = []
    for node in inventory.nodes:
        for key in sorted(set(host_keys.get(node.name, ()))):
            lines.append(f"{node.name},{node.private_address} {key}")
    return lines


def parse_known_hosts_block(body: Sequence[str] | None) -> dict[str, list[PublicKey]]:
    """The host keys per node name that a managed block lists."""
    found: dict[str, list[PublicKey]] = {}
    for line in body or ():
        words = line.split()
        if len(words) < 3 or words[0].startswith("#"):
            continue
        key = parse_public_key(f"{words[1]} {words[2]}")
        if key is not None:
            found.setdefault(words[0].split(",")[0], []).append(key)
    return found


def render_known_hosts(current: str | None, inventory: Inventory,
                       host_keys: Mapping[str, Sequence[PublicKey]]) -> str:
    return replace_block(current, KNOWN_HOSTS_BEGIN, KNOWN_HOSTS_END,
                         known_hosts_entries(inventory, host_keys))


def cluster_host_patterns(inventory: Inventory) -> list[str]:
    """Every name and private address of the cluster's nodes (ssh_config ``Host``)."""
    return ([n.name for n in inventory.nodes]
            + [str(n.private_address) for n in inventory.nodes])


#: Patterns per ``Host`` line: older OpenSSH reads configuration lines into a fixed buffer.
HOST_PATTERNS_PER_LINE = 32


def ssh_config_lines(inventory: Inventory) -> list[str]:
    """``Host`` sections naming the cluster key for the cluster's nodes."""
    lines = [
        "# The cluster key first; naming any IdentityFile turns ssh's default list off,",
        "# so the usual key files follow (files that do not exist are skipped).",
    ]
    patterns = cluster_host_patterns(inventory)
    for start in range(0, len(patterns), HOST_PATTERNS_PER_LINE):
        lines += [
            "Host " + " ".join(patterns[start:start + HOST_PATTERNS_PER_LINE]),
            f"    IdentityFile ~/.ssh/{KEY_NAME}",
            "    IdentityFile ~/.ssh/id_ed25519",
            "    IdentityFile ~/.ssh/id_ecdsa",
            "    IdentityFile ~/.ssh/id_rsa",
        ]
    return lines


def includes_dropins(ssh_config: str | None) -> bool:
    """Whether ``ssh_config`` reads ``/etc/ssh/ssh_config.d/*.conf`` (OpenSSH >= 7.3 with the
    distribution's Include line: Debian 11+, Ubuntu 20.04+, RHEL 8+; not CentOS 7)."""
    for line in (ssh_config or "").splitlines():
        match = _INCLUDE_RE.match(line)
        if match and any(word in ("/etc/ssh/ssh_config.d/*.conf", "ssh_config.d/*.conf")
                         for word in match.group(1).split()):
            return True
    return False


def render_ssh_config_dropin(inventory: Inventory) -> str:
    return "\n".join([
        "# Managed by homeclust (ssh-keys step): the cluster's own key pair for SSH",
        "# between the nodes; edit the inventory, not this file.",
        *ssh_config_lines(inventory),
    ]) + "\n"


def render_ssh_config_block(current: str | None, inventory: Inventory) -> str:
    return replace_block(current, SSH_CONFIG_BEGIN, SSH_CONFIG_END, ssh_config_lines(inventory))
