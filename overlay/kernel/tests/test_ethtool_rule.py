"""Calico's ChecksumOffloadBroken rule: kernels up to 5.7.0 run tunnels without TX offload."""

from __future__ import annotations

import pytest

from overlay.kernel.ethtool import checksum_offload_broken, kernel_version


@pytest.mark.parametrize(
    ("release", "broken"),
    [
        ("4.19.0-26-amd64", True),
        ("5.4.0-150-generic", True),
        ("5.7", True),
        ("5.7.0", True),
        ("5.7.1", False),  # the first release after the cut-off
        ("5.8.0-63-generic", False),
        ("6.1.0-27-amd64", False),
        ("6.18.0", False),
    ],
)
def test_auto_decides_by_kernel_release(release: str, broken: bool) -> None:
    assert checksum_offload_broken(release) is broken


def test_override_wins_both_ways() -> None:
    assert checksum_offload_broken("6.18.0", "true") is True
    assert checksum_offload_broken("5.4.0", "false") is False


def test_bad_override_names_the_field_and_value() -> None:
    with pytest.raises(ValueError, match=r"checksum_offload_broken: 'maybe' is not one of"):
        checksum_offload_broken("6.1.0", "maybe")


def test_unparsable_release_is_an_error_naming_it() -> None:
    assert kernel_version("6.1.0-27-amd64") == (6, 1, 0)
    with pytest.raises(ValueError, match="kernel release: cannot parse 'weird'"):
        kernel_version("weird")
