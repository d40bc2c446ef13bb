"""A fake kernel behind the KernelPort shape: read() -> Dataplane, apply(ops) -> result.

It keys objects the way Linux does (route: table + prefix; neighbour: device + address; FDB:
device + MAC; nexthop: id; device: name) and copies the cascades that matter to a
reconciler: deleting or recreating a device removes everything on it, deleting a nexthop
removes the routes that use it. Foreign objects live in the same tables, marked foreign:
read() hides them like the real reader does, and a SET that lands on one replaces it, so a
test comparing foreign_snapshot() before and after catches any clobbering.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from overlay.model import (
    Action,
    Dataplane,
    Device,
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

KINDS = ("device", "neighbour", "fdb", "nexthop", "route", "nat", "filter")


@dataclass
class FakeApplyResult:
    done: list[Op] = field(default_factory=list)
    failed: list[tuple[Op, int, str]] = field(default_factory=list)


class KernelError(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.errno = code
        self.msg = msg


def kind_of(obj: object) -> str:
    if isinstance(obj, VxlanDevice | IpipDevice):
        return "device"
    if isinstance(obj, Neighbour):
        return "neighbour"
    if isinstance(obj, FdbEntry):
        return "fdb"
    if isinstance(obj, Nexthop | NexthopKey):
        return "nexthop"
    if isinstance(obj, Route):
        return "route"
    if isinstance(obj, NatOutgoing):
        return "nat"
    if isinstance(obj, TunnelFilter | TunnelHosts):
        return "filter"
    raise TypeError(f"not a dataplane object: {obj!r}")


def _table_attr(obj: NatOutgoing | TunnelFilter | TunnelHosts) -> str:
    """The FakeKernel (and Dataplane) field holding the table of `obj`'s kind and version:
    nat, nat6, tunnel_filter or tunnel_filter6."""
    name = "nat" if isinstance(obj, NatOutgoing) else "tunnel_filter"
    return name if obj.version == 4 else f"{name}6"


@dataclass
class _Entry:
    obj: Any
    foreign: bool = False
    nhid: int | None = None  # routes only


class FakeKernel:
    def __init__(
        self, *, links: Iterable[str] = ("lo", "eth0"), nexthops_supported: bool = True
    ) -> None:
        self.links = set(links)  # foreign devices that exist (underlay interface, ...)
        self.nexthops_supported = nexthops_supported
        self.devices: dict[str, Device] = {}
        self.nat: NatOutgoing | None = None
        self.nat6: NatOutgoing | None = None
        self.tunnel_filter: TunnelFilter | None = None
        self.tunnel_filter6: TunnelFilter | None = None
        self.nft_pids: frozenset[int] = frozenset()  # what own_nft_pids() answers
        self.neighbours: dict[Hashable, _Entry] = {}
        self.fdb: dict[Hashable, _Entry] = {}
        self.nexthops: dict[int, _Entry] = {}
        self.routes: dict[Hashable, _Entry] = {}
        self.log: list[tuple[Op, bool]] = []  # every op applied, and whether it succeeded
        self.apply_calls = 0
        self.reads = 0
        self.missing_deletes = 0  # deletes of things already gone (counted as done)
        self._fail: dict[str, deque[int]] = {}

    # --- the port -------------------------------------------------------------------------

    def read(self) -> Dataplane:
        self.reads += 1
        self._maybe_fail("read")
        dp = Dataplane(devices=dict(self.devices))
        dp.neighbours = {e.obj for e in self.neighbours.values() if not e.foreign}
        dp.fdb = {e.obj for e in self.fdb.values() if not e.foreign}
        for nhid, e in sorted(self.nexthops.items()):
            # Like the real reader: a key's lowest id is ours; any other id (foreign, or a
            # duplicate of ours made by someone else) is only reported as taken.
            if e.foreign or e.obj in dp.nexthop_ids:
                dp.foreign_nexthop_ids.add(nhid)
            else:
                dp.nexthops.add(e.obj)
                dp.nexthop_ids[e.obj] = nhid
        for e in self.routes.values():
            if e.foreign:
                continue
            route = self._route_as_read(e)
            dp.routes.add(route)
            if e.nhid is not None:
                dp.route_nhids[route] = e.nhid
        dp.nat = self.nat
        dp.nat6 = self.nat6
        dp.tunnel_filter = self.tunnel_filter
        dp.tunnel_filter6 = self.tunnel_filter6
        return dp

    def own_nft_pids(self) -> frozenset[int]:
        return self.nft_pids

    def apply(self, ops: list[Op]) -> FakeApplyResult:
        self.apply_calls += 1
        result = FakeApplyResult()
        for op in ops:
            try:
                self._maybe_fail(kind_of(op.obj))
                self._apply_one(op)
            except KernelError as e:
                result.failed.append((op, e.errno, e.msg))
                self.log.append((op, False))
            else:
                result.done.append(op)
                self.log.append((op, True))
        return result

    # --- test controls --------------------------------------------------------------------

    def fail_next(self, kind: str, code: int = errno.EIO, count: int = 1) -> None:
        """Make the next `count` operations of `kind` (or "read", or "any") fail."""
        if kind not in (*KINDS, "read", "any"):
            raise ValueError(f"kind: {kind!r} is not one of {(*KINDS, 'read', 'any')}")
        self._fail.setdefault(kind, deque()).extend([code] * count)

    def add_foreign(self, obj: object, nhid: int | None = None) -> None:
        """Install an object that is not ours (another protocol, another device)."""
        if isinstance(obj, str):
            self.links.add(obj)
        elif isinstance(obj, Neighbour):
            self.neighbours[(obj.dev, obj.ip)] = _Entry(obj, foreign=True)
        elif isinstance(obj, FdbEntry):
            self.fdb[(obj.dev, obj.mac)] = _Entry(obj, foreign=True)
        elif isinstance(obj, Nexthop):
            self.nexthops[obj.id] = _Entry(obj.key, foreign=True)
        elif isinstance(obj, Route):
            self.routes[(obj.table, obj.dst)] = _Entry(obj, foreign=True, nhid=nhid)
        else:
            raise TypeError(f"cannot add foreign {obj!r}")

    def foreign_snapshot(self) -> dict[str, Any]:
        def pick(table: dict[Any, _Entry]) -> dict[Any, Any]:
            return {k: (e.obj, e.nhid) for k, e in table.items() if e.foreign}

        return copy.deepcopy(
            {
                "links": set(self.links),
                "neighbours": pick(self.neighbours),
                "fdb": pick(self.fdb),
                "nexthops": pick(self.nexthops),
                "routes": pick(self.routes),
            }
        )

    def external_set(self, obj: Neighbour | FdbEntry) -> None:
        """Someone else set a permanent neighbour or FDB entry on our device (drift): the
        kernel has no owner field for those, so it reads back like one of ours."""
        if isinstance(obj, Neighbour):
            self.neighbours[(obj.dev, obj.ip)] = _Entry(obj)
        else:
            self.fdb[(obj.dev, obj.mac)] = _Entry(obj)

    def external_delete(self, obj: object) -> None:
        """Someone else removed one of our objects (drift)."""
        if isinstance(obj, str | VxlanDevice | IpipDevice):
            name = obj if isinstance(obj, str) else obj.name
            del self.devices[name]
            self._wipe_device(name)
        elif isinstance(obj, Neighbour):
            del self.neighbours[(obj.dev, obj.ip)]
        elif isinstance(obj, FdbEntry):
            del self.fdb[(obj.dev, obj.mac)]
        elif isinstance(obj, Nexthop | NexthopKey):
            nhid = obj.id if isinstance(obj, Nexthop) else self._nhid_of(obj)
            del self.nexthops[nhid]
            self._drop_routes(lambda e: e.nhid == nhid)
        elif isinstance(obj, Route):
            del self.routes[(obj.table, obj.dst)]
        else:
            raise TypeError(f"cannot delete {obj!r}")

    def ops_of(self, action: Action | None = None) -> list[Op]:
        return [op for op, _ in self.log if action is None or op.action is action]

    # --- internals ------------------------------------------------------------------------

    def _maybe_fail(self, kind: str) -> None:
        for k in (kind, "any"):
            queue = self._fail.get(k)
            if queue:
                code = queue.popleft()
                raise KernelError(code, f"injected failure for {kind}")

    def _nhid_of(self, key: NexthopKey) -> int:
        return min(i for i, e in self.nexthops.items() if e.obj == key and not e.foreign)

    def _route_as_read(self, e: _Entry) -> Route:
        route: Route = e.obj
        if e.nhid is not None:
            return dataclasses.replace(route, nexthop=self.nexthops[e.nhid].obj)
        return route

    def _dev_exists(self, name: str) -> bool:
        return name in self.devices or name in self.links

    def _require_dev(self, name: str) -> None:
        if not self._dev_exists(name):
            raise KernelError(errno.ENODEV, f"no device {name}")

    def _drop_routes(self, pred: Any) -> None:
        for key in [k for k, e in self.routes.items() if pred(e)]:
            del self.routes[key]

    def _wipe_device(self, name: str) -> None:
        for table in (self.neighbours, self.fdb):
            for key in [k for k, e in table.items() if e.obj.dev == name]:
                del table[key]
        gone = {i for i, e in self.nexthops.items() if e.obj.dev == name}
        for i in gone:
            del self.nexthops[i]

        def uses(e: _Entry) -> bool:
            r: Route = e.obj
            via_dev = e.nhid is None and r.nexthop is not None and r.nexthop.dev == name
            return e.nhid in gone or r.dev == name or via_dev

        self._drop_routes(uses)

    def _apply_one(self, op: Op) -> None:
        obj = op.obj
        if isinstance(obj, NatOutgoing | TunnelFilter):  # one table per IP version, whole
            setattr(self, _table_attr(obj), obj if op.action is Action.SET else None)
            return
        if isinstance(obj, TunnelHosts):  # set elements, like nft: the table must exist
            f = getattr(self, _table_attr(obj))
            if f is None:
                raise KernelError(errno.ENOENT, f"no table overlay-filter (version {obj.version})")
            hosts = (f.hosts | obj.add) - obj.remove
            setattr(self, _table_attr(obj), dataclasses.replace(f, hosts=hosts))
            return
        if op.action is Action.SET:
            self._set(obj, op.nhid)
        else:
            self._delete(obj)

    def _set(self, obj: object, nhid: int | None) -> None:
        if isinstance(obj, VxlanDevice | IpipDevice):
            if obj.name in self.links:
                raise KernelError(errno.EEXIST, f"{obj.name} exists and is not ours")
            have = self.devices.get(obj.name)
            if have is not None and _incompatible(obj, have):
                self._wipe_device(obj.name)
                have = None
            if obj.tx_checksum is None:  # left alone: a new device offloads, like Linux's
                tx = have.tx_checksum if have is not None else True
                obj = dataclasses.replace(obj, tx_checksum=tx)
            self.devices[obj.name] = obj
        elif isinstance(obj, Neighbour):
            self._require_dev(obj.dev)
            self.neighbours[(obj.dev, obj.ip)] = _Entry(obj)
        elif isinstance(obj, FdbEntry):
            self._require_dev(obj.dev)
            self.fdb[(obj.dev, obj.mac)] = _Entry(obj)
        elif isinstance(obj, Nexthop):
            if not self.nexthops_supported:
                raise KernelError(errno.EOPNOTSUPP, "nexthop objects not supported")
            self._require_dev(obj.key.dev)
            self.nexthops[obj.id] = _Entry(obj.key)
        elif isinstance(obj, Route):
            self._set_route(obj, nhid)
        else:
            raise TypeError(f"cannot set {obj!r}")

    def _set_route(self, route: Route, nhid: int | None) -> None:
        if nhid is not None:
            if not self.nexthops_supported:
                raise KernelError(errno.EOPNOTSUPP, "nexthop objects not supported")
            if nhid not in self.nexthops:
                raise KernelError(errno.EINVAL, f"nexthop id {nhid} does not exist")
        elif route.nexthop is not None:
            self._require_dev(route.nexthop.dev)
        elif route.dev is not None:
            self._require_dev(route.dev)
        elif not route.blackhole:
            raise KernelError(errno.EINVAL, f"route {route} has no target")
        self.routes[(route.table, route.dst)] = _Entry(route, nhid=nhid)

    def _delete(self, obj: object) -> None:
        if isinstance(obj, VxlanDevice | IpipDevice):
            if obj.name in self.devices:
                del self.devices[obj.name]
                self._wipe_device(obj.name)
            else:
                self.missing_deletes += 1
            return
        if isinstance(obj, Neighbour):
            table, key = self.neighbours, (obj.dev, obj.ip)
        elif isinstance(obj, FdbEntry):
            table, key = self.fdb, (obj.dev, obj.mac)
        elif isinstance(obj, Nexthop):
            if obj.id in self.nexthops:
                del self.nexthops[obj.id]
                self._drop_routes(lambda e: e.nhid == obj.id)
            else:
                self.missing_deletes += 1
            return
        elif isinstance(obj, Route):
            # The real layer deletes with our protocol and the route's attributes: a
            # foreign or different route under the same prefix does not match.
            entry = self.routes.get((obj.table, obj.dst))
            if entry is not None and not entry.foreign and self._route_as_read(entry) == obj:
                del self.routes[(obj.table, obj.dst)]
            else:
                self.missing_deletes += 1
            return
        else:
            raise TypeError(f"cannot delete {obj!r}")
        if key in table:
            del table[key]
        else:
            self.missing_deletes += 1


def _incompatible(want: Device, have: Device) -> bool:
    """The fake kernel layer recreates a device for anything but an MTU, address or TX
    checksum offload change."""
    if type(want) is not type(have):
        return True
    fixed = dataclasses.replace(
        have, mtu=want.mtu, address=want.address, tx_checksum=want.tx_checksum
    )
    if isinstance(fixed, VxlanDevice) and isinstance(want, VxlanDevice):
        fixed = dataclasses.replace(fixed, address6=want.address6)
    return fixed != want
