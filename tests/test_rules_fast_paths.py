"""The rules' per-row fast paths decide every row like the paths they shortcut.

* ``queries._straight_plain`` (a straight-line projection generated per data query of
  plain column references) against the general loop of ``Projection._make_plain``, on
  random rows of every value type, with repeated output names and without an ``id``;
* a data query's single-parameter bucket function, which keeps the ids of recent
  parameter values (bounded), against :func:`pipeline.rules.bucket_id.bucket_id`.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.rules import parse_rules
from pipeline.rules import queries as Q
from pipeline.rules.bucket_id import bucket_id

VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=6),
    st.sampled_from(["\ud800", 'a"b\\c\n', "é", "1"]),
    st.binary(max_size=3),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 3), max_size=2),
)
PLAINS = [
    [("id", "id"), ("name", "name")],
    [("id", "a"), ("x", "b"), ("x", "c")],  # SELECT a AS id, b AS x, c AS x
    [("a", "a"), ("b", "b")],  # no id
    [("id", "a"), ("id", "b"), ("n", "missing")],
]


def _general(plain: list[tuple[str, str]]) -> Any:
    fn = Q._straight_plain
    Q._straight_plain = lambda plain, general: None  # type: ignore[assignment]
    try:
        return Q.Projection._make_plain(plain)
    finally:
        Q._straight_plain = fn


@settings(max_examples=800, deadline=None)
@given(
    which=st.integers(0, len(PLAINS) - 1),
    values=st.lists(VALUES, min_size=4, max_size=4),
)
def test_straight_plain_projection_matches_general_loop(which: int, values: list[Any]) -> None:
    plain = PLAINS[which]
    straight = Q.Projection._make_plain(plain)
    general = _general(plain)
    assert straight is not general
    row = dict(zip(["id", "name", "a", "b", "c"][: len(values)], values, strict=False))
    row["c"] = values[-1]
    try:
        want: Any = general(row)
    except Exception as exc:  # the same error either way
        with pytest.raises(type(exc)):
            straight(row)
        return
    got = straight(row)
    assert got == want
    assert type(got[0]) is type(want[0])


def test_bucket_ids_of_many_values_match_bucket_id() -> None:
    rules = parse_rules(
        "bucket_definitions:\n"
        "  by_owner:\n"
        "    parameters: SELECT request.user_id() AS owner\n"
        "    data:\n"
        "      - SELECT * FROM todos WHERE owner_id = bucket.owner\n"
    )
    values: list[Any] = [f"u{i}" for i in range(Q.BUCKET_ID_CACHE + 500)]
    values += [*range(Q.BUCKET_ID_CACHE + 500), "1", 1, 'q"\\', "é", "\ud800", True]
    for _ in range(2):  # the second round reads what the first one kept (and overflowed)
        for v in values:
            outs = rules.evaluate_row("todos", {"id": "t1", "owner_id": v})
            assert [o.bucket for o in outs] == [bucket_id("by_owner", [v])]


STAR_RULES = parse_rules(
    "bucket_definitions:\n"
    "  by_owner:\n"
    "    parameters: SELECT request.user_id() AS owner\n"
    "    data:\n"
    "      - SELECT * FROM todos WHERE owner_id = bucket.owner\n"
    "      - SELECT id, a AS title FROM todos WHERE owner_id = bucket.owner\n"
    "  everything:\n"
    "    data:\n"
    "      - SELECT * FROM todos\n"
)


@settings(max_examples=500, deadline=None)
@given(values=st.lists(VALUES, min_size=3, max_size=3), oid=st.sampled_from(["t1", 7, None]))
def test_star_data_from_row_json_matches_encoding_the_row(values: list[Any], oid: Any) -> None:
    """``evaluate_row(row_json=...)`` (what plan_batch passes) gives what it gives without."""
    row = {"id": oid, "owner_id": "u1", "a": values[0], "b": values[1], "c": values[2]}
    try:
        row_json = orjson.dumps(row).decode()
    except TypeError:
        return  # plan_batch passes no JSON for such a row (it is a dead letter)
    try:
        want: Any = STAR_RULES.evaluate_row("todos", row)
    except Exception as exc:  # the same error either way
        with pytest.raises(type(exc)):
            STAR_RULES.evaluate_row("todos", row, row_json=row_json)
        return
    assert STAR_RULES.evaluate_row("todos", row, row_json=row_json) == want
