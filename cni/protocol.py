"""The plugin <-> agent wire format: one JSON object per line over a Unix stream socket.

Request:  {"v": 1, "verb": "ADD", "plugin": "cni"|"ipam", "env": {CNI_*: str}, "config": {...}}
Response: {"result": {...} | null} or {"error": {"code": int, "msg": str, "details": str}}

One request per connection; the client half-closes after writing, the server answers and
closes. json.dumps never emits a raw newline, so a line is a message (readable with socat).

The exec'd plugin imports this module: it uses `_socket` (the `socket` module costs ~10 ms
of start-up for its enums) and cni.jsonc; the agent's server side brings `socket` itself.
"""

from __future__ import annotations

import _socket
import posix  # not os: the plugin imports this module (see cni.main)
import sys

from cni import jsonc as json
from cni.spec import (
    DECODE_FAILURE,
    INTERNAL,
    TRY_AGAIN_LATER,
    VERBS,
    CniError,
)

PROTOCOL_VERSION = 1
MAX_MESSAGE = 4 << 20  # a config with a big prevResult is a few KiB; refuse floods
PLUGINS = ("cni", "ipam")
ENV_KEYS = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")


class Request:
    __slots__ = ("config", "env", "plugin", "verb")

    def __init__(
        self, verb: str, plugin: str, env: dict[str, str], config: dict[str, object]
    ) -> None:
        self.verb = verb
        self.plugin = plugin
        self.env = env
        self.config = config


def encode(obj: dict[str, object]) -> bytes:
    return json.dumps(obj, compact=True).encode() + b"\n"


def encode_request(verb: str, plugin: str, env: dict[str, str], config: dict[str, object]) -> bytes:
    return encode(
        {"v": PROTOCOL_VERSION, "verb": verb, "plugin": plugin, "env": env, "config": config}
    )


def decode_request(line: bytes) -> Request:
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise CniError(DECODE_FAILURE, f"cannot decode the request from the plugin: {e}") from e
    if not isinstance(obj, dict) or obj.get("v") != PROTOCOL_VERSION:
        version = obj.get("v") if isinstance(obj, dict) else None
        raise CniError(
            DECODE_FAILURE,
            f"plugin speaks protocol version {version!r}, the agent speaks {PROTOCOL_VERSION}",
            "install the overlay-cni binary that ships with this overlay-agent",
        )
    verb, plugin, env, config = (obj.get(k) for k in ("verb", "plugin", "env", "config"))
    if verb not in VERBS or plugin not in PLUGINS:
        raise CniError(DECODE_FAILURE, f"bad request: verb={verb!r} plugin={plugin!r}")
    if not isinstance(env, dict) or not all(
        k in ENV_KEYS and isinstance(v, str) for k, v in env.items()
    ):
        raise CniError(DECODE_FAILURE, "bad request: env must map CNI_* names to strings")
    if not isinstance(config, dict):
        raise CniError(DECODE_FAILURE, "bad request: config must be an object")
    assert isinstance(verb, str) and isinstance(plugin, str)
    return Request(verb, plugin, env, config)


def encode_result(result: dict[str, object] | None) -> bytes:
    return encode({"result": result})


def encode_error(err: CniError) -> bytes:
    return encode({"error": {"code": err.code, "msg": err.msg, "details": err.details}})


def decode_response(line: bytes) -> dict[str, object] | None:
    """The result (None for verbs without output), or raise the agent's CniError."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise CniError(INTERNAL, f"cannot decode the agent's answer: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        err = obj["error"]
        code, msg = err.get("code"), err.get("msg")
        if isinstance(code, int) and not isinstance(code, bool) and isinstance(msg, str):
            details = err.get("details")
            raise CniError(code, msg, details if isinstance(details, str) else "")
    elif isinstance(obj, dict) and "result" in obj:
        result = obj["result"]
        if result is None or isinstance(result, dict):
            return result
    raise CniError(INTERNAL, "the agent's answer has neither a result nor an error object")


def read_line(sock: _socket.socket, limit: int = MAX_MESSAGE) -> bytes:
    """Read up to the first newline (or EOF). Raises ValueError past `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        nl = chunk.find(b"\n")
        if nl >= 0:
            chunks.append(chunk[:nl])
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise ValueError(f"message longer than {limit} bytes")
    return b"".join(chunks)


def unreachable(path: str, reason: str) -> CniError:
    return CniError(
        TRY_AGAIN_LATER,
        f"cannot reach the overlay agent at {path}: {reason}",
        "is overlay-agent running on this node? check that the socket exists and that the "
        "plugin's 'agentSocket' setting matches the agent's socket path",
    )


MAX_FDS = 1  # the pod's netns


def read_request(sock: _socket.socket, limit: int = MAX_MESSAGE) -> tuple[bytes, list[int]]:
    """Like read_line, also collecting the file descriptors sent with the first bytes.
    The caller owns (and must close) the descriptors, also when this raises."""
    import socket

    data, fds, _flags, _addr = socket.recv_fds(sock, 65536, MAX_FDS)  # type: ignore[arg-type]
    nl = data.find(b"\n")
    if nl >= 0 or not data:
        return (data[:nl] if nl >= 0 else data), fds
    try:
        return data + read_line(sock, limit - len(data)), fds
    except BaseException:
        for fd in fds:
            posix.close(fd)
        raise


def call(
    path: str, request: bytes, timeout: float, fds: tuple[int, ...] = ()
) -> dict[str, object] | None:
    """Send one request (with `fds` attached, e.g. the pod netns) and wait for the answer;
    agent trouble becomes code 11."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            raise unreachable(path, e.strerror or str(e)) from e
        try:
            if fds:
                # The plugin's mount namespace may hold netns bind mounts the agent's does
                # not (podman, runtimes in containers): hand over the open namespace itself.
                rights = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)
                ancillary = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)]
                sent = sock.sendmsg([request], ancillary)
                if sent < len(request):
                    sock.sendall(request[sent:])
            else:
                sock.sendall(request)
            # The agent may already have answered and closed (it reads up to the newline).
            try:  # noqa: SIM105 (contextlib would cost the plugin its import)
                sock.shutdown(_socket.SHUT_WR)
            except OSError:
                pass
            line = read_line(sock)
        except TimeoutError as e:
            raise CniError(
                TRY_AGAIN_LATER,
                f"the overlay agent at {path} did not answer within {timeout:g} s",
                "the agent may be overloaded or stuck; see its log",
            ) from e
        except (OSError, ValueError) as e:
            raise unreachable(path, f"connection failed mid-request ({e})") from e
        if not line:
            raise unreachable(path, "the agent closed the connection without answering")
        return decode_response(line)
    finally:
        sock.close()
