#!/usr/bin/env bash
# The README's main command: set up the machine, then run the lab on the embedded SQLite
# datastore: four nodes on two underlay subnets (network namespaces joined by a router that
# knows no pod routes), a real overlay-agent per node, pods made by the real CNI plugin.
# `lab check` pings every pod pair and the external host and shows the path each took on
# the wire: direct inside a subnet, VXLAN across subnets, NAT to the external host. Pods
# are dual-stack (--ipv6): a second matrix shows IPv6, which rides the IPv4 VXLAN. Then one
# FelixConfiguration moves every node's VXLAN to UDP 8472 and VNI 4097 (as where 4789 is
# blocked), and the check runs again: the same paths, now counted on the new port.
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

db=$(overlayctl lab status --name "$name" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["datastore"])')
echo "+ overlayctl apply -f - (FelixConfiguration default: vxlanPort 8472, vxlanVNI 4097)"
overlayctl --datastore "$db" apply -f - <<'YAML'
apiVersion: projectcalico.org/v3
kind: FelixConfiguration
metadata:
  name: default
spec:
  vxlanPort: 8472
  vxlanVNI: 4097
YAML
# Bounded wait until every node has made its device again (a fraction of a second).
for i in $(seq 100); do
    moved=0
    for n in $(seq 4); do
        ip -d -n "$name-node$n" link show vxlan.calico 2>/dev/null | grep -q "id 4097 .*dstport 8472" \
            && moved=$((moved + 1))
    done
    [ "$moved" -eq 4 ] && break
    sleep 0.1
done
echo "+ ip -d -n $name-node1 link show vxlan.calico | grep -o 'vxlan id .* dstport [0-9]*'"
ip -d -n "$name-node1" link show vxlan.calico | grep -o 'vxlan id .* dstport [0-9]*'
run overlayctl lab check --name "$name"
