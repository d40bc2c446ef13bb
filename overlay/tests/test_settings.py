"""Which value each dataplane setting takes: flag, then node.<name>, then default, then ours."""

from __future__ import annotations

import netaddr

from ipam.model import FelixConfiguration
from overlay.settings import BUILT_IN, FLAG, Flags, Settings, effective

NODE = "worker-1"


def configs(*items: FelixConfiguration) -> dict[str, FelixConfiguration]:
    return {c.name: c for c in items}


def test_with_nothing_given_every_setting_is_built_in() -> None:
    s = effective(Flags(), {}, NODE)
    assert s == Settings()
    assert (s.vxlan_vni, s.vxlan_port, s.vxlan_mtu, s.resync_interval) == (4096, 4789, None, 90.0)
    assert set(s.sources.values()) == {BUILT_IN}


def test_flag_beats_node_beats_cluster() -> None:
    cluster = FelixConfiguration("default", vxlan_vni=4097, vxlan_port=8472, vxlan_mtu=1400)
    node = FelixConfiguration(f"node.{NODE}", vxlan_port=8473, vxlan_mtu=1300)
    other = FelixConfiguration("node.worker-2", vxlan_vni=9)  # another node's: not ours
    s = effective(Flags(vxlan_mtu=1200), configs(cluster, node, other), NODE)
    assert (s.vxlan_vni, s.vxlan_port, s.vxlan_mtu) == (4097, 8473, 1200)
    assert s.sources["vxlan_vni"] == "FelixConfiguration default"
    assert s.sources["vxlan_port"] == f"FelixConfiguration node.{NODE}"
    assert s.sources["vxlan_mtu"] == FLAG
    assert s.sources["ipip_mtu"] == BUILT_IN


def test_a_node_zero_mtu_overrides_the_cluster_mtu_with_derive() -> None:
    cluster = FelixConfiguration("default", vxlan_mtu=1400, ipip_mtu=1480)
    node = FelixConfiguration(f"node.{NODE}", vxlan_mtu=0)
    s = effective(Flags(), configs(cluster, node), NODE)
    assert (s.vxlan_mtu, s.ipip_mtu) == (None, 1480)
    assert s.sources["vxlan_mtu"] == f"FelixConfiguration node.{NODE}"


def test_calico_values_become_ours() -> None:
    cluster = FelixConfiguration(
        "default",
        route_refresh_interval=0.0,
        checksum_offload_broken=True,
        log_severity_screen="Fatal",
        external_nodes_list=(netaddr.IPNetwork("192.0.2.0/24"),),
        nat_outgoing_address=netaddr.IPAddress("192.0.2.9"),
    )
    s = effective(Flags(), configs(cluster), NODE)
    assert s.nat_outgoing_address == netaddr.IPAddress("192.0.2.9")
    assert s.resync_interval == 0.0  # no periodic resync
    assert s.checksum_offload_broken == "true"
    assert s.log_level == "CRITICAL"
    assert s.external_nodes == (netaddr.IPNetwork("192.0.2.0/24"),)
    # A flag "auto" is given, and so wins over the cluster's "true".
    assert effective(Flags(checksum_offload_broken="auto"), configs(cluster), NODE) == Settings(
        resync_interval=0.0,
        log_level="CRITICAL",
        external_nodes=s.external_nodes,
        nat_outgoing_address=s.nat_outgoing_address,
    )


def test_changed_names_the_values_that_differ_not_the_sources() -> None:
    before = effective(Flags(), configs(FelixConfiguration("default", vxlan_port=8472)), NODE)
    moved = effective(Flags(), configs(FelixConfiguration(f"node.{NODE}", vxlan_port=8472)), NODE)
    assert before == moved and before.changed(moved) == {}
    after = effective(Flags(), {}, NODE)
    assert before.changed(after) == {"vxlan_port": 4789}
