"""The nft scripts of NAT-outgoing: `ip overlay-nat` and its IPv6 twin (PURE)."""

from __future__ import annotations

import pytest
from netaddr import IPAddress, IPNetwork

from overlay.kernel import nat
from overlay.kernel.apply import describe
from overlay.model import Action, NatOutgoing, Op

POOL, OTHER = IPNetwork("10.244.0.0/16"), IPNetwork("10.245.0.0/16")
POOL6, OTHER6 = IPNetwork("fd00:10:244::/48"), IPNetwork("fd00:10:246::/48")

IPV4 = """\
table ip overlay-nat
delete table ip overlay-nat
table ip overlay-nat {
  set pools { type ipv4_addr; flags interval; elements = { 10.244.0.0/15 } }
  set sources { type ipv4_addr; flags interval; elements = { 10.244.0.0/16 } }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr @sources ip daddr != @pools masquerade
  }
}
"""

IPV6 = """\
table ip6 overlay-nat
delete table ip6 overlay-nat
table ip6 overlay-nat {
  set pools { type ipv6_addr; flags interval; elements = { fd00:10:244::/48, fd00:10:246::/48 } }
  set sources { type ipv6_addr; flags interval; elements = { fd00:10:244::/48 } }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    ip6 saddr @sources ip6 daddr != @pools masquerade
  }
}
"""


def nat6(*sources: IPNetwork, pools: tuple[IPNetwork, ...] = (POOL6, OTHER6)) -> NatOutgoing:
    return NatOutgoing(frozenset(sources), frozenset(pools), version=6)


def test_the_ipv4_script_is_as_it_was() -> None:
    assert nat.render(NatOutgoing(frozenset({POOL}), frozenset({POOL, OTHER}))) == IPV4
    assert nat.render(None) == "table ip overlay-nat\ndelete table ip overlay-nat\n"


def test_the_ipv6_script_uses_ipv6_sets_and_matches_and_only_masquerades() -> None:
    assert nat.render(nat6(POOL6)) == IPV6
    # Networks of the other family are no part of a table (the kernel would refuse them).
    mixed = NatOutgoing(frozenset({POOL6, POOL}), frozenset({POOL6, OTHER6, OTHER}), version=6)
    assert nat.render(mixed) == IPV6
    assert "ip6" not in nat.render(NatOutgoing(frozenset({POOL, POOL6}), frozenset({POOL6})))


@pytest.mark.parametrize("version", [4, 6])
def test_no_source_of_its_version_only_deletes_the_table_of_that_version(version: int) -> None:
    family = "ip" if version == 4 else "ip6"
    head = f"table {family} overlay-nat\ndelete table {family} overlay-nat\n"
    assert nat.render(None, version) == head
    other = POOL6 if version == 4 else POOL
    assert nat.render(NatOutgoing(frozenset({other}), frozenset(), version=version)) == head
    assert (nat.family(version), nat.kind(version)) == (family, "nat" if version == 4 else "nat6")


def test_a_version_that_contradicts_the_nat_or_is_unknown_is_refused() -> None:
    with pytest.raises(ValueError, match="version: 4 contradicts the NAT's version 6"):
        nat.render(nat6(POOL6), 4)
    with pytest.raises(ValueError, match="version: 5 is neither 4 nor 6"):
        nat.render(None, 5)
    with pytest.raises(ValueError, match="version: 5 is neither 4 nor 6"):
        NatOutgoing(frozenset(), frozenset(), version=5)
    # An IPv6 table cannot source-NAT to an IPv4 address (natOutgoingAddress is IPv4).
    with pytest.raises(ValueError, match=r"address: 192\.0\.2\.9 is not an IPv6 address"):
        NatOutgoing(frozenset({POOL6}), frozenset(), IPAddress("192.0.2.9"), 6)


def test_normalized_keeps_the_networks_of_its_own_version_merged() -> None:
    half = IPNetwork("fd00:10:244:8000::/49")
    got = NatOutgoing(frozenset({POOL6, half, POOL}), frozenset({OTHER6, OTHER}), version=6)
    assert got.normalized() == nat6(POOL6, pools=(POOL6, OTHER6))
    assert nat6(pools=(POOL6,)).normalized() is None
    v4 = NatOutgoing(frozenset({POOL, POOL6}), frozenset({OTHER, OTHER6}))
    assert v4.normalized() == NatOutgoing(
        frozenset({POOL}), frozenset({IPNetwork("10.244.0.0/15")})
    )


def test_log_events_name_the_table_of_the_version() -> None:
    assert describe(Op(Action.SET, nat6(POOL6))) == "event=nat6_set"
    assert describe(Op(Action.DELETE, nat6(POOL6))) == "event=nat6_deleted"
    v4 = NatOutgoing(frozenset({POOL}), frozenset({POOL}))
    assert describe(Op(Action.SET, v4)) == "event=nat_set"
