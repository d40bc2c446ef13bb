"""Run one command inside a qemu micro-VM that boots the distribution kernel.

The VM sees the host's whole root file system over 9p (read-write), so the repository, its
virtualenv and every installed tool are at the same paths inside. Only /tmp, /run and /dev
are fresh in the VM. It has no network card: nothing it does can reach the host's network.

    python -m netns_tests.vm.runner [--timeout S] [--cwd DIR] -- CMD [ARG...]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from netns_tests.vm import initramfs

QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")

# Return codes the runner itself produces (the command's own codes pass through).
EXIT_TIMEOUT = 124  # the timeout expired; qemu was killed (or the in-VM guard fired)
EXIT_VM_FAILURE = 125  # the VM never reported an exit status (boot failure, crash)

# Run directories live on the shared root but not in /tmp, which the VM replaces.
RUNS_DIR = Path(os.environ.get("OVERLAY_VM_RUNS", "/var/tmp/overlay-vm"))

_STATUS_RE = re.compile(re.escape(initramfs.MARK_STATUS) + r"(\d+)")
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Paths the VM does not see as the host has them; a cwd under /tmp or /run is bound back.
_HIDDEN_PREFIXES = ("/dev", "/proc", "/sys")
_FRESH_PREFIXES = ("/tmp", "/run")


class VMUnavailable(RuntimeError):
    """qemu, a kernel with its module tree, or busybox-static is missing."""


@dataclass(frozen=True)
class VMResult:
    """What a VM run produced.

    returncode: the command's exit status, EXIT_TIMEOUT or EXIT_VM_FAILURE.
    output: the command's stdout and stderr, interleaved.
    console: the whole serial console (kernel messages, init markers) for diagnosis.
    boot_seconds: host time from starting qemu to the command starting, if it started.
    total_seconds: host time from starting qemu until it exited or was killed.
    """

    returncode: int
    output: str
    console: str
    boot_seconds: float | None
    total_seconds: float
    timed_out: bool = False

    def describe(self) -> str:
        """A failure message: status, timings and the tail of output and console."""
        boot = f"{self.boot_seconds:.1f}s" if self.boot_seconds is not None else "never"
        return (
            f"VM run: returncode={self.returncode} timed_out={self.timed_out} "
            f"boot-to-command={boot} total={self.total_seconds:.1f}s\n"
            f"--- output (tail) ---\n{self.output[-4000:]}\n"
            f"--- console (tail) ---\n{self.console[-3000:]}"
        )


def unavailable_reason() -> str | None:
    """Why the VM cannot run on this machine (a pytest skip reason), or None if it can."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found (Debian package qemu-system-x86)"
    if initramfs.find_kernel() is None:
        return "no /boot/vmlinuz-<version> with /lib/modules/<version> (linux-image-amd64)"
    if not BUSYBOX.is_file():
        return f"{BUSYBOX} not found (Debian package busybox-static)"
    if not os.access("/boot", os.R_OK):
        return "/boot is not readable"
    return None


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def qemu_argv(
    image: Path, initrd: Path, run_dir: Path, guest_timeout: int, share: str | None = None
) -> list[str]:
    """The qemu command line. TCG only: KVM guests hang at boot on these machines."""
    extra = [f"{initramfs.CMDLINE_SHARE}={share}"] if share else []
    append = " ".join(
        [
            *extra,
            "console=ttyS0",
            "quiet",
            "loglevel=3",
            "panic=-1",  # a crashed guest reboots, and -no-reboot turns that into an exit
            "random.trust_cpu=on",  # seed the CRNG at once so getrandom() never blocks
            "mitigations=off",
            "cryptomgr.notests",  # crypto self-tests cost seconds under emulation
            "tsc=reliable",
            "no_timer_check",
            "8250.nr_uarts=1",
            f"{initramfs.CMDLINE_RUN_DIR}={run_dir}",
            f"{initramfs.CMDLINE_TIMEOUT}={guest_timeout}",
        ]
    )
    return [
        QEMU,
        "-accel", "tcg",
        "-cpu", "max",
        "-m", "2048",
        "-smp", "2",
        "-nographic",
        "-no-reboot",
        "-nic", "none",  # no network card: the guest cannot touch the host's network
        "-kernel", str(image),
        "-initrd", str(initrd),
        "-append", append,
        "-fsdev", "local,id=r,path=/,security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=r,mount_tag=hostroot",
    ]  # fmt: skip


def render_run_script(argv: Sequence[str], cwd: str, env: Mapping[str, str]) -> str:
    """The sh script the VM runs: enter cwd, then exec argv with exactly env."""
    if not argv:
        raise ValueError("argv: must name a command, got an empty list")
    for key in env:
        if not _ENV_KEY_RE.fullmatch(key):
            raise ValueError(f"env: invalid variable name {key!r}")
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
    command = " ".join(shlex.quote(a) for a in argv)
    return (
        "# written by netns_tests/vm/runner.py\n"
        f"cd {shlex.quote(cwd)} || exit 126\n"
        f"exec env -i {assignments} {command}\n"
    )


def _die_with_parent() -> None:
    # Runs in the child before exec: if the runner dies, the kernel kills qemu.
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class _Console:
    """Reads qemu's serial console on a thread; notes when the command started."""

    def __init__(self, stream: TextIO | None, started: float) -> None:
        self.lines: list[str] = []
        self.command_started: float | None = None
        self._stream = stream
        self._started = started

    def pump(self, pipe: object) -> None:
        for raw in iter(pipe.readline, b""):  # type: ignore[attr-defined]
            line = raw.decode("utf-8", "replace").replace("\r", "")
            self.lines.append(line)
            if self.command_started is None and initramfs.MARK_START in line:
                self.command_started = time.monotonic()
            if self._stream is not None:
                self._stream.write(line)
                self._stream.flush()

    @property
    def text(self) -> str:
        return "".join(self.lines)


def run_in_vm(
    argv: list[str],
    *,
    cwd: str,
    env: dict[str, str],
    timeout: float = 600,
    stream: TextIO | None = None,
    keep_run_dir: bool = False,
) -> VMResult:
    """Boot the micro-VM, run argv in cwd with exactly env, return its status and output.

    timeout bounds the whole run (boot included); on expiry qemu is killed and the result
    has returncode EXIT_TIMEOUT. stream, if given, receives the console live.
    Raises VMUnavailable when this machine cannot run the VM.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise VMUnavailable(reason)
    if timeout <= 0:
        raise ValueError(f"timeout: must be positive, got {timeout!r}")
    cwd = os.path.abspath(cwd)
    if _under(cwd, _HIDDEN_PREFIXES) or " " in cwd:
        raise ValueError(f"cwd: {cwd!r} cannot be shared with the VM")
    share = cwd if _under(cwd, _FRESH_PREFIXES) else None
    kernel = initramfs.find_kernel()
    assert kernel is not None  # checked by unavailable_reason()
    initrd = initramfs.build_initramfs(kernel)
    image = initramfs.boot_image(kernel)

    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    run_dir = RUNS_DIR / f"run-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    run_dir.mkdir()
    try:
        (run_dir / initramfs.RUN_SCRIPT).write_text(render_run_script(argv, cwd, env))
        return _boot(image, initrd, run_dir, timeout, stream, share)
    finally:
        if not keep_run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)


def _boot(
    image: Path,
    initrd: Path,
    run_dir: Path,
    timeout: float,
    stream: TextIO | None,
    share: str | None = None,
) -> VMResult:
    # The in-VM guard only matters if this process dies and qemu outlives it somehow.
    argv = qemu_argv(image, initrd, run_dir, guest_timeout=max(1, int(timeout)), share=share)
    started = time.monotonic()
    console = _Console(stream, started)
    timed_out = False
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a terminal's Ctrl-C goes to us; we kill qemu ourselves
        preexec_fn=_die_with_parent,
    )
    reader = threading.Thread(target=console.pump, args=(proc.stdout,), daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.poll() is None:
            proc.kill()  # by PID, never by name
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        reader.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
    total = time.monotonic() - started
    boot = console.command_started - started if console.command_started is not None else None
    text = console.text
    return VMResult(
        returncode=_returncode(run_dir, text, timed_out),
        output=_read_output(run_dir, text),
        console=text,
        boot_seconds=boot,
        total_seconds=total,
        timed_out=timed_out,
    )


def _returncode(run_dir: Path, console: str, timed_out: bool) -> int:
    status = run_dir / initramfs.RUN_STATUS
    with contextlib.suppress(OSError, ValueError):
        return int(status.read_text().strip())
    match = _STATUS_RE.search(console)
    if match:
        return int(match.group(1))
    return EXIT_TIMEOUT if timed_out else EXIT_VM_FAILURE


def _read_output(run_dir: Path, console: str) -> str:
    try:
        return (run_dir / initramfs.RUN_OUTPUT).read_bytes().decode("utf-8", "replace")
    except OSError:
        # The command never ran (or its output file was lost): the console is all we have.
        return console


def default_env() -> dict[str, str]:
    """A small, predictable environment for commands in the VM."""
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "PYTHONUNBUFFERED": "1",
    }


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m netns_tests.vm.runner",
        description="Run a command inside the qemu micro-VM (Debian kernel, host root over 9p).",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds, boot included")
    parser.add_argument("--cwd", default=os.getcwd(), help="working directory in the VM")
    parser.add_argument("--console", action="store_true", help="show the whole console live")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    ns = parser.parse_args(args)
    command = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    if not command:
        parser.error("no command given (use: -- CMD [ARG...])")
    try:
        result = run_in_vm(
            command,
            cwd=ns.cwd,
            env=default_env(),
            timeout=ns.timeout,
            stream=sys.stderr if ns.console else None,
            keep_run_dir=ns.keep,
        )
    except VMUnavailable as exc:
        print(f"vm: unavailable: {exc}", file=sys.stderr)
        return EXIT_VM_FAILURE
    if not ns.console:
        sys.stdout.write(result.output)
    boot = f"{result.boot_seconds:.1f}s" if result.boot_seconds is not None else "never"
    print(
        f"vm: exit={result.returncode} boot-to-command={boot} total={result.total_seconds:.1f}s"
        + (" (timed out)" if result.timed_out else ""),
        file=sys.stderr,
    )
    if result.returncode == EXIT_VM_FAILURE:
        sys.stderr.write(result.console[-3000:])
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
