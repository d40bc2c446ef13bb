"""An IPAM allocation block as a value: pure arithmetic, no I/O.

A pool is cut into equal blocks (blockSize); a block is stored as one datastore value,
so one compare-and-swap write changes any number of its allocations atomically. Field
names of the JSON form follow Calico's IPAMBlock spec.

Ordinals index the block's addresses. `allocations[o]` is an index into `attributes`
(who holds the address) or None when free. `unallocated` is the FIFO of free ordinals:
assignment pops from the head, release appends to the tail, so the address that has been
free longest is reused first. `sequence_number` grows on every change and each allocation
remembers the value it was made at, so a release that carries a stale number (or the wrong
handle) cannot free an address that has since been given to someone else (ABA).

With a cooldown (IPAMConfiguration ipCooldownSeconds, Calico v3.33+) a released address
is not free at once: it keeps an attribute with no owner and the release time
(`releasedAt`), and collect_cooled() moves it to the tail of the free list once its time
is up. Until then it is neither anyone's allocation nor assignable.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple

import netaddr

from ipam.errors import AddressInUse, AddressReserved, NotInPool
from ipam.model import IPPool

HOST_AFFINITY_PREFIX = "host:"
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def host_affinity(node: str) -> str:
    return HOST_AFFINITY_PREFIX + node


@lru_cache(maxsize=4096)
def parse_cidr(text: str) -> netaddr.IPNetwork:
    """netaddr parsing is slow and blocks are decoded on every assign: memoise it.
    Callers must not mutate the shared result."""
    return netaddr.IPNetwork(text)


def encode_cidr(cidr: netaddr.IPNetwork | str) -> str:
    """The key form of a CIDR: '/' and ':' become '-' (10.0.0.0/26 -> 10.0.0.0-26)."""
    return str(cidr).replace("/", "-").replace(":", "-")


def block_for(ip: netaddr.IPAddress | str, pool: IPPool) -> netaddr.IPNetwork:
    """The CIDR of the block of `pool` that holds `ip`."""
    addr = netaddr.IPAddress(ip)
    if addr.version != pool.version or addr not in pool.cidr:
        raise NotInPool(f"address {addr} is not in pool {pool.name} ({pool.cidr})")
    return netaddr.IPNetwork(f"{addr}/{pool.block_size}").cidr


def _width(version: int) -> int:
    return 32 if version == 4 else 128


def block_count(pool: IPPool) -> int:
    """How many blocks the pool holds."""
    return 1 << (pool.block_size - pool.cidr.prefixlen)


def nth_block(pool: IPPool, index: int) -> netaddr.IPNetwork:
    """The index-th block of the pool, counting from its first address."""
    width = _width(pool.version) - pool.block_size
    first = pool.cidr.first + (index << width)
    return netaddr.IPNetwork((first, pool.block_size), version=pool.version)


def block_index(pool: IPPool, block: netaddr.IPNetwork) -> int:
    width = _width(pool.version) - pool.block_size
    return (block.first - pool.cidr.first) >> width


class AllocationAttribute(NamedTuple):
    """Who holds an allocation: the handle and free-form owner attributes; or, for an
    address cooling down after its release, only when it was released."""

    handle_id: str | None
    secondary: dict[str, str]
    released_at: str | None = None  # ISO 8601, UTC

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"handle_id": self.handle_id, "secondary": self.secondary}
        if self.released_at is not None:
            out["releasedAt"] = self.released_at
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AllocationAttribute:
        return cls(raw.get("handle_id"), raw.get("secondary") or {}, raw.get("releasedAt"))


@dataclass(frozen=True)
class Allocation:
    """What one allocated address carries."""

    address: netaddr.IPAddress
    handle_id: str | None
    attrs: dict[str, str]
    sequence_number: int


@dataclass
class BlockRelease:
    """Outcome of Block.release: what was freed, what was not allocated, what was refused."""

    released: list[tuple[netaddr.IPAddress, str | None]] = field(default_factory=list)
    unallocated: list[netaddr.IPAddress] = field(default_factory=list)
    mismatched: list[tuple[netaddr.IPAddress, str]] = field(default_factory=list)


@dataclass
class Block:
    cidr: netaddr.IPNetwork
    allocations: list[int | None]
    unallocated: list[int]
    attributes: list[AllocationAttribute] = field(default_factory=list)
    affinity: str | None = None
    affinity_claim_time: str | None = None
    sequence_number: int = 0
    sequence_number_for_allocation: dict[int, int] = field(default_factory=dict)

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def new(
        cls,
        cidr: netaddr.IPNetwork | str,
        affinity: str | None = None,
        *,
        claim_time: str | None = None,
        sequence_number: int | None = None,
    ) -> Block:
        net = netaddr.IPNetwork(cidr)
        if net.ip != net.network:
            raise ValueError(f"block cidr {net}: host bits set (expected {net.cidr})")
        size = net.size
        return cls(
            cidr=net,
            allocations=[None] * size,
            unallocated=list(range(size)),
            affinity=affinity,
            affinity_claim_time=claim_time if affinity else None,
            # Calico starts at the creation time in ns: a recreated block never repeats
            # the numbers of its predecessor.
            sequence_number=time.time_ns() if sequence_number is None else sequence_number,
        )

    # ---- addresses ----------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self.allocations)

    @property
    def host(self) -> str | None:
        """The node of a host affinity, else None."""
        if self.affinity and self.affinity.startswith(HOST_AFFINITY_PREFIX):
            return self.affinity[len(HOST_AFFINITY_PREFIX) :]
        return None

    def ordinal(self, ip: netaddr.IPAddress | str) -> int:
        addr = netaddr.IPAddress(ip)
        offset = int(addr) - self.cidr.first
        if addr.version != self.cidr.version or not 0 <= offset < self.size:
            raise ValueError(f"address {addr} is not in block {self.cidr}")
        return offset

    def address(self, ordinal: int) -> netaddr.IPAddress:
        if not 0 <= ordinal < self.size:
            raise ValueError(f"ordinal {ordinal} out of range for block {self.cidr}")
        return netaddr.IPAddress(self.cidr.first + ordinal, self.cidr.version)

    def reserved_ordinals(self, reserved: Iterable[netaddr.IPNetwork]) -> set[int]:
        """Ordinals of this block that fall in any of the reserved CIDRs."""
        out: set[int] = set()
        first, last = self.cidr.first, self.cidr.last
        for net in reserved:
            if net.version != self.cidr.version:
                continue
            lo, hi = max(first, net.first), min(last, net.last)
            if lo <= hi:
                out.update(range(lo - first, hi - first + 1))
        return out

    # ---- counts -------------------------------------------------------------------------

    @property
    def in_use(self) -> int:
        return self.size - len(self.unallocated)

    @property
    def free(self) -> int:
        return len(self.unallocated)

    @property
    def empty(self) -> bool:
        return len(self.unallocated) == self.size

    def assignable(self, reserved: Iterable[netaddr.IPNetwork] = ()) -> int:
        """Free addresses that are not reserved."""
        skip = self.reserved_ordinals(reserved)
        if not skip:
            return len(self.unallocated)
        return sum(1 for o in self.unallocated if o not in skip)

    # ---- assignment ---------------------------------------------------------------------

    def _attribute_index(
        self, handle: str | None, attrs: dict[str, str], released_at: str | None = None
    ) -> int:
        wanted = AllocationAttribute(handle, dict(attrs), released_at)
        for i, existing in enumerate(self.attributes):
            if existing == wanted:
                return i
        self.attributes.append(wanted)
        return len(self.attributes) - 1

    def auto_assign(
        self,
        num: int,
        handle: str | None,
        attrs: dict[str, str] | None = None,
        reserved: Iterable[netaddr.IPNetwork] = (),
    ) -> list[netaddr.IPAddress]:
        """Take up to `num` free addresses from the head of the FIFO, skipping reserved
        ones (which stay queued). Returns the addresses taken (maybe fewer, maybe none)."""
        if num <= 0:
            return []
        skip = self.reserved_ordinals(reserved)
        if not skip:
            chosen = self.unallocated[:num]
            keep = self.unallocated[num:]
        else:
            chosen, keep = [], []
            for o in self.unallocated:
                if len(chosen) < num and o not in skip:
                    chosen.append(o)
                else:
                    keep.append(o)
        if not chosen:
            return []
        self.unallocated = keep
        self._allocate(chosen, handle, attrs or {})
        return [self.address(o) for o in chosen]

    def assign(
        self,
        ip: netaddr.IPAddress | str,
        handle: str | None,
        attrs: dict[str, str] | None = None,
        reserved: Iterable[netaddr.IPNetwork] = (),
    ) -> bool:
        """Allocate one specific address. True when newly allocated, False when `handle`
        already holds it (idempotent); AddressInUse / AddressReserved otherwise."""
        o = self.ordinal(ip)
        addr = self.address(o)
        current = self.allocations[o]
        if current is not None and self.attributes[current].released_at is not None:
            raise AddressInUse(
                f"address {addr} is cooling down since its release at "
                f"{self.attributes[current].released_at} (IPAMConfiguration ipCooldownSeconds)"
            )
        if current is not None:
            holder = self.attributes[current].handle_id
            if handle is not None and holder == handle:
                return False
            raise AddressInUse(f"address {addr} is already allocated (handle {holder!r})")
        if o in self.reserved_ordinals(reserved):
            raise AddressReserved(f"address {addr} is reserved by an IPReservation")
        self.unallocated.remove(o)
        self._allocate([o], handle, attrs or {})
        return True

    def _allocate(self, ordinals: list[int], handle: str | None, attrs: dict[str, str]) -> None:
        self.sequence_number += 1
        index = self._attribute_index(handle, attrs)
        for o in ordinals:
            self.allocations[o] = index
            self.sequence_number_for_allocation[o] = self.sequence_number

    # ---- release ------------------------------------------------------------------------

    def release(
        self,
        ips: Iterable[netaddr.IPAddress | str],
        handle: str | None = None,
        sequence_number: int | None = None,
        released_at: str | None = None,
    ) -> BlockRelease:
        """Free addresses. A given handle / sequence number must match the allocation's,
        else the address stays allocated and is reported in `mismatched`. With
        `released_at` they cool down instead (see collect_cooled)."""
        out = BlockRelease()
        freed: list[int] = []
        for ip in ips:
            o = self.ordinal(ip)
            addr = self.address(o)
            index = self.allocations[o]
            if index is None or self.attributes[index].released_at is not None:
                out.unallocated.append(addr)
                continue
            holder = self.attributes[index].handle_id
            if handle is not None and holder != handle:
                out.mismatched.append((addr, f"held by handle {holder!r}, not {handle!r}"))
                continue
            stamped = self.sequence_number_for_allocation.get(o)
            if sequence_number is not None and stamped != sequence_number:
                out.mismatched.append(
                    (addr, f"sequence number {sequence_number} is stale (now {stamped})")
                )
                continue
            self.allocations[o] = None
            self.sequence_number_for_allocation.pop(o, None)
            freed.append(o)
            out.released.append((addr, holder))
        if freed:
            self.sequence_number += 1
            if released_at is None:
                self.unallocated.extend(freed)  # tail: reused last
            else:
                cooling = self._attribute_index(None, {}, released_at)
                for o in freed:
                    self.allocations[o] = cooling
            self._compact_attributes()
        return out

    def release_handle(
        self, handle: str, released_at: str | None = None
    ) -> list[netaddr.IPAddress]:
        """Free every address `handle` holds here; returns them."""
        ips = self.ips_by_handle(handle)
        self.release(ips, handle=handle, released_at=released_at)
        return ips

    def collect_cooled(self, released_before: str) -> int:
        """Free the addresses whose cooldown is over (released before the ISO time
        `released_before`), to the tail of the free list; how many."""
        if not any(a.released_at is not None for a in self.attributes):
            return 0  # the usual case: nothing is cooling
        done = [
            o
            for o, index in enumerate(self.allocations)
            if index is not None
            and (at := self.attributes[index].released_at) is not None
            and _before(at, released_before)
        ]
        if done:
            for o in done:
                self.allocations[o] = None
            self.sequence_number += 1
            self.unallocated.extend(done)
            self._compact_attributes()
        return len(done)

    def cooling_since(self, ip: netaddr.IPAddress | str) -> str | None:
        """When the address was released, if it is cooling down; else None."""
        index = self.allocations[self.ordinal(ip)]
        return None if index is None else self.attributes[index].released_at

    @property
    def cooling(self) -> int:
        """Addresses cooling down after their release."""
        resting = {i for i, a in enumerate(self.attributes) if a.released_at is not None}
        return sum(1 for index in self.allocations if index in resting) if resting else 0

    def _compact_attributes(self) -> None:
        used = sorted({i for i in self.allocations if i is not None})
        if len(used) == len(self.attributes):
            return
        remap = {old: new for new, old in enumerate(used)}
        self.attributes = [self.attributes[i] for i in used]
        self.allocations = [None if i is None else remap[i] for i in self.allocations]

    # ---- queries ------------------------------------------------------------------------

    def ips_by_handle(self, handle: str) -> list[netaddr.IPAddress]:
        indexes = {i for i, a in enumerate(self.attributes) if a.handle_id == handle}
        if not indexes:
            return []
        return [self.address(o) for o, i in enumerate(self.allocations) if i in indexes]

    def allocation(self, ip: netaddr.IPAddress | str) -> Allocation | None:
        """What an allocated address carries; None when free or cooling down."""
        o = self.ordinal(ip)
        index = self.allocations[o]
        if index is None:
            return None
        attr = self.attributes[index]
        if attr.released_at is not None:
            return None
        return Allocation(
            self.address(o),
            attr.handle_id,
            dict(attr.secondary),
            self.sequence_number_for_allocation.get(o, 0),
        )

    def handle_counts(self) -> dict[str, int]:
        """Allocations per handle (allocations without a handle are not counted)."""
        counts: dict[str, int] = {}
        for index in self.allocations:
            if index is not None:
                h = self.attributes[index].handle_id
                if h is not None:
                    counts[h] = counts.get(h, 0) + 1
        return counts

    def validate(self) -> list[str]:
        """Structural problems (empty when the block is well formed)."""
        problems: list[str] = []
        free = set(self.unallocated)
        if len(free) != len(self.unallocated):
            problems.append(f"block {self.cidr}: duplicate ordinals in unallocated")
        for o, index in enumerate(self.allocations):
            if index is None and o not in free:
                problems.append(f"block {self.cidr}: ordinal {o} neither allocated nor free")
            if index is not None and o in free:
                problems.append(f"block {self.cidr}: ordinal {o} allocated and free")
            if index is not None and not 0 <= index < len(self.attributes):
                problems.append(f"block {self.cidr}: ordinal {o} has bad attribute {index}")
        if any(not 0 <= o < self.size for o in free):
            problems.append(f"block {self.cidr}: unallocated holds out-of-range ordinals")
        return problems

    # ---- serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "cidr": str(self.cidr),
            "affinity": self.affinity,
            "affinityClaimTime": self.affinity_claim_time,
            "allocations": list(self.allocations),
            "unallocated": list(self.unallocated),
            "attributes": [a.to_dict() for a in self.attributes],
            "sequenceNumber": self.sequence_number,
            "sequenceNumberForAllocation": {
                str(o): n for o, n in self.sequence_number_for_allocation.items()
            },
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Block:
        try:
            cidr = parse_cidr(raw["cidr"])
        except (KeyError, netaddr.AddrFormatError, TypeError) as e:
            raise ValueError(f"block field cidr: bad value {raw.get('cidr')!r}") from e
        allocations = list(raw.get("allocations") or [])
        if len(allocations) != cidr.size:
            raise ValueError(
                f"block {cidr} field allocations: {len(allocations)} entries, expected {cidr.size}"
            )
        return cls(
            cidr=cidr,
            allocations=allocations,
            unallocated=list(raw.get("unallocated") or []),
            attributes=[AllocationAttribute.from_dict(a) for a in raw.get("attributes") or []],
            affinity=raw.get("affinity"),
            affinity_claim_time=raw.get("affinityClaimTime"),
            sequence_number=int(raw.get("sequenceNumber") or 0),
            sequence_number_for_allocation={
                int(o): int(n) for o, n in (raw.get("sequenceNumberForAllocation") or {}).items()
            },
        )

    def to_json(self) -> str:
        return _ENCODER.encode(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Block:
        return cls.from_dict(json.loads(text))


def parse_time(text: str) -> datetime.datetime | None:
    """A stored ISO 8601 time (Calico's trailing Z, or no zone at all, meaning UTC); None
    when unreadable, which callers take as long ago, as Calico does a zero time."""
    try:
        at = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=datetime.UTC)


def _before(when: str, cutoff: str) -> bool:
    """Whether ISO time `when` is before `cutoff` (an unreadable `when` counts as long ago)."""
    at = parse_time(when)
    return at is None or at < datetime.datetime.fromisoformat(cutoff)
