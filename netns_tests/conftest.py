"""Fixtures shared by the kernel-layer tests: a scratch underlay and our Kernel in it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from netns_tests.kernel_fixtures import underlay
from overlay.kernel.apply import Kernel


@pytest.fixture
def node() -> Iterator[str]:
    """The node namespace of a fresh underlay (veth0 192.0.2.1/24), deleted afterwards."""
    with underlay() as (ns, _other):
        yield ns


@pytest.fixture
def kernel(node: str) -> Iterator[Kernel]:
    with Kernel(netns=node) as k:
        yield k
