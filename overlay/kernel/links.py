"""Links and addresses over rtnetlink: underlay autodetection's interface list and route
lookups, and the link/dump helpers the tunnel devices and the dataplane reader share."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import TypeVar

import netaddr

from overlay.autodetect import Interface
from overlay.kernel import linkmsg, nlmsg
from overlay.kernel.batch import DumpInterrupted, RtnlSocket

DUMP_RETRIES = 5
T = TypeVar("T")


def dump_retrying(sock: RtnlSocket, request: bytes, decode: Callable[[memoryview], T]) -> list[T]:
    """Every decoded reply of a dump, redone if the kernel flags it as interrupted."""
    # Decode while iterating: dump payloads view a buffer that the next recv overwrites.
    for _ in range(DUMP_RETRIES):
        try:
            return [decode(payload) for _t, payload in sock.dump(request)]
        except DumpInterrupted:
            continue
    raise DumpInterrupted(f"dump kept changing under us after {DUMP_RETRIES} tries")


def request(sock: RtnlSocket, message: bytes) -> list[memoryview]:
    """Send one acked request; its replies (copied), or OSError with the kernel's errno."""
    return [memoryview(bytes(payload)) for _t, payload in sock.dump(message)]


def get_link(sock: RtnlSocket, name: str = "", index: int = 0) -> linkmsg.RawLink | None:
    """One link by index (if given) or name; None if there is no such link."""
    try:
        replies = request(sock, linkmsg.get_link(name, index))
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            return None
        raise
    return linkmsg.decode_link(replies[0]) if replies else None


def address_of(raw: bytes) -> netaddr.IPAddress:
    """An address as netlink carries it (4 or 16 bytes, network order)."""
    return netaddr.IPAddress(int.from_bytes(raw, "big"), 4 if len(raw) == 4 else 6)


def list_interfaces() -> list[Interface]:
    """Every link of the current netns, by index, with its addresses (with prefix).

    `up` means administratively up AND carrier present (a veth whose peer is down is not).
    """
    with RtnlSocket() as sock:
        links = dump_retrying(sock, nlmsg.dump_links(), linkmsg.decode_link)
        addrs = dump_retrying(sock, linkmsg.dump_addrs(), linkmsg.decode_addr)
    by_index: dict[int, list[netaddr.IPNetwork]] = {}
    for a in addrs:
        if a.family not in (socket.AF_INET, socket.AF_INET6):
            continue
        # IFA_LOCAL is our end of a point-to-point link; IFA_ADDRESS would be the peer's.
        raw = a.local or a.address
        if raw:
            version = 4 if len(raw) == 4 else 6
            net = netaddr.IPNetwork((int.from_bytes(raw, "big"), a.prefixlen), version)
            by_index.setdefault(a.index, []).append(net)
    out = []
    for link in sorted(links, key=lambda m: m.index):
        flags = link.flags
        out.append(
            Interface(
                name=link.name,
                index=link.index,
                mtu=link.mtu,
                up=bool(flags & linkmsg.IFF_UP and flags & linkmsg.IFF_LOWER_UP),
                addresses=tuple(by_index.get(link.index, ())),
            )
        )
    return out


def route_lookup(addr: netaddr.IPAddress) -> tuple[str, netaddr.IPAddress]:
    """(outgoing interface, source address) the kernel would use to reach `addr`.

    Raises LookupError when the route has no device or source (e.g. a blackhole), and
    OSError with the kernel's errno when there is no route at all.
    """
    with RtnlSocket() as sock:
        try:
            replies = request(sock, linkmsg.get_route(addr.packed))
        except OSError as e:
            raise OSError(e.errno, f"route lookup of {addr}: {e.strerror}") from None
        if not replies:
            raise LookupError(f"no route to {addr}")
        oif, src = linkmsg.decode_route_lookup(replies[0])
        if not oif or not src:
            raise LookupError(f"route to {addr} has no outgoing interface or source address")
        link = get_link(sock, index=oif)
    if link is None:
        raise LookupError(f"route to {addr} leaves through interface {oif}, which is gone")
    return link.name, address_of(src)
