from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipam.selector import All, SelectorError, parse_selector

LABELS = {"zone": "a", "rack": "r1", "topology.kubernetes.io/region": "eu-1"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", True),
        ("   ", True),
        ("all()", True),
        ("zone == 'a'", True),
        ('zone == "a"', True),
        ("zone == 'b'", False),
        ("zone != 'b'", True),
        ("zone != 'a'", False),
        ("missing != 'a'", True),  # Calico: != also matches when the label is absent
        ("missing == ''", False),
        ("has(zone)", True),
        ("has(missing)", False),
        ("!has(missing)", True),
        ("!has(zone)", False),
        ("has(topology.kubernetes.io/region)", True),
        ("topology.kubernetes.io/region == 'eu-1'", True),
        ("zone == 'a' && rack == 'r1'", True),
        ("zone == 'a' && rack == 'r2'", False),
        ("zone == 'b' || rack == 'r1'", True),
        ("zone == 'b' || rack == 'r2'", False),
        # && binds tighter than ||
        ("zone == 'a' || zone == 'b' && rack == 'r2'", True),
        ("(zone == 'a' || zone == 'b') && rack == 'r2'", False),
        ("!(zone == 'a')", False),
        ("!!has(zone)", True),
        ("all() && !has(missing)", True),
        # all / has as plain label keys when no '(' follows
        ("all == 'x'", False),
        ("has != 'x'", True),
    ],
)
def test_matches(text: str, expected: bool) -> None:
    assert parse_selector(text).matches(LABELS) is expected


def test_empty_is_all() -> None:
    assert parse_selector("") == All()


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        ("zone == ", 8, "expected a quoted string, found end of input"),
        ("zone = 'a'", 5, "unexpected character '='"),
        ("zone == a", 8, "expected a quoted string, found 'a'"),
        ("has(zone", 8, "expected ')'"),
        ("(zone == 'a'", 12, "expected ')'"),
        ("zone == 'a' rack == 'b'", 12, "expected '&&', '||' or end of input, found 'rack'"),
        ("zone == 'a", 8, "unterminated string"),
        ("&& zone == 'a'", 0, "expected a label key"),
        ("zone == 'a' &&", 14, "found end of input"),
        ("zone in {'a'}", 8, "unexpected character '{'"),
        ("zone 'a'", 5, "expected '==' or '!=', found string 'a'"),
    ],
)
def test_errors_name_position_and_text(text: str, position: int, fragment: str) -> None:
    with pytest.raises(SelectorError) as exc:
        parse_selector(text)
    msg = str(exc.value)
    assert repr(text) in msg
    assert f"at position {position}:" in msg
    assert fragment in msg


def test_selector_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        parse_selector("(")


KEYS = st.sampled_from(["a", "b", "c", "x.io/d"])
VALUES = st.sampled_from(["1", "2", ""])
LABEL_DICTS = st.dictionaries(KEYS, VALUES, max_size=4)


def _atoms() -> st.SearchStrategy[str]:
    return st.one_of(
        st.just("all()"),
        KEYS.map(lambda k: f"has({k})"),
        st.tuples(KEYS, st.sampled_from(["==", "!="]), VALUES).map(
            lambda t: f"{t[0]} {t[1]} '{t[2]}'"
        ),
    )


EXPRS = st.recursive(
    _atoms(),
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["&&", "||"]), inner).map(
            lambda t: f"({t[0]}) {t[1]} ({t[2]})"
        ),
        inner.map(lambda e: f"!({e})"),
    ),
    max_leaves=6,
)


@given(KEYS, LABEL_DICTS)
def test_not_has_is_negation_of_has(key: str, labels: dict[str, str]) -> None:
    assert parse_selector(f"!has({key})").matches(labels) is (key not in labels)
    assert parse_selector(f"has({key})").matches(labels) is (key in labels)


@given(KEYS, VALUES, LABEL_DICTS)
def test_ne_is_negation_of_eq(key: str, value: str, labels: dict[str, str]) -> None:
    eq = parse_selector(f"{key} == '{value}'").matches(labels)
    assert parse_selector(f"{key} != '{value}'").matches(labels) is (not eq)
    assert eq is (labels.get(key) == value)


@given(EXPRS, EXPRS, LABEL_DICTS)
def test_de_morgan(a: str, b: str, labels: dict[str, str]) -> None:
    lhs = parse_selector(f"!(({a}) && ({b}))").matches(labels)
    rhs = parse_selector(f"!({a}) || !({b})").matches(labels)
    assert lhs is rhs
    lhs = parse_selector(f"!(({a}) || ({b}))").matches(labels)
    rhs = parse_selector(f"!({a}) && !({b})").matches(labels)
    assert lhs is rhs


@given(EXPRS, LABEL_DICTS)
def test_canonical_text_parses_to_the_same_meaning(text: str, labels: dict[str, str]) -> None:
    sel = parse_selector(text)
    again = parse_selector(str(sel))
    assert again == sel
    assert again.matches(labels) is sel.matches(labels)
