"""The lab's names, addresses, CNI configuration and state file (pure: no root needed)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import netaddr
import pytest

from cni.spec import parse_conflist, plugin_config
from ipam.model import IPPool
from ipam.resources import from_manifest
from overlay import cli
from overlay.cli_lab import render_status
from overlay.lab import lab
from overlay.lab.topology import (
    EXTERNAL_HOST6,
    LabOptions,
    TopologyError,
    build,
    pool6_manifest,
    pool_manifest,
    subnet6,
)


def test_nodes_fill_subnets_in_runs_with_unique_addresses() -> None:
    topo = build(LabOptions(name="x", nodes=5, subnets=2, pods_per_node=2))
    assert [n.subnet for n in topo.nodes] == ["192.168.1.0/24"] * 3 + ["192.168.2.0/24"] * 2
    addresses = [netaddr.IPNetwork(n.underlay_ip) for n in topo.nodes]
    assert len({a.ip for a in addresses}) == 5
    for node, addr in zip(topo.nodes, addresses, strict=True):
        # The node address keeps its /24: cross-subnet decisions depend on the prefix.
        assert addr.prefixlen == 24 and str(addr.cidr) == node.subnet
        assert netaddr.IPAddress(node.gateway) == addr.network + 1
    assert topo.router_netns == "x-router" and topo.external_netns == "x-ext"
    assert [p.name for p in topo.pods][:3] == ["x-n1p1", "x-n1p2", "x-n2p1"]
    assert len(topo.pods) == 10


def test_largest_lab_stays_inside_its_subnets() -> None:
    topo = build(LabOptions(name="big", nodes=200, subnets=50, pods_per_node=0))
    for n in topo.nodes:
        assert netaddr.IPAddress(n.underlay_ip.split("/")[0]) in netaddr.IPNetwork(n.subnet)
    assert len({n.router_port for n in topo.nodes}) == 200
    assert all(len(n.router_port) <= 15 for n in topo.nodes)  # IFNAMSIZ


@pytest.mark.parametrize(
    ("opts", "field"),
    [
        (LabOptions(name="much-too-long"), "--name"),
        (LabOptions(name="a b"), "--name"),
        (LabOptions(nodes=1, subnets=2), "--nodes"),
        (LabOptions(encap="gre"), "--encap"),
        (LabOptions(mode="never"), "--mode"),
        (LabOptions(pods_per_node=-1), "--pods-per-node"),
        (LabOptions(datastore="redis"), "--datastore"),
    ],
)
def test_bad_options_name_the_flag(opts: LabOptions, field: str) -> None:
    with pytest.raises(TopologyError, match=field):
        build(opts)


@pytest.mark.parametrize(
    ("encap", "mode", "vxlan", "ipip"),
    [
        ("vxlan", "cross-subnet", "CrossSubnet", "Never"),
        ("vxlan", "always", "Always", "Never"),
        ("ipip", "cross-subnet", "Never", "CrossSubnet"),
    ],
)
def test_pool_manifest_is_a_valid_pool_in_the_chosen_mode(
    encap: str, mode: str, vxlan: str, ipip: str
) -> None:
    manifest = pool_manifest(LabOptions(encap=encap, mode=mode))
    assert manifest["spec"]["vxlanMode"] == vxlan and manifest["spec"]["ipipMode"] == ipip
    pool = from_manifest(manifest)  # the datastore accepts it
    assert isinstance(pool, IPPool) and str(pool.cidr) == "10.244.0.0/16"


def test_dual_stack_lab_adds_an_ipv6_vxlan_pool_and_asks_the_cni_for_ipv6() -> None:
    opts = LabOptions(mode="always", ipv6=True)
    pool = from_manifest(pool6_manifest(opts))
    assert isinstance(pool, IPPool) and pool.version == 6 and pool.block_size == 122
    assert pool.vxlan_mode.value == "Always" and not pool.nat_outgoing
    parsed = parse_conflist(json.dumps(lab.conflist("/s.sock", opts.families)))
    assert plugin_config(parsed, 0, {})["ipam"] == {"type": "overlay-ipam", "assignIPv6": True}
    result = {"ips": [{"address": "10.244.3.7/32"}, {"address": "fd00::5/128"}]}
    assert lab.pod_ip(result, 6) == "fd00::5"


def test_ipv6_underlay_pairs_each_node_address_with_one_in_its_subnets_64() -> None:
    opts = LabOptions(name="x", nodes=4, subnets=2, ipv6_underlay=True)
    assert opts.ipv6  # implied: IPv6 pods are what the IPv6 underlay carries
    topo = build(opts)
    assert [n.underlay_ip6 for n in topo.nodes] == [
        "fd00:192:168:1::11/64",
        "fd00:192:168:1::12/64",
        "fd00:192:168:2::13/64",
        "fd00:192:168:2::14/64",
    ]
    for n in topo.nodes:
        assert n.underlay_ip6 is not None and n.gateway6 is not None
        net = netaddr.IPNetwork(n.underlay_ip6)
        k = n.subnet.split(".")[2]  # the same subnet in both families
        assert str(net.cidr) == subnet6(int(k)) == f"fd00:192:168:{k}::/64"
        assert netaddr.IPAddress(n.gateway6) == net.network + 1
    cmds = lab.node_underlay_commands(topo.nodes[0])
    assert "addr add fd00:192:168:1::11/64 dev eth0 nodad" in cmds
    assert "route add default via fd00:192:168:1::1" in cmds
    assert "route add default via 192.168.1.1" in cmds


def test_ipv6_underlay_gives_the_external_host_ipv6_and_the_ipv6_pool_nat() -> None:
    router, ext = lab.external_commands(ipv6=True)
    assert "addr add fd00:203:0:113::1/64 dev ext0 nodad" in router
    assert router[-1] == "link set ext0 up"  # after its addresses
    assert "addr add fd00:203:0:113::10/64 dev eth0 nodad" in ext
    assert "route add default via fd00:203:0:113::1" in ext
    assert str(EXTERNAL_HOST6) == "fd00:203:0:113::10"
    pool = from_manifest(pool6_manifest(LabOptions(ipv6_underlay=True)))
    assert isinstance(pool, IPPool) and pool.version == 6 and pool.nat_outgoing


def test_without_ipv6_underlay_the_external_host_is_ipv4_only() -> None:
    assert lab.external_commands(ipv6=False) == (
        ["addr add 203.0.113.1/24 dev ext0", "link set ext0 up"],
        [
            "link set lo up",
            "addr add 203.0.113.10/24 dev eth0",
            "link set eth0 up",
            "route add default via 203.0.113.1",
        ],
    )


def test_largest_ipv6_underlay_is_valid_and_unique() -> None:
    topo = build(LabOptions(name="big", nodes=200, subnets=50, pods_per_node=0, ipv6_underlay=True))
    addresses = [netaddr.IPNetwork(n.underlay_ip6 or "") for n in topo.nodes]
    assert len({a.ip for a in addresses}) == 200
    assert all(a.ip in netaddr.IPNetwork(subnet6(50)) for a in addresses[-4:])


def test_without_ipv6_underlay_nodes_have_no_ipv6_address_or_agent_flag() -> None:
    for opts in (LabOptions(), LabOptions(ipv6=True)):
        node = build(opts).nodes[0]
        assert node.underlay_ip6 is None and node.gateway6 is None
        assert not any(":" in c for c in lab.node_underlay_commands(node))
        assert lab.agent_address_args(asdict(opts)) == ["--ip-autodetection", "interface=eth0"]
    assert not LabOptions(ipv6=True).ipv6_underlay


def test_ipv6_underlay_agents_autodetect_their_ipv6_address_on_eth0() -> None:
    opts = asdict(LabOptions(ipv6_underlay=True))
    assert lab.agent_address_args(opts) == [
        "--ip-autodetection",
        "interface=eth0",
        "--ip6-autodetection",
        "interface=eth0",
    ]


def test_namespace_pattern_matches_only_this_lab() -> None:
    pattern = lab.ns_pattern("a")
    topo = build(LabOptions(name="a", nodes=12, subnets=2, pods_per_node=11))
    names = [topo.router_netns, topo.external_netns]
    names += [n.netns for n in topo.nodes] + [p.netns for p in topo.pods]
    assert all(pattern.fullmatch(ns) for ns in names)
    # Other labs whose names start with "a-", or with "a", are never taken for lab "a".
    for other in ("a-n1p1", "a-node1", "ab", "a-b"):
        t = build(LabOptions(name=other, nodes=2, subnets=1, pods_per_node=1))
        theirs = [t.router_netns, t.external_netns, *(n.netns for n in t.nodes)]
        theirs += [p.netns for p in t.pods]
        assert not any(pattern.fullmatch(ns) for ns in theirs), other
    assert not pattern.fullmatch("a-router2") and not pattern.fullmatch("xa-router")


def test_namespaces_are_deleted_pods_first_router_last() -> None:
    order = lab.ns_order({"l-router", "l-node2", "l-n1p1", "l-ext", "l-node10", "l-n2p3"}, "l")
    assert order[:2] == ["l-n1p1", "l-n2p3"]
    assert set(order[2:4]) == {"l-node2", "l-node10"}
    assert order[4:] == ["l-ext", "l-router"]


def test_node_conflist_is_accepted_by_the_cni_plugin() -> None:
    conflist = lab.conflist("/run/overlay-lab/l/l-node1/cni.sock")
    parsed = parse_conflist(json.dumps(conflist))
    config = plugin_config(parsed, 0, {})
    assert config["type"] == "overlay-cni"
    assert config["agentSocket"] == "/run/overlay-lab/l/l-node1/cni.sock"
    assert config["mtu"] == 0 and config["name"] == lab.CNI_NETWORK


def test_datastore_urls_sqlite_in_lab_dir_and_etcd_on_the_first_gateway(tmp_path: Path) -> None:
    opts = LabOptions(name="l", datastore="sqlite")
    agent, seed = lab.datastore_urls(opts, build(opts), tmp_path)
    assert agent == seed == f"sqlite://{tmp_path}/datastore.db"
    opts = LabOptions(name="l", datastore="etcd")
    agent, seed = lab.datastore_urls(opts, build(opts), tmp_path)
    # Agents reach etcd over the underlay; the seeding runs in the router itself.
    assert agent == "etcd://192.168.1.1:2379" and seed == "etcd://127.0.0.1:2379"


def test_pod_ip_takes_the_ipv4_address_without_prefix() -> None:
    result = {"ips": [{"address": "fd00::5/128"}, {"address": "10.244.3.7/32"}]}
    assert lab.pod_ip(result) == "10.244.3.7"
    with pytest.raises(lab.LabError, match="no IPv4"):
        lab.pod_ip({"ips": []})


def _state(tmp_path: Path) -> lab.LabState:
    opts = LabOptions(name="s", nodes=2, subnets=2, pods_per_node=1)
    state = lab._initial_state(opts, build(opts), tmp_path)
    state.nodes[0].agent_pid = 2**22 + 1  # above pid_max: never alive
    state.pods[0].ip = "10.244.0.1"
    return state


def test_state_round_trips_through_its_file(tmp_path: Path) -> None:
    state = _state(tmp_path)
    state.save()
    loaded = lab.LabState.from_dict(json.loads((tmp_path / "state.json").read_text()))
    assert loaded == state
    assert loaded.node("s-node1").socket == f"{tmp_path}/s-node1/cni.sock"


def test_status_document_has_the_promised_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lab, "LAB_ROOT", tmp_path)
    (tmp_path / "s").mkdir()
    state = _state(tmp_path / "s")
    state.save()
    doc = lab.status("s")
    assert {"nodes", "pods", "router_netns", "external_netns", "datastore"} <= set(doc)
    node = doc["nodes"][0]
    assert {"name", "netns", "underlay_ip", "subnet", "cni_conflist"} <= set(node)
    assert node["underlay_ip"] == "192.168.1.11" and node["agent_alive"] is False
    assert doc["pods"][0] == {
        "name": "s-n1p1",
        "netns": "s-n1p1",
        "node": "s-node1",
        "ip": "10.244.0.1",
    }
    text = render_status(doc)
    assert "INCOMPLETE" in text and "DEAD" in text and "10.244.0.1" in text


def test_ipv6_underlay_state_and_status_carry_the_nodes_ipv6_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lab, "LAB_ROOT", tmp_path)
    (tmp_path / "s").mkdir()
    opts = LabOptions(name="s", nodes=2, subnets=2, pods_per_node=1, ipv6_underlay=True)
    state = lab._initial_state(opts, build(opts), tmp_path / "s")
    state.save()
    assert lab.load("s") == state
    assert state.options["ipv6_underlay"] is True and state.options["ipv6"] is True
    doc = lab.status("s")
    assert doc["options"]["ipv6_underlay"] is True
    node = doc["nodes"][1]
    assert node["underlay_ip6"] == "fd00:192:168:2::12"
    assert node["underlay_ip"] == "192.168.2.12" and node["underlay_cidr"] == "192.168.2.12/24"
    text = render_status(doc)
    assert "UNDERLAY6" in text and "fd00:192:168:2::12" in text
    assert doc["external_ip6"] == "fd00:203:0:113::10"
    assert "(203.0.113.10, fd00:203:0:113::10)" in text


def test_status_of_an_ipv4_underlay_lab_has_no_ipv6_underlay_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lab, "LAB_ROOT", tmp_path)
    (tmp_path / "s").mkdir()
    _state(tmp_path / "s").save()
    doc = lab.status("s")
    assert all("underlay_ip6" not in n for n in doc["nodes"])
    assert "UNDERLAY6" not in render_status(doc)
    assert "external_ip6" not in doc and "(203.0.113.10)" in render_status(doc)


def test_state_written_before_ipv6_underlay_still_loads() -> None:
    # A node of a state.json from before the field: no underlay_ip6 key.
    old: dict[str, Any] = {"name": "n", "netns": "n", "underlay_ip": "192.168.1.11/24"}
    old |= {"subnet": "s", "cni_conflist": "c", "dir": "d", "agent_pid": None}
    assert lab.NodeState(**old).underlay_ip6 is None


def test_missing_lab_tells_how_to_make_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lab, "LAB_ROOT", tmp_path)
    with pytest.raises(lab.LabError, match="lab up"):
        lab.status("nope")


# --- IPv6-only labs (--ipv6-only: no IPv4 pool, pods or registered IPv4 address) ----------


def _ipv6_only_state(tmp_path: Path) -> lab.LabState:
    opts = LabOptions(name="s", nodes=2, subnets=2, pods_per_node=1, ipv6_only=True)
    return lab._initial_state(opts, build(opts), tmp_path)


def test_ipv6_only_implies_an_ipv6_underlay_and_ipv6_pods_alone() -> None:
    opts = LabOptions(ipv6_only=True)
    assert opts.ipv6_underlay and opts.ipv6
    assert opts.families == (6,)
    assert LabOptions(ipv6_underlay=True).families == LabOptions(ipv6=True).families == (4, 6)
    assert LabOptions().families == (4,) and not LabOptions(ipv6_underlay=True).ipv6_only
    # The nodes still get both underlay addresses (see LabOptions.ipv6_only for why).
    node = build(LabOptions(name="x", ipv6_only=True)).nodes[0]
    assert node.underlay_ip == "192.168.1.11/24" and node.underlay_ip6 == "fd00:192:168:1::11/64"


def test_ipv6_only_with_ipip_is_refused_naming_both_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(TopologyError, match=r"--encap ipip.*--ipv6-only.*IPv4 only"):
        build(LabOptions(encap="ipip", ipv6_only=True))
    build(LabOptions(encap="ipip", ipv6_underlay=True))  # dual-stack: IPv4 may be IP-in-IP
    # From the command line: one line on stderr, exit status 1, before anything is made.
    assert cli.main(["lab", "up", "--name", "u", "--encap", "ipip", "--ipv6-only"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--encap ipip" in err and "--ipv6-only" in err


@pytest.mark.parametrize(
    ("flag", "implied"),
    [
        ("--ipv6", (True, False, False)),
        ("--ipv6-underlay", (True, True, False)),  # implies --ipv6
        ("--ipv6-only", (True, True, True)),  # implies both
    ],
)
def test_lab_up_ipv6_flags_imply_the_weaker_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str, implied: tuple[bool, ...]
) -> None:
    seen: list[LabOptions] = []

    def fake_up(opts: LabOptions, log: object = None) -> lab.LabState:
        seen.append(opts)
        return lab._initial_state(opts, build(opts), tmp_path)

    monkeypatch.setattr(lab, "up", fake_up)
    assert cli.main(["lab", "up", "--name", "u", flag]) == 0
    assert [(o.ipv6, o.ipv6_underlay, o.ipv6_only) for o in seen] == [implied]


def test_ipv6_only_datastore_gets_the_ipv6_pool_with_nat_and_no_ipv4_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opts = LabOptions(name="s", nodes=2, subnets=2, ipv6_only=True)
    applied: list[dict[str, Any]] = []

    def run_in(ns: str, argv: list[str], timeout: float = 0) -> str:
        assert ns == "s-router" and argv[-2:-1] == ["-f"]
        applied.append(json.loads(Path(argv[-1]).read_text()))
        return ""

    monkeypatch.setattr(lab.netns, "run_in", run_in)
    lab._seed_datastore(lab._initial_state(opts, build(opts), tmp_path), build(opts))
    assert [m["metadata"]["name"] for m in applied] == ["lab-pool6"]
    pool = from_manifest(applied[0])
    assert isinstance(pool, IPPool) and pool.version == 6 and pool.nat_outgoing
    assert pool.vxlan_mode.value == "CrossSubnet"
    # The other labs seed what they did before: IPv4 first, IPv6 with --ipv6.
    names = [[m["metadata"]["name"] for m in lab.pool_manifests(o)] for o in
             (LabOptions(), LabOptions(ipv6=True), LabOptions(ipv6_underlay=True))]  # fmt: skip
    assert names == [["lab-pool"], ["lab-pool", "lab-pool6"], ["lab-pool", "lab-pool6"]]


def test_ipv6_only_nodes_conflist_and_agents_ask_for_ipv6_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _ipv6_only_state(tmp_path)
    spawned: list[tuple[str, list[str]]] = []

    def spawn(ns: str, argv: list[str], log_path: Path) -> Any:
        spawned.append((ns, argv))
        return type("Proc", (), {"pid": 2**22 + len(spawned)})()

    monkeypatch.setattr(lab, "_spawn", spawn)
    lab._start_agents(state)
    for node, (ns, argv) in zip(state.nodes, spawned, strict=True):
        parsed = parse_conflist(Path(node.cni_conflist).read_text())
        assert plugin_config(parsed, 0, {})["ipam"] == {
            "type": "overlay-ipam",
            "assignIPv4": False,
            "assignIPv6": True,
        }
        assert ns == node.netns
        # Calico's IP=none: no IPv4 address registered, although eth0 has one.
        assert argv[argv.index("--ip-autodetection") + 1] == "none"
        assert argv[argv.index("--ip6-autodetection") + 1] == "interface=eth0"
        assert argv.count("--ip-autodetection") == 1 and "--node-name" in argv
    # Dual-stack and IPv4 conflists keep the plugin's IPv4 default unwritten.
    assert lab.conflist("/s", (4, 6))["plugins"][0]["ipam"] == {
        "type": "overlay-ipam",
        "assignIPv6": True,
    }
    assert lab.conflist("/s")["plugins"][0]["ipam"] == {"type": "overlay-ipam"}


def test_ipv6_only_pods_get_no_ipv4_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _ipv6_only_state(tmp_path)
    monkeypatch.setattr(lab.netns, "add", lambda ns: None)
    monkeypatch.setattr(lab.netns, "batch", lambda ns, cmds: None)
    monkeypatch.setattr(
        lab, "cni", lambda verb, s, p: {"ips": [{"address": f"fd00:10:244::{p.name[-3]}/128"}]}
    )
    lab._make_pods(state)
    assert [(p.ip, p.ip6) for p in state.pods] == [
        (None, "fd00:10:244::1"),
        (None, "fd00:10:244::2"),
    ]


def test_ipv6_only_status_shows_the_option_and_pods_without_ipv4(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lab, "LAB_ROOT", tmp_path)
    (tmp_path / "s").mkdir()
    state = _ipv6_only_state(tmp_path / "s")
    state.pods[0].ip6 = "fd00:10:244::1"
    state.save()
    doc = lab.status("s")
    assert doc["options"]["ipv6_only"] is True and doc["options"]["ipv6_underlay"] is True
    # The key stays, as null: one schema for every lab.
    assert doc["pods"][0]["ip"] is None and doc["pods"][0]["ip6"] == "fd00:10:244::1"
    assert json.loads(json.dumps(doc))["pods"][1]["ip"] is None
    text = render_status(doc)
    assert "vxlan cross-subnet, IPv6 only" in text
    lines = text.splitlines()
    pods = lines[next(i for i, line in enumerate(lines) if line.startswith("POD")) :]
    assert pods[0].split() == ["POD", "NODE", "IPV6"]  # no IPv4 column of dashes
    assert pods[1].split() == ["s-n1p1", "s-node1", "fd00:10:244::1"]
    assert pods[2].split() == ["s-n2p1", "s-node2", "-"]  # not made yet
    assert "IPv6 only" not in render_status(lab.status("s") | {"options": asdict(LabOptions())})
