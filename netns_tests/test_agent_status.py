"""`overlayctl status` and the agent's /metrics, run inside a lab node's namespace.

Lab: node1, node2 on 192.168.1.0/24, node3 on 192.168.2.0/24, cross-subnet mode, so node1
has one direct peer and one VXLAN peer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns_tests.lab_fixtures import LAB_TEST_MARKS, METRICS_URL, Lab, poll, running_lab, snapshot
from overlay.lab import lab as labmod
from overlay.lab import netns

pytestmark = LAB_TEST_MARKS


@pytest.fixture(scope="module")
def lab3() -> Iterator[Lab]:
    with running_lab(nodes=3, subnets=2, mode="cross-subnet", pods_per_node=0) as lab:
        yield lab


def status_cmd(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = netns.exec_argv(ns, [labmod.bin_path("overlayctl"), "status", *args])
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def test_status_lists_each_peer_with_its_path_and_why(lab3: Lab) -> None:
    res = status_cmd(lab3.node(1).netns)
    assert res.returncode == 0, res.stderr
    rows = {line.split()[0]: line for line in res.stdout.splitlines() if line.strip()}
    direct, vxlan = rows[lab3.node(2).name], rows[lab3.node(3).name]
    assert direct.split()[1:3] == [lab3.address(lab3.node(2)), "direct"], direct
    assert "same subnet 192.168.1.0/24" in direct
    assert vxlan.split()[1:3] == [lab3.address(lab3.node(3)), "vxlan"], vxlan
    assert "different subnet" in vxlan
    assert f"Node:        {lab3.node(1).name}" in res.stdout
    assert "reachable" in res.stdout and "nexthop objects" in res.stdout
    want = "Filter:      vxlan accepted only from 3 node addresses; never from pods"
    assert want in res.stdout, res.stdout


def test_status_json_parses_and_matches_the_node(lab3: Lab) -> None:
    res = status_cmd(lab3.node(3).netns, "-o", "json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["node"] == lab3.node(3).name and doc["agent"] == "up"
    assert doc["datastore"]["reachable"] and doc["dataplane_synced"]
    assert doc["underlay"] == {"interface": "eth0", "address": "192.168.2.13/24", "mtu": 1500}
    assert doc["pod_mtu"] == 1450
    assert doc["tunnel_filter"] == {"tunnels": ["vxlan"], "node_addresses": 3, "external": []}
    paths = {p["node"]: p["path"] for p in doc["peers"]}
    # node3 is alone on its subnet: both peers are across the router.
    assert paths == {lab3.node(1).name: "vxlan", lab3.node(2).name: "vxlan"}


def test_liveness_and_readiness_probes_answer_ok_on_a_synced_agent(lab3: Lab) -> None:
    # Felix's probe paths on the same port: what a kubelet or a systemd watchdog asks.
    for node in lab3.state.nodes:
        assert lab3.http(node, "/liveness").strip() == "ok"
        assert lab3.http(node, "/readiness").strip() == "ok"


def _probe(ns: str, path: str) -> tuple[int, str]:
    script = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        "    r = urllib.request.urlopen(sys.argv[1], timeout=3)\n"
        "    print(r.status, r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code, e.read().decode())\n"
    )
    argv = netns.exec_argv(ns, [sys.executable, "-c", script, f"{METRICS_URL}{path}"])
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    code, _, text = res.stdout.partition(" ")
    return (int(code), text.strip()) if code.isdigit() else (0, res.stderr.strip())


def test_an_agent_that_cannot_reach_its_datastore_is_live_but_not_ready(lab3: Lab) -> None:
    # The probes answer before the datastore does: live (no restart would help), not ready.
    node = lab3.node(3)
    argv = lab3.stop_agent(node)
    unreachable = list(argv)
    unreachable[unreachable.index("--datastore") + 1] = "etcd://127.0.0.1:1"  # nothing there
    try:
        lab3.start_agent(node, unreachable)
        up, _ = poll(
            lambda: _probe(node.netns, "/liveness") == (200, "ok"), timeout=15, interval=0.1
        )
        assert up, lab3.log_since(node, 0)[-1500:]
        assert _probe(node.netns, "/readiness") == (
            503,
            "datastore not read yet\ndataplane not programmed yet",
        )
        shown = status_cmd(node.netns).stdout
        assert "etcd://127.0.0.1:1  not read yet (the agent is starting)" in shown, shown
    finally:
        lab3.stop_agent(node)
        lab3.start_agent(node, argv)
        lab3.wait_agent(node, peers=2)
    assert _probe(node.netns, "/readiness") == (200, "ok")


def test_status_without_an_agent_says_so(lab3: Lab) -> None:
    res = status_cmd(lab3.state.router_netns)
    assert res.returncode != 0
    assert "no overlay-agent answers on 127.0.0.1:9099" in res.stderr


def test_nat_outgoing_on_an_ipv6_pool_is_reported_as_not_applied(lab3: Lab, tmp_path: Path) -> None:
    # IPv6 pods ride the IPv4 underlay: there is no IPv6 path out of the cluster to
    # masquerade onto. An operator who asks for it must hear so from the agent itself.
    node = lab3.node(1)
    manifest = tmp_path / "v6.json"
    manifest.write_text(json.dumps({
        "apiVersion": "projectcalico.org/v3", "kind": "IPPool",
        "metadata": {"name": "v6-pool"},
        # vxlanMode Never: no tunnel addresses, so no blocks are left behind for later tests.
        "spec": {"cidr": "fd00:10:244::/48", "blockSize": 122, "vxlanMode": "Never",
                 "natOutgoing": True},
    }))  # fmt: skip

    def warned() -> list[str]:
        return [w for w in lab3.status(node)["warnings"] if "IPv6 pool v6-pool" in w]

    lab3.overlayctl("apply", "-f", str(manifest))
    try:
        found, _ = poll(warned, timeout=10, interval=0.1)
        assert found, lab3.status(node)["warnings"]
        assert "natOutgoing is not applied" in found[0] and "fd00:10:244::/48" in found[0]
        assert "WARNING:     IPv6 pool v6-pool" in status_cmd(node.netns).stdout
        assert "event=nat_outgoing_not_applied pool=v6-pool" in Path(node.log).read_text()
    finally:
        lab3.overlayctl("delete", "ippool", "v6-pool")
    gone, _ = poll(lambda: not warned(), timeout=10, interval=0.1)
    assert gone, lab3.status(node)["warnings"]


def test_metrics_count_syncs_and_drift_repairs(lab3: Lab) -> None:
    node = lab3.node(1)
    before = lab3.metrics(node)
    expected = {
        "overlay_agent_up",
        "overlay_syncs_total",
        "overlay_sync_duration_seconds",
        "overlay_kernel_ops_total",
        "overlay_drift_repairs_total",
        "overlay_errors_total",
    }
    assert expected <= set(before), sorted(before)
    assert before["overlay_peers"] == 2 and before["overlay_routes"] == 3  # 2 remote + blackhole
    assert before["overlay_tunnel_filter_hosts"] == 3  # the three nodes' underlay addresses
    assert before["overlay_underlay_changes_total"] == 0
    assert before["overlay_syncs_total"] >= 1 and before["overlay_kernel_ops_total"] > 0

    kernel = snapshot(node.netns)
    block = next(dst for kind, dst, _gw, dev in kernel.routes if dev == "vxlan.calico")
    netns.run(["ip", "-n", node.netns, "route", "del", block])
    restored, _ = poll(lambda: snapshot(node.netns) == kernel, timeout=5.0)
    assert restored

    def counted() -> dict[str, float] | None:
        m = lab3.metrics(node)
        return (
            m if m["overlay_drift_repairs_total"] > before["overlay_drift_repairs_total"] else None
        )

    after, _ = poll(counted, timeout=5.0, interval=0.1)
    assert after, "overlay_drift_repairs_total did not increase after a repaired drift"
    assert after["overlay_syncs_total"] > before["overlay_syncs_total"]
    assert after["overlay_kernel_ops_total"] > before["overlay_kernel_ops_total"]


def _tx_checksumming(ns: str) -> str:
    out = netns.run(["ip", "netns", "exec", ns, "ethtool", "-k", "vxlan.calico"])
    return next(line.split(":")[1].strip() for line in out.splitlines()
                if line.startswith("tx-checksumming:"))  # fmt: skip


@pytest.mark.skipif(shutil.which("ethtool") is None, reason="needs the ethtool command")
def test_checksum_offload_broken_turns_tx_offload_off_and_keeps_it_off(lab3: Lab) -> None:
    # This kernel is newer than 5.7, so the agent leaves offload alone unless told otherwise
    # (Calico's FeatureDetectOverride ChecksumOffloadBroken=true).
    node = lab3.node(2)
    assert lab3.status(node)["tx_checksum_offload"] == "unchanged"
    assert _tx_checksumming(node.netns) == "on"
    argv = lab3.stop_agent(node)
    try:
        lab3.start_agent(node, [*argv, "--checksum-offload-broken", "true"])
        lab3.wait_agent(node, peers=2)
        assert _tx_checksumming(node.netns) == "off"
        assert lab3.status(node)["tx_checksum_offload"] == "off"
        res = status_cmd(node.netns)
        assert "TX checksum offload off on the tunnel devices" in res.stdout, res.stdout
        # Turned back on by hand (a link event): off again within a second.
        before = snapshot(node.netns)
        netns.run(["ip", "netns", "exec", node.netns, "ethtool", "-K", "vxlan.calico", "tx", "on"])
        repaired, took = poll(lambda: _tx_checksumming(node.netns) == "off", timeout=1.0)
        assert repaired, "TX checksum offload was not turned off again within 1 s"
        print(f"\ntx checksum offload drift repaired in {took * 1000:.0f} ms")
        assert snapshot(node.netns) == before  # in place: nothing on the device was lost
    finally:
        lab3.stop_agent(node)
        netns.run(["ip", "netns", "exec", node.netns, "ethtool", "-K", "vxlan.calico", "tx", "on"])
        lab3.start_agent(node, argv)
        lab3.wait_agent(node, peers=2)
    assert _tx_checksumming(node.netns) == "on"  # left alone again


def test_a_bad_checksum_offload_override_is_refused_naming_it(lab3: Lab) -> None:
    argv = [labmod.bin_path("overlay-agent"), "--node-name", "x", "--datastore",
            lab3.state.datastore, "--checksum-offload-broken", "maybe"]  # fmt: skip
    # In a lab namespace all the same, should it ever get past its configuration.
    res = subprocess.run(
        netns.exec_argv(lab3.state.router_netns, argv),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert res.returncode == 1
    assert "checksum_offload_broken: 'maybe' is not one of auto, true, false" in res.stderr
