"""Tunnel devices and link listing against the real kernel, in scratch namespaces (root only).

The edge cases of overlay.kernel.devices/links that the end-to-end kernel tests do not reach:
foreign devices, messy addresses, learning drift, point-to-point addresses.
"""

from __future__ import annotations

import dataclasses
import errno
import os

import netaddr
import pytest

from netns_tests.kernel_fixtures import as_read, ip, vxlan_device
from overlay.kernel import links
from overlay.kernel.apply import Kernel
from overlay.kernel.batch import in_netns
from overlay.kernel.devices import MESSY_ADDRESS
from overlay.model import VXLAN_DEVICE, Action, Op

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]


def test_foreign_device_with_our_vni_is_a_device_error(node: str, kernel: Kernel) -> None:
    ip("-n", node, "link", "add", "foreign0", "type", "vxlan", "id", "4096", "dstport", "4789")
    op = Op(Action.SET, vxlan_device())
    result = kernel.apply([op])
    assert [(o, code) for o, code, _ in result.failed] == [(op, errno.EINVAL)]
    assert "another device already uses them" in result.failed[0][2]
    assert kernel.read().devices == {}


def test_missing_parent_is_a_device_error(kernel: Kernel) -> None:
    result = kernel.apply([Op(Action.SET, dataclasses.replace(vxlan_device(), parent="nope0"))])
    assert [code for _, code, _ in result.failed] == [errno.EINVAL]
    assert "parent: interface 'nope0' not found" in result.failed[0][2]


def test_extra_addresses_read_as_messy_and_are_fixed(node: str, kernel: Kernel) -> None:
    dev = vxlan_device()
    assert kernel.apply([Op(Action.SET, dev)]).failed == []
    # The kernel's IPv6 link-local address of the up device is never counted as ours.
    assert "fe80::" in ip("-n", node, "-6", "addr", "show", "dev", VXLAN_DEVICE).stdout
    assert kernel.read().devices[VXLAN_DEVICE] == as_read(dev)
    ip("-n", node, "addr", "add", "10.127.9.9/24", "dev", VXLAN_DEVICE)
    assert kernel.read().devices[VXLAN_DEVICE].address == MESSY_ADDRESS
    result = kernel.apply([Op(Action.SET, dev)])
    assert result.failed == [] and not result.resync  # fixed in place
    assert kernel.read().devices[VXLAN_DEVICE] == as_read(dev)
    assert "10.127.9.9" not in ip("-n", node, "addr", "show", "dev", VXLAN_DEVICE).stdout


def test_learning_device_is_recreated_without_learning(node: str, kernel: Kernel) -> None:
    dev = vxlan_device()
    ip("-n", node, "link", "add", VXLAN_DEVICE, "address", dev.mac, "type", "vxlan",
       "id", str(dev.vni), "dstport", str(dev.port), "local", str(dev.local), "dev", dev.parent,
       "learning")  # fmt: skip
    result = kernel.apply([Op(Action.SET, dev)])
    assert result.failed == [] and result.resync
    assert "nolearning" in ip("-n", node, "-d", "link", "show", VXLAN_DEVICE).stdout
    assert kernel.read().devices[VXLAN_DEVICE] == as_read(dev)


def test_delete_is_idempotent(kernel: Kernel) -> None:
    assert kernel.apply([Op(Action.SET, vxlan_device())]).failed == []
    for _ in range(2):
        result = kernel.apply([Op(Action.DELETE, vxlan_device())])
        assert result.failed == [] and result.done == 1
    assert kernel.read().devices == {}


def test_point_to_point_address_lists_our_end(node: str) -> None:
    ip("-n", node, "addr", "add", "10.9.0.1", "peer", "10.9.0.2/32", "dev", "veth0")
    by_name = {i.name: i for i in in_netns(node, links.list_interfaces)}
    assert netaddr.IPNetwork("10.9.0.1/32") in by_name["veth0"].addresses
    assert by_name["veth0"].up and by_name["veth0"].mtu == 1500
    iface, src = in_netns(node, lambda: links.route_lookup(netaddr.IPAddress("192.0.2.2")))
    assert (iface, src) == ("veth0", netaddr.IPAddress("192.0.2.1"))


def test_tx_checksum_offload_is_turned_off_in_place_and_otherwise_left_alone(
    node: str, kernel: Kernel
) -> None:
    dev = dataclasses.replace(vxlan_device(), tx_checksum=False)
    assert kernel.apply([Op(Action.SET, vxlan_device())]).failed == []
    assert kernel.read().devices[VXLAN_DEVICE].tx_checksum is True  # Linux's default
    result = kernel.apply([Op(Action.SET, dev)])
    assert result.failed == [] and not result.resync  # in place: nothing on it is lost
    assert kernel.read().devices[VXLAN_DEVICE] == dev
    assert "tx-checksumming: off" in ip("netns", "exec", node, "ethtool", "-k", VXLAN_DEVICE).stdout
    # Not asked for (None): a device with offload off keeps it off.
    assert kernel.apply([Op(Action.SET, vxlan_device())]).failed == []
    assert kernel.read().devices[VXLAN_DEVICE].tx_checksum is False
