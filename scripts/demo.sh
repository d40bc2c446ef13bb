#!/usr/bin/env bash
# The README's main command: set up the machine, then run the lab on the embedded SQLite
# datastore: four nodes on two underlay subnets (network namespaces joined by a router that
# knows no pod routes), a real overlay-agent per node, pods made by the real CNI plugin.
# `lab check` pings every pod pair and the external host and shows the path each took on
# the wire: direct inside a subnet, VXLAN across subnets, NAT to the external host. Pods
# are dual-stack (--ipv6): a second matrix shows IPv6, which rides the IPv4 VXLAN.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
name=${OVERLAY_LAB_NAME:-demo}

run() { echo "+ $*"; "$@"; }

# A lab left over from an interrupted run would make `lab up` refuse.
overlayctl lab down --name "$name" >/dev/null 2>&1 || true
trap 'echo "+ overlayctl lab down --name $name"; overlayctl lab down --name "$name"' EXIT

run overlayctl lab up --name "$name" --nodes 4 --subnets 2 --encap vxlan --mode cross-subnet \
    --pods-per-node 2 --ipv6
run overlayctl lab status --name "$name"
run ip netns exec "$name-node1" overlayctl status
run overlayctl lab check --name "$name"
