"""Running `nft` in a network namespace: the one way our nftables tables are written and read."""

from __future__ import annotations

import subprocess
from collections import deque

import netaddr

NFT_TIMEOUT_S = 10.0

# Pids of the nft processes we ran (`ip netns exec` execs nft in the same process): the
# reconciler tells our own nftables transactions from anyone else's by them.
_spawned: deque[int] = deque(maxlen=256)


def run(
    args: list[str], netns: str | None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    argv = [*prefix, "nft", *args]
    with subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        _spawned.append(proc.pid)
        try:
            out, err = proc.communicate(stdin, timeout=NFT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def own_pids() -> frozenset[int]:
    """The pids of the nft processes this process ran lately."""
    return frozenset(_spawned)


def missing_table(proc: subprocess.CompletedProcess[str]) -> bool:
    """Whether a failed `nft list table` failed because the table does not exist."""
    return proc.returncode != 0 and "No such file or directory" in proc.stderr


def parse_element(elem: object) -> list[netaddr.IPNetwork]:
    """The networks one element of `nft -j` set output stands for."""
    if isinstance(elem, str):
        return [netaddr.IPNetwork(elem)]
    if isinstance(elem, dict):
        if "prefix" in elem:
            p = elem["prefix"]
            return [netaddr.IPNetwork(f"{p['addr']}/{p['len']}")]
        if "range" in elem:
            lo, hi = elem["range"]
            return list(netaddr.IPRange(lo, hi).cidrs())
        if "elem" in elem:  # element with options (timeout, comment...)
            return parse_element(elem["elem"]["val"] if isinstance(elem["elem"], dict) else elem)
    raise ValueError(f"nft: unexpected set element {elem!r}")
