"""The least a Python program must do for a cold start: run by bench_floor.py in a namespace.

It reads the synthetic cluster of bench_agent.py from the SQLite file with SQLite's own
json_extract, makes `vxlan.calico`, and sends one neighbour, FDB entry, nexthop object and
nhid route per peer with our netlink encoders and batch socket. Nothing is checked or kept:
no model objects, no validation, no decisions (every peer is tunnelled, as in the bench),
no VTEP conflicts, no borrowed addresses, no state for later updates. It is a yardstick for
what the interpreter, the datastore and the kernel cost, not a way to run a node.

Usage (inside the node namespace): python bench/floor_program.py DB_FILE
"""

from __future__ import annotations

import hashlib
import socket
import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import netaddr

from overlay.kernel import nlmsg
from overlay.kernel.batch import RtnlSocket
from overlay.kernel.devices import ensure_device
from overlay.model import MAIN_TABLE, RT_PROTO, VXLAN_DEVICE, VxlanDevice

NODES = "SELECT json_extract(value, '$.metadata.name'), json_extract(value, '$.spec.bgp.ipv4Address'), json_extract(value, '$.spec.ipv4VXLANTunnelAddr') FROM kv WHERE key >= '/overlay/v1/resources/nodes/' AND key < '/overlay/v1/resources/nodes0'"  # noqa: E501
BLOCKS = "SELECT json_extract(value, '$.cidr'), json_extract(value, '$.affinity') FROM kv WHERE key >= '/overlay/v1/ipam/blocks/' AND key < '/overlay/v1/ipam/blocks0'"  # noqa: E501


def main(db_file: str) -> int:
    db = sqlite3.connect(db_file)
    nodes, blocks = db.execute(NODES).fetchall(), db.execute(BLOCKS).fetchall()
    sock = RtnlSocket(None)
    ensure_device(
        sock,
        VxlanDevice(VXLAN_DEVICE, 4096, 4789, netaddr.IPAddress("192.0.2.1"), "eth0",
                    "66:00:00:00:00:01", 1450, None),
    )  # fmt: skip
    dev = {name: i for i, name in sock.links().items()}[VXLAN_DEVICE]
    aton = socket.inet_aton
    l2, nexthops, routes = [], [], []
    nhids: dict[str, int] = {}
    for name, underlay, tunnel in nodes:
        if tunnel is None or underlay is None:
            continue
        mac, gw = b"\x66" + hashlib.sha1(name.encode()).digest()[:5], aton(tunnel)
        host = aton(underlay.partition("/")[0])
        l2 += [nlmsg.neighbour(True, dev, gw, mac), nlmsg.fdb(True, dev, mac, host)]
        nhids[name] = 0x10000 + len(nhids)
        nexthops.append(nlmsg.nexthop(True, nhids[name], gw, dev, True, RT_PROTO))
    for cidr, affinity in blocks:
        via = nhids.get(affinity[5:]) if affinity else None
        if via is not None:
            net, _, plen = cidr.partition("/")
            routes.append(nlmsg.route(True, aton(net), int(plen), table=MAIN_TABLE,
                                      protocol=RT_PROTO, nhid=via))  # fmt: skip
    failed = sock.batch(l2 + nexthops + routes)
    print(f"sent {len(l2) + len(nexthops) + len(routes)} failed {len(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
