"""The agent's HTTP endpoint: Prometheus text on /metrics, JSON on /status, and the probes
/liveness and /readiness (Felix's paths on the same port 9099): 200, or 503 with the reasons.

It only reads snapshots handed over by callables, so it never blocks the writer. It speaks
just enough HTTP/1.1 for scrapers and probes (GET or HEAD, one request per connection) on
socketserver: http.server pulls in the email and TLS packages, ~20 ms of every agent start.
"""

from __future__ import annotations

import json
import logging
import socketserver
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("overlay.http")

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip
MAX_LINE = 8192  # longer request or header lines: 400
IDLE_TIMEOUT = 10.0  # a client that sends nothing for this long is dropped


def render_metrics(metrics: dict[str, tuple[str, str, float]]) -> str:
    """`name -> (type, help, value)` as Prometheus exposition text."""
    lines = []
    for name, (kind, help_text, value) in sorted(metrics.items()):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name} {value:g}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Health:
    """What the probes answer: why the agent is not live (restart it) or not ready (it
    cannot keep the dataplane in line with the cluster now); empty lists: all is well."""

    not_live: list[str] = field(default_factory=list)
    not_ready: list[str] = field(default_factory=list)


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True  # a restarted agent binds again at once (past TIME_WAIT)
    daemon_threads = True


class StatusServer:
    def __init__(
        self,
        address: str,
        status: Callable[[], dict[str, Any]],
        metrics: Callable[[], dict[str, tuple[str, str, float]]],
        health: Callable[[], Health] | None = None,
    ) -> None:
        host, _, port = address.rpartition(":")
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"metrics_addr: {address!r} is not HOST:PORT")
        self.status = status
        self.metrics = metrics
        self.health = health
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = IDLE_TIMEOUT

            def handle(self) -> None:
                request = self.rfile.readline(MAX_LINE + 1)
                while (header := self.rfile.readline(MAX_LINE + 1)) not in (b"\r\n", b"\n", b""):
                    if len(header) > MAX_LINE:
                        break
                parts = request.decode("latin-1").split()
                if len(request) > MAX_LINE or len(parts) != 3:
                    code, body, ctype = 400, b"bad request\n", "text/plain"
                elif parts[0] not in ("GET", "HEAD"):
                    code, body, ctype = 405, b"GET or HEAD only\n", "text/plain"
                else:
                    code, body, ctype = outer.answer(parts[1])
                head = (
                    f"HTTP/1.1 {code} {REASONS[code]}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                ).encode()
                self.wfile.write(head if parts[:1] == ["HEAD"] else head + body)

        try:
            self._server = _Server((host or "127.0.0.1", int(port)), Handler)
        except OSError as e:  # in use, or an address this host does not have
            raise ValueError(f"metrics_addr: {address!r}: {e.strerror or e}") from None
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def answer(self, path: str) -> tuple[int, bytes, str]:
        """(code, body, content type) for a GET of `path`."""
        try:
            if path.startswith("/metrics"):
                return 200, render_metrics(self.metrics()).encode(), "text/plain; version=0.0.4"
            if path.startswith("/status"):
                body = json.dumps(self.status(), indent=2, default=str).encode()
                return 200, body, "application/json"
            if path in ("/liveness", "/readiness") and self.health is not None:
                h = self.health()
                problems = h.not_live if path == "/liveness" else h.not_ready
                text = "\n".join(problems) if problems else "ok"
                return 503 if problems else 200, text.encode() + b"\n", "text/plain"
            return 404, b"not found\n", "text/plain"
        except Exception as exc:  # a broken probe must not kill the endpoint
            log.exception("status endpoint failed")
            return 500, f"{exc}\n".encode(), "text/plain"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
