"""Host routes to pods, deleted by someone else, come back while their pods live.

Lab: node1 and node2 on one subnet, one pod each (direct path). The CNI plumbing writes
`<pod ip>/32 dev cali... scope link` on the pod's node; the agent's netlink monitor sees
it deleted and the pod-route keeper writes it again, as Felix keeps workload routes. A
route that is no pod's, or the route of a pod whose veth is gone, is not written back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import netaddr
import pytest

from netns_tests.lab_fixtures import LAB_TEST_MARKS, Lab, poll, running_lab
from overlay.lab import lab as lab_cli
from overlay.lab import netns
from overlay.lab.lab import PodState

pytestmark = LAB_TEST_MARKS


@pytest.fixture(scope="module")
def lab2() -> Iterator[Lab]:
    with running_lab(nodes=2, subnets=1, mode="cross-subnet", pods_per_node=1) as lab:
        yield lab


def host_route(ns: str, addr: str) -> str:
    return netns.run(["ip", "-n", ns, "route", "show", "exact", f"{addr}/32"]).strip()


def pod_ip(lab: Lab, node: int) -> str:
    ip = lab.pod(node).ip
    assert ip is not None
    return ip.split("/")[0]


def test_a_deleted_pod_route_is_written_again_within_a_second(lab2: Lab) -> None:
    node2, addr = lab2.node(2), pod_ip(lab2, 2)
    route = host_route(node2.netns, addr)
    assert route.startswith(f"{addr} dev cali") and "scope link" in route, route
    before = lab2.metrics(node2)["overlay_pod_routes_restored_total"]
    netns.run(["ip", "-n", node2.netns, "route", "del", f"{addr}/32"])
    back, took = poll(lambda: host_route(node2.netns, addr) == route, timeout=1.0, interval=0.02)
    assert back, f"pod route not restored\n{lab2.log_since(node2, 0)[-1500:]}"
    print(f"\npod route restored in {took * 1000:.0f} ms")
    assert lab2.metrics(node2)["overlay_pod_routes_restored_total"] == before + 1
    assert lab2.ping(lab2.pod(1).netns, addr)


def test_routes_that_are_no_living_pods_are_not_written_back(lab2: Lab) -> None:
    node1 = lab2.node(1)
    # A host route someone else made, to an address of the pool that nobody holds.
    netns.run(["ip", "-n", node1.netns, "route", "add", "10.244.255.250/32", "dev", "eth0"])
    netns.run(["ip", "-n", node1.netns, "route", "del", "10.244.255.250/32"])
    # The pod's veth deleted (the pod is gone): its route goes with it and stays gone.
    addr = pod_ip(lab2, 1)
    veth = host_route(node1.netns, addr).split()[2]
    netns.run(["ip", "-n", node1.netns, "link", "del", veth])
    came_back, _ = poll(
        lambda: host_route(node1.netns, "10.244.255.250") or host_route(node1.netns, addr),
        timeout=1.0,
        interval=0.05,
    )
    assert not came_back, came_back
    assert lab2.metrics(node1)["overlay_pod_routes_restored_total"] == 0


def test_a_route_deleted_while_the_agent_was_down_is_restored_at_its_start(lab2: Lab) -> None:
    # No event reaches an agent that is not running: the start-up look over this node's
    # pods catches up (and every resync interval after, for events lost otherwise).
    node2, addr = lab2.node(2), pod_ip(lab2, 2)
    route = host_route(node2.netns, addr)
    argv = lab2.stop_agent(node2)
    try:
        netns.run(["ip", "-n", node2.netns, "route", "del", f"{addr}/32"])
        assert host_route(node2.netns, addr) == ""
    finally:
        lab2.start_agent(node2, argv)
    back, took = poll(lambda: host_route(node2.netns, addr) == route, timeout=15, interval=0.05)
    assert back, f"not restored at start\n{lab2.log_since(node2, 0)[-1500:]}"
    print(f"\npod route restored {took:.2f}s after the agent was started")
    lab2.wait_agent(node2, peers=1)
    assert lab2.metrics(node2)["overlay_pod_routes_restored_total"] == 1
    assert lab2.ping(lab2.node(1).netns, addr)  # (pod 1 lost its veth in the test above)


def test_a_pod_with_a_borrowed_address_gets_its_route_back_at_start(lab2: Lab) -> None:
    """A pod on node2 whose address lies in node1's block (borrowed, as when a node's own
    blocks are full): the catch-up finds it through the cluster view, not by its blocks."""
    node1, node2 = lab2.node(1), lab2.node(2)
    block = netaddr.IPNetwork(f"{pod_ip(lab2, 1)}/26").cidr  # the lab's block size
    addr = str(block[50])
    pod = PodState(name=f"{lab2.name}-n2p9", netns=f"{lab2.name}-n2p9", node=node2.name)
    netns.add(pod.netns)
    try:
        added = lab_cli.cni("ADD", lab2.state, pod, runtime_config={"ips": [f"{addr}/32"]})
        assert lab_cli.pod_ip(added) == addr
        route = host_route(node2.netns, addr)
        assert route.startswith(f"{addr} dev cali"), route
        argv = lab2.stop_agent(node2)
        try:
            netns.run(["ip", "-n", node2.netns, "route", "del", f"{addr}/32"])
        finally:
            lab2.start_agent(node2, argv)
        back, took = poll(lambda: host_route(node2.netns, addr) == route, timeout=15)
        assert back, f"borrowed pod route not restored\n{lab2.log_since(node2, 0)[-1500:]}"
        print(f"\nborrowed pod route restored {took:.2f}s after the agent was started")
        lab2.wait_agent(node2, peers=1)
        assert lab2.metrics(node2)["overlay_pod_routes_restored_total"] == 1
        # node1 routes the address to node2 (a /32 beats its own blackholed block).
        assert lab2.ping(node1.netns, addr)
    finally:
        with contextlib.suppress(lab_cli.LabError):
            lab_cli.cni("DEL", lab2.state, pod)
        netns.delete(pod.netns)
