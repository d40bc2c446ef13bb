"""The agent pauses Python's cyclic collector for its start-up and resumes it, with the first
state frozen out of it, once the first pass is over (or has failed)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlay.agent import GC_RUNNING, Agent, AgentConfig
from overlay.reconciler import Outcome


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    thresholds = gc.get_threshold()
    cfg = AgentConfig("n1", "memory://", tmp_path, str(tmp_path / "cni.sock"))
    try:
        yield Agent(cfg)
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        gc.enable()


@pytest.mark.parametrize("first", [Outcome.SYNCED, Outcome.FAILED])
def test_the_collector_resumes_after_the_first_pass(agent: Agent, first: Outcome) -> None:
    agent.pause_gc_until_first_pass()
    assert not gc.isenabled()
    agent._after_pass(Outcome.NO_VIEW)  # nothing applied yet: still paused
    agent._after_pass(Outcome.IDLE)
    assert not gc.isenabled()
    agent._after_pass(first)
    assert gc.isenabled()
    assert gc.get_threshold() == GC_RUNNING
    assert gc.get_freeze_count() > 0
    gc.disable()
    agent._after_pass(Outcome.SYNCED)  # the start-up pause ends once; later passes leave it be
    assert not gc.isenabled()
