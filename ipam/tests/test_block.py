"""Block arithmetic: ordinals, FIFO reuse, ABA guards, reservations, IPv4 and IPv6."""

from __future__ import annotations

import re

import netaddr
import pytest

from ipam.block import (
    Block,
    block_count,
    block_for,
    block_index,
    encode_cidr,
    host_affinity,
    nth_block,
)
from ipam.errors import AddressInUse, AddressReserved, NotInPool
from ipam.model import IPPool

POOL4 = IPPool("p4", netaddr.IPNetwork("10.244.0.0/16"), 26)
POOL6 = IPPool("p6", netaddr.IPNetwork("fd00:10::/64"), 122)
IP = netaddr.IPAddress
NET = netaddr.IPNetwork


def test_block_for_and_key_encoding() -> None:
    assert block_for("10.244.3.130", POOL4) == NET("10.244.3.128/26")
    assert block_for("fd00:10::5:43", POOL6) == NET("fd00:10::5:40/122")
    assert encode_cidr(NET("10.244.3.128/26")) == "10.244.3.128-26"
    assert encode_cidr(NET("fd00:10::40/122")) == "fd00-10--40-122"
    with pytest.raises(NotInPool, match=r"10\.0\.0\.1 is not in pool p4"):
        block_for("10.0.0.1", POOL4)
    with pytest.raises(NotInPool):
        block_for("fd00:11::1", POOL6)


def test_pool_block_indexing() -> None:
    assert block_count(POOL4) == 1024
    assert nth_block(POOL4, 0) == NET("10.244.0.0/26")
    assert nth_block(POOL4, 1023) == NET("10.244.255.192/26")
    assert block_index(POOL4, NET("10.244.1.64/26")) == 5
    assert nth_block(POOL6, 3) == NET("fd00:10::c0/122")


def test_ordinals_and_addresses_v4_and_v6() -> None:
    b4 = Block.new("10.244.3.128/26")
    assert b4.size == 64
    assert b4.ordinal("10.244.3.130") == 2
    assert b4.address(63) == IP("10.244.3.191")
    b6 = Block.new("fd00:10::40/122")
    assert b6.size == 64
    assert b6.ordinal("fd00:10::7f") == 63
    assert b6.address(1) == IP("fd00:10::41")
    with pytest.raises(ValueError, match="not in block"):
        b4.ordinal("10.244.3.1")
    with pytest.raises(ValueError, match="not in block"):
        b4.ordinal("fd00:10::41")
    with pytest.raises(ValueError, match="host bits"):
        Block.new("10.244.3.129/26")


def test_auto_assign_pops_from_head_and_counts() -> None:
    b = Block.new("10.0.0.0/29", host_affinity("n1"))
    assert b.host == "n1"
    got = b.auto_assign(3, "h1", {"pod": "a"})
    assert got == [IP("10.0.0.0"), IP("10.0.0.1"), IP("10.0.0.2")]
    assert (b.in_use, b.free) == (3, 5)
    assert b.ips_by_handle("h1") == got
    assert len(b.attributes) == 1  # one shared attribute entry for the request
    # Asking for more than is left takes what is left.
    assert len(b.auto_assign(10, "h2")) == 5
    assert b.free == 0
    assert b.auto_assign(1, "h3") == []


def test_release_appends_to_tail_so_longest_free_is_reused_first() -> None:
    b = Block.new("10.0.0.0/29")
    b.auto_assign(8, "h")
    b.release(["10.0.0.5"])
    b.release(["10.0.0.2"])
    # 5 was freed before 2, so 5 comes back first.
    assert b.auto_assign(1, "x") == [IP("10.0.0.5")]
    assert b.auto_assign(1, "y") == [IP("10.0.0.2")]


T0 = "2026-11-27T10:00:00+00:00"


def test_a_released_address_cools_down_then_goes_to_the_tail() -> None:
    b = Block.new("10.0.0.0/29")
    b.auto_assign(8, "h", {"pod": "a"})
    out = b.release(["10.0.0.3", "10.0.0.5"], handle="h", released_at=T0)
    assert [ip for ip, _ in out.released] == [IP("10.0.0.3"), IP("10.0.0.5")]
    # Nobody's, not free, not assignable, and not releasable again.
    assert b.allocation("10.0.0.3") is None and b.cooling_since("10.0.0.3") == T0
    assert (b.free, b.cooling, b.empty) == (0, 2, False)
    assert b.auto_assign(1, "x") == []
    assert b.handle_counts() == {"h": 6}
    assert b.release(["10.0.0.3"]).unallocated == [IP("10.0.0.3")]
    with pytest.raises(AddressInUse, match=re.escape("cooling down since its release at " + T0)):
        b.assign("10.0.0.3", "y")
    assert Block.from_json(b.to_json()) == b  # releasedAt is stored
    assert b.validate() == []
    # Not before its time; then both, to the tail of the free list.
    assert b.collect_cooled("2026-11-27T09:59:59+00:00") == 0
    b.release(["10.0.0.1"], handle="h")  # freed without a cooldown: first in line
    assert b.collect_cooled("2026-11-27T10:00:30+00:00") == 2
    assert (b.free, b.cooling) == (3, 0)
    assert b.auto_assign(3, "z") == [IP("10.0.0.1"), IP("10.0.0.3"), IP("10.0.0.5")]
    assert b.validate() == []


def test_fifo_holds_across_partial_use() -> None:
    b = Block.new("10.0.0.0/29")
    b.auto_assign(2, "h")  # .0 .1 taken, .2-.7 free
    b.release(["10.0.0.0"])  # .0 goes behind .7
    order = [b.auto_assign(1, f"h{i}")[0] for i in range(7)]
    assert order == [IP(f"10.0.0.{i}") for i in (2, 3, 4, 5, 6, 7, 0)]


def test_release_with_wrong_handle_or_stale_sequence_keeps_reused_address() -> None:
    b = Block.new("10.0.0.0/29", sequence_number=100)
    [ip] = b.auto_assign(1, "old-pod")
    old_seq = b.allocation(ip).sequence_number  # type: ignore[union-attr]
    b.release([ip], handle="old-pod", sequence_number=old_seq)
    # Make the address come back: exhaust the rest, then it is the only free one.
    b.auto_assign(7, "filler")
    [again] = b.auto_assign(1, "new-pod")
    assert again == ip
    new_seq = b.allocation(ip).sequence_number  # type: ignore[union-attr]
    assert new_seq != old_seq

    stale = b.release([ip], sequence_number=old_seq)
    assert stale.released == [] and len(stale.mismatched) == 1
    wrong = b.release([ip], handle="old-pod")
    assert wrong.released == [] and "new-pod" in wrong.mismatched[0][1]
    assert b.allocation(ip).handle_id == "new-pod"  # type: ignore[union-attr]

    ok = b.release([ip], handle="new-pod", sequence_number=new_seq)
    assert ok.released == [(ip, "new-pod")]
    assert b.allocation(ip) is None


def test_release_of_free_address_reports_unallocated() -> None:
    b = Block.new("10.0.0.0/29")
    seq = b.sequence_number
    out = b.release(["10.0.0.3"])
    assert out.unallocated == [IP("10.0.0.3")] and out.released == []
    assert b.sequence_number == seq  # nothing changed, nothing to write


def test_every_change_bumps_sequence_number() -> None:
    b = Block.new("10.0.0.0/29", sequence_number=7)
    b.auto_assign(1, "h")
    assert b.sequence_number == 8
    b.assign("10.0.0.5", "h")
    assert b.sequence_number == 9
    b.release(["10.0.0.5"])
    assert b.sequence_number == 10


def test_reserved_addresses_are_skipped_but_stay_queued() -> None:
    b = Block.new("10.0.0.0/29")
    reserved = [NET("10.0.0.0/31"), NET("10.0.0.4/32"), NET("192.168.0.0/16")]
    assert b.reserved_ordinals(reserved) == {0, 1, 4}
    assert b.assignable(reserved) == 5
    got = b.auto_assign(4, "h", reserved=reserved)
    assert got == [IP("10.0.0.2"), IP("10.0.0.3"), IP("10.0.0.5"), IP("10.0.0.6")]
    assert b.auto_assign(5, "h", reserved=reserved) == [IP("10.0.0.7")]
    assert b.assignable(reserved) == 0 and b.free == 3
    with pytest.raises(AddressReserved, match=r"10\.0\.0\.4"):
        b.assign("10.0.0.4", "h", reserved=reserved)
    # Once the reservation is lifted the addresses are ordinary free ones.
    assert b.auto_assign(3, "h") == [IP("10.0.0.0"), IP("10.0.0.1"), IP("10.0.0.4")]


def test_assign_specific_address() -> None:
    b = Block.new("fd00::/122")
    assert b.assign("fd00::10", "h1", {"pod": "a"}) is True
    assert b.assign("fd00::10", "h1") is False  # same handle: idempotent
    with pytest.raises(AddressInUse, match=r"fd00::10 is already allocated \(handle 'h1'\)"):
        b.assign("fd00::10", "h2")
    assert IP("fd00::10") not in b.auto_assign(64, "h3")
    assert b.free == 0


def test_attribute_entries_are_shared_and_compacted() -> None:
    b = Block.new("10.0.0.0/28")
    b.auto_assign(2, "a", {"pod": "a"})
    b.auto_assign(2, "b", {"pod": "b"})
    b.auto_assign(1, "a", {"pod": "a"})  # same owner: reuses entry 0
    assert len(b.attributes) == 2
    b.release(b.ips_by_handle("a"), handle="a")
    assert [a.handle_id for a in b.attributes] == ["b"]
    assert {i for i in b.allocations if i is not None} == {0}
    assert b.ips_by_handle("b") == [IP("10.0.0.2"), IP("10.0.0.3")]
    assert b.handle_counts() == {"b": 2}
    assert b.validate() == []


def test_json_round_trip_keeps_everything() -> None:
    b = Block.new("fd00::40/122", host_affinity("node-1"), claim_time="2024-01-01T00:00:00Z")
    b.auto_assign(3, "h", {"pod": "p", "namespace": "ns"})
    b.release(["fd00::41"], handle="h")
    again = Block.from_json(b.to_json())
    assert again == b
    raw = b.to_dict()
    assert raw["affinity"] == "host:node-1"
    assert raw["allocations"][:3] == [0, None, 0]
    assert raw["unallocated"][-1] == 1
    assert raw["sequenceNumberForAllocation"].keys() == {"0", "2"}


def test_from_dict_rejects_wrong_allocation_count() -> None:
    raw = Block.new("10.0.0.0/29").to_dict()
    raw["allocations"] = [None] * 4
    with pytest.raises(ValueError, match="field allocations: 4 entries, expected 8"):
        Block.from_dict(raw)


def test_validate_finds_structural_damage() -> None:
    b = Block.new("10.0.0.0/29")
    b.auto_assign(1, "h")
    b.unallocated.append(0)  # allocated and free at once
    assert any("allocated and free" in p for p in b.validate())
