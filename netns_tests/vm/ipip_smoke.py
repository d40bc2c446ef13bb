"""IP-in-IP smoke test: two 'nodes' (network namespaces) tunnel pod traffic over tunl0.

Meant to run inside the micro-VM (the host kernel has no ipip); on a kernel without ipip it
reports a skip. Everything happens in namespaces this script creates and removes.

    node A (netns)                               node B (netns)
    pod address 10.244.1.1/32 on tunl0           pod address 10.244.2.1/32 on tunl0
    underlay veth 10.99.0.1/24  <----veth---->   underlay veth 10.99.0.2/24
    10.244.2.0/26 via 10.99.0.2 dev tunl0 onlink 10.244.1.0/26 via 10.99.0.1 dev tunl0 onlink

A ping from pod address to pod address must succeed, and a packet socket on A's underlay
veth must see IP protocol 4 frames in both directions whose inner packets are the ICMP
between the pod addresses.

Run as a script (exit 0 ok, 1 failed, 77 skipped) or collect it with pytest by path.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

EXIT_SKIP = 77
OK_LINE = "IPIP-SMOKE OK"

UNDERLAY_A, UNDERLAY_B = "10.99.0.1", "10.99.0.2"
POD_A, POD_B = "10.244.1.1", "10.244.2.1"
BLOCK_A, BLOCK_B = "10.244.1.0/26", "10.244.2.0/26"
PINGS = 3

_CLONE_NEWNET = 0x40000000
_ETH_P_ALL = 0x0003
_PACKET_OUTGOING = 4
_IPPROTO_IPIP = 4
_IPPROTO_ICMP = 1


class Skip(Exception):
    """The kernel cannot do what the test needs (no ipip)."""


def sh(
    *argv: str, stdin: str | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    """Run a command; raise with its stderr if it fails."""
    proc = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)!r} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


@contextlib.contextmanager
def namespaces(*names: str) -> Iterator[None]:
    """Create the named network namespaces; always delete them again."""
    made: list[str] = []
    try:
        for name in names:
            sh("ip", "netns", "add", name)
            made.append(name)
        yield
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def packet_socket_in(netns: str, ifname: str) -> socket.socket:
    """A non-blocking AF_PACKET socket bound to ifname inside netns.

    Sockets keep the namespace they were created in, so this thread enters netns only
    long enough to create the socket and then returns to its own namespace.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
            sock.bind((ifname, 0))
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)
    sock.setblocking(False)
    return sock


@dataclass(frozen=True)
class Frame:
    """One IPv4 frame on an underlay, decoded (the inner fields only for IP-in-IP)."""

    outgoing: bool
    proto: int
    src: str
    dst: str
    inner_src: str = ""
    inner_dst: str = ""
    inner_proto: int = 0


def parse_frame(data: bytes, pkttype: int) -> Frame | None:
    """An Ethernet/IPv4 frame decoded, with its inner header if it is IP-in-IP; else None."""
    if len(data) < 34 or struct.unpack_from("!H", data, 12)[0] != 0x0800:
        return None
    outer = data[14:]
    addr = ipaddress.IPv4Address
    frame = Frame(pkttype == _PACKET_OUTGOING, outer[9], str(addr(outer[12:16])),
                  str(addr(outer[16:20])))  # fmt: skip
    if frame.proto != _IPPROTO_IPIP:
        return frame
    inner = outer[(outer[0] & 0x0F) * 4 :]
    if len(inner) < 20 or inner[0] >> 4 != 4:
        return frame
    return Frame(frame.outgoing, frame.proto, frame.src, frame.dst,
                 str(addr(inner[12:16])), str(addr(inner[16:20])), inner[9])  # fmt: skip


def drain(sock: socket.socket, limit: int = 5000) -> list[Frame]:
    """Every IPv4 frame already queued on sock (at most limit frames are read)."""
    frames = []
    for _ in range(limit):
        try:
            data, address = sock.recvfrom(65535)
        except BlockingIOError:
            break
        frame = parse_frame(data, address[2])
        if frame is not None:
            frames.append(frame)
    return frames


def _node(ns: str, underlay: str, pod: str, peer_underlay: str, peer_block: str) -> None:
    # Loading ipip gives every namespace a fallback tunl0 (as Calico expects); create it
    # where a kernel was configured not to.
    if subprocess.run(["ip", "-n", ns, "link", "show", "tunl0"], capture_output=True).returncode:
        try:
            sh("ip", "-n", ns, "link", "add", "tunl0", "type", "ipip")
        except RuntimeError as exc:
            raise Skip(f"this kernel cannot create an ipip device: {exc}") from exc
    # One ip process per node: every exec costs a lot under emulation.
    sh(
        "ip", "-n", ns, "-batch", "-",
        stdin=f"""\
link set lo up
addr add {underlay}/24 dev ul
link set ul up
addr add {pod}/32 dev tunl0
link set tunl0 up
route add {peer_block} via {peer_underlay} dev tunl0 onlink
""",
    )  # fmt: skip


def run_smoke() -> list[Frame]:
    """Build the two nodes, ping pod to pod over tunl0, return the frames seen on A's veth."""
    token = uuid.uuid4().hex[:8]
    ns_a, ns_b = f"ovipip-{token}-a", f"ovipip-{token}-b"
    with namespaces(ns_a, ns_b):
        sh(
            "ip",
            "-n",
            ns_a,
            "link",
            "add",
            "ul",
            "type",
            "veth",
            "peer",
            "name",
            "ul",
            "netns",
            ns_b,
        )
        _node(ns_a, UNDERLAY_A, POD_A, UNDERLAY_B, BLOCK_B)
        _node(ns_b, UNDERLAY_B, POD_B, UNDERLAY_A, BLOCK_A)
        with contextlib.closing(packet_socket_in(ns_a, "ul")) as sock:
            ping = subprocess.run(
                ["ip", "netns", "exec", ns_a, "ping", "-n", "-c", str(PINGS), "-i", "0.2",
                 "-W", "3", "-I", POD_A, POD_B],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            if ping.returncode != 0:
                raise AssertionError(f"ping {POD_A} -> {POD_B} over tunl0 failed:\n{ping.stdout}")
            return drain(sock)


def check_frames(frames: list[Frame]) -> str:
    """A summary if both directions were tunnelled between the right addresses, else raise."""
    request = Frame(True, _IPPROTO_IPIP, UNDERLAY_A, UNDERLAY_B, POD_A, POD_B, _IPPROTO_ICMP)
    reply = Frame(False, _IPPROTO_IPIP, UNDERLAY_B, UNDERLAY_A, POD_B, POD_A, _IPPROTO_ICMP)
    sent, received = frames.count(request), frames.count(reply)
    summary = f"ipip frames on underlay: {sent} out {UNDERLAY_A}->{UNDERLAY_B}, {received} in"
    if sent < PINGS or received < PINGS:
        raise AssertionError(f"expected >= {PINGS} each way; {summary}; all: {frames}")
    return summary


def test_ipip_ping_over_tunl0() -> None:
    """Pod-to-pod ping between two namespaces crosses the underlay as IP protocol 4."""
    import pytest

    try:
        frames = run_smoke()
    except Skip as exc:
        pytest.skip(str(exc))
    check_frames(frames)


def main() -> int:
    try:
        summary = check_frames(run_smoke())
    except Skip as exc:
        print(f"IPIP-SMOKE SKIP: {exc}")
        return EXIT_SKIP
    except (AssertionError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"IPIP-SMOKE FAILED: {exc}")
        return 1
    print(summary)
    print(OK_LINE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
