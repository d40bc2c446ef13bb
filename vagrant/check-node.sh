#!/usr/bin/env bash
# The VM half of vagrant/check; run as root on a node VM (the host script calls it through
# `vagrant ssh`). Pods are network namespaces made through the installed CNI plugin, as a
# container runtime would: exec /opt/cni/bin/overlay-cni with the CNI_* environment and the
# conflist's plugin configuration on stdin.
#
#   check-node.sh add POD                 -> "POD IP NODE SUBNET"
#   check-node.sh ping SRC DST:NODE:IP:SUBNET ...
#                                         -> "SRC DST answered|unanswered WIRE STATUS EXPECTED"
#   check-node.sh del POD ...             (never fails for missing things)
#   check-node.sh cleanup                 (drops the probe counters)
set -euo pipefail
# shellcheck source=/dev/null
. /etc/overlay/vagrant.env
CNI_BIN_DIR=/opt/cni/bin
CONFLIST=/etc/cni/net.d/10-overlay.conflist
TABLE=overlay-vagrant-check
NS_PREFIX=vchk-

plugin_config() {
    # The first plugin of the list with the list's cniVersion and name: what a runtime sends.
    python3 -c 'import json, sys
d = json.load(open(sys.argv[1]))
p = dict(d["plugins"][0], cniVersion=d["cniVersion"], name=d["name"])
print(json.dumps(p))' "$CONFLIST"
}

cni() { # VERB POD
    plugin_config | env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin CNI_COMMAND="$1" \
        CNI_CONTAINERID="$NS_PREFIX$2" CNI_NETNS="/run/netns/$NS_PREFIX$2" CNI_IFNAME=eth0 \
        CNI_PATH="$CNI_BIN_DIR" CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=check;K8S_POD_NAME=$2" \
        "$CNI_BIN_DIR/overlay-cni"
}

underlay_if() {
    ip -o -4 addr show | awk -v a="$NODE_IP" '{split($4, x, "/"); if (x[1] == a) print $2}' | head -n1
}

probe_table() {
    local dev
    dev=$(underlay_if)
    # Counted after encapsulation, on the way out of the underlay interface.
    nft -f - <<NFT
table inet $TABLE
delete table inet $TABLE
table inet $TABLE {
  counter vxlan { }
  counter ipip { }
  counter direct { }
  chain egress {
    type filter hook postrouting priority 300; policy accept;
    oifname "$dev" udp dport 4789 counter name "vxlan"
    oifname "$dev" ip protocol 4 counter name "ipip"
    oifname "$dev" ip saddr $POOL_CIDR ip daddr $POOL_CIDR counter name "direct"
  }
}
NFT
}

counters() { # -> "vxlan ipip direct" packet counts
    local name out=()
    for name in vxlan ipip direct; do
        out+=("$(nft list counter inet "$TABLE" "$name" | awk '/packets/ {print $2; exit}')")
    done
    echo "${out[*]}"
}

peer_paths() { # -> "node path" lines from the agent's own view
    "$VENV/bin/overlayctl" status -o json | python3 -c 'import json, sys
for p in json.load(sys.stdin).get("peers", []):
    print(p["node"], p["path"] or "none")'
}

cmd_add() {
    local pod=$1 ns=$NS_PREFIX$1 result addr
    ip netns add "$ns"
    if ! result=$(cni ADD "$pod"); then
        echo "check-node: CNI ADD of $pod on $NODE_NAME failed: $result" >&2
        ip netns del "$ns"
        exit 1
    fi
    addr=$(printf '%s' "$result" | python3 -c 'import json, sys
print(json.load(sys.stdin)["ips"][0]["address"].split("/")[0])')
    echo "$pod $addr $NODE_NAME $NODE_SUBNET"
}

cmd_ping() {
    local src=$1 spec dst node addr subnet before after wire status expected answered
    local -a b a
    shift
    probe_table
    declare -A path_of=()
    while read -r node status; do path_of[$node]=$status; done < <(peer_paths)
    for spec in "$@"; do
        IFS=: read -r dst node addr subnet <<<"$spec"
        if [ "$node" = "$NODE_NAME" ]; then
            expected=local status=local
        else
            status=${path_of[$node]:-none}
            if [ "$MODE" = cross-subnet ] && [ "$subnet" = "$NODE_SUBNET" ]; then
                expected=direct
            else
                expected=$ENCAP
            fi
        fi
        before=$(counters)
        answered=unanswered
        if ip netns exec "$NS_PREFIX$src" ping -n -q -c 1 -W 2 "$addr" >/dev/null 2>&1; then
            answered=answered
        fi
        after=$(counters)
        read -r -a b <<<"$before"
        read -r -a a <<<"$after"
        wire=unseen
        if [ "$node" = "$NODE_NAME" ]; then
            wire=local
        elif [ $((a[0] - b[0])) -gt 0 ]; then
            wire=vxlan
        elif [ $((a[1] - b[1])) -gt 0 ]; then
            wire=ipip
        elif [ $((a[2] - b[2])) -gt 0 ]; then
            wire=direct
        fi
        echo "$src $dst $answered $wire $status $expected"
    done
}

cmd_del() {
    local pod
    for pod in "$@"; do
        cni DEL "$pod" >/dev/null 2>&1 || echo "check-node: CNI DEL of $pod failed" >&2
        ip netns del "$NS_PREFIX$pod" 2>/dev/null || true
    done
}

case "${1:-}" in
    add) cmd_add "$2" ;;
    ping) shift; cmd_ping "$@" ;;
    del) shift; cmd_del "$@" ;;
    cleanup) nft delete table inet "$TABLE" 2>/dev/null || true ;;
    *) echo "usage: check-node.sh add POD | ping SRC DST:NODE:IP:SUBNET... | del POD... | cleanup" >&2
       exit 2 ;;
esac
