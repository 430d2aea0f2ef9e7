"""Torque/PBS files and server set-up, as EPEL's torque packages lay them out.

EPEL builds Torque 4.2 with ``PBS_HOME=/var/lib/torque`` (the guide's
``/var/torque`` is the upstream default) and moves the configuration to
``/etc/torque`` (``server_name``, ``mom/config``; symlinked from
``/var/lib/torque``); the server's node list stays in
``/var/lib/torque/server_priv/nodes``.  It is built with munge authentication,
so every node runs munged with the cluster's key, and ``trqauthd`` (in the
base ``torque`` package) authorises the client commands.

* ``server_name`` on every node: the master's name (the network step makes it
  resolve to the master's private address everywhere).
* ``server_priv/nodes`` on the master: one ``NAME np=SLOTS`` line per compute
  node, by name -- moms report by host name -- with no comments, exactly as
  pbs_server itself writes the file back when it changes it.
* ``mom/config`` on compute nodes: ``$pbsserver`` is the master.
* The server's attributes and the default queue: ``qmgr`` commands, checked
  against ``qmgr -c 'print server'`` so only what is missing is sent (the
  lines are written the way ``print server`` prints them).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from homeclust.quoting import require_hostname

TORQUE_HOME = "/var/lib/torque"
SERVER_NAME_PATH = "/etc/torque/server_name"
MOM_CONFIG_PATH = "/etc/torque/mom/config"
NODES_PATH = f"{TORQUE_HOME}/server_priv/nodes"
SERVERDB_PATH = f"{TORQUE_HOME}/server_priv/serverdb"

#: The default execution queue (torque.setup's name for it).
QUEUE = "batch"


def render_server_name(master: str) -> str:
    return f"{require_hostname(master)}\n"


def render_nodes(nodes: Sequence[tuple[str, int]]) -> str:
    """``server_priv/nodes``: ``NAME np=SLOTS`` per compute node."""
    return "".join(f"{require_hostname(name)} np={slots}\n" for name, slots in nodes)


def render_mom_config(master: str) -> str:
    return ("# Managed by homeclust (torque step): the mom reports to the master.\n"
            f"$pbsserver {require_hostname(master)}\n")


def server_setup(master: str) -> list[str]:
    """The qmgr commands that make a new pbs_server usable: root on the master may
    administer it, the scheduler runs, a started and enabled default execution
    queue takes jobs, users may submit from every node."""
    admin = f"root@{require_hostname(master)}"
    return [
        f"set server managers += {admin}",
        f"set server operators += {admin}",
        "set server scheduling = True",
        "set server keep_completed = 300",
        "set server mom_job_sync = True",
        "set server allow_node_submit = True",
        f"create queue {QUEUE}",
        f"set queue {QUEUE} queue_type = Execution",
        f"set queue {QUEUE} resources_default.nodes = 1",
        f"set queue {QUEUE} resources_default.walltime = 01:00:00",
        f"set queue {QUEUE} enabled = True",
        f"set queue {QUEUE} started = True",
        f"set server default_queue = {QUEUE}",
    ]


@dataclass(frozen=True)
class ServerConfig:
    """What ``qmgr -c 'print server'`` printed: queues created, attributes set."""

    queues: frozenset[str]
    #: "server scheduling" / "queue batch started" -> every value it was set to.
    attributes: dict[str, frozenset[str]]


_SET_RE = re.compile(r"^set (server|queue \S+) (\S+) (\+?=) (.*)$")


def parse_print_server(text: str) -> ServerConfig:
    queues: set[str] = set()
    attributes: dict[str, set[str]] = {}
    for raw in text.splitlines():
        line = " ".join(raw.split())
        if not line or line.startswith("#"):
            continue
        if line.startswith("create queue "):
            queues.add(line.split()[2])
            continue
        match = _SET_RE.match(line)
        if match:
            target, name, _, value = match.groups()
            # List attributes print as "= a,b" or as "= a" then "+= b" lines.
            values = attributes.setdefault(f"{target} {name}", set())
            values.update(v.strip() for v in value.split(",") if v.strip())
    return ServerConfig(frozenset(queues),
                        {key: frozenset(values) for key, values in attributes.items()})


def missing_setup(commands: Sequence[str], current: ServerConfig) -> list[str]:
    """The commands of ``commands`` whose effect ``current`` does not show."""
    missing = []
    for command in commands:
        if command.startswith("create queue "):
            if command.split()[2] not in current.queues:
                missing.append(command)
            continue
        match = _SET_RE.match(command)
        if match is None:
            raise ValueError(f"not a qmgr set command: {command!r}")
        target, name, op, value = match.groups()
        # qmgr accepts any case for booleans and queue types; print spells them its way.
        have = {v.lower() for v in current.attributes.get(f"{target} {name}", frozenset())}
        ok = value.lower() in have if op == "+=" else have == {value.lower()}
        if not ok:
            missing.append(command)
    return missing
