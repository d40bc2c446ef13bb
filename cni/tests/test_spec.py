"""CNI spec 1.1.0 validation: what the runtime hands us and what we hand back."""

from __future__ import annotations

import json

import pytest

from cni import spec
from cni.spec import CniError

NETNS = "/var/run/netns/pod1"


def conf(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "cniVersion": "1.1.0",
        "name": "k8s-pod-network",
        "type": "overlay-cni",
        "ipam": {"type": "overlay-ipam"},
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def env(**over: str | None) -> dict[str, str]:
    base: dict[str, str | None] = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c0ffee01",
        "CNI_NETNS": NETNS,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
        "CNI_PATH": "/opt/cni/bin",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def fails(fn: object, *args: object, code: int, contains: str) -> CniError:
    with pytest.raises(CniError) as info:
        fn(*args)  # type: ignore[operator]
    assert info.value.code == code, info.value
    assert contains in info.value.msg + info.value.details, info.value
    return info.value


# --------------------------------------------------------------------------- versions


def test_version_info_lists_every_supported_version() -> None:
    assert spec.version_info() == {
        "cniVersion": "1.1.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
    }


@pytest.mark.parametrize("version", spec.SUPPORTED_VERSIONS)
def test_every_supported_version_parses(version: str) -> None:
    assert spec.parse_cni_config(conf(cniVersion=version)).cni_version == version


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "1.2.0", "2.0.0", "latest"])
def test_unsupported_version_is_code_1_and_lists_supported(version: str) -> None:
    err = fails(spec.parse_cni_config, conf(cniVersion=version), code=1, contains=repr(version))
    assert "1.1.0" in err.details


@pytest.mark.parametrize(
    ("verb", "version"), [("CHECK", "0.3.1"), ("STATUS", "1.0.0"), ("GC", "0.4.0")]
)
def test_verbs_newer_than_config_version_are_code_1(verb: str, version: str) -> None:
    fails(spec.parse_cni_config, conf(cniVersion=version), verb, code=1, contains=verb)


# --------------------------------------------------------------------------- config


def test_full_config_is_read() -> None:
    c = spec.parse_cni_config(
        conf(
            mtu=1410,
            agentSocket="/run/x/cni.sock",
            timeoutSeconds=5,
            ipam={"type": "overlay-ipam", "assignIPv6": True, "ipv4Pools": ["default-ipv4"]},
            runtimeConfig={"ips": ["10.65.0.9/26"], "mac": "0A:58:0a:41:00:09", "portMappings": []},
            dns={"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]},
            prevResult={"cniVersion": "1.1.0", "ips": [{"address": "10.65.0.9/32"}]},
        )
    )
    assert (c.mtu, c.agent_socket, c.timeout_s) == (1410, "/run/x/cni.sock", 5.0)
    assert c.ipam.assign_ipv4 and c.ipam.assign_ipv6 and c.ipam.ipv4_pools == ("default-ipv4",)
    assert c.requested_ips == ("10.65.0.9/26",) and c.requested_mac == "0a:58:0a:41:00:09"
    assert c.dns["nameservers"] == ["10.96.0.10"]
    assert spec.result_addresses(c.prev_result) == ["10.65.0.9/32"]


def test_defaults() -> None:
    c = spec.parse_cni_config(conf(ipam=None))
    assert c.agent_socket == spec.DEFAULT_SOCKET == "/var/run/overlay/cni.sock"
    assert c.mtu == 0 and c.ipam.type == "overlay-ipam" and c.ipam.assign_ipv4
    assert not c.ipam.assign_ipv6 and c.valid_attachments is None


def test_args_cni_ips_used_unless_runtime_config_has_them() -> None:
    c = spec.parse_cni_config(conf(args={"cni": {"ips": ["10.65.0.7"]}, "other": 1}))
    assert c.requested_ips == ("10.65.0.7",)
    c = spec.parse_cni_config(
        conf(args={"cni": {"ips": ["10.65.0.7"]}}, runtimeConfig={"ips": ["10.65.0.8"]})
    )
    assert c.requested_ips == ("10.65.0.8",)


def test_malformed_json_is_code_6() -> None:
    fails(spec.parse_cni_config, b'{"cniVersion": "1.1.0",', code=6, contains="JSON")
    fails(spec.parse_cni_config, b"\xff\xfe", code=6, contains="JSON")
    fails(spec.parse_cni_config, b"[1, 2]", code=6, contains="got list")


@pytest.mark.parametrize("field", ["cniVersion", "name"])
def test_missing_required_field_is_code_7_naming_it(field: str) -> None:
    fails(spec.parse_cni_config, conf(**{field: None}), code=7, contains=field)


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"ipMasq": True}, "ipMasq=true"),
        ({"bridge": "cni0"}, 'bridge="cni0"'),
        ({"ipam": {"type": "overlay-ipam", "subnet": "10.0.0.0/8"}}, "ipam.subnet"),
        ({"ipam": {"type": "host-local"}}, "ipam.type='host-local'"),
        ({"dns": {"servers": []}}, "dns.servers"),
    ],
)
def test_unknown_field_in_our_section_is_code_2_naming_it(
    over: dict[str, object], field: str
) -> None:
    fails(spec.parse_cni_config, conf(**over), code=2, contains=field)


def test_reserved_and_runtime_keys_are_accepted() -> None:
    c = spec.parse_cni_config(
        conf(**{"capabilities": {"ips": True}, "cni.dev/future": 1, "cniVersions": ["1.0.0"]})
    )
    assert c.name == "k8s-pod-network"


@pytest.mark.parametrize(
    ("over", "contains"),
    [
        ({"cniVersion": 1.1}, "cniVersion=1.1"),
        ({"name": "-bad"}, 'name="-bad"'),
        ({"name": 7}, "name=7"),
        ({"type": "../x"}, 'type="../x"'),
        ({"mtu": "1500"}, 'mtu="1500"'),
        ({"mtu": True}, "mtu=true"),
        ({"mtu": 100}, "mtu=100"),
        ({"agentSocket": "relative.sock"}, "agentSocket"),
        ({"timeoutSeconds": 0}, "timeoutSeconds=0"),
        ({"ipam": "overlay-ipam"}, "ipam"),
        ({"ipam": {"type": "overlay-ipam", "assignIPv4": "true"}}, 'ipam.assignIPv4="true"'),
        ({"ipam": {"type": "overlay-ipam", "ipv4Pools": "p"}}, "ipam.ipv4Pools"),
        ({"ipam": {"type": "overlay-ipam", "assignIPv4": False}}, "nothing to assign"),
        ({"runtimeConfig": []}, "runtimeConfig"),
        ({"runtimeConfig": {"ips": ["10.0.0.300"]}}, "runtimeConfig.ips[0]"),
        ({"runtimeConfig": {"ips": ["10.0.0.1", "10.0.0.2"]}}, "one address per family"),
        ({"runtimeConfig": {"mac": "zz:00:00:00:00:00"}}, "runtimeConfig.mac"),
        ({"runtimeConfig": {"mac": "01:00:5e:00:00:01"}}, "multicast"),
        ({"prevResult": "x"}, "prevResult"),
        ({"dns": {"nameservers": "8.8.8.8"}}, "dns.nameservers"),
        ({"cni.dev/valid-attachments": {}}, "cni.dev/valid-attachments"),
        ({"cni.dev/valid-attachments": [{"containerID": 1}]}, "valid-attachments[0]"),
    ],
)
def test_wrong_types_and_values_are_code_7_naming_field_and_value(
    over: dict[str, object], contains: str
) -> None:
    fails(spec.parse_cni_config, conf(**over), code=7, contains=contains)


def test_gc_attachments_both_key_spellings() -> None:
    items = [{"containerID": "a", "ifname": "eth0"}]
    for key in ("cni.dev/valid-attachments", "cni.dev/attachments"):
        c = spec.parse_cni_config(conf(**{key: items}), "GC")
        assert c.valid_attachments == frozenset({spec.Attachment("a", "eth0")})


def test_ipam_plugin_checks_only_its_own_section() -> None:
    outer = {
        "cniVersion": "1.0.0",
        "name": "mynet",
        "type": "ptp",
        "ipMasq": True,
        "ipam": {"type": "overlay-ipam", "assignIPv6": True, "agentSocket": "/run/a.sock"},
    }
    c = spec.parse_ipam_config(outer)
    assert c.ipam.assign_ipv6 and c.agent_socket == "/run/a.sock"
    outer["ipam"] = {"type": "overlay-ipam", "rangeStart": "10.0.0.2"}
    fails(spec.parse_ipam_config, outer, code=2, contains="ipam.rangeStart")
    del outer["ipam"]
    fails(spec.parse_ipam_config, outer, code=7, contains="ipam")


def test_conflist_validates_our_entry_and_builds_plugin_config() -> None:
    conflist: dict[str, object] = {
        "cniVersion": "1.1.0",
        "name": "k8s-pod-network",
        "plugins": [
            {"type": "overlay-cni", "mtu": 0, "capabilities": {"ips": True, "mac": True}},
            {"type": "portmap", "snat": True, "capabilities": {"portMappings": True}},
        ],
    }
    spec.parse_conflist(json.dumps(conflist))
    first = spec.plugin_config(conflist, 0, {"ips": ["10.65.0.4"], "portMappings": []})
    assert first == {
        "type": "overlay-cni",
        "mtu": 0,
        "cniVersion": "1.1.0",
        "name": "k8s-pod-network",
        "runtimeConfig": {"ips": ["10.65.0.4"]},
    }
    plugins = conflist["plugins"]
    assert isinstance(plugins, list)
    plugins[0]["bogus"] = 1
    err = fails(spec.parse_conflist, json.dumps(conflist), code=2, contains="plugins[0]")
    assert "bogus" in err.msg
    fails(spec.parse_conflist, json.dumps({"cniVersion": "1.1.0", "name": "n"}), code=7,
          contains="plugins")  # fmt: skip


# --------------------------------------------------------------------------- environment


def test_env_is_read() -> None:
    e = spec.parse_env(env())
    assert (e.command, e.container_id, e.netns, e.ifname) == ("ADD", "c0ffee01", NETNS, "eth0")
    assert (e.pod_namespace, e.pod_name, e.path) == ("default", "web-0", ("/opt/cni/bin",))
    assert spec.parse_env(e.to_wire()) == e


@pytest.mark.parametrize(
    ("over", "contains"),
    [
        ({"CNI_COMMAND": None}, "CNI_COMMAND is not set"),
        ({"CNI_COMMAND": "add"}, "CNI_COMMAND='add'"),
        ({"CNI_CONTAINERID": None}, "CNI_CONTAINERID is required"),
        ({"CNI_CONTAINERID": ""}, "CNI_CONTAINERID is empty"),
        ({"CNI_CONTAINERID": "-x"}, "CNI_CONTAINERID='-x'"),
        ({"CNI_NETNS": None}, "CNI_NETNS is required for ADD"),
        ({"CNI_NETNS": "pod1"}, "CNI_NETNS='pod1'"),
        ({"CNI_IFNAME": None}, "CNI_IFNAME is required"),
        ({"CNI_IFNAME": "eth0123456789012"}, "CNI_IFNAME='eth0123456789012' is 16 characters"),
        ({"CNI_IFNAME": "eth/0"}, "CNI_IFNAME='eth/0'"),
        ({"CNI_IFNAME": "eth 0"}, "CNI_IFNAME='eth 0'"),
        ({"CNI_IFNAME": ".."}, "CNI_IFNAME='..'"),
        ({"CNI_ARGS": "K8S_POD_NAME=a;BOGUS=1"}, "CNI_ARGS has unknown key 'BOGUS'"),
        ({"CNI_ARGS": "novalue"}, "CNI_ARGS has a malformed pair 'novalue'"),
    ],
)
def test_bad_env_is_code_4_naming_variable_and_value(
    over: dict[str, str | None], contains: str
) -> None:
    fails(spec.parse_env, env(**over), code=4, contains=contains)


def test_ifname_of_15_chars_is_fine() -> None:
    assert spec.parse_env(env(CNI_IFNAME="a" * 15)).ifname == "a" * 15


def test_del_needs_no_netns_and_status_needs_nothing() -> None:
    assert spec.parse_env(env(CNI_COMMAND="DEL", CNI_NETNS=None)).netns == ""
    bare = spec.parse_env({"CNI_COMMAND": "STATUS"})
    assert bare.command == "STATUS" and bare.container_id == ""


def test_cni_args_unknown_keys_ignored_with_ignore_unknown() -> None:
    args = spec.parse_cni_args("IgnoreUnknown=true;K8S_POD_NAME=a;FOO=bar")
    assert args == {"IgnoreUnknown": "true", "K8S_POD_NAME": "a"}


def _with_args(cni_args: str, command: str = "ADD", **config: object) -> spec.NetConf:
    c = spec.parse_cni_config(conf(**config))
    spec.apply_cni_args(c, spec.parse_env(env(CNI_ARGS=cni_args, CNI_COMMAND=command)))
    return c


def test_cni_args_ip_and_mac_ask_for_an_address_and_mac_as_podman_sends_them() -> None:
    c = _with_args("IgnoreUnknown=1;K8S_POD_NAME=a;MAC=0A:58:0a:f4:fa:09;IP=10.65.0.9,fd00::9")
    assert c.requested_ips == ("10.65.0.9", "fd00::9") and c.requested_mac == "0a:58:0a:f4:fa:09"
    # runtimeConfig wins; DEL never looks at them.
    rc = _with_args("IP=10.65.0.9", runtimeConfig={"ips": ["10.65.0.7"]})
    assert rc.requested_ips == ("10.65.0.7",)
    assert _with_args("IP=nonsense", command="DEL").requested_ips == ()


@pytest.mark.parametrize(
    ("cni_args", "contains"),
    [
        ("IP=10.65.0.300", 'CNI_ARGS IP[0]="10.65.0.300" is invalid'),
        ("IP=10.65.0.1,10.65.0.2", "at most one address per family"),
        ("MAC=ff:ff:ff:ff:ff:ff", 'CNI_ARGS MAC="ff:ff:ff:ff:ff:ff" is invalid: a multicast'),
        ("MAC=nope", "CNI_ARGS MAC"),
    ],
)
def test_bad_cni_args_ip_or_mac_name_the_key_and_value(cni_args: str, contains: str) -> None:
    fails(_with_args, cni_args, code=7, contains=contains)


# --------------------------------------------------------------------------- results

IFACES: list[dict[str, object]] = [
    {"name": "cali12345678901"},
    {"name": "eth0", "mac": "0a:58:0a:41:00:05", "mtu": 1410, "sandbox": NETNS},
]
IPS: list[dict[str, object]] = [
    {"address": "10.65.0.5/32", "interface": 1},
    {"address": "fd00::5/128", "interface": 1},
]
ROUTES: list[dict[str, object]] = [{"dst": "0.0.0.0/0", "gw": "169.254.1.1", "mtu": 1400}]


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_legacy_results_carry_ip_version(version: str) -> None:
    r = spec.build_result(version, IPS, IFACES, ROUTES, {"nameservers": ["10.96.0.10"]})
    assert r["cniVersion"] == version
    assert r["ips"] == [
        {"version": "4", "address": "10.65.0.5/32", "interface": 1},
        {"version": "6", "address": "fd00::5/128", "interface": 1},
    ]
    assert r["interfaces"] == [
        {"name": "cali12345678901"},
        {"name": "eth0", "mac": "0a:58:0a:41:00:05", "sandbox": NETNS},
    ]
    assert r["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    assert r["dns"] == {"nameservers": ["10.96.0.10"]}


def test_1_0_result_has_no_ip_version_and_no_1_1_fields() -> None:
    r = spec.build_result("1.0.0", IPS, IFACES, ROUTES)
    assert r["ips"] == [
        {"address": "10.65.0.5/32", "interface": 1},
        {"address": "fd00::5/128", "interface": 1},
    ]
    assert r["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    assert "mtu" not in r["interfaces"][1]  # type: ignore[index]
    assert "dns" not in r


def test_1_1_result_has_mtus() -> None:
    r = spec.build_result("1.1.0", IPS, IFACES, ROUTES)
    assert r["interfaces"][1]["mtu"] == 1410  # type: ignore[index]
    assert r["routes"] == ROUTES


def test_result_interface_index_must_exist() -> None:
    with pytest.raises(ValueError, match="interface index 2"):
        spec.build_result("1.1.0", [{"address": "10.0.0.1/32", "interface": 2}], IFACES)
    with pytest.raises(ValueError, match="interface index 0"):
        spec.build_result("1.1.0", [{"address": "10.0.0.1/32", "interface": 0}], None)


# --------------------------------------------------------------------------- errors


def test_error_object_shape() -> None:
    err = CniError(spec.TRY_AGAIN_LATER, "agent down", "start it")
    assert err.to_object("0.4.0") == {
        "cniVersion": "0.4.0",
        "code": 11,
        "msg": "agent down",
        "details": "start it",
    }
    assert spec.is_error_object(err.to_object())
    assert spec.is_error_object(spec.error_object(999, "x"))
    assert not spec.is_error_object({"code": True, "msg": "x", "cniVersion": "1.1.0"})


def test_spec_codes() -> None:
    codes = (
        spec.INCOMPATIBLE_VERSION, spec.UNSUPPORTED_FIELD, spec.UNKNOWN_CONTAINER,
        spec.INVALID_ENV, spec.IO_FAILURE, spec.DECODE_FAILURE, spec.INVALID_CONFIG,
        spec.TRY_AGAIN_LATER, spec.NOT_AVAILABLE, spec.LIMITED_CONNECTIVITY, spec.INTERNAL,
    )  # fmt: skip
    assert codes == (1, 2, 3, 4, 5, 6, 7, 11, 50, 51, 999)


def test_peek_version_falls_back_to_current() -> None:
    assert spec.peek_version(b'{"cniVersion": "0.3.1"}') == "0.3.1"
    assert spec.peek_version(b'{"cniVersion": "9.9.9"}') == "1.1.0"
    assert spec.peek_version(b"garbage") == "1.1.0"
