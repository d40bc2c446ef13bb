"""Pod plumbing, Calico style: a veth pair between the node (the current netns) and a pod.

Host side: `cali` + SHA-1(workload id)[:11], MAC ee:ee:ee:ee:ee:ee, proxy_arp, no address,
and a /32 (/128) route to each pod address. Pod side: CNI_IFNAME with the addresses as
/32 (/128), a scope-link route to 169.254.1.1 and the default route via it (IPv6: via the
host veth's link-local address, the EUI-64 of ee:ee:ee:ee:ee:ee).

"Host" means the netns of the calling thread. ADD and DEL reach the pod through a netlink
socket made while the calling thread briefly visits the pod netns (cni.netlink.visit);
CHECK's inspection runs on a short-lived thread that joins the pod netns.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from cni import netlink
from cni.nsfd import is_netns
from cni.spec import (
    DATAPLANE_FAILURE,
    GATEWAY_V4,
    GATEWAY_V6,
    HOST_VETH_MAC,
    INVALID_NETNS,
    CniError,
)

if TYPE_CHECKING:
    from pyroute2 import IPRoute

log = logging.getLogger(__name__)

VETH_PREFIX = "cali"
CLONE_NEWNET = 0x40000000
SCOPE_LINK = 253
T = TypeVar("T")


def host_veth_name(workload_id: str, prefix: str = VETH_PREFIX) -> str:
    """Calico's host-side name: prefix + first 11 hex digits of SHA-1(workload id)."""
    return (prefix + hashlib.sha1(workload_id.encode()).hexdigest())[:15]


def workload_id(namespace: str, pod: str, container_id: str) -> str:
    """`<namespace>.<pod>` for Kubernetes pods (stable across sandboxes), else the container."""
    return f"{namespace}.{pod}" if namespace and pod else container_id


class PodLink:
    """What setup_pod made: the names and MACs the CNI result reports."""

    __slots__ = ("addresses", "host_ifname", "host_mac", "mtu", "pod_ifname", "pod_mac")

    def __init__(
        self,
        host_ifname: str,
        pod_ifname: str,
        pod_mac: str,
        mtu: int,
        addresses: list[str],
        host_mac: str = HOST_VETH_MAC,
    ) -> None:
        self.host_ifname = host_ifname
        self.host_mac = host_mac
        self.pod_ifname = pod_ifname
        self.pod_mac = pod_mac
        self.mtu = mtu
        self.addresses = addresses

    def __repr__(self) -> str:
        return f"PodLink({', '.join(f'{s}={getattr(self, s)!r}' for s in self.__slots__)})"


# --------------------------------------------------------------------------- namespaces

_libc = ctypes.CDLL(None, use_errno=True)


def open_netns(path: str) -> int:
    """An fd on the pod netns; a missing path is code 8 (invalid netns)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise CniError(INVALID_NETNS, f"cannot open netns {path}: {e.strerror}") from e
    if not is_netns(fd):
        os.close(fd)
        # Typically a bind mount made in another mount namespace: only the file is visible.
        raise CniError(INVALID_NETNS, f"{path} is not a network namespace")
    return fd


def in_netns(fd: int, fn: Callable[[], T], timeout: float = 30.0) -> T:
    """Run fn on a fresh thread that has joined the netns `fd`; return or re-raise its outcome."""
    box: dict[str, object] = {}

    def body() -> None:
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise CniError(INVALID_NETNS, f"setns failed: {os.strerror(err)}")
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=body, name="pod-netns", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise CniError(DATAPLANE_FAILURE, f"pod netns operation did not finish in {timeout:g} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _sysctl(path: str, value: str, *, required: bool = True) -> None:
    try:
        with open("/proc/sys/net/" + path, "w") as f:
            f.write(value)
    except OSError as e:
        if required:
            raise CniError(DATAPLANE_FAILURE, f"cannot set sysctl net/{path}={value}: {e}") from e
        log.warning("sysctl not set path=net/%s value=%s error=%s", path, value, e)


def _read_sysctl(path: str) -> str:
    try:
        with open("/proc/sys/net/" + path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _narrow(addresses: Sequence[str]) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    """Pod addresses as host routes: /32 for IPv4, /128 for IPv6, whatever prefix IPAM gave."""
    out = []
    for a in addresses:
        ip = ipaddress.ip_interface(a).ip
        out.append(ipaddress.ip_interface(f"{ip}/{ip.max_prefixlen}"))
    return out


def _lookup(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _link_kind(link: object) -> str | None:
    info = link.get("IFLA_LINKINFO")  # type: ignore[attr-defined]
    return info.get("IFLA_INFO_KIND") if info is not None else None


# --------------------------------------------------------------------------- setup


def setup_pod(
    netns: str,
    ifname: str,
    workload: str,
    addresses: Sequence[str],
    mtu: int,
    mac: str = "",
    veth_prefix: str = VETH_PREFIX,
) -> PodLink:
    """Create and configure the pair; undo everything on failure.

    Four netlink round trips on the hot path: create the pair (the pod end directly in the
    pod netns, MACs and MTU set), configure the pod side in one batch, then bring the host
    end up and add its routes in one batch. No thread and no pyroute2 object per call.
    """
    ips = _narrow(addresses)
    host = host_veth_name(workload, veth_prefix)
    # Chosen here rather than read back: a random locally administered MAC, as veth does.
    pod_mac = mac.lower() if mac else netlink.random_mac()
    fd = open_netns(netns)
    try:
        with netlink.Rtnl() as nl:
            idx = _create_veth(nl, host, ifname, pod_mac, fd, mtu, netns)
            try:
                _host_sysctls(host, ips)
                _configure_pod(fd, ifname, ips)
                messages = [netlink.link_up(idx)]
                messages += [netlink.route(str(ip.ip), ip.max_prefixlen, idx) for ip in ips]
                errors = nl.batch(messages)
                if errors[0] is not None:
                    raise CniError(DATAPLANE_FAILURE, f"cannot bring {host} up: {errors[0]}")
                for ip, error in zip(ips, errors[1:], strict=True):
                    if error is not None:
                        _host_route_conflict(idx, host, ip, error)
            except BaseException:
                with contextlib.suppress(OSError):
                    nl.request(netlink.link_del(idx))
                raise
        log.info("pod plumbed veth=%s ifname=%s netns=%s addrs=%s", host, ifname, netns, ips)
        return PodLink(host, ifname, pod_mac, mtu, [str(ip) for ip in ips])
    finally:
        os.close(fd)


def restore_host_route(host: str, index: int, ip: str) -> bool:
    """Write the host route to a pod (`ip` on its host veth `host`) again, if interface
    `index` is still that veth: the pod lives. False when it is not, or the route is back."""
    addr = ipaddress.ip_address(ip)
    if netlink.ifindex(host) != index:
        return False  # the pod is gone (or going), or the index belongs to another link now
    with netlink.Rtnl() as nl:
        try:
            nl.request(netlink.route(str(addr), addr.max_prefixlen, index))
        except netlink.NetlinkError as e:
            if e.errno in (errno.EEXIST, errno.ENODEV):
                return False  # put back meanwhile, or the veth went meanwhile
            raise
    log.info("pod route restored veth=%s addr=%s", host, addr)
    return True


def _create_veth(
    nl: netlink.Rtnl, host: str, ifname: str, pod_mac: str, fd: int, mtu: int, netns: str
) -> int:
    """The pair, with a leftover host end of an earlier sandbox replaced. Returns its index."""
    message = netlink.veth(host, HOST_VETH_MAC, ifname, pod_mac, fd, mtu)
    for attempt in (1, 2):
        try:
            nl.request(message)
            break
        except netlink.NetlinkError as e:
            old = netlink.ifindex(host) if e.errno == errno.EEXIST else 0
            if old and attempt == 1:  # a leftover of an earlier sandbox of the same workload
                log.info("deleting stale host veth name=%s", host)
                try:
                    nl.request(netlink.link_del(old))
                except netlink.NetlinkError as de:
                    raise CniError(DATAPLANE_FAILURE, f"cannot delete stale {host}: {de}") from de
                continue
            if e.errno == errno.EEXIST:
                raise CniError(
                    DATAPLANE_FAILURE,
                    f"interface {ifname} already exists in netns {netns}",
                    "the runtime must DEL before it repeats ADD for a container",
                ) from e
            if e.errno == errno.EADDRNOTAVAIL:
                raise CniError(
                    DATAPLANE_FAILURE, f"the kernel refused MAC {pod_mac} for {ifname}: {e}"
                ) from e
            raise CniError(
                DATAPLANE_FAILURE, f"cannot create veth {host} with {ifname} in the pod: {e}"
            ) from e
    idx = netlink.ifindex(host)
    if not idx:
        raise CniError(DATAPLANE_FAILURE, f"veth {host} vanished right after its creation")
    return idx


def _host_sysctls(
    host: str, ips: Sequence[ipaddress.IPv4Interface | ipaddress.IPv6Interface]
) -> None:
    # Set before the link goes up, so the IPv6 link-local address skips DAD.
    if any(ip.version == 4 for ip in ips):
        _sysctl("ipv4/ip_forward", "1")
        _sysctl(f"ipv4/conf/{host}/forwarding", "1")
        _sysctl(f"ipv4/conf/{host}/proxy_arp", "1")
        _sysctl(f"ipv4/neigh/{host}/proxy_delay", "0")
        _sysctl(f"ipv4/conf/{host}/route_localnet", "1")
    if any(ip.version == 6 for ip in ips):
        # IPv6 forwards only with the host-wide switch on (the per-device one is not enough).
        _sysctl("ipv6/conf/all/forwarding", "1")
        _sysctl(f"ipv6/conf/{host}/disable_ipv6", "0")
        _sysctl(f"ipv6/conf/{host}/accept_dad", "0")
        _sysctl(f"ipv6/conf/{host}/proxy_ndp", "1")
        _sysctl(f"ipv6/conf/{host}/forwarding", "1")
    # Router advertisements must not configure the host side (a failure is only logged).
    _sysctl(f"ipv6/conf/{host}/accept_ra", "0", required=False)


def _configure_pod(
    fd: int, ifname: str, ips: Sequence[ipaddress.IPv4Interface | ipaddress.IPv6Interface]
) -> None:
    """Addresses, routes and link state of the pod end, in one netlink batch."""
    has6 = any(ip.version == 6 for ip in ips)

    def inside() -> tuple[netlink.Rtnl, int, int]:
        if has6:  # /proc/sys/net belongs to the netns of the thread that opens it
            for conf in ("all", "default", "lo"):
                _sysctl(f"ipv6/conf/{conf}/disable_ipv6", "0")
            _sysctl(f"ipv6/conf/{ifname}/disable_ipv6", "0")
            _sysctl(f"ipv6/conf/{ifname}/accept_dad", "0")
        return netlink.Rtnl(), netlink.ifindex(ifname), netlink.ifindex("lo")

    try:
        nl, idx, lo = netlink.visit(fd, inside)
    except netlink.NetnsError as e:
        raise CniError(INVALID_NETNS, f"setns failed: {e.strerror}") from e
    with nl:
        if not idx:
            raise CniError(DATAPLANE_FAILURE, f"{ifname} did not appear in the pod netns")
        messages = [netlink.link_up(lo)] if lo else []
        messages.append(netlink.link_up(idx))
        messages += [netlink.address(idx, str(ip.ip), ip.max_prefixlen) for ip in ips]
        if any(ip.version == 4 for ip in ips):
            messages.append(netlink.route(GATEWAY_V4, 32, idx))
            messages.append(netlink.route("0.0.0.0", 0, idx, GATEWAY_V4))
        if has6:
            messages.append(netlink.route("::", 0, idx, GATEWAY_V6))
        for error in nl.batch(messages):
            if error is not None:
                raise CniError(DATAPLANE_FAILURE, f"cannot configure {ifname} in the pod: {error}")


def _host_route_conflict(
    idx: int,
    host: str,
    ip: ipaddress.IPv4Interface | ipaddress.IPv6Interface,
    error: netlink.NetlinkError,
) -> None:
    """A host route add failed: fine only if the route exists and points at our veth."""
    if error.errno != errno.EEXIST:
        raise CniError(DATAPLANE_FAILURE, f"cannot add host route {ip} dev {host}: {error}")
    from pyroute2 import IPRoute  # rare: pyroute2 is fine here

    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    with IPRoute() as ipr:
        routes = ipr.route("get", dst=str(ip.ip), family=family)
        oif = routes[0].get("RTA_OIF") if routes else None
        if oif != idx:
            other = ipr.get_links(oif)[0].get("IFLA_IFNAME") if oif else "?"
            raise CniError(
                DATAPLANE_FAILURE,
                f"host route {ip} already exists on interface {other}",
                f"another workload or a leftover route uses {ip.ip}; check `ip route get {ip.ip}`",
            ) from error


# --------------------------------------------------------------------------- teardown


def teardown_pod(netns: str, ifname: str) -> bool:
    """Delete the pod's veth (the host end and host routes go with it).

    Idempotent: an empty or vanished netns, or a missing interface, is success. Returns
    whether something was deleted. Deleting by the pod-side name, not the host name,
    keeps a newer sandbox of the same workload (same host name) intact.
    """
    if not netns:
        return False
    try:
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        try:
            nl, idx = netlink.visit(fd, lambda: (netlink.Rtnl(), netlink.ifindex(ifname)))
        except netlink.NetnsError:  # e.g. an unmounted bind-mount point: the netns is gone
            return False
        with nl:
            attrs = nl.get_link(idx) if idx else None
            if attrs is None:
                return False
            kind = netlink.link_kind(attrs)
            if kind != "veth":
                raise CniError(
                    DATAPLANE_FAILURE,
                    f"{ifname} in the pod is a {kind or '?'} device, not our veth",
                )
            try:
                nl.request(netlink.link_del(idx))
            except netlink.NetlinkError as e:
                if e.errno == errno.ENODEV:
                    return False
                raise CniError(DATAPLANE_FAILURE, f"cannot delete {ifname} in the pod: {e}") from e
            return True
    finally:
        os.close(fd)


def teardown_host(workload: str, veth_prefix: str = VETH_PREFIX) -> bool:
    """Delete the workload's host veth (GC: the pod netns may be gone or stale). Only a
    veth of that name is touched. Returns whether something was deleted."""
    from pyroute2 import IPRoute  # ~0.09 s to import: only GC, CHECK and errors use it
    from pyroute2.netlink.exceptions import NetlinkError

    name = host_veth_name(workload, veth_prefix)
    with IPRoute() as ipr:
        idx = _lookup(ipr, name)
        if idx is None or _link_kind(ipr.get_links(idx)[0]) != "veth":
            return False
        try:
            ipr.link("del", index=idx)
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return False
            raise
        log.info("host veth removed name=%s workload=%s", name, workload)
        return True


# --------------------------------------------------------------------------- inspection


def inspect_pod(
    netns: str,
    ifname: str,
    workload: str,
    addresses: Sequence[str],
    mac: str = "",
    veth_prefix: str = VETH_PREFIX,
) -> list[str]:
    """Differences between the plumbing and what setup_pod makes (empty: all in place)."""
    from pyroute2 import IPRoute

    ips = _narrow(addresses)
    host = host_veth_name(workload, veth_prefix)
    problems: list[str] = []
    try:
        fd = open_netns(netns)
    except CniError as e:
        return [e.msg]
    try:
        problems += in_netns(fd, lambda: _inspect_pod_side(ifname, ips, mac))
    finally:
        os.close(fd)
    with IPRoute() as ipr:
        idx = _lookup(ipr, host)
        if idx is None:
            return [*problems, f"host veth {host} is missing"]
        link = ipr.get_links(idx)[0]
        if _link_kind(link) != "veth":
            problems.append(f"host interface {host} is not a veth")
        if link.get("IFLA_ADDRESS") != HOST_VETH_MAC:
            problems.append(
                f"host veth {host} has MAC {link.get('IFLA_ADDRESS')}, expected {HOST_VETH_MAC}"
            )
        if link.get("IFLA_OPERSTATE") != "UP":
            problems.append(f"host veth {host} is {link.get('IFLA_OPERSTATE')}, expected UP")
        if (
            any(ip.version == 4 for ip in ips)
            and _read_sysctl(f"ipv4/conf/{host}/proxy_arp") != "1"
        ):
            problems.append(f"proxy_arp is off on host veth {host}")
        for ip in ips:
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            routes = ipr.get_routes(family=family, dst=str(ip.ip), dst_len=ip.network.prefixlen)
            if not any(r.get("RTA_OIF") == idx for r in routes):
                problems.append(f"host route {ip} dev {host} is missing")
    return problems


def _inspect_pod_side(
    ifname: str,
    ips: Sequence[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
    mac: str,
) -> list[str]:
    from pyroute2 import IPRoute

    problems: list[str] = []
    with IPRoute() as ipr:
        idx = _lookup(ipr, ifname)
        if idx is None:
            return [f"interface {ifname} is missing in the pod"]
        link = ipr.get_links(idx)[0]
        if _link_kind(link) != "veth":
            problems.append(f"pod interface {ifname} is not a veth")
        if mac and link.get("IFLA_ADDRESS") != mac.lower():
            problems.append(f"pod interface {ifname} has MAC {link.get('IFLA_ADDRESS')}, "
                            f"expected {mac.lower()}")  # fmt: skip
        have = {f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=idx)}
        for ip in ips:
            if str(ip) not in have:
                problems.append(f"address {ip} is missing on pod interface {ifname}")
        routes = [
            (r.get("RTA_DST"), r["dst_len"], r.get("RTA_GATEWAY"), r["scope"])
            for fam in (socket.AF_INET, socket.AF_INET6)
            for r in ipr.get_routes(family=fam, oif=idx)
        ]
        if any(ip.version == 4 for ip in ips):
            if (GATEWAY_V4, 32, None, SCOPE_LINK) not in routes:
                problems.append(f"route {GATEWAY_V4}/32 scope link dev {ifname} is missing")
            if not any(r[1] == 0 and r[2] == GATEWAY_V4 for r in routes):
                problems.append(f"default route via {GATEWAY_V4} dev {ifname} is missing")
        if any(ip.version == 6 for ip in ips) and not any(
            r[1] == 0 and r[2] == GATEWAY_V6 for r in routes
        ):
            problems.append(f"default route via {GATEWAY_V6} dev {ifname} is missing")
    return problems
