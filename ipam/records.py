"""Datastore keys and JSON records of the IPAM state, and the pure consistency check.

    /overlay/v1/ipam/blocks/<cidr>                      a Block (ipam.block)
    /overlay/v1/ipam/affinities/host/<node>/<cidr>      {"state", "node", "type", "cidr"}
    /overlay/v1/ipam/handles/<handle id>                {"handleID", "block": {cidr: count}}

<cidr> is the CIDR with '/' and ':' replaced by '-' (ipam.block.encode_cidr).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import netaddr

from ipam.block import Block, encode_cidr, host_affinity

IPAM_PREFIX = "/overlay/v1/ipam/"
BLOCKS_PREFIX = IPAM_PREFIX + "blocks/"
AFFINITIES_PREFIX = IPAM_PREFIX + "affinities/host/"
HANDLES_PREFIX = IPAM_PREFIX + "handles/"

# Affinity states: pending while a claim is in flight (treated as absent for ownership),
# confirmed once the block carries the affinity, pendingDeletion while being released.
PENDING = "pending"
CONFIRMED = "confirmed"
PENDING_DELETION = "pendingDeletion"


def block_key(cidr: netaddr.IPNetwork | str) -> str:
    return BLOCKS_PREFIX + encode_cidr(cidr)


def affinity_prefix(node: str) -> str:
    return f"{AFFINITIES_PREFIX}{node}/"


def affinity_key(node: str, cidr: netaddr.IPNetwork | str) -> str:
    return affinity_prefix(node) + encode_cidr(cidr)


def handle_key(handle: str) -> str:
    return HANDLES_PREFIX + handle


def check_name(field_name: str, value: str) -> None:
    """Node names and handle ids become key segments: non-empty, no '/'."""
    if not value or "/" in value:
        raise ValueError(f"{field_name} {value!r}: must be non-empty and contain no '/'")


@dataclass(frozen=True)
class AffinityRecord:
    node: str
    cidr: netaddr.IPNetwork
    state: str

    def to_json(self) -> str:
        return json.dumps(
            {"state": self.state, "node": self.node, "type": "host", "cidr": str(self.cidr)}
        )

    @classmethod
    def from_json(cls, text: str) -> AffinityRecord:
        raw = json.loads(text)
        return cls(raw["node"], netaddr.IPNetwork(raw["cidr"]), raw.get("state", PENDING))


@dataclass
class HandleRecord:
    handle_id: str
    blocks: dict[str, int] = field(default_factory=dict)  # block CIDR -> allocations

    def to_json(self) -> str:
        return json.dumps({"handleID": self.handle_id, "block": self.blocks})

    @classmethod
    def from_json(cls, text: str) -> HandleRecord:
        raw: dict[str, Any] = json.loads(text)
        return cls(raw["handleID"], {k: int(v) for k, v in (raw.get("block") or {}).items()})


@dataclass
class IPAMSnapshot:
    """All IPAM records read in one listing, i.e. at one store revision."""

    revision: int
    blocks: dict[str, Block]  # str(cidr) -> block
    affinities: list[AffinityRecord]
    handles: dict[str, HandleRecord]
    undecodable: list[str] = field(default_factory=list)  # keys whose value did not parse


def consistency_problems(snap: IPAMSnapshot) -> list[str]:
    """Disagreements between blocks, affinities and handles; [] when consistent.

    Exact only while no IPAM operation is in flight: an assign counts the handle before it
    writes the block, and a release writes the block before it uncounts the handle.
    """
    problems = [f"undecodable record at {k}" for k in snap.undecodable]
    by_first = sorted(snap.blocks.values(), key=lambda b: (b.cidr.version, b.cidr.first))
    for prev, cur in itertools.pairwise(by_first):
        if prev.cidr.version == cur.cidr.version and cur.cidr.first <= prev.cidr.last:
            problems.append(f"blocks {prev.cidr} and {cur.cidr} overlap")

    affinity_states = {(a.node, str(a.cidr)): a.state for a in snap.affinities}
    actual: dict[tuple[str, str], int] = {}
    for cidr, block in snap.blocks.items():
        problems.extend(block.validate())
        node = block.host
        if node is not None and (node, cidr) not in affinity_states:
            problems.append(f"block {cidr} is affine to {node} but has no affinity record")
        for handle, n in block.handle_counts().items():
            actual[(handle, cidr)] = n

    for a in snap.affinities:
        if a.state != CONFIRMED:
            continue
        target = snap.blocks.get(str(a.cidr))
        if target is None:
            problems.append(f"confirmed affinity {a.node} -> {a.cidr} has no block")
        elif target.affinity != host_affinity(a.node):
            problems.append(
                f"confirmed affinity {a.node} -> {a.cidr} but the block's affinity is "
                f"{target.affinity!r}"
            )

    recorded: dict[tuple[str, str], int] = {}
    for handle, rec in snap.handles.items():
        if not rec.blocks:
            problems.append(f"handle {handle} holds no addresses")
        for cidr, n in rec.blocks.items():
            recorded[(handle, cidr)] = n
    for handle, cidr in sorted(set(actual) | set(recorded)):
        have, want = actual.get((handle, cidr), 0), recorded.get((handle, cidr), 0)
        if have != want:
            problems.append(
                f"handle {handle} counts {want} in block {cidr} but the block holds {have}"
            )
    return problems
