"""Cluster resources as typed values (no I/O, no parsing: see ipam.resources for YAML).

Field names follow Calico's v3 API so that people who know Calico recognise them; the
Python attribute names are the snake_case of the YAML keys.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import netaddr


class EncapMode(enum.Enum):
    NEVER = "Never"
    ALWAYS = "Always"
    CROSS_SUBNET = "CrossSubnet"


USE_WORKLOAD, USE_TUNNEL = "Workload", "Tunnel"  # Calico's allowedUses values
AUTOMATIC, MANUAL = "Automatic", "Manual"  # Calico's assignmentMode values


@dataclass(frozen=True)
class IPPool:
    name: str
    cidr: netaddr.IPNetwork
    block_size: int
    vxlan_mode: EncapMode = EncapMode.NEVER
    ipip_mode: EncapMode = EncapMode.NEVER
    nat_outgoing: bool = False
    disabled: bool = False
    node_selector: str = "all()"
    # Calico's allowedUses: which assignments may take addresses from the pool.
    allowed_uses: frozenset[str] = frozenset({USE_WORKLOAD, USE_TUNNEL})
    # Calico's assignmentMode: a Manual pool is used only when a request names it.
    assignment_mode: str = AUTOMATIC

    @property
    def version(self) -> int:
        return int(self.cidr.version)

    def automatic_for(self, use: str) -> bool:
        """Whether an assignment for `use` that names no pool may take from this one."""
        return not self.disabled and self.assignment_mode == AUTOMATIC and use in self.allowed_uses


@dataclass(frozen=True)
class IPAMConfig:
    """The cluster-wide singleton named `default`."""

    strict_affinity: bool = False
    max_blocks_per_host: int = 0  # 0: the effective default, DEFAULT_MAX_BLOCKS_PER_HOST
    auto_allocate_blocks: bool = True
    # Seconds a released address rests before it is handed out again (Calico v3.33+), so
    # stale conntrack entries or caches elsewhere cannot reach a new pod. 0: at once.
    ip_cooldown_seconds: int = 0


DEFAULT_MAX_BLOCKS_PER_HOST = 20


@dataclass(frozen=True)
class FelixConfiguration:
    """Calico's dataplane settings: `default` for the cluster, `node.<node name>` for one
    node. None: not set at this level (a less specific level, else the default, decides).
    An MTU of 0 is set, and means "derive it from the underlay", as in Calico."""

    name: str
    vxlan_vni: int | None = None
    vxlan_port: int | None = None
    vxlan_mtu: int | None = None
    vxlan_mtu_v6: int | None = None
    ipip_mtu: int | None = None
    route_refresh_interval: float | None = None  # seconds; 0: no periodic full resync
    external_nodes_list: tuple[netaddr.IPNetwork, ...] | None = None
    checksum_offload_broken: bool | None = None  # featureDetectOverride ChecksumOffloadBroken
    log_severity_screen: str | None = None  # Debug, Info, Warning, Error or Fatal
    nat_outgoing_address: netaddr.IPAddress | None = None  # None: masquerade


@dataclass(frozen=True)
class IPReservation:
    name: str
    reserved_cidrs: tuple[netaddr.IPNetwork, ...]


@dataclass(frozen=True)
class Node:
    name: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    # Underlay addresses WITH their prefix (e.g. 10.0.1.5/24): cross-subnet needs it.
    ipv4_address: netaddr.IPNetwork | None = None
    ipv6_address: netaddr.IPNetwork | None = None
    ipv4_vxlan_tunnel_addr: netaddr.IPAddress | None = None
    ipv6_vxlan_tunnel_addr: netaddr.IPAddress | None = None
    ipv4_ipip_tunnel_addr: netaddr.IPAddress | None = None
    vxlan_tunnel_mac: str | None = None
    ipv6_vxlan_tunnel_mac: str | None = None
