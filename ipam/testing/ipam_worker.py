"""One IPAM client process, for the real-process concurrency tests and the benchmark.

    python -m ipam.testing.ipam_worker --datastore URL --nodes n1,n2 --count 250 \
        --handle-prefix w3 [--release] [--held-view]

Opens the datastore, prints `ready`, waits for one line on stdin (so that every worker
starts at once), then runs `count` auto-assigns (node i % len(nodes)), then with --release
releases every handle it got, and prints one JSON document:
{"results": [{"handle", "node", "ip", "assign_s", "release_s"}...], "errors": [...],
 "times": {"start", "assigned", "end"}} (perf_counter, i.e. CLOCK_MONOTONIC).
An operation that raised is recorded in `errors` (with its handle) and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipam.allocator import IPAM
from ipam.datastore import open_datastore
from ipam.model import IPAMConfig, IPPool, IPReservation, Node
from ipam.store import ResourceStore


class HeldResources:
    """Pools, config and reservations read once, as the agent's watch-fed view holds them
    (the allocator otherwise re-reads and re-validates them on every call)."""

    def __init__(self, store: ResourceStore) -> None:
        self._store = store
        self._pools = store.list_pools()
        self._config = store.ipam_config()
        self._reservations = store.list_reservations()

    def list_pools(self) -> list[IPPool]:
        return list(self._pools)

    def ipam_config(self) -> IPAMConfig:
        return self._config

    def list_reservations(self) -> list[IPReservation]:
        return list(self._reservations)

    def get_node(self, name: str) -> Node | None:
        return self._store.get_node(name)

    def list_nodes(self) -> list[Node]:
        return self._store.list_nodes()


def run(args: argparse.Namespace) -> dict[str, Any]:
    ds = open_datastore(args.datastore)
    store = ResourceStore(ds)
    ipam = IPAM(ds, HeldResources(store) if args.held_view else store)
    nodes = args.nodes.split(",")
    ipam.affine_blocks(nodes[0])  # connect and warm up before the start line
    print("ready", flush=True)
    sys.stdin.readline()
    results: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    t_start = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    for i in range(args.count):
        node = nodes[i % len(nodes)]
        handle = f"{args.handle_prefix}-{i}"
        t0 = time.perf_counter()
        try:
            got = ipam.auto_assign(handle, node, attrs={"node": node})
        except Exception as e:  # recorded: the caller decides whether any is acceptable
            errors.append({"handle": handle, "op": "assign", "error": f"{type(e).__name__}: {e}"})
            continue
        results.append(
            {
                "handle": handle,
                "node": node,
                "ip": str(got.ipv4[0].ip),
                "assign_s": time.perf_counter() - t0,
                "release_s": None,
            }
        )
    t_assigned = time.perf_counter()
    if args.release:
        for entry in results:
            t0 = time.perf_counter()
            try:
                ipam.release_by_handle(entry["handle"])
                entry["release_s"] = time.perf_counter() - t0
            except Exception as e:
                errors.append(
                    {
                        "handle": entry["handle"],
                        "op": "release",
                        "error": f"{type(e).__name__}: {e}",
                    }
                )
    times = {"start": t_start, "assigned": t_assigned, "end": time.perf_counter()}
    ds.close()
    return {"results": results, "errors": errors, "times": times}


@dataclass(frozen=True)
class WorkerSpec:
    nodes: list[str]
    count: int
    handle_prefix: str


REPO_ROOT = Path(__file__).resolve().parents[2]


def run_workers(
    url: str,
    specs: list[WorkerSpec],
    *,
    release: bool = False,
    held_view: bool = False,
    timeout: float = 120.0,
    during: Callable[[], None] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]], list[dict[str, float]]]:
    """Run one worker process per spec, released together; `during` runs in the parent
    while they work. Returns (results, errors, each worker's times). Every process is
    killed by PID if anything goes wrong."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs: list[subprocess.Popen[str]] = []
    try:
        for spec in specs:
            argv = [
                sys.executable,
                "-m",
                "ipam.testing.ipam_worker",
                "--datastore",
                url,
                "--nodes",
                ",".join(spec.nodes),
                "--count",
                str(spec.count),
                "--handle-prefix",
                spec.handle_prefix,
            ]
            if release:
                argv.append("--release")
            if held_view:
                argv.append("--held-view")
            pipe = subprocess.PIPE
            procs.append(
                subprocess.Popen(argv, stdin=pipe, stdout=pipe, stderr=pipe, text=True, env=env)
            )
        deadline = time.monotonic() + timeout
        for proc in procs:
            assert proc.stdout is not None
            ready, _, _ = select.select(
                [proc.stdout], [], [], max(0.0, deadline - time.monotonic())
            )
            line = proc.stdout.readline() if ready else ""
            if line.strip() != "ready":
                _, err = proc.communicate(timeout=5)
                raise RuntimeError(f"worker did not start: {line!r} {err[-2000:]}")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        if during is not None:
            during()
        results: list[dict[str, Any]] = []
        errors: list[dict[str, str]] = []
        times: list[dict[str, float]] = []
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if proc.returncode != 0:
                raise RuntimeError(f"worker exited {proc.returncode}: {err[-2000:]}")
            doc = json.loads(out.strip().splitlines()[-1])
            results += doc["results"]
            errors += doc["errors"]
            times.append(doc["times"])
        return results, errors, times
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ipam_worker")
    p.add_argument("--datastore", required=True)
    p.add_argument("--nodes", required=True, help="comma-separated node names")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--handle-prefix", required=True)
    p.add_argument("--release", action="store_true")
    p.add_argument("--held-view", action="store_true", help="read pools/config once")
    out = run(p.parse_args(argv))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
