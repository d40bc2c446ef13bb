"""What every overlayctl command gets: the datastore URL, lazily opened clients, and the
error type for a user mistake (exit 1, one line)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from ipam.datastore import Datastore, open_datastore

if TYPE_CHECKING:
    from ipam.allocator import IPAM
    from ipam.store import ResourceStore


class CLIError(Exception):
    """A user error: bad arguments, input or state. Exit 1 with this one-line message."""


@dataclass
class Context:
    url: str
    out: TextIO = field(default_factory=lambda: sys.stdout)
    _ds: Datastore | None = None

    def datastore(self) -> Datastore:
        if self._ds is None:
            self._ds = open_datastore(self.url)
        return self._ds

    def store(self) -> ResourceStore:
        from ipam.store import ResourceStore

        return ResourceStore(self.datastore())

    def ipam(self) -> IPAM:
        from ipam.allocator import IPAM

        return IPAM(self.datastore(), self.store())

    def print(self, text: str = "") -> None:
        print(text, file=self.out)

    def close(self) -> None:
        if self._ds is not None:
            self._ds.close()
            self._ds = None


def read_input(path: str) -> str:
    """A file's text, or standard input for '-'; CLIError naming the path otherwise."""
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise CLIError(f"cannot read {path}: {reason}") from None
