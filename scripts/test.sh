#!/usr/bin/env bash
# The README's test command: set up the machine, then run every test in parallel.
# Unit tests need nothing; etcd tests start their own etcd servers on loopback; netns
# tests need root; the IP-in-IP tests boot a qemu micro-VM with Debian's kernel.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-4}" "$@"
