"""A small cluster of namespaces for the CNI tests: a router, node namespaces, real agents.

Subnet k (1-based) is 192.168.k.0/24 on bridge `brk` in the router namespace (gateway
.1); node i of that subnet has eth0 192.168.k.(10+i). Each node runs a real
`overlay-agent` (started and stopped by PID) against one sqlite datastore holding a
VXLAN CrossSubnet pool 10.244.0.0/16. Plugins are exec'd inside the node namespace, as a
runtime on that node would. Everything made is removed on exit, also after a failure.
Nothing touches the root namespace.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
OVERLAY_CNI = str(BIN / "overlay-cni")
OVERLAY_IPAM = str(BIN / "overlay-ipam")
REFERENCE_DIR = "/usr/lib/cni"
POOL_CIDR = "10.244.0.0/16"
METRICS = "127.0.0.1:9099"  # per node netns: every namespace has its own loopback
NETWORK = "ovtest"
_seq = itertools.count()

POOL_YAML = """\
apiVersion: projectcalico.org/v3
kind: IPPool
metadata:
  name: default-ipv4
spec:
  cidr: {cidr}
  vxlanMode: CrossSubnet
  ipipMode: Never
  natOutgoing: true
"""

# Polls the agent's /status inside the node netns (one process, bounded by the deadline).
_WAIT_SCRIPT = """
import json, sys, time, urllib.request
url, deadline, peers = sys.argv[1], time.monotonic() + float(sys.argv[2]), int(sys.argv[3])
last = "no answer"
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            doc = json.loads(r.read())
        last = json.dumps(doc)[:400]
        if doc.get("dataplane_synced") and len(doc.get("peers") or []) >= peers:
            sys.exit(0)
    except Exception as e:
        last = repr(e)
    time.sleep(0.05)
print(last)
sys.exit(1)
"""


def sh(
    *argv: str, check: bool = True, timeout: float = 60, **kw: Any
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if check and res.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({res.returncode}): {res.stderr.strip()}")
    return res


def unique(tag: str) -> str:
    """A namespace name no other test (or xdist worker) uses."""
    return f"ovc{tag}-{os.getpid()}-{next(_seq)}-{uuid.uuid4().hex[:4]}"


@dataclass
class Node:
    name: str
    netns: str
    address: str  # underlay, without prefix
    subnet: int
    dir: Path
    pid: int | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        return str(self.dir / "cni.sock")

    @property
    def log(self) -> Path:
        return self.dir / "agent.log"


@dataclass
class PluginRun:
    rc: int
    out: dict[str, Any]
    stdout: str
    stderr: str


@dataclass
class Cluster:
    tag: str
    dir: Path
    router: str
    datastore: str
    nodes: list[Node] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)  # every netns made, in order

    # ------------------------------------------------------------------ namespaces

    def add_netns(self, tag: str) -> str:
        name = unique(tag)
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def del_netns(self, name: str) -> None:
        sh("ip", "netns", "del", name, check=False)
        with contextlib.suppress(ValueError):
            self.namespaces.remove(name)

    def pod_netns(self) -> tuple[str, str]:
        """(name, path) of a fresh pod namespace."""
        name = self.add_netns("p")
        return name, f"/run/netns/{name}"

    def ip(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "-n", ns, *args, check=check)

    def ping(self, ns: str, address: str, count: int = 1, wait: float = 2) -> bool:
        res = sh("ip", "netns", "exec", ns, "ping", "-n", "-q", "-c", str(count), "-W",
                 f"{wait:g}", address, check=False)  # fmt: skip
        return res.returncode == 0

    def ip_json(self, ns: str, *args: str) -> list[dict[str, Any]]:
        out = sh("ip", "-j", "-n", ns, *args).stdout
        return json.loads(out) if out.strip() else []

    # ------------------------------------------------------------------ agents

    def start_agent(self, node: Node, wait: bool = True, peers: int = 0) -> None:
        node.dir.mkdir(parents=True, exist_ok=True)
        argv = [
            "ip", "netns", "exec", node.netns, str(BIN / "overlay-agent"),
            "--node-name", node.name, "--datastore", self.datastore,
            "--state-dir", str(node.dir), "--socket", node.socket,
            "--ip-autodetection", "interface=eth0", "--metrics-addr", METRICS,
            "--log-level", "info",
        ]  # fmt: skip
        with open(node.log, "ab") as log:
            node.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        node.pid = node.proc.pid
        if wait:
            self.wait_agent(node, peers)

    def wait_agent(self, node: Node, peers: int = 0, timeout: float = 60.0) -> None:
        res = sh(
            "ip", "netns", "exec", node.netns, sys.executable, "-c", _WAIT_SCRIPT,
            f"http://{METRICS}/status", str(timeout), str(peers),
            check=False, timeout=timeout + 15,
        )  # fmt: skip
        if res.returncode != 0:
            tail = "\n".join(node.log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"agent {node.name} not ready: {res.stdout.strip()}\n{tail}")

    def stop_agent(self, node: Node, timeout: float = 10.0) -> None:
        proc, node.proc, node.pid = node.proc, None, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    # ------------------------------------------------------------------ plugins

    def exec_plugin(
        self,
        node: Node,
        config: dict[str, Any] | str | bytes,
        command: str,
        container_id: str = "",
        netns: str = "",
        ifname: str = "eth0",
        args: str = "",
        plugin: str = OVERLAY_CNI,
        extra_env: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> PluginRun:
        """Exec one plugin in the node netns with a runtime's environment."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_PATH": f"{BIN}:{REFERENCE_DIR}",
        }
        for key, value in (
            ("CNI_CONTAINERID", container_id),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", ifname),
            ("CNI_ARGS", args),
        ):
            if value:
                env[key] = value
        env.update(extra_env or {})
        data = config if isinstance(config, str | bytes) else json.dumps(config)
        if isinstance(data, bytes):
            data = data.decode()
        res = subprocess.run(
            ["ip", "netns", "exec", node.netns, plugin],
            input=data,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        try:
            out = json.loads(res.stdout) if res.stdout.strip() else {}
        except ValueError:
            out = {"unparsed": res.stdout}
        return PluginRun(res.returncode, out, res.stdout, res.stderr)

    def conf(self, node: Node, version: str = "1.1.0", **extra: Any) -> dict[str, Any]:
        """A plugin object for overlay-cni as a runtime sends it."""
        obj: dict[str, Any] = {
            "cniVersion": version,
            "name": NETWORK,
            "type": "overlay-cni",
            "agentSocket": node.socket,
            "mtu": 0,
            "ipam": {"type": "overlay-ipam"},
        }
        obj.update(extra)
        return obj

    # ------------------------------------------------------------------ datastore views

    def overlayctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        # sqlite is a file: the CLI needs no network, run it in the router netns anyway.
        return sh(
            "ip", "netns", "exec", self.router, str(BIN / "overlayctl"),
            "--datastore", self.datastore, *args,
        )  # fmt: skip

    def allocations(self) -> dict[str, str]:
        """address -> handle of every allocation except the nodes' tunnel addresses."""
        code = (
            "import json,sys\n"
            "from ipam.datastore import open_datastore\n"
            "from ipam.store import ResourceStore\n"
            "from ipam.allocator import IPAM\n"
            "ds=open_datastore(sys.argv[1]); ipam=IPAM(ds, ResourceStore(ds)); out={}\n"
            "for b in ipam.snapshot().blocks.values():\n"
            "    for off, idx in enumerate(b.allocations):\n"
            "        if idx is None: continue\n"
            "        h=b.attributes[idx].handle_id or ''\n"
            "        if not h.startswith('vxlan-tunnel-addr') and not h.startswith('ipip'):\n"
            "            out[str(b.cidr.network + off)]=h\n"
            "print(json.dumps(out)); ds.close()\n"
        )
        res = sh(sys.executable, "-c", code, self.datastore, cwd=str(ROOT))
        return json.loads(res.stdout)

    def host_veths(self, node: Node) -> list[str]:
        return [
            link["ifname"]
            for link in self.ip_json(node.netns, "link", "show")
            if link["ifname"].startswith("cali")
        ]

    def host_routes(self, node: Node) -> list[str]:
        """Pod /32 routes on the node (those through cali* veths)."""
        return [
            r["dst"]
            for r in self.ip_json(node.netns, "route", "show")
            if str(r.get("dev", "")).startswith("cali")
        ]


def _make_node(c: Cluster, index: int, subnet: int) -> Node:
    ns = c.add_netns(f"n{index}")
    address = f"192.168.{subnet}.{10 + index}"
    port = f"p{index}"
    sh("ip", "-n", c.router, "link", "add", port, "type", "veth", "peer", "name", "eth0",
       "netns", ns)  # fmt: skip
    sh("ip", "-n", c.router, "link", "set", port, "master", f"br{subnet}", "up")
    sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sh("ip", "-n", ns, "route", "add", "default", "via", f"192.168.{subnet}.1")
    node = Node(f"node{index}-{c.tag}", ns, address, subnet, c.dir / f"node{index}")
    c.nodes.append(node)
    return node


@contextlib.contextmanager
def cluster(subnets: Sequence[int] = (1,), start: bool = True) -> Iterator[Cluster]:
    """Nodes on the given subnets (one per entry), agents started and synced."""
    tag = uuid.uuid4().hex[:6]
    with tempfile.TemporaryDirectory(prefix="ovcni-") as tmp:
        directory = Path(tmp)
        c = Cluster(tag, directory, "", f"sqlite:///{directory}/overlay.db")
        try:
            c.router = c.add_netns("r")
            for k in sorted(set(subnets)):
                sh("ip", "-n", c.router, "link", "add", f"br{k}", "type", "bridge")
                sh("ip", "-n", c.router, "addr", "add", f"192.168.{k}.1/24", "dev", f"br{k}")
                sh("ip", "-n", c.router, "link", "set", f"br{k}", "up")
            sh("ip", "netns", "exec", c.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            for i, k in enumerate(subnets, start=1):
                _make_node(c, i, k)
            pool = directory / "pool.yaml"
            pool.write_text(POOL_YAML.format(cidr=POOL_CIDR))
            c.overlayctl("apply", "-f", str(pool))
            if start:
                for node in c.nodes:
                    c.start_agent(node, wait=False)
                for node in c.nodes:
                    c.wait_agent(node)
            yield c
        finally:
            for node in c.nodes:
                c.stop_agent(node)
            for ns in reversed(list(c.namespaces)):
                c.del_netns(ns)


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll `predicate()` until it is truthy or `timeout` passes; its last value's truth."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
