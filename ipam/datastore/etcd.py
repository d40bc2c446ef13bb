"""The etcd backend: the Datastore protocol on etcd v3 (3.4+) through its JSON gateway.

Conditional writes are single transactions: create compares create_revision == 0,
update and delete compare mod_revision == the revision the caller read. etcd's store
revision is the protocol's revision, so a watch resumes exactly where a listing ended.

A write whose connection breaks (or whose attempt times out) after it was sent may have
been applied; it is retried on the next endpoint and then loses its own compare. Reporting
that as a Conflict would make the caller redo work that is already done (an IPAM assign
would hand out a second address and leak the first), so after such a retry the key is read
back: if it holds exactly the value we wrote (or, for a delete, is gone), the write counts
as ours. IPAM values carry per-write sequence numbers, so an identical value written by
someone else in between is not a practical concern. If it holds something else, our
attempt may still have landed before another writer's: update and delete then raise
Ambiguous, so the IPAM layer can look for its own work in the stored value.
"""

from __future__ import annotations

import base64
import builtins
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs

from ipam.datastore.base import (
    KV,
    AlreadyExists,
    Ambiguous,
    Compacted,
    Conflict,
    Event,
    EventType,
    KeyListing,
    Listing,
    NotFound,
    Unavailable,
)
from ipam.datastore.etcd_gateway import (
    Endpoint,
    GatewayClient,
    GatewayError,
    JsonStream,
    StreamClosed,
    parse_endpoint,
)

_OUT_OF_RANGE = 11  # gRPC code etcd uses for "required revision has been compacted"
_URL_PARAMS = ("cacert", "cert", "key", "prefix", "timeout")

T = TypeVar("T")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _range_end(prefix: bytes) -> bytes:
    """The first key after every key starting with `prefix` (b"\\0" = to the end)."""
    p = prefix.rstrip(b"\xff")
    if not p:
        return b"\0"
    return p[:-1] + bytes([p[-1] + 1])


def _ssl_context(
    ca_cert: str | Path | None, cert: str | Path | None, key: str | Path | None
) -> ssl.SSLContext:
    if (cert is None) != (key is None):
        raise ValueError(f"etcd TLS: cert and key go together (cert={cert!r}, key={key!r})")
    for name, path in (("cacert", ca_cert), ("cert", cert), ("key", key)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"etcd TLS: {name} file {str(path)!r} does not exist")
    ctx = ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None)
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


@dataclass(frozen=True, slots=True)
class EtcdSettings:
    endpoints: list[Endpoint]
    tls: bool = False
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    prefix: str = ""
    timeout: float = 5.0


def parse_url(url: str) -> EtcdSettings:
    """etcd://h1:p1,h2:p2[?prefix=..&timeout=..] (HTTP); etcds://... or any of
    ?cacert=..&cert=..&key=.. (TLS; cert+key is the client certificate)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("etcd", "etcds"):
        raise ValueError(f"etcd URL {url!r}: expected etcd://host:port[,host:port...]")
    hosts, _, query = rest.partition("?")
    hosts = hosts.rstrip("/")
    if not hosts:
        raise ValueError(f"etcd URL {url!r}: no host:port given")
    params: dict[str, str] = {}
    for name, values in parse_qs(query, keep_blank_values=True).items():
        if name not in _URL_PARAMS:
            known = ", ".join(_URL_PARAMS)
            raise ValueError(f"etcd URL {url!r}: unknown parameter {name!r} (known: {known})")
        params[name] = values[-1]
    timeout = 5.0
    if "timeout" in params:
        try:
            timeout = float(params["timeout"])
        except ValueError:
            raise ValueError(
                f"etcd URL {url!r}: timeout {params['timeout']!r} is not a number"
            ) from None
        if not timeout > 0:
            raise ValueError(f"etcd URL {url!r}: timeout must be > 0, got {timeout:g}")
    ca_cert, cert, key = (params.get(n) or None for n in ("cacert", "cert", "key"))
    if (cert is None) != (key is None):
        raise ValueError(f"etcd URL {url!r}: cert and key go together")
    try:
        endpoints = [parse_endpoint(h) for h in hosts.split(",")]
    except ValueError as e:
        raise ValueError(f"etcd URL {url!r}: {e}") from None
    return EtcdSettings(
        endpoints=endpoints,
        tls=scheme == "etcds" or any((ca_cert, cert, key)),
        ca_cert=ca_cert,
        cert=cert,
        key=key,
        prefix=params.get("prefix", ""),
        timeout=timeout,
    )


class EtcdDatastore:
    """Datastore on an etcd cluster. `endpoints` are "host:port"; every key is stored
    under `prefix` (which callers never see). TLS is used when `tls` is true or any of
    ca_cert/cert/key is given; cert+key authenticate the client."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        prefix: str = "",
        ca_cert: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        timeout: float = 5.0,
        tls: bool | None = None,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = endpoints.split(",")
        eps = [parse_endpoint(e) for e in endpoints]
        use_tls = tls if tls is not None else any(x is not None for x in (ca_cert, cert, key))
        ctx = _ssl_context(ca_cert, cert, key) if use_tls else None
        self.prefix = prefix
        self.page_size = 2000  # keys per range request of list()
        self._pfx = prefix.encode()
        self._client = GatewayClient(eps, ssl_context=ctx, timeout=timeout)

    @classmethod
    def from_url(cls, url: str) -> EtcdDatastore:
        """etcd://h1:p1,h2:p2[?prefix=..&timeout=..] over HTTP; etcds://... or any of
        ?cacert=..&cert=..&key=.. for TLS (cert+key = client certificate)."""
        s = parse_url(url)
        return cls(
            [str(e) for e in s.endpoints],
            prefix=s.prefix,
            ca_cert=s.ca_cert,
            cert=s.cert,
            key=s.key,
            timeout=s.timeout,
            tls=s.tls,
        )

    # -- wire helpers ------------------------------------------------------------------

    @property
    def endpoints(self) -> list[Endpoint]:
        return list(self._client.endpoints)

    @property
    def timeout(self) -> float:
        return self._client.timeout

    def _key(self, key: str) -> bytes:
        return self._pfx + key.encode()

    def _unkey(self, raw: bytes) -> str:
        return raw[len(self._pfx) :].decode()

    def _key_of(self, kv: dict[str, Any]) -> str:
        return self._unkey(_unb64(kv.get("key")))

    def _kv(self, kv: dict[str, Any]) -> KV:
        return KV(
            self._key_of(kv),
            _unb64(kv.get("value")).decode(),
            int(kv.get("mod_revision", 0)),
        )

    def _call(self, path: str, request: dict[str, Any]) -> dict[str, Any]:
        return self._client.call(path, request)

    @staticmethod
    def _header_revision(resp: dict[str, Any]) -> int:
        return int(resp.get("header", {}).get("revision", 0))

    # -- the protocol ------------------------------------------------------------------

    def get(self, key: str) -> KV | None:
        resp = self._call("/v3/kv/range", {"key": _b64(self._key(key))})
        kvs = resp.get("kvs") or []
        return self._kv(kvs[0]) if kvs else None

    def list(self, prefix: str) -> Listing:
        items, rev = self._range_all(prefix, self._kv, keys_only=False)
        return Listing(items, rev)

    def keys(self, prefix: str) -> KeyListing:
        return KeyListing(*self._range_all(prefix, self._key_of, keys_only=True))

    def _range_all(
        self, prefix: str, convert: Callable[[dict[str, Any]], T], *, keys_only: bool
    ) -> tuple[builtins.list[T], int]:
        """Every kv under `prefix` from one snapshot, paged and converted page by page (so
        raw pages do not pile up), plus that snapshot's revision. keys_only leaves the
        values on the server."""
        full = self._key(prefix)
        end = _b64(_range_end(full))
        for _attempt in range(3):
            start, rev = full, 0
            items: list[T] = []
            try:
                while True:
                    req: dict[str, Any] = {
                        "key": _b64(start),
                        "range_end": end,
                        "limit": self.page_size,
                    }
                    if keys_only:
                        req["keys_only"] = True
                    if rev:
                        req["revision"] = rev  # later pages read the first page's snapshot
                    resp = self._call("/v3/kv/range", req)
                    rev = rev or self._header_revision(resp)
                    kvs = resp.get("kvs") or []
                    items.extend(map(convert, kvs))
                    if not resp.get("more") or not kvs:
                        return items, rev
                    start = _unb64(kvs[-1]["key"]) + b"\0"
            except GatewayError as e:
                # The snapshot was compacted between pages: take a fresh one.
                if e.code != _OUT_OF_RANGE:
                    raise
        raise Unavailable(f"etcd list {prefix!r}: snapshot compacted three times in a row")

    def _txn(
        self,
        compare: dict[str, Any],
        success: dict[str, Any],
        failure: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Run one transaction; also say whether it was retried after a failed attempt."""
        req: dict[str, Any] = {"compare": [compare], "success": [success]}
        if failure is not None:
            req["failure"] = [failure]
        return self._client.call_tracked("/v3/kv/txn", req)

    def _landed(self, key: str, value: str) -> int | None:
        """After a retried write lost its compare: the revision of our own earlier attempt
        if the key holds exactly what we wrote."""
        kv = self.get(key)
        return kv.mod_revision if kv is not None and kv.value == value else None

    def create(self, key: str, value: str) -> int:
        k = _b64(self._key(key))
        resp, retried = self._txn(
            {"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": 0},
            {"request_put": {"key": k, "value": _b64(value.encode())}},
        )
        if not resp.get("succeeded"):
            if retried and (rev := self._landed(key, value)) is not None:
                return rev
            raise AlreadyExists(key)
        return self._header_revision(resp)

    def update(self, key: str, value: str, revision: int) -> int:
        if revision <= 0:  # mod_revision 0 would match a missing key and create it
            raise Conflict(f"{key} (revision {revision})")
        k = _b64(self._key(key))
        resp, retried = self._txn(
            {"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": revision},
            {"request_put": {"key": k, "value": _b64(value.encode())}},
        )
        if not resp.get("succeeded"):
            if not retried:
                raise Conflict(f"{key} (revision {revision})")
            if (rev := self._landed(key, value)) is not None and rev > revision:
                return rev
            raise Ambiguous(f"{key} (revision {revision}): retried after a lost answer")
        return self._header_revision(resp)

    def delete(self, key: str, revision: int) -> None:
        k = _b64(self._key(key))
        resp, retried = self._txn(
            {"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": revision},
            {"request_delete_range": {"key": k}},
            {"request_range": {"key": k, "keys_only": True}},
        )
        (answer,) = resp.get("responses") or [{}]
        if resp.get("succeeded"):
            if int(answer.get("response_delete_range", {}).get("deleted", 0)) == 0:
                raise NotFound(key)  # compared mod_revision 0 with a missing key
            return
        if not answer.get("response_range", {}).get("kvs"):
            if retried:
                return  # our earlier attempt deleted it
            raise NotFound(key)
        if retried:  # deleted by us and created again since, or never deleted
            raise Ambiguous(f"{key} (revision {revision}): retried after a lost answer")
        raise Conflict(f"{key} (revision {revision})")

    def watch(self, prefix: str, start_revision: int) -> EtcdWatch:
        return EtcdWatch(self, prefix, start_revision)

    def revision(self) -> int:
        # Any range answer carries the store revision; an exact missing key is cheapest.
        resp = self._call("/v3/kv/range", {"key": _b64(b"\0"), "count_only": True})
        return self._header_revision(resp)

    def compact(self, revision: int) -> None:
        """Drop history before `revision` (an operator task; tests use it for Compacted)."""
        self._call("/v3/kv/compaction", {"revision": revision, "physical": True})

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> EtcdDatastore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EtcdWatch:
    """One gateway watch stream. When it breaks, the next call reopens it on the next
    endpoint from the revision after the last event delivered, so nothing is lost or
    repeated; Unavailable only once no endpoint answered for the store's timeout."""

    def __init__(self, store: EtcdDatastore, prefix: str, start_revision: int) -> None:
        self._store = store
        full = store._key(prefix)
        self._request_base = {"key": _b64(full), "range_end": _b64(_range_end(full))}
        self._next_rev = max(start_revision, 1)
        self._stream: JsonStream | None = None
        self._ep = store._client.current
        self._down_since: float | None = None
        self._last_error = ""
        self._closed = False

    def _connect(self, deadline: float) -> bool:
        client = self._store._client
        n = len(client.endpoints)
        request = {"create_request": {**self._request_base, "start_revision": self._next_rev}}
        for k in range(n):
            # Always try at least one endpoint, even for next(0): connecting is not waiting.
            if k and time.monotonic() >= deadline:
                break
            i = (self._ep + k) % n
            try:
                self._stream = JsonStream.open(
                    client.endpoints[i],
                    client.ssl_context,
                    "/v3/watch",
                    request,
                    client.attempt_timeout,
                )
            except (OSError, StreamClosed) as e:
                self._last_error = f"{client.endpoints[i]}: {e}"
                continue
            self._ep = i
            self._down_since = None
            return True
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        if now - self._down_since >= client.timeout:
            raise Unavailable(
                f"etcd watch: no endpoint of {client.describe()} answered for "
                f"{client.timeout:g}s (last: {self._last_error})"
            )
        time.sleep(max(0.0, min(0.1, deadline - now)))
        return False

    def _drop(self, why: str) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._last_error = f"{self._store._client.endpoints[self._ep]}: {why}"
        self._ep = (self._ep + 1) % len(self._store._client.endpoints)

    def _events(self, msg: dict[str, Any]) -> list[Event]:
        if "error" in msg:
            self._drop(str(msg["error"].get("message", msg["error"])))
            return []
        result = msg.get("result", {})
        if result.get("canceled"):
            compact = int(result.get("compact_revision", 0))
            if compact:
                self._closed = True
                raise Compacted(
                    f"etcd watch from revision {self._next_rev}: history before "
                    f"revision {compact} was compacted; re-list and watch again"
                )
            self._drop(f"watch canceled: {result.get('cancel_reason', 'no reason given')}")
            return []
        out = []
        for ev in result.get("events") or []:
            kv = ev.get("kv", {})
            rev = int(kv.get("mod_revision", 0))
            key = self._store._unkey(_unb64(kv.get("key")))
            if ev.get("type") == "DELETE":
                out.append(Event(EventType.DELETE, key, None, rev))
            else:
                out.append(Event(EventType.PUT, key, _unb64(kv.get("value")).decode(), rev))
            self._next_rev = max(self._next_rev, rev + 1)
        return out

    def next(self, timeout: float) -> list[Event]:
        """Events within `timeout` ([] if none). Reconnecting may add up to the store's
        per-attempt timeout when an endpoint does not answer at all."""
        deadline = time.monotonic() + timeout
        while not self._closed:
            if self._stream is None and not self._connect(deadline):
                if time.monotonic() >= deadline:
                    return []
                continue
            stream = self._stream
            if stream is None:  # closed by another thread meanwhile
                continue
            try:
                msgs = stream.read(max(0.0, deadline - time.monotonic()))
            except StreamClosed as e:
                if not self._closed:
                    self._drop(str(e))
                continue
            out: list[Event] = []
            for msg in msgs:
                out.extend(self._events(msg))
                if self._stream is None:
                    break  # dropped mid-batch: what follows is resent after reconnecting
            if out:
                return out
            if time.monotonic() >= deadline:
                return []
        return []

    def close(self) -> None:
        self._closed = True
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __iter__(self) -> Iterator[Event]:
        while not self._closed:
            yield from self.next(1.0)
