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
- IPv4 only for now: IPv6 pools and blocks are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import netaddr

from ipam.model import EncapMode, IPPool, Node
from overlay.model import (
    IPIP_DEVICE,
    IPIP_OVERHEAD,
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
    VxlanDevice,
)
from overlay.view import BlockInfo, ClusterView, vtep_mac


@dataclass(frozen=True)
class LocalNode:
    """This node, as the agent found it on the host (not necessarily as stored)."""

    name: str
    underlay_iface: str
    underlay: netaddr.IPNetwork  # our address WITH its subnet prefix, e.g. 10.0.1.5/24
    vxlan_tunnel_addr: netaddr.IPAddress | None = None
    ipip_tunnel_addr: netaddr.IPAddress | None = None
    mac: str | None = None  # our VTEP MAC; None: derived from the name (Calico's rule)
    underlay_mtu: int = 1500

    def __post_init__(self) -> None:
        if self.underlay.version != 4:
            raise ValueError(f"underlay: {self.underlay} is not an IPv4 address")
        _check_mtu("underlay_mtu", self.underlay_mtu)

    @property
    def vtep_mac(self) -> str:
        return vtep_mac(self.name, self.mac)


@dataclass(frozen=True)
class DataplaneConfig:
    vxlan_mtu: int | None = None  # None: underlay MTU - 50
    ipip_mtu: int | None = None  # None: underlay MTU - 20
    vxlan_vni: int = VXLAN_VNI
    vxlan_port: int = VXLAN_PORT

    def __post_init__(self) -> None:
        for name in ("vxlan_mtu", "ipip_mtu"):
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


@dataclass(frozen=True)
class _Vtep:
    tunnel_ip: netaddr.IPAddress
    mac: str
    underlay: netaddr.IPAddress


@dataclass(frozen=True)
class _Decision:
    path: Path | None
    nexthop: NexthopKey | None
    reason: str
    vtep: _Vtep | None = None  # set when path is VXLAN


@dataclass
class _Builder:
    """State of one compute() call; kept out of the signature so compute() stays a function."""

    view: ClusterView
    me: LocalNode
    vxlan_ready: bool
    ipip_ready: bool
    vteps: dict[str, _Vtep]
    vtep_problems: dict[str, str]
    local_subnet: netaddr.IPNetwork  # built once: netaddr's .cidr is slow at 50k peers
    underlays: dict[str, netaddr.IPAddress]  # node -> underlay IP, derived once per compute
    memo: ComputeCache
    decisions: dict[tuple[str, str | None], _Decision] = field(default_factory=dict)

    def decide(self, node_name: str, pool: IPPool | None) -> _Decision:
        key = (node_name, pool.name if pool is not None else None)
        decision = self.decisions.get(key)
        if decision is None:
            node = self.view.nodes.get(node_name)
            vtep = self.vteps.get(node_name)
            problem = self.vtep_problems.get(node_name)
            old = self.memo.old_decisions.get(key)
            if old is not None and old[0] is node and old[1] is vtep and old[2] == problem:
                decision = old[3]
            else:
                decision = self._decide(node_name, pool)
            self.memo.decisions[key] = (node, vtep, problem, decision)
            self.decisions[key] = decision
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
        peer = self.view.nodes.get(node_name)
        if peer is None:
            return _Decision(None, None, "no Node resource for this node: no route")
        if peer.ipv4_address is None:
            return _Decision(None, None, "node has no IPv4 underlay address: skipped")
        peer_ip = self.underlays[node_name]
        local_subnet = self.local_subnet
        notes: list[str] = []
        if mode is EncapMode.CROSS_SUBNET:
            if self.me.underlay.prefixlen == 32:
                notes.append(
                    f"this node's underlay address {self.me.underlay} has no subnet prefix: "
                    "cross-subnet can't work, every peer is tunnelled"
                )
            elif peer.ipv4_address.prefixlen == 32:
                notes.append(
                    f"node's underlay address {peer.ipv4_address} is stored as /32: "
                    "cross-subnet can't work for it (it will always be tunnelled); "
                    "record it with its subnet prefix"
                )
            elif peer_ip in local_subnet:
                return _Decision(
                    Path.DIRECT,
                    NexthopKey(peer_ip, self.me.underlay_iface),
                    f"same subnet {local_subnet} and pool {pool.name} is CrossSubnet",
                )
            else:
                notes.append(f"different subnet ({peer_ip} not in {local_subnet})")
        notes.append(f"pool {pool.name} {mode_field} {mode.value}")
        why = "; ".join(notes)
        if kind is Path.VXLAN:
            if not self.vxlan_ready:
                return _Decision(None, None, f"{why}; this node has no VXLAN tunnel address yet")
            vtep = self.vteps.get(node_name)
            if vtep is None:
                problem = self.vtep_problems.get(node_name, "node has no VXLAN tunnel address")
                return _Decision(None, None, f"{why}; {problem}: skipped")
            return _Decision(Path.VXLAN, NexthopKey(vtep.tunnel_ip, VXLAN_DEVICE), why, vtep)
        if not self.ipip_ready:
            return _Decision(None, None, f"{why}; this node has no IPIP tunnel address yet")
        return _Decision(Path.IPIP, NexthopKey(peer_ip, IPIP_DEVICE), why)


def _encap(pool: IPPool) -> tuple[Path, EncapMode, str] | None:
    if pool.vxlan_mode is not EncapMode.NEVER:
        return Path.VXLAN, pool.vxlan_mode, "vxlanMode"
    if pool.ipip_mode is not EncapMode.NEVER:
        return Path.IPIP, pool.ipip_mode, "ipipMode"
    return None


@dataclass(frozen=True)
class _BlockPiece:
    """What a block's routes depend on besides the decisions, derived once per BlockInfo."""

    block: BlockInfo
    sort_key: tuple[int, int, str]
    pool: IPPool | None
    hosts: tuple[str, ...]  # the peers whose decisions its routes use: owner, then borrowers
    borrowed: tuple[netaddr.IPAddress, ...]  # the addresses that need a /32, sorted


# A route offer: (precedence, (table, first address, prefix length), route). A borrowed /32
# (precedence 1) beats a block (0) for the same prefix. Plain ints: cheap to hash.
_Offer = tuple[int, tuple[int, int, int], Route]


class ComputeCache:
    """Per-peer pieces of the last compute(), reused for inputs that are the same objects.

    The watch keeps the Node and BlockInfo objects of unchanged records from one view to the
    next, so after one peer changes only that peer's pieces are rebuilt; the global steps
    (VTEP dedup, route precedence) still run over all peers, on cached pieces. Reusing the
    same Route/Neighbour/FdbEntry objects also lets plan()'s set differences match on
    identity. Results never depend on it: compute(v, me, cfg, cache) == compute(v, me, cfg).
    Not thread-safe: one cache per caller.
    """

    def __init__(self) -> None:
        self.context: tuple[object, ...] | None = None
        # name -> (node, underlay IP, VTEP candidate or why there is none)
        self.nodes: dict[str, tuple[Node, netaddr.IPAddress | None, _Vtep | str]] = {}
        # (node, pool name) -> (node, vtep, vtep problem, decision)
        self.decisions: dict[tuple[str, str | None], tuple[object, object, object, _Decision]]
        self.decisions = {}
        self.old_decisions: dict[tuple[str, str | None], tuple[object, object, object, _Decision]]
        self.old_decisions = {}
        # id(block) -> (block, its sort key, its pool)
        self.blocks: dict[int, _BlockPiece] = {}
        # id(block) -> (block, decisions used, route offers)
        self.offers: dict[int, tuple[BlockInfo, tuple[_Decision, ...], list[_Offer]]] = {}
        self.new_offers: dict[int, tuple[BlockInfo, tuple[_Decision, ...], list[_Offer]]] = {}
        self.ready: tuple[bool, bool] | None = None
        self.l2: dict[int, tuple[_Vtep, Neighbour, FdbEntry]] = {}  # id(vtep) -> its entries
        self.peers: dict[tuple[str, str | None], tuple[_Decision, object, PeerPath]] = {}

    def start(self, context: tuple[object, ...]) -> None:
        """Begin a compute(): drop everything when the context (this node, pools) changed."""
        if context != self.context:
            self.__init__()  # type: ignore[misc]
            self.context = context
        self.old_decisions, self.decisions = self.decisions, {}


_NodePiece = tuple[Node, netaddr.IPAddress | None, "_Vtep | str"]


def _node_piece(old: dict[str, _NodePiece], name: str, node: Node) -> _NodePiece:
    """A node's underlay IP and VTEP candidate (or why it has none), cached per Node object."""
    piece = old.get(name)
    if piece is not None and piece[0] is node:
        return piece
    underlay = node.ipv4_address.ip if node.ipv4_address is not None else None
    candidate: _Vtep | str
    if node.ipv4_vxlan_tunnel_addr is None:
        candidate = "node has no VXLAN tunnel address"
    elif underlay is None:
        candidate = "node has no IPv4 underlay address"
    else:
        mac = vtep_mac(name, node.vxlan_tunnel_mac)
        candidate = _Vtep(node.ipv4_vxlan_tunnel_addr, mac, underlay)
    return (node, underlay, candidate)


def _find_vteps(
    view: ClusterView, me: LocalNode, memo: ComputeCache
) -> tuple[dict[str, _Vtep], dict[str, str], dict[str, netaddr.IPAddress]]:
    """Peers' VTEPs, why a peer has none, and every node's underlay IP. Duplicate tunnel IPs
    or MACs would make the kernel's neighbour/FDB entries flap between peers, so the later
    name (sorted) loses."""
    vteps: dict[str, _Vtep] = {}
    problems: dict[str, str] = {}
    underlays: dict[str, netaddr.IPAddress] = {}
    ip_owner: dict[netaddr.IPAddress, str] = {}
    mac_owner: dict[str, str] = {me.vtep_mac: me.name}
    if me.vxlan_tunnel_addr is not None:
        ip_owner[me.vxlan_tunnel_addr] = me.name
    old, memo.nodes = memo.nodes, {}
    for name in sorted(view.nodes):
        memo.nodes[name] = piece = _node_piece(old, name, view.nodes[name])
        _, underlay, candidate = piece
        if underlay is not None:
            underlays[name] = underlay
        if name == me.name:
            continue
        if isinstance(candidate, str):
            problems[name] = candidate
        elif candidate.tunnel_ip in ip_owner:
            owner = ip_owner[candidate.tunnel_ip]
            problems[name] = f"VXLAN tunnel address {candidate.tunnel_ip} is also used by {owner}"
        elif candidate.mac in mac_owner:
            problems[name] = f"VTEP MAC {candidate.mac} is also used by {mac_owner[candidate.mac]}"
        else:
            ip_owner[candidate.tunnel_ip] = name
            mac_owner[candidate.mac] = name
            vteps[name] = candidate
    return vteps, problems, underlays


def _offer(precedence: int, route: Route) -> _Offer:
    return (precedence, (route.table, route.dst.first, route.dst.prefixlen), route)


def _sorted_blocks(view: ClusterView, me: str, memo: ComputeCache) -> list[_BlockPiece]:
    """IPv4 blocks in address order, with their pools and the peers they route to."""
    old, memo.blocks = memo.blocks, {}
    pieces = []
    for block in view.blocks:
        piece = old.get(id(block))
        if piece is None or piece.block is not block:
            if block.cidr.version != 4:
                continue
            owner = block.node
            borrowed = [
                (addr, host)
                for addr, host in sorted(block.borrowed.items())
                if host not in (me, owner) and addr in block.cidr
            ]
            piece = _BlockPiece(
                block=block,
                sort_key=(block.cidr.first, block.cidr.prefixlen, owner or ""),
                pool=view.pool_for(block.cidr),
                hosts=(*([owner] if owner not in (None, me) else []), *(h for _, h in borrowed)),
                borrowed=tuple(addr for addr, _ in borrowed),
            )
        memo.blocks[id(block)] = piece
        pieces.append(piece)
    pieces.sort(key=lambda p: p.sort_key)
    return pieces


def _block_offers(b: _Builder, piece: _BlockPiece) -> list[_Offer]:
    """The routes a block asks for, rebuilt only when a decision they use changed."""
    used = tuple(b.decide(h, piece.pool) for h in piece.hosts)
    block = piece.block
    old = b.memo.offers.get(id(block))
    if old is not None and old[0] is block and old[1] == used:
        b.memo.new_offers[id(block)] = old
        return old[2]
    offers: list[_Offer] = []
    decisions = iter(used)
    if block.node == b.me.name:
        offers.append(_offer(0, Route(block.cidr, blackhole=True)))
    elif block.node is not None:
        decision = next(decisions)
        if decision.nexthop is not None:
            offers.append(_offer(0, Route(block.cidr, nexthop=decision.nexthop)))
    for addr in piece.borrowed:
        decision = next(decisions)
        dst = netaddr.IPNetwork(f"{addr}/32")
        if decision.vtep is not None and decision.vtep.tunnel_ip == addr:
            # The peer's own VTEP address: resolved by the neighbour entry, no gateway.
            offers.append(_offer(1, Route(dst, dev=VXLAN_DEVICE)))
        elif decision.nexthop is not None:
            offers.append(_offer(1, Route(dst, nexthop=decision.nexthop)))
    b.memo.new_offers[id(block)] = (block, used, offers)
    return offers


def compute(
    view: ClusterView,
    me: LocalNode,
    cfg: DataplaneConfig | None = None,
    cache: ComputeCache | None = None,
) -> Dataplane:
    """The desired dataplane of node `me`. Same input, same output; no I/O. `cache` only
    saves work when called again with a view that shares objects with the last one."""
    cfg = cfg or DataplaneConfig()
    memo = cache if cache is not None else ComputeCache()
    pools_in_view = tuple(view.pools)
    # A different node or pool set changes every peer: start afresh (pools are few).
    memo.start((repr(me), tuple(map(id, pools_in_view)), pools_in_view))
    blocks = _sorted_blocks(view, me.name, memo)
    # Pools that matter: enabled ones (new pods may land in them any moment) and the ones
    # holding blocks (disabled pools keep routing their existing pods).
    pools_in_use = {id(p): p for p in view.pools if p.version == 4 and not p.disabled}
    pools_in_use.update((id(b.pool), b.pool) for b in blocks if b.pool is not None)
    encaps = {e[0] for e in map(_encap, pools_in_use.values()) if e is not None}

    devices: dict[str, Device] = {}
    if Path.VXLAN in encaps and me.vxlan_tunnel_addr is not None:
        devices[VXLAN_DEVICE] = VxlanDevice(
            name=VXLAN_DEVICE,
            vni=cfg.vxlan_vni,
            port=cfg.vxlan_port,
            local=me.underlay.ip,
            parent=me.underlay_iface,
            mac=me.vtep_mac,
            mtu=cfg.vxlan_mtu or me.underlay_mtu - VXLAN_OVERHEAD,
            address=me.vxlan_tunnel_addr,
        )
    if Path.IPIP in encaps and me.ipip_tunnel_addr is not None:
        devices[IPIP_DEVICE] = IpipDevice(
            name=IPIP_DEVICE,
            mtu=cfg.ipip_mtu or me.underlay_mtu - IPIP_OVERHEAD,
            address=me.ipip_tunnel_addr,
        )

    vteps, vtep_problems, underlays = _find_vteps(view, me, memo)
    vxlan_ready = VXLAN_DEVICE in devices
    b = _Builder(
        view=view,
        me=me,
        vxlan_ready=vxlan_ready,
        ipip_ready=IPIP_DEVICE in devices,
        vteps=vteps if vxlan_ready else {},
        vtep_problems=vtep_problems,
        local_subnet=me.underlay.cidr,
        underlays=underlays,
        memo=memo,
    )
    # Tunnel readiness is part of every decision (it can change with a block's pool).
    if memo.ready != (b.vxlan_ready, b.ipip_ready):
        memo.ready = (b.vxlan_ready, b.ipip_ready)
        memo.old_decisions = {}

    # (table, dst) -> (precedence, route): a borrowed /32 beats a block route for the same
    # prefix (a /32 block); among equals the first in sorted order wins.
    chosen: dict[tuple[int, int, int], tuple[int, Route]] = {}
    for piece in blocks:
        for precedence, dst, route in _block_offers(b, piece):
            if dst not in chosen or chosen[dst][0] < precedence:
                chosen[dst] = (precedence, route)
    memo.offers, memo.new_offers = memo.new_offers, {}

    routes = {route for _, route in chosen.values()}
    neighbours: set[Neighbour] = set()
    fdb: set[FdbEntry] = set()
    old_l2, memo.l2 = memo.l2, {}
    for vtep in b.vteps.values():
        pair = old_l2.get(id(vtep))
        if pair is None or pair[0] is not vtep:
            pair = (
                vtep,
                Neighbour(VXLAN_DEVICE, vtep.tunnel_ip, vtep.mac),
                FdbEntry(VXLAN_DEVICE, vtep.mac, vtep.underlay),
            )
        memo.l2[id(vtep)] = pair
        neighbours.add(pair[1])
        fdb.add(pair[2])

    peers = []
    old_peers, memo.peers = memo.peers, {}
    for key, decision in b.decisions.items():
        node_name = key[0]
        underlay = underlays.get(node_name) if node_name in view.nodes else None
        entry = old_peers.get(key)
        if entry is None or entry[0] is not decision or entry[1] != underlay:
            entry = (
                decision,
                underlay,
                PeerPath(node_name, decision.path, decision.reason, underlay),
            )
        memo.peers[key] = entry
        peers.append(entry[2])
    peers.sort(key=lambda p: (p.node, p.reason))

    v4_pools = [p for p in view.pools if p.version == 4]
    sources = frozenset(p.cidr for p in v4_pools if p.nat_outgoing)
    nat = NatOutgoing(sources, frozenset(p.cidr for p in v4_pools)) if sources else None

    return Dataplane(
        devices=devices,
        neighbours=neighbours,
        fdb=fdb,
        nexthops={r.nexthop for r in routes if r.nexthop is not None},
        routes=routes,
        nat=nat,
        peers=peers,
    )


def local_node_from(node: Node, underlay_iface: str, underlay_mtu: int = 1500) -> LocalNode:
    """A LocalNode from our own Node resource (the agent registered it, so it is complete)."""
    if node.ipv4_address is None:
        raise ValueError(f"node {node.name!r}: ipv4_address is not set")
    return LocalNode(
        name=node.name,
        underlay_iface=underlay_iface,
        underlay=node.ipv4_address,
        vxlan_tunnel_addr=node.ipv4_vxlan_tunnel_addr,
        ipip_tunnel_addr=node.ipv4_ipip_tunnel_addr,
        mac=node.vxlan_tunnel_mac,
        underlay_mtu=underlay_mtu,
    )
