"""Agent.check_underlay(): when the underlay counts as moved, and what a failure keeps;
Agent.health(): what the probes answer.

The host side is stubbed here (no interfaces are read): `_find_underlay` returns what a
detection would find and `register` records its calls. The whole path on a real kernel,
with peers following, is netns_tests/test_underlay_change.py.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import netaddr
import pytest

from ipam.datastore.base import DatastoreError
from ipam.model import EncapMode
from overlay import autodetect
from overlay.agent import Agent, AgentConfig, _Underlays
from overlay.autodetect import Underlay
from overlay.compute import DataplaneConfig, compute
from overlay.reconciler import Outcome, Reconciler
from overlay.status_http import Health
from overlay.tests.fake_kernel import FakeKernel
from overlay.tests.scenarios import me, pool, standard_view

ETH0 = Underlay("eth0", netaddr.IPNetwork("192.168.1.12/24"))


class Host:
    """What detection finds next, and the registrations the agent made."""

    def __init__(self, agent: Agent) -> None:
        self.found: tuple[Underlay, int] | Exception = (ETH0, 1500)
        self.v6: Underlay | None = None  # the IPv6 underlay detection finds
        self.registered: list[tuple[str | None, str, int]] = []
        self.fail_register: Exception | None = None
        agent._underlay, agent._underlay_mtu = ETH0, 1500
        agent._find_underlay = self.find  # type: ignore[method-assign]
        agent.register = self.register  # type: ignore[method-assign,assignment]
        self.agent = agent

    def find(self) -> _Underlays:
        if isinstance(self.found, Exception):
            raise self.found
        return _Underlays(*self.found, self.v6, 1500)

    def register(self, _store: object, _ipam: object) -> None:
        if self.fail_register is not None:
            raise self.fail_register
        u = self.agent._underlay
        assert u is not None
        self.registered.append((u.interface, str(u.address), self.agent._underlay_mtu))

    def check(self) -> bool:
        return self.agent.check_underlay(None, None)  # type: ignore[arg-type]


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(Agent(AgentConfig("n1", "memory://", tmp_path, str(tmp_path / "cni.sock"))))


def test_nothing_moved_registers_nothing(host: Host) -> None:
    assert not host.check()
    assert host.registered == []


def test_an_ipv6_underlay_that_comes_or_moves_is_registered(host: Host) -> None:
    host.v6 = Underlay("eth0", netaddr.IPNetwork("fd00:0:1::12/64"))
    assert host.check()
    assert host.agent._underlay6 == host.v6
    host.v6 = Underlay("eth0", netaddr.IPNetwork("fd00:0:1::12/80"))  # a new prefix
    assert host.check()
    assert not host.check()
    host.v6 = None  # gone: registered without it, so peers stop sending IPv6 VXLAN here
    assert host.check()
    assert host.agent._underlay6 is None
    assert len(host.registered) == 3


@pytest.mark.parametrize(
    ("found", "why"),
    [
        ((Underlay("eth0", netaddr.IPNetwork("192.168.1.77/24")), 1500), "new host part"),
        ((Underlay("eth0", netaddr.IPNetwork("192.168.1.12/25")), 1500), "new prefix"),
        ((Underlay("eth1", netaddr.IPNetwork("192.168.1.12/24")), 1500), "new interface"),
        ((ETH0, 9000), "new MTU"),
    ],
)
def test_any_move_registers_the_new_underlay(
    host: Host, found: tuple[Underlay, int], why: str
) -> None:
    host.found = found
    assert host.check(), why
    assert host.registered == [(found[0].interface, str(found[0].address), found[1])]
    assert not host.check()  # registered once, then steady
    assert host.agent.metrics()["overlay_underlay_changes_total"][2] == 1


def test_a_failed_detection_keeps_the_underlay_and_warns_once(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    host.found = autodetect.AutodetectError("cidr=192.168.1.0/24: no address in it")
    with caplog.at_level(logging.WARNING):
        assert not host.check()
        assert not host.check()
    assert host.registered == []
    assert host.agent._underlay == ETH0
    assert [r.message for r in caplog.records].count(
        "event=underlay_check_failed keeping=192.168.1.12/24 "
        "error=cidr=192.168.1.0/24: no address in it"
    ) == 1


def test_a_datastore_error_keeps_the_old_underlay_so_the_next_check_retries(host: Host) -> None:
    moved = Underlay("eth1", netaddr.IPNetwork("192.168.1.77/24"))
    host.found = (moved, 1500)
    host.fail_register = DatastoreError("database is locked")
    with pytest.raises(DatastoreError):
        host.check()
    assert host.agent._underlay == ETH0
    host.fail_register = None
    assert host.check()
    assert host.registered == [("eth1", "192.168.1.77/24", 1500)]


def test_health_says_why_the_agent_is_not_ready_or_not_live(tmp_path: Path) -> None:
    # Unit level: a reconciler on the fake kernel and a stand-in for the watch thread. The
    # endpoints on a running agent are netns_tests/test_agent_status.py's.
    agent = Agent(AgentConfig("n1", "memory://", tmp_path, str(tmp_path / "cni.sock")))
    h = agent.health()
    assert h.not_live == []
    assert h.not_ready == ["datastore not read yet", "dataplane not programmed yet"]
    watcher = SimpleNamespace(synced=threading.Event(), last_error=None)
    watcher.synced.set()
    agent.watcher = watcher  # type: ignore[assignment]
    agent.reconciler = Reconciler(FakeKernel(), lambda v: compute(v, me(), DataplaneConfig()))
    agent.reconciler.update_view(standard_view(pool(EncapMode.ALWAYS)))
    assert agent.reconciler.run_once() is Outcome.SYNCED
    assert agent.health() == Health([], [])
    watcher.last_error = "etcd: connection refused"
    assert agent.health().not_ready == ["datastore unreachable: etcd: connection refused"]
    watcher.last_error = None
    agent.reconciler.heartbeat = time.monotonic() - 61
    assert agent.health().not_live == ["reconciler loop stuck for 61s"]
    agent.reconciler.heartbeat = time.monotonic()
    dead = threading.Thread(target=lambda: None, name="watch")
    dead.start()
    dead.join()
    agent._threads = [dead]
    h = agent.health()
    assert h.not_live == ["thread watch has stopped"] and h.not_ready == h.not_live


def test_a_complete_cold_start_makes_the_node_ready_before_the_normal_pass(
    tmp_path: Path,
) -> None:
    """cold_start.py wrote the whole dataplane (routes, L2, nexthops, tunnel filter, NAT):
    ready once the datastore is read, while the normal first pass still checks it; a cold
    start with a failed change is not enough. Its changes count in the metrics."""
    agent = Agent(AgentConfig("n1", "memory://", tmp_path, str(tmp_path / "cni.sock")))
    watcher = SimpleNamespace(synced=threading.Event(), last_error=None)
    watcher.synced.set()
    agent.watcher = watcher  # type: ignore[assignment]
    agent.reconciler = Reconciler(FakeKernel(), lambda v: compute(v, me(), DataplaneConfig()))
    assert agent.health().not_ready == ["dataplane not programmed yet"]
    agent._cold = {"changes": 40006, "failed": 1, "duration": 0.3}
    assert agent.health().not_ready == ["dataplane not programmed yet"]
    agent._cold = {"changes": 40007, "failed": 0, "duration": 0.3}
    assert agent.health() == Health([], [])
    agent.watcher = None
    assert agent.status()["cold_start"] == agent._cold
    # Its changes count among the kernel changes, before the reconciler made any.
    assert agent.metrics()["overlay_kernel_ops_total"][2] == 40007
