"""`overlay-agent`: one per node. Registers the node, keeps its dataplane converged with the
cluster, and serves the node's CNI requests.

Threads: the datastore watch (feeds views), the netlink monitor (kicks on drift), the CNI
socket server, the HTTP status endpoint; the reconciler runs in the main thread and is the
only writer of the dataplane.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import netaddr

from ipam.allocator import IPAM
from ipam.datastore import Datastore, DatastoreError, open_datastore, resolve_url
from ipam.datastore.fields import list_fields
from ipam.model import FelixConfiguration, IPPool, Node
from ipam.records import BLOCKS_PREFIX
from ipam.resources import FELIX_DEFAULT_NAME, ResourceError
from ipam.store import ResourceNotFound, ResourceStore, kind_prefix
from overlay import autodetect, nodes
from overlay.cni_service import exhaustion
from overlay.cold_start import (
    BLOCK_FIELDS,
    NODE_FIELDS,
    ColdRoutes,
    Declined,
    cold_peers,
    cold_routes,
    cold_tables,
    lenders,
)
from overlay.compute import (
    ComputeCache,
    DataplaneConfig,
    LocalNode,
    local_node_from,
    pools_without_nat,
)
from overlay.kernel.ethtool import checksum_offload_broken
from overlay.model import Action, Dataplane, Op, PeerPath, TunnelFilter
from overlay.plan import NHID_BASE
from overlay.pod_routes import PodRouteKeeper
from overlay.reconciler import Outcome, Reconciler
from overlay.settings import Flags, Settings, effective, felix_name
from overlay.status_http import Health, StatusServer
from overlay.view import ClusterView
from overlay.watch import ClusterWatcher, block_info_from_json

log = logging.getLogger("overlay.agent")

DEFAULT_STATE_DIR = "/var/lib/overlay"
DEFAULT_SOCKET = "/var/run/overlay/cni.sock"
DEFAULT_METRICS = "127.0.0.1:9099"
NONE = "none"  # an autodetection method: no underlay of that family (Calico's IP=none)
if TYPE_CHECKING:
    from overlay.kernel.apply import Kernel
    from overlay.kernel.monitor import Monitor
NODES_PREFIX = kind_prefix("Node")

STATUS_CACHE_SECONDS = 5.0
# The reconciler's loop comes round at least every 0.5 s, except during a pass: a cold
# pass at 50k peers takes ~4 s. Longer than this, and the writer is taken for hung.
LIVENESS_TIMEOUT = 60.0
# ~100 long-lived, acyclic container objects per peer: with the default thresholds the cyclic
# collector walked them again and again while the first pass built them (~30% of a cold start
# at 10k peers, more at 50k). Reference counting frees them and cycles are rare here, so the
# collector is paused until the first pass is over (for GC_PAUSE_MAX seconds at most, should
# the datastore be unreachable), and runs less often than by default after.
GC_PAUSE_MAX = 120.0
GC_RUNNING = (50_000, 20, 20)


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    datastore: str
    state_dir: Path
    socket: str
    autodetect: str = "first-found"
    # IPv6 underlay address detection (Calico's IP6_AUTODETECTION_METHOD): "none", or a
    # method as for IPv4. With an IPv6 underlay, IPv6 pods ride vxlan-v6.calico.
    autodetect6: str = "none"
    metrics_addr: str = DEFAULT_METRICS
    mtu: int | None = None  # pod MTU override; None: from the tunnel MTUs
    vtep_mac: str | None = None
    # Settings that a FelixConfiguration may also give; None: not given here, so this
    # node's FelixConfiguration, else the cluster's, else the default decides (settings.py).
    # The full resync is the safety net only: the netlink monitor repairs drift as it
    # happens. Default 90 s, as Calico; a full re-read of 10k peers costs ~0.5 s of CPU.
    resync_interval: float | None = None
    # Calico's FeatureDetectOverride ChecksumOffloadBroken: auto (kernel <= 5.7), true, false.
    checksum_offload_broken: str | None = None
    vxlan_vni: int | None = None
    vxlan_port: int | None = None
    vxlan_mtu: int | None = None  # the tunnel devices' MTUs; None: underlay MTU - overhead
    vxlan_mtu_v6: int | None = None
    ipip_mtu: int | None = None
    log_level: str | None = None
    nat_outgoing_address: str | None = None  # source of natOutgoing traffic; None: masquerade
    # How often the underlay is detected again, to follow a new address or interface (Felix
    # re-checks the parent every 10 s); 0 turns that off.
    underlay_check_interval: float = 10.0
    # Hosts that are no node but may send us VXLAN / IP-in-IP (Calico's externalNodesList).
    external_nodes: tuple[str, ...] | None = None

    @property
    def mtu_file(self) -> Path:
        return self.state_dir / "mtu"


class KeyValueFormatter(logging.Formatter):
    """One line per message line: ts=... level=... logger=... then the line (already k=v).

    A multi-line message (e.g. one record for a whole batch of kernel changes) becomes one
    complete line per line, each with the record's prefix; json: one object per line.
    """

    def __init__(self, as_json: bool = False) -> None:
        super().__init__()
        self.as_json = as_json
        self._second: tuple[int, str] = (-1, "")  # strftime once per second, not per record

    def _timestamp(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        cached = self._second  # one tuple: atomic for handlers in other threads
        if cached[0] != second:
            cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
            self._second = cached
        return f"{cached[1]}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        ts = self._timestamp(record)
        level = record.levelname.lower()
        msg = record.getMessage()
        if record.exc_info:
            msg += " exc=" + json.dumps(self.formatException(record.exc_info))
        if self.as_json:
            # Same text as json.dumps of the whole dict, with the prefix encoded once.
            head = json.dumps({"ts": ts, "level": level, "logger": record.name})[:-1]
            return "\n".join(f'{head}, "msg": {json.dumps(line)}}}' for line in msg.split("\n"))
        prefix = f"ts={ts} level={level} logger={record.name} "
        return prefix + msg.replace("\n", "\n" + prefix)


def _external_node(text: str) -> netaddr.IPNetwork:
    try:
        net = netaddr.IPNetwork(text.strip())
    except (netaddr.AddrFormatError, ValueError, TypeError):
        net = None
    if net is None or ("/" in text and net.ip != net.network):
        raise ValueError(f"external_nodes: {text!r} is not an IP address or network (CIDR)")
    return net


class _Underlays(NamedTuple):
    """The underlays as detected, IPv4 and IPv6 (None: none; one at least), with their
    MTUs."""

    v4: autodetect.Underlay | None
    mtu: int
    v6: autodetect.Underlay | None
    mtu6: int

    def pairs(self) -> tuple[tuple[autodetect.Underlay | None, int], ...]:
        return ((self.v4, self.mtu), (self.v6, self.mtu6))

    def addresses(self) -> str:
        return ",".join(str(u.address) for u, _ in self.pairs() if u is not None)

    def text(self) -> str:
        return repr([(u and (u.interface, str(u.address)), mtu) for u, mtu in self.pairs()])


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"log_level: {text!r} is not one of debug, info, warning, error, critical")
    return level


def _nat_address(text: str | None) -> netaddr.IPAddress | None:
    if text is None:
        return None
    try:
        address = netaddr.IPAddress(text.strip())
    except (netaddr.AddrFormatError, ValueError, TypeError):
        address = None
    if address is None or address.version != 4:
        raise ValueError(f"nat_outgoing_address: {text!r} is not an IPv4 address")
    return address


def _tunnel_addresses(node: Node | None) -> dict[str, str]:
    """This node's tunnel addresses by kind, for `overlayctl status`."""
    if node is None:
        return {}
    fields = (
        ("vxlan", node.ipv4_vxlan_tunnel_addr),
        ("vxlan-v6", node.ipv6_vxlan_tunnel_addr),
        ("ipip", node.ipv4_ipip_tunnel_addr),
    )
    return {kind: str(addr) for kind, addr in fields if addr is not None}


def _filter_status(f: TunnelFilter | None) -> dict[str, Any] | None:
    if f is None:
        return None
    tunnels = (["vxlan"] if f.vxlan_port is not None else []) + (["ipip"] if f.ipip else [])
    return {
        "tunnels": tunnels,
        "node_addresses": len(f.hosts),
        "external": sorted(str(n) for n in f.external),
    }


def _drop_metrics(version: int) -> dict[str, tuple[str, str, float]]:
    """The drop counters of the tunnel filter of outer IP `version` (read from nftables)."""
    from overlay.kernel.tunnel_filter import read_drops

    drops = read_drops(version=version)
    prefix, what = (
        ("overlay_tunnel", "Tunnelled") if version == 4 else ("overlay_tunnel6", "IPv6 VXLAN")
    )
    return {
        f"{prefix}_drops_unknown_host_total": (
            "counter",
            f"{what} packets dropped: not from a node's address nor --external-nodes",
            drops["unknown_hosts"],
        ),
        f"{prefix}_drops_from_pods_total": (
            "counter",
            f"{what} packets dropped: sent by a pod",
            drops["pods"],
        ),
    }


def _settings_status(s: Settings) -> dict[str, Any]:
    """Each setting's value and where it came from, for `overlayctl status`."""
    out: dict[str, Any] = {}
    for name, source in s.sources.items():
        value = getattr(s, name)
        if name == "external_nodes":
            value = [str(n) for n in value]
        elif name == "nat_outgoing_address" and value is not None:
            value = str(value)
        out[name] = {"value": value, "source": source}
    return out


def _pool_key(pools: list[IPPool]) -> str:
    return repr(sorted((p.name, repr(p)) for p in pools))


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.stop_event = threading.Event()
        self.started = time.time()
        self.ds: Datastore | None = None
        self.local: LocalNode | None = None
        self.node: Node | None = None
        self.pod_mtu = 1450
        self.nexthops = True
        if cfg.autodetect.strip() == NONE and cfg.autodetect6.strip() == NONE:
            raise ValueError(
                "ip_autodetection, ip6_autodetection: both 'none' leave this node without an "
                "underlay address"
            )
        if not cfg.underlay_check_interval >= 0:  # also refuses NaN
            raise ValueError(
                f"underlay_check_interval: {cfg.underlay_check_interval!r} is not a number of "
                "seconds >= 0"
            )
        if cfg.resync_interval is not None and not cfg.resync_interval >= 0:
            raise ValueError(
                f"resync_interval: {cfg.resync_interval!r} is not a number of seconds >= 0"
            )
        self._flags = Flags(
            vxlan_vni=cfg.vxlan_vni,
            vxlan_port=cfg.vxlan_port,
            vxlan_mtu=cfg.vxlan_mtu,
            vxlan_mtu_v6=cfg.vxlan_mtu_v6,
            ipip_mtu=cfg.ipip_mtu,
            resync_interval=cfg.resync_interval,
            external_nodes=None
            if cfg.external_nodes is None
            else tuple(map(_external_node, cfg.external_nodes)),
            checksum_offload_broken=cfg.checksum_offload_broken,
            log_level=_log_level(cfg.log_level) if cfg.log_level else None,
            nat_outgoing_address=_nat_address(cfg.nat_outgoing_address),
        )
        # Validated here: a bad flag is an error at start, naming the option and the value.
        self._settings = effective(self._flags, {}, cfg.node_name)
        self._dataplane_cfg = self._dataplane_config(self._settings)
        self.tx_checksum_off = self._dataplane_cfg.tx_checksum_off
        self._desired: Dataplane | None = None
        self._compute_cache = ComputeCache()  # per-peer pieces reused between views
        self._peers: list[PeerPath] = []  # as of the last pass, for status
        self._gc_paused: threading.Timer | None = None  # see pause_gc_until_first_pass()
        self._pools_seen: str | None = None
        self._pools: list[IPPool] = []
        self._view: ClusterView | None = None  # the latest, for the pod-route keeper
        self._underlay: autodetect.Underlay | None = None
        self._underlay_mtu = 1500
        self._underlay6: autodetect.Underlay | None = None  # None: no IPv6 underlay
        self._underlay6_mtu = 1500
        self._underlay_missing = False  # the last check found no underlay (warned once)
        self._underlay_changes = 0
        self._register_lock = threading.Lock()
        self._threads: list[threading.Thread] = []  # the loops the liveness probe watches
        self._monitor: Monitor | None = None  # the netlink monitor, once started
        self._pod_routes: PodRouteKeeper | None = None
        self.reconciler: Reconciler | None = None
        self._ipam: IPAM | None = None
        self._store: ResourceStore | None = None
        self._exhausted_at: tuple[float, str | None] | None = None
        self.watcher: ClusterWatcher | None = None
        # What the cold start wrote (cold_start.py): {changes, failed, duration}; None: none.
        self._cold: dict[str, float] | None = None

    # --- start-up ---------------------------------------------------------------------------

    def _find_underlay(self) -> _Underlays:
        """The underlays (interface, address with prefix) and their MTUs, as the host has
        them now."""
        from overlay.kernel import links

        interfaces = links.list_interfaces()
        found = found6 = None
        mtu = mtu6 = 1500
        if self.cfg.autodetect != NONE:
            found = autodetect.detect(
                self.cfg.autodetect, interfaces, route_lookup=links.route_lookup
            )
            mtu = autodetect.host_mtu(interfaces, underlay=found.interface)
        if self.cfg.autodetect6 != NONE:
            found6 = autodetect.detect(
                self.cfg.autodetect6, interfaces, version=6, route_lookup=links.route_lookup
            )
            mtu6 = autodetect.host_mtu(interfaces, underlay=found6.interface)
        return _Underlays(found, mtu, found6, mtu6)

    def _current(self) -> _Underlays:
        return _Underlays(self._underlay, self._underlay_mtu, self._underlay6, self._underlay6_mtu)

    def _take(self, found: _Underlays) -> None:
        self._underlay, self._underlay_mtu, self._underlay6, self._underlay6_mtu = found

    def _detect_underlay(self) -> None:
        self._take(self._find_underlay())
        for method, found, mtu in (
            (self.cfg.autodetect, self._underlay, self._underlay_mtu),
            (self.cfg.autodetect6, self._underlay6, self._underlay6_mtu),
        ):
            if found is not None:
                log.info(
                    "event=underlay_detected method=%s interface=%s address=%s mtu=%d",
                    method,
                    found.interface,
                    found.address,
                    mtu,
                )

    def check_underlay(self, store: ResourceStore, ipam: IPAM) -> bool:
        """Detect the underlay again (calico-node's address monitor, Felix's parent check).
        When its interface, address or MTU moved: register the new address, so that peers
        follow, and recompute our own dataplane (the tunnel device's parent and local
        address, same-subnet routes, MTUs). True when it moved. A failed detection keeps
        the last underlay: an interface that flaps must not take the node's address away."""
        old = self._current()
        try:
            found = self._find_underlay()
        except autodetect.AutodetectError as exc:
            if not self._underlay_missing:
                log.warning("event=underlay_check_failed keeping=%s error=%s", old.addresses(), exc)
            self._underlay_missing = True
            return False
        self._underlay_missing = False
        # Text, not ==: netaddr's equality ignores the host bits of an address with prefix.
        if found.text() == old.text():
            return False
        for (now, mtu), (was, was_mtu) in zip(found.pairs(), old.pairs(), strict=True):
            if (now and (now.interface, str(now.address)), mtu) != (
                was and (was.interface, str(was.address)),
                was_mtu,
            ):
                log.warning(
                    "event=underlay_changed interface=%s address=%s mtu=%d was_interface=%s "
                    "was_address=%s was_mtu=%d",
                    now and now.interface, now and now.address, mtu,
                    was and was.interface, was and was.address, was_mtu,
                )  # fmt: skip
        self._take(found)
        try:
            self.register(store, ipam)
        except DatastoreError:
            self._take(old)  # seen as a change again next time
            raise
        self._underlay_changes += 1
        if self.reconciler is not None:
            self.reconciler.kick("underlay changed", drift=False, recompute=True)
        return True

    def _watch_underlay(self, store: ResourceStore, ipam: IPAM) -> None:
        interval = self.cfg.underlay_check_interval
        while not self.stop_event.wait(interval):
            try:
                self.check_underlay(store, ipam)
            except DatastoreError as exc:
                log.warning("event=register_failed error=%s", exc)
            except Exception:  # the check must outlive any one failure
                log.exception("event=underlay_check_error")

    def register(self, store: ResourceStore, ipam: IPAM) -> None:
        """Create/update our Node and tunnel addresses; recompute MTU and the local node.
        Called by the watch thread (pools changed) and the underlay check: one at a time."""
        with self._register_lock:
            self._register(store, ipam)

    def _register(self, store: ResourceStore, ipam: IPAM) -> None:
        v4, v6 = self._underlay, self._underlay6
        assert v4 is not None or v6 is not None
        node = nodes.register_node(
            store,
            ipam,
            self.cfg.node_name,
            v4.address if v4 is not None else None,
            vtep_mac=self.cfg.vtep_mac,
            underlay6=v6.address if v6 is not None else None,
        )
        pools = store.list_pools()
        self._pools = pools
        self._write_pod_mtu(pools)
        self.node = node
        self.local = local_node_from(
            node,
            (v4.interface or "") if v4 is not None else "",
            underlay_mtu=self._underlay_mtu,
            underlay6_iface=(v6.interface or "") if v6 is not None else "",
            underlay6_mtu=self._underlay6_mtu,
        )
        self._pools_seen = _pool_key(pools)
        log.info(
            "event=node_registered node=%s underlay=%s vxlan_tunnel=%s vxlan_tunnel6=%s "
            "ipip_tunnel=%s pod_mtu=%d",
            node.name,
            node.ipv4_address,
            node.ipv4_vxlan_tunnel_addr,
            node.ipv6_vxlan_tunnel_addr,
            node.ipv4_ipip_tunnel_addr,
            self.pod_mtu,
        )
        for p in pools_without_nat(pools, ipv6_underlay=self._underlay6 is not None):
            log.warning(
                "event=nat_outgoing_not_applied pool=%s cidr=%s reason=ipv4_underlay",
                p.name,
                p.cidr,
            )

    # --- settings (flags, FelixConfigurations) ---------------------------------------------

    @staticmethod
    def _dataplane_config(s: Settings) -> DataplaneConfig:
        return DataplaneConfig(
            vxlan_mtu=s.vxlan_mtu,
            vxlan_mtu_v6=s.vxlan_mtu_v6,
            ipip_mtu=s.ipip_mtu,
            vxlan_vni=s.vxlan_vni,
            vxlan_port=s.vxlan_port,
            tx_checksum_off=checksum_offload_broken(os.uname().release, s.checksum_offload_broken),
            external_nodes=frozenset(s.external_nodes),
            nat_outgoing_address=s.nat_outgoing_address,
        )

    def _follow_settings(
        self, configs: Mapping[str, FelixConfiguration], *, at_start: bool = False
    ) -> None:
        """Take the settings these FelixConfigurations give; act on those that changed."""
        new = effective(self._flags, configs, self.cfg.node_name)
        old, self._settings = self._settings, new  # the sources may have moved regardless
        changed = old.changed(new)
        if not changed:
            return
        try:
            dataplane_cfg = self._dataplane_config(new)
        except ValueError as exc:  # the parser checks each field; this is the last guard
            log.error("event=config_refused error=%s", exc)
            self._settings = old
            return
        for name, value in changed.items():
            log.log(
                logging.INFO if at_start else logging.WARNING,
                "event=config_changed setting=%s value=%s source=%r",
                name,
                value,
                new.sources[name],
            )
        self._dataplane_cfg = dataplane_cfg
        self.tx_checksum_off = dataplane_cfg.tx_checksum_off
        if "log_level" in changed:  # main() set the level the flags give
            logging.getLogger().setLevel(new.log_level)
        interval = new.resync_interval or None  # 0: no periodic resync
        if self.reconciler is not None:
            self.reconciler.set_resync_interval(interval)
        if self._pod_routes is not None:
            self._pod_routes.interval = interval
        if {"vxlan_mtu", "vxlan_mtu_v6", "ipip_mtu"} & changed.keys() and self._underlay:
            with self._register_lock:
                self._write_pod_mtu(self._pools)

    def _write_pod_mtu(self, pools: list[IPPool]) -> None:
        s = self._settings
        encaps = nodes.encaps_in_use(pools, ipv6_underlay=self._underlay6 is not None)
        # One pod MTU for both families: the smaller underlay bounds both tunnels' MTUs.
        underlay_mtu = min(mtu for u, mtu in self._current().pairs() if u is not None)
        self.pod_mtu = nodes.mtu_for(
            underlay_mtu,
            encaps,
            self.cfg.mtu,
            {"vxlan": s.vxlan_mtu, "vxlan-v6": s.vxlan_mtu_v6, "ipip": s.ipip_mtu},
        )
        nodes.write_mtu_file(self.cfg.mtu_file, self.pod_mtu)

    def _compute(self, view: ClusterView) -> Dataplane:
        assert self.local is not None
        self._follow_settings(view.felix)
        desired = self._compute_cache.update(view, self.local, self._dataplane_cfg, peers=False)
        self._desired = desired
        return desired

    # --- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        rec = self.reconciler.stats() if self.reconciler else None
        watcher, desired = self.watcher, self._desired
        last_sync = None
        if rec is not None and rec.last_sync_time is not None:
            last_sync = time.time() - (time.monotonic() - rec.last_sync_time)
        return {
            "node": self.cfg.node_name,
            "agent": "up",
            "pid": os.getpid(),
            "started": self.started,
            "datastore": {
                "url": self.cfg.datastore,
                "reachable": watcher is not None and watcher.last_error is None,
                "error": watcher.last_error if watcher else None,
                "synced": bool(watcher and watcher.synced.is_set()),
                "revision": watcher.revision if watcher else 0,
            },
            "underlay": {
                "interface": self._underlay.interface if self._underlay else None,
                "address": str(self._underlay.address) if self._underlay else None,
                "mtu": self._underlay_mtu,
            },
            "underlay6": None
            if self._underlay6 is None
            else {
                "interface": self._underlay6.interface,
                "address": str(self._underlay6.address),
                "mtu": self._underlay6_mtu,
            },
            "pod_mtu": self.pod_mtu,
            "tunnel_addresses": _tunnel_addresses(self.node),
            "nexthop_objects": self.nexthops,
            "tx_checksum_offload": "off" if self.tx_checksum_off else "unchanged",
            "settings": _settings_status(self._settings),
            "tunnel_filter": _filter_status(desired.tunnel_filter if desired else None),
            "tunnel_filter6": _filter_status(desired.tunnel_filter6 if desired else None),
            "dataplane_synced": bool(rec and rec.last_sync_time is not None),
            "cold_start": self._cold,
            "last_sync": last_sync,
            "reconciler": rec.__dict__ if rec else None,
            "warnings": (nodes.check_node_address(self.node) if self.node else [])
            + [
                f"IPv6 pool {p.name} ({p.cidr}): natOutgoing is not applied (the underlay "
                "is IPv4: no IPv6 path out of the cluster to masquerade onto)"
                for p in pools_without_nat(self._pools, ipv6_underlay=self._underlay6 is not None)
            ],
            "peers": [
                {
                    "node": p.node,
                    "path": p.path.value if p.path else None,
                    "reason": p.reason,
                    "underlay": str(p.underlay) if p.underlay else None,
                }
                for p in self._peers
            ],
        }

    def health(self) -> Health:
        """The probes' answer. Not live: a thread of ours died, or the reconciler's loop
        has not come round for LIVENESS_TIMEOUT (a hung kernel call). Not ready: the
        datastore is not read or not reachable, or the dataplane is not programmed or its
        last passes failed."""
        not_live, not_ready = [], []
        for t in self._threads:
            if not t.is_alive():
                not_live.append(f"thread {t.name} has stopped")
        if self._monitor is not None and not self._monitor.alive:
            not_live.append("netlink monitor has stopped")
        if self._pod_routes is not None and not self._pod_routes.alive:
            not_live.append("pod route keeper has stopped")
        rec, watcher = self.reconciler, self.watcher
        if rec is not None and rec.heartbeat is not None:
            stuck = time.monotonic() - rec.heartbeat
            if stuck > LIVENESS_TIMEOUT:
                not_live.append(f"reconciler loop stuck for {stuck:.0f}s")
        if watcher is None or not watcher.synced.is_set():
            not_ready.append("datastore not read yet")
        elif watcher.last_error:
            not_ready.append(f"datastore unreachable: {watcher.last_error}")
        stats = rec.stats() if rec is not None else None
        if stats is None or stats.last_sync_time is None:
            # A complete cold start programmed it: ready while the normal pass checks it.
            if self._cold is None or self._cold["failed"]:
                not_ready.append("dataplane not programmed yet")
        elif stats.consecutive_failures:
            not_ready.append(
                f"last {stats.consecutive_failures} reconcile passes failed: {stats.last_error}"
            )
        return Health(not_live, not_live + not_ready)

    def metrics(self) -> dict[str, tuple[str, str, float]]:
        rec = self.reconciler.stats() if self.reconciler else None
        desired = self._desired
        m: dict[str, tuple[str, str, float]] = {
            "overlay_agent_up": ("gauge", "1 while the agent runs", 1),
        }
        if rec is not None:
            m.update(
                {
                    "overlay_syncs_total": ("counter", "Reconcile passes", rec.passes),
                    "overlay_kernel_reads_total": ("counter", "Kernel re-reads", rec.reads),
                    "overlay_sync_duration_seconds": (
                        "gauge",
                        "Duration of the last reconcile pass",
                        rec.last_duration or 0.0,
                    ),
                    "overlay_kernel_ops_total": (
                        "counter",
                        "Kernel changes applied (the cold start's too)",
                        rec.ops_applied + (self._cold["changes"] if self._cold else 0),
                    ),
                    "overlay_drift_repairs_total": (
                        "counter",
                        "Kernel objects repaired after someone else changed them",
                        rec.drift_repairs,
                    ),
                    "overlay_apply_failures_total": (
                        "counter",
                        "Kernel changes that failed",
                        rec.failures,
                    ),
                    "overlay_errors_total": ("counter", "Reconcile passes that raised", rec.errors),
                }
            )
        if desired is not None:
            m.update(
                {
                    "overlay_routes": ("gauge", "Routes programmed", len(desired.routes)),
                    "overlay_nexthops": ("gauge", "Nexthop objects", len(desired.nexthops)),
                    "overlay_neighbours": (
                        "gauge",
                        "Permanent neighbours",
                        len(desired.neighbours),
                    ),
                    "overlay_fdb_entries": ("gauge", "Permanent FDB entries", len(desired.fdb)),
                    "overlay_peers": ("gauge", "Remote nodes", len(self._peers)),
                    "overlay_tunnel_filter_hosts": (
                        "gauge",
                        "Node addresses the tunnel filter admits (0: no filter)",
                        len(desired.tunnel_filter.hosts) if desired.tunnel_filter else 0,
                    ),
                    "overlay_tunnel6_filter_hosts": (
                        "gauge",
                        "Node IPv6 addresses the vxlan-v6.calico filter admits (0: no filter)",
                        len(desired.tunnel_filter6.hosts) if desired.tunnel_filter6 else 0,
                    ),
                }
            )
            for version, f in ((4, desired.tunnel_filter), (6, desired.tunnel_filter6)):
                if f is not None:
                    m.update(_drop_metrics(version))
        m["overlay_pod_routes_restored_total"] = (
            "counter",
            "Host routes to pods that someone else deleted, written again",
            self._pod_routes.restored if self._pod_routes is not None else 0,
        )
        m["overlay_underlay_changes_total"] = (
            "counter",
            "Times the underlay address, interface or MTU was found changed",
            self._underlay_changes,
        )
        return m

    # --- main loop ----------------------------------------------------------------------------

    def _on_view(self, view: ClusterView, store: ResourceStore, ipam: IPAM) -> None:
        if self._view is None and self._pod_routes is not None:
            self._pod_routes.catch_up_soon()  # now with the pods' borrowed addresses
        self._view = view
        pools = list(view.pools)
        self._pools = pools
        key = _pool_key(pools)
        mine = view.nodes.get(self.cfg.node_name)
        lost = mine is None or (self.node is not None and self._identity_lost(mine))
        if key != self._pools_seen or lost:
            # Pools changed (tunnel addresses may be needed or freed) or our Node was
            # deleted/overwritten: register again before computing.
            try:
                # Not `return`: a pool change that leaves our Node as it was (CrossSubnet ->
                # Always) writes nothing, so no further view would ever bring it to the kernel.
                self.register(store, ipam)
            except DatastoreError as exc:
                log.warning("event=register_failed error=%s", exc)
        if self.reconciler is not None:
            self.reconciler.update_view(view)

    def _borrowed_here(self) -> list[str]:
        """Addresses of this node's pods in blocks of other nodes (or of none)."""
        view, me = self._view, self.cfg.node_name
        if view is None:
            return []
        return [str(a) for b in view.blocks for a, host in b.borrowed.items() if host == me]

    def _after_pass(self, outcome: Outcome) -> None:
        if outcome in (Outcome.SYNCED, Outcome.FAILED) and self._desired is not None:
            self._peers = self._compute_cache.peers()  # for status, after the kernel work
        if outcome in (Outcome.SYNCED, Outcome.FAILED) and self._gc_paused is not None:
            # The first pass is over. Its view and dataplane are most of what the agent will
            # ever hold: freeze them out of the collector's generations, so that later full
            # collections (and the latency of the passes that trigger them) skip them. The
            # cycles made meanwhile go first, or they would be frozen for good: netaddr's
            # IPv6 parsing leaves ~10 per address (10k IPv6 peers: ~120 MiB).
            self._gc_paused.cancel()
            self._gc_paused = None
            gc.collect()
            gc.freeze()
            gc.enable()

    def pause_gc_until_first_pass(self) -> None:
        gc.set_threshold(*GC_RUNNING)
        gc.disable()
        self._gc_paused = threading.Timer(GC_PAUSE_MAX, gc.enable)
        self._gc_paused.daemon = True
        self._gc_paused.start()

    def _identity_lost(self, stored: Node) -> bool:
        assert self.node is not None
        addresses = (str(self.node.ipv4_address), str(self.node.ipv6_address))
        return (str(stored.ipv4_address), str(stored.ipv6_address)) != addresses or (
            stored.ipv4_vxlan_tunnel_addr != self.node.ipv4_vxlan_tunnel_addr
            or stored.ipv6_vxlan_tunnel_addr != self.node.ipv6_vxlan_tunnel_addr
            or stored.ipv4_ipip_tunnel_addr != self.node.ipv4_ipip_tunnel_addr
        )

    def run(self) -> int:
        self._detect_underlay()
        # The probes answer from the start: live, and not ready until the datastore is read
        # and the dataplane programmed (a datastore down at start must not look like a hang).
        http = StatusServer(self.cfg.metrics_addr, self.status, self.metrics, self.health)
        http.start()
        try:
            return self._run()
        finally:
            http.stop()

    def _run(self) -> int:
        from cni.handlers import CniRequestHandler
        from cni.server import CniServer
        from overlay.cni_service import CniIpam
        from overlay.kernel.apply import Kernel
        from overlay.kernel.monitor import Monitor

        ds = self.ds = open_datastore(self.cfg.datastore)
        store = self._store = ResourceStore(ds)
        ipam = self._ipam = IPAM(ds, store)
        self._retry(lambda: self._start_settings(store), "read FelixConfigurations")
        self._retry(lambda: self.register(store, ipam), "register node")
        if self.stop_event.is_set():
            return 0

        kernel = Kernel()
        self.nexthops = kernel.supports_nexthops()
        if not self.nexthops:
            log.warning("event=no_nexthop_objects fallback=classic_routes")
        if self.nexthops:
            self._cold_start(ds, kernel)
        if self.tx_checksum_off:
            log.info(
                "event=tx_checksum_offload_off kernel=%s override=%s devices=tunnel",
                os.uname().release,
                self._settings.checksum_offload_broken,
            )
        self.reconciler = Reconciler(
            kernel,
            self._compute,
            resync_interval=self._settings.resync_interval or None,
            on_pass=self._after_pass,
        )
        self.watcher = ClusterWatcher(ds, lambda v: self._on_view(v, store, ipam))
        threads = [
            threading.Thread(
                target=self.watcher.run, args=(self.stop_event,), name="watch", daemon=True
            ),
        ]
        if self.cfg.underlay_check_interval > 0:
            threads.append(
                threading.Thread(
                    target=self._watch_underlay, args=(store, ipam), name="underlay", daemon=True
                )
            )
        keeper = self._pod_routes = PodRouteKeeper(
            ipam, self.cfg.node_name, self._settings.resync_interval or None, self._borrowed_here
        )
        monitor = Monitor(
            lambda reason: self.reconciler.kick(reason) if self.reconciler else None,
            # Exact deletions are repaired without re-reading the whole kernel.
            on_gone=lambda reason, gone: (
                self.reconciler.kick(reason, gone=gone) if self.reconciler else None
            ),
            on_pod_route_gone=keeper.route_deleted,
            own_port=kernel.port_id,  # our own changes echo back: skipped, no pass for them
        )
        self._threads = [*threads]
        self._monitor = monitor
        Path(self.cfg.socket).parent.mkdir(parents=True, exist_ok=True)
        handler = CniRequestHandler(
            CniIpam(ipam, store),
            self.cfg.node_name,
            mtu=lambda: self.pod_mtu,
            status=self._cni_status,
            ipam_gateway=self._ipam_gateway,
        )
        cni = CniServer(self.cfg.socket, handler)
        try:
            keeper.start()
            monitor.start()
            for t in threads:
                t.start()
            cni.start()
            log.info(
                "event=agent_started node=%s socket=%s metrics=%s",
                self.cfg.node_name,
                self.cfg.socket,
                self.cfg.metrics_addr,
            )
            self.reconciler.run(self.stop_event)
        finally:
            cni.stop()
            monitor.stop()
            keeper.stop()
            for t in threads:
                t.join(timeout=5)
            kernel.close()
            ds.close()
            log.info("event=agent_stopped node=%s", self.cfg.node_name)
        return 0

    def _cold_start(self, ds: Datastore, kernel: Kernel) -> None:
        """A kernel that holds nothing of ours is programmed straight from the records
        (cold_start.py): routes in place several times sooner at 10k peers. The normal first
        pass follows anyway and finds nothing, or only what the plan could not know, to do;
        the node is ready meanwhile when all was written."""
        assert self.local is not None
        started = time.monotonic()
        try:
            if kernel.holds_ours():
                return  # a restart: the normal pass changes only what differs
            peers = cold_peers(
                self.local,
                self._dataplane_cfg,
                self._pools,
                list_fields(ds, NODES_PREFIX, NODE_FIELDS),
                nodes_prefix=NODES_PREFIX,
            )

            def make_routes() -> ColdRoutes:
                blocks = list_fields(ds, BLOCKS_PREFIX, BLOCK_FIELDS)
                lent = {key: _lent(ds, key) for key in lenders(blocks, self.cfg.node_name)}
                return cold_routes(peers, blocks, lent, nhid_base=NHID_BASE)

            done, failed = kernel.program_cold(peers, make_routes)
        except Declined as exc:
            log.info("event=cold_start_declined reason=%r", str(exc))
            return
        except (DatastoreError, ValueError, OSError) as exc:
            log.warning("event=cold_start_failed error=%r", str(exc))
            return
        # The nftables tables after the routes, as apply() orders them.
        tables = cold_tables(peers, self._dataplane_cfg, self._pools)
        result = kernel.apply([Op(Action.SET, t) for t in tables if t is not None])
        done, failed = done + result.done, failed + len(result.failed)
        took = time.monotonic() - started
        self._cold = {"changes": done, "failed": failed, "duration": round(took, 3)}
        log.info("event=cold_start changes=%d failed=%d duration=%.3fs", done, failed, took)

    def _start_settings(self, store: ResourceStore) -> None:
        """The settings as the datastore has them at start (the watch follows them after).
        A corrupt record counts as absent, as the watch skips it too."""
        configs: dict[str, FelixConfiguration] = {}
        for name in (FELIX_DEFAULT_NAME, felix_name(self.cfg.node_name)):
            try:
                res = store.get("FelixConfiguration", name)
            except ResourceNotFound:
                continue
            except ResourceError as exc:
                log.warning("event=bad_record kind=FelixConfiguration name=%s error=%s", name, exc)
                continue
            if isinstance(res, FelixConfiguration):
                configs[name] = res
        self._follow_settings(configs, at_start=True)
        s = self._settings
        log.info(
            "event=settings %s",
            " ".join(f"{name}={getattr(s, name)}@{src!r}" for name, src in s.sources.items()),
        )

    def _ipam_gateway(self, address: str) -> tuple[str, str] | None:
        """For a delegating plugin (ptp): the address with its pool's prefix and this node's
        tunnel address as gateway. The tunnel address is reserved in IPAM, so no pod has it,
        and it lies in the pool, so the pod reaches it on-link. None: no such pool/tunnel."""
        node = self.node
        tunnel = node and (node.ipv4_vxlan_tunnel_addr or node.ipv4_ipip_tunnel_addr)
        if tunnel is None:
            return None
        ip = netaddr.IPNetwork(address).ip
        for pool in self._pools:
            if ip in pool.cidr and tunnel in pool.cidr:
                return f"{ip}/{pool.cidr.prefixlen}", str(tunnel)
        return None

    def _cni_status(self) -> None:
        from cni.spec import CniError

        if self.watcher is None or not self.watcher.synced.is_set():
            raise CniError(50, "overlay-agent has not read the datastore yet")
        if self.watcher.last_error:
            raise CniError(50, f"datastore unreachable: {self.watcher.last_error}")
        # Runtimes poll STATUS: reuse an answer for a few seconds (a full block listing).
        now = time.monotonic()
        if self._exhausted_at is None or now - self._exhausted_at[0] > STATUS_CACHE_SECONDS:
            assert self._ipam is not None and self._store is not None
            store = self._store
            node = store.get_node(self.cfg.node_name)
            why = exhaustion(
                self._ipam.utilization(), store.list_pools(), node.labels if node else {}
            )
            self._exhausted_at = (now, why)
        if self._exhausted_at[1] is not None:
            raise CniError(
                50, f"node {self.cfg.node_name} cannot get addresses: {self._exhausted_at[1]}"
            )

    def _retry(self, fn: Any, what: str, backoff_max: float = 10.0) -> None:
        delay = 0.2
        while not self.stop_event.is_set():
            try:
                fn()
                return
            except DatastoreError as exc:
                log.warning("event=retry what=%r error=%s in=%.1fs", what, exc, delay)
                self.stop_event.wait(delay)
                delay = min(delay * 2, backoff_max)

    def stop(self) -> None:
        self.stop_event.set()
        if self.reconciler is not None:
            self.reconciler.kick("stop", drift=False)


def _lent(ds: Datastore, key: str) -> dict[int, str]:
    """A block's borrowed addresses (address -> hosting node), decoded as the watch does."""
    kv = ds.get(key)
    if kv is None:
        raise Declined(f"block {key}: gone since it was listed")
    try:
        borrowed = block_info_from_json(kv.value).borrowed
    except (ValueError, KeyError, TypeError) as exc:  # the watch skips it: so does the plan
        raise Declined(f"block {key}: {exc}") from None
    return {int(address): host for address, host in borrowed.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="overlay-agent", description=__doc__.splitlines()[0])
    p.add_argument("--node-name", default=os.environ.get("OVERLAY_NODE_NAME"))
    p.add_argument("--datastore", default=None, help="datastore URL (else $OVERLAY_DATASTORE)")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    p.add_argument("--socket", default=DEFAULT_SOCKET, help="CNI socket path")
    p.add_argument(
        "--ip-autodetection",
        default="first-found",
        help="first-found | interface=REGEX | skip-interface=REGEX | cidr=CIDR | "
        "can-reach=ADDR | ADDR/PREFIX | none (an IPv6-only node: give --ip6-autodetection)",
    )
    p.add_argument(
        "--ip6-autodetection",
        default="none",
        help="none | the methods of --ip-autodetection, for an IPv6 underlay address "
        "(IPv6 pods then ride vxlan-v6.calico)",
    )
    p.add_argument("--metrics-addr", default=DEFAULT_METRICS)
    # Given here, these win over the FelixConfigurations (else: theirs, else the default).
    p.add_argument(
        "--resync-interval",
        type=float,
        default=None,
        help="seconds between full resyncs (0: none; default 90, or routeRefreshInterval)",
    )
    p.add_argument("--mtu", type=int, default=None, help="pod MTU (default: derived)")
    p.add_argument("--vtep-mac", default=None)
    p.add_argument("--vxlan-vni", type=int, default=None, help="default 4096, or vxlanVNI")
    p.add_argument("--vxlan-port", type=int, default=None, help="default 4789, or vxlanPort")
    p.add_argument(
        "--vxlan-mtu", type=int, default=None, help="default: underlay - 50, or vxlanMTU"
    )
    p.add_argument("--ipip-mtu", type=int, default=None, help="default: underlay - 20, or ipipMTU")
    p.add_argument(
        "--vxlan-mtu-v6", type=int, default=None, help="default: IPv6 underlay - 70, or vxlanMTUV6"
    )
    p.add_argument(
        "--checksum-offload-broken",
        default=None,
        help="auto | true | false: turn TX checksum offload off on the tunnel devices "
        "(auto: on kernels up to 5.7, as Calico does)",
    )
    p.add_argument(
        "--underlay-check-interval",
        type=float,
        default=AgentConfig.underlay_check_interval,
        help="seconds between checks for a new underlay address or interface (0: never)",
    )
    p.add_argument(
        "--external-nodes",
        default=None,
        help="CIDR[,CIDR...]: hosts that are no node but may send VXLAN / IP-in-IP to this one",
    )
    p.add_argument(
        "--nat-outgoing-address",
        default=None,
        help="IPv4 address to source-NAT natOutgoing traffic to (default: masquerade, or "
        "natOutgoingAddress)",
    )
    p.add_argument("--log-format", choices=("kv", "json"), default="kv")
    p.add_argument("--log-file", default=None)
    p.add_argument("--log-level", default=None, help="default info, or logSeverityScreen")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler: logging.Handler = (
        logging.FileHandler(args.log_file) if args.log_file else logging.StreamHandler()
    )
    handler.setFormatter(KeyValueFormatter(as_json=args.log_format == "json"))
    try:
        level = _log_level(args.log_level or "info")
    except ValueError as exc:
        print(f"overlay-agent: error: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(level=level, handlers=[handler], force=True)
    name = (args.node_name or socket.gethostname()).lower()
    cfg = AgentConfig(
        node_name=name,
        datastore=resolve_url(args.datastore),
        state_dir=Path(args.state_dir),
        socket=args.socket,
        autodetect=args.ip_autodetection,
        autodetect6=args.ip6_autodetection,
        metrics_addr=args.metrics_addr,
        resync_interval=args.resync_interval,
        mtu=args.mtu,
        vtep_mac=args.vtep_mac,
        checksum_offload_broken=args.checksum_offload_broken,
        vxlan_vni=args.vxlan_vni,
        vxlan_port=args.vxlan_port,
        vxlan_mtu=args.vxlan_mtu,
        vxlan_mtu_v6=args.vxlan_mtu_v6,
        ipip_mtu=args.ipip_mtu,
        log_level=args.log_level,
        nat_outgoing_address=args.nat_outgoing_address,
        underlay_check_interval=args.underlay_check_interval,
        external_nodes=None
        if args.external_nodes is None
        else tuple(x for x in args.external_nodes.split(",") if x.strip()),
    )
    try:
        agent = Agent(cfg)
    except ValueError as exc:
        print(f"overlay-agent: error: {exc}", file=sys.stderr)
        return 1
    agent.pause_gc_until_first_pass()
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    try:
        return agent.run()
    except (autodetect.AutodetectError, ValueError) as exc:
        log.error("event=fatal error=%s", exc)
        print(f"overlay-agent: error: {exc}", file=sys.stderr)
        return 1
