"""Link, address and route-lookup messages: tunnel devices and underlay autodetection.

These are rare (a handful per start or device change) but pyroute2 cost ~0.1 s of imports
for them, a tenth of the agent's cold start. Same style as nlmsg: encoders return complete
messages with sequence number 0 (the socket patches it in); decoders return only the fields
we use. Every request asks for an ack, so RtnlSocket.dump() can send it and read its
replies up to the ack.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from overlay.kernel import nlmsg
from overlay.kernel.nlmsg import attr, family_of, message, u32_attr

RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22

REQUEST_FLAGS = nlmsg.NLM_F_REQUEST | nlmsg.NLM_F_ACK
CREATE_FLAGS = REQUEST_FLAGS | nlmsg.NLM_F_CREATE | nlmsg.NLM_F_EXCL
NLA_F_NESTED = 0x8000

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000

# ifinfomsg attributes (IFLA_ADDRESS, IFLA_IFNAME and IFLA_MTU are in nlmsg)
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_VXLAN_ID = 1
IFLA_VXLAN_LINK = 3
IFLA_VXLAN_LOCAL = 4
IFLA_VXLAN_LEARNING = 7
IFLA_VXLAN_PORT = 15  # network byte order
IFLA_VXLAN_LOCAL6 = 17

# ifaddrmsg and its attributes
IFADDRMSG = struct.Struct("=BBBBi")  # family, prefixlen, flags, scope, index
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_F_NODAD = 0x02

RTA_PREFSRC = 7

_U8 = struct.Struct("=B")
_U32 = struct.Struct("=I")
_BE16 = struct.Struct("!H")


def _name(name: str) -> bytes:
    return attr(nlmsg.IFLA_IFNAME, name.encode() + b"\0")


def _ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return nlmsg.IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)


def _linkinfo(kind: str, data: bytes = b"") -> bytes:
    inner = attr(IFLA_INFO_KIND, kind.encode())
    if data:
        inner += attr(IFLA_INFO_DATA | NLA_F_NESTED, data)
    return attr(IFLA_LINKINFO | NLA_F_NESTED, inner)


# --- encoding --------------------------------------------------------------------------------
def get_link(name: str = "", index: int = 0) -> bytes:
    """RTM_GETLINK for one link, by index if given, else by name (ENODEV if absent)."""
    body = _ifinfo(index) + (_name(name) if name else b"")
    return message(nlmsg.RTM_GETLINK, REQUEST_FLAGS, body)


def new_vxlan(
    name: str, vni: int, port: int, parent: int, local: bytes, mac: bytes, mtu: int = 0
) -> bytes:
    """Create (never replace) a VXLAN device without learning, bound to `parent` and `local`."""
    data = (
        u32_attr(IFLA_VXLAN_ID, vni)
        + attr(IFLA_VXLAN_PORT, _BE16.pack(port))
        + u32_attr(IFLA_VXLAN_LINK, parent)
        + attr(IFLA_VXLAN_LEARNING, _U8.pack(0))
        + attr(IFLA_VXLAN_LOCAL if len(local) == 4 else IFLA_VXLAN_LOCAL6, local)
    )
    body = _ifinfo() + _name(name) + attr(nlmsg.IFLA_ADDRESS, mac)
    if mtu:
        body += u32_attr(nlmsg.IFLA_MTU, mtu)
    return message(nlmsg.RTM_NEWLINK, CREATE_FLAGS, body + _linkinfo("vxlan", data))


def new_ipip(name: str) -> bytes:
    return message(nlmsg.RTM_NEWLINK, CREATE_FLAGS, _ifinfo() + _name(name) + _linkinfo("ipip"))


def set_link(index: int, *, mtu: int = 0, up: bool | None = None) -> bytes:
    """Change an existing link's MTU and/or administrative state."""
    flags = IFF_UP if up else 0
    body = _ifinfo(index, flags, IFF_UP if up is not None else 0)
    if mtu:
        body += u32_attr(nlmsg.IFLA_MTU, mtu)
    return message(nlmsg.RTM_NEWLINK, REQUEST_FLAGS, body)


def del_link(index: int) -> bytes:
    return message(nlmsg.RTM_DELLINK, REQUEST_FLAGS, _ifinfo(index))


def dump_addrs(index: int = 0) -> bytes:
    """Every address of every family; with strict checking the kernel keeps only `index`'s."""
    return nlmsg.dump_request(RTM_GETADDR, IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, index))


def address(action_new: bool, index: int, ip: bytes, prefixlen: int) -> bytes:
    """RTM_NEWADDR (create, EEXIST if present) or RTM_DELADDR for one address of a link.
    An IPv6 address skips duplicate address detection: a tunnel address is unique by IPAM,
    and a tentative one could not be used for seconds."""
    family = family_of(ip)
    flags = IFA_F_NODAD if family == socket.AF_INET6 else 0
    body = IFADDRMSG.pack(family, prefixlen, flags, 0, index)
    if family == socket.AF_INET:  # IPv4 keys on IFA_LOCAL; IFA_ADDRESS is the peer/prefix
        body += attr(IFA_LOCAL, ip)
    body += attr(IFA_ADDRESS, ip)
    if action_new:
        return message(RTM_NEWADDR, CREATE_FLAGS, body)
    return message(RTM_DELADDR, REQUEST_FLAGS, body)


def get_route(dst: bytes) -> bytes:
    """RTM_GETROUTE lookup of one host address: which device and source would be used."""
    hdr = nlmsg.RTMSG.pack(family_of(dst), len(dst) * 8, 0, 0, 0, 0, 0, 0, 0)
    return message(nlmsg.RTM_GETROUTE, REQUEST_FLAGS, hdr + attr(nlmsg.RTA_DST, dst))


# --- decoding --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RawLink:
    index: int
    name: str
    flags: int
    mtu: int
    mac: str  # IFLA_ADDRESS as aa:bb:..., "" if absent
    kind: str  # IFLA_INFO_KIND, "" if none
    data: Mapping[int, bytes] | None  # IFLA_INFO_DATA attributes, None if absent


def _text(raw: memoryview) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")


def decode_link(payload: memoryview) -> RawLink:
    _fam, _type, index, flags, _change = nlmsg.IFINFOMSG.unpack_from(payload, 0)
    a = nlmsg.parse_attrs(payload, nlmsg.IFINFOMSG.size)
    kind, data = "", None
    if IFLA_LINKINFO in a:
        info = nlmsg.parse_attrs(a[IFLA_LINKINFO], 0)
        kind = _text(info[IFLA_INFO_KIND]) if IFLA_INFO_KIND in info else ""
        if IFLA_INFO_DATA in info:
            nested = nlmsg.parse_attrs(info[IFLA_INFO_DATA], 0)
            data = {k: bytes(v) for k, v in nested.items()}
    return RawLink(
        index=index,
        name=_text(a[nlmsg.IFLA_IFNAME]) if nlmsg.IFLA_IFNAME in a else "",
        flags=flags,
        mtu=nlmsg.u32(a[nlmsg.IFLA_MTU]) if nlmsg.IFLA_MTU in a else 0,
        mac=nlmsg.format_mac(bytes(a[nlmsg.IFLA_ADDRESS])) if nlmsg.IFLA_ADDRESS in a else "",
        kind=kind,
        data=data,
    )


@dataclass(frozen=True, slots=True)
class VxlanInfo:
    vni: int
    port: int
    local: bytes  # b"" if unset
    parent: int  # IFLA_VXLAN_LINK, 0 if unset
    learning: bool


def vxlan_info(data: Mapping[int, bytes]) -> VxlanInfo:
    def num(kind: int, s: struct.Struct) -> int:
        return int(s.unpack(data[kind])[0]) if kind in data else 0

    return VxlanInfo(
        vni=num(IFLA_VXLAN_ID, _U32),
        port=num(IFLA_VXLAN_PORT, _BE16),
        local=data.get(IFLA_VXLAN_LOCAL) or data.get(IFLA_VXLAN_LOCAL6) or b"",
        parent=num(IFLA_VXLAN_LINK, _U32),
        learning=bool(num(IFLA_VXLAN_LEARNING, _U8)),
    )


@dataclass(frozen=True, slots=True)
class RawAddr:
    family: int
    prefixlen: int
    index: int
    address: bytes  # IFA_ADDRESS, b"" if absent
    local: bytes  # IFA_LOCAL (our end of a point-to-point link), b"" if absent


def decode_addr(payload: memoryview) -> RawAddr:
    family, prefixlen, _flags, _scope, index = IFADDRMSG.unpack_from(payload, 0)
    a = nlmsg.parse_attrs(payload, IFADDRMSG.size)
    return RawAddr(
        family,
        prefixlen,
        index,
        bytes(a[IFA_ADDRESS]) if IFA_ADDRESS in a else b"",
        bytes(a[IFA_LOCAL]) if IFA_LOCAL in a else b"",
    )


def decode_route_lookup(payload: memoryview) -> tuple[int, bytes]:
    """A route-get reply -> (outgoing ifindex or 0, preferred source address or b"")."""
    a = nlmsg.parse_attrs(payload, nlmsg.RTMSG.size)
    oif = nlmsg.u32(a[nlmsg.RTA_OIF]) if nlmsg.RTA_OIF in a else 0
    return oif, bytes(a[RTA_PREFSRC]) if RTA_PREFSRC in a else b""
