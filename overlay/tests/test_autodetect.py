"""Underlay autodetection over synthetic interface lists: every method, its errors, MTU."""

from __future__ import annotations

import logging
import re

import netaddr
import pytest

from overlay.autodetect import (
    DEFAULT_HOST_MTU,
    AutodetectError,
    Interface,
    Underlay,
    detect,
    host_mtu,
)

NET = netaddr.IPNetwork
IP = netaddr.IPAddress


def iface(name: str, *addrs: str, mtu: int = 1500, up: bool = True, index: int = 0) -> Interface:
    return Interface(name, index, mtu, up, tuple(NET(a) for a in addrs))


LO = iface("lo", "127.0.0.1/8", "::1/128", mtu=65536, index=1)
DOCKER = iface("docker0", "172.17.0.1/16", index=2)
VXLAN = iface("vxlan.calico", "10.244.3.128/32", mtu=1450, index=3)
CALI = iface("cali12345", "169.254.1.1/32", index=4)
ETH0 = iface("eth0", "fe80::1/64", "10.0.1.5/24", "2001:db8::5/64", index=5)
ETH1 = iface("eth1", "192.168.7.9/25", mtu=9000, index=6)
HOST = [LO, DOCKER, VXLAN, CALI, ETH0, ETH1]


# ------------------------------------------------------------------ first-found


def test_first_found_skips_excluded_interfaces_and_keeps_the_prefix() -> None:
    assert detect("first-found", HOST) == Underlay("eth0", NET("10.0.1.5/24"))
    assert detect("", HOST) == ("eth0", NET("10.0.1.5/24"))  # the default method
    # netaddr compares networks without host bits: check the exact address too.
    assert str(detect("first-found", HOST).address) == "10.0.1.5/24"


@pytest.mark.parametrize(
    "name",
    [
        "docker0",
        "cbr0",
        "dummy0",
        "podman1",
        "virbr0",
        "lxcbr0",
        "veth1234",
        "lo",
        "br-abcdef",
        "cali0",
        "tunl0",
        "flannel.1",
        "kube-ipvs0",
        "cni0",
        "vxlan.calico",
        "vxlan-v6.calico",
        "wireguard.cali",
        "wg-v6.cali",
        "nodelocaldns",
    ],
)
def test_first_found_excludes_calicos_list(name: str) -> None:
    listing = [iface(name, "10.9.9.9/24"), iface("ens3", "10.0.0.7/16")]
    assert str(detect("first-found", listing).address) == "10.0.0.7/16"


def test_first_found_skips_link_local_loopback_and_down_interfaces() -> None:
    listing = [
        iface("eth0", "169.254.3.3/16", "fe80::2/64"),
        iface("eth1", "10.1.1.1/24", up=False),
        iface("eth2", "127.0.0.2/8"),
        iface("eth3", "10.2.2.2/24"),
    ]
    assert detect("first-found", listing) == ("eth3", NET("10.2.2.2/24"))


def test_first_found_ipv6_skips_link_local() -> None:
    found = detect("first-found", HOST, version=6)
    assert found.interface == "eth0" and str(found.address) == "2001:db8::5/64"


def test_first_found_error_lists_what_was_seen() -> None:
    with pytest.raises(AutodetectError) as e:
        detect("first-found", [LO, DOCKER, iface("eth0", "10.0.0.1/24", up=False)])
    msg = str(e.value)
    assert msg.startswith("first-found:")
    assert "docker0(up: 172.17.0.1/16)" in msg and "eth0(down: 10.0.0.1/24)" in msg


def test_skip_interface_adds_to_the_default_exclusions() -> None:
    found = detect("skip-interface=eth0", HOST)
    assert found == ("eth1", NET("192.168.7.9/25"))
    # docker0 and our own device stay excluded even though only eth.* was named.
    with pytest.raises(AutodetectError, match=re.escape("skip-interface=eth.*")):
        detect("skip-interface=eth.*", HOST)


def test_skip_interface_takes_a_list() -> None:
    listing = [iface("ens3", "10.0.0.1/24"), iface("ens4", "10.0.1.1/24"), ETH1]
    assert detect("skip-interface=ens3,ens4", listing).interface == "eth1"


# ------------------------------------------------------------------ interface=


def test_interface_regex_picks_a_matching_interface_even_if_normally_excluded() -> None:
    listing = [ETH0, iface("veth-uplink", "10.3.3.3/26")]
    assert detect("interface=veth.*", listing) == ("veth-uplink", NET("10.3.3.3/26"))


def test_interface_regexes_are_tried_in_the_order_given() -> None:
    assert detect("interface=eth1,eth0", HOST).interface == "eth1"
    assert detect("interface=eth0,eth1", HOST).interface == "eth0"
    assert detect("interface=nomatch,eth1", HOST).interface == "eth1"


def test_interface_never_picks_our_own_tunnel_devices() -> None:
    assert detect("interface=.*", [VXLAN, CALI, ETH1]).interface == "eth1"


def test_interface_errors() -> None:
    with pytest.raises(AutodetectError, match=r"interface=wlan\.\*: no up interface"):
        detect("interface=wlan.*", HOST)
    with pytest.raises(AutodetectError, match=r"invalid interface regex '\('"):
        detect("interface=(", HOST)
    with pytest.raises(AutodetectError, match="comma-separated list"):
        detect("interface=", HOST)


# ------------------------------------------------------------------ cidr=


def test_cidr_picks_the_address_inside_the_cidr() -> None:
    assert detect("cidr=192.168.0.0/16", HOST) == ("eth1", NET("192.168.7.9/25"))
    assert detect("cidr=172.31.0.0/16,10.0.0.0/8", HOST) == ("eth0", NET("10.0.1.5/24"))
    found = detect("cidr=2001:db8::/32", HOST, version=6)
    assert str(found.address) == "2001:db8::5/64"


def test_cidr_errors() -> None:
    with pytest.raises(AutodetectError, match=re.escape("cidr=10.99.0.0/16: no usable IPv4")):
        detect("cidr=10.99.0.0/16", HOST)
    with pytest.raises(AutodetectError, match="'banana' is not a CIDR"):
        detect("cidr=banana", HOST)


# ------------------------------------------------------------------ can-reach=


def test_can_reach_uses_the_route_lookup_and_the_interface_prefix() -> None:
    asked: list[netaddr.IPAddress] = []

    def lookup(addr: netaddr.IPAddress) -> tuple[str, netaddr.IPAddress]:
        asked.append(addr)
        return "eth1", IP("192.168.7.9")

    reached = detect("can-reach=8.8.8.8", HOST, route_lookup=lookup)
    assert asked == [IP("8.8.8.8")]
    assert reached.interface == "eth1" and str(reached.address) == "192.168.7.9/25"


def test_can_reach_errors() -> None:
    def unreachable(addr: netaddr.IPAddress) -> tuple[str, netaddr.IPAddress]:
        raise OSError(101, "Network is unreachable")

    with pytest.raises(
        AutodetectError, match=re.escape("can-reach=10.0.0.1: the kernel has no route")
    ):
        detect("can-reach=10.0.0.1", HOST, route_lookup=unreachable)
    with pytest.raises(AutodetectError, match="no route lookup"):
        detect("can-reach=10.0.0.1", HOST)
    with pytest.raises(AutodetectError, match="not an IP address"):
        detect("can-reach=example.com", HOST, route_lookup=unreachable)
    with pytest.raises(AutodetectError, match=re.escape("no interface carries 10.7.7.7")):
        detect("can-reach=10.0.0.1", HOST, route_lookup=lambda a: ("eth0", IP("10.7.7.7")))


# ------------------------------------------------------------------ fixed address


def test_fixed_address_without_prefix_takes_the_interface_prefix() -> None:
    found = detect("192.168.7.9", HOST)
    assert found.interface == "eth1" and str(found.address) == "192.168.7.9/25"


def test_fixed_address_with_prefix_is_used_as_given(caplog: pytest.LogCaptureFixture) -> None:
    found = detect("10.0.1.5/24", HOST)
    assert found.interface == "eth0" and str(found.address) == "10.0.1.5/24"
    with caplog.at_level(logging.WARNING):
        found = detect("10.0.1.5/16", HOST)
    assert str(found.address) == "10.0.1.5/16" and "carries it as 10.0.1.5/24" in caplog.text
    # Not on any interface but with a prefix: accepted, no interface known.
    found = detect("10.50.0.1/24", HOST)
    assert found.interface is None and str(found.address) == "10.50.0.1/24"


def test_fixed_address_without_prefix_and_not_present_is_an_error() -> None:
    with pytest.raises(AutodetectError, match=r"10.50.0.1: not on any interface.*10.50.0.1/24"):
        detect("10.50.0.1", HOST)


def test_unknown_method_names_the_choices() -> None:
    with pytest.raises(AutodetectError, match=r"'first_found'.*can-reach=ADDR"):
        detect("first_found", HOST)


# ------------------------------------------------------------------ MTU


def test_host_mtu_prefers_the_underlay_interface() -> None:
    listing = [iface("eth0", mtu=1500), iface("veth-node", mtu=1400)]
    assert host_mtu(listing, underlay="veth-node") == 1400


def test_host_mtu_smallest_matching_up_interface() -> None:
    listing = [
        iface("eth0", mtu=9000),
        iface("ens3", mtu=1450),
        iface("eth1", mtu=1200, up=False),  # down: ignored
        iface("docker0", mtu=1000),  # does not match the pattern
    ]
    assert host_mtu(listing) == 1450
    assert host_mtu(listing, r"^docker") == 1000


def test_host_mtu_default_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert host_mtu([LO, iface("veth0", mtu=1400)]) == DEFAULT_HOST_MTU == 1460
    assert "no up interface matches the MTU pattern" in caplog.text


def test_host_mtu_unknown_underlay_falls_back_to_pattern() -> None:
    assert host_mtu([iface("eth0", mtu=1400)], underlay="gone0") == 1400
