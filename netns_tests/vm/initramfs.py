"""Build the micro-VM's initramfs: busybox-static, the virtio/9p modules and an /init script.

The VM boots a distribution kernel (Debian's linux-image-amd64) whose virtio and 9p
drivers are modules, so the initramfs carries exactly those, loads them in dependency
order, mounts the host's root over 9p and runs one command chrooted into it.

The archive is a plain (uncompressed) newc cpio written here in Python, so building needs
neither root nor cpio/gzip. Archives are cached by the SHA-256 of their bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import stat
import struct
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# What /init must load before it can mount the host root (dependencies are added from
# modules.dep, so this names only the leaves).
BOOT_MODULES: tuple[str, ...] = ("virtio_pci", "9pnet_virtio", "9p")

# Network modules loaded (from the VM kernel's own tree on the shared root) before the
# command runs. Autoloading works too (see MODPROBE_HELPER) but loading up front makes a
# missing module a visible boot warning rather than a confusing test failure.
NET_MODULES: tuple[str, ...] = (
    "veth",
    "bridge",
    "vxlan",
    "tunnel4",
    "ip_tunnel",
    "ipip",
    "nf_conntrack",
    "nf_nat",
    "nf_tables",
    "nft_chain_nat",
    "nft_masq",
    "nft_ct",
    "sch_ingress",
    "cls_bpf",
)

# Markers /init prints on the console; runner.py parses them.
MARK_START = "OVERLAY-VM-COMMAND-START"
MARK_STATUS = "OVERLAY-VM-EXIT-STATUS="
MARK_BOOT_FAILED = "OVERLAY-VM-BOOT-FAILED:"
MARK_WARNING = "OVERLAY-VM-WARNING:"

# Kernel command-line keys; a dotted key is ignored by the kernel and not passed to init.
CMDLINE_RUN_DIR = "overlay_vm.run"
CMDLINE_TIMEOUT = "overlay_vm.timeout"
CMDLINE_SHARE = "overlay_vm.share"  # a host dir under /tmp or /run to keep visible

# Files the host writes / the VM writes inside a run directory.
RUN_SCRIPT = "cmd.sh"
RUN_OUTPUT = "output"
RUN_STATUS = "status"

NEWROOT = "/newroot"
# cache=loose keeps dentries and pages in the guest: Python imports (thousands of stat and
# open calls) run several times faster than uncached. Safe here because nothing on the host
# changes the files a run reads while it runs; init syncs before powering off.
P9_OPTIONS = "trans=virtio,version=9p2000.L,msize=512000,cache=loose"
MODPROBE_HELPER = "/sbin/overlay-modprobe"

BUSYBOX_APPLETS: tuple[str, ...] = (
    "sh",
    "cat",
    "chmod",
    "chroot",
    "cut",
    "echo",
    "hostname",
    "insmod",
    "ip",
    "ln",
    "ls",
    "mkdir",
    "mount",
    "poweroff",
    "reboot",
    "sleep",
    "sync",
    "tee",
    "timeout",
    "umount",
)

_FORMAT_VERSION = "1"  # bump when the layout changes in a way the bytes would not show


@dataclass(frozen=True)
class Kernel:
    """A bootable kernel image and the module tree built for it."""

    version: str
    image: Path
    modules_dir: Path


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    # Natural sort so 6.1.0-56 > 6.1.0-9 and 6.10 > 6.9.
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", version)
    )


def find_kernel(
    boot_dir: Path = Path("/boot"), modules_root: Path = Path("/lib/modules")
) -> Kernel | None:
    """The newest /boot/vmlinuz-<version> that has a /lib/modules/<version> tree, or None."""
    found = []
    for image in boot_dir.glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        modules_dir = modules_root / version
        if image.is_file() and (modules_dir / "modules.dep").is_file():
            found.append(Kernel(version, image, modules_dir))
    if not found:
        return None
    return max(found, key=lambda k: _version_key(k.version))


def module_name(path: str) -> str:
    """'kernel/fs/9p/9p.ko.xz' -> '9p' (file names use '-' and '_' interchangeably)."""
    base = path.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """modules.dep -> {module name: (relative path, relative paths of its dependencies)}."""
    deps: dict[str, tuple[str, tuple[str, ...]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[module_name(path.strip())] = (path.strip(), tuple(rest.split()))
    return deps


def load_order(deps: dict[str, tuple[str, tuple[str, ...]]], roots: Iterable[str]) -> list[str]:
    """Module paths in an order insmod accepts: every module after all of its dependencies."""
    order: list[str] = []
    done: set[str] = set()
    active: set[str] = set()

    def visit(name: str) -> None:
        if name in done:
            return
        if name in active:
            raise ValueError(f"modules.dep: dependency cycle through module {name!r}")
        if name not in deps:
            raise ValueError(f"modules.dep: no module named {name!r}")
        active.add(name)
        path, requires = deps[name]
        # modules.dep lists the deepest dependency last; visiting in reverse loads it first.
        for dep in reversed(requires):
            visit(module_name(dep))
        active.discard(name)
        done.add(name)
        order.append(path)

    for root in roots:
        visit(root.replace("-", "_"))
    return order


def read_module(path: Path) -> bytes:
    """A module's ELF bytes; Debian ships plain .ko, newer releases .ko.xz or .ko.zst."""
    data = path.read_bytes()
    if path.name.endswith(".ko"):
        return data
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    raise ValueError(f"module file {str(path)!r}: unsupported compression (need .ko, .xz or .gz)")


def render_init(boot_modules: Sequence[str], net_modules: Sequence[str]) -> str:
    """The /init shell script (busybox ash). boot_modules are names, in load order."""
    insmods = "\n".join(
        f'insmod /modules/{name}.ko || fail "insmod {name}"' for name in boot_modules
    )
    net = " ".join(net_modules)
    return f"""#!/bin/busybox sh
# overlay micro-VM init: mount the host root over 9p, run one command chrooted into it,
# print its exit status on the console, power off. Generated by netns_tests/vm/initramfs.py.
export PATH=/bin:/sbin
R={NEWROOT}

off() {{
    sync
    poweroff -f
    reboot -f
}}
fail() {{
    echo "{MARK_BOOT_FAILED} $*"
    off
}}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

RUN=
LIMIT=0
SHARE=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        {CMDLINE_RUN_DIR}=*) RUN="${{arg#*=}}" ;;
        {CMDLINE_TIMEOUT}=*) LIMIT="${{arg#*=}}" ;;
        {CMDLINE_SHARE}=*) SHARE="${{arg#*=}}" ;;
    esac
done
[ -n "$RUN" ] || fail "no {CMDLINE_RUN_DIR}= on the kernel command line"

{insmods}

mkdir -p $R
mount -t 9p -o {P9_OPTIONS} hostroot $R || fail "mount 9p hostroot"
[ -f "$R$RUN/{RUN_SCRIPT}" ] || fail "run script $RUN/{RUN_SCRIPT} not found on the shared root"

mount -t proc proc $R/proc || fail "mount proc"
mount -t sysfs sysfs $R/sys || fail "mount sysfs"
mount -t devtmpfs devtmpfs $R/dev || fail "mount devtmpfs"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
# A checkout under /tmp or /run (CI may clone there) would vanish under the fresh tmpfs:
# hold it aside with a bind mount and put it back at its own path.
if [ -n "$SHARE" ]; then
    mkdir -p /share && mount -o bind "$R$SHARE" /share || fail "bind $SHARE"
fi
mount -t tmpfs -o mode=1777 tmpfs $R/tmp || fail "mount /tmp"
mount -t tmpfs -o mode=0755 tmpfs $R/run || fail "mount /run"
if [ -n "$SHARE" ]; then
    mkdir -p "$R$SHARE" && mount -o bind /share "$R$SHARE" || fail "rebind $SHARE"
fi

# The kernel's module autoloader runs its helper in this (initramfs) root, not the
# chroot: point it at a wrapper that runs the real modprobe inside the host root.
echo {MODPROBE_HELPER} > /proc/sys/kernel/modprobe
if ! chroot $R /sbin/modprobe -a {net} 2>/dev/null; then
    for m in {net}; do
        [ -d /sys/module/$m ] || echo "{MARK_WARNING} module $m did not load"
    done
fi

hostname overlay-vm
ip link set lo up

echo "{MARK_START} uptime=$(cut -d' ' -f1 /proc/uptime)"
set -o pipefail
if [ "$LIMIT" -gt 0 ] 2>/dev/null; then
    ( timeout -s KILL "$LIMIT" chroot $R /bin/sh "$RUN/{RUN_SCRIPT}" </dev/null 2>&1
      echo $? > /status ) | tee "$R$RUN/{RUN_OUTPUT}"
else
    ( chroot $R /bin/sh "$RUN/{RUN_SCRIPT}" </dev/null 2>&1
      echo $? > /status ) | tee "$R$RUN/{RUN_OUTPUT}"
fi
rc=$(cat /status 2>/dev/null)
[ -n "$rc" ] || rc=125
echo "$rc" > "$R$RUN/{RUN_STATUS}"
echo "{MARK_STATUS}$rc uptime=$(cut -d' ' -f1 /proc/uptime)"
off
"""


MODPROBE_HELPER_SCRIPT = f"""#!/bin/busybox sh
# Module autoload helper: use the host root's modprobe and module tree.
exec /bin/busybox chroot {NEWROOT} /sbin/modprobe "$@"
"""


# ---- newc cpio -------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One archive member: a directory, regular file, symlink or device node."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def cpio_newc(entries: Iterable[Entry]) -> bytes:
    """Pack entries as an SVR4 'newc' cpio archive (the format the kernel unpacks)."""
    out = bytearray()
    for ino, entry in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = entry.name.encode() + b"\0"
        fields = (
            ino,
            entry.mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(entry.mode) else 1,
            0,  # mtime: fixed so identical inputs give identical bytes
            len(entry.data),
            0,
            0,
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,
        )
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out += header + name + _pad4(len(header) + len(name))
        out += entry.data + _pad4(len(entry.data))
    return bytes(out)


def initramfs_entries(
    kernel: Kernel,
    busybox: Path = Path("/bin/busybox"),
    net_modules: Sequence[str] = NET_MODULES,
) -> list[Entry]:
    """Everything the archive holds, in order (parents before children)."""
    deps = parse_modules_dep((kernel.modules_dir / "modules.dep").read_text())
    paths = load_order(deps, BOOT_MODULES)
    names = [module_name(p) for p in paths]
    d, f, lnk = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755, stat.S_IFLNK | 0o777
    entries = [Entry(name, d) for name in ("bin", "dev", "modules", "proc", "sbin", "sys")]
    entries += [Entry(NEWROOT.lstrip("/"), d)]
    entries += [
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
        Entry("bin/busybox", f, busybox.read_bytes()),
    ]
    entries += [Entry(f"bin/{a}", lnk, b"busybox") for a in BUSYBOX_APPLETS]
    entries += [
        Entry(f"modules/{name}.ko", stat.S_IFREG | 0o644, read_module(kernel.modules_dir / p))
        for name, p in zip(names, paths, strict=True)
    ]
    entries += [
        Entry(MODPROBE_HELPER.lstrip("/"), f, MODPROBE_HELPER_SCRIPT.encode()),
        Entry("init", f, render_init(names, net_modules).encode()),
    ]
    return entries


def default_cache_dir() -> Path:
    """$OVERLAY_VM_CACHE, else /var/cache/overlay-vm (root), else ~/.cache/overlay-vm."""
    env = os.environ.get("OVERLAY_VM_CACHE")
    if env:
        return Path(env)
    system = Path("/var/cache/overlay-vm")
    if os.access(system if system.exists() else system.parent, os.W_OK):
        return system
    return Path.home() / ".cache" / "overlay-vm"


def _write_atomically(target: Path, data: bytes) -> None:
    # Parallel builders (pytest-xdist) each write a temporary file and rename it in place.
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_initramfs(kernel: Kernel, cache_dir: Path | None = None) -> Path:
    """Path of the cached initramfs for this kernel, writing it if its content is new.

    Safe to call from parallel processes: the file is written under a temporary name and
    renamed into place, and its name is the hash of its bytes.
    """
    cache = cache_dir or default_cache_dir()
    image = cpio_newc(initramfs_entries(kernel))
    digest = hashlib.sha256(_FORMAT_VERSION.encode() + image).hexdigest()[:16]
    target = cache / f"initramfs-{kernel.version}-{digest}.cpio"
    if not target.is_file():
        _write_atomically(target, image)
        _prune(cache, f"initramfs-{kernel.version}-*.cpio", keep=target)
    return target


def _prune(cache: Path, pattern: str, keep: Path) -> None:
    # Older builds of the same kernel; a qemu still using one keeps its open file.
    for old in cache.glob(pattern):
        if old != keep:
            old.unlink(missing_ok=True)


# ---- an uncompressed kernel for PVH boot -------------------------------------------------

_XZ_MAGIC = b"\xfd7zXZ\x00"
_PVH_NOTE_TYPE = 18  # XEN_ELFNOTE_PHYS32_ENTRY: qemu can jump straight into this ELF


def has_pvh_note(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF carries the Xen PVH entry note qemu needs."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    phoff, phentsize, phnum = (
        struct.unpack_from("<Q", elf, 0x20)[0],
        *struct.unpack_from("<HH", elf, 0x36),
    )
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz]
            if name == b"Xen\0" and n_type == _PVH_NOTE_TYPE:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed ELF kernel inside an xz-compressed bzImage, or None if there is none.

    Under TCG the guest takes several seconds to decompress its own kernel; booting the
    ELF through PVH skips that and the BIOS's slow copy of the compressed image.
    """
    start = bzimage.find(_XZ_MAGIC)
    if start < 0:
        return None
    try:
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
    except lzma.LZMAError:
        return None
    return elf if has_pvh_note(elf) else None


def boot_image(kernel: Kernel, cache_dir: Path | None = None) -> Path:
    """The fastest image qemu can boot for kernel: a cached PVH vmlinux, else the bzImage."""
    cache = cache_dir or default_cache_dir()
    bzimage = kernel.image.read_bytes()
    digest = hashlib.sha256(bzimage).hexdigest()[:16]
    target = cache / f"vmlinux-{kernel.version}-{digest}"
    failed = cache / f"vmlinux-{kernel.version}-{digest}.none"
    if target.is_file():
        return target
    if failed.exists():
        return kernel.image
    elf = extract_vmlinux(bzimage)
    if elf is None:
        _write_atomically(failed, b"")  # remember, so later runs skip the attempt
        return kernel.image
    _write_atomically(target, elf)
    return target
