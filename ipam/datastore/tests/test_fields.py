"""list_fields(): every backend gives the same values for the same records (SQLite picks
them out itself, the others parse the records), and the same errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipam.datastore import Datastore
from ipam.datastore.fields import list_fields
from ipam.datastore.memory import MemoryDatastore

PATHS = ("$.a", "$.a.b", "$.c", "$.d.e.f")

RECORDS = {
    "/r/1": {"a": {"b": "x"}, "c": [1, None, {"k": 'é"\\'}], "d": {"e": {"f": 2.5}}},
    "/r/2": {"a": "not an object", "c": None},
    "/r/3": {},
    "/r/4": {"a": {"b": None}, "c": {"node": "n", "list": []}, "d": {"e": 7}},
    "/r/5": {"c": "ünïcode \u2028 and \u0000"},
}


def test_the_values_at_each_path(store: Datastore) -> None:
    for key, doc in RECORDS.items():
        store.create(key, json.dumps(doc))
    store.create("/other/1", json.dumps({"a": {"b": "elsewhere"}}))
    assert list_fields(store, "/r/", PATHS) == [
        ("/r/1", {"b": "x"}, "x", [1, None, {"k": 'é"\\'}], 2.5),
        ("/r/2", "not an object", None, None, None),
        ("/r/3", None, None, None, None),
        ("/r/4", {"b": None}, None, {"node": "n", "list": []}, None),
        ("/r/5", None, None, "ünïcode \u2028 and \u0000", None),
    ]
    assert list_fields(store, "/none/", PATHS) == []


def test_a_record_that_is_no_json_is_an_error(store: Datastore) -> None:
    store.create("/r/1", '{"a": 1}')
    store.create("/r/2", '{"a": ')
    with pytest.raises(ValueError, match="not JSON"):
        list_fields(store, "/r/", ("$.a",))


@pytest.mark.parametrize("path", ["a", "$", "$.", "$.a[0]", "$.a'); DROP TABLE kv; --", '$."a"'])
def test_paths_of_another_form_are_refused(store: Datastore, path: str) -> None:
    store.create("/r/1", '{"a": 1}')
    with pytest.raises(ValueError, match="paths"):
        list_fields(store, "/r/", (path,))
    assert store.get("/r/1") is not None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("abc"), inner),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from("abcd"), json_values), max_size=5))
def test_sqlite_gives_what_the_records_hold(
    tmp_path_factory: pytest.TempPathFactory, docs: list[dict[str, object]]
) -> None:
    """The SQLite backend's own extraction equals parsing the records."""
    from ipam.datastore.sqlite import SqliteDatastore

    paths = ("$.a", "$.b.a", "$.c.b.a", "$.d")
    sqlite = SqliteDatastore(tmp_path_factory.mktemp("f") / "o.db")
    memory = MemoryDatastore()
    try:
        for i, doc in enumerate(docs):
            for ds in (sqlite, memory):
                ds.create(f"/r/{i:03d}", json.dumps(doc))
        for some in (paths, paths[1:2]):  # (SQLite reads one path and several differently)
            got, want = list_fields(sqlite, "/r/", some), list_fields(memory, "/r/", some)
            assert got == want
            assert repr(got) == repr(want)  # types too: True is no 1
    finally:
        sqlite.close()
