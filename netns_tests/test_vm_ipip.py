"""IP-in-IP on a real distribution kernel, run inside the qemu micro-VM.

The host kernel has no ipip, so these boot Debian's kernel under TCG with the host root
shared over 9p (see netns_tests/vm/README.md) and run the checks inside it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from netns_tests.test_ipip import CALIBRATION_ENV, cpu_calibration
from netns_tests.vm import initramfs, runner
from netns_tests.vm.ipip_smoke import OK_LINE

pytestmark = [pytest.mark.vm, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
PYTHON = ".venv/bin/python"
TIMEOUT = 300  # seconds, boot included; a loaded 2-core CI machine needs ~30
IPIP_MATRIX_TIMEOUT = 900  # one boot + a 4-node lab under emulation: ~3-5 min, x2 loaded


@pytest.fixture(autouse=True)
def _need_vm() -> None:
    reason = runner.unavailable_reason()
    if reason is not None:
        pytest.skip(f"micro-VM unavailable: {reason}")
    if not (REPO / PYTHON).is_file():
        pytest.skip(f"no virtualenv at {REPO / PYTHON}")


def _report(name: str, result: runner.VMResult) -> None:
    boot = f"{result.boot_seconds:.1f}s" if result.boot_seconds is not None else "never"
    print(f"\n[vm] {name}: boot-to-command {boot}, total {result.total_seconds:.1f}s")


def test_pod_to_pod_ping_crosses_underlay_as_ipip_in_vm() -> None:
    result = runner.run_in_vm(
        [PYTHON, "-m", "netns_tests.vm.ipip_smoke"],
        cwd=str(REPO),
        env=runner.default_env(),
        timeout=TIMEOUT,
    )
    _report("ipip smoke", result)
    assert result.returncode == 0, result.describe()
    assert OK_LINE in result.output, result.describe()


def test_pytest_selection_runs_inside_vm() -> None:
    # The way IP-in-IP integration tests run: a pytest selection inside the VM, using the
    # repository's own virtualenv through the shared root.
    # Entry-point plugins (hypothesis, xdist) cost seconds of imports under emulation;
    # no cache provider keeps the VM from racing host pytest runs on .pytest_cache.
    result = runner.run_in_vm(
        [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "netns_tests/vm/ipip_smoke.py"],
        cwd=str(REPO),
        env={**runner.default_env(), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
        timeout=TIMEOUT,
    )
    _report("pytest in VM", result)
    assert result.returncode == 0, result.describe()
    assert "1 passed" in result.output, result.describe()


def test_command_status_and_output_come_back_from_vm() -> None:
    result = runner.run_in_vm(
        ["sh", "-c", 'echo "cwd=$(pwd) kernel=$(uname -r) var=$OVERLAY_X"; exit 7'],
        cwd=str(REPO),
        env={**runner.default_env(), "OVERLAY_X": "a b"},
        timeout=TIMEOUT,
    )
    _report("status", result)
    assert result.returncode == 7, result.describe()
    assert f"cwd={REPO} kernel=" in result.output
    assert "var=a b" in result.output
    kernel = initramfs.find_kernel()
    assert kernel is not None
    assert f"kernel={kernel.version}" in result.output, "the VM must run the distribution kernel"


def _qemu_children() -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
        except OSError:
            continue
        if "qemu-system" in fields[0] and int(fields[1].split()[1]) == os.getpid():
            pids.append(int(stat.parent.name))
    return pids


def test_timeout_kills_the_vm_and_reports_it() -> None:
    result = runner.run_in_vm(["sleep", "600"], cwd=str(REPO), env=runner.default_env(), timeout=5)
    assert result.timed_out
    assert result.returncode == runner.EXIT_TIMEOUT
    assert result.total_seconds < 30
    assert _qemu_children() == [], "qemu must not outlive its run"


def test_ipip_matrix_passes_inside_vm() -> None:
    # How the README's test command covers IP-in-IP: every `ipip` test, in ONE boot (a lab
    # under emulation costs minutes; booting per test would multiply that). The host's own
    # CPU timing lets the drift tests scale their 1 s bound by the emulation slowdown.
    env = {
        **runner.default_env(),
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
        CALIBRATION_ENV: f"{cpu_calibration():.6f}",
    }
    result = runner.run_in_vm(
        [PYTHON, "-m", "pytest", "-q", "-rsP", "-p", "no:cacheprovider", "-m", "ipip",
         "netns_tests/test_ipip.py"],
        cwd=str(REPO),
        env=env,
        timeout=IPIP_MATRIX_TIMEOUT,
    )  # fmt: skip
    _report("ipip matrix", result)
    print(result.output)  # the pytest report from inside (shown on failure or with -s)
    assert result.returncode == 0, result.describe()
    summary = result.output.strip().splitlines()[-1] if result.output.strip() else ""
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 13, result.describe()
    # A skip inside the VM means the kernel there lacks ipip: the matrix did not run.
    assert not re.search(r"skipped|failed|error", summary), result.describe()
