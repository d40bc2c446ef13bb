"""The tunnel ingress filter with nftables: one table per outer IP version, `ip
overlay-filter` (vxlan.calico, tunl0) and `ip6 overlay-filter` (vxlan-v6.calico).

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
The IPv6 table is the same but for the address family (IPv6 sets, `ip6 saddr`) and has no
IP-in-IP rules (IP-in-IP carries IPv4 only). Every function takes the IP version from the
filter, or from `version` when there is no filter (a deletion, a read).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import netaddr

from overlay.kernel import nft
from overlay.model import WORKLOAD_IFACE_PREFIX, TunnelFilter, TunnelHosts

log = logging.getLogger("overlay.kernel")

TABLE = "overlay-filter"
IPPROTO_IPIP = 4


def family(version: int) -> str:
    """The nftables family of our table for outer IP `version` (4: ip, 6: ip6)."""
    return _family_of(None, version).name


def kind(version: int) -> str:
    """The name the table goes by in GoneKeys and log events: tunnel_filter(6)."""
    return "tunnel_filter" if version == 4 else "tunnel_filter6"


def _family_of(f: TunnelFilter | TunnelHosts | None, version: int | None) -> nft.Family:
    """The family of `f`'s table, or of `version`'s when there is none (default 4)."""
    return nft.family_of(f.version if f is not None else None, version, "filter")


def _rules(f: TunnelFilter) -> list[tuple[str, str, str]]:
    """(chain, match, comment) of every rule the filter needs."""
    saddr = _family_of(f, None).saddr
    # Whom a tunnelled packet must come from: a node, or a network the operator admits.
    unknown = f"{saddr} != @hosts {saddr} != @external"
    pods = f'iifname "{WORKLOAD_IFACE_PREFIX}*"'
    out = []
    if f.vxlan_port is not None:
        # In the ip6 family nft puts the `meta l4proto udp` dependency in by itself.
        vxlan = f"udp dport {f.vxlan_port}"
        out += [
            ("input", f"{pods} {vxlan}", f"vxlan {f.vxlan_port} from pods"),
            ("input", f"{vxlan} {unknown}", f"vxlan {f.vxlan_port} from unknown hosts"),
            ("forward", f"{pods} {vxlan}", f"vxlan {f.vxlan_port} from pods"),
        ]
    if f.ipip:
        ipip = f"ip protocol {IPPROTO_IPIP}"
        out += [
            ("input", f"{pods} {ipip}", "ipip from pods"),
            ("input", f"{ipip} {unknown}", "ipip from unknown hosts"),
            ("forward", f"{pods} {ipip}", "ipip from pods"),
        ]
    return out


def _elements(items: Iterable[netaddr.IPAddress | netaddr.IPNetwork]) -> str:
    return ", ".join(sorted(str(h) for h in items))


def render(f: TunnelFilter | None, version: int | None = None) -> str:
    """The nft script that replaces our table of `f`'s IP version (and only deletes it when
    `f` is None: the table of `version` then, default 4)."""
    fam = _family_of(f, version)
    table = f"{fam.name} {TABLE}"
    # "add" then "delete" makes the delete succeed whether or not the table existed; the
    # whole script is one transaction, so the rules never disappear in between.
    head = f"table {table}\ndelete table {table}\n"
    if f is None:
        return head
    hosts = f" elements = {{ {_elements(f.hosts)} }};" if f.hosts else ""
    external = f" elements = {{ {_elements(f.external)} }};" if f.external else ""
    lines = [
        f"table {table} {{",
        f"  set hosts {{ type {fam.addr_type};{hosts} }}",
        f"  set external {{ type {fam.addr_type}; flags interval;{external} }}",
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
    table = f"{_family_of(change, None).name} {TABLE}"
    script = ""
    if change.add:
        script += f"add element {table} hosts {{ {_elements(change.add)} }}\n"
    if change.remove:
        script += f"delete element {table} hosts {{ {_elements(change.remove)} }}\n"
    return script


def apply_filter(
    f: TunnelFilter | None, netns: str | None = None, version: int | None = None
) -> None:
    """Write `f` (see render()); None deletes the table of `version` (default 4)."""
    nft.write(render(f, version), netns)
    if f is None:
        log.info("event=%s_deleted table=%s", kind(version or 4), TABLE)
    else:
        log.info(
            "event=%s_set table=%s vxlan_port=%s ipip=%s hosts=%d external=%s",
            kind(f.version), TABLE, f.vxlan_port, f.ipip, len(f.hosts),
            _elements(f.external).replace(" ", ""),
        )  # fmt: skip


def apply_hosts(change: TunnelHosts, netns: str | None = None) -> None:
    script = render_hosts(change)
    if script:
        nft.write(script, netns)
    log.info(
        "event=%s_hosts_set table=%s added=%s removed=%s",
        kind(change.version), TABLE,
        _elements(change.add).replace(" ", ""), _elements(change.remove).replace(" ", ""),
    )  # fmt: skip


def read_drops(netns: str | None = None, version: int = 4) -> dict[str, int]:
    """Packets the rules of our table for `version` dropped so far, by why:
    {"unknown_hosts": n, "pods": m}. Reads the chains only (their counters), not the
    address set: cheap enough for each scrape."""
    drops = {"unknown_hosts": 0, "pods": 0}
    for chain in ("input", "forward"):
        # No table (no tunnel) or no such chain: nothing dropped by it.
        for item in nft.listing(["chain", family(version), TABLE, chain], netns) or []:
            rule = item.get("rule") or {}
            comment = rule.get("comment") or ""
            why = "pods" if comment.endswith("from pods") else "unknown_hosts"
            for expr in rule.get("expr", []):
                if isinstance(expr, dict) and "counter" in expr:
                    drops[why] += int(expr["counter"].get("packets", 0))
    return drops


def read_filter(netns: str | None = None, version: int = 4) -> TunnelFilter | None:
    """Our filter for outer IP `version` as the kernel holds it, or None when the table is
    absent. A tunnel counts as filtered only when all three of its rules are there."""
    items = nft.listing(["table", family(version), TABLE], netns)
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

    def rules(port: int | None, ipip: bool = False) -> set[tuple[str, str]]:
        f = TunnelFilter(hosts, port, ipip, version=version)
        return {(chain, c) for chain, _, c in _rules(f)}

    ipip_rules = rules(None, ipip=True) if version == 4 else set()  # none in ip6
    port = next((p for p in sorted(ports) if rules(p) <= found), None)
    ipip = bool(ipip_rules) and ipip_rules <= found
    merged = frozenset(netaddr.cidr_merge(list(external)))
    if not found <= ipip_rules.union(*(rules(p) for p in ports)):
        # A rule that is not ours (an `accept` put in front of our drops would open the
        # tunnel to everyone): read as filtering nothing, so that it is written again.
        return TunnelFilter(hosts, None, False, merged, version)
    return TunnelFilter(hosts, port, ipip, merged, version)
