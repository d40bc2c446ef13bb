"""overlayctl install / uninstall in a scratch root: what lands on disk, that a runtime and
systemd accept it, that re-running changes nothing, and that uninstall restores the tree."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cni import launcher as cni_launcher
from cni.spec import parse_conflist
from overlay import install
from overlay.cli import main

SCRIPTS = Path(sys.prefix) / "bin"


def snapshot(root: Path) -> dict[str, tuple[str, ...]]:
    """Every path under root -> (kind, mode[, sha256]): a tree compares equal only if the
    same files hold the same bytes with the same permissions."""
    out: dict[str, tuple[str, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if path.is_dir():
                out[rel] = ("dir", oct(st.st_mode & 0o7777))
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[rel] = ("file", oct(st.st_mode & 0o7777), digest)
    return out


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A host tree with things of other people in the places we write to."""
    r = tmp_path / "root"
    (r / "etc/cni/net.d").mkdir(parents=True)
    (r / "etc/cni/net.d/99-other.conflist").write_text('{"cniVersion": "1.0.0"}\n')
    (r / "opt/cni/bin").mkdir(parents=True)
    portmap = r / "opt/cni/bin/portmap"
    portmap.write_text("#!/bin/sh\nexit 0\n")
    portmap.chmod(0o755)
    (r / "etc/hostname").write_text("node-1\n")
    return r


def overlayctl(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def do_install(root: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    code, out, err = overlayctl(
        "install",
        "--root",
        str(root),
        "--datastore",
        "etcds://10.0.0.1:2379,10.0.0.2:2379?cacert=/etc/overlay/ca.pem",
        "--node-name",
        "node-1",
        "--ip-autodetection",
        "cidr=192.168.56.0/24",
        *extra,
        capsys=capsys,
    )
    assert code == 0, err
    return out


def test_install_writes_plugins_conflist_agent_config_and_unit(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = do_install(root, capsys)
    assert out.count("created") == 6

    for name in ("overlay-cni", "overlay-ipam"):
        launcher = root / "opt/cni/bin" / name
        assert os.access(launcher, os.X_OK)
        # The lean launcher, run by this environment's interpreter (no shell, no site).
        assert launcher.read_text() == cni_launcher.render(name, str(SCRIPTS / "python"))
        assert cni_launcher.is_launcher(launcher)

    conflist = root / "etc/cni/net.d/10-overlay.conflist"
    doc = parse_conflist(conflist.read_text())
    # portmap is in the bin dir, so it is chained; bandwidth is not, so it is not.
    plugins = doc["plugins"]
    assert isinstance(plugins, list)
    assert [p["type"] for p in plugins] == ["overlay-cni", "portmap"]
    assert doc["name"] == "overlay"

    env = (root / "etc/overlay/agent.env").read_text().splitlines()
    assert "OVERLAY_DATASTORE=etcds://10.0.0.1:2379,10.0.0.2:2379?cacert=/etc/overlay/ca.pem" in env
    assert "OVERLAY_NODE_NAME=node-1" in env
    assert "OVERLAY_AGENT_ARGS=--ip-autodetection=cidr=192.168.56.0/24" in env

    unit = (root / "etc/systemd/system/overlay-agent.service").read_text().splitlines()
    for line in (
        "Restart=on-failure",
        "After=network-online.target",
        "Wants=network-online.target",
        "EnvironmentFile=/etc/overlay/agent.env",
        "ExecStartPre=-/sbin/modprobe -a vxlan ipip",
        f"ExecStart={SCRIPTS / 'overlay-agent'} $OVERLAY_AGENT_ARGS",
        "WantedBy=multi-user.target",
    ):
        assert line in unit
    modules = (root / "etc/modules-load.d/overlay.conf").read_text().split()
    assert "vxlan" in modules and "ipip" in modules
    assert json.loads((root / "var/lib/overlay/install-manifest.json").read_text())["files"]


def test_installed_launcher_answers_a_runtime(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The runtime execs the launcher from the bin dir with a plugin config on stdin."""
    do_install(root, capsys)
    conflist = json.loads((root / "etc/cni/net.d/10-overlay.conflist").read_text())
    config = dict(conflist["plugins"][0], cniVersion="1.1.0", name=conflist["name"])
    res = subprocess.run(
        [str(root / "opt/cni/bin/overlay-cni")],
        input=json.dumps(config),
        env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1.1.0" in json.loads(res.stdout)["supportedVersions"]


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
def test_unit_passes_systemd_analyze_verify(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    do_install(root, capsys)
    # verify resolves ExecStart on this host: it points at this environment's real script.
    unit = tmp_path / "units" / install.UNIT_NAME
    unit.parent.mkdir()
    shutil.copy(root / "etc/systemd/system" / install.UNIT_NAME, unit)
    res = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    # Unknown keys and bad values are only warnings (exit 0): any line about our unit fails.
    complaints = [line for line in res.stderr.splitlines() if install.UNIT_NAME in line]
    assert not complaints, res.stderr


def test_assign_ipv6_makes_the_conflist_ask_for_dual_stack(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    do_install(root, capsys, "--assign-ipv6")
    doc = parse_conflist((root / "etc/cni/net.d/10-overlay.conflist").read_text())
    plugins = doc["plugins"]
    assert isinstance(plugins, list)
    assert plugins[0]["ipam"] == {"type": "overlay-ipam", "assignIPv6": True}


def test_second_install_changes_nothing(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    do_install(root, capsys)
    before = snapshot(root)
    inodes = {p: p.stat().st_ino for p in root.rglob("*") if p.is_file()}
    out = do_install(root, capsys)
    assert out.splitlines() and all(line.startswith("unchanged") for line in out.splitlines())
    assert snapshot(root) == before
    assert {p: p.stat().st_ino for p in root.rglob("*") if p.is_file()} == inodes


def test_uninstall_restores_the_tree_exactly(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(root)
    do_install(root, capsys)
    do_install(root, capsys, "--network-name", "pods")  # a changed re-install in between
    assert snapshot(root) != before
    code, out, err = overlayctl("uninstall", "--root", str(root), capsys=capsys)
    assert code == 0, err
    assert "left" not in out
    assert snapshot(root) == before
    # A second uninstall finds nothing to do and still succeeds.
    code, out, _ = overlayctl("uninstall", "--root", str(root), capsys=capsys)
    assert code == 0 and "nothing to uninstall" in out


def test_uninstall_leaves_files_edited_since_install(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    do_install(root, capsys)
    env = root / "etc/overlay/agent.env"
    env.write_text(env.read_text() + "OVERLAY_AGENT_ARGS=--log-format=json\n")
    code, out, _ = overlayctl("uninstall", "--root", str(root), capsys=capsys)
    assert code == 0
    assert f"left      {env}" in out
    assert env.exists() and not (root / "etc/systemd/system/overlay-agent.service").exists()
    assert not (root / "opt/cni/bin/overlay-cni").exists()
    assert (root / "opt/cni/bin/portmap").exists()  # never ours


def test_install_refuses_a_foreign_file_in_the_way(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    theirs = root / "etc/cni/net.d/10-overlay.conflist"
    theirs.write_text('{"cniVersion": "0.4.0", "name": "theirs", "plugins": []}\n')
    before = snapshot(root)
    code, _, err = overlayctl("install", "--root", str(root), capsys=capsys)
    assert code == 1
    assert str(theirs) in err and "--force" in err
    assert snapshot(root) == before  # refused before anything was written
    code, _, err = overlayctl("install", "--root", str(root), "--force", capsys=capsys)
    assert code == 0, err
    assert json.loads(theirs.read_text())["name"] == "overlay"


def test_reinstall_elsewhere_removes_the_old_copy(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    do_install(root, capsys)
    out = do_install(root, capsys, "--cni-conf-dir", "/etc/cni/other.d")
    assert (root / "etc/cni/other.d/10-overlay.conflist").exists()
    assert not (root / "etc/cni/net.d/10-overlay.conflist").exists()
    assert "removed" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--datastore", "memory://"], "memory://"),
        (["--datastore", "etcd://h:99999"], "port must be 1-65535"),
        (["--datastore", "sqlite://relative.db"], "sqlite:///absolute"),
        (["--ip-autodetection", "interface=eth 0"], "--ip-autodetection 'interface=eth 0'"),
        (["--cni-bin-dir", "opt/cni/bin"], "--cni-bin-dir 'opt/cni/bin'"),
        (["--network-name=bad/name"], "--network-name 'bad/name'"),
    ],
)
def test_bad_options_are_refused_with_the_value(
    root: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    before = snapshot(root)
    code, _, err = overlayctl("install", "--root", str(root), *argv, capsys=capsys)
    assert code == 1
    assert needle in err
    assert snapshot(root) == before


def test_services_are_never_touched_outside_the_real_root(root: Path) -> None:
    calls: list[list[str]] = []
    install.install(install.InstallOptions(root=root), start=True, run=calls.append)
    install.uninstall(root, run=calls.append)
    assert calls == []


def test_rendered_env_without_node_name_leaves_it_to_the_hostname() -> None:
    text = install.render_agent_env("sqlite:///var/lib/overlay/overlay.db", None, None)
    assert "#OVERLAY_NODE_NAME=" in text
    assert "OVERLAY_AGENT_ARGS=\n" in text


def test_rendered_env_carries_both_autodetection_methods() -> None:
    text = install.render_agent_env("sqlite:///x.db", "n1", "interface=eth0", "interface=eth0")
    both = "--ip-autodetection=interface=eth0 --ip6-autodetection=interface=eth0"
    assert f"OVERLAY_AGENT_ARGS={both}\n" in text
    from overlay.agent import parse_args as agent_parse_args

    parsed = agent_parse_args(text.split("OVERLAY_AGENT_ARGS=")[1].split())
    assert (parsed.ip_autodetection, parsed.ip6_autodetection) == ("interface=eth0",) * 2
