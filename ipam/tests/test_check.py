"""The leak checker over real allocator state (MemoryDatastore): what counts as a leak,
the report's JSON, and the refusals of release_report."""

from __future__ import annotations

import json

import netaddr
import pytest

from ipam.allocator import IPAM
from ipam.check import (
    HANDLE_NOT_LIVE,
    NODE_DELETED,
    LeakReport,
    ReportError,
    find_leaks,
    release_report,
    staleness,
)
from ipam.datastore.memory import MemoryDatastore
from ipam.model import IPAMConfig
from ipam.records import HandleRecord, block_key, handle_key
from ipam.tests.fake_resources import FakeResources, pool

GUID = "c0ffee"


def make() -> tuple[IPAM, MemoryDatastore]:
    ds = MemoryDatastore()
    return IPAM(ds, FakeResources([pool("10.0.0.0/24", 29)], IPAMConfig())), ds


def assign(ipam: IPAM, handle: str, node: str, **attrs: str) -> str:
    res = ipam.auto_assign(handle, node, attrs={"node": node, **attrs})
    return str(res.ipv4[0].ip)


def test_allocations_of_deleted_nodes_and_dead_handles_are_leaks() -> None:
    ipam, _ = make()
    keep = assign(ipam, "pod-a", "n1")
    dead_handle = assign(ipam, "pod-b", "n1")
    dead_node = assign(ipam, "pod-c", "n2")
    report = find_leaks(ipam.snapshot(), ["n1"], {"pod-a", "pod-c"}, GUID)
    leaks = {a.ip: a for a in report.leaked}
    assert set(leaks) == {dead_handle, dead_node}
    assert leaks[dead_node].reason == NODE_DELETED and leaks[dead_node].node == "n2"
    assert leaks[dead_handle].reason == HANDLE_NOT_LIVE
    assert leaks[dead_handle].handle == "pod-b"
    assert netaddr.IPAddress(keep) not in netaddr.IPNetwork(leaks[dead_node].block)
    assert report.allocations == 3
    assert [(a.node, a.state) for a in report.stale_affinities] == [("n2", "confirmed")]
    assert report.problems == []
    # The sequence number is the allocation's own, as release() will demand it.
    alloc = ipam.get_attributes(dead_handle)
    assert alloc is not None and leaks[dead_handle].sequence_number == alloc.sequence_number


def test_without_a_live_list_only_deleted_nodes_count() -> None:
    ipam, _ = make()
    assign(ipam, "pod-a", "n1")
    assert find_leaks(ipam.snapshot(), ["n1"], None, GUID).leaked == []


def test_tunnel_addresses_are_judged_by_their_node_only() -> None:
    ipam, _ = make()
    assign(ipam, "vxlan-tunnel-addr-n1", "n1", type="vxlanTunnelAddress")
    assert find_leaks(ipam.snapshot(), ["n1"], set(), GUID).leaked == []
    assert len(find_leaks(ipam.snapshot(), [], set(), GUID).leaked) == 1


def test_a_partly_live_handle_is_a_problem_not_a_leak() -> None:
    ipam, _ = make()
    ipam.auto_assign("multi", "n1", num4=1, attrs={"node": "n1"})
    ipam.auto_assign("multi", "n2", num4=1, attrs={"node": "n2"})  # same handle, gone node
    report = find_leaks(ipam.snapshot(), ["n1"], None, GUID)
    assert report.leaked == []
    assert any("handle multi is partly leaked" in p for p in report.problems)


def test_inconsistent_books_are_reported() -> None:
    ipam, ds = make()
    assign(ipam, "pod-a", "n1")
    ds.create(handle_key("ghost"), HandleRecord("ghost", {"10.0.0.200/29": 1}).to_json())
    kv = ds.get(handle_key("pod-a"))
    assert kv is not None
    rec = HandleRecord.from_json(kv.value)
    rec.blocks = {c: n + 1 for c, n in rec.blocks.items()}
    ds.update(kv.key, rec.to_json(), kv.mod_revision)
    problems = find_leaks(ipam.snapshot(), ["n1"], None, GUID).problems
    assert any("handle ghost references block 10.0.0.200/29" in p for p in problems)
    assert any("handle pod-a counts 2" in p for p in problems)


def test_report_json_round_trips_and_rejects_junk() -> None:
    ipam, _ = make()
    assign(ipam, "pod-b", "n2")
    report = find_leaks(ipam.snapshot(), [], None, GUID, now="2024-01-01T00:00:00+00:00")
    text = report.to_json()
    raw = json.loads(text)
    assert raw["clusterGUID"] == GUID and raw["revision"] == report.revision
    assert set(raw["leakedAddresses"][0]) >= {"ip", "block", "handle", "sequenceNumber"}
    assert LeakReport.from_json(text) == report
    with pytest.raises(ReportError, match="not an IPAM check report"):
        LeakReport.from_json('{"kind": "Other"}')
    with pytest.raises(ReportError, match="malformed report"):
        LeakReport.from_json(json.dumps({**raw, "leakedAddresses": [{"ip": "x"}]}))


def test_release_report_frees_leaks_and_affinities_of_deleted_nodes() -> None:
    ipam, ds = make()
    live = assign(ipam, "pod-a", "n1")
    assign(ipam, "pod-c", "n2")
    report = find_leaks(ipam.snapshot(), ["n1"], None, GUID)
    summary = release_report(ipam, ds, report, GUID)
    assert summary.released == [report.leaked[0].ip]
    assert [node for node, _ in summary.affinities] == ["n2"]
    assert ipam.affine_blocks("n2") == []
    after = ipam.snapshot()
    assert find_leaks(after, ["n1"], None, GUID).leaked == []
    assert ipam.ips_by_handle("pod-a") == [netaddr.IPAddress(live)]
    assert ipam.check_consistency() == []


def test_release_report_refuses_other_clusters_and_stale_reports() -> None:
    ipam, ds = make()
    leak = assign(ipam, "pod-c", "n2")
    report = find_leaks(ipam.snapshot(), [], None, GUID)
    with pytest.raises(ReportError, match="from cluster c0ffee"):
        release_report(ipam, ds, report, "another")
    # The address is released and re-used by a new pod after the report was taken.
    ipam.release_by_handle("pod-c")
    ipam.assign_ip(leak, "pod-new", "n2", {"node": "n2"})
    before = ds.revision()
    with pytest.raises(ReportError, match="stale"):
        release_report(ipam, ds, report, GUID)
    assert ds.revision() == before
    assert ipam.ips_by_handle("pod-new") == [netaddr.IPAddress(leak)]


def test_staleness_is_pure_over_key_revisions() -> None:
    report = LeakReport(GUID, revision=10, created_at="", allocations=0)
    key = block_key("10.0.0.0/29")
    assert staleness(report, GUID, {key: 10}) is None
    assert "changed at revision 11" in (staleness(report, GUID, {key: 11}) or "")
    assert "is gone" in (staleness(report, GUID, {key: None}) or "")
