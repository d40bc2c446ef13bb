"""IPAM leak check and release-from-report (calicoctl `ipam check` / `release --from-report`).

`find_leaks` is pure: an IPAM snapshot (one store revision), the names of the nodes that
exist and, optionally, the handles that are live -> a LeakReport. A leaked address is one
whose `node` attribute names a node that no longer exists, or (when live handles are given)
whose handle is not live; tunnel addresses are judged by their node only, as in Calico.
A handle is reported only when every one of its addresses is leaked (Calico's
all-or-none rule: a partly live handle is a problem to look at, not garbage).

`release_report` is the I/O half: it refuses a report of another cluster or one older than
the blocks it names, then releases with handle + sequence number (so an address re-used
since the report is never freed) and releases the affinities of deleted nodes.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import netaddr

from ipam.allocator import IPAM, ReleaseRequest
from ipam.datastore.base import Datastore
from ipam.records import IPAMSnapshot, affinity_key, block_key, consistency_problems

REPORT_KIND = "IPAMCheckReport"
REPORT_VERSION = 1
NODE_DELETED = "node-deleted"
HANDLE_NOT_LIVE = "handle-not-live"


class ReportError(ValueError):
    """A report that cannot be used (unreadable, another cluster, stale); one line."""


@dataclass(frozen=True)
class LeakedAddress:
    ip: str
    block: str
    handle: str | None
    sequence_number: int
    node: str | None
    reason: str  # NODE_DELETED or HANDLE_NOT_LIVE


@dataclass(frozen=True)
class StaleAffinity:
    node: str
    cidr: str
    state: str


@dataclass
class LeakReport:
    cluster_guid: str
    revision: int  # store revision of the snapshot the report describes
    created_at: str
    allocations: int  # addresses allocated in the snapshot
    leaked: list[LeakedAddress] = field(default_factory=list)
    stale_affinities: list[StaleAffinity] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # inconsistent books

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": REPORT_KIND,
            "version": REPORT_VERSION,
            "clusterGUID": self.cluster_guid,
            "revision": self.revision,
            "createdAt": self.created_at,
            "allocations": self.allocations,
            "leakedAddresses": [
                {
                    "ip": a.ip,
                    "block": a.block,
                    "handle": a.handle,
                    "sequenceNumber": a.sequence_number,
                    "node": a.node,
                    "reason": a.reason,
                }
                for a in self.leaked
            ],
            "staleAffinities": [asdict(a) for a in self.stale_affinities],
            "problems": list(self.problems),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, raw: Any) -> LeakReport:
        if not isinstance(raw, dict) or raw.get("kind") != REPORT_KIND:
            raise ReportError(f"not an IPAM check report (kind must be {REPORT_KIND!r})")
        if raw.get("version") != REPORT_VERSION:
            raise ReportError(
                f"report version {raw.get('version')!r}: this program reads {REPORT_VERSION}"
            )
        try:
            return cls(
                cluster_guid=str(raw["clusterGUID"]),
                revision=int(raw["revision"]),
                created_at=str(raw.get("createdAt", "")),
                allocations=int(raw.get("allocations", 0)),
                leaked=[
                    LeakedAddress(
                        ip=str(netaddr.IPAddress(a["ip"])),
                        block=str(netaddr.IPNetwork(a["block"])),
                        handle=None if a.get("handle") is None else str(a["handle"]),
                        sequence_number=int(a["sequenceNumber"]),
                        node=None if a.get("node") is None else str(a["node"]),
                        reason=str(a.get("reason", "")),
                    )
                    for a in raw.get("leakedAddresses") or []
                ],
                stale_affinities=[
                    StaleAffinity(
                        str(a["node"]), str(netaddr.IPNetwork(a["cidr"])), str(a["state"])
                    )
                    for a in raw.get("staleAffinities") or []
                ],
                problems=[str(p) for p in raw.get("problems") or []],
            )
        except (KeyError, TypeError, ValueError, netaddr.AddrFormatError) as e:
            raise ReportError(f"malformed report: {type(e).__name__}: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> LeakReport:
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ReportError(f"report is not JSON: {e}") from None
        return cls.from_dict(raw)


def _is_tunnel(attrs: dict[str, str]) -> bool:
    return attrs.get("type", "").endswith("TunnelAddress")


def find_leaks(
    snap: IPAMSnapshot,
    nodes: Iterable[str],
    live_handles: Iterable[str] | None,
    cluster_guid: str,
    *,
    now: str | None = None,
) -> LeakReport:
    """The leak report for one snapshot (pure). Read `nodes` AFTER taking the snapshot, so
    an allocation made for a node registered meanwhile is not mistaken for a leak."""
    existing = set(nodes)
    live = None if live_handles is None else set(live_handles)
    candidates: list[LeakedAddress] = []
    kept_handles: set[str] = set()  # handles with at least one valid address
    allocations = 0
    for cidr, block in sorted(snap.blocks.items(), key=lambda kv: kv[1].cidr.sort_key()):
        for ordinal, index in enumerate(block.allocations):
            alloc = None if index is None else block.allocation(block.address(ordinal))
            if alloc is None:
                continue  # free, or cooling down after its release: nobody's
            allocations += 1
            node = alloc.attrs.get("node")
            reason = None
            if node is not None and node not in existing:
                reason = NODE_DELETED
            elif live is not None and not _is_tunnel(alloc.attrs) and alloc.handle_id not in live:
                reason = HANDLE_NOT_LIVE
            if reason is None:
                if alloc.handle_id is not None:
                    kept_handles.add(alloc.handle_id)
                continue
            candidates.append(
                LeakedAddress(
                    str(alloc.address), cidr, alloc.handle_id, alloc.sequence_number, node, reason
                )
            )
    problems = consistency_problems(snap)
    for handle, rec in sorted(snap.handles.items()):
        problems += [
            f"handle {handle} references block {cidr}, which does not exist"
            for cidr in rec.blocks
            if cidr not in snap.blocks
        ]
    leaked = []
    partly = set()
    for a in candidates:
        if a.handle is not None and a.handle in kept_handles:
            partly.add(a.handle)
        else:
            leaked.append(a)
    problems += [
        f"handle {h} is partly leaked: some of its addresses are valid, so none is released"
        for h in sorted(partly)
    ]
    stale = [
        StaleAffinity(a.node, str(a.cidr), a.state)
        for a in sorted(snap.affinities, key=lambda a: (a.node, a.cidr.sort_key()))
        if a.node not in existing
    ]
    return LeakReport(
        cluster_guid=cluster_guid,
        revision=snap.revision,
        created_at=now or datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        allocations=allocations,
        leaked=leaked,
        stale_affinities=stale,
        problems=problems,
    )


def staleness(
    report: LeakReport, cluster_guid: str, revisions: dict[str, int | None]
) -> str | None:
    """Why a report must not be acted on, or None. `revisions` maps each key the report
    names (blocks of leaked addresses, affinity records) to its mod_revision now (None when
    the key is gone). Pure."""
    if report.cluster_guid != cluster_guid:
        return (
            f"the report is from cluster {report.cluster_guid}, this datastore holds cluster "
            f"{cluster_guid}: refusing to release anything"
        )
    for key, rev in sorted(revisions.items()):
        if rev is None or rev > report.revision:
            what = "is gone" if rev is None else f"changed at revision {rev}"
            return (
                f"the report (revision {report.revision}) is stale: {key} {what} since; "
                "run `overlayctl ipam check` again"
            )
    return None


def report_keys(report: LeakReport) -> list[str]:
    """The datastore keys whose state the report describes."""
    keys = {block_key(a.block) for a in report.leaked}
    keys |= {affinity_key(a.node, a.cidr) for a in report.stale_affinities}
    return sorted(keys)


@dataclass
class ReleaseSummary:
    released: list[str] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (ip, why) re-used meanwhile
    affinities: list[tuple[str, str]] = field(default_factory=list)  # (node, cidr) released


def release_report(
    ipam: IPAM, ds: Datastore, report: LeakReport, cluster_guid: str
) -> ReleaseSummary:
    """Act on a report: ReportError (nothing written) when it is from another cluster or
    stale; else release its addresses (handle + sequence number must still match) and the
    affinities of deleted nodes."""
    revisions: dict[str, int | None] = {}
    for key in report_keys(report):
        kv = ds.get(key)
        revisions[key] = None if kv is None else kv.mod_revision
    why = staleness(report, cluster_guid, revisions)
    if why is not None:
        raise ReportError(why)
    out = ReleaseSummary()
    if report.leaked:
        requests = [ReleaseRequest(a.ip, a.handle, a.sequence_number) for a in report.leaked]
        outcome = ipam.release(requests)
        out.released = [str(ip) for ip in outcome.released]
        out.kept = [(str(ip), reason) for ip, reason in outcome.mismatched]
        out.kept += [(str(ip), "no longer allocated") for ip in outcome.unallocated]
    for a in report.stale_affinities:
        ipam.release_block_affinity(a.node, a.cidr)
        out.affinities.append((a.node, a.cidr))
    return out
