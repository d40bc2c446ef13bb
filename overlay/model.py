"""Dataplane objects as plain values: what compute() wants and what the kernel reader finds.

No I/O and no pyroute2 types here. Every object is frozen and hashable, so desired and
actual states are sets/dicts that plan() can diff.
"""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple, TypeVar

import netaddr

# Calico's conventions, so that `ip` output looks familiar to Calico users.
VXLAN_DEVICE = "vxlan.calico"
# IPv6 pods between nodes that have IPv6 underlay addresses (Calico's iptables-mode device).
VXLAN6_DEVICE = "vxlan-v6.calico"
IPIP_DEVICE = "tunl0"
VXLAN_VNI = 4096
VXLAN_PORT = 4789
VXLAN_OVERHEAD = 50
VXLAN6_OVERHEAD = 70  # outer IPv6 (40) + UDP (8) + VXLAN (8) + inner Ethernet (14)
IPIP_OVERHEAD = 20

# Host-side names of pod interfaces (cni/pod.py VETH_PREFIX; Calico's InterfacePrefix).
WORKLOAD_IFACE_PREFIX = "cali"

# Route/nexthop protocol that marks an object as ours (Calico's exclusive protocol is 80 too).
RT_PROTO = 80
MAIN_TABLE = 254


_T = TypeVar("_T")


def _hash_once(cls: type[_T]) -> type[_T]:
    """Cache the hash of a frozen, slotted dataclass in its `_hash` field (which equality,
    repr and replace() ignore). Desired and actual states are sets of up to ~50k objects
    each, diffed on every pass; hashing their netaddr fields again each time was a large
    share of a pass. Slots: a __dict__ per object cost ~10 MiB at 10k peers."""
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    key = operator.attrgetter(*(n for n in names if n != "_hash"))

    def __hash__(self: Any) -> int:
        h = self._hash
        if h is None:
            h = hash(key(self))
            object.__setattr__(self, "_hash", h)
        return h  # type: ignore[no-any-return]

    def __getstate__(self: Any) -> list[Any]:
        # String hashes differ between processes: never carry a cached one along.
        return [None if n == "_hash" else getattr(self, n) for n in names]

    cls.__hash__ = __hash__  # type: ignore[assignment,method-assign]
    cls.__getstate__ = __getstate__  # type: ignore[method-assign]
    return cls


class Path(enum.Enum):
    """How traffic to a peer's blocks leaves this node."""

    DIRECT = "direct"  # plain route via the peer's underlay address (same subnet)
    VXLAN = "vxlan"
    IPIP = "ipip"


@dataclass(frozen=True)
class VxlanDevice:
    name: str
    vni: int
    port: int
    local: netaddr.IPAddress  # underlay address of this node
    parent: str  # underlay interface name
    mac: str  # lower-case aa:bb:cc:dd:ee:ff
    mtu: int
    address: netaddr.IPAddress | None  # tunnel address, programmed as /32
    # TX checksum offload: False = must be off (see kernel/ethtool.py); None = left as the
    # kernel has it. The kernel reader always reports True or False.
    tx_checksum: bool | None = None
    # IPv6 tunnel address, programmed as /128: on vxlan.calico when IPv6 pod traffic rides
    # it over the IPv4 underlay (as in Calico's eBPF dual-stack mode), on vxlan-v6.calico
    # (local: an IPv6 underlay address) otherwise.
    address6: netaddr.IPAddress | None = None


@dataclass(frozen=True)
class IpipDevice:
    name: str
    mtu: int
    address: netaddr.IPAddress | None
    tx_checksum: bool | None = None  # as for VxlanDevice


Device = VxlanDevice | IpipDevice


@_hash_once
@dataclass(frozen=True, slots=True)
class Neighbour:
    """Permanent ARP entry: remote tunnel address -> remote VTEP MAC, on the VXLAN device."""

    dev: str
    ip: netaddr.IPAddress
    mac: str
    _hash: int | None = field(default=None, init=False, repr=False, compare=False)


@_hash_once
@dataclass(frozen=True, slots=True)
class FdbEntry:
    """Permanent FDB entry: remote VTEP MAC -> remote underlay address, on the VXLAN device."""

    dev: str
    mac: str
    dst: netaddr.IPAddress
    _hash: int | None = field(default=None, init=False, repr=False, compare=False)


@_hash_once
@dataclass(frozen=True, slots=True)
class NexthopKey:
    """A nexthop is identified by where it points; plan() maps keys to kernel ids."""

    gateway: netaddr.IPAddress
    dev: str
    onlink: bool = True
    _hash: int | None = field(default=None, init=False, repr=False, compare=False)


@_hash_once
@dataclass(frozen=True, slots=True)
class Route:
    dst: netaddr.IPNetwork
    # Exactly one of: nexthop (an nhid route), blackhole, or dev without gateway
    # (a directly-connected /32, e.g. a borrowed tunnel address).
    nexthop: NexthopKey | None = None
    blackhole: bool = False
    dev: str | None = None
    table: int = MAIN_TABLE
    _hash: int | None = field(default=None, init=False, repr=False, compare=False)


@dataclass(frozen=True)
class NatOutgoing:
    """Masquerade traffic from `sources` to anything outside `all_pools`, or source-NAT it
    to `address` when set (Calico's natOutgoingAddress)."""

    sources: frozenset[netaddr.IPNetwork]
    all_pools: frozenset[netaddr.IPNetwork]
    address: netaddr.IPAddress | None = None
    # The IP version, hence the table (`ip` or `ip6 overlay-nat`); networks of the other
    # version are ignored. A field, as TunnelFilter's: a table may hold no network at all.
    version: int = 4

    def __post_init__(self) -> None:
        if self.version not in (4, 6):
            raise ValueError(f"version: {self.version!r} is neither 4 nor 6")
        if self.address is not None and self.address.version != self.version:
            raise ValueError(f"address: {self.address} is not an IPv{self.version} address")

    def normalized(self) -> NatOutgoing | None:
        """The form the kernel holds (networks of `version` only, merged CIDRs; None when
        nothing to do), so that desired and read-back states compare equal."""
        sources = netaddr.cidr_merge([n for n in self.sources if n.version == self.version])
        if not sources:
            return None
        everything = self.all_pools | self.sources
        pools = netaddr.cidr_merge([n for n in everything if n.version == self.version])
        return NatOutgoing(frozenset(sources), frozenset(pools), self.address, self.version)


@dataclass(frozen=True)
class TunnelFilter:
    """Who may send us tunnelled packets (Calico's all-vxlan-net / all-hosts-net rules):
    VXLAN (UDP `vxlan_port`) and IP-in-IP (IP protocol 4) are accepted only from the
    underlay addresses of cluster nodes, and never from our pods, whose traffic NAT-outgoing
    would otherwise send out with this node's address. Anyone else who can reach the port
    could inject packets into pods: VXLAN and IP-in-IP carry no authentication."""

    hosts: frozenset[netaddr.IPAddress]
    vxlan_port: int | None  # None: no VXLAN device, nothing to filter
    ipip: bool
    # Admitted as well: hosts that are no node (Calico's externalNodesList), merged CIDRs.
    external: frozenset[netaddr.IPNetwork] = frozenset()
    # The outer IP version, hence the table (`ip` or `ip6 overlay-filter`); it is a field,
    # not read off the addresses, because a filter may admit no address at all.
    version: int = 4

    def __post_init__(self) -> None:
        if self.version not in (4, 6):
            raise ValueError(f"version: {self.version!r} is neither 4 nor 6")
        if self.ipip and self.version == 6:
            raise ValueError("ipip: True needs version 4 (IP-in-IP carries IPv4 only), got 6")


@dataclass(frozen=True)
class TunnelHosts:
    """A change of TunnelFilter.hosts alone, made in place (at 50k nodes, rewriting the
    whole set for each node that comes or goes would cost ~0.2 s of nft every time)."""

    add: frozenset[netaddr.IPAddress]
    remove: frozenset[netaddr.IPAddress]
    version: int = 4  # of the filter changed (TunnelFilter.version)


@dataclass(frozen=True)
class PeerPath:
    """For introspection: the path chosen to a peer, and why."""

    node: str
    path: Path | None  # None: no route to this peer's blocks (the reason says why)
    reason: str
    underlay: netaddr.IPAddress | None


@dataclass
class Dataplane:
    """A whole dataplane: desired (from compute) or actual (read from the kernel)."""

    devices: dict[str, Device] = field(default_factory=dict)
    neighbours: set[Neighbour] = field(default_factory=set)
    fdb: set[FdbEntry] = field(default_factory=set)
    nexthops: set[NexthopKey] = field(default_factory=set)  # desired: every one routes use
    nexthop_ids: dict[NexthopKey, int] = field(default_factory=dict)  # actual only
    routes: set[Route] = field(default_factory=set)
    # Actual only: the kernel nhid each nexthop route uses. A route with a nexthop key but no
    # entry here carries its own gateway (no nexthop object), so plan() re-sets it.
    route_nhids: dict[Route, int] = field(default_factory=dict)
    # Actual only: ids of nexthop objects that are not ours; plan() never allocates them.
    foreign_nexthop_ids: set[int] = field(default_factory=set)
    # Actual only: True when every route with a nexthop key uses the nhid of that key in
    # nexthop_ids (so plan() need not compare route by route). A kernel read leaves it False;
    # settled() knows it is true.
    nhids_verified: bool = False
    nat: NatOutgoing | None = None
    nat6: NatOutgoing | None = None  # version 6: IPv6 pools, with an IPv6 underlay only
    tunnel_filter: TunnelFilter | None = None
    tunnel_filter6: TunnelFilter | None = None  # version 6: VXLAN over IPv6 (vxlan-v6.calico)
    # Desired only; empty from ComputeCache.update(peers=False) (see ComputeCache.peers()).
    peers: list[PeerPath] = field(default_factory=list)


@dataclass(frozen=True)
class Nexthop:
    """A kernel nexthop object: plan() assigns the id, reusing the kernel's where it exists."""

    id: int
    key: NexthopKey


# An object of ours that the netlink monitor saw deleted, keyed like the kernel keys it:
# ("route", table, dst network), ("neighbour", dev, ip), ("fdb", dev, mac),
# ("nexthop", id, "") (the kernel drops the routes using it); or a permanent entry the
# kernel now holds on our device, as it holds it: ("neighbour_set", dev, Neighbour),
# ("fdb_set", dev, FdbEntry) (our own writes echo back so; a replacement differs).
GoneKey = tuple[str, int | str, netaddr.IPNetwork | netaddr.IPAddress | str | Neighbour | FdbEntry]


class Action(enum.Enum):
    SET = "set"  # create or replace (devices: create, or recreate when incompatible)
    DELETE = "delete"


class Op(NamedTuple):
    """One kernel change. For a Route with a nexthop key, `nhid` is the resolved kernel id.
    (A tuple: a first pass makes one per kernel object, 200k at 50k peers.)"""

    action: Action
    obj: (
        VxlanDevice
        | IpipDevice
        | Neighbour
        | FdbEntry
        | Nexthop
        | Route
        | NatOutgoing
        | TunnelFilter
        | TunnelHosts
    )
    nhid: int | None = None
