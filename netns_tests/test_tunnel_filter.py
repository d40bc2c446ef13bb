"""The tunnel ingress filter on a real kernel: nftables round trips, then attacks on a lab.

VXLAN carries no authentication: whoever can send UDP to port 4789 of a node can put
packets into its pods. The agent accepts tunnelled packets only from the underlay
addresses of cluster nodes, and never from pods (Calico's all-vxlan-net rules and
AllowVXLANPacketsFromWorkloads=false). The lab tests inject a crafted VXLAN packet, whose
inner packet is an ICMP echo to a pod from an address nobody uses, and watch that pod's
interface for it:
- from a stranger on node1's subnet: dropped; once the stranger is registered as a Node,
  the same packet arrives (the control: it was the filter that stopped it);
- from a pod on node3, sent to node1: NAT-outgoing gives it node3's address, which node1
  trusts, so only node3's own rule stops it; without node3's table it arrives.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import netaddr
import pytest

from netns_tests import injection
from netns_tests.kernel_fixtures import assert_table_changes_reported, ip, underlay
from netns_tests.lab_fixtures import Lab, poll, running_lab
from netns_tests.vm.ipip_smoke import packet_socket_in
from overlay.kernel import nft as nft_run
from overlay.kernel import nlmsg
from overlay.kernel.batch import in_netns
from overlay.kernel.nat import TABLE as NAT_TABLE
from overlay.kernel.nat import read_nat
from overlay.kernel.nftevents import Transactions, open_events
from overlay.kernel.tunnel_filter import (
    TABLE,
    apply_filter,
    apply_hosts,
    family,
    read_drops,
    read_filter,
    render,
)
from overlay.lab import netns
from overlay.model import VXLAN_PORT, TunnelFilter, TunnelHosts
from overlay.view import vtep_mac

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

A, B, C = (netaddr.IPAddress(a) for a in ("192.0.2.11", "192.0.2.12", "198.51.100.13"))
A6, B6, C6 = (netaddr.IPAddress(a) for a in ("2001:db8::11", "2001:db8::12", "2001:db8:5::13"))


def nft(ns: str, *args: str) -> str:
    return netns.run(["ip", "netns", "exec", ns, "nft", *args])


# --- nftables, in a scratch namespace ----------------------------------------------------


def test_the_filter_reads_back_as_written_and_hosts_change_in_place(node: str) -> None:
    assert read_filter(node) is None
    f = TunnelFilter(frozenset({A, B}), VXLAN_PORT, ipip=True)
    apply_filter(f, node)
    assert read_filter(node) == f
    text = nft(node, "list", "table", "ip", TABLE)
    assert 'iifname "cali*" udp dport 4789 counter packets 0 bytes 0 drop' in text
    assert "udp dport 4789 ip saddr != @hosts ip saddr != @external counter" in text
    assert "ip protocol ipencap ip saddr != @hosts ip saddr != @external counter" in text
    before = nft(node, "-a", "list", "chain", "ip", TABLE, "input")
    apply_hosts(TunnelHosts(add=frozenset({C}), remove=frozenset({A})), node)
    assert read_filter(node) == TunnelFilter(frozenset({B, C}), VXLAN_PORT, ipip=True)
    # In place: the rules (and their handles) are the ones written before.
    after = nft(node, "-a", "list", "chain", "ip", TABLE, "input")
    assert [ln for ln in after.splitlines() if "drop" in ln] == [
        ln for ln in before.splitlines() if "drop" in ln
    ]
    apply_filter(None, node)
    assert read_filter(node) is None
    apply_filter(None, node)  # deleting an absent table is fine


def test_a_vxlan_only_filter_has_no_ipip_rules_and_an_empty_set_drops_all(node: str) -> None:
    f = TunnelFilter(frozenset(), 8472, ipip=False)
    apply_filter(f, node)
    assert read_filter(node) == f
    text = nft(node, "list", "table", "ip", TABLE)
    assert "ipencap" not in text and "udp dport 8472 ip saddr != @hosts" in text
    assert render(f).count("drop") == 3


def test_external_networks_read_back_and_count_as_known(node: str) -> None:
    external = frozenset(netaddr.IPNetwork(n) for n in ("203.0.113.0/24", "198.51.100.7/32"))
    f = TunnelFilter(frozenset({A}), VXLAN_PORT, ipip=False, external=external)
    apply_filter(f, node)
    assert read_filter(node) == f
    text = nft(node, "list", "table", "ip", TABLE)
    assert "udp dport 4789 ip saddr != @hosts ip saddr != @external counter" in text


@pytest.mark.parametrize("version", [4, 6])
def test_a_large_filter_write_is_announced_whole_with_our_pid(node: str, version: int) -> None:
    # What the monitor relies on: every transaction on our table ends with the pid of the
    # nft run that made it, and 10k set elements (one message each) do not overflow.
    sock = in_netns(node, open_events)
    sock.setblocking(False)
    first = netaddr.IPAddress("100.0.0.0" if version == 4 else "2001:db8:100::")
    try:
        hosts = frozenset(first + i for i in range(10_000))
        apply_filter(TunnelFilter(hosts, VXLAN_PORT, False, version=version), node)
        seen = Transactions(frozenset({("ip", TABLE), ("ip6", TABLE)}))
        reported: list[tuple[tuple[str, str], int]] = []
        buf = bytearray(1 << 20)
        while True:
            try:
                n = sock.recv_into(buf)  # an overflow would raise ENOBUFS here
            except BlockingIOError:
                break
            for msg_type, _flags, _seq, payload in nlmsg.iter_messages(bytes(buf[:n])):
                reported += seen.feed(msg_type, payload)
    finally:
        sock.close()
    assert len(reported) == 1 and reported[0][0] == (family(version), TABLE)
    assert reported[0][1] in nft_run.own_pids()


def test_a_deleted_rule_reads_back_as_a_different_filter(node: str) -> None:
    f = TunnelFilter(frozenset({A}), VXLAN_PORT, ipip=True)
    apply_filter(f, node)
    listing = nft(node, "-a", "list", "chain", "ip", TABLE, "forward")
    handle = next(
        ln.rsplit("# handle ", 1)[1]
        for ln in listing.splitlines()
        if "udp dport" in ln and "# handle" in ln
    )
    nft(node, "delete", "rule", "ip", TABLE, "forward", "handle", handle)
    drifted = read_filter(node)
    assert drifted == TunnelFilter(frozenset({A}), None, ipip=True)  # VXLAN no longer covered
    apply_filter(f, node)  # what the agent does when the two differ
    assert read_filter(node) == f


# --- the IPv6 twin, `ip6 overlay-filter` (vxlan-v6.calico), in a scratch namespace -------


def test_the_ipv6_filter_reads_back_as_written_and_hosts_change_in_place(node: str) -> None:
    assert read_filter(node, version=6) is None
    external = frozenset({netaddr.IPNetwork("2001:db8:1::/48")})
    f = TunnelFilter(frozenset({A6, B6}), VXLAN_PORT, False, external, version=6)
    apply_filter(f, node)
    assert read_filter(node, version=6) == f
    assert read_filter(node) is None  # a table of its own: the IPv4 one is not there
    text = nft(node, "list", "table", "ip6", TABLE)
    assert 'iifname "cali*" udp dport 4789 counter packets 0 bytes 0 drop' in text
    assert "udp dport 4789 ip6 saddr != @hosts ip6 saddr != @external counter" in text
    assert "ipencap" not in text and "type ipv6_addr" in text
    before = nft(node, "-a", "list", "chain", "ip6", TABLE, "input")
    apply_hosts(TunnelHosts(add=frozenset({C6}), remove=frozenset({A6}), version=6), node)
    moved = TunnelFilter(frozenset({B6, C6}), VXLAN_PORT, False, external, version=6)
    assert read_filter(node, version=6) == moved
    after = nft(node, "-a", "list", "chain", "ip6", TABLE, "input")
    assert [ln for ln in after.splitlines() if "drop" in ln] == [
        ln for ln in before.splitlines() if "drop" in ln
    ]
    apply_filter(None, node, version=6)
    assert read_filter(node, version=6) is None
    apply_filter(None, node, version=6)  # deleting an absent table is fine


def test_the_two_tables_live_side_by_side(node: str) -> None:
    f4 = TunnelFilter(frozenset({A}), VXLAN_PORT, ipip=True)
    f6 = TunnelFilter(frozenset(), 8472, False, version=6)  # no node has IPv6 yet
    apply_filter(f4, node)
    apply_filter(f6, node)
    assert (read_filter(node), read_filter(node, version=6)) == (f4, f6)
    apply_filter(None, node)  # the IPv4 one goes, the IPv6 one stays
    assert (read_filter(node), read_filter(node, version=6)) == (None, f6)


def test_an_accept_put_in_the_ipv6_table_reads_back_as_no_filtering(node: str) -> None:
    f = TunnelFilter(frozenset({A6}), VXLAN_PORT, False, version=6)
    apply_filter(f, node)
    nft(node, "insert", "rule", "ip6", TABLE, "input", "accept")
    assert read_filter(node, version=6) == TunnelFilter(frozenset({A6}), None, False, version=6)
    apply_filter(f, node)
    assert read_filter(node, version=6) == f


def test_the_ipv6_filter_drops_vxlan_from_unknown_hosts_only() -> None:
    # The neighbour host of a scratch underlay sends UDP to the VXLAN port over IPv6, and a
    # socket on the node listens: what the filter lets through arrives there.
    node6, peer6 = netaddr.IPAddress("2001:db8:2::1"), netaddr.IPAddress("2001:db8:2::2")
    with underlay() as (node, other):
        ip("-n", node, "addr", "add", f"{node6}/64", "dev", "veth0", "nodad")
        ip("-n", other, "addr", "add", f"{peer6}/64", "dev", "veth1", "nodad")
        rx, tx = (in_netns(ns, lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
                  for ns in (node, other))  # fmt: skip
        with rx, tx:
            rx.bind(("::", VXLAN_PORT))
            rx.settimeout(1.0)

            def arrives(data: bytes) -> bool:
                tx.sendto(data, (str(node6), VXLAN_PORT))
                try:
                    return rx.recv(64) == data
                except TimeoutError:
                    return False

            apply_filter(TunnelFilter(frozenset({A6}), VXLAN_PORT, False, version=6), node)
            assert not arrives(b"stranger"), "VXLAN from an unknown IPv6 host got through"
            assert read_drops(node, version=6)["unknown_hosts"] == 1
            apply_hosts(TunnelHosts(frozenset({peer6}), frozenset(), version=6), node)
            assert arrives(b"a node now"), "VXLAN from an admitted IPv6 host was dropped"
            assert read_drops(node, version=6)["unknown_hosts"] == 1
            assert read_drops(node)["unknown_hosts"] == 0  # no IPv4 table, nothing there


@pytest.mark.parametrize("version", [4, 6])
def test_the_monitor_reports_anyone_elses_change_of_either_table(node: str, version: int) -> None:
    kind = "tunnel_filter" if version == 4 else "tunnel_filter6"
    host = A if version == 4 else A6
    ours = TunnelFilter(frozenset({host}), VXLAN_PORT, False, version=version)
    # Someone else takes a node's address out of our set.
    theirs = ["nft", "delete", "element", family(version), TABLE, "hosts", "{", str(host), "}"]
    assert_table_changes_reported(node, kind, lambda: apply_filter(ours, node), theirs)


# --- attacks on a lab ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab3() -> Iterator[Lab]:
    # node1, node2 on 192.168.1.0/24; node3 on 192.168.2.0/24; NAT-outgoing pool.
    with running_lab(nodes=3, subnets=2, mode="cross-subnet", pods_per_node=1) as lab:
        yield lab


def payload(lab: Lab) -> tuple[bytes, str]:
    """A VXLAN packet for node1's VTEP carrying an echo to node1's pod, and its inner
    source (an unused address of node3's block)."""
    src = injection.unused_address(lab.pod(3))
    inner = injection.echo(src, injection.ip_of(lab.pod(1)))
    return injection.vxlan(vtep_mac(lab.node(1).name), inner), src


def seen(sock: socket.socket, src: str, wait: float) -> bool:
    found, _ = poll(lambda: injection.arrived(sock, src), timeout=wait, interval=0.05)
    return bool(found)


@pytest.mark.slow
def test_our_nft_tables_are_repaired_within_a_second_without_echo_passes(lab3: Lab) -> None:
    # nftables changes are not rtnetlink events: the monitor watches the netfilter group,
    # and tells our own nft runs (echoes) from anyone else's by the committing pid.
    node = lab3.node(2)
    want, want_nat = read_filter(node.netns), read_nat(node.netns)
    assert want is not None and want_nat is not None
    peer = lab3.address(lab3.node(1))

    def filter_back() -> bool:
        return read_filter(node.netns) == want

    def nat_back() -> bool:
        return read_nat(node.netns) == want_nat

    cases = [
        ("filter table deleted", ["delete", "table", "ip", TABLE], filter_back),
        ("accept put before our drops", ["insert", "rule", "ip", TABLE, "input", "accept"],
         filter_back),
        ("node address taken out", ["delete", "element", "ip", TABLE, "hosts", "{", peer, "}"],
         filter_back),
        ("NAT table deleted", ["delete", "table", "ip", NAT_TABLE], nat_back),
    ]  # fmt: skip
    repairs = lab3.metrics(node)["overlay_drift_repairs_total"]
    for what, args, repaired in cases:
        nft(node.netns, *args)
        ok, took = poll(repaired, timeout=1.0, interval=0.02)
        assert ok, f"{what}: not repaired within 1 s\n{lab3.log_since(node, 0)[-2000:]}"
        print(f"\n{what}: repaired in {took * 1000:.0f} ms")
    assert lab3.metrics(node)["overlay_drift_repairs_total"] >= repairs + len(cases)
    # Our own rewrites echo back as nftables events too: taken for drift, each would be
    # rewritten again, forever. (Kernel changes, not passes, are counted: a periodic
    # resync may fall in the window, and changes nothing.)
    ops = lab3.metrics(node)["overlay_kernel_ops_total"]
    busy, _ = poll(lambda: lab3.metrics(node)["overlay_kernel_ops_total"] != ops, timeout=1.5)
    assert not busy, "the agent keeps rewriting its own nftables tables"


@pytest.mark.slow
def test_vxlan_from_a_host_that_is_no_node_is_dropped(lab3: Lab, tmp_path: Path) -> None:
    node1 = lab3.node(1)
    data, src = payload(lab3)
    sock = packet_socket_in(lab3.pod(1).netns, "eth0")
    try:
        with injection.stranger(lab3.state, node1.subnet) as (ns, addr):
            dropped = lab3.metrics(node1)["overlay_tunnel_drops_unknown_host_total"]
            injection.send(ns, data, lab3.address(node1))  # 3 packets
            assert not seen(sock, src, wait=1.0), "a stranger's VXLAN reached the pod"
            now = lab3.metrics(node1)["overlay_tunnel_drops_unknown_host_total"]
            assert now == dropped + 3  # the operator sees them counted
            # The control: registered as a Node, the same sender is let in.
            manifest = tmp_path / "node.json"
            manifest.write_text(json.dumps(injection.node_manifest("stranger", f"{addr}/24")))
            lab3.overlayctl("apply", "-f", str(manifest))
            try:
                admitted, took = poll(
                    lambda: addr in injection.filter_hosts(node1.netns), timeout=10
                )
                assert admitted, "node1 never added the new node's address to its filter"
                print(f"\nnew node's address in node1's filter after {took:.2f}s")
                injection.send(ns, data, lab3.address(node1))
                assert seen(sock, src, wait=5.0), "the control packet did not arrive"
            finally:
                lab3.overlayctl("delete", "node", "stranger")
            removed, _ = poll(lambda: addr not in injection.filter_hosts(node1.netns), timeout=10)
            assert removed, "a deleted node's address stayed in node1's filter"
    finally:
        sock.close()


@pytest.mark.slow
def test_a_host_in_external_nodes_is_admitted_without_being_a_node(lab3: Lab) -> None:
    # Calico's externalNodesList: the operator admits a sender that is no node.
    node1 = lab3.node(1)
    data, src = payload(lab3)
    sock = packet_socket_in(lab3.pod(1).netns, "eth0")
    argv = lab3.stop_agent(node1)
    try:
        with injection.stranger(lab3.state, node1.subnet) as (ns, addr):
            lab3.start_agent(node1, [*argv, "--external-nodes", f"{addr}/32"])
            lab3.wait_agent(node1, peers=2)
            f = read_filter(node1.netns)
            assert f is not None and {str(n) for n in f.external} == {f"{addr}/32"}
            injection.send(ns, data, lab3.address(node1))
            assert seen(sock, src, wait=5.0), "an admitted external host's VXLAN was dropped"
    finally:
        sock.close()
        pid = node1.agent_pid
        if pid is not None and netns.alive(pid):
            lab3.stop_agent(node1)
        lab3.start_agent(node1, argv)
        lab3.wait_agent(node1, peers=2)
    restored = read_filter(node1.netns)
    assert restored is not None and restored.external == frozenset()


@pytest.mark.slow
def test_vxlan_sent_by_a_pod_is_dropped_although_nat_gives_it_a_node_address(lab3: Lab) -> None:
    node1, node3 = lab3.node(1), lab3.node(3)
    data, src = payload(lab3)
    pod3 = lab3.pod(3).netns
    sock = packet_socket_in(lab3.pod(1).netns, "eth0")
    try:
        dropped = lab3.metrics(node3)["overlay_tunnel_drops_from_pods_total"]
        injection.send(pod3, data, lab3.address(node1))  # 3 packets
        assert not seen(sock, src, wait=1.0), "a pod's VXLAN reached another pod"
        assert lab3.metrics(node3)["overlay_tunnel_drops_from_pods_total"] == dropped + 3
        # The control: without node3's table the pod's packet leaves masqueraded as node3,
        # which node1 trusts, and the injection works.
        argv = lab3.stop_agent(node3)  # it would put the table back
        try:
            nft(node3.netns, "delete", "table", "ip", TABLE)
            injection.send(pod3, data, lab3.address(node1))
            assert seen(sock, src, wait=5.0), "the control packet did not arrive"
        finally:
            lab3.start_agent(node3, argv)
            lab3.wait_agent(node3, peers=2)
        assert read_filter(node3.netns) is not None  # a restarted agent restores it
        injection.arrived(sock, src)  # drains the socket
        injection.send(pod3, data, lab3.address(node1))
        assert not seen(sock, src, wait=1.0)
    finally:
        sock.close()
