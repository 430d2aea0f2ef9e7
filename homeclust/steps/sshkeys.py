"""ssh-keys step: the cluster users on every node, and a key mesh for them and root.

* **Users** (``[[users]]``): the same account -- name, uid, gid (a group of the
  same name), shell, home -- on every node.  Only the inventory's names and
  ids are asked about (``getent passwd NAME… UID…``); a uid or gid already
  taken by another name, or an existing account with another uid, gid or home,
  is refused with an error naming the node: nothing is renumbered behind
  anybody's back.
* **Keys**: one ed25519 key pair per account (root and each cluster user),
  generated once on the master (``~/.ssh/id_ed25519_homeclust``, a name of its
  own: an existing key of the admin's is never replaced nor copied to other
  nodes), read back through secret facts and copied to every worker (mode
  0600, owned by the account; never logged, never shown in a diff).
* **authorized_keys**: a managed block with the account's cluster key,
  accepted only from the private network (``from="…"``).  Every other line --
  the admin's own key, keys added by hand -- stays as it is.  Root's file (and
  that of the ``[ssh] user`` homeclust logs in as) is changed under a guard: the
  host rolls it back unless homeclust logs in again over a new connection.
* **ssh_known_hosts**: every node's host keys (from each node's facts, read
  over homeclust's pinned connections) under its name and private address, in
  ``/etc/ssh/ssh_known_hosts`` for every account: no ``ssh`` between nodes ever
  asks.  The guide's ``ssh-copy-id`` loop ran on the master only and asked
  about every host key.
* **ssh_config**: the cluster key is named for the cluster's names and
  addresses (``IdentityFile``), in a drop-in or, where ``ssh_config`` includes
  none (CentOS 7), in a managed block of ``ssh_config``.

What a run can know is what it plans: with ``--host``, only the selected
nodes' (and the master's) facts are read, so the host keys of the other nodes
stay as the file lists them.  A node whose host key changed (reinstalled) is
refused by homeclust's pinning until ``homeclust accept-host-key NODE``; the
next ``up`` then puts its new key in every node's ``ssh_known_hosts``.
"""

from __future__ import annotations

import fnmatch
import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from homeclust.changes import Change, CommandChange, FileChange, PackagesChange
from homeclust.errors import StepError
from homeclust.facts import Fact, FactQuery, HostFacts
from homeclust.inventory import Inventory, Node, UserSpec
from homeclust.render.blocks import BlockError, block_body
from homeclust.render.ssh import (
    KEY_NAME,
    KNOWN_HOSTS,
    KNOWN_HOSTS_BEGIN,
    KNOWN_HOSTS_END,
    SSH_CONFIG,
    SSH_CONFIG_DROPIN,
    PublicKey,
    includes_dropins,
    key_comment,
    parse_known_hosts_block,
    parse_public_key,
    render_authorized_keys,
    render_known_hosts,
    render_ssh_config_block,
    render_ssh_config_dropin,
)
from homeclust.steps.base import CheckItem, Guard, PlanContext, Probe, Step, StepPlan, file_change

HOST_KEY_GLOB = "/etc/ssh/ssh_host_*_key.pub"
ROOT_HOME = "/root"
#: Seconds a host waits for homeclust to log in again after root's authorized_keys changed.
ROLLBACK_AFTER = 30
#: SSH probes each node runs at once in `check` (every node probes every other one at the
#: same time: more would crowd the sshds' MaxStartups).
PROBE_PARALLEL = 4


# --------------------------------------------------------------------------- accounts


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: str
    shell: str


@dataclass(frozen=True)
class Group:
    name: str
    gid: int


@dataclass(frozen=True)
class PathState:
    mode: int
    owner: str
    group: str
    is_dir: bool


@dataclass(frozen=True)
class AccountFacts:
    """What the node's user and group databases say about the inventory's names and ids,
    and the state of the accounts' home and ``.ssh`` directories."""

    users: tuple[Account, ...] = ()
    groups: tuple[Group, ...] = ()
    paths: Mapping[str, PathState] = field(default_factory=dict)

    def user(self, name: str) -> Account | None:
        return next((u for u in self.users if u.name == name), None)

    def user_with_uid(self, uid: int) -> Account | None:
        return next((u for u in self.users if u.uid == uid), None)

    def group(self, name: str) -> Group | None:
        return next((g for g in self.groups if g.name == name), None)

    def group_with_gid(self, gid: int) -> Group | None:
        return next((g for g in self.groups if g.gid == gid), None)


def parse_accounts(text: str) -> AccountFacts:
    """``@passwd`` / ``@group`` / ``@paths`` sections of getent and stat output."""
    users: dict[str, Account] = {}
    groups: dict[str, Group] = {}
    paths: dict[str, PathState] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("@"):
            section = line[1:].strip()
            continue
        if section == "passwd":
            parts = line.split(":")
            if len(parts) == 7 and parts[2].isdigit() and parts[3].isdigit():
                users[parts[0]] = Account(parts[0], int(parts[2]), int(parts[3]), parts[5],
                                          parts[6])
        elif section == "group":
            parts = line.split(":")
            if len(parts) >= 3 and parts[2].isdigit():
                groups[parts[0]] = Group(parts[0], int(parts[2]))
        elif section == "paths":
            parts = line.split("|")
            if len(parts) == 5:
                paths[parts[0]] = PathState(int(parts[1], 8), parts[2], parts[3],
                                            parts[4] == "directory")
    return AccountFacts(tuple(users.values()), tuple(groups.values()), paths)


@dataclass(frozen=True)
class Identity:
    """An account that gets a cluster key: root or a cluster user."""

    name: str
    group: str
    home: str

    @property
    def ssh_dir(self) -> str:
        return f"{self.home}/.ssh"

    @property
    def private_key(self) -> str:
        return f"{self.ssh_dir}/{KEY_NAME}"

    @property
    def public_key(self) -> str:
        return f"{self.private_key}.pub"

    @property
    def authorized_keys(self) -> str:
        return f"{self.ssh_dir}/authorized_keys"


def identities(inventory: Inventory) -> list[Identity]:
    """Root first, then the cluster users (each with a group of its own name)."""
    return [Identity("root", "root", ROOT_HOME),
            *(Identity(u.name, u.name, u.home) for u in inventory.users)]


def accounts_fact(inventory: Inventory) -> Fact[AccountFacts]:
    """Asks the user and group databases about exactly the inventory's names and ids."""
    names = ["root", *(u.name for u in inventory.users)]
    uids = [str(u.uid) for u in inventory.users]
    group_keys = [u.name for u in inventory.users] + [str(u.gid) for u in inventory.users]
    dirs = [p for i in identities(inventory) for p in (i.home, i.ssh_dir)]
    quoted = " ".join(shlex.quote(d) for d in dirs)
    command = "\n".join([
        "echo @passwd",
        f"getent passwd {' '.join(shlex.quote(k) for k in names + uids)}",
        "echo @group",
        *([f"getent group {' '.join(shlex.quote(k) for k in group_keys)}"] if group_keys else []),
        "echo @paths",
        f"for d in {quoted}; do [ -e \"$d\" ] && stat -c '%n|%a|%U|%G|%F' -- \"$d\"; done",
        "true",
    ])
    return Fact("accounts", command, parse_accounts)


def account_changes(node: Node, user: UserSpec, accounts: AccountFacts) -> list[Change]:
    """Create the user and its group as the inventory says, or refuse a conflict."""
    where = f"{node.name}: cluster user {user.name}"
    hint = ("pick ids that are free on every node ([[users]] uid / gid in the inventory), or "
            "change the account by hand; nothing was changed")
    owner = accounts.user_with_uid(user.uid)
    if owner is not None and owner.name != user.name:
        raise StepError(f"{where}: uid {user.uid} is already taken by {owner.name!r}", hint=hint)
    holder = accounts.group_with_gid(user.gid)
    if holder is not None and holder.name != user.name:
        raise StepError(f"{where}: gid {user.gid} is already taken by group {holder.name!r}",
                        hint=hint)
    group = accounts.group(user.name)
    if group is not None and group.gid != user.gid:
        raise StepError(f"{where}: group {user.name!r} exists with gid {group.gid}, the "
                        f"inventory says {user.gid}", hint=hint)
    existing = accounts.user(user.name)
    changes: list[Change] = []
    if existing is not None:
        if existing.uid != user.uid:
            raise StepError(f"{where}: exists with uid {existing.uid}, the inventory says "
                            f"{user.uid}", hint=hint)
        if existing.gid != user.gid:
            raise StepError(f"{where}: exists with primary gid {existing.gid}, the inventory "
                            f"says {user.gid}", hint=hint)
        if existing.home != user.home:
            raise StepError(f"{where}: exists with home {existing.home}, the inventory says "
                            f"{user.home}", hint="homeclust keeps cluster users in /home/NAME "
                            "on every node: move the home by hand; nothing was changed")
        if existing.shell != user.shell:
            changes.append(CommandChange(
                f"set the shell of {user.name} to {user.shell} (now {existing.shell})",
                f"usermod -s {shlex.quote(user.shell)} {shlex.quote(user.name)}"))
        return changes
    name = shlex.quote(user.name)
    if group is None:
        changes.append(CommandChange(
            f"create group {user.name} (gid {user.gid})",
            f"groupadd -g {user.gid} {name}",
            unless=f"getent group {name} >/dev/null"))
    changes.append(CommandChange(
        f"create user {user.name} (uid {user.uid}, gid {user.gid}, home {user.home})",
        f"useradd -m -d {shlex.quote(user.home)} -u {user.uid} -g {user.gid} "
        f"-s {shlex.quote(user.shell)} -c 'cluster user (homeclust)' {name}",
        unless=f"getent passwd {name} >/dev/null"))
    return changes


def ssh_dir_changes(identity: Identity, accounts: AccountFacts) -> list[Change]:
    """``~/.ssh`` owned by the account and writable by it alone (sshd's StrictModes)."""
    state = accounts.paths.get(identity.ssh_dir)
    q_dir, owner = shlex.quote(identity.ssh_dir), shlex.quote(f"{identity.name}:{identity.group}")
    if state is None:
        return [CommandChange(
            f"create {identity.ssh_dir} (mode 700, owner {identity.name})",
            f"mkdir -p {q_dir} && chown {owner} {q_dir} && chmod 700 {q_dir}")]
    if not state.is_dir:
        raise StepError(f"{identity.ssh_dir} is not a directory",
                        hint="move it away by hand; nothing was changed")
    problems = []
    if state.owner != identity.name:
        problems.append(f"owner {state.owner}")
    if state.mode & 0o022:
        problems.append(f"mode {state.mode:o}")
    if not problems:
        return []
    return [CommandChange(
        f"make {identity.ssh_dir} the account's own ({', '.join(problems)} -> "
        f"{identity.name}, not writable by others)",
        f"chown {owner} {q_dir} && chmod go-w {q_dir}")]


# --------------------------------------------------------------------------- host keys


def host_keys_of(facts: HostFacts) -> list[PublicKey]:
    """The node's SSH host public keys (``/etc/ssh/ssh_host_*_key.pub``)."""
    keys = []
    for path, fact in sorted(facts.files.items()):
        if fnmatch.fnmatch(path, HOST_KEY_GLOB):
            key = parse_public_key(fact.text)
            if key is not None:
                keys.append(key)
    return keys


def known_host_keys(ctx: PlanContext, current: Mapping[str, list[PublicKey]]
                    ) -> tuple[dict[str, list[PublicKey]], list[str]]:
    """Every node's host keys: from its facts when this run read them, else what the file
    already lists for it (a run with --host knows only the selected nodes and the master)."""
    keys: dict[str, list[PublicKey]] = {}
    unknown = []
    for node in ctx.inventory.nodes:
        facts = ctx.facts if node.name == ctx.node.name else ctx.cluster.get(node.name)
        found = host_keys_of(facts) if facts is not None else []
        if found:
            keys[node.name] = found
        elif current.get(node.name):
            keys[node.name] = current[node.name]
        else:
            unknown.append(node.name)
    return keys, unknown


# --------------------------------------------------------------------------- the step


class SshKeysStep(Step):
    name = "ssh-keys"
    summary = "cluster users, one key pair per account, any-to-any SSH between nodes"
    depends_on = ("network",)

    def fact_query(self, inventory: Inventory) -> FactQuery:
        paths = {HOST_KEY_GLOB, KNOWN_HOSTS, SSH_CONFIG, SSH_CONFIG_DROPIN}
        secrets = set()
        for identity in identities(inventory):
            paths |= {identity.public_key, identity.authorized_keys}
            secrets.add(identity.private_key)
        return FactQuery(paths=frozenset(paths), secret_paths=frozenset(secrets),
                         packages=frozenset({"openssh-client", "openssh-clients"}),
                         extra=(accounts_fact(inventory),))

    def worker_packages(self, inventory: Inventory, family: str) -> tuple[str, ...]:
        return ("openssh-client",) if family == "debian" else ("openssh-clients",)

    def plan(self, ctx: PlanContext) -> StepPlan:
        inventory, node, facts, platform = ctx.inventory, ctx.node, ctx.facts, ctx.platform
        accounts = facts.get(accounts_fact(inventory))
        root = accounts.user("root")
        if root is not None and root.home != ROOT_HOME:
            raise StepError(f"{node.name}: root's home is {root.home}; homeclust manages "
                            f"root's keys in {ROOT_HOME}/.ssh")
        changes: list[Change] = []
        guarded: list[Change] = []
        warnings: list[str] = []
        missing = tuple(p for p in (platform.ssh_client_package,) if p not in facts.packages)
        if missing:
            changes.append(PackagesChange(missing, platform.install_command(missing)))
        for user in inventory.users:
            changes += account_changes(node, user, accounts)
        people = identities(inventory)
        for identity in people:
            changes += ssh_dir_changes(identity, accounts)

        # Key pairs: made on the master, copied from the master's facts to the workers.
        pending_keys: list[str] = []
        master = ctx.master_facts
        public: dict[str, PublicKey] = {}
        for identity in people:
            if node.is_master:
                key, generate = self._master_key_pair(ctx, identity)
                changes += generate
                if key is None:
                    pending_keys.append(identity.name)
                else:
                    public[identity.name] = key
            else:
                key, copies = self._copied_key_pair(ctx, identity, master)
                changes += copies
                if key is None:
                    pending_keys.append(identity.name)
                else:
                    public[identity.name] = key
        if pending_keys and not node.is_master:
            warnings.append(
                f"the master has no cluster key pair yet for {', '.join(pending_keys)}: "
                "they are copied here once `homeclust up` has run on the master")

        changes += self._client_changes(ctx, warnings)

        admin = inventory.ssh.user
        for identity in people:
            key = public.get(identity.name)
            if key is None:
                continue
            change = self._authorized_keys_change(facts, identity, key, inventory)
            if change is None:
                continue
            # The admin logs in with root's file (or the [ssh] user's): a broken one locks out.
            (guarded if identity.name in ("root", admin) else changes).append(change)

        incomplete = ""
        if node.is_master and pending_keys:
            incomplete = ("authorize the new cluster keys of " + ", ".join(pending_keys)
                          + " once they are generated")
        if guarded and not incomplete:
            guard = Guard(rollback_after=ROLLBACK_AFTER,
                          reason="the admin logs in with this authorized_keys file")
            return StepPlan(self.name, node.name, tuple(changes), tuple(warnings), guard,
                            tuple(guarded))
        return StepPlan(self.name, node.name, tuple(changes), tuple(warnings),
                        incomplete=incomplete)

    # -- key pairs --------------------------------------------------------------

    def _master_key_pair(self, ctx: PlanContext, identity: Identity
                         ) -> tuple[PublicKey | None, list[Change]]:
        """On the master: the account's key pair as it is, or the command that makes it."""
        facts = ctx.facts
        private = facts.files.get(identity.private_key)
        pub = parse_public_key(facts.file_text(identity.public_key))
        owner = shlex.quote(f"{identity.name}:{identity.group}")
        q_priv, q_pub = shlex.quote(identity.private_key), shlex.quote(identity.public_key)
        comment = shlex.quote(key_comment(identity.name, ctx.inventory.cluster.name))
        if private is None:
            return None, [CommandChange(
                f"generate the cluster key pair of {identity.name} ({identity.private_key})",
                f"rm -f {q_pub} && ssh-keygen -q -t ed25519 -N '' -C {comment} -f {q_priv} "
                f"</dev/null && chown {owner} {q_priv} {q_pub}",
                unless=f"[ -e {q_priv} ]")]
        changes: list[Change] = []
        if pub is None:
            changes.append(CommandChange(
                f"write the missing public half of {identity.name}'s cluster key "
                f"({identity.public_key})",
                f"printf '%s %s\\n' \"$(ssh-keygen -y -f {q_priv} | cut -d' ' -f1-2)\" "
                f"{comment} > {q_pub} && chown {owner} {q_pub} && chmod 644 {q_pub}"))
            return None, changes
        # Content as it is; only the mode and owner are held to what ssh demands.
        for change in (
            file_change(facts, identity.private_key, private.text, mode=0o600,
                        owner=identity.name, group=identity.group, secret=True),
            file_change(facts, identity.public_key, facts.file_text(identity.public_key),
                        mode=0o644, owner=identity.name, group=identity.group),
        ):
            if change is not None:
                changes.append(change)
        return pub, changes

    def _copied_key_pair(self, ctx: PlanContext, identity: Identity, master: HostFacts | None
                         ) -> tuple[PublicKey | None, list[Change]]:
        """On a worker: the master's key pair of the account, copied."""
        if master is None:
            return None, []
        private = master.file_text(identity.private_key)
        pub_text = master.file_text(identity.public_key)
        pub = parse_public_key(pub_text)
        if private is None or pub is None or pub_text is None:
            return None, []
        changes: list[Change] = [c for c in (
            file_change(ctx.facts, identity.private_key, private, mode=0o600,
                        owner=identity.name, group=identity.group, secret=True),
            file_change(ctx.facts, identity.public_key, pub_text, mode=0o644,
                        owner=identity.name, group=identity.group),
        ) if c is not None]
        return pub, changes

    # -- files every node gets --------------------------------------------------

    def _client_changes(self, ctx: PlanContext, warnings: list[str]) -> list[Change]:
        inventory, facts, node = ctx.inventory, ctx.facts, ctx.node
        changes: list[Change] = []
        current = facts.file_text(KNOWN_HOSTS)
        try:
            listed = parse_known_hosts_block(block_body(current, KNOWN_HOSTS_BEGIN,
                                                        KNOWN_HOSTS_END))
        except BlockError as exc:
            raise StepError(f"{node.name}: {KNOWN_HOSTS}: {exc}",
                            hint="fix the homeclust marker lines by hand; nothing was changed"
                            ) from None
        keys, unknown = known_host_keys(ctx, listed)
        if unknown:
            warnings.append(
                f"host keys of {', '.join(unknown)} are unknown to this run (not selected, or "
                f"unreachable): {KNOWN_HOSTS} lists them after an `up` that reaches them")
        change = file_change(facts, KNOWN_HOSTS, render_known_hosts(current, inventory, keys))
        if change is not None:
            changes.append(change)
        config = facts.file_text(SSH_CONFIG)
        if includes_dropins(config):
            wanted = {SSH_CONFIG_DROPIN: render_ssh_config_dropin(inventory)}
        else:
            try:
                wanted = {SSH_CONFIG: render_ssh_config_block(config, inventory)}
            except BlockError as exc:
                raise StepError(f"{node.name}: {SSH_CONFIG}: {exc}",
                                hint="fix the homeclust marker lines by hand; nothing was "
                                "changed") from None
        for path, content in wanted.items():
            change = file_change(facts, path, content)
            if change is not None:
                changes.append(change)
        return changes

    def _authorized_keys_change(self, facts: HostFacts, identity: Identity, key: PublicKey,
                                inventory: Inventory) -> FileChange | None:
        path = identity.authorized_keys
        current = facts.files.get(path)
        try:
            content = render_authorized_keys(current.text if current else None, key, inventory,
                                             identity.name)
        except BlockError as exc:
            raise StepError(f"{path}: {exc}", hint="fix the homeclust marker lines by hand; "
                            "nothing was changed") from None
        # Keep a mode the admin chose unless others could write the file (sshd refuses it).
        mode = current.mode if current is not None and not current.mode & 0o022 else 0o600
        return file_change(facts, path, content, mode=mode, owner=identity.name,
                           group=identity.group)

    # -- check ------------------------------------------------------------------

    def probes(self, ctx: PlanContext) -> list[Probe]:
        return [mesh_probe(ctx, identity.name) for identity in identities(ctx.inventory)]


#: One SSH attempt: ``sh -c THIS sh ACCOUNT TARGET`` prints ``ok A T`` or ``fail A T why``.
_PROBE_ONE = (
    'u=$1; t=$2; if [ "$u" = root ]; then set --; else set -- runuser -u "$u" --; fi; '
    'out=$("$@" timeout 20 ssh -n -o BatchMode=yes -o ConnectTimeout=5 '
    "-o StrictHostKeyChecking=yes -o UserKnownHostsFile=/dev/null -- "
    '"$t" true 2>&1 </dev/null) && echo "ok $u $t" || '
    'echo "fail $u $t $(printf "%s" "$out" | tr "\\n" " " | cut -c1-160)"'
)


def mesh_probe(ctx: PlanContext, account: str) -> Probe:
    """From this node, as ``account``: batch-mode SSH (a prompt would fail it) to every other
    node, by name and by private address, trusting only the system-wide known_hosts.
    One check item per node and account: a row of the matrix."""
    node = ctx.node
    others = [n for n in ctx.inventory.nodes if n.name != node.name]
    targets = [(other.name, target, how) for other in others
               for target, how in ((other.name, "name"), (str(other.private_address), "address"))]
    words = " ".join(shlex.quote(f"{account} {target}") for _, target, _ in targets)
    script = (f"printf '%s\\n' {words} | xargs -P {PROBE_PARALLEL} -L 1 sh -c "
              f"{shlex.quote(_PROBE_ONE)} sh" if targets else "true")
    name = f"ssh mesh ({account})"

    def evaluate(code: int, output: str) -> CheckItem:
        results: dict[str, str] = {}
        for line in output.splitlines():
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[0] in ("ok", "fail") and parts[1] == account:
                results[parts[2]] = "" if parts[0] == "ok" else (
                    parts[3].strip() if len(parts) > 3 else "failed")
        if not targets:
            return CheckItem(node.name, name, "pass", "no other node")
        bad = [f"{other} by {how}: {results.get(target, 'no answer')}"
               for other, target, how in targets if results.get(target, "no answer")]
        if bad:
            return CheckItem(node.name, name, "fail", "; ".join(bad),
                             "homeclust up --only ssh-keys (after reinstalling a node: "
                             "homeclust accept-host-key NODE first)")
        return CheckItem(node.name, name, "pass",
                         f"{len(others)} node(s) by name and address, no prompt")

    # Each node probes every other node at once: PROBE_PARALLEL at a time, 20 s at most each.
    return Probe(name, script, evaluate,
                 timeout=30.0 + 25.0 * math.ceil(len(targets) / PROBE_PARALLEL))
