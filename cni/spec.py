"""CNI spec 1.1.0 as pure code: versions, error codes, env and config validation, result shapes.

No I/O. The exec'd plugins import this module on every call, so it imports only what the
interpreter has already loaded at start-up (no json, re, ipaddress, dataclasses, typing or
third-party packages; ipaddress is imported only when a config requests addresses).
"""

from __future__ import annotations

from cni import jsonc as json

CURRENT_VERSION = "1.1.0"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
DEFAULT_SOCKET = "/var/run/overlay/cni.sock"
DEFAULT_TIMEOUT_S = 60.0
IPAM_TYPE = "overlay-ipam"

VERBS = ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")

# Error codes. 1-11 and 50/51 are SPEC.md's table; 8 and 999 come from libcni's types.go.
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
INVALID_NETNS = 8
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
LIMITED_CONNECTIVITY = 51
INTERNAL = 999
# Ours (100 and above are free for plugins).
IPAM_FAILURE = 100
DATAPLANE_FAILURE = 101
CHECK_FAILED = 102

# Calico's gateway conventions: the host answers for these on every cali* veth.
GATEWAY_V4 = "169.254.1.1"
GATEWAY_V6 = "fe80::ecee:eeff:feee:eeee"  # EUI-64 link-local of ee:ee:ee:ee:ee:ee
HOST_VETH_MAC = "ee:ee:ee:ee:ee:ee"

_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_NAME_CHARS = _ALNUM | frozenset("_.-")
_HEX = frozenset("0123456789abcdefABCDEF")


def is_name(text: str) -> bool:
    """A network name or container id: a letter or digit, then letters, digits, _ . -"""
    return bool(text) and text[0] in _ALNUM and all(c in _NAME_CHARS for c in text)


def is_mac(text: str) -> bool:
    """Six colon-separated pairs of hex digits."""
    parts = text.split(":")
    return len(parts) == 6 and all(len(p) == 2 and p[0] in _HEX and p[1] in _HEX for p in parts)


_CNI_ARGS_KNOWN = (
    "K8S_POD_NAMESPACE",
    "K8S_POD_NAME",
    "K8S_POD_INFRA_CONTAINER_ID",
    "K8S_POD_UID",
    "IgnoreUnknown",
    # host-local's and tuning's keys, which podman sends for --ip and --mac-address
    # (Calico's IPAM plugin reads IP too): see apply_cni_args().
    "IP",
    "MAC",
)

# Keys every plugin object may carry: identity, runtime-reserved and well-known ones.
_COMMON_KEYS = frozenset(
    {"cniVersion", "cniVersions", "name", "type", "runtimeConfig", "args", "prevResult",
     "capabilities", "dns"}
)  # fmt: skip
# Our main plugin's own options, on top of the common keys.
_CNI_KEYS = frozenset({"ipam", "mtu", "agentSocket", "timeoutSeconds"})
_IPAM_KEYS = frozenset({"type", "assignIPv4", "assignIPv6", "ipv4Pools", "ipv6Pools"})
_DNS_KEYS = frozenset({"nameservers", "domain", "search", "options"})


class CniError(Exception):
    """A failure with a spec error code; becomes the {cniVersion, code, msg, details} object."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_object(self, cni_version: str = CURRENT_VERSION) -> dict[str, object]:
        return error_object(self.code, self.msg, self.details, cni_version)

    def __repr__(self) -> str:
        return f"CniError({self.code}, {self.msg!r}, {self.details!r})"


def error_object(
    code: int, msg: str, details: str = "", cni_version: str = CURRENT_VERSION
) -> dict[str, object]:
    obj: dict[str, object] = {"cniVersion": cni_version, "code": code, "msg": msg}
    if details:
        obj["details"] = details
    return obj


def is_error_object(obj: object) -> bool:
    """True when obj has the shape of a spec error (used by tests and the client)."""
    return (
        isinstance(obj, dict)
        and isinstance(obj.get("code"), int)
        and not isinstance(obj.get("code"), bool)
        and isinstance(obj.get("msg"), str)
        and isinstance(obj.get("cniVersion"), str)
        and set(obj) <= {"cniVersion", "code", "msg", "details"}
    )


def version_info() -> dict[str, object]:
    return {"cniVersion": CURRENT_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


def _vtuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def version_at_least(version: str, minimum: str) -> bool:
    return _vtuple(version) >= _vtuple(minimum)


def check_verb_version(verb: str, version: str) -> None:
    """CHECK needs spec >= 0.4.0; STATUS and GC need >= 1.1.0 (as libcni/skel enforce)."""
    need = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}.get(verb)
    if need and not version_at_least(version, need):
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"config version {version} does not allow {verb} (needs cniVersion >= {need})",
        )


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


# --------------------------------------------------------------------------- environment


class CniEnv:
    """The validated CNI_* variables of one call."""

    __slots__ = ("args", "command", "container_id", "ifname", "netns", "netns_handle", "path")

    def __init__(
        self,
        command: str,
        container_id: str = "",
        netns: str = "",
        ifname: str = "",
        args: dict[str, str] | None = None,
        path: tuple[str, ...] = (),
    ) -> None:
        self.command = command
        self.container_id = container_id
        self.netns = netns
        self.ifname = ifname
        self.args = dict(args or {})
        self.path = path
        # Where the agent opens the netns: a /proc/self/fd path when the plugin sent the
        # open namespace, else CNI_NETNS itself. Results and messages use CNI_NETNS.
        self.netns_handle = netns

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")

    def to_wire(self) -> dict[str, str]:
        """The subset sent to the agent, as the original variables."""
        wire = {"CNI_COMMAND": self.command}
        for key, value in (
            ("CNI_CONTAINERID", self.container_id),
            ("CNI_NETNS", self.netns),
            ("CNI_IFNAME", self.ifname),
            ("CNI_ARGS", ";".join(f"{k}={v}" for k, v in self.args.items())),
            ("CNI_PATH", ":".join(self.path)),
        ):
            if value:
                wire[key] = value
        return wire

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CniEnv) and all(
            getattr(self, s) == getattr(other, s) for s in self.__slots__
        )

    def __repr__(self) -> str:
        fields = ", ".join(f"{s}={getattr(self, s)!r}" for s in self.__slots__)
        return f"CniEnv({fields})"


def parse_command(environ: dict[str, str]) -> str:
    command = environ.get("CNI_COMMAND")
    if not command:
        raise CniError(INVALID_ENV, "CNI_COMMAND is not set", f"expected one of {', '.join(VERBS)}")
    if command not in VERBS:
        raise CniError(
            INVALID_ENV,
            f"CNI_COMMAND={command!r} is not a CNI verb",
            f"expected one of {', '.join(VERBS)}",
        )
    return command


def validate_ifname(ifname: str) -> None:
    """Linux interface name rules, as libcni checks them."""
    if not ifname:
        raise CniError(INVALID_ENV, "CNI_IFNAME is empty")
    if len(ifname) > 15:
        raise CniError(
            INVALID_ENV,
            f"CNI_IFNAME={ifname!r} is {len(ifname)} characters; Linux allows at most 15",
        )
    if ifname in (".", "..") or any(c in "/:" or c.isspace() for c in ifname):
        raise CniError(
            INVALID_ENV,
            f"CNI_IFNAME={ifname!r} is not a valid interface name",
            "it must not be '.' or '..' nor contain '/', ':' or whitespace",
        )


def validate_container_id(container_id: str) -> None:
    if not container_id:
        raise CniError(INVALID_ENV, "CNI_CONTAINERID is empty")
    if not is_name(container_id):
        raise CniError(
            INVALID_ENV,
            f"CNI_CONTAINERID={container_id!r} is not a valid container id",
            "it must start with a letter or digit and contain only letters, digits, '_', '.', '-'",
        )


def validate_netns(netns: str) -> None:
    if not netns.startswith("/") or "\0" in netns or len(netns) > 4096:
        raise CniError(
            INVALID_ENV,
            f"CNI_NETNS={netns!r} is not an absolute path to a network namespace",
            "expected e.g. /var/run/netns/<name> or /proc/<pid>/ns/net",
        )


def parse_cni_args(raw: str) -> dict[str, str]:
    """Parse CNI_ARGS 'K=V;K2=V2'. Unknown keys are refused unless IgnoreUnknown is true."""
    pairs: dict[str, str] = {}
    for part in raw.split(";"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENV, f"CNI_ARGS has a malformed pair {part!r}", "expected K=V")
        pairs[key] = value
    ignore = pairs.get("IgnoreUnknown", "").lower() in ("1", "true")
    if not ignore:
        for key in pairs:
            if key not in _CNI_ARGS_KNOWN:
                raise CniError(
                    INVALID_ENV,
                    f"CNI_ARGS has unknown key {key!r}",
                    f"known keys: {', '.join(_CNI_ARGS_KNOWN)}; set IgnoreUnknown=1 to skip others",
                )
    if not ignore:
        return pairs
    return {k: v for k, v in pairs.items() if k in _CNI_ARGS_KNOWN}


def parse_env(environ: dict[str, str]) -> CniEnv:
    """Validate the variables the verb needs (spec section 'Parameters')."""
    command = parse_command(environ)
    container_id = environ.get("CNI_CONTAINERID", "")
    netns = environ.get("CNI_NETNS", "")
    ifname = environ.get("CNI_IFNAME", "")
    if command in ("ADD", "DEL", "CHECK"):
        if "CNI_CONTAINERID" not in environ:
            raise CniError(INVALID_ENV, f"CNI_CONTAINERID is required for {command}")
        validate_container_id(container_id)
        if "CNI_IFNAME" not in environ:
            raise CniError(INVALID_ENV, f"CNI_IFNAME is required for {command}")
        validate_ifname(ifname)
        if command != "DEL" and not netns:
            raise CniError(INVALID_ENV, f"CNI_NETNS is required for {command}")
        if netns:
            validate_netns(netns)
    args = parse_cni_args(environ.get("CNI_ARGS", ""))
    path = tuple(p for p in environ.get("CNI_PATH", "").split(":") if p)
    return CniEnv(command, container_id, netns, ifname, args, path)


# --------------------------------------------------------------------------- network config


class IpamConf:
    __slots__ = ("assign_ipv4", "assign_ipv6", "ipv4_pools", "ipv6_pools", "type")

    def __init__(
        self,
        type: str = IPAM_TYPE,
        assign_ipv4: bool = True,
        assign_ipv6: bool = False,
        ipv4_pools: tuple[str, ...] = (),
        ipv6_pools: tuple[str, ...] = (),
    ) -> None:
        self.type = type
        self.assign_ipv4 = assign_ipv4
        self.assign_ipv6 = assign_ipv6
        self.ipv4_pools = ipv4_pools
        self.ipv6_pools = ipv6_pools


class Attachment:
    __slots__ = ("container_id", "ifname")

    def __init__(self, container_id: str, ifname: str) -> None:
        self.container_id = container_id
        self.ifname = ifname

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Attachment) and (self.container_id, self.ifname) == (
            other.container_id,
            other.ifname,
        )

    def __hash__(self) -> int:
        return hash((self.container_id, self.ifname))

    def __repr__(self) -> str:
        return f"Attachment({self.container_id!r}, {self.ifname!r})"


class NetConf:
    """One plugin's validated configuration (a .conf file or a conflist entry as sent)."""

    __slots__ = (
        "agent_socket",
        "cni_version",
        "dns",
        "ipam",
        "mtu",
        "name",
        "prev_result",
        "raw",
        "requested_ips",
        "requested_mac",
        "timeout_s",
        "type",
        "valid_attachments",
    )

    def __init__(self, raw: dict[str, object], cni_version: str, name: str, type: str) -> None:
        self.raw = raw
        self.cni_version = cni_version
        self.name = name
        self.type = type
        self.ipam = IpamConf()
        self.mtu = 0  # 0: ask the agent
        self.agent_socket = DEFAULT_SOCKET
        self.timeout_s = DEFAULT_TIMEOUT_S
        self.requested_ips: tuple[str, ...] = ()  # "ip" or "ip/prefix", as given
        self.requested_mac = ""
        self.dns: dict[str, object] = {}
        self.prev_result: dict[str, object] | None = None
        self.valid_attachments: frozenset[Attachment] | None = None  # None: key absent


def decode_json(data: bytes | str, what: str = "network configuration") -> dict[str, object]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CniError(DECODE_FAILURE, f"cannot decode the {what} as JSON: {e}") from e
    if not isinstance(obj, dict):
        raise CniError(DECODE_FAILURE, f"the {what} must be a JSON object, got {_type_name(obj)}")
    return obj


def peek_version(data: bytes | str) -> str:
    """The config's cniVersion if it is one we speak, for shaping early error objects."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return CURRENT_VERSION
    version = obj.get("cniVersion") if isinstance(obj, dict) else None
    return version if version in SUPPORTED_VERSIONS else CURRENT_VERSION


def _bad(field: str, value: object, expected: str, code: int = INVALID_CONFIG) -> CniError:
    return CniError(code, f"{field}={json.dumps(value)[:200]} is invalid: {expected}")


def _want(obj: dict[str, object], key: str, kind: type, prefix: str = "") -> object:
    value = obj[key]
    if kind is int and isinstance(value, bool):
        raise _bad(prefix + key, value, "expected an integer")
    if not isinstance(value, kind):
        raise _bad(prefix + key, value, f"expected {kind.__name__}, got {_type_name(value)}")
    return value


def _refuse_unknown(obj: dict[str, object], allowed: frozenset[str], prefix: str) -> None:
    for key in obj:
        if key not in allowed and not key.startswith("cni.dev/"):
            raise CniError(
                UNSUPPORTED_FIELD,
                f"unsupported field {prefix}{key}={json.dumps(obj[key])[:200]}",
                f"supported fields: {', '.join(sorted(allowed))}",
            )


def _parse_str_list(value: object, field: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(field, value, "expected a list of strings")
    return tuple(value)


def _parse_ip_list(value: object, field: str) -> tuple[str, ...]:
    import ipaddress

    items = _parse_str_list(value, field)
    for i, item in enumerate(items):
        try:
            if "/" in item:
                ipaddress.ip_interface(item)
            else:
                ipaddress.ip_address(item)
        except ValueError:
            raise _bad(f"{field}[{i}]", item, "expected an IP address or ip/prefix") from None
    return items


def _parse_mac(value: object, field: str) -> str:
    if not isinstance(value, str) or not is_mac(value):
        raise _bad(field, value, "expected a MAC address like 0a:58:0a:f4:00:05")
    if int(value[:2], 16) & 1:
        raise _bad(field, value, "a multicast MAC cannot be an interface address")
    return value.lower()


def _parse_header(obj: dict[str, object]) -> tuple[str, str, str]:
    if "cniVersion" not in obj:
        raise CniError(INVALID_CONFIG, "the network configuration has no cniVersion")
    version = _want(obj, "cniVersion", str)
    assert isinstance(version, str)
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"cniVersion={version!r} is not supported",
            f"supported versions: {', '.join(SUPPORTED_VERSIONS)}",
        )
    if "name" not in obj:
        raise CniError(INVALID_CONFIG, "the network configuration has no name")
    name = _want(obj, "name", str)
    assert isinstance(name, str)
    if not is_name(name):
        raise _bad("name", name, "must start with a letter or digit; then letters, digits, _ . -")
    kind = obj.get("type", "")
    if not isinstance(kind, str) or not kind or "/" in kind:
        raise _bad("type", kind, "expected the plugin's binary name")
    return version, name, kind


def _parse_ipam(value: object) -> IpamConf:
    if not isinstance(value, dict):
        raise _bad("ipam", value, f"expected an object, got {_type_name(value)}")
    kind = value.get("type")
    if not isinstance(kind, str) or not kind:
        raise _bad("ipam.type", kind, f"expected {IPAM_TYPE!r}")
    if kind != IPAM_TYPE:
        raise CniError(
            UNSUPPORTED_FIELD,
            f"unsupported field ipam.type={kind!r}",
            f"addresses come from the node agent's IPAM; use ipam.type {IPAM_TYPE!r}",
        )
    _refuse_unknown(value, _IPAM_KEYS, "ipam.")
    conf = IpamConf()
    for key, attr in (("assignIPv4", "assign_ipv4"), ("assignIPv6", "assign_ipv6")):
        if key in value:
            setattr(conf, attr, _want(value, key, bool, "ipam."))
    for key, attr in (("ipv4Pools", "ipv4_pools"), ("ipv6Pools", "ipv6_pools")):
        if key in value:
            setattr(conf, attr, _parse_str_list(value[key], "ipam." + key))
    if not conf.assign_ipv4 and not conf.assign_ipv6:
        raise CniError(
            INVALID_CONFIG, "ipam.assignIPv4 and ipam.assignIPv6 are both false: nothing to assign"
        )
    return conf


def _parse_dns(value: object) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _bad("dns", value, f"expected an object, got {_type_name(value)}")
    _refuse_unknown(value, _DNS_KEYS, "dns.")
    for key in ("nameservers", "search", "options"):
        if key in value:
            _parse_str_list(value[key], "dns." + key)
    if "domain" in value:
        _want(value, "domain", str, "dns.")
    return dict(value)


def _parse_attachments(obj: dict[str, object]) -> frozenset[Attachment] | None:
    # libcni sends both spellings (the spec once named the key cni.dev/attachments).
    for key in ("cni.dev/valid-attachments", "cni.dev/attachments"):
        if key not in obj:
            continue
        value = obj[key]
        if not isinstance(value, list):
            raise _bad(key, value, "expected a list of {containerID, ifname}")
        out = set()
        for i, item in enumerate(value):
            if not (
                isinstance(item, dict)
                and isinstance(item.get("containerID"), str)
                and isinstance(item.get("ifname"), str)
            ):
                raise _bad(f"{key}[{i}]", item, "expected {containerID: str, ifname: str}")
            out.add(Attachment(item["containerID"], item["ifname"]))
        return frozenset(out)
    return None


def _parse_common(conf: NetConf, obj: dict[str, object]) -> None:
    """runtimeConfig, args, prevResult, dns and the GC list: shared by both plugins."""
    if "runtimeConfig" in obj:
        rc = obj["runtimeConfig"]
        if not isinstance(rc, dict):
            raise _bad("runtimeConfig", rc, f"expected an object, got {_type_name(rc)}")
        # Other capability keys belong to other plugins of the chain: ignored, per CONVENTIONS.
        if "ips" in rc:
            conf.requested_ips = _parse_ip_list(rc["ips"], "runtimeConfig.ips")
        if "mac" in rc:
            conf.requested_mac = _parse_mac(rc["mac"], "runtimeConfig.mac")
    if "args" in obj:
        args = obj["args"]
        if not isinstance(args, dict):
            raise _bad("args", args, f"expected an object, got {_type_name(args)}")
        cni = args.get("cni")
        if isinstance(cni, dict):
            # runtimeConfig wins over args when both carry a value.
            if "ips" in cni and not conf.requested_ips:
                conf.requested_ips = _parse_ip_list(cni["ips"], "args.cni.ips")
            if "mac" in cni and not conf.requested_mac:
                conf.requested_mac = _parse_mac(cni["mac"], "args.cni.mac")
    if "prevResult" in obj:
        prev = obj["prevResult"]
        if prev is not None and not isinstance(prev, dict):
            raise _bad("prevResult", prev, f"expected an object, got {_type_name(prev)}")
        conf.prev_result = prev
    if "dns" in obj:
        conf.dns = _parse_dns(obj["dns"])
    conf.valid_attachments = _parse_attachments(obj)
    _check_families(conf.requested_ips, "runtimeConfig.ips")


def _check_families(ips: tuple[str, ...], field: str) -> None:
    families = {6 if ":" in ip else 4 for ip in ips}  # validated addresses
    if len(families) != len(ips):
        raise _bad(field, list(ips), "at most one address per family")


def apply_cni_args(conf: NetConf, env: CniEnv) -> None:
    """For ADD: addresses and MAC asked for in CNI_ARGS (IP=a[,b], MAC=m), used when
    runtimeConfig and args ask for none."""
    if env.command != "ADD":
        return
    if not conf.requested_ips and env.args.get("IP"):
        conf.requested_ips = _parse_ip_list(env.args["IP"].split(","), "CNI_ARGS IP")
        _check_families(conf.requested_ips, "CNI_ARGS IP")
    if not conf.requested_mac and env.args.get("MAC"):
        conf.requested_mac = _parse_mac(env.args["MAC"], "CNI_ARGS MAC")


def parse_cni_config(data: bytes | str | dict[str, object], verb: str = "ADD") -> NetConf:
    """Validate the config of overlay-cni: the whole object is ours, so unknown keys are refused."""
    obj = data if isinstance(data, dict) else decode_json(data)
    version, name, kind = _parse_header(obj)
    _refuse_unknown(obj, _COMMON_KEYS | _CNI_KEYS, "")
    conf = NetConf(obj, version, name, kind)
    if "ipam" in obj:
        conf.ipam = _parse_ipam(obj["ipam"])
    if "mtu" in obj:
        mtu = _want(obj, "mtu", int)
        assert isinstance(mtu, int)
        if mtu != 0 and not 576 <= mtu <= 65535:
            raise _bad("mtu", mtu, "expected 0 (from the agent) or 576..65535")
        conf.mtu = mtu
    _parse_transport(conf, obj)
    _parse_common(conf, obj)
    check_verb_version(verb, version)
    return conf


def parse_ipam_config(data: bytes | str | dict[str, object], verb: str = "ADD") -> NetConf:
    """Validate the config seen by overlay-ipam: only the `ipam` section is ours.

    The top level belongs to the delegating plugin (bridge, ptp, ...), so its other keys
    pass through unchecked; `agentSocket` and `timeoutSeconds` are read from `ipam` too.
    """
    obj = data if isinstance(data, dict) else decode_json(data)
    version, name, kind = _parse_header(obj)
    conf = NetConf(obj, version, name, kind)
    ipam = obj.get("ipam")
    if not isinstance(ipam, dict):
        raise _bad("ipam", ipam, f"expected an object with type {IPAM_TYPE!r}")
    rest = {k: v for k, v in ipam.items() if k not in ("agentSocket", "timeoutSeconds")}
    conf.ipam = _parse_ipam(rest)
    _parse_transport(conf, ipam, "ipam.")
    _parse_common(conf, obj)
    check_verb_version(verb, version)
    return conf


def _parse_transport(conf: NetConf, obj: dict[str, object], prefix: str = "") -> None:
    if "agentSocket" in obj:
        sock = _want(obj, "agentSocket", str, prefix)
        assert isinstance(sock, str)
        if not sock.startswith("/") or "\0" in sock:
            raise _bad(prefix + "agentSocket", sock, "expected an absolute path")
        conf.agent_socket = sock
    if "timeoutSeconds" in obj:
        t = obj["timeoutSeconds"]
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= 3600:
            raise _bad(prefix + "timeoutSeconds", t, "expected a number of seconds in (0, 3600]")
        conf.timeout_s = float(t)


def parse_config(plugin: str, data: bytes | str | dict[str, object], verb: str) -> NetConf:
    if plugin == "cni":
        return parse_cni_config(data, verb)
    if plugin == "ipam":
        return parse_ipam_config(data, verb)
    raise ValueError(f"unknown plugin kind {plugin!r}")


def parse_conflist(data: bytes | str) -> dict[str, object]:
    """Validate a .conflist file; entries whose type is ours are checked strictly."""
    obj = decode_json(data, "network configuration list")
    if "plugins" not in obj:
        raise CniError(INVALID_CONFIG, "the network configuration list has no plugins")
    plugins = obj["plugins"]
    if not isinstance(plugins, list) or not plugins:
        raise _bad("plugins", plugins, "expected a non-empty list of plugin objects")
    for key in ("disableCheck", "disableGC", "loadOnlyInlinedPlugins"):
        if key in obj:
            _want(obj, key, bool)
    if "cniVersions" in obj:
        _parse_str_list(obj["cniVersions"], "cniVersions")
    for i, entry in enumerate(plugins):
        if not isinstance(entry, dict):
            raise _bad(f"plugins[{i}]", entry, "expected an object")
        merged = plugin_config(obj, i)
        if entry.get("type") == "overlay-cni":
            try:
                parse_cni_config(merged)
            except CniError as e:
                raise CniError(e.code, f"plugins[{i}]: {e.msg}", e.details) from e
        else:
            _parse_header(merged)
    return obj


def plugin_config(
    conflist: dict[str, object], index: int, runtime_config: dict[str, object] | None = None
) -> dict[str, object]:
    """The object a runtime sends to plugin `index`: the entry plus cniVersion and name."""
    plugins = conflist["plugins"]
    assert isinstance(plugins, list)
    entry = dict(plugins[index])
    caps = entry.pop("capabilities", {})
    entry["cniVersion"] = conflist.get("cniVersion")
    entry["name"] = conflist.get("name")
    if runtime_config and isinstance(caps, dict):
        wanted = {k: v for k, v in runtime_config.items() if caps.get(k)}
        if wanted:
            entry["runtimeConfig"] = wanted
    return entry


# --------------------------------------------------------------------------- results


def build_result(
    cni_version: str,
    ips: list[dict[str, object]],
    interfaces: list[dict[str, object]] | None = None,
    routes: list[dict[str, object]] | None = None,
    dns: dict[str, object] | None = None,
) -> dict[str, object]:
    """Shape a success result for the config's version.

    `ips` items: {address: "ip/prefix", gateway?: str, interface?: int};
    `interfaces` items: {name, mac?, mtu?, sandbox?, socketPath?, pciID?};
    `routes` items: {dst, gw?, mtu?, advmss?, priority?, table?, scope?}.
    0.3.x/0.4.0 add ips[].version; the per-route and interface mtu fields exist from 1.1.0.
    """
    if cni_version not in SUPPORTED_VERSIONS:
        raise ValueError(f"unsupported cniVersion {cni_version!r}")
    legacy = not version_at_least(cni_version, "1.0.0")
    v11 = version_at_least(cni_version, "1.1.0")
    out: dict[str, object] = {"cniVersion": cni_version}
    if interfaces is not None:
        iface_keys = ("name", "mac", "sandbox") + (("mtu", "socketPath", "pciID") if v11 else ())
        out["interfaces"] = [
            {k: i[k] for k in iface_keys if i.get(k) not in (None, "")} for i in interfaces
        ]
    shaped_ips = []
    for ip in ips:
        address = str(ip["address"])
        item: dict[str, object] = {}
        if legacy:
            item["version"] = "6" if ":" in address else "4"
        item["address"] = address
        if ip.get("gateway"):
            item["gateway"] = str(ip["gateway"])
        if ip.get("interface") is not None:
            idx = ip["interface"]
            if interfaces is None or not isinstance(idx, int) or not 0 <= idx < len(interfaces):
                raise ValueError(f"ips interface index {idx!r} does not name an interface")
            item["interface"] = idx
        shaped_ips.append(item)
    out["ips"] = shaped_ips
    if routes:
        extra = ("mtu", "advmss", "priority", "table", "scope") if v11 else ()
        route_keys = ("dst", "gw", *extra)
        out["routes"] = [{k: r[k] for k in route_keys if r.get(k) is not None} for r in routes]
    if dns:
        out["dns"] = dict(dns)
    return out


def result_addresses(result: dict[str, object] | None) -> list[str]:
    """The CIDR addresses of a (prev)result, whatever its version."""
    if not isinstance(result, dict) or not isinstance(result.get("ips"), list):
        return []
    ips = result["ips"]
    assert isinstance(ips, list)
    return [str(ip["address"]) for ip in ips if isinstance(ip, dict) and "address" in ip]
