"""SqliteDatastore.list(prefix) and keys(prefix) select a key range: it must hold exactly the
keys that start with the prefix, in order, whatever characters end the prefix."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipam.datastore.sqlite import SqliteDatastore

# Characters at the edges of the code point range and of the surrogate gap, plus plain ones.
_CHARS = st.sampled_from(["a", "b", "/", "\x00", "\x7f", "\ud7ff", "\ue000", "\U0010ffff", "é"])
_KEYS = st.lists(_CHARS, max_size=4).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sets(_KEYS.filter(bool), max_size=12), st.lists(_KEYS, max_size=6))
def test_list_and_keys_hold_exactly_the_keys_under_the_prefix(
    tmp_path_factory: pytest.TempPathFactory, keys: set[str], prefixes: list[str]
) -> None:
    path = tmp_path_factory.mktemp("db") / "s.db"
    ds = SqliteDatastore(path)
    try:
        for key in keys:
            ds.create(key, f"v-{key}")
        for prefix in [*prefixes, *keys]:
            listing = ds.list(prefix)
            expected = sorted(k for k in keys if k.startswith(prefix))
            assert [kv.key for kv in listing.items] == expected
            assert ds.keys(prefix).keys == expected
            assert all(kv.value == f"v-{kv.key}" for kv in listing.items)
            assert listing.revision == len(keys)
    finally:
        ds.close()
