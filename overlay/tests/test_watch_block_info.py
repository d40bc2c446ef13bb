"""The watch's fast block decoder must agree with the full Block decode it replaces."""

from __future__ import annotations

import json
import pickle

import netaddr
import pytest

from ipam.block import Block
from overlay.model import NexthopKey, Route
from overlay.watch import block_info, block_info_from_json


def _blocks() -> list[Block]:
    empty = Block.new("10.1.0.0/26", affinity="host:a", sequence_number=1)
    unowned = Block.new("10.1.0.64/26", sequence_number=1)
    mixed = Block.new("10.1.0.128/26", affinity="host:a", sequence_number=1)
    mixed.assign("10.1.0.129", "h1", {"node": "a"})  # hosted by the owner: no /32
    mixed.assign("10.1.0.133", "h2", {"node": "b"})  # borrowed by b
    mixed.assign("10.1.0.134", "h3", {})  # no node attribute
    mixed.assign("10.1.0.135", "h4", {"node": "c"})
    mixed.assign("10.1.0.136", "h5", {"node": "b"})
    borrowed_unowned = Block.new("10.1.0.192/26", sequence_number=1)
    borrowed_unowned.assign("10.1.0.200", "h6", {"node": "d"})
    return [empty, unowned, mixed, borrowed_unowned]


@pytest.mark.parametrize("block", _blocks(), ids=lambda b: str(b.cidr))
def test_fast_decode_equals_full_decode(block: Block) -> None:
    full = block_info(Block.from_json(block.to_json()))
    fast = block_info_from_json(block.to_json())
    assert fast == full
    assert dict(fast.borrowed) == dict(full.borrowed)


def test_fast_decode_finds_borrowed_addresses() -> None:
    info = block_info_from_json(_blocks()[2].to_json())
    assert info.node == "a"
    assert dict(info.borrowed) == {
        netaddr.IPAddress("10.1.0.133"): "b",
        netaddr.IPAddress("10.1.0.135"): "c",
        netaddr.IPAddress("10.1.0.136"): "b",
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cidr": "not-a-cidr"}, "cidr"),
        ({"allocations": [None] * 3}, "allocations"),
        ({"allocations": [7] + [None] * 63, "attributes": []}, "attribute index"),
        ({"allocations": ["0"] + [None] * 63}, "ordinal 0: bad attribute index '0'"),
        ({"allocations": 64}, "allocations: expected a list, got 64"),
        (
            {"allocations": [0] + [None] * 63, "attributes": ["x"]},
            r"attributes\[0\]: bad value 'x'",
        ),
        ({"attributes": {"a": 1}}, "attributes: expected a list"),
    ],
)
def test_fast_decode_rejects_bad_records(change: dict[str, object], message: str) -> None:
    raw = json.loads(Block.new("10.1.0.0/26", affinity="host:a").to_json())
    raw.update(change)
    with pytest.raises(ValueError, match=message):
        block_info_from_json(json.dumps(raw))


def test_cached_hash_matches_equality_and_is_not_carried_across_processes() -> None:
    key = NexthopKey(netaddr.IPAddress("10.2.0.1"), "vxlan.calico")
    a = Route(netaddr.IPNetwork("10.1.0.0/26"), nexthop=key)
    b = Route(netaddr.IPNetwork("10.1.0.0/26"), nexthop=key)
    assert hash(a) == hash(b) and a == b and len({a, b}) == 1
    assert Route(netaddr.IPNetwork("10.1.0.64/26"), nexthop=key) not in {a}
    # Pickled state holds the fields only: string hashes differ between processes.
    copy = pickle.loads(pickle.dumps(a))
    assert copy._hash is None and copy == a and hash(copy) == hash(a)


@pytest.mark.parametrize("value", ["[]", '"10.1.0.0/26"', "null"])
def test_fast_decode_rejects_a_record_that_is_not_an_object(value: str) -> None:
    with pytest.raises(ValueError, match="block: expected a JSON object"):
        block_info_from_json(value)


def test_unreferenced_attributes_are_not_read() -> None:
    raw = json.loads(_blocks()[2].to_json())
    raw["attributes"].append("junk")  # no allocation points at it
    info = block_info_from_json(json.dumps(raw))
    assert info == block_info_from_json(_blocks()[2].to_json())


@pytest.mark.parametrize("cidr", ["10.1.0.0/26", "010.1.0.0/26", "fd00::/122", "10.1.0.0/26 "])
def test_fast_decode_cidr_equals_netaddr(cidr: str) -> None:
    raw = {"cidr": cidr, "affinity": None, "allocations": [None] * 64, "attributes": []}
    try:
        expected = repr(netaddr.IPNetwork(cidr))
    except netaddr.AddrFormatError:
        with pytest.raises(ValueError, match="block field cidr: bad value"):
            block_info_from_json(json.dumps(raw))
        return
    assert repr(block_info_from_json(json.dumps(raw)).cidr) == expected
