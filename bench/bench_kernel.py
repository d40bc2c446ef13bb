"""Program N VXLAN peers three ways, each in its own scratch namespace, and compare.

  ours      : Kernel.apply (struct encoder, batched netlink): neigh + fdb + nexthop + nhid route
  iproute2  : `ip -batch` + `bridge -batch` of the identical objects (the anchor)
  classic   : Kernel.apply without nexthop objects: neigh + fdb + per-route onlink gateways

Usage (root): .venv/bin/python bench/bench_kernel.py [N ...]   (default 10000)
Only namespaces this script creates are touched; they are deleted on exit.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from netns_tests.kernel_fixtures import peer, peer_ops, underlay, vxlan_device
from overlay.kernel.apply import Kernel
from overlay.model import RT_PROTO, VXLAN_DEVICE, Action, Op


def _with_device(ns: str, use_nexthops: bool) -> Kernel:
    k = Kernel(netns=ns, use_nexthops=use_nexthops)
    result = k.apply([Op(Action.SET, vxlan_device())])
    assert not result.failed, result.failed
    return k


def bench_ours(n: int, use_nexthops: bool) -> tuple[float, float]:
    """(apply seconds, read seconds)."""
    with underlay() as (ns, _other):
        k = _with_device(ns, use_nexthops)
        ops = peer_ops(n)
        if not use_nexthops:
            ops = [op for op in ops if op.obj.__class__.__name__ != "Nexthop"]
        start = time.perf_counter()
        result = k.apply(ops)
        took = time.perf_counter() - start
        assert not result.failed, result.failed[:3]
        start = time.perf_counter()
        dp = k.read()
        read_took = time.perf_counter() - start
        assert len(dp.routes) == n, len(dp.routes)
        k.close()
        return took, read_took


def bench_iproute2(n: int) -> float:
    with underlay() as (ns, _other), tempfile.TemporaryDirectory() as tmp:
        _with_device(ns, True).close()
        ip_lines, fdb_lines = [], []
        peers = [peer(i) for i in range(n)]
        for nb, _fdb, _nh, _r in peers:
            ip_lines.append(
                f"neigh replace {nb.ip} lladdr {nb.mac} dev {VXLAN_DEVICE} nud permanent"
            )
        for _nb, fdb, _nh, _r in peers:
            fdb_lines.append(
                f"fdb replace {fdb.mac} dev {VXLAN_DEVICE} dst {fdb.dst} self permanent"
            )
        for _nb, _fdb, nh, _r in peers:
            ip_lines.append(
                f"nexthop replace id {nh.id} via {nh.key.gateway} dev {VXLAN_DEVICE} onlink "
                f"proto {RT_PROTO}"
            )
        for _nb, _fdb, nh, r in peers:
            ip_lines.append(f"route replace {r.dst} nhid {nh.id} proto {RT_PROTO}")
        ip_file, fdb_file = Path(tmp, "ip.batch"), Path(tmp, "bridge.batch")
        ip_file.write_text("\n".join(ip_lines) + "\n")
        fdb_file.write_text("\n".join(fdb_lines) + "\n")
        start = time.perf_counter()
        subprocess.run(["bridge", "-n", ns, "-batch", str(fdb_file)], check=True, timeout=600)
        subprocess.run(["ip", "-n", ns, "-batch", str(ip_file)], check=True, timeout=600)
        took = time.perf_counter() - start
        out = subprocess.run(
            ["ip", "-n", ns, "route", "show", "proto", str(RT_PROTO)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        assert out.count("\n") == n
        return took


def main(argv: list[str]) -> None:
    for n in [int(a) for a in argv] or [10_000]:
        ours, read = bench_ours(n, use_nexthops=True)
        anchor = bench_iproute2(n)
        classic, classic_read = bench_ours(n, use_nexthops=False)
        print(f"N={n} peers (4 objects each with nexthops, 3 without)")
        print(f"  ours (nexthop objects, batched) : {ours:7.3f} s   read back {read:.3f} s")
        print(f"  ip -batch + bridge -batch       : {anchor:7.3f} s")
        print(
            f"  ours, classic per-route gateways: {classic:7.3f} s   read back {classic_read:.3f} s"
        )
        print(f"  ratio iproute2/ours = {anchor / ours:.2f}x, classic/ours = {classic / ours:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
