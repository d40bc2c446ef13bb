"""Shared helpers for integration tests that run on a namespace lab (overlay/lab/).

A `Lab` wraps a running lab: its nodes and pods, commands inside their namespaces, the
agents' /status and /metrics, stopping and restarting an agent with its own command line,
a normalised snapshot of what the agent programmed in a node's kernel, and packet captures
decoded with scapy. `running_lab()` builds a lab with a name unique to the run and always
removes it, also when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from overlay.lab import lab, netns
from overlay.lab.lab import LabState, NodeState, PodState
from overlay.lab.topology import LabOptions

VXLAN_DEV = "vxlan.calico"
OUR_PROTO = "80"
METRICS_URL = f"http://{lab.METRICS_ADDR}"
# Lines an agent logs for each kernel change it makes (overlay/kernel/apply.py describe()).
KERNEL_CHANGE = re.compile(r"event=(route|nexthop|neighbour|fdb|device|nat6?)_(set|deleted)\b")
LOG_TS = re.compile(r"ts=(\S+)Z ")
# The marks of a test module that runs labs: namespaces, slow, root only.
LAB_TEST_MARKS = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]


def unique_name() -> str:
    """A lab name (<= 8 chars) no other test, worker or run is using."""
    return "d" + secrets.token_hex(3)


def poll(condition: Callable[[], Any], timeout: float, interval: float = 0.01) -> tuple[Any, float]:
    """Call `condition` until it returns something truthy or `timeout` passes.
    Returns (last value, seconds waited)."""
    start = time.monotonic()
    while True:
        value = condition()
        waited = time.monotonic() - start
        if value or waited >= timeout:
            return value, waited
        time.sleep(interval)


# ------------------------------------------------------------------- kernel snapshots


@dataclass(frozen=True)
class Snapshot:
    """What the agent owns in one node's kernel, without kernel-chosen ids (a recreated
    nexthop may get another id and still be the same path)."""

    routes: frozenset[tuple[str, str, str, str]]  # (type, dst, gateway, dev)
    nexthops: frozenset[tuple[str, str]]  # (gateway, dev)
    neighbours: frozenset[tuple[str, str]]  # (ip, mac) on vxlan.calico
    fdb: frozenset[tuple[str, str]]  # (mac, underlay dst) on vxlan.calico
    # (vni, port, local, dev, mac, mtu, its global addresses) of vxlan.calico
    device: tuple[str, ...] | None

    def mentions(self, text: str) -> list[str]:
        """Every entry that names `text` (an address or MAC), for "nothing stale" checks."""
        found = []
        for kind in ("routes", "nexthops", "neighbours", "fdb"):
            found += [f"{kind}: {e}" for e in getattr(self, kind) if text in e]
        return found


def _json(argv: list[str]) -> list[dict[str, Any]]:
    try:
        out = netns.run(argv)
    except netns.NetnsError as e:
        if "does not exist" in str(e) or "Cannot find device" in str(e):
            return []  # our device is gone (right now): it holds nothing
        raise
    return json.loads(out) if out.strip() else []


def snapshot(ns: str) -> Snapshot:
    routes = frozenset(
        (r.get("type", "unicast"), r["dst"], r.get("gateway", ""), r.get("dev", ""))
        for r in _json(["ip", "-n", ns, "-j", "route", "show", "proto", OUR_PROTO])
    )
    nexthops = frozenset(
        (n.get("gateway", ""), n.get("dev", ""))
        for n in _json(["ip", "-n", ns, "-j", "nexthop", "show"])
        if str(n.get("protocol")) in (OUR_PROTO, "0x50")
    )
    neighbours = frozenset(
        (n["dst"], n.get("lladdr", ""))
        for n in _json(["ip", "-n", ns, "-j", "neigh", "show", "dev", VXLAN_DEV])
    )
    fdb = frozenset(
        (f["mac"], f.get("dst", ""))
        for f in _json(["bridge", "-n", ns, "-j", "fdb", "show", "dev", VXLAN_DEV])
        if f.get("dst")
    )
    links = _json(["ip", "-n", ns, "-j", "-d", "link", "show", "dev", VXLAN_DEV])
    device = None
    if links:
        info = links[0].get("linkinfo", {}).get("info_data", {})
        addrs = _json(["ip", "-n", ns, "-j", "addr", "show", "dev", VXLAN_DEV, "scope", "global"])
        device = tuple(
            str(v)
            for v in (
                info.get("id"),
                info.get("port"),
                info.get("local"),
                info.get("link"),
                links[0].get("address"),
                links[0].get("mtu"),
                # (iproute2 prints an empty object for each address its filter hides)
                sorted(
                    f"{a['local']}/{a['prefixlen']}"
                    for x in addrs
                    for a in x.get("addr_info", [])
                    if "local" in a
                ),
            )
        )
    return Snapshot(routes, nexthops, neighbours, fdb, device)


# --------------------------------------------------------------------------- captures


class Capture:
    """tcpdump on `iface` inside `ns`, written to `path`; bounded by `count` packets and the
    `timeout` of stop(). Use as a context manager around the traffic to capture."""

    def __init__(self, ns: str, path: Path, bpf: str, count: int = 50, iface: str = "eth0"):
        self.ns, self.path, self.bpf, self.count, self.iface = ns, path, bpf, count, iface
        self.proc: subprocess.Popen[bytes] | None = None
        self._err = path.with_suffix(".err")

    def __enter__(self) -> Capture:
        argv = ["tcpdump", "-i", self.iface, "-n", "-U", "-Z", "root", "-c", str(self.count),
                "-w", str(self.path), self.bpf]  # fmt: skip
        with open(self._err, "wb") as err:
            self.proc = subprocess.Popen(
                netns.exec_argv(self.ns, argv), stdout=subprocess.DEVNULL, stderr=err
            )
        listening, _ = poll(lambda: "listening on" in self._stderr(), 10.0)
        if not listening:
            self.stop(0)
            raise AssertionError(f"tcpdump in {self.ns} did not start: {self._stderr()}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(2.0)

    def _stderr(self) -> str:
        return self._err.read_text(errors="replace") if self._err.exists() else ""

    def stop(self, timeout: float) -> None:
        """Give tcpdump `timeout` seconds to reach its count, then stop it (it flushes)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def packets(self) -> list[Any]:
        from scapy.utils import rdpcap

        return list(rdpcap(str(self.path))) if self.path.exists() else []


# ------------------------------------------------------------------------------- lab


class Lab:
    def __init__(self, state: LabState) -> None:
        self.state = state

    @property
    def name(self) -> str:
        return self.state.name

    def node(self, i: int) -> NodeState:
        return self.state.nodes[i - 1]

    def pod(self, node: int, j: int = 1) -> PodState:
        want = f"{self.name}-n{node}p{j}"
        return next(p for p in self.state.pods if p.name == want)

    @staticmethod
    def address(node: NodeState) -> str:
        return node.underlay_ip.split("/")[0]

    def run(self, ns: str, *argv: str, timeout: float = 30.0) -> str:
        return netns.run_in(ns, list(argv), timeout=timeout)

    def ping(self, ns: str, dst: str, count: int = 3, interval: float = 0.2) -> bool:
        argv = ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "1", dst]
        res = subprocess.run(
            netns.exec_argv(ns, argv), capture_output=True, timeout=count * interval + 10
        )
        return res.returncode == 0

    # --- the agent's endpoints -----------------------------------------------------------

    def http(self, node: NodeState, path: str) -> str:
        script = (
            "import sys, urllib.request\n"
            "print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())"
        )
        return self.run(node.netns, sys.executable, "-c", script, METRICS_URL + path)

    def status(self, node: NodeState) -> dict[str, Any]:
        doc = json.loads(self.http(node, "/status"))
        assert isinstance(doc, dict)
        return doc

    def metrics(self, node: NodeState) -> dict[str, float]:
        """Prometheus text -> {name: value} (our metrics carry no labels)."""
        values = {}
        for line in self.http(node, "/metrics").splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def wait_agent(self, node: NodeState, peers: int | None = None, timeout: float = 30) -> None:
        """Until the agent has read the datastore and applied it (seeing `peers` peers)."""
        argv = [sys.executable, "-m", "overlay.lab.httpwait", f"{METRICS_URL}/status",
                str(timeout), "agent"] + ([str(peers)] if peers is not None else [])  # fmt: skip
        res = subprocess.run(
            netns.exec_argv(node.netns, argv), capture_output=True, text=True, timeout=timeout + 15
        )
        assert res.returncode == 0, (
            f"agent of {node.name} not synced: {res.stdout[-500:]}\n{lab.log_tail(node.log)}"
        )

    # --- stopping and starting an agent --------------------------------------------------

    def stop_agent(self, node: NodeState, timeout: float = 15.0) -> list[str]:
        """SIGTERM the node's agent and wait for it to exit; returns its command line."""
        pid = node.agent_pid
        assert pid is not None and netns.alive(pid), f"agent of {node.name} is not running"
        argv = netns.cmdline(pid)
        os.kill(pid, signal.SIGTERM)
        gone, _ = poll(lambda: _reaped(pid), timeout, interval=0.02)
        assert gone, f"agent of {node.name} (pid {pid}) ignored SIGTERM for {timeout}s"
        return argv

    def start_agent(self, node: NodeState, argv: list[str]) -> int:
        """Start an agent in the node namespace like `lab up` does (same log, recorded PID,
        so `lab down` stops it)."""
        with open(node.log, "ab") as out:
            proc = subprocess.Popen(
                netns.exec_argv(node.netns, argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        node.agent_pid = proc.pid
        self.state.save()
        return proc.pid

    def log_size(self, node: NodeState) -> int:
        return Path(node.log).stat().st_size

    def log_since(self, node: NodeState, offset: int) -> str:
        with open(node.log, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def kernel_changes(self, node: NodeState, offset: int) -> list[float]:
        """Wall-clock times of the kernel changes the agent logged after `offset`."""
        times = []
        for line in self.log_since(node, offset).splitlines():
            ts = LOG_TS.match(line)
            if ts and KERNEL_CHANGE.search(line):
                when = datetime.strptime(ts[1], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC)
                times.append(when.timestamp())
        return times

    def overlayctl(self, *args: str) -> str:
        """The operator CLI against the lab's datastore (a file: no network involved)."""
        argv = [lab.bin_path("overlayctl"), "--datastore", self.state.datastore, *args]
        return netns.run(argv, timeout=60)


def _reaped(pid: int) -> bool:
    """True once `pid` is gone; reaps it when it is our child (lab.up runs in-process)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    return not netns.alive(pid)


@contextlib.contextmanager
def running_lab(**options: Any) -> Iterator[Lab]:
    """A lab with a unique name; removed (and checked gone) whatever happens."""
    name = unique_name()
    try:
        state = lab.up(LabOptions(name=name, **options))
        yield Lab(state)
    finally:
        report = lab.down(name)
        leftovers = lab.existing_namespaces(name)
        if leftovers and sys.exc_info()[0] is None:  # never mask the test's own failure
            raise AssertionError(f"lab down left {leftovers} behind ({report.problems})")
