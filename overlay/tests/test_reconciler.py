from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from functools import partial

import pytest
from netaddr import IPAddress, IPNetwork

from ipam.model import EncapMode
from overlay.compute import DataplaneConfig, compute
from overlay.model import (
    VXLAN_DEVICE,
    Action,
    Dataplane,
    NatOutgoing,
    Route,
    TunnelFilter,
    TunnelHosts,
    VxlanDevice,
)
from overlay.plan import plan
from overlay.reconciler import Outcome, Reconciler
from overlay.tests.fake_kernel import FakeKernel
from overlay.tests.scenarios import me, node, pool, standard_view
from overlay.view import ClusterView

ALWAYS, CROSS = EncapMode.ALWAYS, EncapMode.CROSS_SUBNET
COMPUTE = partial(compute, me=me(), cfg=DataplaneConfig())


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(kernel: FakeKernel | None = None, **kw: float) -> tuple[Reconciler, FakeKernel, FakeClock]:
    kernel = kernel or FakeKernel()
    clock = FakeClock()
    rec = Reconciler(kernel, COMPUTE, clock=clock, **kw)  # type: ignore[arg-type]
    return rec, kernel, clock


def converged(kernel: FakeKernel, view: ClusterView) -> bool:
    return plan(COMPUTE(view), kernel.read()) == []


def first_sync(rec: Reconciler, view: ClusterView) -> None:
    """The first view: one pass programs everything, a second confirms the new devices."""
    rec.update_view(view)
    assert rec.run_once() is Outcome.SYNCED
    assert rec.stats().dirty
    assert rec.run_once() is Outcome.SYNCED
    assert rec.stats().last_ops == 0


def test_nothing_is_read_or_applied_before_the_first_view() -> None:
    kernel = FakeKernel()
    stale = Route(IPNetwork("10.244.9.0/26"), blackhole=True)
    kernel.apply(plan(Dataplane(routes={stale}), Dataplane()))
    rec, kernel, _ = make(kernel)
    rec.kick("route deleted")
    assert rec.run_once() is Outcome.NO_VIEW
    assert (kernel.reads, kernel.apply_calls) == (0, 1)
    assert stale in kernel.read().routes  # a not-yet-synced agent must not wipe routes
    assert not rec.stats().have_view


def test_first_view_converges_then_idle_without_io() -> None:
    rec, kernel, _ = make()
    view = standard_view(pool(CROSS))
    first_sync(rec, view)
    assert converged(kernel, view)
    reads, calls = kernel.reads, kernel.apply_calls
    assert rec.run_once() is Outcome.IDLE
    assert (kernel.reads, kernel.apply_calls) == (reads, calls)
    s = rec.stats()
    assert s.ops_applied > 0 and s.last_sync_time is not None and not s.dirty


def test_view_update_applies_only_the_difference_without_rereading() -> None:
    rec, kernel, _ = make()
    first_sync(rec, standard_view(pool(ALWAYS)))
    reads, logged = kernel.reads, len(kernel.log)
    view2 = standard_view(pool(ALWAYS), nodes=[node(n) for n in "abc"])  # d left
    rec.update_view(view2)
    assert rec.run_once() is Outcome.SYNCED
    assert kernel.reads == reads
    new_ops = [op for op, _ in kernel.log[logged:]]
    gone = IPAddress("10.0.1.8")  # d's underlay address: it leaves the tunnel filter
    filters = [op.obj for op in new_ops if isinstance(op.obj, TunnelHosts)]
    assert filters == [TunnelHosts(add=frozenset(), remove=frozenset({gone}))]
    others = [op for op in new_ops if not isinstance(op.obj, TunnelHosts)]
    assert others and all(op.action is Action.DELETE for op in others)
    assert converged(kernel, view2)


def test_drift_kick_rereads_and_repairs() -> None:
    rec, kernel, _ = make()
    view = standard_view(pool(ALWAYS))
    first_sync(rec, view)
    victim = next(r for r in kernel.read().routes if r.nexthop)
    kernel.external_delete(victim)
    assert rec.run_once() is Outcome.IDLE  # nobody told us yet
    rec.kick("route deleted")
    assert rec.run_once() is Outcome.SYNCED
    assert victim in kernel.read().routes
    assert rec.stats().drift_repairs == 1


def test_periodic_resync_repairs_without_a_kick() -> None:
    rec, kernel, clock = make(resync_interval=30.0)
    view = standard_view(pool(ALWAYS))
    first_sync(rec, view)
    kernel.external_delete(VXLAN_DEVICE)  # takes neighbours, FDB, nexthops, routes with it
    clock.now += 29.0
    assert rec.run_once() is Outcome.IDLE
    clock.now += 1.0
    assert rec.run_once() is Outcome.SYNCED
    assert converged(kernel, view)
    assert rec.stats().drift_repairs > 0


def test_the_resync_interval_changes_at_run_time_and_none_turns_it_off() -> None:
    rec, kernel, clock = make(resync_interval=30.0)
    view = standard_view(pool(ALWAYS))
    first_sync(rec, view)
    reads = kernel.reads
    rec.set_resync_interval(None)  # routeRefreshInterval: 0
    clock.now += 10_000.0
    assert rec.run_once() is Outcome.IDLE and kernel.reads == reads
    rec.set_resync_interval(5.0)  # counted from the last full read: due at once
    assert rec.run_once() is Outcome.SYNCED and kernel.reads == reads + 1
    clock.now += 4.0
    assert rec.run_once() is Outcome.IDLE
    clock.now += 1.0
    assert rec.run_once() is Outcome.SYNCED and kernel.reads == reads + 2
    with pytest.raises(ValueError, match="resync_interval: 0 must be > 0"):
        rec.set_resync_interval(0)


def test_failure_keeps_dirty_and_backs_off_exponentially_with_a_bound() -> None:
    rec, kernel, clock = make(backoff_initial=0.5, backoff_max=2.0)
    view = standard_view(pool(ALWAYS))
    rec.update_view(view)
    delays = []
    for _ in range(4):
        kernel.fail_next("route", errno.ENOBUFS)
        assert rec.run_once() is Outcome.FAILED
        s = rec.stats()
        assert s.dirty and s.next_attempt is not None
        delays.append(s.next_attempt - clock.now)
        calls = kernel.apply_calls
        assert rec.run_once() is Outcome.BACKOFF  # not before the delay
        assert kernel.apply_calls == calls
        clock.now = s.next_attempt
    assert delays == [0.5, 1.0, 2.0, 2.0]
    s = rec.stats()
    assert s.failures == 4 and s.consecutive_failures == 4
    assert "errno 105" in s.last_failed[0]
    reads = kernel.reads
    assert rec.run_once() is Outcome.SYNCED
    assert kernel.reads == reads + 1  # a failed pass means the kernel state is unknown
    assert converged(kernel, view)
    s = rec.stats()
    assert s.consecutive_failures == 0 and s.next_attempt is None and not s.dirty


def test_read_error_is_counted_and_retried() -> None:
    rec, kernel, clock = make()
    rec.update_view(standard_view(pool(ALWAYS)))
    kernel.fail_next("read")
    assert rec.run_once() is Outcome.FAILED
    s = rec.stats()
    assert s.errors == 1 and "injected failure" in (s.last_error or "")
    clock.now += 1.0
    assert rec.run_once() is Outcome.SYNCED


def test_compute_error_is_counted_and_does_not_touch_the_kernel() -> None:
    def broken(view: ClusterView) -> Dataplane:
        raise ValueError("bad pool p9")

    kernel = FakeKernel()
    rec = Reconciler(kernel, broken, clock=FakeClock())
    rec.update_view(standard_view(pool(ALWAYS)))
    assert rec.run_once() is Outcome.FAILED
    assert kernel.apply_calls == 0
    assert rec.stats().last_error == "ValueError: bad pool p9"


def test_a_recompute_kick_follows_a_new_underlay_with_the_same_view() -> None:
    # The agent's underlay moved (new address and interface): the view is the same object,
    # but compute's other input changed, and a kick with recompute must not reuse the last
    # desired state, not even on the retry after a failed pass.
    local = {"me": me()}
    kernel = FakeKernel(links=("lo", "eth0", "eth1"))
    rec = Reconciler(
        kernel, lambda v: compute(v, local["me"], DataplaneConfig()), clock=FakeClock()
    )
    view = standard_view(pool(CROSS))
    first_sync(rec, view)
    moved = me(underlay_iface="eth1", underlay=IPNetwork("10.0.1.99/24"))
    local["me"] = moved
    rec.kick("nothing new", drift=False)  # a plain kick reuses what it computed
    assert rec.run_once() is Outcome.SYNCED and rec.stats().last_ops == 0
    rec.kick("underlay changed", drift=False, recompute=True)
    kernel.fail_next("read")
    rec.kick("route deleted")  # a re-read that fails: the retry must still recompute
    assert rec.run_once() is Outcome.FAILED
    rec._next_attempt = 0.0  # skip the backoff wait
    assert rec.run_once() is Outcome.SYNCED
    while rec.stats().dirty:
        assert rec.run_once() is Outcome.SYNCED
    want = compute(view, moved, DataplaneConfig())
    assert plan(want, kernel.read()) == []
    dev = kernel.devices[VXLAN_DEVICE]
    assert isinstance(dev, VxlanDevice)
    assert (dev.parent, str(dev.local)) == ("eth1", "10.0.1.99")


def test_device_change_is_followed_by_a_reread_pass() -> None:
    rec, kernel, _ = make()
    view = standard_view(pool(ALWAYS))
    first_sync(rec, view)
    # Someone changed our device's VNI: the next read sees it, the fix recreates it.
    dev = kernel.devices[VXLAN_DEVICE]
    assert isinstance(dev, VxlanDevice)
    kernel.devices[VXLAN_DEVICE] = VxlanDevice(**{**dev.__dict__, "vni": 1})
    rec.kick("link changed")
    assert rec.run_once() is Outcome.SYNCED
    assert rec.stats().dirty  # looks again: a recreated device may have lost its dependents
    assert rec.run_once() is Outcome.SYNCED
    assert converged(kernel, view)
    assert rec.run_once() is Outcome.IDLE


def test_restart_on_a_converged_kernel_applies_nothing() -> None:
    kernel = FakeKernel()
    view = standard_view(pool(CROSS))
    first, _, _ = make(kernel)
    first_sync(first, view)
    calls = kernel.apply_calls
    second, _, _ = make(kernel)  # a new agent process: no memory
    second.update_view(view)
    assert second.run_once() is Outcome.SYNCED
    assert kernel.apply_calls == calls and second.stats().last_ops == 0


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def test_run_loop_reacts_to_updates_and_stops() -> None:
    kernel = FakeKernel()
    rec = Reconciler(kernel, COMPUTE, resync_interval=3600.0, coalesce=0.01)
    stop = threading.Event()
    thread = threading.Thread(target=rec.run, args=(stop,), kwargs={"max_wait": 0.05})
    thread.start()
    try:
        view1 = standard_view(pool(ALWAYS))
        rec.update_view(view1)
        assert wait_for(lambda: rec.stats().passes >= 1 and converged(kernel, view1))
        passes = rec.stats().passes
        view2 = standard_view(pool(CROSS))
        rec.update_view(view2)
        assert wait_for(lambda: converged(kernel, view2))
        # Idle: no busy loop, no passes without work.
        time.sleep(0.2)
        assert rec.stats().passes <= passes + 2
    finally:
        stop.set()
        thread.join(timeout=5.0)
    assert not thread.is_alive()


@pytest.mark.parametrize(
    "kwargs", [{"resync_interval": 0}, {"backoff_initial": 5, "backoff_max": 1}]
)
def test_bad_settings_name_the_field(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Reconciler(FakeKernel(), COMPUTE, **kwargs)  # type: ignore[arg-type]


def test_every_pass_is_reported_and_a_failing_listener_does_not_stop_the_writer() -> None:
    seen: list[Outcome] = []

    def listener(outcome: Outcome) -> None:
        seen.append(outcome)
        raise RuntimeError("listener bug")

    kernel = FakeKernel()
    rec = Reconciler(kernel, COMPUTE, clock=FakeClock(), on_pass=listener)  # type: ignore[arg-type]
    assert rec.run_once() is Outcome.NO_VIEW
    first_sync(rec, standard_view(pool(CROSS)))
    assert seen == [Outcome.NO_VIEW, Outcome.SYNCED, Outcome.SYNCED]
    assert converged(kernel, standard_view(pool(CROSS)))


_POOLS6 = frozenset({IPNetwork("fd00:10:244::/48")})
_FILTER6 = TunnelFilter(frozenset({IPAddress("2001:db8::5")}), 4789, False, version=6)


@pytest.mark.parametrize(
    ("table", "obj"),
    [
        (
            "tunnel_filter6",
            TunnelFilter(frozenset({IPAddress("2001:db8::5")}), 4789, False, version=6),
        ),
        ("nat6", NatOutgoing(_POOLS6, _POOLS6, version=6)),
    ],
)
def test_an_ipv6_table_is_repaired_apart_when_someone_else_changes_it(
    table: str, obj: TunnelFilter | NatOutgoing
) -> None:
    def with_table(view: ClusterView) -> Dataplane:
        dp = COMPUTE(view)  # no IPv6 underlay here: compute would give no IPv6 table
        setattr(dp, table, obj)
        return dp

    kernel = FakeKernel()
    rec = Reconciler(kernel, with_table, clock=FakeClock())
    first_sync(rec, standard_view(pool(ALWAYS, nat=True)))
    assert getattr(kernel, table) == obj and kernel.nat is not None
    kernel.nft_pids = frozenset({4242})
    calls = kernel.apply_calls
    rec.kick("nft_table_changed", gone=[(table, 4242, "")])  # what we just wrote
    assert rec.run_once() is Outcome.IDLE
    assert kernel.apply_calls == calls
    setattr(kernel, table, None)  # someone deleted it
    logged = len(kernel.log)
    rec.kick("nft_table_changed", gone=[(table, 31337, "")])
    assert rec.run_once() is Outcome.SYNCED
    assert getattr(kernel, table) == obj
    assert [op.obj for op, _ok in kernel.log[logged:]] == [obj]  # that table alone
    assert rec.stats().drift_repairs == 1


def test_our_own_nft_transactions_are_echoes_and_anyone_elses_are_repaired() -> None:
    rec, kernel, _ = make()
    view = standard_view(pool(ALWAYS))
    first_sync(rec, view)
    assert kernel.tunnel_filter is not None
    kernel.nft_pids = frozenset({4242})
    calls = kernel.apply_calls
    rec.kick("nft_table_changed", gone=[("tunnel_filter", 4242, "")])  # what we just wrote
    assert rec.run_once() is Outcome.IDLE
    assert kernel.apply_calls == calls
    # Someone else flushed our table: the monitor reports it by that process's pid.
    kernel.tunnel_filter = None
    rec.kick("nft_table_changed", gone=[("tunnel_filter", 31337, "")])
    assert rec.run_once() is Outcome.SYNCED
    assert kernel.tunnel_filter == COMPUTE(view).tunnel_filter
    assert rec.stats().drift_repairs == 1
