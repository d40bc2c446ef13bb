"""The agent side of the CNI plugins: the IPAM library as cni.handlers expects it."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any

import netaddr

from cni.spec import INVALID_CONFIG, CniError
from ipam.allocator import IPAM, Utilization
from ipam.model import USE_WORKLOAD, IPPool
from ipam.store import ResourceStore


class CniIpam:
    """Adapts ipam.allocator.IPAM to cni.handlers.Ipam/GcIpam (plain tuples, str addresses).

    `store` resolves pool names in a config's ipam.ipv4Pools/ipv6Pools (as Calico allows
    names or CIDRs there); without it only CIDRs are accepted.

    Writes are serialised inside the agent: concurrent ADDs and DELs of one node hit the
    same affine block, and letting them race would turn most compare-and-swap writes into
    retries (each a re-read and re-decode). Other processes are still handled by the CAS."""

    def __init__(self, ipam: IPAM, store: ResourceStore | None = None) -> None:
        self._ipam = ipam
        self._store = store
        self._lock = threading.Lock()

    def _pool_cidr(self, entry: str) -> netaddr.IPNetwork:
        if "/" in entry:
            try:
                return netaddr.IPNetwork(entry)
            except (netaddr.AddrFormatError, ValueError) as e:
                msg = f"ipam pool {entry!r} is not a valid CIDR: {e}"
                raise CniError(INVALID_CONFIG, msg) from None
        pool = self._store.get_pool(entry) if self._store is not None else None
        if pool is None:
            raise CniError(
                INVALID_CONFIG,
                f"ipam pool {entry!r} is neither a CIDR nor the name of an IP pool",
                "list the pools with `overlayctl get ippools`",
            )
        return pool.cidr

    def auto_assign(
        self,
        handle: str,
        node: str,
        num4: int,
        num6: int,
        attrs: dict[str, str],
        pools: Sequence[str] | None = None,
    ) -> tuple[Sequence[Any], Sequence[Any]]:
        wanted = [self._pool_cidr(p) for p in pools] if pools else None
        with self._lock:
            result = self._ipam.auto_assign(
                handle, node, num4=num4, num6=num6, attrs=attrs, pools=wanted
            )
        # With the block's prefix: a delegating plugin (ptp) needs a subnet, not a /32.
        return [str(n) for n in result.ipv4], [str(n) for n in result.ipv6]

    def assign_ip(self, ip: str, handle: str, node: str, attrs: dict[str, str]) -> None:
        with self._lock:
            self._ipam.assign_ip(ip, handle, node, attrs)

    def release_by_handle(self, handle: str) -> None:
        with self._lock:
            self._ipam.release_by_handle(handle)

    def handles_for_node(self, node: str) -> Iterable[str]:
        """Handles holding addresses recorded for `node` (GC walks them; it is rare)."""
        return sorted(self.allocations_for_node(node))

    def allocations_for_node(self, node: str) -> dict[str, dict[str, str]]:
        """handle -> the attributes its ADD recorded, for allocations of `node`."""
        found: dict[str, dict[str, str]] = {}
        for block in self._ipam.snapshot().blocks.values():
            for index in block.allocations:
                if index is None:
                    continue
                attr = block.attributes[index]
                if attr.handle_id and attr.secondary.get("node") == node:
                    found[attr.handle_id] = dict(attr.secondary)
        return found


def exhaustion(usage: Utilization, pools: Iterable[IPPool], labels: dict[str, str]) -> str | None:
    """Why this node can get no IPv4 pod address at all (None when it can): every enabled
    IPv4 pool for pods (Automatic, allowing Workload use) that selects the node has no
    assignable address left. Pure."""
    from ipam.selector import parse_selector

    mine = {
        p.name
        for p in pools
        if p.version == 4
        and p.automatic_for(USE_WORKLOAD)
        and parse_selector(p.node_selector).matches(labels)
    }
    if not mine:
        return "no enabled IPv4 pool for pods selects this node"
    usable = [u for u in usage.pools if u.name in mine]
    if any(u.free > 0 for u in usable):
        return None
    return "IPv4 pools exhausted: " + ", ".join(f"{u.name} ({u.cidr})" for u in usable)
