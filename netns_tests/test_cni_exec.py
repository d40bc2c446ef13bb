"""The real `overlay-cni` / `overlay-ipam` executables, exec'd in a node namespace.

Each test talks to a real overlay-agent through its socket and checks the kernel (pod and
node namespaces) and the datastore (allocations) afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from netns_tests.cni_fixtures import (
    OVERLAY_CNI,
    OVERLAY_IPAM,
    REFERENCE_DIR,
    Cluster,
    Node,
    cluster,
    sh,
    wait_for,
)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
POD_ARGS = "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-{}"


@pytest.fixture(scope="module")
def lab() -> Iterator[Cluster]:
    with cluster((1,)) as c:
        yield c


@pytest.fixture
def node(lab: Cluster) -> Node:
    return lab.nodes[0]


def _cid(tag: str) -> str:
    return f"{tag}-{os.urandom(4).hex()}"


def assert_error(run: Any, code: int, *words: str) -> None:
    """A spec error object on stdout, a non-zero exit, and a message naming `words`."""
    assert run.rc != 0, run.stdout
    assert set(run.out) <= {"cniVersion", "code", "msg", "details"}, run.stdout
    assert run.out.get("code") == code, run.stdout
    text = run.out["msg"] + " " + run.out.get("details", "")
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"
    assert "Traceback" not in run.stderr


def pod_state(lab: Cluster, ns: str, ifname: str = "eth0") -> dict[str, Any]:
    links = {link["ifname"]: link for link in lab.ip_json(ns, "addr", "show")}
    return {
        "link": links.get(ifname),
        "routes": lab.ip_json(ns, "route", "show"),
    }


# --------------------------------------------------------------------------- ADD/CHECK/DEL


@pytest.mark.parametrize("version", VERSIONS)
def test_add_check_del_every_version(lab: Cluster, node: Node, version: str) -> None:
    cid = _cid("v" + version.replace(".", ""))
    ns, path = lab.pod_netns()
    args = POD_ARGS.format(cid)
    add = lab.exec_plugin(node, lab.conf(node, version), "ADD", cid, path, args=args)
    assert add.rc == 0, add.stdout + add.stderr
    res = add.out

    # Result shaped for the version.
    assert res["cniVersion"] == version
    host, pod = res["interfaces"]
    assert host["name"].startswith("cali") and "sandbox" not in host
    assert pod["name"] == "eth0" and pod["sandbox"] == path
    assert ("mtu" in pod) == (version == "1.1.0")
    (ip,) = res["ips"]
    assert ip["interface"] == 1
    assert ("version" in ip) == (version < "1.0.0")
    assert ip["address"].startswith("10.244.") and ip["address"].endswith("/32")
    assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    address = ip["address"].split("/")[0]

    # The kernel: pod interface, address and routes; the node's veth and /32 route.
    state = pod_state(lab, ns)
    assert state["link"]["mtu"] == 1450  # underlay 1500 - VXLAN 50, from the agent
    assert state["link"]["address"] == pod["mac"]
    assert [a["local"] for a in state["link"]["addr_info"] if a["family"] == "inet"] == [address]
    routes = {(r["dst"], r.get("gateway")) for r in state["routes"]}
    assert ("default", "169.254.1.1") in routes and ("169.254.1.1", None) in routes
    assert host["name"] in lab.host_veths(node)
    assert any(
        r["dst"] == address and r["dev"] == host["name"]
        for r in lab.ip_json(node.netns, "route", "show")
    )
    # The handle records the Kubernetes pod.
    shown = lab.overlayctl("ipam", "show", "--ip", address).stdout
    assert f"{lab_network(lab)}.{cid}" in shown
    assert "namespace=shop" in shown and f"pod=web-{cid}" in shown

    conf = lab.conf(node, version, prevResult=res)
    check = lab.exec_plugin(node, conf, "CHECK", cid, path, args=args)
    if version < "0.4.0":
        assert_error(check, 1, version, "CHECK")  # CHECK does not exist before 0.4.0
    else:
        assert check.rc == 0, check.stdout
        lab.ip(ns, "route", "del", "default")
        check = lab.exec_plugin(node, conf, "CHECK", cid, path, args=args)
        assert_error(check, 102, "default route via 169.254.1.1")

    for _ in range(2):  # DEL is idempotent
        rm = lab.exec_plugin(node, conf, "DEL", cid, path, args=args)
        assert rm.rc == 0 and rm.stdout.strip() == "", rm.stdout
        assert address not in lab.allocations()
        assert host["name"] not in lab.host_veths(node)
        assert pod_state(lab, ns)["link"] is None
    lab.del_netns(ns)


def lab_network(lab: Cluster) -> str:
    return "ovtest"


def test_del_with_missing_netns_releases_the_address(lab: Cluster, node: Node) -> None:
    cid = _cid("gone")
    ns, path = lab.pod_netns()
    add = lab.exec_plugin(node, lab.conf(node), "ADD", cid, path)
    assert add.rc == 0, add.stdout
    address = add.out["ips"][0]["address"].split("/")[0]
    lab.del_netns(ns)
    for _ in range(2):
        rm = lab.exec_plugin(node, lab.conf(node), "DEL", cid, path)
        assert rm.rc == 0, rm.stdout
    assert address not in lab.allocations()
    assert add.out["interfaces"][0]["name"] not in lab.host_veths(node)
    # A DEL for a container never added (and no netns at all) succeeds too.
    never = lab.exec_plugin(node, lab.conf(node), "DEL", _cid("never"), "")
    assert never.rc == 0, never.stdout


def test_gc_releases_exactly_the_attachments_not_listed(lab: Cluster, node: Node) -> None:
    pods = []
    for i in range(4):
        cid = _cid(f"gc{i}")
        ns, path = lab.pod_netns()
        add = lab.exec_plugin(node, lab.conf(node), "ADD", cid, path)
        assert add.rc == 0, add.stdout
        pods.append((cid, ns, add.out["ips"][0]["address"].split("/")[0],
                     add.out["interfaces"][0]["name"]))  # fmt: skip
    keep, drop = pods[:2], pods[2:]
    # Another network's allocations on this node must survive the GC of ours.
    other_ns, other_path = lab.pod_netns()
    other_cid, other_conf = _cid("other"), {**lab.conf(node), "name": "othernet"}
    other = lab.exec_plugin(node, other_conf, "ADD", other_cid, other_path)
    assert other.rc == 0, other.stdout
    before = lab.allocations()
    valid = [{"containerID": cid, "ifname": "eth0"} for cid, *_ in keep]
    gc_conf = {**lab.conf(node), "cni.dev/valid-attachments": valid}
    gc = lab.exec_plugin(node, gc_conf, "GC")
    assert gc.rc == 0, gc.stdout
    after = lab.allocations()
    assert set(before) - set(after) == {address for _, _, address, _ in drop}
    veths = lab.host_veths(node)
    for _, ns, _, veth in keep:
        assert veth in veths
        assert pod_state(lab, ns)["link"] is not None
    for _, _, _, veth in drop:
        assert veth not in veths  # stale interfaces go with their addresses
    assert other.out["interfaces"][0]["name"] in veths
    for cid, ns, _, _ in keep:
        lab.exec_plugin(node, lab.conf(node), "DEL", cid, f"/run/netns/{ns}")
    lab.exec_plugin(node, other_conf, "DEL", other_cid, other_path)
    for _, ns, _, _ in pods:
        lab.del_netns(ns)
    lab.del_netns(other_ns)


def test_runtime_config_ips_and_mac_are_honoured(lab: Cluster, node: Node) -> None:
    cid = _cid("rc")
    ns, path = lab.pod_netns()
    want_ip, want_mac = "10.244.250.7", "0a:58:0a:f4:fa:07"
    conf = lab.conf(node, runtimeConfig={"ips": [f"{want_ip}/32"], "mac": want_mac})
    add = lab.exec_plugin(node, conf, "ADD", cid, path)
    assert add.rc == 0, add.stdout
    assert add.out["ips"][0]["address"] == f"{want_ip}/32"
    assert add.out["interfaces"][1]["mac"] == want_mac
    link = pod_state(lab, ns)["link"]
    assert link["address"] == want_mac
    assert [a["local"] for a in link["addr_info"] if a["family"] == "inet"] == [want_ip]
    assert lab.allocations()[want_ip] == f"ovtest.{cid}"
    assert lab.exec_plugin(node, conf, "DEL", cid, path).rc == 0
    assert want_ip not in lab.allocations()
    lab.del_netns(ns)


def test_status_ok_with_a_running_agent(lab: Cluster, node: Node) -> None:
    status = lab.exec_plugin(node, lab.conf(node), "STATUS")
    assert status.rc == 0 and status.stdout.strip() == "", status.stdout
    version = lab.exec_plugin(node, lab.conf(node), "VERSION")
    assert version.rc == 0 and "1.1.0" in version.out["supportedVersions"]


def test_agent_down_gives_try_again_and_status_not_available() -> None:
    with cluster((1,)) as c:
        node = c.nodes[0]
        c.stop_agent(node)
        ns, path = c.pod_netns()
        add = c.exec_plugin(node, c.conf(node), "ADD", _cid("down"), path)
        assert_error(add, 11, node.socket)
        status = c.exec_plugin(node, c.conf(node), "STATUS")
        assert_error(status, 50, node.socket)
        assert c.allocations() == {}
        assert pod_state(c, ns)["link"] is None


def test_status_reports_exhausted_pools_then_recovers() -> None:
    with cluster((1,)) as c:
        node = c.nodes[0]
        tiny = c.dir / "tiny.yaml"
        tiny.write_text(
            "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: tiny}\n"
            "spec: {cidr: 10.250.0.0/30, blockSize: 30}\n"
        )
        assert c.overlayctl("delete", "ippool", "default-ipv4").returncode == 0
        assert c.overlayctl("apply", "-f", str(tiny)).returncode == 0
        for i in range(4):
            got = c.overlayctl("ipam", "assign", "--node", node.name, "--handle", f"fill{i}")
            assert got.returncode == 0, got.stderr
        # The agent caches its answer for a few seconds: poll until it sees the change.
        assert wait_for(lambda: c.exec_plugin(node, c.conf(node), "STATUS").rc != 0, 15.0)
        assert_error(c.exec_plugin(node, c.conf(node), "STATUS"), 50, "exhausted", "tiny")
        assert c.overlayctl("ipam", "release", "--handle", "fill0").returncode == 0
        assert wait_for(lambda: c.exec_plugin(node, c.conf(node), "STATUS").rc == 0, 15.0)


# --------------------------------------------------------------------------- bad input

BAD_INPUT: dict[str, tuple[Any, dict[str, str], int, tuple[str, ...]]] = {
    # name: (config or a function of it, env overrides, code, words in the message)
    "malformed-json": ('{"cniVersion": "1.1.0", "name": ', {}, 6, ("JSON",)),
    "unknown-field": ({"colour": "blue"}, {}, 2, ("colour", "blue")),
    "wrong-type": ({"mtu": "1400"}, {}, 7, ("mtu", "1400")),
    "unsupported-version": ({"cniVersion": "0.2.0"}, {}, 1, ("0.2.0",)),
    "relative-netns": ({}, {"CNI_NETNS": "run/netns/x"}, 4, ("CNI_NETNS", "run/netns/x")),
    "missing-netns": ({}, {"CNI_NETNS": "/run/netns/ovc-no-such"}, 8, ("/run/netns/ovc-no-such",)),
    "long-ifname": (
        {},
        {"CNI_IFNAME": "eth0-far-too-long"},
        4,
        ("CNI_IFNAME", "eth0-far-too-long"),
    ),
    "ipv6-no-pool": (
        {"ipam": {"type": "overlay-ipam", "assignIPv4": False, "assignIPv6": True}},
        {},
        100,
        ("IPv6",),
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_gives_an_error_and_leaves_nothing(lab: Cluster, node: Node, case: str) -> None:
    body, env, code, words = BAD_INPUT[case]
    ns, path = lab.pod_netns()
    config = body if isinstance(body, str) else {**lab.conf(node), **body}
    before = lab.allocations()
    veths = lab.host_veths(node)
    run = lab.exec_plugin(
        node, config, "ADD", _cid("bad"), env.get("CNI_NETNS", path),
        ifname=env.get("CNI_IFNAME", "eth0"),
    )  # fmt: skip
    assert_error(run, code, *words)
    assert lab.allocations() == before
    assert lab.host_veths(node) == veths
    assert [link["ifname"] for link in lab.ip_json(ns, "link", "show")] == ["lo"]
    lab.del_netns(ns)


# --------------------------------------------------------------------------- rollback


def _rollback_case(lab: Cluster, node: Node, prepare: str) -> tuple[Any, str, dict[str, str]]:
    """Make ADD fail at one step; return (run, pod netns, allocations before)."""
    ns, path = lab.pod_netns()
    conf = lab.conf(node)
    if prepare == "ifname-exists":  # veth creation: CNI_IFNAME is already in the pod
        lab.ip(ns, "link", "add", "eth0", "type", "veth", "peer", "name", "other0")
    elif prepare == "mac-refused":  # pod configuration: the kernel refuses an all-zero MAC
        conf["runtimeConfig"] = {"mac": "00:00:00:00:00:00"}
    elif prepare == "host-route-taken":  # host route: another device already routes the pod IP
        conf["runtimeConfig"] = {"ips": ["10.244.251.9"]}
        lab.ip(node.netns, "route", "add", "10.244.251.9/32", "dev", "eth0")
    before = lab.allocations()
    run = lab.exec_plugin(node, conf, "ADD", _cid("rb"), path)
    return run, ns, before


@pytest.mark.parametrize(
    ("prepare", "words"),
    [
        ("ifname-exists", ("eth0", "already exists")),
        ("mac-refused", ("eth0",)),
        ("host-route-taken", ("10.244.251.9", "eth0")),
    ],
)
def test_failed_add_rolls_everything_back(
    lab: Cluster, node: Node, prepare: str, words: tuple[str, ...]
) -> None:
    veths = lab.host_veths(node)
    try:
        run, ns, before = _rollback_case(lab, node, prepare)
        assert run.rc != 0 and run.out["code"] >= 100, run.stdout
        for word in words:
            assert word in run.out["msg"], run.out
        assert lab.allocations() == before  # the address was released
        assert lab.host_veths(node) == veths  # the veth was removed
        kinds = {link["ifname"] for link in lab.ip_json(ns, "link", "show")}
        assert kinds <= {"lo", "eth0", "other0"}
        if prepare != "ifname-exists":
            assert kinds == {"lo"}
    finally:
        lab.ip(node.netns, "route", "del", "10.244.251.9/32", check=False)


def test_taken_address_fails_and_keeps_the_holder(lab: Cluster, node: Node) -> None:
    ip = "10.244.252.3"
    conf = lab.conf(node, runtimeConfig={"ips": [ip]})
    ns1, path1 = lab.pod_netns()
    first = _cid("hold")
    assert lab.exec_plugin(node, conf, "ADD", first, path1).rc == 0
    veths = lab.host_veths(node)
    ns2, path2 = lab.pod_netns()
    second = lab.exec_plugin(node, conf, "ADD", _cid("steal"), path2)
    assert_error(second, 100, ip)
    assert lab.allocations()[ip] == f"ovtest.{first}"
    assert lab.host_veths(node) == veths
    assert pod_state(lab, ns2)["link"] is None
    assert lab.exec_plugin(node, conf, "DEL", first, path1).rc == 0
    lab.del_netns(ns1)
    lab.del_netns(ns2)


# --------------------------------------------------------------------------- reference plugins


def test_ptp_with_overlay_ipam_gives_a_working_pod(lab: Cluster, node: Node) -> None:
    """The reference Go `ptp` delegating its addresses to overlay-ipam."""
    conf = {
        "cniVersion": "1.0.0",
        "name": "ptpnet",
        "type": "ptp",
        "mtu": 1400,
        "ipam": {"type": "overlay-ipam", "agentSocket": node.socket},
    }
    ptp = f"{REFERENCE_DIR}/ptp"
    pods = []
    for i in range(2):
        cid = _cid(f"ptp{i}")
        ns, path = lab.pod_netns()
        add = lab.exec_plugin(node, conf, "ADD", cid, path, plugin=ptp)
        assert add.rc == 0, add.stdout + add.stderr
        address = add.out["ips"][0]["address"].split("/")[0]
        assert lab.allocations()[address] == f"ptpnet.{cid}"
        pods.append((cid, ns, path, address))
    # The two ptp pods reach each other through the node.
    assert lab.ping(pods[0][1], pods[1][3])
    # overlay-ipam answers CHECK directly too.
    direct = lab.exec_plugin(
        node, {**conf, "prevResult": add.out}, "CHECK", pods[1][0], pods[1][2], plugin=OVERLAY_IPAM
    )
    assert direct.rc == 0, direct.stdout
    for cid, ns, path, address in pods:
        rm = lab.exec_plugin(node, conf, "DEL", cid, path, plugin=ptp)
        assert rm.rc == 0, rm.stdout + rm.stderr
        assert address not in lab.allocations()
        lab.del_netns(ns)


def run_chain(
    lab: Cluster, node: Node, conflist: dict[str, Any], verb: str, cid: str, path: str,
    runtime: dict[str, Any], prev: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A tiny libcni: ADD in list order threading prevResult; DEL in reverse order."""
    from cni.spec import plugin_config

    order = range(len(conflist["plugins"]))
    if verb == "DEL":
        order = reversed(order)  # type: ignore[assignment]
    result = prev
    for i in order:
        conf = plugin_config(conflist, i, runtime)
        if result is not None:
            conf["prevResult"] = result
        kind = conf["type"]
        binary = OVERLAY_CNI if kind == "overlay-cni" else f"{REFERENCE_DIR}/{kind}"
        run = lab.exec_plugin(node, conf, verb, cid, path, plugin=binary)
        assert run.rc == 0, f"{kind} {verb}: {run.stdout} {run.stderr}"
        if verb == "ADD":
            result = run.out
    return result or {}


def nat_rules(node: Node) -> str:
    return sh("ip", "netns", "exec", node.netns, "iptables-save", "-t", "nat").stdout


def test_conflist_chains_portmap_and_bandwidth(lab: Cluster, node: Node) -> None:
    conflist = {
        "cniVersion": "1.0.0",
        "name": "ovtest",
        "plugins": [
            {"type": "overlay-cni", "agentSocket": node.socket, "ipam": {"type": "overlay-ipam"}},
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
            {"type": "bandwidth", "capabilities": {"bandwidth": True}},
        ],
    }
    runtime = {
        "portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}],
        "bandwidth": {"ingressRate": 8_000_000, "ingressBurst": 16_000_000,
                      "egressRate": 8_000_000, "egressBurst": 16_000_000},
    }  # fmt: skip
    cid = _cid("chain")
    ns, path = lab.pod_netns()
    result = run_chain(lab, node, conflist, "ADD", cid, path, runtime)
    address = result["ips"][0]["address"].split("/")[0]
    host_veth = result["interfaces"][0]["name"]
    # portmap kept our result and added its DNAT; bandwidth shaped the host veth.
    assert result["ips"][0]["interface"] == 1
    dnat = nat_rules(node)
    assert "18080" in dnat and address in dnat
    shaped = sh("tc", "-n", node.netns, "qdisc", "show", "dev", host_veth).stdout
    assert "tbf" in shaped, shaped
    run_chain(lab, node, conflist, "DEL", cid, path, runtime, prev=result)
    assert address not in lab.allocations()
    assert "18080" not in nat_rules(node)
    lab.del_netns(ns)
