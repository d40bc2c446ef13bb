"""What the agent's start and the pod ADD/DEL path import: heavy modules stay out of them.

pyroute2 costs ~0.09 s to import and PyYAML ~0.02 s; the agent's cold start at 10k peers is
~1 s in all, and the first pod ADD on a node would otherwise pay pyroute2's import too.
"""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
import overlay.agent, overlay.kernel.apply, overlay.kernel.monitor, cni.pod, cni.handlers
print(json.dumps(sorted(m for m in ("pyroute2", "yaml") if m in sys.modules)))
"""


def test_agent_start_and_pod_plumbing_import_neither_pyroute2_nor_yaml() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert json.loads(out) == []
