#!/usr/bin/env bash
# The README's test command: set up the machine, then run every test.
# Unit tests need nothing; etcd tests start their own etcd servers on loopback; netns tests
# need root; the IP-in-IP tests boot a qemu micro-VM with Debian's kernel.
# Two phases: everything else in parallel, then the micro-VM tests on their own. The VM
# emulates its CPU (TCG) and would otherwise starve the timing-sensitive tests beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
py=.venv/bin/python
status=0
"$py" -m pytest -n "${PYTEST_WORKERS:-4}" -m "not vm" "$@" || status=$?
# Exit 5 means "no test selected" (e.g. when the arguments name no VM test): not a failure.
"$py" -m pytest -m vm "$@" || { rc=$?; [ "$rc" -eq 5 ] || [ "$status" -ne 0 ] || status=$rc; }
exit "$status"
