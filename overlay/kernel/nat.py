"""NAT-outgoing with nftables: one table `ip overlay-nat`, replaced atomically via `nft -f -`.

Traffic from a natOutgoing pool to a destination outside every pool is masqueraded, or
source-NATed to the natOutgoingAddress when one is set; pod to pod traffic (destination
inside any pool) never is. IPv4 only, like the table family.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import netaddr

from overlay.kernel import nft
from overlay.model import NatOutgoing

log = logging.getLogger("overlay.kernel")

FAMILY = "ip"
TABLE = "overlay-nat"


def _v4(nets: Iterable[netaddr.IPNetwork]) -> list[netaddr.IPNetwork]:
    # Interval sets reject overlapping elements: merge first.
    return netaddr.cidr_merge([n for n in nets if n.version == 4])


def _elements(nets: list[netaddr.IPNetwork]) -> str:
    return f"elements = {{ {', '.join(str(n.cidr) for n in nets)} }}" if nets else ""


def render(nat: NatOutgoing | None) -> str:
    """The nft script that replaces our table (and only deletes it when `nat` is None)."""
    # "add" then "delete" makes the delete succeed whether or not the table existed; the whole
    # script is one transaction, so the rules never disappear in between.
    head = f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"
    if nat is None:
        return head
    sources, pools = _v4(nat.sources), _v4(nat.all_pools | nat.sources)
    if not sources:
        return head
    action = "masquerade" if nat.address is None else f"snat to {nat.address}"
    return head + (
        f"table {FAMILY} {TABLE} {{\n"
        f"  set pools {{ type ipv4_addr; flags interval; {_elements(pools)} }}\n"
        f"  set sources {{ type ipv4_addr; flags interval; {_elements(sources)} }}\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f"    ip saddr @sources ip daddr != @pools {action}\n"
        "  }\n"
        "}\n"
    )


def apply_nat(nat: NatOutgoing | None, netns: str | None = None) -> None:
    nft.write(render(nat), netns)
    if nat is None or not _v4(nat.sources):
        log.info("event=nat_deleted table=%s", TABLE)
    else:
        log.info(
            "event=nat_set table=%s sources=%s pools=%s to=%s",
            TABLE,
            ",".join(map(str, _v4(nat.sources))),
            ",".join(map(str, _v4(nat.all_pools | nat.sources))),
            nat.address or "masquerade",
        )


def read_nat(netns: str | None = None) -> NatOutgoing | None:
    """Our NAT-outgoing state, or None when the table is absent."""
    items = nft.listing(["table", FAMILY, TABLE], netns)
    if items is None:
        return None
    sets = {
        s["name"]: nft.set_networks(s)
        for item in items
        if (s := item.get("set")) and s.get("table") == TABLE
    }
    rule = _rule_action(items)
    if "sources" not in sets or rule is None:
        return None  # half a table is no table: apply writes it whole again
    return NatOutgoing(
        sources=sets["sources"], all_pools=sets.get("pools", frozenset()), address=rule[1]
    )


def _rule_action(items: list[dict[str, Any]]) -> tuple[str, netaddr.IPAddress | None] | None:
    """What our rule does: ("masquerade", None) or ("snat", address); None: no such rule."""
    for item in items:
        rule = item.get("rule")
        if not rule or rule.get("table") != TABLE:
            continue
        for expr in rule.get("expr", ()):
            if not isinstance(expr, dict):
                continue
            if "masquerade" in expr:
                return "masquerade", None
            snat = expr.get("snat")
            if isinstance(snat, dict) and "addr" in snat:
                return "snat", netaddr.IPAddress(snat["addr"])
    return None
