from __future__ import annotations

import copy
from typing import Any

import netaddr
import pytest
import yaml

from ipam.model import EncapMode, FelixConfiguration, IPAMConfig, IPPool, IPReservation, Node
from ipam.resources import (
    API_VERSION,
    Resource,
    ResourceError,
    from_manifest,
    parse_documents,
    resolve_kind,
    to_manifest,
)

# The shape of the IPPool example in Calico's reference docs, applied as written.
CALICO_POOL = """\
apiVersion: projectcalico.org/v3
kind: IPPool
metadata:
  name: my.ippool-1
spec:
  cidr: 10.1.0.0/16
  blockSize: 24
  ipipMode: CrossSubnet
  vxlanMode: Never
  natOutgoing: true
  disabled: false
  nodeSelector: all()
  allowedUses:
    - Workload
    - Tunnel
"""

# What `calicoctl get node -o yaml` prints for a node (server-set metadata included).
CALICO_NODE = """\
apiVersion: projectcalico.org/v3
kind: Node
metadata:
  creationTimestamp: "2024-03-01T10:00:00Z"
  labels:
    kubernetes.io/hostname: node-1
    zone: a
  name: node-1
  resourceVersion: "1234"
  uid: 0c6a5b1e-4f8a-4a67-9d8e-0a1b2c3d4e5f
spec:
  addresses:
  - address: 10.0.1.5/24
    type: CalicoNodeIP
  - address: 10.0.1.5
    type: InternalIP
  bgp:
    ipv4Address: 10.0.1.5/24
    ipv4IPIPTunnelAddr: 10.244.7.0
  ipv4VXLANTunnelAddr: 10.244.7.1
  orchRefs:
  - nodeName: node-1
    orchestrator: k8s
  vxlanTunnelMACAddr: 66:0A:1B:2C:3D:4E
"""


def pool_doc(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"cidr": "10.244.0.0/16"}
    base.update(spec)
    return {
        "apiVersion": API_VERSION,
        "kind": "IPPool",
        "metadata": {"name": "p1"},
        "spec": {k: v for k, v in base.items() if v is not None},
    }


def refused(doc: Any, *fragments: str) -> str:
    with pytest.raises(ResourceError) as exc:
        from_manifest(doc)
    msg = str(exc.value)
    for fragment in fragments:
        assert fragment in msg
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------ IPPool


def test_calico_pool_manifest_applies_unchanged() -> None:
    [pool] = parse_documents(CALICO_POOL)
    assert pool == IPPool(
        name="my.ippool-1",
        cidr=netaddr.IPNetwork("10.1.0.0/16"),
        block_size=24,
        vxlan_mode=EncapMode.NEVER,
        ipip_mode=EncapMode.CROSS_SUBNET,
        nat_outgoing=True,
        disabled=False,
        node_selector="all()",
    )


def test_pool_defaults() -> None:
    v4 = from_manifest(pool_doc())
    assert isinstance(v4, IPPool)
    assert (v4.block_size, v4.vxlan_mode, v4.ipip_mode) == (26, EncapMode.NEVER, EncapMode.NEVER)
    assert (v4.nat_outgoing, v4.disabled, v4.node_selector) == (False, False, "all()")
    v6 = from_manifest(pool_doc(cidr="fd00:10:244::/48"))
    assert isinstance(v6, IPPool)
    assert v6.block_size == 122 and v6.version == 6


def test_pool_uses_and_assignment_mode_are_read_and_written_back() -> None:
    tunnel = from_manifest(pool_doc(allowedUses=["Tunnel"], assignmentMode="Manual"))
    assert isinstance(tunnel, IPPool)
    assert tunnel.allowed_uses == {"Tunnel"} and tunnel.assignment_mode == "Manual"
    assert not tunnel.automatic_for("Tunnel")  # Manual: only when a request names it
    spec = to_manifest(tunnel)["spec"]
    assert (spec["allowedUses"], spec["assignmentMode"]) == (["Tunnel"], "Manual")
    assert from_manifest(to_manifest(tunnel)) == tunnel
    both = from_manifest(pool_doc())
    assert isinstance(both, IPPool) and both.automatic_for("Workload")
    assert to_manifest(both)["spec"]["allowedUses"] == ["Workload", "Tunnel"]


def test_pool_accepts_harmless_calico_fields() -> None:
    pool = from_manifest(
        pool_doc(
            allowedUses=[],
            disableBGPExport=True,
            assignmentMode="Automatic",
            namespaceSelector="",
            nodeSelector="  ",
        )
    )
    assert isinstance(pool, IPPool) and pool.node_selector == "all()"


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ({"cidr": "10.244.0.1/16"}, ["spec.cidr", "10.244.0.1/16", "host bits", "10.244.0.0/16"]),
        ({"cidr": "10.244.0.0"}, ["spec.cidr", "'10.244.0.0'", "not a CIDR"]),
        ({"cidr": "10.300.0.0/16"}, ["spec.cidr", "'10.300.0.0/16'", "not a valid CIDR"]),
        ({"cidr": None}, ["spec.cidr: missing"]),
        ({"cidr": 10}, ["spec.cidr", "expected a string, got number 10"]),
        ({"cidr": "169.254.0.0/24"}, ["spec.cidr", "169.254.0.0/24", "link-local"]),
        ({"cidr": "128.0.0.0/1"}, ["spec.cidr", "128.0.0.0/1", "169.254.0.0/16"]),
        ({"cidr": "fe80::/64"}, ["spec.cidr", "fe80::/64", "fe80::/10"]),
        ({"blockSize": 33}, ['IPPool "p1": spec.blockSize: 33 is out of range 20-32 for an IPv4']),
        ({"blockSize": 19}, ["spec.blockSize: 19 is out of range 20-32"]),
        (
            {"cidr": "fd00::/48", "blockSize": 112},
            ["spec.blockSize: 112 is out of range 116-128 for an IPv6 pool"],
        ),
        ({"cidr": "10.244.0.0/24", "blockSize": 22}, ["spec.blockSize: 22", "10.244.0.0/24"]),
        ({"blockSize": "26"}, ["spec.blockSize", "expected an integer, got string '26'"]),
        ({"blockSize": True}, ["spec.blockSize", "got boolean true"]),
        (
            {"vxlanMode": "Always", "ipipMode": "CrossSubnet"},
            ["ipipMode CrossSubnet", "vxlanMode Always"],
        ),
        ({"cidr": "fd00::/48", "ipipMode": "Always"}, ["spec.ipipMode", "Always", "IPv4 only"]),
        ({"vxlanMode": "always"}, ["spec.vxlanMode", "'always'", "Always, CrossSubnet"]),
        ({"natOutgoing": "true"}, ["spec.natOutgoing", "expected true or false", "'true'"]),
        ({"disabled": 1}, ["spec.disabled", "got number 1"]),
        ({"nodeSelector": "zone = 'a'"}, ["spec.nodeSelector", "zone = 'a'", "position 5"]),
        ({"nodeSelector": ["a"]}, ["spec.nodeSelector", "expected a string"]),
        (
            {"allowedUses": ["LoadBalancer"]},
            ["spec.allowedUses", "'LoadBalancer'", "not supported"],
        ),
        ({"allowedUses": ["workload"]}, ["spec.allowedUses", "'workload'", "Workload or Tunnel"]),
        ({"allowedUses": "Workload"}, ["spec.allowedUses", "expected a list"]),
        ({"assignmentMode": "manual"}, ["spec.assignmentMode", "'manual'", "Automatic or Manual"]),
        ({"namespaceSelector": "ns == 'x'"}, ["spec.namespaceSelector", "ns == 'x'"]),
        ({"disableBGPExport": "no"}, ["spec.disableBGPExport", "'no'"]),
        ({"ipip": {"enabled": True}}, ["spec.ipip", "unknown field"]),
    ],
)
def test_pool_refusals_name_field_and_value(spec: dict[str, Any], fragments: list[str]) -> None:
    msg = refused(pool_doc(**spec), *fragments)
    assert msg.startswith('IPPool "p1": ')


def test_disabled_pool_may_have_blocks_larger_than_itself() -> None:
    # Calico's rule: blockSize >= prefix length is only enforced for enabled pools.
    pool = from_manifest(pool_doc(cidr="10.244.0.0/28", blockSize=26, disabled=True))
    assert isinstance(pool, IPPool) and pool.block_size == 26


def test_block_size_equal_to_pool_prefix_is_accepted() -> None:
    pool = from_manifest(pool_doc(cidr="10.244.0.0/26", blockSize=26))
    assert isinstance(pool, IPPool)


@pytest.mark.parametrize(
    ("mutate", "fragments"),
    [
        (lambda d: d.pop("apiVersion"), ["apiVersion", "null", "overlay.dev/v1"]),
        (lambda d: d.update(apiVersion="v1"), ["apiVersion", "'v1'"]),
        (lambda d: d.update(kind="Pool2"), ["kind", "'Pool2'"]),
        (lambda d: d.pop("kind"), ["kind: missing"]),
        (lambda d: d.update(extra=1), ["extra", "unknown field"]),
        (lambda d: d["metadata"].pop("name"), ["metadata.name: missing"]),
        (lambda d: d["metadata"].update(name="P_1"), ["metadata.name", "'P_1'", "not a valid"]),
        (lambda d: d["metadata"].update(name="-p"), ["metadata.name", "'-p'"]),
        (lambda d: d["metadata"].update(name=5), ["metadata.name", "number 5"]),
        (lambda d: d["metadata"].update(owner="x"), ["metadata.owner", "unknown field"]),
        (lambda d: d["metadata"].update(namespace="kube-system"), ["cluster-scoped"]),
        (lambda d: d.update(spec=["x"]), ["spec", "expected a mapping"]),
    ],
)
def test_document_level_refusals(mutate: Any, fragments: list[str]) -> None:
    doc = pool_doc()
    mutate(doc)
    refused(doc, *fragments)


def test_refuses_non_mapping_document() -> None:
    with pytest.raises(ResourceError, match="must be a mapping"):
        parse_documents("- a\n- b\n")


# ------------------------------------------------------------------ IPAMConfig


def ipam_doc(kind: str = "IPAMConfiguration", name: str = "default", **spec: Any) -> dict:
    return {
        "apiVersion": "projectcalico.org/v3",
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    }


def test_ipam_config_calico_kind_and_fields() -> None:
    cfg = from_manifest(ipam_doc(strictAffinity=True, maxBlocksPerHost=4, autoAllocateBlocks=False))
    assert cfg == IPAMConfig(
        strict_affinity=True, max_blocks_per_host=4, auto_allocate_blocks=False
    )
    assert from_manifest(ipam_doc(kind="IPAMConfig")) == IPAMConfig()
    cooled = from_manifest(ipam_doc(ipCooldownSeconds=30))
    assert cooled == IPAMConfig(ip_cooldown_seconds=30)
    assert from_manifest(to_manifest(cooled)) == cooled


@pytest.mark.parametrize(
    ("doc", "fragments"),
    [
        (ipam_doc(name="other"), ["metadata.name", "'other'", "default"]),
        (ipam_doc(strictAffinity=False, autoAllocateBlocks=False), ["strictAffinity false"]),
        (ipam_doc(autoAllocateBlocks=False), ["autoAllocateBlocks false"]),
        (ipam_doc(maxBlocksPerHost=-1), ["spec.maxBlocksPerHost", "-1"]),
        (ipam_doc(maxBlocksPerHost="3"), ["spec.maxBlocksPerHost", "string '3'"]),
        (ipam_doc(strictAffinity="yes"), ["spec.strictAffinity", "'yes'"]),
        (ipam_doc(ipCooldownSeconds=1201), ["spec.ipCooldownSeconds", "1201", "0..1200"]),
        (ipam_doc(ipCooldownSeconds=-1), ["spec.ipCooldownSeconds", "-1"]),
        (ipam_doc(ipCooldownSeconds=True), ["spec.ipCooldownSeconds", "an integer"]),
        (ipam_doc(foo=1), ["spec.foo", "unknown field"]),
    ],
)
def test_ipam_config_refusals(doc: dict, fragments: list[str]) -> None:
    refused(doc, *fragments)


# ------------------------------------------------------------------ IPReservation


def test_reservation_cidrs_and_single_addresses() -> None:
    [res] = parse_documents(
        "apiVersion: projectcalico.org/v3\nkind: IPReservation\nmetadata: {name: r}\n"
        "spec:\n  reservedCIDRs: [10.244.0.0/30, 10.244.1.7, 'fd00::5']\n"
    )
    assert res == IPReservation(
        name="r",
        reserved_cidrs=tuple(
            netaddr.IPNetwork(c) for c in ("10.244.0.0/30", "10.244.1.7/32", "fd00::5/128")
        ),
    )


@pytest.mark.parametrize(
    ("cidrs", "fragments"),
    [
        (["10.0.0.1/24"], ["spec.reservedCIDRs[0]", "10.0.0.1/24", "host bits"]),
        (["10.0.0.0/24", "nope"], ["spec.reservedCIDRs[1]", "'nope'"]),
        ("10.0.0.0/24", ["spec.reservedCIDRs", "expected a list"]),
        ([5], ["spec.reservedCIDRs[0]", "number 5"]),
    ],
)
def test_reservation_refusals(cidrs: Any, fragments: list[str]) -> None:
    doc = {
        "apiVersion": API_VERSION,
        "kind": "IPReservation",
        "metadata": {"name": "r"},
        "spec": {"reservedCIDRs": cidrs},
    }
    refused(doc, *fragments)


# ------------------------------------------------------------------ Node


def test_calico_node_output_is_accepted() -> None:
    [node] = parse_documents(CALICO_NODE)
    assert node == Node(
        name="node-1",
        labels={"kubernetes.io/hostname": "node-1", "zone": "a"},
        ipv4_address=netaddr.IPNetwork("10.0.1.5/24"),
        ipv4_vxlan_tunnel_addr=netaddr.IPAddress("10.244.7.1"),
        ipv4_ipip_tunnel_addr=netaddr.IPAddress("10.244.7.0"),
        vxlan_tunnel_mac="66:0a:1b:2c:3d:4e",
    )
    assert isinstance(node, Node)
    # The prefix is the underlay subnet: it must survive (IPNetwork == ignores host bits).
    assert node.ipv4_address is not None and str(node.ipv4_address) == "10.0.1.5/24"


def test_node_bare_address_is_stored_as_host_prefix() -> None:
    node = from_manifest(
        {
            "apiVersion": API_VERSION,
            "kind": "Node",
            "metadata": {"name": "n"},
            "spec": {"bgp": {"ipv4Address": "10.0.1.5", "ipv6Address": "fd00::5/64"}},
        }
    )
    assert isinstance(node, Node)
    assert str(node.ipv4_address) == "10.0.1.5/32"
    assert str(node.ipv6_address) == "fd00::5/64"


def node_doc(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "Node", "metadata": {"name": "n1"}, "spec": spec}


@pytest.mark.parametrize(
    ("doc", "fragments"),
    [
        (node_doc(bgp={"ipv4Address": "fd00::1/64"}), ["spec.bgp.ipv4Address", "not an IPv4"]),
        (node_doc(bgp={"ipv4Address": "10.0.1/24"}), ["spec.bgp.ipv4Address", "'10.0.1/24'"]),
        (node_doc(bgp={"peerIP": "1.2.3.4"}), ["spec.bgp.peerIP", "unknown field"]),
        (node_doc(ipv4VXLANTunnelAddr="10.0.0.1/32"), ["spec.ipv4VXLANTunnelAddr", "10.0.0.1/32"]),
        (node_doc(ipv6VXLANTunnelAddr="10.0.0.1"), ["spec.ipv6VXLANTunnelAddr", "not an IPv6"]),
        (node_doc(vxlanTunnelMACAddr="66:00:11"), ["spec.vxlanTunnelMACAddr", "'66:00:11'"]),
        (node_doc(vxlanTunnelMACAddrV6=7), ["spec.vxlanTunnelMACAddrV6", "number 7"]),
        (node_doc(addresses="10.0.0.1"), ["spec.addresses", "expected a list"]),
        (node_doc(wireguard={}), ["spec.wireguard", "unknown field"]),
    ],
)
def test_node_refusals(doc: dict[str, Any], fragments: list[str]) -> None:
    msg = refused(doc, *fragments)
    assert msg.startswith('Node "n1": ')


@pytest.mark.parametrize(
    ("labels", "fragments"),
    [
        ({"zone": True}, ["metadata.labels.zone", "boolean true", "quote it"]),
        ({"zone": "a b"}, ["metadata.labels.zone", "'a b'", "label value"]),
        ({"bad key": "a"}, ["metadata.labels.bad key", "label key"]),
        (["zone"], ["metadata.labels", "expected a mapping"]),
    ],
)
def test_node_label_refusals(labels: Any, fragments: list[str]) -> None:
    doc = node_doc()
    doc["metadata"]["labels"] = labels
    refused(doc, *fragments)


# ------------------------------------------------------------------ documents and round trips


def test_multi_document_skips_empty_and_expands_lists() -> None:
    text = (
        CALICO_POOL
        + "---\n---\n"
        + yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "List",
                "items": [ipam_doc(strictAffinity=True), node_doc()],
            }
        )
        + "---\n"
        + yaml.safe_dump({"apiVersion": "projectcalico.org/v3", "kind": "IPPoolList", "items": []})
    )
    kinds = [type(r).__name__ for r in parse_documents(text)]
    assert kinds == ["IPPool", "IPAMConfig", "Node"]


def test_errors_in_multi_document_name_the_document() -> None:
    text = CALICO_POOL + "---\n" + yaml.safe_dump(pool_doc(blockSize=40))
    with pytest.raises(ResourceError, match=r"^document 2: IPPool \"p1\": spec.blockSize: 40"):
        parse_documents(text)


def test_invalid_yaml_and_duplicate_keys_are_refused_with_position() -> None:
    with pytest.raises(ResourceError, match="invalid YAML: line 2"):
        parse_documents("kind: IPPool\nspec: {cidr: [}\n")
    with pytest.raises(ResourceError, match="line 3, column 3: duplicate key 'cidr'"):
        parse_documents("spec:\n  cidr: 10.0.0.0/8\n  cidr: 10.1.0.0/16\n")


RESOURCES: list[Resource] = [
    IPPool(
        name="v4",
        cidr=netaddr.IPNetwork("10.244.0.0/16"),
        block_size=28,
        vxlan_mode=EncapMode.CROSS_SUBNET,
        nat_outgoing=True,
        node_selector="zone == 'a' && !has(edge)",
    ),
    IPPool(
        name="v6",
        cidr=netaddr.IPNetwork("fd00:10::/64"),
        block_size=122,
        vxlan_mode=EncapMode.ALWAYS,
        disabled=True,
    ),
    IPPool(
        name="ipip",
        cidr=netaddr.IPNetwork("10.8.0.0/16"),
        block_size=26,
        ipip_mode=EncapMode.ALWAYS,
    ),
    IPAMConfig(strict_affinity=True, max_blocks_per_host=3, auto_allocate_blocks=False),
    IPReservation(name="r", reserved_cidrs=(netaddr.IPNetwork("10.244.0.0/30"),)),
    Node(name="bare"),
    Node(
        name="full",
        labels={"zone": "a", "example.com/role": "edge"},
        ipv4_address=netaddr.IPNetwork("10.0.1.5/24"),
        ipv6_address=netaddr.IPNetwork("fd00::5/64"),
        ipv4_vxlan_tunnel_addr=netaddr.IPAddress("10.244.0.1"),
        ipv6_vxlan_tunnel_addr=netaddr.IPAddress("fd00:10::1"),
        ipv4_ipip_tunnel_addr=netaddr.IPAddress("10.8.0.1"),
        vxlan_tunnel_mac="66:01:02:03:04:05",
        ipv6_vxlan_tunnel_mac="66:01:02:03:04:06",
    ),
]


@pytest.mark.parametrize("res", RESOURCES, ids=lambda r: type(r).__name__)
def test_round_trip(res: Any) -> None:
    manifest = to_manifest(res)
    assert manifest["apiVersion"] == API_VERSION
    back = from_manifest(copy.deepcopy(manifest))
    assert back == res
    # Compare the text too: IPNetwork equality ignores host bits (10.0.1.5/24 == 10.0.1.9/24).
    assert to_manifest(back) == manifest
    # and through YAML text, as overlayctl get -o yaml would print it
    assert parse_documents(yaml.safe_dump(manifest)) == [res]


def test_manifest_uses_calico_field_names() -> None:
    manifest = to_manifest(RESOURCES[0])
    assert manifest["spec"] == {
        "cidr": "10.244.0.0/16",
        "blockSize": 28,
        "ipipMode": "Never",
        "vxlanMode": "CrossSubnet",
        "natOutgoing": True,
        "disabled": False,
        "nodeSelector": "zone == 'a' && !has(edge)",
        "allowedUses": ["Workload", "Tunnel"],
        "assignmentMode": "Automatic",
    }
    node = to_manifest(RESOURCES[-1])
    assert node["spec"]["bgp"] == {
        "ipv4Address": "10.0.1.5/24",
        "ipv6Address": "fd00::5/64",
        "ipv4IPIPTunnelAddr": "10.8.0.1",
    }
    assert node["metadata"]["labels"] == {"zone": "a", "example.com/role": "edge"}


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("ippool", "IPPool"),
        ("ippools", "IPPool"),
        ("IPPool", "IPPool"),
        ("node", "Node"),
        ("Nodes", "Node"),
        ("ipamconfig", "IPAMConfig"),
        ("IPAMConfiguration", "IPAMConfig"),
        ("ipreservations", "IPReservation"),
    ],
)
def test_resolve_kind(text: str, kind: str) -> None:
    assert resolve_kind(text) == kind


def test_resolve_kind_unknown() -> None:
    with pytest.raises(ResourceError, match="unknown resource kind 'widget'"):
        resolve_kind("widget")


# ---------------------------------------------------------------------------- FelixConfiguration

CALICO_FELIX = """\
apiVersion: projectcalico.org/v3
kind: FelixConfiguration
metadata:
  name: default
  resourceVersion: "77"
spec:
  bpfEnabled: false
  bpfLogLevel: ""
  floatingIPs: Disabled
  logSeverityScreen: Info
  reportingInterval: 0s
  vxlanEnabled: true
  vxlanVNI: 4097
  vxlanPort: 8472
  vxlanMTU: 1410
  ipipMTU: 0
  routeRefreshInterval: 1m30s
  externalNodesList: [192.0.2.7, 198.51.100.0/24]
  featureDetectOverride: ChecksumOffloadBroken=true
  natOutgoingAddress: 192.0.2.77
"""


def felix_doc(name: str = "default", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "projectcalico.org/v3",
        "kind": "FelixConfiguration",
        "metadata": {"name": name},
        "spec": spec,
    }


def test_calico_felix_configuration_applies_unchanged_and_round_trips() -> None:
    [felix] = parse_documents(CALICO_FELIX)
    assert felix == FelixConfiguration(
        name="default",
        vxlan_vni=4097,
        vxlan_port=8472,
        vxlan_mtu=1410,
        ipip_mtu=0,  # set: "derive it", overriding a cluster value for a node
        route_refresh_interval=90.0,
        external_nodes_list=(
            netaddr.IPNetwork("192.0.2.7/32"),
            netaddr.IPNetwork("198.51.100.0/24"),
        ),
        checksum_offload_broken=True,
        log_severity_screen="Info",
        nat_outgoing_address=netaddr.IPAddress("192.0.2.77"),
    )
    manifest = to_manifest(felix)
    assert manifest["spec"]["routeRefreshInterval"] == "90s"
    assert from_manifest(manifest) == felix
    assert resolve_kind("felixconfig") == "FelixConfiguration"


def test_an_empty_node_felix_configuration_sets_nothing() -> None:
    felix = from_manifest(felix_doc("node.worker-1"))
    assert felix == FelixConfiguration(name="node.worker-1")
    assert to_manifest(felix)["spec"] == {}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0.0), ("90s", 90.0), ("1m30s", 90.0), ("1h", 3600.0), ("500ms", 0.5), ("1.5s", 1.5)],
)
def test_route_refresh_interval_reads_go_durations(text: str, seconds: float) -> None:
    felix = from_manifest(felix_doc(routeRefreshInterval=text))
    assert isinstance(felix, FelixConfiguration)
    assert felix.route_refresh_interval == seconds


@pytest.mark.parametrize(
    ("name", "spec", "fragments"),
    [
        ("custom", {}, ["metadata.name", "'custom'", "'default'", "'node.<node name>'"]),
        ("default", {"vxlanVNI": 0}, ["spec.vxlanVNI", "0 is outside 1..16777215"]),
        ("default", {"vxlanVNI": 2**24}, ["spec.vxlanVNI", "16777216 is outside"]),
        ("default", {"vxlanPort": 70000}, ["spec.vxlanPort", "70000 is outside 1..65535"]),
        ("default", {"vxlanPort": "8472"}, ["spec.vxlanPort", "expected an integer"]),
        ("default", {"vxlanMTU": 60}, ["spec.vxlanMTU", "60 is below the minimum 68"]),
        ("default", {"ipipMTU": -1}, ["spec.ipipMTU", "-1 is outside 0..65535"]),
        ("default", {"routeRefreshInterval": 90}, ["spec.routeRefreshInterval", "a string"]),
        ("default", {"routeRefreshInterval": "90"}, ["spec.routeRefreshInterval", "'90'"]),
        ("default", {"routeRefreshInterval": "-1s"}, ["spec.routeRefreshInterval", "'-1s'"]),
        ("default", {"externalNodesList": "1.2.3.4"}, ["spec.externalNodesList", "a list"]),
        ("default", {"externalNodesList": ["10.0.0.5/24"]}, ["[0]", "host bits"]),
        ("default", {"externalNodesList": ["x"]}, ["[0]", "'x'", "not a valid IP address"]),
        ("default", {"externalNodesList": ["fd00::1/64"]}, ["[0]", "host bits"]),
        ("default", {"featureDetectOverride": "SNATFullyRandom=true"}, ["'SNATFullyRandom'"]),
        ("default", {"featureDetectOverride": "ChecksumOffloadBroken=yes"}, ["=yes'"]),
        ("default", {"logSeverityScreen": "Loud"}, ["spec.logSeverityScreen", "'Loud'"]),
        ("default", {"vxlanEnabled": False}, ["spec.vxlanEnabled", "follow the pools"]),
        ("default", {"vxlanMTUV6": 1200000}, ["spec.vxlanMTUV6", "1200000 is outside"]),
        ("default", {"bpfEnabled": True}, ["spec.bpfEnabled", "not supported"]),
        ("default", {"wireguardEnabled": True}, ["spec.wireguardEnabled", "unknown field"]),
        ("default", {"natOutgoingAddress": "fd00::1"}, ["spec.natOutgoingAddress", "fd00::1"]),
        ("default", {"natOutgoingAddress": "10.0.0.0/8"}, ["spec.natOutgoingAddress"]),
    ],
)
def test_felix_refusals_name_field_and_value(
    name: str, spec: dict[str, Any], fragments: list[str]
) -> None:
    msg = refused(felix_doc(name, **spec), *fragments)
    assert msg.startswith(f'FelixConfiguration "{name}": ')
