"""Tunnel devices (vxlan.calico, tunl0) through pyroute2: read, ensure, delete.

Device changes are rare and few, so pyroute2's convenience beats a hand encoder here.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

import netaddr
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from overlay.model import Device, IpipDevice, VxlanDevice

log = logging.getLogger("overlay.kernel")

IFF_UP = 0x1
# Reported as the address of a device whose addresses are not exactly one host-prefix address:
# it never equals a desired tunnel address, so plan() sees drift and re-sets the device.
MESSY_ADDRESS = netaddr.IPAddress("0.0.0.0")


class Unsupported(Exception):
    """The kernel lacks a feature this device needs."""


class DeviceError(Exception):
    """A device cannot be configured as asked (bad parent, EEXIST from a foreign device...)."""


def _link(ipr: IPRoute, name: str) -> Any | None:
    try:
        links = ipr.link("get", ifname=name)
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise
    return links[0] if links else None


def _info(link: Any) -> tuple[str, Any]:
    info = link.get("IFLA_LINKINFO")
    if info is None:
        return "", None
    return info.get("IFLA_INFO_KIND") or "", info.get("IFLA_INFO_DATA")


def _addresses(ipr: IPRoute, index: int) -> list[tuple[netaddr.IPAddress, int]]:
    out = []
    for msg in ipr.get_addr(index=index):
        ip = netaddr.IPAddress(msg.get("IFA_ADDRESS"))
        if ip.version == 6 and ip.is_link_local():
            continue  # the kernel's own; never ours to manage
        out.append((ip, int(msg["prefixlen"])))
    return out


def _tunnel_address(addrs: list[tuple[netaddr.IPAddress, int]]) -> netaddr.IPAddress | None:
    if not addrs:
        return None
    if len(addrs) == 1 and addrs[0][1] == addrs[0][0].netmask_bits() and addrs[0][1] in (32, 128):
        return addrs[0][0]
    return MESSY_ADDRESS


def _name_of(ipr: IPRoute, index: int) -> str:
    try:
        return str(ipr.link("get", index=index)[0].get("IFLA_IFNAME"))
    except NetlinkError:
        return ""


def read_device(ipr: IPRoute, name: str) -> Device | None:
    """Our device `name` as a model value, or None if absent or not of our kind."""
    link = _link(ipr, name)
    if link is None:
        return None
    kind, data = _info(link)
    addrs = _addresses(ipr, link["index"])
    if kind == "vxlan" and data is not None:
        local = data.get("IFLA_VXLAN_LOCAL") or data.get("IFLA_VXLAN_LOCAL6")
        return VxlanDevice(
            name=name,
            vni=int(data.get("IFLA_VXLAN_ID") or 0),
            port=int(data.get("IFLA_VXLAN_PORT") or 0),
            local=netaddr.IPAddress(local) if local else netaddr.IPAddress("0.0.0.0"),
            parent=_name_of(ipr, int(data.get("IFLA_VXLAN_LINK") or 0)),
            mac=str(link.get("IFLA_ADDRESS")).lower(),
            mtu=int(link.get("IFLA_MTU")),
            address=_tunnel_address(addrs),
        )
    if kind == "ipip":
        # tunl0 is the ipip module's fallback device and may exist untouched: it is ours only
        # once configured (up or addressed).
        if not addrs and not link["flags"] & IFF_UP:
            return None
        return IpipDevice(name=name, mtu=int(link.get("IFLA_MTU")), address=_tunnel_address(addrs))
    return None


def _vxlan_drift(link: Any, dev: VxlanDevice, parent_index: int) -> list[str]:
    kind, data = _info(link)
    if kind != "vxlan" or data is None:
        return [f"kind={kind or 'unknown'}"]
    local = data.get("IFLA_VXLAN_LOCAL") or data.get("IFLA_VXLAN_LOCAL6")
    checks = {
        "vni": (data.get("IFLA_VXLAN_ID"), dev.vni),
        "port": (data.get("IFLA_VXLAN_PORT"), dev.port),
        "local": (netaddr.IPAddress(local) if local else None, dev.local),
        "parent": (data.get("IFLA_VXLAN_LINK"), parent_index),
        "mac": (str(link.get("IFLA_ADDRESS")).lower(), dev.mac.lower()),
        "learning": (bool(data.get("IFLA_VXLAN_LEARNING")), False),
    }
    return [f"{k}={have}->{want}" for k, (have, want) in checks.items() if have != want]


def _sync_addresses(ipr: IPRoute, index: int, want: netaddr.IPAddress | None) -> bool:
    changed = False
    have = _addresses(ipr, index)
    for ip, plen in have:
        if want is not None and ip == want and plen == want.netmask_bits():
            continue
        ipr.addr("del", index=index, address=str(ip), prefixlen=plen)
        changed = True
    if want is not None and (want, want.netmask_bits()) not in have:
        ipr.addr("add", index=index, address=str(want), prefixlen=want.netmask_bits())
        changed = True
    return changed


def _finish(ipr: IPRoute, link: Any, mtu: int, address: netaddr.IPAddress | None) -> list[str]:
    changes = []
    index = link["index"]
    if mtu and link.get("IFLA_MTU") != mtu:
        try:
            ipr.link("set", index=index, mtu=mtu)
            changes.append(f"mtu={mtu}")
        except NetlinkError as exc:
            # e.g. larger than the parent allows: keep the device working, retry next sync.
            log.warning(
                "event=device_mtu_failed dev=%s mtu=%d errno=%d error=%r",
                link.get("IFLA_IFNAME"),
                mtu,
                exc.code,
                str(exc),
            )
    if _sync_addresses(ipr, index, address):
        changes.append(f"address={address}")
    if not link["flags"] & IFF_UP:
        ipr.link("set", index=index, state="up")
        changes.append("up")
    return changes


def ensure_vxlan(ipr: IPRoute, dev: VxlanDevice) -> list[str]:
    """Make `dev` exist as described; return what changed ("created", "recreated ...", ...).

    VNI, port, local, parent, MAC or learning drift needs delete + create (the kernel cannot
    change them in place); MTU, address and up state are fixed in place.
    """
    parent = _link(ipr, dev.parent)
    if parent is None:
        raise DeviceError(f"parent: interface {dev.parent!r} not found for {dev.name}")
    changes: list[str] = []
    link = _link(ipr, dev.name)
    if link is not None:
        drift = _vxlan_drift(link, dev, parent["index"])
        if drift:
            ipr.link("del", index=link["index"])
            changes.append("recreated " + " ".join(drift))
            link = None
    if link is None:
        local_key = "vxlan_local" if dev.local.version == 4 else "vxlan_local6"
        kwargs = {local_key: str(dev.local)}
        try:
            ipr.link(
                "add",
                ifname=dev.name,
                kind="vxlan",
                vxlan_id=dev.vni,
                vxlan_port=dev.port,
                vxlan_link=parent["index"],
                vxlan_learning=0,
                address=dev.mac,
                **({"mtu": dev.mtu} if dev.mtu else {}),
                **kwargs,
            )
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                raise DeviceError(
                    f"vni: cannot create {dev.name} with VNI {dev.vni} port {dev.port}: another "
                    "device already uses them; remove it or choose another VNI"
                ) from exc
            raise
        if not changes:
            changes.append("created")
        link = _link(ipr, dev.name)
        assert link is not None
    return changes + _finish(ipr, link, dev.mtu, dev.address)


def ensure_ipip(ipr: IPRoute, dev: IpipDevice) -> list[str]:
    changes: list[str] = []
    link = _link(ipr, dev.name)
    if link is not None and _info(link)[0] != "ipip":
        raise DeviceError(f"name: {dev.name!r} exists but is not an ipip device")
    if link is None:
        try:
            ipr.link("add", ifname=dev.name, kind="ipip")
        except NetlinkError as exc:
            if exc.code in (errno.EOPNOTSUPP, errno.EINVAL):
                raise Unsupported(f"kernel lacks ipip: cannot create {dev.name}") from exc
            raise
        changes.append("created")
        link = _link(ipr, dev.name)
        assert link is not None
    return changes + _finish(ipr, link, dev.mtu, dev.address)


def ensure_device(ipr: IPRoute, dev: Device) -> list[str]:
    if isinstance(dev, VxlanDevice):
        return ensure_vxlan(ipr, dev)
    return ensure_ipip(ipr, dev)


def delete_device(ipr: IPRoute, name: str) -> bool:
    """Delete our device; False if it was already gone. The ipip fallback device cannot be
    deleted: it is unconfigured (addresses removed, set down) instead, as Calico does."""
    link = _link(ipr, name)
    if link is None:
        return False
    try:
        ipr.link("del", index=link["index"])
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return False
        if _info(link)[0] != "ipip":
            raise
        _sync_addresses(ipr, link["index"], None)
        ipr.link("set", index=link["index"], state="down")
    return True
