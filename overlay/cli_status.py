"""`overlayctl status`: what the node agent on this host (or netns) is doing.

Reads the agent's JSON /status endpoint; run it inside the node's network namespace in a
lab (`ip netns exec lab-node1 overlayctl status`).
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
from typing import Any

from overlay.agent import DEFAULT_METRICS
from overlay.cli_context import CLIError, Context

EXIT_AGENT_DOWN = 3


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="show the node agent's state and the path to each peer")
    p.add_argument("--agent", default=DEFAULT_METRICS, metavar="HOST:PORT")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(func=run)


def fetch(address: str, timeout: float = 3.0) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{address}/status", timeout=timeout) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def _datastore_state(ds: dict[str, Any]) -> str:
    if ds["reachable"]:
        return f"reachable, revision {ds['revision']}"
    if ds["error"]:
        return f"UNREACHABLE: {ds['error']}, revision {ds['revision']}"
    return "not read yet (the agent is starting)"


def _setting(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(value) or "none"
    return str(value)


def render(st: dict[str, Any]) -> str:
    ds = st["datastore"]
    lines = [
        f"Node:        {st['node']}  (agent up, pid {st['pid']})",
        f"Datastore:   {ds['url']}  " + _datastore_state(ds),
        (
            f"Underlay:    {st['underlay']['address']} on {st['underlay']['interface']}"
            f" (MTU {st['underlay']['mtu']}; pod MTU {st['pod_mtu']})"
            if st["underlay"]["address"]
            else f"Underlay:    no IPv4 (an IPv6-only node; pod MTU {st['pod_mtu']})"
        ),
        "Routes:      "
        + (
            "nexthop objects + nhid routes"
            if st["nexthop_objects"]
            else "classic routes (this kernel lacks nexthop objects, before 5.3)"
        ),
    ]
    u6 = st.get("underlay6")
    if u6:
        lines.append(f"Underlay6:   {u6['address']} on {u6['interface']} (MTU {u6['mtu']})")
    tunnels = st.get("tunnel_addresses") or {}
    if tunnels:
        lines.append(
            "Tunnels:     " + ", ".join(f"{kind} {addr}" for kind, addr in tunnels.items())
        )
    for key, family in (("tunnel_filter", ""), ("tunnel_filter6", " over IPv6")):
        f = st.get(key)
        if f:
            extra = f" and {', '.join(f['external'])}" if f["external"] else ""
            lines.append(
                f"Filter:      {'/'.join(f['tunnels'])}{family} accepted only from "
                f"{f['node_addresses']} node addresses{extra}; never from pods"
            )
    given = {k: v for k, v in (st.get("settings") or {}).items() if v["source"] != "built-in"}
    lines.append(
        "Settings:    "
        + (
            "; ".join(f"{k} {_setting(v['value'])} ({v['source']})" for k, v in given.items())
            or "built-in defaults"
        )
    )
    if st.get("tx_checksum_offload") == "off":
        lines.append("Offload:     TX checksum offload off on the tunnel devices")
    if st.get("last_sync"):
        lines.append(f"Last sync:   {time.time() - st['last_sync']:.1f}s ago")
    else:
        lines.append("Last sync:   never (waiting for the datastore)")
    rec = st.get("reconciler") or {}
    if rec.get("last_error"):
        lines.append(f"Last error:  {rec['last_error']}")
    for w in st.get("warnings", []):
        lines.append(f"WARNING:     {w}")
    lines.append("")
    peers = st.get("peers", [])
    if not peers:
        lines.append("No peers.")
    else:
        width = max(len(p["node"]) for p in peers)
        lines.append(f"{'PEER':<{width}}  {'UNDERLAY':<15}  {'PATH':<6}  WHY")
        for p in peers:
            lines.append(
                f"{p['node']:<{width}}  {p['underlay'] or '-':<15}  {p['path'] or 'none':<6}"
                f"  {p['reason']}"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace, ctx: Context) -> int:
    try:
        st = fetch(args.agent)
    except (urllib.error.URLError, OSError) as exc:
        raise CLIError(
            f"no overlay-agent answers on {args.agent} ({exc}); is it running in this "
            "network namespace?"
        ) from exc
    if args.output == "json":
        print(json.dumps(st, indent=2), file=ctx.out)
    else:
        print(render(st), file=ctx.out)
    return 0
