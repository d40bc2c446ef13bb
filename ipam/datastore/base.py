"""The datastore protocol every backend implements, and the errors it raises.

Values are opaque strings (the layers above store JSON). Every stored key carries the
revision of its last write (`mod_revision`); a store-wide revision grows by one per write,
so a watch can resume from any revision it has seen.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class DatastoreError(Exception):
    """Base of every datastore error."""


class Conflict(DatastoreError):
    """A conditional write lost: the key changed (or vanished) since it was read."""


class AlreadyExists(Conflict):
    """create() of a key that exists."""


class Ambiguous(Conflict):
    """A conditional write was retried after its answer was lost, the retry lost its
    compare, and the key now holds something else: the first attempt may have been applied
    and then overwritten. Only the stored value can tell; callers that cannot look treat
    it as a Conflict."""


class NotFound(DatastoreError):
    """The key does not exist."""


class Unavailable(DatastoreError):
    """The datastore cannot be reached (every endpoint tried)."""


class Compacted(DatastoreError):
    """A watch asked for revisions the store no longer keeps: re-list and watch again."""


@dataclass(frozen=True, slots=True)
class KV:
    key: str
    value: str
    mod_revision: int


class EventType(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    key: str
    value: str | None  # None for DELETE
    mod_revision: int  # the store revision of this change


@dataclass(frozen=True, slots=True)
class Listing:
    items: list[KV]
    revision: int  # store revision at which the listing was taken: watch from revision + 1


@dataclass(frozen=True, slots=True)
class KeyListing:
    keys: list[str]  # in the order of Listing.items
    revision: int  # as Listing.revision


class Watch(Protocol):
    """Changes under a prefix, in revision order, from a start revision on."""

    def next(self, timeout: float) -> list[Event]:
        """Block up to `timeout` seconds for changes; [] when none came.

        Raises Compacted when the start revision is no longer available and Unavailable
        when the store cannot be reached (the caller re-lists and watches again).
        """
        ...

    def close(self) -> None: ...

    def __iter__(self) -> Iterator[Event]: ...


@runtime_checkable
class Datastore(Protocol):
    def get(self, key: str) -> KV | None: ...

    def list(self, prefix: str) -> Listing: ...

    def keys(self, prefix: str) -> KeyListing:
        """list() without the values: for callers that only ask which keys exist (values
        can be large and many)."""
        ...

    def create(self, key: str, value: str) -> int:
        """Store a new key; AlreadyExists if present. Returns the new mod_revision."""
        ...

    def update(self, key: str, value: str, revision: int) -> int:
        """Replace a key only if its mod_revision is still `revision`, else Conflict
        (also when the key is gone). Returns the new mod_revision."""
        ...

    def delete(self, key: str, revision: int) -> None:
        """Delete a key only if its mod_revision is still `revision`, else Conflict
        (NotFound when the key is already gone)."""
        ...

    def watch(self, prefix: str, start_revision: int) -> Watch:
        """Changes under `prefix` with revision >= start_revision."""
        ...

    def revision(self) -> int:
        """The current store-wide revision."""
        ...

    def close(self) -> None: ...
