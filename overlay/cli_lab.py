"""overlayctl lab up | status | check | down: a whole cluster of network namespaces."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from overlay.cli_context import CLIError, Context


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    lab = sub.add_parser("lab", help="build, check and remove a namespace lab (needs root)")
    cmds = lab.add_subparsers(dest="lab_command", metavar="ACTION", required=True)

    def named(p: argparse.ArgumentParser) -> None:
        p.add_argument("--name", default="lab", help="lab name, 1-8 letters/digits/'-' (lab)")

    p = cmds.add_parser("up", help="create the namespaces, datastore, agents and pods")
    named(p)
    p.add_argument("--nodes", type=int, default=4, help="node namespaces (4)")
    p.add_argument("--subnets", type=int, default=2, help="underlay subnets (2)")
    p.add_argument("--encap", choices=("vxlan", "ipip"), default="vxlan")
    p.add_argument("--mode", choices=("always", "cross-subnet"), default="cross-subnet")
    p.add_argument("--pods-per-node", type=int, default=2, help="pods per node (2)")
    p.add_argument("--datastore", dest="lab_datastore", choices=("sqlite", "etcd"),
                   default="sqlite", help="sqlite file in the lab dir, or an etcd in the "
                   "router namespace (sqlite)")  # fmt: skip
    p.add_argument("--ipv6", action="store_true",
                   help="dual-stack pods: an IPv6 pool too (VXLAN, whatever --encap)")  # fmt: skip
    p.add_argument("--ipv6-underlay", action="store_true",
                   help="an IPv6 underlay too (fd00:192:168:K::/64), which IPv6 pods ride "
                   "(vxlan-v6.calico); implies --ipv6")  # fmt: skip
    p.add_argument("--ipv6-only", action="store_true",
                   help="IPv6-only nodes and pods: no IPv4 pool, agents with "
                   "--ip-autodetection none; implies --ipv6-underlay; vxlan only")  # fmt: skip
    p.set_defaults(func=cmd_up)

    p = cmds.add_parser("status", help="show the lab's nodes, pods and processes")
    named(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = cmds.add_parser("check", help="ping every pod pair and the external host")
    named(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for all pings (600)")
    p.set_defaults(func=cmd_check)

    p = cmds.add_parser("down", help="remove every namespace, process and file of the lab")
    named(p)
    p.set_defaults(func=cmd_down)


def _lab_errors() -> tuple[type[Exception], ...]:
    from overlay.lab.lab import LabError
    from overlay.lab.netns import NetnsError

    return (LabError, NetnsError)


def cmd_up(args: argparse.Namespace, ctx: Context) -> int:
    from overlay.lab import lab
    from overlay.lab.topology import LabOptions

    opts = LabOptions(
        name=args.name,
        nodes=args.nodes,
        subnets=args.subnets,
        encap=args.encap,
        mode=args.mode,
        pods_per_node=args.pods_per_node,
        datastore=args.lab_datastore,
        # What each flag implies, LabOptions works out (and so records in the lab's state).
        ipv6=args.ipv6,
        ipv6_underlay=args.ipv6_underlay,
        ipv6_only=args.ipv6_only,
    )
    opts.validate()  # TopologyError is a ValueError: one line, exit 1
    start = time.monotonic()
    try:
        state = lab.up(opts, log=lambda m: ctx.print(f"  {m}"))
    except _lab_errors() as e:
        detail = getattr(e, "detail", "")
        if detail:  # the error line is one line; the log tail goes before it
            print(detail, file=sys.stderr)
        raise CLIError(str(e)) from e
    ctx.print(
        f"lab {state.name} is up: {len(state.nodes)} nodes, {len(state.pods)} pods, "
        f"datastore {state.datastore} ({time.monotonic() - start:.1f}s)"
    )
    ctx.print(f"next: overlayctl lab check --name {state.name}")
    return 0


def cmd_status(args: argparse.Namespace, ctx: Context) -> int:
    from overlay.lab import lab

    try:
        doc = lab.status(args.name)
    except _lab_errors() as e:
        raise CLIError(str(e)) from e
    if args.json:
        ctx.print(json.dumps(doc, indent=2))
    else:
        ctx.print(render_status(doc))
    return 0


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]


# The pods' address keys in `lab status --json`, and their columns in the text.
POD_COLUMNS = {"ip": "IP", "ip6": "IPV6"}


def render_status(doc: dict[str, Any]) -> str:
    o = doc["options"]
    v6_only = bool(o.get("ipv6_only"))
    lines = [
        f"lab {doc['name']}{'' if doc['ready'] else ' (INCOMPLETE: run `lab down`)'}: "
        f"{o['encap']} {o['mode']}{', IPv6 only' if v6_only else ''}, "
        f"datastore {doc['datastore']}",
        f"router netns {doc['router_netns']}, external netns {doc['external_netns']} "
        f"({', '.join(doc[k] for k in ('external_ip', 'external_ip6') if k in doc)})",
    ]
    if doc.get("etcd"):
        e = doc["etcd"]
        lines.append(f"etcd pid {e['pid']} {'running' if e['alive'] else 'DEAD'}")
    lines.append("")
    v6 = any(n.get("underlay_ip6") for n in doc["nodes"])
    lines += _table(
        ["NODE", "UNDERLAY", *(["UNDERLAY6"] if v6 else []), "SUBNET", "AGENT"],
        [
            [
                n["name"],
                n["underlay_cidr"],
                *([n.get("underlay_ip6") or "-"] if v6 else []),
                n["subnet"],
                f"pid {n['agent_pid']} {'running' if n['agent_alive'] else 'DEAD'}",
            ]
            for n in doc["nodes"]
        ],
    )
    lines.append("")
    # A column per address family of the pods: no IPv4 column of dashes in an IPv6-only lab
    # (its pods' `ip` is None), whose IPv6 column shows even before the pods have addresses.
    dual = any(p.get("ip6") for p in doc["pods"])
    keys = [k for k, shown in (("ip", not v6_only), ("ip6", v6_only or dual)) if shown]
    lines += _table(
        ["POD", "NODE", *(POD_COLUMNS[k] for k in keys)],
        [[p["name"], p["node"], *(p.get(k) or "-" for k in keys)] for p in doc["pods"]],
    )
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace, ctx: Context) -> int:
    from overlay.lab import check

    start = time.monotonic()
    try:
        state, probes = check.run_check(args.name, timeout=args.timeout)
    except _lab_errors() as e:
        raise CLIError(str(e)) from e
    elapsed = time.monotonic() - start
    result = check.summary(probes)
    if args.json:
        ctx.print(json.dumps(dict(result, duration_s=round(elapsed, 3)), indent=2))
    else:
        ctx.print(check.render_matrix([p.name for p in state.pods], probes))
        ctx.print()
        ctx.print("cells: path seen on the source node's underlay (local = same node, "
                  "nat = external host saw the node address); FAIL = no reply; "
                  "'!' = not the path the pool's mode calls for")  # fmt: skip
        for p in probes:
            if not p.passed:
                over = " over IPv6" if p.family == 6 else ""
                ctx.print(f"  {p.src} -> {p.dst}{over}: {p.cell} (expected {p.expected})")
        verdict = "ok" if result["ok"] else f"{result['failed']} of {result['total']} FAILED"
        ctx.print(f"{result['total']} probes in {elapsed:.1f}s: {verdict}")
    return 0 if result["ok"] else 1


def cmd_down(args: argparse.Namespace, ctx: Context) -> int:
    from overlay.lab import lab

    try:
        report = lab.down(args.name)
    except _lab_errors() as e:
        raise CLIError(str(e)) from e
    if not (report.namespaces or report.processes or report.dir_removed):
        ctx.print(f"lab {args.name}: nothing to remove")
    else:
        ctx.print(
            f"lab {args.name} removed: {len(report.processes)} processes stopped, "
            f"{len(report.namespaces)} namespaces deleted"
        )
    for problem in report.problems:
        ctx.print(f"  warning: {problem}")
    return 0
