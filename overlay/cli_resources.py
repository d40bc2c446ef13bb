"""overlayctl apply / get / delete: cluster resources in Calico's YAML shape."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ipam.model import IPPool
from ipam.resources import ResourceError, name_of, parse_documents, resolve_kind
from overlay import cli_render
from overlay.cli_context import CLIError, Context, read_input


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("apply", help="create or update resources from YAML or JSON")
    p.add_argument(
        "-f",
        "--filename",
        required=True,
        metavar="FILE",
        help="manifest file with one or more documents ('-' for stdin)",
    )
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("get", help="show resources")
    p.add_argument(
        "kind", metavar="KIND", help="ippool, ipamconfig, ipreservation, node or felixconfiguration"
    )
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("-o", "--output", choices=("table", "yaml", "json"), default="table")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("delete", help="delete one resource")
    p.add_argument("kind", metavar="KIND")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_delete)


def check_pools(new: Sequence[IPPool], existing: Sequence[IPPool]) -> None:
    """Refuse a batch of pools (in file order) that overlap each other or the stored pools,
    or that change a stored pool's cidr or blockSize. Pure; run before anything is written."""
    accepted = {p.name: p for p in existing}
    for pool in new:
        label = f'IPPool "{pool.name}"'
        old = accepted.get(pool.name)
        if old is not None and old.cidr != pool.cidr:
            raise ResourceError(
                f"{label}: spec.cidr: cannot change {old.cidr} to {pool.cidr} (cidr is "
                "immutable: create a new pool, disable the old one, then delete it)"
            )
        if old is not None and old.block_size != pool.block_size:
            raise ResourceError(
                f"{label}: spec.blockSize: cannot change {old.block_size} to {pool.block_size} "
                "(blockSize is immutable: create a new pool instead)"
            )
        for other in accepted.values():
            if other.name == pool.name or other.version != pool.version:
                continue
            if pool.cidr.first <= other.cidr.last and other.cidr.first <= pool.cidr.last:
                raise ResourceError(
                    f"{label}: spec.cidr: {pool.cidr} overlaps the cidr {other.cidr} "
                    f'of IPPool "{other.name}"'
                )
        accepted[pool.name] = pool


def cmd_apply(args: argparse.Namespace, ctx: Context) -> int:
    source = "standard input" if args.filename == "-" else args.filename
    resources = parse_documents(read_input(args.filename))
    if not resources:
        raise CLIError(f"{source}: no resources found")
    store = ctx.store()
    pools = [r for r in resources if isinstance(r, IPPool)]
    if pools:
        check_pools(pools, store.list_pools())
    for res in resources:
        ctx.print(cli_render.applied_line(res, store.apply(res)))
    return 0


def cmd_get(args: argparse.Namespace, ctx: Context) -> int:
    kind = resolve_kind(args.kind)
    store = ctx.store()
    found = [store.get(kind, args.name)] if args.name else store.list(kind)
    found.sort(key=name_of)
    if args.output == "table":
        ctx.print(cli_render.resource_table(kind, found))
    else:
        doc = cli_render.resources_document(kind, found, single=bool(args.name))
        ctx.print(cli_render.dump(doc, args.output))
    return 0


def cmd_delete(args: argparse.Namespace, ctx: Context) -> int:
    kind = resolve_kind(args.kind)
    ctx.store().delete(kind, args.name)
    ctx.print(f"{kind.lower()}/{args.name} deleted")
    return 0
