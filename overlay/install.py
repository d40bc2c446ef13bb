"""Host installation of the agent and the CNI plugins, and its exact reversal.

`plan_files()` and the `render_*` functions are pure: they turn the options into the text
of every file. `install()` writes that plan under a root directory and records what it
wrote (path, sha256, mode) in a manifest; `uninstall()` removes exactly the files of the
manifest whose content is still what was written, and the directories install created.

Only when the root is "/" are systemd and the kernel touched (daemon-reload, enable/start,
disable/stop); any other root is a plain file tree, which is how the tests use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CNI_BIN_DIR = "/opt/cni/bin"
DEFAULT_CNI_CONF_DIR = "/etc/cni/net.d"
DEFAULT_NETWORK = "overlay"
AGENT_ENV = "/etc/overlay/agent.env"
UNIT_NAME = "overlay-agent.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT_NAME}"
MODULES_LOAD = "/etc/modules-load.d/overlay.conf"
MANIFEST = "/var/lib/overlay/install-manifest.json"
CONFLIST_NAME = "10-overlay.conflist"
KERNEL_MODULES = ("vxlan", "ipip")
PLUGINS = ("overlay-cni", "overlay-ipam")
# Reference plugins chained after ours when the CNI bin dir holds them.
CHAINABLE: dict[str, dict[str, object]] = {
    "portmap": {"type": "portmap", "snat": True, "capabilities": {"portMappings": True}},
    "bandwidth": {"type": "bandwidth", "capabilities": {"bandwidth": True}},
}
CNI_VERSION = "1.1.0"
AGENT_SOCKET = "/var/run/overlay/cni.sock"  # the agent's default (overlay.agent.DEFAULT_SOCKET)

_NETWORK_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")
# Characters that would change the meaning of a systemd EnvironmentFile line or split an
# argument of `$OVERLAY_AGENT_ARGS` in two.
_ENV_UNSAFE = re.compile(r"[\s\"'\\$`]")


class InstallError(Exception):
    """A user error: bad option, a file in the way, missing permission. One line."""


@dataclass(frozen=True)
class InstallOptions:
    root: Path = Path("/")
    cni_bin_dir: str = DEFAULT_CNI_BIN_DIR
    cni_conf_dir: str = DEFAULT_CNI_CONF_DIR
    datastore: str = "sqlite:///var/lib/overlay/overlay.db"
    node_name: str | None = None
    ip_autodetection: str | None = None
    ip6_autodetection: str | None = None  # an IPv6 underlay: IPv6 pods on vxlan-v6.calico
    network_name: str = DEFAULT_NETWORK
    assign_ipv6: bool = False  # dual-stack pods: the conflist asks IPAM for IPv6 too
    # Where this environment's scripts live: its python runs the CNI launchers, and the
    # systemd unit starts overlay-agent from here.
    scripts_dir: Path = field(default_factory=lambda: Path(sys.prefix) / "bin")
    force: bool = False  # overwrite files that are in the way and are not ours

    def validate(self) -> None:
        for name in ("cni_bin_dir", "cni_conf_dir"):
            value = getattr(self, name)
            if not value.startswith("/"):
                raise InstallError(
                    f"--{name.replace('_', '-')} {value!r}: expected an absolute path"
                )
        if not self.scripts_dir.is_absolute():
            raise InstallError(f"scripts directory {str(self.scripts_dir)!r} is not absolute")
        if not _NETWORK_RE.fullmatch(self.network_name):
            raise InstallError(
                f"--network-name {self.network_name!r}: must start with a letter or digit, "
                "then letters, digits, _ . -"
            )
        check_datastore_url(self.datastore)
        for flag, value in (
            ("--datastore", self.datastore),
            ("--node-name", self.node_name),
            ("--ip-autodetection", self.ip_autodetection),
            ("--ip6-autodetection", self.ip6_autodetection),
        ):
            if value is not None and (not value or _ENV_UNSAFE.search(value)):
                raise InstallError(
                    f"{flag} {value!r}: must be non-empty, without spaces, quotes, "
                    "backslashes, $ or backticks"
                )


def check_datastore_url(url: str) -> None:
    """Refuse URLs the agent could not open, without opening them."""
    scheme, sep, rest = url.partition("://")
    if scheme in ("etcd", "etcds") and sep:
        from ipam.datastore.etcd import parse_url

        try:
            parse_url(url)
        except ValueError as e:
            raise InstallError(f"--datastore: {e}") from None
    elif scheme == "sqlite" and sep and rest.startswith("/"):
        return
    else:
        raise InstallError(
            f"--datastore {url!r}: expected sqlite:///absolute/path.db or "
            "etcd://host:port[,host:port...] (memory:// lives in one process only)"
        )


@dataclass(frozen=True)
class FileSpec:
    content: str
    mode: int = 0o644

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode()).hexdigest()


# ----------------------------------------------------------------------------- rendering


def render_launcher(scripts_dir: Path, plugin: str) -> str:
    """A CNI binary: the lean launcher of cni.launcher (python -I -S, only our package on
    sys.path), run by this environment's interpreter. The runtime execs it for every ADD and
    DEL, so it does not go through a shell nor pip's console script."""
    from cni import launcher

    python = scripts_dir / "python"
    try:
        return launcher.render(plugin, str(python if python.exists() else sys.executable))
    except ValueError as e:
        raise InstallError(f"cannot write the {plugin} launcher: {e}") from None


def render_conflist(
    network_name: str, chained: Sequence[str] = (), assign_ipv6: bool = False
) -> str:
    ipam: dict[str, object] = {"type": "overlay-ipam"}
    if assign_ipv6:
        ipam["assignIPv6"] = True
    plugins: list[dict[str, object]] = [
        {
            "type": "overlay-cni",
            "mtu": 0,  # 0: the pod MTU the agent derived (underlay MTU - encapsulation)
            "agentSocket": AGENT_SOCKET,
            "ipam": ipam,
        }
    ]
    plugins += [dict(CHAINABLE[name]) for name in chained]
    doc = {"cniVersion": CNI_VERSION, "name": network_name, "plugins": plugins}
    return json.dumps(doc, indent=2) + "\n"


def render_agent_env(
    datastore: str,
    node_name: str | None,
    ip_autodetection: str | None,
    ip6_autodetection: str | None = None,
) -> str:
    args = " ".join(
        f"{flag}={value}"
        for flag, value in (
            ("--ip-autodetection", ip_autodetection),
            ("--ip6-autodetection", ip6_autodetection),
        )
        if value
    )
    node = f"OVERLAY_NODE_NAME={node_name}" if node_name else "#OVERLAY_NODE_NAME=<hostname>"
    return (
        "# overlay-agent configuration (systemd EnvironmentFile), written by overlayctl install.\n"
        "# After a change: systemctl restart overlay-agent\n"
        f"OVERLAY_DATASTORE={datastore}\n"
        f"{node}\n"
        "# Further agent flags, split on spaces, e.g. --ip-autodetection=cidr=10.0.0.0/8\n"
        "# --mtu=1400 --log-format=json --metrics-addr=127.0.0.1:9099 --resync-interval=90\n"
        f"OVERLAY_AGENT_ARGS={args}\n"
    )


def render_unit(agent_bin: Path, env_file: str = AGENT_ENV) -> str:
    modules = " ".join(KERNEL_MODULES)
    return (
        "[Unit]\n"
        "Description=overlay network node agent (VXLAN / IP-in-IP routes, CNI socket)\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        f"EnvironmentFile={env_file}\n"
        "# '-': a kernel with the drivers built in has no modules to load.\n"
        f"ExecStartPre=-/sbin/modprobe -a {modules}\n"
        f"ExecStart={agent_bin} $OVERLAY_AGENT_ARGS\n"
        "Restart=on-failure\n"
        "RestartSec=2\n"
        "TimeoutStopSec=30\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def render_modules_load() -> str:
    return "# Kernel modules of the overlay network, loaded at boot.\n" + "".join(
        f"{m}\n" for m in KERNEL_MODULES
    )


def plan_files(opts: InstallOptions, chained: Sequence[str] = ()) -> dict[str, FileSpec]:
    """Every file install writes: absolute path on the target host -> content and mode."""
    files = {
        f"{opts.cni_bin_dir.rstrip('/')}/{name}": FileSpec(
            render_launcher(opts.scripts_dir, name), 0o755
        )
        for name in PLUGINS
    }
    files[f"{opts.cni_conf_dir.rstrip('/')}/{CONFLIST_NAME}"] = FileSpec(
        render_conflist(opts.network_name, chained, opts.assign_ipv6)
    )
    files[AGENT_ENV] = FileSpec(
        render_agent_env(
            opts.datastore, opts.node_name, opts.ip_autodetection, opts.ip6_autodetection
        )
    )
    files[UNIT_PATH] = FileSpec(render_unit(opts.scripts_dir / "overlay-agent"))
    files[MODULES_LOAD] = FileSpec(render_modules_load())
    return files


# ----------------------------------------------------------------------------- file I/O


@dataclass
class Report:
    """What happened to each path, in order: (action, path on disk)."""

    actions: list[tuple[str, str]] = field(default_factory=list)

    def add(self, action: str, path: Path | str) -> None:
        self.actions.append((action, str(path)))

    def lines(self) -> list[str]:
        return [f"{action:<9} {path}" for action, path in self.actions]

    def changed(self) -> bool:
        return any(a not in ("unchanged", "left") for a, _ in self.actions)


def _on_disk(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


# path on the target -> {"sha256": hex, "mode": int}
Owned = dict[str, dict[str, object]]


def _load_manifest(root: Path) -> tuple[Owned, list[str]]:
    """(files we own, directories we created) from the manifest; empty when there is none."""
    path = _on_disk(root, MANIFEST)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, []
    except (OSError, ValueError) as e:
        raise InstallError(f"cannot read the install manifest {path}: {e}") from None
    files, dirs = (doc.get("files"), doc.get("dirs", [])) if isinstance(doc, dict) else (0, 0)
    if not isinstance(files, dict) or not isinstance(dirs, list):
        raise InstallError(f"install manifest {path}: not a manifest written by overlayctl")
    return files, [str(d) for d in dirs]


def _write_atomic(path: Path, content: str, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _make_dirs(root: Path, directory: str, created: list[str]) -> None:
    """mkdir -p under root, remembering (target paths) the directories that were missing."""
    missing = []
    current = _on_disk(root, directory)
    target = "/" + directory.strip("/")
    while not current.exists():
        missing.append((current, target))
        current, target = current.parent, str(Path(target).parent)
    for path, name in reversed(missing):
        path.mkdir()
        created.append(name)


def present_chainable(root: Path, cni_bin_dir: str) -> list[str]:
    """The reference plugins (portmap, bandwidth) found in the CNI bin dir, in chain order."""
    bin_dir = _on_disk(root, cni_bin_dir)
    return [name for name in CHAINABLE if os.access(bin_dir / name, os.X_OK)]


def install(
    opts: InstallOptions, start: bool = False, run: Callable[[list[str]], None] | None = None
) -> Report:
    """Write the plan under opts.root. Unchanged files are not touched; a file in the way
    that we did not write is refused unless opts.force. On a live host (root /) systemd
    reloads its units; with `start` the agent is enabled and (re)started when a file changed."""
    opts.validate()
    root = opts.root
    if not root.is_dir():
        raise InstallError(f"--root {str(root)!r}: not a directory")
    files = plan_files(opts, present_chainable(root, opts.cni_bin_dir))
    owned, created_dirs = _load_manifest(root)

    # Check everything before writing anything: a refusal leaves the tree as it was.
    for path, spec in files.items():
        disk = _on_disk(root, path)
        digest = _digest(disk)
        if disk.is_dir():
            raise InstallError(f"{disk}: is a directory, expected a file")
        if digest is not None and digest != spec.sha256 and path not in owned and not opts.force:
            raise InstallError(
                f"{disk} exists and was not written by overlayctl install; "
                "move it away or pass --force to overwrite it"
            )

    report = Report()
    try:
        for path, spec in files.items():
            disk = _on_disk(root, path)
            digest = _digest(disk)
            mode_ok = digest is not None and (disk.stat().st_mode & 0o777) == spec.mode
            if digest == spec.sha256 and mode_ok:
                report.add("unchanged", disk)
            else:
                _make_dirs(root, str(Path(path).parent), created_dirs)
                _write_atomic(disk, spec.content, spec.mode)
                report.add("created" if digest is None else "updated", disk)
            if path in owned or digest != spec.sha256 or not mode_ok:
                owned[path] = {"sha256": spec.sha256, "mode": spec.mode}
        # Files of an earlier install that this configuration no longer has (another
        # --cni-conf-dir, say): remove them if nobody changed them.
        for path in sorted(set(owned) - set(files)):
            _remove_owned(root, path, owned.pop(path), report)
        _make_dirs(root, str(Path(MANIFEST).parent), created_dirs)
        doc = {"files": owned, "dirs": created_dirs, "scripts_dir": str(opts.scripts_dir)}
        text = json.dumps(doc, indent=2) + "\n"
        if _digest(_on_disk(root, MANIFEST)) != FileSpec(text).sha256:
            _write_atomic(_on_disk(root, MANIFEST), text, 0o644)
    except PermissionError as e:
        raise InstallError(f"cannot write {e.filename}: permission denied (run as root)") from None
    if _is_live(root):
        commands = [["systemctl", "daemon-reload"]]
        if start:
            verb = "restart" if report.changed() else "start"
            commands += [["systemctl", "enable", UNIT_NAME], ["systemctl", verb, UNIT_NAME]]
        _run_all(run or _run, commands)
    return report


def _remove_owned(root: Path, path: str, entry: dict[str, object], report: Report) -> None:
    disk = _on_disk(root, path)
    digest = _digest(disk)
    if digest is None:
        report.add("missing", disk)
    elif digest == entry.get("sha256"):
        disk.unlink()
        report.add("removed", disk)
    else:
        report.add("left", disk)  # edited since install: the operator's file now


def uninstall(root: Path = Path("/"), run: Callable[[list[str]], None] | None = None) -> Report:
    """Remove what install wrote (and still holds what it wrote), then the directories it
    created when they are empty, then the manifest."""
    if not root.is_dir():
        raise InstallError(f"--root {str(root)!r}: not a directory")
    owned, created_dirs = _load_manifest(root)
    report = Report()
    if not owned and not _on_disk(root, MANIFEST).exists():
        return report
    if _is_live(root) and UNIT_PATH in owned:
        _run_all(run or _run, [["systemctl", "disable", "--now", UNIT_NAME]])
    try:
        for path in sorted(owned):
            _remove_owned(root, path, owned[path], report)
        _on_disk(root, MANIFEST).unlink(missing_ok=True)
        for directory in sorted(created_dirs, key=len, reverse=True):
            disk = _on_disk(root, directory)
            try:
                disk.rmdir()
                report.add("removed", f"{disk}/")
            except FileNotFoundError:
                pass
            except OSError:
                report.add("left", f"{disk}/")  # not empty: holds files that are not ours
    except PermissionError as e:
        raise InstallError(f"cannot remove {e.filename}: permission denied (run as root)") from None
    if _is_live(root):
        _run_all(run or _run, [["systemctl", "daemon-reload"]])
    return report


# ----------------------------------------------------------------------------- the live host


def _is_live(root: Path) -> bool:
    """Touch systemd only for the real root of a host that runs systemd."""
    return root.resolve() == Path("/") and Path("/run/systemd/system").is_dir()


def _run(argv: list[str]) -> None:
    if shutil.which(argv[0]) is None:
        return
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if res.returncode != 0:
        raise InstallError(f"{' '.join(argv)} failed: {res.stderr.strip() or res.returncode}")


def _run_all(run: Callable[[list[str]], None], commands: list[list[str]]) -> None:
    for argv in commands:
        run(argv)
