#!/usr/bin/env bash
# The README's main command: set up the machine, then run the demo on the embedded SQLite
# datastore: apply a Calico IPPool manifest, hand out addresses to three nodes in parallel,
# show the books, and check them for leaks.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
work=$(mktemp -d /tmp/overlay-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
export OVERLAY_DATASTORE="sqlite://$work/overlay.db"

run() { echo "+ $*"; "$@"; }

cat > "$work/pools.yaml" <<'YAML'
apiVersion: projectcalico.org/v3
kind: IPPool
metadata:
  name: default-ipv4-ippool
spec:
  cidr: 10.244.0.0/16
  blockSize: 26
  vxlanMode: CrossSubnet
  ipipMode: Never
  natOutgoing: true
  nodeSelector: all()
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata:
  name: default-ipv6-ippool
spec:
  cidr: fd00:244::/48
  blockSize: 122
  vxlanMode: CrossSubnet
YAML
run overlayctl apply -f "$work/pools.yaml"
run overlayctl get ippools
echo "+ 3 nodes x 4 pods, assigned in parallel"
for node in node-1 node-2 node-3; do
    for pod in 1 2 3 4; do
        overlayctl ipam assign --node "$node" --handle "k8s-pod-network.$node-pod-$pod" \
            --attr namespace=default --attr pod="$node-pod-$pod" > "$work/$node-$pod" &
    done
done
wait
for f in "$work"/node-*; do printf '%s -> %s\n' "$(basename "$f")" "$(cat "$f")"; done
run overlayctl ipam assign --node node-1 --handle k8s-pod-network.v6-pod --ipv6
run overlayctl ipam show --show-blocks
run overlayctl ipam release --handle k8s-pod-network.node-2-pod-1
run overlayctl ipam check
