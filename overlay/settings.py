"""The agent's dataplane settings, and where each one comes from.

Felix's order of precedence: a command-line flag, then this node's FelixConfiguration
(`node.<node name>`), then the cluster's (`default`), then the built-in default. The agent
works the settings out again whenever a FelixConfiguration changes, so an operator changes
the VNI, the VXLAN port or an MTU of every node with one `overlayctl apply`. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import netaddr

from ipam.model import FelixConfiguration
from ipam.resources import FELIX_DEFAULT_NAME, FELIX_NODE_PREFIX, LOG_SEVERITIES
from overlay.model import VXLAN_PORT, VXLAN_VNI

BUILT_IN = "built-in"
FLAG = "flag"


@dataclass(frozen=True)
class Flags:
    """What the operator gave on the agent's command line; None: not given."""

    vxlan_vni: int | None = None
    vxlan_port: int | None = None
    vxlan_mtu: int | None = None
    vxlan_mtu_v6: int | None = None
    ipip_mtu: int | None = None
    resync_interval: float | None = None
    external_nodes: tuple[netaddr.IPNetwork, ...] | None = None
    checksum_offload_broken: str | None = None  # auto, true or false
    log_level: str | None = None  # a logging level name
    nat_outgoing_address: netaddr.IPAddress | None = None


@dataclass(frozen=True)
class Settings:
    vxlan_vni: int = VXLAN_VNI
    vxlan_port: int = VXLAN_PORT
    vxlan_mtu: int | None = None  # None: the underlay MTU minus the overhead
    vxlan_mtu_v6: int | None = None
    ipip_mtu: int | None = None
    resync_interval: float = 90.0  # 0: no periodic full resync
    external_nodes: tuple[netaddr.IPNetwork, ...] = ()
    checksum_offload_broken: str = "auto"
    log_level: str = "INFO"
    nat_outgoing_address: netaddr.IPAddress | None = None  # None: masquerade
    # Setting -> where its value came from: "flag", "FelixConfiguration <name>" or
    # "built-in". Not part of equality: only the values decide whether anything changes.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def changed(self, other: Settings) -> dict[str, object]:
        """The settings whose value differs in `other`, with the new values."""
        return {
            name: getattr(other, name)
            for name in _SETTINGS
            if getattr(self, name) != getattr(other, name)
        }


# Setting -> the FelixConfiguration attribute that carries it, and how its value reads here.
_FROM_FELIX = {
    "vxlan_vni": ("vxlan_vni", lambda v: v),
    "vxlan_port": ("vxlan_port", lambda v: v),
    "vxlan_mtu": ("vxlan_mtu", lambda v: v or None),  # Calico's 0: derive it
    "vxlan_mtu_v6": ("vxlan_mtu_v6", lambda v: v or None),
    "ipip_mtu": ("ipip_mtu", lambda v: v or None),
    "resync_interval": ("route_refresh_interval", lambda v: v),
    "external_nodes": ("external_nodes_list", lambda v: v),
    "checksum_offload_broken": ("checksum_offload_broken", lambda v: str(v).lower()),
    "log_level": ("log_severity_screen", lambda v: LOG_SEVERITIES[v]),
    "nat_outgoing_address": ("nat_outgoing_address", lambda v: v),
}
_SETTINGS = tuple(_FROM_FELIX)


def felix_name(node: str) -> str:
    """The name of a node's own FelixConfiguration."""
    return FELIX_NODE_PREFIX + node


def effective(flags: Flags, configs: Mapping[str, FelixConfiguration], node: str) -> Settings:
    """Each setting from the most specific level that sets it."""
    levels = [configs.get(felix_name(node)), configs.get(FELIX_DEFAULT_NAME)]
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for name, (attribute, convert) in _FROM_FELIX.items():
        flag = getattr(flags, name)
        if flag is not None:
            values[name], sources[name] = flag, FLAG
            continue
        for config in levels:
            value = None if config is None else getattr(config, attribute)
            if value is not None:
                assert config is not None
                values[name] = convert(value)
                sources[name] = f"FelixConfiguration {config.name}"
                break
        else:
            sources[name] = BUILT_IN
    return Settings(**values, sources=sources)  # type: ignore[arg-type]
