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
from dataclasses import dataclass
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

    # -- files ------------------------------------------------------------------

    @property
    def network_fact_paths(self) -> tuple[str, ...]:
        """Files the network step reads to take over the existing configuration."""
        return NETWORK_FACT_PATHS[self.network_backend]


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
        return Platform(f"ubuntu{os_release.version_id}", "debian", major, "apt", "netplan", True)
    # Derivatives are not assumed to configure networks like their base: Raspberry Pi
    # OS and Kali (ID_LIKE=debian) use NetworkManager or dhcpcd, Amazon Linux 2023
    # (ID_LIKE=fedora) systemd-networkd.  RHEL rebuilds (ID_LIKE=rhel) are RHEL.
    if os_release.id == "debian":
        if major and major < 11:
            raise _unsupported(os_release)
        return Platform(f"debian{major or ''}", "debian", major, "apt", "ifupdown", True)
    if os_release.id in RHEL_IDS or any(i in ("rhel", "centos") for i in os_release.id_like):
        if major == 7:
            # systemd 219: no "-" prefix in sysctl.d; legacy network service.
            return Platform(f"{os_release.id}7", "rhel", 7, "yum", "ifcfg", False)
        if major == 8:
            return Platform(f"{os_release.id}8", "rhel", 8, "dnf", "nm-ifcfg", True)
        if major >= 9:
            return Platform(f"{os_release.id}{major}", "rhel", major, "dnf", "nm-keyfile", True)
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
