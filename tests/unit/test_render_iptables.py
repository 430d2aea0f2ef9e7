"""iptables renderers: golden tables, the persistent rules file, drift comparison.

Golden files live in ``tests/golden/iptables/`` and are compared exactly;
regenerate them only with ``HOMECLUST_UPDATE_GOLDEN=1`` and review the diff.
Besides the golden comparison every table is checked against independent
expectations taken from the guide and DESIGN.md (default deny, SSH only from
``ssh_from``, forwarding private -> public only, nothing the guide opens "for
package downloads").
"""

from __future__ import annotations

import shlex
import subprocess

import pytest

from homeclust.facts import normalize_iptables, parse_iptables_save
from homeclust.inventory import Inventory
from homeclust.render.iptables import (
    chain_policy,
    chain_rules,
    comparable,
    render_filter6_table,
    render_filter_table,
    render_nat_table,
    replace_table,
    restore_command,
    split_rules_file,
)
from tests.unit.factsbuilder import (
    check_golden,
    fixture_text,
    inventory,
    lab_inventory,
    lab_text,
    recorded,
)

INV = inventory()
CASES: dict[str, Inventory] = {
    "default": INV,
    "two-ssh-from": inventory(firewall={"ssh_from": ["10.77.0.0/24", "192.0.2.0/25"]}),
    "port-443": inventory(firewall={"public_tcp_ports": [22, 443]}),
    "no-log": inventory(firewall={"log_dropped": False}),
}


def master_filter(inv: Inventory) -> str:
    return render_filter_table(inv, inv.master_node)


# --------------------------------------------------------------------------- golden


@pytest.mark.parametrize("case", sorted(CASES))
def test_master_filter_matches_golden(case: str) -> None:
    check_golden(f"iptables/filter-master-{case}.rules", master_filter(CASES[case]))


def test_worker_filter_matches_golden() -> None:
    check_golden("iptables/filter-worker.rules", render_filter_table(INV, INV.node("worker1")))


def test_nat_matches_golden() -> None:
    check_golden("iptables/nat.rules", render_nat_table(INV))


def test_rules_file_from_nothing_matches_golden() -> None:
    rules = replace_table(replace_table(None, "filter", master_filter(INV)), "nat",
                          render_nat_table(INV))
    check_golden("iptables/rules-master.v4", rules)


def test_worker_rules_file_from_nothing_matches_golden() -> None:
    rules = replace_table(None, "filter", render_filter_table(INV, INV.node("worker1")))
    check_golden("iptables/rules-worker.v4", rules)
    assert "*nat" not in rules


# --------------------------------------------------------------------------- policy


def test_master_filter_is_default_deny_with_ssh_after_established() -> None:
    table = master_filter(INV)
    assert chain_policy(table, "INPUT") == "DROP"
    assert chain_policy(table, "FORWARD") == "DROP"
    assert chain_policy(table, "OUTPUT") == "ACCEPT"
    rules = chain_rules(table, "INPUT")
    assert rules[0] == "-A INPUT -i lo -j ACCEPT"
    assert rules[1] == "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    assert "-A INPUT -s 192.168.10.0/24 -i eth1 -j ACCEPT" in rules
    assert "-A INPUT -i eth0 -p tcp -m tcp --dport 22 -j ACCEPT" in rules
    # The guide opens 80 and 443 on the public side "for package downloads": those are
    # outgoing connections whose replies are ESTABLISHED; nothing else may be open.
    assert not any("--dport 80" in r or "--dport 443" in r for r in rules)
    assert rules[-1].startswith("-A INPUT -m limit") and "-j LOG" in rules[-1]


def test_master_forwards_only_private_to_public() -> None:
    forward = chain_rules(master_filter(INV), "FORWARD")
    accepts = [r for r in forward if r.endswith("-j ACCEPT")]
    assert accepts == [
        "-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A FORWARD -s 192.168.10.0/24 -i eth1 -o eth0 -j ACCEPT",
    ]


def test_ssh_from_networks_each_get_their_own_accept() -> None:
    rules = chain_rules(master_filter(CASES["two-ssh-from"]), "INPUT")
    ssh = [r for r in rules if "--dport 22" in r]
    assert ssh == [
        "-A INPUT -s 10.77.0.0/24 -i eth0 -p tcp -m tcp --dport 22 -j ACCEPT",
        "-A INPUT -s 192.0.2.0/25 -i eth0 -p tcp -m tcp --dport 22 -j ACCEPT",
    ]


def test_ssh_from_restricts_only_ssh_not_other_public_ports() -> None:
    inv = inventory(firewall={"ssh_from": ["10.77.0.0/24"], "public_tcp_ports": [22, 443]})
    rules = chain_rules(master_filter(inv), "INPUT")
    assert "-A INPUT -i eth0 -p tcp -m tcp --dport 443 -j ACCEPT" in rules
    assert "-A INPUT -s 10.77.0.0/24 -i eth0 -p tcp -m tcp --dport 22 -j ACCEPT" in rules


def test_ssh_port_follows_the_inventory() -> None:
    inv = inventory(ssh={"port": 2222}, firewall={"public_tcp_ports": [2222]})
    rules = chain_rules(master_filter(inv), "INPUT")
    assert "-A INPUT -i eth0 -p tcp -m tcp --dport 2222 -j ACCEPT" in rules
    assert not any("--dport 22 " in r for r in rules)


def test_no_log_rules_when_log_dropped_is_false() -> None:
    table = master_filter(CASES["no-log"])
    assert "LOG" not in table
    assert "LOG" not in render_filter_table(CASES["no-log"], INV.node("worker1"))


def test_worker_filter_accepts_only_loopback_established_and_the_private_network() -> None:
    table = render_filter_table(INV, INV.node("worker2"))
    assert chain_policy(table, "INPUT") == "DROP"
    assert chain_policy(table, "FORWARD") == "DROP"
    assert chain_rules(table, "INPUT")[:3] == [
        "-A INPUT -i lo -j ACCEPT",
        "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A INPUT -s 192.168.10.0/24 -i eth0 -j ACCEPT",
    ]
    assert chain_rules(table, "FORWARD") == []
    assert "--dport" not in table


def test_nat_masquerades_the_private_network_out_of_the_public_side() -> None:
    table = render_nat_table(INV)
    assert chain_rules(table, "POSTROUTING") == [
        "-A POSTROUTING -s 192.168.10.0/24 -o eth0 -j MASQUERADE"]
    for chain in ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"):
        assert chain_policy(table, chain) == "ACCEPT"


@pytest.mark.parametrize("table", [
    master_filter(CASES[c]) for c in sorted(CASES)] + [
    render_filter_table(INV, INV.node("worker1")), render_nat_table(INV),
    render_filter6_table(INV, INV.master_node), render_filter6_table(INV, INV.node("worker1"))])
def test_rendered_tables_are_already_in_canonical_form(table: str) -> None:
    """Rendered exactly as iptables-save prints: comparing with live state needs no magic."""
    assert normalize_iptables(table) == table


@pytest.mark.parametrize("node", ["master", "worker1"])
def test_rendered_tables_equal_what_the_lab_kernel_prints_back(node: str) -> None:
    """iptables-save / ip6tables-save of a lab node after `up` (Debian 12, nf_tables),
    captured by scripts/capture-fixtures, line for line."""
    inv = lab_inventory()
    live = parse_iptables_save(lab_text(node, "iptables-save.txt"))
    live6 = parse_iptables_save(lab_text(node, "ip6tables-save.txt"))
    assert live["filter"] == normalize_iptables(render_filter_table(inv, inv.node(node)))
    assert live6["filter"] == normalize_iptables(render_filter6_table(inv, inv.node(node)))
    if node == "master":
        assert live["nat"] == normalize_iptables(render_nat_table(inv))
    else:
        assert "nat" not in live or not chain_rules(live["nat"], "POSTROUTING")


def test_rendered_tables_equal_what_rhel_prints_back() -> None:
    """Hand-recorded iptables-save output of the loaded tables (no RHEL lab)."""
    live = parse_iptables_save(fixture_text("iptables/rocky9-master-converged.save"))
    assert comparable(live["filter"]) == comparable(master_filter(INV))
    assert comparable(live["nat"]) == comparable(render_nat_table(INV))
    live = parse_iptables_save(fixture_text("iptables/centos7-worker-converged.save"))
    assert comparable(live["filter"]) == comparable(render_filter_table(INV, INV.node("worker2")))


# --------------------------------------------------------------------------- comparison


def test_comparable_ignores_fail2ban_chains_only() -> None:
    ours = master_filter(INV)
    with_f2b = ours.replace(
        ":OUTPUT ACCEPT [0:0]\n",
        ":OUTPUT ACCEPT [0:0]\n:f2b-sshd - [0:0]\n"
        "-A INPUT -p tcp -m multiport --dports 22 -j f2b-sshd\n",
    ).replace("COMMIT\n", "-A f2b-sshd -s 203.0.113.7/32 -j REJECT --reject-with icmp-port-unreachable\n"
                          "-A f2b-sshd -j RETURN\nCOMMIT\n")
    assert with_f2b != ours
    assert comparable(with_f2b) == comparable(ours)
    extra = ours.replace("COMMIT\n", "-A INPUT -i eth0 -p tcp -m tcp --dport 8080 -j ACCEPT\nCOMMIT\n")
    assert comparable(extra) != comparable(ours)


def test_comparable_of_nothing_is_empty() -> None:
    assert comparable(None) == ""
    assert comparable("") == ""


# --------------------------------------------------------------------------- rules file


def test_replace_table_keeps_the_other_table() -> None:
    with_nat = replace_table(None, "nat", render_nat_table(INV))
    both = replace_table(with_nat, "filter", master_filter(INV))
    assert split_rules_file(both) == [
        (None, "# Managed by homeclust (nat and firewall steps; each owns its table).\n"),
        ("filter", master_filter(INV)),
        ("nat", render_nat_table(INV)),
    ]
    # …and the other way round: the nat step does not undo the firewall step.
    new_nat = render_nat_table(inventory(master={"public_interface": "eth2"}))
    again = replace_table(both, "nat", new_nat)
    assert ("filter", master_filter(INV)) in split_rules_file(again)
    assert ("nat", new_nat) in split_rules_file(again)


def test_replace_table_is_idempotent() -> None:
    once = replace_table(None, "filter", master_filter(INV))
    assert replace_table(once, "filter", master_filter(INV)) == once
    both = replace_table(once, "nat", render_nat_table(INV))
    assert replace_table(both, "nat", render_nat_table(INV)) == both
    assert replace_table(both, "filter", master_filter(INV)) == both


def test_replace_table_takes_over_a_saved_file_and_keeps_foreign_tables_verbatim() -> None:
    saved = (
        "# Generated by iptables-save v1.4.21 on Mon Mar  4 10:15:02 2024\n"
        "*mangle\n"
        ":PREROUTING ACCEPT [120:9000]\n"
        ":INPUT ACCEPT [0:0]\n"
        ":FORWARD ACCEPT [0:0]\n"
        ":OUTPUT ACCEPT [0:0]\n"
        ":POSTROUTING ACCEPT [0:0]\n"
        "-A POSTROUTING -o eth1 -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu\n"
        "COMMIT\n"
        "# Completed on Mon Mar  4 10:15:02 2024\n"
        + recorded("centos7-worker").file_text("/etc/sysconfig/iptables")
    )
    rules = replace_table(saved, "filter", master_filter(INV))
    blocks = dict(split_rules_file(rules))
    assert blocks["filter"] == master_filter(INV)  # the stock REJECT rules are gone
    assert "-A POSTROUTING -o eth1 -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS" in blocks["mangle"]
    assert ":PREROUTING ACCEPT [120:9000]" in blocks["mangle"]
    assert "Generated by" not in rules and "sample configuration" not in rules
    assert [name for name, _ in split_rules_file(rules) if name] == ["filter", "mangle"]
    assert replace_table(rules, "filter", master_filter(INV)) == rules


def test_rules_file_orders_filter_then_nat() -> None:
    rules = replace_table(replace_table(None, "nat", render_nat_table(INV)), "filter",
                          master_filter(INV))
    assert rules.index("*filter") < rules.index("*nat")


def test_restore_command_feeds_the_table_through_a_quoted_heredoc(tmp_path: object) -> None:
    table = master_filter(INV)
    command = restore_command(table)
    assert command.startswith("iptables-restore <<'HOMECLUST_RULES_EOF'\n")
    # Run it with cat in place of iptables-restore: the shell must hand over the
    # table byte for byte ("$" or quotes in a log prefix must not be expanded).
    script = command.replace("iptables-restore", "cat", 1)
    result = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, check=True,
                            timeout=10)
    assert result.stdout == table


# --------------------------------------------------------------------------- IPv6


def accepts6(table: str) -> list[list[str]]:
    return [shlex.split(r) for r in chain_rules(table, "INPUT") if r.endswith("-j ACCEPT")]


def option(words: list[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words else None


@pytest.mark.parametrize("node", ["master", "worker1"])
def test_ipv6_private_interface_accepts_link_local_sources_only(node: str) -> None:
    """IPv4 accepts only the private network on the private interface; IPv6 only fe80::/10
    (the cluster speaks IPv4: IPv6 there is neighbour discovery and nothing else)."""
    table = render_filter6_table(INV, INV.node(node))
    private = INV.node(node).private_interface
    on_private = [w for w in accepts6(table) if option(w, "-i") == private]
    assert on_private == [["-A", "INPUT", "-s", "fe80::/10", "-i", private, "-j", "ACCEPT"]]
    # Nor does any accept for all interfaces take more than replies, typed ICMPv6 or
    # link-local sources.
    for words in accepts6(table):
        if option(words, "-i") is None:
            assert ("RELATED,ESTABLISHED" in words or option(words, "--icmpv6-type")
                    or option(words, "-s") == "fe80::/10"), words


def test_ipv6_accepts_only_the_icmpv6_that_ipv6_needs() -> None:
    table = render_filter6_table(INV, INV.master_node)
    icmp: dict[int, list[str]] = {}
    for words in accepts6(table):
        if option(words, "-p") == "ipv6-icmp":
            typed = option(words, "--icmpv6-type")
            assert typed is not None, f"all of ICMPv6 accepted: {words}"
            icmp[int(typed)] = words
    # Errors from anywhere (path MTU discovery needs packet-too-big).
    for icmp_type in (1, 2, 3, 4):
        assert option(icmp[icmp_type], "-s") is None and "-m" in icmp[icmp_type]
    # Neighbour discovery only with hop limit 255 (sent on the link itself).
    for icmp_type in (133, 134, 135, 136):
        assert option(icmp[icmp_type], "--hl-eq") == "255"
    # MLD only from link-local addresses.
    for icmp_type in (130, 131, 132, 143):
        assert option(icmp[icmp_type], "-s") == "fe80::/10"
    # Echo requests rate-limited.
    assert option(icmp[128], "--limit") is not None
    assert sorted(icmp) == [1, 2, 3, 4, 128, 130, 131, 132, 133, 134, 135, 136, 143]
    # Every other ICMPv6 message is dropped before the private-interface accept could take it.
    rules = chain_rules(table, "INPUT")
    drop = rules.index("-A INPUT -p ipv6-icmp -j DROP")
    private = rules.index("-A INPUT -s fe80::/10 -i eth1 -j ACCEPT")
    assert all(i < drop for i, r in enumerate(rules) if "ipv6-icmp" in r and "ACCEPT" in r)
    assert drop < private


def test_ipv6_ssh_only_from_ipv6_ssh_from_networks() -> None:
    inv = inventory(firewall={"ssh_from": ["10.77.0.0/24", "2001:db8::/32"]})
    table = render_filter6_table(inv, inv.master_node)
    ssh = [r for r in chain_rules(table, "INPUT") if "--dport 22" in r]
    assert ssh == ["-A INPUT -s 2001:db8::/32 -i eth0 -p tcp -m tcp --dport 22 -j ACCEPT"]
    assert not [r for r in chain_rules(render_filter6_table(INV, INV.master_node), "INPUT")
                if "--dport 22" in r]  # ssh_from 0.0.0.0/0 is IPv4 only
    assert chain_policy(table, "INPUT") == "DROP" and chain_policy(table, "FORWARD") == "DROP"
    assert chain_rules(table, "FORWARD") == []
