#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian 12 machine (run as root):
# Debian packages, then the virtual environment in .venv with the project and test extras.
# Safe to re-run: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
    python3 python3-venv python3-dev gcc sqlite3
    iproute2 iputils-ping tcpdump iperf3 nftables iptables procps psmisc kmod cpio openssl ethtool
    etcd-server etcd-client
    containernetworking-plugins
    qemu-system-x86 linux-image-amd64 busybox-static
    podman runc
    shellcheck vagrant
)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's etcd-server package starts a system etcd on 2379; our tests start their own.
if systemctl is-active --quiet etcd 2>/dev/null; then systemctl disable --now etcd >/dev/null 2>&1 || true; fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -e "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip
    # compat mode: a plain path entry instead of an import hook (the hook costs the CNI
    # plugins ~40 ms of start-up on every exec).
    .venv/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat
    rm -f .venv/.installed-* && touch "$stamp"
fi
# The CNI plugins are exec'd per ADD/DEL: replace pip's console scripts overlay-cni and
# overlay-ipam with the lean launchers (python -I -S; see cni/launcher.py), and byte-compile
# the packages so no exec pays for compiling (runtimes may run with PYTHONDONTWRITEBYTECODE;
# an agent's start would pay ~30 ms).
.venv/bin/python -m cni.launcher .venv/bin
.venv/bin/python -m compileall -q cni ipam overlay
echo "setup: ready (.venv)"
