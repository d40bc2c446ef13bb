"""Underlay address autodetection (Calico's IP_AUTODETECTION_METHOD) and host MTU, pure.

The input is a list of `Interface` values (overlay.kernel.links reads them from the kernel);
the result is the underlay interface and the address WITH its real prefix, which is what
cross-subnet routing needs. Methods:

    first-found                  first usable address on an interface not excluded below
    skip-interface=REGEX,...     first-found, also skipping interfaces matching REGEX
    interface=REGEX,...          first usable address on an interface matching REGEX
                                 (regexes tried in the order given)
    cidr=CIDR,...                first usable address inside one of the CIDRs
    can-reach=ADDR               the source address the kernel routes ADDR from
    10.0.1.5/24 or 10.0.1.5      a fixed address, looked up on the interfaces for its prefix

Regexes match anywhere in the name (re.search), as in Calico; anchor them with ^...$.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import netaddr

log = logging.getLogger(__name__)

# Calico's first-found exclusions (autodetection_linux.go).
DEFAULT_EXCLUDES: tuple[str, ...] = (
    r"^docker.*",
    r"^cbr.*",
    r"^dummy.*",
    r"^podman.*",
    r"^virbr.*",
    r"^lxcbr.*",
    r"^veth.*",
    r"^lo",
    r"^br-.*",
    r"^cali.*",
    r"^tunl.*",
    r"^flannel.*",
    r"^kube-ipvs.*",
    r"^cni.*",
    r"^vxlan\.calico.*",
    r"^vxlan-v6\.calico.*",
    r"^wireguard\.cali.*",
    r"^wg-v6\.cali.*",
    r"^nodelocaldns.*",
)
# Our own devices carry tunnel and pod-gateway addresses, never the underlay: every scanning
# method skips them, so a broad `interface=.*` or `cidr=` cannot pick a tunnel address.
OWN_DEVICES: tuple[str, ...] = (
    r"^cali.*",
    r"^tunl.*",
    r"^vxlan\.calico.*",
    r"^vxlan-v6\.calico.*",
    r"^wireguard\.cali.*",
    r"^wg-v6\.cali.*",
)
# Calico's default MTUIfacePattern.
DEFAULT_MTU_PATTERN = r"^((en|wl|ww|sl|ib)[Pcopsvx].*|(eth|wlan|wwan).*)"
DEFAULT_HOST_MTU = 1460

METHODS = ("first-found", "skip-interface=", "interface=", "cidr=", "can-reach=")

RouteLookup = Callable[[netaddr.IPAddress], tuple[str, netaddr.IPAddress]]


class AutodetectError(ValueError):
    """No underlay address could be chosen; the message names the method and what was seen."""


@dataclass(frozen=True)
class Interface:
    name: str
    index: int
    mtu: int
    up: bool
    addresses: tuple[netaddr.IPNetwork, ...] = ()  # each with its prefix, e.g. 10.0.1.5/24


class Underlay(NamedTuple):
    interface: str | None  # None only for a fixed address given with a prefix, not found
    address: netaddr.IPNetwork  # with prefix


def usable(addr: netaddr.IPNetwork, version: int) -> bool:
    """Addresses that can carry the underlay: right family, not loopback, not link-local."""
    ip = addr.ip
    return ip.version == version and not ip.is_loopback() and not ip.is_link_local()


def _compile(method: str, patterns: Iterable[str]) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise AutodetectError(f"{method}: invalid interface regex {p!r}: {e}") from None
    return out


def _split(method: str, text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise AutodetectError(f"{method}: expected a comma-separated list, got nothing")
    return items


def _seen(interfaces: Sequence[Interface]) -> str:
    """A short listing of what was there, for error messages."""
    if not interfaces:
        return "no interfaces"
    parts = []
    for i in interfaces:
        addrs = ",".join(str(a) for a in i.addresses) or "no address"
        parts.append(f"{i.name}({'up' if i.up else 'down'}: {addrs})")
    return "; ".join(parts)


def _first_address(
    method: str,
    interfaces: Sequence[Interface],
    version: int,
    include: Sequence[re.Pattern[str]] | None,
    exclude: Sequence[re.Pattern[str]],
    cidrs: Sequence[netaddr.IPNetwork] | None = None,
) -> Underlay:
    own = _compile(method, OWN_DEVICES)
    for iface in interfaces:
        if not iface.up or any(p.search(iface.name) for p in (*exclude, *own)):
            continue
        if include is not None and not any(p.search(iface.name) for p in include):
            continue
        for addr in iface.addresses:
            if not usable(addr, version):
                continue
            if cidrs is not None and not any(addr.ip in c for c in cidrs):
                continue
            return Underlay(iface.name, addr)
    raise AutodetectError(
        f"{method}: no usable IPv{version} address (up interface, not loopback or "
        f"link-local) found; interfaces seen: {_seen(interfaces)}"
    )


def detect(
    method: str,
    interfaces: Sequence[Interface],
    *,
    version: int = 4,
    route_lookup: RouteLookup | None = None,
) -> Underlay:
    """The underlay interface and address (with prefix) chosen by `method`."""
    method = method.strip() or "first-found"
    if version not in (4, 6):
        raise AutodetectError(f"version {version}: expected 4 or 6")
    if method == "first-found":
        return _first_address(method, interfaces, version, None, _compile(method, DEFAULT_EXCLUDES))
    if method.startswith("skip-interface="):
        # Calico replaces its defaults with the given list; we add to them, so that
        # skipping one NIC cannot make docker0 or our own tunnel device the underlay.
        extra = _split(method, method.partition("=")[2])
        exclude = _compile(method, (*DEFAULT_EXCLUDES, *extra))
        return _first_address(method, interfaces, version, None, exclude)
    if method.startswith("interface="):
        # One regex at a time, so the order given is the order of preference (as Calico).
        patterns = _compile(method, _split(method, method.partition("=")[2]))
        for pattern in patterns:
            try:
                return _first_address(method, interfaces, version, [pattern], [])
            except AutodetectError:
                continue
        raise AutodetectError(
            f"{method}: no up interface matching it has a usable IPv{version} address; "
            f"interfaces seen: {_seen(interfaces)}"
        )
    if method.startswith("cidr="):
        cidrs = []
        for text in _split(method, method.partition("=")[2]):
            try:
                cidrs.append(netaddr.IPNetwork(text))
            except (netaddr.AddrFormatError, ValueError):
                raise AutodetectError(f"{method}: {text!r} is not a CIDR") from None
        return _first_address(method, interfaces, version, None, [], cidrs)
    if method.startswith("can-reach="):
        return _can_reach(method, interfaces, version, route_lookup)
    return _fixed(method, interfaces)


def _can_reach(
    method: str,
    interfaces: Sequence[Interface],
    version: int,
    route_lookup: RouteLookup | None,
) -> Underlay:
    target_text = method.partition("=")[2].strip()
    try:
        target = netaddr.IPAddress(target_text)
    except (netaddr.AddrFormatError, ValueError):
        raise AutodetectError(
            f"{method}: {target_text!r} is not an IP address (host names are not resolved)"
        ) from None
    if target.version != version:
        raise AutodetectError(f"{method}: {target} is not an IPv{version} address")
    if route_lookup is None:
        raise AutodetectError(f"{method}: no route lookup available to resolve it")
    try:
        ifname, src = route_lookup(target)
    except (OSError, LookupError) as e:
        raise AutodetectError(f"{method}: the kernel has no route to {target}: {e}") from None
    for iface in interfaces:
        if iface.name != ifname:
            continue
        for addr in iface.addresses:
            if addr.ip == src:
                return Underlay(iface.name, addr)
    raise AutodetectError(
        f"{method}: route to {target} leaves {ifname} from {src}, but no interface carries "
        f"{src}; interfaces seen: {_seen(interfaces)}"
    )


def _fixed(text: str, interfaces: Sequence[Interface]) -> Underlay:
    try:
        given = netaddr.IPNetwork(text)
    except (netaddr.AddrFormatError, ValueError):
        raise AutodetectError(
            f"autodetection method {text!r}: expected first-found, skip-interface=REGEX, "
            "interface=REGEX, cidr=CIDR, can-reach=ADDR or an address such as 10.0.1.5/24"
        ) from None
    has_prefix = "/" in text
    for iface in interfaces:
        for addr in iface.addresses:
            if addr.ip != given.ip:
                continue
            if has_prefix and given.prefixlen != addr.prefixlen:
                # The operator's prefix wins: it may describe the L2 domain better than
                # the interface does; say so, since it decides who is on our subnet.
                log.warning(
                    "fixed underlay address %s: %s carries it as %s; using /%d as given",
                    text,
                    iface.name,
                    addr,
                    given.prefixlen,
                )
                return Underlay(iface.name, given)
            return Underlay(iface.name, addr)
    if not has_prefix:
        raise AutodetectError(
            f"fixed underlay address {text}: not on any interface, so its prefix is unknown; "
            f"give it with its prefix (e.g. {text}/24); interfaces seen: {_seen(interfaces)}"
        )
    log.warning("fixed underlay address %s: not on any interface; using it as given", text)
    return Underlay(None, given)


def host_mtu(
    interfaces: Sequence[Interface],
    pattern: str = DEFAULT_MTU_PATTERN,
    *,
    underlay: str | None = None,
) -> int:
    """The MTU the tunnels are derived from.

    The underlay interface's own MTU when it is known: in namespace labs and VMs the
    underlay is the tunnel's parent (a veth, a virtio NIC) whose name need not match
    Calico's pattern, and other NICs' MTUs do not bound the packets we encapsulate.
    Otherwise Calico's rule: the smallest MTU among up interfaces whose name matches
    `pattern`, or 1460 with a warning when none does.
    """
    if underlay is not None:
        for iface in interfaces:
            if iface.name == underlay:
                return iface.mtu
        log.warning("underlay interface %s not found; using the MTU pattern instead", underlay)
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise AutodetectError(f"MTU interface pattern {pattern!r}: {e}") from None
    mtus = [i.mtu for i in interfaces if i.up and regex.search(i.name)]
    if not mtus:
        log.warning(
            "no up interface matches the MTU pattern %r; assuming host MTU %d",
            pattern,
            DEFAULT_HOST_MTU,
        )
        return DEFAULT_HOST_MTU
    return min(mtus)
