"""A small client for etcd's JSON gateway (/v3/ on the client port): requests with
failover across endpoints over kept-alive HTTP connections, and one streaming reader
for watches.

Why not etcd3gw: its client talks to one host, so failover would wrap every call; its
watch is a background thread over a `requests` stream that ends on a drop instead of
resuming from the last revision; and it costs ~130 ms to import (requests). The gateway
protocol is small (POST JSON, base64 keys), so owning it is simpler.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ipam.datastore.base import DatastoreError, Unavailable

DEFAULT_PORT = 2379
# gRPC status codes the gateway reports that mean "try again, maybe elsewhere":
# UNAVAILABLE (no leader, leader changed), DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED.
RETRYABLE_CODES = frozenset({4, 8, 14})
_IDLE_PER_ENDPOINT = 32


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """'host:port', '[v6]:port' or 'host' (port 2379)."""
    t = text.strip()
    if not t or "/" in t:
        raise ValueError(f"etcd endpoint {text!r}: expected host:port")
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"etcd endpoint {text!r}: expected [ipv6]:port")
        port_text = rest[1:] if rest else str(DEFAULT_PORT)
    elif t.count(":") == 1:
        host, port_text = t.split(":")
    elif ":" not in t:
        host, port_text = t, str(DEFAULT_PORT)
    else:
        raise ValueError(f"etcd endpoint {text!r}: write IPv6 addresses as [addr]:port")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"etcd endpoint {text!r}: port must be 1-65535")
    return Endpoint(host, int(port_text))


class GatewayError(DatastoreError):
    """etcd refused a request (a gRPC status that retrying will not fix)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"etcd error {code}: {message}")
        self.code = code
        self.message = message


class _EndpointDown(Exception):
    """This endpoint cannot serve the request now; the caller tries another."""


def _error_of(status: int, body: bytes) -> tuple[int | None, str]:
    """The gRPC code and message of an error answer (code None if it is not etcd's JSON)."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "code" in doc:
        return int(doc["code"]), str(doc.get("message") or doc.get("error") or "")
    snippet = body[:120].decode("utf-8", "replace").strip()
    return None, f"answered HTTP {status}: {snippet}"


class GatewayClient:
    """POSTs JSON to /v3/... on one endpoint at a time, failing over to the others.

    Thread-safe: each request borrows an idle kept-alive connection (or opens one).
    """

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        ssl_context: ssl.SSLContext | None,
        timeout: float,
    ) -> None:
        if not endpoints:
            raise ValueError("etcd endpoints: at least one host:port is needed")
        if timeout <= 0:
            raise ValueError(f"etcd timeout: must be > 0, got {timeout}")
        self.endpoints = list(endpoints)
        self.ssl_context = ssl_context
        self.timeout = timeout
        # One attempt gets only part of the budget: a member whose leader just died holds
        # a write for etcd's own request timeout (7 s by default) before it gives up, while
        # the next member may already answer.
        self.attempt_timeout = max(1.0, timeout / 3)
        self._lock = threading.Lock()
        self._current = 0
        self._idle: list[list[http.client.HTTPConnection]] = [[] for _ in self.endpoints]
        self._closed = False

    @property
    def current(self) -> int:
        return self._current

    def describe(self) -> str:
        return ", ".join(str(e) for e in self.endpoints)

    def _new_conn(self, i: int, timeout: float) -> http.client.HTTPConnection:
        ep = self.endpoints[i]
        if self.ssl_context is not None:
            return http.client.HTTPSConnection(
                ep.host, ep.port, timeout=timeout, context=self.ssl_context
            )
        return http.client.HTTPConnection(ep.host, ep.port, timeout=timeout)

    def _drop_idle(self, i: int) -> None:
        with self._lock:
            conns, self._idle[i] = self._idle[i], []
        for c in conns:
            c.close()

    def _once(self, i: int, path: str, payload: bytes, timeout: float) -> dict[str, Any]:
        with self._lock:
            conn = self._idle[i].pop() if self._idle[i] else None
        if conn is None:
            conn = self._new_conn(i, timeout)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        try:
            conn.request("POST", path, body=payload, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            # Its siblings in the pool most likely point at the same dead process.
            self._drop_idle(i)
            raise _EndpointDown(_describe_exc(e)) from e
        keep = not resp.will_close
        if keep:
            with self._lock:
                keep = len(self._idle[i]) < _IDLE_PER_ENDPOINT and not self._closed
                if keep:
                    self._idle[i].append(conn)
        if not keep:
            conn.close()
        if resp.status == 200:
            try:
                doc = json.loads(body)
            except ValueError as e:
                raise _EndpointDown(f"answered invalid JSON: {body[:80]!r}") from e
            if not isinstance(doc, dict):
                raise _EndpointDown(f"answered unexpected JSON: {body[:80]!r}")
            return doc
        code, message = _error_of(resp.status, body)
        if code is None or code in RETRYABLE_CODES:
            raise _EndpointDown(message)
        raise GatewayError(code, message)

    def call(self, path: str, request: dict[str, Any]) -> dict[str, Any]:
        return self.call_tracked(path, request)[0]

    def call_tracked(self, path: str, request: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """POST `request` to `path`; on connection trouble try the next endpoints, in rounds
        with a short backoff, until the timeout. Unavailable names every endpoint.

        Also says whether an earlier attempt failed: that attempt may have been applied
        before its answer was lost, which a conditional write must then account for."""
        payload = json.dumps(request).encode()
        deadline = time.monotonic() + self.timeout
        errors: dict[str, str] = {}
        delay = 0.02
        n = len(self.endpoints)
        while True:
            start = self._current
            for k in range(n):
                i = (start + k) % n
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    doc = self._once(i, path, payload, min(remaining, self.attempt_timeout))
                except _EndpointDown as e:
                    errors[str(self.endpoints[i])] = str(e)
                    continue
                if i != self._current:
                    self._current = i
                return doc, bool(errors)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                detail = "; ".join(f"{ep}: {err}" for ep, err in errors.items())
                hint = ""
                if self.ssl_context is None and "closed connection" in detail:
                    hint = "; if the server speaks TLS, use etcds:// or ?cacert=..&cert=..&key=.."
                raise Unavailable(
                    f"etcd at {self.describe()} did not answer within {self.timeout:g}s"
                    + (f" ({detail})" if detail else "")
                    + hint
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.5)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        for i in range(len(self.endpoints)):
            self._drop_idle(i)


def _describe_exc(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if isinstance(e, OSError) else f"{type(e).__name__}: {text}"


class StreamClosed(Exception):
    """The server ended the stream or the connection broke."""


class JsonStream:
    """One streaming POST (the gateway's /v3/watch): newline-delimited JSON messages in a
    chunked HTTP body. Parsed by hand over a raw socket so a read can time out between
    messages without corrupting any state."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._raw = b""  # bytes received, not yet de-chunked
        self._body = b""  # de-chunked body, not yet split into messages
        self._chunk_left = 0  # bytes left in the current chunk
        self._chunked = True
        self._eof = False

    @classmethod
    def open(
        cls,
        ep: Endpoint,
        ssl_context: ssl.SSLContext | None,
        path: str,
        request: dict[str, Any],
        timeout: float,
    ) -> JsonStream:
        payload = json.dumps(request).encode()
        deadline = time.monotonic() + timeout
        sock = socket.create_connection((ep.host, ep.port), timeout=timeout)
        try:
            if ssl_context is not None:
                sock = ssl_context.wrap_socket(sock, server_hostname=ep.host)
            head = (
                f"POST {path} HTTP/1.1\r\nHost: {ep}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n"
            ).encode()
            sock.sendall(head + payload)
            stream = cls(sock)
            stream._read_head(deadline)
            return stream
        except BaseException:
            sock.close()
            raise

    def _recv(self, timeout: float) -> bool:
        """Append what arrives within `timeout` to the raw buffer; False on timeout."""
        self._sock.settimeout(max(timeout, 0.001))
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            return False
        if not data:
            raise StreamClosed("connection closed by the server")
        self._raw += data
        return True

    def _read_head(self, deadline: float) -> None:
        while b"\r\n\r\n" not in self._raw:
            if len(self._raw) > 65536:
                raise StreamClosed("HTTP response head too long")
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._recv(remaining):
                raise TimeoutError("no HTTP response head in time")
        head, self._raw = self._raw.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        self._chunked = "chunked" in headers.get("transfer-encoding", "")
        if status != 200:
            body = self._raw
            # Best effort: the error body is short and usually already here.
            while time.monotonic() < deadline and len(body) < 4096:
                try:
                    if not self._recv(min(0.2, deadline - time.monotonic())):
                        break
                except StreamClosed:
                    break
                body = self._raw
            code, message = _error_of(status, _dechunk_all(body) if self._chunked else body)
            if code is None or code in RETRYABLE_CODES:
                raise StreamClosed(message)
            raise GatewayError(code, message)

    def _decode(self) -> None:
        if not self._chunked:
            self._body += self._raw
            self._raw = b""
            return
        while self._raw:
            if self._chunk_left:
                take = self._raw[: self._chunk_left]
                self._body += take
                self._raw = self._raw[len(take) :]
                self._chunk_left -= len(take)
                if self._chunk_left:
                    return
                self._chunk_left = -2  # the CRLF after the chunk data
            if self._chunk_left < 0:
                if len(self._raw) < 2:
                    return
                self._raw = self._raw[2:]
                self._chunk_left = 0
            line, sep, rest = self._raw.partition(b"\r\n")
            if not sep:
                return
            size = int(line.split(b";")[0].strip() or b"0", 16)
            self._raw = rest
            if size == 0:
                self._eof = True
                return
            self._chunk_left = size

    def _messages(self) -> list[dict[str, Any]]:
        *lines, self._body = self._body.split(b"\n")
        out = []
        for line in lines:
            if line.strip():
                doc = json.loads(line)
                if isinstance(doc, dict):
                    out.append(doc)
        return out

    def read(self, timeout: float) -> list[dict[str, Any]]:
        """Messages that arrive within `timeout` ([] if none); StreamClosed at the end."""
        deadline = time.monotonic() + timeout
        while True:
            # Decode first: bytes that came in with the response head (the first messages,
            # when events are already waiting) sit undecoded until then, and no further
            # data may ever arrive to flush them.
            try:
                self._decode()
            except ValueError as e:
                raise StreamClosed(f"bad chunk encoding: {e}") from e
            try:
                msgs = self._messages()
            except ValueError as e:
                raise StreamClosed(f"bad JSON in the stream: {e}") from e
            if msgs:
                return msgs
            if self._eof:
                raise StreamClosed("the server ended the stream")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            try:
                got = self._recv(remaining)
            except OSError as e:
                raise StreamClosed(_describe_exc(e)) from e
            if not got:
                return []

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


def _dechunk_all(data: bytes) -> bytes:
    out = b""
    while data:
        line, sep, rest = data.partition(b"\r\n")
        if not sep:
            break
        try:
            size = int(line.split(b";")[0].strip() or b"0", 16)
        except ValueError:
            return data
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out
