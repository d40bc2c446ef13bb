"""The stored-shape Node fast path and the IPv4 shortcut must agree with the full decode."""

from __future__ import annotations

import gc
import json
import re
import socket
from typing import Any

import netaddr
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipam import store
from ipam.model import Node
from ipam.resources import (
    API_VERSION,
    CALICO_API_VERSION,
    ResourceError,
    _stored_node,
    canonical_network,
    from_manifest,
    to_manifest,
)
from ipam.store import decode, encode, load_json

_octet = st.one_of(st.integers(0, 255).map(str), st.sampled_from(["00", "01", "256", "-1", ""]))
_v4 = st.builds(lambda parts: ".".join(parts), st.lists(_octet, min_size=1, max_size=5))
_prefix = st.sampled_from(["", "/0", "/8", "/16", "/24", "/32", "/33", "/08", "/+8", "/"])
_v4_text = st.builds(lambda a, p: a + p, _v4, _prefix)
_value = st.one_of(
    _v4_text,
    st.sampled_from(["fd00::1", "fd00::1/64", "::ffff:1.2.3.4", "", " 10.0.0.1", "x"]),
    st.none(),
    st.integers(),
)
_mac = st.sampled_from(["66:0a:0b:0c:0d:0e", "66:0A:0B:0C:0D:0E", "66-0a", ""])


def _full(doc: dict[str, Any]) -> Node:
    """The full path: the same manifest under Calico's apiVersion skips the fast path."""
    res = from_manifest({**doc, "apiVersion": CALICO_API_VERSION})
    assert isinstance(res, Node)
    return res


def _outcome(fn: Any, doc: dict[str, Any]) -> tuple[str, str]:
    try:
        return ("ok", repr(fn(doc)))
    except ResourceError as e:
        return ("error", str(e))


@given(
    ipv4=_value,
    ipv6=_value,
    vxlan4=_value,
    vxlan6=_value,
    ipip=_value,
    mac=_mac,
    labels=st.dictionaries(st.sampled_from(["a", "b/c", "-x"]), st.sampled_from(["1", "", "-"])),
)
def test_fast_path_equals_full_path(
    ipv4: Any, ipv6: Any, vxlan4: Any, vxlan6: Any, ipip: Any, mac: str, labels: dict[str, str]
) -> None:
    bgp = {"ipv4Address": ipv4, "ipv6Address": ipv6, "ipv4IPIPTunnelAddr": ipip}
    spec = {"bgp": bgp, "ipv4VXLANTunnelAddr": vxlan4, "ipv6VXLANTunnelAddr": vxlan6}
    spec["vxlanTunnelMACAddr"] = mac
    meta: dict[str, Any] = {"name": "n1", "labels": labels} if labels else {"name": "n1"}
    doc = {"apiVersion": API_VERSION, "kind": "Node", "metadata": meta, "spec": spec}
    # Same Node (repr also shows the underlay's host bits, which == ignores), same error.
    assert _outcome(from_manifest, doc) == _outcome(_full, doc)
    fast = _stored_node(doc)
    if fast is not None:
        assert fast == _full(doc) and repr(fast) == repr(_full(doc))


def test_fast_path_takes_what_the_store_writes() -> None:
    node = Node(
        name="n1",
        labels={"zone": "a"},
        ipv4_address=netaddr.IPNetwork("10.0.1.5/24"),
        ipv6_address=netaddr.IPNetwork("fd00::5/64"),
        ipv4_vxlan_tunnel_addr=netaddr.IPAddress("10.244.0.1"),
        vxlan_tunnel_mac="66:0a:0b:0c:0d:0e",
    )
    doc = json.loads(encode(node))
    assert _stored_node(doc) == node
    assert repr(_stored_node(doc)) == repr(node)
    assert decode("/k", encode(node)) == node


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"ipv4VXLANTunnelAddr": "10.0.0.256"}, "spec.ipv4VXLANTunnelAddr: '10.0.0.256'"),
        ({"ipv4VXLANTunnelAddr": "010.0.0.1"}, "spec.ipv4VXLANTunnelAddr: '010.0.0.1'"),
        ({"bgp": {"ipv4Address": "10.0.0.1/33"}}, "spec.bgp.ipv4Address: '10.0.0.1/33'"),
        ({"bgp": {"ipv4Address": "fd00::1/64"}}, "spec.bgp.ipv4Address: 'fd00::1/64'"),
        ({"bgp": {"ipv4Address": 7}}, "spec.bgp.ipv4Address: expected a string, got number 7"),
        ({"vxlanTunnelMACAddr": "66-0a"}, "spec.vxlanTunnelMACAddr: '66-0a'"),
        ({"bogus": 1}, "spec.bogus: unknown field"),
    ],
)
def test_bad_stored_node_names_field_and_value(spec: dict[str, Any], message: str) -> None:
    doc = {"apiVersion": API_VERSION, "kind": "Node", "metadata": {"name": "n1"}, "spec": spec}
    with pytest.raises(ResourceError, match=f'^stored resource /k: Node "n1": {message}'):
        decode("/k", json.dumps(doc))


@given(_v4_text)
def test_canonical_network_equals_netaddr(text: str) -> None:
    fast = canonical_network(text)
    if fast is not None:  # repr shows value and prefix length
        assert repr(fast) == repr(netaddr.IPNetwork(text))


@pytest.mark.parametrize("text", ['{"a": [1, null]}', ' {"a":1} ', "[]", '"x"', "1"])
def test_load_json_equals_json_loads(text: str) -> None:
    assert load_json(text) == json.loads(text)


@pytest.mark.parametrize("text", ["", "{", '{"a":1} x', "\ufeff{}", "nul"])
def test_load_json_raises_json_loads_error(text: str) -> None:
    with pytest.raises(ValueError) as expected:
        json.loads(text)
    with pytest.raises(ValueError, match=f"^{re.escape(str(expected.value))}$"):
        load_json(text)


def test_to_manifest_round_trip_of_a_node_without_fields() -> None:
    node = Node(name="bare")
    assert _stored_node(to_manifest(node)) == node


def _decode_outcome(decoder: Any, text: str) -> tuple[str, str]:
    try:
        return ("ok", repr(decoder("/k", text)))
    except (ResourceError, ValueError) as e:
        return ("error", str(e))


def _full_decode(key: str, text: str) -> Any:
    """decode() as it was, without the text shortcut: the JSON parse, then from_manifest."""
    try:
        return from_manifest(load_json(text))
    except ValueError as e:  # ResourceError too
        raise ResourceError(f"stored resource {key}: {e}") from None


_spec_key = st.sampled_from(
    ["ipv4VXLANTunnelAddr", "ipv6VXLANTunnelAddr", "vxlanTunnelMACAddr", "vxlanTunnelMACAddrV6"]
)
_bgp_key = st.sampled_from(["ipv4Address", "ipv4IPIPTunnelAddr", "ipv6Address"])
_text_value = st.one_of(_value, _mac, st.sampled_from(['a"b', "a\\b", "\x01", "é", "{}"]))


@given(
    name=st.sampled_from(["n1", "N1", "a" * 254, "", "n\u00e9", 'n"1', "-n"]),
    spec=st.dictionaries(_spec_key, _text_value),
    bgp=st.one_of(st.none(), st.dictionaries(_bgp_key, _text_value)),
    labels=st.one_of(st.none(), st.just({"a": "1"})),
    sort=st.booleans(),
    edit=st.sampled_from(["", ",", "{", "}", '"', " ", "\\"]),
    data=st.data(),
)
def test_stored_text_shortcut_equals_json_decode(
    name: str,
    spec: dict[str, Any],
    bgp: dict[str, Any] | None,
    labels: dict[str, str] | None,
    sort: bool,
    edit: str,
    data: st.DataObject,
) -> None:
    """decode()'s regex over encode()'s text gives what parsing the JSON gives: the same Node
    or the same error, also for texts in another key order, with escapes, or damaged."""
    meta: dict[str, Any] = {"name": name} if labels is None else {"name": name, "labels": labels}
    body = dict(spec) if bgp is None else {"bgp": bgp, **spec}
    doc = {"apiVersion": API_VERSION, "kind": "Node", "metadata": meta, "spec": body}
    text = json.dumps(doc, sort_keys=sort, separators=(",", ":"), ensure_ascii=sort)
    # Edits where the structure is: right after a brace or a comma, or anywhere.
    marks = [i + 1 for i, char in enumerate(text) if char in "{,"]
    at = data.draw(st.one_of(st.sampled_from(marks), st.integers(0, len(text))))
    for candidate in (text, text[:at] + edit + text[at:]):
        assert _decode_outcome(decode, candidate) == _decode_outcome(_full_decode, candidate)


def test_stored_text_shortcut_takes_what_the_store_writes() -> None:
    node = Node(
        name="n1",
        ipv4_address=netaddr.IPNetwork("10.0.1.5/24"),
        ipv6_address=netaddr.IPNetwork("fd00::5/64"),
        ipv4_ipip_tunnel_addr=netaddr.IPAddress("10.244.0.2"),
        ipv4_vxlan_tunnel_addr=netaddr.IPAddress("10.244.0.1"),
        vxlan_tunnel_mac="66:0a:0b:0c:0d:0e",
    )
    node_text = store._stored_node_text(encode(node))
    assert node_text == node and repr(node_text) == repr(node)
    assert store._stored_node_text(encode(Node(name="n2"))) == Node(name="n2")


_HEAD = '{"apiVersion":"overlay.dev/v1","kind":"Node","metadata":{"name":"n1"},"spec":{'


@pytest.mark.parametrize(
    "spec",
    [
        '"bgp":{"ipv4Address":"10.0.0.1/24"},"ipv4VXLANTunnelAddr":"10.0.0.2"}}',  # valid
        ',"ipv4VXLANTunnelAddr":"10.0.0.2"}}',
        '"bgp":{,"ipv4Address":"10.0.0.1/24"}}}',
        '"bgp":{"ipv4Address":"10.0.0.1/24""ipv6Address":"fd00::1/64"}}}',
        '"bgp":{"ipv4Address":"10.0.0.1/24",}}}',
        '"bgp":{"ipv4Address":"10.0.0.1/24"}"ipv4VXLANTunnelAddr":"10.0.0.2"}}',
        '"ipv4VXLANTunnelAddr":"10.0.0.2","bgp":{"ipv4Address":"10.0.0.1/24"}}}',
        '"ipv4VXLANTunnelAddr":"10.0.0.2\x01"}}',
        '"ipv4VXLANTunnelAddr":"10.0.0.2"}} ',
    ],
)
def test_stored_text_shortcut_refuses_what_json_refuses(spec: str) -> None:
    text = _HEAD + spec
    assert _decode_outcome(decode, text) == _decode_outcome(_full_decode, text)


_v6_value = st.integers(0, 2**128 - 1)


@given(_v6_value, st.integers(0, 128), st.booleans())
def test_canonical_network_reads_ipv6_as_netaddr_does(
    value: int, prefixlen: int, bare: bool
) -> None:
    address = netaddr.IPAddress(value, 6)
    for written in (socket.inet_ntop(socket.AF_INET6, address.packed), str(address)):
        text = written if bare else f"{written}/{prefixlen}"
        fast = canonical_network(text)
        if written == str(address) and fast is None:
            continue  # netaddr's own spelling may differ from inet_ntop's: the full path
        assert fast is not None and repr(fast) == repr(netaddr.IPNetwork(text))


@pytest.mark.parametrize(
    "text", ["fd00::1/129", "FD00::1/64", "fd00:0::1", "fd00::1/064", "::ffff:1.2.3.4x"]
)
def test_non_canonical_ipv6_text_is_left_to_the_full_parser(text: str) -> None:
    assert canonical_network(text) is None


def test_decoding_ipv6_nodes_leaves_no_garbage_for_the_cyclic_collector() -> None:
    """netaddr's string parser leaves reference cycles per IPv6 address; the agent pauses
    the collector during its first pass, so a listing of 10k IPv6 nodes used to pile up
    ~120 MiB of them."""
    underlays = [netaddr.IPNetwork(f"fd00:64::{i:x}/64") for i in range(200)]
    nodes = [
        encode(
            Node(
                name=f"n{i}",
                ipv6_address=underlay,
                ipv6_vxlan_tunnel_addr=netaddr.IPAddress(f"fd00:10:0:{i:x}::"),
            )
        )
        for i, underlay in enumerate(underlays)
    ]
    gc.collect()
    gc.disable()
    try:
        decoded = [decode("/k", text) for text in nodes]
        assert gc.collect() == 0
    finally:
        gc.enable()
    assert [str(n.ipv6_address) for n in decoded] == list(map(str, underlays))  # type: ignore[union-attr]
