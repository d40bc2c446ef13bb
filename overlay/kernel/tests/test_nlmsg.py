"""The lean encoder produces what the kernel parses: checked against pyroute2's decoders."""

from __future__ import annotations

import socket

import netaddr
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from overlay.kernel import nlmsg
from overlay.kernel.nat import render
from overlay.model import NatOutgoing

GW = socket.inet_aton("10.128.0.64")


def _pyroute2(cls: type, data: bytes) -> dict:
    msg = cls(data)
    msg.decode()
    return {"header": msg["header"], "fields": dict(msg), "attrs": dict(msg["attrs"])}


def test_nhid_route_decodes_as_intended() -> None:
    raw = nlmsg.route(True, socket.inet_aton("10.128.0.64"), 26, table=254, protocol=80, nhid=7)
    got = _pyroute2(rtmsg, raw)
    assert got["header"]["type"] == nlmsg.RTM_NEWROUTE
    assert got["header"]["flags"] == nlmsg.SET_FLAGS
    assert got["header"]["length"] == len(raw)
    assert (got["fields"]["dst_len"], got["fields"]["proto"], got["fields"]["table"]) == (
        26,
        80,
        254,
    )
    assert got["attrs"]["RTA_DST"] == "10.128.0.64"
    ours = nlmsg.decode_route(memoryview(raw)[16:])
    assert (ours.nhid, ours.dst_len, ours.protocol, ours.rtype) == (7, 26, 80, nlmsg.RTN_UNICAST)


def test_classic_onlink_route_and_blackhole() -> None:
    dst = socket.inet_aton("10.1.0.0")
    classic = nlmsg.decode_route(
        memoryview(
            nlmsg.route(True, dst, 26, table=254, protocol=80, gateway=GW, oif=5, onlink=True)
        )[16:]
    )
    assert (classic.gateway, classic.oif, classic.flags & nlmsg.RTNH_F_ONLINK) == (GW, 5, 4)
    hole = nlmsg.decode_route(
        memoryview(nlmsg.route(True, dst, 26, table=254, protocol=80, blackhole=True))[16:]
    )
    assert hole.rtype == nlmsg.RTN_BLACKHOLE and hole.oif == 0


def test_route_delete_names_our_protocol() -> None:
    raw = nlmsg.route(False, socket.inet_aton("10.1.0.0"), 26, table=254, protocol=80)
    got = _pyroute2(rtmsg, raw)
    assert got["header"]["type"] == nlmsg.RTM_DELROUTE
    assert got["fields"]["proto"] == 80  # so a foreign route with this prefix never matches


def test_fdb_and_neighbour_messages() -> None:
    mac = nlmsg.mac_bytes("66:00:00:00:00:01")
    fdb = _pyroute2(ndmsg, nlmsg.fdb(True, 9, mac, socket.inet_aton("192.0.2.7")))
    assert fdb["fields"]["family"] == nlmsg.AF_BRIDGE
    assert fdb["fields"]["flags"] == nlmsg.NTF_SELF
    assert fdb["fields"]["state"] == nlmsg.NUD_PERMANENT and fdb["fields"]["ifindex"] == 9
    assert fdb["attrs"]["NDA_LLADDR"] == "66:00:00:00:00:01"
    assert fdb["attrs"]["NDA_DST"] == "192.0.2.7"
    nb = nlmsg.decode_neighbour(memoryview(nlmsg.neighbour(True, 9, GW, mac))[16:])
    assert (nb.family, nb.ifindex, nb.dst, nb.lladdr) == (socket.AF_INET, 9, GW, mac)


def test_nexthop_message_layout() -> None:
    raw = nlmsg.nexthop(True, 42, GW, 9, True, 80)
    nh = nlmsg.decode_nexthop(memoryview(raw)[16:])
    assert (nh.id, nh.gateway, nh.oif, nh.protocol) == (42, GW, 9, 80)
    assert nh.flags & nlmsg.RTNH_F_ONLINK
    assert nlmsg.NLMSG_HDR.unpack_from(raw)[:3] == (len(raw), nlmsg.RTM_NEWNEXTHOP, nlmsg.SET_FLAGS)


def test_error_ack_with_extended_message() -> None:
    text = b"Nexthop id does not exist\0"
    attr = nlmsg.attr(nlmsg.NLMSGERR_ATTR_MSG, text)
    payload = memoryview((-22).to_bytes(4, "little", signed=True) + bytes(16) + attr)
    assert nlmsg.parse_error(payload) == (22, "Nexthop id does not exist")


def test_bad_mac_names_the_value() -> None:
    try:
        nlmsg.mac_bytes("66:00")
    except ValueError as exc:
        assert "66:00" in str(exc)
    else:
        raise AssertionError("short MAC accepted")


def test_nat_rules_never_masquerade_pod_to_pod() -> None:
    nets = [netaddr.IPNetwork(c) for c in ("10.1.0.0/16", "10.1.4.0/24", "10.2.0.0/16")]
    script = render(NatOutgoing(sources=frozenset(nets[:2]), all_pools=frozenset(nets)))
    assert "ip saddr @sources ip daddr != @pools masquerade" in script
    assert "elements = { 10.1.0.0/16 }" in script  # overlapping sources merged
    assert "elements = { 10.1.0.0/16, 10.2.0.0/16 }" in script
    assert render(None).strip().endswith("delete table ip overlay-nat")
    to = netaddr.IPAddress("192.0.2.9")  # natOutgoingAddress: source NAT to it instead
    script = render(NatOutgoing(frozenset(nets[:2]), frozenset(nets), to))
    assert "ip saddr @sources ip daddr != @pools snat to 192.0.2.9" in script
    assert "masquerade" not in script
