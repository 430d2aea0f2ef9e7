"""Facts for the ssh-keys and mpi steps: the lab cluster they were captured from, and
fresh and converged hosts of both families built on it.

``tests/fixtures/mesh/debian12-{master,worker}.txt`` are the facts of a lab master and
worker after ``homeclust up`` (cluster ``try-km``: master + worker1..3, 128 slots
each, one cluster user ``hpc``), read with the two steps' fact query.  The private
keys in them are placeholders (the planner copies them, it never reads them).
RHEL hosts are the recorded Rocky 9 / CentOS 7 facts with the same accounts and keys,
and the files where RHEL keeps them.
"""

from __future__ import annotations

from typing import Any

from homeclust.facts import FactQuery, HostFacts
from homeclust.inventory import Inventory
from homeclust.render.mpi import PROFILE_PATH, render_mca_params, render_profile
from homeclust.render.ssh import SSH_CONFIG, SSH_CONFIG_DROPIN, render_ssh_config_block
from homeclust.steps import REGISTRY
from tests.unit.factsbuilder import (
    FactsBuilder,
    FileArg,
    FileRecord,
    dpkg_lines,
    fixture_text,
    inventory,
    parse_recorded,
    recorded,
    rpm_lines,
)

#: The inventory of the captured lab cluster.
LAB_INVENTORY: dict[str, Any] = {
    "cluster": {"name": "try-km"},
    "master": {"slots": 128},
    "workers": [{"name": f"worker{i}", "private_address": f"192.168.10.{i + 1}",
                 "interface": "eth0", "slots": 128} for i in (1, 2, 3)],
    "users": [{"name": "hpc"}],
}


def lab_inventory(**tables: Any) -> Inventory:
    return inventory(**{**LAB_INVENTORY, **tables})


INV = lab_inventory()
QUERY: FactQuery = REGISTRY["ssh-keys"].fact_query(INV) | REGISTRY["mpi"].fact_query(INV)

#: What ``getent`` and ``stat`` say on a freshly installed node (root only).
FRESH_ACCOUNTS = ("@passwd\nroot:x:0:0:root:/root:/bin/bash\n@group\n@paths\n"
                  "/root|700|root|root|directory\n")

#: The sshd host keys and ssh_config of the captured master.
_SSH_FILES = ("/etc/ssh/ssh_host_ecdsa_key.pub", "/etc/ssh/ssh_host_ed25519_key.pub",
              "/etc/ssh/ssh_host_rsa_key.pub", SSH_CONFIG)

#: CentOS 7's ssh_config has no Include line (OpenSSH 7.4 as packaged there).
CENTOS7_SSH_CONFIG = """\
#	$OpenBSD: ssh_config,v 1.30 2016/02/20 23:06:23 sobrado Exp $

# Host *
#   ForwardAgent no
Host *
	GSSAPIAuthentication yes
	ForwardX11Trusted yes
	SendEnv LANG LC_CTYPE LC_NUMERIC LC_TIME LC_COLLATE LC_MONETARY LC_MESSAGES"""

#: RHEL 9's ssh_config starts by including the drop-in directory.
RHEL9_SSH_CONFIG = """\
# This is the ssh client system-wide configuration file.
Include /etc/ssh/ssh_config.d/*.conf

# Host *
#   ForwardAgent no
"""


def mesh(name: str) -> FactsBuilder:
    """The captured lab master (``master``) or worker1 (``worker``) after ``up``."""
    return parse_recorded(fixture_text(f"mesh/debian12-{name}.txt"))


def facts(builder: FactsBuilder) -> HostFacts:
    return builder.facts(QUERY)


def fresh(name: str) -> FactsBuilder:
    """A recorded host as installed: root only, its own host keys, no cluster files."""
    base = recorded(name)
    master = mesh("master")
    ssh_config = (master.files[SSH_CONFIG] if name.startswith(("debian", "ubuntu"))
                  else CENTOS7_SSH_CONFIG if name.startswith("centos7") else RHEL9_SSH_CONFIG)
    files: dict[str, FileArg] = {p: master.files[p] for p in _SSH_FILES if p != SSH_CONFIG}
    files[SSH_CONFIG] = ssh_config
    return base.but(files=files, x_accounts=FRESH_ACCOUNTS, x_machine="x86_64\n")


def _rhel_mpi_files() -> dict[str, FileArg]:
    sysconf = "/etc/openmpi-x86_64"
    upstream = fixture_text("openmpi/upstream-openmpi-mca-params.conf")
    worker = mesh("worker")
    return {
        f"{sysconf}/openmpi-mca-params.conf":
            render_mca_params(upstream, INV.cluster.private_network),
        f"{sysconf}/openmpi-default-hostfile":
            worker.files["/etc/openmpi/openmpi-default-hostfile"],
        PROFILE_PATH: render_profile("/usr/lib64/openmpi") or "",
    }


def converged(name: str) -> FactsBuilder:
    """A host of either family after ``up`` of ssh-keys and mpi on the captured cluster."""
    role = "master" if name.endswith("master") else "worker"
    captured = mesh(role)
    if name.startswith("debian12"):
        return captured
    # The same accounts, keys and mesh files, on the recorded RHEL host.
    keep = {p: r for p, r in captured.files.items()
            if p.startswith(("/root/", "/home/", "/etc/ssh/ssh_host_", "/etc/ssh/ssh_known_hosts",
                             "/usr/local/libexec/homeclust/"))}
    files: dict[str, FileArg] = dict(keep)
    files.update(_rhel_mpi_files())
    if name.startswith("centos7"):
        files[SSH_CONFIG] = render_ssh_config_block(CENTOS7_SSH_CONFIG, INV)
        packages = {"openssh-clients": "7.4p1-23.el7_9", "epel-release": "7-14",
                    "openmpi": "1.10.7-5.el7", "mpi4py-openmpi": "1.3.1-22.el7"}
    else:
        files[SSH_CONFIG] = RHEL9_SSH_CONFIG
        files[SSH_CONFIG_DROPIN] = captured.files[SSH_CONFIG_DROPIN]
        packages = {"openssh-clients": "8.7p1-38.el9", "epel-release": "9-7.el9",
                    "openmpi": "4.1.1-7.el9", "python3-mpi4py-openmpi": "3.1.3-2.el9"}
    return recorded(name).but(
        files=files, x_accounts=captured.sections["x-accounts"], x_machine="x86_64\n",
    ).add_lines("packages", *rpm_lines(packages).splitlines())


def with_debian_packages(builder: FactsBuilder, packages: dict[str, str]) -> FactsBuilder:
    return builder.add_lines("packages", *dpkg_lines(packages).splitlines())


def secret(text: str) -> FileRecord:
    return FileRecord(text.encode(), 0o600, secret=True)
