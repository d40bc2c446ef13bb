"""The exec'd plugins' launchers: what they contain and that they start lean."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cni import launcher

# Modules whose import made every plugin exec ~20 ms slower (json pulls re and enum).
HEAVY = ("json", "re", "enum", "socket", "ipaddress", "typing", "contextlib", "os", "pyroute2")

# Runs one ADD with run() under `python -IS`, then reports what it had imported.
PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
from cni.main import run
class Out:
    text = ""
    def write(self, s): self.text += s
    def flush(self): pass
class In:
    def read(self): return sys.argv[2].encode()
out = Out()
env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0",
       "CNI_NETNS": "/proc/self/ns/net"}
rc = run("cni", env, In(), out)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[3].split(","))
import json
print(json.dumps({"rc": rc, "out": out.text, "loaded": loaded}))
"""


def test_render_runs_python_isolated_without_site() -> None:
    text = launcher.render("overlay-ipam", "/opt/py/bin/python", "/srv/overlay")
    first, *rest = text.splitlines()
    assert first == "#!/opt/py/bin/python -IS"
    assert "sys.path.insert(0, '/srv/overlay')" in rest
    assert rest[-1] == "main_ipam()"


@pytest.mark.parametrize(
    ("plugin", "python"),
    [("overlay-foo", "/usr/bin/python3"), ("overlay-cni", "python3"),
     ("overlay-cni", "/opt/my py/python")],
)  # fmt: skip
def test_render_refuses_what_a_shebang_cannot_carry(plugin: str, python: str) -> None:
    with pytest.raises(ValueError, match=r"plugin=|python="):
        launcher.render(plugin, python)


def test_written_launchers_answer_version_and_are_recognised(tmp_path: Path) -> None:
    assert {p.name for p in launcher.write(tmp_path)} == {"overlay-cni", "overlay-ipam"}
    assert launcher.write(tmp_path) == []  # unchanged files are left alone
    for name in ("overlay-cni", "overlay-ipam"):
        path = tmp_path / name
        assert os.access(path, os.X_OK) and launcher.is_launcher(path)
        res = subprocess.run(
            [str(path)], input="{}", env={"CNI_COMMAND": "VERSION", "PYTHONPATH": "/nonexistent"},
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["cniVersion"] == "1.1.0"
    assert not launcher.is_launcher(tmp_path / "missing")


def test_an_add_imports_none_of_the_heavy_modules() -> None:
    """A whole ADD up to the agent call (here: no agent, code 11) stays on the lean path."""
    config = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "overlay-cni",
                         "agentSocket": "/nonexistent/cni.sock"})  # fmt: skip
    res = subprocess.run(
        [sys.executable, "-IS", "-c", PROBE, launcher.PACKAGE_ROOT, config, ",".join(HEAVY)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["rc"] == 1 and json.loads(doc["out"])["code"] == 11
    assert doc["loaded"] == []
