"""The agent's cluster view, kept current by a datastore watch.

One list at start, then a watch from the listing's revision: each event updates a decoded
cache entry, and a new ClusterView is built from the cache (decoding only what changed). When
the watch breaks (compaction, datastore gone) the cache is rebuilt from a fresh listing, so
a lost event can never leave a stale peer behind.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from itertools import compress, count, islice, repeat
from operator import is_not
from typing import Any

import netaddr

from ipam.block import HOST_AFFINITY_PREFIX, Block, parse_cidr
from ipam.datastore import KV, Compacted, Datastore, DatastoreError, Event, EventType
from ipam.model import FelixConfiguration, IPPool, Node
from ipam.records import BLOCKS_PREFIX
from ipam.resources import canonical_network
from ipam.store import RESOURCES_PREFIX, decode, kind_prefix, load_json
from overlay.view import BlockInfo, ClusterView

log = logging.getLogger("overlay.watch")

ROOT_PREFIX = "/overlay/v1/"
_NODES = kind_prefix("Node")
_POOLS = kind_prefix("IPPool")
_FELIX = kind_prefix("FelixConfiguration")
# What decoding a bad record raises: the record is skipped (and logged), the watch goes on.
_BAD_RECORD = (ValueError, KeyError, TypeError)


# A block as Block.to_json writes it: compact, members in to_dict's order. Up to the free
# list ("unallocated") come only strings without a quote or backslash and the allocations,
# a flat list (checked below), so the free list found after them is a top-level member.
_BLOCK_HEAD = re.compile(
    r'\{"cidr":"[^"\\]*","affinity":(?:null|"[^"\\]*"),"affinityClaimTime":(?:null|"[^"\\]*"),'
    r'"allocations":\['
)
_FREE_LIST = ',"unallocated":['


def _free_list_span(value: str) -> tuple[int, int] | None:
    """Where the top-level "unallocated" member of a block record is, when the record has
    the usual shape and the member is valid JSON; None when unsure."""
    head = _BLOCK_HEAD.match(value)
    if head is None:
        return None
    allocations = head.end()
    start = value.find("]", allocations) + 1
    if (
        start == 0
        or not value.startswith(_FREE_LIST, start)
        or value.find("[", allocations, start) != -1
        or value.find("{", allocations, start) != -1
        or value.find('"', allocations, start) != -1
    ):
        return None
    first = start + len(_FREE_LIST)
    end = value.find("]", first)
    return (start, end + 1) if end != -1 and _json_ints(value[first:end]) else None


def _json_ints(text: str) -> bool:
    """Whether `text` is a valid JSON list of ints without its brackets, at C speed: digits
    and commas, no empty item, no leading zero, no item longer than json may parse (the
    int-digits limit). A few valid lists (empty, a repeated 0) answer False."""
    items = f",{text},"
    limit = sys.get_int_max_str_digits()
    return (
        text.isascii()
        and not text.encode().translate(None, b"0123456789,")
        and (limit == 0 or len(text) <= limit)
        and ",," not in items
        and (",0" not in items or items.count(",0") == items.count(",0,"))
    )


def _block_json(value: str) -> Any:
    """load_json(value), minus the top-level "unallocated" member when _free_list_span finds
    it: routing never reads the free list, and parsing its ints was most of the cost of a
    block. Without one valid member the text parses exactly when the whole does, to the same
    object minus that member; on an error the whole text is parsed, to raise its own error."""
    span = _free_list_span(value)
    if span is not None:
        try:
            return load_json(value[: span[0]] + value[span[1] :])
        except ValueError:
            pass
    return load_json(value)


def block_info_from_json(value: str) -> BlockInfo:
    """block_info(Block.from_json(value)) without building the Block: at 50k blocks the
    full decode (free lists, sequence numbers, attribute tuples) dominated a re-list."""
    return _block_info_from_raw(_block_json(value), value)


def _block_info_from_raw(raw: Any, value: str) -> BlockInfo:
    """block_info_from_json given the parsed text (of which it never reads the free list)."""
    if not isinstance(raw, dict):
        raise ValueError(f"block: expected a JSON object, got {value[:80]!r}")
    text = raw.get("cidr")
    cidr = canonical_network(text) if type(text) is str else None
    if cidr is None:
        try:
            cidr = parse_cidr(raw["cidr"])
        except (KeyError, netaddr.AddrFormatError, TypeError) as e:
            raise ValueError(f"block field cidr: bad value {text!r}") from e
    allocations = raw.get("allocations") or []
    if not isinstance(allocations, list):
        raise ValueError(f"block {cidr} field allocations: expected a list, got {allocations!r}")
    if len(allocations) != cidr.size:
        raise ValueError(
            f"block {cidr} field allocations: {len(allocations)} entries, expected {cidr.size}"
        )
    attributes = raw.get("attributes") or []
    if not isinstance(attributes, list):
        raise ValueError(f"block {cidr} field attributes: expected a list, got {attributes!r}")
    affinity = raw.get("affinity")
    owner = None
    if isinstance(affinity, str) and affinity.startswith(HOST_AFFINITY_PREFIX):
        owner = affinity[len(HOST_AFFINITY_PREFIX) :]
    borrowed: dict[netaddr.IPAddress, str] = {}
    # Most ordinals are free (None): find the allocated ones at C speed, and stop looking
    # after the last (counted first; a peer's block often holds only its tunnel address, 0).
    allocated = compress(count(), map(is_not, allocations, repeat(None)))
    for ordinal in islice(allocated, len(allocations) - allocations.count(None)):
        index = allocations[ordinal]
        if not isinstance(index, int) or not 0 <= index < len(attributes):
            raise ValueError(f"block {cidr} ordinal {ordinal}: bad attribute index {index!r}")
        attribute = attributes[index]
        try:
            host = (attribute.get("secondary") or {}).get("node")
        except AttributeError:
            raise ValueError(f"block {cidr} attributes[{index}]: bad value {attribute!r}") from None
        if host and host != owner:
            borrowed[netaddr.IPAddress(cidr.first + ordinal, cidr.version)] = host
    return BlockInfo(cidr, owner, borrowed)


def block_info(block: Block) -> BlockInfo:
    """Reduce a stored block to what routing needs: owner and borrowed addresses."""
    owner = block.host
    borrowed: dict[netaddr.IPAddress, str] = {}
    for ordinal, index in enumerate(block.allocations):
        if index is None:
            continue
        host = block.attributes[index].secondary.get("node")
        if host and host != owner:
            borrowed[block.address(ordinal)] = host
    return BlockInfo(block.cidr, owner, borrowed)


class ClusterCache:
    """Decoded nodes, pools, blocks and FelixConfigurations, updated from datastore events.
    Not thread-safe: owned by the watch thread."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.pools: dict[str, IPPool] = {}
        self.blocks: dict[str, BlockInfo] = {}
        self.felix: dict[str, FelixConfiguration] = {}

    def clear(self) -> None:
        self.nodes.clear()
        self.pools.clear()
        self.blocks.clear()
        self.felix.clear()

    def _table(self, key: str) -> tuple[dict[str, Any], Callable[[str, str], object]] | None:
        """Where a key's records are kept and how one is decoded; None: not for routing."""
        if key.startswith(BLOCKS_PREFIX):
            return self.blocks, _decode_block
        if key.startswith(_NODES):
            return self.nodes, decode
        if key.startswith(_POOLS):
            return self.pools, decode
        if key.startswith(_FELIX):
            return self.felix, decode
        return None

    def replace(self, items: Iterable[KV]) -> list[tuple[str, Exception]]:
        """Load a full listing in place of everything held; returns the bad records skipped
        (key, error). The same as clear() and put() of each, minus put's change detection,
        which a listing into an empty cache does not need (at 50k peers, a bulk load)."""
        self.clear()
        bad: list[tuple[str, Exception]] = []
        for kv in items:
            target = self._table(kv.key)
            if target is None:
                continue
            try:
                target[0][kv.key] = target[1](kv.key, kv.value)
            except _BAD_RECORD as exc:
                bad.append((kv.key, exc))
        return bad

    def put(self, key: str, value: str | None) -> bool:
        """Apply one change; True when it can matter to the dataplane."""
        target = self._table(key)
        if target is None:
            return False
        table, decode_one = target
        return _put(table, key, None if value is None else decode_one(key, value))

    def view(self) -> ClusterView:
        return ClusterView(
            {n.name: n for n in self.nodes.values()},
            sorted(self.pools.values(), key=lambda p: p.name),
            self.blocks.values(),
            self.felix.values(),
        )


def _decode_block(_key: str, value: str) -> BlockInfo:
    return block_info_from_json(value)


def _put(table: dict, key: str, item: object) -> bool:  # type: ignore[type-arg]
    if item is None:
        return table.pop(key, None) is not None
    old = table.get(key)
    table[key] = item
    # Node equality ignores host bits of the underlay (netaddr), so compare the text too.
    return old is None or old != item or repr(old) != repr(item)


class ClusterWatcher:
    """Lists, then watches, and calls `on_view` with a fresh view after each burst."""

    def __init__(
        self,
        ds: Datastore,
        on_view: Callable[[ClusterView], None],
        *,
        on_error: Callable[[str], None] | None = None,
        poll: float = 0.5,
        coalesce: float = 0.02,
    ) -> None:
        self._ds = ds
        self._on_view = on_view
        self._on_error = on_error or (lambda _msg: None)
        self._poll = poll
        self._coalesce = coalesce
        self.cache = ClusterCache()
        self.revision = 0
        self.synced = threading.Event()
        self.last_error: str | None = None

    def resync(self) -> None:
        """Rebuild the cache from a full listing and publish it."""
        # Two listings (skipping handles and affinities, which routing never needs). Watching
        # from the first listing's revision replays what the second already holds: harmless,
        # since a put is idempotent.
        resources = self._ds.list(RESOURCES_PREFIX)
        blocks = self._ds.list(BLOCKS_PREFIX)
        for key, exc in self.cache.replace((*resources.items, *blocks.items)):
            log.warning("event=bad_record key=%s error=%s", key, exc)
        self.revision = resources.revision
        self._on_view(self.cache.view())
        self.synced.set()

    def _safe_put(self, key: str, value: str | None) -> bool:
        try:
            return self.cache.put(key, value)
        except _BAD_RECORD as exc:
            # One bad record must not stop the node: skip it, say so.
            log.warning("event=bad_record key=%s error=%s", key, exc)
            return False

    def _apply(self, events: list[Event]) -> bool:
        changed = False
        for ev in events:
            value = ev.value if ev.type is EventType.PUT else None
            changed |= self._safe_put(ev.key, value)
            self.revision = max(self.revision, ev.mod_revision)
        return changed

    def run(self, stop: threading.Event, *, backoff_max: float = 5.0) -> None:
        backoff = 0.1
        while not stop.is_set():
            try:
                self.resync()
                watch = self._ds.watch(ROOT_PREFIX, self.revision + 1)
                backoff = 0.1
                self.last_error = None
                try:
                    while not stop.is_set():
                        events = watch.next(self._poll)
                        if not events:
                            continue
                        # Coalesce a burst (e.g. many blocks claimed at once) into one view.
                        deadline = time.monotonic() + self._coalesce
                        while more := watch.next(max(0.0, deadline - time.monotonic())):
                            events.extend(more)
                        if self._apply(events):
                            self._on_view(self.cache.view())
                finally:
                    watch.close()
            except Compacted:
                log.info("event=watch_compacted action=relist")
            except DatastoreError as exc:
                self.last_error = str(exc)
                self._on_error(str(exc))
                log.warning("event=datastore_error error=%s retry_in=%.1fs", exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, backoff_max)
