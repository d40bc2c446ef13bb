"""Pure rendering for overlayctl: text tables, resource rows, IPAM usage. No I/O."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from ipam.allocator import BlockUsage, Utilization
from ipam.block import Block
from ipam.model import FelixConfiguration, IPAMConfig, IPPool, IPReservation, Node
from ipam.resources import API_VERSION, Resource, duration_text, kind_of, name_of, to_manifest


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces (like kubectl / calicoctl)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


# ---------------------------------------------------------------------------- resources


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def resource_table(kind: str, resources: Sequence[Resource]) -> str:
    if kind == "IPPool":
        return table(
            [
                "NAME",
                "CIDR",
                "BLOCKSIZE",
                "VXLAN",
                "IPIP",
                "NAT",
                "DISABLED",
                "USES",
                "MODE",
                "SELECTOR",
            ],
            [
                (
                    p.name,
                    p.cidr,
                    p.block_size,
                    p.vxlan_mode.value,
                    p.ipip_mode.value,
                    str(p.nat_outgoing).lower(),
                    str(p.disabled).lower(),
                    ",".join(sorted(p.allowed_uses, reverse=True)),
                    p.assignment_mode,
                    p.node_selector,
                )
                for p in resources
                if isinstance(p, IPPool)
            ],
        )
    if kind == "IPAMConfig":
        return table(
            ["NAME", "STRICTAFFINITY", "MAXBLOCKSPERHOST", "AUTOALLOCATEBLOCKS"],
            [
                (
                    "default",
                    str(c.strict_affinity).lower(),
                    c.max_blocks_per_host,
                    str(c.auto_allocate_blocks).lower(),
                )
                for c in resources
                if isinstance(c, IPAMConfig)
            ],
        )
    if kind == "FelixConfiguration":
        return table(
            ["NAME", "VXLANVNI", "VXLANPORT", "VXLANMTU", "IPIPMTU", "ROUTEREFRESH", "LOG"],
            [
                (
                    c.name,
                    c.vxlan_vni,
                    c.vxlan_port,
                    c.vxlan_mtu,
                    c.ipip_mtu,
                    None
                    if c.route_refresh_interval is None
                    else duration_text(c.route_refresh_interval),
                    c.log_severity_screen,
                )
                for c in resources
                if isinstance(c, FelixConfiguration)
            ],
        )
    if kind == "IPReservation":
        return table(
            ["NAME", "RESERVEDCIDRS"],
            [
                (r.name, ",".join(str(c) for c in r.reserved_cidrs))
                for r in resources
                if isinstance(r, IPReservation)
            ],
        )
    return table(
        ["NAME", "IPV4", "IPV6", "VXLAN-TUNNEL", "VXLAN-TUNNEL-V6", "VTEP-MAC", "LABELS"],
        [
            (
                n.name,
                n.ipv4_address,
                n.ipv6_address,
                n.ipv4_vxlan_tunnel_addr,
                n.ipv6_vxlan_tunnel_addr,
                n.vxlan_tunnel_mac,
                _labels(n.labels),
            )
            for n in resources
            if isinstance(n, Node)
        ],
    )


def resources_document(kind: str, resources: Sequence[Resource], single: bool) -> dict[str, Any]:
    """One manifest, or a calicoctl-style `<Kind>List` (which `apply -f` accepts back)."""
    if single:
        return to_manifest(resources[0])
    return {
        "apiVersion": API_VERSION,
        "kind": f"{kind}List",
        "items": [to_manifest(r) for r in resources],
    }


def dump(doc: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(doc, indent=2, sort_keys=False)
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False).rstrip("\n")


def applied_line(res: Resource, outcome: str) -> str:
    return f"{kind_of(res).lower()}/{name_of(res)} {outcome}"


# ---------------------------------------------------------------------------- IPAM usage


@dataclass(frozen=True)
class NodeUsage:
    node: str
    blocks: list[str]  # CIDRs of the node's affine blocks
    in_use: int  # allocations in its own blocks
    borrowed: int  # allocations for the node (attr `node`) in blocks it does not own


def node_usage(blocks: Iterable[Block]) -> list[NodeUsage]:
    """Per node: its blocks, the addresses in use there, and those it borrowed elsewhere."""
    own: dict[str, list[str]] = {}
    used: dict[str, int] = {}
    borrowed: dict[str, int] = {}
    for b in sorted(blocks, key=lambda b: b.cidr.sort_key()):
        host = b.host
        if host is not None:
            own.setdefault(host, []).append(str(b.cidr))
            used[host] = used.get(host, 0) + b.in_use
        for index in b.allocations:
            if index is None:
                continue
            node = b.attributes[index].secondary.get("node")
            if node is not None and node != host:
                borrowed[node] = borrowed.get(node, 0) + 1
    names = sorted(set(own) | set(borrowed))
    return [NodeUsage(n, own.get(n, []), used.get(n, 0), borrowed.get(n, 0)) for n in names]


def _block_row(pool: str, u: BlockUsage) -> tuple[object, ...]:
    return (u.cidr, pool, u.affinity_node or "", u.total, u.in_use, u.reserved, u.free)


def usage_text(util: Utilization, nodes: list[NodeUsage], show_blocks: bool) -> str:
    parts = [
        table(
            ["POOL", "CIDR", "TOTAL", "IN USE", "COOLING", "RESERVED", "FREE", "DISABLED"],
            [
                (
                    p.name,
                    p.cidr,
                    p.total,
                    p.in_use,
                    p.cooling,
                    p.reserved,
                    p.free,
                    str(p.disabled).lower(),
                )
                for p in util.pools
            ],
        ),
        table(
            ["NODE", "BLOCKS", "IN USE", "BORROWED"],
            [(n.node, len(n.blocks), n.in_use, n.borrowed) for n in nodes],
        ),
    ]
    if show_blocks:
        rows = [_block_row(p.name, u) for p in util.pools for u in p.blocks]
        rows += [_block_row("(none)", u) for u in util.orphan_blocks]
        parts.append(
            table(["BLOCK", "POOL", "AFFINITY", "TOTAL", "IN USE", "RESERVED", "FREE"], rows)
        )
    return "\n\n".join(parts)


def _block_json(u: BlockUsage) -> dict[str, Any]:
    return {
        "cidr": str(u.cidr),
        "affinity": u.affinity_node,
        "total": u.total,
        "inUse": u.in_use,
        "cooling": u.cooling,
        "reserved": u.reserved,
        "free": u.free,
    }


def usage_json(util: Utilization, nodes: list[NodeUsage], show_blocks: bool) -> dict[str, Any]:
    pools = []
    for p in util.pools:
        entry: dict[str, Any] = {
            "name": p.name,
            "cidr": str(p.cidr),
            "disabled": p.disabled,
            "total": p.total,
            "inUse": p.in_use,
            "cooling": p.cooling,
            "reserved": p.reserved,
            "free": p.free,
        }
        if show_blocks:
            entry["blocks"] = [_block_json(u) for u in p.blocks]
        pools.append(entry)
    doc: dict[str, Any] = {
        "pools": pools,
        "nodes": [
            {"node": n.node, "blocks": n.blocks, "inUse": n.in_use, "borrowed": n.borrowed}
            for n in nodes
        ],
    }
    if show_blocks:
        doc["orphanBlocks"] = [_block_json(u) for u in util.orphan_blocks]
    return doc
