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
  nodes).  A cluster user's is read back through secret facts and copied to every
  worker (mode 0600, owned by the account; never logged, never shown in a diff).
  Root's never leaves the master: root's trust goes master -> workers only, so
  root on an old worker is not root on the master (a copy an older release left
  on a worker is removed, and a root key such a release made is replaced once:
  :func:`key_comment` marks the master-only one).
* **A cluster user's home is theirs**: everything in it is read (the facts) and
  written (keys, ``~/.ssh``, ``authorized_keys``) *as that user*; a link they put
  where a managed file goes is replaced by the file, and root never acts through it.
* **authorized_keys**: a managed block with the account's cluster key,
  accepted only from the private network (``from="…"``); for root, on the workers
  only and from the master's private address only.  Every other line --
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
from dataclasses import dataclass, field, replace

from homeclust.changes import Change, CommandChange, FileChange, PackagesChange, as_account
from homeclust.errors import StepError
from homeclust.facts import Fact, FactQuery, HostFacts
from homeclust.inventory import Inventory, Node, UserSpec
from homeclust.platforms import Platform
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
    key_comment_of,
    parse_known_hosts_block,
    parse_public_key,
    remove_authorized_block,
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
    is_link: bool = False


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
                                            parts[4] == "directory",
                                            parts[4] == "symbolic link")
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

    @property
    def writer(self) -> str | None:
        """Who acts in this account's home: the account itself (a cluster user's home is
        theirs: root never reads or writes through it), or root in its own."""
        return None if self.name == "root" else self.name

    def run(self, command: str) -> str:
        """``command`` as this account (for everything in its home)."""
        return as_account(self.name, command)


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
    """``~/.ssh`` owned by the account and writable by it alone (sshd's StrictModes).

    In a cluster user's home everything is done as the user: a link the user put at
    ``~/.ssh`` is replaced by a directory of their own, and root only ever gives an existing
    directory to the user with ``chown -h`` (on a link swapped in meanwhile, that changes
    the link alone); the mode is then set by the user."""
    state = accounts.paths.get(identity.ssh_dir)
    q_dir, owner = shlex.quote(identity.ssh_dir), shlex.quote(f"{identity.name}:{identity.group}")
    if state is None:
        if identity.writer is None:
            return [CommandChange(f"create {identity.ssh_dir} (mode 700, owner root)",
                                  f"mkdir -p {q_dir} && chmod 700 {q_dir}")]
        return [CommandChange(f"create {identity.ssh_dir} (mode 700, owner {identity.name})",
                              identity.run(f"mkdir -m 700 {q_dir}"))]
    if state.is_link and identity.writer is not None:
        return [CommandChange(
            f"replace the symbolic link {identity.ssh_dir} with a directory of "
            f"{identity.name}'s own (mode 700)",
            identity.run(f"rm -f {q_dir} && mkdir -m 700 {q_dir}"))]
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
    give = f"chown -h {owner} {q_dir} && " if state.owner != identity.name else ""
    return [CommandChange(
        f"make {identity.ssh_dir} the account's own ({', '.join(problems)} -> "
        f"{identity.name}, not writable by others)",
        give + identity.run(f"chmod go-w {q_dir}"))]


def ssh_dir_replaced(identity: Identity, accounts: AccountFacts) -> bool:
    """Whether this run replaces ``~/.ssh`` (a link): what the facts say is under it is not
    what will be there -- nothing of it is kept."""
    state = accounts.paths.get(identity.ssh_dir)
    return state is not None and state.is_link and identity.writer is not None


def without_under(facts: HostFacts, directory: str) -> HostFacts:
    """``facts`` without what they say is in ``directory`` (replaced by this run)."""
    prefix = directory.rstrip("/") + "/"
    return replace(facts,
                   files={p: f for p, f in facts.files.items() if not p.startswith(prefix)},
                   links={p: t for p, t in facts.links.items() if not p.startswith(prefix)})


def master_root_key(inventory: Inventory, master: HostFacts | None) -> PublicKey | None:
    """Root's cluster public key on the master, once it is one that stays there (made by a
    homeclust that never copies it: see :func:`key_comment`); None until then."""
    if master is None:
        return None
    text = master.file_text(identities(inventory)[0].public_key)
    if key_comment_of(text) != key_comment("root", inventory.cluster.name):
        return None
    return parse_public_key(text)


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
    summary = ("cluster users, one key pair per account, SSH any-to-any for the users "
               "and from the master for root")
    depends_on = ("network",)

    def fact_query(self, inventory: Inventory) -> FactQuery:
        paths = {HOST_KEY_GLOB, KNOWN_HOSTS, SSH_CONFIG, SSH_CONFIG_DROPIN}
        secrets = set()
        theirs: set[tuple[str, str]] = set()
        their_secrets: set[tuple[str, str]] = set()
        for identity in identities(inventory):
            if identity.writer is None:
                paths |= {identity.public_key, identity.authorized_keys}
                secrets.add(identity.private_key)
            else:
                # A cluster user's files are read as the user (links planted there show
                # nothing of root's).
                theirs |= {(identity.name, identity.public_key),
                           (identity.name, identity.authorized_keys)}
                their_secrets.add((identity.name, identity.private_key))
        return FactQuery(paths=frozenset(paths), secret_paths=frozenset(secrets),
                         account_paths=frozenset(theirs),
                         account_secret_paths=frozenset(their_secrets),
                         packages=frozenset({"openssh-client", "openssh-clients"}),
                         extra=(accounts_fact(inventory),))

    def worker_packages(self, inventory: Inventory, platform: Platform) -> tuple[str, ...]:
        return (platform.ssh_client_package,)

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
            if ssh_dir_replaced(identity, accounts):
                facts = without_under(facts, identity.ssh_dir)

        # Key pairs: made on the master, copied from the master's facts to the workers --
        # root's excepted: it stays on the master (root's trust goes master -> workers).
        pending_keys: list[str] = []
        master = ctx.master_facts
        public: dict[str, PublicKey] = {}
        for identity in people:
            if node.is_master:
                key, generate = self._master_key_pair(ctx, facts, identity)
            else:
                key, generate = self._copied_key_pair(ctx, facts, identity, master)
            changes += generate
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
            change = self._authorized_keys_change(ctx, facts, identity, public)
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

    def _master_key_pair(self, ctx: PlanContext, facts: HostFacts, identity: Identity
                         ) -> tuple[PublicKey | None, list[Change]]:
        """On the master: the account's key pair as it is, or the command that makes it
        (as the account, in its own home)."""
        private = facts.files.get(identity.private_key)
        pub_text = facts.file_text(identity.public_key)
        pub = parse_public_key(pub_text)
        q_priv, q_pub = shlex.quote(identity.private_key), shlex.quote(identity.public_key)
        comment = key_comment(identity.name, ctx.inventory.cluster.name)
        q_comment = shlex.quote(comment)
        link = facts.links.get(identity.private_key)
        stale_root = (identity.name == "root" and private is not None
                      and (pub is None or key_comment_of(pub_text) != comment))
        if private is None or stale_root:
            if link is not None:
                what = (f"replace the symbolic link {identity.private_key} (to {link}) with a "
                        f"new cluster key pair of {identity.name}")
            elif stale_root:
                what = (f"replace root's cluster key pair ({identity.private_key}): an older "
                        "homeclust copied it to every worker; the new one never leaves the "
                        "master")
            else:
                what = f"generate the cluster key pair of {identity.name} ({identity.private_key})"
            if stale_root:
                # Once: a key with the master-only comment is the new one.
                unless = f"[ -f {q_priv} ] && grep -q -- {q_comment} {q_pub}"
            else:
                # Generated once, never replaced (a link there is replaced).
                unless = identity.run(f"[ -f {q_priv} ] && [ ! -L {q_priv} ]")
            return None, [CommandChange(
                what,
                identity.run(f"rm -f {q_priv} {q_pub} && ssh-keygen -q -t ed25519 -N \"\" "
                             f"-C {q_comment} -f {q_priv} </dev/null"),
                unless=unless)]
        changes: list[Change] = []
        if pub is None:
            changes.append(CommandChange(
                f"write the missing public half of {identity.name}'s cluster key "
                f"({identity.public_key})",
                identity.run(f"rm -f {q_pub} && printf '%s %s\\n' \"$(ssh-keygen -y -f "
                             f"{q_priv} | cut -d' ' -f1-2)\" {q_comment} > {q_pub} && "
                             f"chmod 644 {q_pub}")))
            return None, changes
        # Content as it is; only the mode and owner are held to what ssh demands.
        for change in (
            file_change(facts, identity.private_key, private.text, mode=0o600,
                        owner=identity.name, group=identity.group, secret=True,
                        run_as=identity.writer),
            file_change(facts, identity.public_key, pub_text, mode=0o644, owner=identity.name,
                        group=identity.group, run_as=identity.writer),
        ):
            if change is not None:
                changes.append(change)
        return pub, changes

    def _copied_key_pair(self, ctx: PlanContext, facts: HostFacts, identity: Identity,
                         master: HostFacts | None) -> tuple[PublicKey | None, list[Change]]:
        """On a worker: the master's key pair of a cluster user, copied (written by the user);
        root's key pair is the master's alone: any copy here is removed, and its public
        half is what root's ``authorized_keys`` accepts here."""
        if identity.name == "root":
            removals: list[Change] = [
                c for c in (file_change(facts, path, None)
                            for path in (identity.private_key, identity.public_key))
                if c is not None]
            return master_root_key(ctx.inventory, master), removals
        if master is None:
            return None, []
        private = master.file_text(identity.private_key)
        pub_text = master.file_text(identity.public_key)
        pub = parse_public_key(pub_text)
        if private is None or pub is None or pub_text is None:
            return None, []
        changes: list[Change] = [c for c in (
            file_change(facts, identity.private_key, private, mode=0o600,
                        owner=identity.name, group=identity.group, secret=True,
                        run_as=identity.writer),
            file_change(facts, identity.public_key, pub_text, mode=0o644,
                        owner=identity.name, group=identity.group, run_as=identity.writer),
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

    def _authorized_keys_change(self, ctx: PlanContext, facts: HostFacts, identity: Identity,
                                public: Mapping[str, PublicKey]) -> FileChange | None:
        """The account's ``authorized_keys`` with the managed block: its own cluster key from
        the private network -- for root, the master's key from the master alone, and on the
        master none (root on a worker is never root on the master)."""
        path = identity.authorized_keys
        current = facts.files.get(path)
        text = current.text if current is not None else None
        inventory = ctx.inventory
        master_only = identity.name == "root"
        try:
            if master_only and ctx.node.is_master:
                content = remove_authorized_block(text)
                if content is None:
                    return None
            else:
                key = public.get(identity.name)
                if key is None:
                    return None
                content = render_authorized_keys(
                    text, key, inventory, identity.name,
                    source=str(inventory.master.private_address) if master_only else None)
        except BlockError as exc:
            raise StepError(f"{path}: {exc}", hint="fix the homeclust marker lines by hand; "
                            "nothing was changed") from None
        # Keep a mode the admin chose unless others could write the file (sshd refuses it).
        mode = current.mode if current is not None and not current.mode & 0o022 else 0o600
        return file_change(facts, path, content, mode=mode, owner=identity.name,
                           group=identity.group, run_as=identity.writer)

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


@dataclass(frozen=True)
class MeshTrust:
    """Whom an account on a node must reach by SSH, and who must refuse it."""

    reach: tuple[Node, ...]
    refused: tuple[Node, ...] = ()


def mesh_trust(inventory: Inventory, source: Node, account: str) -> MeshTrust:
    """The trust the ssh-keys step sets up, as ``check`` proves it -- the one place that says
    which pairs an account is expected to reach.

    Cluster users: every other node (any-to-any).  Root: from the master, every worker;
    from a worker, nothing -- the master must refuse it (root on an old worker is not
    root on the master).  Worker to worker as root is refused too (no worker holds root's
    key), but not probed: the refusal that matters is the master's, one probe a worker.
    """
    others = tuple(n for n in inventory.nodes if n.name != source.name)
    if account != "root":
        return MeshTrust(others)
    if source.is_master:
        return MeshTrust(others)
    return MeshTrust((), (inventory.master_node,))


def mesh_probe(ctx: PlanContext, account: str) -> Probe:
    """From this node, as ``account``: batch-mode SSH (a prompt would fail it) to the nodes
    :func:`mesh_trust` names, by name and by private address, trusting only the
    system-wide known_hosts; those it must reach answer, those that must refuse it say
    "Permission denied".  One check item per node and account: a row of the matrix."""
    node = ctx.node
    trust = mesh_trust(ctx.inventory, node, account)
    targets = [(other.name, target, how, other in trust.refused)
               for other in (*trust.reach, *trust.refused)
               for target, how in ((other.name, "name"), (str(other.private_address), "address"))]
    words = " ".join(shlex.quote(f"{account} {target}") for _, target, _, _ in targets)
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
        bad = []
        for other, target, how, refused in targets:
            why = results.get(target, "no answer")
            if not refused and why:
                bad.append(f"{other} by {how}: {why}")
            elif refused and target in results and not why:
                bad.append(f"{other} by {how}: accepted {account} from {node.name}")
            elif refused and "Permission denied" not in why:
                bad.append(f"{other} by {how}: no refusal seen ({why})")
        if bad:
            return CheckItem(node.name, name, "fail", "; ".join(bad),
                             "homeclust up --only ssh-keys (after reinstalling a node: "
                             "homeclust accept-host-key NODE first)")
        reached = f"{len(trust.reach)} node(s) by name and address, no prompt"
        if trust.refused:
            refusing = ", ".join(n.name for n in trust.refused)
            reached = (f"refused by {refusing} by name and address, as it must be"
                       if not trust.reach else f"{reached}; refused by {refusing}")
        return CheckItem(node.name, name, "pass", reached)

    # Each node probes every other node at once: PROBE_PARALLEL at a time, 20 s at most each.
    return Probe(name, script, evaluate,
                 timeout=30.0 + 25.0 * math.ceil(len(targets) / PROBE_PARALLEL))
