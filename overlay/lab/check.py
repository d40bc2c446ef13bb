"""`overlayctl lab check`: ping every ordered pod pair and each pod -> external host, and
record the path each request took AS SEEN ON THE WIRE.

Every node namespace gets a lab-owned nftables table counting what leaves its underlay
interface: VXLAN (to the UDP port of the node's vxlan.calico and vxlan-v6.calico, 4789 unless
a FelixConfiguration moved it; an `inet` table matches IPv4 and IPv6 outer headers alike),
IP-in-IP (protocol 4), and plain pod-to-pod packets of either family (direct).
The external namespace counts echo requests per source address, which shows whether
NAT-outgoing rewrote the pod address into its node's. Pings run one at a time, so the
counters of the source node move only for the ping in flight. A dual-stack lab (--ipv6)
also pings every pair over IPv6, which rides the IPv4 VXLAN between nodes; with an IPv6
underlay (--ipv6-underlay) it follows the pool's mode like IPv4 (direct inside a subnet),
and each pod pings the external host over IPv6 too, which must see its node's IPv6
address (NAT66). An IPv6-only lab (--ipv6-only) is pinged over IPv6 alone: its pods have no
IPv4 address to ping or to ping from.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import netaddr

from overlay.lab import netns
from overlay.lab.lab import LabState, PodState, load
from overlay.lab.topology import (
    EXTERNAL_HOST,
    EXTERNAL_HOST6,
    POOL6_CIDR,
    POOL_CIDR,
    pod_families,
)
from overlay.model import VXLAN6_DEVICE, VXLAN_DEVICE, VXLAN_PORT

PROBE_TABLE = "overlay-lab-probe"
UNDERLAY_IF = "eth0"
EXTERNAL = "external"
PING_WAIT_S = 2
DEFAULT_TIMEOUT = 600.0
NODE_COUNTERS = ("vxlan", "ipip", "direct")


@dataclass(frozen=True)
class Probe:
    src: str  # pod name
    dst: str  # pod name, or EXTERNAL
    answered: bool  # the ping got its reply
    path: str  # local | direct | vxlan | ipip | nat | no-nat | unseen | skipped
    expected: str
    family: int = 4  # the IP version pinged

    @property
    def passed(self) -> bool:
        return self.answered and self.path == self.expected

    @property
    def cell(self) -> str:
        if self.path == "skipped":
            return "SKIP"
        if not self.answered:
            return "FAIL"
        return self.path if self.passed else f"{self.path}!"


# ------------------------------------------------------------------------------ pure


def node_probe_script(vxlan_ports: int | Iterable[int] = VXLAN_PORT) -> str:
    """Counters on the node's underlay egress (postrouting: after encapsulation and NAT).

    `udp dport` in an inet table matches the UDP header after an IPv4 or an IPv6 outer
    header, so one rule counts VXLAN over either underlay."""
    t = PROBE_TABLE
    ports = sorted({vxlan_ports} if isinstance(vxlan_ports, int) else set(vxlan_ports))
    dport = str(ports[0]) if len(ports) == 1 else "{ " + ", ".join(map(str, ports)) + " }"
    return (
        f"table inet {t}\ndelete table inet {t}\n"  # replace, whether or not it existed
        f"table inet {t} {{\n"
        "  counter vxlan { }\n  counter ipip { }\n  counter direct { }\n"
        "  chain egress {\n"
        "    type filter hook postrouting priority 300; policy accept;\n"
        f'    oifname "{UNDERLAY_IF}" udp dport {dport} counter name "vxlan"\n'
        f'    oifname "{UNDERLAY_IF}" ip protocol 4 counter name "ipip"\n'
        f'    oifname "{UNDERLAY_IF}" ip saddr {POOL_CIDR} ip daddr {POOL_CIDR} '
        'counter name "direct"\n'
        f'    oifname "{UNDERLAY_IF}" ip6 saddr {POOL6_CIDR} ip6 daddr {POOL6_CIDR} '
        'counter name "direct"\n'
        "  }\n}\n"
    )


def external_probe_script(
    node_addresses: Sequence[str], node_addresses6: Sequence[str] = ()
) -> str:
    """Per node a counter of echo requests arriving from its underlay address, and one for
    requests that still carry a pod address (NAT did not happen). `node_addresses6`, the
    nodes' IPv6 addresses in the same order (an IPv6 underlay), count IPv6 echo requests
    on the same counters: pings run one at a time, so a counter tells which node's address
    the request in flight came from, whatever its family."""
    t = PROBE_TABLE
    counters = "".join(f"  counter n{i} {{ }}\n" for i in range(len(node_addresses)))
    rules = _echo_rules(node_addresses, POOL_CIDR)
    if node_addresses6:
        rules += _echo_rules(node_addresses6, POOL6_CIDR)
    return (
        f"table inet {t}\ndelete table inet {t}\n"
        f"table inet {t} {{\n{counters}  counter pods {{ }}\n"
        "  chain ingress {\n    type filter hook input priority 0; policy accept;\n"
        f"{rules}"
        "  }\n}\n"
    )


def _echo_rules(node_addresses: Sequence[str], pool: str) -> str:
    """Rules counting the echo requests of `pool`'s IP family: from node i's address on
    counter n<i>, from a pod address of `pool` on counter pods."""
    v4 = netaddr.IPNetwork(pool).version == 4
    saddr, icmp = ("ip saddr", "icmp") if v4 else ("ip6 saddr", "icmpv6")
    sources = [*((a, f"n{i}") for i, a in enumerate(node_addresses)), (pool, "pods")]
    return "".join(
        f'    {saddr} {a} {icmp} type echo-request counter name "{name}"\n' for a, name in sources
    )


def parse_counters(nft_json: str) -> dict[str, int]:
    """Packet counts by counter name from `nft -j list counters table ...`."""
    doc = json.loads(nft_json)
    out: dict[str, int] = {}
    for item in doc.get("nftables", []):
        c = item.get("counter")
        if isinstance(c, dict) and c.get("table") == PROBE_TABLE:
            out[str(c["name"])] = int(c.get("packets", 0))
    return out


def delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


def classify(same_node: bool, moved: Mapping[str, int]) -> str:
    """The path of one request from the source node's egress counters."""
    if same_node:
        return "local"
    for name in NODE_COUNTERS:  # encapsulation wins: an encapsulated packet is not direct
        if moved.get(name, 0) > 0:
            return name
    return "unseen"


def classify_external(node_index: int, moved: Mapping[str, int]) -> str:
    """The path of one request to the external host from its counters: nat when it came
    from the source pod's node (index `node_index`), no-nat when from a pod address."""
    if moved.get(f"n{node_index}", 0) > 0:
        return "nat"
    return "no-nat" if moved.get("pods", 0) > 0 else "unseen"


def expected_path(
    encap: str,
    mode: str,
    src_node: str,
    dst_node: str,
    subnets: Mapping[str, str],
    family: int = 4,
    ipv6_underlay: bool = False,
) -> str:
    """The path the pool's mode calls for. `subnets` maps nodes to their underlay subnet
    (the lab's IPv4 and IPv6 subnets pair up, so either family's map will do)."""
    if src_node == dst_node:
        return "local"
    if family == 6 and not ipv6_underlay:
        return "vxlan"  # IPv6 pods ride the IPv4 VXLAN: no IPv6 underlay to go direct on
    if mode == "cross-subnet" and subnets[src_node] == subnets[dst_node]:
        return "direct"
    return "vxlan" if family == 6 else encap  # the IPv6 pool is VXLAN whatever --encap


def external_families(options: Mapping[str, Any]) -> tuple[int, ...]:
    """The IP versions each pod pings the external host over: those of its addresses that
    have a way out of the cluster (IPv6 only over an IPv6 underlay, NAT66)."""
    families = pod_families(options)
    return families if options.get("ipv6_underlay") else tuple(f for f in families if f == 4)


def render_matrix(pods: Sequence[str], probes: Sequence[Probe]) -> str:
    """Rows: source pod; columns: destination pods then the external host. IPv4 probes
    come first, without a header; IPv6 probes get a matrix of their own below, headed
    "IPv6:", with the external host only when it was pinged over IPv6 (an IPv6 underlay:
    without one no IPv6 path leaves the cluster). An IPv6-only lab shows the IPv6 matrix
    alone, not an empty IPv4 one above it."""
    v4 = [p for p in probes if p.family == 4]
    v6 = [p for p in probes if p.family == 6]
    sections = []
    if v4 or not v6:  # a check without any probe (no pods) still shows its IPv4 table
        sections.append(_matrix(pods, v4, [*pods, EXTERNAL]))
    if v6:
        external = [EXTERNAL] if any(p.dst == EXTERNAL for p in v6) else []
        sections.append("IPv6:\n" + _matrix(pods, v6, [*pods, *external]))
    return "\n\n".join(sections)


def _matrix(pods: Sequence[str], probes: Sequence[Probe], cols: list[str]) -> str:
    cells = {(p.src, p.dst): p.cell for p in probes}
    width = max([len(c) for c in cols] + [len(c) for c in cells.values()] + [4])
    first = max([len(p) for p in pods] + [8])
    lines = [" " * first + "  " + "  ".join(c.ljust(width) for c in cols)]
    for src in pods:
        row = [cells.get((src, dst), "-") for dst in cols]
        lines.append(src.ljust(first) + "  " + "  ".join(c.ljust(width) for c in row))
    return "\n".join(line.rstrip() for line in lines)


def summary(probes: Sequence[Probe]) -> dict[str, object]:
    failed = [p for p in probes if not p.passed]
    return {
        "ok": not failed,
        "probes": [dict(asdict(p), passed=p.passed) for p in probes],
        "failed": len(failed),
        "total": len(probes),
    }


# ---------------------------------------------------------------------------- probing


def _counters(ns: str) -> dict[str, int]:
    return parse_counters(netns.run_in(ns, ["nft", "-j", "list", "counters", "table", "inet",
                                            PROBE_TABLE]))  # fmt: skip


def _ping(ns: str, address: str) -> bool:
    argv = netns.exec_argv(ns, ["ping", "-n", "-q", "-c", "1", "-W", str(PING_WAIT_S), address])
    try:
        res = subprocess.run(argv, capture_output=True, timeout=PING_WAIT_S + 5, check=False)
    except subprocess.TimeoutExpired:
        return False
    return res.returncode == 0


def _vxlan_ports(ns: str) -> list[int]:
    """The UDP ports the node's VXLAN devices send to (vxlan.calico, vxlan-v6.calico)."""
    ports = []
    for device in (VXLAN_DEVICE, VXLAN6_DEVICE):
        try:
            out = netns.run(["ip", "-d", "-j", "-n", ns, "link", "show", "dev", device])
        except netns.NetnsError:  # no such device (IP-in-IP, or no IPv6 underlay)
            continue
        ports.append(int(json.loads(out)[0]["linkinfo"]["info_data"].get("port", VXLAN_PORT)))
    return ports or [VXLAN_PORT]


def install_probes(state: LabState) -> None:
    for n in state.nodes:
        netns.nft(n.netns, node_probe_script(_vxlan_ports(n.netns)))
    addresses = [n.underlay_ip.split("/")[0] for n in state.nodes]
    # An IPv6 underlay gives every node an IPv6 address; a lab without one, none.
    addresses6 = [n.underlay_ip6.split("/")[0] for n in state.nodes if n.underlay_ip6]
    netns.nft(state.external_netns, external_probe_script(addresses, addresses6))


def _probe_external(
    state: LabState, src: PodState, node_index: int, family: int, deadline: float
) -> Probe:
    """Ping the external host from `src` over IP `family` and see whose address it came
    from. The host's address of that family: 4, or 6 with an IPv6 underlay (NAT66)."""
    host, source = (EXTERNAL_HOST, src.ip) if family == 4 else (EXTERNAL_HOST6, src.ip6)
    if time.monotonic() > deadline or not source:
        return Probe(src.name, EXTERNAL, False, "skipped", "nat", family)
    before = _counters(state.external_netns)
    answered = _ping(src.netns, str(host))
    path = classify_external(node_index, delta(before, _counters(state.external_netns)))
    return Probe(src.name, EXTERNAL, answered, path, "nat", family)


def run_check(name: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[LabState, list[Probe]]:
    state = load(name)
    install_probes(state)
    opts = state.options
    v6_underlay = bool(opts.get("ipv6_underlay"))
    families, external = pod_families(opts), external_families(opts)
    subnets = {n.name: n.subnet for n in state.nodes}
    index = {n.name: i for i, n in enumerate(state.nodes)}
    deadline = time.monotonic() + timeout
    probes: list[Probe] = []
    for src in state.pods:
        node = state.node(src.node)
        before = _counters(node.netns)
        targets = [(dst, f, dst.ip if f == 4 else dst.ip6) for f in families for dst in state.pods]
        for dst, family, address in targets:
            if dst.name == src.name:
                continue
            want = expected_path(
                opts["encap"], opts["mode"], src.node, dst.node, subnets, family, v6_underlay
            )
            if time.monotonic() > deadline or not address:
                probes.append(Probe(src.name, dst.name, False, "skipped", want, family))
                continue
            answered = _ping(src.netns, address)
            after = _counters(node.netns)
            path = classify(src.node == dst.node, delta(before, after))
            probes.append(Probe(src.name, dst.name, answered, path, want, family))
            before = after
        for family in external:
            probes.append(_probe_external(state, src, index[src.node], family, deadline))
    return state, probes
