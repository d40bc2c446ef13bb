"""IPAM benchmark: assigns/s and p50/p99 latency of assign and release, against the Go
reference `host-local` IPAM plugin exec'd in the same run.

    .venv/bin/python bench/bench_ipam.py [--quick]

Scenarios (each on a fresh datastore, one pool 10.96.0.0/16 with /26 blocks):
  a   one process on SQLite, resources read from the datastore on every call
  a'  one process on SQLite, resources held in memory (as the agent's watch-fed view does)
  b   8 processes on one SQLite file (held view)
  c   8 client processes on a 3-member etcd cluster on loopback (held view)
Every client assigns its share for its own node (one handle per address), then releases
every handle. Rates are total operations over the wall time of that phase.
Anchors: host-local ADD then DEL for the same number of allocations, one exec at a time
(against a, a') and 8 at a time (against b, c).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ipam.allocator import IPAM  # noqa: E402
from ipam.datastore import open_datastore  # noqa: E402
from ipam.resources import parse_documents  # noqa: E402
from ipam.store import ResourceStore  # noqa: E402
from ipam.testing.ipam_worker import HeldResources, WorkerSpec, run_workers  # noqa: E402

HOST_LOCAL = Path("/usr/lib/cni/host-local")
POOL = """\
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: bench}
spec: {cidr: 10.96.0.0/16, blockSize: 26}
"""
CLIENTS = 8
NODES = 8


@dataclass
class Result:
    name: str
    clients: int
    count: int
    assign_rate: float
    assign_lat: list[float]
    release_rate: float
    release_lat: list[float]
    anchor: str | None = None  # name of the host-local row to compare with


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def setup(url: str) -> None:
    ds = open_datastore(url)
    try:
        for res in parse_documents(POOL):
            ResourceStore(ds).apply(res)
    finally:
        ds.close()


def in_process(name: str, url: str, count: int, held: bool) -> Result:
    setup(url)
    ds = open_datastore(url)
    store = ResourceStore(ds)
    ipam = IPAM(ds, HeldResources(store) if held else store)
    assign_lat, release_lat = [], []
    t0 = time.perf_counter()
    for i in range(count):
        node = f"node-{i % NODES}"
        s = time.perf_counter()
        ipam.auto_assign(f"h-{i}", node, attrs={"node": node})
        assign_lat.append(time.perf_counter() - s)
    t1 = time.perf_counter()
    for i in range(count):
        s = time.perf_counter()
        ipam.release_by_handle(f"h-{i}")
        release_lat.append(time.perf_counter() - s)
    t2 = time.perf_counter()
    ds.close()
    return Result(
        name,
        1,
        count,
        count / (t1 - t0),
        assign_lat,
        count / (t2 - t1),
        release_lat,
        "host-local x1",
    )


def multi_process(name: str, url: str, per_client: int) -> Result:
    setup(url)
    # One node per client, as in a cluster where each node's agent is the only IPAM client
    # for its node (CNI goes through the agent). Contention between clients on the same
    # blocks is what ipam/tests/test_concurrency_processes.py exercises.
    specs = [WorkerSpec([f"node-{w % NODES}"], per_client, f"w{w}") for w in range(CLIENTS)]
    results, errors, times = run_workers(url, specs, release=True, held_view=True, timeout=600)
    if errors:
        raise RuntimeError(f"{name}: {len(errors)} operations failed, first: {errors[0]}")
    start = min(t["start"] for t in times)
    assigned = max(t["assigned"] for t in times)
    end = max(t["end"] for t in times)
    # The release phase of one client may overlap the assign phase of another: rates are
    # per phase span, which makes both slightly pessimistic.
    release_start = min(t["assigned"] for t in times)
    n = len(results)
    return Result(
        name,
        CLIENTS,
        n,
        n / (assigned - start),
        [r["assign_s"] for r in results],
        n / (end - release_start),
        [r["release_s"] for r in results],
        "host-local x8",
    )


def host_local(name: str, count: int, parallel: int) -> Result:
    work = Path(tempfile.mkdtemp(prefix="bench-hostlocal-"))
    try:
        conf = json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": "bench",
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.200.0.0/16"}]],
                    "dataDir": str(work / "data"),
                },
            }
        ).encode()

        def call(command: str, i: int) -> float:
            env = {
                "CNI_COMMAND": command,
                "CNI_CONTAINERID": f"bench-{i:06d}",
                "CNI_NETNS": "/var/run/netns/bench-dummy",
                "CNI_IFNAME": "eth0",
                "CNI_PATH": str(HOST_LOCAL.parent),
                "PATH": os.environ.get("PATH", ""),
            }
            s = time.perf_counter()
            res = subprocess.run([str(HOST_LOCAL)], input=conf, env=env, capture_output=True)
            took = time.perf_counter() - s
            if res.returncode != 0:
                raise RuntimeError(f"host-local {command}: {res.stdout!r} {res.stderr!r}")
            return took

        with ThreadPoolExecutor(max_workers=parallel) as pool:
            t0 = time.perf_counter()
            add = list(pool.map(lambda i: call("ADD", i), range(count)))
            t1 = time.perf_counter()
            dele = list(pool.map(lambda i: call("DEL", i), range(count)))
            t2 = time.perf_counter()
        return Result(name, parallel, count, count / (t1 - t0), add, count / (t2 - t1), dele)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(rows: list[Result]) -> str:
    by_name = {r.name: r for r in rows}
    head = [
        "scenario",
        "clients",
        "allocs",
        "assign/s",
        "p50 ms",
        "p99 ms",
        "release/s",
        "p50 ms",
        "p99 ms",
        "assign/s vs host-local",
    ]
    lines = []
    for r in rows:
        anchor = by_name.get(r.anchor or "")
        ratio = f"{r.assign_rate / anchor.assign_rate:.1f}x ({anchor.name})" if anchor else ""
        lines.append(
            [
                r.name,
                str(r.clients),
                str(r.count),
                f"{r.assign_rate:,.0f}",
                f"{pct(r.assign_lat, 0.5) * 1e3:.2f}",
                f"{pct(r.assign_lat, 0.99) * 1e3:.2f}",
                f"{r.release_rate:,.0f}",
                f"{pct(r.release_lat, 0.5) * 1e3:.2f}",
                f"{pct(r.release_lat, 0.99) * 1e3:.2f}",
                ratio,
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [head, *lines]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer allocations (a smoke run)")
    p.add_argument("--json", metavar="FILE", help="also write the raw figures here")
    args = p.parse_args(argv)
    single = 400 if args.quick else 2000
    per_client = 50 if args.quick else 250
    etcd_per_client = 25 if args.quick else 100
    if not HOST_LOCAL.exists():
        sys.exit(f"{HOST_LOCAL} missing: apt-get install containernetworking-plugins")

    rows: list[Result] = []
    work = Path(tempfile.mkdtemp(prefix="bench-ipam-"))
    try:
        rows.append(host_local("host-local x1", single, 1))
        rows.append(host_local("host-local x8", CLIENTS * per_client, CLIENTS))
        rows.append(in_process("a  sqlite 1 proc", f"sqlite://{work}/a.db", single, held=False))
        rows.append(
            in_process("a' sqlite 1 proc, held view", f"sqlite://{work}/a2.db", single, held=True)
        )
        rows.append(multi_process("b  sqlite 8 procs", f"sqlite://{work}/b.db", per_client))
        if shutil.which("etcd") is None:
            print("etcd not installed: scenario c skipped", file=sys.stderr)
        else:
            from ipam.testing.etcd import EtcdCluster

            with EtcdCluster(work / "etcd", members=3) as cluster:
                rows.append(multi_process("c  etcd x3, 8 clients", cluster.url, etcd_per_client))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(table(rows))
    a = next(r for r in rows if r.name.startswith("a "))
    print(
        f"\ntargets: (a) >= 2,000 assigns/s in-process: {a.assign_rate:,.0f}/s; "
        + "".join(
            f"(c) >= 300/s total: {r.assign_rate:,.0f}/s" for r in rows if r.name.startswith("c ")
        )
    )
    print(
        f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
        f"on {os.cpu_count()} CPUs"
    )
    if args.json:
        raw: list[dict[str, Any]] = [
            {
                "scenario": r.name,
                "clients": r.clients,
                "allocations": r.count,
                "assign_per_s": r.assign_rate,
                "assign_p50_ms": pct(r.assign_lat, 0.5) * 1e3,
                "assign_p99_ms": pct(r.assign_lat, 0.99) * 1e3,
                "release_per_s": r.release_rate,
                "release_p50_ms": pct(r.release_lat, 0.5) * 1e3,
                "release_p99_ms": pct(r.release_lat, 0.99) * 1e3,
                "median_assign_ms": statistics.median(r.assign_lat) * 1e3,
            }
            for r in rows
        ]
        Path(args.json).write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
