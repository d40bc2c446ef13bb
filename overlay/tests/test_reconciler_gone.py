"""Drift reported with exact keys (the monitor's `on_gone`) is repaired without a re-read."""

from __future__ import annotations

from netaddr import IPAddress, IPNetwork

from ipam.model import EncapMode
from overlay.model import (
    MAIN_TABLE,
    Action,
    Dataplane,
    FdbEntry,
    NatOutgoing,
    Neighbour,
    TunnelFilter,
)
from overlay.reconciler import Outcome, Reconciler, forget
from overlay.tests.fake_kernel import FakeKernel
from overlay.tests.scenarios import desired, me, pool, standard_view

VIEW = standard_view(pool(vxlan=EncapMode.CROSS_SUBNET))


def _converged() -> tuple[FakeKernel, Reconciler, Dataplane]:
    kernel = FakeKernel()
    rec = Reconciler(kernel, lambda v: desired(v, me()))
    rec.update_view(VIEW)
    assert rec.run_once() is Outcome.SYNCED
    # Creating the device asks for one confirming re-read; after it the node is idle.
    assert rec.run_once() is Outcome.SYNCED
    assert rec.run_once() is Outcome.IDLE
    want = desired(VIEW)
    assert kernel.read().routes == want.routes
    return kernel, rec, want


def test_exact_deletions_are_restored_without_reading_the_kernel() -> None:
    kernel, rec, want = _converged()
    route = sorted(want.routes, key=str)[0]
    neighbour = next(iter(want.neighbours))
    fdb = next(iter(want.fdb))
    for obj in (route, neighbour, fdb):
        kernel.external_delete(obj)
    reads = kernel.reads

    rec.kick(
        "route_deleted (+2 more)",
        gone=[
            ("route", MAIN_TABLE, route.dst),
            ("neighbour", neighbour.dev, neighbour.ip),
            ("fdb", fdb.dev, fdb.mac),
        ],
    )
    assert rec.run_once() is Outcome.SYNCED

    assert kernel.reads == reads  # repaired from the keys alone
    after = kernel.read()
    assert route in after.routes and neighbour in after.neighbours and fdb in after.fdb
    restored = {op.obj for op in kernel.ops_of(Action.SET)[-3:]}
    assert restored == {route, neighbour, fdb}
    assert rec.stats().drift_repairs == 3


def test_entries_set_behind_our_back_are_put_right_and_our_own_echoes_cost_nothing() -> None:
    kernel, rec, want = _converged()
    neighbour = sorted(want.neighbours, key=str)[0]
    fdb = sorted(want.fdb, key=str)[0]
    # Our own writes echo back as the entries we wrote: nothing to do, no re-read.
    reads, ops = kernel.reads, len(kernel.ops_of())
    rec.kick("neighbour_set", gone=[("neighbour_set", neighbour.dev, neighbour),
                                    ("fdb_set", fdb.dev, fdb)])  # fmt: skip
    assert rec.run_once() is Outcome.IDLE
    assert (kernel.reads, len(kernel.ops_of())) == (reads, ops)

    # Someone replaces the MAC of a neighbour and the destination of an FDB entry, and adds
    # a permanent neighbour of their own on our device.
    theirs = Neighbour(neighbour.dev, neighbour.ip, "02:00:00:00:00:99")
    moved = FdbEntry(fdb.dev, fdb.mac, IPAddress("192.0.2.99"))
    stray = Neighbour(neighbour.dev, IPAddress("10.244.250.250"), "02:00:00:00:00:98")
    for obj in (theirs, moved, stray):
        kernel.external_set(obj)
    rec.kick("neighbour_set (+2 more)", gone=[("neighbour_set", theirs.dev, theirs),
             ("fdb_set", moved.dev, moved), ("neighbour_set", stray.dev, stray)])  # fmt: skip
    assert rec.run_once() is Outcome.SYNCED
    assert kernel.reads == reads  # repaired from the entries alone
    after = kernel.read()
    assert neighbour in after.neighbours and fdb in after.fdb
    assert theirs not in after.neighbours and moved not in after.fdb
    assert stray not in after.neighbours  # a permanent entry on our device we do not want
    assert rec.stats().drift_repairs == 3


def test_a_kick_without_keys_still_reads_the_kernel() -> None:
    kernel, rec, want = _converged()
    kernel.external_delete(sorted(want.routes, key=str)[0])
    reads = kernel.reads
    rec.kick("device_changed dev=vxlan.calico")
    assert rec.run_once() is Outcome.SYNCED
    assert kernel.reads == reads + 1
    assert kernel.read().routes == want.routes


def test_forget_drops_only_the_named_objects() -> None:
    want = desired(VIEW)
    actual = Dataplane(routes=set(want.routes), neighbours=set(want.neighbours), fdb=set(want.fdb))
    route = sorted(want.routes, key=str)[0]
    forget(actual, [("route", MAIN_TABLE, route.dst), ("route", 100, route.dst)])
    assert actual.routes == want.routes - {route}
    assert actual.neighbours == want.neighbours and actual.fdb == want.fdb


def test_forget_drops_the_table_someone_else_changed_and_only_that() -> None:
    f4 = TunnelFilter(frozenset({IPAddress("192.0.2.1")}), 4789, False)
    f6 = TunnelFilter(frozenset({IPAddress("2001:db8::1")}), 4789, False, version=6)
    pools = frozenset({IPNetwork("10.244.0.0/16")})
    nat = NatOutgoing(pools, pools)
    actual = Dataplane(nat=nat, tunnel_filter=f4, tunnel_filter6=f6)
    assert forget(actual, [("tunnel_filter6", 31337, "")]) == 1
    assert (actual.nat, actual.tunnel_filter, actual.tunnel_filter6) == (nat, f4, None)
    assert forget(actual, [("tunnel_filter6", 31338, "")]) == 0  # already gone
    assert forget(actual, [("tunnel_filter", 1, ""), ("nat", 1, "")]) == 2
    assert (actual.nat, actual.tunnel_filter) == (None, None)


def test_forget_drops_the_ipv6_nat_table_apart_from_the_ipv4_one() -> None:
    pools = frozenset({IPNetwork("10.244.0.0/16")})
    pools6 = frozenset({IPNetwork("fd00:10:244::/48")})
    nat, nat6 = NatOutgoing(pools, pools), NatOutgoing(pools6, pools6, version=6)
    actual = Dataplane(nat=nat, nat6=nat6)
    assert forget(actual, [("nat6", 31337, "")]) == 1
    assert (actual.nat, actual.nat6) == (nat, None)
    assert forget(actual, [("nat6", 31338, "")]) == 0  # already gone
    actual.nat6 = nat6
    assert forget(actual, [("nat", 1, "")]) == 1
    assert (actual.nat, actual.nat6) == (None, nat6)
