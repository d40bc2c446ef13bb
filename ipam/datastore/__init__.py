"""Cluster datastore: one protocol, three backends chosen by URL.

sqlite:///var/lib/overlay/overlay.db     embedded default (one machine, many processes)
etcd://h1:2379,h2:2379?cacert=..&cert=..&key=..   distributed
memory://                                 in-process, for tests
"""

from __future__ import annotations

import os

from ipam.datastore.base import (
    KV,
    AlreadyExists,
    Ambiguous,
    Compacted,
    Conflict,
    Datastore,
    DatastoreError,
    Event,
    EventType,
    KeyListing,
    Listing,
    NotFound,
    Unavailable,
    Watch,
)

DEFAULT_URL = "sqlite:///var/lib/overlay/overlay.db"
ENV_VAR = "OVERLAY_DATASTORE"

__all__ = [
    "DEFAULT_URL",
    "ENV_VAR",
    "KV",
    "AlreadyExists",
    "Ambiguous",
    "Compacted",
    "Conflict",
    "Datastore",
    "DatastoreError",
    "Event",
    "EventType",
    "KeyListing",
    "Listing",
    "NotFound",
    "Unavailable",
    "Watch",
    "open_datastore",
    "resolve_url",
]


def resolve_url(url: str | None) -> str:
    """--datastore wins, then $OVERLAY_DATASTORE, then the embedded default."""
    return url or os.environ.get(ENV_VAR) or DEFAULT_URL


def open_datastore(url: str | None = None) -> Datastore:
    url = resolve_url(url)
    scheme, sep, _rest = url.partition("://")
    if not sep:
        raise ValueError(f"datastore URL {url!r}: expected sqlite://, etcd:// or memory://")
    if scheme == "sqlite":
        from ipam.datastore.sqlite import SqliteDatastore

        return SqliteDatastore.from_url(url)
    if scheme in ("etcd", "etcds"):
        from ipam.datastore.etcd import EtcdDatastore

        return EtcdDatastore.from_url(url)
    if scheme == "memory":
        from ipam.datastore.memory import MemoryDatastore

        return MemoryDatastore()
    raise ValueError(f"datastore URL {url!r}: unknown scheme {scheme!r}")
