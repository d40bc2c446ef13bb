"""Running `nft` in a network namespace: the one way our nftables tables are written and read."""

from __future__ import annotations

import json
import subprocess
from collections import deque
from typing import Any, NamedTuple

import netaddr

NFT_TIMEOUT_S = 10.0


class Family(NamedTuple):
    """What of one of our tables depends on the IP version it handles."""

    name: str  # the nftables family: ip | ip6
    addr_type: str  # of its address sets

    @property
    def saddr(self) -> str:
        """The match on the source address (nft spells it with the family's name)."""
        return f"{self.name} saddr"

    @property
    def daddr(self) -> str:
        return f"{self.name} daddr"


_FAMILIES = {4: Family("ip", "ipv4_addr"), 6: Family("ip6", "ipv6_addr")}


def family_of(own: int | None, version: int | None, what: str) -> Family:
    """The family of a table whose object (`what`, for errors) has IP version `own` (None:
    no object, as when deleting the table), or else of `version` (default 4). Both given
    must agree: the script would otherwise write one version's object into the other's
    table."""
    v = own if own is not None else (version or 4)
    if version is not None and version != v:
        raise ValueError(f"version: {version} contradicts the {what}'s version {v}")
    if v not in _FAMILIES:
        raise ValueError(f"version: {v!r} is neither 4 nor 6")
    return _FAMILIES[v]


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


class NftError(Exception):
    """nft refused a script or a listing, or listed something we cannot read."""


def write(script: str, netns: str | None) -> None:
    """Run an nft script: one transaction, all or nothing."""
    proc = run(["-f", "-"], netns, script)
    if proc.returncode != 0:
        raise NftError(f"nft -f - failed (rc={proc.returncode}): {proc.stderr.strip()}")


def listing(args: list[str], netns: str | None) -> list[dict[str, Any]] | None:
    """The items of `nft -j list ARGS`; None when the table or chain does not exist."""
    proc = run(["-j", "list", *args], netns)
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr:
            return None
        raise NftError(f"nft list {' '.join(args)} failed (rc={proc.returncode}): "
                       f"{proc.stderr.strip()}")  # fmt: skip
    items: list[dict[str, Any]] = json.loads(proc.stdout).get("nftables", [])
    return items


def set_networks(item: dict[str, Any]) -> frozenset[netaddr.IPNetwork]:
    """The networks held by one listed set (its "elem" list)."""
    nets: list[netaddr.IPNetwork] = []
    for elem in item.get("elem", []):
        nets.extend(_element(elem))
    return frozenset(nets)


def _element(elem: object) -> list[netaddr.IPNetwork]:
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
            return _element(elem["elem"]["val"] if isinstance(elem["elem"], dict) else elem)
    raise NftError(f"nft: unexpected set element {elem!r}")
