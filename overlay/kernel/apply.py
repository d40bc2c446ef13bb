"""`Kernel`: read what is ours, apply plan() operations in netlink batches, report failures.

Ops are executed in the order given (plan() orders them safely). Device ops go one acked
request at a time; every run of other ops between them is encoded with the lean encoder and
sent as one batch, in order, so a nexthop created earlier in the run exists when a route
refers to it. A failing object never stops the rest.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING

import netaddr

from overlay.kernel import nat, nft, nlmsg
from overlay.kernel.batch import RtnlSocket
from overlay.kernel.devices import DeviceError, Unsupported, delete_device, ensure_device
from overlay.kernel.ethtool import Ethtool
from overlay.kernel.nat import apply_nat, read_nat
from overlay.kernel.reader import read_dataplane
from overlay.kernel.tunnel_filter import apply_filter, apply_hosts, kind, read_filter
from overlay.model import (
    IPIP_DEVICE,
    MAIN_TABLE,
    RT_PROTO,
    VXLAN6_DEVICE,
    VXLAN_DEVICE,
    Action,
    Dataplane,
    FdbEntry,
    IpipDevice,
    NatOutgoing,
    Neighbour,
    Nexthop,
    Op,
    Route,
    TunnelFilter,
    TunnelHosts,
    VxlanDevice,
)

if TYPE_CHECKING:
    from overlay.cold_start import ColdPeers, ColdRoutes

log = logging.getLogger("overlay.kernel")

LOG_CHUNK = 1000  # kernel changes per log record

# Deleting something already gone is success.
GONE = frozenset({errno.ENOENT, errno.ESRCH, errno.ENODEV})


@dataclass
class ApplyResult:
    done: int = 0
    failed: list[tuple[Op, int, str]] = field(default_factory=list)
    # A device was (re)created, which flushes its neighbours/routes/nexthops: the caller must
    # re-read and re-plan now rather than at the next periodic resync.
    resync: bool = False


class _Skip(Exception):
    """The op needs no kernel message (e.g. a nexthop object in classic-route mode)."""


def _ip(addr: netaddr.IPAddress) -> bytes:
    return addr.value.to_bytes(4 if addr.version == 4 else 16, "big")


def describe(op: Op) -> str:
    """`event=... key=value ...` for one op (without the outcome)."""
    obj = op.obj
    verb = "set" if op.action is Action.SET else "deleted"
    if isinstance(obj, Route):
        table = f" table={obj.table}" if obj.table != 254 else ""
        if obj.nexthop is not None and not obj.blackhole:  # the common case: one f-string
            k = obj.nexthop
            nhid = f" nhid={op.nhid}" if op.nhid else ""
            return f"event=route_{verb} dst={obj.dst}{nhid} via={k.gateway} dev={k.dev}{table}"
        text = f"event=route_{verb} dst={obj.dst}"
        if obj.blackhole:
            text += " type=blackhole"
        elif obj.dev:
            text += f" dev={obj.dev}"
        return text + table
    if isinstance(obj, Nexthop):
        k = obj.key
        return f"event=nexthop_{verb} id={obj.id} via={k.gateway} dev={k.dev} onlink={k.onlink}"
    if isinstance(obj, Neighbour):
        return f"event=neighbour_{verb} dev={obj.dev} ip={obj.ip} mac={obj.mac}"
    if isinstance(obj, FdbEntry):
        return f"event=fdb_{verb} dev={obj.dev} mac={obj.mac} dst={obj.dst}"
    if isinstance(obj, NatOutgoing):
        return f"event={nat.kind(obj.version)}_{verb}"
    if isinstance(obj, TunnelFilter):
        return f"event={kind(obj.version)}_{verb} vxlan_port={obj.vxlan_port} ipip={obj.ipip}"
    if isinstance(obj, TunnelHosts):
        added, removed = len(obj.add), len(obj.remove)
        return f"event={kind(obj.version)}_hosts_set added={added} removed={removed}"
    return f"event=device_{verb} dev={obj.name}"


def _peer_lines(cold: ColdPeers) -> Iterator[str]:
    """describe() of each neighbour and FDB entry of a cold plan, in the order sent."""
    ntoa, dev = socket.inet_ntoa, cold.device.name
    for ip, mac in cold.neighbours:
        yield f"event=neighbour_set dev={dev} ip={ntoa(ip)} mac={mac.hex(':')}"
    for mac, host in cold.fdb:
        yield f"event=fdb_set dev={dev} mac={mac.hex(':')} dst={ntoa(host)}"


def _route_lines(cold: ColdRoutes) -> Iterator[str]:
    """describe() of each nexthop and route of a cold plan, in the order sent."""
    ntoa = socket.inet_ntoa
    via = {}
    for nhid, gw, name in cold.nexthops:
        via[nhid] = f"via={ntoa(gw)} dev={name}"
        yield f"event=nexthop_set id={nhid} {via[nhid]} onlink=True"
    for net, plen, nhid in cold.routes:
        dst = f"{ntoa(net.to_bytes(4, 'big'))}/{plen}"
        if nhid:
            yield f"event=route_set dst={dst} nhid={nhid} {via[nhid]}"
        else:
            yield f"event=route_set dst={dst} type=blackhole"
    for net in cold.device_routes:
        yield f"event=route_set dst={ntoa(net.to_bytes(4, 'big'))}/32 dev={VXLAN_DEVICE}"


class Kernel:
    """The agent's whole view of the kernel. Not thread-safe: one reconciler drives it."""

    def __init__(
        self,
        netns: str | None = None,
        use_nexthops: bool | None = None,
        device_names: Sequence[str] = (VXLAN_DEVICE, IPIP_DEVICE, VXLAN6_DEVICE),
    ) -> None:
        self.netns = netns
        self.device_names = tuple(device_names)
        self._sock = RtnlSocket(netns)
        self._ethtool = Ethtool(netns)  # TX checksum offload of our devices
        self._nexthops = use_nexthops

    @property
    def port_id(self) -> int:
        """The netlink port of our one writing socket: the monitor tells our own changes
        from others' by it (notifications carry the requester's port)."""
        return int(self._sock.sock.getsockname()[0])

    def close(self) -> None:
        self._sock.close()
        self._ethtool.close()

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def supports_nexthops(self) -> bool:
        """Probed once: can this kernel dump (hence hold) nexthop objects?"""
        if self._nexthops is None:
            try:
                for _ in self._sock.dump(nlmsg.dump_nexthops()):
                    pass
                self._nexthops = True
            except OSError as exc:
                log.warning(
                    "event=nexthops_unsupported errno=%s fallback=classic_routes", exc.errno
                )
                self._nexthops = False
        return self._nexthops

    def holds_ours(self) -> bool:
        """Whether the kernel may hold something of ours already: one of our VXLAN devices,
        or any nexthop object (a cold plan numbers its nexthops without looking at others').
        Not tunl0: the ipip module makes one in every namespace; routes over it of ours
        would use nexthop objects."""
        ours = set(self.device_names) - {IPIP_DEVICE}
        if set(self._sock.links().values()) & ours:
            return True
        nexthops = self._sock.dump(nlmsg.dump_nexthops()) if self.supports_nexthops() else ()
        return next(iter(nexthops), None) is not None

    def own_nft_pids(self) -> frozenset[int]:
        return nft.own_pids()

    @property
    def nexthops_supported(self) -> bool:
        """The reconciler's name for supports_nexthops()."""
        return self.supports_nexthops()

    def read(self) -> Dataplane:
        dp = read_dataplane(self._sock, self.device_names, self.supports_nexthops(), self._ethtool)
        dp.nat = read_nat(self.netns)
        dp.nat6 = read_nat(self.netns, version=6)
        dp.tunnel_filter = read_filter(self.netns)
        dp.tunnel_filter6 = read_filter(self.netns, version=6)
        return dp

    # --- apply -----------------------------------------------------------------------------
    def apply(self, ops: Sequence[Op]) -> ApplyResult:
        result = ApplyResult()
        nexthops = self.supports_nexthops()
        links = {name: i for i, name in self._sock.links().items()}
        run: list[Op] = []
        tables: list[Op] = []  # nftables: after the routes, which matter more and go faster
        for op in ops:
            if isinstance(op.obj, (VxlanDevice, IpipDevice)):  # a tuple: faster than a union
                self._apply_batch(run, links, nexthops, result)
                run = []
                self._apply_device(op, result)
                links = {name: i for i, name in self._sock.links().items()}
            elif isinstance(op.obj, (NatOutgoing, TunnelFilter, TunnelHosts)):
                tables.append(op)
            else:
                run.append(op)
        self._apply_batch(run, links, nexthops, result)
        for op in tables:
            self._apply_table(op, result)
        return result

    def program_cold(
        self, peers: ColdPeers, make_routes: Callable[[], ColdRoutes]
    ) -> tuple[int, int]:
        """Write a cold plan (cold_start.py) to a kernel that holds nothing of ours: the
        device (as apply() makes it), the peers' neighbour and FDB entries, then the
        nexthops and routes that `make_routes()` plans meanwhile (the kernel's share of
        the first batch runs without the GIL). One log line per change once all is sent,
        as apply() writes them. (done, failed) changes; what `make_routes` raises comes
        out after the first half is written and logged."""
        result = ApplyResult()
        self._apply_device(Op(Action.SET, peers.device), result)
        links = {name: i for i, name in self._sock.links().items()}
        if result.failed or peers.device.name not in links:
            return result.done, 1
        dev = links[peers.device.name]
        first = chain(
            (nlmsg.neighbour(True, dev, ip, mac) for ip, mac in peers.neighbours),
            (nlmsg.fdb(True, dev, mac, host) for mac, host in peers.fdb),
        )
        sent: list[list[tuple[int, int, str]]] = []

        def write_first() -> None:
            try:
                sent.append(self._sock.batch(first))
            except OSError as exc:  # then nothing more is sent: the normal pass takes over
                log.warning("event=cold_start_failed error=%r", str(exc))

        writer = threading.Thread(target=write_first, name="cold-start")
        writer.start()
        try:
            routes = make_routes()
        except BaseException:
            writer.join()
            self._log_cold(_peer_lines(peers), sent[0] if sent else None)
            raise
        missing = {d for _, _, d in routes.nexthops} - links.keys()
        oifs = {d: links.get(d, 0) for _, _, d in routes.nexthops}
        second = chain(
            (nlmsg.nexthop(True, i, gw, oifs[d], True, RT_PROTO) for i, gw, d in routes.nexthops),
            (
                nlmsg.route(
                    True,
                    net.to_bytes(4, "big"),
                    plen,
                    table=MAIN_TABLE,
                    protocol=RT_PROTO,
                    nhid=nhid,
                    blackhole=not nhid,
                )
                for net, plen, nhid in routes.routes
            ),
            (
                nlmsg.route(
                    True, net.to_bytes(4, "big"), 32, table=MAIN_TABLE, protocol=RT_PROTO, oif=dev
                )
                for net in routes.device_routes
            ),
        )
        writer.join()
        nacks = None if missing or not sent else self._sock.batch(second)
        if missing:
            log.warning("event=cold_start_failed error=%r", f"no device {sorted(missing)}")
        # The log after the kernel work: the routes matter more than their lines.
        done, failed = self._log_cold(_peer_lines(peers), sent[0] if sent else None)
        done2, failed2 = self._log_cold(_route_lines(routes), nacks)
        return result.done + done + done2, failed + failed2

    def _log_cold(
        self, lines: Iterator[str], nacks: list[tuple[int, int, str]] | None
    ) -> tuple[int, int]:
        """Log a cold batch, one line per change; (done, failed). None: not sent."""
        if nacks is None:
            return 0, 1
        failed = {i: (code, text) for i, code, text in nacks}
        changes = []
        for i, line in enumerate(lines):
            if i in failed:
                code, text = failed[i]
                log.warning("%s outcome=failed errno=%d error=%r", line, code, text)
            else:
                changes.append(line)
        for i in range(0, len(changes), LOG_CHUNK):
            log.info("\n".join(changes[i : i + LOG_CHUNK]))
        return len(changes), len(failed)

    def _apply_table(self, op: Op, result: ApplyResult) -> None:
        obj = op.obj
        try:
            if isinstance(obj, NatOutgoing):
                n = obj if op.action is Action.SET else None  # a delete: obj names the table
                apply_nat(n, self.netns, version=obj.version)
            elif isinstance(obj, TunnelFilter):
                f = obj if op.action is Action.SET else None  # a delete: obj names the table
                apply_filter(f, self.netns, version=obj.version)
            else:
                assert isinstance(obj, TunnelHosts)
                apply_hosts(obj, self.netns)
            result.done += 1
        except nft.NftError as exc:
            self._fail(op, errno.EIO, str(exc), result)

    def _apply_device(self, op: Op, result: ApplyResult) -> None:
        dev = op.obj
        assert isinstance(dev, VxlanDevice | IpipDevice)
        try:
            if op.action is Action.SET:
                changes = ensure_device(self._sock, dev, self._ethtool)
                if changes:
                    log.info("event=device_set dev=%s changes=%r", dev.name, ",".join(changes))
                    result.resync = result.resync or any(
                        c == "created" or c.startswith("recreated") for c in changes
                    )
            elif delete_device(self._sock, dev.name):
                log.info("event=device_deleted dev=%s", dev.name)
            result.done += 1
        except Unsupported as exc:
            self._fail(op, errno.EOPNOTSUPP, str(exc), result)
        except DeviceError as exc:
            self._fail(op, errno.EINVAL, str(exc), result)
        except OSError as exc:  # the kernel refused a request
            code = exc.errno or errno.EIO  # a timeout has none
            self._fail(op, code, exc.strerror or os.strerror(code), result)

    def _fail(self, op: Op, code: int, text: str, result: ApplyResult) -> None:
        result.failed.append((op, code, text))
        log.warning("%s outcome=failed errno=%d error=%r", describe(op), code, text)

    def _apply_batch(
        self, ops: list[Op], links: dict[str, int], nexthops: bool, result: ApplyResult
    ) -> None:
        if not ops:
            return
        sent: list[int] = []  # positions in `ops` of the encoded messages
        failed: list[tuple[int, int, str]] = []  # (position, errno, text), reported in op order

        def encoded() -> Iterator[bytes]:
            # Lazily: the socket encodes the next chunk while the kernel applies this one.
            for pos, op in enumerate(ops):
                try:
                    message = self._encode(op, links, nexthops)
                except _Skip:
                    result.done += 1
                    continue
                except KeyError as exc:  # a device we need is missing
                    if op.action is Action.DELETE:
                        result.done += 1  # the device took the object with it
                    else:
                        failed.append((pos, errno.ENODEV, f"dev: device {exc.args[0]!r} not found"))
                    continue
                except ValueError as exc:
                    failed.append((pos, errno.EINVAL, str(exc)))
                    continue
                sent.append(pos)
                yield message

        acks = {i: (code, text) for i, code, text in self._sock.batch(encoded())}
        info = log.isEnabledFor(logging.INFO)
        changes: list[str] = []
        for i, pos in enumerate(sent):
            op = ops[pos]
            ack = acks.get(i)
            if ack is None:
                result.done += 1
                if info:
                    changes.append(describe(op))
            elif op.action is Action.DELETE and ack[0] in GONE:
                result.done += 1
                log.debug("%s outcome=already_gone", describe(op))
            else:
                failed.append((pos, ack[0], ack[1] or os.strerror(ack[0])))
        # One record per LOG_CHUNK changes, one line each (KeyValueFormatter prefixes every
        # line): a record per change cost ~10 us of logging machinery, 0.4 s for a first pass
        # at 10k peers; one record for all would hold the whole text several times at once.
        for i in range(0, len(changes), LOG_CHUNK):
            log.info("\n".join(changes[i : i + LOG_CHUNK]))
        for pos, code, text in sorted(failed):
            self._fail(ops[pos], code, text, result)

    def _encode(self, op: Op, links: dict[str, int], nexthops: bool) -> bytes:
        obj = op.obj
        new = op.action is Action.SET
        if isinstance(obj, Route):
            return self._encode_route(op, obj, links, nexthops)
        if isinstance(obj, Nexthop):
            if not nexthops:
                raise _Skip()
            if not new:
                return nlmsg.nexthop(False, obj.id)
            k = obj.key
            return nlmsg.nexthop(True, obj.id, _ip(k.gateway), links[k.dev], k.onlink, RT_PROTO)
        if isinstance(obj, Neighbour):
            return nlmsg.neighbour(new, links[obj.dev], _ip(obj.ip), nlmsg.mac_bytes(obj.mac))
        if isinstance(obj, FdbEntry):
            return nlmsg.fdb(new, links[obj.dev], nlmsg.mac_bytes(obj.mac), _ip(obj.dst))
        raise ValueError(f"obj: cannot apply {type(obj).__name__}")

    def _encode_route(self, op: Op, r: Route, links: dict[str, int], nexthops: bool) -> bytes:
        # The prefix's network address: a route's dst may carry host bits.
        dst = r.dst.first.to_bytes(4 if r.dst.version == 4 else 16, "big")
        plen, table = r.dst.prefixlen, r.table
        if op.action is Action.DELETE:
            return nlmsg.route(False, dst, plen, table=table, protocol=RT_PROTO)
        if r.blackhole:
            return nlmsg.route(True, dst, plen, table=table, protocol=RT_PROTO, blackhole=True)
        if r.nexthop is not None:
            k = r.nexthop
            if nexthops:
                if not op.nhid:
                    raise ValueError(f"nhid: route {r.dst} via {k.gateway} has no nexthop id")
                return nlmsg.route(True, dst, plen, table=table, protocol=RT_PROTO, nhid=op.nhid)
            return nlmsg.route(
                True,
                dst,
                plen,
                table=table,
                protocol=RT_PROTO,
                gateway=_ip(k.gateway),
                oif=links[k.dev],
                onlink=k.onlink,
            )
        if r.dev:
            return nlmsg.route(True, dst, plen, table=table, protocol=RT_PROTO, oif=links[r.dev])
        raise ValueError(f"route: {r.dst} has neither nexthop, blackhole nor dev")
