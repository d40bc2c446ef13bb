"""Node registration: the agent's own Node record, its tunnel addresses, VTEP MAC and MTU.

register_node() follows Calico's calico-node start-up (reference calico.md §1.3, §1.4,
§3.8): the underlay address is stored WITH its prefix (cross-subnet depends on it), and
the tunnel addresses come from the pools whose mode needs them, under fixed handles.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import netaddr

from ipam.allocator import IPAM, ReleaseRequest, TunnelKind
from ipam.errors import IPAMError
from ipam.model import EncapMode, IPPool, Node
from ipam.store import ResourceStore
from overlay.model import IPIP_OVERHEAD, VXLAN6_OVERHEAD, VXLAN_OVERHEAD
from overlay.view import vtep_mac

__all__ = [
    "DEFAULT_MTU_FILE",
    "Encap",
    "check_node_address",
    "encaps_in_use",
    "mtu_for",
    "read_mtu_file",
    "register_node",
    "tunnel_handle",
    "vtep_mac",
    "write_mtu_file",
]

log = logging.getLogger(__name__)

DEFAULT_MTU_FILE = Path("/var/lib/overlay/mtu")
MIN_MTU = 68  # the smallest MTU IPv4 allows
MAX_MTU = 65535

Encap = Literal["vxlan", "vxlan-v6", "ipip"]
_OVERHEAD: dict[str, int] = {
    "vxlan": VXLAN_OVERHEAD,
    "vxlan-v6": VXLAN6_OVERHEAD,
    "ipip": IPIP_OVERHEAD,
}

# Calico's order (§3.8): IPIP, then VXLAN, then VXLAN for IPv6. kind -> Node field.
_TUNNEL_FIELDS: tuple[tuple[TunnelKind, str], ...] = (
    ("ipip", "ipv4_ipip_tunnel_addr"),
    ("vxlan", "ipv4_vxlan_tunnel_addr"),
    ("vxlan-v6", "ipv6_vxlan_tunnel_addr"),
)
_TUNNEL_TYPES = {
    "ipip": "ipipTunnelAddress",
    "vxlan": "vxlanTunnelAddress",
    "vxlan-v6": "vxlanV6TunnelAddress",
}


def tunnel_handle(kind: TunnelKind, node: str) -> str:
    """Calico's handle names: ipip-, vxlan- and vxlan-v6-tunnel-addr-<node>."""
    return f"{kind}-tunnel-addr-{node}"


# ---------------------------------------------------------------------------- MTU


def encaps_in_use(pools: Iterable[IPPool], *, ipv6_underlay: bool = False) -> set[Encap]:
    """The encapsulations some enabled pool asks for (mode Always or CrossSubnet). With an
    IPv6 underlay, IPv6 pools' VXLAN is vxlan-v6.calico (more overhead)."""
    out: set[Encap] = set()
    for pool in pools:
        if pool.disabled:
            continue
        if pool.vxlan_mode is not EncapMode.NEVER:
            out.add("vxlan-v6" if ipv6_underlay and pool.version == 6 else "vxlan")
        if pool.ipip_mode is not EncapMode.NEVER:
            out.add("ipip")
    return out


def mtu_for(
    underlay_mtu: int,
    encaps: Iterable[str],
    configured: int | None = None,
    tunnel_mtus: Mapping[str, int | None] | None = None,
) -> int:
    """The pod MTU: `configured` when set, else the smallest MTU of the enabled
    encapsulations (a pod's packets may take any of them), each one's from `tunnel_mtus`
    when set there (FelixConfiguration vxlanMTU / ipipMTU, as Calico's MTU file), else
    the underlay MTU minus its overhead; with no encapsulation, the underlay MTU itself."""
    if configured:
        if not MIN_MTU <= configured <= MAX_MTU:
            raise ValueError(f"mtu {configured}: must be between {MIN_MTU} and {MAX_MTU}")
        if configured > underlay_mtu:
            log.warning(
                "configured mtu=%d exceeds the underlay MTU %d: large packets will be dropped",
                configured,
                underlay_mtu,
            )
        return configured
    mtus = []
    for encap in encaps:
        if encap not in _OVERHEAD:
            raise ValueError(f"encapsulation {encap!r}: expected one of {sorted(_OVERHEAD)}")
        given = (tunnel_mtus or {}).get(encap)
        mtus.append(given or underlay_mtu - _OVERHEAD[encap])
    mtu = min(mtus, default=underlay_mtu)
    if mtu < MIN_MTU:
        raise ValueError(
            f"underlay MTU {underlay_mtu}: leaves {mtu} for pods, below the minimum {MIN_MTU}"
        )
    return mtu


def write_mtu_file(path: Path | str, mtu: int) -> None:
    """Write the pod MTU for the CNI plugin, atomically: a reader sees the old or the new
    value, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{mtu}\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the CNI plugin may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_mtu_file(path: Path | str = DEFAULT_MTU_FILE) -> int | None:
    """The MTU the agent wrote, or None when there is no (valid) file yet."""
    try:
        text = Path(path).read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


# ---------------------------------------------------------------------------- Node


def check_node_address(node: Node) -> list[str]:
    """Warnings about a node's underlay address that an operator must see."""
    out = []
    if node.ipv4_address is None and node.ipv6_address is None:
        out.append(f'Node "{node.name}": no underlay address; peers cannot reach its pods')
    for addr in (node.ipv4_address, node.ipv6_address):
        if addr is not None and addr.prefixlen == (32 if addr.version == 4 else 128):
            out.append(
                f'!!! Node "{node.name}": underlay address {addr} has no subnet (a '
                f"/{addr.prefixlen}): CROSS-SUBNET CANNOT WORK for this node, every peer will "
                "tunnel to it even on the same subnet. Register it with its real prefix "
                "(e.g. 10.0.1.5/24) or let the agent autodetect it."
            )
    return out


def register_node(
    store: ResourceStore,
    ipam: IPAM,
    name: str,
    underlay: netaddr.IPNetwork | None,
    *,
    labels: dict[str, str] | None = None,
    vtep_mac: str | None = None,
    underlay6: netaddr.IPNetwork | None = None,
) -> Node:
    """Create or update this agent's Node, then reconcile its tunnel addresses.

    Operator labels on the stored Node are kept (`labels` are merged over them). The VTEP
    MAC is stored only when configured, so that every peer derives the same one otherwise.
    An IPv4 `underlay` comes with the IPv6 one this node has (`underlay6`, None: none, and
    a stored one is cleared: peers must not send IPv6 VXLAN to a node without it); an
    IPv6-only node has no IPv4 `underlay` (None), and its stored one is cleared too.
    Running it twice with the same inputs writes nothing the second time.
    """
    mac = _vtep_mac_override(name, vtep_mac)
    if underlay is None:
        if underlay6 is None:
            raise ValueError(f"node {name}: neither an IPv4 nor an IPv6 underlay address")
        addresses_ = {"ipv4_address": None, "ipv6_address": underlay6}
    elif netaddr.IPNetwork(underlay).version == 4:
        addresses_ = {"ipv4_address": netaddr.IPNetwork(underlay), "ipv6_address": underlay6}
    else:
        addresses_ = {"ipv6_address": netaddr.IPNetwork(underlay)}

    def identity(current: Node | None) -> Node:
        base = current if current is not None else Node(name=name)
        merged = {**base.labels, **(labels or {})}
        return dataclasses.replace(base, labels=merged, **addresses_, vxlan_tunnel_mac=mac)

    # First the identity and labels: tunnel pools select nodes by the stored labels.
    node = store.update_node(name, identity)
    for warning in check_node_address(node):
        log.error("%s", warning)

    addresses: dict[str, netaddr.IPAddress | None] = {}
    new: list[ReleaseRequest] = []
    try:
        for kind, attr in _TUNNEL_FIELDS:
            addr, fresh = _reconcile_tunnel(ipam, node, kind, getattr(node, attr))
            addresses[attr] = addr
            if fresh and addr is not None:
                new.append(ReleaseRequest(addr, tunnel_handle(kind, name)))

        def with_tunnels(current: Node | None) -> Node:
            return dataclasses.replace(identity(current), **addresses)  # type: ignore[arg-type]

        return store.update_node(name, with_tunnels)
    except BaseException:
        # Calico's rule: addresses assigned in a pass that could not be recorded are freed,
        # or they would leak (no Node points at them).
        if new:
            ipam.release(new)
        raise


def _vtep_mac_override(name: str, mac: str | None) -> str | None:
    if not mac:
        return None
    try:
        return vtep_mac(name, mac)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise ValueError(
            f"vtep_mac {mac!r}: not a MAC address (expected xx:xx:xx:xx:xx:xx)"
        ) from None


def _reconcile_tunnel(
    ipam: IPAM, node: Node, kind: TunnelKind, recorded: netaddr.IPAddress | None
) -> tuple[netaddr.IPAddress | None, bool]:
    """(the node's address of `kind`, whether it was assigned in this call)."""
    handle = tunnel_handle(kind, node.name)
    held = set(ipam.ips_by_handle(handle))
    reclaimed = None
    if recorded is not None and not held:
        # The Node names an address our handle does not hold (an older record, a restored
        # datastore): claim that same address when its pool still qualifies, so the
        # address every peer has programmed does not change.
        pools = ipam.tunnel_pools(node.name, kind)
        if any(p.version == recorded.version and recorded in p.cidr for p in pools):
            attrs = {"node": node.name, "type": _TUNNEL_TYPES[kind]}
            try:
                ipam.assign_ip(recorded, handle, node.name, attrs)
            except IPAMError as e:
                log.warning(
                    "node %s: recorded %s tunnel address %s cannot be reclaimed (%s); "
                    "assigning a new one",
                    node.name,
                    kind,
                    recorded,
                    e,
                )
            else:
                reclaimed = recorded
    # Keeps a held address still inside a qualifying pool; releases the rest; assigns one
    # when none is left; releases everything when no pool qualifies any more.
    addr = ipam.ensure_tunnel_address(node.name, kind)
    fresh = addr is not None and (addr not in held or addr == reclaimed)
    return addr, fresh
