from __future__ import annotations

import dataclasses
import hashlib

import pytest
from netaddr import IPAddress, IPNetwork

from ipam.model import EncapMode, IPPool, Node
from overlay.compute import (
    ComputeCache,
    DataplaneConfig,
    LocalNode,
    compute,
    local_node_from,
    pools_without_nat,
)
from overlay.model import (
    IPIP_DEVICE,
    VXLAN6_DEVICE,
    VXLAN_DEVICE,
    VXLAN_PORT,
    FdbEntry,
    IpipDevice,
    NatOutgoing,
    Neighbour,
    NexthopKey,
    Path,
    Route,
    TunnelFilter,
    VxlanDevice,
)
from overlay.tests.scenarios import LAYOUT, desired, me, node, pool, standard_view
from overlay.view import BlockInfo, ClusterView, vtep_mac, vtep_mac6

ALWAYS, CROSS, NEVER = EncapMode.ALWAYS, EncapMode.CROSS_SUBNET, EncapMode.NEVER


def block_of(name: str) -> IPNetwork:
    return IPNetwork(LAYOUT[name][3])


def route_to(dp, name: str) -> Route | None:
    matches = [r for r in dp.routes if r.dst == block_of(name)]
    assert len(matches) <= 1
    return matches[0] if matches else None


def peer(dp, name: str):
    (found,) = [p for p in dp.peers if p.node == name]
    return found


def underlay_ip(name: str) -> IPAddress:
    return IPNetwork(LAYOUT[name][0]).ip


def vxlan_ip(name: str) -> IPAddress:
    return IPAddress(LAYOUT[name][1])


# (vxlan mode, ipip mode, peer) -> (path, nexthop, words the reason must contain)
CASES = [
    (
        NEVER,
        CROSS,
        "b",
        Path.DIRECT,
        ("eth0", "b"),
        ["same subnet 10.0.1.0/24", "p1 is CrossSubnet"],
    ),
    (
        CROSS,
        NEVER,
        "b",
        Path.DIRECT,
        ("eth0", "b"),
        ["same subnet 10.0.1.0/24", "p1 is CrossSubnet"],
    ),
    (
        CROSS,
        NEVER,
        "c",
        Path.VXLAN,
        (VXLAN_DEVICE, "c"),
        ["different subnet", "vxlanMode CrossSubnet"],
    ),
    (ALWAYS, NEVER, "b", Path.VXLAN, (VXLAN_DEVICE, "b"), ["vxlanMode Always"]),
    (ALWAYS, NEVER, "c", Path.VXLAN, (VXLAN_DEVICE, "c"), ["vxlanMode Always"]),
    (NEVER, ALWAYS, "b", Path.IPIP, (IPIP_DEVICE, "b"), ["ipipMode Always"]),
    (NEVER, ALWAYS, "c", Path.IPIP, (IPIP_DEVICE, "c"), ["ipipMode Always"]),
    (
        NEVER,
        CROSS,
        "c",
        Path.IPIP,
        (IPIP_DEVICE, "c"),
        ["different subnet", "ipipMode CrossSubnet"],
    ),
    # Stored as /32 although it sits in our subnet: tunnelled, and the reason says why.
    (CROSS, NEVER, "d", Path.VXLAN, (VXLAN_DEVICE, "d"), ["/32", "cross-subnet can't work"]),
    (NEVER, CROSS, "d", Path.IPIP, (IPIP_DEVICE, "d"), ["/32", "always be tunnelled"]),
    (NEVER, NEVER, "b", None, None, ["Never"]),
]


@pytest.mark.parametrize(("vxlan", "ipip", "name", "path", "via", "words"), CASES)
def test_path_per_peer(vxlan, ipip, name, path, via, words) -> None:
    dp = desired(standard_view(pool(vxlan, ipip)))
    p = peer(dp, name)
    assert p.path is path
    for word in words:
        assert word in p.reason
    route = route_to(dp, name)
    if via is None:
        assert route is None
        return
    dev, who = via
    gateway = vxlan_ip(who) if dev == VXLAN_DEVICE else underlay_ip(who)
    assert route == Route(block_of(name), nexthop=NexthopKey(gateway, dev, True))
    assert route.nexthop in dp.nexthops


def test_vxlan_programs_neighbour_fdb_and_device() -> None:
    dp = desired(standard_view(pool(ALWAYS)))
    for name in "bcd":
        mac = vtep_mac(name)
        assert Neighbour(VXLAN_DEVICE, vxlan_ip(name), mac) in dp.neighbours
        assert FdbEntry(VXLAN_DEVICE, mac, underlay_ip(name)) in dp.fdb
    assert len(dp.neighbours) == len(dp.fdb) == 3  # not for ourselves
    assert dp.devices == {
        VXLAN_DEVICE: VxlanDevice(
            name=VXLAN_DEVICE,
            vni=4096,
            port=4789,
            local=IPAddress("10.0.1.5"),
            parent="eth0",
            mac=vtep_mac("a"),
            mtu=1450,
            address=IPAddress("10.244.0.1"),
        )
    }


def test_ipip_device_mtu_and_no_l2_state() -> None:
    dp = desired(standard_view(pool(ipip=ALWAYS)), me(underlay_mtu=9000))
    assert dp.devices == {IPIP_DEVICE: IpipDevice(IPIP_DEVICE, 8980, IPAddress("10.244.0.2"))}
    assert not dp.neighbours and not dp.fdb


def test_tx_checksum_offload_is_turned_off_only_when_configured() -> None:
    view = standard_view(pool(ALWAYS), pool(ipip=ALWAYS, name="p2", cidr=IPNetwork("10.9.0.0/16")))
    assert {d.tx_checksum for d in compute(view, me(), DataplaneConfig()).devices.values()} == {
        None
    }
    off = compute(view, me(), DataplaneConfig(tx_checksum_off=True)).devices
    assert off.keys() == {VXLAN_DEVICE, IPIP_DEVICE}
    assert {d.tx_checksum for d in off.values()} == {False}


def test_configured_mtu_wins() -> None:
    view = standard_view(pool(ALWAYS))
    dp = compute(view, me(), DataplaneConfig(vxlan_mtu=1400))
    assert dp.devices[VXLAN_DEVICE].mtu == 1400


def test_no_device_when_pools_need_no_encapsulation() -> None:
    dp = desired(standard_view(pool(NEVER, NEVER)))
    assert dp.devices == {}
    assert all(r.blackhole for r in dp.routes)


def test_no_tunnel_address_here_means_no_device_and_peers_skipped() -> None:
    dp = desired(standard_view(pool(ALWAYS)), me(vxlan_tunnel_addr=None))
    assert dp.devices == {}
    assert route_to(dp, "c") is None
    assert "this node has no VXLAN tunnel address" in peer(dp, "c").reason
    assert peer(dp, "c").path is None


def test_blackhole_for_our_blocks_only() -> None:
    dp = desired(standard_view(pool(ALWAYS)))
    assert route_to(dp, "a") == Route(block_of("a"), blackhole=True)
    assert [r for r in dp.routes if r.blackhole] == [Route(block_of("a"), blackhole=True)]


def test_peer_without_tunnel_address_is_skipped_with_reason() -> None:
    nodes = [node("a"), node("b"), node("c", vxlan=None)]
    dp = desired(standard_view(pool(ALWAYS), nodes=nodes))
    assert route_to(dp, "c") is None
    assert peer(dp, "c").path is None
    assert "no VXLAN tunnel address" in peer(dp, "c").reason
    assert not any(n.ip == vxlan_ip("c") for n in dp.neighbours)
    assert route_to(dp, "b") is not None


def test_peer_without_underlay_is_skipped_with_reason() -> None:
    nodes = [node("a"), node("b", underlay=None)]
    dp = desired(standard_view(pool(CROSS), nodes=nodes))
    assert route_to(dp, "b") is None
    assert "no IPv4 underlay address" in peer(dp, "b").reason


def test_same_subnet_peer_needs_no_tunnel_address_when_direct() -> None:
    nodes = [node("a"), node("b", vxlan=None)]
    dp = desired(standard_view(pool(CROSS), nodes=nodes))
    assert peer(dp, "b").path is Path.DIRECT


def test_our_underlay_stored_as_host_route_tunnels_everyone() -> None:
    dp = desired(standard_view(pool(CROSS)), me(underlay=IPNetwork("10.0.1.5/32")))
    assert peer(dp, "b").path is Path.VXLAN
    assert "this node's underlay address 10.0.1.5/32 has no subnet prefix" in peer(dp, "b").reason


def test_borrowed_addresses_get_host_routes_to_their_host() -> None:
    view = standard_view(pool(CROSS))
    ours = BlockInfo(
        block_of("a"),
        "a",
        borrowed={
            IPAddress("10.244.0.10"): "b",  # hosted in our subnet: direct
            IPAddress("10.244.0.11"): "c",  # hosted elsewhere: VXLAN
            IPAddress("10.244.0.129"): "c",  # outside the block: ignored
        },
    )
    theirs = BlockInfo(block_of("c"), "c", borrowed={IPAddress("10.244.0.140"): "a"})
    view = ClusterView(view.nodes, view.pools, [ours, theirs, *view.blocks[1:3]])
    dp = desired(view)
    host = {r.dst: r for r in dp.routes if r.dst.prefixlen == 32}
    assert host == {
        IPNetwork("10.244.0.10/32"): Route(
            IPNetwork("10.244.0.10/32"), nexthop=NexthopKey(underlay_ip("b"), "eth0")
        ),
        IPNetwork("10.244.0.11/32"): Route(
            IPNetwork("10.244.0.11/32"), nexthop=NexthopKey(vxlan_ip("c"), VXLAN_DEVICE)
        ),
    }  # and nothing for 10.244.0.140: it lives here, the CNI routes it
    assert Route(block_of("a"), blackhole=True) in dp.routes


def test_borrowed_tunnel_address_gets_device_route() -> None:
    view = standard_view(pool(ALWAYS))
    # c's tunnel address was borrowed from our block.
    nodes = {**view.nodes, "c": node("c", vxlan="10.244.0.20")}
    blocks = [BlockInfo(block_of("a"), "a", {IPAddress("10.244.0.20"): "c"}), *view.blocks[1:]]
    dp = desired(ClusterView(nodes, view.pools, blocks))
    assert Route(IPNetwork("10.244.0.20/32"), dev=VXLAN_DEVICE) in dp.routes
    assert Neighbour(VXLAN_DEVICE, IPAddress("10.244.0.20"), vtep_mac("c")) in dp.neighbours


def test_borrowed_host_route_beats_a_slash32_block_of_ours() -> None:
    p = pool(ALWAYS)
    nodes = [node("a"), node("c")]
    blocks = [BlockInfo(IPNetwork("10.244.1.0/32"), "a", {IPAddress("10.244.1.0"): "c"})]
    dp = desired(ClusterView(nodes, [p], blocks))
    assert dp.routes == {
        Route(IPNetwork("10.244.1.0/32"), nexthop=NexthopKey(vxlan_ip("c"), VXLAN_DEVICE))
    }


def test_blocks_without_affinity_or_pool_get_no_block_route() -> None:
    p = pool(ALWAYS)
    blocks = [
        BlockInfo(IPNetwork("10.244.5.0/26"), None),
        BlockInfo(IPNetwork("10.99.0.0/26"), "c"),  # in no pool
        BlockInfo(IPNetwork("10.244.6.0/26"), "ghost"),  # no Node resource
    ]
    dp = desired(ClusterView([node("a"), node("c")], [p], blocks))
    assert dp.routes == set()
    reasons = {(x.node, x.reason) for x in dp.peers}
    assert ("c", "its blocks are in no IP pool: no route") in reasons
    assert ("ghost", "no Node resource for this node: no route") in reasons


def test_nat_outgoing_sources_and_all_pools() -> None:
    p1 = pool(ALWAYS, nat=True)
    p2 = pool(ALWAYS, name="p2", cidr=IPNetwork("10.245.0.0/16"))
    dp = desired(standard_view(p1, p2))
    assert dp.nat == NatOutgoing(
        frozenset({IPNetwork("10.244.0.0/16")}),
        frozenset({IPNetwork("10.244.0.0/16"), IPNetwork("10.245.0.0/16")}),
    )
    assert desired(standard_view(pool(ALWAYS))).nat is None


def test_paths_are_per_pool() -> None:
    p1 = pool(CROSS)
    p2 = pool(ipip=ALWAYS, name="p2", cidr=IPNetwork("10.245.0.0/16"))
    view = standard_view(p1, p2)
    blocks = [*view.blocks, BlockInfo(IPNetwork("10.245.0.0/26"), "b")]
    dp = desired(ClusterView(view.nodes, view.pools, blocks))
    assert {p.path for p in dp.peers if p.node == "b"} == {Path.DIRECT, Path.IPIP}
    assert set(dp.devices) == {VXLAN_DEVICE, IPIP_DEVICE}


def test_duplicate_vtep_mac_is_refused_for_the_later_node() -> None:
    nodes = [
        node("a"),
        node("b"),
        Node(**{**node("c").__dict__, "vxlan_tunnel_mac": vtep_mac("b")}),
    ]
    dp = desired(standard_view(pool(ALWAYS), nodes=nodes))
    assert peer(dp, "c").path is None
    assert "also used by b" in peer(dp, "c").reason
    assert len({f.mac for f in dp.fdb}) == len(dp.fdb)


def test_a_duplicate_vtep_changes_hands_when_its_holder_goes() -> None:
    """b and c claim one tunnel address: b (first by name) holds it. When b leaves, c gets it;
    when b returns, b takes it back. The cache carried across views must agree with a fresh
    compute at every step, and the kernel entries follow the holder."""
    cache = ComputeCache()
    shared = LAYOUT["b"][1]
    # The same objects in every view, as the watch hands them over: only b comes and goes.
    a, b, c, d, p = node("a"), node("b"), node("c", vxlan=shared), node("d"), pool(ALWAYS)
    with_b = standard_view(p, nodes=[a, b, c, d])
    without_b = ClusterView([a, c, d], [p], [x for x in with_b.blocks if x.node != "b"])
    steps = [(with_b, "b"), (without_b, "c"), (with_b, "b")]
    for view, holder in steps:
        dp = compute(view, me(), DataplaneConfig(), cache)
        assert dp == desired(view)
        owners = {n.ip: n.mac for n in dp.neighbours}
        assert owners[IPAddress(shared)] == vtep_mac(holder)
        loser = "c" if holder == "b" else None
        if loser:
            assert f"also used by {holder}" in peer(dp, loser).reason
        assert peer(dp, holder).path is Path.VXLAN


def test_output_is_deterministic_and_independent_of_input_order() -> None:
    v1 = standard_view(pool(CROSS))
    v2 = ClusterView(dict(reversed(list(v1.nodes.items()))), v1.pools, reversed(v1.blocks))
    assert desired(v1) == desired(v2)


def test_vtep_mac_rule() -> None:
    digest = hashlib.sha1(b"node-1").hexdigest()
    assert vtep_mac("node-1") == "66:" + ":".join(digest[i : i + 2] for i in range(0, 10, 2))
    assert vtep_mac("node-1", "AA:BB:CC:DD:EE:FF") == "aa:bb:cc:dd:ee:ff"
    view = ClusterView([Node("x", vxlan_tunnel_mac="02:00:00:00:00:01"), Node("y")])
    assert view.vtep_mac("x") == "02:00:00:00:00:01"
    assert view.vtep_mac("y") == vtep_mac("y")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"vxlan_mtu": 10}, "vxlan_mtu"),
        ({"vxlan_vni": 0}, "vxlan_vni"),
        ({"ipip_mtu": 70000}, "ipip_mtu"),
    ],
)
def test_bad_config_names_the_field(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        DataplaneConfig(**kwargs)


def test_local_node_from_node_resource() -> None:
    local = local_node_from(node("a"), "eth0", 1500)
    assert local == LocalNode(
        "a", "eth0", IPNetwork("10.0.1.5/24"), IPAddress("10.244.0.1"), IPAddress("10.244.0.2")
    )
    with pytest.raises(ValueError, match="ipv4_address"):
        local_node_from(node("a", underlay=None), "eth0")


def test_a_compute_that_raised_does_not_poison_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """b moves to another subnet, and the pass fails halfway: the next one must still be
    right (the cache had already noted b's new Node object before the failure)."""
    import overlay.compute as compute_module

    cache = ComputeCache()
    p = pool(ALWAYS)
    first = standard_view(p)
    compute(first, me(), DataplaneConfig(), cache)
    second = ClusterView({**first.nodes, "b": node("b", underlay="10.0.2.9/24")}, [p], first.blocks)
    real = compute_module._node_piece
    monkeypatch.setattr(compute_module, "_node_piece", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        compute(second, me(), DataplaneConfig(), cache)
    monkeypatch.setattr(compute_module, "_node_piece", real)
    assert compute(second, me(), DataplaneConfig(), cache) == desired(second)


@pytest.mark.parametrize("gone", ["e", "f", "g", "h", "x1", "x2", "x3", "x4"])
def test_a_vtep_moving_to_another_node_in_one_view_keeps_its_l2_entries(gone: str) -> None:
    """One node leaves and another arrives with the same tunnel address and MAC in one view:
    the entries are equal, so removing the old node's must not take the new node's along
    (whatever order the cache meets the two names in; several names make both orders likely).
    """
    p = pool(ALWAYS)
    a = node("a")
    vtep = {
        "ipv4_address": IPNetwork("10.0.2.9/24"),
        "ipv4_vxlan_tunnel_addr": IPAddress("10.244.3.1"),
        "vxlan_tunnel_mac": "02:00:00:00:00:09",
    }
    before = ClusterView([a, Node(name=gone, **vtep)], [p], [])
    after = ClusterView([a, Node(name="d", **vtep)], [p], [])
    cache = ComputeCache()
    compute(before, me(), DataplaneConfig(), cache)
    dp = compute(after, me(), DataplaneConfig(), cache)
    assert dp == desired(after)
    assert {n.mac for n in dp.neighbours} == {"02:00:00:00:00:09"}
    assert {f.dst for f in dp.fdb} == {IPAddress("10.0.2.9")}


def test_a_node_removed_as_the_tunnel_goes_away_leaves_no_decision_behind() -> None:
    """e (in our subnet: a direct path) hosts an address of a block in a disabled CrossSubnet
    VXLAN pool. In one view e and the block go, so the pool is no longer in use and the VXLAN
    device goes too (every decision is redone). The pool comes back into use; then the block,
    still naming e, which is gone: no route may point at e's old address.
    """
    p = pool(CROSS, disabled=True)
    a = node("a")
    e = Node(name="e", ipv4_address=IPNetwork("10.0.1.9/24"))  # our subnet: direct, no VTEP
    borrowed = {IPAddress("10.244.0.70"): "e"}
    with_e = ClusterView([a, e], [p], [BlockInfo(IPNetwork("10.244.0.64/26"), None, borrowed)])
    empty = ClusterView([a], [p], [])
    other = BlockInfo(IPNetwork("10.244.0.128/26"), None)  # keeps the pool in use from here
    again = ClusterView([a], [p], [other])
    back = ClusterView([a], [p], [other, BlockInfo(IPNetwork("10.244.0.64/26"), None, borrowed)])
    cache = ComputeCache()
    for view in (with_e, empty, again, back):
        assert compute(view, me(), DataplaneConfig(), cache) == desired(view)
    assert not compute(back, me(), DataplaneConfig(), cache).routes


def test_enabled_ipv6_pools_with_nat_outgoing_are_reported() -> None:
    v4 = pool(EncapMode.ALWAYS, nat=True)
    v6 = pool(EncapMode.ALWAYS, name="v6", cidr=IPNetwork("fd00::/48"), nat=True)
    plain = pool(EncapMode.ALWAYS, name="v6-plain", cidr=IPNetwork("fd02::/48"))
    off = pool(EncapMode.ALWAYS, name="v6-off", cidr=IPNetwork("fd01::/48"), disabled=True)
    assert pools_without_nat([v4, v6, plain, off]) == [v6]


# --- IPv6 pods over the IPv4 vxlan.calico --------------------------------------------------

POOL6 = IPNetwork("fd00:10:244::/48")


def tunnel6(name: str) -> IPAddress:
    return IPAddress(f"fd00:10:244::{ord(name) - ord('a') + 1}:0")


def block6(name: str) -> IPNetwork:
    return IPNetwork(f"fd00:10:244::{ord(name) - ord('a') + 1}:0/122")


def dual_view(
    v4: EncapMode = CROSS, v6: EncapMode = CROSS, *, tunnels6: dict[str, IPAddress | None]
) -> ClusterView:
    nodes = [
        dataclasses.replace(node(n), ipv6_vxlan_tunnel_addr=tunnels6.get(n, tunnel6(n)))
        for n in LAYOUT
    ]
    blocks = [BlockInfo(block_of(n), n) for n in LAYOUT] + [BlockInfo(block6(n), n) for n in LAYOUT]
    pools = (pool(v4), dataclasses.replace(pool(v6, name="p6", cidr=POOL6), block_size=122))
    return ClusterView(nodes=nodes, pools=pools, blocks=blocks)


def me6(**kw: object) -> LocalNode:
    return me("a", **{"vxlan_tunnel_addr6": tunnel6("a"), **kw})


def test_ipv6_blocks_ride_vxlan_with_an_ndp_entry_next_to_the_arp_entry() -> None:
    dp = desired(dual_view(tunnels6={}), me6())
    dev = dp.devices[VXLAN_DEVICE]
    assert isinstance(dev, VxlanDevice)
    assert (dev.address, dev.address6) == (vxlan_ip("a"), tunnel6("a"))
    for name in "bcd":
        mac = vtep_mac(name)
        assert Neighbour(VXLAN_DEVICE, vxlan_ip(name), mac) in dp.neighbours
        assert Neighbour(VXLAN_DEVICE, tunnel6(name), mac) in dp.neighbours
        key6 = NexthopKey(tunnel6(name), VXLAN_DEVICE)
        assert Route(block6(name), nexthop=key6) in dp.routes
        assert key6 in dp.nexthops
    assert len(dp.fdb) == 3  # one per peer: both families reach the same VTEP
    assert Route(block6("a"), blackhole=True) in dp.routes
    # b shares our IPv4 subnet: direct for IPv4, but IPv6 has no underlay to go direct on.
    assert route_to(dp, "b") == Route(block_of("b"), nexthop=NexthopKey(underlay_ip("b"), "eth0"))
    paths = {p.reason: p.path for p in dp.peers if p.node == "b"}
    assert sorted(paths.values(), key=str) == [Path.DIRECT, Path.VXLAN]
    assert any("IPv6 pods are tunnelled" in reason for reason in paths)


def test_ipv6_only_vxlan_still_makes_the_device_and_ndp_entries_only() -> None:
    view = dual_view(NEVER, ALWAYS, tunnels6={})
    # No IPv4 VXLAN pool: no node has an IPv4 VXLAN tunnel address.
    nodes = [dataclasses.replace(n, ipv4_vxlan_tunnel_addr=None) for n in view.nodes.values()]
    view = ClusterView(nodes=nodes, pools=view.pools, blocks=view.blocks)
    dp = desired(view, me6(vxlan_tunnel_addr=None))
    dev = dp.devices[VXLAN_DEVICE]
    assert isinstance(dev, VxlanDevice) and dev.address is None and dev.address6 == tunnel6("a")
    assert {n.ip.version for n in dp.neighbours} == {6}
    assert {r.dst.version for r in dp.routes if r.nexthop} == {6}


def test_ipv6_routes_wait_for_both_ends_ipv6_tunnel_addresses() -> None:
    dp = desired(dual_view(tunnels6={"c": None}), me6())
    assert not [r for r in dp.routes if r.dst == block6("c")]
    assert route_to(dp, "c") is not None  # IPv4 unaffected
    reasons = [p.reason for p in dp.peers if p.node == "c" and p.path is None]
    assert reasons and "node has no IPv6 VXLAN tunnel address: skipped" in reasons[0]
    assert Neighbour(VXLAN_DEVICE, vxlan_ip("c"), vtep_mac("c")) in dp.neighbours

    ours_missing = desired(dual_view(tunnels6={}), me())  # we have no IPv6 tunnel address
    assert not [r for r in ours_missing.routes if r.dst.version == 6 and r.nexthop]
    why = [p.reason for p in ours_missing.peers if p.path is None]
    assert why and all("this node has no IPv6 VXLAN tunnel address yet" in w for w in why)


def test_a_shared_ipv6_tunnel_address_goes_to_the_first_node_by_name() -> None:
    dp = desired(dual_view(tunnels6={"d": tunnel6("c")}), me6())
    assert Neighbour(VXLAN_DEVICE, tunnel6("c"), vtep_mac("c")) in dp.neighbours
    assert not [n for n in dp.neighbours if n.mac == vtep_mac("d")]  # d has no VTEP at all
    assert any(
        f"IPv6 VXLAN tunnel address {tunnel6('c')} is also used by c" in p.reason
        for p in dp.peers
        if p.node == "d"
    )
    mine = desired(dual_view(tunnels6={"b": tunnel6("a")}), me6())
    assert any("is also used by a" in p.reason for p in mine.peers if p.node == "b")


def test_a_borrowed_ipv6_address_gets_a_host_route() -> None:
    view = dual_view(tunnels6={})
    pod = IPAddress("fd00:10:244::3:5")  # in c's block, hosted on b
    blocks = [b for b in view.blocks if b.cidr != block6("c")]
    blocks.append(BlockInfo(block6("c"), "c", {pod: "b"}))
    dp = desired(
        ClusterView(nodes=list(view.nodes.values()), pools=view.pools, blocks=blocks), me6()
    )
    host = Route(IPNetwork(f"{pod}/128"), nexthop=NexthopKey(tunnel6("b"), VXLAN_DEVICE))
    assert host in dp.routes
    # The incremental path agrees with a fresh compute, across the change and back.
    cache = ComputeCache()
    for v in (
        view,
        ClusterView(nodes=list(view.nodes.values()), pools=view.pools, blocks=blocks),
        view,
    ):
        assert compute(v, me6(), DataplaneConfig(), cache) == desired(v, me6())


def test_the_tunnel_filter_admits_every_node_address_for_the_tunnels_in_use() -> None:
    everyone = frozenset(IPAddress(u.split("/")[0]) for u, _v, _i, _b in LAYOUT.values())
    vxlan = desired(standard_view(pool(EncapMode.CROSS_SUBNET)))
    assert vxlan.tunnel_filter == TunnelFilter(everyone, VXLAN_PORT, ipip=False)
    ipip = desired(standard_view(pool(ipip=EncapMode.ALWAYS)))
    assert ipip.tunnel_filter == TunnelFilter(everyone, None, ipip=True)
    assert desired(standard_view(pool())).tunnel_filter is None  # no tunnel, no filter
    # Two nodes on one address: it stays admitted until both are gone.
    a, b = node("a"), node("b")
    twin = Node(name="b2", ipv4_address=IPNetwork("10.0.1.6/24"))
    p = pool(EncapMode.ALWAYS)
    cache = ComputeCache()
    first = compute(
        ClusterView(nodes=[a, b, twin], pools=(p,), blocks=[]), me(), DataplaneConfig(), cache
    )
    assert first.tunnel_filter is not None and IPAddress("10.0.1.6") in first.tunnel_filter.hosts
    fewer = ClusterView(nodes=[a, twin], pools=(p,), blocks=[])
    second = compute(fewer, me(), DataplaneConfig(), cache).tunnel_filter
    assert second is not None and IPAddress("10.0.1.6") in second.hosts
    alone = ClusterView(nodes=[a], pools=(p,), blocks=[])
    third = compute(alone, me(), DataplaneConfig(), cache).tunnel_filter
    assert third == TunnelFilter(frozenset({IPAddress("10.0.1.5")}), VXLAN_PORT, ipip=False)
    assert third == compute(alone, me(), DataplaneConfig()).tunnel_filter  # no history


def test_the_filter_address_set_is_the_same_object_while_no_node_changes() -> None:
    # plan() then compares the filter by identity: a view that only moves blocks must not
    # cost a comparison of every node address (50k at the largest scale).
    p = pool(EncapMode.ALWAYS)
    view = standard_view(p)
    cache = ComputeCache()
    first = compute(view, me(), DataplaneConfig(), cache).tunnel_filter
    fewer_blocks = ClusterView(nodes=list(view.nodes.values()), pools=(p,), blocks=[])
    second = compute(fewer_blocks, me(), DataplaneConfig(), cache).tunnel_filter
    assert first is not None and second is not None
    assert second.hosts is first.hosts


# --- IPv6 over an IPv6 underlay: vxlan-v6.calico ---------------------------------------------

# Node -> IPv6 underlay with prefix: a, b share fd00:0:1::/64, c is in another subnet, d's
# is stored as /128.
UNDERLAY6 = {
    "a": "fd00:0:1::5/64",
    "b": "fd00:0:1::6/64",
    "c": "fd00:0:2::7/64",
    "d": "fd00::8/128",
}


def v6_underlay_view(v6: EncapMode = CROSS, **kw: object) -> ClusterView:
    view = dual_view(v6=v6, tunnels6={})
    nodes = [
        dataclasses.replace(n, ipv6_address=IPNetwork(UNDERLAY6[n.name]), **kw)  # type: ignore[arg-type]
        for n in view.nodes.values()
    ]
    return ClusterView(nodes=nodes, pools=view.pools, blocks=view.blocks)


def me6u(**kw: object) -> LocalNode:
    return me6(**{"underlay6": IPNetwork(UNDERLAY6["a"]), "underlay6_iface": "eth1", **kw})


def test_with_an_ipv6_underlay_ipv6_pods_get_a_device_of_their_own() -> None:
    dp = desired(v6_underlay_view(), me6u(underlay6_mtu=9000))
    v4, v6 = dp.devices[VXLAN_DEVICE], dp.devices[VXLAN6_DEVICE]
    assert isinstance(v4, VxlanDevice) and isinstance(v6, VxlanDevice)
    assert (v4.address, v4.address6) == (vxlan_ip("a"), None)
    assert (v6.local, v6.parent, v6.address, v6.address6) == (
        IPAddress("fd00:0:1::5"),
        "eth1",
        None,
        tunnel6("a"),
    )
    assert (v6.vni, v6.port, v6.mtu) == (4096, VXLAN_PORT, 9000 - 70)
    assert v6.mac == vtep_mac6("a") != v4.mac  # Calico: SHA-1(name + "-v6")
    # c: another IPv6 subnet, so VXLAN over IPv6: NDP + FDB on the v6 device, its nexthop.
    key = NexthopKey(tunnel6("c"), VXLAN6_DEVICE)
    assert Route(block6("c"), nexthop=key) in dp.routes
    assert Neighbour(VXLAN6_DEVICE, tunnel6("c"), vtep_mac6("c")) in dp.neighbours
    assert FdbEntry(VXLAN6_DEVICE, vtep_mac6("c"), IPAddress("fd00:0:2::7")) in dp.fdb
    # IPv4 keeps its own device and entries, and no IPv6 neighbour rides vxlan.calico.
    assert Neighbour(VXLAN_DEVICE, vxlan_ip("c"), vtep_mac("c")) in dp.neighbours
    assert {n.ip.version for n in dp.neighbours if n.dev == VXLAN_DEVICE} == {4}
    # b shares our IPv6 subnet: CrossSubnet goes direct over IPv6, as over IPv4.
    direct = NexthopKey(IPAddress("fd00:0:1::6"), "eth1")
    assert Route(block6("b"), nexthop=direct) in dp.routes
    # d's IPv6 address is stored as /128: tunnelled, and said so.
    assert Route(block6("d"), nexthop=NexthopKey(tunnel6("d"), VXLAN6_DEVICE)) in dp.routes
    why_d = [p.reason for p in dp.peers if p.node == "d" and p.path is Path.VXLAN]
    assert any("is stored as /128" in w for w in why_d), why_d


def test_always_mode_over_an_ipv6_underlay_tunnels_the_same_subnet_too() -> None:
    dp = desired(v6_underlay_view(ALWAYS), me6u())
    key = NexthopKey(tunnel6("b"), VXLAN6_DEVICE)
    assert Route(block6("b"), nexthop=key) in dp.routes


def test_a_peer_without_an_ipv6_underlay_gets_no_ipv6_route_but_keeps_ipv4() -> None:
    view = v6_underlay_view()
    nodes = [
        dataclasses.replace(n, ipv6_address=None) if n.name == "c" else n
        for n in view.nodes.values()
    ]
    dp = desired(ClusterView(nodes=nodes, pools=view.pools, blocks=view.blocks), me6u())
    assert not [r for r in dp.routes if r.dst == block6("c")]
    assert not [n for n in dp.neighbours if n.ip == tunnel6("c")]  # not on either device
    assert route_to(dp, "c") is not None
    why = [p.reason for p in dp.peers if p.node == "c" and p.path is None]
    assert why == ["node has no IPv6 underlay address: skipped"]


def test_ipv6_vtep_macs_may_be_recorded_and_duplicates_lose_the_vtep() -> None:
    mac6 = "02:00:00:00:06:06"
    view = v6_underlay_view()
    nodes = [
        dataclasses.replace(n, ipv6_vxlan_tunnel_mac=mac6) if n.name in "cd" else n
        for n in view.nodes.values()
    ]
    dp = desired(ClusterView(nodes=nodes, pools=view.pools, blocks=view.blocks), me6u())
    assert FdbEntry(VXLAN6_DEVICE, mac6, IPAddress("fd00:0:2::7")) in dp.fdb  # c, first by name
    assert not [f for f in dp.fdb if f.dst == IPAddress("fd00::8")]  # d lost its VTEP
    assert any(f"IPv6 VTEP MAC {mac6} is also used by c" in p.reason for p in dp.peers)


def test_a_borrowed_ipv6_tunnel_address_routes_on_the_ipv6_device() -> None:
    view = v6_underlay_view()
    borrowed = IPAddress("fd00:10:244::2:5")  # c's IPv6 tunnel address, from b's block
    nodes = [
        dataclasses.replace(n, ipv6_vxlan_tunnel_addr=borrowed) if n.name == "c" else n
        for n in view.nodes.values()
    ]
    blocks = [b for b in view.blocks if b.cidr != block6("b")]
    blocks.append(BlockInfo(block6("b"), "b", {borrowed: "c"}))
    dp = desired(ClusterView(nodes=nodes, pools=view.pools, blocks=blocks), me6u())
    assert Route(IPNetwork(f"{borrowed}/128"), dev=VXLAN6_DEVICE) in dp.routes
    assert Neighbour(VXLAN6_DEVICE, borrowed, vtep_mac6("c")) in dp.neighbours


# --- NAT66: IPv6 natOutgoing pools over an IPv6 underlay ------------------------------------

QUIET6, IDLE6, DRAINING6 = (IPNetwork(f"fd00:10:{n}::/48") for n in (250, 252, 254))


def pool6(name: str, cidr: IPNetwork, *, nat: bool = True, disabled: bool = False) -> IPPool:
    p = pool(CROSS, name=name, cidr=cidr, nat=nat, disabled=disabled)
    return dataclasses.replace(p, block_size=122)


def nat66_view() -> ClusterView:
    """An IPv4 natOutgoing pool and IPv6 pools: p6 (natOutgoing, b's and c's blocks), quiet
    (no natOutgoing), idle (natOutgoing but disabled, no block) and draining (natOutgoing,
    disabled, still holding one of d's blocks)."""
    view = v6_underlay_view()
    pools = (
        pool(CROSS, nat=True),
        pool6("p6", POOL6),
        pool6("quiet", QUIET6, nat=False),
        pool6("idle", IDLE6, disabled=True),
        pool6("draining", DRAINING6, disabled=True),
    )
    blocks = [*view.blocks, BlockInfo(IPNetwork("fd00:10:254::/122"), "d")]
    return ClusterView(nodes=list(view.nodes.values()), pools=pools, blocks=blocks)


def test_nat66_is_built_only_with_an_ipv6_underlay() -> None:
    cfg = DataplaneConfig(nat_outgoing_address=IPAddress("192.0.2.9"))
    dp = compute(nat66_view(), me6u(), cfg)
    # From the IPv6 pools that ask for it (as for IPv4: a disabled one may still hold
    # pods), to outside every IPv6 pool; masquerading: the natOutgoingAddress is IPv4.
    assert dp.nat6 == NatOutgoing(
        frozenset({POOL6, IDLE6, DRAINING6}),
        frozenset({POOL6, QUIET6, IDLE6, DRAINING6}),
        None,
        version=6,
    )
    # The IPv4 table is as without an IPv6 underlay.
    assert dp.nat == NatOutgoing(
        frozenset({IPNetwork("10.244.0.0/16")}),
        frozenset({IPNetwork("10.244.0.0/16")}),
        IPAddress("192.0.2.9"),
    )
    without = compute(nat66_view(), me6(), cfg)  # IPv6 pods over the IPv4 underlay
    assert without.nat6 is None and without.nat == dp.nat


def test_no_ipv6_pool_asking_for_nat_gives_no_nat66() -> None:
    view = nat66_view()
    pools = [p for p in view.pools if p.version == 4 or not p.nat_outgoing]
    dp = desired(ClusterView(list(view.nodes.values()), pools, view.blocks), me6u())
    assert dp.nat6 is None and dp.nat is not None


def test_ipv6_pools_go_without_nat_only_without_an_ipv6_underlay() -> None:
    pools = list(nat66_view().pools)
    assert [p.name for p in pools_without_nat(pools)] == ["p6"]  # enabled ones only
    assert pools_without_nat(pools, ipv6_underlay=True) == []


def test_an_ipv6_only_node_has_only_the_ipv6_device_and_routes() -> None:
    local = me6u(underlay=None, vxlan_tunnel_addr=None, ipip_tunnel_addr=None)
    dp = desired(v6_underlay_view(), local)
    assert set(dp.devices) == {VXLAN6_DEVICE}
    assert {n.dev for n in dp.neighbours} == {VXLAN6_DEVICE}
    assert {f.dev for f in dp.fdb} == {VXLAN6_DEVICE}
    assert Route(block6("c"), nexthop=NexthopKey(tunnel6("c"), VXLAN6_DEVICE)) in dp.routes
    # The IPv4 pool: no route to a peer (said why), only the blackhole of our own block.
    assert {r.dst.version for r in dp.routes if not r.blackhole} == {6}
    why = {p.reason for p in dp.peers if p.path is None}
    assert why == {"this node has no IPv4 underlay address: no route"}
    assert dp.tunnel_filter is None and dp.tunnel_filter6 is not None
    with pytest.raises(ValueError, match="needs an IPv4 or an IPv6 underlay"):
        me6u(underlay=None, underlay6=None)


def test_external_nodes_go_to_the_filter_of_their_family() -> None:
    cfg = DataplaneConfig(
        external_nodes=frozenset({IPNetwork("192.0.2.0/24"), IPNetwork("fd00:99::/64")})
    )
    dp = compute(v6_underlay_view(), me6u(), cfg)
    assert dp.tunnel_filter is not None and dp.tunnel_filter6 is not None
    assert dp.tunnel_filter.external == {IPNetwork("192.0.2.0/24")}
    assert dp.tunnel_filter6.external == {IPNetwork("fd00:99::/64")}
