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
pods in this node's own blocks and restores a missing route (a pod in a block borrowed
from another node is left to the events: finding it would mean reading every block).
"""

from __future__ import annotations

import logging
import queue
import socket
import threading

from ipam.allocator import IPAM
from ipam.errors import IPAMError
from overlay.kernel import nlmsg
from overlay.kernel.batch import RtnlSocket
from overlay.model import MAIN_TABLE

log = logging.getLogger("overlay.pod_routes")


class PodRouteKeeper:
    def __init__(self, ipam: IPAM, node: str, interval: float = 90.0) -> None:
        self._ipam = ipam
        self._node = node
        self._interval = interval
        self._todo: queue.Queue[tuple[str, int] | None] = queue.Queue()
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

    def _work(self) -> None:
        self._catch_up_safely()
        while True:
            try:
                item = self._todo.get(timeout=self._interval)
            except queue.Empty:
                self._catch_up_safely()
                continue
            if item is None:
                return
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
        """Restore the missing host routes of the pods in this node's blocks; how many."""
        from cni.handlers import workload_of
        from cni.netlink import ifindex
        from cni.pod import host_veth_name, restore_host_route

        present = _pod_routes()
        restored = 0
        for cidr in self._ipam.affine_blocks(self._node):
            for held in self._ipam.allocations_in(cidr):
                workload = workload_of(held.attrs)
                if held.attrs.get("node") != self._node or not workload:
                    continue
                if not held.attrs.get("ifname"):
                    continue  # a tunnel address or another non-pod allocation
                host = host_veth_name(workload)
                index = ifindex(host)
                if index and (str(held.address), index) not in present:
                    restored += restore_host_route(host, index, str(held.address))
        return restored

    def restore(self, dst: str, oif: int) -> bool:
        """Write the route to `dst` on interface `oif` again if it is a living pod's."""
        from cni.handlers import workload_of  # the agent has these loaded by now
        from cni.pod import host_veth_name, restore_host_route

        try:
            held = self._ipam.get_attributes(dst)
        except IPAMError:
            return False  # not in any pool: not a pod's
        if held is None or held.attrs.get("node") != self._node:
            return False
        workload = workload_of(held.attrs)
        if not workload or not held.attrs.get("ifname"):
            return False  # a tunnel address or another non-pod allocation
        return restore_host_route(host_veth_name(workload), oif, dst)


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
