"""nftables change events: which of our tables a transaction touched, and which process made it.

The kernel announces every committed nftables transaction on the netfilter netlink group
NFNLGRP_NFTABLES: one message per table, chain, rule, set or set element added or removed,
then NFT_MSG_NEWGEN carrying the pid of the process that committed it. We write our tables
by running `nft` (kernel/nft.py remembers those pids), so a transaction on one of our tables
by any other process is drift, and our own show up by pid. PURE decoding, plus the socket.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

from overlay.kernel import nlmsg
from overlay.kernel.batch import RCVBUF

NETLINK_NETFILTER = 12
SO_RCVBUFFORCE = 33
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFGENMSG = struct.Struct("=BBH")  # family, version, resource id (big endian)
# NFT_MSG_* that change something (NEW*/DEL* of tables, chains, rules, sets, elements)
# and the attribute holding the table name in each: number 1 in all of them.
_CHANGES = frozenset({0, 2, 3, 5, 6, 8, 9, 11, 12, 14})
_TABLE_ATTR = 1
NFT_MSG_NEWGEN = 15
NFTA_GEN_PROC_PID = 2
NFPROTO_IPV4 = 2
NFPROTO_IPV6 = 10
# nftables families by the number the kernel sends (inet, arp, bridge... are none of ours).
_FAMILIES = {NFPROTO_IPV4: "ip", NFPROTO_IPV6: "ip6"}

Table = tuple[str, str]  # (nftables family, table name), as nft names them: ("ip6", "t")


@dataclass
class Transactions:
    """Folds nftables events into (table, pid) pairs: one per watched table a committed
    transaction changed. Events of one transaction may arrive over several reads."""

    tables: frozenset[Table]
    _touched: set[Table] = field(default_factory=set)

    def feed(self, msg_type: int, payload: memoryview) -> list[tuple[Table, int]]:
        if msg_type >> 8 != NFNL_SUBSYS_NFTABLES:
            return []
        msg = msg_type & 0xFF
        if msg in _CHANGES:
            family = NFGENMSG.unpack_from(payload)[0]
            name = nlmsg.parse_attrs(payload, NFGENMSG.size).get(_TABLE_ATTR)
            if family in _FAMILIES and name is not None:
                table = (_FAMILIES[family], bytes(name).rstrip(b"\0").decode(errors="replace"))
                if table in self.tables:
                    self._touched.add(table)
            return []
        if msg == NFT_MSG_NEWGEN and self._touched:
            raw = nlmsg.parse_attrs(payload, NFGENMSG.size).get(NFTA_GEN_PROC_PID)
            pid = int.from_bytes(raw, "big") if raw is not None else 0
            done, self._touched = sorted(self._touched), set()
            return [(table, pid) for table in done]
        return []


def open_events() -> socket.socket:
    """A netfilter netlink socket subscribed to nftables changes (needs CAP_NET_ADMIN).
    The kernel announces each set element on its own: writing our filter for 50k nodes
    queues ~50k messages (~5 MB), so the buffer is large, or the burst would overflow and
    cost a full re-read."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.bind((0, 0))
        sock.setsockopt(nlmsg.SOL_NETLINK, nlmsg.NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
    except OSError:
        sock.close()
        raise
    return sock
