"""SQLite-specific behaviour: real OS processes sharing one file, persistence, URLs, errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ipam.datastore import Compacted, Event, EventType, Unavailable, open_datastore
from ipam.datastore.sqlite import SqliteDatastore

REPO_ROOT = Path(__file__).resolve().parents[3]
PROC_TIMEOUT = 120.0

# Each worker announces itself, waits (bounded) until all workers are up so they really
# contend, then CAS-increments the counter with retries.
INCREMENT_WORKER = textwrap.dedent(
    """
    import sys, time
    from ipam.datastore import Conflict
    from ipam.datastore.sqlite import SqliteDatastore

    path, index, workers, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    store = SqliteDatastore(path)
    store.create(f"/ready/{index}", "")
    end = time.monotonic() + 60
    while len(store.list("/ready/").items) < workers:
        if time.monotonic() > end:
            sys.exit("workers never all started")
        time.sleep(0.005)
    for _ in range(count):
        for _attempt in range(100_000):
            kv = store.get("/counter")
            try:
                store.update("/counter", str(int(kv.value) + 1), kv.mod_revision)
                break
            except Conflict:
                pass
        else:
            sys.exit("increment never won its race")
    store.close()
    """
)

WRITER_WORKER = textwrap.dedent(
    """
    import sys
    from ipam.datastore.sqlite import SqliteDatastore

    store = SqliteDatastore(sys.argv[1])
    r1 = store.create("/x/a", "1")
    store.create("/y/a", "other prefix")
    r2 = store.update("/x/a", "2", r1)
    store.create("/x/b", "3")
    store.delete("/x/a", r2)
    store.close()
    """
)


def run_workers(script: str, args: list[list[str]]) -> None:
    """Start one process per argument list, all at once; fail unless every one exits 0."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, *a],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for a in args
    ]
    failures = []
    try:
        for p in procs:
            _out, err = p.communicate(timeout=PROC_TIMEOUT)
            if p.returncode != 0:
                failures.append(f"pid {p.pid} exit {p.returncode}: {err.strip()}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not failures, failures


def test_processes_cas_increment_lose_no_update(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    workers, per_worker = 4, 100
    store = SqliteDatastore(path)
    store.create("/counter", "0")
    run_workers(
        INCREMENT_WORKER,
        [[str(path), str(i), str(workers), str(per_worker)] for i in range(workers)],
    )
    kv = store.get("/counter")
    assert kv is not None
    assert int(kv.value) == workers * per_worker
    store.close()


def test_watch_sees_writes_from_another_process(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    store = SqliteDatastore(path)
    watch = store.watch("/x/", store.revision() + 1)
    try:
        run_workers(WRITER_WORKER, [[str(path)]])
        events: list[Event] = []
        end = time.monotonic() + 10
        while len(events) < 4 and time.monotonic() < end:
            events.extend(watch.next(0.2))
    finally:
        watch.close()
        store.close()
    assert [(e.type, e.key, e.value) for e in events] == [
        (EventType.PUT, "/x/a", "1"),
        (EventType.PUT, "/x/a", "2"),
        (EventType.PUT, "/x/b", "3"),
        (EventType.DELETE, "/x/a", None),
    ]
    revs = [e.mod_revision for e in events]
    assert revs == sorted(set(revs))


def test_watch_waiting_wakes_for_another_process(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    store = SqliteDatastore(path)
    watch = store.watch("/x/", store.revision() + 1)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    writer = subprocess.Popen([sys.executable, "-c", WRITER_WORKER, str(path)], env=env)
    try:
        # One long next() call: it must return as soon as the other process commits.
        t0 = time.monotonic()
        events = watch.next(30.0)
        elapsed = time.monotonic() - t0
    finally:
        writer.wait(PROC_TIMEOUT)
        watch.close()
        store.close()
    assert writer.returncode == 0
    assert events and events[0].key == "/x/a"
    assert elapsed < 15.0


def test_data_persists_after_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "persist.db"
    store = SqliteDatastore(path)
    r1 = store.create("/a", "1")
    r2 = store.update("/a", "2", r1)
    store.create("/b", "gone")
    store.delete("/b", store.get("/b").mod_revision)  # type: ignore[union-attr]
    last = store.revision()
    store.close()

    store = SqliteDatastore(path)
    try:
        kv = store.get("/a")
        assert kv is not None
        assert (kv.value, kv.mod_revision) == ("2", r2)
        assert store.get("/b") is None
        assert store.revision() == last
        assert store.create("/c", "new") > last
        # The changelog survives too: a watch resumes across the restart.
        watch = store.watch("/", r2)
        try:
            events = watch.next(5.0)
        finally:
            watch.close()
        assert [(e.type, e.key) for e in events] == [
            (EventType.PUT, "/a"),
            (EventType.PUT, "/b"),
            (EventType.DELETE, "/b"),
            (EventType.PUT, "/c"),
        ]
    finally:
        store.close()


def test_watch_of_trimmed_revision_raises_compacted(tmp_path: Path) -> None:
    store = SqliteDatastore(tmp_path / "small.db", history=10)
    try:
        rev = store.create("/k", "0")
        for i in range(50):
            rev = store.update("/k", str(i), rev)
        watch = store.watch("/", 1)
        with pytest.raises(Compacted):
            watch.next(1.0)
        watch.close()
        # Recent history is still there.
        watch = store.watch("/", rev - 5)
        try:
            assert [e.mod_revision for e in watch.next(1.0)] == list(range(rev - 5, rev + 1))
        finally:
            watch.close()
    finally:
        store.close()


def test_from_url_opens_absolute_path_and_creates_parents(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "overlay.db"
    store = SqliteDatastore.from_url(f"sqlite://{path}?busy_timeout=5")
    try:
        assert store.path == path
        assert store.busy_timeout == 5.0
        store.create("/a", "1")
    finally:
        store.close()
    assert path.is_file()
    # The generic opener routes sqlite:// URLs here.
    other = open_datastore(f"sqlite://{path}")
    try:
        kv = other.get("/a")
        assert kv is not None and kv.value == "1"
    finally:
        other.close()


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://relative/path.db",
        "sqlite:///",
        "sqlite:",
        "postgres:///x.db",
        "sqlite:///tmp/x.db?nosuch=1",
        "sqlite:///tmp/x.db?busy_timeout=soon",
    ],
)
def test_from_url_rejects_bad_url(url: str) -> None:
    with pytest.raises(ValueError, match="datastore URL"):
        SqliteDatastore.from_url(url)


def test_corrupt_file_is_unavailable_naming_path(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.db"
    path.write_bytes(b"this is not a sqlite database at all" * 200)
    with pytest.raises(Unavailable, match=re.escape(str(path))):
        SqliteDatastore(path)


def test_unopenable_path_is_unavailable_naming_path(tmp_path: Path) -> None:
    path = tmp_path / "a-directory.db"
    path.mkdir()
    with pytest.raises(Unavailable, match=re.escape(str(path))):
        SqliteDatastore(path)


def test_use_after_close_is_unavailable(tmp_path: Path) -> None:
    store = SqliteDatastore(tmp_path / "closed.db")
    store.close()
    with pytest.raises(Unavailable, match="closed"):
        store.get("/a")
