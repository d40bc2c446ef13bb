"""nftables change events folded into ((family, table), pid) per committed transaction."""

from __future__ import annotations

import struct

from overlay.kernel import nlmsg
from overlay.kernel.nftevents import (
    NFGENMSG,
    NFNL_SUBSYS_NFTABLES,
    NFPROTO_IPV4,
    NFPROTO_IPV6,
    NFT_MSG_NEWGEN,
    NFTA_GEN_PROC_PID,
    Transactions,
)

NFT_MSG_DELRULE, NFT_MSG_NEWSETELEM, NFT_MSG_GETTABLE = 8, 12, 1
NFPROTO_INET = 1
FILTER, FILTER6, NAT = ("ip", "overlay-filter"), ("ip6", "overlay-filter"), ("ip", "overlay-nat")


def event(msg: int, family: int, table: str) -> tuple[int, memoryview]:
    body = NFGENMSG.pack(family, 0, 0) + nlmsg.attr(1, table.encode() + b"\0")
    return NFNL_SUBSYS_NFTABLES << 8 | msg, memoryview(body)


def newgen(pid: int) -> tuple[int, memoryview]:
    body = NFGENMSG.pack(0, 0, 0) + nlmsg.attr(1, struct.pack(">I", 77))
    body += nlmsg.attr(NFTA_GEN_PROC_PID, struct.pack(">I", pid))
    return NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN, memoryview(body)


def test_a_transaction_on_our_table_is_reported_once_with_its_pid() -> None:
    t = Transactions(frozenset({FILTER, NAT}))
    assert t.feed(*event(NFT_MSG_DELRULE, NFPROTO_IPV4, "overlay-filter")) == []
    assert t.feed(*event(NFT_MSG_NEWSETELEM, NFPROTO_IPV4, "overlay-filter")) == []
    assert t.feed(*newgen(4242)) == [(FILTER, 4242)]
    assert t.feed(*newgen(4243)) == []  # that transaction touched nothing of ours


def test_other_tables_families_and_reads_are_not_reported() -> None:
    t = Transactions(frozenset({FILTER}))
    t.feed(*event(NFT_MSG_DELRULE, NFPROTO_IPV4, "firewalld"))
    t.feed(*event(NFT_MSG_DELRULE, NFPROTO_INET, "overlay-filter"))  # a namesake, not ours
    t.feed(*event(NFT_MSG_DELRULE, NFPROTO_IPV6, "overlay-filter"))  # not watched here
    t.feed(*event(NFT_MSG_GETTABLE, NFPROTO_IPV4, "overlay-filter"))  # not a change
    assert t.feed(*newgen(1)) == []


def test_both_tables_in_one_transaction_and_other_subsystems() -> None:
    t = Transactions(frozenset({FILTER, NAT}))
    t.feed(*event(NFT_MSG_DELRULE, NFPROTO_IPV4, "overlay-nat"))
    t.feed(*event(NFT_MSG_DELRULE, NFPROTO_IPV4, "overlay-filter"))
    t.feed(1 << 8 | NFT_MSG_NEWGEN, memoryview(b""))  # another nfnetlink subsystem: ignored
    assert t.feed(*newgen(9)) == [(FILTER, 9), (NAT, 9)]


def test_the_ip6_namesake_of_our_ip_table_is_reported_apart() -> None:
    t = Transactions(frozenset({FILTER, FILTER6}))
    t.feed(*event(NFT_MSG_NEWSETELEM, NFPROTO_IPV6, "overlay-filter"))
    assert t.feed(*newgen(7)) == [(FILTER6, 7)]
    t.feed(*event(NFT_MSG_DELRULE, NFPROTO_IPV6, "overlay-filter"))
    t.feed(*event(NFT_MSG_DELRULE, NFPROTO_IPV4, "overlay-filter"))
    assert t.feed(*newgen(8)) == [(FILTER, 8), (FILTER6, 8)]
