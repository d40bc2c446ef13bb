"""Agent side of the CNI socket: a Unix-socket server calling a handler.

A fixed pool of worker threads all block in accept() and each serves the connection it
accepted itself: one wake-up per request instead of an accept thread plus a new thread
(under load every hand-off between threads costs a scheduling delay). The runtime may run
ADDs for different pods in parallel; the handler is responsible for its own locking.
Every failure becomes a spec error object.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import Protocol

from cni import protocol, spec
from cni.nsfd import is_netns
from cni.spec import CniEnv, CniError, NetConf

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 10.0  # a client that connects and sends nothing must not hold a thread
WORKERS = 32  # requests served at once; more wait in the listen backlog
BACKLOG = 256


class CniHandler(Protocol):
    def handle(
        self, verb: str, plugin: str, env: CniEnv, config: NetConf
    ) -> dict[str, object] | None: ...


def dispatch(handler: CniHandler, line: bytes, fds: list[int] | None = None) -> bytes:
    """Decode one request line, validate it again (the agent trusts no client), answer.

    `fds`: descriptors the plugin sent; the first is the pod netns it opened for us."""
    try:
        request = protocol.decode_request(line)
        env = spec.parse_env(request.env)
        if fds:
            env.netns_handle = _netns_fd_path(fds[0], env.netns)
        if env.command != request.verb:
            raise CniError(
                spec.INVALID_ENV,
                f"CNI_COMMAND={env.command!r} does not match the request verb {request.verb!r}",
            )
        config = spec.parse_config(request.plugin, request.config, request.verb)
        spec.apply_cni_args(config, env)
        result = handler.handle(request.verb, request.plugin, env, config)
        return protocol.encode_result(result)
    except CniError as e:
        return protocol.encode_error(e)
    except Exception as e:
        log.exception("cni request failed unexpectedly")
        msg = f"internal error in overlay-agent: {type(e).__name__}: {e}"
        return protocol.encode_error(CniError(spec.INTERNAL, msg, "see the overlay-agent log"))


def _netns_fd_path(fd: int, netns: str) -> str:
    """A path this process can open for the namespace behind `fd` (checked to be one)."""
    if not is_netns(fd):
        raise CniError(
            spec.INVALID_NETNS,
            f"CNI_NETNS={netns} is not a network namespace",
            "pass the path of a network namespace, e.g. /var/run/netns/<name>",
        )
    return f"/proc/self/fd/{fd}"


class CniServer:
    """Serve `handler` on a Unix socket at `path` (mode 0600) until stop()."""

    def __init__(self, path: str, handler: CniHandler, workers: int = WORKERS) -> None:
        if workers < 1:
            raise ValueError(f"workers={workers}: expected at least 1")
        self.path = path
        self.handler = handler
        self.workers = workers
        self._sock: socket.socket | None = None
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._inode = -1

    def start(self) -> None:
        self._sock = self._bind()
        for _ in range(self.workers):
            self._spawn()
        log.info("cni socket listening path=%s workers=%d", self.path, self.workers)

    def _spawn(self) -> None:
        worker = threading.Thread(target=self._worker, name="cni-worker", daemon=True)
        with self._lock:
            self._threads.add(worker)
        worker.start()

    def _bind(self) -> socket.socket:
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o755, exist_ok=True)
        if os.path.exists(self.path):
            if _is_live(self.path):
                raise OSError(
                    f"another process is serving {self.path}; stop it or choose another socket"
                )
            log.info("replacing stale cni socket path=%s", self.path)
        # Bind under a temporary name, restrict it, then rename over the final path, so
        # the socket never appears with looser permissions and a stale file is replaced.
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(tmp)
            os.chmod(tmp, 0o600)
            sock.listen(BACKLOG)
            os.replace(tmp, self.path)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._inode = os.stat(self.path).st_ino
        return sock

    def _worker(self) -> None:
        sock = self._sock
        assert sock is not None
        home = _netns_inode()
        try:
            while not self._stopping.is_set():
                try:
                    conn, _ = sock.accept()
                except OSError as e:
                    if self._stopping.is_set():
                        break  # stop() shut the listening socket down
                    log.warning("cni accept failed error=%s", e)
                    self._stopping.wait(0.1)  # e.g. out of file descriptors: back off
                    continue
                try:
                    self._serve(conn)
                except Exception:  # keep the worker: one bad request must not shrink the pool
                    log.exception("cni request failed outside the handler")
                if _netns_inode() != home:
                    # The plumbing visits pod namespaces on this thread; one that could not
                    # come back must not serve again. A fresh worker takes its place.
                    log.error("cni worker left in a foreign netns; replacing it")
                    if not self._stopping.is_set():
                        self._spawn()
                    return
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(READ_TIMEOUT_S)
            try:
                line, fds = protocol.read_request(conn)
            except (OSError, ValueError) as e:
                log.warning("cni request unreadable error=%s", e)
                return
            try:
                if not line:
                    return  # a liveness probe, or a plugin that gave up
                answer = dispatch(self.handler, line, fds)
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            with contextlib.suppress(OSError):  # the plugin may have given up
                conn.sendall(answer)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, wait up to `timeout` for requests in flight, remove the socket."""
        self._stopping.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes every accept()
        with self._lock:
            workers = list(self._threads)
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if self._sock is not None:
            self._sock.close()
        # Remove the file only if it is still ours (a new agent may have replaced it).
        with contextlib.suppress(FileNotFoundError):
            if self._sock is not None and os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        self._sock = None

    def __enter__(self) -> CniServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _netns_inode() -> int:
    """The network namespace of the calling thread (its nsfs inode)."""
    return os.stat("/proc/thread-self/ns/net").st_ino
