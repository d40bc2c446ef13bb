"""The agent end to end: cold convergence, one-peer latency, drift repair, idle CPU, scaling.

Each node is a scratch network namespace holding one veth pair (`eth0`, 192.0.2.1/24); the
cluster is synthetic: N peer Nodes with underlay addresses in OTHER subnets (so every peer is
tunnelled, also in CrossSubnet mode), a VXLAN tunnel address and one /26 block each, written
straight into a datastore. A real `overlay-agent` then runs inside the namespace.

Measured against, in the same run and in fresh namespaces:
  iproute2 nhid    : `bridge -batch` (FDB) + `ip -batch` (neighbours, nexthops, nhid routes)
                     of the identical objects
  iproute2 classic : the same, but each route with its own onlink gateway and no nexthop
                     objects (how Calico and Flannel program them)

With --family 6 the same runs are made for IPv6-only nodes: eth0 also holds
fd00:c000:2::1/64, the agent runs with `--ip-autodetection none --ip6-autodetection
interface=eth0`, the pool is fd00:10::/48 (blockSize 122), each peer has an IPv6 underlay
address in another /64 and a tunnel address in its block, and everything (agent and anchors)
goes over vxlan-v6.calico; so does the one-peer latency.

Usage (root): .venv/bin/python bench/bench_agent.py [--peers 1000,10000,20000,50000]
              [--quick] [--runs 3] [--samples 40] [--latency-peers 10000] [--no-etcd]
              [--mode ...] [--family 4|6]
Cold starts are timed --runs times each (fresh namespace, fresh copy of the datastore), as
are the iproute2 nhid batches: the medians are compared. The packages are byte-compiled
first, as an installed agent has them.
Only namespaces and processes this script makes are touched; all are removed on exit,
also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import calendar
import compileall
import contextlib
import json
import os
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import netaddr  # noqa: E402

from ipam.block import Block, nth_block  # noqa: E402
from ipam.datastore import Datastore, open_datastore  # noqa: E402
from ipam.model import EncapMode, IPPool, Node  # noqa: E402
from ipam.records import block_key  # noqa: E402
from ipam.store import ResourceStore, encode, resource_key  # noqa: E402
from overlay.kernel import nlmsg  # noqa: E402
from overlay.kernel.batch import RtnlSocket, open_rtnl  # noqa: E402
from overlay.model import (  # noqa: E402
    MAIN_TABLE,
    RT_PROTO,
    VXLAN6_DEVICE,
    VXLAN_DEVICE,
    VXLAN_PORT,
    VXLAN_VNI,
)
from overlay.nodes import TunnelKind, tunnel_handle  # noqa: E402
from overlay.view import vtep_mac, vtep_mac6  # noqa: E402

AGENT = str(ROOT / ".venv" / "bin" / "overlay-agent")
PYTHON = str(ROOT / ".venv" / "bin" / "python")
NODE = "n0"
NODE_IP = "192.0.2.1/24"
POOL = IPPool(
    name="bench-pool",
    cidr=netaddr.IPNetwork("10.0.0.0/8"),
    block_size=26,
    vxlan_mode=EncapMode.CROSS_SUBNET,
)
AF = {4: socket.AF_INET, 6: socket.AF_INET6}
PREFIX = f"ovb{os.getpid()}"
_made_ns: list[str] = []
_made_procs: list[subprocess.Popen[bytes]] = []


# --- the address family: what differs between the IPv4 and the IPv6-only benchmark ----------


@dataclass(frozen=True)
class Family:
    """The few things the IPv4 and the IPv6-only benchmark differ in (V4 and V6 below)."""

    version: int
    node_ip: str  # the node's underlay address on eth0 (NODE_IP, or an IPv6 one besides it)
    pool: IPPool
    peer_underlay: netaddr.IPNetwork  # peer i's underlay: this network's address + i, its prefix
    device: str  # the VXLAN device the peers are routed over
    tunnel: TunnelKind  # the tunnel address's handle and Node field
    tunnel_type: str  # the tunnel allocation's `type` attribute
    route_group: int  # rtnetlink multicast group of route changes
    autodetect: tuple[str, ...]  # the agent's underlay autodetection flags
    label: str = ""  # in the summary line

    @property
    def ip(self) -> str:
        """iproute2's family flag."""
        return f"-{self.version}"

    def mac(self, name: str) -> str:
        return vtep_mac(name) if self.version == 4 else vtep_mac6(name)

    def node(self, name: str, underlay: netaddr.IPNetwork, tunnel: netaddr.IPAddress) -> Node:
        if self.version == 4:
            return Node(name=name, ipv4_address=underlay, ipv4_vxlan_tunnel_addr=tunnel)
        return Node(name=name, ipv6_address=underlay, ipv6_vxlan_tunnel_addr=tunnel)


V4 = Family(
    version=4,
    node_ip=NODE_IP,
    pool=POOL,
    peer_underlay=netaddr.IPNetwork("100.64.0.0/16"),
    device=VXLAN_DEVICE,
    tunnel="vxlan",
    tunnel_type="vxlanTunnelAddress",
    route_group=nlmsg.RTMGRP_IPV4_ROUTE,
    autodetect=("--ip-autodetection", "interface=eth0"),
)
V6 = Family(
    version=6,
    node_ip="fd00:c000:2::1/64",
    pool=IPPool(
        name="bench-pool-v6",
        cidr=netaddr.IPNetwork("fd00:10::/48"),
        block_size=122,
        vxlan_mode=EncapMode.CROSS_SUBNET,
    ),
    peer_underlay=netaddr.IPNetwork("fd00:64::/64"),
    device=VXLAN6_DEVICE,
    tunnel="vxlan-v6",
    tunnel_type="vxlanV6TunnelAddress",
    route_group=nlmsg.RTMGRP_IPV6_ROUTE,
    autodetect=("--ip-autodetection", "none", "--ip6-autodetection", "interface=eth0"),
    label=" family=IPv6-only",
)
FAMILIES = {4: V4, 6: V6}


# --- processes and namespaces, always cleaned up ---------------------------------------------


def sh(*args: str, check: bool = True, timeout: float = 900) -> str:
    res = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:6])}...: exit {res.returncode}: {res.stderr}")
    return res.stdout


def make_netns(tag: str, fam: Family = V4) -> str:
    """A namespace with lo and a veth pair eth0/eth0p up; eth0 has NODE_IP (and the
    family's underlay address, if another: without DAD, so that it is usable at once)."""
    ns = f"{PREFIX}-{tag}"
    sh("ip", "netns", "add", ns)
    _made_ns.append(ns)
    sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    sh("ip", "-n", ns, "addr", "add", NODE_IP, "dev", "eth0")
    if fam.node_ip != NODE_IP:
        sh("ip", "-n", ns, "addr", "add", fam.node_ip, "dev", "eth0", "nodad")
    for dev in ("lo", "eth0", "eth0p"):
        sh("ip", "-n", ns, "link", "set", dev, "up")
    # The agent's autodetection wants eth0 operationally up (veth carrier comes async).
    deadline = time.monotonic() + 5
    while "state UP" not in sh("ip", "-n", ns, "link", "show", "eth0"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{ns}: eth0 did not come up")
        time.sleep(0.01)
    return ns


def del_netns(ns: str) -> None:
    sh("ip", "netns", "del", ns, check=False)
    if ns in _made_ns:
        _made_ns.remove(ns)


def stop_proc(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    if proc in _made_procs:
        _made_procs.remove(proc)


def cleanup() -> None:
    for proc in list(_made_procs):
        stop_proc(proc)
    for ns in list(_made_ns):
        del_netns(ns)


# --- the synthetic cluster ----------


@dataclass(frozen=True)
class Peer:
    name: str
    underlay: netaddr.IPNetwork
    block: netaddr.IPNetwork
    mac: str

    @property
    def tunnel(self) -> netaddr.IPAddress:
        return self.block.network


def peer(i: int, fam: Family = V4) -> Peer:
    """Peer i owns block i+1 of the pool (block 0 is left for the node under test)."""
    name = f"peer-{i:06d}"
    base = fam.peer_underlay
    underlay = netaddr.IPNetwork((base.first + i, base.prefixlen), version=fam.version)
    return Peer(name, underlay, nth_block(fam.pool, i + 1), fam.mac(name))


def peer_records(p: Peer, fam: Family = V4) -> list[tuple[str, str]]:
    """(key, value) of the peer's Node and its block (tunnel address allocated in it)."""
    node = fam.node(p.name, p.underlay, p.tunnel)
    block = Block.new(p.block, affinity=f"host:{p.name}", sequence_number=1)
    block.assign(
        p.tunnel,
        tunnel_handle(fam.tunnel, p.name),
        {"node": p.name, "type": fam.tunnel_type},
    )
    return [(resource_key("Node", p.name), encode(node)), (block_key(p.block), block.to_json())]


def fill(
    ds: Datastore, peers: list[Peer], mode: EncapMode, threads: int = 1, fam: Family = V4
) -> None:
    pool = fam.pool
    ResourceStore(ds).apply(
        IPPool(pool.name, pool.cidr, pool.block_size, vxlan_mode=mode, nat_outgoing=False)
    )
    records = [kv for p in peers for kv in peer_records(p, fam)]
    if threads == 1:
        for key, value in records:
            ds.create(key, value)
        return
    errors: list[BaseException] = []

    def work(part: list[tuple[str, str]]) -> None:
        try:
            for key, value in part:
                ds.create(key, value)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(records[i::threads],)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if errors:
        raise errors[0]


# --- observing the kernel ----------


def count_routes(sock: RtnlSocket, version: int = 4) -> int:
    """Our routes in the main table (the kernel filters by protocol; we only count)."""
    n = 0
    for _t, _payload in sock.dump(nlmsg.dump_routes(AF[version], MAIN_TABLE, RT_PROTO)):
        n += 1
    return n


def count_objects(ns: str, fam: Family = V4) -> dict[str, int]:
    """Neighbour / FDB / nexthop / route counts of ours, from iproute2 (a check, untimed)."""

    def lines(*args: str) -> int:
        return sh("ip", "-n", ns, *args).count("\n")

    fdb = sh("bridge", "-n", ns, "fdb", "show", "dev", fam.device).splitlines()
    return {
        "neigh": lines(fam.ip, "neigh", "show", "dev", fam.device, "nud", "permanent"),
        "fdb": sum(1 for line in fdb if " dst " in line and not line.startswith("00:00:00")),
        "nexthop": lines("nexthop", "show", "protocol", str(RT_PROTO)),
        "route": lines(fam.ip, "route", "show", "proto", str(RT_PROTO)),
    }


class RouteWatch:
    """A netlink monitor socket in the namespace: timestamps of route adds/deletes per dst."""

    def __init__(self, ns: str | None, fam: Family = V4) -> None:
        self.sock = open_rtnl(ns, fam.route_group)
        self.buf = bytearray(1 << 20)

    def close(self) -> None:
        self.sock.close()

    def drain(self) -> None:
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while self.sock.recv_into(self.buf):
                pass
        self.sock.setblocking(True)

    def wait(self, dst: netaddr.IPNetwork, added: bool, timeout: float) -> float | None:
        """monotonic time when a route to `dst` of ours was added (or deleted); None on timeout."""
        want_type = nlmsg.RTM_NEWROUTE if added else nlmsg.RTM_DELROUTE
        want_dst = dst.network.packed
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                continue
            n = self.sock.recv_into(self.buf)
            now = time.monotonic()
            for msg_type, _flags, _seq, payload in nlmsg.iter_messages(bytes(self.buf[:n])):
                if msg_type != want_type:
                    continue
                r = nlmsg.decode_route(payload)
                if r.dst == want_dst and r.dst_len == dst.prefixlen and r.protocol == RT_PROTO:
                    return now
        return None


# --- the agent ----------


@dataclass
class AgentRun:
    proc: subprocess.Popen[bytes]
    dir: Path
    started: float  # monotonic, just before the process was spawned
    started_wall: float = 0.0  # the same instant on the wall clock (the log's timestamps)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def proc_status(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) // 1024  # MiB
        return out

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def phases(self) -> str:
        """Seconds from spawn: registered (interpreter, imports, registration); the cold
        start (cold_start.py) and its length when there was one; the normal first pass
        (listing and decode before it; compute, plan, apply in it) and its length."""
        times: dict[str, float] = {}
        with contextlib.suppress(OSError):
            for line in (self.dir / "agent.log").read_text().splitlines():
                for key in ("event=node_registered", "event=cold_start", " synced ops="):
                    if key in line and key not in times:
                        times[key] = _log_time(line) - self.started_wall
                        if "duration=" in line:
                            took = float(line.rsplit("duration=", 1)[1].rstrip("s"))
                            times[key + " took"] = took
        if "event=node_registered" not in times:
            return ""
        out = [f"registered {times['event=node_registered']:.2f}s"]
        if "event=cold_start" in times:
            out.append(
                f"cold start {times['event=cold_start took']:.2f}s long, logged "
                f"{times['event=cold_start']:.2f}s"
            )
        if " synced ops=" in times:
            out.append(
                f"first normal pass {times[' synced ops= took']:.2f}s long, done "
                f"{times[' synced ops=']:.2f}s"
            )
        return ", ".join(out)

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for name in ("agent.stderr", "agent.log"):
            with contextlib.suppress(OSError):
                out += (self.dir / name).read_text().splitlines()[-lines:]
        return "\n".join(out) or "(no log)"


def _log_time(line: str) -> float:
    """The ts=...Z of one agent log line, as a Unix time."""
    ts = line.split(" ", 1)[0].removeprefix("ts=").rstrip("Z")
    whole, _, frac = ts.partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float(f"0.{frac or 0}")


def start_agent(
    ns: str | None, url: str, workdir: Path, extra: tuple[str, ...] = (), fam: Family = V4
) -> AgentRun:
    state = workdir / NODE
    state.mkdir(parents=True, exist_ok=True)
    argv = [
        AGENT,
        "--node-name", NODE,
        "--datastore", url,
        "--state-dir", str(state),
        "--socket", str(state / "cni.sock"),
        *fam.autodetect,
        "--metrics-addr", "127.0.0.1:0",
        "--log-file", str(workdir / "agent.log"),
        *extra,
    ]  # fmt: skip
    if ns is not None:
        argv = ["ip", "netns", "exec", ns, *argv]  # ip execs the agent: same PID
    started, started_wall = time.monotonic(), time.time()
    with open(workdir / "agent.stderr", "wb") as err:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True
        )
    _made_procs.append(proc)
    return AgentRun(proc, workdir, started, started_wall)


RTM_F_FIB_MATCH = 0x2000  # answer a route get with the FIB entry that matched


def has_route(sock: socket.socket, dst: netaddr.IPNetwork) -> bool:
    """Whether our route to `dst` is in the main table: one `ip route get fibmatch` request,
    not a dump (a 50k-route dump every few ms would take a core from the agent)."""
    addr = dst.network.packed
    body = nlmsg.RTMSG.pack(AF[dst.version], 8 * len(addr), 0, 0, 0, 0, 0, 0, RTM_F_FIB_MATCH)
    body += nlmsg.attr(nlmsg.RTA_DST, addr)
    sock.send(nlmsg.NLMSG_HDR.pack(16 + len(body), nlmsg.RTM_GETROUTE, 1, 1, 0) + body)
    for msg_type, _flags, _seq, payload in nlmsg.iter_messages(sock.recv(65536)):
        if msg_type == nlmsg.RTM_NEWROUTE:
            r = nlmsg.decode_route(payload)
            return r.protocol == RT_PROTO and r.dst_len == dst.prefixlen
    return False  # an error: no route at all


def wait_routes(
    run: AgentRun, ns: str | None, want: int, timeout: float, last: netaddr.IPNetwork
) -> float:
    """Seconds from agent spawn until `want` routes of ours are in the kernel. The agent
    programs routes in address order after the neighbours, FDB entries and nexthops, so the
    moment the `last` block's route is in is timed with a cheap request every 5 ms; the full
    count then confirms it (else the count is polled, the slow way)."""
    deadline = time.monotonic() + timeout
    sock = open_rtnl(ns)
    sock.settimeout(5.0)  # a request always gets an answer; never hang the bench on one
    try:
        with RtnlSocket(ns) as dumps:
            while time.monotonic() < deadline:
                if has_route(sock, last):
                    seen = time.monotonic() - run.started
                    if count_routes(dumps, last.version) >= want:
                        return seen
                    break
                if run.proc.poll() is not None:
                    raise RuntimeError(f"agent exited ({run.proc.returncode}):\n{run.log_tail()}")
                time.sleep(0.005)
            while time.monotonic() < deadline:
                if count_routes(dumps, last.version) >= want:
                    return time.monotonic() - run.started
                time.sleep(0.02)
    finally:
        sock.close()
    raise RuntimeError(f"agent did not program {want} routes in {timeout:.0f}s:\n{run.log_tail()}")


def wait_idle(run: AgentRun, quiet: float = 1.5, timeout: float = 120.0) -> None:
    """Until the agent's CPU time stops growing for `quiet` seconds (post-convergence work)."""
    deadline = time.monotonic() + timeout
    last, since = run.cpu_seconds(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = run.cpu_seconds()
        if now - last > 0.02:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


# --- iproute2 anchors ----------


def iproute2_program(peers: list[Peer], nexthops: bool, fam: Family = V4) -> tuple[float, float]:
    """(wall s, CPU s) of bridge -batch + ip -batch of the same objects in a fresh namespace."""
    ns = make_netns("ip2", fam)
    dev = fam.device
    try:
        local = str(netaddr.IPNetwork(fam.node_ip).ip)
        sh("ip", "-n", ns, "link", "add", dev, "type", "vxlan", "id", str(VXLAN_VNI),
           "dstport", str(VXLAN_PORT), "local", local, "dev", "eth0", "nolearning")  # fmt: skip
        sh("ip", "-n", ns, "link", "set", dev, "up")
        fdb = [f"fdb replace {p.mac} dev {dev} dst {p.underlay.ip} self permanent"
               for p in peers]  # fmt: skip
        ip = [f"neigh replace {p.tunnel} lladdr {p.mac} dev {dev} nud permanent"
              for p in peers]  # fmt: skip
        if nexthops:
            ip += [f"nexthop replace id {i + 1} via {p.tunnel} dev {dev} onlink "
                   f"proto {RT_PROTO}" for i, p in enumerate(peers)]  # fmt: skip
            ip += [f"route replace {p.block} nhid {i + 1} proto {RT_PROTO}"
                   for i, p in enumerate(peers)]  # fmt: skip
        else:
            ip += [f"route replace {p.block} via {p.tunnel} dev {dev} onlink "
                   f"proto {RT_PROTO}" for p in peers]  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            fdb_file, ip_file = Path(tmp, "fdb"), Path(tmp, "ip")
            fdb_file.write_text("\n".join(fdb) + "\n")
            ip_file.write_text("\n".join(ip) + "\n")
            wait_quiet()
            cpu0 = _children_cpu()
            start = time.perf_counter()
            sh("bridge", "-n", ns, "-batch", str(fdb_file))
            sh("ip", "-n", ns, "-batch", str(ip_file))
            took = time.perf_counter() - start
            cpu = _children_cpu() - cpu0
        got = count_objects(ns, fam)
        assert got["route"] == len(peers), got
        return took, cpu

    finally:
        del_netns(ns)


def _cpu_idle() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait, total


def wait_quiet(share: float = 0.85, window: float = 0.5, timeout: float = 60.0) -> None:
    """Until the CPUs are mostly idle: deleting a namespace that held 200k objects keeps a
    kernel worker busy for seconds after `ip netns del` returns, and would slow whatever is
    timed next (agent or anchor alike)."""
    deadline = time.monotonic() + timeout
    idle0, total0 = _cpu_idle()
    while time.monotonic() < deadline:
        time.sleep(window)
        idle, total = _cpu_idle()
        if total > total0 and (idle - idle0) / (total - total0) >= share:
            return
        idle0, total0 = idle, total


def _children_cpu() -> float:
    """user + system CPU of reaped children: the kernel's netlink work runs in the sender's
    context, so this counts the kernel's share too, and a loaded machine does not inflate it."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# --- the measurements ----------


@dataclass
class ColdResult:
    peers: int
    ours: float
    rss: dict[str, int]
    objects: dict[str, int]
    drift: list[float] = field(default_factory=list)
    idle_cpu: float | None = None  # percent of one core
    cpu: float = 0.0  # agent CPU seconds (user + system) until converged
    ip_nhid: float | None = None
    ip_classic: float | None = None
    ip_nhid_cpu: float = 0.0
    ip_classic_cpu: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)  # 1-min load average before / after
    phases: str = ""  # where the cold start went, from the agent's log
    runs: list[float] = field(default_factory=list)  # each cold start's seconds
    ip_runs: list[float] = field(default_factory=list)  # each iproute2 nhid batch's


def cold_run(
    n: int,
    mode: EncapMode,
    fam: Family,
    *,
    drift_samples: int,
    idle_seconds: float,
    timeout: float,
    runs: int = 1,
) -> ColdResult:
    """`runs` cold starts of an agent with `n` peers, each in a fresh namespace on a fresh
    copy of the datastore: the median time (and that run's CPU, RSS, phases); drift repair
    and idle CPU are measured after the last."""
    peers = [peer(i, fam) for i in range(n)]
    with tempfile.TemporaryDirectory(prefix="ovb-") as tmp:
        workdir = Path(tmp)
        pristine = workdir / "pristine.db"
        ds = open_datastore(f"sqlite:///{pristine}")
        try:
            fill(ds, peers, mode, fam=fam)
        finally:
            ds.close()
        results: list[ColdResult] = []
        for k in range(runs):
            rundir = workdir / f"run{k}"
            rundir.mkdir()
            shutil.copyfile(pristine, rundir / "o.db")
            last = k == runs - 1
            results.append(
                _cold_once(n, peers, rundir, fam, drift_samples if last else 0,
                           idle_seconds if last else 0, timeout)
            )  # fmt: skip
    ordered = sorted(results, key=lambda r: r.ours)
    median = ordered[len(ordered) // 2]
    median.drift, median.idle_cpu = results[-1].drift, results[-1].idle_cpu
    median.runs = [r.ours for r in results]
    return median


def _cold_once(
    n: int,
    peers: list[Peer],
    workdir: Path,
    fam: Family,
    drift_samples: int,
    idle_seconds: float,
    timeout: float,
) -> ColdResult:
    ns = make_netns(f"c{n}", fam)
    try:
        wait_quiet()
        run = start_agent(ns, f"sqlite:///{workdir}/o.db", workdir, fam=fam)
        # Every peer's block plus the blackhole for our own block.
        ours = wait_routes(run, ns, n + 1, timeout, peers[-1].block)
        cpu = run.cpu_seconds()
        wait_idle(run)
        result = ColdResult(n, ours, run.proc_status(), count_objects(ns, fam), cpu=cpu)
        result.phases = run.phases()
        if drift_samples:
            result.drift = drift_repair(ns, peers, drift_samples, fam)
            wait_idle(run)
        if idle_seconds:
            cpu0, t0 = run.cpu_seconds(), time.monotonic()
            time.sleep(idle_seconds)
            result.idle_cpu = 100 * (run.cpu_seconds() - cpu0) / (time.monotonic() - t0)
        stop_proc(run.proc)
    finally:
        del_netns(ns)
    return result


def drift_repair(ns: str, peers: list[Peer], samples: int, fam: Family) -> list[float]:
    """Delete one of our routes by hand; seconds until the agent has it back."""
    out: list[float] = []
    watch = RouteWatch(ns, fam)
    try:
        for k in range(samples):
            p = peers[(k * 7919) % len(peers)]
            watch.drain()
            sh("ip", "-n", ns, fam.ip, "route", "del", str(p.block), "proto", str(RT_PROTO))
            gone = watch.wait(p.block, added=False, timeout=5)
            back = watch.wait(p.block, added=True, timeout=10)
            if gone is None or back is None:
                raise RuntimeError(f"drift: route {p.block} not repaired within 10 s")
            out.append(back - gone)
            time.sleep(0.3)  # let the post-repair re-read finish: samples stay independent
    finally:
        watch.close()
    return out


def latency_run(
    ns: str | None,
    url: str,
    workdir: Path,
    n: int,
    samples: int,
    mode: EncapMode,
    timeout: float,
    fam: Family,
) -> dict[str, list[float]]:
    """One peer added then removed, `samples` times: datastore write -> route in/out."""
    ds = open_datastore(url)
    try:
        peers = [peer(i, fam) for i in range(n)]
        fill(ds, peers, mode, threads=1 if url.startswith("sqlite") else 8, fam=fam)
        run = start_agent(ns, url, workdir, fam=fam)
        wait_routes(run, ns, n + 1, timeout, peers[-1].block)
        wait_idle(run)
        watch = RouteWatch(ns, fam)
        add: list[float] = []
        remove: list[float] = []
        try:
            for k in range(samples):
                p = peer(n + k, fam)
                records = peer_records(p, fam)
                watch.drain()
                start = time.monotonic()
                revs = [ds.create(key, value) for key, value in records]
                got = watch.wait(p.block, added=True, timeout=30)
                if got is None:
                    raise RuntimeError(
                        f"peer {p.name}: route {p.block} not programmed in 30 s:\n" + run.log_tail()
                    )
                add.append(got - start)
                time.sleep(0.2)
                watch.drain()
                start = time.monotonic()
                for (key, _v), rev in reversed(list(zip(records, revs, strict=True))):
                    ds.delete(key, rev)
                got = watch.wait(p.block, added=False, timeout=30)
                if got is None:
                    raise RuntimeError(
                        f"peer {p.name}: route {p.block} not removed in 30 s:\n" + run.log_tail()
                    )
                remove.append(got - start)
                time.sleep(0.2)
        finally:
            watch.close()
            stop_proc(run.proc)
        return {"add": add, "remove": remove}
    finally:
        ds.close()


def etcd_child(args: argparse.Namespace) -> None:
    """Runs INSIDE the node namespace (spawned by `ip netns exec`): a 3-member etcd on its
    loopback, the agent, and the latency samples; prints them as JSON."""
    from ipam.testing.etcd import EtcdCluster

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with tempfile.TemporaryDirectory(prefix="ovb-etcd-") as tmp:
        cluster = EtcdCluster(Path(tmp) / "etcd", members=3)
        try:
            cluster.start(timeout=60)
            out = latency_run(
                None, cluster.url, Path(tmp), args.latency_peers, args.samples,
                EncapMode(args.mode), args.timeout, FAMILIES[args.family],
            )  # fmt: skip
        finally:
            cleanup()
            cluster.stop()
    print(json.dumps(out))


def etcd_latency(args: argparse.Namespace) -> dict[str, list[float]]:
    ns = make_netns("etcd", FAMILIES[args.family])
    try:
        argv = [PYTHON, __file__, "--etcd-child", "--latency-peers", str(args.latency_peers),
                "--samples", str(args.samples), "--mode", args.mode,
                "--timeout", str(args.timeout), "--family", str(args.family)]  # fmt: skip
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        _made_procs.append(proc)
        try:
            out, err = proc.communicate(timeout=args.timeout * 4 + 600)
        finally:
            stop_proc(proc, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"etcd child failed ({proc.returncode}):\n{err.decode()[-3000:]}")
        return json.loads(out.decode().strip().splitlines()[-1])
    finally:
        del_netns(ns)


# --- report ----------


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def fmt_lat(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"p50 {statistics.median(ms):6.1f} ms  p99 {pct(ms, 99):6.1f} ms  "
        f"max {max(ms):6.1f} ms  (n={len(ms)})"
    )


def report(cold: list[ColdResult], latency: dict[str, dict[str, list[float]]]) -> str:
    lines = [
        "Cold convergence (agent spawn -> all routes in the kernel) vs iproute2 batch",
        f"{'peers':>7} {'agent s':>8} {'ip nhid s':>10} {'ip classic s':>13} "
        f"{'agent/nhid':>11} {'classic/agent':>14} {'RSS MiB':>8} {'HWM MiB':>8}",
    ]
    for r in cold:
        nhid = f"{r.ip_nhid:10.2f}" if r.ip_nhid is not None else f"{'-':>10}"
        classic = f"{r.ip_classic:13.2f}" if r.ip_classic is not None else f"{'-':>13}"
        ratio = f"{r.ours / r.ip_nhid:10.2f}x" if r.ip_nhid else f"{'-':>11}"
        vs = f"{r.ip_classic / r.ours:13.2f}x" if r.ip_classic else f"{'-':>14}"
        lines.append(
            f"{r.peers:>7} {r.ours:8.2f} {nhid} {classic} {ratio} {vs} "
            f"{r.rss.get('VmRSS', 0):8d} {r.rss.get('VmHWM', 0):8d}"
        )
    if cold:
        lines += [
            "CPU seconds (user+system, kernel work included; immune to other load)",
            f"{'peers':>7} {'agent':>8} {'ip nhid':>10} {'ip classic':>13} "
            f"{'agent/nhid':>11} {'classic/agent':>14} {'load avg':>12}",
        ]
    for r in cold:
        ratio = f"{r.cpu / r.ip_nhid_cpu:10.2f}x" if r.ip_nhid_cpu else f"{'-':>11}"
        vs = f"{r.ip_classic_cpu / r.cpu:13.2f}x" if r.ip_classic_cpu else f"{'-':>14}"
        lines.append(
            f"{r.peers:>7} {r.cpu:8.2f} {r.ip_nhid_cpu:10.2f} {r.ip_classic_cpu:13.2f} "
            f"{ratio} {vs} {r.load[0]:5.1f}->{r.load[1]:<5.1f}"
        )
    for r in cold:
        if len(r.runs) > 1:
            ip = ", ".join(f"{x:.3f}" for x in r.ip_runs)
            lines.append(
                f"runs at {r.peers} (medians above): agent "
                f"{', '.join(f'{x:.3f}' for x in r.runs)} s; ip nhid {ip or '-'} s"
            )
        lines.append(f"objects at {r.peers}: {r.objects}")
        if r.phases:
            lines.append(f"agent phases at {r.peers}: {r.phases}")
        if r.drift:
            lines.append(f"drift repair at {r.peers} peers: {fmt_lat(r.drift)}")
        if r.idle_cpu is not None:
            lines.append(f"idle CPU at {r.peers} peers: {r.idle_cpu:.2f}% of one core")
    for store, lat in latency.items():
        lines.append(f"one peer added   ({store}): {fmt_lat(lat['add'])}")
        lines.append(f"one peer removed ({store}): {fmt_lat(lat['remove'])}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", default="10000", help="comma-separated peer counts")
    p.add_argument("--quick", action="store_true", help="1000 peers, few samples, short idle")
    p.add_argument("--samples", type=int, default=40, help="latency / drift samples")
    p.add_argument("--runs", type=int, default=3, help="cold starts per peer count (median)")
    p.add_argument("--latency-peers", type=int, default=10000, help="peers held while sampling")
    p.add_argument("--detail-peers", type=int, default=10000,
                   help="the peer count at which drift and idle CPU are measured")  # fmt: skip
    p.add_argument("--idle-seconds", type=float, default=20.0)
    p.add_argument("--mode", choices=[m.value for m in EncapMode if m is not EncapMode.NEVER],
                   default=EncapMode.CROSS_SUBNET.value)  # fmt: skip
    p.add_argument("--family", type=int, choices=sorted(FAMILIES), default=4,
                   help="6: IPv6-only nodes, over vxlan-v6.calico")  # fmt: skip
    p.add_argument("--no-etcd", action="store_true")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--no-iproute2", action="store_true")
    p.add_argument("--timeout", type=float, default=300.0, help="per convergence, seconds")
    p.add_argument("--etcd-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.peers, args.samples, args.latency_peers = "1000", 10, 1000
        args.detail_peers, args.idle_seconds = 1000, 5.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.etcd_child:
        etcd_child(args)
        return 0
    if os.geteuid() != 0:
        print("bench_agent: needs root (network namespaces)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    for package in ("overlay", "ipam", "cni"):  # (this host may not write .pyc on import)
        compileall.compile_dir(ROOT / package, quiet=1)
    mode = EncapMode(args.mode)
    fam = FAMILIES[args.family]
    counts = [int(x) for x in args.peers.split(",")]
    cold: list[ColdResult] = []
    latency: dict[str, dict[str, list[float]]] = {}
    try:
        for n in counts:
            detail = n == args.detail_peers
            load0 = os.getloadavg()[0]
            r = cold_run(
                n, mode, fam, drift_samples=args.samples if detail else 0,
                idle_seconds=args.idle_seconds if detail else 0, timeout=args.timeout,
                runs=args.runs,
            )  # fmt: skip
            if not args.no_iproute2:
                peers = [peer(i, fam) for i in range(n)]
                anchors = sorted(
                    iproute2_program(peers, nexthops=True, fam=fam) for _ in range(args.runs)
                )
                r.ip_nhid, r.ip_nhid_cpu = anchors[len(anchors) // 2]
                r.ip_runs = [wall for wall, _ in anchors]
                r.ip_classic, r.ip_classic_cpu = iproute2_program(peers, nexthops=False, fam=fam)
            r.load = (load0, os.getloadavg()[0])
            cold.append(r)
            print(report([r], {}), flush=True)
        if not args.no_latency:
            with tempfile.TemporaryDirectory(prefix="ovb-") as tmp:
                ns = make_netns("lat", fam)
                try:
                    latency["sqlite"] = latency_run(
                        ns, f"sqlite:///{tmp}/o.db", Path(tmp), args.latency_peers,
                        args.samples, mode, args.timeout, fam,
                    )  # fmt: skip
                finally:
                    del_netns(ns)
            if not args.no_etcd:
                latency["etcd x3"] = etcd_latency(args)
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        cleanup()
    print()
    print(f"mode={mode.value}{fam.label} machine: {os.cpu_count()} CPUs, {os.uname().release}")
    print(report(cold, latency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
