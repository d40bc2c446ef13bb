"""The lab's names and addresses, computed from its options. Pure: no I/O.

Layout (K subnets, N nodes, P pods per node, lab name L):

    L-router   one bridge per underlay subnet (192.168.<k>.1/24), forwarding between them,
               and a link to the external host; it knows no pod routes.
    L-ext      the "external" host 203.0.113.10, reached by pods only through NAT-outgoing.
    L-node<i>  a node: eth0 192.168.<k>.<10+i>/24, default route via the router; runs
               overlay-agent.
    With --ipv6-underlay every subnet also has fd00:192:168:<k>::/64 (router ::1, node
    ::<10+i>: the IPv4 host part written again), so IPv6 pods can ride an IPv6 underlay,
    and the external host is fd00:203:0:113::10 too (router ::1), reached through NAT66.
    With --ipv6-only the nodes keep their IPv4 addresses (the agents' way to an etcd
    datastore; see LabOptions.ipv6_only), but the cluster has no IPv4 pool, the pods no
    IPv4 address and the agents register none (--ip-autodetection none).
    L-n<i>p<j> pod j of node i, made by the real CNI plugin.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import netaddr

POOL_CIDR = "10.244.0.0/16"
POOL6_CIDR = "fd00:10:244::/48"
EXTERNAL_NET = netaddr.IPNetwork("203.0.113.0/24")
EXTERNAL_HOST = netaddr.IPAddress("203.0.113.10")
EXTERNAL_ROUTER = netaddr.IPAddress("203.0.113.1")
# With --ipv6-underlay only: the external network's IPv6 twin (203.0.113.x spelt in hex
# groups, as the underlay's), where IPv6 pods get through NAT66 with their node's address.
EXTERNAL_NET6 = netaddr.IPNetwork("fd00:203:0:113::/64")
EXTERNAL_HOST6 = netaddr.IPAddress("fd00:203:0:113::10")
EXTERNAL_ROUTER6 = netaddr.IPAddress("fd00:203:0:113::1")
ENCAPS = ("vxlan", "ipip")
MODES = ("always", "cross-subnet")


class TopologyError(ValueError):
    pass


@dataclass(frozen=True)
class LabOptions:
    name: str = "lab"
    nodes: int = 4
    subnets: int = 2
    encap: str = "vxlan"
    mode: str = "cross-subnet"
    pods_per_node: int = 2
    datastore: str = "sqlite"  # sqlite | etcd
    # Dual-stack pods: an IPv6 pool too, always VXLAN (IP-in-IP carries IPv4 only), its pods
    # riding the IPv4 underlay.
    ipv6: bool = False
    # An IPv6 underlay too (implies ipv6): IPv6 pods ride vxlan-v6.calico between nodes.
    ipv6_underlay: bool = False
    # IPv6-only nodes (implies ipv6_underlay): no IPv4 pool, IPv6-only pods, agents with
    # --ip-autodetection none (Calico's IP=none). The node namespaces keep their IPv4
    # addresses: an etcd datastore is reached over them (the lab's management network, not
    # the overlay's underlay), status and check keep one schema, and an agent told `none`
    # must then ignore an IPv4 address that is there, as Calico's does on a dual-stack host.
    ipv6_only: bool = False

    def __post_init__(self) -> None:
        # Every consumer that checks a weaker option must see what the stronger one implies.
        if self.ipv6_only:
            object.__setattr__(self, "ipv6_underlay", True)
        if self.ipv6_underlay:
            object.__setattr__(self, "ipv6", True)

    @property
    def families(self) -> tuple[int, ...]:
        return pod_families(asdict(self))

    def validate(self) -> None:
        if not (self.name.isascii() and self.name.replace("-", "").isalnum()) or not (
            1 <= len(self.name) <= 8
        ):
            raise TopologyError(f"--name: {self.name!r} must be 1-8 letters, digits or '-'")
        if not 1 <= self.subnets <= 50:
            raise TopologyError(f"--subnets: {self.subnets} is outside 1..50")
        if not self.subnets <= self.nodes <= 200:
            raise TopologyError(f"--nodes: {self.nodes} must be between --subnets and 200")
        if not 0 <= self.pods_per_node <= 50:
            raise TopologyError(f"--pods-per-node: {self.pods_per_node} is outside 0..50")
        if self.encap not in ENCAPS:
            raise TopologyError(f"--encap: {self.encap!r} is not one of {', '.join(ENCAPS)}")
        if self.mode not in MODES:
            raise TopologyError(f"--mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if self.datastore not in ("sqlite", "etcd"):
            raise TopologyError(f"--datastore: {self.datastore!r} is not sqlite or etcd")
        if self.ipv6_only and self.encap == "ipip":
            raise TopologyError(
                "--encap ipip cannot go with --ipv6-only: IP-in-IP carries IPv4 only, and an "
                "IPv6-only lab has no IPv4 pool (use --encap vxlan)"
            )


def pod_families(options: Mapping[str, Any]) -> tuple[int, ...]:
    """The IP versions a lab's pods get, from its options as stored in state.json (a lab
    made before an option existed has no key for it)."""
    if options.get("ipv6_only"):
        return (6,)
    return (4, 6) if options.get("ipv6") else (4,)


@dataclass(frozen=True)
class LabNode:
    name: str  # the cluster node name
    netns: str
    subnet: str  # 192.168.<k>.0/24
    underlay_ip: str  # with prefix
    gateway: str
    router_port: str  # the veth end in the router namespace
    underlay_ip6: str | None = None  # with prefix; only with ipv6_underlay
    gateway6: str | None = None


@dataclass(frozen=True)
class LabPod:
    name: str
    netns: str
    node: str


@dataclass(frozen=True)
class Topology:
    options: LabOptions
    router_netns: str
    external_netns: str
    subnets: list[str]
    nodes: list[LabNode]
    pods: list[LabPod] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def node(self, name: str) -> LabNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)


def subnet_of(index: int, opts: LabOptions) -> int:
    """Nodes fill subnets in contiguous runs: with 4 nodes and 2 subnets, 1-2 | 3-4."""
    return index * opts.subnets // opts.nodes + 1


def subnet6(k: int) -> str:
    """The IPv6 /64 of underlay subnet k (192.168.k.0/24 spelt in hex groups)."""
    return f"fd00:192:168:{k}::/64"


def host6(k: int, host: int) -> str:
    """The IPv6 address of IPv4 host part `host` in subnet k: the same digits (.11 -> ::11),
    so a node's two addresses are easy to pair by eye."""
    return f"fd00:192:168:{k}::{host}"


def build(opts: LabOptions) -> Topology:
    opts.validate()
    p = opts.name
    subnets = [f"192.168.{k}.0/24" for k in range(1, opts.subnets + 1)]
    nodes = []
    for i in range(opts.nodes):
        k, host = subnet_of(i, opts), 10 + i + 1
        v6 = opts.ipv6_underlay
        nodes.append(
            LabNode(
                name=f"{p}-node{i + 1}",
                netns=f"{p}-node{i + 1}",
                subnet=f"192.168.{k}.0/24",
                underlay_ip=f"192.168.{k}.{host}/24",
                gateway=f"192.168.{k}.1",
                router_port=f"n{i + 1}",
                underlay_ip6=f"{host6(k, host)}/64" if v6 else None,
                gateway6=host6(k, 1) if v6 else None,
            )
        )
    pods = [
        LabPod(name=f"{p}-n{i + 1}p{j + 1}", netns=f"{p}-n{i + 1}p{j + 1}", node=nodes[i].name)
        for i in range(opts.nodes)
        for j in range(opts.pods_per_node)
    ]
    return Topology(opts, f"{p}-router", f"{p}-ext", subnets, nodes, pods)


def pool6_manifest(opts: LabOptions) -> dict[str, Any]:
    """The IPv6 pool of a dual-stack lab: VXLAN in the lab's mode (over the IPv4 underlay,
    or the IPv6 one with ipv6_underlay). natOutgoing only with ipv6_underlay: only then is
    there an IPv6 path out of the cluster (and an IPv6 external host at its end)."""
    mode = "Always" if opts.mode == "always" else "CrossSubnet"
    spec: dict[str, Any] = {"cidr": POOL6_CIDR, "blockSize": 122, "vxlanMode": mode}
    if opts.ipv6_underlay:
        spec["natOutgoing"] = True
    return {
        "apiVersion": "projectcalico.org/v3",
        "kind": "IPPool",
        "metadata": {"name": "lab-pool6"},
        "spec": spec,
    }


def pool_manifests(opts: LabOptions) -> list[dict[str, Any]]:
    """The pools the datastore is seeded with: one per pod IP family."""
    makers = {4: pool_manifest, 6: pool6_manifest}
    return [makers[family](opts) for family in opts.families]


def pool_manifest(opts: LabOptions) -> dict[str, Any]:
    mode = "Always" if opts.mode == "always" else "CrossSubnet"
    return {
        "apiVersion": "projectcalico.org/v3",
        "kind": "IPPool",
        "metadata": {"name": "lab-pool"},
        "spec": {
            "cidr": POOL_CIDR,
            "blockSize": 26,
            "vxlanMode": mode if opts.encap == "vxlan" else "Never",
            "ipipMode": mode if opts.encap == "ipip" else "Never",
            "natOutgoing": True,
        },
    }
