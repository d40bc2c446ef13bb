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


def test_exhaustion_only_when_every_pool_for_the_node_is_full() -> None:
    import netaddr

    from ipam.allocator import PoolUsage, Utilization
    from ipam.model import IPPool
    from overlay.cni_service import exhaustion

    def pool(name: str, cidr: str, **kw: object) -> IPPool:
        return IPPool(name, netaddr.IPNetwork(cidr), 30, **kw)  # type: ignore[arg-type]

    def usage(name: str, cidr: str, free: int) -> PoolUsage:
        return PoolUsage(name, netaddr.IPNetwork(cidr), False, 4, 4 - free, 0, free, [])

    pools = [pool("a", "10.1.0.0/30"), pool("b", "10.2.0.0/30", node_selector="zone == 'x'")]
    full = Utilization([usage("a", "10.1.0.0/30", 0), usage("b", "10.2.0.0/30", 3)], [])
    # Node outside zone x: only pool a applies, and it is full.
    assert "a (10.1.0.0/30)" in (exhaustion(full, pools, {}) or "")
    # In zone x pool b still has room.
    assert exhaustion(full, pools, {"zone": "x"}) is None
    disabled = [pool("a", "10.1.0.0/30", disabled=True)]
    assert exhaustion(full, disabled, {}) == "no enabled IPv4 pool for pods selects this node"
    # Pool b has room but serves tunnel addresses only, or only requests that name it.
    for only in ({"allowed_uses": frozenset({"Tunnel"})}, {"assignment_mode": "Manual"}):
        pools = [pool("a", "10.1.0.0/30"), pool("b", "10.2.0.0/30", **only)]
        assert "a (10.1.0.0/30)" in (exhaustion(full, pools, {}) or ""), only
