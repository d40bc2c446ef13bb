"""The nft scripts of the tunnel filters: `ip overlay-filter` and its IPv6 twin (PURE)."""

from __future__ import annotations

import pytest
from netaddr import IPAddress, IPNetwork

from overlay.kernel.apply import describe
from overlay.kernel.tunnel_filter import render, render_hosts
from overlay.model import Action, Op, TunnelFilter, TunnelHosts

A, B = IPAddress("192.0.2.11"), IPAddress("192.0.2.12")
A6, B6 = IPAddress("2001:db8::11"), IPAddress("2001:db8::12")

IPV4 = """\
table ip overlay-filter
delete table ip overlay-filter
table ip overlay-filter {
  set hosts { type ipv4_addr; elements = { 192.0.2.11, 192.0.2.12 }; }
  set external { type ipv4_addr; flags interval; elements = { 203.0.113.0/24 }; }
  chain input {
    type filter hook input priority filter; policy accept;
    iifname "cali*" udp dport 4789 counter drop comment "vxlan 4789 from pods"
    udp dport 4789 ip saddr != @hosts ip saddr != @external counter drop \
comment "vxlan 4789 from unknown hosts"
    iifname "cali*" ip protocol 4 counter drop comment "ipip from pods"
    ip protocol 4 ip saddr != @hosts ip saddr != @external counter drop \
comment "ipip from unknown hosts"
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname "cali*" udp dport 4789 counter drop comment "vxlan 4789 from pods"
    iifname "cali*" ip protocol 4 counter drop comment "ipip from pods"
  }
}
"""

IPV6 = """\
table ip6 overlay-filter
delete table ip6 overlay-filter
table ip6 overlay-filter {
  set hosts { type ipv6_addr; elements = { 2001:db8::11, 2001:db8::12 }; }
  set external { type ipv6_addr; flags interval; elements = { 2001:db8:1::/48 }; }
  chain input {
    type filter hook input priority filter; policy accept;
    iifname "cali*" udp dport 8472 counter drop comment "vxlan 8472 from pods"
    udp dport 8472 ip6 saddr != @hosts ip6 saddr != @external counter drop \
comment "vxlan 8472 from unknown hosts"
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname "cali*" udp dport 8472 counter drop comment "vxlan 8472 from pods"
  }
}
"""


def test_the_ipv4_table_is_unchanged() -> None:
    external = frozenset({IPNetwork("203.0.113.0/24")})
    assert render(TunnelFilter(frozenset({A, B}), 4789, True, external)) == IPV4


def test_the_ipv6_table_matches_ip6_sources_and_has_no_ipip_rules() -> None:
    external = frozenset({IPNetwork("2001:db8:1::/48")})
    f = TunnelFilter(frozenset({B6, A6}), 8472, False, external, version=6)
    assert render(f) == IPV6
    assert render(f, version=6) == IPV6  # naming the filter's own version is fine


def test_an_empty_ipv6_filter_still_goes_to_the_ip6_table() -> None:
    script = render(TunnelFilter(frozenset(), 4789, False, version=6))
    assert script.startswith("table ip6 overlay-filter\ndelete table ip6 overlay-filter\n")
    assert "set hosts { type ipv6_addr; }" in script
    assert "udp dport 4789 ip6 saddr != @hosts ip6 saddr != @external" in script


def test_a_deletion_names_its_table_by_version() -> None:
    assert render(None) == "table ip overlay-filter\ndelete table ip overlay-filter\n"
    assert render(None, 6) == "table ip6 overlay-filter\ndelete table ip6 overlay-filter\n"


def test_host_changes_go_to_the_table_of_their_version() -> None:
    change = TunnelHosts(add=frozenset({A6}), remove=frozenset({B6}), version=6)
    assert render_hosts(change) == (
        "add element ip6 overlay-filter hosts { 2001:db8::11 }\n"
        "delete element ip6 overlay-filter hosts { 2001:db8::12 }\n"
    )
    v4 = TunnelHosts(add=frozenset({A}), remove=frozenset())
    assert render_hosts(v4) == "add element ip overlay-filter hosts { 192.0.2.11 }\n"


def test_a_version_that_contradicts_the_filter_or_is_unknown_is_refused() -> None:
    f6 = TunnelFilter(frozenset({A6}), 4789, False, version=6)
    with pytest.raises(ValueError, match="version: 4 contradicts the filter's version 6"):
        render(f6, version=4)
    with pytest.raises(ValueError, match="version: 5 is neither 4 nor 6"):
        render(None, 5)
    with pytest.raises(ValueError, match="version: 5 is neither 4 nor 6"):
        render_hosts(TunnelHosts(frozenset({A}), frozenset(), version=5))


def test_the_model_refuses_an_ipip_rule_or_an_unknown_version() -> None:
    with pytest.raises(ValueError, match="ipip: True needs version 4"):
        TunnelFilter(frozenset(), None, True, version=6)
    with pytest.raises(ValueError, match="version: 5 is neither 4 nor 6"):
        TunnelFilter(frozenset(), 4789, False, version=5)


def test_log_events_name_the_ipv6_table_apart() -> None:
    f6 = TunnelFilter(frozenset(), 4789, False, version=6)
    assert describe(Op(Action.SET, f6)).startswith("event=tunnel_filter6_set vxlan_port=4789")
    assert describe(Op(Action.DELETE, f6)).startswith("event=tunnel_filter6_deleted")
    hosts = TunnelHosts(frozenset({A6}), frozenset(), version=6)
    assert describe(Op(Action.SET, hosts)) == "event=tunnel_filter6_hosts_set added=1 removed=0"
    assert describe(Op(Action.SET, TunnelFilter(frozenset(), 4789, False))).startswith(
        "event=tunnel_filter_set"
    )
