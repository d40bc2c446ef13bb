"""The agent's settings: bad values are refused at start, naming the setting and the value."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from overlay.agent import Agent, AgentConfig


def config(tmp_path: Path, **kw: object) -> AgentConfig:
    return AgentConfig("n1", "memory://", tmp_path, str(tmp_path / "s"), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1.0, math.nan])
def test_a_bad_check_interval_is_refused_naming_it(tmp_path: Path, bad: float) -> None:
    with pytest.raises(ValueError, match=rf"underlay_check_interval: {bad!r} is not a number"):
        Agent(config(tmp_path, underlay_check_interval=bad))


@pytest.mark.parametrize("bad", ["10.0.0.5/24", "fd00::1/64", "not-an-address", "10.0.0.0/33"])
def test_a_bad_external_node_is_refused_naming_it(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match=rf"external_nodes: {bad!r} is not an IP address"):
        Agent(config(tmp_path, external_nodes=("192.0.2.7", bad)))


def test_external_nodes_reach_the_dataplane_merged(tmp_path: Path) -> None:
    agent = Agent(config(tmp_path, external_nodes=("192.0.2.7", "192.0.2.0/25", "198.51.100.0/24")))
    nets = {str(n) for n in agent._dataplane_cfg.external_nodes}
    assert nets == {"192.0.2.0/25", "198.51.100.0/24"}  # the /32 lies inside the /25
    # IPv6 networks are for vxlan-v6.calico's filter (an IPv6 underlay), merged apart.
    both = Agent(config(tmp_path, external_nodes=("192.0.2.0/25", "fd00:1::/64", "fd00:1::5")))
    nets = {str(n) for n in both._dataplane_cfg.external_nodes}
    assert nets == {"192.0.2.0/25", "fd00:1::/64"}


@pytest.mark.parametrize(
    ("option", "bad", "expect"),
    [
        ("vxlan_vni", 0, "vxlan_vni: 0 is outside 1..16777215"),
        ("vxlan_port", 65536, "vxlan_port: 65536 is outside 1..65535"),
        ("vxlan_mtu", 40, "vxlan_mtu: 40 is outside 68..65535"),
        ("ipip_mtu", 70000, "ipip_mtu: 70000 is outside 68..65535"),
        ("resync_interval", -1.0, "resync_interval: -1.0 is not a number of seconds >= 0"),
        ("checksum_offload_broken", "maybe", "checksum_offload_broken: 'maybe' is not one of"),
        ("nat_outgoing_address", "fd00::1", "nat_outgoing_address: 'fd00::1' is not an IPv4"),
        ("nat_outgoing_address", "x", "nat_outgoing_address: 'x' is not an IPv4 address"),
        ("log_level", "loud", "log_level: 'loud' is not one of debug, info"),
    ],
)
def test_a_bad_dataplane_flag_is_refused_naming_it(
    tmp_path: Path, option: str, bad: object, expect: str
) -> None:
    with pytest.raises(ValueError, match=expect):
        Agent(config(tmp_path, **{option: bad}))


def test_dataplane_flags_reach_the_dataplane_and_win_over_felix_configurations(
    tmp_path: Path,
) -> None:
    from ipam.model import FelixConfiguration

    agent = Agent(config(tmp_path, vxlan_port=8472, vxlan_mtu=1400))
    cluster = FelixConfiguration("default", vxlan_vni=4097, vxlan_port=9999, ipip_mtu=1460)
    agent._follow_settings({"default": cluster})
    cfg = agent._dataplane_cfg
    assert (cfg.vxlan_vni, cfg.vxlan_port, cfg.vxlan_mtu, cfg.ipip_mtu) == (4097, 8472, 1400, 1460)
    assert agent.status()["settings"]["vxlan_port"] == {"value": 8472, "source": "flag"}
    agent._follow_settings({})  # the cluster's configuration deleted
    assert (agent._dataplane_cfg.vxlan_vni, agent._dataplane_cfg.ipip_mtu) == (4096, None)


def test_settings_at_start_come_from_the_datastore_and_a_corrupt_record_counts_as_absent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from ipam.datastore.sqlite import SqliteDatastore
    from ipam.model import FelixConfiguration
    from ipam.store import ResourceStore, resource_key

    ds = SqliteDatastore(tmp_path / "s.db")
    try:
        store = ResourceStore(ds)
        store.apply(FelixConfiguration("default", vxlan_port=8472, vxlan_mtu=1400))
        ds.create(resource_key("FelixConfiguration", "node.n1"), '{"kind": "Felix')
        agent = Agent(config(tmp_path))
        with caplog.at_level("WARNING", logger="overlay.agent"):
            agent._start_settings(store)
        assert (agent._dataplane_cfg.vxlan_port, agent._dataplane_cfg.vxlan_mtu) == (8472, 1400)
        assert "event=bad_record kind=FelixConfiguration name=node.n1" in caplog.text
    finally:
        ds.close()


def test_both_autodetections_none_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both 'none' leave this node without an underlay"):
        Agent(config(tmp_path, autodetect="none"))
    assert Agent(config(tmp_path, autodetect="none", autodetect6="interface=eth0"))
