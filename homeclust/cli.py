"""The ``homeclust`` command line: thin click functions over :mod:`homeclust.api`.

Exit codes (the contract): 0 success (``plan``: nothing to change), 1 a host
or step failed, 2 usage or inventory error (nothing contacted), 3 ``plan``
found changes.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import click

from homeclust import DEFAULT_FORKS, __version__
from homeclust.errors import HomeclustError
from homeclust.inventory import DEFAULT_INVENTORY, inventory_summary, load_inventory
from homeclust.steps import step_names


def _api() -> Any:
    # Imported when a command runs, not for --help or `inventory`: it loads the SSH stack.
    from homeclust import api

    return api


class _Commands(click.Group):
    """The command group; ``lab`` (and its dependencies) is loaded only when used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), "lab"]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name == "lab":
            from homeclust.lab.cli import lab

            return lab
        return super().get_command(ctx, name)

STEP_HELP = "Steps, in run order: " + ", ".join(step_names()) + "."


def _only_option(f: Any) -> Any:
    return click.option(
        "--only", "only", multiple=True, metavar="STEP[,STEP]",
        help="Run only these steps (order still follows dependencies).",
    )(f)


def _skip_option(f: Any) -> Any:
    return click.option("--skip", multiple=True, metavar="STEP[,STEP]",
                        help="Leave these steps out.")(f)


def _forks_option(f: Any) -> Any:
    return click.option("--forks", default=DEFAULT_FORKS, show_default=True,
                        type=click.IntRange(1, 256),
                        help="Workers handled in parallel.")(f)


def _host_option(f: Any) -> Any:
    return click.option(
        "--host", "hosts", multiple=True, metavar="NAME[,NAME]",
        help="Only these hosts (workers are still reached through the master).",
    )(f)


def _json_option(f: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(f)


def _inventory(ctx: click.Context) -> str:
    return str(ctx.find_root().obj["inventory"])


@click.group(
    cls=_Commands,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Examples:\n\n\b\n"
    "  homeclust plan                          # what would change, as diffs\n"
    "  homeclust up                            # bring the cluster to the inventory's state\n"
    "  homeclust up --only firewall --host worker2\n"
    "  homeclust check                         # prove the cluster works\n"
    "  homeclust lab up                        # a virtual copy of the cluster to try things",
)
@click.option("-i", "--inventory", default=DEFAULT_INVENTORY, show_default=True,
              metavar="PATH", help="Inventory file.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv: debug).")
@click.version_option(__version__, prog_name="homeclust")
@click.pass_context
def cli(ctx: click.Context, inventory: str, verbose: int) -> None:
    """Turn a few computers into an HPC cluster over SSH.

    The master (public + private interface) becomes the NAT gateway, package
    repository and SSH jump host; the workers are configured through it.
    """
    ctx.obj = {"inventory": inventory, "verbose": verbose}
    configure_logging(verbose)


@cli.command(epilog=STEP_HELP)
@_only_option
@_skip_option
@_host_option
@click.option("--dry-run", is_flag=True, help="Plan only; change nothing (like `plan`).")
@click.option("--diff", is_flag=True, help="Show file diffs of what changes.")
@_forks_option
@_json_option
@click.pass_context
def up(ctx: click.Context, only: tuple[str, ...], skip: tuple[str, ...], hosts: tuple[str, ...],
       dry_run: bool, diff: bool, forks: int, as_json: bool) -> None:
    """Bring the cluster to the state the inventory describes.

    The master first, then the workers in parallel.  Changes that could cut
    you off (network, firewall) roll back by themselves unless homeclust can
    confirm them over a new connection.
    """
    options = _api().Options(only=only, skip=skip, hosts=hosts, forks=forks, dry_run=dry_run,
                          diff=diff or dry_run, json=as_json)
    ctx.exit(_api().execute("up", _inventory(ctx), options))


@cli.command(epilog=STEP_HELP + " Exit code 3 means changes are pending (a drift check).")
@_only_option
@_skip_option
@_host_option
@_forks_option
@_json_option
@click.pass_context
def plan(ctx: click.Context, only: tuple[str, ...], skip: tuple[str, ...],
         hosts: tuple[str, ...], forks: int, as_json: bool) -> None:
    """Show what `up` would change (files as unified diffs); change nothing."""
    options = _api().Options(only=only, skip=skip, hosts=hosts, forks=forks, json=as_json)
    ctx.exit(_api().execute("plan", _inventory(ctx), options))


@cli.command(epilog=STEP_HELP)
@_only_option
@_host_option
@_forks_option
@_json_option
@click.pass_context
def check(ctx: click.Context, only: tuple[str, ...], hosts: tuple[str, ...], forks: int,
          as_json: bool) -> None:
    """Prove the cluster works: reachability, NAT egress, firewall posture and drift."""
    options = _api().Options(only=only, hosts=hosts, forks=forks, json=as_json)
    ctx.exit(_api().execute("check", _inventory(ctx), options))


@cli.command()
@_host_option
@_json_option
@click.pass_context
def facts(ctx: click.Context, hosts: tuple[str, ...], as_json: bool) -> None:
    """Read and show what homeclust knows about each host (one round trip per host)."""
    ctx.exit(_api().show_facts(_inventory(ctx), hosts, as_json=as_json))


@cli.command("accept-host-key")
@click.argument("node")
@click.option("--fingerprint", metavar="SHA256:…",
              help="Accept only this fingerprint (read on the node itself), without asking.")
@click.option("--yes", is_flag=True, help="Accept whatever key the node offers, without asking.")
@click.pass_context
def accept_host_key(ctx: click.Context, node: str, fingerprint: str | None, yes: bool) -> None:
    """Accept NODE's new SSH host key after a reinstall.

    homeclust pins every node's host key on first contact and refuses a node
    whose key changed.  This shows the key NODE offers now next to the pinned
    one and, once you confirm, pins the new one.  Then run `homeclust up`: it
    gives every node's /etc/ssh/ssh_known_hosts the new key.
    """
    interactive = sys.stdin.isatty()
    if fingerprint is None and not yes and not interactive:
        raise click.UsageError("not a terminal: pass --fingerprint SHA256:… (or --yes) to accept")

    api = _api()

    def ask(offer: Any) -> bool:
        click.echo(f"{offer.node} ({offer.pinned_as}) now offers {offer.offered}")
        for old in offer.pinned or ("(nothing pinned yet)",):
            click.echo(f"  pinned: {old}")
        return yes or click.confirm("Accept the new key?", default=False)

    offer, accepted = api.accept_host_key(_inventory(ctx), node, fingerprint=fingerprint,
                                          confirm=ask)
    if offer.already_pinned:
        click.echo(f"{offer.node}: {offer.offered} is already the pinned key; nothing to do")
    elif accepted:
        click.echo(f"{offer.node}: pinned {offer.offered}"
                   + (f" (was {', '.join(offer.pinned)})" if offer.pinned else ""))
        click.echo("next: `homeclust up` (or `homeclust up --only ssh-keys`) gives every node's "
                   "ssh_known_hosts the new key")
    else:
        click.echo(f"{offer.node}: not accepted; nothing changed")
    ctx.exit(0 if accepted else 1)


@cli.command("inventory")
@_json_option
@click.pass_context
def inventory_command(ctx: click.Context, as_json: bool) -> None:
    """Validate the inventory and print it with every default filled in."""
    inv = load_inventory(_inventory(ctx))
    data = inventory_summary(inv)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"inventory {inv.path}: valid")
    click.echo(f"cluster {inv.cluster.name}: private network {inv.cluster.private_network}, "
               f"dns {', '.join(map(str, inv.cluster.dns))}")
    m = inv.master
    public = (f"{m.public_interface} dhcp (client id {m.dhcp_client_id})"
              if m.public_boot == "dhcp" else
              f"{m.public_interface} {m.public_address} gw {m.public_gateway}")
    click.echo(f"master  {m.name:<12} {m.private_interface} {m.private_address!s:<15} "
               f"public {public}; ssh {inv.ssh.user}@{m.address}:{m.port}; slots {m.slots}"
               f"{'' if m.compute else ' (no jobs)'}")
    for w in inv.workers:
        click.echo(f"worker  {w.name:<12} {w.interface} {w.private_address!s:<15} "
                   f"via {m.name}; slots {w.slots}")
    click.echo(f"firewall: ssh from {', '.join(map(str, inv.firewall.ssh_from))}; public tcp "
               f"{', '.join(map(str, inv.firewall.public_tcp_ports))}; "
               f"log drops {'on' if inv.firewall.log_dropped else 'off'}")
    click.echo(f"scheduler: {inv.scheduler.kind}; known_hosts: {inv.ssh.known_hosts}")


@cli.command("push-package")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--host", "hosts", multiple=True, required=True, metavar="NAME[,NAME]",
              help="The hosts to install it on (workers through the master).")
@_forks_option
@_json_option
@click.pass_context
def push_package(ctx: click.Context, file: Path, hosts: tuple[str, ...], forks: int,
                 as_json: bool) -> None:
    """Copy one .deb/.rpm to hosts and install it; report the installed version.

    The guide's copy-and-install path: dependencies come from each host's package
    sources (workers: the master's repository).  A file whose format does not match
    a host's distribution is refused (exit 2) before anything is copied.
    """
    from homeclust import push  # the SSH stack, loaded only when the command runs

    ctx.exit(push.execute(_inventory(ctx), file, hosts, forks=forks, as_json=as_json))


def configure_logging(verbose: int) -> None:
    import logging

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if verbose < 3:
        # paramiko's transport chatter is only useful when asked for explicitly.
        logging.getLogger("paramiko").setLevel(max(level, logging.WARNING))


def _interrupt_on_signal(signum: int, frame: object) -> None:
    # SIGTERM/SIGHUP take the same path as Ctrl-C: guarded changes roll back now.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Console entry point: HomeclustError -> message + documented exit code."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt_on_signal)
    try:
        code = cli.main(args=argv, prog_name="homeclust", standalone_mode=False)
    except click.UsageError as exc:
        exc.show()
        sys.exit(2)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except HomeclustError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    # In non-standalone mode click returns ctx.exit()'s code instead of exiting.
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
