"""repo, monitor and push-package on the lab: behaviour seen from the nodes themselves.

One lab of its own (cluster "repomon": master + 2 workers, torn down at the end
of the module) configured from pristine nodes by a real `homeclust up`, with a
small repository ([repo] packages = ["jq"], [monitor] tools = ["tcpdump"]) so
the run stays quick.  The tests run in file order on that lab: first what the
first `up` achieved, then re-runs, a longer list, a repository that falls
behind, tampering, fail2ban bans from the institute side, push-package.
Observations go through the lab (nsenter into nodes, the internet and admin
hosts), not through homeclust.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from homeclust.lab import Lab
from tests.lab.conftest import progress, start_lab
from tests.lab.helpers import (
    failed_checks,
    homeclust,
    homeclust_json,
    inventory_copy,
    sh,
    statuses,
    tcp_connects,
)

pytestmark = pytest.mark.lab

NODES = ("master", "worker1", "worker2")
WORKERS = ("worker1", "worker2")
REPO = "/srv/homeclust-repo/debian"
MAXRETRY = 3
#: The steps these tests are about, with those they build on.
MINE = "network,firewall,nat,repo,monitor"


@pytest.fixture(scope="module")
def repomon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("repomon")
    path = inventory_copy(tmp, "repomon", workers=2, repo={"packages": ["jq"]},
                          monitor={"tools": ["tcpdump"],
                                   "fail2ban": {"maxretry": MAXRETRY, "bantime": 3600}})
    the_lab, _ = start_lab(path)
    try:
        yield the_lab
    finally:
        progress(the_lab.down().summary())


@pytest.fixture(scope="module")
def inventory_path(repomon: Lab) -> Path:
    return repomon.inventory_path


@pytest.fixture(scope="module")
def configured(repomon: Lab, inventory_path: Path) -> Lab:
    """The lab after one `homeclust up` (every step) from pristine nodes."""
    started = time.monotonic()
    code, data = homeclust_json(inventory_path, "up", timeout=1500)
    assert code == 0, (data["host_errors"], [o for o in data["outcomes"] if o["error"]])
    progress(f"repomon: first up in {time.monotonic() - started:.0f} s")
    changed = statuses(data)
    for node in NODES:
        assert changed[(node, "repo")] == "changed"
        assert changed[(node, "monitor")] == "changed"
    return repomon


@pytest.fixture(scope="module")
def longer(inventory_path: Path) -> Path:
    """The lab inventory with one more [repo] package: used from the test that adds it on."""
    return with_tables(inventory_path, "longer.toml", repo={"packages": ["jq", "tree"]})


def with_tables(inventory: Path, name: str, **tables: dict[str, object]) -> Path:
    """A copy of the lab inventory with some tables' keys replaced."""
    raw = tomllib.loads(inventory.read_text())
    for table, values in tables.items():
        raw.setdefault(table, {}).update(values)
    path = inventory.parent / name
    path.write_text(tomli_w.dumps(raw))
    return path


def repo_files(lab: Lab) -> dict[str, str]:
    """Every file of the master's repository with its inode and mtime (rewrites show)."""
    out = sh(lab, "master", f"stat -c '%n %i %Y' {REPO}/*")
    return {line.split()[0]: line for line in out.splitlines()}


def access_log(lab: Lab) -> list[str]:
    return sh(lab, "master", "cat /var/log/nginx/access.log").splitlines()


# --------------------------------------------------------------------------- the first up


def test_fresh_up_then_check_passes(configured: Lab, inventory_path: Path) -> None:
    code, data = homeclust_json(inventory_path, "check")
    assert code == 0, failed_checks(data)
    passed = {(c["host"], c["check"]) for c in data["checks"] if c["status"] == "pass"}
    for worker in WORKERS:
        assert (worker, "repository signature") in passed
    assert ("master", "repository on the private side only") in passed
    assert ("master", "fail2ban sshd jail") in passed


def test_workers_use_only_the_master_as_package_source(configured: Lab) -> None:
    for worker in WORKERS:
        # apt's own view of every index it would read
        uris = sh(configured, worker, "apt-get indextargets --format '$(URI)'").split()
        assert uris and all(u.startswith("http://192.168.10.1/debian/") for u in uris), uris
        active = sh(configured, worker,
                    "grep -hv '^[[:space:]]*\\(#\\|$\\)' /etc/apt/sources.list "
                    "/etc/apt/sources.list.d/*.list 2>/dev/null; true")
        assert active.strip() == ""
        # the originals are kept, not deleted
        kept = sh(configured, worker, "cat /var/lib/homeclust/package-sources-orig/sources.list")
        assert "deb.debian.org" in kept
        sources = sh(configured, worker, "cat /etc/apt/sources.list.d/homeclust.sources")
        assert "Signed-By: /etc/apt/keyrings/homeclust-repo.asc" in sources
        assert "trusted" not in sources


def test_a_worker_installs_a_repo_package_from_the_master(configured: Lab) -> None:
    before = len(access_log(configured))
    sh(configured, "worker2", "DEBIAN_FRONTEND=noninteractive apt-get install -y -q jq",
       timeout=120)
    assert sh(configured, "worker2", "jq -n '1 + 1'").strip() == "2"
    fetched = [line for line in access_log(configured)[before:] if ".deb " in line]
    # jq and its libraries came from the master's nginx, asked for by worker2
    assert any(re.search(r"GET /debian/(\./)?jq_", line) for line in fetched), fetched
    assert all(line.startswith("192.168.10.3 ") for line in fetched), fetched
    # the tools of the monitor step came the same way (installed by `up`)
    assert sh(configured, "worker1", "command -v tcpdump").strip()


def test_the_repository_is_not_reachable_from_the_institute_side(configured: Lab) -> None:
    master = str(configured.master_public_address)
    assert tcp_connects(configured, "worker1", "192.168.10.1", 80)  # the control
    assert not tcp_connects(configured, "internet", master, 80)
    assert not tcp_connects(configured, "admin", master, 80)
    # nginx itself listens only on the private address ...
    listening = sh(configured, "master", "ss -ltn | awk 'NR > 1 && $4 ~ /:80$/ { print $4 }'")
    assert listening.split() == ["192.168.10.1:80"]
    # ... and even with a route through the master the firewall keeps the institute out.
    route = ["ip", "route", "replace", "192.168.10.0/24", "via", master]
    configured.exec_internet(route)
    try:
        assert not tcp_connects(configured, "internet", "192.168.10.1", 80)
    finally:
        configured.exec_internet(["ip", "route", "del", "192.168.10.0/24"], check=False)


# --------------------------------------------------------------------------- incremental


def test_second_up_changes_nothing_and_downloads_nothing(configured: Lab,
                                                         inventory_path: Path) -> None:
    files = repo_files(configured)
    lists = sh(configured, "master", "stat -c '%n %Y' /var/lib/apt/lists/*")
    code, data = homeclust_json(inventory_path, "up")
    assert code == 0, data
    assert set(statuses(data).values()) == {"unchanged"}, statuses(data)
    assert repo_files(configured) == files
    assert sh(configured, "master", "stat -c '%n %Y' /var/lib/apt/lists/*") == lists
    done = homeclust(inventory_path, "plan")
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_longer_list_downloads_only_what_is_new(configured: Lab, longer: Path) -> None:
    before = repo_files(configured)
    code, data = homeclust_json(longer, "up")
    assert code == 0, (data["host_errors"], [o for o in data["outcomes"] if o["error"]])
    assert statuses(data)[("master", "repo")] == "changed"
    after = repo_files(configured)
    debs = {path for path in before if path.endswith(".deb")}
    # every package already there is untouched (same inode, same mtime) ...
    assert {path: after.get(path) for path in debs} == {path: before[path] for path in debs}
    # ... and tree is new
    new = sorted(path for path in after if path not in before)
    assert [Path(p).name.split("_")[0] for p in new] == ["tree"], new
    # the workers read the new index in the same run and can install it
    sh(configured, "worker1", "DEBIAN_FRONTEND=noninteractive apt-get install -y -q tree",
       timeout=120)
    again = homeclust(longer, "plan")
    assert again.returncode == 0, again.stdout + again.stderr


def test_up_only_repo_refreshes_and_picks_up_newer_versions(configured: Lab, longer: Path
                                                            ) -> None:
    """The repository falls behind the master's package lists (as after a refresh that
    found a newer jq): the manifest says an older jq, whose file is gone.  `up --only
    repo` refreshes the lists (its stamp is old), brings jq back at the lists' version,
    and the workers can install that version from the master."""
    manifest = "/var/lib/homeclust/repo/manifest"
    line = sh(configured, "master", f"grep '^pkg jq ' {manifest}").split()
    current, file = line[2], line[4]
    sh(configured, "master", f"sed -i 's/^pkg jq [^ ]* /pkg jq 0.1-1 /' "
                             f"{manifest} && rm {REPO}/{file} && "
                             "touch -d '-2 hours' /var/lib/homeclust/repo/refreshed")
    done = homeclust(longer, "plan", "--only", "repo")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "newer versions in the master's package lists: jq 0.1-1 -> " in \
        " ".join(done.stdout.split())
    code, data = homeclust_json(longer, "up", "--only", "repo")
    assert code == 0, (data["host_errors"], [o for o in data["outcomes"] if o["error"]])
    assert sh(configured, "master", f"test -s {REPO}/{file} && echo back").strip() == "back"
    age = int(sh(configured, "master",
                 "echo $(( $(date +%s) - $(stat -c %Y /var/lib/homeclust/repo/refreshed) ))"))
    assert age < 300  # the lists were refreshed in this run
    policy = sh(configured, "worker1", "apt-cache policy jq")
    assert f"Candidate: {current}" in policy and "192.168.10.1/debian" in policy
    assert homeclust(longer, "plan").returncode == 0


def test_a_tampered_index_fails_on_the_workers(configured: Lab, longer: Path) -> None:
    """Signatures are checked: an index changed after signing is refused by every worker."""
    sh(configured, "master", f"cp -p {REPO}/InRelease /root/InRelease.good && "
                             f"sed -i 's/^Origin: homeclust/Origin: homeclusX/' {REPO}/InRelease")
    try:
        code, data = homeclust_json(longer, "check")
        assert code == 1
        failing = {(c["host"], c["check"]) for c in data["checks"] if c["status"] == "fail"}
        assert {(w, "repository signature") for w in WORKERS} <= failing, failed_checks(data)
        # apt on the worker says why (BADSIG), independently of homeclust
        out = sh(configured, "worker2", "apt-get update -o APT::Update::Error-Mode=any 2>&1",
                 check=False)
        assert "BADSIG" in out or "not signed" in out or "invalid" in out, out
    finally:
        sh(configured, "master", f"cp -p /root/InRelease.good {REPO}/InRelease")
    code, data = homeclust_json(longer, "check")
    assert code == 0, failed_checks(data)


# --------------------------------------------------------------------------- fail2ban


def ssh_attempt_from_institute(lab: Lab) -> None:
    lab.exec_internet(["timeout", "15", "ssh", "-o", "BatchMode=yes", "-o",
                       "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                       "-o", "ConnectTimeout=5", f"nosuchuser@{lab.master_public_address}",
                       "true"], check=False, timeout=30)


def test_failed_logins_from_the_institute_are_banned_and_the_ban_survives_the_firewall(
        configured: Lab, longer: Path) -> None:
    master = str(configured.master_public_address)
    attacker = str(configured.internet_address)
    assert tcp_connects(configured, "internet", master, 22)  # the control
    for _ in range(MAXRETRY + 1):
        ssh_attempt_from_institute(configured)
    deadline = time.monotonic() + 20
    while tcp_connects(configured, "internet", master, 22):
        assert time.monotonic() < deadline, sh(configured, "master",
                                               "fail2ban-client status sshd")
        time.sleep(1)
    try:
        assert tcp_connects(configured, "admin", master, 22)  # the admin is unaffected
        rules = sh(configured, "master", "iptables-save -t filter")
        assert f"-A f2b-sshd -s {attacker}/32 -j REJECT" in rules
        # a ban is not drift
        code, data = homeclust_json(longer, "check")
        assert code == 0, failed_checks(data)
        jail = next(c for c in data["checks"] if c["check"] == "fail2ban sshd jail")
        assert "1 address(es) banned now" in jail["detail"]
        # A forced re-apply of the firewall: one of its rules went missing live.
        sh(configured, "master", "iptables -D INPUT -m limit --limit 5/min -j LOG "
                                 "--log-prefix 'homeclust-input-drop: '")
        code, data = homeclust_json(longer, "up", "--only", "firewall",
                                    "--host", "master")
        assert code == 0, data
        assert statuses(data)[("master", "firewall")] == "changed"
        rules = sh(configured, "master", "iptables-save -t filter")
        assert f"-A f2b-sshd -s {attacker}/32 -j REJECT" in rules
        assert re.search(r"-A INPUT .*--limit 5/min -j LOG --log-prefix \"homeclust-input-drop",
                         rules), rules  # the rate-limited drop log is back
        assert not tcp_connects(configured, "internet", master, 22)
        assert tcp_connects(configured, "admin", master, 22)
        assert homeclust(longer, "plan").returncode == 0
    finally:
        with contextlib.suppress(AssertionError):
            sh(configured, "master", f"fail2ban-client set sshd unbanip {attacker}")


# --------------------------------------------------------------------------- push-package


def test_push_package_installs_through_the_master_with_dependencies_from_the_repo(
        configured: Lab, longer: Path, tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr/share/doc/homeclust-push-test").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        "Package: homeclust-push-test\nVersion: 1.0-1\nArchitecture: all\n"
        "Maintainer: homeclust tests <root@localhost>\nDepends: jq\n"
        "Description: a package homeclust's tests push to nodes\n")
    (root / "usr/share/doc/homeclust-push-test/README").write_text("pushed\n")
    deb = tmp_path / "homeclust-push-test_1.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)],
                   check=True, capture_output=True)
    # jq, which the package depends on, is not on worker1 yet: it must come from the master.
    assert "install ok installed" not in sh(
        configured, "worker1", "dpkg-query -W -f='${Status}' jq 2>/dev/null; true")
    code, data = homeclust_json(longer, "push-package", str(deb), "--host", "worker1")
    assert code == 0, data
    assert data["results"] == [{"host": "worker1", "status": "installed",
                                "package": "homeclust-push-test", "version": "1.0-1",
                                "installed": "1.0-1", "error": None}]
    installed = sh(configured, "worker1",
                   "dpkg-query -W -f='${Package} ${Version} ${Status}\\n' homeclust-push-test jq")
    assert "homeclust-push-test 1.0-1 install ok installed" in installed
    assert "jq " in installed and installed.count("install ok installed") == 2
    assert "homeclust-push" not in sh(configured, "worker1", "ls /var/tmp")  # nothing left
    # The wrong format for the host's family: refused, nothing copied.
    rpm = tmp_path / "tool-1.0-1.noarch.rpm"
    rpm.write_bytes(b"\xed\xab\xee\xdb\x03\x00" + b"\0" * 90)
    refused = homeclust(longer, "push-package", str(rpm), "--host", "worker2")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "worker2 runs debian12" in refused.stderr
    assert "homeclust-push" not in sh(configured, "worker2", "ls /var/tmp")


def test_after_a_reboot_of_the_master_the_repository_and_fail2ban_are_back(
        configured: Lab, longer: Path) -> None:
    configured.reboot("master")
    deadline = time.monotonic() + 60
    while True:
        listening = sh(configured, "master",
                       "ss -ltn | awk 'NR > 1 && $4 ~ /:80$/ { print $4 }'", check=False)
        if listening.split() == ["192.168.10.1:80"] or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert listening.split() == ["192.168.10.1:80"]
    # The steps this test is about (the scheduler's daemons take a while to find each
    # other again after a reboot; its own tests wait for that).
    code, data = homeclust_json(longer, "check", "--only", MINE)
    assert code == 0, failed_checks(data)
    assert homeclust(longer, "plan", "--only", MINE).returncode == 0
