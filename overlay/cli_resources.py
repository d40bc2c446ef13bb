"""overlayctl apply / get / delete: cluster resources in Calico's YAML shape."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from ipam.model import FelixConfiguration, IPAMConfig, IPPool
from ipam.resources import (
    IPAM_CONFIG_NAME,
    Resource,
    ResourceError,
    from_manifest,
    name_of,
    parse_documents,
    resolve_kind,
    to_manifest,
)
from ipam.store import ResourceNotFound
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

    p = sub.add_parser(
        "patch", help="change some fields of one resource (a JSON merge patch, as calicoctl)"
    )
    p.add_argument("kind", metavar="KIND")
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "-p",
        "--patch",
        required=True,
        metavar="PATCH",
        help='JSON or YAML, e.g. \'{"spec": {"vxlanPort": 8472}}\'; null removes a field',
    )
    p.set_defaults(func=cmd_patch)

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


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: mappings merge key by key, null removes a key, anything
    else replaces the value whole (lists too). Pure; `target` is not changed."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def cmd_patch(args: argparse.Namespace, ctx: Context) -> int:
    import yaml

    kind = resolve_kind(args.kind)
    try:
        patch = yaml.safe_load(args.patch)  # JSON is YAML
    except yaml.YAMLError as e:
        raise CLIError(f"--patch: not JSON or YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(patch, dict):
        raise CLIError(
            f"--patch: expected a mapping such as '{{\"spec\": {{...}}}}', got {patch!r}"
        )

    def patched(current: Resource | None) -> Resource:
        if current is None and kind == "IPAMConfig" and args.name == IPAM_CONFIG_NAME:
            current = IPAMConfig()  # never applied: Calico's defaults, as `get` shows
        if current is None and kind == "FelixConfiguration":
            # Nothing set yet is the same as an empty one (Calico installs `default` empty,
            # so its docs patch it straight away); the name is checked like any other.
            current = FelixConfiguration(name=args.name)
        if current is None:
            raise ResourceNotFound(f'{kind} "{args.name}" not found')
        return from_manifest(merge_patch(to_manifest(current), patch))

    _, outcome = ctx.store().update(kind, args.name, patched)
    ctx.print(f"{kind.lower()}/{args.name} {'patched' if outcome != 'unchanged' else outcome}")
    return 0


def cmd_delete(args: argparse.Namespace, ctx: Context) -> int:
    kind = resolve_kind(args.kind)
    ctx.store().delete(kind, args.name)
    ctx.print(f"{kind.lower()}/{args.name} deleted")
    return 0
