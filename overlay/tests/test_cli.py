"""overlayctl end to end on a temp SQLite file: in-process through main(), and the real
console script in parallel subprocesses."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import netaddr
import pytest
import yaml

from ipam.datastore.sqlite import SqliteDatastore
from overlay.cli import main

CALICO_POOL = """\
apiVersion: projectcalico.org/v3
kind: IPPool
metadata:
  name: default-ipv4-ippool
spec:
  cidr: 10.244.0.0/16
  blockSize: 26
  ipipMode: Never
  vxlanMode: CrossSubnet
  natOutgoing: true
  disabled: false
  nodeSelector: all()
  allowedUses:
  - Workload
  - Tunnel
"""

NODES = """\
apiVersion: projectcalico.org/v3
kind: Node
metadata: {name: n1}
spec: {bgp: {ipv4Address: 10.0.1.5/24}}
---
apiVersion: projectcalico.org/v3
kind: Node
metadata: {name: n2}
spec: {bgp: {ipv4Address: 10.0.1.6/24}}
"""


def pool_doc(name: str, cidr: str, block: int = 26) -> str:
    return (
        f"apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {{name: {name}}}\n"
        f"spec: {{cidr: {cidr}, blockSize: {block}}}\n"
    )


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path}/overlay.db"


def run(url: str, *args: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["--datastore", url, *args])
    finally:
        sys.stdin = old_stdin
    return rc, out.getvalue(), err.getvalue()


def ok(url: str, *args: str, stdin: str = "") -> str:
    rc, out, err = run(url, *args, stdin=stdin)
    assert rc == 0, f"overlayctl {' '.join(args)} -> {rc}: {err}"
    return out


def dump(url: str) -> tuple[dict[str, tuple[str, int]], int]:
    """Every key with its value and revision, and the store revision."""
    ds = SqliteDatastore(url.removeprefix("sqlite://"))
    try:
        listing = ds.list("")
        return {kv.key: (kv.value, kv.mod_revision) for kv in listing.items}, ds.revision()
    finally:
        ds.close()


def assert_user_error(url: str, *args: str, stdin: str = "", expect: str = "") -> str:
    """Exit 1, exactly one `overlayctl: error:` line, nothing on stdout, nothing written."""
    before = dump(url)
    rc, out, err = run(url, *args, stdin=stdin)
    assert rc == 1, (rc, out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("overlayctl: error: "), err
    assert expect in lines[0], lines[0]
    assert "Traceback" not in err
    assert dump(url) == before
    return lines[0]


# ---------------------------------------------------------------------------- resources


def test_calico_pool_manifest_applies_unchanged(url: str) -> None:
    assert ok(url, "apply", "-f", "-", stdin=CALICO_POOL) == "ippool/default-ipv4-ippool created\n"
    before = dump(url)
    assert ok(url, "apply", "-f", "-", stdin=CALICO_POOL) == (
        "ippool/default-ipv4-ippool unchanged\n"
    )
    assert dump(url) == before
    spec = json.loads(ok(url, "get", "ippool", "default-ipv4-ippool", "-o", "json"))["spec"]
    assert spec["cidr"] == "10.244.0.0/16"
    assert spec["blockSize"] == 26
    assert spec["vxlanMode"] == "CrossSubnet"
    assert spec["natOutgoing"] is True


def test_apply_reads_a_file_with_many_documents_and_reports_configured(
    url: str, tmp_path: Path
) -> None:
    f = tmp_path / "all.yaml"
    f.write_text(CALICO_POOL + "---\n" + NODES)
    out = ok(url, "apply", "-f", str(f))
    assert out.splitlines() == [
        "ippool/default-ipv4-ippool created",
        "node/n1 created",
        "node/n2 created",
    ]
    f.write_text(CALICO_POOL.replace("natOutgoing: true", "natOutgoing: false"))
    assert ok(url, "apply", "-f", str(f)) == "ippool/default-ipv4-ippool configured\n"


def test_get_in_each_format_and_yaml_round_trips(url: str) -> None:
    ok(url, "apply", "-f", "-", stdin=CALICO_POOL + "---\n" + pool_doc("extra", "10.9.0.0/24"))
    table = ok(url, "get", "ippools").splitlines()
    assert table[0].split()[:3] == ["NAME", "CIDR", "BLOCKSIZE"]
    assert table[0].split()[7:9] == ["USES", "MODE"]
    assert table[1].split()[7:9] == ["Workload,Tunnel", "Automatic"]
    assert [line.split()[:2] for line in table[1:]] == [
        ["default-ipv4-ippool", "10.244.0.0/16"],
        ["extra", "10.9.0.0/24"],
    ]
    one = yaml.safe_load(ok(url, "get", "ippool", "extra", "-o", "yaml"))
    assert (one["kind"], one["metadata"]["name"], one["spec"]["cidr"]) == (
        "IPPool",
        "extra",
        "10.9.0.0/24",
    )
    listed = json.loads(ok(url, "get", "ippool", "-o", "json"))
    assert listed["kind"] == "IPPoolList"
    assert [i["metadata"]["name"] for i in listed["items"]] == ["default-ipv4-ippool", "extra"]
    # What `get -o yaml` prints is a manifest `apply` takes back, unchanged.
    before = dump(url)
    again = ok(url, "apply", "-f", "-", stdin=ok(url, "get", "ippool", "-o", "yaml"))
    assert again.splitlines() == [
        "ippool/default-ipv4-ippool unchanged",
        "ippool/extra unchanged",
    ]
    assert dump(url) == before
    assert "false" in ok(url, "get", "ipamconfig")  # defaults show without any apply


def test_felix_configurations_apply_get_and_refuse_bad_values(url: str) -> None:
    doc = (
        "apiVersion: projectcalico.org/v3\nkind: FelixConfiguration\nmetadata: {name: %s}\n"
        "spec: {%s}\n"
    )
    out = ok(url, "apply", "-f", "-", stdin=doc % ("default", "vxlanVNI: 4097, vxlanPort: 8472"))
    assert out.strip() == "felixconfiguration/default created"
    ok(url, "apply", "-f", "-", stdin=doc % ("node.n1", "vxlanMTU: 1300, routeRefreshInterval: 2m"))
    table = [line.split() for line in ok(url, "get", "felixconfig").splitlines()]
    header = ["NAME", "VXLANVNI", "VXLANPORT", "VXLANMTU", "IPIPMTU", "ROUTEREFRESH", "LOG"]
    assert table[0] == header
    assert table[1:] == [["default", "4097", "8472"], ["node.n1", "1300", "120s"]]  # blanks unset
    one = yaml.safe_load(ok(url, "get", "felixconfiguration", "node.n1", "-o", "yaml"))
    assert one["spec"] == {"vxlanMTU": 1300, "routeRefreshInterval": "120s"}
    assert_user_error(
        url, "apply", "-f", "-", stdin=doc % ("default", "vxlanPort: 0"),
        expect='FelixConfiguration "default": spec.vxlanPort: 0 is outside 1..65535',
    )  # fmt: skip
    assert_user_error(url, "apply", "-f", "-", stdin=doc % ("n1", ""), expect="'node.<node name>'")


def test_patch_merges_fields_as_calicoctl_patch_and_refuses_bad_results(url: str) -> None:
    ok(url, "apply", "-f", "-", stdin=CALICO_POOL)
    name = "default-ipv4-ippool"
    patch = '{"spec": {"vxlanMode": "Always", "ipipMode": null}}'
    out = ok(url, "patch", "ippool", name, "-p", patch)
    assert out.strip() == f"ippool/{name} patched"
    pool = yaml.safe_load(ok(url, "get", "ippool", name, "-o", "yaml"))
    assert (pool["spec"]["vxlanMode"], pool["spec"]["ipipMode"]) == ("Always", "Never")
    assert pool["spec"]["natOutgoing"] is True  # untouched fields stay
    again = ok(url, "patch", "ippool", name, "-p", "spec: {vxlanMode: Always}")  # YAML too
    assert again.strip() == f"ippool/{name} unchanged"
    # The IPAM configuration patches from Calico's defaults when it was never applied.
    ok(url, "patch", "ipamconfig", "default", "-p", '{"spec": {"strictAffinity": true}}')
    assert "true" in ok(url, "get", "ipamconfig")
    # Refused, naming the field and the value; nothing written.
    assert_user_error(
        url, "patch", "ippool", name, "-p", '{"spec": {"blockSize": 20}}',
        expect=f'IPPool "{name}": spec.blockSize: cannot change 26 to 20',
    )  # fmt: skip
    assert_user_error(
        url, "patch", "ippool", name, "-p", '{"spec": {"vxlanMode": "Sometimes"}}',
        expect="spec.vxlanMode",
    )  # fmt: skip
    assert_user_error(
        url, "patch", "ippool", name, "-p", '{"metadata": {"name": "other"}}',
        expect=f'IPPool "{name}": the change made it IPPool "other"',
    )  # fmt: skip
    assert_user_error(url, "patch", "ippool", "nope", "-p", "{}", expect='IPPool "nope" not found')
    # A FelixConfiguration that was never applied patches from empty, as in Calico, where
    # the docs patch `default` straight away; a name Felix never reads is still refused.
    out = ok(url, "patch", "felixconfig", "default", "-p", '{"spec": {"vxlanPort": 8472}}')
    assert out.strip() == "felixconfiguration/default patched"
    assert "8472" in ok(url, "get", "felixconfig", "default")
    assert_user_error(url, "patch", "felixconfig", "custom", "-p", "{}", expect="'custom'")
    assert_user_error(url, "patch", "ippool", name, "-p", "[1]", expect="expected a mapping")
    assert_user_error(url, "patch", "ippool", name, "-p", "{", expect="--patch: not JSON or YAML")


def test_delete_removes_one_resource(url: str) -> None:
    ok(url, "apply", "-f", "-", stdin=NODES)
    assert ok(url, "delete", "node", "n1") == "node/n1 deleted\n"
    assert [line.split()[0] for line in ok(url, "get", "nodes").splitlines()] == ["NAME", "n2"]
    assert_user_error(url, "get", "node", "n1", expect='Node "n1" not found')
    assert_user_error(url, "delete", "node", "n1", expect='Node "n1" not found')


@pytest.mark.parametrize(
    ("manifest", "expect"),
    [
        # A valid document first: it must not be written when a later one is refused.
        (
            pool_doc("fresh", "10.50.0.0/16") + "---\n" + pool_doc("clash", "10.244.128.0/17"),
            'overlaps the cidr 10.244.0.0/16 of IPPool "default-ipv4-ippool"',
        ),
        (
            pool_doc("a", "10.60.0.0/16") + "---\n" + pool_doc("b", "10.60.1.0/24"),
            "overlaps the cidr 10.60.0.0/16",
        ),
        (pool_doc("fresh", "10.50.0.0/16") + "---\nkind: IPPool\n  bad: [indent\n", "invalid YAML"),
        (
            pool_doc("fresh", "10.50.0.0/16").replace(
                "blockSize: 26", "blockSize: 26, colour: red"
            ),
            "spec.colour: unknown field",
        ),
        (pool_doc("default-ipv4-ippool", "10.245.0.0/16"), "spec.cidr: cannot change"),
        (pool_doc("fresh", "10.50.0.1/16"), "host bits set"),
        ("", "no resources found"),
    ],
    ids=[
        "overlap-store",
        "overlap-file",
        "malformed-yaml",
        "unknown-field",
        "cidr-immutable",
        "host-bits",
        "empty",
    ],
)
def test_apply_user_errors_write_nothing(url: str, manifest: str, expect: str) -> None:
    ok(url, "apply", "-f", "-", stdin=CALICO_POOL)
    assert_user_error(url, "apply", "-f", "-", stdin=manifest, expect=expect)


def test_usage_errors_and_unknown_kinds_exit_1(url: str, tmp_path: Path) -> None:
    ok(url, "apply", "-f", "-", stdin=CALICO_POOL)
    assert_user_error(url, "get", "widgets", expect="unknown resource kind 'widgets'")
    assert_user_error(url, "ipam", expect="required")
    assert_user_error(url, "ipam", "assign", "--node", "n1", expect="--handle")
    assert_user_error(url, "ipam", "show", "--ip", "10.1.2.300", expect="not an IP address")
    assert_user_error(url, "apply", "-f", str(tmp_path / "missing.yaml"), expect="missing.yaml")


# ---------------------------------------------------------------------------- datastore


def test_unreachable_sqlite_exits_2_naming_the_url(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    url = f"sqlite://{blocker}/overlay.db"
    rc, out, err = run(url, "get", "ippool")
    assert (rc, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith("overlayctl: error: ")
    assert url in err and "Traceback" not in err


def test_unreachable_etcd_exits_2_naming_the_url() -> None:
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        url = f"etcd://127.0.0.1:{port}?timeout=1"
        rc, out, err = run(url, "ipam", "show")
    assert (rc, out) == (2, "")
    assert err.count("\n") == 1 and url in err


def test_environment_variable_selects_the_datastore(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OVERLAY_DATASTORE", url)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["apply", "-f", "-"]) == 1  # empty stdin: a user error, not a crash
    ok(url, "apply", "-f", "-", stdin=NODES)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["get", "nodes"]) == 0
    assert "n1" in out.getvalue()


# ---------------------------------------------------------------------------- ipam


def test_assign_prints_the_address_alone_and_show_ip_describes_it(url: str) -> None:
    ok(url, "apply", "-f", "-", stdin=CALICO_POOL)
    out = ok(url, "ipam", "assign", "--node", "n1", "--handle", "pod-a", "--attr", "pod=web-1")
    ip = netaddr.IPAddress(out.strip())  # no mask, nothing else
    assert out == f"{ip}\n" and ip in netaddr.IPNetwork("10.244.0.0/16")
    shown = ok(url, "ipam", "show", "--ip", str(ip)).replace("block affinity", "affinity")
    fields = {line.split()[0]: line.partition(" ")[2] for line in shown.splitlines()[1:]}
    assert fields["handle"].strip() == "pod-a"
    assert fields["node"].strip() == "n1"
    assert fields["affinity"].strip() == "host:n1"
    assert ip in netaddr.IPNetwork(fields["block"].strip())
    assert "pod=web-1" in fields["attributes"]
    six = ok(url, "apply", "-f", "-", stdin=pool_doc("v6", "fd00:10::/112", 122))
    assert six.strip() == "ippool/v6 created"
    ip6 = netaddr.IPAddress(
        ok(url, "ipam", "assign", "--node", "n1", "--handle", "p6", "--ipv6").strip()
    )
    assert ip6.version == 6 and ip6 in netaddr.IPNetwork("fd00:10::/112")
    fixed = ok(url, "ipam", "assign", "--node", "n2", "--handle", "fix", "--ip", "10.244.200.7")
    assert fixed == "10.244.200.7\n"
    assert_user_error(
        url,
        "ipam",
        "assign",
        "--node",
        "n2",
        "--handle",
        "other",
        "--ip",
        "10.244.200.7",
        expect="already allocated",
    )


def test_exhausted_pool_exits_1_and_writes_nothing(url: str) -> None:
    ok(url, "apply", "-f", "-", stdin=pool_doc("tiny", "10.70.0.0/30", 30))
    got = {ok(url, "ipam", "assign", "--node", "n1", "--handle", f"h{i}").strip() for i in range(4)}
    assert got == {str(ip) for ip in netaddr.IPNetwork("10.70.0.0/30")}
    assert_user_error(
        url, "ipam", "assign", "--node", "n1", "--handle", "h5", expect="no free addresses"
    )
    assert_user_error(
        url, "ipam", "assign", "--node", "n2", "--handle", "h6", expect="no free addresses"
    )


def test_release_by_ip_and_by_handle(url: str) -> None:
    ok(url, "apply", "-f", "-", stdin=CALICO_POOL)
    a = ok(url, "ipam", "assign", "--node", "n1", "--handle", "h1").strip()
    b = ok(url, "ipam", "assign", "--node", "n1", "--handle", "h2").strip()
    assert ok(url, "ipam", "release", "--ip", a) == f"released {a}\n"
    assert_user_error(url, "ipam", "release", "--ip", a, expect=f"address {a} is not assigned")
    assert ok(url, "ipam", "release", "--handle", "h2") == f"released {b} (handle h2)\n"
    assert_user_error(url, "ipam", "release", "--handle", "h2", expect="holds no addresses")
    pools = json.loads(ok(url, "ipam", "show", "-o", "json"))["pools"]
    assert pools[0]["inUse"] == 0


def test_with_ip_cooldown_a_released_address_rests_on_the_sqlite_file(url: str) -> None:
    ok(url, "apply", "-f", "-", stdin=pool_doc("tiny", "10.70.0.0/30", 30))
    cfg = (
        "apiVersion: projectcalico.org/v3\nkind: IPAMConfiguration\nmetadata: {name: default}\n"
        "spec: {strictAffinity: true, ipCooldownSeconds: 600}\n"
    )
    ok(url, "apply", "-f", "-", stdin=cfg)
    got = [ok(url, "ipam", "assign", "--node", "n1", "--handle", f"h{i}").strip() for i in range(4)]
    assert ok(url, "ipam", "release", "--handle", "h2") == f"released {got[2]} (handle h2)\n"
    shown = ok(url, "ipam", "show", "--ip", got[2])
    assert shown.startswith(f"{got[2]} is cooling down since its release at "), shown
    (usage,) = json.loads(ok(url, "ipam", "show", "-o", "json"))["pools"]
    assert (usage["inUse"], usage["cooling"], usage["free"]) == (4, 1, 0), usage
    assert_user_error(
        url, "ipam", "assign", "--node", "n1", "--handle", "h5", expect="no free addresses"
    )
    ok(url, "apply", "-f", "-", stdin=cfg.replace("600", "0"))  # the cooldown is over
    assert ok(url, "ipam", "assign", "--node", "n1", "--handle", "h5").strip() == got[2]


def test_ipam_configure_shows_changes_and_refuses_bad_values(url: str) -> None:
    shown = ok(url, "ipam", "configure")
    assert "strictAffinity: false" in shown and "ipCooldownSeconds: 0" in shown
    out = ok(url, "ipam", "configure", "--ip-cooldown-seconds", "60", "--strictaffinity", "true")
    assert out.startswith("ipamconfig/default created\n"), out
    assert "strictAffinity: true" in out and "ipCooldownSeconds: 60" in out
    assert ok(url, "ipam", "configure", "--ip-cooldown-seconds", "60").startswith(
        "ipamconfig/default unchanged"
    )
    assert_user_error(
        url, "ipam", "configure", "--ip-cooldown-seconds", "5000",
        expect="spec.ipCooldownSeconds: 5000 is outside 0..1200",
    )  # fmt: skip
    assert_user_error(
        url, "ipam", "configure", "--strictaffinity", "yes", expect="expected true or false"
    )
    assert_user_error(
        url, "ipam", "configure", "--max-blocks-per-host", "-1", expect="must not be negative"
    )
    doc = json.loads(ok(url, "get", "ipamconfig", "default", "-o", "json"))
    assert doc["spec"]["ipCooldownSeconds"] == 60 and doc["spec"]["strictAffinity"] is True


OVERLAYCTL = Path(sys.executable).parent / "overlayctl"


@pytest.mark.skipif(not OVERLAYCTL.exists(), reason="console script not installed in the venv")
def test_parallel_assign_processes_give_distinct_addresses_from_own_blocks(url: str) -> None:
    ok(url, "apply", "-f", "-", stdin=CALICO_POOL)
    nodes, per_node = [f"node-{i}" for i in range(4)], 4
    env = {**os.environ, "OVERLAY_DATASTORE": url}
    procs = {
        (node, k): subprocess.Popen(
            [str(OVERLAYCTL), "ipam", "assign", "--node", node, "--handle", f"{node}-pod-{k}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for node in nodes
        for k in range(per_node)
    }
    got: dict[str, list[netaddr.IPAddress]] = {n: [] for n in nodes}
    try:
        for (node, _k), proc in procs.items():
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            got[node].append(netaddr.IPAddress(out.strip()))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    every = [ip for ips in got.values() for ip in ips]
    assert len(set(every)) == len(every) == len(nodes) * per_node

    show = json.loads(ok(url, "ipam", "show", "--show-blocks", "-o", "json"))
    blocks = [
        (netaddr.IPNetwork(b["cidr"]), b["affinity"], b["inUse"])
        for b in show["pools"][0]["blocks"]
    ]
    for node, ips in got.items():
        for ip in ips:  # each node's addresses come from blocks affine to that node
            assert [aff for cidr, aff, _ in blocks if ip in cidr] == [node]
    assert show["pools"][0]["inUse"] == len(every)
    by_node = {n["node"]: n for n in show["nodes"]}
    assert {n: (by_node[n]["inUse"], by_node[n]["borrowed"]) for n in nodes} == {
        n: (per_node, 0) for n in nodes
    }
    # The table agrees with the JSON.
    table = ok(url, "ipam", "show").split("\n\n")[1].splitlines()[1:]
    assert {row.split()[0]: int(row.split()[2]) for row in table} == {n: per_node for n in nodes}


# ---------------------------------------------------------------------------- leak check


def test_check_finds_leaks_and_release_from_report_frees_them(url: str, tmp_path: Path) -> None:
    ok(url, "apply", "-f", "-", stdin=CALICO_POOL + "---\n" + NODES)
    live = ok(url, "ipam", "assign", "--node", "n1", "--handle", "live-1").strip()
    orphan = ok(url, "ipam", "assign", "--node", "n1", "--handle", "gone-1").strip()
    dead = ok(url, "ipam", "assign", "--node", "n2", "--handle", "n2-pod").strip()
    ok(url, "delete", "node", "n2")
    handles = tmp_path / "live.txt"
    handles.write_text("# handles of running pods\nlive-1\nn2-pod\n")
    report = tmp_path / "report.json"
    out = ok(url, "ipam", "check", "--live-handles", str(handles), "-o", str(report))
    assert "leaked: 2" in out and "affinities of deleted nodes: 1" in out
    data = json.loads(report.read_text())
    leaks = {a["ip"]: a for a in data["leakedAddresses"]}
    assert set(leaks) == {orphan, dead}
    assert (leaks[dead]["reason"], leaks[dead]["node"]) == ("node-deleted", "n2")
    assert (leaks[orphan]["reason"], leaks[orphan]["handle"]) == ("handle-not-live", "gone-1")
    assert all(isinstance(a["sequenceNumber"], int) for a in leaks.values())
    assert [a["node"] for a in data["staleAffinities"]] == ["n2"]
    assert data["problems"] == []
    assert data["revision"] == dump(url)[1]

    out = ok(url, "ipam", "release", "--from-report", str(report))
    assert f"released {orphan}" in out and f"released {dead}" in out
    assert "released affinity of deleted node n2" in out
    after = json.loads(ok(url, "ipam", "check", "--live-handles", str(handles), "-o", "-"))
    assert (after["allocations"], after["leakedAddresses"], after["staleAffinities"]) == (1, [], [])
    assert "live-1" in ok(url, "ipam", "show", "--ip", live)
    # Acting on the same report again: its blocks changed since, so it is stale.
    assert_user_error(url, "ipam", "release", "--from-report", str(report), expect="stale")


def test_stale_or_foreign_report_is_refused(url: str, tmp_path: Path) -> None:
    ok(url, "apply", "-f", "-", stdin=CALICO_POOL + "---\n" + NODES)
    leak = ok(url, "ipam", "assign", "--node", "n1", "--handle", "gone").strip()
    handles = tmp_path / "live.json"
    handles.write_text("[]")
    report = tmp_path / "r.json"
    ok(url, "ipam", "check", "--live-handles", str(handles), "-o", str(report))

    foreign = tmp_path / "foreign.json"
    doc = json.loads(report.read_text())
    foreign.write_text(json.dumps({**doc, "clusterGUID": "0" * 32}))
    assert_user_error(
        url, "ipam", "release", "--from-report", str(foreign), expect="from cluster 00000000"
    )

    # A new pod lands in the same block after the report: the report no longer describes it.
    ok(url, "ipam", "assign", "--node", "n1", "--handle", "new-pod")
    assert_user_error(url, "ipam", "release", "--from-report", str(report), expect="stale")
    assert "gone" in ok(url, "ipam", "show", "--ip", leak)

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert_user_error(url, "ipam", "release", "--from-report", str(bad), expect="not JSON")


@pytest.mark.parametrize(
    ("target", "patch", "result"),
    [  # from RFC 7386's examples
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
def test_merge_patch_follows_rfc_7386(target: Any, patch: Any, result: Any) -> None:
    from overlay.cli_resources import merge_patch

    before = copy.deepcopy(target)
    assert merge_patch(target, patch) == result
    assert target == before
