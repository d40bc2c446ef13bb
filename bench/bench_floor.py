"""How far below the agent a cold start can go in Python: floor_program.py against iproute2.

The same synthetic cluster and namespace as bench_agent.py. floor_program.py is spawned in
a fresh node namespace and timed from spawn to exit (interpreter, imports, listing with
SQLite's json_extract, encoding, the kernel's work). It is timed against `ip -batch` +
`bridge -batch` of the identical objects, in the same run. The agent's own figure comes
from bench_agent.py. Together they show how much of the agent's cold start is the
interpreter, the datastore and the kernel, and how much is our model, compute and plan.

Usage (root): .venv/bin/python bench/bench_floor.py [--peers 10000] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_agent import (
    PYTHON,
    cleanup,
    count_objects,
    del_netns,
    fill,
    iproute2_program,
    make_netns,
    peer,
    sh,
    wait_quiet,
)

from ipam.datastore import open_datastore
from ipam.model import EncapMode

PROGRAM = str(Path(__file__).resolve().parent / "floor_program.py")


def floor_run(n: int, db_file: str) -> float:
    ns = make_netns(f"f{n}")
    try:
        wait_quiet()
        start = time.perf_counter()
        sh("ip", "netns", "exec", ns, PYTHON, PROGRAM, db_file)
        took = time.perf_counter() - start
        got = count_objects(ns)
        assert got["route"] == n, got
        return took
    finally:
        del_netns(ns)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, default=10000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench_floor: needs root (network namespaces)", file=sys.stderr)
        return 2
    peers = [peer(i) for i in range(args.peers)]
    try:
        with tempfile.TemporaryDirectory(prefix="ovf-") as tmp:
            db_file = f"{tmp}/o.db"
            ds = open_datastore(f"sqlite:///{db_file}")
            try:
                fill(ds, peers, EncapMode.CROSS_SUBNET)
            finally:
                ds.close()
            floor = [floor_run(args.peers, db_file) for _ in range(args.runs)]
            anchor = [iproute2_program(peers, nexthops=True)[0] for _ in range(args.runs)]
    finally:
        cleanup()
    f, a = statistics.median(floor), statistics.median(anchor)
    print(f"peers {args.peers}, {args.runs} runs each, medians:")
    print(f"  floor program (spawn -> exit)     {f:.3f} s   {', '.join(f'{x:.3f}' for x in floor)}")
    print(
        f"  ip -batch + bridge -batch         {a:.3f} s   {', '.join(f'{x:.3f}' for x in anchor)}"
    )
    print(f"  floor / iproute2                  {f / a:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
