#!/usr/bin/env bash
# The router VM: forwards IPv4 between the two underlay subnets and nothing more. It has no
# route to any pod address, so pods on different subnets can only talk through a tunnel.
set -euo pipefail

cat >/etc/sysctl.d/90-overlay-router.conf <<'CONF'
# Written by vagrant/provision/router.sh
net.ipv4.ip_forward = 1
CONF
sysctl -q -p /etc/sysctl.d/90-overlay-router.conf

export DEBIAN_FRONTEND=noninteractive
if ! command -v tcpdump >/dev/null; then
    # For watching the encapsulated traffic cross: tcpdump -ni any 'udp port 4789 or ip proto 4'
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends tcpdump >/dev/null
fi
echo "router: forwarding between the underlay subnets"
