"""repo and fail2ban renderers: golden files for both families, plus independent checks.

Golden files live in ``tests/golden/repo/`` and ``tests/golden/fail2ban/``;
regenerate them only with ``HOMECLUST_UPDATE_GOLDEN=1`` and review the diff.
Besides the golden comparison each rendering is checked against what the
issue demands, stated independently: nginx only on the private address,
signatures always checked (no ``trusted=yes``, no ``gpgcheck=0``), workers
trusting exactly the cluster key, the inventory's jail values.  Every shell
script is parsed by ``sh -n`` (dash on Debian).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from homeclust.platforms import Platform, platform_of
from homeclust.render import repo as render
from homeclust.render.fail2ban import render_jail
from tests.unit.factsbuilder import check_golden, inventory, recorded

INV = inventory()
DEBIAN = platform_of(recorded("debian12-master").facts())
ROCKY9 = platform_of(recorded("rocky9-master").facts())
CENTOS7 = platform_of(recorded("centos7-worker").facts())
UBUNTU = platform_of(recorded("ubuntu2204-master").facts())


def family_dir(platform: Platform) -> str:
    return "debian" if platform.family == "debian" else "rhel"


# --------------------------------------------------------------------------- master


@pytest.mark.parametrize("platform", [DEBIAN, ROCKY9], ids=["debian", "rhel"])
def test_nginx_conf_matches_golden(platform: Platform) -> None:
    check_golden(f"repo/{family_dir(platform)}/etc/nginx/nginx.conf",
                 render.render_nginx_conf(INV, platform))


@pytest.mark.parametrize("platform", [DEBIAN, ROCKY9, CENTOS7])
def test_nginx_listens_only_on_the_private_address_and_includes_nothing(platform: Platform
                                                                        ) -> None:
    conf = render.render_nginx_conf(inventory(master={"private_address": "192.168.10.254"}),
                                    platform)
    assert re.findall(r"^\s*listen\s+(\S+);", conf, re.M) == ["192.168.10.254:80"]
    # No include of sites-enabled/conf.d: the distributions' default servers listen on *:80.
    assert [line.split()[1] for line in conf.splitlines() if line.strip().startswith("include")] \
        == ["/etc/nginx/mime.types;"]
    assert "root /srv/homeclust-repo;" in conf
    assert f"user {'www-data' if platform.family == 'debian' else 'nginx'};" in conf


def test_scripts_are_valid_posix_shell() -> None:
    sh = shutil.which("dash") or shutil.which("sh")
    assert sh is not None
    scripts = {
        "key": render.key_script(INV),
        "build-debian": render.build_script_debian(INV, ["jq", "tcpdump"], update=True),
        "build-el9": render.build_script_rhel(ROCKY9, ["jq"], update=False),
        "build-el7": render.build_script_rhel(CENTOS7, ["jq"], update=True),
        "state": render.REPO_STATE_COMMAND,
        "apt-probe": render.apt_verify_probe(INV, DEBIAN),
        "yum-probe": render.yum_verify_probe(INV, ROCKY9),
        "keep-aside": render.keep_aside_command(
            ["/etc/apt/sources.list", "/etc/apt/sources.list.d/x.list"], "debian"),
    }
    for name, script in scripts.items():
        done = subprocess.run([sh, "-n"], input=script, text=True, capture_output=True)
        assert done.returncode == 0, (name, done.stderr)


@pytest.mark.parametrize(("name", "script"), [
    ("key.sh", render.key_script(INV)),
    ("build-debian.sh", render.build_script_debian(INV, ["iptables", "jq"], update=True)),
    ("build-el7.sh", render.build_script_rhel(CENTOS7, ["iptables", "jq"], update=True)),
    ("build-el9.sh", render.build_script_rhel(ROCKY9, ["iptables-nft", "jq"], update=False)),
])
def test_scripts_match_golden(name: str, script: str) -> None:
    check_golden(f"repo/scripts/{name}", script + "\n")


def test_debian_build_resolves_the_closure_as_for_an_empty_system_and_signs_it() -> None:
    script = render.build_script_debian(INV, ["jq", "tcpdump"], update=False)
    assert "WANTED='jq tcpdump'" in script
    assert f"Dir::State::status={render.EMPTY_STATUS}" in script  # nothing counts as installed
    assert "APT::Install-Recommends=false" in script
    assert 'Dir::Cache::archives="$R"' in script  # apt skips what the repository has
    assert "--clearsign" in script and render.SIGNING_KEY in script
    assert "[ 0 = 1 ]" in script  # no refresh asked for
    assert "[ 1 = 1 ]" in render.build_script_debian(INV, ["jq"], update=True)


def test_rhel_build_uses_the_guides_tools_per_release() -> None:
    el7 = render.build_script_rhel(CENTOS7, ["jq"], update=False)
    el9 = render.build_script_rhel(ROCKY9, ["jq"], update=False)
    assert "repotrack" in el7 and "createrepo -q --update" in el7
    assert "dnf -q download --resolve --alldeps" in el9 and "createrepo_c -q --update" in el9
    assert "gpg" not in el9  # RHEL packages keep the vendor's signatures


def test_wanted_packages_reach_the_shell_quoted() -> None:
    script = render.build_script_debian(INV, ["a+b", "c.d"], update=False)
    assert "WANTED='a+b c.d'" in script


# --------------------------------------------------------------------------- workers


def test_apt_source_matches_golden_and_trusts_exactly_the_cluster_key() -> None:
    sources = render.render_apt_sources(INV, DEBIAN)
    check_golden("repo/debian/etc/apt/sources.list.d/homeclust.sources", sources)
    assert "trusted" not in sources.lower()
    assert f"Signed-By: {render.WORKER_KEYRING}" in sources.splitlines()
    assert "URIs: http://192.168.10.1/debian/" in sources.splitlines()
    check_golden("repo/debian/etc/apt/sources.list", render.APT_SOURCES_LIST_STUB)
    assert not [line for line in render.APT_SOURCES_LIST_STUB.splitlines()
                if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize(("name", "platform", "keys"), [
    ("rocky9", ROCKY9, ["/etc/pki/rpm-gpg/RPM-GPG-KEY-Rocky-9",
                        "/etc/pki/rpm-gpg/RPM-GPG-KEY-EPEL-9"]),
    ("centos7", CENTOS7, ["/etc/pki/rpm-gpg/RPM-GPG-KEY-CentOS-7",
                          "/etc/pki/rpm-gpg/RPM-GPG-KEY-EPEL-7"]),
])
def test_yum_repo_matches_golden_and_checks_signatures(name: str, platform: Platform,
                                                       keys: list[str]) -> None:
    repo = render.render_yum_repo(INV, platform, keys)
    check_golden(f"repo/rhel/{name}/etc/yum.repos.d/homeclust.repo", repo)
    lines = repo.splitlines()
    assert "gpgcheck=1" in lines and "gpgcheck=0" not in lines
    assert "baseurl=http://192.168.10.1/rhel/" in lines
    assert f"gpgkey={' '.join('file://' + k for k in keys)}" in lines


@pytest.mark.parametrize(("platform", "key"), [
    (ROCKY9, "RPM-GPG-KEY-Rocky-9"), (CENTOS7, "RPM-GPG-KEY-CentOS-7"),
])
def test_vendor_keys_are_the_distributions_own(platform: Platform, key: str) -> None:
    assert platform.vendor_key_paths == (f"/etc/pki/rpm-gpg/{key}",)
    assert DEBIAN.vendor_key_paths == () and UBUNTU.vendor_key_paths == ()


def test_keep_aside_moves_never_deletes() -> None:
    debian = render.keep_aside_command(
        ["/etc/apt/sources.list", "/etc/apt/sources.list.d/extra.sources"], "debian")
    assert "rm " not in debian
    assert f"mv -f /etc/apt/sources.list {render.ORIGINALS}/sources.list" in debian
    assert (f"mv -f /etc/apt/sources.list.d/extra.sources "
            f"{render.ORIGINALS}/sources.list.d/extra.sources") in debian
    rhel = render.keep_aside_command(["/etc/yum.repos.d/CentOS-Base.repo"], "rhel")
    assert rhel == (f"mkdir -p {render.ORIGINALS}/yum.repos.d && mv -f "
                    f"/etc/yum.repos.d/CentOS-Base.repo {render.ORIGINALS}/yum.repos.d/"
                    "CentOS-Base.repo")


def test_the_documented_restore_command_undoes_the_keep_aside(tmp_path: object) -> None:
    """The stub in sources.list names the restore command; run both on a scratch tree."""
    import pathlib

    root = pathlib.Path(str(tmp_path))
    etc = root / "etc/apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text("deb http://deb.debian.org/debian bookworm main\n")
    (etc / "sources.list.d/extra.list").write_text("deb http://example.org/ x main\n")
    (etc / "sources.list.d/homeclust.sources").write_text("ours\n")
    move = render.keep_aside_command(
        ["/etc/apt/sources.list", "/etc/apt/sources.list.d/extra.list"], "debian")
    restore = next(line.lstrip("#").strip() for line in render.APT_SOURCES_LIST_STUB.splitlines()
                   if "cp -a" in line).replace(" && apt-get update", "")

    def rooted(command: str) -> str:
        return command.replace("/etc/", f"{root}/etc/").replace("/var/lib/", f"{root}/var/lib/")

    subprocess.run(["sh", "-c", rooted(move)], check=True)
    assert not (etc / "sources.list").exists()
    assert not (etc / "sources.list.d/extra.list").exists()
    subprocess.run(["sh", "-c", rooted(restore)], check=True)
    assert (etc / "sources.list").read_text().startswith("deb http://deb.debian.org")
    assert (etc / "sources.list.d/extra.list").exists()
    assert not (etc / "sources.list.d/homeclust.sources").exists()


# --------------------------------------------------------------------------- fail2ban


@pytest.mark.parametrize(("name", "auth_log"), [
    ("journal", None), ("auth-log", "/var/log/auth.log"), ("secure", "/var/log/secure"),
])
def test_jail_matches_golden(name: str, auth_log: str | None) -> None:
    check_golden(f"fail2ban/{name}.local", render_jail(INV, auth_log=auth_log))


def test_jail_takes_the_inventorys_values_and_never_bans_the_cluster() -> None:
    inv = inventory(monitor={"fail2ban": {"maxretry": 3, "bantime": 600}},
                    ssh={"user": "root", "key": "/nonexistent/k", "port": 2222},
                    cluster={"name": "c", "private_network": "10.20.0.0/16", "dns": ["8.8.8.8"]},
                    master={"private_address": "10.20.0.1"},
                    workers=[{"name": "w1", "private_address": "10.20.0.2"}])
    jail = render_jail(inv, auth_log=None)
    section = jail.split("[sshd]", 1)[1].splitlines()
    assert {"enabled = true", "port = 2222", "maxretry = 3", "bantime = 600",
            "backend = systemd"} <= set(section)
    assert "ignoreip = 127.0.0.0/8 ::1 10.20.0.0/16" in jail.splitlines()
    # Bans must land in the iptables filter table the firewall step carries over.
    assert "banaction = iptables-multiport" in jail.splitlines()
