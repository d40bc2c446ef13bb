"""list_fields(): a few fields of every JSON record under a prefix, without the rest.

A reader that needs three fields of a large record (a node's first routing pass needs the
CIDR, affinity and attributes of each IPAM block, not its allocation lists) asks for them by
JSON path. A backend that can pick them out itself (SQLite's JSON functions) does, so those
records are never parsed in Python; for the others they are parsed here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from ipam.datastore.base import Datastore

# "$.a.b": member names only (no array indexes, no quoting), which is all readers need and
# lets a backend put the path into its query as it is.
_PATH = re.compile(r"\$(?:\.[A-Za-z0-9_]+)+")


def check_paths(paths: Sequence[str]) -> list[list[str]]:
    """The member names of each path; ValueError naming a path of another form."""
    for path in paths:
        if not _PATH.fullmatch(path):
            raise ValueError(f"paths: {path!r} is not of the form $.member.member")
    return [path.split(".")[1:] for path in paths]


def list_fields(ds: Datastore, prefix: str, paths: Sequence[str]) -> list[tuple[Any, ...]]:
    """(key, the value at each path...) of every record under `prefix`, in key order.

    A value is what JSON holds there (str, int, float, bool, list, dict), or None: null,
    absent, or under something that is no object. ValueError when a record is no JSON.
    DatastoreError as for list()."""
    own = getattr(ds, "list_fields", None)
    if own is not None:
        return own(prefix, paths)  # type: ignore[no-any-return]
    members = check_paths(paths)
    out = []
    for kv in ds.list(prefix).items:
        try:
            doc = json.loads(kv.value)
        except ValueError:
            raise ValueError(f"record {kv.key}: not JSON") from None
        out.append((kv.key, *(_at(doc, names) for names in members)))
    return out


def _at(doc: Any, names: list[str]) -> Any:
    for name in names:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(name)
    return doc
