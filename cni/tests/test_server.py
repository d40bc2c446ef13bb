"""The plugin entry point talking to a CniServer over a real Unix socket, with a fake handler."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from cni import main, protocol, spec
from cni.server import CniServer
from cni.spec import CniEnv, CniError, NetConf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FakeHandler:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, CniEnv, NetConf]] = []
        self.release = threading.Event()
        self.block = False

    def handle(
        self, verb: str, plugin: str, env: CniEnv, config: NetConf
    ) -> dict[str, object] | None:
        self.calls.append((verb, plugin, env, config))
        if self.block:
            self.release.wait(10)
        if env.container_id == "explode":
            raise RuntimeError("boom")
        if env.container_id == "refuse":
            raise CniError(spec.IPAM_FAILURE, "pool exhausted", "add a pool")
        if verb == "ADD":
            return spec.build_result(config.cni_version, [{"address": "10.65.0.5/32"}])
        return None


@pytest.fixture
def sockdir() -> Iterator[str]:
    # Short paths: AF_UNIX allows 107 bytes, pytest's tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="ovcni-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def served(sockdir: str) -> Iterator[tuple[str, FakeHandler]]:
    handler = FakeHandler()
    path = os.path.join(sockdir, "cni.sock")
    server = CniServer(path, handler)
    server.start()
    try:
        yield path, handler
    finally:
        handler.release.set()
        server.stop()


def config(path: str, version: str = "1.1.0") -> bytes:
    return json.dumps(
        {"cniVersion": version, "name": "net1", "type": "overlay-cni", "agentSocket": path}
    ).encode()


ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "c1",
    "CNI_NETNS": "/proc/self/ns/net",  # the plugin opens it and sends the fd
    "CNI_IFNAME": "eth0",
    "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p",
}


def run(plugin: str, environ: dict[str, str], stdin: bytes) -> tuple[int, dict[str, object] | None]:
    out = io.StringIO()
    code = main.run(plugin, environ, io.BytesIO(stdin), out)
    text = out.getvalue()
    return code, (json.loads(text) if text else None)


def test_add_round_trip_reaches_handler_with_parsed_env_and_config(
    served: tuple[str, FakeHandler],
) -> None:
    path, handler = served
    code, out = run("cni", ENV, config(path, "0.4.0"))
    assert code == 0
    assert out == {"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.65.0.5/32"}]}
    verb, plugin, env, conf = handler.calls[0]
    assert (verb, plugin, env.container_id, env.pod_name) == ("ADD", "cni", "c1", "p")
    assert conf.name == "net1" and conf.agent_socket == path


def test_del_prints_nothing_and_exits_0(served: tuple[str, FakeHandler]) -> None:
    path, handler = served
    code, out = run("cni", {**ENV, "CNI_COMMAND": "DEL"}, config(path))
    assert (code, out) == (0, None)
    assert handler.calls[0][0] == "DEL"


def test_ipam_plugin_kind_is_forwarded(served: tuple[str, FakeHandler]) -> None:
    path, handler = served
    stdin = json.dumps(
        {"cniVersion": "1.0.0", "name": "n", "type": "ptp",
         "ipam": {"type": "overlay-ipam", "agentSocket": path}}
    ).encode()  # fmt: skip
    code, out = run("ipam", ENV, stdin)
    assert code == 0 and out is not None and out["ips"] == [{"address": "10.65.0.5/32"}]
    assert handler.calls[0][1] == "ipam"


def test_handler_cni_error_reaches_stdout_in_config_version(
    served: tuple[str, FakeHandler],
) -> None:
    path, _ = served
    code, out = run("cni", {**ENV, "CNI_CONTAINERID": "refuse"}, config(path, "1.0.0"))
    assert code == 1
    assert out == {
        "cniVersion": "1.0.0",
        "code": 100,
        "msg": "pool exhausted",
        "details": "add a pool",
    }


def test_handler_crash_is_code_999_not_a_traceback(served: tuple[str, FakeHandler]) -> None:
    path, _ = served
    code, out = run("cni", {**ENV, "CNI_CONTAINERID": "explode"}, config(path))
    assert code == 1 and out is not None and out["code"] == 999
    assert "RuntimeError: boom" in str(out["msg"])


def test_server_revalidates_requests(served: tuple[str, FakeHandler]) -> None:
    path, handler = served
    bad_env = {**ENV, "CNI_IFNAME": "x" * 20}
    with pytest.raises(CniError) as info:
        protocol.call(
            path, protocol.encode_request("ADD", "cni", bad_env, json.loads(config(path))), 5.0
        )
    assert info.value.code == 4 and "CNI_IFNAME" in info.value.msg
    with pytest.raises(CniError) as info:
        protocol.call(path, b"not json\n", 5.0)
    assert info.value.code == 6
    with pytest.raises(CniError) as info:
        protocol.call(path, b'{"v": 99}\n', 5.0)
    assert info.value.code == 6 and "protocol version 99" in info.value.msg
    assert handler.calls == []


def test_agent_unreachable_is_code_11_naming_the_socket(sockdir: str) -> None:
    path = os.path.join(sockdir, "absent.sock")
    code, out = run("cni", ENV, config(path))
    assert code == 1 and out is not None
    assert out["code"] == 11
    assert path in str(out["msg"])
    assert "is overlay-agent running on this node?" in str(out["details"])


def test_status_with_agent_down_is_code_50(sockdir: str) -> None:
    path = os.path.join(sockdir, "absent.sock")
    code, out = run("cni", {"CNI_COMMAND": "STATUS"}, config(path))
    assert code == 1 and out is not None and out["code"] == 50


def test_stale_socket_file_is_replaced_with_mode_0600(sockdir: str) -> None:
    path = os.path.join(sockdir, "cni.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: what a crashed agent leaves
    with CniServer(path, FakeHandler()):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        code, _ = run("cni", {**ENV, "CNI_COMMAND": "DEL"}, config(path))
        assert code == 0
    assert not os.path.exists(path)  # clean stop removes it


def test_live_socket_is_not_stolen(served: tuple[str, FakeHandler]) -> None:
    path, _ = served
    with pytest.raises(OSError, match="another process is serving"):
        CniServer(path, FakeHandler()).start()
    assert run("cni", {**ENV, "CNI_COMMAND": "DEL"}, config(path))[0] == 0


def test_requests_are_served_concurrently(served: tuple[str, FakeHandler]) -> None:
    path, handler = served
    handler.block = True
    results: list[int] = []
    threads = [
        threading.Thread(
            target=lambda i=i: results.append(
                run("cni", {**ENV, "CNI_CONTAINERID": f"c{i}"}, config(path))[0]
            )
        )
        for i in range(4)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(handler.calls) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(handler.calls) == 4  # all four are inside the handler at once
    handler.release.set()
    for t in threads:
        t.join(10)
    assert results == [0, 0, 0, 0]


def test_slow_agent_times_out_with_code_11(sockdir: str) -> None:
    path = os.path.join(sockdir, "slow.sock")
    handler = FakeHandler()
    handler.block = True
    with CniServer(path, handler):
        stdin = json.loads(config(path))
        stdin["timeoutSeconds"] = 0.3
        code, out = run("cni", ENV, json.dumps(stdin).encode())
        handler.release.set()
    assert code == 1 and out is not None and out["code"] == 11
    assert "did not answer within 0.3 s" in str(out["msg"])


def test_exec_entry_point_round_trip(served: tuple[str, FakeHandler]) -> None:
    """The real `python -m cni.main` process, as a runtime execs it."""
    path, _ = served
    proc = subprocess.run(
        [sys.executable, "-m", "cni.main"],
        input=config(path),
        env={**ENV, "PYTHONPATH": ROOT},
        capture_output=True,
        timeout=30,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ips"] == [{"address": "10.65.0.5/32"}]
    assert proc.stderr == b""
