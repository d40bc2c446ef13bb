"""overlay.kernel.links against the real kernel, inside scratch namespaces (root only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns_tests.kernel_fixtures import ip, unique_name

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

REPO = Path(__file__).resolve().parent.parent

# Runs inside the node namespace: what links.py sees, and what autodetection makes of it.
PROBE = """
import json, netaddr
from overlay.autodetect import detect, host_mtu
from overlay.kernel.links import list_interfaces, route_lookup
ifs = list_interfaces()
out = {"ifaces": {i.name: [i.mtu, i.up, [str(a) for a in i.addresses]] for i in ifs}}
found = detect("first-found", ifs)
out["first_found"] = [found.interface, str(found.address)]
found = detect("can-reach=10.77.0.2", ifs, route_lookup=route_lookup)
out["can_reach"] = [found.interface, str(found.address)]
out["host_mtu"] = host_mtu(ifs, underlay=found.interface)
try:
    route_lookup(netaddr.IPAddress("10.99.0.1"))
except OSError as e:
    out["unreachable_errno"] = e.errno
print(json.dumps(out))
"""


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    """A node namespace with eth0 10.77.0.1/24 (MTU 1400) to a peer namespace, and a
    second veth `spare0` whose peer is down; both namespaces always deleted."""
    node, peer = unique_name("l"), unique_name("lp")
    made: list[str] = []
    try:
        for ns in (node, peer):
            ip("netns", "add", ns)
            made.append(ns)
        ip("-n", node, "link", "add", "eth0", "mtu", "1400", "type", "veth",
           "peer", "name", "eth0", "netns", peer)  # fmt: skip
        ip("-n", node, "addr", "add", "10.77.0.1/24", "dev", "eth0")
        ip("-n", node, "addr", "add", "2001:db8:77::1/64", "dev", "eth0", "nodad")
        ip("-n", peer, "addr", "add", "10.77.0.2/24", "dev", "eth0")
        ip("-n", node, "link", "add", "spare0", "type", "veth", "peer", "name", "spare1")
        ip("-n", node, "addr", "add", "10.88.0.1/16", "dev", "spare0")
        for ns, dev in ((node, "eth0"), (peer, "eth0"), (node, "lo"), (node, "spare0")):
            ip("-n", ns, "link", "set", dev, "up")
        yield node, peer
    finally:
        for ns in made:
            ip("netns", "del", ns, check=False)


def test_links_lists_interfaces_with_prefix_mtu_and_state(namespaces: tuple[str, str]) -> None:
    node, _ = namespaces
    proc = subprocess.run(
        ["ip", "netns", "exec", node, sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    ifaces = out["ifaces"]
    mtu, up, addrs = ifaces["eth0"]
    assert mtu == 1400 and up is True
    assert "10.77.0.1/24" in addrs and "2001:db8:77::1/64" in addrs
    # spare0 is administratively up but its peer is down: no carrier, so not "up".
    assert ifaces["spare0"][1] is False and ifaces["spare0"][2] == ["10.88.0.1/16"]
    assert ifaces["lo"][2][0] == "127.0.0.1/8"
    assert out["first_found"] == ["eth0", "10.77.0.1/24"]
    assert out["can_reach"] == ["eth0", "10.77.0.1/24"]
    assert out["host_mtu"] == 1400
    assert out["unreachable_errno"] == 101  # ENETUNREACH: no default route in the namespace
