"""The agent's IPAM adapter for CNI: pools named in a config, by CIDR or by name."""

from __future__ import annotations

import netaddr
import pytest

from cni.spec import INVALID_CONFIG, CniError
from ipam.allocator import IPAM
from ipam.datastore import open_datastore
from ipam.model import IPPool
from ipam.store import ResourceStore
from overlay.cni_service import CniIpam


@pytest.fixture
def adapter() -> CniIpam:
    ds = open_datastore("memory://")
    store = ResourceStore(ds)
    for name, cidr in (("default-ipv4", "10.244.0.0/16"), ("batch", "10.66.0.0/16")):
        store.apply(IPPool(name, netaddr.IPNetwork(cidr), 26))
    return CniIpam(IPAM(ds, store), store)


def _in(address: str, cidr: str) -> bool:
    return netaddr.IPNetwork(address).ip in netaddr.IPNetwork(cidr)


def test_pools_by_cidr_and_by_name_choose_the_pool(adapter: CniIpam) -> None:
    attrs = {"node": "n1"}
    v4, _ = adapter.auto_assign("net.a", "n1", 1, 0, attrs, pools=["10.66.0.0/16"])
    assert _in(v4[0], "10.66.0.0/16")
    v4, _ = adapter.auto_assign("net.b", "n1", 1, 0, attrs, pools=["default-ipv4"])
    assert _in(v4[0], "10.244.0.0/16")
    v4, _ = adapter.auto_assign("net.c", "n1", 1, 0, attrs, pools=["batch"])
    assert _in(v4[0], "10.66.0.0/16")


def test_unknown_pool_name_is_a_config_error_naming_it(adapter: CniIpam) -> None:
    with pytest.raises(CniError) as err:
        adapter.auto_assign("net.a", "n1", 1, 0, {}, pools=["no-such-pool"])
    assert err.value.code == INVALID_CONFIG and "'no-such-pool'" in err.value.msg
    with pytest.raises(CniError) as err:
        adapter.auto_assign("net.a", "n1", 1, 0, {}, pools=["10.66.0.0/99"])
    assert err.value.code == INVALID_CONFIG and "10.66.0.0/99" in err.value.msg
    assert adapter.allocations_for_node("n1") == {}  # nothing was assigned
