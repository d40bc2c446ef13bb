"""The netlink monitor names exactly what was deleted, so the agent can skip a re-read
(root only; scratch namespaces)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from netns_tests.kernel_fixtures import ip, peer, peer_ops, underlay, vxlan_device
from overlay.kernel.apply import Kernel
from overlay.kernel.monitor import Monitor
from overlay.model import MAIN_TABLE, RT_PROTO, VXLAN_DEVICE, Action, GoneKey, Op

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


@pytest.fixture
def node() -> Iterator[str]:
    with underlay() as (ns, _other):
        with Kernel(netns=ns, use_nexthops=True) as k:
            result = k.apply([Op(Action.SET, vxlan_device()), *peer_ops(3)])
            assert not result.failed, result.failed
        yield ns


def test_deletions_of_ours_come_with_their_keys(node: str) -> None:
    kicks: list[str] = []
    gone: list[GoneKey] = []
    got = threading.Event()

    def on_gone(_reason: str, keys: list[GoneKey]) -> None:
        gone.extend(keys)
        got.set()

    with Monitor(kicks.append, netns=node, on_gone=on_gone):
        nb, _fdb, _nh, route = peer(1)
        ip("-n", node, "route", "del", str(route.dst), "proto", str(RT_PROTO))
        assert got.wait(2.0), f"no on_gone call; kicks={kicks}"
        assert ("route", MAIN_TABLE, route.dst) in gone
        assert kicks == []
        got.clear()
        # Deleting a permanent neighbour first shows it changing state: not exact, so a kick
        # (full re-read) rather than a key.
        ip("-n", node, "neigh", "del", str(nb.ip), "dev", VXLAN_DEVICE)
        for _ in range(40):
            if kicks or got.is_set():
                break
            got.wait(0.05)
        assert kicks or ("neighbour", VXLAN_DEVICE, nb.ip) in gone
        kicks.clear()
        ip("-n", node, "link", "set", VXLAN_DEVICE, "mtu", "1400")
        # A device change has no exact key: it must kick for a full re-read instead.
        for _ in range(40):
            if kicks:
                break
            got.wait(0.05)
        assert kicks and "device_changed" in kicks[0]
