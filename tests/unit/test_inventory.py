"""Inventory validation: every bad input names file, table and key; nothing is contacted."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from homeclust.cli import cli
from homeclust.errors import InventoryError, UsageError
from homeclust.inventory import load_inventory, parse_inventory
from homeclust.steps import resolve_steps

REPO = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "cluster": {"name": "lab", "private_network": "192.168.10.0/24", "dns": ["8.8.8.8"]},
    "master": {"name": "master", "address": "master.example.org",
               "private_address": "192.168.10.1"},
    "workers": [
        {"name": "worker1", "private_address": "192.168.10.2"},
        {"name": "worker2", "private_address": "192.168.10.3"},
    ],
}


def inv(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        target = data
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target.setdefault(part, {})
        if value is _DELETE:
            del target[key]
        else:
            target[key] = value
    return data


_DELETE = object()


def test_repo_inventory_is_the_guides_cluster() -> None:
    inventory = load_inventory(REPO / "inventory.toml")
    assert [n.name for n in inventory.nodes] == ["master", "worker1", "worker2", "worker3"]
    assert [str(n.private_address) for n in inventory.nodes] == [
        "192.168.10.1", "192.168.10.2", "192.168.10.3", "192.168.10.4"]
    assert inventory.master.dhcp_client_id == "cluster-master"
    assert all(n.slots == 128 for n in inventory.nodes)


def test_schedulers_know_whether_slots_were_written_or_defaulted() -> None:
    inventory = parse_inventory(inv(master__slots=16, workers__1__slots=1), Path("c.toml"))
    assert [(n.slots, n.slots_given) for n in inventory.nodes] == [
        (16, True), (1, False), (1, True)]


def test_defaults_fill_everything_but_names_and_addresses() -> None:
    inventory = parse_inventory(inv(), Path("/tmp/x/inv.toml"))
    assert inventory.ssh.user == "root" and inventory.ssh.port == 22
    assert inventory.master.public_interface == "eth0"
    assert inventory.master.private_interface == "eth1"
    assert inventory.master.public_boot == "dhcp"
    assert inventory.master.dhcp_client_id == "master"
    assert inventory.workers[0].interface == "eth0"
    assert inventory.nat.conntrack_max == 131072
    assert [str(n) for n in inventory.firewall.ssh_from] == ["0.0.0.0/0"]
    assert inventory.firewall.public_tcp_ports == (22,)
    assert inventory.scheduler.kind == "torque"
    assert inventory.ssh.known_hosts.name == "known_hosts"
    assert "lab" in str(inventory.ssh.known_hosts)  # pinned per cluster


def test_relative_key_resolves_next_to_the_inventory(tmp_path: Path) -> None:
    data = inv(ssh__key="keys/id", ssh__known_hosts="kh")
    inventory = parse_inventory(data, tmp_path / "inventory.toml")
    assert inventory.ssh.key == tmp_path / "keys" / "id"
    assert inventory.ssh.known_hosts == tmp_path / "kh"


@pytest.mark.parametrize(
    ("changes", "table", "key", "text"),
    [
        ({"master__privat_address": "192.168.10.9"}, "master", "privat_address", "unknown key"),
        ({"clustr": {}}, "clustr", None, "unknown table"),
        ({"master__address": _DELETE}, "master", "address", "is required"),
        ({"workers__1__private_address": _DELETE}, "workers #2 (worker2)", "private_address",
         "is required"),
        ({"workers__1__name": "worker1"}, "workers #2 (worker1)", "name", "duplicate host name"),
        ({"workers__1__name": "master"}, "workers #2 (master)", "name", "duplicate host name"),
        ({"workers__1__private_address": "192.168.10.2"}, "workers #2 (worker2)",
         "private_address", "duplicate address"),
        ({"workers__0__private_address": "192.168.10.1"}, "workers #1 (worker1)",
         "private_address", "gateway"),
        ({"workers__0__private_address": "10.0.0.2"}, "workers #1 (worker1)", "private_address",
         "outside private_network"),
        ({"master__private_address": "192.168.11.1"}, "master", "private_address",
         "outside private_network"),
        ({"master__private_address": "192.168.10.0"}, "master", "private_address",
         "network address"),
        ({"master__private_address": "192.168.10.255"}, "master", "private_address",
         "broadcast address"),
        ({"cluster__private_network": "192.168.10.1/24"}, "cluster", "private_network",
         "host bits"),
        ({"cluster__private_network": "192.168.10.0/33"}, "cluster", "private_network",
         "CIDR"),
        ({"cluster__private_network": "banana"}, "cluster", "private_network", "CIDR"),
        ({"cluster__dns": ["8.8.8"]}, "cluster", "dns", "IPv4 address"),
        ({"master__slots": "many"}, "master", "slots", "integer"),
        ({"master__slots": True}, "master", "slots", "integer"),
        ({"master__name": "Master_1"}, "master", "name", "host name"),
        ({"master__public_interface": "eth1"}, "master", "private_interface", "same as"),
        ({"master__public_boot": "static"}, "master", "public_address", "required"),
        ({"master__public_boot": "static", "master__public_address": "10.0.0.5/24",
          "master__public_gateway": "10.0.1.1"}, "master", "public_gateway", "public subnet"),
        ({"master__public_boot": "static", "master__public_address": "192.168.10.5/16",
          "master__public_gateway": "192.168.0.1"}, "master", "public_address", "overlaps"),
        ({"master__public_address": "10.0.0.5/24"}, "master", "public_address",
         "only used with"),
        ({"firewall": {"ssh_from": []}}, "firewall", "ssh_from", "empty"),
        ({"firewall": {"ssh_from": ["10.0.0.0/33"]}}, "firewall", "ssh_from", "CIDR"),
        ({"firewall": {"public_tcp_ports": [70000]}}, "firewall", "public_tcp_ports", "1-65535"),
        ({"scheduler": {"kind": "pbspro"}}, "scheduler", "kind", "one of"),
        ({"monitor": {"fail2ban": {"bantim": 5}}}, "monitor.fail2ban", "bantim", "unknown key"),
        ({"repo": {"packages": ["jq; rm -rf /"]}}, "repo", "packages", "not a package name"),
        ({"repo": {"packages": ["jq=1.6"]}}, "repo", "packages", "not a package name"),
        ({"repo": {"packages": ["./local.deb"]}}, "repo", "packages", "not a package name"),
        ({"repo": {"packages": "jq"}}, "repo", "packages", "a list"),
        ({"monitor": {"tools": ["-tcpdump"]}}, "monitor", "tools", "not a package name"),
        ({"check": {"egress_url": "https://x"}}, "check", "egress_url", "http://"),
        ({"workers__0__interface": "this-name-is-too-long"}, "workers #1 (worker1)", "interface",
         "interface name"),
    ],
)
def test_invalid_inventory_names_table_and_key(changes: dict[str, Any], table: str,
                                               key: str | None, text: str) -> None:
    with pytest.raises(InventoryError) as info:
        parse_inventory(inv(**changes), Path("cluster.toml"))
    message = str(info.value)
    assert message.startswith("cluster.toml: ")
    assert f"[{table}]" in message
    if key:
        assert f"] {key}:" in message
    assert text in message
    assert info.value.exit_code == 2


def test_unknown_key_suggests_the_close_one() -> None:
    with pytest.raises(InventoryError) as info:
        parse_inventory(inv(master__privat_address="192.168.10.1"), Path("c.toml"))
    assert "did you mean 'private_address'" in str(info.value)


def test_toml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[master\nname=1\n")
    with pytest.raises(InventoryError, match="not valid TOML"):
        load_inventory(bad)
    with pytest.raises(InventoryError, match="file not found"):
        load_inventory(tmp_path / "nope.toml")


def test_unknown_step_and_unknown_host_are_usage_errors() -> None:
    inventory = parse_inventory(inv(), Path("c.toml"))
    with pytest.raises(UsageError, match="unknown step 'firewal'") as info:
        resolve_steps(inventory, ["firewal"])
    assert "did you mean 'firewall'" in str(info.value)
    with pytest.raises(UsageError, match="--skip: unknown step"):
        resolve_steps(inventory, None, ["bogus"])
    with pytest.raises(UsageError, match="unknown host 'worker9'"):
        inventory.select(["worker9"])


def test_package_lists_keep_order_and_drop_duplicates() -> None:
    inventory = parse_inventory(inv(repo={"packages": ["jq", "python3-numpy", "jq", "g++"]},
                                    monitor={"tools": ["tcpdump", "NetworkManager_x"]}),
                                Path("c.toml"))
    assert inventory.repo.packages == ("jq", "python3-numpy", "g++")
    assert inventory.monitor.tools == ("tcpdump", "NetworkManager_x")


def test_steps_follow_dependencies_not_typing_order() -> None:
    inventory = parse_inventory(inv(), Path("c.toml"))
    names = [s.name for s in resolve_steps(inventory, ["firewall,network", "nat"])]
    assert names == ["network", "firewall", "nat"]  # nat never forwards before the firewall
    assert [s.name for s in resolve_steps(inventory, None, ["nat"])] == [
        "network", "firewall", "repo", "ssh-keys", "mpi", "torque", "monitor"]
    # monitor installs the workers' tools from the master's repository
    assert [s.name for s in resolve_steps(inventory, ["monitor,repo,firewall"])] == [
        "firewall", "repo", "monitor"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inventory.toml"
    path.write_text(text)
    return path


GOOD = """
[master]
name = "master"
address = "127.0.0.1"
private_address = "192.168.10.1"
[[workers]]
name = "worker1"
private_address = "192.168.10.2"
"""


def test_cli_inventory_prints_resolved_inventory(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["-i", str(write(tmp_path, GOOD)), "inventory"])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "worker1" in result.output
    result = CliRunner().invoke(cli, ["-i", str(write(tmp_path, GOOD)), "inventory", "--json"])
    assert '"dhcp_client_id": "master"' in result.output


@pytest.mark.parametrize("command", [["inventory"], ["up"], ["plan"], ["check"], ["facts"]])
def test_cli_bad_inventory_exits_2_before_connecting(tmp_path: Path, command: list[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def no_connect(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not connect")

    monkeypatch.setattr("homeclust.api.SshConnector", no_connect)
    path = write(tmp_path, GOOD.replace('"192.168.10.2"', '"10.1.1.2"'))
    from homeclust.cli import main

    with pytest.raises(SystemExit) as info:
        main(["-i", str(path), *command])
    assert info.value.code == 2


@pytest.mark.parametrize("args", [["up", "--only", "dns"], ["plan", "--host", "worker7"],
                                  ["up", "--skip", "x"], ["check", "--only", "bogus"]])
def test_cli_usage_errors_exit_2(tmp_path: Path, args: list[str],
                                 monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("homeclust.api.SshConnector", lambda *a, **k: pytest.fail("connected"))
    from homeclust.cli import main

    with pytest.raises(SystemExit) as info:
        main(["-i", str(write(tmp_path, GOOD)), *args])
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


# --------------------------------------------------------------------------- cluster users


def test_users_get_default_ids_from_2000_and_a_bash_shell() -> None:
    inventory = parse_inventory(inv(users=[{"name": "alice"}, {"name": "bob", "uid": 3001},
                                           {"name": "carol", "shell": "/bin/zsh"}]),
                                Path("c.toml"))
    assert [(u.name, u.uid, u.gid, u.shell) for u in inventory.users] == [
        ("alice", 2000, 2000, "/bin/bash"), ("bob", 3001, 3001, "/bin/bash"),
        ("carol", 2002, 2002, "/bin/zsh")]
    assert parse_inventory(inv(), Path("c.toml")).users == ()


@pytest.mark.parametrize(("users", "key", "message"), [
    ([{"name": "Alice"}], "name", "not a valid user name"),
    ([{"name": "al ice"}], "name", "not a valid user name"),
    ([{"name": "root"}], "name", "system account"),
    ([{"name": "munge"}], "name", "system account"),
    ([{"name": "a"}, {"name": "a"}], "name", "duplicate user name"),
    ([{"name": "a", "uid": 2100}, {"name": "b", "uid": 2100}], "uid", "duplicate uid 2100"),
    ([{"name": "a", "uid": 50}], "uid", "at least 1000"),
    ([{"name": "a", "shell": "bash; reboot"}], "shell", "absolute path"),
    ([{"name": "a", "home": "/x"}], "home", "unknown key"),
])
def test_bad_users_are_refused_naming_the_key(users: list[dict[str, object]], key: str,
                                              message: str) -> None:
    with pytest.raises(InventoryError) as error:
        parse_inventory(inv(users=users), Path("c.toml"))
    assert f"] {key}: " in error.value.message and message in error.value.message
