"""Whatever the runtime feeds the exec'd plugin, it prints a result or a spec error object.

The entry point runs in-process with injected env, stdin, stdout and agent call.
"""

from __future__ import annotations

import io
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from cni import main, spec
from cni.spec import CniError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)

VALID = {
    "cniVersion": "1.1.0",
    "name": "net1",
    "type": "overlay-cni",
    "mtu": 1400,
    "ipam": {"type": "overlay-ipam", "assignIPv6": True},
    "runtimeConfig": {"ips": ["10.65.0.5"], "mac": "0a:58:0a:41:00:05"},
    "dns": {"nameservers": ["10.96.0.10"]},
    "prevResult": {"cniVersion": "1.1.0", "ips": []},
}
KEYS = [*VALID, "cniVersions", "args", "agentSocket", "timeoutSeconds", "cni.dev/valid-attachments"]


@st.composite
def configs(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["mutated", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    obj: dict[str, object] = dict(VALID)
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=4)):
        if draw(st.booleans()):
            obj.pop(key, None)
        else:
            obj[key] = draw(json_values)
    obj["cniVersion"] = draw(st.sampled_from([*spec.SUPPORTED_VERSIONS, "0.2.0", "9", 1]))
    return json.dumps(obj).encode()


env_text = st.text(st.characters(codec="utf-8", blacklist_characters="\0"), max_size=20)


@st.composite
def envs(draw: st.DrawFn) -> dict[str, str]:
    env: dict[str, str] = {}
    choices = {
        "CNI_COMMAND": st.sampled_from([*spec.VERBS, "add", ""]) | env_text,
        "CNI_CONTAINERID": st.sampled_from(["c1", "abc-def.0", ""]) | env_text,
        "CNI_NETNS": st.sampled_from(["/var/run/netns/p", "p", ""]) | env_text,
        "CNI_IFNAME": st.sampled_from(["eth0", "a" * 15, "a" * 16, "e/0"]) | env_text,
        "CNI_ARGS": st.sampled_from(["IgnoreUnknown=1;K8S_POD_NAME=x", "X=1", "bad"]) | env_text,
        "CNI_PATH": st.sampled_from(["/opt/cni/bin", ""]) | env_text,
    }
    for key, strategy in choices.items():
        if draw(st.integers(0, 4)):  # mostly present
            env[key] = draw(strategy)
    return env


def agent_answers(kind: str) -> object:
    def call(path: str, request: bytes, timeout: float) -> dict[str, object] | None:
        assert json.loads(request)["v"] == 1  # what reaches the agent is a well-formed request
        if kind == "result":
            return spec.build_result("1.1.0", [{"address": "10.65.0.5/32"}])
        if kind == "none":
            return None
        if kind == "cni-error":
            raise CniError(spec.TRY_AGAIN_LATER, "agent busy")
        raise RuntimeError("unexpected")

    return call


@settings(max_examples=400, deadline=None)
@given(
    plugin=st.sampled_from(["cni", "ipam"]),
    env=envs(),
    stdin=configs(),
    answer=st.sampled_from(["result", "none", "cni-error", "crash"]),
)
def test_entry_point_always_prints_a_result_or_an_error_object(
    plugin: str, env: dict[str, str], stdin: bytes, answer: str
) -> None:
    out = io.StringIO()
    code = main.run(plugin, env, io.BytesIO(stdin), out, agent_answers(answer))  # type: ignore[arg-type]
    text = out.getvalue()
    if code == 0:
        if text:
            obj = json.loads(text)
            assert isinstance(obj, dict) and obj["cniVersion"] in spec.SUPPORTED_VERSIONS
            assert not spec.is_error_object(obj)
    else:
        assert code == 1
        obj = json.loads(text)
        assert spec.is_error_object(obj), obj
        assert obj["cniVersion"] in spec.SUPPORTED_VERSIONS
        assert obj["code"] in (1, 2, 4, 5, 6, 7, 11, 50, 999), obj
        assert text.count("\n") == 1  # one JSON document, nothing else on stdout


def test_unreadable_stdin_is_code_5() -> None:
    class Broken:
        def read(self) -> bytes:
            raise OSError("EIO")

    out = io.StringIO()
    assert main.run("cni", {"CNI_COMMAND": "ADD"}, Broken(), out) == 1
    obj = json.loads(out.getvalue())
    assert obj["code"] == 5 and "stdin" in obj["msg"]


def test_version_is_answered_locally_whatever_stdin_holds() -> None:
    def no_agent(path: str, request: bytes, timeout: float) -> None:
        raise AssertionError("VERSION must not reach the agent")

    for stdin in (b"", b"garbage", b'{"cniVersion": "0.4.0"}'):
        out = io.StringIO()
        assert main.run("cni", {"CNI_COMMAND": "VERSION"}, io.BytesIO(stdin), out, no_agent) == 0
        assert json.loads(out.getvalue()) == spec.version_info()
