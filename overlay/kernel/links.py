"""The current network namespace's interfaces and route lookups, for underlay autodetection."""

from __future__ import annotations

import socket

import netaddr
from pyroute2 import IPRoute, NetlinkError

from overlay.autodetect import Interface

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000


def list_interfaces() -> list[Interface]:
    """Every link of the current netns, by index, with its addresses (with prefix).

    `up` means administratively up AND carrier present (a veth whose peer is down is not).
    """
    with IPRoute() as ipr:
        links = ipr.get_links()
        addrs = ipr.get_addr()
    by_index: dict[int, list[netaddr.IPNetwork]] = {}
    for msg in addrs:
        if msg["family"] not in (socket.AF_INET, socket.AF_INET6):
            continue
        # IFA_LOCAL is our end of a point-to-point link; IFA_ADDRESS would be the peer's.
        text = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        if text:
            by_index.setdefault(msg["index"], []).append(
                netaddr.IPNetwork(f"{text}/{msg['prefixlen']}")
            )
    out = []
    for link in sorted(links, key=lambda m: m["index"]):
        flags = link["flags"]
        out.append(
            Interface(
                name=link.get("IFLA_IFNAME"),
                index=link["index"],
                mtu=link.get("IFLA_MTU"),
                up=bool(flags & IFF_UP and flags & IFF_LOWER_UP),
                addresses=tuple(by_index.get(link["index"], ())),
            )
        )
    return out


def route_lookup(addr: netaddr.IPAddress) -> tuple[str, netaddr.IPAddress]:
    """(outgoing interface, source address) the kernel would use to reach `addr`.

    Raises LookupError when the route has no device or source (e.g. a blackhole), and
    OSError with the kernel's errno when there is no route at all.
    """
    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=str(addr))
        except NetlinkError as e:
            raise OSError(e.code, f"route lookup of {addr}: {e}") from None
        if not routes:
            raise LookupError(f"no route to {addr}")
        oif = routes[0].get("RTA_OIF")
        src = routes[0].get("RTA_PREFSRC")
        if oif is None or src is None:
            raise LookupError(f"route to {addr} has no outgoing interface or source address")
        links = ipr.get_links(oif)
    return links[0].get("IFLA_IFNAME"), netaddr.IPAddress(src)
