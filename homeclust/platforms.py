"""Platforms: all operating-system specific knowledge in one place.

Steps never look at OS names.  They ask the :class:`Platform` detected from a
host's facts: which package manager installs things, how network
configuration is written and applied, where persistent firewall rules live and
which service loads them at boot, which services would fight homeclust.

Supported: the RHEL family (CentOS 7 with ifcfg files and the ``network``
service; Rocky/Alma/RHEL/CentOS Stream 8 with NetworkManager reading ifcfg; 9
with NetworkManager keyfiles) and the Debian family (Debian 11-13 with
ifupdown; Ubuntu 20.04-24.04 with netplan).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from homeclust.errors import FactError
from homeclust.facts import HostFacts, OsRelease
from homeclust.quoting import PACKAGE_RE, require

Family = Literal["debian", "rhel"]
NetworkBackend = Literal["ifupdown", "netplan", "ifcfg", "nm-ifcfg", "nm-keyfile"]


@dataclass(frozen=True)
class Platform:
    """What homeclust needs to know about one operating system release."""

    name: str  # e.g. "debian12", "ubuntu22.04", "centos7", "rocky9"
    family: Family
    major: int
    package_manager: Literal["apt", "yum", "dnf"]
    network_backend: NetworkBackend
    #: systemd >= 243 understands a leading "-" in sysctl.d (ignore failures)
    sysctl_dash_prefix: bool
    #: ``ID`` of /etc/os-release (rocky, almalinux, centos, …): which vendor signs packages.
    os_id: str = field(default="", compare=False)

    # -- packages ---------------------------------------------------------------

    def install_command(self, packages: Iterable[str]) -> str:
        """Shell command installing ``packages`` non-interactively (keeps local config files).

        Names are quoted, and must be package names: a quoted ``-o...`` would still
        be an option to the package manager.
        """
        names = " ".join(shlex.quote(require(p, PACKAGE_RE, "the package name"))
                         for p in sorted(set(packages)))
        if self.package_manager == "apt":
            install = (
                "DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "
                f"--no-install-recommends {names}"
            )
            # An install that a power cut or a killed run interrupted is finished first
            # (apt refuses to do anything until it is).  Then try with the current
            # package lists: an update costs seconds and is only needed when the lists
            # are missing or stale.
            finish = ("DEBIAN_FRONTEND=noninteractive dpkg --configure -a --force-confdef "
                      "--force-confold >/dev/null 2>&1; ")
            return f"{finish}{install} || {{ apt-get update -q && {install}; }}"
        return f"{self.package_manager} install -y -q {names}"

    @property
    def firewall_packages(self) -> tuple[str, ...]:
        """Packages that load the saved iptables rules at boot."""
        if self.family == "debian":
            return ("iptables", "iptables-persistent")
        if self.major >= 9:
            # EL9 has no package named "iptables" (iptables-nft only provides it), and
            # facts list package names: asking for "iptables" would never converge.
            return ("iptables-nft", "iptables-services")
        return ("iptables", "iptables-services")

    @property
    def firewall_preseed(self) -> str | None:
        """Shell run before installing the firewall packages (answers install questions)."""
        if self.family == "debian":
            # Without this, installing iptables-persistent saves whatever rules are
            # live at that moment; homeclust writes the file itself.
            return (
                "printf '%s\\n' 'iptables-persistent iptables-persistent/autosave_v4 boolean false'"
                " 'iptables-persistent iptables-persistent/autosave_v6 boolean false'"
                " | debconf-set-selections"
            )
        return None

    @property
    def firewall_rules_path(self) -> str:
        """IPv4 rules loaded at boot (iptables-save format)."""
        return "/etc/iptables/rules.v4" if self.family == "debian" else "/etc/sysconfig/iptables"

    @property
    def firewall_rules6_path(self) -> str:
        """IPv6 rules loaded at boot (ip6tables-save format)."""
        return "/etc/iptables/rules.v6" if self.family == "debian" else "/etc/sysconfig/ip6tables"

    @property
    def firewall_service(self) -> str:
        """The unit that loads the IPv4 rules at boot."""
        return "netfilter-persistent" if self.family == "debian" else "iptables"

    @property
    def firewall6_service(self) -> str:
        """The unit that loads the IPv6 rules at boot (the same one on Debian)."""
        return "netfilter-persistent" if self.family == "debian" else "ip6tables"

    @property
    def conflicting_firewall_services(self) -> tuple[str, ...]:
        """Firewall managers that would replace homeclust's rules behind its back."""
        return ("ufw", "firewalld") if self.family == "debian" else ("firewalld",)

    # -- package repository (repo step) ------------------------------------------

    @property
    def package_format(self) -> Literal["deb", "rpm"]:
        return "deb" if self.family == "debian" else "rpm"

    @property
    def repo_server_prerequisites(self) -> tuple[str, ...]:
        """Installed before :attr:`repo_server_packages` (the repository they come from).

        EPEL on the RHEL family: CentOS 7's nginx and several worker packages (iftop,
        fail2ban, torque) are only there.  epel-release itself is in the distribution's
        extras (CentOS, Rocky, Alma); on RHEL proper, enable EPEL by hand first.
        """
        return ("epel-release",) if self.family == "rhel" else ()

    @property
    def repo_server_packages(self) -> tuple[str, ...]:
        """What the master needs to build, sign and serve the workers' repository."""
        if self.family == "debian":
            # apt-ftparchive (apt-utils) writes the index; gpg signs it.
            return ("nginx", "apt-utils", "gpg", "gpg-agent")
        if self.major == 7:
            return ("nginx", "createrepo", "yum-utils")  # yum-utils: repotrack, repoquery
        return ("nginx", "createrepo_c", "dnf-plugins-core")  # dnf download --resolve

    @property
    def nginx_user(self) -> str:
        return "www-data" if self.family == "debian" else "nginx"

    @property
    def vendor_key_paths(self) -> tuple[str, ...]:
        """The distribution's own package signing keys, as installed on every host of it
        (RHEL family; Debian-family workers trust the cluster's repository key instead)."""
        if self.family != "rhel":
            return ()
        base = "/etc/pki/rpm-gpg/"
        names = {
            ("centos", 7): "RPM-GPG-KEY-CentOS-7",
            ("rocky", 8): "RPM-GPG-KEY-rockyofficial",
            ("almalinux", 8): "RPM-GPG-KEY-AlmaLinux",
            ("almalinux", 9): "RPM-GPG-KEY-AlmaLinux-9",
        }
        name = names.get((self.os_id, self.major)) or {
            "rocky": f"RPM-GPG-KEY-Rocky-{self.major}",
            "centos": "RPM-GPG-KEY-centosofficial",  # CentOS Stream 8 and 9
            "rhel": "RPM-GPG-KEY-redhat-release",
            "ol": "RPM-GPG-KEY-oracle",
        }.get(self.os_id)
        return (base + name,) if name else ()

    @property
    def epel_key_path(self) -> str | None:
        """Where epel-release puts the EPEL signing key (RHEL family)."""
        return f"/etc/pki/rpm-gpg/RPM-GPG-KEY-EPEL-{self.major}" if self.family == "rhel" else None

    # -- monitoring (monitor step) -----------------------------------------------

    @property
    def auth_log_path(self) -> str:
        """Where the system logger writes sshd's authentication messages, if one runs."""
        return "/var/log/auth.log" if self.family == "debian" else "/var/log/secure"

    @property
    def fail2ban_prerequisites(self) -> tuple[str, ...]:
        """fail2ban is packaged in EPEL on the RHEL family."""
        return ("epel-release",) if self.family == "rhel" else ()

    def fail2ban_packages(self, *, journal: bool) -> tuple[str, ...]:
        """fail2ban itself, plus its journal reader when the journal is the log source.

        On the RHEL family the server package alone: the ``fail2ban`` metapackage
        pulls in fail2ban-firewalld, which bans through firewalld (masked by the
        firewall step).
        """
        if self.family == "debian":
            return ("fail2ban", "python3-systemd") if journal else ("fail2ban",)
        return ("fail2ban-server", "fail2ban-systemd") if journal else ("fail2ban-server",)

    # -- ssh and MPI ------------------------------------------------------------

    @property
    def ssh_client_package(self) -> str:
        """The package with ``ssh``, ``ssh-keygen`` and ``scp``."""
        return "openssh-client" if self.family == "debian" else "openssh-clients"

    @property
    def mpi_packages(self) -> tuple[str, ...]:
        """Open MPI's runtime (``mpirun``, ``orted``, the libraries) and mpi4py, which
        runs the check's data exchange without a compiler on any node.

        Debian: both in main, ``mpirun`` on the default PATH through alternatives.
        RHEL: ``openmpi`` (base) and mpi4py built against it (EPEL); CentOS 7's
        EPEL only has it for Python 2.
        """
        if self.family == "debian":
            return ("openmpi-bin", "python3-mpi4py")
        if self.major == 7:
            return ("openmpi", "mpi4py-openmpi")
        return ("openmpi", "python3-mpi4py-openmpi")

    @property
    def mpi_repo_packages(self) -> tuple[str, ...]:
        """Packages that must be installed (first) for :attr:`mpi_packages` to resolve."""
        return () if self.family == "debian" else ("epel-release",)

    @property
    def mpi_python(self) -> str:
        """The interpreter mpi4py is installed for."""
        return "python" if self.family == "rhel" and self.major == 7 else "python3"

    def mpi_sysconfdir(self, machine: str) -> str:
        """Where Open MPI reads ``openmpi-mca-params.conf`` and its default hostfile
        (``machine``: ``uname -m``; RHEL packages one Open MPI per architecture)."""
        return "/etc/openmpi" if self.family == "debian" else f"/etc/openmpi-{machine}"

    @property
    def mpi_prefix(self) -> str | None:
        """Open MPI's installation prefix when it is off the default paths (RHEL: the
        environment-modules layout), else None (Debian: /usr, nothing to set)."""
        return None if self.family == "debian" else "/usr/lib64/openmpi"

    # -- batch schedulers ---------------------------------------------------------

    @property
    def torque_packaged(self) -> bool:
        """Whether the distribution ships Torque/PBS: EPEL does, for the RHEL family;
        Debian dropped it after 9 and Ubuntu after 18.04."""
        return self.family == "rhel"

    @property
    def slurm_packaged(self) -> bool:
        """Whether the distribution ships a Slurm homeclust can configure (>= 20.11, which
        reads /etc/slurm and knows ``SlurmdParameters=config_overrides``).  Ubuntu 20.04's
        19.05 does neither."""
        return not (self.name.startswith("ubuntu") and self.major < 22)

    @property
    def scheduler_repo_packages(self) -> tuple[str, ...]:
        """The repository definition the scheduler packages come from, installed first
        (EPEL on the RHEL family; Debian's own archive has Slurm)."""
        return scheduler_repo_packages(self.family)

    def scheduler_packages(self, kind: SchedulerKind, *, controller: bool, compute: bool
                           ) -> tuple[str, ...]:
        """Packages of a Slurm or Torque node: client and munge everywhere, the
        controller/server on the master, the node daemon on compute nodes."""
        return scheduler_packages(self.family, kind, controller=controller, compute=compute)

    @property
    def slurm_layout(self) -> SlurmLayout:
        """Where this family's Slurm packages keep state and PID files."""
        return SLURM_LAYOUTS[self.family]

    # -- files ------------------------------------------------------------------

    @property
    def network_fact_paths(self) -> tuple[str, ...]:
        """Files the network step reads to take over the existing configuration."""
        return NETWORK_FACT_PATHS[self.network_backend]


SchedulerKind = Literal["torque", "slurm"]

#: Per family and scheduler: (everywhere, controller/server only, compute nodes only).
_SCHEDULER_PACKAGES: dict[tuple[Family, SchedulerKind],
                          tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    ("debian", "slurm"): (("munge", "slurm-client"), ("slurmctld",), ("slurmd",)),
    # EPEL: "slurm" holds the client commands and the shared plugins.
    ("rhel", "slurm"): (("munge", "slurm"), ("slurm-slurmctld",), ("slurm-slurmd",)),
    # EPEL: torque-client pulls in "torque" (trqauthd) and torque-libs.
    ("rhel", "torque"): (("munge", "torque-client"), ("torque-server", "torque-scheduler"),
                         ("torque-mom",)),
}


def all_scheduler_packages() -> frozenset[str]:
    """Every package a scheduler step may install on any family (what facts ask about)."""
    names = {p for groups in _SCHEDULER_PACKAGES.values() for group in groups for p in group}
    return frozenset(names | set(scheduler_repo_packages("rhel")))


def scheduler_repo_packages(family: Family) -> tuple[str, ...]:
    """See :attr:`Platform.scheduler_repo_packages`."""
    return ("epel-release",) if family == "rhel" else ()


def scheduler_packages(family: Family, kind: SchedulerKind, *, controller: bool,
                       compute: bool) -> tuple[str, ...]:
    """See :meth:`Platform.scheduler_packages` (by family: the repo step has no host)."""
    everywhere, server, node = _SCHEDULER_PACKAGES.get((family, kind), ((), (), ()))
    return everywhere + (server if controller else ()) + (node if compute else ())


@dataclass(frozen=True)
class SlurmLayout:
    """Directories and PID files a family's Slurm packages and units expect."""

    state_dir: str  # StateSaveLocation: slurmctld writes it as SlurmUser
    spool_dir: str  # SlurmdSpoolDir
    slurmctld_pid: str  # must match the unit's PIDFile= where units are Type=forking
    slurmd_pid: str
    #: The packages create the system user ``slurm`` and both directories owned by it
    #: (Debian); otherwise homeclust does (EPEL runs slurmctld as root by default).
    packages_prepare: bool


SLURM_LAYOUTS: dict[Family, SlurmLayout] = {
    "debian": SlurmLayout("/var/lib/slurm/slurmctld", "/var/lib/slurm/slurmd",
                          "/run/slurmctld.pid", "/run/slurmd.pid", packages_prepare=True),
    # Fedora/EPEL: forking units with PIDFile=/run/slurm/*.pid, spool under /var/spool/slurm.
    "rhel": SlurmLayout("/var/spool/slurm/ctld", "/var/spool/slurm/d",
                        "/run/slurm/slurmctld.pid", "/run/slurm/slurmd.pid",
                        packages_prepare=False),
}


#: Every file, per backend, that can configure an interface.
NETWORK_FACT_PATHS: dict[NetworkBackend, tuple[str, ...]] = {
    "ifupdown": (
        "/etc/network/interfaces", "/etc/network/interfaces.d/*", "/etc/dhcp/dhclient.conf",
        "/etc/resolv.conf",
    ),
    "netplan": ("/etc/netplan/*.yaml", "/etc/resolv.conf"),
    "ifcfg": ("/etc/sysconfig/network-scripts/ifcfg-*", "/etc/sysconfig/network"),
    "nm-ifcfg": (
        "/etc/sysconfig/network-scripts/ifcfg-*",
        "/etc/NetworkManager/system-connections/*",
    ),
    "nm-keyfile": (
        "/etc/sysconfig/network-scripts/ifcfg-*",
        "/etc/NetworkManager/system-connections/*",
    ),
}

ALL_NETWORK_FACT_PATHS: tuple[str, ...] = tuple(
    sorted({p for paths in NETWORK_FACT_PATHS.values() for p in paths})
)

#: Network configuration that may hold credentials (Wi-Fi PSKs, 802.1X passwords):
#: read for planning, never logged, never shown in a diff.
SECRET_NETWORK_FACT_PATHS: tuple[str, ...] = (
    "/etc/NetworkManager/system-connections/*",
    "/etc/netplan/*.yaml",
)


#: RHEL and its rebuilds (their ID_LIKE names rhel too, except Oracle Linux's).
RHEL_IDS = ("rhel", "centos", "rocky", "almalinux", "ol")


def detect(os_release: OsRelease) -> Platform:
    """The platform of an ``/etc/os-release``; unsupported systems are a FactError."""
    major = os_release.major
    if os_release.id == "ubuntu":
        if major < 20:
            raise _unsupported(os_release)
        return Platform(f"ubuntu{os_release.version_id}", "debian", major, "apt", "netplan", True,
                        "ubuntu")
    # Derivatives are not assumed to configure networks like their base: Raspberry Pi
    # OS and Kali (ID_LIKE=debian) use NetworkManager or dhcpcd, Amazon Linux 2023
    # (ID_LIKE=fedora) systemd-networkd.  RHEL rebuilds (ID_LIKE=rhel) are RHEL.
    if os_release.id == "debian":
        if major and major < 11:
            raise _unsupported(os_release)
        return Platform(f"debian{major or ''}", "debian", major, "apt", "ifupdown", True, "debian")
    if os_release.id in RHEL_IDS or any(i in ("rhel", "centos") for i in os_release.id_like):
        if major == 7:
            # systemd 219: no "-" prefix in sysctl.d; legacy network service.
            return Platform(f"{os_release.id}7", "rhel", 7, "yum", "ifcfg", False, os_release.id)
        if major == 8:
            return Platform(f"{os_release.id}8", "rhel", 8, "dnf", "nm-ifcfg", True, os_release.id)
        if major >= 9:
            return Platform(f"{os_release.id}{major}", "rhel", major, "dnf", "nm-keyfile", True,
                            os_release.id)
    raise _unsupported(os_release)


def _unsupported(os_release: OsRelease) -> FactError:
    return FactError(
        f"unsupported operating system: {os_release.pretty_name} "
        f"(ID={os_release.id}, VERSION_ID={os_release.version_id})",
        hint="homeclust supports CentOS 7, Rocky/Alma/RHEL 8 and 9, Debian 11-13, "
        "Ubuntu 20.04-24.04",
    )


def platform_of(facts: HostFacts) -> Platform:
    return detect(facts.os)
