from __future__ import annotations

import dataclasses

import pytest
from netaddr import IPAddress, IPNetwork

from ipam.model import EncapMode
from overlay.model import (
    VXLAN_DEVICE,
    Action,
    Dataplane,
    FdbEntry,
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
from overlay.plan import NHID_BASE, plan, settled
from overlay.tests.fake_kernel import FakeKernel
from overlay.tests.scenarios import desired, node, pool, standard_view
from overlay.view import ClusterView

CROSS, ALWAYS = EncapMode.CROSS_SUBNET, EncapMode.ALWAYS


def converge(kernel: FakeKernel, want: Dataplane, nexthops_supported: bool = True) -> list[Op]:
    ops = plan(want, kernel.read(), nexthops_supported=nexthops_supported)
    result = kernel.apply(ops)
    assert result.failed == []
    return ops


def kinds(ops: list[Op]) -> list[tuple[str, str]]:
    """(action, type) sequence with consecutive repeats collapsed."""
    out: list[tuple[str, str]] = []
    for op in ops:
        k = (op.action.value, type(op.obj).__name__)
        if not out or out[-1] != k:
            out.append(k)
    return out


def test_plan_of_state_as_read_is_empty() -> None:
    want = desired(standard_view(pool(CROSS)))
    kernel = FakeKernel()
    assert converge(kernel, want)
    assert plan(want, kernel.read()) == []


def test_first_plan_order_is_devices_l2_nexthops_routes_then_the_filter() -> None:
    ops = plan(desired(standard_view(pool(CROSS))), Dataplane())
    assert kinds(ops) == [
        ("set", "VxlanDevice"),
        ("set", "Neighbour"),
        ("set", "FdbEntry"),
        ("set", "Nexthop"),
        ("set", "Route"),
        ("set", "TunnelFilter"),
    ]
    nh_ids = {op.obj.key: op.obj.id for op in ops if isinstance(op.obj, Nexthop)}
    for op in ops:
        if isinstance(op.obj, Route):
            assert op.nhid == (nh_ids[op.obj.nexthop] if op.obj.nexthop else None)


def test_teardown_order_is_routes_nexthops_l2_devices_then_the_filter() -> None:
    kernel = FakeKernel()
    converge(kernel, desired(standard_view(pool(ALWAYS))))
    ops = converge(kernel, Dataplane())
    assert kinds(ops) == [
        ("delete", "Route"),
        ("delete", "Nexthop"),
        ("delete", "Neighbour"),
        ("delete", "FdbEntry"),
        ("delete", "VxlanDevice"),
        ("delete", "TunnelFilter"),
    ]
    assert kernel.read() == Dataplane()
    assert kernel.missing_deletes == 0


def test_nexthop_ids_are_reused_and_new_ones_avoid_every_id_in_use() -> None:
    view = standard_view(pool(ALWAYS))
    kernel = FakeKernel()
    kernel.add_foreign(Nexthop(NHID_BASE + 3, NexthopKey(IPAddress("192.0.2.1"), "eth0")))
    ops = converge(kernel, desired(view))
    first_ids = kernel.read().nexthop_ids
    assert sorted(first_ids.values()) == [NHID_BASE, NHID_BASE + 1, NHID_BASE + 2]
    assert all(op.obj.id != NHID_BASE + 3 for op in ops if isinstance(op.obj, Nexthop))

    # Drop peer b: its nexthop goes, the others keep their ids, and a new peer's nexthop
    # takes the smallest free id, not the foreign one.
    nodes = [n for name, n in view.nodes.items() if name != "b"]
    converge(kernel, desired(standard_view(pool(ALWAYS), nodes=nodes)))
    second = kernel.read().nexthop_ids
    assert {k: v for k, v in first_ids.items() if k in second} == second
    nodes.append(dataclasses.replace(node("b"), ipv4_vxlan_tunnel_addr=IPAddress("10.244.0.99")))
    converge(kernel, desired(standard_view(pool(ALWAYS), nodes=nodes)))
    third = kernel.read().nexthop_ids
    new = set(third.values()) - set(second.values())
    assert new == {first_ids[NexthopKey(IPAddress("10.244.0.65"), VXLAN_DEVICE)]}


def test_changed_route_is_replaced_not_deleted() -> None:
    kernel = FakeKernel()
    converge(kernel, desired(standard_view(pool(ALWAYS))))
    ops = converge(kernel, desired(standard_view(pool(CROSS))))
    # b moves from VXLAN to direct: one new nexthop, one route re-pointed, old nexthop gone.
    assert [op.action for op in ops if isinstance(op.obj, Route)] == [Action.SET]
    assert [(op.action, type(op.obj)) for op in ops if isinstance(op.obj, Nexthop)] == [
        (Action.SET, Nexthop),
        (Action.DELETE, Nexthop),
    ]
    assert plan(desired(standard_view(pool(CROSS))), kernel.read()) == []


def test_route_with_own_gateway_is_reset_onto_a_nexthop_object() -> None:
    want = desired(standard_view(pool(ALWAYS)))
    kernel = FakeKernel()
    converge(kernel, want, nexthops_supported=False)
    actual = kernel.read()
    assert actual.nexthop_ids == {} and actual.routes == want.routes
    ops = converge(kernel, want)
    assert {op.obj for op in ops if isinstance(op.obj, Route)} == {
        r for r in want.routes if r.nexthop
    }
    assert all(r in kernel.read().route_nhids for r in want.routes if r.nexthop)


def test_route_pointing_at_another_nhid_is_reset() -> None:
    want = desired(standard_view(pool(ALWAYS)))
    kernel = FakeKernel()
    converge(kernel, want)
    route = next(r for r in want.routes if r.nexthop)
    assert route.nexthop is not None
    # Someone added a duplicate nexthop object for the same gateway and moved our route.
    dup = NHID_BASE + 100
    kernel.apply([Op(Action.SET, Nexthop(dup, route.nexthop)), Op(Action.SET, route, dup)])
    actual = kernel.read()
    ours = actual.nexthop_ids[route.nexthop]
    assert actual.route_nhids[route] == dup != ours
    assert plan(want, actual) == [Op(Action.SET, route, ours)]


def test_stale_neighbour_with_new_mac_is_replaced_in_place() -> None:
    want = desired(standard_view(pool(ALWAYS)))
    n = next(iter(want.neighbours))
    actual = dataclasses.replace(
        want, neighbours=(want.neighbours - {n}) | {Neighbour(n.dev, n.ip, "02:00:00:00:00:09")}
    )
    assert plan(want, actual, nexthops_supported=False) == [Op(Action.SET, n)]


def test_device_mtu_change_touches_only_the_device() -> None:
    kernel = FakeKernel()
    want = desired(standard_view(pool(ALWAYS)))
    converge(kernel, want)
    dev = want.devices[VXLAN_DEVICE]
    assert isinstance(dev, VxlanDevice)
    want2 = dataclasses.replace(want, devices={VXLAN_DEVICE: dataclasses.replace(dev, mtu=1400)})
    assert converge(kernel, want2) == [Op(Action.SET, want2.devices[VXLAN_DEVICE])]


def test_tx_checksum_offload_is_managed_only_when_asked_and_changes_in_place() -> None:
    kernel = FakeKernel()
    want = desired(standard_view(pool(ALWAYS)))
    converge(kernel, want)
    dev = want.devices[VXLAN_DEVICE]
    assert dev.tx_checksum is None
    # Left alone: whatever the device has (on, as Linux makes it, or turned off by hand).
    assert kernel.read().devices[VXLAN_DEVICE].tx_checksum is True
    assert plan(want, kernel.read()) == []
    kernel.devices[VXLAN_DEVICE] = dataclasses.replace(dev, tx_checksum=False)
    assert plan(want, kernel.read()) == []
    # Asked off: one device op, and nothing hanging off the device is re-set.
    kernel.devices[VXLAN_DEVICE] = dataclasses.replace(dev, tx_checksum=True)
    off = dataclasses.replace(
        want, devices={VXLAN_DEVICE: dataclasses.replace(dev, tx_checksum=False)}
    )
    assert converge(kernel, off) == [Op(Action.SET, off.devices[VXLAN_DEVICE])]
    assert kernel.read().devices[VXLAN_DEVICE].tx_checksum is False
    assert plan(off, kernel.read()) == []


def test_incompatible_device_change_reprograms_its_dependents() -> None:
    kernel = FakeKernel()
    want = desired(standard_view(pool(ALWAYS)))
    converge(kernel, want)
    dev = want.devices[VXLAN_DEVICE]
    assert isinstance(dev, VxlanDevice)
    want2 = dataclasses.replace(want, devices={VXLAN_DEVICE: dataclasses.replace(dev, vni=7)})
    converge(kernel, want2)  # the fake recreates the device, wiping what hung off it
    actual = kernel.read()
    assert actual.neighbours == want2.neighbours and actual.fdb == want2.fdb
    assert actual.routes == want2.routes
    assert plan(want2, actual) == []


def test_nexthops_unsupported_gives_gateway_routes_and_no_nexthop_ops() -> None:
    kernel = FakeKernel(nexthops_supported=False)
    want = desired(standard_view(pool(CROSS)))
    ops = converge(kernel, want, nexthops_supported=False)
    assert not any(isinstance(op.obj, Nexthop) for op in ops)
    assert all(op.nhid is None for op in ops)
    assert plan(want, kernel.read(), nexthops_supported=False) == []


def test_plan_is_deterministic() -> None:
    want = desired(standard_view(pool(CROSS)))
    view2 = standard_view(pool(CROSS))
    want2 = desired(ClusterView(view2.nodes, view2.pools, reversed(view2.blocks)))
    assert plan(want, Dataplane()) == plan(want2, Dataplane())


def test_only_actual_objects_are_deleted() -> None:
    actual = Dataplane(
        fdb={FdbEntry(VXLAN_DEVICE, "66:00:00:00:00:01", IPAddress("10.0.9.9"))},
        routes={Route(IPNetwork("10.9.0.0/26"), blackhole=True)},
    )
    ops = plan(Dataplane(), actual)
    assert {op.obj for op in ops} == actual.fdb | actual.routes
    assert all(op.action is Action.DELETE for op in ops)


def test_duplicate_nexthop_made_by_someone_else_goes_within_two_passes() -> None:
    kernel = FakeKernel()
    want = desired(standard_view(pool(ALWAYS)))
    converge(kernel, want)
    key = next(iter(want.nexthops))
    kernel.apply([Op(Action.SET, Nexthop(NHID_BASE + 50, key))])  # ours by protocol, a twin
    # Pass 1 keeps the lowest id; the twin is reported as taken, so it is never reused.
    assert plan(want, kernel.read()) == []
    assert NHID_BASE + 50 in kernel.read().foreign_nexthop_ids
    # Once the cluster drops that gateway, both go, one per pass.
    smaller = Dataplane(devices=want.devices)
    converge(kernel, smaller)
    converge(kernel, smaller)
    assert plan(smaller, kernel.read()) == []
    assert kernel.read() == Dataplane(devices=kernel.devices)


# --- the IPv6 tunnel filter (vxlan-v6.calico) ----------------------------------------------

H1, H2, H3 = (IPAddress(f"2001:db8::{i}") for i in (1, 2, 3))


def filter6(*hosts: IPAddress, port: int = 4789) -> TunnelFilter:
    return TunnelFilter(frozenset(hosts), port, False, version=6)


def test_the_ipv6_filter_is_set_changed_in_place_and_deleted_like_the_ipv4_one() -> None:
    kernel = FakeKernel()
    first = filter6(H1, H2)
    assert converge(kernel, Dataplane(tunnel_filter6=first)) == [Op(Action.SET, first)]
    assert kernel.tunnel_filter6 == first and kernel.tunnel_filter is None
    assert plan(Dataplane(tunnel_filter6=first), kernel.read()) == []
    # Only the node addresses differ: changed in place, in the ip6 table.
    moved = filter6(H2, H3)
    change = TunnelHosts(add=frozenset({H3}), remove=frozenset({H1}), version=6)
    assert converge(kernel, Dataplane(tunnel_filter6=moved)) == [Op(Action.SET, change)]
    assert kernel.tunnel_filter6 == moved
    # A rule differs (the VXLAN port): the table is replaced whole.
    ported = filter6(H2, H3, port=8472)
    assert converge(kernel, Dataplane(tunnel_filter6=ported)) == [Op(Action.SET, ported)]
    assert converge(kernel, Dataplane()) == [Op(Action.DELETE, ported)]
    assert kernel.read() == Dataplane()


def test_an_empty_ipv6_filter_is_deleted_from_the_ip6_table() -> None:
    empty = filter6()  # no address to tell its version by: its `version` field does
    assert plan(Dataplane(), Dataplane(tunnel_filter6=empty)) == [Op(Action.DELETE, empty)]
    assert empty.version == 6 and empty != TunnelFilter(frozenset(), 4789, False)


def test_the_two_filters_are_planned_apart_and_deleted_after_the_devices() -> None:
    kernel = FakeKernel()
    want = desired(standard_view(pool(ALWAYS)))
    assert want.tunnel_filter is not None
    want.tunnel_filter6 = filter6(H1)
    converge(kernel, want)
    assert (kernel.tunnel_filter, kernel.tunnel_filter6) == (want.tunnel_filter, filter6(H1))
    # Hosts of the IPv6 filter alone: nothing of the IPv4 one is touched.
    want.tunnel_filter6 = filter6(H1, H2)
    added = TunnelHosts(add=frozenset({H2}), remove=frozenset(), version=6)
    assert converge(kernel, want) == [Op(Action.SET, added)]
    ops = converge(kernel, Dataplane())
    assert kinds(ops)[-2:] == [("delete", "VxlanDevice"), ("delete", "TunnelFilter")]
    assert [op.obj for op in ops[-2:]] == [want.tunnel_filter, want.tunnel_filter6]
    assert kernel.read() == Dataplane()


def test_settled_holds_the_ipv6_filter() -> None:
    want = Dataplane(tunnel_filter6=filter6(H1))
    assert settled(want, Dataplane()).tunnel_filter6 == want.tunnel_filter6


def test_a_filter_of_the_wrong_version_is_refused_naming_the_field() -> None:
    # Its ops would go to the other version's table and replace that.
    with pytest.raises(ValueError, match="tunnel_filter6: version 4, must be 6"):
        plan(Dataplane(tunnel_filter6=TunnelFilter(frozenset(), 4789, False)), Dataplane())
    with pytest.raises(ValueError, match="tunnel_filter: version 6, must be 4"):
        plan(Dataplane(tunnel_filter=filter6()), Dataplane())


# --- NAT66: the IPv6 NAT-outgoing table --------------------------------------------------

POOL6, OTHER6 = IPNetwork("fd00:10:244::/48"), IPNetwork("fd00:10:246::/48")


def nat6(*sources: IPNetwork) -> NatOutgoing:
    return NatOutgoing(frozenset(sources), frozenset({POOL6, OTHER6}), version=6)


def test_the_ipv6_nat_table_is_set_replaced_and_deleted_apart_from_the_ipv4_one() -> None:
    kernel = FakeKernel()
    want = desired(standard_view(pool(ALWAYS, nat=True)))
    assert want.nat is not None
    want.nat6 = nat6(POOL6)
    converge(kernel, want)
    assert (kernel.nat, kernel.nat6) == (want.nat, nat6(POOL6))
    assert plan(want, kernel.read()) == []
    # Another IPv6 source: the ip6 table alone is replaced whole.
    want.nat6 = nat6(POOL6, OTHER6)
    assert converge(kernel, want) == [Op(Action.SET, nat6(POOL6, OTHER6))]
    assert kernel.nat == want.nat
    # No IPv6 NAT any more: only the ip6 table goes, named by the state it had.
    want.nat6 = None
    assert converge(kernel, want) == [Op(Action.DELETE, nat6(POOL6, OTHER6))]
    assert (kernel.nat, kernel.nat6) == (want.nat, None)
    # And the IPv4 table goes without touching an IPv6 one.
    want.nat6, kernel.nat6 = nat6(POOL6), nat6(POOL6)
    ops = converge(kernel, dataclasses.replace(want, nat=None))
    assert [op.obj for op in ops] == [want.nat] and ops[0].action is Action.DELETE
    assert kernel.nat6 == nat6(POOL6)


def test_the_ipv6_nat_table_is_compared_in_the_form_the_kernel_holds() -> None:
    # Overlapping sources are merged by nft: the merged read-back is no difference.
    half = IPNetwork("fd00:10:244:8000::/49")
    assert plan(Dataplane(nat6=nat6(POOL6, half)), Dataplane(nat6=nat6(POOL6))) == []
    # A table that NATs nothing of its version is none: set, it would only be deleted.
    v4_only = NatOutgoing(frozenset({IPNetwork("10.244.0.0/16")}), frozenset(), version=6)
    assert plan(Dataplane(nat6=v4_only), Dataplane()) == []


def test_settled_holds_the_ipv6_nat_table() -> None:
    want = Dataplane(nat6=nat6(POOL6))
    assert settled(want, Dataplane()).nat6 == want.nat6


def test_a_nat_table_of_the_wrong_version_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="nat6: version 4, must be 6"):
        plan(Dataplane(nat6=NatOutgoing(frozenset({POOL6}), frozenset())), Dataplane())
    with pytest.raises(ValueError, match="nat: version 6, must be 4"):
        plan(Dataplane(nat=nat6(POOL6)), Dataplane())
