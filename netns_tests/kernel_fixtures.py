"""Scratch namespaces and synthetic peers for the kernel-layer tests and benchmark.

Two namespaces joined by a veth pair form the underlay: the node (veth0 192.0.2.1/24) and a
neighbour host (veth1 192.0.2.2/24). Nothing touches the root namespace.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import netaddr

from overlay.model import (
    VXLAN_DEVICE,
    Action,
    FdbEntry,
    Neighbour,
    Nexthop,
    NexthopKey,
    Op,
    Route,
    VxlanDevice,
)

_counter = itertools.count()
NODE_IP = netaddr.IPAddress("192.0.2.1")
PEER_HOST_IP = netaddr.IPAddress("192.0.2.2")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unique_name(tag: str = "") -> str:
    return f"ovk{tag}-{os.getpid()}-{next(_counter)}"


@contextmanager
def underlay() -> Iterator[tuple[str, str]]:
    """(node netns, neighbour-host netns), always deleted afterwards."""
    node, other = unique_name(), unique_name("h")
    made: list[str] = []
    try:
        for ns in (node, other):
            ip("netns", "add", ns)
            made.append(ns)
        ip(
            "-n",
            node,
            "link",
            "add",
            "veth0",
            "type",
            "veth",
            "peer",
            "name",
            "veth1",
            "netns",
            other,
        )
        ip("-n", node, "addr", "add", f"{NODE_IP}/24", "dev", "veth0")
        ip("-n", other, "addr", "add", f"{PEER_HOST_IP}/24", "dev", "veth1")
        for ns, dev in ((node, "veth0"), (other, "veth1"), (node, "lo")):
            ip("-n", ns, "link", "set", dev, "up")
        yield node, other
    finally:
        for ns in made:
            ip("netns", "del", ns, check=False)


def vxlan_device(vni: int = 4096, mac: str = "66:0a:0b:0c:0d:01") -> VxlanDevice:
    return VxlanDevice(
        name=VXLAN_DEVICE,
        vni=vni,
        port=4789,
        local=NODE_IP,
        parent="veth0",
        mac=mac,
        mtu=1450,
        address=netaddr.IPAddress("10.127.0.1"),
    )


def as_read(dev: VxlanDevice) -> VxlanDevice:
    """`dev` as the kernel reader reports it when its TX checksum offload was left alone
    (Linux turns it on for a new vxlan device)."""
    return dataclasses.replace(dev, tx_checksum=True)


def peer(i: int) -> tuple[Neighbour, FdbEntry, Nexthop, Route]:
    """Peer i: block 10.128.0.0/9 + i*64 as /26, its tunnel address the block's first."""
    block = netaddr.IPNetwork((int(netaddr.IPAddress("10.128.0.0")) + i * 64, 26))
    tunnel = block.network
    mac = "66:00:" + ":".join(f"{b:02x}" for b in i.to_bytes(4, "big"))
    underlay_ip = netaddr.IPAddress(int(netaddr.IPAddress("198.18.0.0")) + i)
    key = NexthopKey(gateway=tunnel, dev=VXLAN_DEVICE, onlink=True)
    return (
        Neighbour(dev=VXLAN_DEVICE, ip=tunnel, mac=mac),
        FdbEntry(dev=VXLAN_DEVICE, mac=mac, dst=underlay_ip),
        Nexthop(id=i + 1, key=key),
        Route(dst=block, nexthop=key),
    )


def peer_ops(count: int, start: int = 0, action: Action = Action.SET) -> list[Op]:
    """Ops in plan()'s safe order: neighbours, FDB, nexthops, then routes (reverse to delete)."""
    peers = [peer(i) for i in range(start, start + count)]
    groups: list[list[Op]] = [[], [], [], []]
    for nb, fdb, nh, route in peers:
        groups[0].append(Op(action, nb))
        groups[1].append(Op(action, fdb))
        groups[2].append(Op(action, nh))
        groups[3].append(Op(action, route, nhid=nh.id))
    if action is Action.DELETE:
        groups.reverse()
    return [op for g in groups for op in g]


def assert_table_changes_reported(
    node: str, kind: str, write_ours: Callable[[], None], theirs: list[str]
) -> None:
    """The netlink monitor reports our own nftables write on one of our tables with our nft
    pid (the reconciler drops it as ours), and another process's change (`theirs`, an nft
    argv run in `node`) with that process's pid, as GoneKey kind `kind`; neither kicks."""
    from overlay.kernel import nft
    from overlay.kernel.monitor import Monitor
    from overlay.model import GoneKey

    gone: list[GoneKey] = []
    got = threading.Event()

    def on_gone(_reason: str, keys: list[GoneKey]) -> None:
        gone.extend(keys)
        got.set()

    kicks: list[str] = []
    with Monitor(kicks.append, netns=node, on_gone=on_gone):
        write_ours()
        assert got.wait(2.0), f"our own write was not reported; kicks={kicks}"
        [(k, pid, _)] = gone
        assert k == kind and pid in nft.own_pids()
        got.clear()
        gone.clear()
        proc = subprocess.Popen(["ip", "netns", "exec", node, *theirs])
        assert proc.wait(10) == 0
        assert got.wait(2.0), f"another process's change was not reported; kicks={kicks}"
        assert gone == [(kind, proc.pid, "")]
        assert kicks == []
