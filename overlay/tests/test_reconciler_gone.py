"""Drift reported with exact keys (the monitor's `on_gone`) is repaired without a re-read."""

from __future__ import annotations

from ipam.model import EncapMode
from overlay.model import MAIN_TABLE, Action, Dataplane
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
