"""FelixConfiguration on real kernels: one `overlayctl apply` moves every node.

A lab of two nodes in two subnets (so their pods' traffic is VXLAN) with one pod each. The
cluster's FelixConfiguration changes the VNI and the UDP port: every agent recreates its
`vxlan.calico`, moves its tunnel filter, and the pods talk again over the new port and VNI
(asserted on the wire). A node's own FelixConfiguration overrides the cluster's for that node
only (the tunnel MTU and the pod MTU file, the source address of NAT-outgoing traffic).
Deleting them brings the defaults back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import netaddr
import pytest

from netns_tests.lab_fixtures import LAB_TEST_MARKS, VXLAN_DEV, Capture, Lab, poll, running_lab
from overlay.lab import check, netns
from overlay.lab import lab as lab_cli
from overlay.lab.topology import EXTERNAL_HOST

pytestmark = LAB_TEST_MARKS


@pytest.fixture(scope="module")
def pair() -> Iterator[Lab]:
    with running_lab(nodes=2, subnets=2, mode="cross-subnet", pods_per_node=1) as lab:
        yield lab


def pod_ip(lab: Lab, node: int) -> str:
    address = lab.pod(node).ip
    assert address, f"pod of node{node} has no address"
    return address


def vxlan_device(ns: str) -> dict[str, Any]:
    out = netns.run(["ip", "-d", "-j", "-n", ns, "link", "show", VXLAN_DEV])
    link = json.loads(out)[0]
    data = link["linkinfo"]["info_data"]
    return {"vni": data["id"], "port": data["port"], "mtu": link["mtu"]}


def apply(lab: Lab, tmp_path: Path, name: str, spec: str) -> None:
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(
        "apiVersion: projectcalico.org/v3\nkind: FelixConfiguration\n"
        f"metadata:\n  name: {name}\nspec:\n{spec}"
    )
    lab.overlayctl("apply", "-f", str(manifest))


def devices_become(lab: Lab, want: list[dict[str, Any]], timeout: float = 10.0) -> float:
    """Seconds until each node's vxlan.calico has what `want` says (per node, in order)."""
    nodes = [lab.node(i + 1) for i in range(len(want))]

    def matches() -> bool:
        for node, fields in zip(nodes, want, strict=True):
            try:
                device = vxlan_device(node.netns)
            except netns.NetnsError:  # between the old device's removal and the new one
                return False
            if any(device[k] != v for k, v in fields.items()):
                return False
        return True

    ok, took = poll(matches, timeout, interval=0.05)
    got = [vxlan_device(n.netns) for n in nodes]
    assert ok, f"devices {got}, expected {want}"
    return took


def vxlan_on_the_wire(lab: Lab, tmp_path: Path, port: int) -> set[tuple[int, int, str, str]]:
    """(UDP port, VNI, outer source, outer destination) of a pod ping from node1 to node2."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.vxlan import VXLAN

    dst = pod_ip(lab, 2)
    # Both ports, so that a packet still sent to the old one would be seen too.
    bpf = f"udp port {port} or udp port 4789"
    with Capture(lab.node(1).netns, tmp_path / f"{port}.pcap", bpf, count=6) as cap:
        assert lab.ping(lab.pod(1).netns, dst, count=3)
    seen = set()
    for pkt in cap.packets():
        udp = pkt[UDP]
        vxlan = VXLAN(bytes(udp.payload))  # scapy decodes VXLAN only on 4789
        seen.add((udp.dport, vxlan.vni, pkt[IP].src, pkt[IP].dst))
    return seen


def test_vni_and_port_follow_the_cluster_configuration_and_come_back(
    pair: Lab, tmp_path: Path
) -> None:
    a1, a2 = pair.address(pair.node(1)), pair.address(pair.node(2))
    assert vxlan_on_the_wire(pair, tmp_path, 4789) == {(4789, 4096, a1, a2), (4789, 4096, a2, a1)}

    apply(pair, tmp_path, "default", "  vxlanVNI: 4097\n  vxlanPort: 8472\n")
    took = devices_become(pair, [{"vni": 4097, "port": 8472}] * 2)
    assert took < 5.0
    # Every pod pair talks over the new port with the new VNI, between the node addresses.
    assert vxlan_on_the_wire(pair, tmp_path, 8472) == {(8472, 4097, a1, a2), (8472, 4097, a2, a1)}
    # `lab check` counts VXLAN on the port the devices use: every probe passes, as vxlan.
    _, probes = check.run_check(pair.name, timeout=60)
    assert all(p.passed for p in probes), [p for p in probes if not p.passed]
    assert {p.path for p in probes if p.dst != check.EXTERNAL} == {"vxlan"}
    for i in (1, 2):
        node = pair.node(i)
        setting = pair.status(node)["settings"]["vxlan_port"]
        assert setting == {"value": 8472, "source": "FelixConfiguration default"}
        # The tunnel filter admits the nodes on the new port, not on the old one.
        rules = netns.run_in(node.netns, ["nft", "-n", "list", "ruleset"])
        assert "dport 8472" in rules and "dport 4789" not in rules, rules

    pair.overlayctl("delete", "felixconfiguration", "default")
    devices_become(pair, [{"vni": 4096, "port": 4789}] * 2)
    assert vxlan_on_the_wire(pair, tmp_path, 4789) == {(4789, 4096, a1, a2), (4789, 4096, a2, a1)}
    assert pair.status(pair.node(1))["settings"]["vxlan_port"]["source"] == "built-in"


def test_a_node_configuration_overrides_the_cluster_one_for_that_node_only(
    pair: Lab, tmp_path: Path
) -> None:
    n1, n2 = pair.node(1), pair.node(2)
    mtu_file = Path(n1.dir) / "mtu"
    assert mtu_file.read_text().strip() == "1450"
    apply(pair, tmp_path, "default", "  vxlanMTU: 1400\n  routeRefreshInterval: 2m\n")
    apply(pair, tmp_path, f"node.{n1.name}", "  vxlanMTU: 1300\n  logSeverityScreen: Debug\n")
    devices_become(pair, [{"mtu": 1300}, {"mtu": 1400}])
    # The pod MTU that the CNI plugin reads follows the tunnel MTU (Calico's MTU file).
    ok, _ = poll(lambda: mtu_file.read_text().strip() == "1300", 5.0)
    assert ok, mtu_file.read_text()
    assert (Path(n2.dir) / "mtu").read_text().strip() == "1400"
    settings = pair.status(n1)["settings"]
    assert settings["vxlan_mtu"] == {"value": 1300, "source": f"FelixConfiguration node.{n1.name}"}
    assert settings["resync_interval"] == {"value": 120.0, "source": "FelixConfiguration default"}
    assert settings["log_level"]["value"] == "DEBUG"
    text = netns.run_in(n1.netns, [lab_cli.bin_path("overlayctl"), "status"])
    line = next(x for x in text.splitlines() if x.startswith("Settings:"))
    assert f"vxlan_mtu 1300 (FelixConfiguration node.{n1.name})" in line, line
    assert "resync_interval 120.0 (FelixConfiguration default)" in line, line
    assert pair.status(n2)["settings"]["log_level"]["source"] == "built-in"
    # The tunnel takes packets up to its new MTU: 20 (IPv4) + 8 (ICMP) + 1272 = 1300 fits,
    # one byte more does not (the pod's own MTU, set when it was made, is still 1450).
    src, dst = pair.pod(1).netns, pod_ip(pair, 2)
    big = ["ping", "-n", "-q", "-c", "1", "-W", "2", "-M", "do", "-s"]
    netns.run_in(src, [*big, "1272", dst], timeout=10)  # raises if it gets no answer
    with pytest.raises(netns.NetnsError):
        netns.run_in(src, [*big, "1273", dst], timeout=10)

    pair.overlayctl("delete", "felixconfiguration", f"node.{n1.name}")
    pair.overlayctl("delete", "felixconfiguration", "default")
    devices_become(pair, [{"mtu": 1450}, {"mtu": 1450}])
    ok, _ = poll(lambda: mtu_file.read_text().strip() == "1450", 5.0)
    assert ok


def test_a_bad_configuration_is_refused_and_nothing_is_stored(pair: Lab, tmp_path: Path) -> None:
    with pytest.raises(netns.NetnsError) as err:
        apply(pair, tmp_path, "default", "  vxlanVNI: 4096\n  vxlanPort: 70000\n")
    assert 'FelixConfiguration "default": spec.vxlanPort: 70000 is outside 1..65535' in str(
        err.value
    )
    assert "default" not in pair.overlayctl("get", "felixconfigurations")
    assert vxlan_device(pair.node(1).netns)["port"] == 4789


def test_nat_outgoing_address_is_the_source_the_external_host_sees(
    pair: Lab, tmp_path: Path
) -> None:
    from scapy.layers.inet import ICMP, IP

    n1, n2 = pair.node(1), pair.node(2)
    ext = pair.state.external_netns

    def sources_seen(node: int, tag: str) -> set[str]:
        with Capture(ext, tmp_path / f"{tag}.pcap", "icmp", count=4) as cap:
            assert pair.ping(pair.pod(node).netns, str(EXTERNAL_HOST), count=2)
        return {p[IP].src for p in cap.packets() if p.haslayer(ICMP) and p[ICMP].type == 8}

    assert sources_seen(1, "before") == {pair.address(n1)}  # masquerade: the node address
    # A second address of node1 on its subnet: the router reaches it (connected route).
    subnet = netaddr.IPNetwork(n1.underlay_ip)
    extra = str(netaddr.IPAddress(subnet.last - 5))
    netns.run_in(n1.netns, ["ip", "addr", "add", f"{extra}/{subnet.prefixlen}", "dev", "eth0"])
    apply(pair, tmp_path, f"node.{n1.name}", f"  natOutgoingAddress: {extra}\n")

    def rule() -> str:
        return netns.run_in(n1.netns, ["nft", "list", "table", "ip", "overlay-nat"])

    ok, _ = poll(lambda: f"snat to {extra}" in rule(), 5.0, interval=0.05)
    assert ok, rule()
    assert sources_seen(1, "snat") == {extra}
    assert sources_seen(2, "other") == {pair.address(n2)}  # another node's setting

    pair.overlayctl("delete", "felixconfiguration", f"node.{n1.name}")
    ok, _ = poll(lambda: "masquerade" in rule(), 5.0, interval=0.05)
    assert ok, rule()
    assert sources_seen(1, "after") == {pair.address(n1)}
    # Someone flushes our rule but leaves the table and its sets: written again within 1 s
    # (the nftables monitor sees another process change our table) ...
    flush = ["nft", "flush", "chain", "ip", "overlay-nat", "postrouting"]
    netns.run_in(n1.netns, flush)
    ok, _ = poll(lambda: "masquerade" in rule(), 1.0, interval=0.02)
    assert ok, rule()
    # ... and also while the agent is down: the restarted agent reads the rule back.
    argv = pair.stop_agent(n1)
    netns.run_in(n1.netns, flush)
    pair.start_agent(n1, argv)
    pair.wait_agent(n1, peers=1)
    ok, _ = poll(lambda: "masquerade" in rule(), 5.0, interval=0.05)
    assert ok, rule()
