"""Tunnel devices (vxlan.calico, tunl0): read, ensure, delete, over the agent's RtnlSocket.

Device changes are rare and few: one acked request at a time (linkmsg's encoders). Kernel
errors surface as OSError with the kernel's errno.
"""

from __future__ import annotations

import errno
import logging
import socket

import netaddr

from overlay.kernel import linkmsg, nlmsg
from overlay.kernel.batch import RtnlSocket
from overlay.kernel.ethtool import Ethtool
from overlay.kernel.links import address_of, dump_retrying, get_link, request
from overlay.model import Device, IpipDevice, VxlanDevice

log = logging.getLogger("overlay.kernel")

IFF_UP = linkmsg.IFF_UP
# Reported as the address of a device whose addresses are not exactly one host-prefix address:
# it never equals a desired tunnel address, so plan() sees drift and re-sets the device.
MESSY_ADDRESS = netaddr.IPAddress("0.0.0.0")
MESSY_ADDRESS6 = netaddr.IPAddress("::")


class Unsupported(Exception):
    """The kernel lacks a feature this device needs."""


class DeviceError(Exception):
    """A device cannot be configured as asked (bad parent, EEXIST from a foreign device...)."""


def _addresses(sock: RtnlSocket, index: int) -> list[tuple[netaddr.IPAddress, int]]:
    out = []
    for a in dump_retrying(sock, linkmsg.dump_addrs(index), linkmsg.decode_addr):
        raw = a.address or a.local
        if a.index != index or a.family not in (socket.AF_INET, socket.AF_INET6) or not raw:
            continue  # old kernels ignore the dump filter
        ip = address_of(raw)
        if ip.version == 6 and ip.is_link_local():
            continue  # the kernel's own; never ours to manage
        out.append((ip, a.prefixlen))
    return out


def _tunnel_address(
    addrs: list[tuple[netaddr.IPAddress, int]], version: int = 4
) -> netaddr.IPAddress | None:
    """The one host address of `version` (/32 or /128) a device holds; MESSY_ADDRESS when it
    holds anything else of that version, so that a sync replaces it."""
    mine = [(ip, plen) for ip, plen in addrs if ip.version == version]
    if not mine:
        return None
    if len(mine) == 1 and mine[0][1] == mine[0][0].netmask_bits():
        return mine[0][0]
    return MESSY_ADDRESS if version == 4 else MESSY_ADDRESS6


def _name_of(sock: RtnlSocket, index: int) -> str:
    try:
        link = get_link(sock, index=index) if index else None
    except OSError:
        return ""
    return link.name if link is not None else ""


def read_device(sock: RtnlSocket, name: str, tool: Ethtool | None = None) -> Device | None:
    """Our device `name` as a model value, or None if absent or not of our kind. Its TX
    checksum offload is read only with an ethtool socket `tool` (else reported None)."""
    link = get_link(sock, name)
    if link is None:
        return None
    addrs = _addresses(sock, link.index)
    tx = None
    if tool is not None and link.kind in ("vxlan", "ipip"):
        try:
            tx = tool.tx_checksum(name)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return None  # gone in between
            raise
    if link.kind == "vxlan" and link.data is not None:
        vx = linkmsg.vxlan_info(link.data)
        return VxlanDevice(
            name=name,
            vni=vx.vni,
            port=vx.port,
            local=address_of(vx.local) if vx.local else netaddr.IPAddress("0.0.0.0"),
            parent=_name_of(sock, vx.parent),
            mac=link.mac,
            mtu=link.mtu,
            address=_tunnel_address(addrs),
            tx_checksum=tx,
            address6=_tunnel_address(addrs, 6),
        )
    if link.kind == "ipip":
        # tunl0 is the ipip module's fallback device and may exist untouched: it is ours only
        # once configured (up or addressed).
        if not addrs and not link.flags & IFF_UP:
            return None
        # IPv4 only: an IPv6 address on it is as out of place as a second IPv4 one.
        v4_only = all(ip.version == 4 for ip, _ in addrs)
        address = _tunnel_address(addrs) if v4_only else MESSY_ADDRESS
        return IpipDevice(name=name, mtu=link.mtu, address=address, tx_checksum=tx)
    return None


def _vxlan_drift(link: linkmsg.RawLink, dev: VxlanDevice, parent_index: int) -> list[str]:
    if link.kind != "vxlan" or link.data is None:
        return [f"kind={link.kind or 'unknown'}"]
    vx = linkmsg.vxlan_info(link.data)
    checks = {
        "vni": (vx.vni, dev.vni),
        "port": (vx.port, dev.port),
        "local": (address_of(vx.local) if vx.local else None, dev.local),
        "parent": (vx.parent, parent_index),
        "mac": (link.mac, dev.mac.lower()),
        "learning": (vx.learning, False),
    }
    return [f"{k}={have}->{want}" for k, (have, want) in checks.items() if have != want]


def _sync_addresses(sock: RtnlSocket, index: int, want: list[netaddr.IPAddress]) -> bool:
    """Make the device's addresses exactly `want`, each as a host address (/32, /128)."""
    changed = False
    have = _addresses(sock, index)
    wanted = {(ip, ip.netmask_bits()) for ip in want}
    for ip, plen in have:
        if (ip, plen) not in wanted:
            request(sock, linkmsg.address(False, index, ip.packed, plen))
            changed = True
    for ip, plen in sorted(wanted - set(have)):
        request(sock, linkmsg.address(True, index, ip.packed, plen))
        changed = True
    return changed


def _finish(
    sock: RtnlSocket, link: linkmsg.RawLink, dev: Device, tool: Ethtool | None
) -> list[str]:
    changes = []
    mtu = dev.mtu
    addresses = [a for a in (dev.address, getattr(dev, "address6", None)) if a is not None]
    if mtu and link.mtu != mtu:
        try:
            request(sock, linkmsg.set_link(link.index, mtu=mtu))
            changes.append(f"mtu={mtu}")
        except OSError as exc:
            # e.g. larger than the parent allows: keep the device working, retry next sync.
            log.warning(
                "event=device_mtu_failed dev=%s mtu=%d errno=%d error=%r",
                link.name,
                mtu,
                exc.errno,
                exc.strerror,
            )
    if _sync_addresses(sock, link.index, addresses):
        changes.append("address=" + ",".join(map(str, addresses or ["none"])))
    if not link.flags & IFF_UP:
        request(sock, linkmsg.set_link(link.index, up=True))
        changes.append("up")
    want_tx = dev.tx_checksum
    if want_tx is not None and tool is not None and tool.tx_checksum(link.name) != want_tx:
        tool.set_tx_checksum(link.name, want_tx)
        changes.append(f"tx_checksum={'on' if want_tx else 'off'}")
    return changes


def ensure_vxlan(sock: RtnlSocket, dev: VxlanDevice, tool: Ethtool | None = None) -> list[str]:
    """Make `dev` exist as described; return what changed ("created", "recreated ...", ...).

    VNI, port, local, parent, MAC or learning drift needs delete + create (the kernel cannot
    change them in place); MTU, address, up state and TX checksum offload (with an ethtool
    socket `tool`) are fixed in place.
    """
    parent = get_link(sock, dev.parent)
    if parent is None:
        raise DeviceError(f"parent: interface {dev.parent!r} not found for {dev.name}")
    changes: list[str] = []
    link = get_link(sock, dev.name)
    if link is not None:
        drift = _vxlan_drift(link, dev, parent.index)
        if drift:
            request(sock, linkmsg.del_link(link.index))
            changes.append("recreated " + " ".join(drift))
            link = None
    if link is None:
        message = linkmsg.new_vxlan(
            dev.name,
            dev.vni,
            dev.port,
            parent.index,
            dev.local.packed,
            nlmsg.mac_bytes(dev.mac),
            dev.mtu,
        )
        try:
            request(sock, message)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                raise DeviceError(
                    f"vni: cannot create {dev.name} with VNI {dev.vni} port {dev.port}: another "
                    "device already uses them; remove it or choose another VNI"
                ) from exc
            raise
        if not changes:
            changes.append("created")
        link = get_link(sock, dev.name)
        assert link is not None
    return changes + _finish(sock, link, dev, tool)


def ensure_ipip(sock: RtnlSocket, dev: IpipDevice, tool: Ethtool | None = None) -> list[str]:
    changes: list[str] = []
    link = get_link(sock, dev.name)
    if link is not None and link.kind != "ipip":
        raise DeviceError(f"name: {dev.name!r} exists but is not an ipip device")
    if link is None:
        try:
            request(sock, linkmsg.new_ipip(dev.name))
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                raise Unsupported(f"kernel lacks ipip: cannot create {dev.name}") from exc
            raise
        changes.append("created")
        link = get_link(sock, dev.name)
        assert link is not None
    return changes + _finish(sock, link, dev, tool)


def ensure_device(sock: RtnlSocket, dev: Device, tool: Ethtool | None = None) -> list[str]:
    if isinstance(dev, VxlanDevice):
        return ensure_vxlan(sock, dev, tool)
    return ensure_ipip(sock, dev, tool)


def delete_device(sock: RtnlSocket, name: str) -> bool:
    """Delete our device; False if it was already gone. The ipip fallback device cannot be
    deleted: it is unconfigured (addresses removed, set down) instead, as Calico does."""
    link = get_link(sock, name)
    if link is None:
        return False
    try:
        request(sock, linkmsg.del_link(link.index))
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            return False
        if link.kind != "ipip":
            raise
        _sync_addresses(sock, link.index, [])
        request(sock, linkmsg.set_link(link.index, up=False))
    return True
