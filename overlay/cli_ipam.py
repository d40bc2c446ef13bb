"""overlayctl ipam show | assign | release | check | configure."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile

import netaddr

from ipam.allocator import ReleaseRequest
from ipam.block import Block, block_for
from ipam.check import LeakReport, find_leaks, release_report
from ipam.errors import NotInPool
from ipam.records import block_key
from ipam.store import CLUSTER_INFO_KEY
from overlay import cli_render
from overlay.cli_context import CLIError, Context, read_input


def _address(text: str) -> netaddr.IPAddress:
    try:
        return netaddr.IPAddress(text)
    except (netaddr.AddrFormatError, ValueError):
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None


def _network(text: str) -> netaddr.IPNetwork:
    try:
        return netaddr.IPNetwork(text)
    except (netaddr.AddrFormatError, ValueError):
        raise argparse.ArgumentTypeError(f"not a CIDR: {text!r}") from None


def _attr(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, value


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ipam = sub.add_parser("ipam", help="show, assign, release and check IP addresses")
    cmds = ipam.add_subparsers(dest="ipam_command", metavar="SUBCOMMAND", required=True)

    p = cmds.add_parser("show", help="usage per pool and per node, or one address")
    p.add_argument("--show-blocks", action="store_true", help="also list every block")
    p.add_argument("--ip", type=_address, help="show who holds this address")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_show)

    p = cmds.add_parser("assign", help="assign an address (printed alone on stdout)")
    p.add_argument("--node", required=True)
    p.add_argument("--handle", required=True)
    p.add_argument("--ipv6", action="store_true", help="an IPv6 address (default IPv4)")
    p.add_argument(
        "--pool",
        type=_network,
        action="append",
        metavar="CIDR",
        help="take it from this pool only (repeatable)",
    )
    p.add_argument("--ip", type=_address, help="assign exactly this address")
    p.add_argument(
        "--attr",
        type=_attr,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="allocation attribute (repeatable), e.g. pod=web-1",
    )
    p.set_defaults(func=cmd_assign)

    p = cmds.add_parser("release", help="release addresses")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--ip", type=_address)
    which.add_argument("--handle")
    which.add_argument("--from-report", metavar="FILE", help="a report of `ipam check -o`")
    p.set_defaults(func=cmd_release)

    p = cmds.add_parser("check", help="find leaked addresses and inconsistent books")
    p.add_argument(
        "--live-handles",
        metavar="FILE",
        help="handles in use, one per line or a JSON list ('-' for stdin)",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="REPORT.json",
        help="write the JSON report here (for `ipam release --from-report`)",
    )
    p.set_defaults(func=cmd_check)

    p = cmds.add_parser(
        "configure",
        help="change the cluster's IPAM configuration (shown afterwards; alone: shown)",
    )
    p.add_argument("--strictaffinity", type=_boolean, metavar="true|false",
                   help="never borrow addresses from other nodes' blocks")  # fmt: skip
    p.add_argument("--max-blocks-per-host", type=_count, metavar="N",
                   help="blocks a node may claim (0: the default, 20)")  # fmt: skip
    p.add_argument("--ip-cooldown-seconds", type=_count, metavar="N",
                   help="seconds a released address rests before reuse (0..1200)")  # fmt: skip
    p.set_defaults(func=cmd_configure)


# ---------------------------------------------------------------------------- show


def cmd_show(args: argparse.Namespace, ctx: Context) -> int:
    if args.ip is not None:
        return _show_ip(args.ip, ctx)
    ipam = ctx.ipam()
    util = ipam.utilization()
    nodes = cli_render.node_usage(ipam.snapshot().blocks.values())
    if args.output == "json":
        ctx.print(json.dumps(cli_render.usage_json(util, nodes, args.show_blocks), indent=2))
    else:
        ctx.print(cli_render.usage_text(util, nodes, args.show_blocks))
    return 0


def _show_ip(addr: netaddr.IPAddress, ctx: Context) -> int:
    pools = ctx.store().list_pools()
    pool = next((p for p in pools if p.version == addr.version and addr in p.cidr), None)
    if pool is None:
        raise NotInPool(f"address {addr} is not in any IP pool")
    cidr = block_for(addr, pool)
    kv = ctx.datastore().get(block_key(cidr))
    block = None if kv is None else Block.from_json(kv.value)
    alloc = None if block is None else block.allocation(addr)
    since = None if block is None else block.cooling_since(addr)
    if since is not None:
        ctx.print(f"{addr} is cooling down since its release at {since} (pool {pool.name}, "
                  f"block {cidr}; IPAMConfiguration ipCooldownSeconds)")  # fmt: skip
        return 0
    if block is None or alloc is None:
        ctx.print(f"{addr} is not assigned (pool {pool.name}, block {cidr})")
        return 0
    attrs = " ".join(f"{k}={v}" for k, v in sorted(alloc.attrs.items()))
    ctx.print(
        cli_render.table(
            ["FIELD", "VALUE"],
            [
                ("address", addr),
                ("pool", f"{pool.name} ({pool.cidr})"),
                ("block", cidr),
                ("block affinity", block.affinity or "(none)"),
                ("node", alloc.attrs.get("node", block.host or "")),
                ("handle", alloc.handle_id or "(none)"),
                ("sequence", alloc.sequence_number),
                ("attributes", attrs),
            ],
        )
    )
    return 0


# ---------------------------------------------------------------------------- assign


def cmd_assign(args: argparse.Namespace, ctx: Context) -> int:
    attrs = {"node": args.node, **dict(args.attr)}
    ipam = ctx.ipam()
    if args.ip is not None:
        if args.ipv6 != (args.ip.version == 6):
            raise CLIError(f"--ip {args.ip}: an IPv{args.ip.version} address; --ipv6 disagrees")
        net = ipam.assign_ip(args.ip, args.handle, args.node, attrs)
    else:
        result = ipam.auto_assign(
            args.handle,
            args.node,
            num4=0 if args.ipv6 else 1,
            num6=1 if args.ipv6 else 0,
            attrs=attrs,
            pools=args.pool,
        )
        net = (result.ipv6 if args.ipv6 else result.ipv4)[0]
    ctx.print(str(net.ip))
    return 0


# ---------------------------------------------------------------------------- release


def cmd_release(args: argparse.Namespace, ctx: Context) -> int:
    ipam = ctx.ipam()
    if args.ip is not None:
        outcome = ipam.release([ReleaseRequest(args.ip)])
        if not outcome.released:
            raise CLIError(f"address {args.ip} is not assigned")
        ctx.print(f"released {args.ip}")
    elif args.handle is not None:
        freed = ipam.release_by_handle(args.handle)
        if not freed:
            raise CLIError(f"handle {args.handle!r} holds no addresses")
        for ip in freed:
            ctx.print(f"released {ip} (handle {args.handle})")
    else:
        report = LeakReport.from_json(read_input(args.from_report))
        kv = ctx.datastore().get(CLUSTER_INFO_KEY)
        if kv is None:
            raise CLIError(
                f"this datastore has no cluster identity, so report {args.from_report} "
                "cannot describe it"
            )
        summary = release_report(ipam, ctx.datastore(), report, json.loads(kv.value)["guid"])
        for ip in summary.released:
            ctx.print(f"released {ip}")
        for ip, why in summary.kept:
            ctx.print(f"kept {ip}: {why}")
        for node, cidr in summary.affinities:
            ctx.print(f"released affinity of deleted node {node} for block {cidr}")
    return 0


# ---------------------------------------------------------------------------- check


def parse_handles(text: str) -> set[str]:
    """A JSON list of handles, or one handle per line (blank lines and # comments skipped)."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            raw = json.loads(stripped)
        except ValueError as e:
            raise CLIError(f"live handles: invalid JSON list: {e}") from None
        if not all(isinstance(h, str) for h in raw):
            raise CLIError("live handles: the JSON list must hold strings only")
        return set(raw)
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return {line for line in lines if line}


def _write_atomically(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ipam-report-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise CLIError(f"cannot write report {path}: {e.strerror or e}") from None


def cmd_check(args: argparse.Namespace, ctx: Context) -> int:
    live = None if args.live_handles is None else parse_handles(read_input(args.live_handles))
    store = ctx.store()
    guid = str(store.cluster_info()["guid"])
    snap = ctx.ipam().snapshot()
    nodes = [n.name for n in store.list_nodes()]  # after the snapshot: see find_leaks
    report = find_leaks(snap, nodes, live, guid)
    if args.output == "-":
        ctx.out.write(report.to_json())
        return 0
    ctx.print(f"IPAM check of cluster {guid} at revision {report.revision}")
    ctx.print(
        f"allocations: {report.allocations}  leaked: {len(report.leaked)}  "
        f"affinities of deleted nodes: {len(report.stale_affinities)}  "
        f"problems: {len(report.problems)}"
    )
    if report.leaked:
        ctx.print()
        ctx.print(
            cli_render.table(
                ["LEAKED ADDRESS", "BLOCK", "HANDLE", "NODE", "REASON"],
                [(a.ip, a.block, a.handle, a.node, a.reason) for a in report.leaked],
            )
        )
    if report.stale_affinities:
        ctx.print()
        ctx.print(
            cli_render.table(
                ["DELETED NODE", "BLOCK", "AFFINITY STATE"],
                [(a.node, a.cidr, a.state) for a in report.stale_affinities],
            )
        )
    if report.problems:
        ctx.print()
        ctx.print("inconsistent books:")
        for p in report.problems:
            ctx.print(f"  - {p}")
    if args.output:
        _write_atomically(args.output, report.to_json())
        ctx.print()
        ctx.print(f"report written to {args.output}")
    return 0


def cmd_configure(args: argparse.Namespace, ctx: Context) -> int:
    """calicoctl's `ipam configure`: read, change what was asked, write (checked like a
    manifest, so a bad value names its field), then show the result."""
    store = ctx.store()
    current = store.ipam_config()
    changes = {
        field: value
        for field, value in (
            ("strict_affinity", args.strictaffinity),
            ("max_blocks_per_host", args.max_blocks_per_host),
            ("ip_cooldown_seconds", args.ip_cooldown_seconds),
        )
        if value is not None
    }
    config = dataclasses.replace(current, **changes)
    if changes:
        ctx.print(f"ipamconfig/default {store.apply(config)}")
    ctx.print(
        f"strictAffinity: {str(config.strict_affinity).lower()}\n"
        f"maxBlocksPerHost: {config.max_blocks_per_host}"
        f"{' (the default, 20)' if config.max_blocks_per_host == 0 else ''}\n"
        f"autoAllocateBlocks: {str(config.auto_allocate_blocks).lower()}\n"
        f"ipCooldownSeconds: {config.ip_cooldown_seconds}"
    )
    return 0
