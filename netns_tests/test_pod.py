"""Pod plumbing on a real kernel: a "node" netns plays the host, a "pod" netns the container.

The plumbing runs in a child process started with `ip netns exec <node>`, the way the
agent runs inside its node namespace in the lab; the root namespace is never touched.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from cni.pod import host_veth_name

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_seq = itertools.count()

# Runs one cni.pod function in the node netns and prints its outcome as JSON.
RUNNER = """
import json, sys
from cni import pod
from cni.spec import CniError
fn, kwargs = sys.argv[1], json.loads(sys.argv[2])
try:
    out = getattr(pod, fn)(**kwargs)
    if isinstance(out, pod.PodLink):
        out = {s: getattr(out, s) for s in out.__slots__}
    print(json.dumps({"ok": out}))
except CniError as e:
    print(json.dumps({"error": {"code": e.code, "msg": e.msg}}))
"""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=30)


def make_netns() -> str:
    name = f"ovtpod-{os.getpid()}-{next(_seq)}-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", name)
    return name


class Pair:
    def __init__(self, node: str, pod: str) -> None:
        self.node = node
        self.pod = pod
        self.pod_path = f"/var/run/netns/{pod}"

    def call(self, fn: str, **kwargs: object) -> dict[str, object]:
        proc = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.node,
                sys.executable,
                "-c",
                RUNNER,
                fn,
                json.dumps(kwargs),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": ROOT},
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def node_ip(self, *args: str) -> str:
        return sh("ip", "-n", self.node, *args).stdout

    def pod_ip(self, *args: str) -> str:
        return sh("ip", "-n", self.pod, *args).stdout

    def sysctl(self, path: str) -> str:
        out = sh("ip", "netns", "exec", self.node, "cat", f"/proc/sys/net/{path}")
        return out.stdout.strip()


@pytest.fixture
def pair() -> Iterator[Pair]:
    names: list[str] = []
    try:
        names.append(make_netns())
        names.append(make_netns())
        p = Pair(*names)
        # The node's uplink: a default route out of another interface, so that proxy ARP
        # answers for 169.254.1.1 (the kernel only proxies to a different interface).
        p.node_ip("link", "add", "up0", "type", "veth", "peer", "name", "up1")
        p.node_ip("addr", "add", "10.254.0.1/30", "dev", "up0")
        p.node_ip("link", "set", "up0", "up")
        p.node_ip("link", "set", "up1", "up")
        p.node_ip("route", "add", "default", "via", "10.254.0.2", "dev", "up0")
        yield p
    finally:
        for name in names:
            sh("ip", "netns", "del", name, check=False)


WORKLOAD = "default.web-0"
HOST = host_veth_name(WORKLOAD)


def setup(p: Pair, **extra: object) -> dict[str, object]:
    kwargs: dict[str, object] = {
        "netns": p.pod_path,
        "ifname": "eth0",
        "workload": WORKLOAD,
        "addresses": ["10.65.0.5/26"],
        "mtu": 1410,
    }
    kwargs.update(extra)
    return p.call("setup_pod", **kwargs)


def test_host_veth_name_is_calico_format() -> None:
    assert HOST.startswith("cali") and len(HOST) == 15
    assert host_veth_name(WORKLOAD) == HOST  # stable


def test_setup_pod_plumbs_calico_style(pair: Pair) -> None:
    out = setup(pair, mac="0a:58:0a:41:00:05")
    assert "ok" in out, out
    link = out["ok"]
    assert isinstance(link, dict)
    assert link["host_ifname"] == HOST and link["pod_mac"] == "0a:58:0a:41:00:05"

    host = pair.node_ip("-d", "link", "show", HOST)
    assert "ee:ee:ee:ee:ee:ee" in host and "mtu 1410" in host and "veth" in host
    assert pair.sysctl(f"ipv4/conf/{HOST}/proxy_arp") == "1"
    assert pair.sysctl(f"ipv4/neigh/{HOST}/proxy_delay") == "0"
    assert pair.sysctl(f"ipv4/conf/{HOST}/forwarding") == "1"
    assert pair.sysctl(f"ipv6/conf/{HOST}/accept_ra") == "0"
    assert "inet " not in pair.node_ip("addr", "show", HOST)  # no address on the host side
    host_route = pair.node_ip("route", "show", "10.65.0.5/32")
    assert f"10.65.0.5 dev {HOST}" in host_route and "scope link" in host_route

    pod = pair.pod_ip("addr", "show", "eth0")
    assert "inet 10.65.0.5/32" in pod and "0a:58:0a:41:00:05" in pod and "mtu 1410" in pod
    routes = pair.pod_ip("route", "show")
    assert re.search(r"^169\.254\.1\.1 dev eth0 .*scope link", routes, re.M), routes
    assert re.search(r"^default via 169\.254\.1\.1 dev eth0", routes, re.M), routes

    # The pod reaches the node through proxy ARP for the fake gateway and the host route.
    ping = sh("ip", "netns", "exec", pair.pod, "ping", "-c", "1", "-W", "2", "10.254.0.1")
    assert ping.returncode == 0
    assert "ee:ee:ee:ee:ee:ee" in pair.pod_ip("neigh", "show", "169.254.1.1")

    assert pair.call("inspect_pod", netns=pair.pod_path, ifname="eth0", workload=WORKLOAD,
                     addresses=["10.65.0.5/26"], mac="0a:58:0a:41:00:05") == {"ok": []}  # fmt: skip


def test_setup_pod_dual_stack(pair: Pair) -> None:
    out = setup(pair, addresses=["10.65.0.7/26", "fd00:65::7/122"])
    assert "ok" in out, out
    pod6 = pair.pod_ip("-6", "route", "show")
    assert "default via fe80::ecee:eeff:feee:eeee dev eth0" in pod6
    assert "fd00:65::7/128" in pair.pod_ip("-6", "addr", "show", "eth0")
    assert HOST in pair.node_ip("-6", "route", "show", "fd00:65::7/128")
    host6 = pair.node_ip("-6", "addr", "show", HOST)
    assert "fe80::ecee:eeff:feee:eeee" in host6
    inspect = pair.call("inspect_pod", netns=pair.pod_path, ifname="eth0", workload=WORKLOAD,
                        addresses=["10.65.0.7/26", "fd00:65::7/122"])  # fmt: skip
    assert inspect == {"ok": []}


def test_teardown_removes_everything_and_is_idempotent(pair: Pair) -> None:
    assert "ok" in setup(pair)
    assert pair.call("teardown_pod", netns=pair.pod_path, ifname="eth0") == {"ok": True}
    assert "eth0" not in pair.pod_ip("link", "show")
    assert HOST not in pair.node_ip("link", "show")
    assert pair.node_ip("route", "show", "10.65.0.5/32").strip() == ""
    # A second DEL, and a DEL after the netns is gone, both succeed.
    assert pair.call("teardown_pod", netns=pair.pod_path, ifname="eth0") == {"ok": False}
    sh("ip", "netns", "del", pair.pod)
    assert pair.call("teardown_pod", netns=pair.pod_path, ifname="eth0") == {"ok": False}
    assert pair.call("teardown_pod", netns="", ifname="eth0") == {"ok": False}


def test_inspect_reports_deleted_route_and_missing_pieces(pair: Pair) -> None:
    assert "ok" in setup(pair)
    pair.pod_ip("route", "del", "default")
    pair.node_ip("route", "del", "10.65.0.5/32")
    out = pair.call("inspect_pod", netns=pair.pod_path, ifname="eth0", workload=WORKLOAD,
                    addresses=["10.65.0.5/32"])  # fmt: skip
    problems = out["ok"]
    assert isinstance(problems, list)
    assert any("default route via 169.254.1.1" in p for p in problems), problems
    assert any(f"host route 10.65.0.5/32 dev {HOST}" in p for p in problems), problems
    assert len(problems) == 2, problems

    pair.call("teardown_pod", netns=pair.pod_path, ifname="eth0")
    out = pair.call("inspect_pod", netns=pair.pod_path, ifname="eth0", workload=WORKLOAD,
                    addresses=["10.65.0.5/32"])  # fmt: skip
    assert out["ok"] == ["interface eth0 is missing in the pod", f"host veth {HOST} is missing"]


def test_setup_refuses_existing_interface_and_rolls_back(pair: Pair) -> None:
    pair.pod_ip("link", "add", "eth0", "type", "veth", "peer", "name", "other")
    out = setup(pair)
    assert "error" in out and "eth0 already exists" in str(out["error"])
    assert HOST not in pair.node_ip("link", "show")  # nothing left behind


def test_setup_rolls_back_when_host_route_conflicts(pair: Pair) -> None:
    # Another interface already routes the pod's address: ADD fails and removes its veth.
    pair.node_ip("route", "add", "10.65.0.5/32", "dev", "up1")
    out = setup(pair)
    assert "error" in out and "already exists on interface up1" in str(out["error"])
    assert HOST not in pair.node_ip("link", "show")
    assert "eth0" not in pair.pod_ip("link", "show")


def test_setup_missing_netns_is_code_8(pair: Pair) -> None:
    out = setup(pair, netns="/var/run/netns/ovtpod-does-not-exist")
    assert out["error"] == {
        "code": 8,
        "msg": "cannot open netns /var/run/netns/ovtpod-does-not-exist: No such file or directory",
    }
