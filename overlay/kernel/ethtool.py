"""TX checksum offload of a device, through the legacy ethtool ioctl (`ethtool -k/-K ... tx`).

Calico turns TX checksum offload off on its tunnel devices on kernels up to 5.7: there, SNAT
that rewrites source ports (MASQUERADE --random-fully) together with offload on the tunnel
device produced bad checksums, and TCP over VXLAN stalled for ~63 s while ping worked
(projectcalico/calico#3145). `checksum_offload_broken()` is that rule, pure; the rest is I/O.
"""

from __future__ import annotations

import array
import fcntl
import re
import socket
import struct

from overlay.kernel.batch import in_netns

SIOCETHTOOL = 0x8946
ETHTOOL_GTXCSUM = 0x16
ETHTOOL_STXCSUM = 0x17
IFNAMSIZ = 16
_IFREQ = struct.Struct(f"{IFNAMSIZ}sP")  # ifr_name, then ifr_data (a pointer) in the union
_IFREQ_SIZE = 40  # sizeof(struct ifreq) on 64-bit Linux: the union is 24 bytes

BROKEN_UP_TO = (5, 7, 0)  # Calico's ChecksumOffloadBroken: kernel release <= 5.7.0
OVERRIDES = ("auto", "true", "false")


def kernel_version(release: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a kernel release string such as '5.4.0-150-generic'."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if m is None:
        raise ValueError(f"kernel release: cannot parse {release!r}")
    return int(m[1]), int(m[2]), int(m[3] or 0)


def checksum_offload_broken(release: str, override: str = "auto") -> bool:
    """Whether our tunnel devices must run with TX checksum offload off. `override` is
    "auto" (decide by the kernel release), "true" or "false" (force it either way)."""
    if override not in OVERRIDES:
        raise ValueError(
            f"checksum_offload_broken: {override!r} is not one of {', '.join(OVERRIDES)}"
        )
    if override != "auto":
        return override == "true"
    return kernel_version(release) <= BROKEN_UP_TO


class Ethtool:
    """An ioctl socket in one network namespace (None: the current one)."""

    def __init__(self, netns: str | None = None) -> None:
        self._sock = in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))

    def close(self) -> None:
        self._sock.close()

    def _call(self, ifname: str, cmd: int, data: int = 0) -> int:
        name = ifname.encode()
        if not name or len(name) >= IFNAMSIZ:
            raise ValueError(f"ifname: {ifname!r} is not a valid interface name")
        value = array.array("I", [cmd, data])  # struct ethtool_value {u32 cmd; u32 data}
        ifreq = _IFREQ.pack(name, value.buffer_info()[0]).ljust(_IFREQ_SIZE, b"\0")
        fcntl.ioctl(self._sock.fileno(), SIOCETHTOOL, ifreq)
        return value[1]

    def tx_checksum(self, ifname: str) -> bool:
        """Whether TX checksum offload is on. OSError(ENODEV) if there is no such device."""
        return bool(self._call(ifname, ETHTOOL_GTXCSUM))

    def set_tx_checksum(self, ifname: str, on: bool) -> None:
        self._call(ifname, ETHTOOL_STXCSUM, int(on))
