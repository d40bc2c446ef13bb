"""compute(): cluster view + this node + config -> the whole desired dataplane. PURE.

Design notes (why it looks like this):

- Static L2 state, no miss callouts. For every peer with a known VTEP (VXLAN tunnel address
  and underlay address) we program a permanent neighbour entry (tunnel IP -> VTEP MAC) and a
  permanent FDB entry (VTEP MAC -> underlay IP) on `vxlan.calico`, like Calico's VXLANFDB.
  That is done for all peers, not only the ones we currently tunnel to: it is cheap (two
  objects per peer) and keeps a borrowed tunnel address reachable whatever the block path.
- Routes point at kernel nexthop objects (one per distinct gateway), not at their own
  gateways: thousands of per-route gateways make the kernel quadratic (ENVIRONMENT.md).
  plan() maps NexthopKeys to kernel ids; compute() only names where each one points.
- Cost per remote peer: 1 neighbour + 1 FDB entry + 1 nexthop; per remote block 1 route.
- Path per (peer, pool), Calico's rule: DIRECT when the pool is CrossSubnet and the peer's
  underlay address lies in OUR underlay subnet (the prefix stored with our address); else
  the pool's encapsulation. A node recorded with a /32 address has no subnet, so cross-subnet
  never applies to it: it is tunnelled, and the reason says so (Calico #4254, #2375).
  A VXLAN pool wins over an IPIP pool setting when both are set (Calico rejects that).
- Our own blocks get blackhole routes, so traffic to unallocated addresses of our blocks
  does not leak to the default route. Addresses of a block hosted on another node than
  the block's owner get a /32 to the hosting node (longest prefix beats the block route);
  the ones hosted here are the CNI's business (it owns per-pod routes).
- Incremental: ComputeCache carries the per-peer pieces, the VTEP claims, the route offers
  per kernel key and the nexthop reference counts from one view to the next, so a view that
  differs in a few Node/BlockInfo objects costs O(those) plus copying the result sets. The
  result never depends on the history (a property test holds it to a fresh compute).
- Duplicate VXLAN tunnel addresses or VTEP MACs would make neighbour/FDB entries flap: our
  own always win, else the node first by name; the others get no VTEP, and say why.
- Tunnel ingress filter (Calico's all-vxlan-net / all-hosts-net): while a tunnel device
  exists, its packets are accepted from the underlay addresses of the cluster's nodes only,
  and never from our pods. The address set is kept with reference counts, like the rest.
- IPv6 pods, two ways, decided by whether THIS node has an IPv6 underlay address:
  * with one (Calico's iptables mode): over `vxlan-v6.calico`, whose local address is that
    IPv6 address. A peer's IPv6 VTEP is its IPv6 tunnel address, its MAC for IPv6
    (0x66 + SHA-1(name + "-v6")[:5] unless recorded) and its IPv6 underlay address: per peer
    an NDP entry, an FDB entry and a nexthop on that device. CrossSubnet works as for IPv4,
    on the IPv6 subnets. A peer without an IPv6 underlay address gets no IPv6 route.
  * without (Calico's eBPF dual-stack shape): over vxlan.calico and the IPv4 underlay; a
    peer's VTEP is its MAC and IPv4 underlay address with a tunnel address per family. Per
    peer that adds an NDP entry and an IPv6 nexthop. No IPv6 underlay, so no direct path:
    CrossSubnet IPv6 pools tunnel.
  Either way IPv6 blocks get nhid routes and blackholes like IPv4 ones. Every node of a
  cluster should be in the same mode: a node routes IPv6 the way it decides for itself.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import netaddr

from ipam.model import EncapMode, IPPool, Node
from overlay.model import (
    IPIP_DEVICE,
    IPIP_OVERHEAD,
    MAIN_TABLE,
    VXLAN6_DEVICE,
    VXLAN6_OVERHEAD,
    VXLAN_DEVICE,
    VXLAN_OVERHEAD,
    VXLAN_PORT,
    VXLAN_VNI,
    Dataplane,
    Device,
    FdbEntry,
    IpipDevice,
    NatOutgoing,
    Neighbour,
    NexthopKey,
    Path,
    PeerPath,
    Route,
    TunnelFilter,
    VxlanDevice,
)
from overlay.view import BlockInfo, ClusterView, vtep_mac, vtep_mac6


@dataclass(frozen=True)
class LocalNode:
    """This node, as the agent found it on the host (not necessarily as stored)."""

    name: str
    underlay_iface: str
    # Our IPv4 address WITH its subnet prefix, e.g. 10.0.1.5/24; None: an IPv6-only node
    # (Calico's IP=none), which then needs underlay6.
    underlay: netaddr.IPNetwork | None
    vxlan_tunnel_addr: netaddr.IPAddress | None = None
    ipip_tunnel_addr: netaddr.IPAddress | None = None
    mac: str | None = None  # our VTEP MAC; None: derived from the name (Calico's rule)
    underlay_mtu: int = 1500
    vxlan_tunnel_addr6: netaddr.IPAddress | None = None
    # Our IPv6 underlay address WITH its prefix: IPv6 pods then ride vxlan-v6.calico.
    underlay6: netaddr.IPNetwork | None = None
    underlay6_iface: str = ""
    underlay6_mtu: int = 1500
    mac6: str | None = None  # our IPv6 VTEP MAC; None: derived from the name

    def __post_init__(self) -> None:
        if self.underlay is None and self.underlay6 is None:
            raise ValueError("underlay, underlay6: a node needs an IPv4 or an IPv6 underlay")
        if self.underlay is not None and self.underlay.version != 4:
            raise ValueError(f"underlay: {self.underlay} is not an IPv4 address")
        if self.underlay6 is not None and self.underlay6.version != 6:
            raise ValueError(f"underlay6: {self.underlay6} is not an IPv6 address")
        _check_mtu("underlay_mtu", self.underlay_mtu)
        _check_mtu("underlay6_mtu", self.underlay6_mtu)

    @property
    def vtep_mac(self) -> str:
        return vtep_mac(self.name, self.mac)

    @property
    def vtep_mac6(self) -> str:
        return vtep_mac6(self.name, self.mac6)


@dataclass(frozen=True)
class DataplaneConfig:
    vxlan_mtu: int | None = None  # None: underlay MTU - 50
    vxlan_mtu_v6: int | None = None  # vxlan-v6.calico; None: IPv6 underlay MTU - 70
    ipip_mtu: int | None = None  # None: underlay MTU - 20
    vxlan_vni: int = VXLAN_VNI
    vxlan_port: int = VXLAN_PORT
    # Turn TX checksum offload off on our tunnel devices (Calico's ChecksumOffloadBroken,
    # decided by the agent from the kernel release: kernel/ethtool.py).
    tx_checksum_off: bool = False
    # Senders of tunnelled packets admitted besides the nodes (Calico's externalNodesList):
    # IPv4 networks to the IPv4 tunnels, IPv6 ones to vxlan-v6.calico.
    external_nodes: frozenset[netaddr.IPNetwork] = frozenset()
    # Source address for natOutgoing traffic (Calico's natOutgoingAddress); None: masquerade.
    nat_outgoing_address: netaddr.IPAddress | None = None

    def __post_init__(self) -> None:
        if self.nat_outgoing_address is not None and self.nat_outgoing_address.version != 4:
            raise ValueError(f"nat_outgoing_address: {self.nat_outgoing_address} is not IPv4")
        # Merged (the kernel's interval set rejects overlaps), so that it reads back equal.
        merged = frozenset(netaddr.cidr_merge(list(self.external_nodes)))  # per family
        object.__setattr__(self, "external_nodes", merged)
        for name in ("vxlan_mtu", "vxlan_mtu_v6", "ipip_mtu"):
            value = getattr(self, name)
            if value is not None:
                _check_mtu(name, value)
        if not 0 < self.vxlan_vni < 2**24:
            raise ValueError(f"vxlan_vni: {self.vxlan_vni} is outside 1..16777215")
        if not 0 < self.vxlan_port < 2**16:
            raise ValueError(f"vxlan_port: {self.vxlan_port} is outside 1..65535")


def _check_mtu(name: str, value: int) -> None:
    if not 68 <= value <= 65535:
        raise ValueError(f"{name}: {value} is outside 68..65535")


class _Vtep(NamedTuple):  # a tuple: built per peer, cheap
    tunnel_ip: netaddr.IPAddress | None  # at least one of the two tunnel addresses is set
    mac: str
    underlay: netaddr.IPAddress | None  # None: no IPv4 part (only with an IPv6 underlay)
    tunnel_ip6: netaddr.IPAddress | None = None
    # Set when the IPv6 part rides vxlan-v6.calico: its own MAC and the IPv6 underlay.
    mac6: str | None = None
    underlay6: netaddr.IPAddress | None = None

    def claims(self) -> tuple[tuple[str, object], ...]:
        """What it claims, cluster-wide unique: (kind, key) per tunnel address and MAC
        (addresses as ints: cheaper to hash than netaddr objects)."""
        out: tuple[tuple[str, object], ...] = ()
        if self.tunnel_ip is not None:
            out += (("ip", self.tunnel_ip.value),)
        if self.tunnel_ip6 is not None:
            out += (("ip6", self.tunnel_ip6.value),)
        if self.underlay is not None:
            out += (("mac", self.mac),)
        if self.mac6 is not None:
            out += (("mac6", self.mac6),)
        return out


class _OtherSubnet(NamedTuple):
    """A reason whose text is built only when shown: formatting the peer's netaddr address
    cost more than the rest of its decision."""

    peer_ip: netaddr.IPAddress
    subnet: str
    then: str

    def __str__(self) -> str:
        return f"different subnet ({self.peer_ip} not in {self.subnet}); {self.then}"


class _Decision(NamedTuple):  # a tuple: built per peer, cheap
    path: Path | None
    nexthop: NexthopKey | None
    reason: str | _OtherSubnet
    vtep: _Vtep | None = None  # set when path is VXLAN


class _NodePiece(NamedTuple):  # a tuple: built per peer, cheap
    """What routing needs of one Node, derived once per Node object."""

    node: Node
    underlay: netaddr.IPAddress | None
    candidate: _Vtep | str  # the VTEP it asks for, or why it has none
    claims: tuple[tuple[str, object], ...] = ()  # the candidate's claims()
    underlay6: netaddr.IPAddress | None = None


class _BlockPiece(NamedTuple):  # a tuple: built per peer, cheap
    """What a block's routes depend on besides the decisions, derived once per BlockInfo."""

    block: BlockInfo
    sort_key: tuple[int, int, str]
    pool: IPPool | None
    hosts: tuple[str, ...]  # the peers whose decisions its routes use: owner, then borrowers
    borrowed: tuple[netaddr.IPAddress, ...]  # the addresses that need a /32 (/128), sorted


def _encap(pool: IPPool) -> tuple[Path, EncapMode, str] | None:
    if pool.vxlan_mode is not EncapMode.NEVER:
        return Path.VXLAN, pool.vxlan_mode, "vxlanMode"
    if pool.ipip_mode is not EncapMode.NEVER and pool.version == 4:  # (IPv6 ones are refused)
        return Path.IPIP, pool.ipip_mode, "ipipMode"
    return None


def _node_piece(name: str, node: Node, v6_underlay: bool) -> _NodePiece:
    """`v6_underlay`: we have an IPv6 underlay, so a peer's IPv6 VTEP is on its own."""
    underlay = node.ipv4_address.ip if node.ipv4_address is not None else None
    underlay6 = node.ipv6_address.ip if node.ipv6_address is not None else None
    candidate: _Vtep | str
    tunnel, tunnel6 = node.ipv4_vxlan_tunnel_addr, node.ipv6_vxlan_tunnel_addr
    mac = vtep_mac(name, node.vxlan_tunnel_mac)
    if tunnel is None and tunnel6 is None:
        candidate = "node has no VXLAN tunnel address"
    elif v6_underlay:
        v4 = tunnel is not None and underlay is not None
        v6 = tunnel6 is not None and underlay6 is not None
        if not (v4 or v6):
            family = "IPv4" if tunnel is not None else "IPv6"
            candidate = f"node has no {family} underlay address"
        else:
            candidate = _Vtep(
                tunnel if v4 else None,
                mac,
                underlay if v4 else None,
                tunnel6 if v6 else None,
                vtep_mac6(name, node.ipv6_vxlan_tunnel_mac) if v6 else None,
                underlay6 if v6 else None,
            )
    elif underlay is None:
        candidate = "node has no IPv4 underlay address"
    else:
        candidate = _Vtep(tunnel, mac, underlay, tunnel6)
    if isinstance(candidate, str):
        return _NodePiece(node, underlay, candidate, (), underlay6)
    return _NodePiece(node, underlay, candidate, candidate.claims(), underlay6)


def _block_piece(view: ClusterView, block: BlockInfo, me: str) -> _BlockPiece:
    owner = block.node
    hosts = [owner] if owner is not None and owner != me else []
    borrowed = []
    for addr, host in sorted(block.borrowed.items()):
        if host not in (me, owner) and addr in block.cidr:
            borrowed.append(addr)
            hosts.append(host)
    cidr = block.cidr
    return _BlockPiece(
        block,
        (cidr.first, cidr.prefixlen, owner or ""),
        view.pool_for(cidr),
        (*hosts,),
        (*borrowed,),
    )


# A route offer: (kernel key, rank, route). The kernel keys a route by (table, family, first
# address, prefix length); among offers for one key the smallest rank wins: a borrowed host
# route (precedence 1) beats a block route (0), then the block first in address order, then
# offer order.
_DstKey = tuple[int, int, int, int]
_Rank = tuple[int, tuple[int, int, str], int]
_Offer = tuple[_DstKey, _Rank, Route]
_PeerKey = tuple[str, str | None]  # (node, pool name)


class ComputeCache:
    """compute()'s state, carried from one view to the next, so that a view that differs
    from the last in a few Node and BlockInfo objects costs O(those) plus copying the
    result. That keeps a pass for one changed peer cheap at 50k peers.

    Changes are found by object identity (the watch keeps the objects of unchanged records);
    the cache holds every object it compares against, so an id() cannot be reused meanwhile.
    A different node, config or pool set starts afresh. Results never depend on the cache:
    compute(v, me, cfg, cache) == compute(v, me, cfg). Not thread-safe: one per caller.
    """

    def __init__(self) -> None:
        self._reset(None, None)

    def _reset(self, context: tuple[object, ...] | None, me: LocalNode | None) -> None:
        self.context = context
        self.me_name = me.name if me is not None else ""
        self.my_claims: set[tuple[str, object]] = set()
        self.v6_underlay = me is not None and me.underlay6 is not None
        if me is not None:
            underlay = me.underlay.ip if me.underlay is not None else None
            mine = _Vtep(me.vxlan_tunnel_addr, me.vtep_mac, underlay, me.vxlan_tunnel_addr6)
            if me.underlay6 is not None:
                mine = mine._replace(mac6=me.vtep_mac6, underlay6=me.underlay6.ip)
            self.my_claims = set(mine.claims())
        self.my_tunnels = (
            (me.vxlan_tunnel_addr is not None, me.vxlan_tunnel_addr6 is not None)
            if me is not None
            else (False, False)
        )
        self.my_underlay = me.underlay if me is not None else None
        # built once: slow
        self.local_subnet = me.underlay.cidr if me is not None and me.underlay else None
        self.subnet_text = str(self.local_subnet)
        self.subnet_range = (
            (self.local_subnet.first, self.local_subnet.last) if self.local_subnet else (0, -1)
        )
        # The same for our IPv6 underlay, when we have one (IPv6 pods on vxlan-v6.calico).
        self.my_underlay6 = me.underlay6 if me is not None else None
        subnet6 = self.my_underlay6.cidr if self.my_underlay6 is not None else None
        self.subnet6_text = str(subnet6)
        self.subnet6_range = (subnet6.first, subnet6.last) if subnet6 else (0, -1)
        self.underlay6_iface = me.underlay6_iface if me is not None else ""
        self.pool_notes: dict[str, str] = {}  # pool name -> "pool p vxlanMode Always"
        self.underlay_iface = me.underlay_iface if me is not None else ""
        self.pools: dict[str | None, IPPool | None] = {None: None}
        # (vxlan.calico, tunl0, vxlan-v6.calico) wanted
        self.ready: tuple[bool, bool, bool] | None = None
        # Nodes: name -> id(Node) seen last, the pieces, VTEP claims and their outcome.
        self.node_ids: dict[str, int] = {}
        self.nodes: dict[str, _NodePiece] = {}
        # (kind, tunnel address or MAC) -> the claimant, or a set of them when shared (rare)
        self.claims: dict[tuple[str, object], str | set[str]] = {}
        self.vteps: dict[str, _Vtep] = {}
        self.problems: dict[str, str] = {}
        self.decisions: dict[str, dict[str | None, _Decision]] = {}
        # Blocks: id(BlockInfo) -> piece; node -> ids of the blocks whose routes use it.
        self.blocks: dict[int, _BlockPiece] = {}
        self.users: dict[str, list[int]] = {}
        self.pool_blocks: dict[str | None, int] = {}
        # Routes: offers per block and per kernel key, the winners, their nexthops.
        self.offers: dict[int, tuple[Route, ...]] = {}
        self.by_dst: dict[_DstKey, list[tuple[_Rank, int, Route]]] = {}
        self.chosen: dict[_DstKey, Route] = {}
        self.routes: set[Route] = set()
        self.nexthop_refs: dict[NexthopKey, int] = {}
        # L2 entries per peer with a VTEP: its neighbours (one per tunnel address), its FDB
        # entries (one per device).
        self.l2: dict[str, tuple[tuple[Neighbour, ...], tuple[FdbEntry, ...]]] = {}
        self.neighbours: set[Neighbour] = set()
        self.fdb: set[FdbEntry] = set()
        # Underlay addresses of every node (ours too), counted: two nodes may share one;
        # and the set handed out last, reused while they stay the same (then plan() sees
        # the very same object and compares nothing).
        self.host_refs: dict[netaddr.IPAddress, int] = {}
        self.hosts: frozenset[netaddr.IPAddress] = frozenset()
        self.hosts_changed = False
        self.host6_refs: dict[netaddr.IPAddress, int] = {}  # the IPv6 underlay addresses
        self.hosts6: frozenset[netaddr.IPAddress] = frozenset()
        self.hosts6_changed = False
        # Peers for introspection: (node, pool) pairs some block routes through, sorted.
        self.peer_refs: dict[_PeerKey, int] = {}
        self.peer_paths: dict[_PeerKey, PeerPath] = {}
        self.peer_list: list[PeerPath] = []  # sorted by (node, reason)
        self.dirty_peers: set[_PeerKey] = set()  # changed since peers() last ran

    # --- the pass ---------------------------------------------------------------------------

    def update(
        self, view: ClusterView, me: LocalNode, cfg: DataplaneConfig, *, peers: bool = True
    ) -> Dataplane:
        """The dataplane for `view`; its `peers` stay empty with peers=False (the agent asks
        peers() once the kernel is programmed: introspection can wait, routes cannot)."""
        try:
            dataplane = self._update(view, me, cfg)
            if peers:
                dataplane.peers = self.peers()
            return dataplane
        except BaseException:
            self._reset(None, None)  # possibly half-applied: start afresh next time
            raise

    def peers(self) -> list[PeerPath]:
        """The path to every peer and why, sorted, as of the last update()."""
        try:
            if len(self.dirty_peers) > 64:
                self._rebuild_peers()
            else:
                for key in self.dirty_peers:
                    self._set_peer(key)
            self.dirty_peers = set()
            return list(self.peer_list)
        except BaseException:
            self._reset(None, None)
            raise

    def _update(self, view: ClusterView, me: LocalNode, cfg: DataplaneConfig) -> Dataplane:
        pools = tuple(view.pools)
        context = (repr(me), cfg, tuple(map(id, pools)), pools)
        if context != self.context:
            self._reset(context, me)
            self.pools.update((p.name, p) for p in pools)
        touched = self._sync_nodes(view)
        dirty = self._sync_blocks(view)
        devices = devices_for(self._pools_in_use(pools), me, cfg)
        ready = (VXLAN_DEVICE in devices, IPIP_DEVICE in devices, VXLAN6_DEVICE in devices)
        if ready != self.ready:  # part of every decision: redo them all (rare)
            self.ready = ready
            # (a union: a node removed in this very view must lose its decisions too)
            touched |= {*self.nodes, *self.users, *(n for n, _ in self.peer_refs), *self.l2}
        for name in touched:
            self.decisions.pop(name, None)
            users = self.users.get(name)
            if users:  # the blocks routing through it, and so its peer paths
                dirty.update(users)
                refs = self.peer_refs
                self.dirty_peers.update((name, p) for p in self.pools if (name, p) in refs)
        # L2 entries: all drops before any add. A VTEP moving from one node to another (one
        # removed, one added with the same address and MAC) gives equal entries, and a drop
        # after the add would take the new one with it.
        for name in touched:
            self._drop_l2(name)
        for name in touched:
            self._add_l2(name)
        dirty_dsts: set[_DstKey] = set()
        for bid in dirty:
            self._reoffer(bid, dirty_dsts)
        for dst in dirty_dsts:
            self._choose(dst)

        nat = nat_outgoing(4, pools, cfg.nat_outgoing_address)
        # NAT66 needs an IPv6 way out of the cluster: an IPv6 underlay (without one,
        # pools_without_nat() names the pools that go without). It masquerades: Calico's
        # natOutgoingAddress is IPv4.
        nat6 = nat_outgoing(6, pools) if me.underlay6 is not None else None
        # Copies: the caller keeps this state while the cache moves on to the next view.
        return Dataplane(
            devices=devices,
            neighbours=set(self.neighbours),
            fdb=set(self.fdb),
            nexthops=set(self.nexthop_refs),
            routes=set(self.routes),
            nat=nat,
            nat6=nat6,
            tunnel_filter=self._tunnel_filter(devices, cfg),
            tunnel_filter6=self._tunnel_filter6(devices, cfg),
        )

    def _tunnel_filter(
        self, devices: dict[str, Device], cfg: DataplaneConfig
    ) -> TunnelFilter | None:
        """Filter each tunnel we have a device for; no device, no filter (Calico's rules
        exist only while the encapsulation is in use)."""
        vxlan = devices.get(VXLAN_DEVICE)
        port = vxlan.port if isinstance(vxlan, VxlanDevice) else None
        ipip = IPIP_DEVICE in devices
        if port is None and not ipip:
            return None
        if self.hosts_changed:
            self.hosts = frozenset(self.host_refs)  # of a dict: reuses the stored hashes
            self.hosts_changed = False
        external = frozenset(n for n in cfg.external_nodes if n.version == 4)
        return TunnelFilter(self.hosts, port, ipip, external)

    def _tunnel_filter6(
        self, devices: dict[str, Device], cfg: DataplaneConfig
    ) -> TunnelFilter | None:
        """The same for vxlan-v6.calico: IPv6 VXLAN only from the nodes' IPv6 addresses
        and the IPv6 networks of externalNodesList."""
        vxlan6 = devices.get(VXLAN6_DEVICE)
        if not isinstance(vxlan6, VxlanDevice):
            return None
        if self.hosts6_changed:
            self.hosts6 = frozenset(self.host6_refs)
            self.hosts6_changed = False
        external = frozenset(n for n in cfg.external_nodes if n.version == 6)
        return TunnelFilter(self.hosts6, vxlan6.port, False, external, version=6)

    def _pools_in_use(self, pools: tuple[IPPool, ...]) -> list[IPPool]:
        """Enabled pools (new pods may land in them any moment) and the ones holding blocks
        (disabled pools keep routing their existing pods)."""
        return [p for p in pools if not p.disabled or self.pool_blocks.get(p.name, 0) > 0]

    # --- nodes and their VTEPs ----------------------------------------------------------------

    def _sync_nodes(self, view: ClusterView) -> set[str]:
        """Take in the Node objects that differ from last time; return every node whose
        decisions may have changed (itself, and those sharing a tunnel address or MAC)."""
        current = dict(zip(view.nodes, map(id, view.nodes.values()), strict=True))
        changed = {name for name, _ in current.items() ^ self.node_ids.items()}
        self.node_ids = current
        touched = set(changed)
        for name in changed:
            old = self.nodes.pop(name, None)
            if old is not None:
                touched |= self._claim(name, old.claims, add=False)
                self._count_hosts(old, -1)
            node = view.nodes.get(name)
            if node is not None:
                piece = self.nodes[name] = _node_piece(name, node, self.v6_underlay)
                touched |= self._claim(name, piece.claims, add=True)
                self._count_hosts(piece, +1)
        for name in touched:
            self._resolve_vtep(name)
        return touched

    def _count_hosts(self, piece: _NodePiece, step: int) -> None:
        """Count a node's underlay addresses in (or out of) the tunnel filters' sets."""
        if piece.underlay is not None:
            self.hosts_changed = True
            _count(self.host_refs, piece.underlay, step)
        if piece.underlay6 is not None:
            self.hosts6_changed = True
            _count(self.host6_refs, piece.underlay6, step)

    def _claim(self, name: str, keys: tuple[tuple[str, object], ...], *, add: bool) -> set[str]:
        """Add or drop a peer's claims on its tunnel addresses and MAC; return the other
        claimants (whose VTEP may now be won or lost)."""
        others: set[str] = set()
        if name == self.me_name:
            return others
        claims = self.claims
        for key in keys:
            held = claims.get(key)
            if held is None or held == name:  # the usual case: alone with it
                if add:
                    claims[key] = name
                elif held is not None:
                    del claims[key]
                continue
            names = {held} if isinstance(held, str) else set(held)
            if add:
                names.add(name)
            else:
                names.discard(name)
            if len(names) > add:  # anyone but the newcomer
                others |= names
            if not names:
                claims.pop(key, None)
            else:  # a plain name for the usual single claimant: a set each costs memory
                claims[key] = next(iter(names)) if len(names) == 1 else names
        return others

    def _resolve_vtep(self, name: str) -> None:
        """Duplicate tunnel addresses or MACs would make the kernel's neighbour/FDB entries
        flap between peers: this node keeps its own, else the first claimant by name does."""
        self.vteps.pop(name, None)
        self.problems.pop(name, None)
        piece = self.nodes.get(name)
        if piece is None or name == self.me_name:
            return
        c = piece.candidate
        if isinstance(c, str):
            self.problems[name] = c
            return
        for key in piece.claims:
            owner = self.me_name if key in self.my_claims else _first(self.claims[key])
            if owner != name:
                what = {
                    "ip": f"VXLAN tunnel address {c.tunnel_ip}",
                    "ip6": f"IPv6 VXLAN tunnel address {c.tunnel_ip6}",
                    "mac": f"VTEP MAC {c.mac}",
                    "mac6": f"IPv6 VTEP MAC {c.mac6}",
                }[key[0]]
                self.problems[name] = f"{what} is also used by {owner}"
                return
        self.vteps[name] = c

    def _drop_l2(self, name: str) -> None:
        old = self.l2.pop(name, None)
        if old is not None:
            self.neighbours.difference_update(old[0])
            self.fdb.difference_update(old[1])

    def _add_l2(self, name: str) -> None:
        """A peer's permanent neighbours and FDB entries on each VXLAN device we have."""
        vtep = self.vteps.get(name)
        if vtep is None or not self.ready:
            return
        v4_ready, _, v6_ready = self.ready
        neighbours: list[Neighbour] = []
        fdb: list[FdbEntry] = []
        if v4_ready and vtep.underlay is not None:
            # IPv6 rides vxlan.calico too unless it has a device of its own (mac6).
            shared = vtep.tunnel_ip6 if vtep.mac6 is None else None
            neighbours += (
                Neighbour(VXLAN_DEVICE, ip, vtep.mac)
                for ip in (vtep.tunnel_ip, shared)
                if ip is not None
            )
            fdb.append(FdbEntry(VXLAN_DEVICE, vtep.mac, vtep.underlay))
        if v6_ready and vtep.mac6 is not None:
            assert vtep.tunnel_ip6 is not None and vtep.underlay6 is not None
            neighbours.append(Neighbour(VXLAN6_DEVICE, vtep.tunnel_ip6, vtep.mac6))
            fdb.append(FdbEntry(VXLAN6_DEVICE, vtep.mac6, vtep.underlay6))
        if neighbours or fdb:
            self.l2[name] = (tuple(neighbours), tuple(fdb))
            self.neighbours.update(neighbours)
            self.fdb.update(fdb)

    # --- decisions: the path to one peer for one pool -----------------------------------------

    def decide(self, name: str, pool: IPPool | None) -> _Decision:
        mine = self.decisions.setdefault(name, {})
        key = pool.name if pool is not None else None
        decision = mine.get(key)
        if decision is None:
            decision = mine[key] = self._decide(name, pool)
        return decision

    def _decide(self, node_name: str, pool: IPPool | None) -> _Decision:
        if pool is None:
            return _Decision(None, None, "its blocks are in no IP pool: no route")
        encap = _encap(pool)
        if encap is None:
            return _Decision(
                None,
                None,
                f"pool {pool.name} has vxlanMode Never and ipipMode Never: "
                "no route (needs a fabric that routes pod addresses)",
            )
        kind, mode, mode_field = encap
        v6 = pool.version == 6
        own_device = v6 and self.v6_underlay  # IPv6 over vxlan-v6.calico, IPv6 underlay
        piece = self.nodes.get(node_name)
        if piece is None:
            return _Decision(None, None, "no Node resource for this node: no route")
        if own_device:
            address, peer_ip = piece.node.ipv6_address, piece.underlay6
            mine, subnet, subnet_range = self.my_underlay6, self.subnet6_text, self.subnet6_range
            iface = self.underlay6_iface
        else:
            address, peer_ip = piece.node.ipv4_address, piece.underlay
            mine, subnet, subnet_range = self.my_underlay, self.subnet_text, self.subnet_range
            iface = self.underlay_iface
        family = "IPv6" if own_device else "IPv4"
        if mine is None:  # an IPv6-only node and an IPv4 pool
            return _Decision(None, None, f"this node has no {family} underlay address: no route")
        if address is None or peer_ip is None:
            return _Decision(None, None, f"node has no {family} underlay address: skipped")
        note = self.pool_notes.get(pool.name)
        if note is None:
            note = self.pool_notes[pool.name] = f"pool {pool.name} {mode_field} {mode.value}"
        why: str | _OtherSubnet = note
        if v6 and not own_device and mode is EncapMode.CROSS_SUBNET:
            # No IPv6 underlay to route on: a same-subnet peer is reached through the tunnel.
            why = f"{note}; IPv6 pods are tunnelled (the underlay is IPv4)"
        elif mode is EncapMode.CROSS_SUBNET:
            host_len = 32 if address.version == 4 else 128
            if mine.prefixlen == host_len:
                why = (
                    f"this node's underlay address {mine} has no subnet prefix: "
                    f"cross-subnet can't work, every peer is tunnelled; {why}"
                )
            elif address.prefixlen == host_len:
                why = (
                    f"node's underlay address {address} is stored as /{host_len}: "
                    "cross-subnet can't work for it (it will always be tunnelled); "
                    f"record it with its subnet prefix; {why}"
                )
            elif subnet_range[0] <= peer_ip.value <= subnet_range[1]:
                return _Decision(
                    Path.DIRECT,
                    NexthopKey(peer_ip, iface),
                    f"same subnet {subnet} and pool {pool.name} is CrossSubnet",
                )
            else:
                why = _OtherSubnet(peer_ip, subnet, note)
        vxlan_ready, ipip_ready, vxlan6_ready = self.ready or (False, False, False)
        if kind is Path.VXLAN:
            family = "IPv6 " if v6 else ""
            ready = vxlan6_ready if own_device else vxlan_ready
            if not ready or not self.my_tunnels[v6]:
                return _Decision(
                    None, None, f"{why}; this node has no {family}VXLAN tunnel address yet"
                )
            vtep = self.vteps.get(node_name)
            gateway = None if vtep is None else vtep.tunnel_ip6 if v6 else vtep.tunnel_ip
            if vtep is None or gateway is None:
                problem = self.problems.get(node_name, f"node has no {family}VXLAN tunnel address")
                return _Decision(None, None, f"{why}; {problem}: skipped")
            device = VXLAN6_DEVICE if own_device else VXLAN_DEVICE
            return _Decision(Path.VXLAN, NexthopKey(gateway, device), why, vtep)
        if not ipip_ready:
            return _Decision(None, None, f"{why}; this node has no IPIP tunnel address yet")
        return _Decision(Path.IPIP, NexthopKey(peer_ip, IPIP_DEVICE), why)

    # --- blocks and their routes --------------------------------------------------------------

    def _sync_blocks(self, view: ClusterView) -> set[int]:
        """Take in the BlockInfo objects that differ from last time; return the ids of the
        blocks whose offers must be (re)made or withdrawn."""
        current = dict(zip(map(id, view.blocks), view.blocks, strict=True))
        gone = self.blocks.keys() - current.keys()
        new = current.keys() - self.blocks.keys()
        for bid in gone:
            self._count_block(self.blocks.pop(bid), bid, -1)
        for bid in new:
            piece = self.blocks[bid] = _block_piece(view, current[bid], self.me_name)
            self._count_block(piece, bid, +1)
        return gone | new

    def _count_block(self, piece: _BlockPiece, bid: int, step: int) -> None:
        pool = piece.pool.name if piece.pool is not None else None
        self.pool_blocks[pool] = self.pool_blocks.get(pool, 0) + step
        for host in piece.hosts:
            key = (host, pool)
            self.dirty_peers.add(key)
            refs = self.peer_refs[key] = self.peer_refs.get(key, 0) + step
            if not refs:
                del self.peer_refs[key]
            if step > 0:
                self.users.setdefault(host, []).append(bid)
            else:
                users = self.users[host]
                users.remove(bid)
                if not users:
                    del self.users[host]

    def _reoffer(self, bid: int, dirty_dsts: set[_DstKey]) -> None:
        """Withdraw a block's route offers and make them again (none if it is gone)."""
        for route in self.offers.pop(bid, ()):
            dst = _dst_key(route)
            entries = [e for e in self.by_dst[dst] if e[1] != bid]
            if entries:
                self.by_dst[dst] = entries
            else:
                del self.by_dst[dst]
            dirty_dsts.add(dst)
        piece = self.blocks.get(bid)
        if piece is None:
            return
        made = self._block_offers(piece)
        self.offers[bid] = tuple(route for _, _, route in made)
        for dst, rank, route in made:
            self.by_dst.setdefault(dst, []).append((rank, bid, route))
            dirty_dsts.add(dst)

    def _block_offers(self, piece: _BlockPiece) -> list[_Offer]:
        decisions = iter([self.decide(h, piece.pool) for h in piece.hosts])
        block = piece.block
        first, plen, _ = piece.sort_key
        version = block.cidr.version
        offers: list[_Offer] = []
        if block.node == self.me_name:
            route = Route(block.cidr, blackhole=True)
            offers.append(((MAIN_TABLE, version, first, plen), (0, piece.sort_key, 0), route))
        elif block.node is not None:
            decision = next(decisions)
            if decision.nexthop is not None:
                route = Route(block.cidr, nexthop=decision.nexthop)
                offers.append(((MAIN_TABLE, version, first, plen), (0, piece.sort_key, 0), route))
        host_len = 32 if version == 4 else 128
        for i, addr in enumerate(piece.borrowed, start=1):
            decision = next(decisions)
            dst = netaddr.IPNetwork((addr.value, host_len), version)
            vtep = decision.vtep
            if vtep is not None and addr in (vtep.tunnel_ip, vtep.tunnel_ip6):
                # The peer's own VTEP address: resolved by the neighbour entry, no gateway.
                own6 = version == 6 and vtep.mac6 is not None
                route = Route(dst, dev=VXLAN6_DEVICE if own6 else VXLAN_DEVICE)
            elif decision.nexthop is not None:
                route = Route(dst, nexthop=decision.nexthop)
            else:
                continue
            key = (MAIN_TABLE, version, addr.value, host_len)
            offers.append((key, (-1, piece.sort_key, i), route))
        return offers

    def _choose(self, dst: _DstKey) -> None:
        offers = self.by_dst.get(dst)
        new = min(offers, key=_rank)[2] if offers else None
        old = self.chosen.get(dst)
        if old is new or (old is not None and new is not None and old == new):
            return
        if old is not None:
            self.routes.discard(old)
            self._ref_nexthop(old.nexthop, -1)
            del self.chosen[dst]
        if new is not None:
            self.routes.add(new)
            self._ref_nexthop(new.nexthop, +1)
            self.chosen[dst] = new

    def _ref_nexthop(self, key: NexthopKey | None, step: int) -> None:
        if key is not None:
            count = self.nexthop_refs[key] = self.nexthop_refs.get(key, 0) + step
            if not count:
                del self.nexthop_refs[key]

    # --- introspection ------------------------------------------------------------------------

    def _peer_path(self, key: _PeerKey) -> PeerPath | None:
        name, pool_name = key
        if not self.peer_refs.get(key):
            return None
        decision = self.decide(name, self.pools[pool_name])
        piece = self.nodes.get(name)
        underlay = piece.underlay if piece is not None else None
        return PeerPath(name, decision.path, str(decision.reason), underlay)

    def _set_peer(self, key: _PeerKey) -> None:
        """Keep the sorted peer list current for one (node, pool) pair."""
        peers = self.peer_list
        old = self.peer_paths.pop(key, None)
        if old is not None:
            i = bisect.bisect_left(peers, _peer_order(old), key=_peer_order)
            while peers[i] is not old:  # equal (node, reason): the same path for other pools
                i += 1
            del peers[i]
        path = self._peer_path(key)
        if path is not None:
            peers.insert(bisect.bisect_right(peers, _peer_order(path), key=_peer_order), path)
            self.peer_paths[key] = path

    def _rebuild_peers(self) -> None:
        """_set_peer() for many pairs at once: one sort instead of many list inserts."""
        for key in self.dirty_peers:
            path = self._peer_path(key)
            if path is None:
                self.peer_paths.pop(key, None)
            else:
                self.peer_paths[key] = path
        self.peer_list = sorted(self.peer_paths.values(), key=_peer_order)


def _rank(offer: tuple[_Rank, int, Route]) -> _Rank:
    return offer[0]


def _dst_key(route: Route) -> _DstKey:
    return (route.table, route.dst.version, route.dst.first, route.dst.prefixlen)


def _count(refs: dict[netaddr.IPAddress, int], key: netaddr.IPAddress, step: int) -> None:
    count = refs.get(key, 0) + step
    if count:
        refs[key] = count
    else:
        del refs[key]


def _first(claimants: str | set[str]) -> str:
    return claimants if isinstance(claimants, str) else min(claimants)


def _peer_order(path: PeerPath) -> tuple[str, str]:
    return (path.node, path.reason)


def devices_for(pools: list[IPPool], me: LocalNode, cfg: DataplaneConfig) -> dict[str, Device]:
    """Our tunnel devices for the encapsulations these pools (the ones in use) ask for."""
    encaps = {e[0] for e in map(_encap, pools) if e is not None}
    devices: dict[str, Device] = {}
    tx_checksum = False if cfg.tx_checksum_off else None
    # The IPv6 tunnel address goes on vxlan-v6.calico when we have an IPv6 underlay.
    own6 = me.vxlan_tunnel_addr6 if me.underlay6 is not None else None
    shared6 = me.vxlan_tunnel_addr6 if me.underlay6 is None else None
    v4 = me.underlay
    if Path.VXLAN in encaps and v4 is not None and (me.vxlan_tunnel_addr, shared6) != (None, None):
        devices[VXLAN_DEVICE] = VxlanDevice(
            name=VXLAN_DEVICE,
            vni=cfg.vxlan_vni,
            port=cfg.vxlan_port,
            local=v4.ip,
            parent=me.underlay_iface,
            mac=me.vtep_mac,
            mtu=cfg.vxlan_mtu or me.underlay_mtu - VXLAN_OVERHEAD,
            address=me.vxlan_tunnel_addr,
            tx_checksum=tx_checksum,
            address6=shared6,
        )
    if Path.VXLAN in encaps and own6 is not None and me.underlay6 is not None:
        devices[VXLAN6_DEVICE] = VxlanDevice(
            name=VXLAN6_DEVICE,
            vni=cfg.vxlan_vni,
            port=cfg.vxlan_port,
            local=me.underlay6.ip,
            parent=me.underlay6_iface,
            mac=me.vtep_mac6,
            mtu=cfg.vxlan_mtu_v6 or me.underlay6_mtu - VXLAN6_OVERHEAD,
            address=None,
            tx_checksum=tx_checksum,
            address6=own6,
        )
    if Path.IPIP in encaps and v4 is not None and me.ipip_tunnel_addr is not None:
        devices[IPIP_DEVICE] = IpipDevice(
            name=IPIP_DEVICE,
            mtu=cfg.ipip_mtu or me.underlay_mtu - IPIP_OVERHEAD,
            address=me.ipip_tunnel_addr,
            tx_checksum=tx_checksum,
        )
    return devices


def compute(
    view: ClusterView,
    me: LocalNode,
    cfg: DataplaneConfig | None = None,
    cache: ComputeCache | None = None,
) -> Dataplane:
    """The desired dataplane of node `me`. Same input, same output; no I/O. `cache` only
    saves work when called again with a view that shares objects with the last one."""
    state = cache if cache is not None else ComputeCache()
    return state.update(view, me, cfg or DataplaneConfig())


def nat_outgoing(
    version: int, pools: Iterable[IPPool], address: netaddr.IPAddress | None = None
) -> NatOutgoing | None:
    """NAT-outgoing for IP `version`: traffic from the pools that ask for natOutgoing to
    anywhere outside all pools of that version; None when no pool asks for it."""
    sources = frozenset(p.cidr for p in pools if p.version == version and p.nat_outgoing)
    if not sources:
        return None
    every = frozenset(p.cidr for p in pools if p.version == version)
    return NatOutgoing(sources, every, address, version)


def pools_without_nat(pools: list[IPPool], *, ipv6_underlay: bool = False) -> list[IPPool]:
    """Enabled IPv6 pools that ask for natOutgoing but do not get it: with an IPv4 underlay
    alone there is no IPv6 path out of the cluster to masquerade onto, so it is not applied
    (the agent says so). With an IPv6 underlay (`ipv6_underlay`: this node has one) each
    of them gets it (Dataplane.nat6, NAT66): none."""
    if ipv6_underlay:
        return []
    return [p for p in pools if p.version == 6 and p.nat_outgoing and not p.disabled]


def local_node_from(
    node: Node,
    underlay_iface: str,
    underlay_mtu: int = 1500,
    *,
    underlay6_iface: str = "",
    underlay6_mtu: int = 1500,
) -> LocalNode:
    """A LocalNode from our own Node resource (the agent registered it, so it is complete);
    its IPv6 underlay is the Node's ipv6_address."""
    if node.ipv4_address is None and node.ipv6_address is None:
        raise ValueError(f"node {node.name!r}: neither ipv4_address nor ipv6_address is set")
    return LocalNode(
        name=node.name,
        underlay_iface=underlay_iface,
        underlay=node.ipv4_address,
        vxlan_tunnel_addr=node.ipv4_vxlan_tunnel_addr,
        ipip_tunnel_addr=node.ipv4_ipip_tunnel_addr,
        mac=node.vxlan_tunnel_mac,
        underlay_mtu=underlay_mtu,
        vxlan_tunnel_addr6=node.ipv6_vxlan_tunnel_addr,
        underlay6=node.ipv6_address,
        underlay6_iface=underlay6_iface,
        underlay6_mtu=underlay6_mtu,
        mac6=node.ipv6_vxlan_tunnel_mac,
    )
