"""Real OS processes allocating at once: on one SQLite file, and against a 3-member etcd
cluster that loses a member mid-run. No address twice, none lost, books consistent."""

from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import netaddr
import pytest

from ipam.allocator import IPAM
from ipam.datastore import Datastore, open_datastore
from ipam.records import HANDLES_PREFIX
from ipam.resources import parse_documents
from ipam.store import ResourceStore
from ipam.testing.ipam_worker import WorkerSpec, run_workers

POOL = """\
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: pool}
spec: {cidr: 10.96.0.0/16, blockSize: 26}
"""
WORKERS = 8


def setup_pool(url: str) -> None:
    ds = open_datastore(url)
    try:
        for res in parse_documents(POOL):
            ResourceStore(ds).apply(res)
    finally:
        ds.close()


def specs(per_worker: int, nodes: int) -> list[WorkerSpec]:
    # Each node is served by two processes, so CAS races on one block are real.
    return [
        WorkerSpec([f"node-{w % nodes}", f"node-{(w + 1) % nodes}"], per_worker, f"w{w}")
        for w in range(WORKERS)
    ]


def verify(url: str, results: list[dict[str, Any]]) -> tuple[IPAM, Datastore]:
    """No duplicates; every allocation a client got is stored under its handle; no other
    allocation exists; blocks, affinities and handles agree."""
    ips = [r["ip"] for r in results]
    dupes = [ip for ip, n in Counter(ips).items() if n > 1]
    assert dupes == [], f"addresses handed out twice: {dupes[:10]}"
    ds = open_datastore(url)
    ipam = IPAM(ds, ResourceStore(ds))
    snap = ipam.snapshot()
    stored: dict[str, str | None] = {}
    for block in snap.blocks.values():
        for ordinal, index in enumerate(block.allocations):
            if index is not None:
                stored[str(block.address(ordinal))] = block.attributes[index].handle_id
    lost = [r for r in results if stored.get(r["ip"]) != r["handle"]]
    assert lost == [], f"allocations lost or re-owned: {lost[:5]}"
    assert len(stored) == len(results), "allocations nobody asked for"
    assert ipam.check_consistency() == []
    return ipam, ds


@pytest.mark.slow
def test_eight_processes_on_one_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/overlay.db"
    setup_pool(url)
    results, errors, _ = run_workers(url, specs(250, nodes=8), timeout=90)
    assert errors == []
    assert len(results) == WORKERS * 250
    ipam, ds = verify(url, results)
    # Plenty of room: every node's addresses come from its own blocks.
    for node in {r["node"] for r in results}:
        own = ipam.affine_blocks(node)
        mine = [netaddr.IPAddress(r["ip"]) for r in results if r["node"] == node]
        assert all(any(ip in b for b in own) for ip in mine), node
    ds.close()


@pytest.mark.etcd
@pytest.mark.slow
def test_eight_clients_on_etcd_with_a_member_killed_mid_run(tmp_path: Path) -> None:
    if shutil.which("etcd") is None:
        pytest.skip("etcd server binary not installed (Debian package etcd-server)")
    from ipam.testing.etcd import EtcdCluster

    per_worker = 60
    with EtcdCluster(tmp_path / "etcd", members=3) as cluster:
        url = cluster.url
        setup_pool(url)
        killed: list[int] = []

        def kill_when_a_third_is_done() -> None:
            ds = open_datastore(url)
            try:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    if len(ds.list(HANDLES_PREFIX).items) >= WORKERS * per_worker // 3:
                        break
                    time.sleep(0.05)
                leader = cluster.leader_index()
                cluster.kill_member(leader)  # the hardest member to lose
                killed.append(leader)
            finally:
                ds.close()

        results, errors, _ = run_workers(
            url, specs(per_worker, nodes=4), timeout=120, during=kill_when_a_third_is_done
        )
        assert killed, "the member was never killed"
        assert errors == []
        assert len(results) == WORKERS * per_worker
        verify(url, results)[1].close()
