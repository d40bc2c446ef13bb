"""NAT-outgoing with nftables: one table per IP version, `ip overlay-nat` and `ip6
overlay-nat`, each replaced atomically via `nft -f -`.

Traffic from a natOutgoing pool to a destination outside every pool is masqueraded, or
source-NATed to the natOutgoingAddress when one is set; pod to pod traffic (destination
inside any pool) never is. The IPv6 table is the same but for the address family (IPv6
sets, `ip6 saddr`/`ip6 daddr`); it always masquerades, as Calico's ip6tables rules do (its
natOutgoingAddress is IPv4). Every function takes the IP version from the NatOutgoing, or
from `version` when there is none (a deletion, a read).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import netaddr

from overlay.kernel import nft
from overlay.model import NatOutgoing

log = logging.getLogger("overlay.kernel")

TABLE = "overlay-nat"


def family(version: int) -> str:
    """The nftables family of our table for IP `version` (4: ip, 6: ip6)."""
    return nft.family_of(None, version, "NAT").name


def kind(version: int) -> str:
    """The name the table goes by in GoneKeys, log events and Dataplane: nat(6)."""
    return "nat" if version == 4 else "nat6"


def _elements(nets: Iterable[netaddr.IPNetwork]) -> str:
    # Sorted: the script (and so the log) is the same for the same sets.
    text = ", ".join(str(n.cidr) for n in sorted(nets))
    return f"elements = {{ {text} }}" if text else ""


def render(nat: NatOutgoing | None, version: int | None = None) -> str:
    """The nft script that replaces our table of `nat`'s IP version (and only deletes it
    when `nat` is None or has no source of that version: the table of `version` then,
    default 4)."""
    fam = nft.family_of(nat.version if nat is not None else None, version, "NAT")
    table = f"{fam.name} {TABLE}"
    # "add" then "delete" makes the delete succeed whether or not the table existed; the whole
    # script is one transaction, so the rules never disappear in between.
    head = f"table {table}\ndelete table {table}\n"
    # The kernel's form: interval sets reject overlapping elements, so merged CIDRs.
    want = nat.normalized() if nat is not None else None
    if want is None:
        return head
    action = "masquerade" if want.address is None else f"snat to {want.address}"
    return head + (
        f"table {table} {{\n"
        f"  set pools {{ type {fam.addr_type}; flags interval; {_elements(want.all_pools)} }}\n"
        f"  set sources {{ type {fam.addr_type}; flags interval; {_elements(want.sources)} }}\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f"    {fam.saddr} @sources {fam.daddr} != @pools {action}\n"
        "  }\n"
        "}\n"
    )


def apply_nat(
    nat: NatOutgoing | None, netns: str | None = None, version: int | None = None
) -> None:
    """Write `nat` (see render()); None deletes the table of `version` (default 4)."""
    nft.write(render(nat, version), netns)
    want = nat.normalized() if nat is not None else None
    if want is None:
        deleted = nat.version if nat is not None else version or 4
        log.info("event=%s_deleted table=%s", kind(deleted), TABLE)
    else:
        log.info(
            "event=%s_set table=%s sources=%s pools=%s to=%s",
            kind(want.version),
            TABLE,
            ",".join(map(str, sorted(want.sources))),
            ",".join(map(str, sorted(want.all_pools))),
            want.address or "masquerade",
        )


def read_nat(netns: str | None = None, version: int = 4) -> NatOutgoing | None:
    """Our NAT-outgoing state for IP `version`, or None when the table is absent."""
    items = nft.listing(["table", family(version), TABLE], netns)
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
        sources=sets["sources"],
        all_pools=sets.get("pools", frozenset()),
        address=rule[1],
        version=version,
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
