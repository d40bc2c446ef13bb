"""The listing's shortcuts must not change what it decodes: a block parsed without its free
list, and a bulk load of the cache, give what the full parse and put() give, errors too."""

from __future__ import annotations

import json
import logging
from typing import Any

import netaddr
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipam.block import Block
from ipam.datastore import KV
from ipam.datastore.sqlite import SqliteDatastore
from ipam.model import Node
from ipam.records import BLOCKS_PREFIX
from ipam.store import RESOURCES_PREFIX, encode, load_json, resource_key
from overlay import watch
from overlay.watch import ClusterCache, ClusterWatcher, block_info, block_info_from_json

# Text that a naive cut at "unallocated" would get wrong, and JSON's special characters.
_TRICKY = st.sampled_from(['"unallocated":[1]', ',"unallocated":[', "]", "}", '"', "\\", "node"])
_TEXT = st.lists(st.one_of(_TRICKY, st.text(max_size=4)), max_size=3).map("".join)


@st.composite
def blocks(draw: st.DrawFn) -> Block:
    base = draw(st.integers(0, 255))
    block = Block.new(
        f"10.{base}.0.0/26",
        affinity=draw(st.one_of(st.none(), _TEXT.map("host:{}".format), _TEXT)),
        sequence_number=draw(st.integers(0, 2**40)),
    )
    for ordinal in draw(st.lists(st.integers(0, 63), unique=True, max_size=8)):
        attrs = draw(st.dictionaries(_TEXT, _TEXT, max_size=3))
        if draw(st.booleans()):
            attrs["node"] = draw(st.sampled_from(["a", "b", "unallocated"]))
        block.assign(netaddr.IPAddress(f"10.{base}.0.{ordinal}"), draw(_TEXT), attrs)
    if draw(st.booleans()) and block.allocations[0] is not None:
        block.release([netaddr.IPAddress(f"10.{base}.0.0")])  # 0 back in the free list
    return block


def _full_block_info(value: str) -> Any:
    """block_info_from_json as it was: the whole text parsed; the outcome or the error."""
    return _outcome(lambda text: watch._block_info_from_raw(load_json(text), text), value)


def _outcome(decode: Any, value: str) -> Any:
    try:
        return decode(value)
    except (ValueError, KeyError, TypeError) as exc:
        return (type(exc), str(exc))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(blocks())
def test_a_stored_block_skips_its_free_list_and_decodes_the_same(block: Block) -> None:
    text = block.to_json()
    # The shortcut applies to what we write, unless a string before the free list has an
    # escape (which the head check refuses to reason about).
    plain = block.affinity is None or json.dumps(block.affinity) == f'"{block.affinity}"'
    assert (watch._free_list_span(text) is not None) == plain
    full = json.loads(text)
    if plain:
        del full["unallocated"]
    assert watch._block_json(text) == full
    assert block_info_from_json(text) == block_info(Block.from_json(text))


_EDITS = st.sampled_from(
    [
        "",
        ",",
        "]",
        "[",
        "{",
        "}",
        '"',
        "\\",
        "0",
        "01",
        "-1",
        "null",
        " ",
        "9" * 5000,
        ',"unallocated":[1]',
    ]
)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(blocks(), st.data())
def test_a_damaged_block_gives_the_full_parse_outcome(block: Block, data: st.DataObject) -> None:
    text = block.to_json()
    for _ in range(data.draw(st.integers(1, 3))):
        start = data.draw(st.integers(0, len(text)))
        end = data.draw(st.integers(start, min(len(text), start + 3)))
        text = text[:start] + data.draw(_EDITS) + text[end:]
    fast, full = _outcome(watch._block_json, text), _outcome(load_json, text)
    if isinstance(fast, dict) and isinstance(full, dict) and "unallocated" not in fast:
        full.pop("unallocated", None)  # the only member the shortcut may leave out
    assert fast == full
    assert _outcome(block_info_from_json, text) == _full_block_info(text)


def _with_free_list(free: str) -> str:
    raw = Block.new("10.1.0.0/26", affinity="host:a", sequence_number=1).to_json()
    head, _, rest = raw.partition(',"unallocated":[')
    return head + ',"unallocated":[' + free + "]" + rest.partition("]")[2]


@pytest.mark.parametrize(
    "free", ["", "0,0", "01", "1,,2", ",1", "1,", "-1", "1.0", "1e2", "٣", "9" * 5000, " 1"]
)
def test_free_lists_json_refuses_or_the_shortcut_declines_are_parsed_whole(free: str) -> None:
    text = _with_free_list(free)
    assert watch._free_list_span(text) is None
    assert _outcome(watch._block_json, text) == _outcome(load_json, text)


def test_a_nested_unallocated_key_is_not_cut() -> None:
    block = Block.new("10.1.0.0/26", affinity="host:a", sequence_number=1)
    block.assign("10.1.0.1", "h", {"unallocated": "[1,2]", "node": "b"})
    raw = json.loads(block.to_json())
    # Moved before the free list: a nested member the head check must not mistake.
    text = json.dumps(
        {"cidr": raw["cidr"], "attributes": raw["attributes"], **raw}, separators=(",", ":")
    )
    assert watch._free_list_span(text) is None
    assert block_info_from_json(text) == block_info(Block.from_json(text))


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


def test_felix_configurations_are_in_the_view_and_follow_changes() -> None:
    from ipam.model import FelixConfiguration

    cache = ClusterCache()
    cluster = FelixConfiguration("default", vxlan_port=8472)
    key = resource_key("FelixConfiguration", "default")
    assert cache.put(key, encode(cluster))
    assert cache.view().felix == {"default": cluster}
    assert not cache.put(key, encode(cluster))  # the same again: nothing to do
    assert cache.put(key, encode(FelixConfiguration("default", vxlan_port=8473)))
    assert cache.put(key, None)
    assert cache.view().felix == {}
