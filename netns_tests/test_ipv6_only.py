"""IPv6-only nodes: agents with --ip-autodetection none (Calico's IP=none).

A lab with --ipv6-only: four nodes on two IPv6 subnets, only an IPv6 pool, IPv6-only pods.
The nodes register no IPv4 underlay address and hold neither vxlan.calico nor tunl0; every
pod pair answers, directly within a subnet and through vxlan-v6.calico across, and each pod
reaches the IPv6 external host through NAT66 (paths read off the wire by `lab check`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from netns_tests.lab_fixtures import LAB_TEST_MARKS, Lab, running_lab
from overlay.lab import check, netns
from overlay.lab import lab as lab_cli
from overlay.model import IPIP_DEVICE, VXLAN6_DEVICE, VXLAN_DEVICE

pytestmark = LAB_TEST_MARKS


@pytest.fixture(scope="module")
def v6only() -> Iterator[Lab]:
    with running_lab(
        nodes=4, subnets=2, mode="cross-subnet", pods_per_node=1, ipv6_only=True
    ) as lab:
        yield lab


def test_every_pair_and_the_external_host_answer_over_ipv6_only(v6only: Lab) -> None:
    _, probes = check.run_check(v6only.name, timeout=120)
    assert probes and {p.family for p in probes} == {6}, probes
    assert all(p.passed for p in probes), [p for p in probes if not p.passed]
    paths = {p.path for p in probes}
    assert paths == {"direct", "vxlan", "nat"}, paths


def test_an_ipv6_only_node_registers_and_holds_ipv6_only(v6only: Lab) -> None:
    node = v6only.node(1)
    stored = json.loads(v6only.overlayctl("get", "node", node.name, "-o", "json"))["spec"]
    assert "ipv4Address" not in stored.get("bgp", {}), stored
    assert stored["bgp"]["ipv6Address"] == node.underlay_ip6
    assert "ipv4VXLANTunnelAddr" not in stored and stored["ipv6VXLANTunnelAddr"], stored
    links = {
        link["ifname"]
        for link in json.loads(netns.run(["ip", "-j", "-n", node.netns, "link", "show"]))
    }
    assert VXLAN6_DEVICE in links and not {VXLAN_DEVICE, IPIP_DEVICE} & links, links
    routes4 = netns.run(["ip", "-n", node.netns, "-4", "route", "show", "proto", "80"])
    assert routes4.strip() == "", routes4  # no IPv4 pool, no IPv4 route of ours
    status = v6only.status(node)
    assert status["underlay"]["address"] is None and status["warnings"] == []
    assert (status["underlay6"]["address"], status["pod_mtu"]) == (node.underlay_ip6, 1430)
    text = netns.run_in(node.netns, [lab_cli.bin_path("overlayctl"), "status"])
    assert "Underlay:    no IPv4 (an IPv6-only node; pod MTU 1430)" in text, text
