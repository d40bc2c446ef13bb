"""overlayctl: the operator CLI. Each command module registers its subcommands on the
parser (`register(subparsers)`) and sets `func(args, ctx) -> int` as the handler.

Exit codes: 0 success; 1 a user error (one `overlayctl: error: ...` line on stderr, nothing
written); 2 the datastore cannot be reached (the line names its URL).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from typing import NoReturn

import netaddr

from ipam.datastore import DEFAULT_URL, ENV_VAR, DatastoreError, Unavailable, resolve_url
from ipam.errors import IPAMError
from overlay.cli_context import CLIError, Context

PROG = "overlayctl"
# Modules with a `register(subparsers)`.
COMMAND_MODULES = (
    "overlay.cli_resources",
    "overlay.cli_ipam",
    "overlay.cli_status",
    "overlay.cli_lab",
    "overlay.cli_install",
)
EXIT_OK, EXIT_USER, EXIT_UNAVAILABLE = 0, 1, 2


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error; for us 2 means "datastore unreachable"."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Operate the overlay network's cluster state.")
    parser.add_argument(
        "--datastore",
        metavar="URL",
        help=f"datastore URL (default: ${ENV_VAR}, else {DEFAULT_URL})",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _fail(message: str, code: int) -> int:
    # One line, whatever the underlying error carried.
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as e:
        return _fail(str(e), EXIT_USER)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else EXIT_OK
    ctx = Context(resolve_url(args.datastore))
    try:
        return int(args.func(args, ctx))
    except Unavailable as e:
        return _fail(f"cannot reach the datastore {ctx.url}: {e}", EXIT_UNAVAILABLE)
    except (CLIError, IPAMError, DatastoreError, ValueError, netaddr.AddrFormatError) as e:
        # ValueError covers ResourceError, a bad datastore URL and the report errors.
        return _fail(str(e), EXIT_USER)
    except KeyboardInterrupt:
        return 130
    finally:
        with contextlib.suppress(DatastoreError):
            ctx.close()


if __name__ == "__main__":
    sys.exit(main())
