"""The executables `overlay-cni` and `overlay-ipam`: tiny Python scripts run with `-I -S`.

A container runtime execs the plugin for every ADD/DEL, so its start-up is most of the cost.
pip's console scripts run the interpreter with the site machinery (every .pth file and
import hook of the environment: ~20-40 ms) and `import re`. These launchers skip site
entirely (-S), ignore PYTHON* variables and the user's site (-I), and put only the directory
holding our `cni` package on sys.path: the plugin needs nothing but the standard library.

    python -m cni.launcher DIR   # write (or refresh) DIR/overlay-cni and DIR/overlay-ipam

scripts/setup.sh does this for the virtualenv's bin directory (replacing pip's console
scripts, so the lab, the tests and the benchmark exec the fast ones); `overlayctl install`
writes the same text into the CNI bin directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PLUGINS = {"overlay-cni": "main_cni", "overlay-ipam": "main_ipam"}
MARKER = "# overlay CNI launcher"
# The directory that holds the `cni` package (the repository for an editable install).
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def render(plugin: str, python: str | None = None, root: str = PACKAGE_ROOT) -> str:
    """The launcher text for `plugin` ("overlay-cni" or "overlay-ipam")."""
    if plugin not in PLUGINS:
        raise ValueError(f"plugin={plugin!r}: expected one of {', '.join(PLUGINS)}")
    python = python or sys.executable
    if not python.startswith("/") or any(c.isspace() for c in python) or len(python) > 200:
        # The kernel splits a #! line at whitespace and truncates it at 255 bytes.
        raise ValueError(
            f"python={python!r}: a launcher needs an absolute interpreter path without "
            "whitespace, at most 200 characters"
        )
    entry = PLUGINS[plugin]
    return (
        f"#!{python} -IS\n"
        f"{MARKER} ({plugin}); written by `python -m cni.launcher` or `overlayctl install`.\n"
        "import sys\n"
        f"sys.path.insert(0, {root!r})\n"
        f"from cni.main import {entry}\n"
        f"{entry}()\n"
    )


def is_launcher(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is one of our launchers (not, e.g., pip's slower console script)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(512)
    except OSError:
        return False
    return MARKER in head


def write(directory: str | os.PathLike[str], python: str | None = None) -> list[Path]:
    """Write both launchers into `directory` (atomically; unchanged files are left alone)."""
    written = []
    for plugin in PLUGINS:
        target = Path(directory) / plugin
        text = render(plugin, python)
        try:
            if target.read_text() == text:
                continue
        except (OSError, UnicodeDecodeError):
            pass
        tmp = target.with_name(f".{plugin}.{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, target)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m cni.launcher DIR", file=sys.stderr)
        return 2
    try:
        written = write(args[0])
    except (OSError, ValueError) as e:
        print(f"cni.launcher: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(f"cni.launcher: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
