"""The datastore contract: every backend (memory, sqlite, etcd) must pass these unchanged.

Only the public protocol and the `store` fixture are used. Keys are relative ("/a/b"): the
etcd fixture roots each test under its own prefix. Revision numbers are compared, never
assumed to start at a given value or to grow by exactly one.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from ipam.datastore import (
    AlreadyExists,
    Conflict,
    Datastore,
    Event,
    EventType,
    NotFound,
    Watch,
)

WATCH_DEADLINE = 10.0  # upper bound for any event to arrive at a watch


def collect(watch: Watch, count: int, deadline: float = WATCH_DEADLINE) -> list[Event]:
    """Events from `watch` until `count` arrived or the deadline passed."""
    out: list[Event] = []
    end = time.monotonic() + deadline
    while len(out) < count and time.monotonic() < end:
        out.extend(watch.next(0.2))
    return out


def test_implements_protocol(store: Datastore) -> None:
    assert isinstance(store, Datastore)


def test_get_missing_is_none(store: Datastore) -> None:
    assert store.get("/missing") is None


def test_create_then_get(store: Datastore) -> None:
    value = '{"cidr": "10.0.0.0/26", "name": "ü-ñode"}'
    rev = store.create("/a/b", value)
    kv = store.get("/a/b")
    assert kv is not None
    assert kv.key == "/a/b"
    assert kv.value == value
    assert kv.mod_revision == rev
    assert store.revision() >= rev


def test_create_twice_raises_already_exists_and_keeps_value(store: Datastore) -> None:
    rev = store.create("/a", "first")
    with pytest.raises(AlreadyExists):
        store.create("/a", "second")
    kv = store.get("/a")
    assert kv is not None
    assert (kv.value, kv.mod_revision) == ("first", rev)


def test_already_exists_is_a_conflict(store: Datastore) -> None:
    # Callers that retry on any lost race catch Conflict only.
    store.create("/a", "x")
    with pytest.raises(Conflict):
        store.create("/a", "y")


def test_update_with_current_revision(store: Datastore) -> None:
    rev1 = store.create("/k", "v1")
    rev2 = store.update("/k", "v2", rev1)
    assert rev2 > rev1
    kv = store.get("/k")
    assert kv is not None
    assert (kv.value, kv.mod_revision) == ("v2", rev2)


def test_stale_update_conflicts_and_keeps_value(store: Datastore) -> None:
    rev1 = store.create("/k", "v1")
    rev2 = store.update("/k", "v2", rev1)
    with pytest.raises(Conflict):
        store.update("/k", "v3", rev1)
    kv = store.get("/k")
    assert kv is not None
    assert (kv.value, kv.mod_revision) == ("v2", rev2)


def test_update_missing_key_conflicts(store: Datastore) -> None:
    rev = store.create("/other", "x")
    with pytest.raises(Conflict):
        store.update("/missing", "v", rev)
    assert store.get("/missing") is None


def test_delete_with_current_revision(store: Datastore) -> None:
    rev = store.create("/k", "v")
    store.delete("/k", rev)
    assert store.get("/k") is None
    # The key can be created again afterwards, with a newer revision.
    assert store.create("/k", "again") > rev


def test_stale_delete_conflicts_and_key_survives(store: Datastore) -> None:
    rev1 = store.create("/k", "v1")
    rev2 = store.update("/k", "v2", rev1)
    with pytest.raises(Conflict):
        store.delete("/k", rev1)
    kv = store.get("/k")
    assert kv is not None
    assert (kv.value, kv.mod_revision) == ("v2", rev2)


def test_delete_missing_raises_not_found(store: Datastore) -> None:
    rev = store.create("/other", "x")
    with pytest.raises(NotFound):
        store.delete("/missing", rev)


def test_list_by_prefix_is_exact_and_sorted(store: Datastore) -> None:
    for key in ["/a/c", "/a/b/x", "/a", "/a/b", "/ab", "/a0", "/b/a/x", "/a/bc"]:
        store.create(key, f"value of {key}")
    listing = store.list("/a/")
    assert [kv.key for kv in listing.items] == ["/a/b", "/a/b/x", "/a/bc", "/a/c"]
    assert all(kv.value == f"value of {kv.key}" for kv in listing.items)
    assert [kv.key for kv in store.list("/a/b/").items] == ["/a/b/x"]
    assert store.list("/nothing/").items == []


def test_keys_are_exactly_the_listed_keys_in_list_order(store: Datastore) -> None:
    for key in ["/a/c", "/a/b/x", "/a", "/a/b", "/ab", "/a0", "/b/a/x", "/a/bc"]:
        store.create(key, f"value of {key}")
    assert store.keys("/a/").keys == ["/a/b", "/a/b/x", "/a/bc", "/a/c"]
    # "/a/b" starts the key "/a/bc" as text, but "/a/b/" does not.
    assert store.keys("/a/b/").keys == ["/a/b/x"]
    # Without the slash it is a plain string prefix, as in list().
    assert store.keys("/a/b").keys == ["/a/b", "/a/b/x", "/a/bc"]
    for prefix in ["", "/", "/a", "/a/", "/b/"]:
        assert store.keys(prefix).keys == [kv.key for kv in store.list(prefix).items]
    assert store.keys("/nothing/").keys == []


def test_keys_drop_deleted_and_keep_updated_keys(store: Datastore) -> None:
    revs = {key: store.create(key, "v") for key in ["/k/1", "/k/2", "/k/3"]}
    store.delete("/k/2", revs["/k/2"])
    store.update("/k/3", "changed", revs["/k/3"])
    assert store.keys("/k/").keys == ["/k/1", "/k/3"]
    for kv in store.list("/k/").items:
        store.delete(kv.key, kv.mod_revision)
    assert store.keys("/k/").keys == []


def test_keys_revision_is_the_store_revision_at_the_read(store: Datastore) -> None:
    store.create("/q/1", "1")
    last = store.create("/q/2", "2")
    keys = store.keys("/q/")
    assert last <= keys.revision == store.revision()
    assert store.keys("/nothing/").revision == keys.revision


def test_list_revision_covers_items(store: Datastore) -> None:
    revs = [store.create(f"/p/{i}", str(i)) for i in range(5)]
    store.update("/p/2", "changed", revs[2])
    listing = store.list("/p/")
    assert len(listing.items) == 5
    assert listing.revision >= max(kv.mod_revision for kv in listing.items)
    assert {kv.key: kv.mod_revision for kv in listing.items}["/p/2"] > revs[4]


def test_revisions_strictly_increase_across_writes(store: Datastore) -> None:
    seen = [store.revision()]
    rev = store.create("/r/a", "1")
    seen.append(rev)
    rev = store.update("/r/a", "2", rev)
    seen.append(rev)
    seen.append(store.create("/r/b", "1"))
    store.delete("/r/a", rev)
    seen.append(store.revision())
    assert all(a < b for a, b in itertools.pairwise(seen)), seen


def test_failed_writes_do_not_change_data(store: Datastore) -> None:
    rev = store.create("/k", "v")
    before = store.list("/")
    for attempt in (
        lambda: store.create("/k", "x"),
        lambda: store.update("/k", "x", rev - 1),
        lambda: store.delete("/k", rev + 1000),
    ):
        with pytest.raises(Conflict):
            attempt()
    assert store.list("/").items == before.items


def test_watch_sees_later_puts_and_deletes_in_order(store: Datastore) -> None:
    store.create("/w/old", "before")
    listing = store.list("/w/")
    watch = store.watch("/w/", listing.revision + 1)
    try:
        r1 = store.create("/w/a", "1")
        store.create("/elsewhere/a", "not mine")
        r2 = store.update("/w/a", "2", r1)
        r3 = store.create("/w/b", "3")
        store.delete("/w/a", r2)
        events = collect(watch, 4)
    finally:
        watch.close()
    assert [(e.type, e.key, e.value) for e in events] == [
        (EventType.PUT, "/w/a", "1"),
        (EventType.PUT, "/w/a", "2"),
        (EventType.PUT, "/w/b", "3"),
        (EventType.DELETE, "/w/a", None),
    ]
    assert [e.mod_revision for e in events[:3]] == [r1, r2, r3]
    assert events[3].mod_revision > r3


def test_watch_only_reports_its_prefix(store: Datastore) -> None:
    start = store.revision() + 1
    watch = store.watch("/mine/", start)
    try:
        store.create("/mine", "parent key, not under the prefix")
        store.create("/mine-too/x", "sibling")
        store.create("/other/x", "other")
        store.create("/mine/x", "yes")
        events = collect(watch, 1)
        # Anything else that was going to arrive would have by now: the last write is ours.
        events += watch.next(0.3)
    finally:
        watch.close()
    assert [(e.key, e.value) for e in events] == [("/mine/x", "yes")]


def test_watch_resumed_from_older_revision_replays(store: Datastore) -> None:
    r1 = store.create("/h/a", "1")
    r2 = store.update("/h/a", "2", r1)
    r3 = store.create("/h/b", "x")
    store.delete("/h/b", r3)
    watch = store.watch("/h/", r2)
    try:
        events = collect(watch, 3)
    finally:
        watch.close()
    assert [(e.type, e.key, e.value) for e in events] == [
        (EventType.PUT, "/h/a", "2"),
        (EventType.PUT, "/h/b", "x"),
        (EventType.DELETE, "/h/b", None),
    ]
    assert events[0].mod_revision == r2
    assert events[1].mod_revision == r3
    assert [e.mod_revision for e in events] == sorted({e.mod_revision for e in events})


def test_watch_next_times_out_empty(store: Datastore) -> None:
    watch = store.watch("/quiet/", store.revision() + 1)
    try:
        t0 = time.monotonic()
        events = watch.next(0.5)
        elapsed = time.monotonic() - t0
    finally:
        watch.close()
    assert events == []
    assert 0.25 <= elapsed < 3.0, elapsed


def test_watch_wakes_for_write_from_another_thread(store: Datastore) -> None:
    watch = store.watch("/t/", store.revision() + 1)
    writer = threading.Timer(0.2, lambda: store.create("/t/x", "v"))
    writer.start()
    try:
        t0 = time.monotonic()
        events = collect(watch, 1)
        elapsed = time.monotonic() - t0
    finally:
        writer.join()
        watch.close()
    assert [(e.key, e.value) for e in events] == [("/t/x", "v")]
    assert elapsed < 3.0


def test_watch_iteration_ends_on_close(store: Datastore) -> None:
    watch = store.watch("/it/", store.revision() + 1)
    seen: list[Event] = []

    def consume() -> None:
        for event in watch:
            seen.append(event)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    store.create("/it/a", "1")
    end = time.monotonic() + WATCH_DEADLINE
    while not seen and time.monotonic() < end:
        time.sleep(0.01)
    watch.close()
    consumer.join(5.0)
    assert not consumer.is_alive(), "iterating a closed watch did not stop"
    assert [(e.key, e.value) for e in seen] == [("/it/a", "1")]


def test_concurrent_cas_increments_lose_no_update(store: Datastore) -> None:
    threads, per_thread = 4, 50
    store.create("/counter", "0")
    errors: list[BaseException] = []

    def increment() -> None:
        try:
            for _ in range(per_thread):
                for _attempt in range(10_000):
                    kv = store.get("/counter")
                    assert kv is not None
                    try:
                        store.update("/counter", str(int(kv.value) + 1), kv.mod_revision)
                        break
                    except Conflict:
                        continue
                else:
                    raise AssertionError("increment never won its race")
        except BaseException as e:
            errors.append(e)

    workers = [threading.Thread(target=increment) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert not errors, errors
    kv = store.get("/counter")
    assert kv is not None
    assert int(kv.value) == threads * per_thread
