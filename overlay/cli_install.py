"""overlayctl install / uninstall: put the agent and the CNI plugins on this host, or remove
exactly what was put there."""

from __future__ import annotations

import argparse
from pathlib import Path

from ipam.datastore import resolve_url
from overlay import install
from overlay.cli_context import CLIError, Context


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "install",
        help="install the CNI plugins, the agent configuration and its systemd unit",
        description="Write the CNI launchers and conflist, /etc/overlay/agent.env, the "
        "overlay-agent systemd unit and a modules-load.d file. Re-running it rewrites only "
        "what changed. Services are touched only when --root is /.",
    )
    _root(p)
    p.add_argument("--cni-bin-dir", default=install.DEFAULT_CNI_BIN_DIR, metavar="DIR")
    p.add_argument("--cni-conf-dir", default=install.DEFAULT_CNI_CONF_DIR, metavar="DIR")
    p.add_argument(
        "--datastore",
        dest="install_datastore",
        metavar="URL",
        help="datastore URL for the agent (default: overlayctl's --datastore, "
        "$OVERLAY_DATASTORE, else the embedded SQLite file)",
    )
    p.add_argument("--node-name", metavar="NAME", help="default: the agent uses the hostname")
    p.add_argument(
        "--ip-autodetection",
        metavar="METHOD",
        help="first-found | interface=REGEX | skip-interface=REGEX | cidr=CIDR | "
        "can-reach=ADDR | ADDR/PREFIX (default: first-found)",
    )
    p.add_argument(
        "--ip6-autodetection",
        metavar="METHOD",
        help="none | the methods of --ip-autodetection: an IPv6 underlay address, so that "
        "IPv6 pods ride vxlan-v6.calico (default: none)",
    )
    p.add_argument("--network-name", default=install.DEFAULT_NETWORK, metavar="NAME")
    p.add_argument(
        "--assign-ipv6",
        action="store_true",
        help="dual-stack pods: the CNI config asks for an IPv6 address too "
        "(from an IPv6 pool; it reaches other nodes when the pool has a vxlanMode)",
    )
    p.add_argument(
        "--force", action="store_true", help="overwrite files in the way that are not ours"
    )
    p.add_argument(
        "--start",
        action="store_true",
        help="with --root /: enable overlay-agent and (re)start it if a file changed",
    )
    p.set_defaults(func=cmd_install)

    p = sub.add_parser(
        "uninstall",
        help="remove what `overlayctl install` wrote (files edited since are left)",
    )
    _root(p)
    p.set_defaults(func=cmd_uninstall)


def _root(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--root",
        default="/",
        metavar="DIR",
        help="write everything under DIR (default /); services are touched only for /",
    )


def cmd_install(args: argparse.Namespace, ctx: Context) -> int:
    opts = install.InstallOptions(
        root=Path(args.root),
        cni_bin_dir=args.cni_bin_dir,
        cni_conf_dir=args.cni_conf_dir,
        datastore=resolve_url(args.install_datastore or args.datastore),
        node_name=args.node_name,
        ip_autodetection=args.ip_autodetection,
        ip6_autodetection=args.ip6_autodetection,
        network_name=args.network_name,
        assign_ipv6=args.assign_ipv6,
        force=args.force,
    )
    try:
        report = install.install(opts, start=args.start)
    except install.InstallError as e:
        raise CLIError(str(e)) from None
    for line in report.lines():
        ctx.print(line)
    if not args.start and Path(args.root).resolve() == Path("/"):
        ctx.print(f"next: systemctl enable --now {install.UNIT_NAME}")
    return 0


def cmd_uninstall(args: argparse.Namespace, ctx: Context) -> int:
    try:
        report = install.uninstall(Path(args.root))
    except install.InstallError as e:
        raise CLIError(str(e)) from None
    if not report.actions:
        ctx.print(f"nothing to uninstall (no {install.MANIFEST} under {args.root})")
    for line in report.lines():
        ctx.print(line)
    left = [path for action, path in report.actions if action == "left"]
    if left:
        ctx.print(f"left {len(left)} path(s) that changed since install or are not empty")
    return 0
