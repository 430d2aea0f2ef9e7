"""The nodes' Debian root filesystem: built once per release with debootstrap, cached by recipe.

The cache directory is named after a hash of the recipe (suite, mirror,
packages, the files written into it and :data:`RECIPE_VERSION`), so changing
any of them builds a new rootfs.  A build happens in a temporary directory
that is renamed into place only when complete: an interrupted build never
leaves a half-made rootfs that looks usable.

The image is what a fresh minimal server install of its release would be --
systemd, openssh-server, iproute2, iptables, ifupdown with the release's DHCP
client, apt -- and nothing that homeclust's steps install (no nginx, openmpi,
slurm, fail2ban, iptables-persistent).  Per release (:func:`recipe_for`):

* bookworm (Debian 12): isc-dhcp-client; one-line ``/etc/apt/sources.list``.
* trixie (Debian 13): dhcpcd-base, the DHCP client of priority "important"
  that ifupdown recommends (no isc-dhcp-client, so no dhclient); deb822 sources
  in ``/etc/apt/sources.list.d/debian.sources`` and no ``sources.list``
  (render.render_debian_sources says how that file is made).

Per-node files (hostname, network config, authorized keys, machine id) are
written into each node's overlay, not here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from homeclust.errors import LabError
from homeclust.lab import render
from homeclust.lab.plan import CACHE_ROOT, RELEASES
from homeclust.lab.system import mount_points, run

#: Bump when the build procedure changes in a way the recipe fields do not show.
RECIPE_VERSION = 1

#: bookworm's packages (the order is part of its recipe hash: keep it).
BASE_PACKAGES = (
    "systemd", "systemd-sysv", "dbus",
    "openssh-server", "openssh-sftp-server",  # sftp: what a Debian install brings along
    "iproute2", "iptables", "ifupdown", "isc-dhcp-client",
    "procps", "iputils-ping", "netcat-openbsd", "ca-certificates", "sudo",
    "netbase", "less", "kmod", "apt-utils",
)

#: Each release's DHCP client as its installer leaves it: trixie's ifupdown
#: recommends dhcpcd-base (priority important) where bookworm's recommended
#: isc-dhcp-client.
DHCP_CLIENT_PACKAGES = {"bookworm": "isc-dhcp-client", "trixie": "dhcpcd-base"}


def release_packages(release: str) -> tuple[str, ...]:
    """The packages of ``release``'s rootfs: the base set with that release's DHCP client."""
    client = DHCP_CLIENT_PACKAGES[release]
    return tuple(client if p == "isc-dhcp-client" else p for p in BASE_PACKAGES)

# Every node makes its own SSH host keys at first boot: debootstrap copied the
# build machine's, and Debian's ssh.service does not create missing ones.
SSH_HOSTKEYS_UNIT = """\
[Unit]
Description=Generate this machine's SSH host keys (first boot)
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target ssh.service
"""

RECIPE_MARKER = ".homeclust-lab-recipe.json"


@dataclass(frozen=True)
class Recipe:
    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    variant: str = "minbase"
    packages: tuple[str, ...] = BASE_PACKAGES
    files: dict[str, str] = field(default_factory=lambda: dict(recipe_files("bookworm")))
    version: int = RECIPE_VERSION
    #: Files debootstrap writes that the release's installer does not leave.
    remove: tuple[str, ...] = ()

    def fingerprint(self) -> str:
        """A short hash of everything that decides the rootfs's content.

        Fields added after the first recipe count only when set, so a recipe
        that does not use them keeps its hash -- and its cached rootfs.
        """
        fields = asdict(self)
        if not fields["remove"]:
            del fields["remove"]
        canonical = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def recipe_for(release: str) -> Recipe:
    """The rootfs recipe of a Debian release (one of plan.RELEASES)."""
    if release not in RELEASES:
        raise LabError(f"no rootfs recipe for release {release!r}",
                       hint=f"one of: {', '.join(RELEASES)}")
    if release == "bookworm":
        return Recipe()  # as it always was: its cached rootfs stays valid
    return Recipe(suite=release, packages=release_packages(release),
                  files=recipe_files(release),
                  # debootstrap writes a one-line sources.list; trixie's sources are deb822.
                  remove=("etc/apt/sources.list",))


def recipe_files(suite: str) -> dict[str, str]:
    """Files written into the rootfs after debootstrap, path -> content."""
    sources = ({"etc/apt/sources.list": render.render_sources_list(suite)}
               if suite == "bookworm" else
               {"etc/apt/sources.list.d/debian.sources": render.render_debian_sources(suite)})
    return {
        **sources,
        "etc/apt/apt.conf.d/99homeclust-lab": render.APT_LAB_CONF,
        "etc/systemd/system/ssh-hostkeys.service": SSH_HOSTKEYS_UNIT,
        "etc/hostname": "localhost\n",
        "etc/machine-id": "",
        "etc/fstab": "# <file system> <mount point> <type> <options> <dump> <pass>\n",
    }


def rootfs_path(recipe: Recipe, cache_root: Path = CACHE_ROOT) -> Path:
    return cache_root / f"rootfs-{recipe.fingerprint()}"


@contextlib.contextmanager
def _build_lock(cache_root: Path) -> Iterator[None]:
    cache_root.mkdir(parents=True, exist_ok=True)
    with open(cache_root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_rootfs(
    recipe: Recipe | None = None,
    cache_root: Path = CACHE_ROOT,
    progress: Callable[[str], None] = lambda _msg: None,
) -> tuple[Path, bool]:
    """The cached rootfs for ``recipe``, built first if needed.  Returns (path, built)."""
    recipe = recipe or Recipe()
    target = rootfs_path(recipe, cache_root)
    if (target / RECIPE_MARKER).exists():
        _mark_used(target)
        return target, False
    with _build_lock(cache_root):
        if (target / RECIPE_MARKER).exists():  # another process built it meanwhile
            _mark_used(target)
            return target, False
        _remove_stale(cache_root, keep=target)
        started = time.monotonic()
        progress(f"building the node rootfs with debootstrap ({recipe.suite}); "
                 "once only, about a minute")
        tmp = cache_root / f"{target.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        log = cache_root / f"{target.name}.build.log"
        try:
            _debootstrap(recipe, tmp, log)
            _customize(recipe, tmp)
            (tmp / RECIPE_MARKER).write_text(json.dumps(asdict(recipe), indent=2) + "\n")
            tmp.rename(target)
            _mark_used(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        progress(f"rootfs ready in {time.monotonic() - started:.0f} s: {target}")
        return target, True


def _debootstrap(recipe: Recipe, target: Path, log: Path) -> None:
    argv = [
        "debootstrap", f"--variant={recipe.variant}", f"--include={','.join(recipe.packages)}",
        "--components=main", recipe.suite, str(target), recipe.mirror,
    ]
    result = run(argv, check=False, timeout=1800)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise LabError(
            f"debootstrap failed (exit {result.returncode}); full log: {log}\n{tail}",
            hint=f"is {recipe.mirror} reachable from this machine?",
        )


def _customize(recipe: Recipe, root: Path) -> None:
    # Host keys and identity that debootstrap copied from the build machine.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    for path in ("etc/resolv.conf", "var/lib/dbus/machine-id", *recipe.remove):
        with contextlib.suppress(FileNotFoundError):
            (root / path).unlink()
    for relative, content in recipe.files.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    for wants in ("multi-user.target.wants", "ssh.service.wants"):
        link = root / "etc/systemd/system" / wants / "ssh-hostkeys.service"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to("/etc/systemd/system/ssh-hostkeys.service")
    # debootstrap leaves the downloaded .debs behind; a fresh install has none.
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()


#: A cached rootfs that no lab has used for this long is removed by the next build.
#: Several recipes live side by side (one per release, and the recipes of other
#: checkouts on the same machine): removing one merely because another is built
#: would make two checkouts rebuild each other's rootfs in turn.
STALE_AFTER = 7 * 24 * 3600


def _used_stamp(rootfs: Path) -> Path:
    # Beside the rootfs, not in it: the rootfs is the read-only lower layer of running nodes.
    return rootfs.with_name(rootfs.name + ".used")


def _mark_used(rootfs: Path) -> None:
    _used_stamp(rootfs).touch()


def _remove_stale(cache_root: Path, keep: Path, now: float | None = None) -> None:
    """Drop interrupted builds, and rootfs of other recipes that no running lab uses and
    no lab has used for :data:`STALE_AFTER` seconds."""
    now = time.time() if now is None else now
    in_use = "\n".join(str(p) for p in mount_points())
    mountinfo = Path("/proc/self/mountinfo").read_text()
    for entry in cache_root.iterdir():
        if entry == keep or not entry.is_dir() or not entry.name.startswith("rootfs-"):
            continue
        if str(entry) in in_use or str(entry) in mountinfo:
            continue
        # Builds hold the lock this runs under: a temporary build directory is an interrupted one.
        interrupted = ".tmp-" in entry.name
        stamp = _used_stamp(entry)
        last_used = stamp.stat().st_mtime if stamp.exists() else entry.stat().st_mtime
        if interrupted or now - last_used > STALE_AFTER:
            shutil.rmtree(entry, ignore_errors=True)
            stamp.unlink(missing_ok=True)

