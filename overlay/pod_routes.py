"""Pod routes put back: the host route to a pod deleted by someone else is written again.

The CNI plumbing owns these routes: cni/pod.py writes `<pod ip>/32 dev cali... scope link`
at ADD, and DEL takes them away with the veth. Felix keeps such workload routes in place;
here the netlink monitor reports each deleted route that looks like one (protocol boot, a
host route, no gateway, an interface), and this keeper restores it only while its pod
lives: the address is still allocated to a workload of this node, and the route's
interface is still that workload's host veth. A route of anyone else, or of a pod being
deleted, is left alone. The checks read the datastore, so they run on a thread of their own,
never on the monitor's.
"""

from __future__ import annotations

import logging
import queue
import threading

from ipam.allocator import IPAM
from ipam.errors import IPAMError

log = logging.getLogger("overlay.pod_routes")


class PodRouteKeeper:
    def __init__(self, ipam: IPAM, node: str) -> None:
        self._ipam = ipam
        self._node = node
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
        while (item := self._todo.get()) is not None:
            try:
                self.restored += self.restore(*item)
            except Exception:  # one odd route must not end the keeper
                log.exception("event=pod_route_restore_failed dst=%s oif=%d", *item)

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
