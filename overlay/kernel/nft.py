"""Running `nft` in a network namespace: the one way our nftables tables are written and read."""

from __future__ import annotations

import subprocess

NFT_TIMEOUT_S = 10.0


def run(
    args: list[str], netns: str | None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run(
        [*prefix, "nft", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=NFT_TIMEOUT_S,
        check=False,
    )


def missing_table(proc: subprocess.CompletedProcess[str]) -> bool:
    """Whether a failed `nft list table` failed because the table does not exist."""
    return proc.returncode != 0 and "No such file or directory" in proc.stderr
