from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable

import netaddr
import pytest

from ipam.datastore.base import Conflict
from ipam.datastore.memory import MemoryDatastore
from ipam.model import EncapMode, IPAMConfig, IPPool, IPReservation, Node
from ipam.resources import ResourceError, parse_documents
from ipam.store import (
    CLUSTER_INFO_KEY,
    ResourceNotFound,
    ResourceStore,
    parse_key,
    resource_key,
)


def pool(name: str = "p1", cidr: str = "10.244.0.0/16", **kw: object) -> IPPool:
    kw.setdefault("block_size", 26)
    return IPPool(name=name, cidr=netaddr.IPNetwork(cidr), **kw)  # type: ignore[arg-type]


@pytest.fixture
def ds() -> MemoryDatastore:
    return MemoryDatastore()


@pytest.fixture
def store(ds: MemoryDatastore) -> ResourceStore:
    return ResourceStore(ds)


def test_apply_created_configured_unchanged(store: ResourceStore, ds: MemoryDatastore) -> None:
    assert store.apply(pool()) == "created"
    assert store.apply(pool()) == "unchanged"
    rev = ds.revision()
    assert store.apply(pool()) == "unchanged"
    assert ds.revision() == rev  # unchanged writes nothing
    assert store.apply(pool(nat_outgoing=True, vxlan_mode=EncapMode.ALWAYS)) == "configured"
    got = store.get_pool("p1")
    assert got is not None and got.nat_outgoing and got.vxlan_mode is EncapMode.ALWAYS


def test_stored_value_is_our_manifest_json(store: ResourceStore, ds: MemoryDatastore) -> None:
    store.apply(pool())
    kv = ds.get("/overlay/v1/resources/ippools/p1")
    assert kv is not None
    doc = json.loads(kv.value)
    assert doc["apiVersion"] == "overlay.dev/v1" and doc["kind"] == "IPPool"
    assert doc["spec"]["cidr"] == "10.244.0.0/16" and doc["spec"]["blockSize"] == 26


def test_calico_manifest_applies_through_the_store(store: ResourceStore) -> None:
    [res] = parse_documents(
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: default-ipv4-ippool}\n"
        "spec: {cidr: 192.168.0.0/16, ipipMode: Always, natOutgoing: true}\n"
    )
    assert store.apply(res) == "created"
    assert store.list_pools() == [res]
    assert store.apply(res) == "unchanged"


def test_overlapping_pool_is_refused_and_nothing_written(
    store: ResourceStore, ds: MemoryDatastore
) -> None:
    store.apply(pool("a", "10.244.0.0/16"))
    rev = ds.revision()
    with pytest.raises(ResourceError) as exc:
        store.apply(pool("b", "10.244.128.0/24"))
    msg = str(exc.value)
    assert 'IPPool "b"' in msg and "10.244.128.0/24" in msg
    assert 'IPPool "a"' in msg and "10.244.0.0/16" in msg
    with pytest.raises(ResourceError, match='IPPool "a"'):
        store.apply(pool("c", "10.0.0.0/8"))  # the new pool contains the old one
    assert ds.revision() == rev
    assert store.get_pool("b") is None and store.get_pool("c") is None


def test_disjoint_pools_and_other_families_coexist(store: ResourceStore) -> None:
    store.apply(pool("a", "10.244.0.0/24"))
    assert store.apply(pool("b", "10.244.1.0/24")) == "created"
    assert store.apply(pool("v6", "fd00::/64", block_size=122)) == "created"
    assert [p.name for p in store.list_pools()] == ["a", "b", "v6"]


@pytest.mark.parametrize(
    ("changed", "fragments"),
    [
        (pool(cidr="10.245.0.0/16"), ["spec.cidr", "10.244.0.0/16", "10.245.0.0/16", "immutable"]),
        (pool(cidr="10.244.0.0/15"), ["spec.cidr", "10.244.0.0/15", "immutable"]),
        (pool(block_size=24), ["spec.blockSize", "26", "24", "immutable"]),
    ],
)
def test_pool_cidr_and_block_size_are_immutable(
    store: ResourceStore, ds: MemoryDatastore, changed: IPPool, fragments: list[str]
) -> None:
    store.apply(pool())
    rev = ds.revision()
    with pytest.raises(ResourceError) as exc:
        store.apply(changed)
    for fragment in fragments:
        assert fragment in str(exc.value)
    assert ds.revision() == rev
    assert store.get_pool("p1") == pool()


def test_invalid_typed_value_is_refused_before_writing(
    store: ResourceStore, ds: MemoryDatastore
) -> None:
    with pytest.raises(ResourceError, match=r"spec\.blockSize: 40"):
        store.apply(pool(block_size=40))
    with pytest.raises(ResourceError, match=r"spec\.nodeSelector"):
        store.apply(pool(node_selector="zone ="))
    assert ds.revision() == 0


def test_delete_any_kind_spelling(store: ResourceStore) -> None:
    store.apply(pool())
    store.apply(Node(name="n1"))
    store.delete("ippools", "p1")
    store.delete("Node", "n1")
    assert store.list_pools() == [] and store.list_nodes() == []
    with pytest.raises(ResourceNotFound, match='IPPool "p1" not found'):
        store.delete("ippool", "p1")
    with pytest.raises(ResourceError, match="unknown resource kind 'pod'"):
        store.delete("pod", "x")


def test_get_and_list_generic(store: ResourceStore) -> None:
    store.apply(pool())
    assert store.get("IPPool", "p1") == pool()
    assert store.list("ippools") == [pool()]
    with pytest.raises(ResourceNotFound, match='Node "ghost" not found'):
        store.get("node", "ghost")
    # the IPAM config always exists (Calico returns defaults in memory)
    assert store.get("ipamconfig", "default") == IPAMConfig()
    assert store.list("IPAMConfiguration") == [IPAMConfig()]


def test_defaults_when_nothing_stored(store: ResourceStore) -> None:
    assert store.ipam_config() == IPAMConfig(
        strict_affinity=False, max_blocks_per_host=0, auto_allocate_blocks=True
    )
    assert store.list_pools() == [] and store.list_nodes() == []
    assert store.list_reservations() == []
    assert store.get_node("n1") is None and store.get_pool("p1") is None


def test_ipam_config_and_reservations(store: ResourceStore, ds: MemoryDatastore) -> None:
    cfg = IPAMConfig(strict_affinity=True, max_blocks_per_host=2)
    assert store.apply(cfg) == "created"
    assert ds.get("/overlay/v1/resources/ipamconfigs/default") is not None
    assert store.ipam_config() == cfg
    res = IPReservation(name="r1", reserved_cidrs=(netaddr.IPNetwork("10.244.0.0/30"),))
    store.apply(res)
    assert store.list_reservations() == [res]


def test_node_put_get_keeps_prefix(store: ResourceStore) -> None:
    node = Node(
        name="n1",
        labels={"zone": "a"},
        ipv4_address=netaddr.IPNetwork("10.0.1.5/24"),
        ipv4_vxlan_tunnel_addr=netaddr.IPAddress("10.244.0.1"),
    )
    assert store.put_node(node) == "created"
    got = store.get_node("n1")
    assert got == node and str(got.ipv4_address) == "10.0.1.5/24"
    assert store.put_node(node) == "unchanged"
    # 10.0.1.5/24 and 10.0.1.9/24 compare equal as IPNetworks; the store must still see it.
    moved = dataclasses.replace(node, ipv4_address=netaddr.IPNetwork("10.0.1.9/24"))
    assert store.put_node(moved) == "configured"
    got = store.get_node("n1")
    assert got is not None and str(got.ipv4_address) == "10.0.1.9/24"
    assert store.list_nodes() == [moved]


def test_update_node_keeps_operator_labels(store: ResourceStore) -> None:
    store.apply(Node(name="n1", labels={"zone": "a"}))

    def register(name: str) -> Callable[[Node | None], Node]:
        def change(cur: Node | None) -> Node:
            base = cur or Node(name=name)
            return dataclasses.replace(base, ipv4_address=netaddr.IPNetwork("10.0.1.5/24"))

        return change

    node = store.update_node("n1", register("n1"))
    assert node.labels == {"zone": "a"}
    assert store.get_node("n1") == node
    created = store.update_node("n2", register("n2"))
    assert store.get_node("n2") == created and created.labels == {}


def test_apply_retries_on_conflict_then_succeeds(ds: MemoryDatastore) -> None:
    store = ResourceStore(ds)
    store.apply(pool())
    losses = iter([True, True, False])
    ds.inject_conflict = lambda op, key: next(losses, False)
    assert store.apply(pool(nat_outgoing=True)) == "configured"
    assert store.get_pool("p1") == pool(nat_outgoing=True)


def test_apply_gives_up_after_bounded_conflicts(ds: MemoryDatastore) -> None:
    store = ResourceStore(ds, max_attempts=3)
    store.apply(pool())
    ds.inject_conflict = lambda op, key: True
    with pytest.raises(Conflict, match="after 3 attempts"):
        store.apply(pool(nat_outgoing=True))
    ds.inject_conflict = None
    assert store.get_pool("p1") == pool()


def test_cluster_info_guid_is_created_once(ds: MemoryDatastore) -> None:
    results: list[str] = []

    def worker() -> None:
        results.append(ResourceStore(ds).cluster_info()["guid"])

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(results) == 4 and len(set(results)) == 1
    kv = ds.get(CLUSTER_INFO_KEY)
    assert kv is not None and json.loads(kv.value)["guid"] == results[0]


def test_keys_round_trip() -> None:
    key = resource_key("ippool", "p1")
    assert key == "/overlay/v1/resources/ippools/p1"
    assert parse_key(key) == ("IPPool", "p1")
    assert parse_key("/overlay/v1/resources/nodes/n1") == ("Node", "n1")
    assert parse_key(CLUSTER_INFO_KEY) is None
    assert parse_key("/overlay/v1/resources/widgets/x") is None


def test_corrupt_stored_value_names_its_key(store: ResourceStore, ds: MemoryDatastore) -> None:
    ds.create("/overlay/v1/resources/nodes/bad", '{"kind": "Node"}')
    with pytest.raises(ResourceError, match="stored resource /overlay/v1/resources/nodes/bad"):
        store.list_nodes()
