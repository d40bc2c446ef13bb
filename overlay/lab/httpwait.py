"""Poll a JSON HTTP endpoint until a condition holds; run INSIDE a lab namespace.

    python -m overlay.lab.httpwait URL TIMEOUT CONDITION [ARG]

CONDITION is `etcd` (GET /health says healthy) or `agent` (the agent's /status reports a
finished sync with nothing pending; ARG, if given, is the number of peers it must see).
Prints the last document (or the last error) as one JSON line; exit 0 when the condition
held, 1 on timeout, 3 when waiting is hopeless (the agent keeps failing to apply).
Standard library only: it starts once per namespace and must start fast.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

POLL_INTERVAL = 0.1
GIVE_UP = 3  # consecutive failed reconcile passes


def etcd_healthy(doc: Any, _arg: int | None = None) -> bool:
    return isinstance(doc, dict) and doc.get("health") in ("true", True)


def agent_ready(doc: Any, peers: int | None = None) -> bool:
    """The agent has read the datastore and applied it with nothing pending (and, when
    asked, computes paths to at least `peers` other nodes)."""
    if not isinstance(doc, dict):
        return False
    datastore = doc.get("datastore") or {}
    reconciler = doc.get("reconciler") or {}
    if not (datastore.get("synced") and doc.get("dataplane_synced")) or reconciler.get("dirty"):
        return False
    return peers is None or len(doc.get("peers") or []) >= peers


def agent_hopeless(doc: Any) -> bool:
    """Passes keep failing (e.g. the kernel lacks a device type): waiting will not help."""
    reconciler = doc.get("reconciler") if isinstance(doc, dict) else None
    return isinstance(reconciler, dict) and reconciler.get("consecutive_failures", 0) >= GIVE_UP


def never(_doc: Any) -> bool:
    return False


CONDITIONS = {"etcd": etcd_healthy, "agent": agent_ready}
HOPELESS = {"etcd": never, "agent": agent_hopeless}
EXIT_OK, EXIT_TIMEOUT, EXIT_HOPELESS = 0, 1, 3


def fetch(url: str, timeout: float = 1.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait(url: str, timeout: float, condition: str, arg: int | None) -> tuple[int, str]:
    check, hopeless = CONDITIONS[condition], HOPELESS[condition]
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        try:
            doc = fetch(url)
            last = json.dumps(doc)
            if check(doc, arg):
                return EXIT_OK, last
            if hopeless(doc):
                return EXIT_HOPELESS, last
        except (OSError, ValueError, urllib.error.URLError) as e:
            last = json.dumps({"error": f"{url}: {e}"})
        if time.monotonic() >= deadline:
            return EXIT_TIMEOUT, last
        time.sleep(POLL_INTERVAL)


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4) or argv[2] not in CONDITIONS:
        print(__doc__, file=sys.stderr)
        return 2
    arg = int(argv[3]) if len(argv) == 4 else None
    code, last = wait(argv[0], float(argv[1]), argv[2], arg)
    print(last)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
