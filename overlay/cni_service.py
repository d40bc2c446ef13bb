"""The agent side of the CNI plugins: the IPAM library as cni.handlers expects it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import netaddr

from ipam.allocator import IPAM


class CniIpam:
    """Adapts ipam.allocator.IPAM to cni.handlers.Ipam/GcIpam (plain tuples, str addresses)."""

    def __init__(self, ipam: IPAM) -> None:
        self._ipam = ipam

    def auto_assign(
        self,
        handle: str,
        node: str,
        num4: int,
        num6: int,
        attrs: dict[str, str],
        pools: Sequence[str] | None = None,
    ) -> tuple[Sequence[Any], Sequence[Any]]:
        wanted = [netaddr.IPNetwork(p) for p in pools] if pools else None
        result = self._ipam.auto_assign(
            handle, node, num4=num4, num6=num6, attrs=attrs, pools=wanted
        )
        # With the block's prefix: a delegating plugin (ptp) needs a subnet, not a /32.
        return [str(n) for n in result.ipv4], [str(n) for n in result.ipv6]

    def assign_ip(self, ip: str, handle: str, node: str, attrs: dict[str, str]) -> None:
        self._ipam.assign_ip(ip, handle, node, attrs)

    def release_by_handle(self, handle: str) -> None:
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
