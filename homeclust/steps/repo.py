"""repo step: the master serves the workers' packages; the workers use only the master.

Master:

* nginx (from upstream) serving ``/srv/homeclust-repo`` on the private address
  only (the firewall keeps the public side closed too);
* the repository: the packages every enabled step installs on the workers
  (each step declares them: :meth:`Step.worker_packages`) plus ``[repo]
  packages``, each with its whole dependency closure, so a freshly installed
  worker can install any of them.  Debian family: downloaded with apt, indexed
  with ``apt-ftparchive``, the index signed with the cluster's repository key
  (generated once on the master; its private half never leaves it).  RHEL
  family: ``repotrack``/``dnf download --resolve`` and ``createrepo``; the
  packages carry the vendor's signatures;
* a manifest of what was asked for and what was resolved.  The plan reads it
  back through the facts, with the versions the master's package lists offer
  now for exactly those packages: the repository is complete and current when
  the manifest asks for what the inventory wants, every file it names is there,
  and every candidate version is in it.  Nothing lists the whole archive.

Refreshing the master's package lists (``apt-get update``, ``dnf makecache``)
is network traffic, so it happens only when the wanted list changed (or the
repository is new), when resolving on stale lists fails, and when the step is
asked for by name (``homeclust up --only repo``; not again within
:data:`REFRESH_AFTER` seconds).  Newer versions already in the master's lists
(after any refresh, also the master's own) are picked up by every ``up``.

Workers: the master's repository as the only package source, signatures
checked (Debian: ``Signed-By`` exactly the cluster key; RHEL: ``gpgcheck=1``
with the distribution's keys); the original sources are kept aside in
:data:`~homeclust.render.repo.ORIGINALS`, never deleted.  Every later step
installs worker packages from the master.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from homeclust.changes import Change, CommandChange, PackagesChange, ServiceChange, unified_diff
from homeclust.errors import StepError
from homeclust.facts import Fact, FactQuery, HostFacts
from homeclust.inventory import Inventory
from homeclust.platforms import Platform, platform_of
from homeclust.render import repo as render
from homeclust.steps.base import (
    CheckItem,
    PlanContext,
    Probe,
    Step,
    StepPlan,
    file_change,
    missing_packages,
)

#: ``up --only repo`` refreshes the master's package lists unless that happened this
#: recently (so a second run right after, and the run's own verification, do nothing).
REFRESH_AFTER = 600

#: What a platform-independent fact query asks about, for either family.
_SERVER_PACKAGES = frozenset({
    "nginx", "apt-utils", "gpg", "gpg-agent", "createrepo", "createrepo_c", "yum-utils",
    "dnf-plugins-core", "epel-release",
})

WorkerPackages = Callable[[Inventory, Platform], tuple[str, ...]]


# --------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class ManifestPackage:
    name: str
    version: str
    arch: str
    file: str


@dataclass(frozen=True)
class Manifest:
    """What the last build was asked for and what it resolved (the manifest file)."""

    wanted: tuple[str, ...]
    packages: tuple[ManifestPackage, ...] = ()
    directory: str = ""

    def versions(self) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for package in self.packages:
            found.setdefault(package.name, set()).add(package.version)
        return found


def parse_manifest(text: str | None) -> Manifest | None:
    if text is None:
        return None
    wanted: tuple[str, ...] = ()
    packages = []
    directory = ""
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "wanted":
            wanted = tuple(words[1:])
        elif words[0] == "dir" and len(words) == 2:
            directory = words[1]
        elif words[0] == "pkg" and len(words) == 5:
            packages.append(ManifestPackage(*words[1:]))
    return Manifest(wanted, tuple(packages), directory)


@dataclass(frozen=True)
class RepoState:
    """The master's view of its repository now (see REPO_STATE_COMMAND)."""

    #: name -> version the master's package lists offer now
    candidates: Mapping[str, str] = field(default_factory=dict)
    missing: tuple[str, ...] = ()
    #: seconds since the master's package lists were last refreshed by this step
    refreshed_ago: int | None = None
    #: whether the master holds the cluster's signing key (its content is never read)
    signing_key: bool = False


def parse_repo_state(text: str) -> RepoState:
    candidates: dict[str, str] = {}
    missing: list[str] = []
    refreshed: int | None = None
    signing_key = False
    for line in text.splitlines():
        words = line.split()
        if words == ["signing-key", "present"]:
            signing_key = True
        elif len(words) == 3 and words[0] == "candidate":
            if words[2] != "(none)":
                candidates[words[1]] = words[2]
        elif len(words) == 2 and words[0] == "missing":
            missing.append(words[1])
        elif len(words) == 2 and words[0] == "refreshed" and words[1].lstrip("-").isdigit():
            refreshed = int(words[1])
    return RepoState(candidates, tuple(missing), refreshed, signing_key)


def parse_listeners(text: str) -> tuple[str, ...]:
    return tuple(sorted({line.strip() for line in text.splitlines() if line.strip()}))


REPO_STATE = Fact("repo-state", render.REPO_STATE_COMMAND, parse_repo_state)
HTTP_LISTENERS = Fact("http-listeners", render.HTTP_LISTENERS_COMMAND, parse_listeners)


# --------------------------------------------------------------------------- step


class RepoStep(Step):
    name = "repo"
    summary = "package repository on the master; workers install only from it, signatures checked"
    depends_on = ("network", "firewall")

    def __init__(self, worker_packages: WorkerPackages) -> None:
        #: Every enabled step's worker packages plus [repo] packages (the registry's).
        self.wanted = worker_packages

    def fact_query(self, inventory: Inventory) -> FactQuery:
        return FactQuery(
            paths=frozenset({
                render.NGINX_CONF, render.MANIFEST, render.PUBLIC_KEY,
                f"{render.WEB_ROOT}/debian/InRelease",
                render.APT_SOURCES_LIST, f"{render.APT_SOURCES_DIR}/*", render.WORKER_KEYRING,
                render.apt_list_path(inventory),
                f"{render.YUM_REPOS_DIR}/*", "/etc/pki/rpm-gpg/RPM-GPG-KEY-EPEL-*",
            }),
            units=frozenset({"nginx.service"}),
            packages=_SERVER_PACKAGES,
            extra=(REPO_STATE, HTTP_LISTENERS),
        )

    def plan(self, ctx: PlanContext) -> StepPlan:
        if ctx.node.is_master:
            return self._plan_master(ctx)
        return self._plan_worker(ctx)

    # ------------------------------------------------------------------ master

    def wanted_packages(self, inventory: Inventory, platform: Platform) -> tuple[str, ...]:
        return tuple(sorted(set(self.wanted(inventory, platform))))

    def _plan_master(self, ctx: PlanContext) -> StepPlan:
        inventory, facts, platform = ctx.inventory, ctx.facts, ctx.platform
        wanted = self.wanted_packages(inventory, platform)
        changes: list[Change] = []
        for group in (platform.repo_server_prerequisites, platform.repo_server_packages):
            missing = missing_packages(facts, group)
            if missing:
                changes.append(PackagesChange(missing, platform.install_command(missing)))
        nginx = file_change(facts, render.NGINX_CONF, render.render_nginx_conf(inventory, platform))
        if nginx is not None:
            changes.append(nginx)
        # nginx before the repository: a failed download must not leave it serving the
        # distribution's default site on every address.
        if not facts.service_enabled("nginx.service") or not facts.service_active("nginx.service"):
            changes.append(ServiceChange("nginx.service", enable=True, action="start"))
        private = f"{inventory.master.private_address}:80"
        listeners = facts.get(HTTP_LISTENERS)
        if nginx is not None:
            changes.append(ServiceChange("nginx.service", action="restart",
                                         when_changed=(render.NGINX_CONF,)))
        elif facts.service_active("nginx.service") and listeners != (private,):
            # The running nginx is not the configured one (an earlier run stopped
            # between writing the file and restarting it, or someone edited it).
            changes.append(ServiceChange("nginx.service", action="restart"))
        new_key = False
        has_key = facts.get(REPO_STATE).signing_key
        if platform.family == "debian" and not (has_key and facts.file_text(render.PUBLIC_KEY)):
            new_key = not has_key
            what = "create" if new_key else "export the public half of"
            changes.append(CommandChange(f"{what} the cluster's repository signing key",
                                         render.key_script(inventory)))
        build = self._build(ctx, wanted, new_key=new_key)
        if build is not None:
            changes.append(build)
        return StepPlan(self.name, ctx.node.name, tuple(changes))

    def _build(self, ctx: PlanContext, wanted: tuple[str, ...], *, new_key: bool
               ) -> CommandChange | None:
        """The build command, if the repository is not complete and current (or None)."""
        facts, platform = ctx.facts, ctx.platform
        manifest = parse_manifest(facts.file_text(render.MANIFEST))
        state: RepoState = facts.get(REPO_STATE)
        refresh = self.name in ctx.requested and (
            state.refreshed_ago is None or state.refreshed_ago > REFRESH_AFTER)
        reasons = []
        diff = ""
        if manifest is None:
            reasons.append(f"{len(wanted)} packages and their dependencies")
        elif manifest.wanted != wanted:
            added = sorted(set(wanted) - set(manifest.wanted))
            dropped = sorted(set(manifest.wanted) - set(wanted))
            reasons.append("; ".join(x for x in (
                f"add {' '.join(added)}" if added else "",
                f"drop {' '.join(dropped)}" if dropped else "") if x))
            diff = unified_diff("".join(f"{p}\n" for p in manifest.wanted),
                                "".join(f"{p}\n" for p in wanted),
                                f"{render.MANIFEST} (wanted)", "inventory (wanted)")
        if manifest is not None:
            if state.missing:
                reasons.append(f"{len(state.missing)} files missing ({_some(state.missing)})")
            versions = manifest.versions()
            newer = [f"{name} {'/'.join(sorted(versions[name]))} -> {version}"
                     for name, version in sorted(state.candidates.items())
                     if name in versions and version not in versions[name]]
            if newer:
                reasons.append(f"newer versions in the master's package lists: {_some(newer)}")
        # A new or different list is resolved on fresh package lists; a repair or
        # newer versions the master already knows need no refresh.
        new_list = manifest is None or manifest.wanted != wanted
        if new_key and manifest is not None:
            reasons.append("sign the index with the new key")
        if refresh and not new_list:
            reasons.append("refresh the master's package lists from upstream (--only repo)")
        if not reasons:
            return None
        update = refresh or new_list
        script = (render.build_script_debian(ctx.inventory, wanted, update=update)
                  if platform.family == "debian"
                  else render.build_script_rhel(platform, wanted, update=update))
        verb = "build" if manifest is None else "update"
        return CommandChange(f"{verb} the workers' package repository: {'; '.join(reasons)}",
                             script, diff=diff)

    # ------------------------------------------------------------------ workers

    def _plan_worker(self, ctx: PlanContext) -> StepPlan:
        node, platform = ctx.node, ctx.platform
        master = ctx.master_facts
        if master is None:
            raise StepError(f"{node.name}: the master's facts are needed to point the worker "
                            "at its repository", hint="is the master reachable?")
        master_platform = platform_of(master)
        if (master_platform.family, master_platform.major) != (platform.family, platform.major):
            raise StepError(
                f"{node.name}: runs {platform.name}, but the master's repository holds "
                f"{master_platform.name} packages",
                hint="workers run the master's distribution and release")
        ready = self._master_ready(master, master_platform)
        if ready is not None:
            # Only during `plan` of a run that builds the master's repository first (the
            # runner reads the master's facts again before the workers), or when the
            # master's repo step was left out: then this change fails, saying why.
            return StepPlan(self.name, node.name, (CommandChange(
                f"use the master's package repository as the only package source "
                f"(once the master's repository exists: {ready})",
                f"echo {shlex.quote('the master has no package repository yet: ' + ready)}; "
                "echo 'run: homeclust up --only repo (for the master too)'; exit 1"),))
        if platform.family == "debian":
            changes = self._debian_worker(ctx, master)
        else:
            changes = self._rhel_worker(ctx, master)
        return StepPlan(self.name, node.name, tuple(changes))

    @staticmethod
    def _master_ready(master: HostFacts, platform: Platform) -> str | None:
        """Why the master cannot serve the workers yet (None: it can)."""
        if parse_manifest(master.file_text(render.MANIFEST)) is None:
            return f"no {render.MANIFEST} on the master"
        if platform.family == "debian" and not master.file_text(render.PUBLIC_KEY):
            return f"no {render.PUBLIC_KEY} on the master"
        return None

    def _debian_worker(self, ctx: PlanContext, master: HostFacts) -> list[Change]:
        inventory, facts, platform = ctx.inventory, ctx.facts, ctx.platform
        key = master.file_text(render.PUBLIC_KEY) or ""
        changes: list[Change] = []
        for path, content in ((render.WORKER_KEYRING, key),
                              (render.APT_SOURCES, render.render_apt_sources(inventory, platform))):
            change = file_change(facts, path, content)
            if change is not None:
                changes.append(change)
        foreign = [p for p in sorted(facts.files)
                   if p.startswith(render.APT_SOURCES_DIR + "/") and p != render.APT_SOURCES
                   and p.endswith((".list", ".sources"))]
        sources_list = facts.file_text(render.APT_SOURCES_LIST)
        if sources_list is not None and _active_lines(sources_list):
            foreign.insert(0, render.APT_SOURCES_LIST)
        if foreign:
            changes.append(CommandChange(
                f"keep the original package sources aside in {render.ORIGINALS}: "
                + ", ".join(foreign), render.keep_aside_command(foreign, "debian")))
        if sources_list is not None or foreign:
            # What stays in sources.list says where the originals went.  Written after
            # they were moved, so the original content is never lost.
            stub = file_change(facts, render.APT_SOURCES_LIST, render.APT_SOURCES_LIST_STUB)
            if stub is not None:
                changes.append(stub)
        index = master.files.get(f"{render.WEB_ROOT}/debian/InRelease")
        cached = facts.files.get(render.apt_list_path(inventory))
        if changes or index is None or cached is None or cached.sha256 != index.sha256:
            why = ("its package sources changed" if changes
                   else "the master's repository changed")
            changes.append(CommandChange(
                f"read the package lists from the master (apt-get update: {why})",
                render.APT_UPDATE_COMMAND))
        return changes

    def _rhel_worker(self, ctx: PlanContext, master: HostFacts) -> list[Change]:
        inventory, node, facts, platform = ctx.inventory, ctx.node, ctx.facts, ctx.platform
        keys = list(platform.vendor_key_paths)
        if not keys:
            raise StepError(f"{node.name}: homeclust does not know which key signs "
                            f"{platform.name}'s packages",
                            hint="supported: CentOS, Rocky, AlmaLinux, RHEL, Oracle Linux")
        changes: list[Change] = []
        epel = platform.epel_key_path
        epel_key = master.file_text(epel) if epel else None
        if epel and epel_key:
            # EPEL's packages (nginx on EL7, iftop, fail2ban, torque) are signed by EPEL's
            # key, which only hosts with epel-release have: the worker gets the master's.
            keys.append(epel)
            change = file_change(facts, epel, epel_key)
            if change is not None:
                changes.append(change)
        repo = file_change(facts, render.YUM_REPO, render.render_yum_repo(inventory, platform, keys))
        if repo is not None:
            changes.append(repo)
        foreign = [p for p in sorted(facts.files)
                   if p.startswith(render.YUM_REPOS_DIR + "/") and p.endswith(".repo")
                   and p != render.YUM_REPO]
        if foreign:
            changes.append(CommandChange(
                f"keep the original repositories aside in {render.ORIGINALS}/yum.repos.d: "
                + ", ".join(foreign), render.keep_aside_command(foreign, "rhel")))
        if changes:
            tool = "yum" if platform.major == 7 else "dnf"
            changes.append(CommandChange(
                f"read the master's repository ({tool} makecache)",
                f"{tool} -q clean all && {tool} -q makecache"))
        return changes

    # ------------------------------------------------------------------ check

    def posture(self, ctx: PlanContext) -> list[CheckItem]:
        """The repository is served on the private side only: nginx listens on the private
        address and nothing else on port 80, and the firewall does not open port 80."""
        if not ctx.node.is_master:
            return []
        inventory, node = ctx.inventory, ctx.node
        listeners = ctx.facts.get(HTTP_LISTENERS)
        private = f"{inventory.master.private_address}:80"
        problems = []
        if private not in listeners:
            problems.append(f"nothing listens on {private}")
        others = [address for address in listeners if address != private]
        if others:
            problems.append(f"port 80 also listens on {', '.join(others)}")
        if 80 in inventory.firewall.public_tcp_ports:
            problems.append("[firewall] public_tcp_ports opens port 80 to the public side")
        return [CheckItem(
            node.name, "repository on the private side only", "fail" if problems else "pass",
            "; ".join(problems) if problems
            else f"nginx listens on {private} only; port 80 closed on the public side",
            f"homeclust up --only firewall,repo --host {node.name}")]

    def probes(self, ctx: PlanContext) -> list[Probe]:
        """Every worker fetches the master's index and verifies it (signature, hashes)."""
        if ctx.node.is_master:
            return []
        node, platform = ctx.node, ctx.platform
        script = (render.apt_verify_probe(ctx.inventory, platform) if platform.family == "debian"
                  else render.yum_verify_probe(ctx.inventory, platform))

        def evaluate(code: int, output: str) -> CheckItem:
            lines = [line for line in output.strip().splitlines() if line.strip()]
            if code != 0:
                errors = [line for line in lines if line.startswith(("E:", "W:", "Err", "Error"))]
                return CheckItem(node.name, "repository signature", "fail",
                                 "; ".join(errors[-2:] or lines[-2:]) or f"exit {code}",
                                 f"homeclust up --only repo --host {node.name}")
            return CheckItem(node.name, "repository signature", "pass",
                             lines[-1] if lines else "verified")

        return [Probe("repository", script, evaluate, timeout=60.0)]


def _active_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _some(items: list[str] | tuple[str, ...], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
