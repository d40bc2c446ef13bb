"""The single writer: keeps the kernel converged with compute(view).

Everyone else only marks work: the datastore watch calls update_view(), the netlink
monitor calls kick("route deleted", drift=True). Both take a lock, set flags and notify;
neither touches the kernel. One thread runs run() (or a test calls run_once()), which is
level-triggered: it re-reads the kernel when a full resync is due, after a failure or after
a drift kick, computes the whole desired state, plans the difference and applies it.

Rules from Felix's doctrine: no kernel change before the first cluster view arrives (an
agent that has not read the datastore yet must not wipe the routes of a running node); a
failed pass keeps the work dirty and retries with bounded exponential backoff; a restart
reads the kernel first and changes only what differs.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from overlay.model import (
    Action,
    Dataplane,
    FdbEntry,
    GoneKey,
    IpipDevice,
    Neighbour,
    Op,
    VxlanDevice,
)
from overlay.plan import assign_nexthop_ids, plan, settled
from overlay.view import ClusterView

T = TypeVar("T")

log = logging.getLogger(__name__)


class ApplyResultLike(Protocol):
    @property
    def done(self) -> Any: ...  # the ops done, or their number

    @property
    def failed(self) -> Sequence[tuple[Op, int, str]]: ...


class KernelPort(Protocol):
    def read(self) -> Dataplane: ...

    def apply(self, ops: list[Op]) -> ApplyResultLike: ...

    def own_nft_pids(self) -> frozenset[int]:
        """Pids of the nft processes it ran: their transactions are our own changes."""
        ...


class Outcome(enum.Enum):
    NO_VIEW = "no-view"  # nothing applied: the datastore has not been read yet
    IDLE = "idle"  # nothing dirty and no resync due
    BACKOFF = "backoff"  # dirty, but waiting after a failure
    SYNCED = "synced"
    FAILED = "failed"


@dataclass(frozen=True)
class ReconcilerStats:
    passes: int = 0
    reads: int = 0
    last_sync_time: float | None = None  # clock() at the end of the last successful pass
    last_duration: float | None = None  # seconds the last pass took
    last_ops: int = 0  # ops applied by the last pass
    ops_applied: int = 0  # total, successful
    failures: int = 0  # total failed ops
    errors: int = 0  # passes that raised (read/compute/apply exceptions)
    drift_repairs: int = 0  # ops that repaired changes made behind our back
    consecutive_failures: int = 0
    last_error: str | None = None
    last_failed: tuple[str, ...] = ()  # "op: errno msg" of the last failed pass (capped)
    dirty: bool = False
    have_view: bool = False
    next_attempt: float | None = None  # clock() before which a failed pass is not retried


MAX_FAILURES_KEPT = 20


class Reconciler:
    def __init__(
        self,
        kernel: KernelPort,
        compute_fn: Callable[[ClusterView], Dataplane],
        *,
        clock: Callable[[], float] = time.monotonic,
        resync_interval: float | None = 30.0,  # None: no periodic full resync
        coalesce: float = 0.01,  # the watch and the monitor already batch their bursts
        backoff_initial: float = 0.2,
        backoff_max: float = 30.0,
        nexthops_supported: bool | None = None,
        on_pass: Callable[[Outcome], None] | None = None,
    ) -> None:
        if resync_interval is not None and not resync_interval > 0:
            raise ValueError(f"resync_interval: {resync_interval} must be > 0")
        if not 0 < backoff_initial <= backoff_max:
            raise ValueError(
                f"backoff_initial/backoff_max: {backoff_initial}/{backoff_max} need "
                "0 < initial <= max"
            )
        self._kernel = kernel
        self._compute = compute_fn
        self._clock = clock
        self._resync_interval = float("inf") if resync_interval is None else resync_interval
        self._coalesce = coalesce
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        if nexthops_supported is None:
            nexthops_supported = bool(getattr(kernel, "nexthops_supported", True))
        self._nexthops_supported = nexthops_supported
        self._on_pass = on_pass  # told the outcome of every pass (by the writer thread)
        self.heartbeat: float | None = None  # clock() when run()'s loop last came round

        self._cond = threading.Condition()
        self._writer = threading.Lock()  # one pass at a time, whoever calls
        # Guarded by _cond:
        self._view: ClusterView | None = None
        self._dirty = False
        self._need_read = True  # nothing known about the kernel yet
        self._drift_kicked = False
        self._recompute = False  # compute()'s other inputs changed: the view alone did not
        self._gone: list[GoneKey] = []  # deleted behind our back, known exactly: no re-read
        self._next_attempt = 0.0
        self._stats = ReconcilerStats()
        # Only touched by the writer:
        self._actual: Dataplane | None = None
        self._last_read = float("-inf")
        self._applied_view: ClusterView | None = None
        # compute() is pure: a pass for drift (same view) reuses the last desired state.
        self._computed: tuple[ClusterView, Dataplane] | None = None

    # --- producers: cheap, thread-safe, no I/O --------------------------------------------

    def set_resync_interval(self, seconds: float | None) -> None:
        """A new interval between full resyncs (None: none), counted from the last one."""
        if seconds is not None and not seconds > 0:
            raise ValueError(f"resync_interval: {seconds} must be > 0")
        with self._cond:
            self._resync_interval = float("inf") if seconds is None else seconds
            self._cond.notify_all()

    def update_view(self, view: ClusterView) -> None:
        with self._cond:
            self._view = view
            self._dirty = True
            self._cond.notify_all()

    def kick(
        self,
        reason: str,
        *,
        drift: bool = True,
        gone: Sequence[GoneKey] | None = None,
        recompute: bool = False,
    ) -> None:
        """Ask for a pass. `drift`: the kernel changed behind us, so re-read it first, unless
        `gone` names exactly what was deleted: then forget those objects and skip the read.
        `recompute`: what compute() depends on besides the view changed (this node's
        underlay), so the desired state of the current view is computed again."""
        log.debug("kick reason=%r drift=%s gone=%d", reason, drift, len(gone or ()))
        with self._cond:
            self._dirty = True
            self._recompute = self._recompute or recompute
            if drift:
                self._drift_kicked = True
                if gone is None:
                    self._need_read = True
                else:
                    self._gone.extend(gone)
            self._cond.notify_all()

    def stats(self) -> ReconcilerStats:
        with self._cond:
            return replace(
                self._stats,
                dirty=self._dirty,
                have_view=self._view is not None,
                next_attempt=self._next_attempt if self._stats.consecutive_failures else None,
            )

    # --- the writer -----------------------------------------------------------------------

    def run_once(self) -> Outcome:
        with self._writer:
            outcome = self._pass()
            if self._on_pass is not None:
                try:
                    self._on_pass(outcome)
                except Exception:  # the writer must survive its listeners
                    log.exception("on_pass callback failed")
            return outcome

    def run(self, stop: threading.Event, *, max_wait: float = 0.5) -> None:
        """Loop until `stop` is set. Sleeps on the condition until work is due; `max_wait`
        bounds each sleep so that `stop` is noticed without a kick."""
        while not stop.is_set():
            self.heartbeat = self._clock()  # read by the liveness probe
            with self._cond:
                delay = self._time_to_work()
                if delay > 0:
                    self._cond.wait(timeout=min(delay, max_wait))
                    continue
            # Work is due: let a burst of events coalesce into one pass.
            if self._coalesce > 0 and stop.wait(self._coalesce):
                break
            self.run_once()

    def _time_to_work(self) -> float:
        """Seconds until a pass has something to do (0: now). Caller holds _cond."""
        if self._view is None:
            return float("inf")
        now = self._clock()
        if self._stats.consecutive_failures and now < self._next_attempt:
            return self._next_attempt - now
        if self._dirty or self._need_read:
            return 0.0
        return max(0.0, self._last_read + self._resync_interval - now)

    def _pass(self) -> Outcome:
        start = self._clock()
        with self._cond:
            view = self._view
            if view is None:
                return Outcome.NO_VIEW
            if self._stats.consecutive_failures and start < self._next_attempt:
                return Outcome.BACKOFF
            resync_due = start - self._last_read >= self._resync_interval
            if not (self._dirty or self._need_read or resync_due):
                return Outcome.IDLE
            read = self._need_read or resync_due or self._actual is None
            drift_check = self._drift_kicked or resync_due
            gone, self._gone = self._gone, []
            recompute, self._recompute = self._recompute, False
            self._dirty = self._need_read = self._drift_kicked = False

        echoes = bool(gone)
        gone = _foreign(gone, self._kernel)
        if recompute:
            self._computed = None  # also for the retries, should this pass fail
        ops: list[Op] = []
        try:
            if read:
                self._actual = self._kernel.read()
                self._last_read = self._clock()
            elif echoes and self._actual is not None:
                lost = forget(self._actual, gone)
                if not lost and view is self._applied_view and not recompute:
                    # Only our own changes echoed back by the monitor: nothing to do.
                    return Outcome.IDLE
            actual = self._actual
            assert actual is not None
            if self._computed is not None and self._computed[0] is view:
                desired = self._computed[1]
            else:
                desired = self._compute(view)
                self._computed = (view, desired)
            supported = self._nexthops_supported
            ids = assign_nexthop_ids(desired, actual, nexthops_supported=supported)
            ops = plan(desired, actual, nexthops_supported=supported, ids=ids)
            result = self._kernel.apply(ops) if ops else None
        except Exception as e:  # a pass must never kill the writer; retry with backoff
            log.exception("reconcile pass failed")
            return self._failed(start, read, error=f"{type(e).__name__}: {e}", failed=())

        failed = list(result.failed) if result is not None else []
        applied = _count(result.done) if result is not None else 0
        # Ops after a re-read with an unchanged view repaired something done behind our back.
        drift = applied if drift_check and (read or gone) and view is self._applied_view else 0
        if failed:
            return self._failed(
                start, read, error=None, failed=failed, applied=applied, drift=drift
            )

        self._actual = settled(
            desired, actual, nexthops_supported=self._nexthops_supported, ids=ids
        )
        self._applied_view = view
        # Only the kernel layer knows whether it created, changed or recreated a device (and
        # a recreate wipes what hung off it): after any device change, look once more.
        recreated = any(
            op.action is Action.SET and isinstance(op.obj, VxlanDevice | IpipDevice) for op in ops
        )
        end = self._clock()
        with self._cond:
            if recreated:
                self._need_read = True
                self._dirty = True
            s = self._stats
            self._stats = replace(
                s,
                passes=s.passes + 1,
                reads=s.reads + int(read),
                last_sync_time=end,
                last_duration=end - start,
                last_ops=applied,
                ops_applied=s.ops_applied + applied,
                drift_repairs=s.drift_repairs + drift,
                consecutive_failures=0,
                last_failed=(),
            )
            self._next_attempt = 0.0
        if ops or not s.passes:  # (the first pass always: when the node became synced)
            log.info("synced ops=%d read=%s duration=%.3fs", applied, read, end - start)
        return Outcome.SYNCED

    def _failed(
        self,
        start: float,
        read: bool,
        *,
        error: str | None,
        failed: Sequence[tuple[Op, int, str]],
        applied: int = 0,
        drift: int = 0,
    ) -> Outcome:
        end = self._clock()
        with self._cond:
            s = self._stats
            n = s.consecutive_failures + 1
            delay = min(self._backoff_initial * 2 ** (n - 1), self._backoff_max)
            self._next_attempt = end + delay
            # Whatever failed, the kernel is no longer what we think: read it next time.
            self._dirty = True
            self._need_read = True
            self._stats = replace(
                s,
                passes=s.passes + 1,
                reads=s.reads + int(read),
                last_duration=end - start,
                last_ops=applied,
                ops_applied=s.ops_applied + applied,
                failures=s.failures + len(failed),
                errors=s.errors + int(error is not None),
                drift_repairs=s.drift_repairs + drift,
                consecutive_failures=n,
                last_error=error if error is not None else s.last_error,
                last_failed=tuple(
                    f"{op.action.value} {op.obj}: errno {code} {msg}"
                    for op, code, msg in failed[:MAX_FAILURES_KEPT]
                ),
            )
        for op, code, msg in failed[:MAX_FAILURES_KEPT]:
            log.warning(
                "apply failed op=%s obj=%s errno=%d msg=%s", op.action.value, op.obj, code, msg
            )
        log.warning("reconcile pass failed; retry in %.2fs", delay)
        return Outcome.FAILED


# GoneKey kinds of our nftables tables, each named after the Dataplane field that holds it.
_TABLE_KINDS = ("nat", "nat6", "tunnel_filter", "tunnel_filter6")


def _foreign(gone: list[GoneKey], kernel: KernelPort) -> list[GoneKey]:
    """`gone` without the nftables transactions our own nft runs made ((a _TABLE_KINDS
    kind, pid, "") keys): those echo what we just wrote."""
    if not any(k[0] in _TABLE_KINDS for k in gone):
        return gone
    own = kernel.own_nft_pids()
    return [k for k in gone if k[0] not in _TABLE_KINDS or k[1] not in own]


def forget(actual: Dataplane, gone: Sequence[GoneKey]) -> int:
    """Drop from `actual` (in place) the objects the kernel reported deleted, and put in the
    entries it reported set; return how many changed it (0: the changes were ours, already
    accounted for)."""
    changed = _take_sets(actual, gone)
    routes = {(k[1], k[2]) for k in gone if k[0] == "route"}
    neighbours = {(k[1], k[2]) for k in gone if k[0] == "neighbour"}
    fdb = {(k[1], k[2]) for k in gone if k[0] == "fdb"}
    nhids = {k[1] for k in gone if k[0] == "nexthop"}
    lost_nh = [k for k, nhid in actual.nexthop_ids.items() if nhid in nhids] if nhids else []
    for key in lost_nh:
        del actual.nexthop_ids[key]
        actual.nexthops.discard(key)
    # The kernel drops the routes of a deleted nexthop: ours by its key (a settled state has
    # no route_nhids), or by id for routes that a re-read found on some other nexthop.
    lost_keys = set(lost_nh)
    lost_routes = [
        r
        for r in (actual.routes if routes or nhids else ())
        if (r.table, r.dst) in routes
        or r.nexthop in lost_keys
        or actual.route_nhids.get(r) in nhids
    ]
    actual.routes.difference_update(lost_routes)
    for r in lost_routes:
        actual.route_nhids.pop(r, None)
    lost_neigh = [n for n in actual.neighbours if (n.dev, n.ip) in neighbours] if neighbours else []
    actual.neighbours.difference_update(lost_neigh)
    lost_fdb = [f for f in actual.fdb if (f.dev, f.mac) in fdb] if fdb else []
    actual.fdb.difference_update(lost_fdb)
    # A table someone else changed counts as gone: writing it again replaces it whole.
    kinds = {k[0] for k in gone}
    lost_tables = 0
    for table in kinds.intersection(_TABLE_KINDS):
        if getattr(actual, table) is not None:
            setattr(actual, table, None)
            lost_tables += 1
    return changed + len(lost_nh) + len(lost_routes) + len(lost_neigh) + len(lost_fdb) + lost_tables


def _take_sets(actual: Dataplane, gone: Sequence[GoneKey]) -> int:
    """For each ("neighbour_set" | "fdb_set", dev, entry) the kernel reported: unless
    `actual` holds that very entry (our own write echoed back), it replaces the one `actual`
    holds under the same kernel key (neighbour: dev and ip; FDB: dev and MAC). plan() then
    puts ours back, or deletes the entry if we want none there."""
    neighbours = [k[2] for k in gone if k[0] == "neighbour_set" and isinstance(k[2], Neighbour)]
    fdb = [k[2] for k in gone if k[0] == "fdb_set" and isinstance(k[2], FdbEntry)]
    return _replace_by_key(actual.neighbours, neighbours, lambda n: (n.dev, n.ip)) + (
        _replace_by_key(actual.fdb, fdb, lambda f: (f.dev, f.mac))
    )


def _replace_by_key(held: set[T], entries: list[T], key: Callable[[T], object]) -> int:
    """Put each entry into `held` in place of the one with its key; how many were new."""
    new = [e for e in entries if e not in held]
    if new:
        index = {key(e): e for e in held}  # one pass, however many
        for entry in new:
            if (old := index.get(key(entry))) is not None:
                held.discard(old)
            held.add(entry)
            index[key(entry)] = entry
    return len(new)


def _count(done: Any) -> int:
    return len(done) if isinstance(done, Sized) else int(done)


__all__ = ["KernelPort", "Outcome", "Reconciler", "ReconcilerStats", "forget"]
