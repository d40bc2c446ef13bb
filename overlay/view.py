"""The cluster as the agent sees it: a snapshot of nodes, pools, IPAM blocks and the
FelixConfigurations.

Plain values only. The datastore watch builds a new ClusterView for every change and hands
it to the reconciler; compute() reads it and never changes it. Nothing here depends on the
IPAM block encoding: a block is reduced to its CIDR, its confirmed affine node and the
addresses in it that are hosted on some other node ("borrowed").
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import netaddr

from ipam.model import FelixConfiguration, IPPool, Node


@dataclass(frozen=True)
class BlockInfo:
    cidr: netaddr.IPNetwork
    node: str | None  # confirmed affinity; None for a block with no (confirmed) owner
    # Addresses of this block allocated to pods on nodes other than `node`, mapped to the
    # node that hosts them. They need their own /32 route (longest prefix wins).
    borrowed: Mapping[netaddr.IPAddress, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, init=False)
class ClusterView:
    """A read-only snapshot. Containers are copied on construction so callers may reuse theirs."""

    nodes: Mapping[str, Node]
    pools: tuple[IPPool, ...]
    blocks: tuple[BlockInfo, ...]
    felix: Mapping[str, FelixConfiguration]  # by name

    def __init__(
        self,
        nodes: Mapping[str, Node] | Iterable[Node] = (),
        pools: Iterable[IPPool] = (),
        blocks: Iterable[BlockInfo] = (),
        felix: Iterable[FelixConfiguration] = (),
    ) -> None:
        node_map = dict(nodes) if isinstance(nodes, Mapping) else {n.name: n for n in nodes}
        for key, node in node_map.items():
            if key != node.name:
                raise ValueError(f"nodes[{key!r}]: key differs from node name {node.name!r}")
        object.__setattr__(self, "nodes", MappingProxyType(node_map))
        object.__setattr__(self, "pools", tuple(pools))
        object.__setattr__(self, "blocks", tuple(blocks))
        object.__setattr__(self, "felix", MappingProxyType({c.name: c for c in felix}))

    def vtep_mac(self, node_name: str) -> str:
        """The VTEP MAC of a node: its recorded vxlan_tunnel_mac, else Calico's derived one."""
        node = self.nodes.get(node_name)
        override = node.vxlan_tunnel_mac if node is not None else None
        return vtep_mac(node_name, override)

    def pool_for(self, cidr: netaddr.IPNetwork) -> IPPool | None:
        """The most specific pool that contains `cidr` (overlapping pools are invalid anyway)."""
        best: IPPool | None = None
        for pool in self.pools:
            if pool.cidr.version != cidr.version or cidr not in pool.cidr:
                continue
            if best is None or (pool.cidr.prefixlen, pool.name) > (best.cidr.prefixlen, best.name):
                best = pool
        return best


@functools.lru_cache(maxsize=1 << 17)  # every pass derives every peer's MAC: hash once
def vtep_mac(node_name: str, override: str | None = None) -> str:
    """Calico's rule: 0x66 then the first 5 bytes of SHA-1(node name), unless overridden.

    Every node derives every peer's MAC the same way, so no MAC exchange is needed.
    """
    if override:
        return str(netaddr.EUI(override, dialect=netaddr.mac_unix_expanded)).lower()
    return (b"\x66" + hashlib.sha1(node_name.encode()).digest()[:5]).hex(":")


def vtep_mac6(node_name: str, override: str | None = None) -> str:
    """The MAC of a node's vxlan-v6.calico: Calico hashes the name + "-v6" (so that the
    two devices of a node differ), unless overridden (vxlanTunnelMACAddrV6)."""
    return vtep_mac(node_name + "-v6", override)
