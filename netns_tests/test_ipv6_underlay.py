"""IPv6 pods over an IPv6 underlay: vxlan-v6.calico (Calico's iptables-mode IPv6 VXLAN).

A lab with --ipv6-underlay: node1, node2 on 192.168.1.0/24 + fd00:192:168:1::/64 and node3,
node4 on the second subnet pair, cross-subnet mode, one dual-stack pod per node, agents
started with --ip6-autodetection interface=eth0. IPv6 pod traffic then leaves in IPv6
VXLAN packets between the nodes' IPv6 addresses across subnets, and as plain IPv6 within
one; IPv4 is as before. The IPv6 pool has natOutgoing: IPv6 pods reach the external host
(fd00:203:0:113::10) with their node's IPv6 address (NAT66, `ip6 overlay-nat`). Asserted
with pings, on the wire (tcpdump + scapy) and in the kernel.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netns_tests.lab_fixtures import LAB_TEST_MARKS, Capture, Lab, poll, running_lab
from overlay.lab import check, netns
from overlay.lab import lab as lab_cli
from overlay.lab.topology import EXTERNAL_HOST6, POOL6_CIDR
from overlay.model import VXLAN6_DEVICE, VXLAN_DEVICE

pytestmark = LAB_TEST_MARKS

VNI = 4096
VXLAN_PORT = 4789


@pytest.fixture(scope="module")
def v6u() -> Iterator[Lab]:
    with running_lab(
        nodes=4, subnets=2, mode="cross-subnet", pods_per_node=1, ipv6_underlay=True
    ) as lab:
        yield lab


def ip6(lab: Lab, node: int) -> str:
    address = lab.pod(node).ip6
    assert address, f"pod of node{node} has no IPv6 address"
    return address


def underlay6(lab: Lab, node: int) -> str:
    address = lab.node(node).underlay_ip6
    assert address, f"node{node} has no IPv6 underlay address"
    return address.split("/")[0]


def device(ns: str, name: str) -> dict[str, Any]:
    link = json.loads(netns.run(["ip", "-d", "-j", "-n", ns, "link", "show", name]))[0]
    return {"mtu": link["mtu"], **link["linkinfo"]["info_data"]}


def test_lab_check_answers_every_pair_direct_within_a_subnet_and_vxlan_across(v6u: Lab) -> None:
    _, probes = check.run_check(v6u.name, timeout=120)
    assert all(p.passed for p in probes), [p for p in probes if not p.passed]
    pairs = [p for p in probes if p.family == 6 and p.dst != check.EXTERNAL]
    v6 = {(p.src[-4:-2], p.dst[-4:-2]): p.path for p in pairs}
    assert len(v6) == 4 * 3
    # n1/n2 and n3/n4 share a subnet: plain IPv6, as for IPv4 (no longer tunnelled).
    assert v6[("n1", "n2")] == v6[("n4", "n3")] == "direct"
    assert v6[("n1", "n3")] == v6[("n4", "n2")] == "vxlan"


def test_ipv6_pod_traffic_is_vxlan_between_the_ipv6_node_addresses(
    v6u: Lab, tmp_path: Path
) -> None:
    from scapy.layers.inet import UDP
    from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
    from scapy.layers.vxlan import VXLAN

    src, dst = ip6(v6u, 1), ip6(v6u, 3)
    a1, a3 = underlay6(v6u, 1), underlay6(v6u, 3)
    with Capture(v6u.node(1).netns, tmp_path / "v6.pcap", f"udp port {VXLAN_PORT}", 6) as cap:
        assert v6u.ping(v6u.pod(1).netns, dst, count=3)
    seen = set()
    for p in cap.packets():
        assert p.haslayer(IPv6) and p[UDP].dport == VXLAN_PORT, p.summary()  # outer IPv6
        assert p[VXLAN].vni == VNI, p.summary()
        assert {p[IPv6].src, p[IPv6].dst} == {a1, a3}, p.summary()
        inner = p[VXLAN][IPv6]
        assert inner.haslayer(ICMPv6EchoRequest) or inner.haslayer(ICMPv6EchoReply)
        kind = "request" if inner.haslayer(ICMPv6EchoRequest) else "reply"
        seen.add((p[IPv6].src, inner.src, inner.dst, kind))
    assert (a1, src, dst, "request") in seen and (a3, dst, src, "reply") in seen, seen


def test_ipv6_within_a_subnet_is_plain_ipv6_and_ipv4_still_rides_vxlan_calico(
    v6u: Lab, tmp_path: Path
) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6

    ns = v6u.node(1).netns
    bpf = f"udp port {VXLAN_PORT} or ip6 net {POOL6_CIDR}"
    with Capture(ns, tmp_path / "same.pcap", bpf, count=4) as cap:
        assert v6u.ping(v6u.pod(1).netns, ip6(v6u, 2), count=2)
    packets = cap.packets()
    assert packets and not [p for p in packets if p.haslayer(UDP)], [p.summary() for p in packets]
    assert {p[IPv6].dst for p in packets} == {ip6(v6u, 2), ip6(v6u, 1)}
    # IPv4 across subnets: VXLAN in IPv4, between the IPv4 node addresses.
    pod3 = v6u.pod(3).ip
    assert pod3
    with Capture(ns, tmp_path / "v4.pcap", f"udp port {VXLAN_PORT}", count=4) as cap:
        assert v6u.ping(v6u.pod(1).netns, pod3, count=2)
    outer = {(p[IP].src, p[IP].dst) for p in cap.packets()}
    a1, a3 = v6u.address(v6u.node(1)), v6u.address(v6u.node(3))
    assert outer == {(a1, a3), (a3, a1)}, outer


def test_the_ipv6_device_its_mtu_and_the_pod_mtu(v6u: Lab) -> None:
    node = v6u.node(1)
    v6 = device(node.netns, VXLAN6_DEVICE)
    assert (v6["id"], v6["port"], v6["local6"], v6["mtu"]) == (
        VNI,
        VXLAN_PORT,
        underlay6(v6u, 1),
        1500 - 70,
    )
    assert "local6" not in device(node.netns, VXLAN_DEVICE)  # IPv4 keeps its own device
    # One pod MTU for both families: the IPv6 tunnel's, the smaller.
    assert (Path(node.dir) / "mtu").read_text().strip() == "1430"
    # A full-size IPv6 packet of a pod crosses: 1430 = 40 (IPv6) + 8 (ICMPv6) + 1382.
    big = ["ping", "-n", "-q", "-c", "1", "-W", "2", "-M", "do", "-s"]
    netns.run_in(v6u.pod(1).netns, [*big, "1382", ip6(v6u, 3)], timeout=10)
    with pytest.raises(netns.NetnsError):
        netns.run_in(v6u.pod(1).netns, [*big, "1383", ip6(v6u, 3)], timeout=10)
    status = v6u.status(node)
    assert status["underlay6"]["address"] == node.underlay_ip6
    assert not [w for w in status["warnings"] if "natOutgoing" in w], status["warnings"]
    # IPv6 VXLAN is admitted only from the nodes' IPv6 addresses (ip6 overlay-filter).
    assert status["tunnel_filter6"] == {"tunnels": ["vxlan"], "node_addresses": 4, "external": []}
    table = netns.run_in(node.netns, ["nft", "list", "table", "ip6", "overlay-filter"])
    assert all(underlay6(v6u, i) in table for i in range(1, 5)), table
    text = netns.run_in(node.netns, [lab_cli.bin_path("overlayctl"), "status"])
    assert f"Underlay6:   {node.underlay_ip6} on eth0 (MTU 1500)" in text, text


State6 = tuple[list[tuple[str, str, str]], list[tuple[str, str]], list[tuple[str, str]]]


def _v6_state(ns: str) -> State6 | None:
    """Our IPv6 routes (dst, dev, gateway or type; not the nexthop ids, which a new device
    renews), and the NDP and FDB entries of vxlan-v6.calico. None: no such device."""
    routes = netns.run(["ip", "-j", "-6", "-n", ns, "route", "show", "proto", "80"])
    try:
        neigh = netns.run(["ip", "-j", "-6", "-n", ns, "neigh", "show", "dev", VXLAN6_DEVICE])
        fdb = netns.run(["bridge", "-j", "-n", ns, "fdb", "show", "dev", VXLAN6_DEVICE])
    except netns.NetnsError:
        return None
    return (
        sorted(
            (r["dst"], r.get("dev", ""), r.get("gateway", r.get("type", "")))
            for r in json.loads(routes or "[]")
        ),
        sorted((n["dst"], n.get("lladdr", "")) for n in json.loads(neigh or "[]")),
        sorted((f["mac"], f["dst"]) for f in json.loads(fdb or "[]") if "dst" in f),
    )


def test_drift_on_the_ipv6_device_is_repaired_within_a_second(v6u: Lab) -> None:
    ns = v6u.node(1).netns
    before = _v6_state(ns)
    assert before is not None
    routes, neighbours, fdb = before
    assert len(neighbours) == 3 and len(fdb) == 3, before  # every peer, whatever its path
    peer = underlay6(v6u, 3)
    mac = next(m for m, d in fdb if d == peer)
    tunnel = next(t for t, m in neighbours if m == mac)
    block = next(dst for dst, dev, _ in routes if dev == VXLAN6_DEVICE)
    for argv in (
        ["ip", "-n", ns, "-6", "route", "del", block],
        ["ip", "-n", ns, "-6", "neigh", "del", tunnel, "dev", VXLAN6_DEVICE],
        ["bridge", "-n", ns, "fdb", "del", mac, "dev", VXLAN6_DEVICE, "dst", peer],
        ["ip", "-n", ns, "link", "del", VXLAN6_DEVICE],
    ):
        start = time.monotonic()
        netns.run(argv)
        back, took = poll(lambda: _v6_state(ns) == before, timeout=5.0, interval=0.02)
        assert back, f"{' '.join(argv)}: not restored: {_v6_state(ns)}"
        print(f"\n{' '.join(argv[3:6])} restored in {(time.monotonic() - start) * 1000:.0f} ms")
        assert took <= 1.0, f"{' '.join(argv)}: restored after {took:.2f}s"
    assert v6u.ping(v6u.pod(1).netns, ip6(v6u, 3), count=2)


def test_a_restarted_agent_changes_nothing(v6u: Lab) -> None:
    node = v6u.node(1)
    before = _v6_state(node.netns)
    argv = v6u.stop_agent(node)
    offset = v6u.log_size(node)
    v6u.start_agent(node, argv)
    v6u.wait_agent(node, peers=3)
    assert v6u.kernel_changes(node, offset) == [], v6u.log_since(node, offset)[-1500:]
    assert _v6_state(node.netns) == before


# --- NAT66: IPv6 pods to the IPv6 external host ----------------------------------------------


def test_a_pod_reaches_the_ipv6_external_host_with_its_node_ipv6_address(
    v6u: Lab, tmp_path: Path
) -> None:
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6

    pod, ext = v6u.pod(3), v6u.state.external_netns
    # Echo requests and replies only (ip6[40]: the ICMPv6 type), not neighbour discovery.
    echo = "icmp6 and (ip6[40] == 128 or ip6[40] == 129)"
    with Capture(ext, tmp_path / "nat66.pcap", echo, count=4) as cap:
        answered = v6u.ping(pod.netns, str(EXTERNAL_HOST6), count=2)
    requests = [p[IPv6].src for p in cap.packets() if p.haslayer(ICMPv6EchoRequest)]
    assert requests, "no IPv6 echo request reached the external host"
    assert set(requests) == {underlay6(v6u, 3)}, f"sources seen by the external host: {requests}"
    assert answered
    # Masqueraded by node3's `ip6 overlay-nat`, never source-NATed to an address of its own.
    table = netns.run_in(v6u.node(3).netns, ["nft", "list", "table", "ip6", "overlay-nat"])
    assert "ip6 saddr @sources ip6 daddr != @pools masquerade" in table, table
    assert POOL6_CIDR in table, table


def test_lab_check_passes_with_an_ipv6_external_column(v6u: Lab) -> None:
    res = subprocess.run(
        [lab_cli.bin_path("overlayctl"), "lab", "check", "--name", v6u.name, "--timeout", "120"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    v4, v6 = res.stdout.split("\n\nIPv6:\n")
    assert v6.splitlines()[0].split()[-1] == check.EXTERNAL, v6
    rows = [line.split() for line in v6.splitlines()[1:5]]
    assert [row[-1] for row in rows] == ["nat"] * 4, v6  # each pod, its node's IPv6 address
    assert [line.split()[-1] for line in v4.splitlines()[1:5]] == ["nat"] * 4, v4


def test_a_deleted_ipv6_nat_table_is_written_again_within_a_second(v6u: Lab) -> None:
    ns = v6u.node(2).netns
    listing = ["nft", "list", "table", "ip6", "overlay-nat"]
    before = netns.run_in(ns, listing)
    start = time.monotonic()
    netns.run_in(ns, ["nft", "delete", "table", "ip6", "overlay-nat"])

    def restored() -> bool:
        try:
            return netns.run_in(ns, listing) == before
        except netns.NetnsError:  # not there yet
            return False

    back, took = poll(restored, timeout=5.0, interval=0.02)
    assert back, "ip6 overlay-nat was not written again"
    print(f"\nip6 overlay-nat restored in {(time.monotonic() - start) * 1000:.0f} ms")
    assert took <= 1.0, f"restored after {took:.2f}s"
    assert netns.run_in(ns, ["nft", "list", "table", "ip", "overlay-nat"])  # IPv4 untouched
    assert v6u.ping(v6u.pod(2).netns, str(EXTERNAL_HOST6), count=2)


def test_ipv6_vxlan_from_a_stranger_is_dropped_and_counted(v6u: Lab) -> None:
    """The router is no node: its IPv6 VXLAN to node1 is dropped by ip6 overlay-filter."""
    node = v6u.node(1)
    before = v6u.metrics(node)
    assert before["overlay_tunnel6_filter_hosts"] == 4
    send = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
        "for _ in range(3):\n"
        "    s.sendto(bytes(16), (sys.argv[1], 4789))\n"
    )
    netns.run_in(v6u.state.router_netns, [sys.executable, "-c", send, underlay6(v6u, 1)])

    def dropped() -> float:
        m = v6u.metrics(node)
        return m["overlay_tunnel6_drops_unknown_host_total"] - before.get(
            "overlay_tunnel6_drops_unknown_host_total", 0
        )

    ok, _ = poll(lambda: dropped() == 3, 5.0, interval=0.05)
    assert ok, dropped()
    # Admitted through the cluster's FelixConfiguration externalNodesList: no more drops.
    router6 = f"{underlay6(v6u, 1).rsplit(':', 1)[0]}:1"
    manifest = (
        '{"apiVersion": "projectcalico.org/v3", "kind": "FelixConfiguration", '
        f'"metadata": {{"name": "default"}}, "spec": {{"externalNodesList": ["{router6}"]}}}}'
    )
    netns.run([lab_cli.bin_path("overlayctl"), "--datastore", v6u.state.datastore, "apply",
               "-f", "-"], stdin=manifest)  # fmt: skip
    try:
        table = ["nft", "list", "set", "ip6", "overlay-filter", "external"]
        admitted, _ = poll(lambda: router6 in netns.run_in(node.netns, table), 5.0, 0.05)
        assert admitted, netns.run_in(node.netns, table)
        netns.run_in(v6u.state.router_netns, [sys.executable, "-c", send, underlay6(v6u, 1)])
        assert not poll(lambda: dropped() > 3, 1.0, interval=0.05)[0], dropped()
    finally:
        v6u.overlayctl("delete", "felixconfiguration", "default")
