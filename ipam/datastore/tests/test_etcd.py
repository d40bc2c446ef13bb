"""The etcd backend beyond the shared contract: URLs, failover, TLS, compaction.

Every test here needs the real etcd server binary; members run on free loopback ports.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import netaddr
import pytest

from ipam.allocator import IPAM
from ipam.datastore import (
    KV,
    Ambiguous,
    Compacted,
    Conflict,
    Event,
    EventType,
    NotFound,
    Unavailable,
    open_datastore,
)
from ipam.datastore.etcd import EtcdDatastore, parse_url
from ipam.datastore.etcd_gateway import Endpoint
from ipam.records import BLOCKS_PREFIX
from ipam.testing.etcd import EtcdCluster
from ipam.tests.fake_resources import FakeResources, pool

pytestmark = pytest.mark.etcd


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _collect(watch: object, count: int, timeout: float = 15.0) -> list[Event]:
    """Events from `watch` until `count` arrived or `timeout` passed."""
    out: list[Event] = []
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        out.extend(watch.next(0.5))  # type: ignore[attr-defined]
    return out


# -- URLs ---------------------------------------------------------------------------


def test_url_plain_endpoints_and_default_port() -> None:
    s = parse_url("etcd://10.0.0.1:2379,etcd-b,[fd00::1]:4001/")
    assert s.endpoints == [
        Endpoint("10.0.0.1", 2379),
        Endpoint("etcd-b", 2379),
        Endpoint("fd00::1", 4001),
    ]
    assert not s.tls
    assert (s.prefix, s.timeout) == ("", 5.0)


def test_url_tls_by_scheme_or_by_files() -> None:
    assert parse_url("etcds://h:1").tls
    s = parse_url("etcd://h:1?cacert=/p/ca.pem&cert=/p/c.pem&key=/p/k.pem&prefix=/ov/&timeout=2")
    assert s.tls
    assert (s.ca_cert, s.cert, s.key) == ("/p/ca.pem", "/p/c.pem", "/p/k.pem")
    assert (s.prefix, s.timeout) == ("/ov/", 2.0)


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("etc://h:1", "etcd://"),
        ("etcd://", "no host"),
        ("etcd://h:99999", "'h:99999'"),
        ("etcd://h:x", "'h:x'"),
        ("etcd://fd00::1", "[addr]:port"),
        ("etcd://h:1?bogus=1", "'bogus'"),
        ("etcd://h:1?cert=/c.pem", "cert and key"),
        ("etcd://h:1?timeout=soon", "'soon'"),
    ],
)
def test_url_errors_name_the_bad_part(url: str, names: str) -> None:
    with pytest.raises(ValueError, match="etcd") as info:
        parse_url(url)
    assert names in str(info.value)


def test_missing_tls_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ValueError, match="cacert") as info:
        EtcdDatastore.from_url(f"etcd://127.0.0.1:1?cacert={missing}")
    assert str(missing) in str(info.value)


# -- nothing listening -------------------------------------------------------------


def test_unavailable_when_nothing_listens_names_endpoints_and_does_not_hang() -> None:
    eps = [f"127.0.0.1:{_unused_port()}", f"127.0.0.1:{_unused_port()}"]
    store = EtcdDatastore(eps, timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(Unavailable) as info:
        store.get("/x")
    assert time.monotonic() - t0 < 2.5
    assert eps[0] in str(info.value) and eps[1] in str(info.value)
    watch = store.watch("/", 1)
    t0 = time.monotonic()
    with pytest.raises(Unavailable):
        for _ in range(20):  # each call returns [] until the store timeout has passed
            watch.next(0.3)
    assert time.monotonic() - t0 < 3.0
    store.close()


# -- one member (the session server from conftest) ---------------------------------


@pytest.fixture
def raw_store(etcd_cluster: EtcdCluster) -> Iterator[EtcdDatastore]:
    store = EtcdDatastore(etcd_cluster.endpoints)
    yield store
    store.close()


def test_prefix_is_on_the_wire_and_hidden_from_callers(
    etcd_cluster: EtcdCluster, raw_store: EtcdDatastore, request: pytest.FixtureRequest
) -> None:
    base = f"/prefix-test/{request.node.name}"
    a = EtcdDatastore(etcd_cluster.endpoints, prefix=f"{base}/a")
    b = EtcdDatastore(etcd_cluster.endpoints, prefix=f"{base}/b")
    rev = a.create("/k", "from-a")
    b.create("/k", "from-b")
    assert [(kv.key, kv.value) for kv in a.list("/").items] == [("/k", "from-a")]
    raw = raw_store.get(f"{base}/a/k")
    assert raw is not None and raw.value == "from-a" and raw.mod_revision == rev
    w = a.watch("/", rev + 1)
    a.delete("/k", rev)
    b.create("/k2", "not for a")
    (ev,) = _collect(w, 1, timeout=5)
    assert (ev.type, ev.key, ev.value) == (EventType.DELETE, "/k", None)
    assert w.next(0.3) == []  # b's write is outside a's prefix
    w.close()
    a.close()
    b.close()


def test_list_pages_read_one_snapshot(raw_store: EtcdDatastore) -> None:
    store = EtcdDatastore([str(e) for e in raw_store.endpoints], prefix="/paging-test/")
    store.page_size = 2
    revs = {f"/k{i}": store.create(f"/k{i}", str(i)) for i in range(5)}
    listing = store.list("/")
    assert [kv.key for kv in listing.items] == sorted(revs)
    assert all(kv.mod_revision == revs[kv.key] for kv in listing.items)
    assert listing.revision >= max(revs.values())
    assert store.keys("/").keys == sorted(revs)
    store.close()


def test_keys_leave_values_on_the_server(
    raw_store: EtcdDatastore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = EtcdDatastore([str(e) for e in raw_store.endpoints], prefix="/keys-only-test/")
    store.create("/k", "a large value")
    answers: list[dict[str, Any]] = []
    call = store._call

    def recording_call(path: str, request: dict[str, Any]) -> dict[str, Any]:
        answers.append(call(path, request))
        return answers[-1]

    monkeypatch.setattr(store, "_call", recording_call)
    assert store.keys("/").keys == ["/k"]
    (answer,) = answers
    (kv,) = answer["kvs"]
    assert "value" not in kv
    store.close()


def test_delete_of_missing_key_with_revision_zero_is_not_found(raw_store: EtcdDatastore) -> None:
    with pytest.raises(NotFound):
        raw_store.delete("/never-written", 0)
    with pytest.raises(Conflict):
        raw_store.update("/never-written", "v", 0)
    assert raw_store.get("/never-written") is None


def test_watch_from_compacted_revision_raises_compacted(raw_store: EtcdDatastore) -> None:
    first = raw_store.create("/compact-test/a", "1")
    raw_store.update("/compact-test/a", "2", first)
    raw_store.compact(raw_store.revision())
    with pytest.raises(Compacted, match="re-list"):
        raw_store.watch("/compact-test/", first).next(5.0)


# -- three members: failover -------------------------------------------------------


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[EtcdCluster]:
    if shutil.which("etcd") is None:
        pytest.skip("etcd server binary not installed (etcd-server)")
    cluster = EtcdCluster(tmp_path, members=3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _leader_first(cluster: EtcdCluster) -> tuple[int, list[str]]:
    """Endpoints ordered so the client talks to the raft leader first: killing it then
    costs both the client's connection and an election, the hardest failover."""
    leader = cluster.leader_index()
    eps = cluster.endpoints
    return leader, [eps[leader]] + [e for i, e in enumerate(eps) if i != leader]


def test_writes_fail_over_when_the_member_in_use_is_killed(cluster3: EtcdCluster) -> None:
    leader, eps = _leader_first(cluster3)
    store = EtcdDatastore(eps, prefix="/failover/", timeout=5.0)
    rev = store.create("/counter", "0")
    assert store.endpoints[store._client.current] == store.endpoints[0]
    cluster3.kill_member(leader)
    t0 = time.monotonic()
    for i in range(1, 21):
        rev = store.update("/counter", str(i), rev)
    assert time.monotonic() - t0 < 10.0
    kv = store.get("/counter")
    assert kv is not None and (kv.value, kv.mod_revision) == ("20", rev)
    assert store._client.current != 0  # now served by a surviving member
    store.close()


def test_watch_resumes_on_another_member_without_gaps_or_repeats(cluster3: EtcdCluster) -> None:
    leader, eps = _leader_first(cluster3)
    store = EtcdDatastore(eps, prefix="/watch-failover/", timeout=5.0)
    start = store.create("/k", "0")
    watch = store.watch("/", start)
    assert [e.value for e in _collect(watch, 1)] == ["0"]  # stream now open on the leader
    rev = store.update("/k", "1", start)
    assert [e.value for e in _collect(watch, 1)] == ["1"]
    cluster3.kill_member(leader)
    for i in range(2, 7):
        rev = store.update("/k", str(i), rev)
    events = _collect(watch, 5)
    assert [e.value for e in events] == ["2", "3", "4", "5", "6"]
    assert events[-1].mod_revision == rev
    assert watch.next(0.3) == []
    watch.close()
    store.close()


# -- TLS ----------------------------------------------------------------------------


def test_tls_with_client_certificate(tmp_path: Path) -> None:
    if shutil.which("etcd") is None or shutil.which("openssl") is None:
        pytest.skip("etcd server or openssl not installed")
    cluster = EtcdCluster(tmp_path, members=1, tls=True)
    cluster.start()
    try:
        store = open_datastore(cluster.url + "&prefix=/tls/")
        rev = store.create("/k", "secret")
        watch = store.watch("/", rev)
        assert [(e.key, e.value) for e in _collect(watch, 1, timeout=5)] == [("/k", "secret")]
        watch.close()
        store.close()

        plain = EtcdDatastore(cluster.endpoints, timeout=1.0)
        with pytest.raises(Unavailable, match="etcds://"):
            plain.get("/k")
        plain.close()

        no_client_cert = EtcdDatastore(cluster.endpoints, ca_cert=cluster.ca_file, timeout=1.0)
        with pytest.raises(Unavailable):
            no_client_cert.get("/k")
        no_client_cert.close()
    finally:
        cluster.stop()


# -- the harness ----------------------------------------------------------------------


def test_harness_repicks_ports_taken_before_start_and_stops_idempotently(tmp_path: Path) -> None:
    if shutil.which("etcd") is None:
        pytest.skip("etcd server binary not installed (etcd-server)")
    cluster = EtcdCluster(tmp_path, members=1)
    taken = int(cluster.endpoints[0].rsplit(":", 1)[1])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        cluster.start()
        try:
            assert cluster.endpoints[0] != f"127.0.0.1:{taken}"
            store = EtcdDatastore(cluster.endpoints)
            assert store.create("/harness", "ok") > 0
            store.close()
        finally:
            cluster.stop()
    pid = cluster.pids[0]
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    cluster.stop()  # a second stop is a no-op


class _LoseFirstAnswer:
    """Wraps the gateway's single attempt: the first transaction (on a key containing
    `only`, if set) is applied by etcd, then `meanwhile` runs (another client's write),
    then its answer is 'lost' as if the connection broke, so the client retries it."""

    def __init__(self, store: EtcdDatastore, only: str = "") -> None:
        from ipam.datastore import etcd_gateway

        self.client = store._client
        self.real = self.client._once
        self.down = etcd_gateway._EndpointDown
        self.only = only.encode()
        self.armed = False
        self.meanwhile: Callable[[], object] = lambda: None

    def __call__(self, i: int, path: str, payload: bytes, timeout: float) -> dict[str, object]:
        doc = self.real(i, path, payload, timeout)
        if self.armed and path.endswith("/txn") and self.only in self._key(payload):
            self.armed = False
            self.meanwhile()
            raise self.down("connection reset after the request was sent")
        return doc

    @staticmethod
    def _key(payload: bytes) -> bytes:
        return base64.b64decode(json.loads(payload)["compare"][0]["key"])


@pytest.mark.etcd
def test_write_applied_but_answer_lost_counts_as_ours(raw_store: EtcdDatastore) -> None:
    lose = _LoseFirstAnswer(raw_store)
    raw_store._client._once = lose  # type: ignore[method-assign]

    lose.armed = True
    rev = raw_store.create("/lost/a", "v1")  # applied, answer lost, retried: still ours
    assert raw_store.get("/lost/a") == KV("/lost/a", "v1", rev)

    lose.armed = True
    rev2 = raw_store.update("/lost/a", "v2", rev)
    assert rev2 > rev and raw_store.get("/lost/a") == KV("/lost/a", "v2", rev2)

    lose.armed = True
    raw_store.delete("/lost/a", rev2)
    assert raw_store.get("/lost/a") is None

    # A genuine conflict after a retry is still a conflict, one that says it cannot tell
    # whether the first attempt landed before the other write.
    rev3 = raw_store.create("/lost/b", "mine")
    other = raw_store.update("/lost/b", "theirs", rev3)
    lose.armed = True
    with pytest.raises(Ambiguous):
        raw_store.update("/lost/b", "mine-again", rev3)
    assert raw_store.get("/lost/b") == KV("/lost/b", "theirs", other)


@pytest.fixture
def two_ipam_clients(
    etcd_cluster: EtcdCluster, request: pytest.FixtureRequest
) -> Iterator[tuple[IPAM, IPAM, _LoseFirstAnswer]]:
    """Two IPAM clients on one etcd; the first one's block writes can lose their answer."""
    prefix = f"/ambiguous/{request.node.name}"
    ours = EtcdDatastore(etcd_cluster.endpoints, prefix=prefix)
    theirs = EtcdDatastore(etcd_cluster.endpoints, prefix=prefix)
    res = FakeResources([pool("10.9.0.0/24", 29)])
    lose = _LoseFirstAnswer(ours, only=BLOCKS_PREFIX)
    ours._client._once = lose  # type: ignore[method-assign]
    try:
        yield IPAM(ours, res), IPAM(theirs, res), lose
    finally:
        ours.close()
        theirs.close()


def _stored(ipam: IPAM) -> dict[str, str | None]:
    return {
        str(a.address): a.handle_id
        for b in ipam.snapshot().blocks.values()
        for a in ipam.allocations_in(b.cidr)
    }


def test_assign_applied_then_overwritten_before_the_retry_is_not_done_twice(
    two_ipam_clients: tuple[IPAM, IPAM, _LoseFirstAnswer],
) -> None:
    """The leak a killed etcd leader once caused in the eight-client test: our block write
    lands, its answer is lost, another client writes the block before our retry reads it
    back. Assigning again would hand out a second address and leak the first."""
    ipam, other, lose = two_ipam_clients
    ipam.auto_assign("first", "n1")  # claims the block
    lose.armed, lose.meanwhile = True, lambda: other.auto_assign("theirs", "n1")
    (mine,) = ipam.auto_assign("mine", "n1").ipv4
    assert not lose.armed, "the fault was never injected"
    assert ipam.ips_by_handle("mine") == [mine.ip]
    assert sorted(map(str, _stored(ipam).values())) == ["first", "mine", "theirs"]
    assert ipam.check_consistency() == []

    # The same for one named address.
    lose.armed, lose.meanwhile = True, lambda: other.auto_assign("theirs-2", "n1")
    named = ipam.assign_ip("10.9.0.200", "named", "n1")
    assert not lose.armed and named.ip == netaddr.IPAddress("10.9.0.200")
    assert ipam.ips_by_handle("named") == [named.ip]
    assert ipam.check_consistency() == []


def test_release_applied_then_overwritten_before_the_retry_uncounts_the_handle(
    two_ipam_clients: tuple[IPAM, IPAM, _LoseFirstAnswer],
) -> None:
    ipam, other, lose = two_ipam_clients
    (mine,) = ipam.auto_assign("mine", "n1").ipv4
    lose.armed, lose.meanwhile = True, lambda: other.auto_assign("theirs", "n1")
    assert ipam.release_by_handle("mine") == [mine.ip]
    assert not lose.armed, "the fault was never injected"
    assert _stored(ipam) == {str(other.ips_by_handle("theirs")[0]): "theirs"}
    assert ipam.check_consistency() == []  # the handle record went with its address


def test_stream_delivers_messages_that_arrived_with_the_response_head() -> None:
    """etcd may answer a watch with the head, the 'created' message and a first event in one
    segment; nothing more may follow for a long time, so those must not wait for more data."""
    import socket as socket_mod

    from ipam.datastore.etcd_gateway import JsonStream

    ours, theirs = socket_mod.socketpair()
    try:
        body = b'{"result":{"created":true}}\n{"result":{"events":[{"kv":{}}]}}\n'
        theirs.sendall(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + f"{len(body):x}\r\n".encode()
            + body
            + b"\r\n"
        )
        stream = JsonStream(ours)
        stream._read_head(time.monotonic() + 2.0)
        got = stream.read(0.5)
        assert got == [{"result": {"created": True}}, {"result": {"events": [{"kv": {}}]}}]
    finally:
        ours.close()
        theirs.close()
