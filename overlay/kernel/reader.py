"""Read what is ours from the kernel into an `overlay.model.Dataplane`.

Ownership: our device names; permanent neighbours/FDB entries on our VXLAN device; nexthops
and main-table routes whose protocol is RT_PROTO. Everything else is invisible here. Dumps go
through our own struct decoder: the kernel filters routes by table and protocol (strict
checking), and decoding 50k routes stays well under a second.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

import netaddr

from overlay.kernel import nlmsg
from overlay.kernel.batch import RtnlSocket
from overlay.kernel.devices import read_device
from overlay.kernel.ethtool import Ethtool
from overlay.kernel.links import dump_retrying
from overlay.model import (
    MAIN_TABLE,
    RT_PROTO,
    Dataplane,
    FdbEntry,
    Neighbour,
    NexthopKey,
    Route,
    VxlanDevice,
)

ZERO_MAC = b"\0" * 6


class _Addrs:
    """bytes -> IPAddress with a cache: 10k routes often share few gateways."""

    def __init__(self) -> None:
        self._cache: dict[bytes, netaddr.IPAddress] = {}

    def ip(self, raw: bytes) -> netaddr.IPAddress:
        got = self._cache.get(raw)
        if got is None:
            version = 4 if len(raw) == 4 else 6
            got = self._cache[raw] = netaddr.IPAddress(int.from_bytes(raw, "big"), version)
        return got

    def net(self, raw: bytes, plen: int) -> netaddr.IPNetwork:
        version = 4 if len(raw) == 4 else 6
        return netaddr.IPNetwork((int.from_bytes(raw, "big"), plen), version)


def read_neighbours(sock: RtnlSocket, dev: str, ifindex: int, addrs: _Addrs) -> set[Neighbour]:
    out: set[Neighbour] = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        for n in dump_retrying(
            sock, nlmsg.dump_neighbours(family, ifindex), nlmsg.decode_neighbour
        ):
            if n.ifindex != ifindex or not n.state & nlmsg.NUD_PERMANENT or len(n.lladdr) != 6:
                continue
            out.add(Neighbour(dev=dev, ip=addrs.ip(n.dst), mac=nlmsg.format_mac(n.lladdr)))
    return out


def read_fdb(sock: RtnlSocket, dev: str, ifindex: int, addrs: _Addrs) -> set[FdbEntry]:
    out: set[FdbEntry] = set()
    request = nlmsg.dump_neighbours(nlmsg.AF_BRIDGE, ifindex)
    for n in dump_retrying(sock, request, nlmsg.decode_neighbour):
        if (
            n.ifindex != ifindex
            or not n.state & nlmsg.NUD_PERMANENT
            or not n.dst
            or len(n.lladdr) != 6
            or n.lladdr == ZERO_MAC  # flooding defaults are not per-peer entries
        ):
            continue
        out.add(FdbEntry(dev=dev, mac=nlmsg.format_mac(n.lladdr), dst=addrs.ip(n.dst)))
    return out


def read_nexthops(
    sock: RtnlSocket, links: dict[int, str], addrs: _Addrs
) -> tuple[dict[int, NexthopKey], dict[NexthopKey, int], set[int]]:
    """(every gateway nexthop id -> key, our key -> lowest id, every id not reported as ours).

    Routes of ours may use any id; only protocol-RT_PROTO gateway nexthops are ours. The other
    ids are returned so that plan() never allocates them.
    """
    by_id: dict[int, NexthopKey] = {}
    ours: dict[NexthopKey, int] = {}
    all_ids: set[int] = set()
    for nh in dump_retrying(sock, nlmsg.dump_nexthops(), nlmsg.decode_nexthop):
        all_ids.add(nh.id)
        if nh.is_group or nh.blackhole or not nh.gateway or nh.oif not in links:
            continue
        key = NexthopKey(
            gateway=addrs.ip(nh.gateway),
            dev=links[nh.oif],
            onlink=bool(nh.flags & nlmsg.RTNH_F_ONLINK),
        )
        by_id[nh.id] = key
        if nh.protocol == RT_PROTO and (key not in ours or nh.id < ours[key]):
            ours[key] = nh.id
    return by_id, ours, all_ids - set(ours.values())


def read_routes(
    sock: RtnlSocket, links: dict[int, str], nexthops: dict[int, NexthopKey], addrs: _Addrs
) -> tuple[set[Route], dict[Route, int]]:
    """(our main-table routes, the nhid each nexthop-object route uses)."""
    out: set[Route] = set()
    nhids: dict[Route, int] = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        request = nlmsg.dump_routes(family, MAIN_TABLE, RT_PROTO)
        for r in dump_retrying(sock, request, nlmsg.decode_route):
            if r.protocol != RT_PROTO or r.table != MAIN_TABLE:
                continue  # old kernels ignore the dump filter
            dst = addrs.net(r.dst, r.dst_len)
            if r.rtype == nlmsg.RTN_BLACKHOLE:
                out.add(Route(dst=dst, blackhole=True))
            elif r.rtype != nlmsg.RTN_UNICAST:
                continue
            elif r.nhid:
                if r.nhid in nexthops:
                    route = Route(dst=dst, nexthop=nexthops[r.nhid])
                    out.add(route)
                    nhids[route] = r.nhid
            elif r.gateway and r.oif in links:
                key = NexthopKey(
                    gateway=addrs.ip(r.gateway),
                    dev=links[r.oif],
                    onlink=bool(r.flags & nlmsg.RTNH_F_ONLINK),
                )
                out.add(Route(dst=dst, nexthop=key))
            elif r.oif in links and not r.gateway:
                out.add(Route(dst=dst, dev=links[r.oif]))
    return out, nhids


def read_dataplane(
    sock: RtnlSocket,
    device_names: Iterable[str],
    with_nexthops: bool,
    tool: Ethtool | None = None,
) -> Dataplane:
    addrs = _Addrs()
    links = sock.links()
    index = {name: i for i, name in links.items()}
    dp = Dataplane()
    for name in device_names:
        dev = read_device(sock, name, tool)
        if dev is None:
            continue
        dp.devices[name] = dev
        if isinstance(dev, VxlanDevice) and name in index:
            dp.neighbours |= read_neighbours(sock, name, index[name], addrs)
            dp.fdb |= read_fdb(sock, name, index[name], addrs)
    by_id: dict[int, NexthopKey] = {}
    if with_nexthops:
        by_id, dp.nexthop_ids, dp.foreign_nexthop_ids = read_nexthops(sock, links, addrs)
        dp.nexthops = set(dp.nexthop_ids)
    dp.routes, dp.route_nhids = read_routes(sock, links, by_id, addrs)
    return dp
