"""cold_peers(), cold_routes(), cold_tables(): the first programming of a node whose kernel
holds nothing of ours, planned from a few fields of each stored record. PURE.

Why: the agent's normal first pass decodes every record into validated objects, computes
with the state that makes every later pass O(change), plans against the kernel and encodes
typed operations. At 10k peers that is ~0.8 s of CPU, several times what iproute2 needs to
write the same objects, and a node that boots or joins waits for it before its pods reach
anyone. This plan is made from plain strings and integers (the datastore extracts the
fields: datastore.list_fields) and goes to the kernel as ready netlink messages
(Kernel.program_cold), followed by the tunnel filter and NAT-outgoing tables.

How it stays right:
- It covers the common shape only: IPv4 VXLAN pools (Always or CrossSubnet), an IPv4
  underlay, no VTEP address or MAC claimed twice, no block twice. Anything else is
  Declined, with the reason, and the normal pass does the work. The few blocks that lend
  addresses to other nodes (lenders()) are read whole, by the watch's own decoder.
- For every cluster it accepts it wants exactly what compute() wants: the same device,
  neighbours, FDB entries, nexthops, routes and nftables tables (a property test holds it
  to compute()).
- It is never the last word: the agent's normal first pass follows at once, reads the
  kernel and changes what differs. That is normally nothing; a record that only the full
  validation refuses (this plan reads a few fields of it) is taken out then.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import netaddr

from ipam.block import HOST_AFFINITY_PREFIX
from ipam.model import EncapMode, IPPool
from ipam.resources import valid_mac, valid_name
from overlay.compute import DataplaneConfig, LocalNode, devices_for, nat_outgoing
from overlay.model import VXLAN_DEVICE, NatOutgoing, TunnelFilter, VxlanDevice

# What the plan reads of each record, as JSON paths (datastore.list_fields gives the key,
# then the value at each path as JSON has it; None when absent).
NODE_FIELDS = (
    "$.metadata.name",
    "$.spec.bgp.ipv4Address",
    "$.spec.ipv4VXLANTunnelAddr",
    "$.spec.vxlanTunnelMACAddr",
    "$.spec.ipv6VXLANTunnelAddr",
)
BLOCK_FIELDS = ("$.cidr", "$.affinity", "$.attributes")
NodeRow = tuple[str, Any, Any, Any, Any, Any]  # key, then NODE_FIELDS
BlockRow = tuple[str, Any, Any, Any]  # key, then BLOCK_FIELDS

_PREFIXLENS = {str(n): n for n in range(33)}
# inet_pton takes a dotted quad of decimal octets without leading zeros and nothing else:
# exactly the canonical text that the full decoding reads as written (a test holds the two
# equal), at a fifth of the cost of inet_aton plus the inet_ntoa round trip.
_PTON, _INET = socket.inet_pton, socket.AF_INET


class Declined(Exception):
    """The cluster is not of the shape this plan covers; the message says what differs."""


@dataclass(frozen=True)
class ColdPeers:
    """The first half of a cold plan, from the Node records: the device and each peer's
    neighbour and FDB entry (addresses packed, MACs as bytes), and what the routes need."""

    device: VxlanDevice
    neighbours: list[tuple[bytes, bytes]]  # on the device: (peer tunnel address, its MAC)
    fdb: list[tuple[bytes, bytes]]  # on the device: (peer MAC, its underlay address)
    # name -> (underlay address, its prefix length, tunnel address or None)
    peers: dict[str, tuple[int, int, bytes | None]]
    me: LocalNode
    modes: list[tuple[int, int, int, str, EncapMode]]  # _pool_modes()
    hosts: set[int]  # every node's underlay address, ours too: the tunnel filter's


@dataclass(frozen=True)
class ColdRoutes:
    """The second half, from the IPAM blocks: nexthops before the routes that use them."""

    nexthops: list[tuple[int, bytes, str]]  # (id, gateway, device name), onlink
    routes: list[tuple[int, int, int]]  # (network, prefix length, nhid; 0: blackhole), sorted
    # /32s to a borrowed address that is its host's own VXLAN tunnel address: on the device,
    # no gateway (the neighbour entry resolves it), as compute() routes them. Sorted.
    device_routes: list[int] = field(default_factory=list)


def cold_peers(
    me: LocalNode,
    cfg: DataplaneConfig,
    pools: list[IPPool],
    nodes: Iterable[NodeRow],
    *,
    nodes_prefix: str,
) -> ColdPeers:
    """The device and the peers of node `me`, or Declined. `nodes_prefix`: the key prefix of
    Node records (a record's name must be its key's last part). The neighbour and FDB
    entries depend on nothing else: blocks cannot change them (all pools are in use)."""
    if me.underlay is None or me.underlay6 is not None:
        raise Declined("this node's underlay is not IPv4 only")
    if me.vxlan_tunnel_addr is None or me.vxlan_tunnel_addr6 is not None:
        raise Declined("this node has no IPv4 VXLAN tunnel address, or an IPv6 one")
    modes = _pool_modes(pools)
    devices = devices_for(pools, me, cfg)
    device = devices.get(VXLAN_DEVICE)
    if not isinstance(device, VxlanDevice) or len(devices) != 1:
        raise Declined(f"devices {sorted(devices)}: not vxlan.calico alone")
    # compute() keeps a VTEP (tunnel address and MAC) for the first claimant, and for us
    # before anyone: here any second claimant declines.
    tunnels = {me.vxlan_tunnel_addr.packed}
    macs = {bytes.fromhex(me.vtep_mac.replace(":", ""))}
    peers: dict[str, tuple[int, int, bytes | None]] = {}
    neighbours: list[tuple[bytes, bytes]] = []
    fdb: list[tuple[bytes, bytes]] = []
    hosts: set[int] = set()
    cut, sha1 = len(nodes_prefix), hashlib.sha1
    for key, name, address, tunnel, mac, tunnel6 in nodes:
        if type(name) is not str or key[cut:] != name or not valid_name(name):
            raise Declined(f"Node record {key}: name {name!r} is not its key's")
        if address is None:
            continue  # no IPv4 underlay: no VTEP, no route
        underlay, plen = _cidr(address, f"node {name} ipv4Address")
        hosts.add(underlay)
        if name == me.name:
            continue
        if tunnel6 is not None:
            raise Declined(f"node {name}: an IPv6 tunnel address")
        if mac is not None and not (type(mac) is str and valid_mac(mac)):
            raise Declined(f"node {name}: vxlanTunnelMACAddr {mac!r} is not a MAC address")
        if tunnel is None:
            peers[name] = (underlay, plen, None)
            continue
        gateway = _address(tunnel, f"node {name} ipv4VXLANTunnelAddr")
        if mac is None:  # Calico's rule, as view.vtep_mac()
            peer_mac = b"\x66" + sha1(name.encode()).digest()[:5]
        else:
            peer_mac = bytes.fromhex(mac.replace(":", ""))
        if gateway in tunnels or peer_mac in macs:
            raise Declined(f"node {name}: its VXLAN tunnel address or VTEP MAC is not its own")
        tunnels.add(gateway)
        macs.add(peer_mac)
        peers[name] = (underlay, plen, gateway)
        neighbours.append((gateway, peer_mac))
        fdb.append((peer_mac, underlay.to_bytes(4, "big")))
    return ColdPeers(device, neighbours, fdb, peers, me, modes, hosts)


def cold_tables(
    cold: ColdPeers, cfg: DataplaneConfig, pools: list[IPPool]
) -> tuple[TunnelFilter, NatOutgoing | None]:
    """The nftables side, as compute() wants it: the tunnel filter admitting VXLAN from
    every node's underlay address (and externalNodesList), NAT-outgoing for the pools that
    ask for it."""
    external = frozenset(n for n in cfg.external_nodes if n.version == 4)
    hosts = frozenset(netaddr.IPAddress(value, 4) for value in cold.hosts)
    tunnel_filter = TunnelFilter(hosts, cold.device.port, False, external)
    return tunnel_filter, nat_outgoing(4, pools, cfg.nat_outgoing_address)


def lenders(blocks: Iterable[BlockRow], me: str) -> list[str]:
    """The keys of the blocks that may lend addresses to other nodes than their owner (and
    us): cold_routes() needs their borrowed addresses, which their attributes alone do not
    give (Calico's blocks name the node per allocation). Usually none, or a few."""
    out = []
    for key, _cidr, affinity, attributes in blocks:
        owner = None
        if type(affinity) is str and affinity.startswith(HOST_AFFINITY_PREFIX):
            owner = affinity[len(HOST_AFFINITY_PREFIX) :]
        if attributes and _hosted_elsewhere(attributes, owner, me):
            out.append(key)
    return out


def cold_routes(
    cold: ColdPeers,
    blocks: Iterable[BlockRow],
    lent: Mapping[str, Mapping[int, str]],
    *,
    nhid_base: int,
) -> ColdRoutes:
    """A blackhole per block of ours; per peer block, the path compute() would choose
    (direct on the underlay for a CrossSubnet peer in our subnet, else VXLAN); per address
    a block lends to another node, a /32 on that node's path; or Declined. `lent`: for each
    key lenders() named, the block's borrowed addresses (address -> hosting node), as the
    watch decodes them. Nexthop ids count up from `nhid_base`."""
    me, peers, modes = cold.me, cold.peers, cold.modes
    assert me.underlay is not None
    local_first, local_last = me.underlay.cidr.first, me.underlay.cidr.last
    cross_subnet_possible = me.underlay.prefixlen != 32
    iface, my_name = me.underlay_iface, me.name
    single = modes[0] if len(modes) == 1 else None  # the usual case: one pool
    ids: dict[tuple[bytes, str], int] = {}
    nexthops: list[tuple[int, bytes, str]] = []
    routes: list[tuple[int, int, int]] = []
    device_routes: list[int] = []
    seen: set[tuple[int, int]] = set()
    cross, cut = EncapMode.CROSS_SUBNET, len(HOST_AFFINITY_PREFIX)

    def via(host: str | None, mode: EncapMode | None) -> tuple[bytes, str] | None:
        """compute()'s path to a node for a pool: the gateway and device of its nexthop."""
        peer = peers.get(host) if host is not None else None
        if peer is None or mode is None:
            return None
        underlay, peer_plen, tunnel = peer
        if (
            mode is cross
            and cross_subnet_possible
            and peer_plen != 32
            and local_first <= underlay <= local_last
        ):
            return underlay.to_bytes(4, "big"), iface
        return (tunnel, VXLAN_DEVICE) if tunnel is not None else None

    def route(dst: int, plen: int, gateway: tuple[bytes, str]) -> None:
        nhid = ids.get(gateway)
        if nhid is None:
            nhid = ids[gateway] = nhid_base + len(ids)
            nexthops.append((nhid, *gateway))
        routes.append((dst, plen, nhid))

    for key, cidr, affinity, attributes in blocks:
        first, plen = block = _cidr(cidr, f"block {key} cidr")
        host_bits = (1 << (32 - plen)) - 1
        last = first | host_bits
        if first & host_bits or block in seen:
            raise Declined(f"block {key}: cidr {cidr!r} has host bits or is not unique")
        seen.add(block)
        owner = None
        if type(affinity) is str and affinity.startswith(HOST_AFFINITY_PREFIX):
            owner = affinity[cut:]
        if single is not None:
            mode = single[4] if single[0] <= first and last <= single[1] else None
        else:
            mode = _mode_for(first, last, modes)
        borrowed = lent.get(key)
        if borrowed is None and attributes and _hosted_elsewhere(attributes, owner, my_name):
            raise Declined(f"block {key}: lends addresses, and they were not read")
        for address, host in sorted((borrowed or {}).items()):
            if host in (my_name, owner):  # ours: the CNI routes them; the owner's: the block
                continue
            if (address, 32) in seen or not first <= address <= last:
                raise Declined(f"block {key}: borrowed {address} is routed twice or outside")
            seen.add((address, 32))
            gateway = via(host, mode)
            if gateway is None:
                continue
            if gateway == (address.to_bytes(4, "big"), VXLAN_DEVICE):
                device_routes.append(address)  # the host's own tunnel address: no gateway
            else:
                route(address, 32, gateway)
        if owner == my_name:
            routes.append((first, plen, 0))
            continue
        gateway = via(owner, mode)
        if gateway is not None:
            route(first, plen, gateway)
    routes.sort()
    device_routes.sort()
    return ColdRoutes(nexthops, routes, device_routes)


def _pool_modes(pools: list[IPPool]) -> list[tuple[int, int, int, str, EncapMode]]:
    """(first, last, prefix length, name, VXLAN mode) per pool; Declined unless every pool
    is an enabled IPv4 VXLAN pool without IP-in-IP."""
    if not pools:
        raise Declined("no IP pool")
    out: list[tuple[int, int, int, str, EncapMode]] = []
    for p in pools:
        if p.version != 4 or p.disabled or p.ipip_mode is not EncapMode.NEVER:
            raise Declined(f"pool {p.name}: IPv6, disabled or IP-in-IP")
        if p.vxlan_mode is EncapMode.NEVER:
            raise Declined(f"pool {p.name}: vxlanMode Never")
        out.append((p.cidr.first, p.cidr.last, p.cidr.prefixlen, p.name, p.vxlan_mode))
    return out


def _mode_for(
    first: int, last: int, modes: list[tuple[int, int, int, str, EncapMode]]
) -> EncapMode | None:
    """The VXLAN mode of the pool holding the block: the most specific, then the greatest
    name, as ClusterView.pool_for chooses."""
    best = None
    for p_first, p_last, p_plen, name, mode in modes:
        if p_first <= first and last <= p_last and (best is None or (p_plen, name) > best[:2]):
            best = (p_plen, name, mode)
    return best[2] if best is not None else None


def _cidr(text: Any, what: str) -> tuple[int, int]:
    """(value, prefix length) of a canonical "a.b.c.d/len"; Declined for anything else."""
    if type(text) is str:
        address, _, length = text.partition("/")
        plen = _PREFIXLENS.get(length)
        if plen is not None:
            try:  # (not contextlib.suppress: this runs twice per peer)
                return int.from_bytes(_PTON(_INET, address), "big"), plen
            except (OSError, ValueError):
                pass
    raise Declined(f"{what}: {text!r} is not a canonical IPv4 address/prefix")


def _address(text: Any, what: str) -> bytes:
    """The packed address of a canonical dotted quad; Declined for anything else."""
    if type(text) is str:
        try:
            return _PTON(_INET, text)
        except (OSError, ValueError):
            pass
    raise Declined(f"{what}: {text!r} is not a canonical IPv4 address")


def _hosted_elsewhere(attributes: Any, owner: str | None, me: str) -> bool:
    """Whether a block's attributes name a node other than its owner and us, so that the
    block may lend it addresses (an attribute no address refers to counts too). True when
    unsure: anything but a list of objects."""
    if type(attributes) is not list:
        return True
    for attribute in attributes:
        if type(attribute) is not dict:
            return True
        secondary = attribute.get("secondary")
        if secondary is None:
            continue
        if type(secondary) is not dict:
            return True
        host = secondary.get("node")
        if host and host != owner and host != me:
            return True
    return False
