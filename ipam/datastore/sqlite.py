"""Embedded datastore on one SQLite file: many processes and threads on one machine.

Layout: `kv` holds the live keys, `changelog` one row per write (what watches read), and
`meta` the store-wide revision plus the highest revision trimmed from the changelog. Every
write runs in one `BEGIN IMMEDIATE` transaction that checks the condition, bumps the revision,
changes `kv` and appends to `changelog`, so the revision and the data never disagree.

WAL mode lets readers run beside the single writer; `synchronous=NORMAL` skips the fsync per
commit (a power cut may lose the last commits, never corrupt the file). Writers from other
processes wait on the busy timeout instead of failing.
"""

from __future__ import annotations

import builtins
import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from itertools import starmap
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from ipam.datastore.base import (
    KV,
    AlreadyExists,
    Compacted,
    Conflict,
    Event,
    EventType,
    KeyListing,
    Listing,
    NotFound,
    Unavailable,
)
from ipam.datastore.fields import check_paths

DEFAULT_HISTORY = 100_000
# How often a watch looks for commits from other processes; in-process writes wake it at once.
POLL_INTERVAL = 0.015
SCHEMA_VERSION = 1

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    mod_revision INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changelog (
    revision INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    type TEXT NOT NULL,
    value TEXT
);
CREATE TABLE IF NOT EXISTS meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL,
    compacted INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (id, revision, compacted) VALUES (1, 0, 0);
"""

_MAX_CHAR = chr(0x10FFFF)
_PUT = EventType.PUT.value
_DELETE = EventType.DELETE.value


def _prefix_end(prefix: str) -> str | None:
    """The least string above every string that starts with `prefix`, None when there is
    none (then every key >= prefix starts with it).

    SQLite's BINARY collation compares UTF-8 bytes, which is the code point order of Python
    strings: a key starts with the prefix exactly when prefix <= key < _prefix_end(prefix).
    """
    stem = prefix.rstrip(_MAX_CHAR)  # nothing sorts between U+10FFFF and the next char up
    if not stem:
        return None
    # Surrogates cannot be stored (not UTF-8), so the next code point after U+D7FF is U+E000.
    after = ord(stem[-1]) + 1
    return stem[:-1] + chr(0xE000 if after == 0xD800 else after)


def _kvs(rows: sqlite3.Cursor) -> list[KV]:
    return list(starmap(KV, rows))


def _fetch_one(rows: sqlite3.Cursor) -> Any:
    return rows.fetchone()


def _keys(rows: sqlite3.Cursor) -> list[str]:
    return [key for (key,) in rows]


def _connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves. check_same_thread=False: every
    # use is serialised by a lock of ours, and close() may come from another thread.
    conn = sqlite3.connect(
        str(path), timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class SqliteDatastore:
    """The Datastore protocol on a SQLite file (see the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout: float = 30.0,
        history: int = DEFAULT_HISTORY,
    ) -> None:
        if history < 1:
            raise ValueError(f"history={history!r}: must be at least 1 revision")
        if busy_timeout < 0:
            raise ValueError(f"busy_timeout={busy_timeout!r}: must not be negative")
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._history = history
        # Trim in batches so most writes do not pay for a DELETE on the changelog.
        self._trim_slack = max(1, history // 100)
        self._lock = threading.Lock()
        # Wakes watches of this process right after a commit; other processes are polled.
        self._changed = threading.Condition()
        self._watches: weakref.WeakSet[SqliteWatch] = weakref.WeakSet()
        self._closed = False
        self._pid = os.getpid()
        self._conn = self._open()

    @classmethod
    def from_url(cls, url: str) -> SqliteDatastore:
        """sqlite:///abs/path.db[?busy_timeout=SECONDS&history=REVISIONS]"""
        parts = urlsplit(url)
        if parts.scheme != "sqlite":
            raise ValueError(f"datastore URL {url!r}: scheme must be sqlite://")
        if parts.netloc or not parts.path.startswith("/") or parts.path == "/":
            raise ValueError(
                f"datastore URL {url!r}: expected sqlite:///absolute/path.db "
                "(three slashes, then an absolute file path)"
            )
        busy_timeout, history = 30.0, DEFAULT_HISTORY
        for name, values in parse_qs(parts.query, keep_blank_values=True).items():
            try:
                if name == "busy_timeout":
                    busy_timeout = float(values[-1])
                elif name == "history":
                    history = int(values[-1])
                else:
                    raise ValueError(f"unknown option {name!r}")
            except ValueError as e:
                raise ValueError(
                    f"datastore URL {url!r}: option {name}={values[-1]!r}: {e} "
                    "(known options: busy_timeout, history)"
                ) from None
        return cls(parts.path, busy_timeout=busy_timeout, history=history)

    # -- connection handling -------------------------------------------------------------

    def _unavailable(self, e: BaseException) -> Unavailable:
        return Unavailable(f"sqlite datastore {str(self.path)!r}: {e}")

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = _connect(self.path, self.busy_timeout)
        except (OSError, sqlite3.Error) as e:
            raise self._unavailable(e) from e
        try:
            # Persistent per file; the first opener switches it, later ones read it back.
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot enable WAL (journal_mode={mode})")
            conn.execute("BEGIN IMMEDIATE")
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {version}, this program knows {SCHEMA_VERSION}"
                )
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            conn.close()
            raise self._unavailable(e) from e
        return conn

    def _connection(self) -> sqlite3.Connection:
        """The shared connection; callers hold self._lock."""
        if self._closed:
            raise Unavailable(f"sqlite datastore {str(self.path)!r}: closed")
        if self._pid != os.getpid():
            # A forked child must not share the parent's SQLite handle: open its own.
            self._pid = os.getpid()
            self._conn = self._open()
        return self._conn

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _write(self, op: str, key: str, value: str | None, revision: int | None) -> int:
        """One conditional write in one IMMEDIATE transaction; returns the new revision."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    rev, compacted = conn.execute(
                        "SELECT revision, compacted FROM meta WHERE id = 1"
                    ).fetchone()
                    new = rev + 1
                    self._apply(conn, op, key, value, revision, new)
                    conn.execute("UPDATE meta SET revision = ? WHERE id = 1", (new,))
                    conn.execute(
                        "INSERT INTO changelog (revision, key, type, value) VALUES (?, ?, ?, ?)",
                        (new, key, _DELETE if op == "delete" else _PUT, value),
                    )
                    if new - compacted > self._history + self._trim_slack:
                        cut = new - self._history
                        conn.execute("DELETE FROM changelog WHERE revision <= ?", (cut,))
                        conn.execute("UPDATE meta SET compacted = ? WHERE id = 1", (cut,))
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise self._unavailable(e) from e
        self._notify()
        return new

    @staticmethod
    def _apply(
        conn: sqlite3.Connection,
        op: str,
        key: str,
        value: str | None,
        revision: int | None,
        new: int,
    ) -> None:
        """The kv change of one write; raises (and the caller rolls back) when it loses."""
        if op == "create":
            cur = conn.execute(
                "INSERT INTO kv (key, value, mod_revision) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO NOTHING",
                (key, value, new),
            )
            if cur.rowcount != 1:
                raise AlreadyExists(f"key {key!r} already exists")
        elif op == "update":
            cur = conn.execute(
                "UPDATE kv SET value = ?, mod_revision = ? WHERE key = ? AND mod_revision = ?",
                (value, new, key, revision),
            )
            if cur.rowcount != 1:
                row = conn.execute("SELECT mod_revision FROM kv WHERE key = ?", (key,)).fetchone()
                found = "the key is gone" if row is None else f"found mod_revision {row[0]}"
                raise Conflict(f"key {key!r}: expected mod_revision {revision}, {found}")
        else:
            row = conn.execute("SELECT mod_revision FROM kv WHERE key = ?", (key,)).fetchone()
            if row is None:
                raise NotFound(f"key {key!r} does not exist")
            if row[0] != revision:
                raise Conflict(
                    f"key {key!r}: expected mod_revision {revision}, found mod_revision {row[0]}"
                )
            conn.execute("DELETE FROM kv WHERE key = ?", (key,))

    # -- the protocol --------------------------------------------------------------------

    def get(self, key: str) -> KV | None:
        with self._lock:
            try:
                row = (
                    self._connection()
                    .execute("SELECT value, mod_revision FROM kv WHERE key = ?", (key,))
                    .fetchone()
                )
            except sqlite3.Error as e:
                raise self._unavailable(e) from e
        return None if row is None else KV(key, row[0], row[1])

    def list(self, prefix: str) -> Listing:
        # starmap builds the KVs without a Python loop (a watch's listing reads every block).
        return Listing(*self._read_range("key, value, mod_revision", prefix, _kvs))

    def keys(self, prefix: str) -> KeyListing:
        # Without the value column no value becomes a Python string.
        return KeyListing(*self._read_range("key", prefix, _keys))

    def list_fields(self, prefix: str, paths: Sequence[str]) -> builtins.list[tuple[Any, ...]]:
        """fields.list_fields() by SQLite's JSON functions: the records are never parsed in
        Python, only one JSON array of the values. Each record is parsed once for all paths
        (json_extract with several paths gives a JSON array of the values; `->` for one:
        JSON either way, so a string holding a NUL comes back whole, and true as true)."""
        check_paths(paths)  # so each path can go into the query as a literal
        if len(paths) == 1:
            values = f"value -> '{paths[0]}'"
        else:
            values = "json_extract(value, " + ", ".join(f"'{p}'" for p in paths) + ")"
        try:
            # (The range scan gathers the rows in key order.)
            (text,) = self._read_range(
                f"json_group_array(json_array(key, {values}))", prefix, _fetch_one
            )[0]
        except Unavailable as e:
            if "malformed JSON" in str(e.__cause__):
                raise ValueError(f"a record under {prefix} is not JSON") from None
            raise
        rows = json.loads(text)
        if len(paths) == 1:
            return list(map(tuple, rows))
        return [(key, *values) for key, values in rows]

    def _read_range(
        self, columns: str, prefix: str, collect: Callable[[sqlite3.Cursor], T]
    ) -> tuple[T, int]:
        """`collect` applied to the rows under `prefix` in key order, and the revision."""
        end = _prefix_end(prefix)
        query = f"SELECT {columns} FROM kv WHERE key >= ?"
        if end is not None:
            query += " AND key < ?"
        bounds = (prefix,) if end is None else (prefix, end)
        with self._lock:
            conn = self._connection()
            try:
                # One read transaction: the revision matches the snapshot of the rows.
                conn.execute("BEGIN")
                try:
                    rev = conn.execute("SELECT revision FROM meta WHERE id = 1").fetchone()[0]
                    # The keys under a prefix are one contiguous range of the primary key, so
                    # SQLite selects exactly them (already in key order).
                    rows = collect(conn.execute(query + " ORDER BY key", bounds))
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as e:
                raise self._unavailable(e) from e
        return rows, rev

    def create(self, key: str, value: str) -> int:
        return self._write("create", key, value, None)

    def update(self, key: str, value: str, revision: int) -> int:
        return self._write("update", key, value, revision)

    def delete(self, key: str, revision: int) -> None:
        self._write("delete", key, None, revision)

    def watch(self, prefix: str, start_revision: int) -> SqliteWatch:
        w = SqliteWatch(self, prefix, start_revision)
        self._watches.add(w)
        return w

    def revision(self) -> int:
        with self._lock:
            try:
                row = self._connection().execute("SELECT revision FROM meta WHERE id = 1")
                return int(row.fetchone()[0])
            except sqlite3.Error as e:
                raise self._unavailable(e) from e

    def close(self) -> None:
        for w in list(self._watches):
            w.close()
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()


class SqliteWatch:
    """Reads the changelog from its own connection, so PRAGMA data_version tells it cheaply
    whether any other connection (this process or another) committed since its last look."""

    def __init__(self, store: SqliteDatastore, prefix: str, start_revision: int) -> None:
        self._store = store
        self._prefix = prefix
        self._next = max(start_revision, 1)
        self._lock = threading.Lock()
        self._closed = False
        self._data_version: int | None = None
        try:
            self._conn: sqlite3.Connection | None = _connect(store.path, store.busy_timeout)
        except sqlite3.Error as e:
            raise store._unavailable(e) from e

    def _read(self) -> list[Event]:
        """Events under the prefix from self._next on, if anything was committed since the
        last read; advances self._next past every revision it has looked at."""
        with self._lock:
            conn = self._conn
            if conn is None:
                return []
            try:
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if version == self._data_version:
                    return []
                conn.execute("BEGIN")
                try:
                    rev, compacted = conn.execute(
                        "SELECT revision, compacted FROM meta WHERE id = 1"
                    ).fetchone()
                    if self._next <= compacted:
                        raise Compacted(
                            f"sqlite datastore {str(self._store.path)!r}: revision "
                            f"{self._next} compacted (oldest kept is {compacted + 1})"
                        )
                    rows = conn.execute(
                        "SELECT revision, key, type, value FROM changelog "
                        "WHERE revision >= ? AND revision <= ? AND substr(key, 1, ?) = ? "
                        "ORDER BY revision",
                        (self._next, rev, len(self._prefix), self._prefix),
                    ).fetchall()
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as e:
                raise self._store._unavailable(e) from e
            self._data_version = version
            self._next = max(self._next, rev + 1)
        return [Event(EventType(t), k, v, r) for r, k, t, v in rows]

    def next(self, timeout: float) -> list[Event]:
        deadline = time.monotonic() + max(timeout, 0.0)
        changed = self._store._changed
        while not self._closed:
            events = self._read()
            if events:
                return events
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with changed:
                if not self._closed:
                    changed.wait(min(POLL_INTERVAL, remaining))
        return []

    def close(self) -> None:
        self._closed = True
        with self._store._changed:
            self._store._changed.notify_all()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __iter__(self) -> Iterator[Event]:
        while not self._closed:
            yield from self.next(1.0)
