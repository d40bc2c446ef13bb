"""The agent's HTTP endpoint on loopback: the probes' codes, metrics text, unknown paths."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from overlay.status_http import Health, StatusServer


class Probe:
    def __init__(self) -> None:
        self.health = Health()

    def __call__(self) -> Health:
        return self.health


@pytest.fixture
def served() -> Iterator[tuple[StatusServer, Probe]]:
    probe = Probe()
    metrics = {"overlay_agent_up": ("gauge", "1 while the agent runs", 1.0)}
    server = StatusServer("127.0.0.1:0", lambda: {"agent": "up"}, lambda: metrics, probe)
    server.start()
    try:
        yield server, probe
    finally:
        server.stop()


def get(server: StatusServer, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_probes_answer_200_when_well_and_503_with_the_reasons(
    served: tuple[StatusServer, Probe],
) -> None:
    server, probe = served
    assert get(server, "/liveness") == (200, "ok\n")
    assert get(server, "/readiness") == (200, "ok\n")
    probe.health = Health([], ["datastore unreachable: connection refused"])
    assert get(server, "/liveness") == (200, "ok\n")  # alive: no reason to restart it
    assert get(server, "/readiness") == (503, "datastore unreachable: connection refused\n")
    probe.health = Health(["thread watch has stopped"], ["thread watch has stopped"])
    assert get(server, "/liveness") == (503, "thread watch has stopped\n")


def test_metrics_status_and_unknown_paths(served: tuple[StatusServer, Probe]) -> None:
    server, _ = served
    code, text = get(server, "/metrics")
    assert code == 200 and "# TYPE overlay_agent_up gauge\noverlay_agent_up 1\n" in text
    assert get(server, "/status")[0] == 200
    assert get(server, "/nothing")[0] == 404


def test_a_busy_or_malformed_address_is_refused_naming_it() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(ValueError, match=rf"metrics_addr: '{address}': .*in use"):
            StatusServer(address, dict, dict)
    with pytest.raises(ValueError, match=r"metrics_addr: 'localhost' is not HOST:PORT"):
        StatusServer("localhost", dict, dict)


def raw(server: StatusServer, request: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
        conn.sendall(request)
        out = b""
        while chunk := conn.recv(65536):
            out += chunk
    return out


def test_only_get_and_head_are_served_and_head_has_no_body(
    served: tuple[StatusServer, Probe],
) -> None:
    server, _ = served
    head = raw(server, b"HEAD /readiness HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 3\r\n" in head
    assert head.endswith(b"\r\n\r\n")
    assert raw(server, b"POST /status HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert raw(server, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw(server, b"GET /" + b"x" * 9000 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400 ")


def test_a_restarted_server_binds_the_same_port_at_once() -> None:
    first = StatusServer("127.0.0.1:0", dict, dict)
    first.start()
    port = first.port
    assert get(first, "/status")[0] == 200  # a connection that leaves TIME_WAIT behind
    first.stop()
    second = StatusServer(f"127.0.0.1:{port}", dict, dict)
    second.start()
    try:
        assert get(second, "/status")[0] == 200
    finally:
        second.stop()
