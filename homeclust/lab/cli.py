"""``homeclust lab ...``: the virtual lab's command-line interface.

The main CLI adds the :data:`lab` group (``main.add_command(lab)``) and puts
``{"inventory": PATH, "verbose": N}`` into the root context; the lab reads the
inventory path from there.  Failures are raised as LabError/InventoryError;
the main CLI turns them into exit codes.

Standalone (before or without the main CLI)::

    python -m homeclust.lab.cli [-i inventory.toml] lab up
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path

import click

from homeclust.errors import HomeclustError, LabError, UsageError
from homeclust.inventory import DEFAULT_INVENTORY
from homeclust.lab.lab import Lab
from homeclust.lab.plan import DEFAULT_RELEASE, DHCP_MODES, RELEASES
from homeclust.lab.uplink import parse_delay

_SSH_OPTIONS = ("-o", "StrictHostKeyChecking=accept-new", "-o", "HashKnownHosts=no",
                "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR")


def _inventory_path() -> str:
    obj = click.get_current_context().find_root().obj
    if isinstance(obj, dict) and obj.get("inventory"):
        return str(obj["inventory"])
    return DEFAULT_INVENTORY


def _echo(message: str) -> None:
    click.echo(message, err=True)


def _lab(cluster: str | None = None, dhcp: str | None = None, release: str | None = None,
         node_releases: dict[str, str] | None = None) -> Lab:
    """The lab of ``--cluster`` (from its recorded state) or of the inventory."""
    if cluster:
        return Lab.from_state(cluster, progress=_echo)
    return Lab(_inventory_path(), progress=_echo, dhcp=dhcp, release=release,
               node_releases=node_releases)


def parse_node_releases(values: tuple[str, ...]) -> dict[str, str] | None:
    """``--node-release NODE=RELEASE`` options as a mapping (None when there are none)."""
    if not values:
        return None
    mapping: dict[str, str] = {}
    for value in values:
        node, sep, release = value.partition("=")
        if not sep or not node or not release:
            raise UsageError(f"lab up: --node-release {value!r} is not NODE=RELEASE",
                             hint=f"e.g. --node-release worker2=bookworm ({', '.join(RELEASES)})")
        if node in mapping and mapping[node] != release:
            raise UsageError(f"lab up: --node-release names {node} twice "
                             f"({mapping[node]} and {release})")
        mapping[node] = release
    return mapping


cluster_option = click.option(
    "--cluster", metavar="NAME",
    help="Act on the lab of this cluster as recorded on this machine (no inventory needed).",
)


@click.group()
def lab() -> None:
    """A virtual replica of the inventory's cluster on this machine (needs root)."""


@lab.command()
@click.option("--dhcp", type=click.Choice(DHCP_MODES), default=None,
              help="The institute network's DHCP server: 'reserved' (default: the master's "
                   "address reserved for its client id) or 'router' (a home router: one "
                   "address, leases keyed by client identity, no reservation).")
@click.option("--release", metavar="RELEASE", default=None,
              help=f"The Debian release of every node: {' or '.join(RELEASES)} "
                   f"(default for a new lab: {DEFAULT_RELEASE}, the current stable).")
@click.option("--node-release", "node_release", metavar="NODE=RELEASE", multiple=True,
              help="Another release for one node, for a mixed lab (repeatable), "
                   "e.g. --node-release worker2=bookworm.")
def up(dhcp: str | None, release: str | None, node_release: tuple[str, ...]) -> None:
    """Build the lab and boot every node; print how to use it."""
    try:
        the_lab = _lab(dhcp=dhcp, release=release,
                       node_releases=parse_node_releases(node_release))
    except LabError as exc:  # a bad option value: nothing is created yet
        raise UsageError(f"lab up: {exc.message}", hint=exc.hint) from None
    click.echo(the_lab.up().summary())


@lab.command()
@cluster_option
def down(cluster: str | None) -> None:
    """Remove every namespace, mount and process of the lab (also after a crash)."""
    report = _lab(cluster).down()
    click.echo(report.summary())


@lab.command()
@cluster_option
def status(cluster: str | None) -> None:
    """Show nodes (with their releases), services, namespaces, DHCP mode, uplink and apt cache."""
    click.echo(_lab(cluster).status().describe())


@lab.command()
@click.argument("node")
@cluster_option
def reboot(node: str, cluster: str | None) -> None:
    """Reboot NODE (its files survive, as on real hardware)."""
    _timed(f"rebooted {node}", lambda: _lab(cluster).reboot(node))


@lab.command()
@click.argument("node")
@cluster_option
def stop(node: str, cluster: str | None) -> None:
    """Power NODE off (for fault tests); its disk is kept."""
    _timed(f"stopped {node}", lambda: _lab(cluster).stop(node))


@lab.command()
@click.argument("node")
@cluster_option
def start(node: str, cluster: str | None) -> None:
    """Power NODE on and wait for its SSH."""
    _timed(f"started {node}", lambda: _lab(cluster).start(node))


@lab.command()
@click.argument("node")
@cluster_option
def reset(node: str, cluster: str | None) -> None:
    """Make NODE pristine again (wipes its disk; new host key)."""
    _timed(f"reset {node}", lambda: _lab(cluster).reset(node))


@lab.command()
@click.option("--rate", metavar="RATE", help="Uplink rate in tc units: 4mbit, 512kbit, 1gbit.")
@click.option("--delay", metavar="TIME", help="Added before each archive response: 100ms, 1s.")
@click.option("--off", is_flag=True, help="Full speed again (no rate limit, no delay).")
@cluster_option
def uplink(rate: str | None, delay: str | None, off: bool, cluster: str | None) -> None:
    """Make the lab's uplink (internet host and package mirror) slow, or show it.

    Each call sets the whole uplink: `--rate 4mbit` alone also drops an earlier delay.
    """
    the_lab = _lab(cluster)
    if off and (rate or delay):
        raise UsageError("lab uplink: --off does not go with --rate or --delay")
    if off or rate or delay:
        setting = the_lab.set_uplink(rate, parse_delay(delay) if delay else 0)
        click.echo(f"lab uplink: {setting.describe()}")
    else:
        click.echo(f"lab uplink: {the_lab.uplink().describe()}")


@lab.command(context_settings={"ignore_unknown_options": True})
@click.argument("node")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@cluster_option
def ssh(node: str, command: tuple[str, ...], cluster: str | None) -> None:
    """Open SSH to NODE as root (workers through the master), or run COMMAND there."""
    the_lab = _lab(cluster)
    argv = ssh_argv(the_lab, node, list(command))
    os.execvp(argv[0], argv)


def ssh_argv(the_lab: Lab, node: str, command: list[str]) -> list[str]:
    """The ``ssh`` command line that reaches ``node`` the way homeclust does."""
    plan = the_lab.plan
    target = plan.node(node)
    key, known_hosts = str(the_lab.admin_key_path), str(the_lab.known_hosts_path)
    common = ["-i", key, "-o", f"UserKnownHostsFile={known_hosts}", *_SSH_OPTIONS]
    to_master = [*common, "-p", str(plan.ssh_port), "root@127.0.0.1"]
    if target.role == "master":
        return ["ssh", *to_master, *command]
    # -J would not pass our key and known_hosts to the jump: spell the jump out.
    proxy = shlex.join(["ssh", *common, "-p", str(plan.ssh_port), "-W", "%h:%p", "root@127.0.0.1"])
    return ["ssh", *common, "-o", f"ProxyCommand={proxy}",
            f"root@{target.private_address.ip}", *command]


def _timed(what: str, action: Callable[[], None]) -> None:
    started = time.monotonic()
    action()
    click.echo(f"lab: {what} in {time.monotonic() - started:.1f} s")


@click.group()
@click.option("-i", "--inventory", default=DEFAULT_INVENTORY, show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Inventory file.")
@click.option("-v", "--verbose", count=True)
@click.pass_context
def _standalone(ctx: click.Context, inventory: Path, verbose: int) -> None:
    """homeclust's lab commands, standalone (the main CLI offers the same as `homeclust lab`)."""
    ctx.obj = {"inventory": str(inventory), "verbose": verbose}


_standalone.add_command(lab)


def main() -> None:
    try:
        _standalone(standalone_mode=False)
    except HomeclustError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(exc.exit_code) from None
    except click.exceptions.Abort:
        raise SystemExit(130) from None
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None


if __name__ == "__main__":
    main()
