"""The agent's settings: bad values are refused at start, naming the setting and the value."""

from __future__ import annotations

import math
from pathlib import Path

import netaddr
import pytest

from overlay.agent import Agent, AgentConfig
from overlay.compute import DataplaneConfig


def config(tmp_path: Path, **kw: object) -> AgentConfig:
    return AgentConfig("n1", "memory://", tmp_path, str(tmp_path / "s"), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1.0, math.nan])
def test_a_bad_check_interval_is_refused_naming_it(tmp_path: Path, bad: float) -> None:
    with pytest.raises(ValueError, match=rf"underlay_check_interval: {bad!r} is not a number"):
        Agent(config(tmp_path, underlay_check_interval=bad))


@pytest.mark.parametrize("bad", ["10.0.0.5/24", "fd00::/64", "not-an-address", "10.0.0.0/33"])
def test_a_bad_external_node_is_refused_naming_it(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match=rf"external_nodes: {bad!r} is not an IPv4 address"):
        Agent(config(tmp_path, external_nodes=("192.0.2.7", bad)))


def test_external_nodes_reach_the_dataplane_merged(tmp_path: Path) -> None:
    agent = Agent(config(tmp_path, external_nodes=("192.0.2.7", "192.0.2.0/25", "198.51.100.0/24")))
    nets = {str(n) for n in agent._dataplane_cfg.external_nodes}
    assert nets == {"192.0.2.0/25", "198.51.100.0/24"}  # the /32 lies inside the /25
    with pytest.raises(ValueError, match="external_nodes: fd00::/64 is not an IPv4 network"):
        DataplaneConfig(external_nodes=frozenset({netaddr.IPNetwork("fd00::/64")}))
