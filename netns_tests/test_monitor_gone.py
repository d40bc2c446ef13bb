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
from overlay.model import MAIN_TABLE, RT_PROTO, VXLAN_DEVICE, Action, GoneKey, Neighbour, Op

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
    kicked = threading.Event()

    def on_gone(_reason: str, keys: list[GoneKey]) -> None:
        gone.extend(keys)
        got.set()

    def on_kick(reason: str) -> None:
        kicks.append(reason)
        kicked.set()

    with Monitor(on_kick, netns=node, on_gone=on_gone):
        nb, _fdb, _nh, route = peer(1)
        ip("-n", node, "route", "del", str(route.dst), "proto", str(RT_PROTO))
        assert got.wait(2.0), f"no on_gone call; kicks={kicks}"
        assert ("route", MAIN_TABLE, route.dst) in gone
        assert kicks == []
        got.clear()
        # Deleting a permanent neighbour first shows it turning FAILED, then going: both
        # come with the neighbour's key, not as a kick for a full re-read.
        ip("-n", node, "neigh", "del", str(nb.ip), "dev", VXLAN_DEVICE)
        assert got.wait(2.0), f"no on_gone call; kicks={kicks}"
        assert ("neighbour", VXLAN_DEVICE, nb.ip) in gone
        assert kicks == []
        ip("-n", node, "link", "set", VXLAN_DEVICE, "mtu", "1400")
        # A device change has no exact key: it must kick for a full re-read instead.
        assert kicked.wait(2.0), f"no kick; gone={gone}"
        assert "device_changed" in kicks[0]


def test_our_own_removal_of_a_peer_needs_no_reread(node: str) -> None:
    """The agent removing one peer (route, nexthop, FDB entry, neighbour) must come back as
    exact keys only: a kick would make the reconciler re-read the whole kernel (~0.5 s at
    10k peers) and hold up the next datastore change behind it."""
    kicks: list[str] = []
    gone: list[GoneKey] = []
    lock = threading.Lock()

    def on_gone(_reason: str, keys: list[GoneKey]) -> None:
        with lock:
            gone.extend(keys)

    nb, fdb, nh, route = peer(2)
    want = {
        ("route", MAIN_TABLE, route.dst),
        ("nexthop", nh.id, ""),
        ("fdb", VXLAN_DEVICE, fdb.mac),
        ("neighbour", VXLAN_DEVICE, nb.ip),
    }
    with Monitor(kicks.append, netns=node, on_gone=on_gone):
        with Kernel(netns=node, use_nexthops=True) as k:
            result = k.apply(peer_ops(1, start=2, action=Action.DELETE))
            assert not result.failed, result.failed
        for _ in range(40):
            with lock:
                if want <= set(gone) or kicks:
                    break
            threading.Event().wait(0.05)
        assert kicks == [], f"our own deletions kicked a full re-read: {kicks}"
        with lock:
            assert want <= set(gone), gone


def test_a_neighbour_of_ours_turned_non_permanent_is_named(node: str) -> None:
    """Someone turning one of our neighbours STALE: reported with its key, so the reconciler
    forgets it and sets it back, without a full re-read."""
    kicks: list[str] = []
    gone: list[GoneKey] = []
    got = threading.Event()

    def on_gone(_reason: str, keys: list[GoneKey]) -> None:
        gone.extend(keys)
        got.set()

    nb, _fdb, _nh, _route = peer(0)
    with Monitor(kicks.append, netns=node, on_gone=on_gone):
        ip("-n", node, "neigh", "replace", str(nb.ip), "lladdr", nb.mac, "dev", VXLAN_DEVICE,
           "nud", "stale")  # fmt: skip
        assert got.wait(2.0), f"no on_gone call; kicks={kicks}"
        assert ("neighbour", VXLAN_DEVICE, nb.ip) in gone
        assert kicks == []


def test_our_own_writes_are_told_by_their_port_and_others_by_their_content(node: str) -> None:
    """Notifications carry the requester's netlink port: most of what the agent's own socket
    did is skipped outright. The kernel stamps neighbour deletions and the VXLAN driver's
    FDB notifications with no port; those come as keys that match what we wrote, which the
    reconciler recognises. The same kind of change by another process is reported with the
    content it left behind."""
    kicks: list[str] = []
    calls: list[list[GoneKey]] = []
    lock = threading.Lock()

    def on_gone(_reason: str, keys: list[GoneKey]) -> None:
        with lock:
            calls.append(keys)

    def seen() -> list[GoneKey]:
        with lock:
            return [key for keys in calls for key in keys]

    nb, fdb, nh, route = peer(1)
    with (
        Kernel(netns=node, use_nexthops=True) as k,
        Monitor(kicks.append, netns=node, on_gone=on_gone, own_port=k.port_id),
    ):
        # Ours: delete and put back a whole peer.
        for action in (Action.DELETE, Action.SET):
            assert not k.apply(peer_ops(1, start=1, action=action)).failed
        threading.Event().wait(0.3)  # a duration to let echoes arrive, not a condition
        ours = seen()
        assert kicks == [], f"our own writes kicked a full re-read: {kicks}"
        assert not [key for key in ours if key[0] in ("route", "nexthop", "neighbour_set")]
        assert [key for key in ours if key[0] == "fdb_set"] in ([], [("fdb_set", fdb.dev, fdb)])
        # Theirs: the same neighbour with another MAC, the nexthop pointing elsewhere.
        ip("-n", node, "neigh", "replace", str(nb.ip), "lladdr", "02:00:00:00:00:99",
           "dev", VXLAN_DEVICE, "nud", "permanent")  # fmt: skip
        ip("-n", node, "nexthop", "replace", "id", str(nh.id), "via", "10.99.0.1",
           "dev", VXLAN_DEVICE, "onlink", "proto", str(RT_PROTO))  # fmt: skip
        for _ in range(40):
            theirs = seen()[len(ours) :]
            if len(theirs) >= 2:
                break
            threading.Event().wait(0.05)
    assert kicks == []
    assert ("nexthop", nh.id, "") in theirs, theirs
    changed = [key[2] for key in theirs if key[0] == "neighbour_set"]
    assert Neighbour(nb.dev, nb.ip, "02:00:00:00:00:99") in changed, theirs
    assert route.dst  # (the peer's route itself was not touched by the others)
