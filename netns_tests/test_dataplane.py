"""The agent's VXLAN dataplane on the host kernel, asserted on the wire and in the kernel.

Labs of two underlay subnets joined by a router that knows no pod routes (overlay/lab/):
node1, node2 on 192.168.1.0/24 and node3, node4 on 192.168.2.0/24 (three nodes when a
test needs fewer). Packets are captured with tcpdump inside the node or external
namespaces and decoded with scapy. Drift times are printed (run with -s to see them).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netns_tests.lab_fixtures import (
    KERNEL_CHANGE,
    LAB_TEST_MARKS,
    OUR_PROTO,
    VXLAN_DEV,
    Capture,
    Lab,
    Snapshot,
    poll,
    running_lab,
    snapshot,
)
from overlay.lab import netns
from overlay.lab.topology import EXTERNAL_HOST

pytestmark = LAB_TEST_MARKS

VNI = 4096
VXLAN_PORT = 4789
REPAIR_BOUND_S = 1.0
OTHER_MAC = "02:00:00:00:00:99"
DEVICE_REPAIR_BOUND_S = 5.0


@pytest.fixture(scope="module")
def xsub() -> Iterator[Lab]:
    """Cross-subnet mode, 2 subnets x 2 nodes, one pod per node. Tests may disturb it only
    if they restore it (drift is repaired by the agent, a restarted agent is running)."""
    with running_lab(nodes=4, subnets=2, mode="cross-subnet", pods_per_node=1) as lab:
        yield lab


def decode(capture: Capture) -> tuple[list[Any], list[Any]]:
    """(VXLAN packets, plain IPv4 packets) of a capture."""
    from scapy.layers.inet import IP
    from scapy.layers.vxlan import VXLAN

    pkts = capture.packets()
    return [p for p in pkts if p.haslayer(VXLAN)], [
        p for p in pkts if p.haslayer(IP) and not p.haslayer(VXLAN)
    ]


def assert_vxlan_icmp(vxlan: list[Any], node_a: str, node_b: str, pod_a: str, pod_b: str) -> None:
    """Requests pod_a->pod_b carried node_a->node_b and replies back, VNI 4096, port 4789."""
    from scapy.layers.inet import ICMP, IP, UDP
    from scapy.layers.vxlan import VXLAN

    seen = set()
    for p in vxlan:
        outer, inner = p[IP], p[VXLAN][IP]
        assert p[UDP].dport == VXLAN_PORT and p[VXLAN].vni == VNI, p.summary()
        assert {outer.src, outer.dst} == {node_a, node_b}, f"outer {outer.src}->{outer.dst}"
        assert inner.haslayer(ICMP), p.summary()
        seen.add((outer.src, outer.dst, inner.src, inner.dst, inner[ICMP].type))
    assert (node_a, node_b, pod_a, pod_b, 8) in seen, f"no encapsulated echo request: {seen}"
    assert (node_b, node_a, pod_b, pod_a, 0) in seen, f"no encapsulated echo reply: {seen}"


# ----------------------------------------------------------------------------- on the wire


def test_cross_subnet_pod_traffic_is_vxlan_between_the_node_addresses(
    xsub: Lab, tmp_path: Path
) -> None:
    src, dst = xsub.pod(1), xsub.pod(3)
    n1, n3 = xsub.address(xsub.node(1)), xsub.address(xsub.node(3))
    assert src.ip and dst.ip
    with Capture(xsub.node(1).netns, tmp_path / "x.pcap", "udp or icmp", count=6) as cap:
        assert xsub.ping(src.netns, dst.ip, count=3)
    vxlan, plain = decode(cap)
    assert len(vxlan) >= 6, [p.summary() for p in vxlan + plain]
    assert_vxlan_icmp(vxlan, n1, n3, src.ip, dst.ip)
    # Nothing left the node with a pod address in its outer header.
    leaked = [p.summary() for p in plain if {p["IP"].src, p["IP"].dst} & {src.ip, dst.ip}]
    assert leaked == []


def test_same_subnet_pod_traffic_is_plain_ip(xsub: Lab, tmp_path: Path) -> None:
    from scapy.layers.inet import ICMP, IP

    src, dst = xsub.pod(1), xsub.pod(2)
    assert src.ip and dst.ip
    with Capture(xsub.node(1).netns, tmp_path / "d.pcap", "udp or icmp", count=6) as cap:
        assert xsub.ping(src.netns, dst.ip, count=3)
    vxlan, plain = decode(cap)
    assert vxlan == [], "same-subnet traffic was encapsulated"
    seen = {(p[IP].src, p[IP].dst, p[ICMP].type) for p in plain if p.haslayer(ICMP)}
    assert (src.ip, dst.ip, 8) in seen and (dst.ip, src.ip, 0) in seen, seen


def test_always_mode_encapsulates_the_same_subnet_too(tmp_path: Path) -> None:
    with running_lab(nodes=2, subnets=1, mode="always", pods_per_node=1) as lab:
        src, dst = lab.pod(1), lab.pod(2)
        assert src.ip and dst.ip
        with Capture(lab.node(1).netns, tmp_path / "a.pcap", "udp or icmp", count=6) as cap:
            assert lab.ping(src.netns, dst.ip, count=3)
        vxlan, plain = decode(cap)
        n1, n2 = lab.address(lab.node(1)), lab.address(lab.node(2))
        assert_vxlan_icmp(vxlan, n1, n2, src.ip, dst.ip)
        assert [p.summary() for p in plain if p["IP"].src == src.ip] == []


def test_large_tcp_transfer_over_vxlan_and_pod_mtu(xsub: Lab) -> None:
    underlay_mtu = int(_link(xsub.node(1).netns, "eth0")["mtu"])
    for i in (1, 3):
        assert int(_link(xsub.pod(i).netns, "eth0")["mtu"]) == underlay_mtu - 50
    assert int(_link(xsub.node(1).netns, VXLAN_DEV)["mtu"]) == underlay_mtu - 50

    src, dst = xsub.pod(1), xsub.pod(3)
    assert dst.ip
    size = 20 * 2**20
    server = subprocess.Popen(
        netns.exec_argv(dst.netns, [sys.executable, "-c", TCP_SERVER, "5201"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready", server.stderr
        client = subprocess.run(
            netns.exec_argv(
                src.netns, [sys.executable, "-c", TCP_CLIENT, dst.ip, "5201", str(size)]
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert client.returncode == 0, client.stderr
        received, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=5)
    assert received.split() == client.stdout.split() and client.stdout.split()[0] == str(size)


TCP_SERVER = """
import hashlib, socket, sys
s = socket.socket()
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(1)
s.settimeout(30)
print("ready", flush=True)
c, _ = s.accept()
c.settimeout(30)
h, n = hashlib.sha256(), 0
while b := c.recv(1 << 16):
    h.update(b)
    n += len(b)
print(n, h.hexdigest(), flush=True)
"""

TCP_CLIENT = """
import hashlib, random, socket, sys
data = random.Random(7).randbytes(int(sys.argv[3]))
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
c.sendall(data)
c.shutdown(socket.SHUT_WR)
c.recv(1)
print(len(data), hashlib.sha256(data).hexdigest())
"""


def _link(ns: str, dev: str) -> dict[str, Any]:
    return _ip_json(ns, "link", "show", "dev", dev)[0]


def test_pod_reaches_the_external_host_with_the_node_address(xsub: Lab, tmp_path: Path) -> None:
    from scapy.layers.inet import ICMP, IP

    pod, node = xsub.pod(1), xsub.node(1)
    ext = xsub.state.external_netns
    with Capture(ext, tmp_path / "nat.pcap", "icmp", count=4) as cap:
        answered = xsub.ping(pod.netns, str(EXTERNAL_HOST), count=2)
    requests = [p[IP].src for p in cap.packets() if p.haslayer(ICMP) and p[ICMP].type == 8]
    assert requests, "no echo request reached the external host"
    assert set(requests) == {xsub.address(node)}, f"sources seen by the external host: {requests}"
    assert answered


# ----------------------------------------------------------------------------------- drift


def _drifts(lab: Lab, ns: str, before: Snapshot) -> list[tuple[str, list[str], float]]:
    """(what, `ip`/`bridge` argv deleting or changing it, time bound) for one object of each
    kind that node `ns` holds for node3, and for our own tunnel address."""
    node3 = lab.address(lab.node(3))
    mac = next(m for m, d in before.fdb if d == node3)
    tunnel = next(ip for ip, m in before.neighbours if m == mac)
    block = next(dst for _t, dst, gw, _d in before.routes if gw == tunnel)
    nh_id = next(
        str(n["id"])
        for n in _ip_json(ns, "nexthop", "show")
        if n.get("gateway") == tunnel and n.get("dev") == VXLAN_DEV
    )
    change_neighbour = ["ip", "-n", ns, "neigh", "replace", tunnel, "lladdr", OTHER_MAC,
                        "dev", VXLAN_DEV, "nud", "permanent"]  # fmt: skip
    change_fdb = ["bridge", "-n", ns, "fdb", "replace", mac, "dev", VXLAN_DEV,
                  "dst", "192.0.2.99", "permanent", "self"]  # fmt: skip
    # Another writer using our own route protocol number: only the content tells.
    change_nexthop = ["ip", "-n", ns, "nexthop", "replace", "id", nh_id, "via", "10.244.99.99",
                      "dev", VXLAN_DEV, "onlink", "proto", OUR_PROTO]  # fmt: skip
    change_route = ["ip", "-n", ns, "route", "replace", block, "via", node3, "dev", "eth0",
                    "onlink", "proto", OUR_PROTO]  # fmt: skip
    addrs = _ip_json(ns, "-4", "addr", "show", "dev", VXLAN_DEV)
    (ours,) = [a for x in addrs for a in x.get("addr_info", []) if "local" in a]
    return [
        ("route", ["ip", "-n", ns, "route", "del", block], REPAIR_BOUND_S),
        ("neighbour", ["ip", "-n", ns, "neigh", "del", tunnel, "dev", VXLAN_DEV], REPAIR_BOUND_S),
        (
            "fdb",
            ["bridge", "-n", ns, "fdb", "del", mac, "dev", VXLAN_DEV, "dst", node3],
            REPAIR_BOUND_S,
        ),
        ("nexthop", ["ip", "-n", ns, "nexthop", "del", "id", nh_id], REPAIR_BOUND_S),
        ("neighbour changed", change_neighbour, REPAIR_BOUND_S),
        ("fdb changed", change_fdb, REPAIR_BOUND_S),
        ("nexthop changed", change_nexthop, REPAIR_BOUND_S),
        ("route changed", change_route, REPAIR_BOUND_S),
        (
            "tunnel address",
            ["ip", "-n", ns, "addr", "del", f"{ours['local']}/32", "dev", VXLAN_DEV],
            REPAIR_BOUND_S,
        ),
        ("device", ["ip", "-n", ns, "link", "del", VXLAN_DEV], DEVICE_REPAIR_BOUND_S),
    ]


def _ip_json(ns: str, *args: str) -> list[dict[str, Any]]:
    return json.loads(netns.run(["ip", "-n", ns, "-j", *args]))  # type: ignore[no-any-return]


def test_drift_is_repaired_within_a_second(xsub: Lab) -> None:
    node = xsub.node(1)
    ns = node.netns
    before = snapshot(ns)
    assert before.device and before.routes and before.nexthops and before.neighbours
    times: dict[str, float] = {}
    late: list[str] = []
    for what, argv, bound in _drifts(xsub, ns, before):
        offset = xsub.log_size(node)
        deleted_at = time.time()  # before the delete: an upper bound on the repair time
        netns.run(argv)
        restored, waited = poll(lambda: snapshot(ns) == before, timeout=bound + 5)
        if not restored:
            late.append(f"{what}: not restored after {waited:.1f}s: {snapshot(ns)}")
            continue
        # Precise time: the agent's last kernel change of the repair (its log has ms
        # timestamps); polling `ip` on a loaded 2-core machine adds noise of its own.
        changes = xsub.kernel_changes(node, offset)
        took = max(changes) - deleted_at if changes else waited
        times[what] = took
        if took > bound:
            late.append(f"{what}: restored in {took:.3f}s (bound {bound}s)")
    print("\ndrift repair times: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in times.items()))
    assert late == [], late
    # The restored dataplane carries traffic again.
    dst = xsub.pod(3).ip
    assert dst and xsub.ping(xsub.pod(1).netns, dst, count=2)


# ------------------------------------------------------------------ membership changes


def test_removed_node_disappears_from_every_peer_kernel() -> None:
    with running_lab(nodes=3, subnets=2, pods_per_node=0) as lab:
        victim = lab.node(3)
        address = lab.address(victim)
        peers = [lab.node(1), lab.node(2)]
        marks: list[str] = [address]
        for peer in peers:
            snap = snapshot(peer.netns)
            mac = next(m for m, d in snap.fdb if d == address)
            tunnel = next(ip for ip, m in snap.neighbours if m == mac)
            marks += [mac, tunnel]
            assert snap.mentions(tunnel), f"{peer.name} has no route/nexthop to {victim.name}"
        blocks = {dst for dst in _blackholes(victim.netns)}
        assert blocks

        lab.stop_agent(victim)  # else it would register itself again
        lab.overlayctl("delete", "node", victim.name)

        def clean() -> bool:
            return all(not _stale(snapshot(p.netns), marks, blocks) for p in peers)

        gone, took = poll(clean, timeout=10.0, interval=0.05)
        print(f"\nnode removal reached both peers in {took * 1000:.0f} ms")
        assert gone, {p.name: _stale(snapshot(p.netns), marks, blocks) for p in peers}


def _blackholes(ns: str) -> set[str]:
    return {
        r["dst"]
        for r in _ip_json(ns, "route", "show", "proto", "80")
        if r.get("type") == "blackhole"
    }


def _stale(snap: Snapshot, marks: list[str], blocks: set[str]) -> list[str]:
    found = [e for m in set(marks) for e in snap.mentions(m)]
    return found + [f"route to {r[1]}" for r in snap.routes if r[1] in blocks]


def test_node_address_change_reaches_every_peer_with_no_stale_entry() -> None:
    with running_lab(nodes=3, subnets=2, pods_per_node=0) as lab:
        mover, direct_peer, vxlan_peer = lab.node(2), lab.node(1), lab.node(3)
        old, new = lab.address(mover), "192.168.1.52"
        mac = next(m for m, d in snapshot(vxlan_peer.netns).fdb if d == old)
        block = next(iter(_blackholes(mover.netns)))

        argv = lab.stop_agent(mover)
        netns.batch(mover.netns, [
            f"addr del {old}/24 dev eth0",
            f"addr add {new}/24 dev eth0",
            "route replace default via 192.168.1.1",
        ])  # fmt: skip
        mover.underlay_ip = f"{new}/24"
        lab.start_agent(mover, argv)
        lab.wait_agent(mover, peers=2)

        def updated() -> bool:
            d, v = snapshot(direct_peer.netns), snapshot(vxlan_peer.netns)
            return (
                not d.mentions(old)
                and not v.mentions(old)
                and (mac, new) in d.fdb
                and (mac, new) in v.fdb
                and (new, "eth0") in d.nexthops
                and ("unicast", block, new, "eth0") in d.routes
            )

        ok, took = poll(updated, timeout=10.0, interval=0.05)
        print(f"\naddress change reached both peers in {took * 1000:.0f} ms")
        d, v = snapshot(direct_peer.netns), snapshot(vxlan_peer.netns)
        assert ok, f"{direct_peer.name}: {d}\n{vxlan_peer.name}: {v}"
        own = snapshot(mover.netns).device
        assert own is not None and own[2] == new, f"vxlan.calico of {mover.name}: {own}"
        # Both paths reach the moved node: direct from its subnet, VXLAN from the other.
        tunnel = next(ip for ip, m in v.neighbours if m == mac)
        assert lab.ping(direct_peer.netns, tunnel, count=2)
        assert lab.ping(vxlan_peer.netns, tunnel, count=2)


# ------------------------------------------------------------------------- agent restart


AFTER_RESTART_S = 1.0  # traffic that must keep flowing once the new agent has synced


def test_agent_restart_under_ping_loses_nothing_and_changes_nothing(
    xsub: Lab, tmp_path: Path
) -> None:
    node, src, dst = xsub.node(1), xsub.pod(1), xsub.pod(3)
    assert dst.ip
    before = snapshot(node.netns)
    out_path = tmp_path / "ping.out"
    with open(out_path, "w") as out:
        ping = subprocess.Popen(
            netns.exec_argv(src.netns, ["ping", "-n", "-i", "0.05", "-W", "1", dst.ip]),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        argv = xsub.stop_agent(node)
        offset = xsub.log_size(node)
        xsub.start_agent(node, argv)
        xsub.wait_agent(node, peers=3)
        time.sleep(AFTER_RESTART_S)  # a duration of traffic, not a condition to wait for
    finally:
        ping.send_signal(signal.SIGINT)
        ping.wait(timeout=10)
    text = out_path.read_text()
    m = re.search(r"(\d+) packets transmitted", text)
    assert m and int(m[1]) >= 20, text[-500:]
    sent = int(m[1])
    answered = {int(seq) for seq in re.findall(r"bytes from .* icmp_seq=(\d+)", text)}
    # SIGINT may cut off the reply to the very last request; every other one must be there.
    lost = sorted(set(range(1, sent)) - answered)
    print(f"\nping during the agent restart: {sent} sent, {len(answered)} answered")
    assert lost == [], f"requests lost during the restart: {lost}"

    changes = [
        line for line in xsub.log_since(node, offset).splitlines() if KERNEL_CHANGE.search(line)
    ]
    assert changes == [], "the restarted agent changed the kernel"
    rec = xsub.status(node)["reconciler"]
    assert rec["ops_applied"] == 0 and rec["passes"] >= 1, rec
    assert snapshot(node.netns) == before
