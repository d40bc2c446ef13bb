"""Agent-side CNI verbs: IPAM + pod plumbing behind the CniServer.

The IPAM library, the MTU source, the readiness probe and the plumbing are injected, so the
flows are unit-tested with fakes and the node agent wires in the real ones.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from cni import spec
from cni.spec import CniEnv, CniError, NetConf

log = logging.getLogger(__name__)


class Ipam(Protocol):
    """What the handler needs of ipam.allocator (addresses may be str/ipaddress/netaddr).

    When a config names pools (ipam.ipv4Pools / ipv6Pools: CIDRs or pool names),
    auto_assign is called with a `pools=` keyword as well, one family per call."""

    def auto_assign(
        self, handle: str, node: str, num4: int, num6: int, attrs: dict[str, str]
    ) -> tuple[Sequence[Any], Sequence[Any]]: ...

    def assign_ip(self, ip: str, handle: str, node: str, attrs: dict[str, str]) -> None: ...

    def release_by_handle(self, handle: str) -> None: ...


class GcIpam(Ipam, Protocol):
    """Optional for GC: the handles whose allocations carry attrs node=<node>."""

    def handles_for_node(self, node: str) -> Iterable[str]: ...


class GcAttrsIpam(Ipam, Protocol):
    """Optional for GC, preferred: handle -> the attributes ADD recorded (to find its veth)."""

    def allocations_for_node(self, node: str) -> dict[str, dict[str, str]]: ...


class PodLinkLike(Protocol):
    host_ifname: str
    pod_ifname: str
    pod_mac: str
    mtu: int
    addresses: list[str]


class Plumbing(Protocol):
    def setup(
        self, netns: str, ifname: str, workload: str, addresses: Sequence[str], mtu: int, mac: str
    ) -> PodLinkLike: ...

    def teardown(self, netns: str, ifname: str) -> bool: ...

    def inspect(
        self, netns: str, ifname: str, workload: str, addresses: Sequence[str], mac: str
    ) -> list[str]: ...


class KernelPlumbing:
    """The real plumbing (cni.pod, imported lazily)."""

    def setup(
        self, netns: str, ifname: str, workload: str, addresses: Sequence[str], mtu: int, mac: str
    ) -> PodLinkLike:
        from cni import pod

        return pod.setup_pod(netns, ifname, workload, addresses, mtu, mac)

    def teardown(self, netns: str, ifname: str) -> bool:
        from cni import pod

        return pod.teardown_pod(netns, ifname)

    def inspect(
        self, netns: str, ifname: str, workload: str, addresses: Sequence[str], mac: str
    ) -> list[str]:
        from cni import pod

        return pod.inspect_pod(netns, ifname, workload, addresses, mac)

    def remove_host(self, workload: str) -> bool:
        from cni import pod

        return pod.teardown_host(workload)


def handle_id(network: str, container_id: str) -> str:
    """Calico's IPAM handle: `<network name>.<container id>`."""
    return f"{network}.{container_id}"


def workload_id(env: CniEnv) -> str:
    """`<namespace>.<pod>` for Kubernetes (stable across sandboxes), else the container id."""
    return _workload(env.pod_namespace, env.pod_name, env.container_id)


def _workload(namespace: str, pod: str, container_id: str) -> str:
    return f"{namespace}.{pod}" if namespace and pod else container_id


def _cidr(addr: object) -> str:
    """IPAM's address as ip/prefix (a bare address becomes /32 or /128)."""
    text = str(addr)
    return str(
        ipaddress.ip_interface(text if "/" in text else f"{text}/{128 if ':' in text else 32}")
    )


def _host_cidr(addr: str) -> str:
    ip = ipaddress.ip_interface(addr).ip
    return f"{ip}/{ip.max_prefixlen}"


class CniRequestHandler:
    """ADD/DEL/CHECK/STATUS/GC for both plugins (`cni`: full pod set-up, `ipam`: addresses)."""

    def __init__(
        self,
        ipam: Ipam,
        node: str,
        mtu: Callable[[], int],
        plumbing: Plumbing | None = None,
        status: Callable[[], None] | None = None,
        ipam_gateway: Callable[[str], tuple[str, str] | None] | None = None,
    ) -> None:
        self.ipam = ipam
        self.node = node
        self.mtu = mtu  # the pod MTU the agent derives from the underlay and the encapsulation
        self.plumbing: Plumbing = plumbing or KernelPlumbing()
        self.status = status  # raises CniError(50|51) when the node cannot serve ADD
        # For overlay-ipam under ptp/bridge: address -> (address/subnet, gateway in it).
        # ptp puts the gateway on the host veth and routes the subnet and default via it,
        # so it must lie inside the subnet (as host-local's .1 does).
        self.ipam_gateway = ipam_gateway

    def handle(
        self, verb: str, plugin: str, env: CniEnv, config: NetConf
    ) -> dict[str, object] | None:
        if verb == "ADD":
            return self.add(plugin, env, config)
        if verb == "DEL":
            self.delete(plugin, env, config)
        elif verb == "CHECK":
            self.check(plugin, env, config)
        elif verb == "STATUS":
            if self.status is not None:
                self.status()
        elif verb == "GC":
            self.gc(config)
        else:
            raise CniError(spec.INVALID_ENV, f"CNI_COMMAND={verb!r} is not served by the agent")
        return None

    # ----------------------------------------------------------------------- ADD

    def add(self, plugin: str, env: CniEnv, config: NetConf) -> dict[str, object]:
        handle = handle_id(config.name, env.container_id)
        attrs = {
            "node": self.node,
            "namespace": env.pod_namespace,
            "pod": env.pod_name,
            "container_id": env.container_id,
            "ifname": env.ifname,
            "network": config.name,
        }
        with contextlib.ExitStack() as undo:
            # release_by_handle is idempotent, so it is safe to arm before assigning.
            undo.callback(self._quietly, "release", self.ipam.release_by_handle, handle)
            addresses = self._assign(handle, config, attrs)
            if plugin == "ipam":
                result = self._ipam_result(config, addresses)
            else:
                mtu = config.mtu or self.mtu()
                try:
                    link = self.plumbing.setup(
                        env.netns_handle,
                        env.ifname,
                        workload_id(env),
                        addresses,
                        mtu,
                        config.requested_mac,
                    )
                except CniError:
                    raise
                except Exception as e:
                    raise CniError(
                        spec.DATAPLANE_FAILURE, f"cannot plumb {env.ifname} in {env.netns}: {e}"
                    ) from e
                undo.callback(
                    self._quietly, "teardown", self.plumbing.teardown, env.netns_handle, env.ifname
                )
                result = self._cni_result(config, env, link)
            undo.pop_all()
        log.info("cni add handle=%s addresses=%s", handle, addresses)
        return result

    def _assign(self, handle: str, config: NetConf, attrs: dict[str, str]) -> list[str]:
        try:
            if config.requested_ips:
                for ip in config.requested_ips:
                    self.ipam.assign_ip(
                        str(ipaddress.ip_interface(ip).ip), handle, self.node, attrs
                    )
                return [_cidr(ip) for ip in config.requested_ips]
            num4 = 1 if config.ipam.assign_ipv4 else 0
            num6 = 1 if config.ipam.assign_ipv6 else 0
            v4, v6 = self._auto_assign(handle, config, attrs, num4, num6)
        except CniError:
            raise
        except Exception as e:
            raise CniError(
                spec.IPAM_FAILURE, f"cannot assign an address for handle {handle}: {e}"
            ) from e
        if len(v4) < num4 or len(v6) < num6:
            raise CniError(
                spec.IPAM_FAILURE,
                f"IPAM gave {len(v4)} IPv4 and {len(v6)} IPv6 addresses for handle {handle}, "
                f"wanted {num4} and {num6}",
                "the pools may be exhausted or the node at its block limit; see "
                "`overlayctl ipam show`",
            )
        return [_cidr(a) for a in [*v4[:num4], *v6[:num6]]]

    def _auto_assign(
        self, handle: str, config: NetConf, attrs: dict[str, str], num4: int, num6: int
    ) -> tuple[Sequence[Any], Sequence[Any]]:
        pools4, pools6 = config.ipam.ipv4_pools, config.ipam.ipv6_pools
        if not pools4 and not pools6:
            return self.ipam.auto_assign(handle, self.node, num4, num6, attrs)
        # One call per family: a family without a pool list uses the node's usual pools.
        # A failure in the second call is undone by add()'s release of the whole handle.
        assign: Callable[..., tuple[Sequence[Any], Sequence[Any]]] = self.ipam.auto_assign
        v4: Sequence[Any] = []
        v6: Sequence[Any] = []
        if num4:
            v4 = assign(handle, self.node, num4, 0, attrs, pools=list(pools4) or None)[0]
        if num6:
            v6 = assign(handle, self.node, 0, num6, attrs, pools=list(pools6) or None)[1]
        return v4, v6

    def _cni_result(self, config: NetConf, env: CniEnv, link: PodLinkLike) -> dict[str, object]:
        # Calico's shape: [0] host veth (name only), [1] the pod side; ips point at [1].
        interfaces: list[dict[str, object]] = [
            {"name": link.host_ifname},
            {"name": link.pod_ifname, "mac": link.pod_mac, "mtu": link.mtu, "sandbox": env.netns},
        ]
        ips: list[dict[str, object]] = [
            {"address": _host_cidr(a), "interface": 1} for a in link.addresses
        ]
        return spec.build_result(
            config.cni_version, ips, interfaces, _default_routes(link.addresses), config.dns
        )

    def _ipam_result(self, config: NetConf, addresses: list[str]) -> dict[str, object]:
        # Delegated IPAM: no interfaces and no interface index (spec: abbreviated result).
        ips: list[dict[str, object]] = []
        for a in addresses:
            found = self.ipam_gateway(a) if self.ipam_gateway else None
            ips.append({"address": found[0], "gateway": found[1]} if found else {"address": a})
        routes = _default_routes(addresses, via_gateway=False)
        return spec.build_result(config.cni_version, ips, None, routes, config.dns)

    # ----------------------------------------------------------------------- DEL / CHECK / GC

    def delete(self, plugin: str, env: CniEnv, config: NetConf) -> None:
        """Best effort and idempotent. The address is kept if the veth could not be removed,
        so that it is not handed to a new pod while the old host route still exists."""
        handle = handle_id(config.name, env.container_id)
        if plugin == "cni":
            try:
                self.plumbing.teardown(env.netns_handle, env.ifname)
            except CniError:
                raise
            except Exception as e:
                raise CniError(
                    spec.DATAPLANE_FAILURE, f"cannot remove {env.ifname} from {env.netns}: {e}"
                ) from e
        try:
            self.ipam.release_by_handle(handle)
        except Exception as e:
            raise CniError(
                spec.IPAM_FAILURE, f"cannot release the addresses of handle {handle}: {e}"
            ) from e
        log.info("cni del handle=%s", handle)

    def check(self, plugin: str, env: CniEnv, config: NetConf) -> None:
        if config.prev_result is None:
            raise CniError(spec.INVALID_CONFIG, "CHECK needs prevResult (the cached ADD result)")
        if plugin == "ipam":
            return  # the allocation's existence is the IPAM library's own consistency check
        addresses = spec.result_addresses(config.prev_result)
        problems = self.plumbing.inspect(
            env.netns_handle, env.ifname, workload_id(env), addresses, config.requested_mac
        )
        if problems:
            raise CniError(
                spec.CHECK_FAILED,
                f"{env.ifname} in {env.netns} differs from its ADD result: {'; '.join(problems)}",
                "DEL and ADD the container again to rebuild its network",
            )

    def gc(self, config: NetConf) -> None:
        """Release this node's allocations of this network that no valid attachment owns,
        and remove their host veths (the pod side goes with them)."""
        if config.valid_attachments is None:
            # cnitool sends GC without the list; releasing everything would be a disaster.
            log.warning("cni gc without cni.dev/valid-attachments: nothing released")
            return
        owned = self._owned_handles()
        if owned is None:
            log.warning("cni gc: the IPAM backend cannot list handles; nothing released")
            return
        prefix = f"{config.name}."
        valid = {handle_id(config.name, a.container_id) for a in config.valid_attachments}
        stale = {h: a for h, a in owned.items() if h.startswith(prefix) and h not in valid}
        # A veth name is per workload: never remove one a valid attachment still uses.
        keep = {workload_of(a) for h, a in owned.items() if h not in stale}
        remove_host = getattr(self.plumbing, "remove_host", None)
        errors: list[str] = []
        for handle, attrs in sorted(stale.items()):
            workload = workload_of(attrs)
            try:
                # Interface first, as in DEL: the address must not outlive its host route.
                if remove_host is not None and workload and workload not in keep:
                    remove_host(workload)
                self.ipam.release_by_handle(handle)
                log.info("cni gc released handle=%s workload=%s", handle, workload)
            except Exception as e:  # keep going: GC must not stop at the first failure
                errors.append(f"{handle}: {e}")
        if errors:
            raise CniError(
                spec.IPAM_FAILURE,
                f"GC could not release {len(errors)} handle(s): {'; '.join(errors)}",
            )

    def _owned_handles(self) -> dict[str, dict[str, str]] | None:
        """This node's handles with their recorded attributes (empty when unknown)."""
        with_attrs = getattr(self.ipam, "allocations_for_node", None)
        if with_attrs is not None:
            return dict(with_attrs(self.node))
        lister = getattr(self.ipam, "handles_for_node", None)
        if lister is None:
            return None
        return {h: {} for h in lister(self.node)}

    @staticmethod
    def _quietly(what: str, fn: Callable[..., object], *args: object) -> None:
        # Rollback must not mask the error that triggered it.
        try:
            fn(*args)
        except Exception:
            log.exception("cni add rollback step failed step=%s args=%s", what, args)


def workload_of(attrs: dict[str, str]) -> str:
    """The workload an allocation's recorded attributes name (its host veth derives from it)."""
    return _workload(
        attrs.get("namespace", ""), attrs.get("pod", ""), attrs.get("container_id", "")
    )


def _default_routes(addresses: Sequence[str], via_gateway: bool = True) -> list[dict[str, object]]:
    # Delegated IPAM leaves the gateway to the calling plugin (ptp, bridge...).
    routes: list[dict[str, object]] = []
    if any(":" not in a for a in addresses):
        routes.append({"dst": "0.0.0.0/0", "gw": spec.GATEWAY_V4 if via_gateway else None})
    if any(":" in a for a in addresses):
        routes.append({"dst": "::/0", "gw": spec.GATEWAY_V6 if via_gateway else None})
    return routes
