"""podman (a real libcni client) runs containers on our network, chained with portmap and
bandwidth, on two nodes in different underlay subnets.

podman runs with its network namespace set to the node's (`nsenter --net`), so the plugin's
host side is the node namespace, never the root one. It keeps the root mount namespace:
`ip netns exec` would remount /sys and hide the cgroup mounts runc needs. Its storage, run
state, CNI config and containers.conf all live in a temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns_tests.cni_fixtures import BIN, REFERENCE_DIR, Cluster, Node, cluster, sh, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
    pytest.mark.skipif(
        not (shutil.which("podman") and shutil.which("runc") and Path("/bin/busybox").exists()),
        reason="needs podman, runc and busybox-static (Debian packages)",
    ),
]

NETWORK = "ovpod"
NETWORK6 = "ovpod6"
IMAGE = "localhost/ovbusybox:latest"
PORT = 18080


class Podman:
    """podman of one node: its own storage and CNI config, in the node's netns."""

    def __init__(self, node: Node, work: Path) -> None:
        self.node = node
        self.dir = work / node.name
        cfg = self.dir / "cni"
        cfg.mkdir(parents=True)
        conflist = {
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "plugins": [
                {"type": "overlay-cni", "agentSocket": node.socket,
                 "ipam": {"type": "overlay-ipam"}},
                {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
                {"type": "bandwidth", "capabilities": {"bandwidth": True}},
            ],
        }  # fmt: skip
        (cfg / f"10-{NETWORK}.conflist").write_text(json.dumps(conflist))
        # The same network asking for dual-stack pods.
        dual = json.loads(json.dumps(conflist))
        dual["name"] = NETWORK6
        dual["plugins"][0]["ipam"]["assignIPv6"] = True
        (cfg / f"11-{NETWORK6}.conflist").write_text(json.dumps(dual))
        conf = self.dir / "containers.conf"
        conf.write_text(
            f'[network]\nnetwork_backend = "cni"\n'
            f'cni_plugin_dirs = ["{BIN}", "{REFERENCE_DIR}"]\n'
            f'network_config_dir = "{cfg}"\n'
        )
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.base = [
            "nsenter", f"--net=/run/netns/{node.netns}", "podman",
            "--root", str(self.dir / "root"), "--runroot", str(self.dir / "run"),
            "--storage-driver", "vfs", "--network-backend", "cni", "--runtime", "runc",
            "--cgroup-manager", "cgroupfs", "--cni-config-dir", str(cfg),
        ]  # fmt: skip

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        res = subprocess.run(
            [*self.base, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and res.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed: {res.stderr[-2000:]}")
        return res.stdout.strip()

    def run(self, name: str, *cmd: str, publish: str = "") -> str:
        """Start a container; its IPv4 address on our network."""
        extra = ["-p", publish] if publish else []
        self("run", "-d", "--name", name, "--ulimit", "nofile=1024:1024",
             "--ulimit", "nproc=1024:1024", "--network", NETWORK, *extra, IMAGE, *cmd)  # fmt: skip
        doc = json.loads(self("inspect", name, "--format", "{{json .NetworkSettings.Networks}}"))
        return str(doc[NETWORK]["IPAddress"])


@pytest.fixture
def env() -> Iterator[tuple[Cluster, list[Podman]]]:
    work = Path(tempfile.mkdtemp(prefix="ovpodman-"))
    try:
        rootfs = work / "rootfs"
        (rootfs / "bin").mkdir(parents=True)
        shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")
        for applet in ("sh", "ping", "httpd", "sleep", "nc", "printf"):
            (rootfs / "bin" / applet).symlink_to("busybox")
        (rootfs / "www").mkdir()
        (rootfs / "www" / "index.html").write_text("hello from the overlay\n")
        tarball = work / "busybox.tar"
        sh("tar", "-C", str(rootfs), "-cf", str(tarball), ".")
        with cluster((1, 2)) as c:
            engines = [Podman(n, work) for n in c.nodes]
            try:
                for p in engines:
                    p("import", str(tarball), IMAGE)
                yield c, engines
            finally:
                for p in engines:
                    p("rm", "-a", "-f", "-t", "0", check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_podman_containers_talk_across_subnets_and_publish_ports(
    env: tuple[Cluster, list[Podman]],
) -> None:
    c, (p1, p2) = env
    n1, n2 = c.nodes
    web = p1.run("web", "/bin/httpd", "-f", "-p", "80", "-h", "/www", publish=f"{PORT}:80")
    client = p2.run("client", "/bin/sleep", "600")
    assert web.startswith("10.244.") and client.startswith("10.244.")
    allocs = c.allocations()
    assert allocs[web].startswith(f"{NETWORK}.") and allocs[client].startswith(f"{NETWORK}.")
    c.wait_agent(n2, peers=1)
    c.wait_agent(n1, peers=1)

    # Container to container across the two subnets (VXLAN), both ways.
    def pings(engine: Podman, name: str, address: str) -> bool:
        out = engine("exec", name, "ping", "-c1", "-W2", address, check=False)
        return "1 packets received" in out

    assert wait_for(lambda: pings(p2, "client", web), timeout=20)
    assert pings(p1, "web", client)
    # The web container answers its peer directly and through the published port.
    # (nc, not wget: the static busybox's wget crashes in an image without /etc.)
    page = p2(
        "exec", "client", "sh", "-c", f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {web} 80"
    )
    assert page.startswith("HTTP/1.") and page.endswith("hello from the overlay"), page
    # A published port answers from the other node (another subnet) through the node address.
    url = f"http://{n1.address}:{PORT}/"
    fetch = f"import urllib.request as u; print(u.urlopen({url!r}, timeout=5).read().decode())"
    remote = sh("ip", "netns", "exec", n2.netns, sys.executable, "-c", fetch, check=False)
    assert remote.stdout.strip() == "hello from the overlay", remote.stderr

    # `podman rm` runs DEL through the chain: the address is freed and the DNAT is gone.
    p1("rm", "-f", "-t", "0", "web")
    assert web not in c.allocations()
    assert not any(r["dst"] == web for r in c.ip_json(n1.netns, "route", "show"))
    nat = sh("ip", "netns", "exec", n1.netns, "iptables-save", "-t", "nat").stdout
    assert str(PORT) not in nat
    p2("rm", "-f", "-t", "0", "client")
    assert c.allocations() == {}


def test_podman_static_ip_and_mac_reach_the_plugin(env: tuple[Cluster, list[Podman]]) -> None:
    # podman passes --ip and --mac-address as CNI_ARGS IP= and MAC= (host-local's keys).
    c, (p1, _p2) = env
    want_ip, want_mac = "10.244.250.9", "0a:58:0a:f4:fa:09"
    p1("run", "-d", "--name", "fixed", "--ulimit", "nofile=1024:1024",
       "--ulimit", "nproc=1024:1024", "--network", NETWORK, "--ip", want_ip,
       "--mac-address", want_mac, IMAGE, "/bin/sleep", "600")  # fmt: skip
    doc = json.loads(p1("inspect", "fixed", "--format", "{{json .NetworkSettings.Networks}}"))
    assert doc[NETWORK]["IPAddress"] == want_ip and doc[NETWORK]["MacAddress"] == want_mac, doc
    assert c.allocations()[want_ip].startswith(f"{NETWORK}.")
    p1("rm", "-f", "-t", "0", "fixed")
    assert want_ip not in c.allocations()


POOL6 = """\
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: pool6}
spec: {cidr: "fd00:10:244::/48", blockSize: 122, vxlanMode: CrossSubnet}
"""


def test_podman_dual_stack_containers_reach_each_other_over_ipv6(
    env: tuple[Cluster, list[Podman]], tmp_path: Path
) -> None:
    c, (p1, p2) = env
    pool = tmp_path / "pool6.yaml"
    pool.write_text(POOL6)
    c.overlayctl("apply", "-f", str(pool))
    for p in (p1, p2):
        p("run", "-d", "--name", "dual", "--ulimit", "nofile=1024:1024", "--ulimit",
          "nproc=1024:1024", "--network", NETWORK6, IMAGE, "/bin/sleep", "600")  # fmt: skip
    nets = [json.loads(p("inspect", "dual", "--format", "{{json .NetworkSettings.Networks}}"))
            for p in (p1, p2)]  # fmt: skip
    v6 = [str(n[NETWORK6]["GlobalIPv6Address"]) for n in nets]
    assert all(a.startswith("fd00:10:244:") for a in v6), nets
    assert all(str(n[NETWORK6]["IPAddress"]).startswith("10.244.") for n in nets), nets

    def pings(engine: Podman, address: str) -> bool:
        out = engine("exec", "dual", "ping", "-6", "-c1", "-W2", address, check=False)
        return "1 packets received" in out

    # Across the two subnets, over the IPv4 VXLAN, both ways.
    assert wait_for(lambda: pings(p1, v6[1]), timeout=20), v6
    assert pings(p2, v6[0])
    assert set(v6) <= set(c.allocations())
    for p in (p1, p2):
        p("rm", "-f", "-t", "0", "dual")
    assert not set(v6) & set(c.allocations())  # both families freed by `podman rm`
