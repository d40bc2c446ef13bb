"""Cluster resources over the datastore: the only module that knows their keys.

    /overlay/v1/resources/<ippools|ipamconfigs|ipreservations|nodes>/<name>
    /overlay/v1/clusterinfo

Values are the JSON of `to_manifest()`. Each call reads or writes one key, with
compare-and-swap on its revision, so a refused or lost write leaves nothing behind.
Checks that span keys (pool overlap) are made against a fresh listing just before the write;
two concurrent creations of overlapping pools can still both win, as in Calico.
"""

from __future__ import annotations

import datetime
import json
import re
import uuid
from collections.abc import Callable
from typing import Any

import netaddr

from ipam.datastore.base import AlreadyExists, Conflict, Datastore, NotFound
from ipam.model import IPAMConfig, IPPool, IPReservation, Node
from ipam.resources import (
    API_VERSION,
    Resource,
    ResourceError,
    from_manifest,
    kind_of,
    name_of,
    resolve_kind,
    stored_node,
    to_manifest,
)

__all__ = [
    "CLUSTER_INFO_KEY",
    "RESOURCES_PREFIX",
    "ResourceNotFound",
    "ResourceStore",
    "decode",
    "encode",
    "kind_prefix",
    "load_json",
    "parse_key",
    "resource_key",
]

RESOURCES_PREFIX = "/overlay/v1/resources/"
CLUSTER_INFO_KEY = "/overlay/v1/clusterinfo"
_PLURAL = {
    "IPPool": "ippools",
    "IPAMConfig": "ipamconfigs",
    "IPReservation": "ipreservations",
    "Node": "nodes",
    "FelixConfiguration": "felixconfigurations",
}
_KIND_BY_PLURAL = {plural: kind for kind, plural in _PLURAL.items()}
MAX_ATTEMPTS = 16


class ResourceNotFound(ResourceError):
    """The named resource does not exist."""


def kind_prefix(kind: str) -> str:
    """The key prefix under which every resource of `kind` (any accepted spelling) lives."""
    return f"{RESOURCES_PREFIX}{_PLURAL[resolve_kind(kind)]}/"


def resource_key(kind: str, name: str) -> str:
    return kind_prefix(kind) + name


def parse_key(key: str) -> tuple[str, str] | None:
    """(canonical kind, name) for a resource key, None for any other key (for watchers)."""
    if not key.startswith(RESOURCES_PREFIX):
        return None
    plural, _, name = key[len(RESOURCES_PREFIX) :].partition("/")
    kind = _KIND_BY_PLURAL.get(plural)
    return (kind, name) if kind and name else None


def encode(res: Resource) -> str:
    return json.dumps(to_manifest(res), sort_keys=True, separators=(",", ":"))


_SCAN = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # the C scanner


def load_json(text: str) -> Any:
    """json.loads(text), minus its Python wrappers (a listing calls it once per record): the
    C scanner over the whole text, else json.loads itself (surrounding space, or the error)."""
    try:
        value, end = _SCAN(text, 0)
    except (StopIteration, ValueError):
        return json.loads(text)
    return value if end == len(text) else json.loads(text)


def _members(*keys: str) -> str:
    """A regex for a JSON object's members `"key":"string"`, each optional, in this order
    (as sort_keys writes them): a comma before every member but the first."""
    return "".join(rf'(?:(?:(?<=\{{)|(?<!\{{),)"{key}":"(?P<{key}>{_STRING})")?' for key in keys)


# A JSON string without escapes (nor the control characters JSON refuses).
_STRING = r'[^"\\\x00-\x1f]*'
# encode()'s text of a Node without labels (a cold-start listing decodes one per peer): it
# is the JSON of a manifest in to_manifest's shape, so stored_node() gets the very fields
# from_manifest would, without parsing JSON or checking the shape of the dicts.
_NODE_TEXT = re.compile(
    rf'\{{"apiVersion":"{re.escape(API_VERSION)}","kind":"Node",'
    rf'"metadata":\{{"name":"(?P<name>{_STRING})"\}},"spec":\{{'
    rf'(?:"bgp":\{{{_members("ipv4Address", "ipv4IPIPTunnelAddr", "ipv6Address")}\}})?'
    + _members(
        "ipv4VXLANTunnelAddr", "ipv6VXLANTunnelAddr", "vxlanTunnelMACAddr", "vxlanTunnelMACAddrV6"
    )
    + r"\}\}"
)


def _stored_node_text(value: str) -> Node | None:
    match = _NODE_TEXT.fullmatch(value)
    if match is None:
        return None
    fields = match.groupdict()
    name = fields.pop("name")
    return stored_node(name, None, [item for item in fields.items() if item[1] is not None])


def decode(key: str, value: str) -> Resource:
    """A stored value back to its typed resource; a corrupt value names its key."""
    try:
        node = _stored_node_text(value)
        return node if node is not None else from_manifest(load_json(value))
    except (ValueError, ResourceError) as e:
        raise ResourceError(f"stored resource {key}: {e}") from None


def _overlaps(a: netaddr.IPNetwork, b: netaddr.IPNetwork) -> bool:
    return a.version == b.version and a.first <= b.last and b.first <= a.last


class ResourceStore:
    def __init__(self, ds: Datastore, max_attempts: int = MAX_ATTEMPTS) -> None:
        self.ds = ds
        self.max_attempts = max_attempts

    # ------------------------------------------------------------------ reads

    def _list(self, kind: str) -> list[Resource]:
        listing = self.ds.list(kind_prefix(kind))
        return [decode(kv.key, kv.value) for kv in listing.items]

    def _get(self, kind: str, name: str) -> Resource | None:
        kv = self.ds.get(resource_key(kind, name))
        return None if kv is None else decode(kv.key, kv.value)

    def list_pools(self) -> list[IPPool]:
        return [r for r in self._list("IPPool") if isinstance(r, IPPool)]

    def get_pool(self, name: str) -> IPPool | None:
        res = self._get("IPPool", name)
        return res if isinstance(res, IPPool) else None

    def ipam_config(self) -> IPAMConfig:
        """The stored singleton, or Calico's defaults when none was applied."""
        res = self._get("IPAMConfig", "default")
        return res if isinstance(res, IPAMConfig) else IPAMConfig()

    def list_reservations(self) -> list[IPReservation]:
        return [r for r in self._list("IPReservation") if isinstance(r, IPReservation)]

    def get_node(self, name: str) -> Node | None:
        res = self._get("Node", name)
        return res if isinstance(res, Node) else None

    def list_nodes(self) -> list[Node]:
        return [r for r in self._list("Node") if isinstance(r, Node)]

    def get(self, kind: str, name: str) -> Resource:
        """One resource by kind (any accepted spelling) and name; ResourceNotFound if absent."""
        kind = resolve_kind(kind)
        if kind == "IPAMConfig" and name == "default":
            return self.ipam_config()
        res = self._get(kind, name)
        if res is None:
            raise ResourceNotFound(f'{kind} "{name}" not found')
        return res

    def list(self, kind: str) -> list[Resource]:
        """Every resource of a kind, by name; the IPAM config is always listed (defaults)."""
        kind = resolve_kind(kind)
        if kind == "IPAMConfig":
            return [self.ipam_config()]
        return self._list(kind)

    # ------------------------------------------------------------------ writes

    def apply(self, res: Resource) -> str:
        """Create or replace a resource: "created", "configured" or "unchanged".

        Refused (ResourceError, nothing written) when the value is invalid, when a pool
        overlaps another pool, or when it changes an existing pool's cidr or blockSize.
        """
        kind, name = kind_of(res), name_of(res)
        # Typed values built in code bypass the manifest checks: validate them the same way.
        value = encode(from_manifest(to_manifest(res)))
        key = resource_key(kind, name)
        for _ in range(self.max_attempts):
            kv = self.ds.get(key)
            current = None if kv is None else decode(kv.key, kv.value)
            if current is not None and encode(current) == value:
                return "unchanged"
            if isinstance(res, IPPool):
                self._check_pool(res, current)
            try:
                if kv is None:
                    self.ds.create(key, value)
                    return "created"
                self.ds.update(key, value, kv.mod_revision)
                return "configured"
            except Conflict:  # also AlreadyExists: another writer won; re-read and re-check
                continue
        raise Conflict(f'{kind} "{name}": still conflicting after {self.max_attempts} attempts')

    def _check_pool(self, pool: IPPool, current: Resource | None) -> None:
        label = f'IPPool "{pool.name}"'
        if isinstance(current, IPPool):
            if current.cidr != pool.cidr:
                raise ResourceError(
                    f"{label}: spec.cidr: cannot change {current.cidr} to {pool.cidr} "
                    "(cidr is immutable: create a new pool, disable the old one, then delete it)"
                )
            if current.block_size != pool.block_size:
                raise ResourceError(
                    f"{label}: spec.blockSize: cannot change {current.block_size} to "
                    f"{pool.block_size} (blockSize is immutable: create a new pool instead)"
                )
        for other in self.list_pools():
            if other.name != pool.name and _overlaps(other.cidr, pool.cidr):
                raise ResourceError(
                    f"{label}: spec.cidr: {pool.cidr} overlaps the cidr {other.cidr} of "
                    f'IPPool "{other.name}"'
                )

    def put_node(self, node: Node) -> str:
        """Create or replace a node (used by the agent): "created", "configured", "unchanged"."""
        return self.apply(node)

    def update_node(self, name: str, change: Callable[[Node | None], Node]) -> Node:
        """Read-modify-write a node with CAS, so an agent keeps labels an operator set.

        `change` gets the current node (None if absent) and returns the new one; it may be
        called again after a conflict.
        """

        def node_change(current: Resource | None) -> Resource:
            return change(current if isinstance(current, Node) else None)

        node, _ = self.update("Node", name, node_change)
        assert isinstance(node, Node)
        return node

    def update(
        self, kind: str, name: str, change: Callable[[Resource | None], Resource]
    ) -> tuple[Resource, str]:
        """Read-modify-write one resource with compare-and-swap: `change` gets the stored
        value (None if absent) and returns the new one, and is called again after a
        conflict. Returns the new value and "created", "configured" or "unchanged"; refused
        like apply(), and when the change renames the resource or changes its kind."""
        kind = resolve_kind(kind)
        key = resource_key(kind, name)
        for _ in range(self.max_attempts):
            kv = self.ds.get(key)
            current = None if kv is None else decode(kv.key, kv.value)
            res = change(current)
            if (kind_of(res), name_of(res)) != (kind, name):
                raise ResourceError(
                    f'{kind} "{name}": the change made it {kind_of(res)} "{name_of(res)}"'
                )
            value = encode(from_manifest(to_manifest(res)))
            if current is not None and encode(current) == value:
                return res, "unchanged"
            if isinstance(res, IPPool):
                self._check_pool(res, current)
            try:
                if kv is None:
                    self.ds.create(key, value)
                    return res, "created"
                self.ds.update(key, value, kv.mod_revision)
                return res, "configured"
            except Conflict:
                continue
        raise Conflict(f'{kind} "{name}": still conflicting after {self.max_attempts} attempts')

    def delete(self, kind: str, name: str) -> None:
        """Delete one resource; ResourceNotFound names it when it does not exist."""
        kind = resolve_kind(kind)
        key = resource_key(kind, name)
        for _ in range(self.max_attempts):
            kv = self.ds.get(key)
            if kv is None:
                raise ResourceNotFound(f'{kind} "{name}" not found')
            try:
                self.ds.delete(key, kv.mod_revision)
                return
            except NotFound:
                raise ResourceNotFound(f'{kind} "{name}" not found') from None
            except Conflict:
                continue
        raise Conflict(f'{kind} "{name}": still conflicting after {self.max_attempts} attempts')

    # ------------------------------------------------------------------ cluster identity

    def cluster_info(self) -> dict[str, Any]:
        """The cluster's identity, created once: {"guid": ..., "createdAt": ...}."""
        for _ in range(self.max_attempts):
            kv = self.ds.get(CLUSTER_INFO_KEY)
            if kv is not None:
                info = json.loads(kv.value)
                if not isinstance(info, dict) or not isinstance(info.get("guid"), str):
                    raise ResourceError(f"stored {CLUSTER_INFO_KEY}: no guid in {kv.value!r}")
                return info
            info = {
                "guid": uuid.uuid4().hex,
                "createdAt": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            }
            try:
                self.ds.create(CLUSTER_INFO_KEY, json.dumps(info, sort_keys=True))
                return info
            except AlreadyExists:
                continue  # another process created it first: use theirs
        raise Conflict(f"{CLUSTER_INFO_KEY}: still conflicting after {self.max_attempts} attempts")
