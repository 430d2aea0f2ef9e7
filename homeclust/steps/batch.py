"""Shared planning for the two batch-scheduler steps, ``torque`` and ``slurm``.

Both need the same things besides their own daemons and files:

* **munge**: one key for the whole cluster, generated *on the master* by a
  command (planning never makes secrets) and read back through a secret fact
  path; every other node gets a copy as a secret file (mode 0400, owner munge),
  never logged and never shown in a diff.  ``/etc/munge`` is munge's: the key is
  read and written as munge, never by root through whatever is there.  Keys are generated as text (base64
  of 384 random bytes: 3072 bits) because files travel as text; a binary key
  on the master -- Debian's munge package makes one when it is installed -- is
  replaced once by such a key, and every node gets the new one in the same run.
* **node sizes**: how many job slots a compute node offers -- ``slots`` when
  the inventory says so, otherwise the CPUs the node has (``nproc``) -- and its
  memory (``MemTotal``), read by one small fact on every host.  A node whose
  facts are not part of this run (``--host``, or unreachable) keeps what the
  master's current scheduler configuration says about it, so a run on some
  hosts never rewrites the configuration of the others.
* packages from the platform (EPEL first on the RHEL family) and daemons kept
  enabled, running, and restarted when their configuration changed.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass

from homeclust.changes import (
    Change,
    CommandChange,
    FileChange,
    PackagesChange,
    ServiceChange,
    as_account,
)
from homeclust.facts import Fact, HostFacts
from homeclust.inventory import Inventory, Node, UserSpec
from homeclust.platforms import Platform, SchedulerKind, all_scheduler_packages
from homeclust.steps.base import CheckItem, PlanContext, file_change, missing_packages

MUNGE_KEY = "/etc/munge/munge.key"
MUNGE_UNIT = "munge.service"
#: The account that owns ``/etc/munge``: the key is read and written as it (root never
#: acts in a directory another account controls).
MUNGE_ACCOUNT = "munge"
#: The fact paths of the key (both steps): a secret, read as its owner.
MUNGE_KEY_FACT = frozenset({(MUNGE_ACCOUNT, MUNGE_KEY)})

#: Every package either scheduler may install on either family (facts ask exactly these).
SCHEDULER_PACKAGE_NAMES = all_scheduler_packages()

#: systemd-detect-virt's container names: cgroups there are the host's, usually read-only.
CONTAINERS = frozenset({
    "openvz", "lxc", "lxc-libvirt", "systemd-nspawn", "docker", "podman", "rkt", "wsl", "proot",
    "pouch",
})


@dataclass(frozen=True)
class NodeSize:
    """What a host has: online CPUs (``nproc``) and ``MemTotal`` in KiB."""

    cpus: int
    memory_kib: int

    @property
    def memory_mib(self) -> int:
        return self.memory_kib // 1024


def parse_node_size(text: str) -> NodeSize | None:
    """``nproc`` then ``MemTotal`` (kB) on two lines; None when either is missing."""
    words = text.split()
    if len(words) != 2 or not all(w.isdigit() for w in words):
        return None
    return NodeSize(int(words[0]), int(words[1]))


NODE_SIZE = Fact(
    "node-size",
    "nproc; sed -n 's/^MemTotal: *\\([0-9][0-9]*\\) kB$/\\1/p' /proc/meminfo",
    parse_node_size,
)


def facts_of(ctx: PlanContext, node: Node) -> HostFacts | None:
    """Facts of ``node`` gathered in this run (None: not part of it, or unreachable)."""
    if node.name == ctx.node.name:
        return ctx.facts
    return ctx.cluster.get(node.name)


def size_of(ctx: PlanContext, node: Node) -> NodeSize | None:
    facts = facts_of(ctx, node)
    return facts.get(NODE_SIZE) if facts is not None else None


def compute_nodes(inventory: Inventory) -> tuple[Node, ...]:
    """The nodes that run jobs: every worker, and the master unless ``compute = false``."""
    return tuple(n for n in inventory.nodes if n.compute)


def slots_of(node: Node, size: NodeSize | None) -> int | None:
    """Job slots of a compute node: the inventory's ``slots`` when given, else its CPUs
    (None: not given, and the node's size is not known in this run)."""
    if node.slots_given:
        return node.slots
    return size.cpus if size is not None else None


def slots_on(node: Node, size: NodeSize) -> int:
    """:func:`slots_of` a node whose size is known."""
    return node.slots if node.slots_given else size.cpus


def is_container(virtualization: str) -> bool:
    return virtualization in CONTAINERS


def cluster_user(inventory: Inventory) -> UserSpec | None:
    """The cluster user ``check`` submits its test job as (the first of ``[[users]]``)."""
    return inventory.users[0] if inventory.users else None


# --------------------------------------------------------------------------- packages


def job_readiness(ctx: PlanContext, kind: SchedulerKind, unavailable: list[str]
                  ) -> list[CheckItem]:
    """The master's "job" check when no test job can be submitted: no cluster user to run
    it as (a warning), or compute nodes the scheduler does not offer (a failure)."""
    if not ctx.node.is_master:
        return []
    if cluster_user(ctx.inventory) is None:
        return [CheckItem(ctx.node.name, f"{kind} job", "warn",
                          "no [[users]] in the inventory: no test job submitted",
                          "add a cluster user ([[users]] name = ...) so check can run a job "
                          "as it")]
    if unavailable:
        return [CheckItem(ctx.node.name, f"{kind} job", "fail",
                          "not submitted: not every compute node is available ("
                          + ", ".join(unavailable) + ")", f"see the {kind} node checks")]
    return []


def worker_packages(kind: SchedulerKind, platform: Platform) -> tuple[str, ...]:
    """What a worker installs for ``kind`` (for the repo step, which serves them).

    Not EPEL's epel-release: workers get EPEL's packages from the master's repository
    (the repo step gives them EPEL's key), and epel-release would add upstream sources.
    """
    return platform.scheduler_packages(kind, controller=False, compute=True)


def package_changes(ctx: PlanContext, kind: SchedulerKind) -> tuple[list[Change], bool]:
    """Install what this host needs for ``kind``; returns the changes and whether any
    scheduler package is new here (then its daemons are restarted, whatever a package
    script may have started with its own defaults)."""
    platform, node = ctx.platform, ctx.node
    wanted = platform.scheduler_packages(kind, controller=node.is_master, compute=node.compute)
    missing = missing_packages(ctx.facts, wanted)
    changes: list[Change] = []
    if missing:
        # Workers install from the master's repository, which serves EPEL's packages.
        repo = (missing_packages(ctx.facts, platform.scheduler_repo_packages)
                if node.is_master else ())
        if repo:
            # Its own transaction: the scheduler packages are only found once it is in.
            changes.append(PackagesChange(repo, platform.install_command(repo)))
        changes.append(PackagesChange(missing, platform.install_command(missing)))
    return changes, bool(missing)


def keep_running(ctx: PlanContext, unit: str, *, config: Iterable[Change] = (),
                 restart: bool = False) -> list[Change]:
    """Keep ``unit`` enabled and running; restart it when one of the ``config`` file
    changes of this plan really changes the file, or always when ``restart``."""
    facts = ctx.facts
    changes: list[Change] = []
    if not facts.service_enabled(unit):
        changes.append(ServiceChange(unit, enable=True))
    paths = tuple(c.path for c in config if isinstance(c, FileChange))
    if restart or not facts.service_active(unit):
        # restart also starts a stopped unit, and makes one a package script just
        # started read the files written since.
        changes.append(ServiceChange(unit, action="restart"))
    elif paths:
        changes.append(ServiceChange(unit, action="restart", when_changed=paths))
    return changes


# --------------------------------------------------------------------------- munge

#: Written next to the key and renamed over it: never a moment with a half-written key.
#: By munge itself: ``/etc/munge`` is its directory.
_GENERATE_KEY = (
    "install -d -o munge -g munge -m 0700 /etc/munge && " + as_account(
        MUNGE_ACCOUNT,
        "umask 077 && tmp=$(mktemp /etc/munge/.munge.key.XXXXXX) && "
        "head -c 384 /dev/urandom | base64 | tr -d '\\n' > \"$tmp\" && "
        "chmod 0400 \"$tmp\" && mv -f \"$tmp\" " + MUNGE_KEY + " || "
        "{ rm -f \"$tmp\"; exit 1; }")
)

_TEXT_KEY_RE = re.compile(rb"^[A-Za-z0-9+/=]{32,1024}$")


def usable_key(facts: HostFacts | None) -> str | None:
    """The munge key of a host if it is one homeclust can copy (text, 32-1024 bytes)."""
    if facts is None:
        return None
    key = facts.files.get(MUNGE_KEY)
    if key is None or key.content is None or not _TEXT_KEY_RE.match(key.content):
        return None
    return key.content.decode()


def munge_changes(ctx: PlanContext, *, packages_new: bool) -> list[Change]:
    """The cluster's munge key on this host, and munged running with it."""
    facts, node = ctx.facts, ctx.node
    changes: list[Change] = []
    restart = packages_new
    if node.is_master:
        key = usable_key(facts)
        if key is None:
            what = ("replace the binary munge key with a new text key (homeclust copies keys "
                    "as text)" if MUNGE_KEY in facts.files
                    else "generate the cluster's munge key")
            changes.append(CommandChange(what, _GENERATE_KEY))
            restart = True
        else:
            change = file_change(facts, MUNGE_KEY, key, mode=0o400, owner="munge",
                                 group="munge", secret=True, run_as=MUNGE_ACCOUNT)
            if change is not None:
                changes.append(change)
    else:
        master = ctx.master_facts
        key = usable_key(master)
        if key is None:
            master_name = ctx.inventory.master.name
            # Only a plan can get here on purpose (the master generates its key first);
            # applying it fails with this explanation instead of inventing a key.
            message = (f"the master {master_name} has no munge key yet: run "
                       f"`homeclust up --host {master_name}` first")
            changes.append(CommandChange(
                f"install the master's munge key (once {master_name} has generated it)",
                f"echo {shlex.quote(message)} >&2; false"))
        else:
            change = file_change(facts, MUNGE_KEY, key, mode=0o400, owner="munge",
                                 group="munge", secret=True, run_as=MUNGE_ACCOUNT)
            if change is not None:
                changes.append(change)
    changes += keep_running(ctx, MUNGE_UNIT, config=changes, restart=restart)
    return changes
