"""More nodes than blocks: tunnel and pod addresses borrowed from other nodes' blocks.

Calico #6160 (reference calico.md §5 row 6): a node whose VXLAN tunnel address lies in
another node's block is unreachable unless every peer has a host route for that address
(the block route points at the block's owner). Here a pool of two /26 blocks serves three
nodes, so the third node borrows its tunnel address and its pods' addresses, and every pod
pair must still answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import netaddr

from netns_tests.lab_fixtures import LAB_TEST_MARKS, VXLAN_DEV, Lab, poll, running_lab
from overlay.lab import lab as lab_cli
from overlay.lab import netns
from overlay.lab.lab import PodState

pytestmark = LAB_TEST_MARKS

SMALL_POOL = netaddr.IPNetwork("10.250.0.0/25")  # two /26 blocks


def tunnel_addresses(lab: Lab) -> dict[str, str | None]:
    nodes = json.loads(lab.overlayctl("get", "nodes", "-o", "json"))
    items = nodes.get("items", [nodes])
    return {n["metadata"]["name"]: n["spec"].get("ipv4VXLANTunnelAddr") for n in items}


def host_routes(ns: str) -> dict[str, str]:
    out = json.loads(netns.run(["ip", "-j", "-n", ns, "route", "show", "proto", "80"]) or "[]")
    return {r["dst"]: r.get("dev", "") for r in out if "/" not in r["dst"]}


def test_a_node_with_a_borrowed_tunnel_address_is_reachable(tmp_path: Path) -> None:
    with running_lab(nodes=3, subnets=2, mode="always", pods_per_node=0) as lab:
        small = tmp_path / "small.json"
        small.write_text(json.dumps({
            "apiVersion": "projectcalico.org/v3", "kind": "IPPool",
            "metadata": {"name": "small"},
            "spec": {"cidr": str(SMALL_POOL), "blockSize": 26, "vxlanMode": "Always"},
        }))  # fmt: skip
        lab.overlayctl("apply", "-f", str(small))
        lab.overlayctl("delete", "ippool", "lab-pool")  # tunnel addresses move to "small"

        def moved() -> dict[str, str | None] | None:
            found = tunnel_addresses(lab)
            ok = all(a and netaddr.IPAddress(a) in SMALL_POOL for a in found.values())
            return found if ok and len(found) == 3 else None

        tunnels, _ = poll(moved, timeout=15, interval=0.1)
        assert tunnels, tunnel_addresses(lab)
        usage = json.loads(lab.overlayctl("ipam", "show", "--show-blocks", "-o", "json"))
        (pool,) = [p for p in usage["pools"] if p["name"] == "small"]
        owners = {b["cidr"]: b["affinity"] for b in pool["blocks"]}
        assert len(owners) == 2 and all(owners.values()), owners

        def block_of(addr: str) -> str:
            return str(netaddr.IPNetwork(f"{addr}/26").cidr)

        borrowers = [n for n, a in tunnels.items() if a and owners.get(block_of(a)) != n]
        assert len(borrowers) == 1, (tunnels, owners)

        pods = []
        for i in (1, 2, 3):
            node = lab.node(i)
            pod = PodState(name=f"{lab.name}-n{i}p1", netns=f"{lab.name}-n{i}p1", node=node.name)
            netns.add(pod.netns)
            pod.ip = lab_cli.pod_ip(lab_cli.cni("ADD", lab.state, pod))
            pods.append(pod)
        for i in (1, 2, 3):
            lab.wait_agent(lab.node(i))
        # Every peer holds a host route for each tunnel address outside its owner's block.
        for i in (1, 2, 3):
            ns = lab.node(i).netns
            mine = tunnels[lab.node(i).name]
            for name, addr in tunnels.items():
                if addr != mine and addr is not None and name in borrowers:
                    assert host_routes(ns).get(addr) == VXLAN_DEV, (ns, addr, owners)
        for src in pods:
            for dst in pods:
                if src is not dst:
                    assert dst.ip and lab.ping(src.netns, dst.ip, count=2), (src.name, dst.name)
        for pod in pods:
            lab_cli.cni("DEL", lab.state, pod)
