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
    decisions: dict[tuple[str, str | None], _Decision] = field(default_factory=dict)

    def decide(self, node_name: str, pool: IPPool | None) -> _Decision:
        key = (node_name, pool.name if pool is not None else None)
        if key not in self.decisions:
            self.decisions[key] = self._decide(node_name, pool)
        return self.decisions[key]

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


def _find_vteps(
    view: ClusterView, me: LocalNode, underlays: dict[str, netaddr.IPAddress]
) -> tuple[dict[str, _Vtep], dict[str, str]]:
    """Peers' VTEPs, and why a peer has none. Duplicate tunnel IPs or MACs would make the
    kernel's neighbour/FDB entries flap between peers, so the later name (sorted) loses."""
    vteps: dict[str, _Vtep] = {}
    problems: dict[str, str] = {}
    ip_owner: dict[netaddr.IPAddress, str] = {}
    mac_owner: dict[str, str] = {me.vtep_mac: me.name}
    if me.vxlan_tunnel_addr is not None:
        ip_owner[me.vxlan_tunnel_addr] = me.name
    for name in sorted(view.nodes):
        node = view.nodes[name]
        if name == me.name:
            continue
        if node.ipv4_vxlan_tunnel_addr is None:
            problems[name] = "node has no VXLAN tunnel address"
            continue
        if node.ipv4_address is None:
            problems[name] = "node has no IPv4 underlay address"
            continue
        tunnel_ip = node.ipv4_vxlan_tunnel_addr
        mac = view.vtep_mac(name)
        if tunnel_ip in ip_owner:
            problems[name] = (
                f"VXLAN tunnel address {tunnel_ip} is also used by {ip_owner[tunnel_ip]}"
            )
            continue
        if mac in mac_owner:
            problems[name] = f"VTEP MAC {mac} is also used by {mac_owner[mac]}"
            continue
        ip_owner[tunnel_ip] = name
        mac_owner[mac] = name
        vteps[name] = _Vtep(tunnel_ip, mac, underlays[name])
    return vteps, problems


def _sorted_blocks(view: ClusterView) -> list[BlockInfo]:
    v4 = [b for b in view.blocks if b.cidr.version == 4]
    return sorted(v4, key=lambda b: (b.cidr.first, b.cidr.prefixlen, b.node or ""))


def compute(view: ClusterView, me: LocalNode, cfg: DataplaneConfig | None = None) -> Dataplane:
    """The desired dataplane of node `me`. Same input, same output; no I/O."""
    cfg = cfg or DataplaneConfig()
    blocks = _sorted_blocks(view)
    block_pools = {b.cidr: view.pool_for(b.cidr) for b in blocks}
    # Pools that matter: enabled ones (new pods may land in them any moment) and the ones
    # holding blocks (disabled pools keep routing their existing pods).
    pools_in_use = [p for p in view.pools if p.version == 4 and not p.disabled]
    pools_in_use += [p for p in block_pools.values() if p is not None]
    encaps = {e[0] for e in map(_encap, pools_in_use) if e is not None}

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

    # netaddr's .ip builds a new object each call: derive each node's once.
    underlays = {n: node.ipv4_address.ip for n, node in view.nodes.items() if node.ipv4_address}
    vteps, vtep_problems = _find_vteps(view, me, underlays)
    b = _Builder(
        view=view,
        me=me,
        vxlan_ready=VXLAN_DEVICE in devices,
        ipip_ready=IPIP_DEVICE in devices,
        vteps=vteps if VXLAN_DEVICE in devices else {},
        vtep_problems=vtep_problems,
        local_subnet=me.underlay.cidr,
        underlays=underlays,
    )

    # (table, dst) -> (precedence, route): a borrowed /32 beats a block route for the same
    # prefix (a /32 block); among equals the first in sorted order wins.
    chosen: dict[tuple[int, netaddr.IPNetwork], tuple[int, Route]] = {}

    def offer(precedence: int, route: Route) -> None:
        key = (route.table, route.dst)
        if key not in chosen or chosen[key][0] < precedence:
            chosen[key] = (precedence, route)

    for block in blocks:
        pool = block_pools[block.cidr]
        if block.node == me.name:
            offer(0, Route(block.cidr, blackhole=True))
        elif block.node is not None:
            decision = b.decide(block.node, pool)
            if decision.nexthop is not None:
                offer(0, Route(block.cidr, nexthop=decision.nexthop))
        for addr, host in sorted(block.borrowed.items()):
            if host in (me.name, block.node) or addr not in block.cidr:
                continue
            decision = b.decide(host, pool)
            dst = netaddr.IPNetwork(f"{addr}/32")
            if decision.vtep is not None and decision.vtep.tunnel_ip == addr:
                # The peer's own VTEP address: resolved by the neighbour entry, no gateway.
                offer(1, Route(dst, dev=VXLAN_DEVICE))
            elif decision.nexthop is not None:
                offer(1, Route(dst, nexthop=decision.nexthop))

    routes = {route for _, route in chosen.values()}
    neighbours: set[Neighbour] = set()
    fdb: set[FdbEntry] = set()
    for vtep in b.vteps.values():
        neighbours.add(Neighbour(VXLAN_DEVICE, vtep.tunnel_ip, vtep.mac))
        fdb.add(FdbEntry(VXLAN_DEVICE, vtep.mac, vtep.underlay))

    peers = []
    for (node_name, _pool), decision in b.decisions.items():
        node = view.nodes.get(node_name)
        underlay = underlays.get(node_name) if node else None
        peers.append(PeerPath(node_name, decision.path, decision.reason, underlay))
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
