"""Small helpers around `ip`, `nft` and processes inside network namespaces.

Every failure raises NetnsError naming the command and the namespace, with the tool's own
message, so a lab that cannot be built says exactly which step broke.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

NETNS_DIR = Path("/run/netns")
COMMAND_TIMEOUT = 30.0


class NetnsError(RuntimeError):
    pass


def run(argv: Sequence[str], *, stdin: str | None = None, timeout: float = COMMAND_TIMEOUT) -> str:
    """Run a command; its stdout, or NetnsError with its stderr."""
    try:
        res = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as e:
        raise NetnsError(f"{argv[0]}: not installed ({e.strerror})") from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"`{' '.join(argv)}` did not finish within {timeout:g}s") from None
    if res.returncode != 0:
        detail = (res.stderr or res.stdout).strip() or f"exit status {res.returncode}"
        raise NetnsError(f"`{' '.join(argv)}` failed: {detail}")
    return res.stdout


def exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def run_in(
    ns: str, argv: Sequence[str], *, stdin: str | None = None, timeout: float = COMMAND_TIMEOUT
) -> str:
    return run(exec_argv(ns, argv), stdin=stdin, timeout=timeout)


def add(ns: str) -> None:
    run(["ip", "netns", "add", ns])


def exists(ns: str) -> bool:
    return (NETNS_DIR / ns).exists()


def list_all() -> list[str]:
    """Names of the named network namespaces (those under /run/netns)."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def delete(ns: str) -> None:
    """Delete a namespace; a missing one is fine (idempotent)."""
    if not exists(ns):
        return
    try:
        run(["ip", "netns", "delete", ns])
    except NetnsError:
        if exists(ns):
            raise


def batch(ns: str, commands: Iterable[str]) -> None:
    """Run `ip` commands (one per line, without the leading `ip`) in one process."""
    lines = [c for c in commands if c]
    if lines:
        run(["ip", "-n", ns, "-batch", "-"], stdin="\n".join(lines) + "\n")


def sysctl(ns: str, key: str, value: str) -> None:
    run_in(ns, ["sysctl", "-qw", f"{key}={value}"])


def nft(ns: str, script: str) -> None:
    run_in(ns, ["nft", "-f", "-"], stdin=script)


def pids(ns: str) -> list[int]:
    """PIDs of every process living in the namespace."""
    if not exists(ns):
        return []
    try:
        out = run(["ip", "netns", "pids", ns])
    except NetnsError:
        return []
    return [int(p) for p in out.split() if p.isdigit()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes (its parent has not reaped it yet).
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def stop(pids_: Iterable[int], timeout: float = 5.0) -> list[int]:
    """SIGTERM the processes, wait up to `timeout`, SIGKILL the rest. Returns those that
    still lived after SIGKILL plus 5 s (should be none)."""
    live = [p for p in pids_ if p > 1 and alive(p)]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    _reap_children(live)
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        time.sleep(0.05)
        _reap_children(live)
        live = [p for p in live if alive(p)]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while live and time.monotonic() < deadline:
        time.sleep(0.02)
        _reap_children(live)
        live = [p for p in live if alive(p)]
    return live


def _reap_children(pids_: Iterable[int]) -> None:
    # Processes we started in this very run are our children: reap them, else they stay
    # zombies (which alive() already treats as dead, but the table should not fill up).
    for p in pids_:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(p, os.WNOHANG)
