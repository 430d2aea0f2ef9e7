"""repo step planning from recorded facts of both families: the master's build, the workers'
switch to it, incrementality (what makes a build happen), the refresh policy, checks.

Debian states come from the lab (``tests/fixtures/lab-facts``); RHEL states are made
from golden files and hand-written manifests (``tests/fixtures/repo``), as there is no
RHEL lab.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from homeclust.changes import CommandChange, FileChange, PackagesChange, ServiceChange
from homeclust.errors import StepError
from homeclust.facts import HostFacts
from homeclust.inventory import Inventory
from homeclust.platforms import platform_of
from homeclust.render import repo as render
from homeclust.steps import REGISTRY, resolve_steps, worker_packages
from homeclust.steps.base import PlanContext, StepPlan
from homeclust.steps.repo import REFRESH_AFTER, REPO_STATE, parse_manifest, parse_repo_state
from tests.unit.factsbuilder import (
    CONVERGED_TABLES,
    FactsBuilder,
    FileRecord,
    fixture_text,
    golden_text,
    inventory,
    recorded,
    repo_converged,
    repo_master_for,
    repo_monitor_query,
)

INV = inventory(**CONVERGED_TABLES)
STEP = REGISTRY["repo"]
MANIFEST = render.MANIFEST


def plan(facts: HostFacts | FactsBuilder, node: str = "master", inv: Inventory = INV, *,
         master: FactsBuilder | None = None, requested: frozenset[str] = frozenset()
         ) -> StepPlan:
    if isinstance(facts, FactsBuilder):
        facts = facts.facts()
    cluster = {"master": master.facts()} if master is not None else {}
    return STEP.plan(PlanContext(inv, inv.node(node), facts, cluster, requested=requested))


def commands(result: StepPlan) -> list[CommandChange]:
    return [c for c in result.all_changes if isinstance(c, CommandChange)]


def build_of(result: StepPlan) -> CommandChange:
    found = [c for c in commands(result) if "package repository:" in c.description]
    assert len(found) == 1, result.descriptions()
    return found[0]


def files(result: StepPlan) -> dict[str, FileChange]:
    return {c.path: c for c in result.all_changes if isinstance(c, FileChange)}


# --------------------------------------------------------------------------- what is wanted


def test_wanted_packages_come_from_every_enabled_step_plus_repo_packages() -> None:
    debian = platform_of(recorded("debian12-master").facts())
    rocky = platform_of(recorded("rocky9-master").facts())
    centos = platform_of(recorded("centos7-worker").facts())
    inv = inventory(repo={"packages": ["jq", "tree"]}, monitor={"tools": ["tcpdump", "nmap"]})
    assert worker_packages(inv, debian) == (
        "iptables", "iptables-persistent", "jq", "nmap", "openmpi-bin", "openssh-client",
        "python3-mpi4py", "tcpdump", "tree")
    # The firewall's loader per release: EL9 has iptables-nft where EL7 has iptables.
    assert {"iptables-nft", "iptables-services"} <= set(worker_packages(inv, rocky))
    assert "iptables" not in worker_packages(inv, rocky)
    assert {"iptables", "iptables-services"} <= set(worker_packages(inv, centos))


def test_wanted_packages_do_not_depend_on_what_one_run_selects() -> None:
    """`up --only repo` builds the same repository as `up`: the registry decides."""
    steps = resolve_steps(INV, ["repo"])
    assert [s.name for s in steps] == ["repo"]
    facts = recorded("debian12-master").facts()
    script = build_of(plan(facts)).command
    assert ("WANTED='iptables iptables-persistent jq openmpi-bin openssh-client "
            "python3-mpi4py tcpdump'") in script


def test_a_disabled_step_adds_no_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    class Disabled(type(REGISTRY["firewall"])):  # type: ignore[misc]
        name = "disabled-for-test"

        def enabled(self, inventory: Inventory) -> bool:
            return False

        def worker_packages(self, inventory: Inventory, platform: object) -> tuple[str, ...]:
            return ("never-wanted",)

    monkeypatch.setitem(REGISTRY, "disabled-for-test", Disabled())
    debian = platform_of(recorded("debian12-master").facts())
    assert "never-wanted" not in worker_packages(INV, debian)


# --------------------------------------------------------------------------- master: fresh


def test_fresh_debian_master_installs_nginx_creates_the_key_and_builds_the_repo() -> None:
    result = plan(recorded("debian12-master"))
    described = result.descriptions()
    packages = [c for c in result.changes if isinstance(c, PackagesChange)]
    assert [sorted(p.packages) for p in packages] == [["apt-utils", "gpg", "gpg-agent", "nginx"]]
    nginx = files(result)[render.NGINX_CONF]
    assert nginx.content == golden_text("repo/debian/etc/nginx/nginx.conf")
    assert "create the cluster's repository signing key" in described
    build = build_of(result)
    assert build.description.startswith("build the workers' package repository")
    assert "[ 1 = 1 ]" in build.command  # a new repository starts from fresh package lists
    # nginx is configured and running before the (slow, fallible) download.
    order = [type(c).__name__ + ":" + c.description for c in result.changes]
    assert order.index(next(o for o in order if "enable and start nginx" in o)) < \
        order.index(next(o for o in order if "package repository" in o))
    restart = [c for c in result.changes if isinstance(c, ServiceChange)
               and c.action == "restart"]
    assert restart and restart[0].when_changed == (render.NGINX_CONF,)
    assert result.guard is None  # nothing here can cut anyone off


@pytest.mark.parametrize(("name", "tools", "prerequisite"), [
    ("rocky9-master", ("createrepo_c", "dnf-plugins-core", "nginx"), ("epel-release",)),
    ("centos7-worker", ("createrepo", "nginx", "yum-utils"), ("epel-release",)),
])
def test_rhel_master_plan_shows_the_full_repo_build(name: str, tools: tuple[str, ...],
                                                     prerequisite: tuple[str, ...]) -> None:
    """The plan for a Rocky 9 and a CentOS 7 fact set (as the master): EPEL, nginx, the
    guide's tools, nginx.conf, the download of the closure and the index, nginx running."""
    result = plan(recorded(name))
    packages = [tuple(sorted(c.packages)) for c in result.changes
                if isinstance(c, PackagesChange)]
    assert packages == [prerequisite, tools]
    assert files(result)[render.NGINX_CONF].content == golden_text(
        "repo/rhel/etc/nginx/nginx.conf")
    build = build_of(result)
    el7 = name.startswith("centos7")
    assert ("repotrack" in build.command) == el7
    assert ("dnf -q download --resolve --alldeps" in build.command) != el7
    assert ("createrepo -q --update" if el7 else "createrepo_c -q --update") in build.command
    wanted = ("iptables iptables-services jq mpi4py-openmpi munge openmpi openssh-clients"
              if el7 else "iptables-nft iptables-services jq munge openmpi openssh-clients "
              "python3-mpi4py-openmpi")
    assert f"WANTED='{wanted} tcpdump torque-client torque-mom'" in build.command
    # RHEL packages carry the vendor's signatures: no cluster key on this family.
    assert not [c for c in commands(result) if "signing key" in c.description]
    assert "enable and start nginx.service" in result.descriptions()
    text = result.diff()
    assert "+        listen 192.168.10.1:80;" in text.splitlines()


# --------------------------------------------------------------------------- master: incremental


DEBIAN_MASTER = repo_converged("debian12-master")


def test_converged_master_plans_nothing_even_when_asked_for_by_name_right_after_a_refresh(
) -> None:
    assert plan(DEBIAN_MASTER).changes == ()
    state = parse_repo_state(DEBIAN_MASTER.sections["x-repo-state"])
    assert state.refreshed_ago is not None and state.refreshed_ago < REFRESH_AFTER
    assert plan(DEBIAN_MASTER, requested=frozenset({"repo"})).changes == ()


def test_a_longer_list_updates_the_repository_on_fresh_lists_showing_what_is_added() -> None:
    inv = inventory(repo={"packages": ["jq", "tree"]}, monitor={"tools": ["tcpdump"]})
    result = plan(DEBIAN_MASTER, inv=inv)
    build = build_of(result)
    assert build.description == ("update the workers' package repository: add tree")
    assert "+tree" in build.diff.splitlines() and " tcpdump" in build.diff.splitlines()
    assert ("WANTED='iptables iptables-persistent jq openmpi-bin openssh-client "
            "python3-mpi4py tcpdump tree'") in build.command
    assert "[ 1 = 1 ]" in build.command
    assert result.descriptions() == [build.description]  # nothing else changes


def test_a_shorter_list_drops_packages() -> None:
    inv = inventory(repo={"packages": []}, monitor={"tools": ["tcpdump"]})
    assert build_of(plan(DEBIAN_MASTER, inv=inv)).description == (
        "update the workers' package repository: drop jq")


def test_newer_versions_in_the_masters_lists_are_picked_up_without_a_refresh() -> None:
    state = DEBIAN_MASTER.sections["x-repo-state"].replace(
        "candidate libssl3 3.0.22-1~deb12u2", "candidate libssl3 3.0.23-1~deb12u1")
    build = build_of(plan(DEBIAN_MASTER.but(x_repo_state=state)))
    assert build.description == ("update the workers' package repository: newer versions in "
                                 "the master's package lists: libssl3 3.0.22-1~deb12u2 -> "
                                 "3.0.23-1~deb12u1")
    assert "[ 0 = 1 ]" in build.command  # the master already knows them: no apt-get update


def test_missing_files_are_restored() -> None:
    state = DEBIAN_MASTER.sections["x-repo-state"] + "missing jq_1.6-2.1+deb12u3_amd64.deb\n"
    build = build_of(plan(DEBIAN_MASTER.but(x_repo_state=state)))
    assert "1 files missing (jq_1.6-2.1+deb12u3_amd64.deb)" in build.description
    assert "[ 0 = 1 ]" in build.command


def test_up_only_repo_refreshes_the_lists_once_they_are_older_than_the_window() -> None:
    old = re.sub(r"refreshed \d+", f"refreshed {REFRESH_AFTER + 1}",
                 DEBIAN_MASTER.sections["x-repo-state"])
    stale = DEBIAN_MASTER.but(x_repo_state=old)
    assert plan(stale).changes == ()  # a plain `up` never goes to the network for nothing
    build = build_of(plan(stale, requested=frozenset({"repo", "monitor"})))
    assert "refresh the master's package lists from upstream" in build.description
    assert "[ 1 = 1 ]" in build.command
    # never refreshed by homeclust (no stamp) counts as old
    never = DEBIAN_MASTER.but(x_repo_state=old.replace(f"refreshed {REFRESH_AFTER + 1}\n", ""))
    assert "refresh" in build_of(plan(never, requested=frozenset({"repo"}))).description


def without_signing_key(master: FactsBuilder) -> FactsBuilder:
    return master.but(x_repo_state=master.sections["x-repo-state"].replace(
        "signing-key present\n", ""))


def test_a_lost_key_is_made_again_and_the_index_signed_with_it() -> None:
    lost = without_signing_key(DEBIAN_MASTER).but(files={render.PUBLIC_KEY: None})
    result = plan(lost)
    assert result.descriptions()[0] == "create the cluster's repository signing key"
    assert "sign the index with the new key" in build_of(result).description
    only_public = plan(DEBIAN_MASTER.but(files={render.PUBLIC_KEY: None}))
    assert only_public.descriptions() == [
        "export the public half of the cluster's repository signing key"]


def test_nginx_serving_another_config_is_restarted() -> None:
    wrong = DEBIAN_MASTER.but(x_http_listeners="0.0.0.0:80\n[::]:80\n")
    assert plan(wrong).descriptions() == ["restart nginx.service"]


def test_edited_nginx_conf_is_rewritten_and_nginx_restarted() -> None:
    edited = DEBIAN_MASTER.but(files={render.NGINX_CONF: "server { listen 80; }\n"})
    assert plan(edited).descriptions() == [
        f"update {render.NGINX_CONF}", f"restart nginx.service (if {render.NGINX_CONF} changed)"]


def test_the_signing_key_never_leaves_the_master_only_its_presence_is_reported(
        tmp_path: Path) -> None:
    """The private key is used on the master only; the facts say whether it is there and
    never carry it (it used to be read back to the admin as a secret on every run)."""
    query = STEP.fact_query(INV)
    assert render.SIGNING_KEY not in query.paths | query.secret_paths
    assert not any(render.SIGNING_KEY in p for _, p in query.account_paths)
    assert DEBIAN_MASTER.facts().get(REPO_STATE).signing_key
    assert not without_signing_key(DEBIAN_MASTER).facts().get(REPO_STATE).signing_key
    # The real command, on a key of its own: "present", and not a byte of the key.
    key = tmp_path / "signing-key.asc"
    key.write_text("-----BEGIN PGP PRIVATE KEY BLOCK-----\nsecretstuff\n")
    command = render.REPO_STATE_COMMAND.replace(render.SIGNING_KEY, str(key)).replace(
        render.MANIFEST, str(tmp_path / "no-manifest"))
    done = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, check=True,
                          timeout=10)
    assert done.stdout == "signing-key present\n"
    assert parse_repo_state(done.stdout).signing_key
    key.unlink()
    assert subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True,
                          timeout=10).stdout == ""
    # The plan never writes it (the host makes it), and no diff can contain it.
    lost = plan(DEBIAN_MASTER.but(files={render.PUBLIC_KEY: None}))
    assert "PRIVATE" not in lost.diff()
    assert render.SIGNING_KEY not in files(lost)


def test_rhel_master_converged_and_its_manifest() -> None:
    master = repo_converged("rocky9-master")
    assert plan(master).changes == ()
    manifest = parse_manifest(fixture_text("repo/rocky9-manifest"))
    assert manifest is not None and manifest.wanted == (
        "iptables-nft", "iptables-services", "jq", "munge", "openmpi", "openssh-clients",
        "python3-mpi4py-openmpi", "tcpdump", "torque-client", "torque-mom")
    assert manifest.versions()["tcpdump"] == {"14:4.99.0-7.el9"}
    newer = master.but(x_repo_state=master.sections["x-repo-state"].replace(
        "candidate jq 0:1.6-16.el9", "candidate jq 0:1.6-17.el9"))
    build = build_of(plan(newer))
    assert "jq 0:1.6-16.el9 -> 0:1.6-17.el9" in build.description
    assert "dnf -q download" in build.command


def test_parsers_ignore_what_they_do_not_know() -> None:
    assert parse_manifest(None) is None
    manifest = parse_manifest("# c\nwanted a b\npkg a 1 all a_1_all.deb\npkg broken\nx y\n")
    assert manifest is not None and manifest.wanted == ("a", "b")
    assert [p.name for p in manifest.packages] == ["a"]
    state = parse_repo_state("refreshed 12\ncandidate a 1\ncandidate b (none)\nmissing f\n"
                             "junk\n")
    assert state.refreshed_ago == 12 and dict(state.candidates) == {"a": "1"}
    assert state.missing == ("f",)


# --------------------------------------------------------------------------- workers


DEBIAN_WORKER_FRESH = recorded("debian12-worker").but(files={
    "/etc/apt/sources.list": "deb http://deb.debian.org/debian bookworm main\n"
                             "deb http://deb.debian.org/debian-security bookworm-security main\n",
    "/etc/apt/sources.list.d/backports.list": "deb http://deb.debian.org/debian "
                                              "bookworm-backports main\n",
    "/etc/apt/sources.list.d/extra.sources": "Types: deb\nURIs: http://example.org/\n",
    "/etc/apt/sources.list.d/old.list.save": "deb http://example.org/ old main\n",
})


def test_fresh_debian_worker_switches_to_the_master_keeping_its_sources_aside() -> None:
    result = plan(DEBIAN_WORKER_FRESH, "worker1", master=DEBIAN_MASTER)
    master_key = DEBIAN_MASTER.file_text(render.PUBLIC_KEY)
    written = files(result)
    assert written[render.WORKER_KEYRING].content == master_key
    assert written[render.APT_SOURCES].content == golden_text(
        "repo/debian/etc/apt/sources.list.d/homeclust.sources")
    aside = [c for c in commands(result) if "aside" in c.description]
    assert len(aside) == 1
    moved = ["/etc/apt/sources.list", "/etc/apt/sources.list.d/backports.list",
             "/etc/apt/sources.list.d/extra.sources"]
    assert aside[0].command == render.keep_aside_command(moved, "debian")
    assert "old.list.save" not in aside[0].command  # apt ignores it; so do we
    # The stub is written after the originals are moved away, never before.
    order = [getattr(c, "path", None) or c.description for c in result.changes]
    assert order.index(aside[0].description) < order.index(render.APT_SOURCES_LIST)
    assert written[render.APT_SOURCES_LIST].content == render.APT_SOURCES_LIST_STUB
    assert result.changes[-1].description.startswith("read the package lists from the master")
    assert result.guard is None


def test_worker_with_only_comments_in_sources_list_keeps_nothing_aside() -> None:
    worker = recorded("debian12-worker").but(files={"/etc/apt/sources.list": "# nothing\n"})
    result = plan(worker, "worker1", master=DEBIAN_MASTER)
    assert not [c for c in commands(result) if "aside" in c.description]


def test_converged_worker_refreshes_its_lists_when_the_masters_repository_changed() -> None:
    worker = repo_converged("debian12-worker")
    assert plan(worker, "worker1", master=DEBIAN_MASTER).changes == ()
    changed_master = DEBIAN_MASTER.but(files={
        "/srv/homeclust-repo/debian/InRelease": "-----BEGIN PGP SIGNED MESSAGE-----\nnew\n"})
    assert plan(worker, "worker1", master=changed_master).descriptions() == [
        "read the package lists from the master (apt-get update: the master's repository "
        "changed)"]


def test_a_new_cluster_key_reaches_the_workers() -> None:
    worker = repo_converged("debian12-worker")
    rekeyed = DEBIAN_MASTER.but(files={render.PUBLIC_KEY: "-----BEGIN PGP PUBLIC KEY BLOCK---"
                                                          "--\n\nnew\n"})
    result = plan(worker, "worker1", master=rekeyed)
    assert files(result)[render.WORKER_KEYRING].content.endswith("new\n")  # type: ignore[union-attr]
    assert result.descriptions()[-1].startswith("read the package lists")


def test_worker_before_the_master_has_a_repository_plans_a_change_that_fails_saying_why(
) -> None:
    fresh_master = recorded("debian12-master")
    result = plan(DEBIAN_WORKER_FRESH, "worker1", master=fresh_master)
    (only,) = result.changes
    assert isinstance(only, CommandChange)
    assert "once the master's repository exists" in only.description
    assert only.command.endswith("exit 1")
    assert render.MANIFEST in only.command


def test_worker_without_master_facts_or_of_another_release_is_refused() -> None:
    with pytest.raises(StepError, match="master's facts"):
        plan(DEBIAN_WORKER_FRESH, "worker1")
    with pytest.raises(StepError, match="runs centos7, but the master's repository holds "
                                        "rocky9 packages"):
        plan(recorded("centos7-worker"), "worker2", master=repo_converged("rocky9-master"))


def test_rhel_worker_gets_the_repo_with_vendor_and_epel_keys_and_its_repos_aside() -> None:
    worker = recorded("centos7-worker").but(files={
        "/etc/yum.repos.d/CentOS-Base.repo": "[base]\nname=CentOS-$releasever - Base\n"
                                             "gpgcheck=1\n",
        "/etc/yum.repos.d/epel.repo": "[epel]\n",
    })
    master = repo_master_for("centos7-worker")
    result = plan(worker, "worker2", master=master)
    written = files(result)
    assert written[render.YUM_REPO].content == golden_text(
        "repo/rhel/centos7/etc/yum.repos.d/homeclust.repo")
    assert written["/etc/pki/rpm-gpg/RPM-GPG-KEY-EPEL-7"].content == fixture_text(
        "repo/RPM-GPG-KEY-EPEL-7")
    (aside,) = [c for c in commands(result) if "aside" in c.description]
    assert aside.command == render.keep_aside_command(
        ["/etc/yum.repos.d/CentOS-Base.repo", "/etc/yum.repos.d/epel.repo"], "rhel")
    assert result.descriptions()[-1] == "read the master's repository (yum makecache)"
    assert plan(repo_converged("centos7-worker"), "worker2", master=master).changes == ()


def test_rhel_worker_of_an_unknown_vendor_is_refused() -> None:
    release = recorded("rocky9-master").sections["os-release"].replace(
        'ID="rocky"', 'ID="navylinux"')
    worker = recorded("rocky9-master").but(os_release=release)
    master = repo_converged("rocky9-master").but(os_release=release)
    with pytest.raises(StepError, match="which key signs navylinux9's packages"):
        plan(worker, "worker1", master=master)


# --------------------------------------------------------------------------- check


def posture(master: FactsBuilder, inv: Inventory = INV) -> tuple[str, str]:
    (item,) = STEP.posture(PlanContext(inv, inv.master_node, master.facts()))
    return item.status, item.detail


def test_posture_repository_only_on_the_private_side() -> None:
    assert posture(DEBIAN_MASTER) == (
        "pass", "nginx listens on 192.168.10.1:80 only; port 80 closed on the public side")
    status, detail = posture(DEBIAN_MASTER.but(x_http_listeners="0.0.0.0:80\n"))
    assert status == "fail" and "nothing listens on 192.168.10.1:80" in detail
    assert "also listens on 0.0.0.0:80" in detail
    inv = inventory(firewall={"public_tcp_ports": [22, 80]}, **CONVERGED_TABLES)
    status, detail = posture(DEBIAN_MASTER, inv)
    assert status == "fail" and "public_tcp_ports opens port 80" in detail


def test_every_worker_probes_the_signature_and_the_master_does_not() -> None:
    ctx = PlanContext(INV, INV.node("worker1"), repo_converged("debian12-worker").facts())
    (probe,) = STEP.probes(ctx)
    assert "APT::Update::Error-Mode=any" in probe.script
    assert "Dir::State::Lists=\"$t/lists\"" in probe.script  # the worker's lists stay as they are
    ok = probe.evaluate(0, "Get:1 ...\nverified http://192.168.10.1/debian/InRelease: 61 "
                           "packages\n")
    assert (ok.status, ok.detail) == ("pass",
                                      "verified http://192.168.10.1/debian/InRelease: 61 packages")
    bad = probe.evaluate(100, "Err:1 http://192.168.10.1/debian ./ InRelease\n"
                              "W: GPG error: ... NO_PUBKEY 5681AB19309264CC\n"
                              "E: The repository 'http://192.168.10.1/debian ./ InRelease' is "
                              "not signed.\n")
    assert bad.status == "fail" and "is not signed" in bad.detail
    master_ctx = PlanContext(INV, INV.master_node, DEBIAN_MASTER.facts())
    assert STEP.probes(master_ctx) == []
    rhel = PlanContext(INV, INV.node("worker2"), repo_converged("centos7-worker").facts())
    (rhel_probe,) = STEP.probes(rhel)
    assert "yum -q --disablerepo='*' --enablerepo=homeclust" in rhel_probe.script


def test_the_fact_query_reads_every_file_the_step_writes_and_nothing_broad() -> None:
    query = STEP.fact_query(INV)
    assert render.apt_list_path(INV) in query.paths
    assert query.packages >= {"nginx", "apt-utils", "gpg", "createrepo_c", "epel-release"}
    # The step-specific facts run everywhere, but act only where the manifest is.
    assert query.extra and repo_monitor_query().extra
    assert 'm=/var/lib/homeclust/repo/manifest\n[ -f "$m" ] || exit 0' in \
        render.REPO_STATE_COMMAND


def test_record_helper_keeps_the_secret_marker() -> None:
    assert FileRecord(b"x", secret=True).secret


def test_a_new_repository_is_built_on_fresh_lists_and_says_so_once() -> None:
    build = build_of(plan(recorded("debian12-master"), requested=frozenset({"repo"})))
    assert build.description == ("build the workers' package repository: 7 packages and "
                                 "their dependencies")
    assert "[ 1 = 1 ]" in build.command
