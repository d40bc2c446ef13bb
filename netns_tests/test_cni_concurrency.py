"""100 concurrent ADDs and DELs of the real exec'd plugin on one node (calico #5612's case).

Two nodes on different underlay subnets: every pod made on node 1 must answer a ping from
a pod on node 2 (VXLAN, as the pool is CrossSubnet). Then 100 concurrent DELs leave no
allocation, veth or host route behind.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import netaddr
import pytest

from netns_tests.cni_fixtures import cluster, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

PODS = 100
WORKERS = 100  # every ADD in flight at once, as a kubelet with a burst of pods would


def test_100_concurrent_adds_then_dels() -> None:
    with cluster((1, 2)) as c:
        n1, n2 = c.nodes
        c.wait_agent(n1, peers=1)
        c.wait_agent(n2, peers=1)
        probe_ns, probe_path = c.pod_netns()
        probe = c.exec_plugin(n2, c.conf(n2), "ADD", "probe", probe_path)
        assert probe.rc == 0, probe.stdout

        pods = [(f"con-{i}", *c.pod_netns()) for i in range(PODS)]

        def add(pod: tuple[str, str, str]) -> object:
            cid, _, path = pod
            return c.exec_plugin(n1, c.conf(n1), "ADD", cid, path, timeout=120)

        with ThreadPoolExecutor(WORKERS) as pool:
            runs = list(pool.map(add, pods))
        errors = [r.stdout for r in runs if r.rc != 0]  # type: ignore[attr-defined]
        assert not errors, errors[:3]
        addresses = [r.out["ips"][0]["address"].split("/")[0] for r in runs]  # type: ignore[attr-defined]
        assert len(set(addresses)) == PODS
        assert len(c.host_veths(n1)) == PODS
        assert sorted(c.host_routes(n1)) == sorted(addresses)

        # Node 2 must have routes to every block node 1 claimed before pods are reachable
        # (each block exactly: 100 pods fill more than one /26, the pool's block size).
        blocks = {str(netaddr.IPNetwork(f"{a}/26").cidr) for a in addresses}
        assert wait_for(
            lambda: blocks <= {r["dst"] for r in c.ip_json(n2.netns, "route", "show")},
            timeout=30,
        ), c.ip(n2.netns, "route", "show").stdout
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda a: c.ping(probe_ns, a), addresses))
        unreachable = [a for a, ok in zip(addresses, answers, strict=True) if not ok]
        assert not unreachable, unreachable

        def delete(pod: tuple[str, str, str]) -> object:
            cid, _, path = pod
            return c.exec_plugin(n1, c.conf(n1), "DEL", cid, path, timeout=120)

        with ThreadPoolExecutor(WORKERS) as pool:
            dels = list(pool.map(delete, pods))
        assert all(r.rc == 0 for r in dels), [r.stdout for r in dels if r.rc][:3]  # type: ignore[attr-defined]
        left = c.allocations()
        assert set(left) == {probe.out["ips"][0]["address"].split("/")[0]}
        assert c.host_veths(n1) == []
        assert c.host_routes(n1) == []
