"""Link/address/route-get messages, checked against pyroute2's encoders and decoders."""

from __future__ import annotations

import socket
from typing import Any

from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from overlay.kernel import linkmsg, nlmsg

MAC = bytes.fromhex("660a0b0c0d01")
V6 = socket.inet_pton(socket.AF_INET6, "2001:db8::7")


def _decoded(cls: type, data: bytes) -> Any:
    msg = cls(data)
    msg.decode()
    assert msg["header"]["length"] == len(data)
    return msg


def _encoded(cls: type, fields: dict[str, int], attrs: list[tuple[str, Any]]) -> memoryview:
    """A message pyroute2 packs, as the payload our decoders get (after the 16-byte header)."""
    msg = cls()
    for key, value in fields.items():
        msg[key] = value
    msg["attrs"] = attrs
    msg.encode()
    return memoryview(bytes(msg.data))[16:]


def test_new_vxlan_carries_every_setting() -> None:
    raw = linkmsg.new_vxlan("vxlan.calico", 4096, 4789, 3, socket.inet_aton("192.0.2.1"), MAC, 1450)
    msg = _decoded(ifinfmsg, raw)
    assert msg["header"]["type"] == nlmsg.RTM_NEWLINK
    assert msg["header"]["flags"] == linkmsg.CREATE_FLAGS  # never replaces a foreign device
    assert (msg.get("IFLA_IFNAME"), msg.get("IFLA_MTU")) == ("vxlan.calico", 1450)
    assert msg.get("IFLA_ADDRESS") == "66:0a:0b:0c:0d:01"
    info = msg.get("IFLA_LINKINFO")
    assert info.get("IFLA_INFO_KIND") == "vxlan"
    data = dict(info.get("IFLA_INFO_DATA")["attrs"])
    assert data == {
        "IFLA_VXLAN_ID": 4096,
        "IFLA_VXLAN_PORT": 4789,
        "IFLA_VXLAN_LINK": 3,
        "IFLA_VXLAN_LEARNING": 0,
        "IFLA_VXLAN_LOCAL": "192.0.2.1",
    }


def test_new_vxlan_ipv6_local_and_default_mtu() -> None:
    msg = _decoded(ifinfmsg, linkmsg.new_vxlan("vx6", 7, 4789, 2, V6, MAC))
    assert msg.get("IFLA_MTU") is None  # 0: the kernel's default
    data = dict(msg.get("IFLA_LINKINFO").get("IFLA_INFO_DATA")["attrs"])
    assert data["IFLA_VXLAN_LOCAL6"] == "2001:db8::7" and "IFLA_VXLAN_LOCAL" not in data


def test_new_ipip_get_set_and_delete_link() -> None:
    msg = _decoded(ifinfmsg, linkmsg.new_ipip("tunl0"))
    assert msg.get("IFLA_IFNAME") == "tunl0"
    assert msg.get("IFLA_LINKINFO").get("IFLA_INFO_KIND") == "ipip"

    msg = _decoded(ifinfmsg, linkmsg.get_link("eth0"))
    assert msg["header"]["type"] == nlmsg.RTM_GETLINK and msg.get("IFLA_IFNAME") == "eth0"
    assert msg["header"]["flags"] == linkmsg.REQUEST_FLAGS  # the ack ends RtnlSocket.dump()
    assert _decoded(ifinfmsg, linkmsg.get_link(index=9))["index"] == 9

    up = _decoded(ifinfmsg, linkmsg.set_link(4, mtu=1400, up=True))
    assert (up["index"], up["flags"], up["change"], up.get("IFLA_MTU")) == (4, 1, 1, 1400)
    down = _decoded(ifinfmsg, linkmsg.set_link(4, up=False))
    assert (down["flags"], down["change"], down.get("IFLA_MTU")) == (0, 1, None)
    mtu_only = _decoded(ifinfmsg, linkmsg.set_link(4, mtu=1300))
    assert (mtu_only["change"], mtu_only.get("IFLA_MTU")) == (0, 1300)  # state untouched

    gone = _decoded(ifinfmsg, linkmsg.del_link(4))
    assert (gone["header"]["type"], gone["index"]) == (nlmsg.RTM_DELLINK, 4)


def test_address_add_and_delete() -> None:
    add = _decoded(ifaddrmsg, linkmsg.address(True, 5, socket.inet_aton("10.127.0.1"), 32))
    assert add["header"]["type"] == linkmsg.RTM_NEWADDR
    assert (add["family"], add["prefixlen"], add["index"]) == (socket.AF_INET, 32, 5)
    assert add.get("IFA_LOCAL") == add.get("IFA_ADDRESS") == "10.127.0.1"
    delete = _decoded(ifaddrmsg, linkmsg.address(False, 5, V6, 128))
    assert delete["header"]["type"] == linkmsg.RTM_DELADDR
    assert (delete["family"], delete.get("IFA_ADDRESS")) == (socket.AF_INET6, "2001:db8::7")
    dump = _decoded(ifaddrmsg, linkmsg.dump_addrs(5))
    assert dump["header"]["flags"] == nlmsg.DUMP_FLAGS and dump["index"] == 5


def test_route_get_asks_for_one_host_address() -> None:
    msg = _decoded(rtmsg, linkmsg.get_route(socket.inet_aton("10.77.0.2")))
    assert msg["header"]["type"] == nlmsg.RTM_GETROUTE
    assert (msg["family"], msg["dst_len"], msg.get("RTA_DST")) == (socket.AF_INET, 32, "10.77.0.2")
    assert _decoded(rtmsg, linkmsg.get_route(V6))["dst_len"] == 128


def test_decode_vxlan_link() -> None:
    data = [
        ("IFLA_VXLAN_ID", 7),
        ("IFLA_VXLAN_PORT", 4789),
        ("IFLA_VXLAN_LOCAL", "192.0.2.1"),
        ("IFLA_VXLAN_LINK", 3),
        ("IFLA_VXLAN_LEARNING", 1),
    ]
    payload = _encoded(
        ifinfmsg,
        {"index": 5, "flags": 0x10003},
        [
            ("IFLA_IFNAME", "vx0"),
            ("IFLA_MTU", 1400),
            ("IFLA_ADDRESS", "66:0A:0B:0C:0D:01"),
            (
                "IFLA_LINKINFO",
                {"attrs": [("IFLA_INFO_KIND", "vxlan"), ("IFLA_INFO_DATA", {"attrs": data})]},
            ),
        ],
    )
    link = linkmsg.decode_link(payload)
    assert (link.index, link.name, link.flags, link.mtu) == (5, "vx0", 0x10003, 1400)
    assert (link.mac, link.kind) == ("66:0a:0b:0c:0d:01", "vxlan")
    assert link.data is not None
    assert linkmsg.vxlan_info(link.data) == linkmsg.VxlanInfo(
        vni=7, port=4789, local=socket.inet_aton("192.0.2.1"), parent=3, learning=True
    )


def test_decode_plain_link_and_unset_vxlan_fields() -> None:
    link = linkmsg.decode_link(_encoded(ifinfmsg, {"index": 1}, [("IFLA_IFNAME", "lo")]))
    assert (link.name, link.mtu, link.mac, link.kind, link.data) == ("lo", 0, "", "", None)
    info = linkmsg.vxlan_info({})
    assert (info.vni, info.port, info.local, info.parent, info.learning) == (0, 0, b"", 0, False)
    v6 = linkmsg.vxlan_info({linkmsg.IFLA_VXLAN_LOCAL6: V6})
    assert v6.local == V6


def test_decode_address_keeps_local_and_peer_apart() -> None:
    payload = _encoded(
        ifaddrmsg,
        {"family": socket.AF_INET, "prefixlen": 32, "index": 4},
        [("IFA_ADDRESS", "10.9.0.2"), ("IFA_LOCAL", "10.9.0.1")],
    )
    a = linkmsg.decode_addr(payload)
    assert (a.family, a.prefixlen, a.index) == (socket.AF_INET, 32, 4)
    assert (a.local, a.address) == (socket.inet_aton("10.9.0.1"), socket.inet_aton("10.9.0.2"))


def test_decode_route_lookup() -> None:
    payload = _encoded(
        rtmsg,
        {"family": socket.AF_INET, "dst_len": 32},
        [("RTA_DST", "10.77.0.2"), ("RTA_OIF", 2), ("RTA_PREFSRC", "10.77.0.1")],
    )
    assert linkmsg.decode_route_lookup(payload) == (2, socket.inet_aton("10.77.0.1"))
    bare = _encoded(rtmsg, {"family": socket.AF_INET}, [("RTA_DST", "10.77.0.2")])
    assert linkmsg.decode_route_lookup(bare) == (0, b"")
