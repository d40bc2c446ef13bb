"""Running `nft` in a network namespace: the one way our nftables tables are written and read."""

from __future__ import annotations

import subprocess

import netaddr

NFT_TIMEOUT_S = 10.0


def run(
    args: list[str], netns: str | None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run(
        [*prefix, "nft", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=NFT_TIMEOUT_S,
        check=False,
    )


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
