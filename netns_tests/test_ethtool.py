"""overlay.kernel.ethtool against the real kernel, checked with the `ethtool` command."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from netns_tests.kernel_fixtures import ip, unique_name
from overlay.kernel.ethtool import Ethtool

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
    pytest.mark.skipif(shutil.which("ethtool") is None, reason="needs the ethtool command"),
]


@pytest.fixture
def vxlan_ns() -> Iterator[str]:
    ns = unique_name("eth")
    ip("netns", "add", ns)
    try:
        ip("-n", ns, "link", "add", "vx0", "type", "vxlan", "id", "42", "dstport", "4789",
           "local", "192.0.2.1", "nolearning")  # fmt: skip
        yield ns
    finally:
        ip("netns", "del", ns, check=False)


def _tx_checksumming(ns: str) -> str:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "ethtool", "-k", "vx0"],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout  # fmt: skip
    return next(line.split(":")[1].strip() for line in out.splitlines()
                if line.startswith("tx-checksumming:"))  # fmt: skip


def test_reads_and_turns_tx_checksum_offload_off_and_on(vxlan_ns: str) -> None:
    tool = Ethtool(vxlan_ns)
    try:
        assert tool.tx_checksum("vx0") is True  # a new vxlan device offloads
        assert _tx_checksumming(vxlan_ns) == "on"
        tool.set_tx_checksum("vx0", False)
        assert tool.tx_checksum("vx0") is False
        assert _tx_checksumming(vxlan_ns) == "off"
        tool.set_tx_checksum("vx0", True)
        assert _tx_checksumming(vxlan_ns) == "on"
    finally:
        tool.close()


def test_missing_device_is_enodev_and_a_bad_name_is_refused(vxlan_ns: str) -> None:
    tool = Ethtool(vxlan_ns)
    try:
        with pytest.raises(OSError) as exc:
            tool.tx_checksum("absent0")
        assert exc.value.errno == errno.ENODEV
        with pytest.raises(ValueError, match=r"ifname: 'x{16}' is not a valid interface name"):
            tool.tx_checksum("x" * 16)
    finally:
        tool.close()
