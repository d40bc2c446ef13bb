"""A lean rtnetlink client for the CNI hot path: the few messages a pod's plumbing needs.

pyroute2's IPRoute costs milliseconds per object on this path (an asyncio loop per request,
a socket set-up per IPRoute); packing the messages with `struct` and sending each batch in
one write costs microseconds. A socket acts in the network namespace it was created in, so
the pod's socket is made while the calling thread visits the pod (`visit`).

The netlink constants below repeat a few of overlay/kernel/nlmsg.py's on purpose: cni/
depends on nothing of overlay/ (DESIGN.md: cni -> socket -> overlay), and these numbers
are the kernel's ABI, which does not change.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
from collections.abc import Callable, Sequence
from typing import TypeVar

CLONE_NEWNET = 0x40000000
T = TypeVar("T")

NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_ACK_TLVS = 0x200
NEW_FLAGS = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
SET_FLAGS = NLM_F_REQUEST | NLM_F_ACK

SOL_NETLINK = 270
NETLINK_EXT_ACK = 11
NLMSGERR_ATTR_MSG = 1
NLA_F_NESTED = 0x8000

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR = 20
RTM_NEWROUTE = 24

IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
RTMSG = struct.Struct("=BBBBBBBBI")  # family dst_len src_len tos table protocol scope type flags
ATTR = struct.Struct("=HH")
U32 = struct.Struct("=I")
IFF_UP = 0x1

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_NET_NS_FD = 1, 3, 4, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFA_F_NODAD = 0x02
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3  # what `ip route add` uses
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
RTN_UNICAST = 1

_libc = ctypes.CDLL(None, use_errno=True)


class NetlinkError(OSError):
    """A request the kernel refused: errno plus its extended-ack message, when it gave one."""


class NetnsError(OSError):
    """setns(2) into the target namespace failed (not a netns, or it is gone)."""


def attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return ATTR.pack(length, kind) + payload + b"\0" * (-length & 3)


def _u32(kind: int, value: int) -> bytes:
    return attr(kind, U32.pack(value))


def _name(kind: int, name: str) -> bytes:
    return attr(kind, name.encode() + b"\0")


def _message(msg_type: int, flags: int, body: bytes) -> bytes:
    return NLMSG_HDR.pack(16 + len(body), msg_type, flags, 0, 0) + body


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def random_mac() -> str:
    """A locally administered unicast MAC, as the kernel would pick for a veth."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


# --------------------------------------------------------------------------- messages


def veth(host: str, host_mac: str, peer: str, peer_mac: str, peer_netns_fd: int, mtu: int) -> bytes:
    """RTM_NEWLINK: a veth pair whose peer is created directly in another netns."""
    peer_msg = (
        IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        + _name(IFLA_IFNAME, peer)
        + _u32(IFLA_MTU, mtu)
        + attr(IFLA_ADDRESS, mac_bytes(peer_mac))
        + _u32(IFLA_NET_NS_FD, peer_netns_fd)
    )
    info = attr(IFLA_INFO_KIND, b"veth")
    info += attr(IFLA_INFO_DATA | NLA_F_NESTED, attr(VETH_INFO_PEER | NLA_F_NESTED, peer_msg))
    body = (
        IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        + _name(IFLA_IFNAME, host)
        + _u32(IFLA_MTU, mtu)
        + attr(IFLA_ADDRESS, mac_bytes(host_mac))
        + attr(IFLA_LINKINFO | NLA_F_NESTED, info)
    )
    return _message(RTM_NEWLINK, NEW_FLAGS, body)


def link_up(index: int) -> bytes:
    return _message(RTM_NEWLINK, SET_FLAGS, IFINFOMSG.pack(0, 0, index, IFF_UP, IFF_UP))


def link_del(index: int) -> bytes:
    return _message(RTM_DELLINK, SET_FLAGS, IFINFOMSG.pack(0, 0, index, 0, 0))


def link_get(index: int) -> bytes:
    return _message(RTM_GETLINK, NLM_F_REQUEST, IFINFOMSG.pack(0, 0, index, 0, 0))


def _packed(ip: str) -> tuple[int, bytes]:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return family, socket.inet_pton(family, ip)


def address(index: int, ip: str, prefixlen: int) -> bytes:
    family, raw = _packed(ip)
    flags = IFA_F_NODAD if family == socket.AF_INET6 else 0
    attrs = attr(IFA_ADDRESS, raw)
    if family == socket.AF_INET:
        attrs = attr(IFA_LOCAL, raw) + attrs
    return _message(
        RTM_NEWADDR, NEW_FLAGS, IFADDRMSG.pack(family, prefixlen, flags, 0, index) + attrs
    )


def route(dst: str, dst_len: int, oif: int, gateway: str = "") -> bytes:
    """A main-table route: `dst/len dev oif scope link`, or `... via gateway` when given."""
    family, raw = _packed(dst)
    scope = RT_SCOPE_UNIVERSE if gateway else RT_SCOPE_LINK
    header = RTMSG.pack(family, dst_len, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST, 0)
    attrs = attr(RTA_DST, raw) if dst_len else b""
    if gateway:
        attrs += attr(RTA_GATEWAY, _packed(gateway)[1])
    return _message(RTM_NEWROUTE, NEW_FLAGS, header + attrs + _u32(RTA_OIF, oif))


# --------------------------------------------------------------------------- socket


class Rtnl:
    """One NETLINK_ROUTE socket, bound to the netns of the thread that created it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)  # fmt: skip
        try:
            self.sock.bind((0, 0))
            self.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        except BaseException:
            self.sock.close()
            raise
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def batch(self, messages: Sequence[bytes]) -> list[NetlinkError | None]:
        """Send the messages in one write (the kernel runs them in order) and collect each
        one's acknowledgement: None, or the error the kernel gave it."""
        seq0 = self._seq + 1
        self._seq += len(messages)
        out = bytearray()
        for i, msg in enumerate(messages):
            out += msg[:8] + U32.pack(seq0 + i) + msg[12:]
        self.sock.send(out)
        results: dict[int, NetlinkError | None] = {}
        while len(results) < len(messages):
            for seq, msg_type, payload in self._receive():
                if msg_type == NLMSG_ERROR and seq0 <= seq < seq0 + len(messages):
                    results[seq - seq0] = _ack_error(payload)
        return [results[i] for i in range(len(messages))]

    def request(self, message: bytes) -> None:
        """One acknowledged request; raises its NetlinkError."""
        (error,) = self.batch([message])
        if error is not None:
            raise error

    def get_link(self, index: int) -> dict[int, bytes] | None:
        """The top-level attributes of link `index` (IFLA_* -> payload), None if it is gone."""
        self._seq += 1
        seq = self._seq
        msg = link_get(index)
        self.sock.send(msg[:8] + U32.pack(seq) + msg[12:])
        while True:
            for got, msg_type, payload in self._receive():
                if got != seq:
                    continue
                if msg_type == NLMSG_ERROR:
                    error = _ack_error(payload)
                    if error is not None and error.errno == 19:  # ENODEV
                        return None
                    raise error or NetlinkError(0, "unexpected ack to RTM_GETLINK")
                if msg_type == RTM_NEWLINK:
                    return parse_attrs(payload, IFINFOMSG.size)

    def _receive(self) -> list[tuple[int, int, bytes]]:
        data = self.sock.recv(65536)
        out = []
        offset = 0
        while offset + 16 <= len(data):
            length, msg_type, _flags, seq, _pid = NLMSG_HDR.unpack_from(data, offset)
            if length < 16:
                break
            out.append((seq, msg_type, data[offset + 16 : offset + length]))
            offset += (length + 3) & ~3
        return out


def parse_attrs(payload: bytes, offset: int) -> dict[int, bytes]:
    attrs: dict[int, bytes] = {}
    while offset + 4 <= len(payload):
        length, kind = ATTR.unpack_from(payload, offset)
        if length < 4:
            break
        attrs[kind & 0x3FFF] = payload[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return attrs


def link_kind(attrs: dict[int, bytes]) -> str:
    info = parse_attrs(attrs.get(IFLA_LINKINFO, b""), 0)
    return info.get(IFLA_INFO_KIND, b"").rstrip(b"\0").decode(errors="replace")


def _ack_error(payload: bytes) -> NetlinkError | None:
    (code,) = struct.unpack_from("=i", payload, 0)
    if code == 0:
        return None
    err = -code
    text = os.strerror(err)
    # Extended ack: the original header (16 bytes; the request too without CAP_ACK) then TLVs.
    _len, _type, flags, _seq, _pid = NLMSG_HDR.unpack_from(payload, 4)
    if flags & NLM_F_ACK_TLVS:
        tlvs = parse_attrs(payload, 4 + _len)
        if NLMSGERR_ATTR_MSG in tlvs:
            detail = tlvs[NLMSGERR_ATTR_MSG].rstrip(b"\0").decode(errors="replace")
            text = f"{text} ({detail})"
    return NetlinkError(err, text)


# --------------------------------------------------------------------------- namespaces


def setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def visit(netns_fd: int, fn: Callable[[], T]) -> T:
    """Run `fn` on the calling thread while it is in the netns `netns_fd`, then come back.

    Two setns(2) calls: far cheaper than a thread per call (under load a new thread waits
    for the GIL). Sockets made inside keep that namespace. If the thread cannot come back
    it raises RuntimeError; the CNI server's threads serve one request each and end.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            setns(netns_fd)
        except OSError as e:
            raise NetnsError(e.errno, e.strerror) from e
        try:
            return fn()
        finally:
            try:
                setns(home)
            except OSError as e:
                raise RuntimeError(f"cannot return to the node netns: {e}") from e
    finally:
        os.close(home)


def ifindex(name: str) -> int:
    """The ifindex of `name` in the calling thread's netns (0: no such interface)."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0
