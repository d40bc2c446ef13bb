"""Pod routes put back: the host route to a pod deleted by someone else is written again.

The CNI plumbing owns these routes: cni/pod.py writes `<pod ip>/32 dev cali... scope link`
at ADD, and DEL takes them away with the veth. Felix keeps such workload routes in place;
here the netlink monitor reports each deleted route that looks like one (protocol boot, a
host route, no gateway, an interface), and this keeper restores it only while its pod
lives: the address is still allocated to a workload of this node, and the route's
interface is still that workload's host veth. A route of anyone else, or of a pod being
deleted, is left alone. The checks read the datastore, so they run on a thread of their own,
never on the monitor's.

Events can be missed: the agent was down when the route went, or the monitor's buffer
overflowed. So at start and then every `interval` seconds the keeper also looks over the
pods in this node's own blocks, and over the addresses this node's pods borrowed from other
nodes' blocks (`borrowed`, which the agent answers from its cluster view), and restores a
missing route.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
from collections.abc import Callable, Iterable

from ipam.allocator import IPAM
from ipam.block import Allocation
from ipam.errors import IPAMError
from overlay.kernel import nlmsg
from overlay.kernel.batch import RtnlSocket
from overlay.model import MAIN_TABLE

log = logging.getLogger("overlay.pod_routes")
_CATCH_UP = "catch-up"


class PodRouteKeeper:
    def __init__(
        self,
        ipam: IPAM,
        node: str,
        interval: float | None = 90.0,  # None: no periodic catch-up
        borrowed: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self._ipam = ipam
        self._node = node
        self.interval = interval  # the agent changes it with routeRefreshInterval
        self._borrowed = borrowed
        # A deleted route to check, a catch-up to run, or None to stop.
        self._todo: queue.Queue[tuple[str, int] | str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="pod-routes", daemon=True)
        self.restored = 0  # routes written again, for the metrics

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._todo.put(None)
        self._thread.join(timeout=5)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def route_deleted(self, dst: str, oif: int) -> None:
        """Called by the monitor for each deleted route that may be a pod's: cheap."""
        self._todo.put((dst, oif))

    def catch_up_soon(self) -> None:
        """Run a catch-up now (the agent calls it once its first cluster view, and so the
        borrowed addresses, are known; the one at start ran without them)."""
        self._todo.put(_CATCH_UP)

    def _work(self) -> None:
        self._catch_up_safely()
        while True:
            try:
                item = self._todo.get(timeout=self.interval)
            except queue.Empty:
                self._catch_up_safely()
                continue
            if item is None:
                return
            if isinstance(item, str):  # _CATCH_UP
                self._catch_up_safely()
                continue
            try:
                self.restored += self.restore(*item)
            except Exception:  # one odd route must not end the keeper
                log.exception("event=pod_route_restore_failed dst=%s oif=%d", *item)

    def _catch_up_safely(self) -> None:
        try:
            self.restored += self.catch_up()
        except Exception:  # the datastore may be down: the next round tries again
            log.exception("event=pod_route_catch_up_failed")

    def catch_up(self) -> int:
        """Restore the missing host routes of this node's pods, in its own blocks and
        borrowed from others; how many."""
        present = _pod_routes()
        held = [
            a
            for cidr in self._ipam.affine_blocks(self._node)
            for a in self._ipam.allocations_in(cidr)
        ]
        for addr in self._borrowed():
            with contextlib.suppress(IPAMError):  # its pool is gone: not routed anyway
                allocation = self._ipam.get_attributes(addr)
                if allocation is not None:
                    held.append(allocation)
        return sum(self._restore_missing(a, present) for a in held)

    def _restore_missing(self, held: Allocation, present: set[tuple[str, int]]) -> bool:
        from cni.netlink import ifindex
        from cni.pod import restore_host_route

        veth = self._veth_of(held)
        index = ifindex(veth) if veth else 0
        if not veth or not index or (str(held.address), index) in present:
            return False
        return restore_host_route(veth, index, str(held.address))

    def restore(self, dst: str, oif: int) -> bool:
        """Write the route to `dst` on interface `oif` again if it is a living pod's."""
        from cni.pod import restore_host_route  # the agent has it loaded by now

        try:
            held = self._ipam.get_attributes(dst)
        except IPAMError:
            return False  # not in any pool: not a pod's
        veth = self._veth_of(held) if held is not None else None
        return veth is not None and restore_host_route(veth, oif, dst)

    def _veth_of(self, held: Allocation) -> str | None:
        """The host veth of the pod holding this allocation, if it is a pod of this node
        (not a tunnel address or another non-pod allocation)."""
        from cni.handlers import workload_of
        from cni.pod import host_veth_name

        workload = workload_of(held.attrs)
        if held.attrs.get("node") != self._node or not workload or not held.attrs.get("ifname"):
            return None
        return host_veth_name(workload)


def _pod_routes() -> set[tuple[str, int]]:
    """(address, ifindex) of the host routes with protocol boot in the main table."""
    found = set()
    with RtnlSocket(None) as sock:
        for family in (socket.AF_INET, socket.AF_INET6):
            request = nlmsg.dump_routes(family, MAIN_TABLE, nlmsg.RTPROT_BOOT)
            for _type, payload in sock.dump(request):
                r = nlmsg.decode_route(payload)
                if r.protocol == nlmsg.RTPROT_BOOT and r.dst_len == 8 * len(r.dst) and r.oif:
                    found.add((socket.inet_ntop(family, r.dst), r.oif))
    return found
