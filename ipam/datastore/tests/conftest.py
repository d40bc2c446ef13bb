"""The `store` fixture: every contract test runs against each backend unchanged."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipam.datastore import Datastore
from ipam.datastore.memory import MemoryDatastore

BACKENDS = ["memory", "sqlite", pytest.param("etcd", marks=pytest.mark.etcd)]


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One real single-member etcd server on loopback for the whole session."""
    if shutil.which("etcd") is None:
        pytest.skip("etcd server binary not installed (Debian package etcd-server)")
    from ipam.testing.etcd import EtcdCluster

    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), members=1)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Datastore]:
    backend = request.param
    ds: Datastore
    if backend == "memory":
        ds = MemoryDatastore()
    elif backend == "sqlite":
        from ipam.datastore.sqlite import SqliteDatastore

        ds = SqliteDatastore(tmp_path / "overlay.db")
    else:
        from ipam.datastore.etcd import EtcdDatastore

        cluster = request.getfixturevalue("etcd_cluster")
        # Each test gets its own key prefix on the shared server, so tests stay isolated.
        ds = EtcdDatastore(cluster.endpoints, prefix=f"/t/{request.node.name}/")  # type: ignore[attr-defined]
    try:
        yield ds
    finally:
        ds.close()
