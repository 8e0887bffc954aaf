"""Evaluating sync rules: rows -> buckets (evaluate_row) and requests -> buckets."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.rules import (
    BucketDescription,
    LookupEntry,
    RequestEvaluationError,
    RowEvaluationError,
    RowOutput,
    SyncRules,
    load_rules,
    parse_rules,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "sync-rules.example.yaml"


def rules(text: str) -> SyncRules:
    return parse_rules(text)


def buckets(outputs: list[RowOutput]) -> list[str]:
    return [o.bucket for o in outputs]


def names(descs: list[BucketDescription]) -> list[str]:
    return [d.bucket for d in descs]


# --------------------------------------------------------------------------- example rules


@pytest.fixture(scope="module")
def example() -> SyncRules:
    return load_rules(EXAMPLE)


def test_example_tables(example: SyncRules) -> None:
    assert example.tables() == {"lists", "todos", "announcements"}
    assert example.warnings == ()
    assert [d.name for d in example.definitions] == ["by_user", "announcements"]
    assert example.definition("by_user").parameter_names == ("user_id",)


def test_example_select_star(example: SyncRules) -> None:
    row = {"id": "l1", "owner_id": "u1", "name": "Groceries ✓", "archived": False, "n": 3}
    assert example.evaluate_row("lists", row, schema="public") == [
        RowOutput(
            bucket='by_user["u1"]',
            object_type="lists",
            object_id="l1",
            data='{"id":"l1","owner_id":"u1","name":"Groceries ✓","archived":0,"n":3}',
        )
    ]


def test_example_column_list(example: SyncRules) -> None:
    row = {
        "id": "t1",
        "list_id": "l1",
        "owner_id": "u2",
        "description": 'say "hi"',
        "completed": True,
        "secret": "not selected",
    }
    out = example.evaluate_row("todos", row)
    assert out == [
        RowOutput(
            'by_user["u2"]',
            "todos",
            "t1",
            '{"id":"t1","list_id":"l1","owner_id":"u2","description":"say \\"hi\\"","completed":1}',
        )
    ]
    # data is exactly json.dumps(..., separators=(",", ":"), ensure_ascii=False)
    expected = {k: row[k] for k in ("id", "list_id", "owner_id", "description")} | {"completed": 1}
    assert out[0].data == json.dumps(expected, separators=(",", ":"), ensure_ascii=False)


def test_example_global_bucket(example: SyncRules) -> None:
    out = example.evaluate_row("announcements", {"id": 9, "title": "Hi", "body": None, "x": 1})
    assert out == [
        RowOutput("announcements[]", "announcements", "9", '{"id":9,"title":"Hi","body":null}')
    ]


def test_example_unrelated_table(example: SyncRules) -> None:
    assert example.evaluate_row("other", {"id": 1}) == []
    assert not example.is_relevant("other")
    assert example.is_relevant("todos", "public")


def test_example_null_owner_goes_into_no_bucket(example: SyncRules) -> None:
    # sync-protocol.md §8.5 (corrected): `owner_id = bucket.user_id` is not true for a NULL
    # owner, so the row goes into no bucket of the definition (not `by_user[null]`)
    assert example.evaluate_row("lists", {"id": "l1", "owner_id": None}) == []
    assert example.evaluate_row("todos", {"id": "t1", "owner_id": None, "list_id": "l1"}) == []
    assert "by_user[null]" not in names(example.buckets_for_request({"sub": "u1"}))


def test_null_filter_is_redundant_but_harmless() -> None:
    # sync-protocol.md §8.5: a NULL owner goes into no bucket with or without IS NOT NULL
    r = rules(
        """
bucket_definitions:
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT * FROM lists WHERE owner_id = bucket.user_id AND owner_id IS NOT NULL
      - SELECT * FROM items WHERE owner_id = bucket.user_id
"""
    )
    for table in ("lists", "items"):
        assert r.evaluate_row(table, {"id": 1, "owner_id": None}) == []
        assert buckets(r.evaluate_row(table, {"id": 1, "owner_id": "u"})) == ['by_user["u"]']


def test_star_anywhere_and_table_suffix() -> None:
    # the reference: a column sets its name, `*` fills in the columns not set yet (or NULL);
    # `_table_suffix` of a wildcard table is readable but never part of `*`
    r = rules(
        """
bucket_definitions:
  g:
    data:
      - SELECT owner AS id, *, 'x' AS title FROM "todos_%" WHERE _table_suffix != 'old'
      - SELECT * FROM "lists_%" WHERE _table_suffix = 'a'
"""
    )
    out = r.evaluate_row("todos_new", {"id": "t1", "owner": None, "title": "t", "n": 1})
    assert [(o.object_type, o.object_id, json.loads(o.data)) for o in out] == [
        ("todos_new", "t1", {"id": "t1", "owner": None, "title": "x", "n": 1})
    ]
    assert r.evaluate_row("todos_old", {"id": "t1"}) == []
    out = r.evaluate_row("lists_a", {"id": "l1"})
    assert [json.loads(o.data) for o in out] == [{"id": "l1"}]


def test_example_buckets_for_request(example: SyncRules) -> None:
    assert example.buckets_for_request({"sub": "u1", "aud": "x"}) == [
        BucketDescription('by_user["u1"]', "by_user", 3),
        BucketDescription("announcements[]", "announcements", 3),
    ]


def test_row_moves_between_buckets_when_owner_changes(example: SyncRules) -> None:
    before = {"id": "l1", "owner_id": "alice", "name": "x"}
    after = {**before, "owner_id": "bob"}
    old = set(buckets(example.evaluate_row("lists", before)))
    new = set(buckets(example.evaluate_row("lists", after)))
    assert old == {'by_user["alice"]'}
    assert new == {'by_user["bob"]'}
    assert old - new == {'by_user["alice"]'}  # the processor emits a REMOVE there


def test_float_and_int_owner_give_the_same_bucket(example: SyncRules) -> None:
    assert buckets(example.evaluate_row("lists", {"id": 1, "owner_id": 5})) == ["by_user[5]"]
    assert buckets(example.evaluate_row("lists", {"id": 1, "owner_id": 5.0})) == ["by_user[5]"]


# --------------------------------------------------------------------------- data queries

FILTERS = """
bucket_definitions:
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT * FROM todos WHERE owner_id = bucket.user_id AND archived IS NULL
  open_by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT id, title FROM todos WHERE bucket.user_id = owner_id AND (status = 'open' OR priority >= 2) AND NOT deleted
  tagged:
    parameters: SELECT value AS tag FROM json_each(request.jwt() ->> 'tags')
    data:
      - SELECT id FROM todos WHERE bucket.tag IN tags
  hot:
    data:
      - SELECT id FROM todos WHERE priority > 3 AND status IN ('open', 'blocked')
"""


def test_filters() -> None:
    r = rules(FILTERS)
    row = {
        "id": "t1",
        "owner_id": "u1",
        "archived": None,
        "status": "open",
        "priority": 1,
        "deleted": 0,
        "tags": '["red","blue","red"]',
        "title": "T",
    }
    assert buckets(r.evaluate_row("todos", row)) == [
        'by_user["u1"]',
        'open_by_user["u1"]',
        'tagged["red"]',
        'tagged["blue"]',
    ]
    row2 = {**row, "archived": 1, "status": "done", "priority": 5, "tags": None}
    assert buckets(r.evaluate_row("todos", row2)) == ['open_by_user["u1"]']
    row3 = {**row2, "priority": 9, "status": "blocked", "deleted": 1}
    assert buckets(r.evaluate_row("todos", row3)) == ["hot[]"]
    row4 = {**row3, "priority": None, "status": None}
    assert buckets(r.evaluate_row("todos", row4)) == []


def test_or_of_two_bucket_comparisons() -> None:
    r = rules(
        """
bucket_definitions:
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT id FROM docs WHERE owner_id = bucket.user_id OR editor_id = bucket.user_id
"""
    )
    assert buckets(r.evaluate_row("docs", {"id": 1, "owner_id": "a", "editor_id": "b"})) == [
        'by_user["a"]',
        'by_user["b"]',
    ]
    assert buckets(r.evaluate_row("docs", {"id": 1, "owner_id": "a", "editor_id": "a"})) == [
        'by_user["a"]'
    ]
    # sync-protocol.md §8.5: the NULL side of the OR assigns no bucket, the other one does
    assert buckets(r.evaluate_row("docs", {"id": 1, "owner_id": None, "editor_id": "a"})) == [
        'by_user["a"]'
    ]
    assert r.evaluate_row("docs", {"id": 1, "owner_id": None, "editor_id": None}) == []


def test_two_parameters() -> None:
    r = rules(
        """
bucket_definitions:
  team_project:
    parameters: SELECT token_parameters.team AS team, request.jwt() ->> 'project' AS project
    data:
      - SELECT * FROM tasks WHERE project_id = bucket.project AND team_id = bucket.team
"""
    )
    assert r.definition("team_project").parameter_names == ("team", "project")
    out = r.evaluate_row("tasks", {"id": "x", "team_id": "t1", "project_id": "p9"})
    assert buckets(out) == ['team_project["t1","p9"]']
    req = r.buckets_for_request({"sub": "u", "parameters": {"team": "t1"}, "project": "p9"})
    assert names(req) == ['team_project["t1","p9"]']


def test_aliases_and_object_type() -> None:
    r = rules(
        """
bucket_definitions:
  g:
    data:
      - SELECT t.id, upper(t.title) AS title, t.n * 2 AS double FROM todos AS t
      - SELECT uuid AS id, name FROM "Legacy Items" items
      - SELECT * FROM public.notes
"""
    )
    assert r.evaluate_row("todos", {"id": 1, "title": "abc", "n": 1.5}) == [
        RowOutput("g[]", "t", "1", '{"id":1,"title":"ABC","double":3.0}')
    ]
    assert r.evaluate_row("Legacy Items", {"uuid": "u-1", "name": "n"}) == [
        RowOutput("g[]", "items", "u-1", '{"id":"u-1","name":"n"}')
    ]
    # schema-qualified FROM matches only that schema
    assert r.evaluate_row("notes", {"id": "n1"}, schema="public") == [
        RowOutput("g[]", "notes", "n1", '{"id":"n1"}')
    ]
    assert r.evaluate_row("notes", {"id": "n1"}, schema="other") == []
    assert r.evaluate_row("notes", {"id": "n1"}) == []


def test_unqualified_from_matches_any_schema() -> None:
    r = rules("bucket_definitions:\n  g:\n    data: [SELECT * FROM todos]\n")
    assert len(r.evaluate_row("todos", {"id": 1}, schema="public")) == 1
    assert len(r.evaluate_row("todos", {"id": 1}, schema="tenant7")) == 1
    assert len(r.evaluate_row("todos", {"id": 1})) == 1


def test_object_id_forms() -> None:
    r = rules("bucket_definitions:\n  g:\n    data: [SELECT * FROM t]\n")
    assert r.evaluate_row("t", {"id": 42})[0].object_id == "42"
    assert r.evaluate_row("t", {"id": None})[0].object_id == ""
    assert r.evaluate_row("t", {"x": 1})[0].object_id == ""
    assert r.evaluate_row("t", {"id": 1.5})[0].object_id == "1.5"


def test_select_star_value_conversions() -> None:
    r = rules("bucket_definitions:\n  g:\n    data: [SELECT * FROM t]\n")
    row = {
        "id": "a",
        "b": True,
        "f": 1.0,
        "tiny": 1e-05,
        "nan": float("nan"),
        "inf": float("inf"),
        "blob": b"\x00",
        "obj": {"k": [1, "é"]},
        "big": 2**70,
    }
    data = r.evaluate_row("t", row)[0].data
    assert (
        data
        == '{"id":"a","b":1,"f":1.0,"tiny":1e-05,"nan":null,"inf":null,"obj":"{\\"k\\":[1,\\"é\\"]}","big":1180591620717411303424}'
    )
    # binary columns are dropped; column order is the row's
    assert list(json.loads(data)) == ["id", "b", "f", "tiny", "nan", "inf", "obj", "big"]


@given(
    st.dictionaries(
        st.sampled_from(["id", "a", "b", "c", "é", 'q"'][1:]),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(min_value=-(2**63), max_value=2**63 - 1),
            st.text(max_size=5),
            st.binary(max_size=2),
        ),
    ),
    st.one_of(st.text(min_size=1, max_size=4), st.booleans(), st.integers(0, 9)),
)
def test_select_star_of_plain_values_matches_a_model(row: dict[str, Any], oid: Any) -> None:
    """Booleans are SQLite integers, binary values are dropped, the rest as it is."""
    r = rules("bucket_definitions:\n  g:\n    data: [SELECT * FROM t]\n")
    row = {"id": oid, **row}
    out = r.evaluate_row("t", row)
    expected = {
        k: (int(v) if isinstance(v, bool) else v)
        for k, v in row.items()
        if not isinstance(v, bytes)
    }
    assert len(out) == 1
    assert out[0].data == json.dumps(expected, separators=(",", ":"), ensure_ascii=False)
    want_id = expected["id"]
    assert out[0].object_id == (want_id if isinstance(want_id, str) else str(want_id))


def test_several_data_queries_per_definition_and_dedupe() -> None:
    r = rules(
        """
bucket_definitions:
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT * FROM todos WHERE owner_id = bucket.user_id
      - SELECT * FROM todos WHERE assignee_id = bucket.user_id
      - SELECT id, title FROM todos AS tasks WHERE owner_id = bucket.user_id
"""
    )
    row = {"id": "t1", "owner_id": "a", "assignee_id": "a", "title": "x"}
    out = r.evaluate_row("todos", row)
    # the second query gives the same bucket, type and id as the first: kept once
    assert [(o.bucket, o.object_type) for o in out] == [
        ('by_user["a"]', "todos"),
        ('by_user["a"]', "tasks"),
    ]
    row2 = {**row, "assignee_id": "b"}
    assert [(o.bucket, o.object_type) for o in r.evaluate_row("todos", row2)] == [
        ('by_user["a"]', "todos"),
        ('by_user["b"]', "todos"),
        ('by_user["a"]', "tasks"),
    ]


def test_same_table_in_several_definitions() -> None:
    r = rules(
        """
bucket_definitions:
  mine:
    parameters: SELECT request.user_id() AS user_id
    data: [SELECT * FROM todos WHERE owner_id = bucket.user_id]
  everything:
    data: [SELECT * FROM todos]
"""
    )
    out = r.evaluate_row("todos", {"id": "t", "owner_id": "u"})
    assert buckets(out) == ['mine["u"]', "everything[]"]
    assert out[0].data is out[1].data or out[0].data == out[1].data


def test_wildcard_table() -> None:
    r = rules('bucket_definitions:\n  g:\n    data: [SELECT * FROM "todos_%"]\n')
    assert r.evaluate_row("todos_2024", {"id": 1}) == [
        RowOutput("g[]", "todos_2024", "1", '{"id":1}')
    ]
    assert r.evaluate_row("lists", {"id": 1}) == []
    assert r.is_relevant("todos_x")


def test_row_evaluation_error() -> None:
    r = rules(
        """
bucket_definitions:
  tagged:
    parameters: SELECT value AS tag FROM json_each(request.jwt() ->> 'tags')
    data:
      - SELECT id FROM todos WHERE bucket.tag IN tags
"""
    )
    with pytest.raises(RowEvaluationError) as info:
        r.evaluate_row("todos", {"id": 1, "tags": "not json"})
    assert "definition 'tagged', data query 1" in str(info.value)
    assert "malformed JSON" in str(info.value)
    assert info.value.definition == "tagged"
    with pytest.raises(RowEvaluationError, match="expected a JSON array"):
        r.evaluate_row("todos", {"id": 1, "tags": '{"a":1}'})


def test_bucket_param_in_json_array_column() -> None:
    r = rules(
        """
bucket_definitions:
  by_member:
    parameters: SELECT request.user_id() AS user_id
    data: [SELECT * FROM lists WHERE bucket.user_id IN member_ids]
"""
    )
    # sync-protocol.md §8.5: a JSON null element is no bucket parameter (NULL IN ... is not true)
    assert buckets(r.evaluate_row("lists", {"id": 1, "member_ids": '["a", 2, 2.0, null]'})) == [
        'by_member["a"]',
        "by_member[2]",
    ]
    assert buckets(r.evaluate_row("lists", {"id": 1, "member_ids": '["a", null]'})) == [
        'by_member["a"]'
    ]
    assert r.evaluate_row("lists", {"id": 1, "member_ids": "[null]"}) == []
    assert r.evaluate_row("lists", {"id": 1, "member_ids": None}) == []
    assert r.evaluate_row("lists", {"id": 1, "member_ids": ["x"]})[0].bucket == 'by_member["x"]'


# --------------------------------------------------------------------------- NULL parameters
# sync-protocol.md §8.5 (corrected): a data row whose bucket parameter value would be NULL
# goes into no bucket of the definition; a request whose parameter is NULL still gets the
# id `name[null]`, which therefore stays empty (no leak to tokens lacking the claim).

REGION_RULES = """
bucket_definitions:
  region_work:
    parameters: SELECT request.jwt() ->> 'region' AS region_id
    data:
      - SELECT * FROM sites WHERE region_id = bucket.region_id
"""


def test_null_region_row_goes_into_no_bucket_but_request_keeps_null_id() -> None:
    r = rules(REGION_RULES)
    for i in range(5):
        assert r.evaluate_row("sites", {"id": f"s{i}", "region_id": None}) == []
    assert r.evaluate_row("sites", {"id": "s9"}) == []  # missing column: NULL too
    assert buckets(r.evaluate_row("sites", {"id": "e1", "region_id": "eu"})) == [
        'region_work["eu"]'
    ]
    # the request side is unchanged: a token without the claim gets `region_work[null]`
    assert names(r.buckets_for_request({"sub": "u1"})) == ["region_work[null]"]
    assert names(r.buckets_for_request({"sub": "u1", "region": "eu"})) == ['region_work["eu"]']


@pytest.mark.parametrize(
    "where",
    [
        "CAST(region_id AS TEXT) = bucket.region_id",
        "upper(region_id) = bucket.region_id",
        "bucket.region_id = region_id",
        "region_id = bucket.region_id AND id IS NOT NULL",
        "id IS NOT NULL AND region_id = bucket.region_id",
        "(region_id = bucket.region_id OR alt_region = bucket.region_id) AND id > ''",
        "region_id = bucket.region_id AND alt_region = bucket.region_id",
        "coalesce(region_id, alt_region) = bucket.region_id",
        "bucket.region_id IN regions",
        "bucket.region_id IN regions OR region_id = bucket.region_id",
    ],
)
def test_null_parameter_gives_no_bucket_for_every_query_shape(where: str) -> None:
    r = rules(
        f"""
bucket_definitions:
  region_work:
    parameters: SELECT request.jwt() ->> 'region' AS region_id
    data:
      - SELECT id FROM sites WHERE {where}
"""
    )
    row = {"id": "s1", "region_id": None, "alt_region": None, "regions": "[null]"}
    assert r.evaluate_row("sites", row) == []
    # the same query still assigns non-NULL values
    ok = {"id": "s1", "region_id": "EU", "alt_region": "EU", "regions": '["EU", null]'}
    assert buckets(r.evaluate_row("sites", ok)) == ['region_work["EU"]']


def test_or_keeps_only_the_non_null_alternative() -> None:
    r = rules(
        """
bucket_definitions:
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT id FROM docs WHERE owner_id = bucket.user_id OR bucket.user_id IN editors
"""
    )
    row = {"id": 1, "owner_id": None, "editors": '[null, "b", "c"]'}
    assert buckets(r.evaluate_row("docs", row)) == ['by_user["b"]', 'by_user["c"]']
    row = {"id": 1, "owner_id": "a", "editors": "[null]"}
    assert buckets(r.evaluate_row("docs", row)) == ['by_user["a"]']


def test_two_parameters_one_null_gives_no_bucket() -> None:
    r = rules(
        """
bucket_definitions:
  team_project:
    parameters: SELECT token_parameters.team AS team, request.jwt() ->> 'project' AS project
    data:
      - SELECT * FROM tasks WHERE project_id = bucket.project AND team_id = bucket.team
      - SELECT * FROM notes WHERE bucket.project IN project_ids AND team_id = bucket.team
"""
    )
    for team, project in (("t1", None), (None, "p9"), (None, None)):
        assert r.evaluate_row("tasks", {"id": "x", "team_id": team, "project_id": project}) == []
    note = {"id": "n", "team_id": "t1", "project_ids": '["p1", null]'}
    assert buckets(r.evaluate_row("notes", note)) == ['team_project["t1","p1"]']
    assert r.evaluate_row("notes", {**note, "team_id": None}) == []
    # a request lacking one value still gets the id with `null` in it
    req = r.buckets_for_request({"sub": "u", "parameters": {"team": "t1"}})
    assert names(req) == ['team_project["t1",null]']


def test_static_null_comparison_gives_no_bucket() -> None:
    r = rules(
        """
bucket_definitions:
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT id FROM a WHERE bucket.user_id = NULL
      - SELECT id FROM b WHERE bucket.user_id IN '["x", null]'
"""
    )
    assert r.evaluate_row("a", {"id": 1}) == []
    assert buckets(r.evaluate_row("b", {"id": 1})) == ['by_user["x"]']


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_real_parameter_gives_no_bucket(value: float) -> None:
    # NaN is NULL in SQLite; +-Infinity would serialise as `null` (JSON.stringify), i.e. into
    # the same `name[null]` id a request without the value gets: treated like NULL
    r = rules(
        """
bucket_definitions:
  by_score:
    parameters: SELECT request.jwt() ->> 'score' AS score
    data:
      - SELECT id FROM plain WHERE score = bucket.score
      - SELECT id FROM computed WHERE score * 1.0 = bucket.score
      - SELECT id FROM arrays WHERE bucket.score IN scores
"""
    )
    assert r.evaluate_row("plain", {"id": 1, "score": value}) == []
    assert r.evaluate_row("computed", {"id": 1, "score": value}) == []
    assert buckets(r.evaluate_row("plain", {"id": 1, "score": 2.5})) == ["by_score[2.5]"]
    assert buckets(r.evaluate_row("computed", {"id": 1, "score": 2})) == ["by_score[2]"]
    assert buckets(r.evaluate_row("arrays", {"id": 1, "scores": "[1e999, -1e999, 3]"})) == [
        "by_score[3]"
    ]


_scalars = st.one_of(st.none(), st.sampled_from(["a", "b", 1, 2.0, float("inf"), float("nan")]))


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "owner_id": _scalars,
            "editor_id": _scalars,
            "team_id": _scalars,
            "members": st.one_of(
                st.none(),
                st.lists(st.sampled_from([None, "a", 1, 2.5]), max_size=3).map(json.dumps),
            ),
        },
    )
)
def test_no_row_ever_lands_in_a_bucket_with_a_null_parameter(row: dict[str, Any]) -> None:
    out = NULL_PROPERTY_RULES.evaluate_row("docs", {"id": "d", **row})
    for o in out:
        params = json.loads(o.bucket[o.bucket.index("[") :])
        assert None not in params, o.bucket


NULL_PROPERTY_RULES = parse_rules(
    """
bucket_definitions:
  one:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT id FROM docs WHERE owner_id = bucket.user_id
      - SELECT id FROM docs WHERE owner_id = bucket.user_id OR editor_id = bucket.user_id
      - SELECT id FROM docs WHERE bucket.user_id IN members
      - SELECT id FROM docs WHERE upper(owner_id) = bucket.user_id OR bucket.user_id IN members
  two:
    parameters: SELECT request.user_id() AS user_id, token_parameters.team AS team
    data:
      - SELECT id FROM docs WHERE owner_id = bucket.user_id AND team_id = bucket.team
      - SELECT id FROM docs WHERE bucket.user_id IN members AND team_id = bucket.team
"""
)


# --------------------------------------------------------------------------- requests


def test_token_parameters_and_jwt() -> None:
    r = rules(
        """
bucket_definitions:
  by_org:
    parameters: SELECT token_parameters.org_id AS org_id
    data: [SELECT * FROM projects WHERE org_id = bucket.org_id]
  by_role:
    parameters: SELECT request.jwt() ->> 'role' AS role WHERE request.jwt() ->> 'role' IS NOT NULL
    data: [SELECT * FROM docs WHERE role = bucket.role]
  me:
    parameters: SELECT token_parameters.user_id AS uid, token_parameters.admin AS admin
    data: [SELECT * FROM users WHERE id = bucket.uid AND is_admin = bucket.admin]
"""
    )
    payload = {
        "sub": "u1",
        "parameters": {"org_id": 42, "user_id": "spoofed", "admin": True},
        "role": "editor",
    }
    assert names(r.buckets_for_request(payload)) == [
        "by_org[42]",
        'by_role["editor"]',
        'me["u1",1]',
    ]
    assert names(r.buckets_for_request({"sub": "u2"})) == ["by_org[null]", 'me["u2",null]']
    out = r.evaluate_row("projects", {"id": 1, "org_id": 42})
    assert buckets(out) == ["by_org[42]"]
    # ... but no row ever lands in those NULL buckets (sync-protocol.md §8.5)
    assert r.evaluate_row("projects", {"id": 2, "org_id": None}) == []
    assert r.evaluate_row("users", {"id": "u2", "is_admin": None}) == []


def test_request_functions() -> None:
    r = rules(
        """
bucket_definitions:
  echo:
    parameters: >-
      SELECT request.user_id() AS a, request.jwt() AS b, request.parameters() AS c,
             request.parameters() ->> 'x' AS d, user_parameters.x AS e
    accept_potentially_dangerous_queries: true
    data: []
"""
    )
    assert r.warnings == ("sync rules: definition 'echo': no data queries; its buckets stay empty",)
    payload = {"sub": 7, "exp": 1, "nested": {"k": True}}
    (desc,) = r.buckets_for_request(payload, {"x": [1, 2]})
    values = json.loads(desc.bucket[len("echo") :])
    assert values[0] == 7
    assert json.loads(values[1]) == payload
    assert json.loads(values[2]) == {"x": [1, 2]}
    assert values[3] == "[1,2]"
    assert values[4] == "[1.0,2.0]"  # token/client parameter numbers are REAL (reference)


def test_json_each_parameter_query() -> None:
    r = rules(
        """
bucket_definitions:
  by_list:
    priority: 1
    parameters: SELECT value AS list_id FROM json_each(request.jwt() ->> 'lists')
    data:
      - SELECT * FROM todos WHERE list_id = bucket.list_id
  by_list_filtered:
    parameters: SELECT j.value AS list_id FROM json_each(request.jwt() -> 'lists') AS j WHERE j.value != 'l2' AND typeof(value) = 'text'
    data:
      - SELECT * FROM todos WHERE list_id = bucket.list_id
"""
    )
    got = r.buckets_for_request({"sub": "u", "lists": ["l1", "l2", "l1", 3]})
    assert got == [
        BucketDescription('by_list["l1"]', "by_list", 1),
        BucketDescription('by_list["l2"]', "by_list", 1),
        BucketDescription("by_list[3]", "by_list", 1),
        BucketDescription('by_list_filtered["l1"]', "by_list_filtered", 3),
    ]
    assert r.buckets_for_request({"sub": "u"}) == []
    with pytest.raises(RequestEvaluationError, match="malformed JSON"):
        r.buckets_for_request({"sub": "u", "lists": "l1"})


def test_several_parameter_queries_reorder_outputs() -> None:
    r = rules(
        """
bucket_definitions:
  access:
    parameters:
      - SELECT request.user_id() AS owner, 'own' AS kind
      - SELECT 'shared' AS kind, token_parameters.team AS owner
    data:
      - SELECT * FROM docs WHERE owner_id = bucket.owner AND kind = bucket.kind
"""
    )
    assert names(r.buckets_for_request({"sub": "u", "parameters": {"team": "t"}})) == [
        'access["u","own"]',
        'access["t","shared"]',
    ]
    assert buckets(r.evaluate_row("docs", {"id": 1, "owner_id": "t", "kind": "shared"})) == [
        'access["t","shared"]'
    ]


def test_static_where_filters_buckets() -> None:
    r = rules(
        """
bucket_definitions:
  admin:
    parameters: SELECT 1 AS ok WHERE request.jwt() ->> 'role' = 'admin'
    data: [SELECT * FROM audit WHERE 1 = bucket.ok]
"""
    )
    assert names(r.buckets_for_request({"sub": "a", "role": "admin"})) == ["admin[1]"]
    assert names(r.buckets_for_request({"sub": "a", "role": "user"})) == []
    assert buckets(r.evaluate_row("audit", {"id": 1})) == ["admin[1]"]


def test_client_parameters_warning() -> None:
    text = """
bucket_definitions:
  by_project:
    parameters: SELECT request.parameters() ->> 'project' AS project
    data: [SELECT * FROM tasks WHERE project_id = bucket.project]
"""
    r = rules(text)
    assert len(r.warnings) == 1
    assert "definition 'by_project', parameter query 1" in r.warnings[0]
    assert "accept_potentially_dangerous_queries" in r.warnings[0]
    assert names(r.buckets_for_request({"sub": "u"}, {"project": "p1"})) == ['by_project["p1"]']
    accepted = rules(
        text.replace("    data:", "    accept_potentially_dangerous_queries: true\n    data:")
    )
    assert accepted.warnings == ()


def test_priorities_and_global_order() -> None:
    r = rules(
        """
bucket_definitions:
  first:
    priority: 0
    data: [SELECT * FROM a]
  second:
    data: [SELECT * FROM b]
"""
    )
    assert r.buckets_for_request({"sub": "x"}) == [
        BucketDescription("first[]", "first", 0),
        BucketDescription("second[]", "second", 3),
    ]


# --------------------------------------------------------------------------- lookups (parameter queries over tables)

LOOKUPS = """
bucket_definitions:
  list_members:
    priority: 1
    parameters:
      - SELECT list_id FROM list_members WHERE user_id = request.user_id()
      - SELECT id AS list_id FROM lists WHERE request.user_id() IN editor_ids AND archived = 0
    data:
      - SELECT * FROM todos WHERE list_id = bucket.list_id
  org_admin:
    parameters: SELECT org_id, request.user_id() AS user_id FROM org_roles WHERE user_id = request.user_id() AND role = 'admin' AND request.jwt() ->> 'mfa' = 1
    data:
      - SELECT * FROM settings WHERE org_id = bucket.org_id AND updated_by = bucket.user_id
  by_project:
    parameters: SELECT id AS project_id FROM projects WHERE id IN token_parameters.projects
    data:
      - SELECT * FROM issues WHERE project_id = bucket.project_id
"""


class FakeLookupStore:
    """What the processor maintains in Redis: per source row, its current entries."""

    def __init__(self, rules: SyncRules) -> None:
        self.rules = rules
        self.by_row: dict[tuple[str, Any], list[LookupEntry]] = {}
        self.calls: list[Sequence[str]] = []

    def apply(self, table: str, row: dict[str, Any] | None, pk: Any) -> None:
        self.by_row[(table, pk)] = (
            [] if row is None else self.rules.evaluate_parameter_row(table, row)
        )

    def __call__(self, keys: Sequence[str]) -> dict[str, list[tuple[Any, ...]]]:
        self.calls.append(keys)
        out: dict[str, list[tuple[Any, ...]]] = {}
        for entries in self.by_row.values():
            for e in entries:
                if e.lookup in keys:
                    out.setdefault(e.lookup, []).append(e.values)
        return out


def test_lookup_rules_load() -> None:
    r = rules(LOOKUPS)
    assert r.has_lookups
    assert r.parameter_tables() == {"list_members", "lists", "org_roles", "projects"}
    assert r.tables() == {
        "list_members",
        "lists",
        "org_roles",
        "projects",
        "todos",
        "settings",
        "issues",
    }


def test_evaluate_parameter_row() -> None:
    r = rules(LOOKUPS)
    assert r.evaluate_parameter_row(
        "list_members", {"id": 1, "list_id": "l1", "user_id": "u1"}
    ) == [LookupEntry('list_members\x1f1\x1f["u1"]', ("l1",))]
    assert (
        r.evaluate_parameter_row("list_members", {"id": 1, "list_id": "l1", "user_id": None}) == []
    )
    assert r.evaluate_parameter_row(
        "lists", {"id": "l2", "editor_ids": '["u1","u2","u1"]', "archived": 0}
    ) == [
        LookupEntry('list_members\x1f2\x1f["u1"]', ("l2",)),
        LookupEntry('list_members\x1f2\x1f["u2"]', ("l2",)),
    ]
    assert (
        r.evaluate_parameter_row("lists", {"id": "l2", "editor_ids": '["u1"]', "archived": 1}) == []
    )
    assert r.evaluate_parameter_row(
        "org_roles", {"org_id": 5, "user_id": "u1", "role": "admin"}
    ) == [LookupEntry('org_admin\x1f1\x1f["u1",1]', (5,))]
    assert r.evaluate_parameter_row("projects", {"id": "p1"}) == [
        LookupEntry('by_project\x1f1\x1f["p1"]', ("p1",))
    ]
    assert r.evaluate_parameter_row("todos", {"id": 1}) == []
    with pytest.raises(RowEvaluationError, match="parameter query 2"):
        r.evaluate_parameter_row("lists", {"id": "l2", "editor_ids": "nope", "archived": 0})


def test_buckets_from_lookups() -> None:
    r = rules(LOOKUPS)
    store = FakeLookupStore(r)
    store.apply("list_members", {"list_id": "l1", "user_id": "u1"}, 1)
    store.apply("list_members", {"list_id": "l3", "user_id": "u2"}, 2)
    store.apply("lists", {"id": "l2", "editor_ids": '["u1"]', "archived": 0}, "l2")
    store.apply("org_roles", {"org_id": 5, "user_id": "u1", "role": "admin"}, 1)
    store.apply("projects", {"id": "p1"}, "p1")
    store.apply("projects", {"id": "p2"}, "p2")
    payload = {"sub": "u1", "mfa": True, "parameters": {"projects": ["p1", "p2", "p9"]}}
    assert r.lookup_keys_for_request(payload) == [
        'list_members\x1f1\x1f["u1"]',
        'list_members\x1f2\x1f["u1"]',
        'org_admin\x1f1\x1f["u1",1]',
        'by_project\x1f1\x1f["p1"]',
        'by_project\x1f1\x1f["p2"]',
        'by_project\x1f1\x1f["p9"]',
    ]
    got = r.buckets_for_request(payload, lookups=store)
    assert got == [
        BucketDescription('list_members["l1"]', "list_members", 1),
        BucketDescription('list_members["l2"]', "list_members", 1),
        BucketDescription('org_admin[5,"u1"]', "org_admin", 3),
        BucketDescription('by_project["p1"]', "by_project", 3),
        BucketDescription('by_project["p2"]', "by_project", 3),
    ]
    assert len(store.calls) == 1  # one batched read per request
    # without MFA the request-only condition fails: no lookup for org_admin at all
    no_mfa = {"sub": "u1", "mfa": False}
    assert 'org_admin\x1f1\x1f["u1",1]' not in r.lookup_keys_for_request(no_mfa)
    # the membership row goes away: the bucket disappears
    store.apply("list_members", None, 1)
    assert 'list_members["l1"]' not in names(r.buckets_for_request(payload, lookups=store))
    # the data side of the same definition
    assert buckets(r.evaluate_row("todos", {"id": "t", "list_id": "l2"})) == ['list_members["l2"]']
    assert buckets(r.evaluate_row("settings", {"id": 1, "org_id": 5, "updated_by": "u1"})) == [
        'org_admin[5,"u1"]'
    ]


def test_lookups_as_prefetched_mapping() -> None:
    r = rules(LOOKUPS)
    payload = {"sub": "u9"}
    keys = r.lookup_keys_for_request(payload)
    prefetched = {keys[0]: [["l7"]]}
    assert names(r.buckets_for_request(payload, lookups=prefetched)) == ['list_members["l7"]']


def test_lookups_required() -> None:
    r = rules(LOOKUPS)
    with pytest.raises(ValueError, match="lookups"):
        r.buckets_for_request({"sub": "u1"})


def test_values_from_json_round_trip() -> None:
    # the store may keep values as JSON: 1.0 and 1 give the same bucket
    r = rules(LOOKUPS)
    keys = r.lookup_keys_for_request({"sub": "u1"})
    got = r.buckets_for_request({"sub": "u1"}, lookups={keys[0]: [[1.0]], keys[1]: [(1,)]})
    assert names(got) == ["list_members[1]"]


# --------------------------------------------------------------------------- the processor's model

PROCESSOR_TEST_RULES = """
bucket_definitions:
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT * FROM todos WHERE owner_id = bucket.user_id
  done:
    data:
      - SELECT id, title FROM todos WHERE done = 1
"""


def _model(row: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The hand-written expectation the pipeline's differential tests use."""

    def dumps(v: Any) -> str:
        return json.dumps(v, separators=(",", ":"), ensure_ascii=False)

    oid = str(row["id"])
    out = []
    if row.get("owner_id") is not None:  # a NULL owner goes into no bucket (§8.5)
        out.append((f"by_user[{dumps(row['owner_id'])}]", "todos", oid, dumps(row)))
    if row.get("done") == 1:
        out.append(("done[]", "todos", oid, dumps({"id": row["id"], "title": row.get("title")})))
    return out


@given(
    row_id=st.integers(min_value=1, max_value=6),
    owner=st.sampled_from(["u1", "u2", None, 'q"x', "ünï ☃"]),
    title=st.one_of(st.none(), st.text(max_size=10)),
    done=st.sampled_from([0, 1]),
)
def test_matches_processor_model(
    row_id: int, owner: str | None, title: str | None, done: int
) -> None:
    r = _processor_rules()
    row = {"id": row_id, "owner_id": owner, "title": title, "done": done}
    got = [(o.bucket, o.object_type, o.object_id, o.data) for o in r.evaluate_row("todos", row)]
    assert got == _model(row)


_PROCESSOR_RULES: list[SyncRules] = []


def _processor_rules() -> SyncRules:
    if not _PROCESSOR_RULES:
        _PROCESSOR_RULES.append(rules(PROCESSOR_TEST_RULES))
    return _PROCESSOR_RULES[0]
