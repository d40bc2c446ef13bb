"""The tunnel ingress filter with nftables: one table `ip overlay-filter`.

What Calico's static INPUT rules do for VXLAN and IP-in-IP, in one table of our own:
- VXLAN (UDP to the VXLAN port) and IP-in-IP (IP protocol 4) addressed to this node are
  dropped unless they come from the address set `hosts`, the cluster nodes' underlay
  addresses, or from `external` (networks the operator admits): VXLAN and IP-in-IP carry
  no authentication, so anyone who can reach the port could otherwise put packets into
  our pods.
- Both are dropped when they come from a pod (an interface named cali*), to this node
  (input) or through it (forward): NAT-outgoing would send them on with this node's
  address, which every other node trusts.
The chains only ever drop, so another firewall's verdicts stand. Each rule carries a
comment naming it; the reader rebuilds the model from the sets and those comments, so a
deleted rule, set or table, or a rule that is not ours, reads back as different and the
table is written again. Changes of the address set alone are made element by element
(`add element` / `delete element`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import netaddr

from overlay.kernel import nft
from overlay.model import WORKLOAD_IFACE_PREFIX, TunnelFilter, TunnelHosts

log = logging.getLogger("overlay.kernel")

FAMILY = "ip"
TABLE = "overlay-filter"
IPPROTO_IPIP = 4


# Whom a tunnelled packet must come from: a node, or a network the operator admits.
_UNKNOWN = "ip saddr != @hosts ip saddr != @external"


def _rules(f: TunnelFilter) -> list[tuple[str, str, str]]:
    """(chain, match, comment) of every rule the filter needs."""
    pods = f'iifname "{WORKLOAD_IFACE_PREFIX}*"'
    out = []
    if f.vxlan_port is not None:
        vxlan = f"udp dport {f.vxlan_port}"
        out += [
            ("input", f"{pods} {vxlan}", f"vxlan {f.vxlan_port} from pods"),
            ("input", f"{vxlan} {_UNKNOWN}", f"vxlan {f.vxlan_port} from unknown hosts"),
            ("forward", f"{pods} {vxlan}", f"vxlan {f.vxlan_port} from pods"),
        ]
    if f.ipip:
        ipip = f"ip protocol {IPPROTO_IPIP}"
        out += [
            ("input", f"{pods} {ipip}", "ipip from pods"),
            ("input", f"{ipip} {_UNKNOWN}", "ipip from unknown hosts"),
            ("forward", f"{pods} {ipip}", "ipip from pods"),
        ]
    return out


def _elements(items: Iterable[netaddr.IPAddress | netaddr.IPNetwork]) -> str:
    return ", ".join(sorted(str(h) for h in items))


def render(f: TunnelFilter | None) -> str:
    """The nft script that replaces our table (and only deletes it when `f` is None)."""
    # "add" then "delete" makes the delete succeed whether or not the table existed; the
    # whole script is one transaction, so the rules never disappear in between.
    head = f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"
    if f is None:
        return head
    hosts = f" elements = {{ {_elements(f.hosts)} }};" if f.hosts else ""
    external = f" elements = {{ {_elements(f.external)} }};" if f.external else ""
    lines = [
        f"table {FAMILY} {TABLE} {{",
        f"  set hosts {{ type ipv4_addr;{hosts} }}",
        f"  set external {{ type ipv4_addr; flags interval;{external} }}",
    ]
    rules = _rules(f)
    for chain in ("input", "forward"):
        lines.append(f"  chain {chain} {{")
        lines.append(f"    type filter hook {chain} priority filter; policy accept;")
        lines += [
            f'    {match} counter drop comment "{c}"' for ch, match, c in rules if ch == chain
        ]
        lines.append("  }")
    lines.append("}")
    return head + "\n".join(lines) + "\n"


def render_hosts(change: TunnelHosts) -> str:
    """The nft script that adds and removes set elements in place."""
    script = ""
    if change.add:
        script += f"add element {FAMILY} {TABLE} hosts {{ {_elements(change.add)} }}\n"
    if change.remove:
        script += f"delete element {FAMILY} {TABLE} hosts {{ {_elements(change.remove)} }}\n"
    return script


def apply_filter(f: TunnelFilter | None, netns: str | None = None) -> None:
    nft.write(render(f), netns)
    if f is None:
        log.info("event=tunnel_filter_deleted table=%s", TABLE)
    else:
        log.info(
            "event=tunnel_filter_set table=%s vxlan_port=%s ipip=%s hosts=%d external=%s",
            TABLE, f.vxlan_port, f.ipip, len(f.hosts), _elements(f.external).replace(" ", ""),
        )  # fmt: skip


def apply_hosts(change: TunnelHosts, netns: str | None = None) -> None:
    script = render_hosts(change)
    if script:
        nft.write(script, netns)
    log.info(
        "event=tunnel_filter_hosts_set table=%s added=%s removed=%s",
        TABLE, _elements(change.add).replace(" ", ""), _elements(change.remove).replace(" ", ""),
    )  # fmt: skip


def read_drops(netns: str | None = None) -> dict[str, int]:
    """Packets our rules dropped so far, by why: {"unknown_hosts": n, "pods": m}. Reads the
    chains only (their counters), not the address set: cheap enough for each scrape."""
    drops = {"unknown_hosts": 0, "pods": 0}
    for chain in ("input", "forward"):
        # No table (no tunnel) or no such chain: nothing dropped by it.
        for item in nft.listing(["chain", FAMILY, TABLE, chain], netns) or []:
            rule = item.get("rule") or {}
            comment = rule.get("comment") or ""
            why = "pods" if comment.endswith("from pods") else "unknown_hosts"
            for expr in rule.get("expr", []):
                if isinstance(expr, dict) and "counter" in expr:
                    drops[why] += int(expr["counter"].get("packets", 0))
    return drops


def read_filter(netns: str | None = None) -> TunnelFilter | None:
    """Our filter as the kernel holds it, or None when the table is absent. A tunnel
    counts as filtered only when all three of its rules are there."""
    items = nft.listing(["table", FAMILY, TABLE], netns)
    if items is None:
        return None
    hosts: frozenset[netaddr.IPAddress] = frozenset()
    external: frozenset[netaddr.IPNetwork] = frozenset()
    found: set[tuple[object, object]] = set()  # (chain, comment) of every rule in the table
    ports: set[int] = set()
    for item in items:
        s = item.get("set")
        if s and s.get("table") == TABLE and s.get("name") == "hosts":
            hosts = frozenset(n.ip for n in nft.set_networks(s))
        if s and s.get("table") == TABLE and s.get("name") == "external":
            external = nft.set_networks(s)
        r = item.get("rule")
        if r and r.get("table") == TABLE:
            comment = r.get("comment")
            found.add((r.get("chain"), comment))
            words = comment.split() if isinstance(comment, str) else []
            if len(words) > 1 and words[0] == "vxlan" and words[1].isdigit():
                ports.add(int(words[1]))

    def rules(f: TunnelFilter) -> set[tuple[str, str]]:
        return {(chain, c) for chain, _, c in _rules(f)}

    port = next((p for p in sorted(ports) if rules(TunnelFilter(hosts, p, False)) <= found), None)
    ipip = rules(TunnelFilter(hosts, None, True)) <= found
    merged = frozenset(netaddr.cidr_merge(list(external)))
    ours = rules(TunnelFilter(hosts, None, True)).union(
        *(rules(TunnelFilter(hosts, p, False)) for p in ports)
    )
    if not found <= ours:
        # A rule that is not ours (an `accept` put in front of our drops would open the
        # tunnel to everyone): read as filtering nothing, so that it is written again.
        return TunnelFilter(hosts, None, False, merged)
    return TunnelFilter(hosts, port, ipip, merged)
