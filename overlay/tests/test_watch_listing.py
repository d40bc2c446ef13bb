"""A full listing loaded into the cache in bulk gives what put() of each record gives,
errors too."""

from __future__ import annotations

import logging
from typing import Any

import netaddr
import pytest

from ipam.block import Block
from ipam.datastore import KV
from ipam.datastore.sqlite import SqliteDatastore
from ipam.model import Node
from ipam.records import BLOCKS_PREFIX
from ipam.store import RESOURCES_PREFIX, encode, resource_key
from overlay.watch import ClusterCache, ClusterWatcher


def _records() -> list[KV]:
    node = Node(name="n1", ipv4_address=netaddr.IPNetwork("192.0.2.1/24"))
    block = Block.new("10.1.0.0/26", affinity="host:n1", sequence_number=1)
    block.assign("10.1.0.5", "h", {"node": "n2"})
    values = {
        resource_key("Node", "n1"): encode(node),
        resource_key("Node", "bad"): '{"kind": "Node"}',
        resource_key("IPPool", "p"): '{"apiVersion":"overlay.dev/v1","kind":"IPPool",'
        '"metadata":{"name":"p"},"spec":{"cidr":"10.1.0.0/16"}}',
        resource_key("IPReservation", "r"): "ignored",
        BLOCKS_PREFIX + "10.1.0.0-26": block.to_json(),
        BLOCKS_PREFIX + "10.1.0.64-26": '{"cidr": "10.1.0.64/26", "allocations": []}',
    }
    return [KV(key, value, 1) for key, value in values.items()]


def test_bulk_load_equals_put_of_each_record() -> None:
    bulk, each = ClusterCache(), ClusterCache()
    bulk.put(BLOCKS_PREFIX + "stale", _records()[4].value)  # replaced, not merged
    bad = bulk.replace(_records())
    errors = {}
    for kv in _records():
        try:
            each.put(kv.key, kv.value)
        except (ValueError, KeyError, TypeError) as exc:
            errors[kv.key] = str(exc)
    assert {key: str(exc) for key, exc in bad} == errors
    assert len(errors) == 2
    for table in ("nodes", "pools", "blocks"):
        assert repr(getattr(bulk, table)) == repr(getattr(each, table))
    assert bulk.view() == each.view()


def test_resync_lists_decodes_and_logs_bad_records(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    ds = SqliteDatastore(tmp_path / "s.db")
    try:
        for kv in _records():
            ds.create(kv.key, kv.value)
        ds.create("/overlay/v1/resources/nodesx", "outside every prefix")
        views: list[Any] = []
        watcher = ClusterWatcher(ds, views.append)
        with caplog.at_level(logging.WARNING, logger="overlay.watch"):
            watcher.resync()
        expected = ClusterCache()
        expected.replace(_records())
        assert views == [expected.view()]
        assert set(views[0].nodes) == {"n1"}
        assert watcher.revision == ds.revision()
        bad = [r.getMessage() for r in caplog.records if "bad_record" in r.getMessage()]
        assert len(bad) == 2 and all(RESOURCES_PREFIX in m or BLOCKS_PREFIX in m for m in bad)
    finally:
        ds.close()
