"""The agent-side verbs with a fake IPAM and fake plumbing: flows, rollback, result shape."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pytest

from cni import spec
from cni.handlers import CniRequestHandler, handle_id, workload_id
from cni.pod import PodLink
from cni.spec import CniError

NETNS = "/var/run/netns/p1"


class FakeIpam:
    def __init__(self) -> None:
        self.held: dict[str, list[str]] = {}
        self.attrs: dict[str, dict[str, str]] = {}
        self.released: list[str] = []
        self.fail_release = False
        self.give: tuple[list[Any], list[Any]] = (["10.65.0.5/26"], ["fd00:65::5/122"])

    def auto_assign(
        self, handle: str, node: str, num4: int, num6: int, attrs: dict[str, str]
    ) -> tuple[Sequence[Any], Sequence[Any]]:
        v4, v6 = self.give[0][:num4], self.give[1][:num6]
        self.held[handle] = [*map(str, v4), *map(str, v6)]
        self.attrs[handle] = attrs
        return v4, v6

    def assign_ip(self, ip: str, handle: str, node: str, attrs: dict[str, str]) -> None:
        self.held.setdefault(handle, []).append(ip)

    def release_by_handle(self, handle: str) -> None:
        if self.fail_release:
            raise RuntimeError("datastore down")
        self.released.append(handle)
        self.held.pop(handle, None)

    def handles_for_node(self, node: str) -> Iterable[str]:
        return list(self.held)


class FakePlumbing:
    def __init__(self) -> None:
        self.pods: dict[tuple[str, str], list[str]] = {}
        self.fail_setup: Exception | None = None
        self.problems: list[str] = []
        self.setup_args: tuple[object, ...] = ()

    def setup(
        self, netns: str, ifname: str, workload: str, addresses: Sequence[str], mtu: int, mac: str
    ) -> PodLink:
        self.setup_args = (netns, ifname, workload, list(addresses), mtu, mac)
        if self.fail_setup:
            raise self.fail_setup
        self.pods[(netns, ifname)] = list(addresses)
        return PodLink("cali0123456789a", ifname, mac or "0a:00:00:00:00:01", mtu, list(addresses))

    def teardown(self, netns: str, ifname: str) -> bool:
        return self.pods.pop((netns, ifname), None) is not None

    def inspect(
        self, netns: str, ifname: str, workload: str, addresses: Sequence[str], mac: str
    ) -> list[str]:
        return self.problems


def make(**conf_over: object) -> tuple[CniRequestHandler, FakeIpam, FakePlumbing]:
    ipam, plumbing = FakeIpam(), FakePlumbing()
    return CniRequestHandler(ipam, "node-1", lambda: 1450, plumbing), ipam, plumbing


def env(verb: str = "ADD", cid: str = "c1") -> spec.CniEnv:
    return spec.parse_env(
        {
            "CNI_COMMAND": verb,
            "CNI_CONTAINERID": cid,
            "CNI_NETNS": NETNS,
            "CNI_IFNAME": "eth0",
            "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
        }
    )


def conf(verb: str = "ADD", **over: object) -> spec.NetConf:
    base: dict[str, object] = {"cniVersion": "1.1.0", "name": "net1", "type": "overlay-cni"}
    base.update(over)
    return spec.parse_cni_config(base, verb)


def test_ids_follow_calico() -> None:
    assert handle_id("k8s-pod-network", "abc") == "k8s-pod-network.abc"
    assert workload_id(env()) == "default.web-0"
    bare = spec.parse_env({"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "abc", "CNI_IFNAME": "eth0"})
    assert workload_id(bare) == "abc"


def test_add_assigns_plumbs_and_returns_calico_shaped_result() -> None:
    h, ipam, plumbing = make()
    c = conf(ipam={"type": "overlay-ipam", "assignIPv6": True}, dns={"nameservers": ["10.0.0.10"]})
    result = h.handle("ADD", "cni", env(), c)
    assert ipam.attrs["net1.c1"] == {
        "node": "node-1", "namespace": "default", "pod": "web-0",
        "container_id": "c1", "ifname": "eth0", "network": "net1",
    }  # fmt: skip
    # MTU from the agent when the config says 0; the workload id names the host veth.
    assert plumbing.setup_args == (
        NETNS, "eth0", "default.web-0", ["10.65.0.5/26", "fd00:65::5/122"], 1450, ""
    )  # fmt: skip
    assert result is not None
    assert result["interfaces"] == [
        {"name": "cali0123456789a"},
        {"name": "eth0", "mac": "0a:00:00:00:00:01", "sandbox": NETNS, "mtu": 1450},
    ]
    assert result["ips"] == [
        {"address": "10.65.0.5/32", "interface": 1},
        {"address": "fd00:65::5/128", "interface": 1},
    ]
    assert result["routes"] == [
        {"dst": "0.0.0.0/0", "gw": "169.254.1.1"},
        {"dst": "::/0", "gw": "fe80::ecee:eeff:feee:eeee"},
    ]
    assert result["dns"] == {"nameservers": ["10.0.0.10"]}


class PoolIpam(FakeIpam):
    """Records the pools= keyword of each auto_assign call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int, list[str] | None]] = []

    def auto_assign(  # type: ignore[override]
        self,
        handle: str,
        node: str,
        num4: int,
        num6: int,
        attrs: dict[str, str],
        pools: list[str] | None = None,
    ) -> tuple[Sequence[Any], Sequence[Any]]:
        self.calls.append((num4, num6, pools))
        v4, v6 = self.give[0][:num4], self.give[1][:num6]
        self.held.setdefault(handle, []).extend([*map(str, v4), *map(str, v6)])
        return v4, v6


def test_add_takes_addresses_from_the_configured_pools_per_family() -> None:
    ipam = PoolIpam()
    h = CniRequestHandler(ipam, "node-1", lambda: 1450, FakePlumbing())
    c = conf(ipam={"type": "overlay-ipam", "assignIPv6": True, "ipv4Pools": ["10.66.0.0/16"]})
    result = h.handle("ADD", "cni", env(), c)
    # IPv4 from the named pool only; IPv6, which names none, from the node's usual pools.
    assert ipam.calls == [(1, 0, ["10.66.0.0/16"]), (0, 1, None)]
    assert result is not None
    ips: Any = result["ips"]
    assert [ip["address"] for ip in ips] == ["10.65.0.5/32", "fd00:65::5/128"]
    # Without pool lists the IPAM is asked once, without the keyword (older backends).
    plain = PoolIpam()
    CniRequestHandler(plain, "node-1", lambda: 1450, FakePlumbing()).handle(
        "ADD", "cni", env(cid="c2"), conf()
    )
    assert plain.calls == [(1, 0, None)]


def test_add_pool_failure_in_second_family_releases_the_first() -> None:
    class Failing6(PoolIpam):
        def auto_assign(self, *a: Any, **kw: Any) -> tuple[Sequence[Any], Sequence[Any]]:  # type: ignore[override]
            if a[3]:  # num6
                raise RuntimeError("requested pool fd00:66::/64 is not a configured IP pool")
            return super().auto_assign(*a, **kw)

    ipam = Failing6()
    h = CniRequestHandler(ipam, "node-1", lambda: 1450, FakePlumbing())
    c = conf(ipam={"type": "overlay-ipam", "assignIPv6": True, "ipv6Pools": ["fd00:66::/64"]})
    with pytest.raises(CniError) as err:
        h.handle("ADD", "cni", env(), c)
    assert err.value.code == spec.IPAM_FAILURE and "fd00:66::/64" in err.value.msg
    assert ipam.released == ["net1.c1"] and "net1.c1" not in ipam.held


def test_add_with_requested_ip_and_mac_and_mtu() -> None:
    h, ipam, plumbing = make()
    c = conf(mtu=1400, runtimeConfig={"ips": ["10.65.0.9"], "mac": "0a:58:0a:41:00:09"})
    h.handle("ADD", "cni", env(), c)
    assert ipam.held["net1.c1"] == ["10.65.0.9"]
    assert plumbing.setup_args[3:] == (["10.65.0.9/32"], 1400, "0a:58:0a:41:00:09")


def test_add_failure_in_plumbing_releases_the_address() -> None:
    h, ipam, plumbing = make()
    plumbing.fail_setup = OSError("netlink said no")
    with pytest.raises(CniError) as info:
        h.handle("ADD", "cni", env(), conf())
    assert info.value.code == spec.DATAPLANE_FAILURE and "netlink said no" in info.value.msg
    assert ipam.released == ["net1.c1"] and ipam.held == {}


def test_add_cni_error_from_plumbing_passes_through_and_rollback_errors_do_not_mask_it() -> None:
    h, ipam, plumbing = make()
    plumbing.fail_setup = CniError(spec.INVALID_NETNS, "cannot open netns")
    ipam.fail_release = True
    with pytest.raises(CniError) as info:
        h.handle("ADD", "cni", env(), conf())
    assert info.value.code == spec.INVALID_NETNS


def test_add_short_ipam_answer_is_an_error_and_rolls_back() -> None:
    h, ipam, _ = make()
    ipam.give = ([], [])
    with pytest.raises(CniError) as info:
        h.handle("ADD", "cni", env(), conf())
    assert info.value.code == spec.IPAM_FAILURE and "0 IPv4" in info.value.msg
    assert ipam.released == ["net1.c1"]


def test_add_result_after_failure_in_result_building_tears_down() -> None:
    h, ipam, plumbing = make()

    def bad_result(*args: object) -> dict[str, object]:
        raise RuntimeError("late failure")

    h._cni_result = bad_result  # type: ignore[method-assign,assignment]
    with pytest.raises(RuntimeError):
        h.handle("ADD", "cni", env(), conf())
    assert plumbing.pods == {} and ipam.held == {}


def test_ipam_plugin_add_returns_abbreviated_result() -> None:
    h, _, plumbing = make()
    c = spec.parse_ipam_config(
        {"cniVersion": "0.4.0", "name": "n", "type": "ptp", "ipam": {"type": "overlay-ipam"}}
    )
    result = h.handle("ADD", "ipam", env(), c)
    assert result == {
        "cniVersion": "0.4.0",
        "ips": [{"version": "4", "address": "10.65.0.5/26"}],
        "routes": [{"dst": "0.0.0.0/0"}],
    }
    assert plumbing.setup_args == ()


def test_del_is_idempotent_and_releases() -> None:
    h, ipam, plumbing = make()
    h.handle("ADD", "cni", env(), conf())
    assert h.handle("DEL", "cni", env("DEL"), conf("DEL")) is None
    assert h.handle("DEL", "cni", env("DEL"), conf("DEL")) is None
    assert plumbing.pods == {} and ipam.released == ["net1.c1", "net1.c1"]


def test_del_keeps_the_address_when_teardown_fails() -> None:
    h, ipam, plumbing = make()
    h.handle("ADD", "cni", env(), conf())

    def broken(netns: str, ifname: str) -> bool:
        raise OSError("device busy")

    plumbing.teardown = broken  # type: ignore[method-assign]
    with pytest.raises(CniError) as info:
        h.handle("DEL", "cni", env("DEL"), conf("DEL"))
    assert info.value.code == spec.DATAPLANE_FAILURE
    assert "net1.c1" in ipam.held


def test_check_reports_plumbing_differences() -> None:
    h, _, plumbing = make()
    prev = {"cniVersion": "1.1.0", "ips": [{"address": "10.65.0.5/32", "interface": 1}]}
    assert h.handle("CHECK", "cni", env("CHECK"), conf("CHECK", prevResult=prev)) is None
    plumbing.problems = ["host route 10.65.0.5/32 dev cali0123456789a is missing"]
    with pytest.raises(CniError) as info:
        h.handle("CHECK", "cni", env("CHECK"), conf("CHECK", prevResult=prev))
    assert info.value.code == spec.CHECK_FAILED and "host route" in info.value.msg
    with pytest.raises(CniError) as info:
        h.handle("CHECK", "cni", env("CHECK"), conf("CHECK"))
    assert info.value.code == spec.INVALID_CONFIG and "prevResult" in info.value.msg


def test_status_uses_the_injected_probe() -> None:
    ipam, plumbing = FakeIpam(), FakePlumbing()

    def down() -> None:
        raise CniError(spec.NOT_AVAILABLE, "vxlan.calico is missing")

    h = CniRequestHandler(ipam, "node-1", lambda: 1450, plumbing, status=down)
    status_env = spec.parse_env({"CNI_COMMAND": "STATUS"})
    with pytest.raises(CniError) as info:
        h.handle("STATUS", "cni", status_env, conf("STATUS"))
    assert info.value.code == 50
    assert make()[0].handle("STATUS", "cni", status_env, conf("STATUS")) is None


def test_gc_releases_only_this_networks_stale_handles() -> None:
    h, ipam, _ = make()
    for cid in ("live", "dead"):
        h.handle("ADD", "cni", env(cid=cid), conf())
    ipam.held["othernet.x"] = ["10.65.0.99"]
    gc_env = spec.parse_env({"CNI_COMMAND": "GC"})
    valid = [{"containerID": "live", "ifname": "eth0"}]
    h.handle("GC", "cni", gc_env, conf("GC", **{"cni.dev/valid-attachments": valid}))
    assert set(ipam.held) == {"net1.live", "othernet.x"}
    # Without the list (cnitool gc), nothing is released.
    h.handle("GC", "cni", gc_env, conf("GC"))
    assert set(ipam.held) == {"net1.live", "othernet.x"}
