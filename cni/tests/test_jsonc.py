"""cni.jsonc must behave exactly like json for the plugins: same values, same text, same errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cni import jsonc

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(deadline=None)
@given(values, st.booleans())
def test_round_trip_matches_json(value: object, compact: bool) -> None:
    text = jsonc.dumps(value, compact=compact)
    assert text == json.dumps(value, separators=(",", ":") if compact else None)
    assert jsonc.loads(text) == json.loads(text)
    assert jsonc.loads(f" \n{text}\t".encode()) == json.loads(text)


@settings(deadline=None)
@given(st.text(max_size=30) | st.binary(max_size=30))
def test_arbitrary_input_gives_json_value_or_json_error(data: str | bytes) -> None:
    def outcome(fn: object) -> tuple[str, object]:
        try:
            return ("ok", repr(fn(data)))  # type: ignore[operator]
        except Exception as e:
            return (type(e).__name__, str(e))

    assert outcome(jsonc.loads) == outcome(json.loads)


@pytest.mark.parametrize(
    "data",
    ['{"a": 1} x', "", "\ufeff{}", '{"a":}', '{"cniVersion": "1.0.0"', b"\xff{}", "[1,]"],
)
def test_errors_are_jsons_own(data: str | bytes) -> None:
    with pytest.raises(ValueError) as ours:
        jsonc.loads(data)
    with pytest.raises(ValueError) as theirs:
        json.loads(data)
    assert (type(ours.value), str(ours.value)) == (type(theirs.value), str(theirs.value))


def test_unserialisable_is_a_type_error_like_json() -> None:
    with pytest.raises(TypeError, match="set is not JSON serializable"):
        jsonc.dumps({"a": {1, 2}})
