"""Cluster resources in Calico's YAML shape <-> the typed values of ipam.model.

Manifests written for Calico (`apiVersion: projectcalico.org/v3`) are accepted unchanged, as
is our own `overlay.dev/v1`; we always emit our own apiVersion with Calico's field names.
Validation is strict: unknown fields at any level, wrong types and values we cannot honour
are refused with one line naming the resource, the field path and the value. Calico fields
we do not implement are accepted only with a value that changes nothing here. Pure: no I/O.
"""

from __future__ import annotations

import functools
import re
import socket
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import netaddr

from ipam.model import (
    AUTOMATIC,
    MANUAL,
    USE_TUNNEL,
    USE_WORKLOAD,
    EncapMode,
    FelixConfiguration,
    IPAMConfig,
    IPPool,
    IPReservation,
    Node,
)
from ipam.selector import SelectorError, parse_selector

__all__ = [
    "API_VERSION",
    "CALICO_API_VERSION",
    "FELIX_DEFAULT_NAME",
    "FELIX_NODE_PREFIX",
    "IPAM_CONFIG_NAME",
    "KINDS",
    "LOG_SEVERITIES",
    "Resource",
    "ResourceError",
    "canonical_ipv4",
    "canonical_network",
    "duration_text",
    "from_manifest",
    "kind_of",
    "name_of",
    "parse_documents",
    "parse_duration",
    "resolve_kind",
    "stored_node",
    "to_manifest",
    "valid_mac",
    "valid_name",
]

API_VERSION = "overlay.dev/v1"
CALICO_API_VERSION = "projectcalico.org/v3"
_API_VERSIONS = (API_VERSION, CALICO_API_VERSION)

Resource = IPPool | IPAMConfig | IPReservation | Node | FelixConfiguration

# Canonical kind name -> the type it maps to.
KINDS: dict[str, type] = {
    "IPPool": IPPool,
    "IPAMConfig": IPAMConfig,
    "IPReservation": IPReservation,
    "Node": Node,
    "FelixConfiguration": FelixConfiguration,
}
# Every spelling a manifest or a command line may use, lower-cased -> canonical kind.
_KIND_ALIASES = {
    "ippool": "IPPool",
    "ippools": "IPPool",
    "pool": "IPPool",
    "pools": "IPPool",
    "ipamconfig": "IPAMConfig",
    "ipamconfigs": "IPAMConfig",
    "ipamconfiguration": "IPAMConfig",
    "ipamconfigurations": "IPAMConfig",
    "ipreservation": "IPReservation",
    "ipreservations": "IPReservation",
    "node": "Node",
    "nodes": "Node",
    "felixconfiguration": "FelixConfiguration",
    "felixconfigurations": "FelixConfiguration",
    "felixconfig": "FelixConfiguration",
    "felixconfigs": "FelixConfiguration",
}
IPAM_CONFIG_NAME = "default"
MAX_IP_COOLDOWN_SECONDS = 1200  # Calico's bound
FELIX_DEFAULT_NAME = "default"  # the cluster-wide FelixConfiguration
FELIX_NODE_PREFIX = "node."  # + node name: that node's own FelixConfiguration
# `kind: List` and calicoctl's `<Kind>List`, lower-cased without the "List" suffix.
_LIST_KINDS = {"", *_KIND_ALIASES}

# Metadata that the API server (or calicoctl get -o yaml) sets: harmless, ignored on input.
_SERVER_METADATA = {
    "annotations",
    "creationTimestamp",
    "generation",
    "managedFields",
    "resourceVersion",
    "selfLink",
    "uid",
}

# Kubernetes DNS-1123 subdomain: the rule Calico applies to these resource names.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
# Prefix lengths as canonical text (no sign, no leading zero) -> value.
_IPV4_PREFIXLENS = {str(n): n for n in range(33)}
_IPV6_PREFIXLENS = {str(n): n for n in range(129)}

_LINK_LOCAL = (netaddr.IPNetwork("169.254.0.0/16"), netaddr.IPNetwork("fe80::/10"))
_BLOCK_RANGE = {4: (20, 32), 6: (116, 128)}
_DEFAULT_BLOCK = {4: 26, 6: 122}


class ResourceError(ValueError):
    """An invalid manifest or resource; the message is one line for the operator."""


T = TypeVar("T")


class _Ctx:
    """Names the resource in every error: `IPPool "p1": spec.blockSize: ...`."""

    def __init__(self, kind: str, name: str | None = None) -> None:
        self.label = f'{kind} "{name}"' if name else kind

    def fail(self, path: str, what: str) -> NoReturn:
        raise ResourceError(f"{self.label}: {path}: {what}" if path else f"{self.label}: {what}")

    def mapping(self, path: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {_show(value)}")
        return value

    def fields(self, path: str, value: Any, known: set[str]) -> dict[str, Any]:
        """The mapping at `path`, refusing any field not in `known`."""
        m = self.mapping(path, value)
        for key in m:
            if key not in known:
                where = f"{path}.{key}" if path else str(key)
                self.fail(where, f"unknown field (known: {', '.join(sorted(known))})")
        return m

    def typed(self, path: str, value: Any, kind: type[T], what: str) -> T:
        # bool is an int in Python; a YAML `true` must not pass as a number.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(path, f"expected {what}, got {_show(value)}")
        return value

    def boolean(self, path: str, value: Any) -> bool:
        return self.typed(path, value, bool, "true or false")

    def string(self, path: str, value: Any) -> str:
        return self.typed(path, value, str, "a string")


def _show(value: Any) -> str:
    """A value as the operator wrote it, with its YAML type when that is the problem."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, int | float):
        return f"number {value}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return repr(value)


def canonical_ipv4(text: str) -> int | None:
    """The value of a canonical dotted quad (no leading zeros, no short forms), else None.

    Every parser reads such text the same way, so it can skip netaddr's string parser: that
    was the hot spot of decoding a 10k-node listing. The round trip refuses what inet_aton
    alone would take ("10.1", "010.0.0.1", trailing junk).
    """
    try:
        packed = socket.inet_aton(text)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return None
    return int.from_bytes(packed, "big") if socket.inet_ntoa(packed) == text else None


def _canonical_ipv6(text: str) -> int | None:
    """The value of an IPv6 address written as inet_ntop writes it (lower case, the zeros
    compressed), else None. The same short cut as canonical_ipv4, and more: netaddr's
    string parser tries IPv4 first, and the exception it catches leaves ~10 objects in
    reference cycles per IPv6 address (garbage only the cyclic collector frees)."""
    try:
        packed = socket.inet_pton(socket.AF_INET6, text)
    except (OSError, ValueError):
        return None
    return (
        int.from_bytes(packed, "big") if socket.inet_ntop(socket.AF_INET6, packed) == text else None
    )


# netaddr's constructors check and dispatch on their argument, which costs more than the
# decoding itself when a listing builds one per record; for values already known valid, the
# pickle protocol (__setstate__) gives the very same object directly.
def _ipv4_address(value: int) -> netaddr.IPAddress:
    """netaddr.IPAddress(value, 4) for 0 <= value < 2**32."""
    address = _new_address(netaddr.IPAddress)
    address.__setstate__((value, 4))
    return address


def _network(value: int, prefixlen: int, version: int = 4) -> netaddr.IPNetwork:
    """netaddr.IPNetwork((value, prefixlen), version) for a value of that version."""
    network = _new_network(netaddr.IPNetwork)
    network.__setstate__((value, prefixlen, version))  # refuses a prefixlen out of range
    return network


def _ipv6_address(value: int) -> netaddr.IPAddress:
    """netaddr.IPAddress(value, 6) for 0 <= value < 2**128."""
    address = _new_address(netaddr.IPAddress)
    address.__setstate__((value, 6))
    return address


_new_address = netaddr.IPAddress.__new__
_new_network = netaddr.IPNetwork.__new__


def canonical_network(text: str) -> netaddr.IPNetwork | None:
    """netaddr.IPNetwork(text) for a canonical IPv4 "a.b.c.d/len" or bare "a.b.c.d" (/32),
    or a canonical IPv6 "x::y/len" or bare address (/128), built from integers; None for
    any other text, which the caller parses in full (and words its errors)."""
    address, slash, length = text.partition("/")
    if ":" in address:
        prefixlen = _IPV6_PREFIXLENS.get(length) if slash else 128
        value = _canonical_ipv6(address)
        if prefixlen is None or value is None:
            return None
        return _network(value, prefixlen, 6)
    prefixlen = _IPV4_PREFIXLENS.get(length) if slash else 32
    value = canonical_ipv4(address)
    if prefixlen is None or value is None:
        return None
    return _network(value, prefixlen)


def resolve_kind(text: str) -> str:
    """The canonical kind for any accepted spelling (ippool, ippools, IPPool, ...)."""
    kind = _KIND_ALIASES.get(text.lower()) if isinstance(text, str) else None
    if kind is None:
        raise ResourceError(f"unknown resource kind {text!r} (known: {', '.join(KINDS)})")
    return kind


def kind_of(res: Resource) -> str:
    for kind, cls in KINDS.items():
        if isinstance(res, cls):
            return kind
    raise TypeError(f"not a resource: {res!r}")


def name_of(res: Resource) -> str:
    return IPAM_CONFIG_NAME if isinstance(res, IPAMConfig) else res.name


# ---------------------------------------------------------------------------- documents


@functools.cache
def _strict_loader() -> type:
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one). Built on
    first use: importing PyYAML costs ~18 ms, and the agent never parses a manifest."""
    import yaml

    def construct_mapping(loader: Any, node: Any) -> dict[Any, Any]:
        loader.flatten_mapping(node)
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in seen:
                mark = key_node.start_mark
                raise ResourceError(
                    f"invalid YAML: line {mark.line + 1}, column {mark.column + 1}: "
                    f"duplicate key {key!r}"
                )
            seen.add(key)
        return dict(loader.construct_mapping(node, deep=True))

    loader: Any = type("StrictLoader", (yaml.SafeLoader,), {})
    loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return loader


def parse_documents(text: str) -> list[Resource]:
    """Every resource in a multi-document YAML (or JSON) text, in order.

    Empty documents are skipped; `kind: List` (and calicoctl's `<Kind>List`) documents
    contribute their `items`.
    """
    import yaml

    try:
        docs = [d for d in yaml.load_all(text, Loader=_strict_loader()) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ResourceError(f"invalid YAML: {where}{problem}") from None
    manifests: list[tuple[str, Any]] = []
    for i, doc in enumerate(docs, 1):
        kind = doc.get("kind") if isinstance(doc, dict) else None
        if isinstance(kind, str) and kind.endswith("List") and kind[:-4].lower() in _LIST_KINDS:
            items = doc.get("items")
            if not isinstance(items, list):
                raise ResourceError(f"document {i}: {kind}: items: expected a list")
            manifests += [(f"document {i} item {j}", item) for j, item in enumerate(items, 1)]
        else:
            manifests.append((f"document {i}", doc))
    out: list[Resource] = []
    for where, doc in manifests:
        try:
            out.append(from_manifest(doc))
        except ResourceError as e:
            raise ResourceError(f"{where}: {e}" if len(manifests) > 1 else str(e)) from None
    return out


def from_manifest(doc: Any) -> Resource:
    """One manifest (a parsed YAML/JSON mapping) -> its typed value, fully validated."""
    if not isinstance(doc, dict):
        raise ResourceError(f"a resource must be a mapping, got {_show(doc)}")
    if (node := _stored_node(doc)) is not None:
        return node
    kind_text = doc.get("kind")
    if kind_text is None:
        raise ResourceError("kind: missing (expected one of: " + ", ".join(KINDS) + ")")
    if not isinstance(kind_text, str) or kind_text.lower() not in _KIND_ALIASES:
        raise ResourceError(f"kind: unknown kind {_show(kind_text)} (known: {', '.join(KINDS)})")
    kind = _KIND_ALIASES[kind_text.lower()]
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    ctx = _Ctx(kind, name if isinstance(name, str) else None)
    ctx.fields("", doc, {"apiVersion", "kind", "metadata", "spec", "status"})
    api = doc.get("apiVersion")
    if api not in _API_VERSIONS:
        ctx.fail("apiVersion", f"{_show(api)} is not supported (use {' or '.join(_API_VERSIONS)})")
    meta_fields = {"name", "labels", "namespace"} | _SERVER_METADATA
    meta = ctx.fields("metadata", meta, meta_fields)
    name = _name(ctx, meta)
    if meta.get("namespace") not in (None, ""):
        ctx.fail("metadata.namespace", f"{_show(meta['namespace'])}: {kind} is cluster-scoped")
    labels = _labels(ctx, meta.get("labels"))
    spec = doc.get("spec")
    spec = {} if spec is None else spec
    return _PARSERS[kind](ctx, name, labels, spec)


def valid_name(name: str) -> bool:
    """Whether `name` is a valid resource name (DNS-1123 subdomain, as Calico checks)."""
    return len(name) <= 253 and _NAME.fullmatch(name) is not None


def _name(ctx: _Ctx, meta: dict[str, Any]) -> str:
    name = meta.get("name")
    if name is None or name == "":
        ctx.fail("metadata.name", "missing")
    name = ctx.string("metadata.name", name)
    if not valid_name(name):
        ctx.fail(
            "metadata.name",
            f"{name!r} is not a valid name (lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit, at most 253 characters)",
        )
    return name


def _labels(ctx: _Ctx, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    labels = ctx.mapping("metadata.labels", value)
    out: dict[str, str] = {}
    for key, val in labels.items():
        path = f"metadata.labels.{key}"
        if not isinstance(key, str):
            ctx.fail(path, f"label key must be a string, got {_show(key)}")
        prefix, _, lname = key.rpartition("/")
        if (
            not lname
            or len(lname) > 63
            or not _LABEL_NAME.fullmatch(lname)
            or (prefix and (len(prefix) > 253 or not _NAME.fullmatch(prefix)))
        ):
            ctx.fail(path, f"{key!r} is not a valid label key")
        if not isinstance(val, str):
            ctx.fail(path, f"expected a string, got {_show(val)} (quote it in YAML)")
        if len(val) > 63 or not _LABEL_NAME.fullmatch(val):
            ctx.fail(path, f"{val!r} is not a valid label value")
        out[key] = val
    return out


# ---------------------------------------------------------------------------- IPPool

_POOL_FIELDS = {
    "cidr",
    "blockSize",
    "vxlanMode",
    "ipipMode",
    "natOutgoing",
    "disabled",
    "nodeSelector",
    "allowedUses",
    "assignmentMode",
    # Calico fields we do not implement: accepted only with a harmless value (below).
    "disableBGPExport",
    "namespaceSelector",
    "awsSubnetID",
}


def _cidr(ctx: _Ctx, path: str, value: Any) -> netaddr.IPNetwork:
    text = ctx.string(path, value)
    if "/" not in text:
        ctx.fail(path, f"{text!r} is not a CIDR (expected address/prefix, e.g. 10.244.0.0/16)")
    try:
        net = netaddr.IPNetwork(text)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        ctx.fail(path, f"{text!r} is not a valid CIDR")
    if net.ip != net.network:
        ctx.fail(path, f"{text!r} has host bits set (did you mean {net.cidr}?)")
    return net


def _encap(ctx: _Ctx, path: str, value: Any) -> EncapMode:
    if value is None:
        return EncapMode.NEVER
    text = ctx.string(path, value)
    for mode in EncapMode:
        if mode.value == text:
            return mode
    ctx.fail(path, f"{text!r} is not one of {', '.join(m.value for m in EncapMode)}")


def _pool(ctx: _Ctx, name: str, labels: dict[str, str], spec_value: Any) -> IPPool:
    spec = ctx.fields("spec", spec_value, _POOL_FIELDS)
    if spec.get("cidr") is None:
        ctx.fail("spec.cidr", "missing")
    cidr = _cidr(ctx, "spec.cidr", spec["cidr"])
    for reserved in _LINK_LOCAL:
        if cidr.version == reserved.version and (cidr in reserved or reserved in cidr):
            ctx.fail("spec.cidr", f"{cidr} overlaps the link-local range {reserved}")
    version = int(cidr.version)
    disabled = ctx.boolean("spec.disabled", spec.get("disabled", False))
    nat = ctx.boolean("spec.natOutgoing", spec.get("natOutgoing", False))

    block_size = _DEFAULT_BLOCK[version]
    if spec.get("blockSize") is not None:
        block_size = ctx.typed("spec.blockSize", spec["blockSize"], int, "an integer")
    low, high = _BLOCK_RANGE[version]
    if not low <= block_size <= high:
        ctx.fail(
            "spec.blockSize", f"{block_size} is out of range {low}-{high} for an IPv{version} pool"
        )
    # Calico allows a block larger than the pool only while the pool is disabled.
    if block_size < cidr.prefixlen and not disabled:
        ctx.fail(
            "spec.blockSize",
            f"{block_size} is smaller than the prefix length of the pool {cidr} "
            f"(a block must fit in the pool: use a block size >= {cidr.prefixlen})",
        )

    vxlan = _encap(ctx, "spec.vxlanMode", spec.get("vxlanMode"))
    ipip = _encap(ctx, "spec.ipipMode", spec.get("ipipMode"))
    if ipip is not EncapMode.NEVER and version == 6:
        ctx.fail("spec.ipipMode", f"{ipip.value}: IP-in-IP is IPv4 only (use vxlanMode)")
    if ipip is not EncapMode.NEVER and vxlan is not EncapMode.NEVER:
        ctx.fail(
            "spec",
            f"ipipMode {ipip.value} and vxlanMode {vxlan.value}: "
            "enable at most one encapsulation per pool",
        )

    selector = spec.get("nodeSelector")
    selector = "all()" if selector is None else ctx.string("spec.nodeSelector", selector)
    try:
        parse_selector(selector)
    except SelectorError as e:
        ctx.fail("spec.nodeSelector", str(e))
    selector = selector.strip() or "all()"

    _harmless_pool_fields(ctx, spec)
    return IPPool(
        name=name,
        cidr=cidr,
        block_size=block_size,
        vxlan_mode=vxlan,
        ipip_mode=ipip,
        nat_outgoing=nat,
        disabled=disabled,
        node_selector=selector,
        allowed_uses=_allowed_uses(ctx, spec.get("allowedUses")),
        assignment_mode=_assignment_mode(ctx, spec.get("assignmentMode")),
    )


def _allowed_uses(ctx: _Ctx, value: Any) -> frozenset[str]:
    """Calico's allowedUses: Workload and/or Tunnel; absent or empty means both."""
    if value is None:
        return IPPool.allowed_uses
    uses = ctx.typed("spec.allowedUses", value, list, "a list")
    for use in uses:
        if use not in (USE_WORKLOAD, USE_TUNNEL):
            why = "is not supported" if use == "LoadBalancer" else "is not Workload or Tunnel"
            ctx.fail("spec.allowedUses", f"{_show(use)} {why}")
    return frozenset(uses) or IPPool.allowed_uses


def _assignment_mode(ctx: _Ctx, value: Any) -> str:
    if value is None:
        return AUTOMATIC
    mode = ctx.string("spec.assignmentMode", value)
    if mode not in (AUTOMATIC, MANUAL):
        ctx.fail("spec.assignmentMode", f"{_show(mode)} is not Automatic or Manual")
    return mode


def _harmless_pool_fields(ctx: _Ctx, spec: dict[str, Any]) -> None:
    # There is no BGP here, so nothing is exported either way.
    if spec.get("disableBGPExport") is not None:
        ctx.boolean("spec.disableBGPExport", spec["disableBGPExport"])
    ns = spec.get("namespaceSelector")
    if ns is not None and ctx.string("spec.namespaceSelector", ns).strip() not in ("", "all()"):
        ctx.fail("spec.namespaceSelector", f"{ns!r} is not supported (only all())")
    aws = spec.get("awsSubnetID")
    if aws not in (None, ""):
        ctx.fail("spec.awsSubnetID", f"{_show(aws)} is not supported")


# ---------------------------------------------------------------------------- IPAMConfig


def _ipam_config(ctx: _Ctx, name: str, labels: dict[str, str], spec_value: Any) -> IPAMConfig:
    if name != IPAM_CONFIG_NAME:
        ctx.fail(
            "metadata.name", f"{name!r}: the IPAM configuration is a singleton named 'default'"
        )
    known = {
        "strictAffinity",
        "maxBlocksPerHost",
        "autoAllocateBlocks",
        "kubeVirtVMAddressPersistence",
        "ipCooldownSeconds",
    }
    spec = ctx.fields("spec", spec_value, known)
    strict = ctx.boolean("spec.strictAffinity", spec.get("strictAffinity", False))
    auto = ctx.boolean("spec.autoAllocateBlocks", spec.get("autoAllocateBlocks", True))
    max_blocks = ctx.typed(
        "spec.maxBlocksPerHost", spec.get("maxBlocksPerHost", 0), int, "an integer"
    )
    if max_blocks < 0:
        ctx.fail("spec.maxBlocksPerHost", f"{max_blocks} must be >= 0 (0 means the default)")
    if not strict and not auto:
        ctx.fail(
            "spec",
            "strictAffinity false with autoAllocateBlocks false would leave no way to get "
            "an address: set strictAffinity true or autoAllocateBlocks true",
        )
    # No KubeVirt here: any persistence setting changes nothing.
    kv = spec.get("kubeVirtVMAddressPersistence")
    if kv is not None and kv not in ("Enabled", "Disabled"):
        ctx.fail("spec.kubeVirtVMAddressPersistence", f"{_show(kv)} is not Enabled or Disabled")
    cooldown = ctx.typed(
        "spec.ipCooldownSeconds", spec.get("ipCooldownSeconds", 0), int, "an integer"
    )
    if not 0 <= cooldown <= MAX_IP_COOLDOWN_SECONDS:
        ctx.fail("spec.ipCooldownSeconds", f"{cooldown} is outside 0..{MAX_IP_COOLDOWN_SECONDS}")
    return IPAMConfig(
        strict_affinity=strict,
        max_blocks_per_host=max_blocks,
        auto_allocate_blocks=auto,
        ip_cooldown_seconds=cooldown,
    )


# ---------------------------------------------------------------------------- IPReservation


def _reservation(ctx: _Ctx, name: str, labels: dict[str, str], spec_value: Any) -> IPReservation:
    spec = ctx.fields("spec", spec_value, {"reservedCIDRs"})
    items = spec.get("reservedCIDRs")
    items = [] if items is None else ctx.typed("spec.reservedCIDRs", items, list, "a list")
    cidrs = [
        _cidr_or_address(ctx, f"spec.reservedCIDRs[{i}]", item) for i, item in enumerate(items)
    ]
    return IPReservation(name=name, reserved_cidrs=tuple(cidrs))


def _cidr_or_address(ctx: _Ctx, path: str, value: Any) -> netaddr.IPNetwork:
    """A CIDR, or a bare address as its host network (/32, /128)."""
    text = ctx.string(path, value)
    if "/" in text:
        return _cidr(ctx, path, text)
    addr = _address(ctx, path, text)
    return netaddr.IPNetwork(f"{addr}/{32 if addr.version == 4 else 128}")


# ---------------------------------------------------------------------------- Node

_NODE_FIELDS = {
    "bgp",
    "ipv4VXLANTunnelAddr",
    "ipv6VXLANTunnelAddr",
    "vxlanTunnelMACAddr",
    "vxlanTunnelMACAddrV6",
    # Written by Calico's own components; informational here and ignored.
    "addresses",
    "orchRefs",
    "interfaceName",
}
_BGP_FIELDS = {"ipv4Address", "ipv6Address", "ipv4IPIPTunnelAddr", "asNumber"}


def _address(ctx: _Ctx, path: str, value: Any, version: int | None = None) -> netaddr.IPAddress:
    if version != 6 and type(value) is str and (number := canonical_ipv4(value)) is not None:
        return _ipv4_address(number)
    if version != 4 and type(value) is str and (number := _canonical_ipv6(value)) is not None:
        return _ipv6_address(number)
    text = ctx.string(path, value)
    try:
        addr = netaddr.IPAddress(text)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        ctx.fail(path, f"{text!r} is not a valid IP address")
    if version is not None and addr.version != version:
        ctx.fail(path, f"{text!r} is not an IPv{version} address")
    return addr


def _interface_address(ctx: _Ctx, path: str, value: Any, version: int) -> netaddr.IPNetwork:
    """An underlay address with its subnet prefix; a bare address becomes a host prefix."""
    fast = canonical_network(value) if type(value) is str else None
    if fast is not None and fast.version == version:
        return fast
    text = ctx.string(path, value)
    try:
        net = netaddr.IPNetwork(text)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        ctx.fail(path, f"{text!r} is not a valid address/prefix (e.g. 10.0.1.5/24)")
    if net.version != version:
        ctx.fail(path, f"{text!r} is not an IPv{version} address")
    return net


def _v4(ctx: _Ctx, path: str, value: Any) -> netaddr.IPAddress:
    return _address(ctx, path, value, 4)


def _v6(ctx: _Ctx, path: str, value: Any) -> netaddr.IPAddress:
    return _address(ctx, path, value, 6)


def _interface_v4(ctx: _Ctx, path: str, value: Any) -> netaddr.IPNetwork:
    return _interface_address(ctx, path, value, 4)


def _interface_v6(ctx: _Ctx, path: str, value: Any) -> netaddr.IPNetwork:
    return _interface_address(ctx, path, value, 6)


def _optional(
    ctx: _Ctx, spec: dict[str, Any], key: str, path: str, parse: Callable[[_Ctx, str, Any], T]
) -> T | None:
    value = spec.get(key)
    return None if value is None or value == "" else parse(ctx, path, value)


def valid_mac(text: str) -> bool:
    """Whether `text` is a MAC address as resources take it: xx:xx:xx:xx:xx:xx, any case."""
    return _MAC.fullmatch(text) is not None


def _mac(ctx: _Ctx, path: str, value: Any) -> str:
    text = ctx.string(path, value)
    if not valid_mac(text):
        ctx.fail(path, f"{text!r} is not a MAC address (expected xx:xx:xx:xx:xx:xx)")
    return text.lower()


def _node(ctx: _Ctx, name: str, labels: dict[str, str], spec_value: Any) -> Node:
    spec = ctx.fields("spec", spec_value, _NODE_FIELDS)
    bgp = spec.get("bgp")
    bgp = {} if bgp is None else ctx.fields("spec.bgp", bgp, _BGP_FIELDS)
    if bgp.get("asNumber") is not None:
        ctx.typed("spec.bgp.asNumber", bgp["asNumber"], int, "an integer")
    for key in ("addresses", "orchRefs"):
        if spec.get(key) is not None:
            ctx.typed(f"spec.{key}", spec[key], list, "a list")
    if spec.get("interfaceName") is not None:
        ctx.string("spec.interfaceName", spec["interfaceName"])
    return Node(
        name=name,
        labels=labels,
        ipv4_address=_optional(ctx, bgp, "ipv4Address", "spec.bgp.ipv4Address", _interface_v4),
        ipv6_address=_optional(ctx, bgp, "ipv6Address", "spec.bgp.ipv6Address", _interface_v6),
        ipv4_vxlan_tunnel_addr=_optional(
            ctx, spec, "ipv4VXLANTunnelAddr", "spec.ipv4VXLANTunnelAddr", _v4
        ),
        ipv6_vxlan_tunnel_addr=_optional(
            ctx, spec, "ipv6VXLANTunnelAddr", "spec.ipv6VXLANTunnelAddr", _v6
        ),
        ipv4_ipip_tunnel_addr=_optional(
            ctx, bgp, "ipv4IPIPTunnelAddr", "spec.bgp.ipv4IPIPTunnelAddr", _v4
        ),
        vxlan_tunnel_mac=_optional(
            ctx, spec, "vxlanTunnelMACAddr", "spec.vxlanTunnelMACAddr", _mac
        ),
        ipv6_vxlan_tunnel_mac=_optional(
            ctx, spec, "vxlanTunnelMACAddrV6", "spec.vxlanTunnelMACAddrV6", _mac
        ),
    )


_STORED_NODE_KEYS = {"apiVersion", "kind", "metadata", "spec"}
# Manifest key -> (Node attribute, the full path's parser for it).
_STORED_NODE_PARSERS: dict[str, tuple[str, Callable[[_Ctx, str, Any], Any]]] = {
    "ipv4VXLANTunnelAddr": ("ipv4_vxlan_tunnel_addr", _v4),
    "ipv6VXLANTunnelAddr": ("ipv6_vxlan_tunnel_addr", _v6),
    "vxlanTunnelMACAddr": ("vxlan_tunnel_mac", _mac),
    "vxlanTunnelMACAddrV6": ("ipv6_vxlan_tunnel_mac", _mac),
}
_STORED_BGP_PARSERS: dict[str, tuple[str, Callable[[_Ctx, str, Any], Any]]] = {
    "ipv4Address": ("ipv4_address", _interface_v4),
    "ipv6Address": ("ipv6_address", _interface_v6),
    "ipv4IPIPTunnelAddr": ("ipv4_ipip_tunnel_addr", _v4),
}
_STORED_NODE_SPEC = {"bgp", *_STORED_NODE_PARSERS}
_STORED_NODE_BGP = set(_STORED_BGP_PARSERS)
_STORED_NODE_FIELDS = {**_STORED_NODE_PARSERS, **_STORED_BGP_PARSERS}  # disjoint keys


def _stored_node(doc: dict[str, Any]) -> Node | None:
    """A Node manifest in the shape to_manifest writes, decoded without the generic checks
    (a cold-start listing decodes one per peer); None for any other shape or any invalid
    value, so that the full path decides and words the error.

    Each field goes through the full path's own parser: the result is the same Node.
    """
    meta = doc.get("metadata")
    spec = doc.get("spec")
    if (
        doc.get("kind") != "Node"
        or doc.get("apiVersion") != API_VERSION
        or doc.keys() != _STORED_NODE_KEYS
        or type(meta) is not dict
        or type(spec) is not dict
        or not meta.keys() <= {"name", "labels"}
        or not spec.keys() <= _STORED_NODE_SPEC
    ):
        return None
    bgp = spec.get("bgp", {})
    if type(bgp) is not dict or not bgp.keys() <= _STORED_NODE_BGP:
        return None
    fields = [item for item in spec.items() if item[0] != "bgp"]
    return stored_node(meta.get("name"), meta.get("labels"), [*fields, *bgp.items()])


def stored_node(name: Any, labels: Any, fields: list[tuple[str, Any]]) -> Node | None:
    """The Node of a stored manifest in to_manifest's shape, from its name, labels and the
    fields of spec and spec.bgp (by manifest key); None for any invalid value, which the
    full path then words. Each field goes through the full path's own parser."""
    if type(name) is not str or len(name) > 253 or not _NAME.fullmatch(name):
        return None
    ctx = _Ctx("Node", name)
    values: dict[str, Any] = {}
    try:
        # Only the fields present (the paths are unused: an error falls back to the full path).
        for key, value in fields:
            if value is not None and value != "":
                attribute, parse = _STORED_NODE_FIELDS[key]
                values[attribute] = parse(ctx, "", value)
        return Node(name=name, labels=_labels(ctx, labels), **values)
    except ResourceError:
        return None


# ---------------------------------------------------------------------------- FelixConfiguration

_FELIX_FIELDS = {
    "vxlanVNI",
    "vxlanPort",
    "vxlanMTU",
    "vxlanMTUV6",
    "ipipMTU",
    "routeRefreshInterval",
    "externalNodesList",
    "featureDetectOverride",
    "logSeverityScreen",
    "natOutgoingAddress",
    # Calico fields we do not implement: accepted only with a harmless value (below).
    "vxlanEnabled",
    "ipipEnabled",
    "bpfEnabled",
    "bpfLogLevel",
    "floatingIPs",
    "reportingInterval",
}
# Felix's severities -> logging's level names.
LOG_SEVERITIES = {
    "Debug": "DEBUG",
    "Info": "INFO",
    "Warning": "WARNING",
    "Error": "ERROR",
    "Fatal": "CRITICAL",
}
_FEATURE_OVERRIDES = {"ChecksumOffloadBroken"}
# Go's time.ParseDuration units, in seconds.
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|µs|ns)")


def parse_duration(text: str) -> float | None:
    """Seconds in a Go duration ("90s", "1m30s", "500ms", "0"); None if it is none."""
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(text):
        part = _DURATION_PART.match(text, pos)
        if part is None:
            return None
        total += float(part.group(1)) * _DURATION_UNITS[part.group(2)]
        pos = part.end()
    return total if text else None


def duration_text(seconds: float) -> str:
    return f"{seconds:g}s"


def _felix_int(ctx: _Ctx, spec: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = spec.get(key)
    if value is None:
        return None
    value = ctx.typed(f"spec.{key}", value, int, "an integer")
    if not low <= value <= high:
        ctx.fail(f"spec.{key}", f"{value} is outside {low}..{high}")
    return value


def _felix_mtu(ctx: _Ctx, spec: dict[str, Any], key: str) -> int | None:
    value = _felix_int(ctx, spec, key, 0, 65535)
    if value is not None and 0 < value < 68:
        ctx.fail(f"spec.{key}", f"{value} is below the minimum 68 (0 derives it from the underlay)")
    return value


def _feature_overrides(ctx: _Ctx, value: Any) -> bool | None:
    """featureDetectOverride "Name=true|false|,...": the one feature we detect."""
    path = "spec.featureDetectOverride"
    text = ctx.string(path, value)
    found: bool | None = None
    for item in filter(None, text.split(",")):
        key, eq, setting = item.partition("=")
        if key not in _FEATURE_OVERRIDES:
            ctx.fail(path, f"{key!r} is not a feature detected here (known: ChecksumOffloadBroken)")
        if not eq or setting not in ("true", "false", ""):
            ctx.fail(path, f"{item!r}: expected {key}=true, {key}=false or {key}= (detect)")
        found = None if setting == "" else setting == "true"
    return found


def _felix(ctx: _Ctx, name: str, labels: dict[str, str], spec_value: Any) -> FelixConfiguration:
    if name != FELIX_DEFAULT_NAME and not name.startswith(FELIX_NODE_PREFIX):
        ctx.fail(
            "metadata.name",
            f"{name!r}: a FelixConfiguration is read only as 'default' (the cluster) or "
            "'node.<node name>' (one node)",
        )
    spec = ctx.fields("spec", spec_value, _FELIX_FIELDS)
    _harmless_felix_fields(ctx, spec)
    refresh = spec.get("routeRefreshInterval")
    if refresh is not None:
        text = ctx.string("spec.routeRefreshInterval", refresh)
        refresh = parse_duration(text)
        if refresh is None:
            ctx.fail(
                "spec.routeRefreshInterval",
                f"{text!r} is not a duration (e.g. 90s, 1m30s; 0 turns the refresh off)",
            )
    external = spec.get("externalNodesList")
    nets: tuple[netaddr.IPNetwork, ...] | None = None
    if external is not None:
        items = ctx.typed("spec.externalNodesList", external, list, "a list")
        nets = tuple(
            _cidr_or_address(ctx, f"spec.externalNodesList[{i}]", item)
            for i, item in enumerate(items)
        )
    severity = spec.get("logSeverityScreen")
    if severity is not None:
        text = ctx.string("spec.logSeverityScreen", severity)
        severity = next((s for s in LOG_SEVERITIES if s.lower() == text.lower()), None)
        if severity is None:
            ctx.fail(
                "spec.logSeverityScreen", f"{text!r} is not one of {', '.join(LOG_SEVERITIES)}"
            )
    override = spec.get("featureDetectOverride")
    nat_address = spec.get("natOutgoingAddress")
    return FelixConfiguration(
        name=name,
        vxlan_vni=_felix_int(ctx, spec, "vxlanVNI", 1, 2**24 - 1),
        vxlan_port=_felix_int(ctx, spec, "vxlanPort", 1, 65535),
        vxlan_mtu=_felix_mtu(ctx, spec, "vxlanMTU"),
        vxlan_mtu_v6=_felix_mtu(ctx, spec, "vxlanMTUV6"),
        ipip_mtu=_felix_mtu(ctx, spec, "ipipMTU"),
        route_refresh_interval=refresh,
        external_nodes_list=nets,
        checksum_offload_broken=None if override is None else _feature_overrides(ctx, override),
        log_severity_screen=severity,
        nat_outgoing_address=None
        if nat_address in (None, "")
        else _v4(ctx, "spec.natOutgoingAddress", nat_address),
    )


def _harmless_felix_fields(ctx: _Ctx, spec: dict[str, Any]) -> None:
    """Calico fields with no counterpart here, accepted with the value that changes nothing:
    the tunnels follow the pools; there is no eBPF mode, floating IP nor status report."""
    for key in ("vxlanEnabled", "ipipEnabled"):
        if spec.get(key) not in (None, True):
            ctx.fail(
                f"spec.{key}",
                f"{_show(spec[key])}: the tunnels follow the pools here (set the pools' "
                "vxlanMode / ipipMode to Never)",
            )
    harmless = {
        "bpfEnabled": (False,),
        "bpfLogLevel": ("", "Off"),
        "floatingIPs": ("Disabled",),
        "reportingInterval": ("0", "0s"),
    }
    for key, allowed in harmless.items():
        if spec.get(key) not in (None, *allowed):
            ctx.fail(f"spec.{key}", f"{_show(spec[key])} is not supported")


_PARSERS: dict[str, Callable[[_Ctx, str, dict[str, str], Any], Resource]] = {
    "IPPool": _pool,
    "IPAMConfig": _ipam_config,
    "IPReservation": _reservation,
    "Node": _node,
    "FelixConfiguration": _felix,
}


# ---------------------------------------------------------------------------- emitting


def to_manifest(res: Resource) -> dict[str, Any]:
    """The manifest for a typed value: our apiVersion, Calico's field names.

    Only fields with a value are emitted for nodes, so a manifest stays what a person wrote.
    """
    spec: dict[str, Any]
    metadata: dict[str, Any] = {"name": name_of(res)}
    if isinstance(res, IPPool):
        spec = {
            "cidr": str(res.cidr),
            "blockSize": res.block_size,
            "ipipMode": res.ipip_mode.value,
            "vxlanMode": res.vxlan_mode.value,
            "natOutgoing": res.nat_outgoing,
            "disabled": res.disabled,
            "nodeSelector": res.node_selector,
            "allowedUses": sorted(res.allowed_uses, reverse=True),  # Workload, Tunnel
            "assignmentMode": res.assignment_mode,
        }
    elif isinstance(res, IPAMConfig):
        spec = {
            "strictAffinity": res.strict_affinity,
            "maxBlocksPerHost": res.max_blocks_per_host,
            "autoAllocateBlocks": res.auto_allocate_blocks,
            "ipCooldownSeconds": res.ip_cooldown_seconds,
        }
    elif isinstance(res, IPReservation):
        spec = {"reservedCIDRs": [str(c) for c in res.reserved_cidrs]}
    elif isinstance(res, FelixConfiguration):
        spec = _felix_spec(res)
    elif isinstance(res, Node):
        if res.labels:
            metadata["labels"] = dict(res.labels)
        bgp = {
            key: str(value)
            for key, value in (
                ("ipv4Address", res.ipv4_address),
                ("ipv6Address", res.ipv6_address),
                ("ipv4IPIPTunnelAddr", res.ipv4_ipip_tunnel_addr),
            )
            if value is not None
        }
        spec = {"bgp": bgp} if bgp else {}
        for key, value in (
            ("ipv4VXLANTunnelAddr", res.ipv4_vxlan_tunnel_addr),
            ("ipv6VXLANTunnelAddr", res.ipv6_vxlan_tunnel_addr),
            ("vxlanTunnelMACAddr", res.vxlan_tunnel_mac),
            ("vxlanTunnelMACAddrV6", res.ipv6_vxlan_tunnel_mac),
        ):
            if value is not None:
                spec[key] = str(value)
    else:
        raise TypeError(f"not a resource: {res!r}")
    return {"apiVersion": API_VERSION, "kind": kind_of(res), "metadata": metadata, "spec": spec}


def _felix_spec(res: FelixConfiguration) -> dict[str, Any]:
    """Only the fields set: an unset field leaves the decision to a less specific level."""
    override, refresh = res.checksum_offload_broken, res.route_refresh_interval
    fields: tuple[tuple[str, Any], ...] = (
        ("vxlanVNI", res.vxlan_vni),
        ("vxlanPort", res.vxlan_port),
        ("vxlanMTU", res.vxlan_mtu),
        ("vxlanMTUV6", res.vxlan_mtu_v6),
        ("ipipMTU", res.ipip_mtu),
        (
            "routeRefreshInterval",
            None if refresh is None else duration_text(refresh),
        ),
        (
            "externalNodesList",
            None if res.external_nodes_list is None else [str(n) for n in res.external_nodes_list],
        ),
        (
            "featureDetectOverride",
            None if override is None else f"ChecksumOffloadBroken={str(override).lower()}",
        ),
        ("logSeverityScreen", res.log_severity_screen),
        (
            "natOutgoingAddress",
            None if res.nat_outgoing_address is None else str(res.nat_outgoing_address),
        ),
    )
    return {key: value for key, value in fields if value is not None}
