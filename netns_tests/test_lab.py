"""`overlayctl lab` end to end on the host kernel (root): real namespaces, agents, CNI plugin.

Every lab is named uniquely per test run and is always removed in a fixture finaliser; the
finaliser also asserts that `lab down` left no namespace and no agent behind.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from overlay.lab import lab, netns

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

_counter = itertools.count()
OVERLAYCTL = lab.bin_path("overlayctl")


def unique_lab() -> str:
    return f"t{os.getpid() % 1000}{next(_counter)}"


def overlayctl(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [OVERLAYCTL, "lab", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def assert_gone(name: str, pids: list[int]) -> None:
    assert lab.existing_namespaces(name) == []
    assert not lab.lab_dir(name).exists()
    assert [p for p in pids if netns.alive(p) and name in " ".join(netns.cmdline(p))] == []


def recorded_pids(name: str) -> list[int]:
    try:
        state = lab.load(name)
    except lab.LabError:
        return []
    return [n.agent_pid for n in state.nodes if n.agent_pid] + (
        [state.etcd_pid] if state.etcd_pid else []
    )


@pytest.fixture
def make_lab() -> Iterator[Any]:
    """make_lab(*up_args) -> name; every lab made is removed (and checked gone) at the end."""
    made: list[str] = []

    def make(*args: str) -> str:
        name = unique_lab()
        made.append(name)
        res = overlayctl("up", "--name", name, *args)
        assert res.returncode == 0, res.stdout + res.stderr
        return name

    try:
        yield make
    finally:
        for name in made:
            pids = recorded_pids(name)
            res = overlayctl("down", "--name", name, timeout=120)
            assert res.returncode == 0, res.stderr
            assert_gone(name, pids)


def check_json(name: str) -> dict[str, Any]:
    res = overlayctl("check", "--name", name, "--json", "--timeout", "120")
    doc = json.loads(res.stdout)
    assert (res.returncode == 0) == doc["ok"], res.stderr
    return doc


def pod_pairs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in doc["probes"] if p["dst"] != "external"]


def test_two_subnets_cross_subnet_pairs_take_vxlan(make_lab: Any) -> None:
    name = make_lab("--nodes", "2", "--subnets", "2", "--encap", "vxlan",
                    "--mode", "cross-subnet", "--pods-per-node", "1")  # fmt: skip

    status = json.loads(overlayctl("status", "--name", name, "--json").stdout)
    assert [n["subnet"] for n in status["nodes"]] == ["192.168.1.0/24", "192.168.2.0/24"]
    assert all(n["agent_alive"] for n in status["nodes"])
    assert all(Path(n["cni_conflist"]).is_file() for n in status["nodes"])
    assert all(p["ip"].startswith("10.244.") for p in status["pods"])
    assert netns.exists(status["router_netns"]) and netns.exists(status["external_netns"])

    doc = check_json(name)
    pairs = pod_pairs(doc)
    assert len(pairs) == 2
    assert all(p["answered"] and p["path"] == "vxlan" for p in pairs), pairs
    # The router knows no pod routes: the pods can only have met through the tunnel.
    assert "10.244." not in netns.run(["ip", "-n", status["router_netns"], "route"])


def test_pods_reach_the_external_host_through_nat(make_lab: Any) -> None:
    name = make_lab("--nodes", "2", "--subnets", "2", "--pods-per-node", "1")
    doc = check_json(name)
    external = [p for p in doc["probes"] if p["dst"] == "external"]
    assert len(external) == 2
    # "nat": the external host saw the request coming from the pod's NODE address.
    assert all(p["answered"] and p["path"] == "nat" for p in external), external
    assert doc["ok"]


def test_four_nodes_direct_within_a_subnet_vxlan_across(make_lab: Any) -> None:
    name = make_lab("--nodes", "4", "--subnets", "2", "--pods-per-node", "1")
    doc = check_json(name)
    paths = {(p["src"], p["dst"]): p["path"] for p in pod_pairs(doc) if p["answered"]}
    assert len(paths) == 12, pod_pairs(doc)
    p = lambda i: f"{name}-n{i}p1"  # noqa: E731
    assert paths[(p(1), p(2))] == paths[(p(4), p(3))] == "direct"
    assert paths[(p(1), p(3))] == paths[(p(4), p(2))] == "vxlan"
    assert all(pair["passed"] for pair in pod_pairs(doc))

    # A broken pod makes the check fail, and the matrix says which pairs.
    netns.run(["ip", "-n", p(1), "addr", "flush", "dev", "eth0"])
    res = overlayctl("check", "--name", name, "--timeout", "120")
    assert res.returncode == 1
    row = next(line for line in res.stdout.splitlines() if line.startswith(p(2)))
    assert row.split()[1] == "FAIL" and row.split()[3] == "vxlan"


def test_etcd_datastore_lives_in_the_router_namespace(make_lab: Any) -> None:
    name = make_lab("--nodes", "2", "--subnets", "1", "--pods-per-node", "1", "--datastore", "etcd")
    status = json.loads(overlayctl("status", "--name", name, "--json").stdout)
    assert status["datastore"] == "etcd://192.168.1.1:2379"
    assert status["etcd"]["alive"]
    assert status["etcd"]["pid"] in netns.pids(status["router_netns"])
    pairs = pod_pairs(check_json(name))
    assert all(p["answered"] and p["path"] == "direct" for p in pairs), pairs


def test_up_refuses_an_existing_lab_and_down_is_idempotent(make_lab: Any) -> None:
    name = make_lab("--nodes", "1", "--subnets", "1", "--pods-per-node", "0")
    res = overlayctl("up", "--name", name, "--nodes", "1", "--subnets", "1")
    assert res.returncode == 1 and f"lab down --name {name}" in res.stderr
    assert netns.exists(f"{name}-node1")  # the refused `up` touched nothing
    assert overlayctl("down", "--name", name).returncode == 0
    again = overlayctl("down", "--name", name)
    assert again.returncode == 0 and "nothing to remove" in again.stdout


def test_down_cleans_up_after_a_crashed_up() -> None:
    name = unique_lab()
    proc = subprocess.Popen(
        [OVERLAYCTL, "lab", "up", "--name", name, "--nodes", "3", "--subnets", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            pids = recorded_pids(name)
            if len(pids) == 3:
                break
            time.sleep(0.05)
        assert len(pids) == 3, "lab up never started its agents"
        proc.send_signal(signal.SIGKILL)  # no chance to clean up
        proc.wait(timeout=10)
        assert lab.existing_namespaces(name) and any(netns.alive(p) for p in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        res = overlayctl("down", "--name", name, timeout=120)
    assert res.returncode == 0, res.stderr
    assert_gone(name, pids)


def test_failed_up_removes_everything_and_shows_the_agent_log(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = unique_lab()
    real = lab.bin_path
    # An "agent" that dies at once: up must time out, report, and remove it all.
    monkeypatch.setattr(
        lab, "bin_path", lambda tool: "/bin/false" if "agent" in tool else real(tool)
    )
    monkeypatch.setattr(lab, "AGENT_SYNC_TIMEOUT", 2.0)
    try:
        with pytest.raises(lab.LabError, match="exited") as err:
            lab.up(lab.LabOptions(name=name, nodes=2, subnets=1, pods_per_node=1))
        assert f"{name}-node1" in str(err.value)
        assert_gone(name, [])
    finally:
        lab.down(name)
