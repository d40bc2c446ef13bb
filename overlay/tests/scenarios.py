"""Small cluster builders shared by the compute, plan and reconciler tests."""

from __future__ import annotations

from netaddr import IPAddress, IPNetwork

from ipam.model import EncapMode, IPPool, Node
from overlay.compute import DataplaneConfig, LocalNode, compute
from overlay.model import Dataplane
from overlay.view import BlockInfo, ClusterView

POOL_CIDR = IPNetwork("10.244.0.0/16")

# Node -> (underlay with prefix, vxlan tunnel address, ipip tunnel address, block)
LAYOUT = {
    "a": ("10.0.1.5/24", "10.244.0.1", "10.244.0.2", "10.244.0.0/26"),  # us
    "b": ("10.0.1.6/24", "10.244.0.65", "10.244.0.66", "10.244.0.64/26"),  # our subnet
    "c": ("10.0.2.7/24", "10.244.0.129", "10.244.0.130", "10.244.0.128/26"),  # other subnet
    "d": ("10.0.1.8/32", "10.244.0.193", "10.244.0.194", "10.244.0.192/26"),  # stored as /32
}


def node(
    name: str, *, underlay: str | None = "", vxlan: str | None = "", ipip: str | None = ""
) -> Node:
    u, v, i, _ = LAYOUT[name]
    pick = lambda given, default: default if given == "" else given  # noqa: E731
    u, v, i = pick(underlay, u), pick(vxlan, v), pick(ipip, i)
    return Node(
        name=name,
        ipv4_address=IPNetwork(u) if u else None,
        ipv4_vxlan_tunnel_addr=IPAddress(v) if v else None,
        ipv4_ipip_tunnel_addr=IPAddress(i) if i else None,
    )


def pool(
    vxlan: EncapMode = EncapMode.NEVER,
    ipip: EncapMode = EncapMode.NEVER,
    *,
    name: str = "p1",
    cidr: IPNetwork = POOL_CIDR,
    nat: bool = False,
    disabled: bool = False,
) -> IPPool:
    return IPPool(
        name=name,
        cidr=cidr,
        block_size=26,
        vxlan_mode=vxlan,
        ipip_mode=ipip,
        nat_outgoing=nat,
        disabled=disabled,
    )


def me(name: str = "a", **kw: object) -> LocalNode:
    u, v, i, _ = LAYOUT[name]
    args: dict[str, object] = {
        "name": name,
        "underlay_iface": "eth0",
        "underlay": IPNetwork(u),
        "vxlan_tunnel_addr": IPAddress(v),
        "ipip_tunnel_addr": IPAddress(i),
    }
    args.update(kw)
    return LocalNode(**args)  # type: ignore[arg-type]


def standard_view(*pools: IPPool, nodes: list[Node] | None = None) -> ClusterView:
    nodes = nodes if nodes is not None else [node(n) for n in LAYOUT]
    blocks = [BlockInfo(IPNetwork(LAYOUT[n.name][3]), n.name) for n in nodes]
    return ClusterView(nodes=nodes, pools=pools, blocks=blocks)


def desired(view: ClusterView, local: LocalNode | None = None) -> Dataplane:
    return compute(view, local or me(), DataplaneConfig())
