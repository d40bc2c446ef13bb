"""CNI ADD/DEL latency and 100-pod burst: overlay-cni against the reference ptp + host-local.

    sudo .venv/bin/python bench/bench_cni.py [--runs 50] [--burst 100] [--rounds 2] [--json]

Builds a one-node namespace cluster (router + node netns, a real overlay-agent, sqlite
datastore), moves this process's main thread into the node netns, and execs both plugins
the same way (subprocess, real config on stdin), each ADD into a fresh pod netns made
beforehand (not timed) and deleted only at the end: the kernel tears a netns down
asynchronously under the global rtnl lock, which would slow whichever plugin runs next.
The bursts run in ABBA order (--rounds) and their mean is reported. Targets (issue 4):
ADD p50 <= 3x the reference; burst wall time <= 2x the reference. The root namespace is
never configured.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cni.launcher import is_launcher
from netns_tests.cni_fixtures import BIN, OVERLAY_CNI, REFERENCE_DIR, Cluster, cluster

CLONE_NEWNET = 0x40000000


def enter_netns(name: str) -> None:
    """Move the calling thread (and the children it forks) into a named netns."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns failed")
    finally:
        os.close(fd)


class Plugin:
    def __init__(self, name: str, binary: str, config: dict[str, Any]) -> None:
        self.name = name
        self.binary = binary
        self.config = json.dumps(config)

    def exec(self, verb: str, cid: str, netns: str) -> float:
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "CNI_COMMAND": verb,
            "CNI_CONTAINERID": cid,
            "CNI_NETNS": netns,
            "CNI_IFNAME": "eth0",
            "CNI_PATH": f"{BIN}:{REFERENCE_DIR}",
        }
        t0 = time.perf_counter()
        res = subprocess.run(
            [self.binary], input=self.config, env=env, capture_output=True, text=True, timeout=120
        )
        took = time.perf_counter() - t0
        if res.returncode != 0:
            raise RuntimeError(f"{self.name} {verb} {cid}: {res.stdout} {res.stderr}")
        return took


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def sequential(c: Cluster, plugin: Plugin, runs: int, tag: str) -> dict[str, list[float]]:
    pods = [c.pod_netns() for _ in range(runs)]
    adds, dels = [], []
    for i, (_, path) in enumerate(pods):
        adds.append(plugin.exec("ADD", f"{tag}-s{i}", path))
    for i, (_, path) in enumerate(pods):
        dels.append(plugin.exec("DEL", f"{tag}-s{i}", path))
    return {"add": adds, "del": dels}


def burst(c: Cluster, plugin: Plugin, count: int, tag: str) -> dict[str, float]:
    pods = [c.pod_netns() for _ in range(count)]

    def run_all(verb: str) -> float:
        call: Callable[[tuple[int, tuple[str, str]]], float] = lambda item: plugin.exec(  # noqa: E731
            verb, f"{tag}-b{item[0]}", item[1][1]
        )
        t0 = time.perf_counter()
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(call, enumerate(pods)))
        return time.perf_counter() - t0

    return {"add": run_all("ADD"), "del": run_all("DEL")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50, help="sequential ADD/DEL pairs per plugin")
    ap.add_argument("--burst", type=int, default=100, help="concurrent ADDs on one node")
    ap.add_argument("--rounds", type=int, default=2, help="bursts per plugin, in ABBA order")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    ap.add_argument("--plugin", default=OVERLAY_CNI, help="overlay-cni executable to measure")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_cni: needs root (network namespaces)", file=sys.stderr)
        return 2
    if not is_launcher(args.plugin):
        hint = "run scripts/setup.sh or `python -m cni.launcher .venv/bin`"
        print(
            f"bench_cni: warning: {args.plugin} is not the lean launcher; {hint}", file=sys.stderr
        )
    with cluster((1,)) as c, tempfile.TemporaryDirectory(prefix="ovbench-hl-") as hl:
        node = c.nodes[0]
        ours = Plugin("overlay-cni", args.plugin, c.conf(node, "1.0.0"))
        ref = Plugin(
            "ptp+host-local",
            f"{REFERENCE_DIR}/ptp",
            {"cniVersion": "1.0.0", "name": "refnet", "type": "ptp", "mtu": 1450,
             "ipam": {"type": "host-local", "subnet": "10.99.0.0/16", "dataDir": hl}},
        )  # fmt: skip
        enter_netns(node.netns)  # main thread only: the plugins' host side is the node
        # Warm-up (page cache, byte-code, agent's block claim), not measured.
        for p in (ours, ref):
            sequential(c, p, 3, f"warm-{p.name[:3]}")
        seq = {p.name: sequential(c, p, args.runs, p.name[:3]) for p in (ref, ours)}
        rounds: dict[str, list[dict[str, float]]] = {ref.name: [], ours.name: []}
        for r in range(args.rounds):
            for p in (ref, ours) if r % 2 == 0 else (ours, ref):
                rounds[p.name].append(burst(c, p, args.burst, f"{p.name[:3]}{r}"))
        bur = {
            name: {verb: statistics.fmean(x[verb] for x in runs) for verb in ("add", "del")}
            for name, runs in rounds.items()
        }
    report(seq, bur, ours.name, ref.name, args)
    return 0


def report(
    seq: dict[str, dict[str, list[float]]],
    bur: dict[str, dict[str, float]],
    ours: str,
    ref: str,
    args: argparse.Namespace,
) -> None:
    ms = 1000.0
    rows = []
    figures: dict[str, Any] = {}
    for verb in ("add", "del"):
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            a, b = percentile(seq[ours][verb], q) * ms, percentile(seq[ref][verb], q) * ms
            rows.append((f"{verb.upper()} {label} (ms, n={args.runs})", a, b))
        figures[verb] = {
            "ours_p50_ms": percentile(seq[ours][verb], 0.5) * ms,
            "ref_p50_ms": percentile(seq[ref][verb], 0.5) * ms,
            "ours_mean_ms": statistics.fmean(seq[ours][verb]) * ms,
        }
    for verb in ("add", "del"):
        label = f"{args.burst} concurrent {verb.upper()}s (s)"
        rows.append((label, bur[ours][verb], bur[ref][verb]))
    print(f"{'measure':32} {ours:>12} {ref:>15} {'ratio':>7}")
    for label, a, b in rows:
        print(f"{label:32} {a:12.2f} {b:15.2f} {a / b:7.2f}")
    add_ratio = percentile(seq[ours]["add"], 0.5) / percentile(seq[ref]["add"], 0.5)
    burst_ratio = bur[ours]["add"] / bur[ref]["add"]
    print(f"target ADD p50 <= 3x: {add_ratio:.2f}x {'OK' if add_ratio <= 3 else 'MISSED'}")
    print(f"target burst <= 2x:   {burst_ratio:.2f}x {'OK' if burst_ratio <= 2 else 'MISSED'}")
    if args.json:
        figures["burst"] = bur
        figures["add_p50_ratio"], figures["burst_ratio"] = add_ratio, burst_ratio
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    sys.exit(main())
