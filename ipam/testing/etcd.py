"""Real etcd members on loopback ports, for tests and benchmarks.

Every member is a child process with its data under `workdir`; ports are picked free at
run time so parallel test workers do not collide. Members are stopped by PID: one that
lost quorum may ignore SIGTERM for a long time, so stop() escalates to SIGKILL.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"


class EtcdClusterError(RuntimeError):
    """The cluster could not be started (the message carries the member's log tail)."""


@dataclass
class _Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None


def _free_ports(count: int) -> list[int]:
    # Hold every socket open until all are bound, so the kernel hands out distinct ports.
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise EtcdClusterError(f"openssl {' '.join(args[:2])} failed: {res.stderr.strip()}")


def make_certs(workdir: Path) -> tuple[Path, Path, Path, Path, Path]:
    """A throw-away CA plus a server and a client certificate for 127.0.0.1.

    Returns (ca, server_cert, server_key, client_cert, client_key).
    """
    if shutil.which("openssl") is None:
        raise EtcdClusterError("openssl not installed: needed for EtcdCluster(tls=True)")
    d = workdir / "pki"
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=overlay-test-ca", cwd=d)  # fmt: skip
    for name, usage, san in (
        ("server", "serverAuth,clientAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "clientAuth", "subjectAltName=DNS:overlay-test-client"),
    ):
        (d / f"{name}.ext").write_text(f"extendedKeyUsage={usage}\n{san}\n")
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=overlay-test-{name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
                 "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
    return (d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key")


class EtcdCluster:
    """`members` etcd processes forming one cluster on 127.0.0.1.

    With tls=True the client port speaks HTTPS only and demands a client certificate
    signed by a CA generated into workdir (`ca_file`, `cert_file`, `key_file`).
    """

    def __init__(self, workdir: Path, members: int = 1, *, tls: bool = False) -> None:
        if members < 1:
            raise ValueError(f"members: expected >= 1, got {members}")
        self.workdir = Path(workdir)
        self.tls = tls
        self.ca_file: Path | None = None
        self.cert_file: Path | None = None
        self.key_file: Path | None = None
        self._server_cert: Path | None = None
        self._server_key: Path | None = None
        self._members: list[_Member] = []
        # Member data on tmpfs: etcd fsyncs every commit, and on a loaded disk that alone
        # made clusters miss their start deadline. The data is throw-away anyway.
        shm = Path("/dev/shm")
        self._data_root = (
            Path(tempfile.mkdtemp(prefix="overlay-etcd-", dir=shm)) if shm.is_dir() else None
        )
        self._pick_ports(members)

    def _pick_ports(self, members: int) -> None:
        ports = _free_ports(2 * members)
        self._members = [
            _Member(
                name=f"m{i}",
                client_port=ports[2 * i],
                peer_port=ports[2 * i + 1],
                data_dir=(self._data_root or self.workdir) / f"m{i}.data",
                log_path=self.workdir / f"m{i}.log",
            )
            for i in range(members)
        ]

    @property
    def endpoints(self) -> list[str]:
        return [f"{HOST}:{m.client_port}" for m in self._members]

    @property
    def url(self) -> str:
        hosts = ",".join(self.endpoints)
        if not self.tls:
            return f"etcd://{hosts}"
        return f"etcds://{hosts}?cacert={self.ca_file}&cert={self.cert_file}&key={self.key_file}"

    @property
    def pids(self) -> list[int | None]:
        return [m.proc.pid if m.proc else None for m in self._members]

    def _argv(self, m: _Member, token: str) -> list[str]:
        scheme = "https" if self.tls else "http"
        client_url = f"{scheme}://{HOST}:{m.client_port}"
        initial = ",".join(f"{x.name}=http://{HOST}:{x.peer_port}" for x in self._members)
        argv = [
            "etcd",
            f"--name={m.name}",
            f"--data-dir={m.data_dir}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls=http://{HOST}:{m.peer_port}",
            f"--initial-advertise-peer-urls=http://{HOST}:{m.peer_port}",
            f"--initial-cluster={initial}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token={token}",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        if self.tls:
            argv += [
                f"--cert-file={self._server_cert}",
                f"--key-file={self._server_key}",
                f"--trusted-ca-file={self.ca_file}",
                "--client-cert-auth",
            ]
        return argv

    def start(self, timeout: float = 30.0) -> None:
        """Start every member and wait until each one answers /health with a leader."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if shutil.which("etcd") is None:
            raise EtcdClusterError("etcd binary not found (Debian package etcd-server)")
        if self.tls and self.ca_file is None:
            ca, scert, skey, ccert, ckey = make_certs(self.workdir)
            self.ca_file, self._server_cert, self._server_key = ca, scert, skey
            self.cert_file, self.key_file = ccert, ckey
        for attempt in range(3):
            try:
                self._start_once(timeout)
                return
            except EtcdClusterError as e:
                # Another process may take a port between our pick and etcd's bind.
                if "address already in use" not in str(e) or attempt == 2:
                    raise
            for m in self._members:
                shutil.rmtree(m.data_dir, ignore_errors=True)
            self._pick_ports(len(self._members))

    def _start_once(self, timeout: float) -> None:
        token = f"overlay-test-{uuid.uuid4().hex[:12]}"
        try:
            for m in self._members:
                with open(m.log_path, "wb") as log:
                    m.proc = subprocess.Popen(
                        self._argv(m, token),
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        start_new_session=True,  # a Ctrl-C on the test run does not hit it
                    )
            self._wait_healthy(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        return ctx

    def _ask(
        self, m: _Member, ctx: ssl.SSLContext | None, method: str, path: str, body: bytes | None
    ) -> dict[str, Any] | None:
        """One request to one member; None when it does not answer 200 with JSON."""
        conn: http.client.HTTPConnection
        if ctx is not None:
            conn = http.client.HTTPSConnection(HOST, m.client_port, timeout=1.0, context=ctx)
        else:
            conn = http.client.HTTPConnection(HOST, m.client_port, timeout=1.0)
        try:
            conn.request(method, path, body=body)
            resp = conn.getresponse()
            doc = json.loads(resp.read())
            return doc if resp.status == 200 and isinstance(doc, dict) else None
        except (OSError, http.client.HTTPException, ValueError):
            return None
        finally:
            conn.close()

    def _healthy(self, m: _Member, ctx: ssl.SSLContext | None) -> bool:
        doc = self._ask(m, ctx, "GET", "/health", None)
        return doc is not None and doc.get("health") == "true"

    def leader_index(self, timeout: float = 10.0) -> int:
        """The index of the running member that is the raft leader (polls until one is)."""
        ctx = self._ssl_context()
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self._members):
                if m.proc is None or m.proc.poll() is not None:
                    continue
                doc = self._ask(m, ctx, "POST", "/v3/maintenance/status", b"{}")
                if doc and doc.get("leader") == doc.get("header", {}).get("member_id"):
                    return i
            if time.monotonic() > deadline:
                raise EtcdClusterError(f"no etcd leader within {timeout:g}s")
            time.sleep(0.05)

    def _wait_healthy(self, deadline: float) -> None:
        ctx = self._ssl_context()
        waiting = list(self._members)
        while waiting:
            for m in list(waiting):
                assert m.proc is not None
                if m.proc.poll() is not None:
                    raise EtcdClusterError(
                        f"etcd member {m.name} exited with {m.proc.returncode}:\n"
                        + self.log_tail(m.name)
                    )
                if self._healthy(m, ctx):
                    waiting.remove(m)
            if not waiting:
                return
            if time.monotonic() > deadline:
                tails = "\n".join(
                    f"--- {m.name} (client port {m.client_port}):\n{self.log_tail(m.name, 12)}"
                    for m in waiting
                )
                names = ", ".join(m.name for m in waiting)
                raise EtcdClusterError(f"etcd members {names} not healthy in time:\n{tails}")
            time.sleep(0.05)

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.workdir / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill_member(self, i: int) -> None:
        """SIGKILL member i (a crash: no clean shutdown, sockets reset)."""
        m = self._members[i]
        if m.proc is not None and m.proc.poll() is None:
            os.kill(m.proc.pid, signal.SIGKILL)
            m.proc.wait(timeout=10)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop all members: SIGTERM, wait up to `timeout`, then SIGKILL. Idempotent.

        The last members of a multi-member cluster lose quorum as the others exit and may
        then ignore SIGTERM; their data is throw-away, so a short grace period is enough.
        """
        running = [m for m in self._members if m.proc is not None and m.proc.poll() is None]
        for m in running:
            assert m.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(m.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for m in running:
            assert m.proc is not None
            try:
                m.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(m.proc.pid, signal.SIGKILL)
                m.proc.wait(timeout=10)
        if self._data_root is not None and all(
            m.proc is None or m.proc.poll() is not None for m in self._members
        ):
            shutil.rmtree(self._data_root, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
