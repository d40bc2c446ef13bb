"""cold_start: for every cluster it accepts, the cold plan wants exactly what compute()
wants, read from the same stored records (the watch's decoding for compute(), list_fields
for the plan); what it does not cover it declines, naming why."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from netaddr import IPAddress, IPNetwork

from ipam.block import Block
from ipam.datastore import open_datastore
from ipam.datastore.base import Datastore
from ipam.datastore.fields import list_fields
from ipam.model import EncapMode, IPPool, Node
from ipam.records import BLOCKS_PREFIX, block_key
from ipam.resources import canonical_ipv4
from ipam.store import encode, kind_prefix, resource_key
from overlay import cold_start
from overlay.agent import _lent
from overlay.cold_start import (
    BLOCK_FIELDS,
    NODE_FIELDS,
    ColdPeers,
    ColdRoutes,
    Declined,
    cold_peers,
    cold_routes,
    cold_tables,
    lenders,
)
from overlay.compute import DataplaneConfig, LocalNode, compute
from overlay.kernel.nlmsg import mac_bytes
from overlay.model import VXLAN_DEVICE, Dataplane, FdbEntry, Neighbour, NexthopKey, Route
from overlay.plan import NHID_BASE
from overlay.tests.test_convergence_properties import configs, locals_, views
from overlay.view import BlockInfo, ClusterView, vtep_mac
from overlay.watch import ClusterCache

NODES = kind_prefix("Node")


def store(view: ClusterView) -> Datastore:
    """The view's records as the agent and the IPAM library write them."""
    ds = open_datastore("memory://")
    for node in view.nodes.values():
        ds.create(resource_key("Node", node.name), encode(node))
    for info in view.blocks:
        block = Block.new(info.cidr, affinity=f"host:{info.node}" if info.node else None)
        for addr, host in info.borrowed.items():
            block.assign(addr, f"h-{addr.value}", {"node": host})
        ds.create(block_key(info.cidr), block.to_json())
    return ds


def decoded(ds: Datastore, pools: tuple[IPPool, ...]) -> ClusterView:
    """What the agent's watch makes of the records."""
    cache = ClusterCache()
    assert not cache.replace([*ds.list(NODES).items, *ds.list(BLOCKS_PREFIX).items])
    return ClusterView(cache.view().nodes, pools, cache.view().blocks)


def plan(ds: Datastore, me: LocalNode, cfg: DataplaneConfig, pools: list[IPPool]) -> Dataplane:
    """The cold plan as model objects, for comparing with compute()."""
    peers = cold_peers(me, cfg, pools, list_fields(ds, NODES, NODE_FIELDS), nodes_prefix=NODES)
    blocks = list_fields(ds, BLOCKS_PREFIX, BLOCK_FIELDS)
    lent = {key: _lent(ds, key) for key in lenders(blocks, me.name)}  # as the agent reads them
    routes = cold_routes(peers, blocks, lent, nhid_base=NHID_BASE)
    dataplane = as_dataplane(peers, routes)
    dataplane.tunnel_filter, dataplane.nat = cold_tables(peers, cfg, pools)
    return dataplane


def as_dataplane(peers: ColdPeers, routes: ColdRoutes) -> Dataplane:
    def ip(packed: bytes) -> IPAddress:
        return IPAddress(int.from_bytes(packed, "big"))

    ids = [nhid for nhid, _, _ in routes.nexthops]
    assert len(set(ids)) == len(ids), "one id per nexthop"
    keys = {nhid: NexthopKey(ip(gw), dev) for nhid, gw, dev in routes.nexthops}
    assert len(set(keys.values())) == len(keys), "one nexthop per gateway"
    assert routes.routes == sorted(routes.routes), "routes go in address order"
    assert len({(net, plen) for net, plen, _ in routes.routes}) == len(routes.routes)
    dev = peers.device.name
    return Dataplane(
        devices={dev: peers.device},
        neighbours={Neighbour(dev, ip(a), mac.hex(":")) for a, mac in peers.neighbours},
        fdb={FdbEntry(dev, mac.hex(":"), ip(host)) for mac, host in peers.fdb},
        nexthops=set(keys.values()),
        routes={
            Route(IPNetwork((net, plen)), nexthop=keys[nhid])
            if nhid
            else Route(IPNetwork((net, plen)), blackhole=True)
            for net, plen, nhid in routes.routes
        }
        | {Route(IPNetwork((net, 32)), dev=VXLAN_DEVICE) for net in routes.device_routes},
    )


def assert_same_kernel_objects(cold: Dataplane, want: Dataplane) -> None:
    assert cold.devices == want.devices
    assert cold.neighbours == want.neighbours
    assert cold.fdb == want.fdb
    assert cold.nexthops == want.nexthops
    assert cold.routes == want.routes
    assert cold.tunnel_filter == want.tunnel_filter
    assert cold.nat == want.nat
    assert (want.tunnel_filter6, want.nat6) == (None, None)


# --- clusters of the shape the plan covers (and its edges) -----------------------------------

NAMES = ["a", "b", "c", "d", "e"]
POOLS = [IPNetwork("10.244.0.0/16"), IPNetwork("10.244.128.0/17"), IPNetwork("10.245.0.0/16")]
BLOCKS = [
    IPNetwork(f"10.{p}.{o}.{i * 64}/26")
    for p, o in ((244, 0), (244, 128), (245, 0))
    for i in range(3)
] + [IPNetwork("10.99.0.0/26")]
tunnels = st.builds(lambda i: IPAddress(f"10.244.0.{i}"), st.integers(1, 250))


@st.composite
def underlays(draw: st.DrawFn) -> IPNetwork:
    # (the subnet's first and last addresses too: the edges of "same subnet")
    subnet = draw(st.sampled_from([1, 2]))
    host = draw(st.integers(2, 12) | st.sampled_from([0, 255]))
    return IPNetwork(f"10.0.{subnet}.{host}/{draw(st.sampled_from([24, 24, 24, 32]))}")


@st.composite
def clusters(draw: st.DrawFn) -> tuple[ClusterView, LocalNode, DataplaneConfig]:
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, min_size=1, max_size=5))
    nodes = [
        Node(
            name=n,
            ipv4_address=draw(st.none() | underlays() | underlays() | underlays()),
            ipv4_vxlan_tunnel_addr=draw(st.none() | tunnels | tunnels | tunnels),
            vxlan_tunnel_mac=draw(
                st.sampled_from([None] * 6 + ["02:00:00:00:00:01", f"02:00:00:00:0A:{n}{n}"])
            ),
        )
        for n in names
    ]
    pools = [
        IPPool(
            name=f"p{i}",
            cidr=cidr,
            block_size=26,
            vxlan_mode=draw(st.sampled_from([EncapMode.ALWAYS, EncapMode.CROSS_SUBNET])),
            nat_outgoing=draw(st.booleans()),
        )
        for i, cidr in enumerate(POOLS)
        if i == 0 or draw(st.booleans())
    ]
    owners = st.sampled_from([None, "ghost", *NAMES, *NAMES])
    tunnel_of = {n.name: n.ipv4_vxlan_tunnel_addr for n in nodes}
    blocks = []
    for cidr in draw(st.lists(st.sampled_from(BLOCKS), unique=True, max_size=8)):
        # Addresses lent to other nodes (to us, to the owner, to a node without a Node), now
        # and then a node's own tunnel address (its /32 then goes on the device).
        borrowed = {}
        for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
            host = draw(st.sampled_from([*NAMES, "ghost"]))
            tunnel = tunnel_of.get(host)
            if tunnel is not None and tunnel in cidr and draw(st.booleans()):
                borrowed[tunnel] = host
            else:
                borrowed[IPAddress(cidr.first + draw(st.integers(0, 63)))] = host
        blocks.append(BlockInfo(cidr, draw(owners), borrowed))
    me = LocalNode(
        name="a",
        underlay_iface="eth0",
        underlay=draw(underlays()),
        vxlan_tunnel_addr=draw(tunnels),
        mac=draw(st.sampled_from([None, None, "02:00:00:00:00:01"])),
        underlay_mtu=draw(st.sampled_from([1500, 9000])),
    )
    cfg = DataplaneConfig(
        vxlan_mtu=draw(st.none() | st.just(1400)),
        vxlan_vni=draw(st.sampled_from([4096, 4097])),
        vxlan_port=draw(st.sampled_from([4789, 8472])),
        tx_checksum_off=draw(st.booleans()),
        external_nodes=draw(
            st.sampled_from(
                [frozenset(), frozenset({IPNetwork("198.51.100.0/24"), IPNetwork("fd00::/64")})]
            )
        ),
        nat_outgoing_address=draw(st.none() | st.just(IPAddress("10.0.1.99"))),
    )
    return ClusterView(nodes, pools, blocks), me, cfg


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_cold_plan_equals_compute(cluster: tuple[ClusterView, LocalNode, DataplaneConfig]) -> None:
    view, me, cfg = cluster
    ds = store(view)
    try:
        cold = plan(ds, me, cfg, list(view.pools))
    except Declined as exc:
        event(f"declined: {str(exc).split(':')[0].split(' ')[0]}")
        return
    event("accepted")
    assert_same_kernel_objects(cold, compute(decoded(ds, view.pools), me, cfg))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(views(), locals_(), configs)
def test_cold_plan_equals_compute_on_any_cluster(
    view: ClusterView, me: LocalNode, cfg: DataplaneConfig
) -> None:
    """The general clusters of the convergence properties (IPv6, IP-in-IP, disabled pools,
    shared VTEPs...): declined, or the same objects as compute()."""
    # The view's blocks are hosted where the test says; a Block keeps one holder per address.
    ds = store(view)
    try:
        cold = plan(ds, me, cfg, list(view.pools))
    except Declined:
        return
    assert_same_kernel_objects(cold, compute(decoded(ds, view.pools), me, cfg))


def test_the_clusters_mostly_fit_the_plan() -> None:
    """The property above is not vacuous: most generated clusters are accepted (what is
    declined: shared VTEP addresses and MACs, at their rates)."""
    seen: Counter[bool] = Counter()

    @settings(max_examples=200, deadline=None, database=None, derandomize=True)
    @given(clusters())
    def count(cluster: tuple[ClusterView, LocalNode, DataplaneConfig]) -> None:
        view, me, cfg = cluster
        try:
            plan(store(view), me, cfg, list(view.pools))
            seen[True] += 1
        except Declined:
            seen[False] += 1

    count()
    assert seen[True] > 2 * seen[False], seen


# --- what it declines ---------------------------------------------------------------------------

ME = LocalNode("a", "eth0", IPNetwork("10.0.1.2/24"), vxlan_tunnel_addr=IPAddress("10.244.0.1"))
POOL = IPPool("p", IPNetwork("10.244.0.0/16"), 26, vxlan_mode=EncapMode.CROSS_SUBNET)
C_TUNNEL = IPAddress("10.244.0.129")


def peer(name: str = "b", **kw: object) -> Node:
    fields: dict[str, object] = {
        "ipv4_address": IPNetwork("10.0.2.2/24"),
        "ipv4_vxlan_tunnel_addr": IPAddress("10.244.0.65"),
    }
    return Node(name=name, **{**fields, **kw})  # type: ignore[arg-type]


BLOCK = BlockInfo(IPNetwork("10.244.0.64/26"), "b")


@pytest.mark.parametrize(
    ("me", "pools", "nodes", "blocks", "why"),
    [
        (dataclasses.replace(ME, underlay6=IPNetwork("fd00::2/64")), [POOL], [], [], "IPv4 only"),
        (dataclasses.replace(ME, vxlan_tunnel_addr=None), [POOL], [], [], "tunnel address"),
        (ME, [], [], [], "no IP pool"),
        (ME, [dataclasses.replace(POOL, disabled=True)], [], [], "pool p"),
        (ME, [dataclasses.replace(POOL, ipip_mode=EncapMode.ALWAYS)], [], [], "IP-in-IP"),
        (ME, [dataclasses.replace(POOL, vxlan_mode=EncapMode.NEVER)], [], [], "Never"),
        (
            ME,
            [POOL, IPPool("p6", IPNetwork("fd00:10::/48"), block_size=122)],
            [],
            [],
            "pool p6",
        ),
        (
            ME,
            [POOL],
            [peer("b"), peer("c", ipv4_vxlan_tunnel_addr=C_TUNNEL, vxlan_tunnel_mac=vtep_mac("b"))],
            [],
            "VTEP MAC is not its own",
        ),
        (ME, [POOL], [peer(ipv6_vxlan_tunnel_addr=IPAddress("fd00::9"))], [], "IPv6 tunnel"),
        (ME, [POOL], [peer(ipv4_vxlan_tunnel_addr=ME.vxlan_tunnel_addr)], [], "not its own"),
        (ME, [POOL], [peer("b"), peer("c")], [], "node c: its VXLAN tunnel address"),
    ],
)
def test_what_it_declines(
    me: LocalNode, pools: list[IPPool], nodes: list[Node], blocks: list[BlockInfo], why: str
) -> None:
    with pytest.raises(Declined, match=why):
        plan(store(ClusterView(nodes, pools, blocks)), me, DataplaneConfig(), pools)


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        (f"{NODES}b", '{"metadata":{"name":"c"},"spec":{}}', "not its key's"),
        (f"{NODES}B", '{"metadata":{"name":"B"},"spec":{}}', "not its key's"),
        (
            f"{NODES}b",
            '{"metadata":{"name":"b"},"spec":{"bgp":{"ipv4Address":"10.0.2.02/24"}}}',
            "ipv4Address",
        ),
        (
            f"{NODES}b",
            '{"metadata":{"name":"b"},"spec":{"bgp":{"ipv4Address":"10.0.2.2/33"}}}',
            "ipv4Address",
        ),
        (
            f"{NODES}b",
            '{"metadata":{"name":"b"},"spec":{"bgp":{"ipv4Address":"10.0.2.2/24"},'
            '"ipv4VXLANTunnelAddr":"10.244.1"}}',
            "ipv4VXLANTunnelAddr",
        ),
        (block_key("10.244.0.64/26"), '{"cidr":"10.244.0.65/26","affinity":"host:b"}', "host bits"),
        (block_key("10.244.0.64/26"), '{"cidr":7,"affinity":"host:b"}', "cidr"),
        (
            block_key("10.244.0.64/26"),
            '{"cidr":"10.244.0.64/26","affinity":"host:b","attributes":[{"secondary":"x"}]}',
            "field allocations",  # read whole (it may lend), and the watch's decoder refuses it
        ),
    ],
)
def test_it_declines_records_it_cannot_read_plainly(key: str, value: str, why: str) -> None:
    """A record whose routing fields are not in their plain, canonical form: the normal pass
    (with the full decoding, which refuses or reads it) does the work."""
    ds = store(ClusterView([peer()], [POOL], [BLOCK]))
    old = ds.get(key)
    if old is None:
        ds.create(key, value)
    else:
        ds.update(key, value, old.mod_revision)
    with pytest.raises(Declined, match=why):
        plan(ds, ME, DataplaneConfig(), [POOL])


def test_a_typical_cluster_is_planned_like_compute() -> None:
    """Two subnets, CrossSubnet: a same-subnet peer direct, another tunnelled, our own block
    a blackhole, a peer without a tunnel address gets no VTEP and no tunnelled route."""
    nodes = [
        peer("b", ipv4_address=IPNetwork("10.0.1.3/24")),
        peer("c", ipv4_address=IPNetwork("10.0.2.3/24"), ipv4_vxlan_tunnel_addr=C_TUNNEL),
        peer("d", ipv4_address=IPNetwork("10.0.2.4/24"), ipv4_vxlan_tunnel_addr=None),
    ]
    blocks = [
        BlockInfo(IPNetwork("10.244.0.0/26"), "a"),
        BlockInfo(IPNetwork("10.244.0.64/26"), "b"),
        BlockInfo(IPNetwork("10.244.0.128/26"), "c"),
        BlockInfo(IPNetwork("10.244.0.192/26"), "d"),
    ]
    view = ClusterView(nodes, [POOL], blocks)
    ds = store(view)
    cold = plan(ds, ME, DataplaneConfig(), [POOL])
    assert_same_kernel_objects(cold, compute(decoded(ds, view.pools), ME))
    assert {str(r.dst): (r.blackhole, r.nexthop and r.nexthop.dev) for r in cold.routes} == {
        "10.244.0.0/26": (True, None),
        "10.244.0.64/26": (False, "eth0"),
        "10.244.0.128/26": (False, VXLAN_DEVICE),
    }
    assert {n.ip for n in cold.neighbours} == {IPAddress("10.244.0.65"), C_TUNNEL}
    assert mac_bytes(ME.vtep_mac) not in {bytes.fromhex(f.mac.replace(":", "")) for f in cold.fdb}


@settings(max_examples=500)
@given(
    st.one_of(
        st.text(alphabet="0123456789./x: \x00", max_size=20),
        st.tuples(*[st.integers(0, 300)] * 4, st.integers(0, 40)).map(
            lambda t: f"{t[0]}.{t[1]}.{t[2]}.{t[3]}/{t[4]}"
        ),
        st.tuples(*[st.sampled_from(["0", "00", "01", "1", "10", "255", "256"])] * 4).map(
            lambda t: ".".join(t)
        ),
    )
)
def test_addresses_are_read_only_in_their_canonical_form(text: str) -> None:
    """The plan reads an address or prefix exactly when the full decoding's canonical path
    reads it (ipam.resources.canonical_ipv4), to the same value."""
    address, slash, length = text.partition("/")
    want = canonical_ipv4(address)
    try:
        got: int | None = int.from_bytes(cold_start._address(address, "x"), "big")
    except Declined:
        got = None
    assert got == want
    plen = int(length) if length.isdigit() and str(int(length)) == length else None
    try:
        cidr: tuple[int, int] | None = cold_start._cidr(text, "x")
    except Declined:
        cidr = None
    ok = slash and want is not None and plen is not None and plen <= 32
    assert cidr == ((want, plen) if ok else None)
