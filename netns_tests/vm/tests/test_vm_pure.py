"""The micro-VM's pure parts: module ordering, the cpio writer, run scripts, frame parsing."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from netns_tests.vm import initramfs, ipip_smoke, runner

DEP = """\
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/net/9p/9pnet.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/netfs/netfs.ko:
kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
"""


def test_load_order_puts_every_module_after_its_dependencies() -> None:
    deps = initramfs.parse_modules_dep(DEP)
    order = [initramfs.module_name(p) for p in initramfs.load_order(deps, ["9pnet-virtio", "9p"])]
    assert sorted(order) == sorted(
        ["9pnet_virtio", "9pnet", "virtio_ring", "9p", "fscache", "netfs"]
    )
    for module, (_, requires) in deps.items():
        if module in order:
            for dep in requires:
                assert order.index(initramfs.module_name(dep)) < order.index(module)


def test_load_order_names_a_missing_module() -> None:
    with pytest.raises(ValueError, match="'nosuch'"):
        initramfs.load_order(initramfs.parse_modules_dep(DEP), ["nosuch"])


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs the cpio tool")
def test_cpio_archive_is_readable_by_cpio(tmp_path: Path) -> None:
    archive = initramfs.cpio_newc(
        [
            initramfs.Entry("bin", 0o040755),
            initramfs.Entry("bin/tool", 0o100755, b"#!/bin/sh\necho hi\n"),
            initramfs.Entry("bin/alias", 0o120777, b"tool"),
        ]
    )
    assert len(archive) % 4 == 0
    subprocess.run(["cpio", "-id", "--quiet"], input=archive, cwd=tmp_path, check=True)
    assert (tmp_path / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "bin/tool").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "bin/alias").readlink() == Path("tool")


def test_run_script_quotes_arguments_and_environment() -> None:
    script = runner.render_run_script(["echo", "a b", "$HOME"], "/work dir", {"X": "1 2"})
    out = subprocess.run(["sh", "-c", script.replace("cd '/work dir' || exit 126\n", "")],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout == "a b $HOME\n"
    assert "cd '/work dir'" in script


def test_run_script_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="argv"):
        runner.render_run_script([], "/", {})
    with pytest.raises(ValueError, match="'A=B'"):
        runner.render_run_script(["true"], "/", {"A=B": "x"})


def test_cwd_hidden_from_the_vm_is_refused() -> None:
    if runner.unavailable_reason() is not None:
        pytest.skip("micro-VM unavailable")
    with pytest.raises(ValueError, match="/proc/x"):
        runner.run_in_vm(["true"], cwd="/proc/x", env={}, timeout=5)


def test_a_checkout_under_tmp_is_bound_back_into_the_vm() -> None:
    # CI may clone under /tmp, which the VM mounts fresh: the runner asks init to keep it.
    argv = runner.qemu_argv(Path("k"), Path("i"), Path("/var/tmp/r"), 5, share="/tmp/clone")
    assert f"{initramfs.CMDLINE_SHARE}=/tmp/clone" in argv[argv.index("-append") + 1]
    init = initramfs.render_init(["virtio"], ["veth"])
    assert init.index('mount -o bind "$R$SHARE" /share') < init.index("tmpfs $R/tmp")
    assert init.index("tmpfs $R/tmp") < init.index('mount -o bind /share "$R$SHARE"')


def test_pvh_note_detection() -> None:
    # A minimal ELF64 with one PT_NOTE holding the Xen PVH entry note.
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + b"\0" * 4
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x20, 64)
    struct.pack_into("<HH", header, 0x36, 56, 1)
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 120, 0, 0, len(note), len(note), 4)
    assert initramfs.has_pvh_note(bytes(header) + phdr + note)
    assert not initramfs.has_pvh_note(bytes(header) + phdr + note.replace(b"Xen", b"Gnu"))
    assert initramfs.extract_vmlinux(b"no xz stream here") is None


def _ipip_frame(outer: tuple[str, str], inner: tuple[str, str]) -> bytes:
    def ip(src: str, dst: str, proto: int) -> bytes:
        return bytes([0x45, 0, 0, 20, 0, 0, 0, 0, 64, proto, 0, 0]) + bytes(
            int(x) for x in (*src.split("."), *dst.split("."))
        )

    return b"\0" * 12 + b"\x08\x00" + ip(*outer, 4) + ip(*inner, 1) + b"\0" * 8


def test_ipip_frames_are_parsed_and_counted_per_direction() -> None:
    out = _ipip_frame(
        (ipip_smoke.UNDERLAY_A, ipip_smoke.UNDERLAY_B), (ipip_smoke.POD_A, ipip_smoke.POD_B)
    )
    back = _ipip_frame(
        (ipip_smoke.UNDERLAY_B, ipip_smoke.UNDERLAY_A), (ipip_smoke.POD_B, ipip_smoke.POD_A)
    )
    frames = [ipip_smoke.parse_frame(out, 4), ipip_smoke.parse_frame(back, 0)]
    assert all(f is not None and f.inner_src for f in frames)
    good = [f for f in frames if f is not None] * ipip_smoke.PINGS
    assert "3 out" in ipip_smoke.check_frames(good)
    with pytest.raises(AssertionError):
        ipip_smoke.check_frames(good[:1])
    assert ipip_smoke.parse_frame(out.replace(b"\x08\x00", b"\x86\xdd", 1), 0) is None
