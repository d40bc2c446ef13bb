"""A node whose underlay moves while its agent runs: a new address on a new interface.

Lab: node1 and node2 on 192.168.1.0/24, node3 on 192.168.2.0/24, cross-subnet, one pod per
node. node2's address moves from eth0 to a second link into the same subnet (eth1), with a
new host part, as when a NIC is replaced or DHCP hands out another lease. Its agent finds
the new underlay on its periodic check (Felix re-checks the parent every 10 s; the test
sets 0.2 s) and registers it, and then:
- node2's own `vxlan.calico` is recreated on eth1 with the new local address, and its
  same-subnet route to node1 leaves through eth1 (Calico #8279: routes re-homed);
- node1 routes node2's block directly via the new address, node3 has the FDB entry of
  node2's VTEP pointing at it, and no entry names the old address any more;
- pods on node1 (direct) and node3 (VXLAN) reach node2's pod again.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import pytest

from netns_tests.lab_fixtures import LAB_TEST_MARKS, OUR_PROTO, VXLAN_DEV, Lab, poll, running_lab
from overlay.lab import netns
from overlay.model import VXLAN6_DEVICE
from overlay.view import vtep_mac, vtep_mac6

pytestmark = LAB_TEST_MARKS

CHECK_INTERVAL = "0.2"
CONVERGE_S = 10.0


@pytest.fixture(scope="module")
def lab3() -> Iterator[Lab]:
    with running_lab(nodes=3, subnets=2, mode="cross-subnet", pods_per_node=1) as lab:
        yield lab


def ip(ns: str, *args: str) -> str:
    return netns.run(["ip", "-n", ns, *args])


def block_of(lab: Lab, node: int) -> str:
    """The /26 route destination that covers the node's pod (its block)."""
    addr = lab.pod(node).ip
    assert addr is not None
    a, b, c, d = (int(x) for x in addr.split("/")[0].split("."))
    return f"{a}.{b}.{c}.{d & ~63}/26"


def route_to(ns: str, dst: str) -> str:
    return ip(ns, "route", "show", "proto", OUR_PROTO, "exact", dst).strip()


def fdb_dst(ns: str, mac: str) -> str | None:
    for line in netns.run(["bridge", "-n", ns, "fdb", "show", "dev", VXLAN_DEV]).splitlines():
        words = line.split()
        if words and words[0] == mac and "dst" in words:
            return words[words.index("dst") + 1]
    return None


def test_a_node_whose_address_moves_to_another_interface_is_followed_everywhere(
    lab3: Lab,
) -> None:
    node1, node2, node3 = lab3.node(1), lab3.node(2), lab3.node(3)
    assert node1.subnet == node2.subnet != node3.subnet
    old = lab3.address(node2)
    prefix = node2.underlay_ip.split("/")[1]
    new = old.rsplit(".", 1)[0] + ".77"
    gateway = old.rsplit(".", 1)[0] + ".1"
    mac = vtep_mac(node2.name)
    assert f"via {old} dev eth0" in route_to(node1.netns, block_of(lab3, 2))
    assert fdb_dst(node3.netns, mac) == old

    # The lab starts agents with interface=eth0; a cidr method finds the address wherever
    # it goes. The short check interval stands for the default 10 s.
    argv = lab3.stop_agent(node2)
    method = argv.index("--ip-autodetection") + 1
    argv[method] = f"cidr={node2.subnet}"
    lab3.start_agent(node2, [*argv, "--underlay-check-interval", CHECK_INTERVAL])
    lab3.wait_agent(node2, peers=2)

    # A second link into node2's subnet (made from the router side: the root namespace is
    # never touched), then the address moves over to it.
    subnet_index = 1 + sorted({n.subnet for n in lab3.state.nodes}).index(node2.subnet)
    port = f"{lab3.name}-b2"
    netns.run(["ip", "-n", lab3.state.router_netns, "link", "add", port, "type", "veth",
               "peer", "name", "eth1", "netns", node2.netns])  # fmt: skip
    netns.batch(lab3.state.router_netns, [f"link set {port} master br{subnet_index}",
                                          f"link set {port} up"])  # fmt: skip
    netns.batch(
        node2.netns,
        [
            "link set eth1 up",
            f"addr add {new}/{prefix} dev eth1",
            f"addr del {node2.underlay_ip} dev eth0",
            f"route replace default via {gateway} dev eth1",
        ],
    )

    def followed() -> bool:
        try:
            dev = ip(node2.netns, "-d", "link", "show", VXLAN_DEV)
        except netns.NetnsError:
            return False  # caught between the delete and the create of a recreate
        return (
            f"local {new} dev eth1" in dev
            and f"via {new} dev eth0" in route_to(node1.netns, block_of(lab3, 2))
            and fdb_dst(node3.netns, mac) == new
            and f"via {lab3.address(node1)} dev eth1" in route_to(node2.netns, block_of(lab3, 1))
        )

    ok, took = poll(followed, timeout=CONVERGE_S, interval=0.05)
    assert ok, (
        f"underlay move not followed within {CONVERGE_S}s\n" + lab3.log_since(node2, 0)[-3000:]
    )
    print(f"\nunderlay move followed by node2, node1 and node3 in {took:.2f}s")
    status = lab3.status(node2)
    assert status["underlay"] == {"interface": "eth1", "address": f"{new}/{prefix}",
                                  "mtu": status["underlay"]["mtu"]}  # fmt: skip
    stored = lab3.overlayctl("get", "node", node2.name, "-o", "json")
    assert f'"{new}/{prefix}"' in stored, stored  # registered with its prefix
    for ns in (node1.netns, node3.netns):  # nothing of ours still names the old address
        assert old not in ip(ns, "route", "show", "proto", OUR_PROTO)
        assert old not in netns.run(["bridge", "-n", ns, "fdb", "show", "dev", VXLAN_DEV])
    assert "event=underlay_changed interface=eth1" in lab3.log_since(node2, 0)
    assert lab3.metrics(node2)["overlay_underlay_changes_total"] == 1

    # Traffic: direct from node1's pod, VXLAN from node3's pod (ARP on the new link may
    # need a moment: poll the ping).
    target = lab3.pod(2).ip
    assert target is not None
    dst = target.split("/")[0]
    for src in (lab3.pod(1), lab3.pod(3)):
        reached, _ = poll(partial(lab3.ping, src.netns, dst, count=1), timeout=10, interval=0.2)
        assert reached, f"{src.name} cannot reach {dst} after the move"


def fdb6_dst(ns: str, mac: str) -> str | None:
    for line in netns.run(["bridge", "-n", ns, "fdb", "show", "dev", VXLAN6_DEVICE]).splitlines():
        words = line.split()
        if words and words[0] == mac and "dst" in words:
            return words[words.index("dst") + 1]
    return None


def test_a_node_whose_ipv6_underlay_address_changes_is_followed_everywhere() -> None:
    """The same for an IPv6 underlay: node3's IPv6 address gets a new host part. Its own
    vxlan-v6.calico is made again on the new local address; node1 (other subnet) moves its
    FDB entry for node3's IPv6 VTEP, node4 (same subnet) its direct IPv6 route; nothing of
    ours names the old address; the pods reach node3's pod over IPv6 again."""
    with running_lab(
        nodes=4, subnets=2, mode="cross-subnet", pods_per_node=1, ipv6_underlay=True
    ) as lab:
        node1, node3, node4 = lab.node(1), lab.node(3), lab.node(4)
        assert node3.subnet == node4.subnet != node1.subnet and node3.underlay_ip6
        old, prefix = node3.underlay_ip6.split("/")
        new = old.rsplit(":", 1)[0] + ":77"
        mac6 = vtep_mac6(node3.name)
        pod3 = lab.pod(3).ip6
        assert pod3 is not None
        block6 = next(
            line.split()[0]
            for line in ip(node4.netns, "-6", "route", "show", "proto", OUR_PROTO).splitlines()
            if f"via {old} dev eth0" in line
        )
        assert fdb6_dst(node1.netns, mac6) == old

        argv = lab.stop_agent(node3)
        argv[argv.index("--ip6-autodetection") + 1] = f"cidr={old.rsplit(':', 2)[0]}::/{prefix}"
        lab.start_agent(node3, [*argv, "--underlay-check-interval", CHECK_INTERVAL])
        lab.wait_agent(node3, peers=3)
        netns.batch(
            node3.netns,
            [f"addr add {new}/{prefix} dev eth0 nodad", f"addr del {old}/{prefix} dev eth0"],
        )

        def followed() -> bool:
            try:
                dev = ip(node3.netns, "-d", "link", "show", VXLAN6_DEVICE)
            except netns.NetnsError:
                return False  # caught between the delete and the create of a recreate
            route = ip(node4.netns, "-6", "route", "show", "proto", OUR_PROTO, "exact", block6)
            return (
                f"local {new} dev eth0" in dev
                and fdb6_dst(node1.netns, mac6) == new
                and f"via {new} dev eth0" in route
            )

        ok, took = poll(followed, timeout=CONVERGE_S, interval=0.05)
        assert ok, lab.log_since(node3, 0)[-3000:]
        print(f"\nIPv6 underlay change followed by node3, node1 and node4 in {took:.2f}s")
        for ns in (node1.netns, node4.netns):  # nothing of ours still names the old address
            assert old not in ip(ns, "-6", "route", "show", "proto", OUR_PROTO)
            fdb = netns.run(["bridge", "-n", ns, "fdb", "show", "dev", VXLAN6_DEVICE])
            assert old not in fdb, fdb
        stored = lab.overlayctl("get", "node", node3.name, "-o", "json")
        assert f'"{new}/{prefix}"' in stored, stored
        for src in (lab.pod(1), lab.pod(4)):  # over vxlan-v6.calico, and direct
            reached, _ = poll(partial(lab.ping, src.netns, pod3, count=1), timeout=10, interval=0.2)
            assert reached, f"{src.name} cannot reach {pod3} after the change"
