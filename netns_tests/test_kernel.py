"""The kernel layer against the real kernel, in scratch network namespaces (root only)."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any
from unittest.mock import ANY

import netaddr
import pytest

from netns_tests.kernel_fixtures import (
    PEER_HOST_IP,
    as_read,
    assert_table_changes_reported,
    ip,
    peer,
    peer_ops,
    vxlan_device,
)
from overlay.kernel import nlmsg
from overlay.kernel.apply import Kernel, describe
from overlay.kernel.monitor import Monitor
from overlay.kernel.nat import apply_nat, read_nat
from overlay.model import (
    IPIP_DEVICE,
    RT_PROTO,
    VXLAN6_DEVICE,
    VXLAN_DEVICE,
    Action,
    Dataplane,
    FdbEntry,
    IpipDevice,
    NatOutgoing,
    Neighbour,
    Nexthop,
    NexthopKey,
    Op,
    Route,
    TunnelFilter,
    TunnelHosts,
    VxlanDevice,
)
from overlay.plan import plan

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

BLACKHOLE = Route(dst=netaddr.IPNetwork("10.127.0.0/26"), blackhole=True)
DEV_ROUTE = Route(dst=netaddr.IPNetwork("10.126.0.9/32"), dev=VXLAN_DEVICE)


def _apply_ok(k: Kernel, ops: list[Op]) -> None:
    result = k.apply(ops)
    assert result.failed == []
    assert result.done == len(ops)


def test_roundtrip_device_peers_blackhole(kernel: Kernel) -> None:
    assert kernel.supports_nexthops()
    dev = vxlan_device()
    ops = [Op(Action.SET, dev), *peer_ops(3), Op(Action.SET, BLACKHOLE), Op(Action.SET, DEV_ROUTE)]
    _apply_ok(kernel, ops)

    dp = kernel.read()
    peers = [peer(i) for i in range(3)]
    assert dp.devices == {VXLAN_DEVICE: as_read(dev)}
    assert dp.neighbours == {p[0] for p in peers}
    assert dp.fdb == {p[1] for p in peers}
    assert dp.nexthop_ids == {p[2].key: p[2].id for p in peers}
    assert dp.nexthops == {p[2].key for p in peers}
    assert dp.routes == {p[3] for p in peers} | {BLACKHOLE, DEV_ROUTE}
    assert dp.route_nhids == {p[3]: p[2].id for p in peers}

    # Applying the same again is idempotent (replace semantics), and deletes empty it.
    _apply_ok(kernel, ops)
    dels = [
        Op(Action.DELETE, DEV_ROUTE),
        Op(Action.DELETE, BLACKHOLE),
        *peer_ops(3, action=Action.DELETE),
    ]
    _apply_ok(kernel, dels)
    dp = kernel.read()
    assert (dp.neighbours, dp.fdb, dp.nexthops, dp.routes) == (set(), set(), set(), set())
    # Deleting what is already gone counts as done.
    _apply_ok(kernel, dels)
    _apply_ok(kernel, [Op(Action.DELETE, dev)])
    assert kernel.read().devices == {}
    _apply_ok(kernel, [Op(Action.DELETE, dev)])


def test_ipv6_objects_on_the_ipv4_vxlan_device_roundtrip(node: str, kernel: Kernel) -> None:
    """IPv6 pods ride vxlan.calico over the IPv4 underlay: the device holds an IPv6 tunnel
    address too; per peer an NDP entry (same VTEP MAC, same FDB entry), an IPv6 nexthop
    and nhid routes for its IPv6 blocks; blackholes and /128 device routes as for IPv4."""
    dev = dataclasses.replace(vxlan_device(), address6=netaddr.IPAddress("fd00:127::1"))
    nb4, fdb, nh4, route4 = peer(0)
    tunnel6 = netaddr.IPAddress("fd00:128::1")
    key6 = NexthopKey(gateway=tunnel6, dev=VXLAN_DEVICE, onlink=True)
    nb6 = Neighbour(dev=VXLAN_DEVICE, ip=tunnel6, mac=nb4.mac)
    route6 = Route(dst=netaddr.IPNetwork("fd00:128::/122"), nexthop=key6)
    blackhole6 = Route(dst=netaddr.IPNetwork("fd00:127::/122"), blackhole=True)
    dev6 = Route(dst=netaddr.IPNetwork("fd00:126::9/128"), dev=VXLAN_DEVICE)
    ops = [
        Op(Action.SET, dev),
        *(Op(Action.SET, o) for o in (nb4, nb6, fdb, nh4, Nexthop(id=7, key=key6))),
        Op(Action.SET, route4, nhid=nh4.id),
        Op(Action.SET, route6, nhid=7),
        Op(Action.SET, blackhole6),
        Op(Action.SET, dev6),
    ]
    _apply_ok(kernel, ops)
    # Usable at once: no duplicate address detection keeps it tentative.
    shown = ip("-n", node, "-6", "addr", "show", "dev", VXLAN_DEVICE).stdout
    line = next((x for x in shown.splitlines() if "fd00:127::1/128" in x), "")
    assert line and "tentative" not in line, shown
    dp = kernel.read()
    assert dp.devices == {VXLAN_DEVICE: as_read(dev)}
    assert dp.neighbours == {nb4, nb6} and dp.fdb == {fdb}
    assert dp.nexthop_ids == {nh4.key: nh4.id, key6: 7}
    assert dp.routes == {route4, route6, blackhole6, dev6}
    assert dp.route_nhids == {route4: nh4.id, route6: 7}
    assert "fd00:128::/122 nhid 7" in ip("-n", node, "-6", "route", "show", "proto", "80").stdout

    # The IPv6 address is fixed in place, like the IPv4 one.
    _apply_ok(kernel, [Op(Action.SET, dataclasses.replace(dev, address6=None))])
    assert kernel.read().devices[VXLAN_DEVICE] == as_read(dataclasses.replace(dev, address6=None))
    assert kernel.read().routes >= {route4, blackhole6}
    _apply_ok(kernel, [Op(Action.SET, dev)])
    assert kernel.read().devices[VXLAN_DEVICE] == as_read(dev)


def test_the_ipv6_vxlan_device_and_its_peer_objects_roundtrip(node: str, kernel: Kernel) -> None:
    """vxlan-v6.calico over an IPv6 underlay, next to vxlan.calico on the same UDP port:
    the device (IPv6 local address, /128 tunnel address), and per peer an NDP entry, an FDB
    entry with an IPv6 destination, an IPv6 nexthop and its nhid route."""
    ip("-n", node, "addr", "add", "fd00:192::1/64", "dev", "veth0", "nodad")
    v4 = vxlan_device()
    v6 = VxlanDevice(
        name=VXLAN6_DEVICE,
        vni=4096,
        port=4789,
        local=netaddr.IPAddress("fd00:192::1"),
        parent="veth0",
        mac="66:0a:0b:0c:0d:06",
        mtu=1430,
        address=None,
        address6=netaddr.IPAddress("fd00:127::1"),
    )
    tunnel6, mac = netaddr.IPAddress("fd00:128::1"), "66:00:00:00:00:06"
    key6 = NexthopKey(gateway=tunnel6, dev=VXLAN6_DEVICE, onlink=True)
    nb6 = Neighbour(dev=VXLAN6_DEVICE, ip=tunnel6, mac=mac)
    fdb6 = FdbEntry(dev=VXLAN6_DEVICE, mac=mac, dst=netaddr.IPAddress("fd00:192::2"))
    route6 = Route(dst=netaddr.IPNetwork("fd00:128::/122"), nexthop=key6)
    host6 = Route(dst=netaddr.IPNetwork("fd00:126::9/128"), dev=VXLAN6_DEVICE)
    ops = [
        Op(Action.SET, v4),
        Op(Action.SET, v6),
        *(Op(Action.SET, o) for o in (nb6, fdb6, Nexthop(id=9, key=key6))),
        Op(Action.SET, route6, nhid=9),
        Op(Action.SET, host6),
    ]
    _apply_ok(kernel, ops)
    dp = kernel.read()
    assert dp.devices == {VXLAN_DEVICE: as_read(v4), VXLAN6_DEVICE: as_read(v6)}
    assert (dp.neighbours, dp.fdb) == ({nb6}, {fdb6})
    assert dp.nexthop_ids == {key6: 9}
    assert dp.routes == {route6, host6} and dp.route_nhids == {route6: 9}
    link = ip("-n", node, "-d", "link", "show", VXLAN6_DEVICE).stdout
    assert "local fd00:192::1" in link and "dstport 4789" in link, link
    argv = ["bridge", "-n", node, "fdb", "show", "dev", VXLAN6_DEVICE]
    shown = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout
    assert f"{mac} dst fd00:192::2" in shown and "permanent" in shown, shown
    # A new local address cannot be changed in place: the device is made again.
    moved = dataclasses.replace(v6, local=netaddr.IPAddress("fd00:192::3"))
    ip("-n", node, "addr", "add", "fd00:192::3/64", "dev", "veth0", "nodad")
    want = Dataplane(devices={VXLAN_DEVICE: v4, VXLAN6_DEVICE: moved})
    _apply_ok(kernel, plan(want, kernel.read()))
    assert kernel.read().devices[VXLAN6_DEVICE] == as_read(moved)


def test_foreign_objects_invisible_and_untouched(node: str, kernel: Kernel) -> None:
    _apply_ok(kernel, [Op(Action.SET, vxlan_device()), *peer_ops(2)])
    foreign = "10.99.0.0/24"
    ip("-n", node, "route", "add", foreign, "via", "192.0.2.2", "proto", "static")
    ip("-n", node, "nexthop", "add", "id", "700", "via", "192.0.2.2", "dev", "veth0")
    ip(
        "-n",
        node,
        "neigh",
        "add",
        "10.200.0.1",
        "lladdr",
        "02:00:00:00:00:01",
        "dev",
        "veth0",
        "nud",
        "permanent",
    )

    dp = kernel.read()
    assert all(str(r.dst) != foreign for r in dp.routes)
    assert 700 not in dp.nexthop_ids.values()
    assert dp.foreign_nexthop_ids == {700}  # plan() must never allocate it
    assert len(dp.routes) == 2 and len(dp.nexthops) == 2

    # Deleting our routes, even one with the foreign prefix, leaves the foreign route alone:
    # deletes match our protocol.
    ops = [
        Op(Action.DELETE, Route(dst=netaddr.IPNetwork(foreign), dev="veth0")),
        *peer_ops(2, action=Action.DELETE),
    ]
    _apply_ok(kernel, ops)
    routes = ip("-n", node, "route", "show", foreign).stdout
    assert "proto static" in routes
    assert "id 700" in ip("-n", node, "nexthop", "show").stdout
    assert "10.200.0.1" in ip("-n", node, "neigh", "show", "dev", "veth0").stdout


def test_batch_of_10k_peers_applies_and_reads_back(kernel: Kernel) -> None:
    # Speed is measured against iproute2 in bench/bench_kernel.py; here only correctness.
    n = 10_000
    _apply_ok(kernel, [Op(Action.SET, vxlan_device())])
    ops = peer_ops(n)
    start = time.perf_counter()
    result = kernel.apply(ops)
    took = time.perf_counter() - start
    print(f"\napplied {n} peers ({len(ops)} objects) in {took:.2f} s")
    assert result.failed == [] and result.done == 4 * n
    start = time.perf_counter()
    dp = kernel.read()
    read_took = time.perf_counter() - start
    print(
        f"read back {len(dp.routes)} routes + {len(dp.nexthops)} nexthops + "
        f"{len(dp.neighbours)} neighbours + {len(dp.fdb)} fdb in {read_took:.2f} s"
    )
    assert (len(dp.routes), len(dp.nexthops), len(dp.neighbours), len(dp.fdb)) == (n, n, n, n)


def test_failure_of_one_object_does_not_stop_the_batch(kernel: Kernel) -> None:
    _apply_ok(kernel, [Op(Action.SET, vxlan_device())])
    missing = Op(
        Action.SET,
        Route(dst=netaddr.IPNetwork("10.250.0.0/26"), nexthop=peer(50)[2].key),
        nhid=99_999,
    )
    bad_dev = Op(Action.SET, Route(dst=netaddr.IPNetwork("10.250.1.0/26"), dev="nosuchdev"))
    ops = [*peer_ops(5)]
    ops.insert(12, missing)  # among the nexthops, before the good routes
    ops.append(bad_dev)
    result = kernel.apply(ops)
    assert result.done == len(ops) - 2
    assert [(op, code) for op, code, _ in result.failed] == [
        (missing, errno.EINVAL),
        (bad_dev, errno.ENODEV),
    ]
    assert "nexthop" in result.failed[0][2].lower()
    assert len(kernel.read().routes) == 5


def test_one_log_line_per_change_and_a_warning_per_failure_across_chunks(
    kernel: Kernel, caplog: pytest.LogCaptureFixture
) -> None:
    _apply_ok(kernel, [Op(Action.SET, vxlan_device())])
    ops = peer_ops(300)  # 1200 messages: two kernel sends
    bad = [
        Op(
            Action.SET,
            Route(dst=netaddr.IPNetwork(f"10.250.{i}.0/26"), nexthop=peer(0)[2].key),
            90_000 + i,
        )
        for i in range(2)
    ]
    ops.insert(5, bad[0])
    ops.insert(1100, bad[1])
    with caplog.at_level(logging.INFO, logger="overlay.kernel"):
        result = kernel.apply(ops)
    assert [(op, code) for op, code, _ in result.failed] == [(b, errno.EINVAL) for b in bad]
    changes = [
        line
        for r in caplog.records
        if r.levelno == logging.INFO
        for line in r.getMessage().split("\n")
    ]
    assert changes == [describe(op) for op in ops if op not in bad]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w.split(" outcome=failed")[0] for w in warnings] == [describe(b) for b in bad]


def test_batch_maps_errors_across_chunks_and_joins_its_sender_on_failure(
    kernel: Kernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = kernel._sock
    missing = [nlmsg.nexthop(False, 90_000 + i) for i in range(7)]  # each fails: ENOENT
    # Three messages per chunk: three chunks go through the sender thread, in order.
    assert sock.batch(iter(missing), max_msgs=3) == [(i, errno.ENOENT, ANY) for i in range(7)]

    threads = threading.active_count()
    sent: list[int] = []
    real_send = sock._send_chunk

    def send_then_fail(buf: bytearray, start: int, base: int, count: int) -> Any:
        sent.append(start)
        if start == 3:
            raise OSError(errno.EIO, "send failed")
        return real_send(buf, start, base, count)

    monkeypatch.setattr(sock, "_send_chunk", send_then_fail)
    with pytest.raises(OSError, match="send failed"):
        sock.batch(missing, max_msgs=3)
    assert sent == [0, 3]  # nothing sent after the failed chunk

    def encoding_fails() -> Iterator[bytes]:
        yield from missing
        raise ValueError("encoder bug")

    with pytest.raises(ValueError, match="encoder bug"):
        sock.batch(encoding_fails(), max_msgs=3)
    assert threading.active_count() == threads


def test_device_drift_recreates_and_mtu_is_fixed_in_place(node: str, kernel: Kernel) -> None:
    _apply_ok(kernel, [Op(Action.SET, vxlan_device()), *peer_ops(2)])
    index_before = ip("-n", node, "-o", "link", "show", VXLAN_DEVICE).stdout.split(":")[0]

    ip("-n", node, "link", "set", VXLAN_DEVICE, "mtu", "1400")
    assert kernel.read().devices[VXLAN_DEVICE].mtu == 1400
    result = kernel.apply([Op(Action.SET, vxlan_device())])
    assert result.failed == [] and not result.resync
    assert kernel.read().devices[VXLAN_DEVICE] == as_read(vxlan_device())
    assert ip("-n", node, "-o", "link", "show", VXLAN_DEVICE).stdout.split(":")[0] == index_before

    drifted = vxlan_device(vni=4097)
    result = kernel.apply([Op(Action.SET, drifted)])
    assert result.failed == [] and result.resync
    dp = kernel.read()
    assert dp.devices[VXLAN_DEVICE] == as_read(drifted)
    assert "vxlan id 4097" in ip("-n", node, "-d", "link", "show", VXLAN_DEVICE).stdout
    # Recreation flushed the peers: the caller must re-plan (resync=True says so).
    assert dp.routes == set() and dp.neighbours == set()

    # A stray extra address is drift too, and is removed.
    ip("-n", node, "addr", "add", "10.5.5.5/24", "dev", VXLAN_DEVICE)
    assert kernel.read().devices[VXLAN_DEVICE] != as_read(drifted)
    _apply_ok(kernel, [Op(Action.SET, drifted)])
    assert kernel.read().devices[VXLAN_DEVICE] == as_read(drifted)


def test_monitor_kicks_when_our_route_is_deleted(node: str, kernel: Kernel) -> None:
    _apply_ok(kernel, [Op(Action.SET, vxlan_device()), *peer_ops(2)])
    reasons: list[str] = []
    kicked = threading.Event()

    def kick(reason: str) -> None:
        reasons.append(reason)
        kicked.set()

    with Monitor(kick, netns=node):
        # A foreign route coming and going is not a reason.
        ip("-n", node, "route", "add", "10.99.0.0/24", "via", "192.0.2.2", "proto", "static")
        ip("-n", node, "route", "del", "10.99.0.0/24")
        assert not kicked.wait(0.5), reasons
        start = time.monotonic()
        ip("-n", node, "route", "del", str(peer(1)[3].dst), "proto", str(RT_PROTO))
        assert kicked.wait(1.0), "no kick within 1 s"
        print(f"\nmonitor kicked after {time.monotonic() - start:.3f} s: {reasons}")
        assert "route_deleted" in reasons[0] and str(peer(1)[3].dst) in reasons[0]

        kicked.clear()
        ip("-n", node, "neigh", "del", str(peer(0)[0].ip), "dev", VXLAN_DEVICE)
        assert kicked.wait(1.0) and "neighbour" in reasons[-1]


def test_classic_route_fallback(node: str) -> None:
    with Kernel(netns=node, use_nexthops=False) as k:
        ops = [Op(Action.SET, vxlan_device()), *peer_ops(3)]
        _apply_ok(k, ops)
        out = ip("-n", node, "route", "show", "proto", str(RT_PROTO)).stdout
        assert "nhid" not in out and "via 10.128.0.64 dev vxlan.calico" in out and "onlink" in out
        dp = k.read()
        assert dp.routes == {peer(i)[3] for i in range(3)}
        assert dp.nexthops == set()
        _apply_ok(k, peer_ops(3, action=Action.DELETE))
        assert k.read().routes == set()


def test_ipip_device_or_clear_unsupported(kernel: Kernel) -> None:
    dev = IpipDevice(name=IPIP_DEVICE, mtu=1480, address=netaddr.IPAddress("10.127.1.1"))
    result = kernel.apply([Op(Action.SET, dev)])
    if result.failed:  # this host's kernel has no ipip
        [(_op, code, text)] = result.failed
        assert code == errno.EOPNOTSUPP and "kernel lacks ipip" in text
    else:
        assert kernel.read().devices[IPIP_DEVICE] == dev


def test_both_tunnel_filters_are_applied_and_read_through_the_kernel(kernel: Kernel) -> None:
    a, b = netaddr.IPAddress("192.0.2.11"), netaddr.IPAddress("192.0.2.12")
    a6, b6 = netaddr.IPAddress("2001:db8::11"), netaddr.IPAddress("2001:db8::12")
    want = Dataplane(
        tunnel_filter=TunnelFilter(frozenset({a, b}), 4789, ipip=False),
        tunnel_filter6=TunnelFilter(frozenset({a6, b6}), 4789, False, version=6),
    )
    _apply_ok(kernel, plan(want, kernel.read()))
    got = kernel.read()
    assert (got.tunnel_filter, got.tunnel_filter6) == (want.tunnel_filter, want.tunnel_filter6)
    # The IPv6 node addresses alone change: one in-place op, on the ip6 table.
    want.tunnel_filter6 = TunnelFilter(frozenset({b6}), 4789, False, version=6)
    ops = plan(want, kernel.read())
    assert ops == [Op(Action.SET, TunnelHosts(frozenset(), frozenset({a6}), version=6))]
    _apply_ok(kernel, ops)
    got = kernel.read()
    assert (got.tunnel_filter, got.tunnel_filter6) == (want.tunnel_filter, want.tunnel_filter6)
    # No IPv6 tunnel any more: only the ip6 table goes.
    want.tunnel_filter6 = None
    _apply_ok(kernel, plan(want, kernel.read()))
    got = kernel.read()
    assert (got.tunnel_filter, got.tunnel_filter6) == (want.tunnel_filter, None)
    assert plan(want, got) == []


def test_nat_outgoing_roundtrip(node: str) -> None:
    assert read_nat(node) is None
    pools = frozenset(netaddr.IPNetwork(c) for c in ("10.128.0.0/16", "10.200.0.0/16"))
    nat = NatOutgoing(sources=frozenset({netaddr.IPNetwork("10.128.0.0/16")}), all_pools=pools)
    apply_nat(nat, node)
    assert read_nat(node) == nat
    ruleset = ip("netns", "exec", node, "nft", "list", "table", "ip", "overlay-nat").stdout
    assert "ip saddr @sources ip daddr != @pools masquerade" in ruleset
    apply_nat(nat, node)  # replacing is atomic and repeatable
    to = NatOutgoing(nat.sources, nat.all_pools, netaddr.IPAddress("192.0.2.9"))
    apply_nat(to, node)
    assert read_nat(node) == to
    assert (
        "daddr != @pools snat to 192.0.2.9"
        in ip("netns", "exec", node, "nft", "list", "table", "ip", "overlay-nat").stdout
    )
    # Someone flushes our rule but leaves the table: read back as no table, so written again.
    ip("netns", "exec", node, "nft", "flush", "chain", "ip", "overlay-nat", "postrouting")
    assert read_nat(node) is None
    apply_nat(None, node)
    assert read_nat(node) is None
    apply_nat(None, node)  # deleting twice is fine


def test_nat66_roundtrip_beside_the_ipv4_table(node: str, kernel: Kernel) -> None:
    assert read_nat(node, version=6) is None
    pools6 = frozenset(netaddr.IPNetwork(c) for c in ("fd00:10:244::/48", "fd00:10:246::/48"))
    nat6 = NatOutgoing(frozenset({netaddr.IPNetwork("fd00:10:244::/48")}), pools6, version=6)
    pools = frozenset({netaddr.IPNetwork("10.128.0.0/16")})
    nat = NatOutgoing(pools, pools)
    want = Dataplane(nat=nat, nat6=nat6)
    _apply_ok(kernel, plan(want, kernel.read()))
    got = kernel.read()
    assert (got.nat, got.nat6) == (nat, nat6)
    assert plan(want, got) == []
    ruleset = ip("netns", "exec", node, "nft", "list", "table", "ip6", "overlay-nat").stdout
    assert "ip6 saddr @sources ip6 daddr != @pools masquerade" in ruleset
    assert "type ipv6_addr" in ruleset and "fd00:10:246::/48" in ruleset
    apply_nat(nat6, node)  # replacing is atomic and repeatable
    assert read_nat(node, version=6) == nat6
    # Someone flushes our IPv6 rule but leaves the table: read back as no table (written
    # again), and the IPv4 table is still whole.
    ip("netns", "exec", node, "nft", "flush", "chain", "ip6", "overlay-nat", "postrouting")
    assert read_nat(node, version=6) is None
    assert read_nat(node) == nat
    repair = plan(want, kernel.read())
    assert repair == [Op(Action.SET, nat6)]
    _apply_ok(kernel, repair)
    assert read_nat(node, version=6) == nat6
    # No IPv6 NAT any more: only the ip6 table goes.
    want.nat6 = None
    delete = plan(want, kernel.read())
    assert delete == [Op(Action.DELETE, nat6)]
    _apply_ok(kernel, delete)
    _apply_ok(kernel, delete)  # deleting twice is fine
    tables = ip("netns", "exec", node, "nft", "list", "tables").stdout
    assert "table ip6 overlay-nat" not in tables and "table ip overlay-nat" in tables
    assert (kernel.read().nat, kernel.read().nat6) == (nat, None)


@pytest.mark.parametrize("version", [4, 6])
def test_the_monitor_reports_anyone_elses_change_of_either_nat_table(
    node: str, version: int
) -> None:
    net = netaddr.IPNetwork("10.128.0.0/16" if version == 4 else "fd00:10:244::/48")
    kind, family = ("nat", "ip") if version == 4 else ("nat6", "ip6")
    nat = NatOutgoing(frozenset({net}), frozenset({net}), version=version)
    assert_table_changes_reported(
        node,
        kind,
        lambda: apply_nat(nat, node),
        ["nft", "flush", "chain", family, "overlay-nat", "postrouting"],
    )


def test_holds_ours_tells_a_fresh_kernel_from_one_with_our_objects(node: str) -> None:
    """What decides a cold start (cold_start.py): nothing of ours, or a VXLAN device of ours,
    or any nexthop object at all (the cold plan picks nexthop ids without looking)."""
    with Kernel(netns=node) as k:
        assert k.holds_ours() is False
        ip("-n", node, "nexthop", "add", "id", "7", "via", str(PEER_HOST_IP), "dev", "veth0")
        assert k.holds_ours() is True, "a foreign nexthop object"
        ip("-n", node, "nexthop", "del", "id", "7")
        assert k.holds_ours() is False
        _apply_ok(k, [Op(Action.SET, vxlan_device())])
        assert k.holds_ours() is True, "our vxlan.calico"
