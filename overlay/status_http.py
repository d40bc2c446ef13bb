"""The agent's HTTP endpoint: Prometheus text on /metrics, JSON on /status, and the probes
/liveness and /readiness (Felix's paths on the same port 9099): 200, or 503 with the reasons.

It only reads snapshots handed over by callables, so it never blocks the writer.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("overlay.http")


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
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                try:
                    if self.path.startswith("/metrics"):
                        body = render_metrics(outer.metrics()).encode()
                        ctype = "text/plain; version=0.0.4"
                    elif self.path.startswith("/status"):
                        body = json.dumps(outer.status(), indent=2, default=str).encode()
                        ctype = "application/json"
                    elif self.path in ("/liveness", "/readiness") and outer.health is not None:
                        h = outer.health()
                        problems = h.not_live if self.path == "/liveness" else h.not_ready
                        text = "\n".join(problems) if problems else "ok"
                        self._reply(503 if problems else 200, text.encode() + b"\n", "text/plain")
                        return
                    else:
                        self.send_error(404)
                        return
                except Exception as exc:  # a broken probe must not kill the endpoint
                    log.exception("status endpoint failed")
                    self.send_error(500, str(exc))
                    return
                self._reply(200, body, ctype)

            def _reply(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.status = status
        self.metrics = metrics
        self.health = health
        try:
            self._server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
        except OSError as e:  # in use, or an address this host does not have
            raise ValueError(f"metrics_addr: {address!r}: {e.strerror or e}") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
