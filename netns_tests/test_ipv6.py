"""Dual-stack pods: IPv6 pod traffic rides the IPv4 vxlan.calico between nodes.

A dual-stack lab (--ipv6): node1, node2 on 192.168.1.0/24 and node3, node4 on
192.168.2.0/24, cross-subnet mode, one pod per node with an IPv4 and an IPv6 address.
The underlay is IPv4 only, so IPv6 between pods of different nodes is VXLAN even where
IPv4 goes direct. Asserted with pings, on the wire (tcpdump + scapy) and in the kernel.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns_tests.lab_fixtures import LAB_TEST_MARKS, VXLAN_DEV, Capture, Lab, poll, running_lab
from overlay.lab import check, netns
from overlay.lab import lab as lab_cli
from overlay.lab.topology import POOL6_CIDR

pytestmark = LAB_TEST_MARKS

VNI = 4096
VXLAN_PORT = 4789


@pytest.fixture(scope="module")
def dual() -> Iterator[Lab]:
    with running_lab(nodes=4, subnets=2, mode="cross-subnet", pods_per_node=1, ipv6=True) as lab:
        yield lab


def ip6(lab: Lab, node: int) -> str:
    address = lab.pod(node).ip6
    assert address, f"pod of node{node} has no IPv6 address"
    return address


def routes6(ns: str) -> list[dict[str, object]]:
    out = netns.run(["ip", "-j", "-6", "-n", ns, "route", "show", "proto", "80"])
    return list(json.loads(out or "[]"))


def neighbours6(ns: str) -> set[tuple[str, str]]:
    out = netns.run(["ip", "-j", "-6", "-n", ns, "neigh", "show", "dev", VXLAN_DEV])
    return {(n["dst"], n["lladdr"]) for n in json.loads(out or "[]") if "PERMANENT" in n["state"]}


def test_lab_check_pings_every_pair_over_ipv6_through_vxlan(dual: Lab) -> None:
    _, probes = check.run_check(dual.name, timeout=120)
    v6 = [p for p in probes if p.family == 6]
    assert len(v6) == 4 * 3  # every ordered pair of pods
    assert all(p.passed and p.path == "vxlan" for p in v6), [p for p in v6 if not p.passed]
    assert all(p.passed for p in probes), [p for p in probes if not p.passed]
    # Same subnet: IPv4 went direct while IPv6 was tunnelled.
    same = {
        (p.family, p.path) for p in probes if {p.src, p.dst} == {dual.pod(1).name, dual.pod(2).name}
    }
    assert same == {(4, "direct"), (6, "vxlan")}


def test_ipv6_pod_traffic_is_vxlan_between_the_ipv4_node_addresses(
    dual: Lab, tmp_path: Path
) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
    from scapy.layers.vxlan import VXLAN

    # Pods on node1 and node2 share an IPv4 subnet: the case where IPv4 would go direct.
    src, dst = ip6(dual, 1), ip6(dual, 2)
    n1, n2 = dual.address(dual.node(1)), dual.address(dual.node(2))
    # VXLAN, and any pod address seen unencapsulated (the underlay's own link-local IPv6
    # chatter, MLD and neighbour discovery, is neither).
    bpf = f"udp port {VXLAN_PORT} or ip6 net {POOL6_CIDR}"
    with Capture(dual.node(1).netns, tmp_path / "v6.pcap", bpf, count=6) as cap:
        assert dual.ping(dual.pod(1).netns, dst, count=3)
    packets = cap.packets()
    seen = set()
    for p in packets:
        assert p.haslayer(VXLAN), f"not encapsulated: {p.summary()}"
        assert p[UDP].dport == VXLAN_PORT and p[VXLAN].vni == VNI, p.summary()
        assert {p[IP].src, p[IP].dst} == {n1, n2}, p.summary()
        inner = p[VXLAN][IPv6]
        kind = "request" if inner.haslayer(ICMPv6EchoRequest) else "reply"
        assert inner.haslayer(ICMPv6EchoRequest) or inner.haslayer(ICMPv6EchoReply)
        seen.add((p[IP].src, inner.src, inner.dst, kind))
    assert (n1, src, dst, "request") in seen and (n2, dst, src, "reply") in seen, seen


def test_ipv6_kernel_state_and_path_mtu(dual: Lab) -> None:
    ns = dual.node(1).netns
    via = {str(r["dst"]): r for r in routes6(ns)}
    blackholes = [d for d, r in via.items() if r.get("type") == "blackhole"]
    nhid_routes = [d for d, r in via.items() if "nhid" in r]
    assert len(blackholes) == 1 and len(nhid_routes) == 3, via  # ours, and one per peer
    assert all(via[d].get("dev") == VXLAN_DEV for d in nhid_routes), via
    macs = {m for _, m in neighbours6(ns)}
    assert len(neighbours6(ns)) == 3
    fdb = netns.run(["bridge", "-n", ns, "fdb", "show", "dev", VXLAN_DEV])
    assert all(mac in fdb for mac in macs)  # the IPv4 FDB entries serve IPv6 too
    # A full-size IPv6 packet fits: pod MTU 1450 = 40 (IPv6) + 8 (ICMPv6) + 1402.
    src, dst = dual.pod(1), ip6(dual, 3)
    big = ["ping", "-n", "-q", "-c", "1", "-W", "2", "-M", "do", "-s", "1402", dst]
    netns.run_in(src.netns, big, timeout=10)  # raises if it gets no answer
    with pytest.raises(netns.NetnsError):  # one byte more does not fit the pod's MTU
        netns.run_in(src.netns, [*big[:-2], "1403", dst], timeout=10)


def addresses6(ns: str) -> list[str]:
    out = json.loads(netns.run(["ip", "-j", "-6", "-n", ns, "addr", "show", "dev", VXLAN_DEV]))
    return [a["local"] for x in out for a in x.get("addr_info", []) if a.get("scope") == "global"]


def test_ipv6_route_ndp_entry_and_tunnel_address_deleted_by_hand_come_back_within_a_second(
    dual: Lab,
) -> None:
    ns = dual.node(1).netns

    def state() -> tuple[object, ...]:
        return routes6(ns), neighbours6(ns), addresses6(ns)

    before = state()
    peer_block = next(str(r["dst"]) for r in before[0] if "nhid" in r)  # type: ignore[attr-defined]
    tunnel, _mac = sorted(neighbours6(ns))[0]
    (ours,) = addresses6(ns)
    for argv in (
        ["ip", "-n", ns, "-6", "route", "del", peer_block],
        ["ip", "-n", ns, "-6", "neigh", "del", tunnel, "dev", VXLAN_DEV],
        ["ip", "-n", ns, "-6", "addr", "del", f"{ours}/128", "dev", VXLAN_DEV],
    ):
        start = time.monotonic()
        netns.run(argv)
        back, took = poll(lambda: state() == before, timeout=5.0, interval=0.02)
        assert back, f"{' '.join(argv)}: not restored"
        print(f"\n{argv[4]} {argv[5]} restored in {(time.monotonic() - start) * 1000:.0f} ms")
        assert took <= 1.0, f"{' '.join(argv)}: restored after {took:.2f}s"
    assert dual.ping(dual.pod(1).netns, ip6(dual, 3), count=2)


def test_a_restarted_agent_finds_its_ipv6_objects_in_place_and_changes_nothing(
    dual: Lab,
) -> None:
    node = dual.node(1)
    before = (routes6(node.netns), neighbours6(node.netns))
    argv = dual.stop_agent(node)
    offset = dual.log_size(node)
    dual.start_agent(node, argv)
    dual.wait_agent(node, peers=3)
    assert dual.kernel_changes(node, offset) == [], dual.log_since(node, offset)[-1500:]
    rec = dual.status(node)["reconciler"]
    assert rec["ops_applied"] == 0 and rec["passes"] >= 1, rec
    assert (routes6(node.netns), neighbours6(node.netns)) == before
    assert dual.ping(dual.pod(1).netns, ip6(dual, 4), count=2)


def test_status_names_both_tunnel_addresses_held_on_the_device(dual: Lab) -> None:
    node = dual.node(1)
    tunnels = dual.status(node)["tunnel_addresses"]
    assert set(tunnels) == {"vxlan", "vxlan-v6"}, tunnels
    assert addresses6(node.netns) == [tunnels["vxlan-v6"]]
    text = netns.run_in(node.netns, [lab_cli.bin_path("overlayctl"), "status"])
    line = next(x for x in text.splitlines() if x.startswith("Tunnels:"))
    assert tunnels["vxlan"] in line and tunnels["vxlan-v6"] in line, line


def test_a_removed_node_leaves_no_ipv6_route_nexthop_or_ndp_entry_behind() -> None:
    with running_lab(nodes=3, subnets=2, pods_per_node=0, ipv6=True) as lab:
        victim, peers = lab.node(3), [lab.node(1), lab.node(2)]
        tunnel6 = lab.status(victim)["tunnel_addresses"]["vxlan-v6"]

        def stale() -> list[str]:
            left = []
            for peer in peers:
                ns = peer.netns
                left += [f"{ns} neigh {ip}" for ip, _ in neighbours6(ns) if ip == tunnel6]
                left += [f"{ns} route {r['dst']}" for r in routes6(ns) if tunnel6 in str(r)]
                nexthops = netns.run(["ip", "-n", ns, "-6", "nexthop", "show"])
                left += [
                    f"{ns} nexthop {line}" for line in nexthops.splitlines() if tunnel6 in line
                ]
            return left

        held = stale()
        assert len(held) == 3 * len(peers), held  # an NDP entry, a route, a nexthop on each
        lab.stop_agent(victim)  # else it would register itself again
        lab.overlayctl("delete", "node", victim.name)
        gone, took = poll(lambda: not stale(), timeout=10.0, interval=0.05)
        assert gone, stale()
        print(f"\nIPv6 state of the removed node gone from both peers in {took * 1000:.0f} ms")
