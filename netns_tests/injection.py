"""Crafted tunnelled packets for the tunnel filter tests: a stranger namespace on a lab
subnet, VXLAN or IP-in-IP packets whose inner packet is an ICMP echo to a pod, and a watch
on the pod's interface for what gets through. Shared by test_tunnel_filter.py (VXLAN, host
kernel) and test_ipip.py (IP-in-IP, micro-VM)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator

import netaddr

from netns_tests.vm.ipip_smoke import drain
from overlay.kernel.tunnel_filter import read_filter
from overlay.lab import netns
from overlay.lab.lab import LabState, PodState
from overlay.model import VXLAN_PORT, VXLAN_VNI

IPPROTO_ICMP = 1
IPPROTO_IPIP = 4

_SEND = """\
import socket, sys, time
payload, dst, count, proto, port = bytes.fromhex(sys.argv[1]), sys.argv[2], *map(int, sys.argv[3:])
if proto == 4:  # the kernel puts the outer header (protocol 4) around the inner packet
    s, to = socket.socket(socket.AF_INET, socket.SOCK_RAW, 4), (dst, 0)
else:
    s, to = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), (dst, port)
for _ in range(count):
    s.sendto(payload, to)
    time.sleep(0.05)
"""


def ip_of(pod: PodState) -> str:
    assert pod.ip is not None, f"{pod.name} has no address"
    return pod.ip.split("/")[0]


def unused_address(pod: PodState) -> str:
    """An address in the pod's /26 block that no pod has: an inner source whose replies go
    nowhere (to the owner's blackhole), and that ordinary traffic never carries."""
    return str(netaddr.IPNetwork(ip_of(pod) + "/26").network + 50)


def echo(src: str, dst: str) -> bytes:
    """An inner IPv4 ICMP echo request."""
    from scapy.layers.inet import ICMP, IP

    return bytes(IP(src=src, dst=dst) / ICMP(id=0x4F56) / b"overlay-injected")


def vxlan(vtep_mac: str, inner_ip: bytes) -> bytes:
    """The UDP payload of a VXLAN packet (VNI 4096) carrying `inner_ip` to a VTEP."""
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN

    frame = Ether(dst=vtep_mac, src="66:00:00:00:00:99", type=0x0800) / inner_ip
    return bytes(VXLAN(vni=VXLAN_VNI, flags=0x08) / frame)


def send(ns: str, payload: bytes, dst: str, *, ipip: bool = False, count: int = 3) -> None:
    """Send `payload` from inside `ns` to `dst`: as UDP to the VXLAN port, or with ipip as
    the inner packet of an IP-in-IP packet."""
    proto = IPPROTO_IPIP if ipip else 17
    argv = ["python3", "-c", _SEND, payload.hex(), dst, str(count), str(proto), str(VXLAN_PORT)]
    netns.run(netns.exec_argv(ns, argv))


def arrived(sock: socket.socket, inner_src: str) -> bool:
    """Whether an echo from `inner_src` is among the frames queued on a pod's socket."""
    return any(f.src == inner_src and f.proto == IPPROTO_ICMP for f in drain(sock))


def filter_hosts(ns: str) -> set[str]:
    """The addresses a node's tunnel filter admits (empty when it has none)."""
    f = read_filter(ns)
    return {str(h) for h in f.hosts} if f is not None else set()


def node_manifest(name: str, address: str) -> dict[str, object]:
    return {
        "apiVersion": "projectcalico.org/v3",
        "kind": "Node",
        "metadata": {"name": name},
        "spec": {"bgp": {"ipv4Address": address}},
    }


@contextlib.contextmanager
def stranger(state: LabState, subnet: str, host: int = 99) -> Iterator[tuple[str, str]]:
    """A namespace on the lab subnet `subnet` that is no node: (netns, address). Its link is
    made from the router side, so the root namespace is never touched."""
    k = 1 + sorted({n.subnet for n in state.nodes}).index(subnet)
    prefix = subnet.rsplit(".", 1)[0]
    ns, port, addr = f"ovx{os.getpid() % 100000}", f"{state.name}-x", f"{prefix}.{host}"
    router = state.router_netns
    netns.add(ns)
    try:
        netns.run(["ip", "-n", router, "link", "add", port, "type", "veth", "peer", "name",
                   "eth0", "netns", ns])  # fmt: skip
        netns.batch(router, [f"link set {port} master br{k}", f"link set {port} up"])
        netns.batch(ns, ["link set lo up", f"addr add {addr}/24 dev eth0", "link set eth0 up",
                         f"route add default via {prefix}.1"])  # fmt: skip
        yield ns, addr
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
