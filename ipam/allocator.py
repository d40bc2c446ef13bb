"""The block-affinity IP allocator (Calico's IPAM semantics) over any Datastore.

Correctness comes from compare-and-swap, not locks: every write names the revision it was
computed from and is retried from a fresh read when it loses (at most `retries` times).
Write orders are chosen so that a crash between two writes never hands out an address
twice: an assign counts the handle before it writes the block (and uncounts it if the
block write fails); a release writes the block before it uncounts the handle; a block is
claimed in two phases (affinity pending -> block created with the affinity -> confirmed);
an affinity is released in three (pendingDeletion -> block deleted or its affinity cleared
-> record deleted).

The per-node list of affine blocks is cached to keep the common assign at one block read,
one handle write and one block write; the cache is only a hint, the block's own affinity
field is checked on every use.
"""

from __future__ import annotations

import contextlib
import datetime
import random
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import netaddr

from ipam.block import (
    Allocation,
    Block,
    BlockRelease,
    block_count,
    block_for,
    block_index,
    host_affinity,
    nth_block,
    parse_time,
)
from ipam.datastore.base import KV, AlreadyExists, Ambiguous, Conflict, Datastore, NotFound
from ipam.errors import (
    AddressReserved,
    BlockLimitReached,
    IPAMError,
    MaxRetries,
    NotInPool,
    PoolExhausted,
)
from ipam.model import (
    DEFAULT_MAX_BLOCKS_PER_HOST,
    USE_TUNNEL,
    USE_WORKLOAD,
    EncapMode,
    IPAMConfig,
    IPPool,
    IPReservation,
    Node,
)
from ipam.records import (
    BLOCKS_PREFIX,
    CONFIRMED,
    IPAM_PREFIX,
    PENDING,
    PENDING_DELETION,
    AffinityRecord,
    HandleRecord,
    IPAMSnapshot,
    affinity_key,
    affinity_prefix,
    block_key,
    check_name,
    consistency_problems,
    handle_key,
)

if TYPE_CHECKING:
    from ipam.selector import Selector

TunnelKind = Literal["vxlan", "vxlan-v6", "ipip"]

# kind -> (handle prefix, allocation `type` attribute, IP version)
_TUNNELS: dict[str, tuple[str, str, int]] = {
    "vxlan": ("vxlan-tunnel-addr-", "vxlanTunnelAddress", 4),
    "vxlan-v6": ("vxlan-v6-tunnel-addr-", "vxlanV6TunnelAddress", 6),
    "ipip": ("ipip-tunnel-addr-", "ipipTunnelAddress", 4),
}


class ClusterResources(Protocol):
    """The cluster resources the allocator reads (ipam.store.ResourceStore provides them)."""

    def list_pools(self) -> list[IPPool]: ...

    def ipam_config(self) -> IPAMConfig: ...

    def list_reservations(self) -> list[IPReservation]: ...

    def get_node(self, name: str) -> Node | None: ...

    def list_nodes(self) -> list[Node]: ...


@dataclass
class AssignResult:
    """Assigned addresses, each with its block's prefix (e.g. 10.244.3.130/26)."""

    ipv4: list[netaddr.IPNetwork] = field(default_factory=list)
    ipv6: list[netaddr.IPNetwork] = field(default_factory=list)


@dataclass(frozen=True)
class ReleaseRequest:
    """An address to free; handle / sequence_number, when given, must match (ABA guard)."""

    ip: netaddr.IPAddress | str
    handle: str | None = None
    sequence_number: int | None = None


@dataclass
class ReleaseOutcome:
    released: list[netaddr.IPAddress] = field(default_factory=list)
    unallocated: list[netaddr.IPAddress] = field(default_factory=list)
    mismatched: list[tuple[netaddr.IPAddress, str]] = field(default_factory=list)


@dataclass(frozen=True)
class BlockUsage:
    cidr: netaddr.IPNetwork
    affinity_node: str | None
    total: int
    in_use: int  # allocated, or cooling down after a release (ipCooldownSeconds)
    reserved: int
    free: int  # assignable: neither allocated nor reserved
    cooling: int = 0  # of in_use: released, resting until their cooldown is over


@dataclass(frozen=True)
class PoolUsage:
    name: str
    cidr: netaddr.IPNetwork
    disabled: bool
    total: int
    in_use: int
    reserved: int
    free: int
    blocks: list[BlockUsage]
    cooling: int = 0


@dataclass(frozen=True)
class Utilization:
    pools: list[PoolUsage]
    orphan_blocks: list[BlockUsage]  # blocks inside no configured pool


# Calico's EmptyBlockMinReclaimAge: how long an empty block stays its node's before another
# node that finds no free block CIDR may take it over.
EMPTY_BLOCK_MIN_RECLAIM_AGE = datetime.timedelta(minutes=1)


def fnv32(text: str) -> int:
    """FNV-1 32-bit hash (Calico seeds its block order with it)."""
    h = 0x811C9DC5
    for byte in text.encode():
        h = (h * 0x01000193) & 0xFFFFFFFF
        h ^= byte
    return h


def random_block_order(pool: IPPool, node: str) -> Iterator[netaddr.IPNetwork]:
    """The pool's blocks from a start chosen by the node name, wrapping around: retries
    revisit blocks in the same order and different nodes start in different places."""
    n = block_count(pool)
    start = random.Random(fnv32(node)).randrange(n)
    for i in range(n):
        yield nth_block(pool, (start + i) % n)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def _cooled_before(cfg: IPAMConfig) -> str:
    """Addresses released before this time have cooled down."""
    now = datetime.datetime.now(datetime.UTC)
    return (now - datetime.timedelta(seconds=cfg.ip_cooldown_seconds)).isoformat()


def _empty_when_cooled(block: Block, cooled_before: str) -> bool:
    """Whether `block` (a copy: it is changed) holds nothing once cooled addresses are free."""
    block.collect_cooled(cooled_before)
    return block.empty


def _claimed_after(claim_time: str | None, when: datetime.datetime) -> bool:
    """Whether a block's affinityClaimTime is later than `when` (no time or an unreadable
    one counts as long ago, as a zero time does in Calico)."""
    claimed = parse_time(claim_time) if claim_time else None
    return claimed is not None and claimed > when


def _check_use(pool: IPPool, use: str) -> None:
    if use not in pool.allowed_uses:
        uses = ", ".join(sorted(pool.allowed_uses, reverse=True))
        raise NotInPool(
            f"pool {pool.name} ({pool.cidr}) is not for {use} addresses (allowedUses: {uses})"
        )


def _with_prefix(ip: netaddr.IPAddress, block: netaddr.IPNetwork) -> netaddr.IPNetwork:
    return netaddr.IPNetwork((int(ip), block.prefixlen), version=block.version)


class IPAM:
    def __init__(self, ds: Datastore, resources: ClusterResources, *, retries: int = 100):
        if retries < 1:
            raise ValueError(f"retries {retries}: must be at least 1")
        self._ds = ds
        self._res = resources
        self._retries = retries
        self._lock = threading.Lock()
        self._affine: dict[tuple[str, int], list[netaddr.IPNetwork]] = {}
        self._selectors: dict[str, Selector] = {}
        # The last version of each block this instance wrote. An assign starts from it
        # instead of reading the block again (one datastore round trip less per assign);
        # the CAS on its revision catches every change made elsewhere since.
        self._written: dict[str, KV] = {}

    # ==== public API ======================================================================

    def auto_assign(
        self,
        handle: str,
        node: str,
        *,
        num4: int = 1,
        num6: int = 0,
        attrs: dict[str, str] | None = None,
        pools: list[netaddr.IPNetwork] | None = None,
        use: str = USE_WORKLOAD,
    ) -> AssignResult:
        """Assign num4 IPv4 and num6 IPv6 addresses to `handle` for `node`: from the
        node's affine blocks, then a newly claimed block, then (unless strict affinity)
        borrowed from other nodes' blocks. All or nothing: on error nothing is kept.
        `use` (Calico's intended use) must be among each pool's allowedUses; without
        `pools`, Manual pools are left out."""
        check_name("handle", handle)
        check_name("node", node)
        for name, num in (("num4", num4), ("num6", num6)):
            if num < 0:
                raise ValueError(f"{name} {num}: must not be negative")
        cfg = self._res.ipam_config()
        reserved = self._reserved()
        result = AssignResult()
        try:
            if num4:
                self._auto_assign_family(
                    4, num4, handle, node, attrs or {}, pools, use, cfg, reserved, result.ipv4
                )
            if num6:
                self._auto_assign_family(
                    6, num6, handle, node, attrs or {}, pools, use, cfg, reserved, result.ipv6
                )
        except BaseException:
            taken = [ReleaseRequest(n.ip, handle) for n in result.ipv4 + result.ipv6]
            if taken:  # never handed out: free at once, no cooldown
                self._release(taken, released_at=None)
            raise
        return result

    def assign_ip(
        self,
        ip: netaddr.IPAddress | str,
        handle: str,
        node: str,
        attrs: dict[str, str] | None = None,
        use: str = USE_WORKLOAD,
    ) -> netaddr.IPNetwork:
        """Assign one specific address. Idempotent when `handle` already holds it. Its pool
        must allow `use`; a Manual pool is fine (the address names it)."""
        check_name("handle", handle)
        check_name("node", node)
        addr = netaddr.IPAddress(ip)
        pool = self._enabled_pool_of(addr)
        _check_use(pool, use)
        reserved = self._reserved()
        if any(addr in r for r in reserved):
            raise AddressReserved(f"address {addr} is reserved by an IPReservation")
        cidr = block_for(addr, pool)
        cfg = self._res.ipam_config()
        strict = cfg.strict_affinity
        key = block_key(cidr)
        for _ in range(self._retries):
            kv = self._ds.get(key)
            if kv is None:
                self._claim(cidr, node)  # lost to another node: its block exists now
                continue
            block = Block.from_json(kv.value)
            block.collect_cooled(_cooled_before(cfg))
            if strict and block.host != node:
                raise IPAMError(
                    f"address {addr}: its block {cidr} is affine to {block.affinity!r}, "
                    f"not host:{node}, and strict affinity is enabled"
                )
            if not block.assign(addr, handle, attrs or {}, reserved):
                return _with_prefix(addr, cidr)
            if self._write_assigned(key, kv, block, handle, [addr]):
                return _with_prefix(addr, cidr)
        raise self._max_retries(f"assign {addr}")

    def release_ips(self, requests: Iterable[ReleaseRequest]) -> list[netaddr.IPAddress]:
        """Free addresses; returns those that were not allocated. Addresses whose handle
        or sequence number does not match stay allocated (see release())."""
        return self.release(requests).unallocated

    def release(self, requests: Iterable[ReleaseRequest]) -> ReleaseOutcome:
        """Free addresses, grouped per block (one write per block). With a cooldown
        configured they rest first (see ipam/block.py)."""
        return self._release(requests, self._release_stamp())

    def _release(
        self, requests: Iterable[ReleaseRequest], released_at: str | None
    ) -> ReleaseOutcome:
        out = ReleaseOutcome()
        pools = self._res.list_pools()
        groups: dict[str, list[ReleaseRequest]] = {}
        strays: list[ReleaseRequest] = []
        for req in requests:
            addr = netaddr.IPAddress(req.ip)
            pool = next((p for p in pools if p.version == addr.version and addr in p.cidr), None)
            if pool is None:
                strays.append(req)
            else:
                groups.setdefault(str(block_for(addr, pool)), []).append(req)
        if strays:  # in no pool (deleted?): find their blocks by scanning
            blocks = [Block.from_json(kv.value).cidr for kv in self._ds.list(BLOCKS_PREFIX).items]
            for req in strays:
                addr = netaddr.IPAddress(req.ip)
                home = next((b for b in blocks if b.version == addr.version and addr in b), None)
                if home is None:
                    out.unallocated.append(addr)
                else:
                    groups.setdefault(str(home), []).append(req)
        for cidr, reqs in groups.items():
            self._release_in_block(cidr, reqs, out, released_at)
        return out

    def _release_stamp(self) -> str | None:
        """The release time to record when released addresses must cool down, else None."""
        return _now() if self._res.ipam_config().ip_cooldown_seconds > 0 else None

    def release_by_handle(self, handle: str) -> list[netaddr.IPAddress]:
        """Free every address of `handle`; [] when the handle does not exist."""
        check_name("handle", handle)
        kv = self._ds.get(handle_key(handle))
        if kv is None:
            return []
        rec = HandleRecord.from_json(kv.value)
        freed: list[netaddr.IPAddress] = []
        hint: KV | None = kv
        released_at = self._release_stamp()
        for cidr, counted in rec.blocks.items():
            ips = self._release_handle_in_block(cidr, handle, released_at)
            freed.extend(ips)
            # Also drops a count left by a crash between handle and block write.
            self._adjust_handle(handle, cidr, -max(len(ips), counted), hint)
            hint = None
        return freed

    def ips_by_handle(self, handle: str) -> list[netaddr.IPAddress]:
        check_name("handle", handle)
        kv = self._ds.get(handle_key(handle))
        if kv is None:
            return []
        out: list[netaddr.IPAddress] = []
        for cidr in HandleRecord.from_json(kv.value).blocks:
            bkv = self._ds.get(block_key(cidr))
            if bkv is not None:
                out.extend(Block.from_json(bkv.value).ips_by_handle(handle))
        return out

    def get_attributes(self, ip: netaddr.IPAddress | str) -> Allocation | None:
        """Handle, attributes and sequence number of an allocated address, else None."""
        addr = netaddr.IPAddress(ip)
        pool = next(
            (p for p in self._res.list_pools() if p.version == addr.version and addr in p.cidr),
            None,
        )
        if pool is None:
            raise NotInPool(f"address {addr} is not in any IP pool")
        kv = self._ds.get(block_key(block_for(addr, pool)))
        return None if kv is None else Block.from_json(kv.value).allocation(addr)

    def allocations_in(self, cidr: netaddr.IPNetwork | str) -> list[Allocation]:
        """Every allocated address of one block with what it carries (one read)."""
        kv = self._ds.get(block_key(netaddr.IPNetwork(cidr)))
        if kv is None:
            return []
        block = Block.from_json(kv.value)
        return [
            a
            for o, index in enumerate(block.allocations)
            if index is not None and (a := block.allocation(block.address(o))) is not None
        ]

    def affine_blocks(self, node: str) -> list[netaddr.IPNetwork]:
        """The node's blocks with a confirmed affinity (fresh from the datastore)."""
        check_name("node", node)
        return self._affine_blocks(node, 4, fresh=True) + self._affine_blocks(node, 6, fresh=True)

    def release_host_affinities(self, node: str) -> list[netaddr.IPNetwork]:
        """Give up all of the node's blocks: empty ones are deleted, the others lose their
        affinity (their addresses stay allocated). Returns the blocks released."""
        check_name("node", node)
        released = []
        for kv in self._ds.list(affinity_prefix(node)).items:
            cidr = AffinityRecord.from_json(kv.value).cidr
            self.release_block_affinity(node, cidr)
            released.append(cidr)
        with self._lock:
            self._affine.pop((node, 4), None)
            self._affine.pop((node, 6), None)
        return released

    def release_block_affinity(
        self, node: str, cidr: netaddr.IPNetwork | str, *, require_empty: bool = False
    ) -> bool:
        """Release one affinity (pendingDeletion -> block -> record). With require_empty a
        non-empty block keeps its affinity and False is returned."""
        cidr = netaddr.IPNetwork(cidr)
        akey, bkey = affinity_key(node, cidr), block_key(cidr)
        if not self._set_affinity_state(node, cidr, PENDING_DELETION, create=False):
            return True  # no record: nothing to release
        cooled = _cooled_before(self._res.ipam_config())
        for _ in range(self._retries):
            kv = self._ds.get(bkey)
            if kv is None:
                break
            block = Block.from_json(kv.value)
            block.collect_cooled(cooled)  # addresses whose cooldown is over are free
            if block.host != node:
                break  # the record was stale
            try:
                if block.empty:
                    self._ds.delete(bkey, kv.mod_revision)
                elif require_empty:
                    self._set_affinity_state(node, cidr, CONFIRMED, create=False)
                    return False
                else:
                    block.affinity = None
                    block.affinity_claim_time = None
                    block.sequence_number += 1
                    self._ds.update(bkey, block.to_json(), kv.mod_revision)
                break
            except (Conflict, NotFound):
                continue
        else:
            raise self._max_retries(f"release affinity of {node} for {cidr}")
        self._delete_affinity(akey, only_state=PENDING_DELETION)
        self._forget_affine(node, cidr)
        return True

    def ensure_tunnel_address(
        self, node: str, kind: TunnelKind, pools: list[IPPool] | None = None
    ) -> netaddr.IPAddress | None:
        """The node's tunnel address of `kind`, assigned if missing, released if no pool
        qualifies (then None). `pools` defaults to the enabled pools whose mode for `kind`
        is Always or CrossSubnet and whose nodeSelector matches the node."""
        check_name("node", node)
        if kind not in _TUNNELS:
            raise ValueError(f"tunnel kind {kind!r}: expected one of {sorted(_TUNNELS)}")
        prefix, type_, version = _TUNNELS[kind]
        handle = prefix + node
        if pools is None:
            pools = self.tunnel_pools(node, kind)
        qualifying = [p for p in pools if p.version == version and p.automatic_for(USE_TUNNEL)]
        held = self.ips_by_handle(handle)
        keep = next((ip for ip in held if any(ip in p.cidr for p in qualifying)), None)
        extra = [ReleaseRequest(ip, handle) for ip in held if ip != keep]
        if extra:
            self.release(extra)
        if keep is not None or not qualifying:
            return keep
        result = self.auto_assign(
            handle,
            node,
            num4=1 if version == 4 else 0,
            num6=1 if version == 6 else 0,
            attrs={"node": node, "type": type_},
            pools=[p.cidr for p in qualifying],
            use=USE_TUNNEL,
        )
        return (result.ipv4 + result.ipv6)[0].ip

    def tunnel_pools(self, node: str, kind: TunnelKind) -> list[IPPool]:
        version = _TUNNELS[kind][2]
        modes = (EncapMode.ALWAYS, EncapMode.CROSS_SUBNET)
        candidates = [
            p
            for p in self._res.list_pools()
            if p.version == version
            and p.automatic_for(USE_TUNNEL)
            and (p.ipip_mode if kind == "ipip" else p.vxlan_mode) in modes
        ]
        return self._select_for_node(candidates, node)

    def utilization(self) -> Utilization:
        """Per pool and per block: total, in use, reserved, free (assignable), affinity."""
        reserved = self._reserved()
        blocks = [Block.from_json(kv.value) for kv in self._ds.list(BLOCKS_PREFIX).items]
        pools = sorted(self._res.list_pools(), key=lambda p: (p.version, p.cidr.first))
        usage_of: dict[str, list[BlockUsage]] = {p.name: [] for p in pools}
        orphans: list[BlockUsage] = []
        for b in sorted(blocks, key=lambda b: (b.cidr.version, b.cidr.first)):
            skip = b.reserved_ordinals(reserved)
            free_reserved = sum(1 for o in b.unallocated if o in skip)
            use = BlockUsage(
                b.cidr, b.host, b.size, b.in_use, len(skip), b.free - free_reserved, b.cooling
            )
            owner = next((p for p in pools if b.cidr in p.cidr), None)
            (usage_of[owner.name] if owner else orphans).append(use)
        out = []
        for p in pools:
            pool_reserved = netaddr.IPSet(reserved) & netaddr.IPSet([p.cidr])
            in_use = sum(u.in_use for u in usage_of[p.name])
            # Reserved addresses that are nevertheless allocated count once.
            reserved_in_use = sum(
                u.reserved - (u.total - u.in_use - u.free) for u in usage_of[p.name]
            )
            free = p.cidr.size - in_use - pool_reserved.size + reserved_in_use
            out.append(
                PoolUsage(
                    p.name,
                    p.cidr,
                    p.disabled,
                    p.cidr.size,
                    in_use,
                    pool_reserved.size,
                    free,
                    usage_of[p.name],
                    sum(u.cooling for u in usage_of[p.name]),
                )
            )
        return Utilization(out, orphans)

    def snapshot(self) -> IPAMSnapshot:
        """All blocks, affinities and handles from ONE listing (one store revision)."""
        listing = self._ds.list(IPAM_PREFIX)
        snap = IPAMSnapshot(listing.revision, {}, [], {})
        for kv in listing.items:
            try:
                if kv.key.startswith(BLOCKS_PREFIX):
                    b = Block.from_json(kv.value)
                    snap.blocks[str(b.cidr)] = b
                elif kv.key.startswith(IPAM_PREFIX + "affinities/"):
                    snap.affinities.append(AffinityRecord.from_json(kv.value))
                elif kv.key.startswith(IPAM_PREFIX + "handles/"):
                    h = HandleRecord.from_json(kv.value)
                    snap.handles[h.handle_id] = h
            except (ValueError, KeyError, TypeError):
                snap.undecodable.append(kv.key)
        return snap

    def check_consistency(self) -> list[str]:
        """Disagreements between blocks, affinities and handles ([] when consistent)."""
        return consistency_problems(self.snapshot())

    # ==== assignment internals ============================================================

    def _auto_assign_family(
        self,
        version: int,
        num: int,
        handle: str,
        node: str,
        attrs: dict[str, str],
        requested: list[netaddr.IPNetwork] | None,
        use: str,
        cfg: IPAMConfig,
        reserved: list[netaddr.IPNetwork],
        out: list[netaddr.IPNetwork],
    ) -> None:
        pools = self._pools_for(version, node, requested, use)
        if not pools:
            raise PoolExhausted(
                f"no enabled IPv{version} pool for {use} addresses applies to node {node!r}"
            )
        self._release_unselected(version, node, pools)
        need = num
        tried: set[netaddr.IPNetwork] = set()
        cooled = _cooled_before(cfg)

        def take(cidr: netaddr.IPNetwork, owner: str | None, hint: KV | None = None) -> None:
            nonlocal need
            tried.add(cidr)
            got = self._assign_in_block(cidr, need, handle, attrs, reserved, owner, cooled, hint)
            out.extend(got)
            need -= len(got)
            if owner is not None:
                # Hint for the next request: a block with room first, a full one last.
                self._reorder_affine(owner, cidr, to_front=bool(got) and need == 0)

        # 1. The node's own blocks: cached list first, then a fresh one (unless the
        # cache was empty, in which case the first pass already read it fresh).
        with self._lock:
            passes = (False, True) if (node, version) in self._affine else (False,)
        for fresh in passes:
            for cidr in self._affine_blocks(node, version, fresh):
                if need and cidr not in tried and any(cidr in p.cidr for p in pools):
                    take(cidr, node)
            if not need:
                return

        # 2. Claim new blocks; the cap holds even where borrowing would succeed.
        cap = cfg.max_blocks_per_host or DEFAULT_MAX_BLOCKS_PER_HOST
        if cfg.auto_allocate_blocks:
            for _ in range(self._retries):
                if len(self._affine_blocks(node, version, fresh=False)) >= cap:
                    raise BlockLimitReached(
                        f"cannot allocate new block due to per host block limit "
                        f"({cap} blocks) for node {node!r}"
                    )
                cidr = self._claim_free_block(node, pools, reserved)
                if cidr is None:
                    break
                take(cidr, node)
                if not need:
                    return

        # 3. Borrow from blocks that other nodes own (or nobody does).
        if not cfg.strict_affinity:
            listed = [(Block.from_json(kv.value), kv) for kv in self._ds.list(BLOCKS_PREFIX).items]
            for pool in pools:
                n = block_count(pool)
                start = random.Random(fnv32(node)).randrange(n)
                candidates = sorted(
                    (
                        (b, kv)
                        for b, kv in listed
                        if b.cidr.version == version and b.cidr in pool.cidr
                    ),
                    key=lambda item: (block_index(pool, item[0].cidr) - start) % n,
                )
                # The listing postdates steps 1-2, so blocks tried there show up full;
                # one skipped there as no longer ours may be borrowed like any other.
                for block, kv in candidates:
                    block.collect_cooled(cooled)  # (on this copy: to judge it)
                    if need and block.assignable(reserved):
                        take(block.cidr, None, kv)
                if not need:
                    return

        names = ", ".join(str(p.cidr) for p in pools)
        why = "; strict affinity is enabled, so no borrowing" if cfg.strict_affinity else ""
        raise PoolExhausted(f"no free addresses in pools {names}{why}")

    def _assign_in_block(
        self,
        cidr: netaddr.IPNetwork,
        num: int,
        handle: str,
        attrs: dict[str, str],
        reserved: list[netaddr.IPNetwork],
        owner: str | None,
        cooled_before: str,
        hint: KV | None = None,
    ) -> list[netaddr.IPNetwork]:
        """Up to `num` addresses from one block; with `owner`, only while the block is
        still affine to that node. Addresses released before `cooled_before` are free."""
        key = block_key(cidr)
        kv = hint
        remembered = False
        if kv is None:
            kv = self._written.get(key)
            remembered = kv is not None
        for _ in range(self._retries):
            if kv is None:
                kv = self._ds.get(key)
                remembered = False
            if kv is None:
                if owner is not None and self._recreate_affine_block(owner, cidr):
                    continue
                return []
            block = Block.from_json(kv.value)
            block.collect_cooled(cooled_before)
            stale_owner = owner is not None and block.host != owner
            ips = [] if stale_owner else block.auto_assign(num, handle, attrs, reserved)
            if not ips and remembered:
                kv = None  # decide "not ours" or "full" only on a fresh read
                continue
            if stale_owner:
                assert owner is not None
                self._drop_stale_affinity(owner, cidr)
                return []
            if not ips:
                return []
            if self._write_assigned(key, kv, block, handle, ips):
                return [_with_prefix(ip, block.cidr) for ip in ips]
            kv = None
        raise self._max_retries(f"assign in block {cidr}")

    def _write_assigned(
        self, key: str, kv: KV, block: Block, handle: str, ips: list[netaddr.IPAddress]
    ) -> bool:
        """Count the handle, then write the block; False (handle uncounted) on conflict."""
        n = len(ips)
        self._adjust_handle(handle, str(block.cidr), n)
        try:
            value = block.to_json()
            self._written[key] = KV(key, value, self._ds.update(key, value, kv.mod_revision))
            return True
        except Conflict as e:
            self._written.pop(key, None)
            # Retrying a write that did land would hand out a second address and leak the
            # first: look for our allocations, with the sequence number we gave them.
            if isinstance(e, Ambiguous) and all(
                self._still_held(key, [a for ip in ips if (a := block.allocation(ip))])
            ):
                return True
            self._adjust_handle(handle, str(block.cidr), -n)
            return False
        except BaseException:
            self._adjust_handle(handle, str(block.cidr), -n)
            raise

    def _still_held(self, key: str, allocations: list[Allocation]) -> list[bool]:
        """For each allocation, whether the stored block holds exactly it (same address,
        handle, attributes and sequence number). After an Ambiguous write this tells
        whether our attempt landed: a block's sequence numbers never repeat."""
        kv = self._ds.get(key)
        stored = None if kv is None else Block.from_json(kv.value)
        return [stored is not None and stored.allocation(a.address) == a for a in allocations]

    # ==== claiming blocks =================================================================

    def _claim_free_block(
        self, node: str, pools: list[IPPool], reserved: list[netaddr.IPNetwork]
    ) -> netaddr.IPNetwork | None:
        """Claim the first block CIDR (in the node's random order) that has no block; when
        every CIDR has one, reclaim an empty block of another node's."""
        existing = set(self._ds.keys(BLOCKS_PREFIX).keys)  # keys only: values are large
        for pool in pools:
            for cidr in random_block_order(pool, node):
                if block_key(cidr) in existing:
                    continue
                if any(cidr in r for r in reserved):
                    continue  # wholly reserved
                if self._claim(cidr, node):
                    return cidr
        return self._reclaim_empty_block(node, pools, reserved)

    def _reclaim_empty_block(
        self, node: str, pools: list[IPPool], reserved: list[netaddr.IPNetwork]
    ) -> netaddr.IPNetwork | None:
        """Calico's last resort before borrowing: take over an empty block that another node
        claimed at least a minute ago (a younger one is about to be used, and the age keeps
        two nodes from passing a block back and forth). The release re-checks emptiness
        under its compare-and-swap, so a block that gains an address stays where it is."""
        listed = {kv.key: kv for kv in self._ds.list(BLOCKS_PREFIX).items}
        oldest = datetime.datetime.now(datetime.UTC) - EMPTY_BLOCK_MIN_RECLAIM_AGE
        cooled = _cooled_before(self._res.ipam_config())
        for pool in pools:
            for cidr in random_block_order(pool, node):
                kv = listed.get(block_key(cidr))
                if kv is None or any(cidr in r for r in reserved):
                    continue
                block = Block.from_json(kv.value)
                owner = block.host
                if owner is None or owner == node or not _empty_when_cooled(block, cooled):
                    continue
                if _claimed_after(block.affinity_claim_time, oldest):
                    continue
                if self.release_block_affinity(owner, cidr, require_empty=True) and self._claim(
                    cidr, node
                ):
                    return cidr
        return None

    def _claim(self, cidr: netaddr.IPNetwork, node: str) -> bool:
        """Two-phase claim. False when another node's block holds the CIDR."""
        self._set_affinity_state(node, cidr, PENDING, create=True, keep_confirmed=True)
        key = block_key(cidr)
        mine = host_affinity(node)
        for _ in range(self._retries):
            block = Block.new(cidr, mine, claim_time=_now())
            try:
                self._ds.create(key, block.to_json())
                break
            except AlreadyExists:
                kv = self._ds.get(key)
                if kv is None:
                    continue
                if Block.from_json(kv.value).affinity == mine:
                    break
                self._delete_affinity(affinity_key(node, cidr))
                return False
        else:
            raise self._max_retries(f"claim block {cidr}")
        self._set_affinity_state(node, cidr, CONFIRMED, create=True)
        with self._lock:
            cached = self._affine.get((node, cidr.version))
            if cached is not None and cidr not in cached:
                cached.append(cidr)
        return True

    def _set_affinity_state(
        self,
        node: str,
        cidr: netaddr.IPNetwork,
        state: str,
        *,
        create: bool,
        keep_confirmed: bool = False,
    ) -> bool:
        """CAS the affinity record into `state`; False if it is absent and not created."""
        key = affinity_key(node, cidr)
        value = AffinityRecord(node, cidr, state).to_json()
        for _ in range(self._retries):
            kv = self._ds.get(key)
            try:
                if kv is None:
                    if not create:
                        return False
                    self._ds.create(key, value)
                    return True
                current = AffinityRecord.from_json(kv.value).state
                if current == state or (keep_confirmed and current == CONFIRMED):
                    return True
                self._ds.update(key, value, kv.mod_revision)
                return True
            except Conflict:
                continue
        raise self._max_retries(f"set affinity of {node} for {cidr} to {state}")

    def _delete_affinity(self, key: str, only_state: str | None = None) -> None:
        for _ in range(self._retries):
            kv = self._ds.get(key)
            if kv is None:
                return
            if only_state and AffinityRecord.from_json(kv.value).state != only_state:
                return  # re-claimed meanwhile: theirs now
            try:
                self._ds.delete(key, kv.mod_revision)
                return
            except NotFound:
                return
            except Conflict:
                continue
        raise self._max_retries(f"delete affinity {key}")

    def _recreate_affine_block(self, node: str, cidr: netaddr.IPNetwork) -> bool:
        """A confirmed affinity whose block is missing (a crash mid-claim, or a release
        race): create the block again. False (and forget it) when not confirmed."""
        kv = self._ds.get(affinity_key(node, cidr))
        if kv is None or AffinityRecord.from_json(kv.value).state != CONFIRMED:
            self._forget_affine(node, cidr)
            return False
        with contextlib.suppress(AlreadyExists):
            self._ds.create(block_key(cidr), Block.new(cidr, host_affinity(node)).to_json())
        return True

    def _drop_stale_affinity(self, node: str, cidr: netaddr.IPNetwork) -> None:
        """The block no longer names `node`: a confirmed record for it is stale."""
        self._forget_affine(node, cidr)
        akey = affinity_key(node, cidr)
        kv = self._ds.get(akey)
        if kv is None or AffinityRecord.from_json(kv.value).state != CONFIRMED:
            return  # pending: a claim in flight; pendingDeletion: a release in flight
        bkv = self._ds.get(block_key(cidr))
        if bkv is not None and Block.from_json(bkv.value).host == node:
            return
        with contextlib.suppress(Conflict, NotFound):  # changed meanwhile: theirs
            self._ds.delete(akey, kv.mod_revision)

    # ==== affine block cache ==============================================================

    def _release_unselected(self, version: int, node: str, usable: list[IPPool]) -> None:
        """Calico's rule at each assignment: an EMPTY block still affine to `node` whose pool
        no longer selects the node (its selector or the node's labels changed) gives up its
        affinity, so that it neither counts against the node's block cap nor stays out of
        other nodes' reach. A block with addresses keeps it until they are released; a
        block outside every pool (the pool was deleted) is left alone, as Calico does."""
        strays = [
            cidr
            for cidr in self._affine_blocks(node, version, fresh=False)
            if not any(cidr in p.cidr for p in usable)
        ]
        if not strays:
            return
        pools = [p for p in self._res.list_pools() if p.version == version]
        cooled = _cooled_before(self._res.ipam_config())
        for cidr in strays:
            pool = next((p for p in pools if cidr in p.cidr), None)
            if pool is None or self._select_for_node([pool], node):
                continue  # a pool that still selects the node, e.g. one left out by request
            kv = self._ds.get(block_key(cidr))
            if kv is not None and not _empty_when_cooled(Block.from_json(kv.value), cooled):
                continue  # cheap check first; the release re-checks under its CAS
            with contextlib.suppress(MaxRetries):  # cleanup only: the next assignment retries
                self.release_block_affinity(node, cidr, require_empty=True)

    def _affine_blocks(self, node: str, version: int, fresh: bool) -> list[netaddr.IPNetwork]:
        with self._lock:
            cached = self._affine.get((node, version))
            if cached is not None and not fresh:
                return list(cached)
        records = [
            AffinityRecord.from_json(kv.value) for kv in self._ds.list(affinity_prefix(node)).items
        ]
        cidrs = sorted(
            (r.cidr for r in records if r.state == CONFIRMED and r.cidr.version == version),
            key=lambda c: c.first,
        )
        with self._lock:
            self._affine[(node, version)] = list(cidrs)
        return cidrs

    def _reorder_affine(self, node: str, cidr: netaddr.IPNetwork, to_front: bool) -> None:
        with self._lock:
            cached = self._affine.get((node, cidr.version))
            if cached is not None and cidr in cached:
                cached.remove(cidr)
                cached.insert(0 if to_front else len(cached), cidr)

    def _forget_affine(self, node: str, cidr: netaddr.IPNetwork) -> None:
        with self._lock:
            cached = self._affine.get((node, cidr.version))
            if cached is not None and cidr in cached:
                cached.remove(cidr)

    # ==== release internals ===============================================================

    def _release_in_block(
        self,
        cidr: str,
        reqs: list[ReleaseRequest],
        out: ReleaseOutcome,
        released_at: str | None,
    ) -> None:
        key = block_key(cidr)
        for _ in range(self._retries):
            kv = self._ds.get(key)
            if kv is None:
                out.unallocated.extend(netaddr.IPAddress(r.ip) for r in reqs)
                return
            block = Block.from_json(kv.value)
            res = BlockRelease()
            for r in reqs:
                one = block.release([r.ip], r.handle, r.sequence_number, released_at)
                res.released += one.released
                res.unallocated += one.unallocated
                res.mismatched += one.mismatched
            freed = [ip for ip, _ in res.released]
            if freed and not self._write_released(key, kv, block, freed):
                continue
            break
        else:
            raise self._max_retries(f"release in block {cidr}")
        out.released += [ip for ip, _ in res.released]
        out.unallocated += res.unallocated
        out.mismatched += res.mismatched
        self._uncount(cidr, [h for _, h in res.released])

    def _release_handle_in_block(
        self, cidr: str, handle: str, released_at: str | None
    ) -> list[netaddr.IPAddress]:
        key = block_key(cidr)
        for _ in range(self._retries):
            kv = self._ds.get(key)
            if kv is None:
                return []
            block = Block.from_json(kv.value)
            ips = block.release_handle(handle, released_at)
            if not ips or self._write_released(key, kv, block, ips):
                return ips
        raise self._max_retries(f"release handle {handle} in block {cidr}")

    def _write_released(
        self, key: str, kv: KV, block: Block, freed: list[netaddr.IPAddress]
    ) -> bool:
        """Write a block after a release; an empty block nobody owns is deleted."""
        try:
            if block.empty and block.affinity is None:
                self._written.pop(key, None)
                self._ds.delete(key, kv.mod_revision)
            else:
                value = block.to_json()
                self._written[key] = KV(key, value, self._ds.update(key, value, kv.mod_revision))
            return True
        except (Conflict, NotFound) as e:
            self._written.pop(key, None)
            if isinstance(e, Ambiguous):
                # Landed if none of the freed allocations is still stored (a retry would
                # find them free and leave their handle counted).
                before = Block.from_json(kv.value)
                held = [a for ip in freed if (a := before.allocation(ip))]
                return not any(self._still_held(key, held))
            return False

    def _uncount(self, cidr: str, handles: list[str | None]) -> None:
        counts: dict[str, int] = {}
        for h in handles:
            if h is not None:
                counts[h] = counts.get(h, 0) + 1
        for h, n in counts.items():
            self._adjust_handle(h, cidr, -n)

    def _adjust_handle(self, handle: str, cidr: str, delta: int, hint: KV | None = None) -> None:
        """Add `delta` to the handle's count for `cidr`; the record goes at zero. `hint`
        is a recent read of the record, tried first (the CAS catches it if stale)."""
        key = handle_key(handle)
        for attempt in range(self._retries):
            try:
                if delta > 0 and attempt == 0:  # most handles are new: try create first
                    self._ds.create(key, HandleRecord(handle, {cidr: delta}).to_json())
                    return
                kv = hint if attempt == 0 and hint is not None else self._ds.get(key)
                if kv is None:
                    if delta <= 0:
                        return
                    self._ds.create(key, HandleRecord(handle, {cidr: delta}).to_json())
                    return
                rec = HandleRecord.from_json(kv.value)
                n = rec.blocks.get(cidr, 0) + delta
                if n > 0:
                    rec.blocks[cidr] = n
                else:
                    rec.blocks.pop(cidr, None)
                if rec.blocks:
                    self._ds.update(key, rec.to_json(), kv.mod_revision)
                else:
                    self._ds.delete(key, kv.mod_revision)
                return
            except (Conflict, NotFound):
                continue
        raise self._max_retries(f"update handle {handle}")

    # ==== pools and resources =============================================================

    def _reserved(self) -> list[netaddr.IPNetwork]:
        return [c for r in self._res.list_reservations() for c in r.reserved_cidrs]

    def _pools_for(
        self, version: int, node: str, requested: list[netaddr.IPNetwork] | None, use: str
    ) -> list[IPPool]:
        pools = [p for p in self._res.list_pools() if p.version == version]
        if requested is None:
            return self._select_for_node([p for p in pools if p.automatic_for(use)], node)
        # Requested pools are used exactly (no selectors), as in Calico.
        out = []
        for want in (netaddr.IPNetwork(c) for c in requested):
            if want.version != version:
                continue
            pool = next((p for p in pools if p.cidr == want), None)
            if pool is None:
                raise NotInPool(f"requested pool {want} is not a configured IP pool")
            if pool.disabled:
                raise NotInPool(f"requested pool {want} ({pool.name}) is disabled")
            _check_use(pool, use)
            out.append(pool)
        return out

    def _select_for_node(self, pools: list[IPPool], node: str) -> list[IPPool]:
        trivial = ("", "all()")
        if all(p.node_selector.strip() in trivial for p in pools):
            return pools
        found = self._res.get_node(node)
        labels = found.labels if found is not None else {}
        return [p for p in pools if self._selector(p.node_selector).matches(labels)]

    def _selector(self, text: str) -> Selector:
        sel = self._selectors.get(text)
        if sel is None:
            from ipam.selector import parse_selector  # lazy: only pools with selectors

            sel = self._selectors[text] = parse_selector(text)
        return sel

    def _enabled_pool_of(self, addr: netaddr.IPAddress) -> IPPool:
        pools = [p for p in self._res.list_pools() if p.version == addr.version and addr in p.cidr]
        if not pools:
            raise NotInPool(f"address {addr} is not in any IP pool")
        pool = next((p for p in pools if not p.disabled), pools[0])
        if pool.disabled:
            raise NotInPool(f"address {addr} is in pool {pool.name}, which is disabled")
        return pool

    def _max_retries(self, what: str) -> MaxRetries:
        return MaxRetries(
            f"{what}: gave up after {self._retries} conflicting writes - "
            "excessive concurrent IPAM requests"
        )
