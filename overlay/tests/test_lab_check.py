"""`lab check`'s path classification, counters, matrix and readiness probe (pure)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from overlay import cli
from overlay.lab import check, httpwait, lab
from overlay.lab.check import Probe
from overlay.lab.topology import EXTERNAL_HOST, EXTERNAL_HOST6, LabOptions, build

SUBNETS = {"n1": "192.168.1.0/24", "n2": "192.168.1.0/24", "n3": "192.168.2.0/24"}


@pytest.mark.parametrize(
    ("moved", "path"),
    [
        ({"vxlan": 1, "ipip": 0, "direct": 0}, "vxlan"),
        ({"vxlan": 0, "ipip": 2, "direct": 0}, "ipip"),
        ({"vxlan": 0, "ipip": 0, "direct": 1}, "direct"),
        ({"vxlan": 0, "ipip": 0, "direct": 0}, "unseen"),
    ],
)
def test_path_is_what_moved_on_the_source_underlay(moved: dict[str, int], path: str) -> None:
    assert check.classify(False, moved) == path
    assert check.classify(True, moved) == "local"


def test_expected_path_follows_the_pool_mode() -> None:
    assert check.expected_path("vxlan", "cross-subnet", "n1", "n2", SUBNETS) == "direct"
    assert check.expected_path("vxlan", "cross-subnet", "n1", "n3", SUBNETS) == "vxlan"
    assert check.expected_path("ipip", "always", "n1", "n2", SUBNETS) == "ipip"
    assert check.expected_path("vxlan", "always", "n1", "n1", SUBNETS) == "local"


def test_counters_are_read_from_nft_json_and_diffed() -> None:
    doc = {
        "nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"counter": {"family": "inet", "name": "vxlan", "table": check.PROBE_TABLE,
                         "packets": 7, "bytes": 900}},
            {"counter": {"family": "inet", "name": "ipip", "table": check.PROBE_TABLE,
                         "packets": 0, "bytes": 0}},
            {"counter": {"family": "inet", "name": "vxlan", "table": "someone-else",
                         "packets": 99, "bytes": 1}},
        ]
    }  # fmt: skip
    after = check.parse_counters(json.dumps(doc))
    assert after == {"vxlan": 7, "ipip": 0}
    assert check.delta({"vxlan": 6, "ipip": 0}, after) == {"vxlan": 1, "ipip": 0}


def test_probe_scripts_count_the_underlay_and_each_node_source() -> None:
    node = check.node_probe_script()
    assert 'oifname "eth0" udp dport 4789 counter name "vxlan"' in node
    assert 'ip protocol 4 counter name "ipip"' in node
    assert node.startswith(f"table inet {check.PROBE_TABLE}\ndelete table")  # idempotent
    ext = check.external_probe_script(["192.168.1.11", "192.168.2.12"])
    assert 'ip saddr 192.168.2.12 icmp type echo-request counter name "n1"' in ext
    assert "ip saddr 10.244.0.0/16" in ext


def test_a_pair_passes_only_when_answered_on_the_expected_path() -> None:
    assert Probe("a", "b", True, "vxlan", "vxlan").cell == "vxlan"
    wrong = Probe("a", "b", True, "vxlan", "direct")
    assert not wrong.passed and wrong.cell == "vxlan!"
    lost = Probe("a", "b", False, "vxlan", "vxlan")
    assert not lost.passed and lost.cell == "FAIL"
    assert Probe("a", "b", False, "skipped", "vxlan").cell == "SKIP"


def test_matrix_has_a_row_per_source_and_a_column_per_destination() -> None:
    probes = [
        Probe("p1", "p2", True, "vxlan", "vxlan"),
        Probe("p2", "p1", False, "unseen", "vxlan"),
        Probe("p1", check.EXTERNAL, True, "nat", "nat"),
        Probe("p2", check.EXTERNAL, True, "no-nat", "nat"),
    ]
    lines = check.render_matrix(["p1", "p2"], probes).splitlines()
    assert lines[0].split() == ["p1", "p2", "external"]
    assert lines[1].split() == ["p1", "-", "vxlan", "nat"]
    assert lines[2].split() == ["p2", "FAIL", "-", "no-nat!"]
    result = check.summary(probes)
    assert result["ok"] is False and result["failed"] == 2 and result["total"] == 4


def test_ipv6_probes_get_their_own_matrix_and_always_expect_vxlan_between_nodes() -> None:
    subnets = {"n1": "s1", "n2": "s1"}
    assert check.expected_path("vxlan", "cross-subnet", "n1", "n2", subnets) == "direct"
    assert check.expected_path("vxlan", "cross-subnet", "n1", "n2", subnets, 6) == "vxlan"
    assert check.expected_path("vxlan", "cross-subnet", "n1", "n1", subnets, 6) == "local"
    probes = [
        Probe("p1", "p2", True, "direct", "direct"),
        Probe("p1", "p2", True, "vxlan", "vxlan", 6),
        Probe("p2", "p1", True, "direct", "vxlan", 6),
    ]
    text = check.render_matrix(["p1", "p2"], probes)
    v4, v6 = text.split("\n\nIPv6:\n")
    assert v4.splitlines()[1].split() == ["p1", "-", "direct", "-"]
    assert v6.splitlines()[0].split() == ["p1", "p2"]  # no external host column
    assert v6.splitlines()[2].split() == ["p2", "direct!", "-"]
    assert "ip6 saddr fd00:10:244::/48" in check.node_probe_script()
    # VXLAN is counted on the port the node's device sends to (FelixConfiguration vxlanPort).
    assert 'udp dport 8472 counter name "vxlan"' in check.node_probe_script(8472)
    assert "4789" not in check.node_probe_script(8472)


@pytest.mark.parametrize(
    ("encap", "mode", "dst", "path"),
    [
        ("vxlan", "cross-subnet", "n2", "direct"),  # same subnet: plain IPv6 routing
        ("vxlan", "cross-subnet", "n3", "vxlan"),
        ("vxlan", "always", "n2", "vxlan"),
        ("ipip", "cross-subnet", "n2", "direct"),
        ("ipip", "cross-subnet", "n3", "vxlan"),  # the IPv6 pool is VXLAN whatever --encap
        ("ipip", "always", "n3", "vxlan"),
        ("vxlan", "cross-subnet", "n1", "local"),
    ],
)
def test_ipv6_over_an_ipv6_underlay_follows_the_pool_mode(
    encap: str, mode: str, dst: str, path: str
) -> None:
    assert check.expected_path(encap, mode, "n1", dst, SUBNETS, 6, ipv6_underlay=True) == path


@pytest.mark.parametrize("mode", ["cross-subnet", "always"])
@pytest.mark.parametrize("encap", ["vxlan", "ipip"])
def test_ipv6_over_the_ipv4_underlay_expects_vxlan_between_nodes(encap: str, mode: str) -> None:
    for dst in ("n2", "n3"):
        assert check.expected_path(encap, mode, "n1", dst, SUBNETS, 6) == "vxlan"
    # The IPv6 underlay changes nothing for IPv4 pairs.
    for v6 in (False, True):
        want = "direct" if mode == "cross-subnet" else encap
        assert check.expected_path(encap, mode, "n1", "n2", SUBNETS, 4, v6) == want


def test_vxlan_is_counted_on_every_port_of_the_nodes_vxlan_devices() -> None:
    assert 'udp dport 4789 counter name "vxlan"' in check.node_probe_script([4789, 4789])
    both = check.node_probe_script([8472, 4789])
    assert 'oifname "eth0" udp dport { 4789, 8472 } counter name "vxlan"' in both
    # An inet table: one rule for IPv4 and IPv6 outer headers; direct counts both families.
    assert both.startswith(f"table inet {check.PROBE_TABLE}")
    assert "ip6 saddr fd00:10:244::/48 ip6 daddr fd00:10:244::/48" in both


def _status(**over: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "datastore": {"synced": True},
        "dataplane_synced": True,
        "reconciler": {"dirty": False},
        "peers": [{"node": "n2"}, {"node": "n3"}],
    }
    doc.update(over)
    return doc


def test_agent_is_ready_only_when_synced_with_nothing_pending() -> None:
    assert httpwait.agent_ready(_status())
    assert httpwait.agent_ready(_status(), 2)
    assert not httpwait.agent_ready(_status(), 3)  # a peer not seen yet
    assert not httpwait.agent_ready(_status(dataplane_synced=False))
    assert not httpwait.agent_ready(_status(datastore={"synced": False}))
    assert not httpwait.agent_ready(_status(reconciler={"dirty": True}))
    assert not httpwait.agent_ready("starting")
    assert httpwait.etcd_healthy({"health": "true"}) and not httpwait.etcd_healthy({})


def test_waiting_gives_up_on_an_agent_that_keeps_failing() -> None:
    assert httpwait.agent_hopeless(_status(reconciler={"consecutive_failures": 3}))
    assert not httpwait.agent_hopeless(_status(reconciler={"consecutive_failures": 1}))
    assert not httpwait.agent_hopeless({"error": "connection refused"})


def test_a_stuck_agent_is_explained_in_one_line() -> None:
    failing = _status(reconciler={"last_failed": ["set IpipDevice: errno 95 no ipip", "b", "c"]})
    assert lab.describe_agent(json.dumps(failing)) == (
        "failing: set IpipDevice: errno 95 no ipip; b"
    )
    unreachable = _status(datastore={"url": "etcd://x:1", "error": "refused"})
    assert lab.describe_agent(json.dumps(unreachable)) == "datastore etcd://x:1: refused"
    assert "peers=2" in lab.describe_agent(json.dumps(_status(dataplane_synced=False)))
    assert lab.describe_agent('{"error": "no answer"}') == "no answer"


# --- the external host over IPv6 (an IPv6 underlay: NAT66) -----------------------------------


def test_the_external_host_counts_ipv6_echo_requests_per_node_ipv6_address() -> None:
    v4, v6 = ["192.168.1.11", "192.168.2.12"], ["fd00:192:168:1::11", "fd00:192:168:2::12"]
    ext = check.external_probe_script(v4, v6)
    # On the node's own counter: pings run one at a time, whatever their family.
    assert 'ip6 saddr fd00:192:168:2::12 icmpv6 type echo-request counter name "n1"' in ext
    assert 'ip saddr 192.168.2.12 icmp type echo-request counter name "n1"' in ext
    assert 'ip6 saddr fd00:10:244::/48 icmpv6 type echo-request counter name "pods"' in ext
    assert ext.count("counter n1 { }") == 1
    # Without IPv6 node addresses the script is the IPv4 one alone.
    assert "ip6" not in check.external_probe_script(v4)
    assert check.external_probe_script(v4, []) == check.external_probe_script(v4)


@pytest.mark.parametrize(
    ("moved", "path"),
    [
        ({"n0": 0, "n1": 1, "pods": 0}, "nat"),  # from node1's address: NAT
        ({"n0": 1, "n1": 0, "pods": 0}, "unseen"),  # another node's address is not ours
        ({"n0": 0, "n1": 0, "pods": 1}, "no-nat"),  # the pod's own address
        ({"n0": 0, "n1": 0, "pods": 0}, "unseen"),
    ],
)
def test_a_request_to_the_external_host_is_nat_only_from_the_pods_node(
    moved: dict[str, int], path: str
) -> None:
    assert check.classify_external(1, moved) == path


def test_the_ipv6_matrix_has_an_external_column_when_the_host_was_pinged_over_ipv6() -> None:
    probes = [
        Probe("p1", check.EXTERNAL, True, "nat", "nat"),
        Probe("p1", "p2", True, "vxlan", "vxlan", 6),
        Probe("p1", check.EXTERNAL, True, "nat", "nat", 6),
        Probe("p2", check.EXTERNAL, True, "no-nat", "nat", 6),
    ]
    v4, v6 = check.render_matrix(["p1", "p2"], probes).split("\n\nIPv6:\n")
    assert v4.splitlines()[1].split() == ["p1", "-", "-", "nat"]
    assert v6.splitlines()[0].split() == ["p1", "p2", "external"]
    assert v6.splitlines()[1].split() == ["p1", "-", "vxlan", "nat"]
    assert v6.splitlines()[2].split() == ["p2", "-", "-", "no-nat!"]
    assert not check.summary(probes)["ok"]


def _fake_lab(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, lost: str = "", **opts: object
) -> list[str]:
    """A 2-node lab on 2 subnets in which every ping but those to `lost` is answered, goes
    to the other node as VXLAN and to the external host NATed to its node's address, as
    the counters say; returns the addresses pinged, in order."""
    options = LabOptions(name="f", nodes=2, subnets=2, pods_per_node=1, **opts)  # type: ignore[arg-type]
    state = lab._initial_state(options, build(options), tmp_path)
    for i, pod in enumerate(state.pods):
        pod.ip = f"10.244.0.{i + 1}" if 4 in options.families else None
        pod.ip6 = f"fd00:10:244::{i + 1}" if 6 in options.families else None
    nodes = [n.name for n in state.nodes]
    counters: dict[str, dict[str, int]] = {state.external_netns: {"n0": 0, "n1": 0, "pods": 0}}
    counters |= {n.netns: {"vxlan": 0} for n in state.nodes}
    pinged: list[str] = []

    def ping(ns: str, address: str) -> bool:
        pinged.append(address)
        node = next(p.node for p in state.pods if p.netns == ns)
        if address in (str(EXTERNAL_HOST), str(EXTERNAL_HOST6)):
            counters[state.external_netns][f"n{nodes.index(node)}"] += 1
        else:
            counters[state.node(node).netns]["vxlan"] += 1
        return address != lost

    monkeypatch.setattr(check, "load", lambda name: state)
    monkeypatch.setattr(check, "install_probes", lambda s: None)
    monkeypatch.setattr(check, "_ping", ping)
    monkeypatch.setattr(check, "_counters", lambda ns: dict(counters.get(ns, {})))
    return pinged


def test_check_pings_the_external_host_over_ipv6_only_with_an_ipv6_underlay(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pinged = _fake_lab(monkeypatch, tmp_path, ipv6_underlay=True)
    _, probes = check.run_check("f")
    external = [(p.src, p.family, p.path, p.expected) for p in probes if p.dst == check.EXTERNAL]
    assert external == [
        ("f-n1p1", 4, "nat", "nat"),
        ("f-n1p1", 6, "nat", "nat"),
        ("f-n2p1", 4, "nat", "nat"),
        ("f-n2p1", 6, "nat", "nat"),
    ]
    assert pinged.count(str(EXTERNAL_HOST6)) == 2
    # A dual-stack lab over the IPv4 underlay has no IPv6 way out: IPv4 alone, as before.
    pinged = _fake_lab(monkeypatch, tmp_path, ipv6=True)
    _, probes = check.run_check("f")
    assert [p.family for p in probes if p.dst == check.EXTERNAL] == [4, 4]
    assert str(EXTERNAL_HOST6) not in pinged


# --- IPv6-only labs (--ipv6-only): IPv6 probes alone ----------------------------------------


@pytest.mark.parametrize(
    ("opts", "families"),
    [
        (LabOptions(), (4,)),
        (LabOptions(ipv6=True), (4,)),  # no IPv6 way out over the IPv4 underlay
        (LabOptions(ipv6_underlay=True), (4, 6)),
        (LabOptions(ipv6_only=True), (6,)),
    ],
)
def test_the_external_host_is_pinged_over_each_family_with_a_way_out(
    opts: LabOptions, families: tuple[int, ...]
) -> None:
    assert check.external_families(asdict(opts)) == families


def test_ipv6_only_check_pings_nothing_over_ipv4(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pinged = _fake_lab(monkeypatch, tmp_path, ipv6_only=True)
    _, probes = check.run_check("f")
    assert {p.family for p in probes} == {6}
    assert all(":" in address for address in pinged)  # not one IPv4 ping, nor external
    assert [(p.src, p.dst, p.expected) for p in probes] == [
        ("f-n1p1", "f-n2p1", "vxlan"),  # the nodes are on two subnets
        ("f-n1p1", check.EXTERNAL, "nat"),
        ("f-n2p1", "f-n1p1", "vxlan"),
        ("f-n2p1", check.EXTERNAL, "nat"),
    ]
    assert all(p.passed for p in probes) and pinged.count(str(EXTERNAL_HOST6)) == 2


def test_an_ipv6_only_matrix_is_the_ipv6_one_alone() -> None:
    probes = [
        Probe("p1", "p2", True, "vxlan", "vxlan", 6),
        Probe("p1", check.EXTERNAL, True, "nat", "nat", 6),
    ]
    lines = check.render_matrix(["p1", "p2"], probes).splitlines()
    assert lines[0] == "IPv6:"  # headed, with no (empty) IPv4 matrix above it
    assert lines[1].split() == ["p1", "p2", "external"]
    assert lines[2].split() == ["p1", "-", "vxlan", "nat"]
    assert len(lines) == 4
    # No probe at all (a lab without pods): the IPv4 table, as before.
    assert check.render_matrix([], []).split() == ["external"]


def _check_output(capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    status = cli.main(["lab", "check", "--name", "f"])
    return status, capsys.readouterr().out.splitlines()


def test_ipv6_only_lab_check_prints_the_ipv6_matrix_and_the_summary(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_lab(monkeypatch, tmp_path, ipv6_only=True)
    status, out = _check_output(capsys)
    assert status == 0
    assert out[0] == "IPv6:" and out[1].split() == ["f-n1p1", "f-n2p1", "external"]
    assert out[2].split() == ["f-n1p1", "-", "vxlan", "nat"]
    assert out[3].split() == ["f-n2p1", "vxlan", "-", "nat"]
    assert out.count("IPv6:") == 1 and out[4] == ""
    assert out[-1].startswith("4 probes in ") and out[-1].endswith(": ok")
    # A lost ping fails the check, as in every lab.
    _fake_lab(monkeypatch, tmp_path, lost="fd00:10:244::2", ipv6_only=True)
    status, out = _check_output(capsys)
    assert status == 1 and out[2].split() == ["f-n1p1", "-", "FAIL", "nat"]
    assert "  f-n1p1 -> f-n2p1 over IPv6: FAIL (expected vxlan)" in out
    assert out[-1].endswith(": 1 of 4 FAILED")
