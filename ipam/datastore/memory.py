"""In-process datastore for unit tests, with conflict injection for property tests."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

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
)


class MemoryDatastore:
    def __init__(self, history: int = 100_000) -> None:
        self._lock = threading.Condition()
        self._data: dict[str, KV] = {}
        self._events: list[Event] = []
        self._history = history
        self._rev = 0
        # Called before each conditional write with (operation, key); returning True makes
        # that write fail with Conflict as if another writer had won the race.
        self.inject_conflict: Callable[[str, str], bool] | None = None

    def _injected(self, op: str, key: str) -> bool:
        return self.inject_conflict is not None and self.inject_conflict(op, key)

    def _record(self, type_: EventType, key: str, value: str | None) -> int:
        self._rev += 1
        self._events.append(Event(type_, key, value, self._rev))
        if len(self._events) > self._history:
            del self._events[: len(self._events) - self._history]
        self._lock.notify_all()
        return self._rev

    def get(self, key: str) -> KV | None:
        with self._lock:
            return self._data.get(key)

    def list(self, prefix: str) -> Listing:
        with self._lock:
            items = [kv for k, kv in sorted(self._data.items()) if k.startswith(prefix)]
            return Listing(items, self._rev)

    def keys(self, prefix: str) -> KeyListing:
        with self._lock:
            return KeyListing(sorted(k for k in self._data if k.startswith(prefix)), self._rev)

    def create(self, key: str, value: str) -> int:
        with self._lock:
            if key in self._data or self._injected("create", key):
                raise AlreadyExists(key)
            rev = self._record(EventType.PUT, key, value)
            self._data[key] = KV(key, value, rev)
            return rev

    def update(self, key: str, value: str, revision: int) -> int:
        with self._lock:
            cur = self._data.get(key)
            if cur is None or cur.mod_revision != revision or self._injected("update", key):
                raise Conflict(key)
            rev = self._record(EventType.PUT, key, value)
            self._data[key] = KV(key, value, rev)
            return rev

    def delete(self, key: str, revision: int) -> None:
        with self._lock:
            cur = self._data.get(key)
            if cur is None:
                raise NotFound(key)
            if cur.mod_revision != revision or self._injected("delete", key):
                raise Conflict(key)
            del self._data[key]
            self._record(EventType.DELETE, key, None)

    def watch(self, prefix: str, start_revision: int) -> MemoryWatch:
        return MemoryWatch(self, prefix, start_revision)

    def revision(self) -> int:
        with self._lock:
            return self._rev

    def close(self) -> None:
        pass


class MemoryWatch:
    def __init__(self, store: MemoryDatastore, prefix: str, start_revision: int) -> None:
        self._store = store
        self._prefix = prefix
        self._next = max(start_revision, 1)
        self._closed = False

    def _pending(self) -> list[Event]:
        events = self._store._events
        if events and self._next < events[0].mod_revision and self._next <= self._store._rev:
            raise Compacted(f"revision {self._next} compacted")
        out = [e for e in events if e.mod_revision >= self._next and e.key.startswith(self._prefix)]
        self._next = self._store._rev + 1
        return out

    def next(self, timeout: float) -> list[Event]:
        with self._store._lock:
            if not self._closed and self._store._rev < self._next:
                self._store._lock.wait_for(
                    lambda: self._closed or self._store._rev >= self._next, timeout
                )
            if self._closed:
                return []
            return self._pending()

    def close(self) -> None:
        with self._store._lock:
            self._closed = True
            self._store._lock.notify_all()

    def __iter__(self) -> Iterator[Event]:
        while not self._closed:
            yield from self.next(1.0)
