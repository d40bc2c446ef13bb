"""Node registration against the in-memory datastore: tunnel addresses, labels, MTU, MAC."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import netaddr
import pytest

from ipam.allocator import IPAM
from ipam.datastore.base import Conflict
from ipam.datastore.memory import MemoryDatastore
from ipam.model import EncapMode, IPPool, Node
from ipam.store import ResourceStore, resource_key
from overlay.nodes import (
    check_node_address,
    encaps_in_use,
    mtu_for,
    read_mtu_file,
    register_node,
    tunnel_handle,
    vtep_mac,
    write_mtu_file,
)

NET = netaddr.IPNetwork
IP = netaddr.IPAddress
ALWAYS, CROSS, NEVER = EncapMode.ALWAYS, EncapMode.CROSS_SUBNET, EncapMode.NEVER

VXLAN_POOL = IPPool("vx", NET("10.244.0.0/16"), 26, vxlan_mode=CROSS)
IPIP_POOL = IPPool("ip", NET("10.245.0.0/16"), 26, ipip_mode=ALWAYS)
PLAIN_POOL = IPPool("plain", NET("10.246.0.0/16"), 26)


class Cluster:
    def __init__(self, *pools: IPPool) -> None:
        self.ds = MemoryDatastore()
        self.store = ResourceStore(self.ds)
        self.ipam = IPAM(self.ds, self.store)
        for pool in pools:
            self.store.apply(pool)

    def revision(self) -> int:
        return self.ds.list("/").revision

    def stored(self, name: str = "node-a") -> Node:
        node = self.store.get_node(name)
        assert node is not None, f"node {name} not stored"
        return node

    def register(self, name: str = "node-a", underlay: str = "192.0.2.10/24", **kw: Any) -> Node:
        return register_node(self.store, self.ipam, name, NET(underlay), **kw)


# ---------------------------------------------------------------------------- VTEP MAC


def test_vtep_mac_is_0x66_then_sha1_of_the_name() -> None:
    digest = hashlib.sha1(b"node-a").hexdigest()
    expected = "66:" + ":".join(digest[i : i + 2] for i in range(0, 10, 2))
    assert vtep_mac("node-a") == expected
    assert vtep_mac("node-b") != expected


# ---------------------------------------------------------------------------- MTU


def test_mtu_for_subtracts_the_largest_enabled_overhead() -> None:
    assert mtu_for(1500, ["vxlan"]) == 1450
    assert mtu_for(1500, ["ipip"]) == 1480
    assert mtu_for(1500, {"ipip", "vxlan"}) == 1450
    assert mtu_for(9000, []) == 9000
    assert mtu_for(1500, ["vxlan"], configured=1400) == 1400  # configured wins


def test_mtu_for_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="encapsulation 'gre'"):
        mtu_for(1500, ["gre"])
    with pytest.raises(ValueError, match="mtu 20: must be between 68"):
        mtu_for(1500, [], configured=20)
    with pytest.raises(ValueError, match="underlay MTU 100: leaves 50"):
        mtu_for(100, ["vxlan"])


def test_encaps_in_use_ignores_disabled_and_never_pools() -> None:
    disabled = dataclasses.replace(IPIP_POOL, disabled=True)
    assert encaps_in_use([VXLAN_POOL, disabled, PLAIN_POOL]) == {"vxlan"}
    assert encaps_in_use([VXLAN_POOL, IPIP_POOL]) == {"vxlan", "ipip"}


def test_mtu_file_is_written_atomically_and_readable(tmp_path: Path) -> None:
    path = tmp_path / "state" / "mtu"  # the directory is created
    assert read_mtu_file(path) is None
    write_mtu_file(path, 1450)
    assert path.read_text() == "1450\n" and read_mtu_file(path) == 1450
    assert path.stat().st_mode & 0o777 == 0o644
    write_mtu_file(path, 1480)
    assert read_mtu_file(path) == 1480
    assert os.listdir(path.parent) == ["mtu"]  # no temporary file left behind


# ---------------------------------------------------------------------------- register_node


def test_register_creates_the_node_with_prefix_and_vxlan_address() -> None:
    c = Cluster(VXLAN_POOL, PLAIN_POOL)
    node = c.register()
    stored = c.stored()
    assert stored == node
    assert str(stored.ipv4_address) == "192.0.2.10/24"  # prefix kept, host bits kept
    addr = stored.ipv4_vxlan_tunnel_addr
    assert addr is not None and addr in VXLAN_POOL.cidr
    assert stored.ipv4_ipip_tunnel_addr is None
    assert stored.vxlan_tunnel_mac is None  # derived by every peer
    alloc = c.ipam.get_attributes(addr)
    assert alloc is not None and alloc.handle_id == "vxlan-tunnel-addr-node-a"
    assert alloc.attrs == {"node": "node-a", "type": "vxlanTunnelAddress"}
    assert c.ipam.check_consistency() == []


def test_register_assigns_ipip_from_the_ipip_pool() -> None:
    c = Cluster(VXLAN_POOL, IPIP_POOL)
    node = c.register()
    assert node.ipv4_ipip_tunnel_addr in IPIP_POOL.cidr
    assert node.ipv4_vxlan_tunnel_addr in VXLAN_POOL.cidr
    assert c.ipam.ips_by_handle(tunnel_handle("ipip", "node-a")) == [node.ipv4_ipip_tunnel_addr]


def test_register_assigns_an_ipv6_vxlan_address_from_an_ipv6_vxlan_pool() -> None:
    v6 = IPPool("vx6", NET("fd00:10:244::/48"), 122, vxlan_mode=CROSS)
    c = Cluster(VXLAN_POOL, v6)
    node = c.register()
    addr = node.ipv6_vxlan_tunnel_addr
    assert addr is not None and addr in v6.cidr
    assert node.ipv4_vxlan_tunnel_addr in VXLAN_POOL.cidr
    alloc = c.ipam.get_attributes(addr)
    assert alloc is not None and alloc.handle_id == "vxlan-v6-tunnel-addr-node-a"
    assert alloc.attrs == {"node": "node-a", "type": "vxlanV6TunnelAddress"}
    # The pool goes to Never: the address is released and cleared.
    c.store.apply(dataclasses.replace(v6, vxlan_mode=NEVER))
    assert c.register().ipv6_vxlan_tunnel_addr is None
    assert c.ipam.ips_by_handle("vxlan-v6-tunnel-addr-node-a") == []
    assert c.ipam.check_consistency() == []


def test_no_encapsulating_pool_means_no_tunnel_address() -> None:
    c = Cluster(PLAIN_POOL)
    node = c.register()
    assert node.ipv4_vxlan_tunnel_addr is None and node.ipv4_ipip_tunnel_addr is None
    assert c.ipam.utilization().pools[0].in_use == 0


def test_pool_node_selector_decides_which_pool_serves_the_node() -> None:
    zone_a = IPPool("a", NET("10.10.0.0/16"), 26, vxlan_mode=ALWAYS, node_selector="zone == 'a'")
    zone_b = IPPool("b", NET("10.20.0.0/16"), 26, vxlan_mode=ALWAYS, node_selector="zone == 'b'")
    c = Cluster(zone_a, zone_b)
    assert c.register("n1", labels={"zone": "b"}).ipv4_vxlan_tunnel_addr in zone_b.cidr
    assert c.register("n2", labels={"zone": "a"}).ipv4_vxlan_tunnel_addr in zone_a.cidr
    assert c.register("n3").ipv4_vxlan_tunnel_addr is None  # no label: no pool matches


def test_second_registration_writes_nothing() -> None:
    c = Cluster(VXLAN_POOL, IPIP_POOL)
    first = c.register(labels={"zone": "a"})
    before = c.revision()
    second = c.register(labels={"zone": "a"})
    assert second == first
    assert c.revision() == before


def test_address_kept_when_pool_mode_changes_but_still_qualifies() -> None:
    c = Cluster(VXLAN_POOL)
    first = c.register().ipv4_vxlan_tunnel_addr
    c.store.apply(dataclasses.replace(VXLAN_POOL, vxlan_mode=ALWAYS))
    assert c.register().ipv4_vxlan_tunnel_addr == first


def test_address_released_and_cleared_when_pool_mode_becomes_never() -> None:
    c = Cluster(VXLAN_POOL)
    addr = c.register().ipv4_vxlan_tunnel_addr
    assert addr is not None
    c.store.apply(dataclasses.replace(VXLAN_POOL, vxlan_mode=NEVER))
    node = c.register()
    assert node.ipv4_vxlan_tunnel_addr is None
    assert c.stored().ipv4_vxlan_tunnel_addr is None
    assert c.ipam.ips_by_handle(tunnel_handle("vxlan", "node-a")) == []
    assert c.ipam.get_attributes(addr) is None


def test_recorded_address_not_held_by_the_handle_is_reclaimed() -> None:
    c = Cluster(VXLAN_POOL)
    recorded = IP("10.244.7.7")
    c.store.put_node(
        Node("node-a", ipv4_address=NET("192.0.2.10/24"), ipv4_vxlan_tunnel_addr=recorded)
    )
    assert c.register().ipv4_vxlan_tunnel_addr == recorded
    assert c.ipam.ips_by_handle(tunnel_handle("vxlan", "node-a")) == [recorded]


def test_operator_labels_are_kept() -> None:
    c = Cluster(VXLAN_POOL)
    c.store.put_node(Node("node-a", labels={"rack": "r1", "zone": "old"}))
    node = c.register(labels={"zone": "a"})
    assert node.labels == {"rack": "r1", "zone": "a"}
    assert c.stored().labels == {"rack": "r1", "zone": "a"}


def test_underlay_change_is_recorded_with_its_prefix() -> None:
    c = Cluster(VXLAN_POOL)
    first = c.register()
    second = c.register(underlay="198.51.100.4/25")
    assert str(second.ipv4_address) == "198.51.100.4/25"
    assert second.ipv4_vxlan_tunnel_addr == first.ipv4_vxlan_tunnel_addr


def test_configured_vtep_mac_is_stored_normalised() -> None:
    c = Cluster(VXLAN_POOL)
    assert c.register(vtep_mac="66-AA-BB-CC-DD-EE").vxlan_tunnel_mac == "66:aa:bb:cc:dd:ee"
    with pytest.raises(ValueError, match="vtep_mac 'nope'"):
        c.register(vtep_mac="nope")


def test_new_addresses_are_released_when_the_node_write_fails() -> None:
    c = Cluster(VXLAN_POOL, IPIP_POOL)
    key = resource_key("Node", "node-a")
    # The first write creates the node; every later update of it loses a race.
    c.ds.inject_conflict = lambda op, k: op == "update" and k == key
    with pytest.raises(Conflict):
        c.register()
    c.ds.inject_conflict = None
    for kind in ("vxlan", "ipip"):
        assert c.ipam.ips_by_handle(tunnel_handle(kind, "node-a")) == []  # type: ignore[arg-type]
    assert all(p.in_use == 0 for p in c.ipam.utilization().pools)


def test_kept_address_is_not_released_when_the_node_write_fails() -> None:
    c = Cluster(VXLAN_POOL)
    addr = c.register().ipv4_vxlan_tunnel_addr
    key = resource_key("Node", "node-a")
    c.ds.inject_conflict = lambda op, k: op == "update" and k == key
    with pytest.raises(Conflict):
        c.register(underlay="192.0.2.11/24")
    c.ds.inject_conflict = None
    assert c.ipam.ips_by_handle(tunnel_handle("vxlan", "node-a")) == [addr]


# ---------------------------------------------------------------------------- /32 warning


def test_slash_32_underlay_is_reported_loudly(caplog: pytest.LogCaptureFixture) -> None:
    node = Node("n", ipv4_address=NET("10.0.1.5/32"))
    (warning,) = check_node_address(node)
    assert "10.0.1.5/32" in warning and "CROSS-SUBNET CANNOT WORK" in warning
    v6 = check_node_address(Node("n", ipv6_address=NET("2001:db8::1/128")))
    assert len(v6) == 1 and "/128" in v6[0]
    assert check_node_address(Node("n", ipv4_address=NET("10.0.1.5/24"))) == []
    with caplog.at_level(logging.ERROR):
        Cluster(VXLAN_POOL).register(underlay="10.0.1.5/32")
    assert "CROSS-SUBNET CANNOT WORK" in caplog.text


def test_node_without_underlay_address_is_reported() -> None:
    assert "no underlay address" in check_node_address(Node("n"))[0]


def test_mtu_for_takes_the_smallest_tunnel_mtu_given_or_derived() -> None:
    # Calico's MTU file: the smallest MTU of the enabled encapsulations.
    assert mtu_for(1500, ["vxlan"], tunnel_mtus={"vxlan": 1400}) == 1400
    assert mtu_for(1500, {"vxlan", "ipip"}, tunnel_mtus={"ipip": 1300}) == 1300
    assert mtu_for(1500, {"vxlan", "ipip"}, tunnel_mtus={"ipip": 1490}) == 1450
    assert mtu_for(1500, ["ipip"], tunnel_mtus={"vxlan": 1000}) == 1480  # vxlan not enabled
    assert mtu_for(1500, ["vxlan"], configured=1200, tunnel_mtus={"vxlan": 1400}) == 1200


def test_register_records_the_ipv6_underlay_and_clears_what_is_gone() -> None:
    v6 = IPPool("vx6", NET("fd00:10:244::/48"), 122, vxlan_mode=CROSS)
    c = Cluster(VXLAN_POOL, v6)
    node = c.register(underlay6=NET("fd00:0:1::10/64"))
    assert (str(node.ipv4_address), str(node.ipv6_address)) == ("192.0.2.10/24", "fd00:0:1::10/64")
    # An IPv6-only node: no IPv4 underlay recorded (Calico's IP=none).
    only6 = register_node(c.store, c.ipam, "node-a", None, underlay6=NET("fd00:0:1::10/64"))
    assert only6.ipv4_address is None and str(only6.ipv6_address) == "fd00:0:1::10/64"
    assert only6.ipv6_vxlan_tunnel_addr in v6.cidr
    # Without an IPv6 underlay any more: cleared, so peers stop sending IPv6 VXLAN here.
    assert c.register().ipv6_address is None
    with pytest.raises(ValueError, match="neither an IPv4 nor an IPv6 underlay"):
        register_node(c.store, c.ipam, "node-a", None)
