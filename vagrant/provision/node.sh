#!/usr/bin/env bash
# A node VM: its route to the other underlay subnet (via the router VM), an etcd member when
# chosen, the project in /opt/overlay/venv, `overlayctl install --start` (CNI plugins,
# agent configuration, systemd unit) and, on the last node, the IP pool.
# Every value comes from the Vagrantfile's `env:`; re-running it converges again.
set -euo pipefail

for var in NODE_NAME NODE_IP NODE_SUBNET OTHER_SUBNET ROUTER_IP ETCD_MEMBER ETCD_CLUSTER \
    DATASTORE ENCAP MODE POOL_CIDR APPLY_POOL; do
    if [ -z "${!var:-}" ]; then
        echo "node.sh: $var is not set (run it through the Vagrantfile)" >&2
        exit 1
    fi
done
SRC=/vagrant
VENV=/opt/overlay/venv
export DEBIAN_FRONTEND=noninteractive
say() { echo "==> $NODE_NAME: $*"; }

say "route to $OTHER_SUBNET via the router $ROUTER_IP"
cat >/etc/systemd/system/overlay-underlay-route.service <<UNIT
[Unit]
Description=Route to the other underlay subnet through the router VM
Wants=network-online.target
After=network-online.target
Before=overlay-agent.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/sbin/ip route replace $OTHER_SUBNET via $ROUTER_IP

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable overlay-underlay-route.service
systemctl restart overlay-underlay-route.service

say "packages"
packages=(python3 python3-venv iproute2 iputils-ping nftables tcpdump kmod etcd-client)
if [ "$ETCD_MEMBER" = 1 ]; then packages+=(etcd-server); fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null

if [ "$ETCD_MEMBER" = 1 ]; then
    say "etcd member ($ETCD_CLUSTER)"
    marker=/var/lib/overlay-vagrant/etcd-configured
    if [ ! -e "$marker" ]; then
        # Debian starts a one-member etcd on install; this cluster needs a fresh data dir.
        systemctl stop etcd
        rm -rf /var/lib/etcd/default
    fi
    cat >/etc/default/etcd <<CONF
# Written by vagrant/provision/node.sh
ETCD_NAME=$NODE_NAME
ETCD_DATA_DIR=/var/lib/etcd/default
ETCD_LISTEN_PEER_URLS=http://$NODE_IP:2380
ETCD_LISTEN_CLIENT_URLS=http://$NODE_IP:2379,http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=http://$NODE_IP:2379
ETCD_INITIAL_ADVERTISE_PEER_URLS=http://$NODE_IP:2380
ETCD_INITIAL_CLUSTER=$ETCD_CLUSTER
ETCD_INITIAL_CLUSTER_STATE=new
ETCD_INITIAL_CLUSTER_TOKEN=overlay-vagrant
CONF
    systemctl enable etcd
    # --no-block: a 3-member cluster forms only when the other members are up too.
    systemctl restart --no-block etcd
    mkdir -p "$(dirname "$marker")" && touch "$marker"
fi

say "the project from $SRC into $VENV"
if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "$SRC"
ln -sf "$VENV/bin/overlayctl" /usr/local/bin/overlayctl

say "overlayctl install (datastore $DATASTORE)"
"$VENV/bin/overlayctl" install --datastore "$DATASTORE" --node-name "$NODE_NAME" \
    --ip-autodetection "cidr=$NODE_SUBNET" --start

# What vagrant/check-node.sh needs to know about this node and the cluster.
cat >/etc/overlay/vagrant.env <<CONF
NODE_NAME=$NODE_NAME
NODE_IP=$NODE_IP
NODE_SUBNET=$NODE_SUBNET
ENCAP=$ENCAP
MODE=$MODE
POOL_CIDR=$POOL_CIDR
DATASTORE=$DATASTORE
VENV=$VENV
CONF
mkdir -p /etc/profile.d
echo "export OVERLAY_DATASTORE=$DATASTORE" >/etc/profile.d/overlay.sh

if [ "$APPLY_POOL" = 1 ]; then
    say "waiting for the datastore (up to 10 minutes)"
    ok=0
    for _ in $(seq 1 120); do
        if "$VENV/bin/overlayctl" --datastore "$DATASTORE" get ippools >/dev/null 2>&1; then
            ok=1
            break
        fi
        sleep 5
    done
    if [ "$ok" != 1 ]; then
        echo "node.sh: the datastore $DATASTORE did not answer in 10 minutes" >&2
        exit 1
    fi
    case "$MODE" in
        always) pool_mode=Always ;;
        cross-subnet) pool_mode=CrossSubnet ;;
        *) echo "node.sh: MODE=$MODE: expected always or cross-subnet" >&2; exit 1 ;;
    esac
    vxlan=Never ipip=Never
    if [ "$ENCAP" = vxlan ]; then vxlan=$pool_mode; else ipip=$pool_mode; fi
    say "IP pool $POOL_CIDR (vxlanMode $vxlan, ipipMode $ipip)"
    "$VENV/bin/overlayctl" --datastore "$DATASTORE" apply -f - <<YAML
apiVersion: projectcalico.org/v3
kind: IPPool
metadata:
  name: vagrant-pool
spec:
  cidr: $POOL_CIDR
  blockSize: 26
  vxlanMode: $vxlan
  ipipMode: $ipip
  natOutgoing: true
YAML
fi
say "ready"
