"""Convergence properties: from ANY kernel state (ours, stale, junk, plus foreign objects),
applying plan(desired, read()) once yields exactly the desired state, leaves foreign objects
alone, and a second plan is empty. This is what makes an agent restart or a missed event
harmless."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netaddr import IPAddress, IPNetwork

from ipam.model import EncapMode, IPPool, Node
from overlay.compute import ComputeCache, DataplaneConfig, LocalNode, compute
from overlay.model import (
    IPIP_DEVICE,
    VXLAN_DEVICE,
    Action,
    Dataplane,
    FdbEntry,
    IpipDevice,
    NatOutgoing,
    Neighbour,
    Nexthop,
    NexthopKey,
    Op,
    Route,
    TunnelFilter,
    TunnelHosts,
    VxlanDevice,
)
from overlay.plan import NHID_BASE, device_matches, may_recreate, plan, wanted_nexthops
from overlay.tests.fake_kernel import FakeKernel
from overlay.view import BlockInfo, ClusterView

NAMES = ["a", "b", "c", "d", "e"]
POOL_CIDRS = [IPNetwork("10.244.0.0/16"), IPNetwork("10.245.0.0/16")]
BLOCKS = [IPNetwork(f"10.{p}.0.{i * 64}/26") for p in (244, 245) for i in range(4)]
BLOCKS.append(IPNetwork("10.99.0.0/26"))  # in no pool
POOL6 = IPNetwork("fd00:10:244::/48")
BLOCKS6 = [IPNetwork(f"fd00:10:244::{i * 64:x}/122") for i in range(3)]
MACS = ["02:00:00:00:00:01", "02:00:00:00:00:02"]

modes = st.sampled_from(list(EncapMode))


@st.composite
def underlays(draw: st.DrawFn) -> IPNetwork:
    subnet = draw(st.sampled_from([1, 2]))
    host = draw(st.integers(2, 12))
    prefix = draw(st.sampled_from([24, 24, 32]))
    return IPNetwork(f"10.0.{subnet}.{host}/{prefix}")


@st.composite
def underlays6(draw: st.DrawFn) -> IPNetwork:
    subnet = draw(st.sampled_from([1, 2]))
    host = draw(st.integers(2, 12))
    prefix = draw(st.sampled_from([64, 64, 128]))
    return IPNetwork(f"fd00:0:{subnet}::{host:x}/{prefix}")


tunnel_ips = st.builds(lambda i: IPAddress(f"10.244.0.{i}"), st.integers(1, 60))
# Few addresses: duplicate VTEPs (and their hand-overs between nodes) are common.
few_tunnel_ips = st.builds(lambda i: IPAddress(f"10.244.0.{i}"), st.integers(1, 4))
tunnel_ips6 = st.builds(lambda i: IPAddress(f"fd00:10:244::{i:x}"), st.integers(1, 6))


def mostly(strategy: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """`strategy` three times in four, else None."""
    return st.one_of(st.none(), strategy, strategy, strategy)


@st.composite
def nodes(draw: st.DrawFn, name: str, tunnels: st.SearchStrategy[IPAddress] = tunnel_ips) -> Node:
    return Node(
        name=name,
        ipv4_address=draw(mostly(underlays())),
        ipv4_vxlan_tunnel_addr=draw(mostly(tunnels)),
        ipv4_ipip_tunnel_addr=draw(mostly(tunnels)),
        vxlan_tunnel_mac=draw(st.none() | st.none() | st.sampled_from(MACS)),
        ipv6_vxlan_tunnel_addr=draw(st.none() | tunnel_ips6),
        ipv6_address=draw(st.none() | underlays6()),
        ipv6_vxlan_tunnel_mac=draw(st.none() | st.none() | st.sampled_from(MACS)),
    )


@st.composite
def views(draw: st.DrawFn, tunnels: st.SearchStrategy[IPAddress] = tunnel_ips) -> ClusterView:
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, min_size=1, max_size=5))
    node_list = [draw(nodes(n, tunnels)) for n in names]
    pools = [
        IPPool(
            name=f"p{i}",
            cidr=cidr,
            block_size=26,
            vxlan_mode=draw(modes),
            ipip_mode=draw(modes),
            nat_outgoing=draw(st.booleans()),
            disabled=draw(st.booleans()),
        )
        for i, cidr in enumerate(POOL_CIDRS)
        if i == 0 or draw(st.booleans())
    ]
    if draw(st.booleans()):  # IPv6 pools carry no ipipMode (it is refused for them)
        pools.append(
            IPPool(
                name="p6",
                cidr=POOL6,
                block_size=122,
                vxlan_mode=draw(modes),
                nat_outgoing=draw(st.booleans()),  # NAT66 with an IPv6 underlay
                disabled=draw(st.booleans()),
            )
        )
    owners = st.one_of(st.none(), st.just("ghost"), *[st.sampled_from(names)] * 4)
    blocks = []
    for cidr in draw(
        st.lists(st.sampled_from(BLOCKS + BLOCKS6), unique=True, min_size=1, max_size=7)
    ):
        borrowed = draw(
            st.dictionaries(
                st.builds(lambda o, c=cidr: IPAddress(c.first + o, c.version), st.integers(0, 63)),
                st.sampled_from(NAMES),
                max_size=3,
            )
        )
        blocks.append(BlockInfo(cidr, draw(owners), borrowed))
    return ClusterView(node_list, pools, blocks)


@st.composite
def locals_(draw: st.DrawFn) -> LocalNode:
    # With an IPv6 underlay, IPv6 pods ride vxlan-v6.calico; with only that, the node is
    # IPv6-only (no IPv4 underlay: no vxlan.calico nor tunl0).
    underlay6 = draw(st.none() | underlays6())
    underlay = draw(underlays()) if underlay6 is None else draw(st.none() | underlays())
    return LocalNode(
        name="a",
        underlay_iface="eth0",
        underlay=underlay,
        vxlan_tunnel_addr=draw(mostly(tunnel_ips)),
        ipip_tunnel_addr=draw(mostly(tunnel_ips)),
        mac=draw(st.none() | st.sampled_from(MACS)),
        vxlan_tunnel_addr6=draw(st.none() | tunnel_ips6),
        underlay6=underlay6,
        underlay6_iface="eth0",
        mac6=draw(st.none() | st.none() | st.sampled_from(MACS)),
    )


configs = st.builds(
    DataplaneConfig,
    vxlan_mtu=st.none() | st.sampled_from([1400, 1450]),
    vxlan_mtu_v6=st.none() | st.sampled_from([1380, 1430]),
)


def desired_states() -> st.SearchStrategy[Dataplane]:
    return st.builds(compute, views(), locals_(), configs)


# --- random kernel starting states -----------------------------------------------------------

our_devs = st.sampled_from([VXLAN_DEVICE, IPIP_DEVICE, "eth0"])
small_ips = st.builds(lambda i: IPAddress(f"10.244.0.{i}"), st.integers(1, 8))


def junk_ops() -> st.SearchStrategy[Op]:
    """Ops that leave stale or odd objects of ours behind (failures are fine: skipped)."""
    nh_keys = st.builds(NexthopKey, small_ips, our_devs, st.booleans())
    nhids = st.integers(NHID_BASE - 2, NHID_BASE + 6)
    dsts = st.builds(
        lambda b, p: IPNetwork(f"{b.ip}/{p}").cidr,
        st.sampled_from(BLOCKS),
        st.sampled_from([26, 32]),
    )
    devices = st.one_of(
        st.builds(
            VxlanDevice,
            name=st.just(VXLAN_DEVICE),
            vni=st.sampled_from([4096, 7]),
            port=st.just(4789),
            local=st.just(IPAddress("10.0.1.2")),
            parent=st.just("eth0"),
            mac=st.sampled_from(MACS),
            mtu=st.sampled_from([1450, 1400]),
            address=st.none() | small_ips,
            address6=st.none() | tunnel_ips6,
        ),
        st.builds(IpipDevice, st.just(IPIP_DEVICE), st.sampled_from([1480, 1400]), small_ips),
    )
    routes = st.one_of(
        st.builds(Route, dsts, blackhole=st.just(True)),
        st.builds(Route, dsts, dev=st.sampled_from([VXLAN_DEVICE, IPIP_DEVICE])),
        st.builds(Route, dsts, nexthop=nh_keys),
    )
    return st.one_of(
        st.builds(Op, st.just(Action.SET), devices),
        st.builds(
            Op,
            st.just(Action.SET),
            st.builds(Neighbour, st.just(VXLAN_DEVICE), small_ips, st.sampled_from(MACS)),
        ),
        st.builds(
            Op,
            st.just(Action.SET),
            st.builds(FdbEntry, st.just(VXLAN_DEVICE), st.sampled_from(MACS), small_ips),
        ),
        st.builds(Op, st.just(Action.SET), st.builds(Nexthop, nhids, nh_keys)),
        st.builds(Op, st.just(Action.SET), routes, st.none() | nhids),
    )


foreign_objects = st.one_of(
    st.builds(
        lambda i, g: Nexthop(i, NexthopKey(IPAddress(f"192.168.0.{g}"), "eth0")),
        st.integers(NHID_BASE, NHID_BASE + 8),
        st.integers(1, 9),
    ),
    st.builds(lambda i: Route(IPNetwork(f"192.168.{i}.0/24"), blackhole=True), st.integers(0, 9)),
    st.builds(lambda i: Neighbour("eth0", IPAddress(f"10.0.1.{i}"), MACS[0]), st.integers(1, 9)),
)


@st.composite
def kernels(draw: st.DrawFn) -> FakeKernel:
    supported = draw(st.booleans())
    kernel = FakeKernel(nexthops_supported=supported)
    for obj in draw(st.lists(foreign_objects, max_size=5)):
        kernel.add_foreign(obj)
    # A realistic history: an earlier cluster state fully applied, then junk on top.
    previous = draw(st.none() | desired_states())
    if previous is not None:
        kernel.apply(plan(previous, kernel.read(), nexthops_supported=supported))
    kernel.apply(draw(st.lists(junk_ops(), max_size=12)))
    # Two nexthop objects of ours for one gateway only arise from outside meddling; they
    # take one pass each (test_plan covers it), so keep the one-pass property to the rest.
    seen: set[NexthopKey] = set()
    for nhid, entry in sorted(kernel.nexthops.items()):
        if not entry.foreign and entry.obj in seen:
            kernel.external_delete(Nexthop(nhid, entry.obj))
        seen.add(entry.obj)
    return kernel


def assert_converged(kernel: FakeKernel, want: Dataplane, supported: bool) -> Dataplane:
    got = kernel.read()
    assert got.devices.keys() == want.devices.keys()
    assert all(device_matches(d, got.devices[name]) for name, d in want.devices.items())
    assert got.neighbours == want.neighbours
    assert got.fdb == want.fdb
    assert got.routes == want.routes
    assert (got.nat and got.nat.normalized()) == (want.nat and want.nat.normalized())
    assert (got.nat6 and got.nat6.normalized()) == (want.nat6 and want.nat6.normalized())
    if supported:
        assert set(got.nexthop_ids) == wanted_nexthops(want)
        for r in want.routes:
            if r.nexthop is not None:
                assert got.route_nhids[r] == got.nexthop_ids[r.nexthop]
    else:
        assert got.nexthop_ids == {} and got.route_nhids == {}
    return got


PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(kernel=kernels(), want=desired_states())
def test_one_plan_converges_from_any_state(kernel: FakeKernel, want: Dataplane) -> None:
    supported = kernel.nexthops_supported
    foreign = kernel.foreign_snapshot()
    actual = kernel.read()
    ops = plan(want, actual, nexthops_supported=supported)
    missing_before = kernel.missing_deletes

    result = kernel.apply(ops)

    assert result.failed == []
    if not any(isinstance(op.obj, VxlanDevice | IpipDevice) for op in ops):
        # Without a device recreate, every delete finds its object: nothing was replaced
        # and then deleted again.
        assert kernel.missing_deletes == missing_before
    got = assert_converged(kernel, want, supported)
    assert kernel.foreign_snapshot() == foreign
    assert plan(want, got, nexthops_supported=supported) == []
    assert_only_differences_touched(want, actual, ops)


def assert_only_differences_touched(want: Dataplane, actual: Dataplane, ops: list[Op]) -> None:
    recreated = {
        op.obj.name
        for op in ops
        if isinstance(op.obj, VxlanDevice | IpipDevice)
        and op.obj.name in actual.devices
        and may_recreate(op.obj, actual.devices[op.obj.name])
    }
    have: dict[type, set[Any]] = {
        VxlanDevice: set(actual.devices.values()),
        IpipDevice: set(actual.devices.values()),
        Neighbour: actual.neighbours,
        FdbEntry: actual.fdb,
        Route: actual.routes,
    }
    for op in ops:
        obj = op.obj
        if isinstance(obj, NatOutgoing):  # one whole table per version: touched if it differs
            w, a = (want.nat, actual.nat) if obj.version == 4 else (want.nat6, actual.nat6)
            assert (w and w.normalized()) != (a and a.normalized())
            continue
        if isinstance(obj, TunnelFilter | TunnelHosts):  # likewise, one table per version
            if obj.version == 4:
                assert want.tunnel_filter != actual.tunnel_filter
            else:
                assert want.tunnel_filter6 != actual.tunnel_filter6
            continue
        if op.action is Action.DELETE:
            if isinstance(obj, Nexthop):
                assert actual.nexthop_ids.get(obj.key) == obj.id
            else:
                assert obj in have[type(obj)]
            continue
        if isinstance(obj, Nexthop):
            assert obj.key not in actual.nexthop_ids or obj.key.dev in recreated
            continue
        on_recreated = getattr(obj, "dev", None) in recreated or (
            isinstance(obj, Route) and obj.nexthop is not None and obj.nexthop.dev in recreated
        )
        nhid_changed = isinstance(obj, Route) and actual.route_nhids.get(obj) != op.nhid
        assert obj not in have[type(obj)] or on_recreated or nhid_changed, op


@PROPS
@given(kernel=kernels(), want=desired_states())
def test_restart_on_a_converged_kernel_changes_nothing(kernel: FakeKernel, want: Dataplane) -> None:
    supported = kernel.nexthops_supported
    kernel.apply(plan(want, kernel.read(), nexthops_supported=supported))
    calls = len(kernel.log)
    # A new agent process: no memory, reads the kernel and plans.
    assert plan(want, kernel.read(), nexthops_supported=supported) == []
    assert len(kernel.log) == calls


@PROPS
@given(history=st.lists(desired_states(), min_size=1, max_size=4), supported=st.booleans())
def test_end_state_does_not_depend_on_the_path(history: list[Dataplane], supported: bool) -> None:
    walked = FakeKernel(nexthops_supported=supported)
    for state in history:
        assert walked.apply(plan(state, walked.read(), nexthops_supported=supported)).failed == []
    direct = FakeKernel(nexthops_supported=supported)
    direct.apply(plan(history[-1], direct.read(), nexthops_supported=supported))
    a, b = walked.read(), direct.read()
    assert dataclasses.replace(a, nexthop_ids={}, route_nhids={}) == dataclasses.replace(
        b, nexthop_ids={}, route_nhids={}
    )
    assert set(a.nexthop_ids) == set(b.nexthop_ids)


@PROPS
@given(view=views(), local=locals_())
def test_compute_output_is_well_formed(view: ClusterView, local: LocalNode) -> None:
    dp = compute(view, local)
    keys = [(r.table, r.dst) for r in dp.routes]
    assert len(keys) == len(set(keys))  # one route per kernel key
    assert len({(n.dev, n.ip) for n in dp.neighbours}) == len(dp.neighbours)
    assert len({(f.dev, f.mac) for f in dp.fdb}) == len(dp.fdb)
    for r in dp.routes:
        assert [r.nexthop is not None, r.blackhole, r.dev is not None].count(True) == 1
        dev = r.dev or (r.nexthop.dev if r.nexthop else None)
        assert dev in (None, "eth0", *dp.devices)
    assert dp.nexthops == {r.nexthop for r in dp.routes if r.nexthop}
    assert compute(view, local) == dp


@PROPS
@given(local=locals_(), cfg=configs, first=views(), second=views(), supported=st.booleans())
def test_cluster_change_on_one_node_is_exact(
    local: LocalNode, cfg: DataplaneConfig, first: ClusterView, second: ClusterView, supported: bool
) -> None:
    """The everyday case: same node, the cluster changed. Every op hits a real difference:
    no delete misses its object (nothing replaced and then deleted), no set repeats one."""
    kernel = FakeKernel(nexthops_supported=supported)
    kernel.apply(plan(compute(first, local, cfg), kernel.read(), nexthops_supported=supported))
    want = compute(second, local, cfg)
    actual = kernel.read()
    ops = plan(want, actual, nexthops_supported=supported)

    assert kernel.apply(ops).failed == []

    assert kernel.missing_deletes == 0
    assert_converged(kernel, want, supported)
    assert_only_differences_touched(want, actual, ops)


@settings(PROPS, max_examples=200)
@given(
    local=locals_(),
    cfg=configs,
    history=st.lists(views(st.one_of(tunnel_ips, few_tunnel_ips)), min_size=2, max_size=6),
    keep=st.lists(st.booleans(), min_size=40, max_size=40),
)
def test_compute_with_a_cache_equals_compute_without(
    local: LocalNode,
    cfg: DataplaneConfig,
    history: list[ClusterView],
    keep: list[bool],
) -> None:
    """The agent keeps one ComputeCache across views. Later views reuse some Node and
    BlockInfo objects of the previous one (as the watch does for unchanged records), so the
    cache is hit, missed and invalidated; the result must always equal a fresh compute."""
    cache = ComputeCache()
    flips = iter(keep * 6)
    previous: ClusterView | None = None
    for view in history:
        if previous is not None:
            nodes = {
                name: previous.nodes[name] if name in previous.nodes and next(flips) else node
                for name, node in view.nodes.items()
            }
            old = [b for b in previous.blocks if next(flips)]
            taken = {b.cidr for b in old}
            # Same pools: a pool change starts the cache over, which would hide its reuse.
            view = ClusterView(
                nodes, previous.pools, [*old, *(b for b in view.blocks if b.cidr not in taken)]
            )
        assert compute(view, local, cfg, cache) == compute(view, local, cfg)
        previous = view
