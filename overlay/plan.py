"""plan(): desired vs actual dataplane -> ordered kernel operations. PURE.

`actual` holds only what is ours (the reader filters by device name and route protocol),
so whatever plan() deletes is ours by construction; foreign objects are never seen.

Order, and why:
  1. device sets        everything else hangs off the devices
  2. neighbour, FDB sets  before routes, or the kernel would ARP for the gateway
  3. nexthop sets       routes reference nexthops by id
  4. route sets
  5. route deletes      before nexthop deletes: deleting a nexthop takes its routes with it
  6. nexthop deletes
  7. neighbour, FDB deletes
  8. device deletes     last: a deleted device takes all of the above with it

Every SET is a create-or-replace keyed the way the kernel keys the object (a route by table
and prefix, a neighbour by device and address, an FDB entry by device and MAC), so an
object that changed is replaced in place and the old one is not deleted separately.

A device SET whose difference is more than MTU or address may make the kernel layer
recreate the device, which wipes everything on it. plan() then re-sets that device's
dependents too (a replace is harmless if the device survived) and still emits deletes for
its stale ones: the kernel layer must count a delete of something already gone as done.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import netaddr

from overlay.model import (
    Action,
    Dataplane,
    Device,
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

# First nexthop id we hand out. High, so ids that people or other tools pick by hand
# (ip nexthop add id 1 ...) rarely meet ours; foreign ids in use are skipped anyway.
NHID_BASE = 0x10000


def plan(
    desired: Dataplane,
    actual: Dataplane,
    *,
    nexthops_supported: bool = True,
    nhid_base: int = NHID_BASE,
    ids: dict[NexthopKey, int] | None = None,
) -> list[Op]:
    """The operations that turn `actual` (ours only) into `desired`, in a safe order.

    `desired.nexthops` must hold every nexthop its routes use (compute() guarantees it).
    `ids`: assign_nexthop_ids(desired, actual) if the caller has it already (it then gives
    the same to settled()).
    Differences are found with set operations, so a pass that changes little stays cheap at
    50k peers; only what changes is looked at one by one (and sorted, for stable logs)."""
    sets: list[Op] = []
    deletes: list[Op] = []

    # 1. Devices, and which of them may be recreated (dependents then count as absent).
    recreated: set[str] = set()
    for name in sorted(desired.devices):
        want, have = desired.devices[name], actual.devices.get(name)
        if not device_matches(want, have):
            sets.append(Op(Action.SET, want))
            if have is not None and may_recreate(want, have):
                recreated.add(name)

    # 2. Neighbours and FDB entries.
    neigh_sets, neigh_deletes = _diff(
        desired.neighbours, actual.neighbours, _neigh_key, _NEIGH_ORDER, recreated
    )
    fdb_sets, fdb_deletes = _diff(desired.fdb, actual.fdb, _fdb_key, _FDB_ORDER, recreated)
    sets += [Op(Action.SET, n) for n in neigh_sets] + [Op(Action.SET, f) for f in fdb_sets]

    # 3. Nexthops.
    if ids is None:
        ids = assign_nexthop_ids(
            desired, actual, nexthops_supported=nexthops_supported, nhid_base=nhid_base
        )
    have_nh = actual.nexthop_ids
    # set/dict operations below reuse the stored hashes (no __hash__ call per object).
    nh_sets = set(ids).difference(have_nh)
    if recreated:
        nh_sets |= {k for k in ids if k.dev in recreated}
    sets += [Op(Action.SET, Nexthop(ids[k], k)) for k in _sorted(nh_sets, _NH_ORDER)]
    nh_gone = set(have_nh).difference(desired.nexthops) if nexthops_supported else set(have_nh)
    nh_deletes = [Op(Action.DELETE, Nexthop(have_nh[k], k)) for k in _sorted(nh_gone, _NH_ORDER)]

    # 4./5. Routes: the nhid a route uses in the kernel is part of what must match.
    def route_nhid(route: Route) -> int | None:
        return ids[route.nexthop] if route.nexthop is not None and nexthops_supported else None

    def on_recreated(route: Route) -> bool:
        nh_dev = route.nexthop.dev if route.nexthop is not None else None
        return route.dev in recreated or nh_dev in recreated

    changed = desired.routes - actual.routes
    if recreated or not actual.nhids_verified:
        # Routes already there may still need a set: on a recreated device, or using
        # another nhid than the one of their nexthop (or their own gateway).
        changed |= {
            r
            for r in desired.routes & actual.routes
            if (recreated and on_recreated(r)) or actual.route_nhids.get(r) != route_nhid(r)
        }
    route_sets = _sorted(changed, _ROUTE_ORDER)
    stale = actual.routes - desired.routes
    if stale:
        set_keys = {_route_key(r) for r in route_sets}
        stale = {r for r in stale if _route_key(r) not in set_keys}
    sets += [Op(Action.SET, r, route_nhid(r)) for r in route_sets]
    deletes += [Op(Action.DELETE, r, _nhid_in(actual, r)) for r in _sorted(stale, _ROUTE_ORDER)]

    # NAT-outgoing: one nftables table per IP version, replaced whole when it differs.
    n4_sets, n4_deletes = _nat_ops(4, desired.nat, actual.nat)
    n6_sets, n6_deletes = _nat_ops(6, desired.nat6, actual.nat6)
    sets += n4_sets + n6_sets
    deletes += n4_deletes + n6_deletes

    # The tunnel ingress filters: one nftables table per outer IP version. Deletes go last,
    # after the devices (the tunnels stay filtered while they exist).
    f4_sets, f4_deletes = _filter_ops(4, desired.tunnel_filter, actual.tunnel_filter)
    f6_sets, f6_deletes = _filter_ops(6, desired.tunnel_filter6, actual.tunnel_filter6)
    sets += f4_sets + f6_sets

    # 6.-8.
    deletes += nh_deletes
    deletes += [Op(Action.DELETE, n) for n in neigh_deletes]
    deletes += [Op(Action.DELETE, f) for f in fdb_deletes]
    deletes += [
        Op(Action.DELETE, actual.devices[name])
        for name in sorted(actual.devices)
        if name not in desired.devices
    ]
    return sets + deletes + f4_deletes + f6_deletes


def _check_version(name: str, version: int, want: NatOutgoing | TunnelFilter | None) -> None:
    """Refuse a table object in the Dataplane field of the other IP version (`name`,
    without its "6"): its ops go to the table of its own version, which they would
    overwrite."""
    if want is not None and want.version != version:
        field_name = name if version == 4 else f"{name}6"
        raise ValueError(f"{field_name}: version {want.version}, must be {version}")


def _nat_ops(
    version: int, want: NatOutgoing | None, have: NatOutgoing | None
) -> tuple[list[Op], list[Op]]:
    """(sets, deletes) for the NAT-outgoing table of IP `version`: compared in the form
    the kernel holds (normalized), replaced whole when that differs."""
    _check_version("nat", version, want)
    want_n = want.normalized() if want is not None else None
    have_n = have.normalized() if have is not None else None
    if want_n == have_n:
        return [], []
    if want_n is not None:
        return [Op(Action.SET, want_n)], []
    assert have is not None
    return [], [Op(Action.DELETE, have)]  # a delete: `have` names the table


def _filter_ops(
    version: int, want: TunnelFilter | None, have: TunnelFilter | None
) -> tuple[list[Op], list[Op]]:
    """(sets, deletes) for the tunnel filter table of IP `version`: replaced whole, or,
    when only its address set differs, the addresses added and removed in place."""
    _check_version("tunnel_filter", version, want)
    if want == have:
        return [], []
    if want is None:
        assert have is not None
        return [], [Op(Action.DELETE, have)]
    if have is None or _filter_rules(want) != _filter_rules(have):
        return [Op(Action.SET, want)], []
    change = TunnelHosts(want.hosts - have.hosts, have.hosts - want.hosts, version)
    return [Op(Action.SET, change)], []


def _filter_rules(f: TunnelFilter) -> tuple[object, ...]:
    """What of a tunnel filter a change of its node addresses leaves as it is."""
    return (f.vxlan_port, f.ipip, f.external, f.version)


def _nhid_in(actual: Dataplane, route: Route) -> int | None:
    """The nhid a route of `actual` uses (for the log of its deletion)."""
    nhid = actual.route_nhids.get(route)
    if nhid is None and actual.nhids_verified and route.nexthop is not None:
        nhid = actual.nexthop_ids.get(route.nexthop)
    return nhid


def device_matches(want: Device, have: Device | None) -> bool:
    """Whether the device as read (`have`) is as desired; a TX checksum offload the desired
    state leaves alone (None) matches either setting."""
    if have is not None and want.tx_checksum is None:
        have = dataclasses.replace(have, tx_checksum=None)
    return have == want


def may_recreate(want: Device, have: Device) -> bool:
    """Whether turning `have` into `want` may need a new device (more than MTU, address or
    TX checksum offload, which change in place)."""
    if type(want) is not type(have):
        return True
    fixed = dataclasses.replace(
        have, mtu=want.mtu, address=want.address, tx_checksum=want.tx_checksum
    )
    if isinstance(fixed, VxlanDevice) and isinstance(want, VxlanDevice):
        fixed = dataclasses.replace(fixed, address6=want.address6)
    return fixed != want


def wanted_nexthops(desired: Dataplane) -> set[NexthopKey]:
    """Every nexthop the routes use plus any extra asked for (== desired.nexthops for the
    output of compute())."""
    return set(desired.nexthops) | {r.nexthop for r in desired.routes if r.nexthop is not None}


def assign_nexthop_ids(
    desired: Dataplane,
    actual: Dataplane,
    *,
    nexthops_supported: bool = True,
    nhid_base: int = NHID_BASE,
) -> dict[NexthopKey, int]:
    """Kernel ids for the desired nexthops: the kernel's own where the key exists, else the
    smallest ids from `nhid_base` up that nothing (ours or foreign) uses, in key order."""
    if not nexthops_supported:
        return {}
    have = actual.nexthop_ids
    ids = dict(have)
    for key in set(have).difference(desired.nexthops):
        del ids[key]
    new = desired.nexthops.difference(have)
    if not new:
        return ids
    in_use = set(have.values()) | set(actual.route_nhids.values()) | actual.foreign_nexthop_ids
    candidate = nhid_base
    for key in _sorted(new, _NH_ORDER):  # sorted: the same input gives the same ids
        while candidate in in_use:
            candidate += 1
        ids[key] = candidate
        in_use.add(candidate)
    return ids


def settled(
    desired: Dataplane,
    actual: Dataplane,
    *,
    nexthops_supported: bool = True,
    nhid_base: int = NHID_BASE,
    ids: dict[NexthopKey, int] | None = None,
) -> Dataplane:
    """What the kernel holds after every op of plan(desired, actual) succeeded: the desired
    objects, each route on the nhid of its nexthop. (A re-read would also fill route_nhids;
    nhids_verified says it is not needed.)"""
    if ids is None:
        ids = assign_nexthop_ids(
            desired, actual, nexthops_supported=nexthops_supported, nhid_base=nhid_base
        )
    return Dataplane(
        devices=dict(desired.devices),
        neighbours=set(desired.neighbours),
        fdb=set(desired.fdb),
        nexthops=set(ids),
        nexthop_ids=ids,
        routes=set(desired.routes),
        foreign_nexthop_ids=set(actual.foreign_nexthop_ids),
        nat=desired.nat,
        nat6=desired.nat6,
        tunnel_filter=desired.tunnel_filter,
        tunnel_filter6=desired.tunnel_filter6,
        nhids_verified=True,
    )


def _diff(
    desired: set[Any],
    actual: set[Any],
    key: Any,
    order: _Order,
    recreated: set[str],
) -> tuple[list[Any], list[Any]]:
    """(to set, to delete) for objects keyed like the kernel keys them. Actual objects on a
    `recreated` device may have vanished with it, so they count as absent."""
    present = {o for o in actual if o.dev not in recreated} if recreated else actual
    to_set = _sorted(desired - present, order)
    stale = actual - desired
    if stale:
        set_keys = {key(o) for o in to_set}
        stale = {o for o in stale if key(o) not in set_keys}
    return to_set, _sorted(stale, order)


def _neigh_key(n: Neighbour) -> Hashable:
    return (n.dev, n.ip)


def _fdb_key(f: FdbEntry) -> Hashable:
    return (f.dev, f.mac)


def _route_key(r: Route) -> tuple[int, netaddr.IPNetwork]:
    return (r.table, r.dst)


# Sort orders (for stable logs and nexthop ids), most significant field first. Sorting 200k
# objects by tuples of fields was the largest part of a first plan at 50k peers: _sorted()
# sorts by one field at a time instead, least significant first (stable sorts), each pass
# comparing plain values through a C getter; a field with one value for all costs one scan.
_Order = tuple[Callable[[Any], Any], ...]
_NH_ORDER: _Order = tuple(map(operator.attrgetter, ("gateway.value", "dev", "onlink")))
_ROUTE_ORDER: _Order = tuple(map(operator.attrgetter, ("table", "dst.first", "dst.prefixlen")))
_NEIGH_ORDER: _Order = tuple(map(operator.attrgetter, ("dev", "ip.value")))  # unique per kernel
_FDB_ORDER: _Order = tuple(map(operator.attrgetter, ("dev", "mac", "dst.value")))


def _sorted(items: Iterable[Any], order: _Order) -> list[Any]:
    out = list(items)
    for key in reversed(order):
        out.sort(key=key)
    return out
