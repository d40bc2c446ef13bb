"""Netlink monitor: kick the reconciler when someone else removes or changes what is ours.

It only kicks (with a short reason); the reconciler re-reads the kernel and re-plans. Events
are coalesced: one callback per burst of messages. Our own changes may kick too; a re-read
then finds nothing to do, which is safe but not cheap at scale (see below).

With `on_gone`, a burst made only of deletions of our routes, neighbours or FDB entries (or
neighbours turned non-permanent, which is also how the kernel announces a neighbour deletion)
is reported as the exact kernel keys that went away instead, and a permanent neighbour or
FDB entry set on our device as the entry the kernel now holds: the reconciler then compares
those with what it wrote and re-sets what differs, without re-reading 50k objects (a
10k-peer re-read costs ~0.5 s of CPU, and our own removal of one peer would otherwise cost
one, delaying the next change).
Anything less precise (device changes, a tunnel address taken off our device, foreign
replacements, lost events) still kicks.

Our nftables tables (NAT-outgoing, the tunnel filters) are watched on the netfilter netlink
group: a committed transaction that changed one is reported as ("nat" | "nat6" |
"tunnel_filter" | "tunnel_filter6", pid of the committing process, ""). The reconciler drops
the ones our own nft runs made and writes the table again for the others.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import struct
import threading
from collections.abc import Callable, Sequence

import netaddr

from overlay.kernel import linkmsg, nat, nlmsg, tunnel_filter
from overlay.kernel.batch import RtnlSocket, in_netns, open_rtnl
from overlay.kernel.nftevents import Transactions, open_events
from overlay.model import (
    IPIP_DEVICE,
    MAIN_TABLE,
    RT_PROTO,
    VXLAN6_DEVICE,
    VXLAN_DEVICE,
    FdbEntry,
    GoneKey,
    Neighbour,
)

log = logging.getLogger("overlay.kernel")

GROUPS = (
    nlmsg.RTMGRP_LINK
    | nlmsg.RTMGRP_NEIGH
    | nlmsg.RTMGRP_IPV4_ROUTE
    | nlmsg.RTMGRP_IPV6_ROUTE
    | nlmsg.RTMGRP_IPV4_IFADDR
    | nlmsg.RTMGRP_IPV6_IFADDR
)
POLL_S = 0.2
# Our nftables tables, by the GoneKey kind the reconciler knows them by.
_TABLE_KINDS = {
    (tunnel_filter.family(4), tunnel_filter.TABLE): "tunnel_filter",
    (tunnel_filter.family(6), tunnel_filter.TABLE): "tunnel_filter6",
    (nat.family(4), nat.TABLE): "nat",
    (nat.family(6), nat.TABLE): "nat6",
}
MAX_DRAIN = 10_000  # messages read per burst before the callback fires


def _addr(raw: bytes) -> str:
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    if len(raw) == 16:
        return socket.inet_ntop(socket.AF_INET6, raw)
    return raw.hex()


class Monitor:
    def __init__(
        self,
        callback: Callable[[str], None],
        netns: str | None = None,
        device_names: Sequence[str] = (VXLAN_DEVICE, IPIP_DEVICE, VXLAN6_DEVICE),
        on_gone: Callable[[str, list[GoneKey]], None] | None = None,
        on_pod_route_gone: Callable[[str, int], None] | None = None,
        own_port: int = 0,
    ) -> None:
        self.callback = callback
        self.on_gone = on_gone
        # The netlink port of the agent's writing socket (0: unknown). Notifications carry
        # the requester's port: those from ours echo what we just did and are skipped.
        self.own_port = own_port
        self.on_pod_route_gone = on_pod_route_gone  # (address, ifindex): see pod_routes.py
        self.netns = netns
        self.names = frozenset(device_names)
        self._index: dict[int, str] = {}  # ifindex -> our device name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._nft_sock: socket.socket | None = None
        self._nft = Transactions(frozenset(_TABLE_KINDS))

    def start(self) -> None:
        def make() -> socket.socket:
            sock = open_rtnl(None, GROUPS)
            sock.setsockopt(nlmsg.SOL_NETLINK, nlmsg.NETLINK_ADD_MEMBERSHIP, nlmsg.RTNLGRP_NEXTHOP)
            return sock

        # Subscribe first, then learn our devices' indexes: no change can fall in between.
        self._sock = in_netns(self.netns, make)
        self._sock.setblocking(False)
        try:
            self._nft_sock = in_netns(self.netns, open_events)
            self._nft_sock.setblocking(False)
        except OSError as exc:  # then the periodic resync alone repairs our nftables tables
            log.warning("event=nft_monitor_unavailable error=%s", exc)
        with RtnlSocket(self.netns) as rt:
            self._index = {i: n for i, n in rt.links().items() if n in self.names}
        self._thread = threading.Thread(target=self._run, name="netlink-monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for sock in (self._sock, self._nft_sock):
            if sock is not None:
                sock.close()
        self._sock = self._nft_sock = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> Monitor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        sock = self._sock
        assert sock is not None
        socks = [sock] if self._nft_sock is None else [sock, self._nft_sock]
        buf = bytearray(256 * 1024)
        while not self._stop.is_set():
            ready, _, _ = select.select(socks, [], [], POLL_S)
            if not ready:
                continue
            burst = _Burst()
            for ready_sock in ready:
                if not self._drain(ready_sock, buf, burst):
                    return
            if burst.reason:
                log.debug("event=kernel_kick reason=%r events=%d", burst.reason, burst.count)
                n = burst.count
                text = burst.reason if n == 1 else f"{burst.reason} (+{n - 1} more)"
                try:
                    if burst.precise and self.on_gone is not None:
                        self.on_gone(text, burst.gone)
                    else:
                        self.callback(text)
                except Exception:
                    log.exception("event=monitor_callback_failed")

    def _drain(self, sock: socket.socket, buf: bytearray, burst: _Burst) -> bool:
        """Read what `sock` has queued into `burst`; False when the monitor is stopping."""
        for _ in range(MAX_DRAIN):
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # events were lost: must re-read everything
                    burst.add("monitor_overflow", None)
                    continue
                if self._stop.is_set():
                    return False
                raise
            for msg_type, flags, port, payload in nlmsg.iter_events(bytes(buf[:n])):
                if sock is self._nft_sock:
                    for (family, table), pid in self._nft.feed(msg_type, payload):
                        # No pid (a kernel before 4.20): ours or not cannot be told, and
                        # taking our own for drift would rewrite the table forever.
                        if pid:
                            why = f"nft_table_changed family={family} table={table} pid={pid}"
                            burst.add(why, (_TABLE_KINDS[family, table], pid, ""))
                else:
                    ours = port != 0 and port == self.own_port
                    why, key = self._classify(msg_type, flags, payload, ours)
                    if why:
                        burst.add(why, key)
        return True

    def _classify(
        self, msg_type: int, flags: int, payload: memoryview, ours: bool = False
    ) -> tuple[str, GoneKey | None]:
        """(reason to kick or "", the exact key of a deleted object of ours if known).
        `ours`: the agent's own writing socket asked for this change."""
        try:
            return self._classify_unchecked(msg_type, flags, payload, ours)
        except (IndexError, ValueError, KeyError, struct.error):
            return "", None  # truncated/odd message: not ours to judge

    def _classify_unchecked(
        self, msg_type: int, flags: int, payload: memoryview, ours: bool
    ) -> tuple[str, GoneKey | None]:
        if msg_type in (nlmsg.RTM_NEWLINK, nlmsg.RTM_DELLINK):
            return self._link(msg_type, payload, ours)
        if ours:
            return "", None  # our own change echoed back: nothing to repair
        if msg_type == linkmsg.RTM_DELADDR:
            return self._address_deleted(payload)
        if msg_type in (nlmsg.RTM_DELROUTE, nlmsg.RTM_NEWROUTE):
            # Without our port, our own adds echo back here by the 10k: skip them cheaply.
            new = msg_type == nlmsg.RTM_NEWROUTE and not flags & nlmsg.NLM_F_REPLACE
            if new and not self.own_port:
                return "", None
            return self._route(msg_type, flags, payload)
        if msg_type in (nlmsg.RTM_DELNEIGH, nlmsg.RTM_NEWNEIGH):
            _family, ifindex, _state, _flags, _type = nlmsg.NDMSG.unpack_from(payload)
            if ifindex not in self._index:
                return "", None  # (cheap: most neighbour traffic is on other devices)
            return self._neighbour(msg_type, payload)
        if msg_type in (nlmsg.RTM_DELNEXTHOP, nlmsg.RTM_NEWNEXTHOP):
            return self._nexthop(msg_type, payload)
        return "", None

    def _link(self, msg_type: int, payload: memoryview, ours: bool) -> tuple[str, GoneKey | None]:
        index, name, _f = nlmsg.decode_link(payload)
        if name not in self.names and index not in self._index:
            return "", None
        # Our own device changes too: the index of a device we create must be learnt.
        if msg_type == nlmsg.RTM_DELLINK:
            self._index.pop(index, None)
            return ("", None) if ours else (f"device_deleted dev={name}", None)
        if self._index.get(index) != name:
            self._index = {i: n for i, n in self._index.items() if n != name}
            if name in self.names:
                self._index[index] = name
        return ("", None) if ours else (f"device_changed dev={name}", None)

    def _address_deleted(self, payload: memoryview) -> tuple[str, GoneKey | None]:
        """A tunnel address taken off our device (by NetworkManager, say): the device check
        puts it back. The kernel's own IPv6 link-local ones are not ours."""
        a = linkmsg.decode_addr(payload)
        raw = a.address or a.local
        if a.index not in self._index or not raw:
            return "", None
        ip = netaddr.IPAddress(int.from_bytes(raw, "big"), _version(raw))
        if ip.version == 6 and ip.is_link_local():
            return "", None
        return f"address_deleted dev={self._index[a.index]} addr={ip}", None

    def _route(self, msg_type: int, flags: int, payload: memoryview) -> tuple[str, GoneKey | None]:
        r = nlmsg.decode_route(payload)
        dst = f"{_addr(r.dst)}/{r.dst_len}"
        if r.protocol == RT_PROTO and (msg_type == nlmsg.RTM_DELROUTE or self.own_port):
            # Deleted, or set by someone else writing with our protocol (told from our own
            # writes by the port): either way the reconciler writes ours again.
            net = netaddr.IPNetwork((int.from_bytes(r.dst, "big"), r.dst_len), _version(r.dst))
            what = "deleted" if msg_type == nlmsg.RTM_DELROUTE else "set"
            return f"route_{what} dst={dst}", ("route", r.table, net)
        if (
            msg_type == nlmsg.RTM_NEWROUTE
            and flags & nlmsg.NLM_F_REPLACE
            and r.protocol != RT_PROTO
            and r.table == MAIN_TABLE
        ):
            return f"route_replaced dst={dst} proto={r.protocol}", None
        if msg_type == nlmsg.RTM_DELROUTE and self.on_pod_route_gone and _pod_route(r):
            self.on_pod_route_gone(_addr(r.dst), r.oif)  # only queues the check
        return "", None

    def _neighbour(self, msg_type: int, payload: memoryview) -> tuple[str, GoneKey | None]:
        nb = nlmsg.decode_neighbour(payload)
        dev = self._index[nb.ifindex]
        if nb.family == nlmsg.AF_BRIDGE:
            mac = nlmsg.format_mac(nb.lladdr)
            if msg_type == nlmsg.RTM_DELNEIGH:
                return f"fdb_deleted dev={dev} key={mac}", ("fdb", dev, mac)
            if nb.state & nlmsg.NUD_PERMANENT and nb.dst:
                # Our own adds echo back like this (the VXLAN driver names no port); so
                # does someone's replacement. The reconciler compares.
                dst = netaddr.IPAddress(int.from_bytes(nb.dst, "big"), _version(nb.dst))
                return f"fdb_set dev={dev} key={mac}", ("fdb_set", dev, FdbEntry(dev, mac, dst))
            return "", None
        ip = netaddr.IPAddress(int.from_bytes(nb.dst, "big"), _version(nb.dst))
        if msg_type == nlmsg.RTM_NEWNEIGH and nb.state & nlmsg.NUD_PERMANENT:
            held = Neighbour(dev, ip, nlmsg.format_mac(nb.lladdr))
            return f"neighbour_set dev={dev} key={ip}", ("neighbour_set", dev, held)
        if msg_type == nlmsg.RTM_DELNEIGH:
            return f"neighbour_deleted dev={dev} key={ip}", ("neighbour", dev, ip)
        # Not permanent: also how the kernel starts deleting a permanent neighbour (it turns
        # FAILED, then goes), ours included. Reported as gone: the reconciler re-sets it if
        # it was ours and meant to stay, without re-reading everything.
        return f"neighbour_changed dev={dev} key={ip}", ("neighbour", dev, ip)

    def _nexthop(self, msg_type: int, payload: memoryview) -> tuple[str, GoneKey | None]:
        nh = nlmsg.decode_nexthop(payload)
        if msg_type == nlmsg.RTM_DELNEXTHOP and nh.protocol == RT_PROTO:
            # The kernel drops the routes using a deleted nexthop without telling: the
            # reconciler forgets those with it (keyed by id).
            return f"nexthop_deleted id={nh.id}", ("nexthop", nh.id, "")
        if msg_type == nlmsg.RTM_NEWNEXTHOP and self.own_port:
            # Someone else set a nexthop: if the id is one of ours, it now points elsewhere,
            # and every route using it with it. Reported like a deletion (the reconciler
            # ignores ids that are not ours), so it is written again.
            return f"nexthop_set id={nh.id}", ("nexthop", nh.id, "")
        return "", None


class _Burst:
    """What one wake-up of the monitor read: the first reason, how many, the exact keys."""

    def __init__(self) -> None:
        self.reason = ""
        self.count = 0
        self.gone: list[GoneKey] = []
        self.precise = True  # every reason came with its exact key

    def add(self, why: str, key: GoneKey | None) -> None:
        self.reason = self.reason or why
        self.count += 1
        if key is None:
            self.precise = False
        else:
            self.gone.append(key)


def _pod_route(r: nlmsg.RawRoute) -> bool:
    """Whether a route looks like the CNI's host route to a pod: `<ip>/32 dev X` (or /128)
    in the main table, protocol boot, no gateway. Only a look: pod_routes.py checks."""
    return (
        r.protocol == nlmsg.RTPROT_BOOT
        and r.table == MAIN_TABLE
        and r.rtype == nlmsg.RTN_UNICAST
        and r.dst_len == 8 * len(r.dst)
        and r.oif != 0
        and not r.gateway
    )


def _version(raw: bytes) -> int:
    return 4 if len(raw) == 4 else 6
