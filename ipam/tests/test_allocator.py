"""The allocator against MemoryDatastore: Calico's assignment order, limits and releases."""

from __future__ import annotations

import datetime
import random
from pathlib import Path

import netaddr
import pytest

from ipam.allocator import IPAM, ReleaseRequest, fnv32, random_block_order
from ipam.block import Block
from ipam.check import find_leaks
from ipam.datastore.memory import MemoryDatastore
from ipam.errors import (
    AddressInUse,
    AddressReserved,
    BlockLimitReached,
    MaxRetries,
    NotInPool,
    PoolExhausted,
)
from ipam.model import EncapMode, IPAMConfig, Node
from ipam.records import AffinityRecord, affinity_key, block_key, handle_key
from ipam.tests.fake_resources import FakeResources, pool, reservation

IP = netaddr.IPAddress
NET = netaddr.IPNetwork


def make(
    *pools: str, block: int = 29, config: IPAMConfig | None = None
) -> tuple[IPAM, MemoryDatastore, FakeResources]:
    res = FakeResources([pool(p, block) for p in pools], config or IPAMConfig())
    ds = MemoryDatastore()
    return IPAM(ds, res), ds, res


def block_of(ds: MemoryDatastore, cidr: str) -> Block:
    kv = ds.get(block_key(cidr))
    assert kv is not None, f"block {cidr} missing"
    return Block.from_json(kv.value)


def assert_consistent(ipam: IPAM) -> None:
    assert ipam.check_consistency() == []


def test_fnv32_matches_reference_vectors() -> None:
    # FNV-1 32-bit test vectors.
    assert fnv32("") == 0x811C9DC5
    assert fnv32("a") == 0x050C5D7E
    assert fnv32("foobar") == 0x31F0B262


def test_first_assign_claims_a_block_and_later_ones_use_it() -> None:
    ipam, ds, _ = make("10.0.0.0/24")
    first = ipam.auto_assign("h1", "n1", attrs={"pod": "a"}).ipv4
    assert len(first) == 1 and first[0].prefixlen == 29  # carries the block mask
    cidr = first[0].cidr
    aff = ds.get(affinity_key("n1", cidr))
    assert aff is not None and AffinityRecord.from_json(aff.value).state == "confirmed"
    assert block_of(ds, str(cidr)).affinity == "host:n1"
    more = ipam.auto_assign("h2", "n1", num4=3).ipv4
    assert {n.cidr for n in more} == {cidr}
    assert len({n.ip for n in first + more}) == 4
    assert_consistent(ipam)


def test_block_order_starts_where_the_node_name_says() -> None:
    p = pool("10.0.0.0/24", 29)
    order = list(random_block_order(p, "n1"))
    assert len(order) == 32 and len(set(order)) == 32
    assert order == list(random_block_order(p, "n1"))  # retries revisit the same order
    ipam, _, _ = make("10.0.0.0/24")
    assert ipam.auto_assign("h", "n1").ipv4[0].cidr == order[0]
    starts = {next(random_block_order(p, f"node-{i}")) for i in range(20)}
    assert len(starts) > 5  # different nodes spread out


def test_full_affine_block_leads_to_a_second_claim() -> None:
    ipam, _, _ = make("10.0.0.0/24")
    got = ipam.auto_assign("h", "n1", num4=10).ipv4
    blocks = {n.cidr for n in got}
    assert len(blocks) == 2 and len({n.ip for n in got}) == 10
    assert set(ipam.affine_blocks("n1")) == blocks
    assert_consistent(ipam)


def test_block_limit_stops_new_claims_without_borrowing() -> None:
    cfg = IPAMConfig(max_blocks_per_host=1)
    ipam, _, _ = make("10.0.0.0/26", config=cfg)
    ipam.auto_assign("h", "n1", num4=8)
    with pytest.raises(BlockLimitReached, match="cannot allocate new block due to per host"):
        ipam.auto_assign("h2", "n1")
    assert ipam.ips_by_handle("h2") == []
    assert len(ipam.ips_by_handle("h")) == 8
    assert_consistent(ipam)


def test_default_block_limit_is_twenty() -> None:
    ipam, _, _ = make("10.0.0.0/16", block=30)
    ipam.auto_assign("h", "n1", num4=80)
    with pytest.raises(BlockLimitReached):
        ipam.auto_assign("h2", "n1")
    assert len(ipam.affine_blocks("n1")) == 20


def test_borrow_from_another_nodes_block_when_no_block_is_free() -> None:
    ipam, ds, _ = make("10.0.0.0/28")  # two /29 blocks
    a = ipam.auto_assign("ha", "n1").ipv4[0]
    b = ipam.auto_assign("hb", "n2").ipv4[0]
    assert a.cidr != b.cidr
    c = ipam.auto_assign("hc", "n3").ipv4[0]
    assert c.cidr in (a.cidr, b.cidr)  # borrowed
    assert ipam.affine_blocks("n3") == []
    assert block_of(ds, str(c.cidr)).affinity in ("host:n1", "host:n2")
    assert_consistent(ipam)


def test_strict_affinity_forbids_borrowing() -> None:
    ipam, _, _ = make("10.0.0.0/28", config=IPAMConfig(strict_affinity=True))
    ipam.auto_assign("ha", "n1")
    ipam.auto_assign("hb", "n2")
    with pytest.raises(PoolExhausted, match=r"10\.0\.0\.0/28.*strict affinity"):
        ipam.auto_assign("hc", "n3")
    assert_consistent(ipam)


def test_exhaustion_names_the_pool_and_keeps_nothing() -> None:
    ipam, _, _ = make("10.0.0.0/29")
    ipam.auto_assign("h", "n1", num4=6)
    with pytest.raises(PoolExhausted, match=r"no free addresses in pools 10\.0\.0\.0/29"):
        ipam.auto_assign("h2", "n1", num4=3)  # only 2 left: all or nothing
    assert ipam.ips_by_handle("h2") == []
    assert len(ipam.auto_assign("h3", "n1", num4=2).ipv4) == 2
    assert_consistent(ipam)


def test_dual_stack_failure_rolls_back_the_ipv4_part() -> None:
    ipam, _, _ = make("10.0.0.0/24")
    with pytest.raises(PoolExhausted, match="no enabled IPv6 pool"):
        ipam.auto_assign("h", "n1", num4=1, num6=1)
    assert ipam.ips_by_handle("h") == []
    assert_consistent(ipam)


def test_ipv6_and_dual_stack() -> None:
    ipam, _, res = make("10.0.0.0/24")
    res.pools.append(pool("fd00:10::/64", 122))
    got = ipam.auto_assign("h", "n1", num4=1, num6=2)
    assert len(got.ipv4) == 1 and len(got.ipv6) == 2
    assert all(n.prefixlen == 122 and n.ip in NET("fd00:10::/64") for n in got.ipv6)
    assert sorted(ipam.ips_by_handle("h")) == sorted(n.ip for n in got.ipv4 + got.ipv6)
    assert_consistent(ipam)


def test_reservations_are_never_handed_out() -> None:
    ipam, _, res = make("10.0.0.0/28")
    res.reservations.append(reservation("10.0.0.0/30", "10.0.0.8/29"))
    got = {n.ip for n in ipam.auto_assign("h", "n1", num4=4).ipv4}
    assert got == {IP(f"10.0.0.{i}") for i in range(4, 8)}
    with pytest.raises(PoolExhausted):
        ipam.auto_assign("h2", "n1")  # the other block is wholly reserved
    with pytest.raises(AddressReserved, match=r"10\.0\.0\.1"):
        ipam.assign_ip("10.0.0.1", "h3", "n1")


def test_disabled_pools_and_node_selectors_are_respected() -> None:
    ds = MemoryDatastore()
    res = FakeResources(
        [
            pool("10.1.0.0/24", 29, disabled=True),
            pool("10.2.0.0/24", 29, node_selector="zone == 'a'"),
            pool("10.3.0.0/24", 29),
        ],
        nodes={"na": Node("na", labels={"zone": "a"}), "nb": Node("nb", labels={"zone": "b"})},
    )
    ipam = IPAM(ds, res)
    a = ipam.auto_assign("ha", "na", num4=20).ipv4
    assert {n.ip in NET("10.2.0.0/24") or n.ip in NET("10.3.0.0/24") for n in a} == {True}
    assert any(n.ip in NET("10.2.0.0/24") for n in a)
    for who in ("nb", "unknown-node"):  # a node that is not registered has no labels
        got = ipam.auto_assign(f"h-{who}", who, num4=20).ipv4
        assert all(n.ip in NET("10.3.0.0/24") for n in got)
    # Requested pools are used exactly, whatever their selector says.
    forced = ipam.auto_assign("hf", "nb", pools=[NET("10.2.0.0/24")]).ipv4[0]
    assert forced.ip in NET("10.2.0.0/24")
    with pytest.raises(NotInPool, match=r"10\.1\.0\.0/24.*disabled"):
        ipam.auto_assign("hx", "nb", pools=[NET("10.1.0.0/24")])
    with pytest.raises(NotInPool, match=r"10\.9\.0\.0/24 is not a configured"):
        ipam.auto_assign("hx", "nb", pools=[NET("10.9.0.0/24")])
    assert_consistent(ipam)


def test_an_empty_block_whose_pool_no_longer_selects_the_node_loses_its_affinity() -> None:
    # Calico releases such affinities at the next assignment: the block is no longer the
    # node's to fill, and it counted against the node's block cap.
    ds = MemoryDatastore()
    zone_a = pool("10.2.0.0/24", 29, node_selector="zone == 'a'")
    res = FakeResources([zone_a], nodes={"n1": Node("n1", labels={"zone": "a"})})
    ipam = IPAM(ds, res)
    held = ipam.auto_assign("h1", "n1").ipv4[0]
    old = held.cidr
    res.nodes["n1"] = Node("n1", labels={"zone": "b"})  # relabelled: zone_a stops selecting it
    res.pools.append(pool("10.3.0.0/24", 29))
    ipam.auto_assign("h2", "n1")
    # Still holding an address: the affinity stays until that address goes.
    assert ds.get(affinity_key("n1", old)) is not None
    assert block_of(ds, str(old)).affinity == "host:n1"
    ipam.release_by_handle("h1")
    got = ipam.auto_assign("h3", "n1").ipv4[0]
    assert got.ip in NET("10.3.0.0/24")
    assert ds.get(affinity_key("n1", old)) is None
    assert ds.get(block_key(old)) is None  # empty and unowned: deleted
    assert old not in ipam.affine_blocks("n1")
    assert_consistent(ipam)


def test_a_block_holding_only_cooled_addresses_counts_as_empty_for_those_rules() -> None:
    ds = MemoryDatastore()
    zone_a = pool("10.2.0.0/24", 29, node_selector="zone == 'a'")
    cfg = IPAMConfig(ip_cooldown_seconds=600)
    res = FakeResources([zone_a], cfg, nodes={"n1": Node("n1", labels={"zone": "a"})})
    ipam = IPAM(ds, res)
    old = ipam.auto_assign("h1", "n1").ipv4[0].cidr
    ipam.release_by_handle("h1")  # cooling for 600 s
    res.nodes["n1"] = Node("n1", labels={"zone": "b"})
    res.pools.append(pool("10.3.0.0/24", 29))
    ipam.auto_assign("h2", "n1")
    assert ds.get(affinity_key("n1", old)) is not None  # still cooling: not empty
    res.config = IPAMConfig(ip_cooldown_seconds=0)  # the cooldown is over
    ipam.auto_assign("h3", "n1")
    assert ds.get(affinity_key("n1", old)) is None and ds.get(block_key(old)) is None
    assert_consistent(ipam)


def test_affinities_in_pools_that_still_select_the_node_or_in_no_pool_are_kept() -> None:
    ds = MemoryDatastore()
    res = FakeResources([pool("10.2.0.0/24", 29), pool("10.3.0.0/24", 29)])
    ipam = IPAM(ds, res)
    a = ipam.auto_assign("h1", "n1", pools=[NET("10.2.0.0/24")]).ipv4[0].cidr
    ipam.release_by_handle("h1")
    # A request naming another pool leaves the empty block of a selecting pool alone.
    ipam.auto_assign("h2", "n1", pools=[NET("10.3.0.0/24")])
    assert ds.get(affinity_key("n1", a)) is not None
    # A block whose pool was deleted is not ours to judge (Calico skips it too).
    res.pools = [p for p in res.pools if p.cidr != NET("10.2.0.0/24")]
    ipam.auto_assign("h3", "n1")
    assert ds.get(affinity_key("n1", a)) is not None
    assert_consistent(ipam)


def _age_claim(ds: MemoryDatastore, cidr: netaddr.IPNetwork, seconds: float) -> None:
    """Backdate a block's affinityClaimTime (a minute cannot pass in a unit test)."""
    kv = ds.get(block_key(cidr))
    assert kv is not None
    block = Block.from_json(kv.value)
    when = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=seconds)
    block.affinity_claim_time = when.isoformat()
    ds.update(kv.key, block.to_json(), kv.mod_revision)


def test_an_empty_block_of_another_node_is_reclaimed_when_no_block_is_free() -> None:
    # Two /29 blocks in the pool: n1 claims one and empties it, n2 holds an address in the
    # other. With strict affinity n3 cannot borrow, so only a reclaim can serve it.
    ipam, ds, res = make("10.0.0.0/28", config=IPAMConfig(strict_affinity=True))
    n1 = IPAM(ds, res)  # n1's own client, whose cache still lists the block afterwards
    empty = n1.auto_assign("h1", "n1").ipv4[0].cidr
    n1.release_by_handle("h1")
    busy = ipam.auto_assign("h2", "n2").ipv4[0].cidr
    with pytest.raises(PoolExhausted):
        ipam.auto_assign("h3", "n3")  # n1 claimed its block just now: not yet reclaimable
    _age_claim(ds, empty, seconds=61)
    _age_claim(ds, busy, seconds=61)
    got = ipam.auto_assign("h3", "n3").ipv4[0]
    assert got.cidr == empty
    assert block_of(ds, str(empty)).affinity == "host:n3"
    assert ds.get(affinity_key("n1", empty)) is None
    assert ipam.affine_blocks("n1") == []
    assert ipam.affine_blocks("n3") == [empty]
    # n2's block holds an address, however old its claim: never taken.
    with pytest.raises(PoolExhausted):
        ipam.auto_assign("h4", "n4")
    assert block_of(ds, str(busy)).affinity == "host:n2"
    # n1, which lost its block, does not fill it from its stale cache: it finds none free.
    with pytest.raises(PoolExhausted):
        n1.auto_assign("h5", "n1")
    assert [n.ip for n in ipam.ips_by_handle("h5")] == []
    assert_consistent(ipam)


def test_allowed_uses_keep_pod_and_tunnel_addresses_in_their_pools() -> None:
    # Calico's allowedUses: a small pool for tunnel addresses, another for pods.
    ds = MemoryDatastore()
    pods = pool("10.1.0.0/24", 29, allowed_uses=frozenset({"Workload"}))
    tunnels = pool("10.9.0.0/24", 29, vxlan_mode=EncapMode.ALWAYS,
                   allowed_uses=frozenset({"Tunnel"}))  # fmt: skip
    ipam = IPAM(ds, FakeResources([pods, tunnels]))
    assert all(n.ip in pods.cidr for n in ipam.auto_assign("h", "n1", num4=3).ipv4)
    assert ipam.tunnel_pools("n1", "vxlan") == [tunnels]
    tunnel = ipam.ensure_tunnel_address("n1", "vxlan")
    assert tunnel is not None and tunnel in tunnels.cidr
    with pytest.raises(NotInPool, match=r"pool .*10\.9\.0\.0/24.* not for Workload addresses"):
        ipam.auto_assign("h2", "n1", pools=[tunnels.cidr])
    with pytest.raises(NotInPool, match=r"not for Workload addresses \(allowedUses: Tunnel\)"):
        ipam.assign_ip("10.9.0.77", "h3", "n1")
    assert_consistent(ipam)


def test_a_manual_pool_serves_only_requests_that_name_it() -> None:
    ds = MemoryDatastore()
    auto = pool("10.1.0.0/24", 29)
    manual = pool("10.2.0.0/24", 29, assignment_mode="Manual", vxlan_mode=EncapMode.ALWAYS)
    ipam = IPAM(ds, FakeResources([auto, manual]))
    got = ipam.auto_assign("h", "n1", num4=20).ipv4
    assert all(n.ip in auto.cidr for n in got)
    named = ipam.auto_assign("h2", "n1", pools=[manual.cidr]).ipv4[0]
    assert named.ip in manual.cidr
    assert ipam.assign_ip("10.2.0.200", "h3", "n1").ip == IP("10.2.0.200")
    assert ipam.tunnel_pools("n1", "vxlan") == []  # a tunnel address is never requested by name
    only_manual = IPAM(MemoryDatastore(), FakeResources([manual]))
    with pytest.raises(PoolExhausted, match="no enabled IPv4 pool for Workload addresses"):
        only_manual.auto_assign("h", "n1")
    assert_consistent(ipam)


def test_assign_specific_ip() -> None:
    ipam, ds, res = make("10.0.0.0/24")
    got = ipam.assign_ip("10.0.0.77", "h1", "n1", {"pod": "a"})
    assert got == NET("10.0.0.77/29")
    assert block_of(ds, "10.0.0.72/29").affinity == "host:n1"  # claimed for n1
    assert ipam.assign_ip("10.0.0.77", "h1", "n1") == got  # idempotent for the holder
    assert ipam.ips_by_handle("h1") == [IP("10.0.0.77")]
    with pytest.raises(AddressInUse, match=r"10\.0\.0\.77 is already allocated"):
        ipam.assign_ip("10.0.0.77", "h2", "n1")
    with pytest.raises(NotInPool, match=r"10\.5\.0\.1 is not in any IP pool"):
        ipam.assign_ip("10.5.0.1", "h2", "n1")
    res.pools.append(pool("10.6.0.0/24", 29, disabled=True))
    with pytest.raises(NotInPool, match="disabled"):
        ipam.assign_ip("10.6.0.1", "h2", "n1")
    # Another node may take an address in n1's block unless affinity is strict.
    ipam.assign_ip("10.0.0.78", "h3", "n2")
    res.config = IPAMConfig(strict_affinity=True)
    with pytest.raises(Exception, match="strict affinity"):
        ipam.assign_ip("10.0.0.79", "h4", "n2")
    attrs = ipam.get_attributes("10.0.0.77")
    assert attrs is not None and attrs.handle_id == "h1" and attrs.attrs == {"pod": "a"}
    assert_consistent(ipam)


def test_release_by_ip_and_by_handle() -> None:
    ipam, ds, _ = make("10.0.0.0/24")
    a = [n.ip for n in ipam.auto_assign("ha", "n1", num4=3).ipv4]
    b = [n.ip for n in ipam.auto_assign("hb", "n1", num4=2).ipv4]
    unallocated = ipam.release_ips([ReleaseRequest(a[0]), ReleaseRequest("10.0.0.250")])
    assert unallocated == [IP("10.0.0.250")]
    assert ipam.ips_by_handle("ha") == a[1:]
    assert sorted(ipam.release_by_handle("ha")) == sorted(a[1:])
    assert ds.get(handle_key("ha")) is None  # deleted at zero
    assert ipam.release_by_handle("ha") == []  # absent handle: not an error
    assert ipam.ips_by_handle("hb") == b
    # Freed addresses go to the back of the queue: new ones come first.
    nxt = ipam.auto_assign("hc", "n1").ipv4[0].ip
    assert nxt not in a
    assert_consistent(ipam)


def test_with_a_cooldown_a_released_address_is_not_handed_out_until_its_time_is_up() -> None:
    # One /29 block, strict affinity: the released address is the only one left.
    cfg = IPAMConfig(strict_affinity=True, ip_cooldown_seconds=600)
    ipam, ds, res = make("10.0.0.0/29", config=cfg)
    got = [n.ip for n in ipam.auto_assign("h", "n1", num4=8).ipv4]
    assert ipam.release_by_handle("h")[:1] == got[:1]
    assert ds.get(handle_key("h")) is None  # the handle goes at release, as without cooldown
    assert_consistent(ipam)
    with pytest.raises(PoolExhausted):
        ipam.auto_assign("next", "n1")
    with pytest.raises(AddressInUse, match="cooling down"):
        ipam.assign_ip(got[0], "named", "n1")
    assert ipam.get_attributes(got[0]) is None and ipam.allocations_in("10.0.0.0/29") == []
    # Leak checks see no leak in a cooling address: it is nobody's.
    assert find_leaks(ipam.snapshot(), ["n1"], set(), "g").leaked == []
    # The cooldown is over (here: configured shorter): the next assignment collects them,
    # oldest release first, and writes that with its own allocation.
    res.config = IPAMConfig(strict_affinity=True, ip_cooldown_seconds=0)
    assert ipam.auto_assign("next", "n1").ipv4[0].ip in got
    assert block_of(ds, "10.0.0.0/29").cooling == 0
    assert_consistent(ipam)


def test_without_a_cooldown_a_released_address_is_free_at_once() -> None:
    ipam, ds, _ = make("10.0.0.0/29", config=IPAMConfig(strict_affinity=True))
    got = [n.ip for n in ipam.auto_assign("h", "n1", num4=8).ipv4]
    ipam.release_ips([ReleaseRequest(got[3])])
    assert ipam.auto_assign("next", "n1").ipv4[0].ip == got[3]
    assert block_of(ds, "10.0.0.0/29").cooling == 0


def test_release_with_stale_sequence_number_keeps_the_new_owner() -> None:
    ipam, _, _ = make("10.0.0.0/29")
    ip = ipam.auto_assign("old", "n1").ipv4[0].ip
    old = ipam.get_attributes(ip)
    assert old is not None
    ipam.release_by_handle("old")
    ipam.auto_assign("filler", "n1", num4=7)
    assert ipam.auto_assign("new", "n1").ipv4[0].ip == ip  # re-used
    out = ipam.release([ReleaseRequest(ip, "old", old.sequence_number)])
    assert out.released == [] and out.mismatched and out.mismatched[0][0] == ip
    assert ipam.ips_by_handle("new") == [ip]
    assert_consistent(ipam)


def test_empty_block_without_affinity_is_deleted_affine_one_kept() -> None:
    ipam, ds, _ = make("10.0.0.0/28")
    mine = ipam.auto_assign("h1", "n1", num4=2).ipv4
    cidr = str(mine[0].cidr)
    ipam.release_by_handle("h1")
    assert block_of(ds, cidr).empty  # affine: kept
    ipam.auto_assign("h2", "n1", num4=2)
    released = ipam.release_host_affinities("n1")
    assert released == [NET(cidr)]
    assert block_of(ds, cidr).affinity is None  # in use: affinity cleared, kept
    assert ds.list("/overlay/v1/ipam/affinities/").items == []
    assert_consistent(ipam)
    ipam.release_by_handle("h2")
    assert ds.get(block_key(cidr)) is None  # empty and nobody's: deleted
    assert_consistent(ipam)


def test_release_host_affinities_deletes_empty_blocks() -> None:
    ipam, ds, _ = make("10.0.0.0/24")
    ipam.auto_assign("h", "n1")
    ipam.release_by_handle("h")
    ipam.release_host_affinities("n1")
    assert ds.list("/overlay/v1/ipam/").items == []


def test_stale_cache_never_decides_ownership() -> None:
    ds = MemoryDatastore()
    res = FakeResources([pool("10.0.0.0/24", 29)])
    agent, cli = IPAM(ds, res), IPAM(ds, res)
    first = agent.auto_assign("h1", "n1").ipv4[0]  # agent caches the block as n1's
    cli.release_host_affinities("n1")  # the block keeps h1 but loses its affinity
    second = agent.auto_assign("h2", "n1").ipv4[0]
    assert second.cidr != first.cidr  # a fresh claim, not the stale cached block
    assert agent.affine_blocks("n1") == [second.cidr]
    assert_consistent(agent)


def test_block_that_stopped_being_ours_can_still_be_borrowed() -> None:
    ds = MemoryDatastore()
    res = FakeResources([pool("10.0.0.0/28", 29)])  # two blocks
    n1, n2, cli = IPAM(ds, res), IPAM(ds, res), IPAM(ds, res)
    n1.auto_assign("a", "n1", num4=8)  # n1's block is full
    mine = n2.auto_assign("b", "n2").ipv4[0].cidr
    cli.release_host_affinities("n2")  # n2's cache still lists the block
    got = n2.auto_assign("c", "n2").ipv4[0]
    assert got.cidr == mine  # the only free addresses: borrowed, not "exhausted"
    assert_consistent(n2)


def test_missing_block_of_confirmed_affinity_is_recreated() -> None:
    ipam, ds, _ = make("10.0.0.0/24")
    cidr = ipam.auto_assign("h", "n1").ipv4[0].cidr
    ipam.release_by_handle("h")
    kv = ds.get(block_key(cidr))
    assert kv is not None
    ds.delete(kv.key, kv.mod_revision)  # as if a crash lost it
    again = ipam.auto_assign("h2", "n1").ipv4[0]
    assert again.cidr == cidr and block_of(ds, str(cidr)).affinity == "host:n1"
    assert_consistent(ipam)


def test_injected_conflicts_still_give_correct_results() -> None:
    ipam, ds, res = make("10.0.0.0/26")
    res.pools.append(pool("fd00::/120", 122))
    rng = random.Random(7)
    ds.inject_conflict = lambda op, key: rng.random() < 0.4
    held: dict[str, list[netaddr.IPAddress]] = {}
    for i in range(40):
        node = f"n{i % 3}"
        got = ipam.auto_assign(f"h{i}", node, num4=1, num6=1)
        held[f"h{i}"] = [n.ip for n in got.ipv4 + got.ipv6]
        if i % 4 == 3:
            victim = f"h{i - 2}"
            assert sorted(ipam.release_by_handle(victim)) == sorted(held.pop(victim))
    ds.inject_conflict = None
    everything = [ip for ips in held.values() for ip in ips]
    assert len(everything) == len(set(everything))
    for h, ips in held.items():
        assert sorted(ipam.ips_by_handle(h)) == sorted(ips)
    assert_consistent(ipam)


def test_losing_every_block_write_gives_up_and_leaks_nothing() -> None:
    ipam, ds, _ = make("10.0.0.0/26")
    ipam.auto_assign("warm", "n1")  # the block exists; now its writes all lose
    ds.inject_conflict = lambda op, key: (
        op == "update" and key.startswith("/overlay/v1/ipam/blocks/")
    )
    with pytest.raises(MaxRetries, match="excessive concurrent IPAM requests"):
        ipam.auto_assign("h", "n1")
    ds.inject_conflict = None
    assert ds.get(handle_key("h")) is None  # the handle increment was undone
    assert_consistent(ipam)


def test_tunnel_address_is_assigned_once_and_released_without_pool() -> None:
    ds = MemoryDatastore()
    vx = pool("10.0.0.0/24", 29, vxlan_mode=EncapMode.ALWAYS)
    res = FakeResources([vx, pool("10.1.0.0/24", 29)])
    ipam = IPAM(ds, res)
    ip = ipam.ensure_tunnel_address("n1", "vxlan")
    assert ip is not None and ip in vx.cidr
    assert ipam.ensure_tunnel_address("n1", "vxlan") == ip
    attrs = ipam.get_attributes(ip)
    assert attrs is not None and attrs.handle_id == "vxlan-tunnel-addr-n1"
    assert attrs.attrs == {"node": "n1", "type": "vxlanTunnelAddress"}
    assert ipam.ensure_tunnel_address("n1", "ipip") is None  # no IPIP pool
    res.pools[0] = pool("10.0.0.0/24", 29)  # VXLAN switched off
    assert ipam.ensure_tunnel_address("n1", "vxlan") is None
    assert ipam.ips_by_handle("vxlan-tunnel-addr-n1") == []
    assert_consistent(ipam)


def test_utilization_counts_per_pool_and_block() -> None:
    ipam, _, res = make("10.0.0.0/28")
    res.reservations.append(reservation("10.0.0.0/31"))
    ipam.auto_assign("h", "n1", num4=3)
    ipam.assign_ip("10.0.0.8", "x", "n2")
    util = ipam.utilization()
    [p] = util.pools
    assert (p.total, p.in_use, p.reserved, p.free) == (16, 4, 2, 10)
    by_cidr = {str(b.cidr): b for b in p.blocks}
    first = by_cidr["10.0.0.0/29"]
    assert (first.affinity_node, first.in_use, first.reserved, first.free) == ("n1", 3, 2, 3)
    assert by_cidr["10.0.0.8/29"].affinity_node == "n2"
    assert util.orphan_blocks == []


def test_consistency_check_reports_disagreements() -> None:
    ipam, ds, _ = make("10.0.0.0/24")
    cidr = ipam.auto_assign("h", "n1", num4=2).ipv4[0].cidr
    kv = ds.get(handle_key("h"))
    assert kv is not None
    ds.update(kv.key, kv.value.replace(": 2", ": 5"), kv.mod_revision)
    akv = ds.get(affinity_key("n1", cidr))
    assert akv is not None
    ds.delete(akv.key, akv.mod_revision)
    problems = ipam.check_consistency()
    assert any("handle h counts 5" in p for p in problems)
    assert any("has no affinity record" in p for p in problems)


def test_bad_names_are_rejected() -> None:
    ipam, _, _ = make("10.0.0.0/24")
    with pytest.raises(ValueError, match="node 'a/b'"):
        ipam.auto_assign("h", "a/b")
    with pytest.raises(ValueError, match="handle ''"):
        ipam.auto_assign("", "n1")


def test_two_allocators_share_one_sqlite_store_with_real_resources(tmp_path: Path) -> None:
    from ipam.datastore.sqlite import SqliteDatastore
    from ipam.model import IPPool
    from ipam.store import ResourceStore

    ds = SqliteDatastore(tmp_path / "overlay.db")
    try:
        store = ResourceStore(ds)
        store.apply(IPPool("default", NET("10.7.0.0/26"), 29))
        a, b = IPAM(ds, store), IPAM(ds, ResourceStore(ds))
        got = [a.auto_assign(f"a{i}", "n1").ipv4[0].ip for i in range(10)]
        got += [b.auto_assign(f"b{i}", "n2").ipv4[0].ip for i in range(10)]
        assert len(set(got)) == 20
        assert {c.prefixlen for c in a.affine_blocks("n1")} == {29}
        assert b.release_by_handle("a3") == [got[3]]
        assert a.ips_by_handle("a3") == []
        assert a.check_consistency() == []
    finally:
        ds.close()


def test_allocations_in_a_block_come_with_what_they_carry() -> None:
    ipam, _, _ = make("10.0.0.0/24")
    got = ipam.auto_assign("h1", "n1", num4=2, attrs={"pod": "a"}).ipv4
    cidr = got[0].cidr
    held = ipam.allocations_in(cidr)
    assert {a.address for a in held} == {n.ip for n in got}
    assert {(a.handle_id, a.attrs["pod"]) for a in held} == {("h1", "a")}
    assert ipam.allocations_in("10.0.0.248/29") == []  # no such block
