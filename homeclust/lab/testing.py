"""Helpers for tests that drive lab nodes over SSH the way homeclust does.

Kept in the package (not in a conftest) so every test module can import them:
``connect(lab, node)`` gives a paramiko client logged in as root with the lab
key -- the master through the admin's loopback forward, workers through a
``direct-tcpip`` channel of the master's connection (a jump host).

:func:`suite_release` is the Debian release the test suite's labs run unless a
test asks for another: ``$HOMECLUST_TEST_RELEASE``, bookworm when unset (the
steps are not all ready for trixie yet; the default flips when they are).
"""

from __future__ import annotations

import os

import paramiko

from homeclust.errors import LabError
from homeclust.lab.lab import Lab
from homeclust.lab.plan import check_release

#: The release of the test suite's labs when $HOMECLUST_TEST_RELEASE is unset.
DEFAULT_TEST_RELEASE = "bookworm"


def suite_release() -> str:
    """``$HOMECLUST_TEST_RELEASE`` (checked), or :data:`DEFAULT_TEST_RELEASE`."""
    release = os.environ.get("HOMECLUST_TEST_RELEASE") or DEFAULT_TEST_RELEASE
    check_release(release, what="HOMECLUST_TEST_RELEASE")
    return release


def connect(the_lab: Lab, node: str, via: paramiko.SSHClient | None = None) -> paramiko.SSHClient:
    """SSH to ``node`` as root; workers through ``via`` (a master connection) or a new one."""
    plan = the_lab.plan
    target = plan.node(node)
    client = paramiko.SSHClient()
    # Tests check host keys themselves; homeclust's own pinning is tested elsewhere.
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    key = str(the_lab.admin_key_path)
    if target.role == "master":
        client.connect("127.0.0.1", port=plan.ssh_port, username="root", key_filename=key,
                       look_for_keys=False, allow_agent=False, timeout=15, banner_timeout=15,
                       auth_timeout=15)
        return client
    jump = via or connect(the_lab, plan.master.name)
    transport = jump.get_transport()
    if transport is None:
        raise LabError(f"no SSH connection to {plan.master.name} to reach {node} through")
    address = str(target.private_address.ip)
    channel = transport.open_channel("direct-tcpip", (address, 22), ("127.0.0.1", 0), timeout=15)
    client.connect(address, sock=channel, username="root", key_filename=key, look_for_keys=False,
                   allow_agent=False, timeout=15, banner_timeout=15, auth_timeout=15)
    return client


def ssh_run(client: paramiko.SSHClient, command: str, timeout: float = 60) -> tuple[int, str]:
    """Run ``command`` on the node; (exit status, stdout + stderr)."""
    _, stdout, stderr = client.exec_command(command, timeout=timeout)
    out = stdout.read().decode() + stderr.read().decode()
    return stdout.channel.recv_exit_status(), out
