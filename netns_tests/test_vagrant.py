"""The vagrant/ cluster, checked on a machine that cannot boot its VMs: the Vagrantfile
validates for every setting, its scripts pass shellcheck, and vagrant/check turns what the
nodes report into the right matrix and exit status (against a stand-in `vagrant`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

VAGRANT_DIR = Path(__file__).resolve().parent.parent / "vagrant"
SCRIPTS = [
    *sorted((VAGRANT_DIR / "provision").glob("*.sh")),
    VAGRANT_DIR / "check",
    VAGRANT_DIR / "check-node.sh",
]


def _vagrant(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if shutil.which("vagrant") is None:
        pytest.skip("the vagrant binary is missing (scripts/setup.sh installs it)")
    full = dict(os.environ)
    for key in list(full):
        if key.startswith("OVERLAY_"):
            del full[key]
    # Its own state dir: parallel runs must not share vagrant/.vagrant (nor leave one).
    full.update(env, VAGRANT_DOTFILE_PATH=str(tmp_path / "dot-vagrant"))
    return subprocess.run(
        ["vagrant", "validate", "--ignore-provider"],
        cwd=VAGRANT_DIR,
        env=full,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings",
    [
        {},
        {
            "OVERLAY_PROVIDER": "virtualbox",
            "OVERLAY_ENCAP": "ipip",
            "OVERLAY_MODE": "always",
            "OVERLAY_ETCD_MEMBERS": "3",
        },
        {"OVERLAY_NODES": "2", "OVERLAY_BOX": "generic/debian12"},
    ],
    ids=["defaults", "virtualbox-ipip-always-etcd3", "two-nodes"],
)
def test_vagrantfile_validates(tmp_path: Path, settings: dict[str, str]) -> None:
    res = _vagrant(tmp_path, settings)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "validated successfully" in res.stdout


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"OVERLAY_ENCAP": "gre"}, 'OVERLAY_ENCAP="gre"'),
        ({"OVERLAY_ETCD_MEMBERS": "3", "OVERLAY_NODES": "2"}, "OVERLAY_NODES >= 3"),
    ],
)
def test_vagrantfile_refuses_bad_settings(
    tmp_path: Path, settings: dict[str, str], needle: str
) -> None:
    res = _vagrant(tmp_path, settings)
    assert res.returncode != 0
    assert needle in res.stdout + res.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_pass_shellcheck(script: Path) -> None:
    res = subprocess.run(
        ["shellcheck", "--shell=bash", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr


# A stand-in for `vagrant`: answers `ssh NODE -c "sudo bash .../check-node.sh ARGS"` the way
# check-node.sh would on a healthy 4-node cross-subnet VXLAN cluster, except for the
# (source, destination) pairs named in $FAKE_BROKEN, and logs every call.
FAKE_VAGRANT = """\
import os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
if args[0] != "ssh":
    sys.exit(0)
node = args[1]
words = args[args.index("-c") + 1].split()[3:]  # after: sudo bash /path/check-node.sh
subnet = lambda n: "192.168.56.0/24" if int(n[4:]) <= 2 else "192.168.57.0/24"
broken = set(os.environ.get("FAKE_BROKEN", "").split(","))
if words[0] == "add":
    print(words[1], "10.244.%d.1" % int(node[4:]), node, subnet(node))
elif words[0] == "ping":
    src = words[1]
    for spec in words[2:]:
        dst, dnode, _ip, dsub = spec.split(":")
        want = "direct" if dsub == subnet(node) else "vxlan"
        ok = "unanswered" if src + ">" + dst in broken else "answered"
        print(src, dst, ok, want, want, want)
"""


def _run_check(tmp_path: Path, broken: str = "") -> tuple[subprocess.CompletedProcess[str], str]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "vagrant"
    fake.write_text(f"#!{sys.executable}\n" + textwrap.dedent(FAKE_VAGRANT))
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {
        "PATH": f"{bindir}:/usr/bin:/bin",
        "FAKE_LOG": str(log),
        "FAKE_BROKEN": broken,
        "OVERLAY_NODES": "4",
    }
    res = subprocess.run(
        ["bash", str(VAGRANT_DIR / "check")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return res, log.read_text()


def test_check_prints_the_matrix_and_cleans_up(tmp_path: Path) -> None:
    res, calls = _run_check(tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {line.split()[0]: line.split()[1:] for line in res.stdout.splitlines()
            if line.startswith("n") and "p1 " in line[:6]}  # fmt: skip
    # node1+node2 share a subnet, node3+node4 the other: direct inside, vxlan across.
    assert rows["n1p1"] == ["-", "direct", "vxlan", "vxlan"]
    assert rows["n3p1"] == ["vxlan", "vxlan", "-", "direct"]
    assert "all 12 probes answered" in res.stdout
    for node in ("node1", "node2", "node3", "node4"):
        assert f"ssh {node} -c sudo bash /vagrant/vagrant/check-node.sh del" in calls
        assert f"ssh {node} -c sudo bash /vagrant/vagrant/check-node.sh cleanup" in calls


def test_check_fails_on_an_unanswered_pair_and_still_cleans_up(tmp_path: Path) -> None:
    res, calls = _run_check(tmp_path, broken="n1p1>n4p1")
    assert res.returncode == 1
    row = next(line for line in res.stdout.splitlines() if line.startswith("n1p1 "))
    assert row.split()[1:] == ["-", "direct", "vxlan", "FAIL"]
    assert "n1p1 -> n4p1: unanswered" in res.stdout
    assert calls.count("check-node.sh del") == 4
