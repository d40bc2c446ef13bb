"""An in-memory ClusterResources for allocator tests (no datastore, no timing with C)."""

from __future__ import annotations

from dataclasses import dataclass, field

import netaddr

from ipam.model import IPAMConfig, IPPool, IPReservation, Node


@dataclass
class FakeResources:
    pools: list[IPPool] = field(default_factory=list)
    config: IPAMConfig = field(default_factory=IPAMConfig)
    reservations: list[IPReservation] = field(default_factory=list)
    nodes: dict[str, Node] = field(default_factory=dict)

    def list_pools(self) -> list[IPPool]:
        return list(self.pools)

    def ipam_config(self) -> IPAMConfig:
        return self.config

    def list_reservations(self) -> list[IPReservation]:
        return list(self.reservations)

    def get_node(self, name: str) -> Node | None:
        return self.nodes.get(name)

    def list_nodes(self) -> list[Node]:
        return list(self.nodes.values())


def pool(cidr: str, block_size: int, name: str | None = None, **kw: object) -> IPPool:
    return IPPool(name or f"pool-{cidr}", netaddr.IPNetwork(cidr), block_size, **kw)  # type: ignore[arg-type]


def reservation(*cidrs: str) -> IPReservation:
    return IPReservation("r", tuple(netaddr.IPNetwork(c) for c in cidrs))
