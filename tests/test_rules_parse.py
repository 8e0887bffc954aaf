"""Loading sync rules: file shape, SQL validation, error messages with positions."""

from __future__ import annotations

from pathlib import Path

import pytest

from bucketsync.errors import UserError
from pipeline.rules import RulesError, SyncRules, load_rules, parse_rules


def err(text: str) -> RulesError:
    with pytest.raises(RulesError) as info:
        parse_rules(text)
    return info.value


def one_data(sql: str, params: str | None = None) -> str:
    p = f"    parameters: {params}\n" if params else ""
    return f"bucket_definitions:\n  d:\n{p}    data:\n      - {sql}\n"


# --------------------------------------------------------------------------- file shape


def test_load_example(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "config:\n  edition: 1\n  storage_version: 2\nbucket_definitions:\n"
        "  g:\n    data:\n      - SELECT * FROM todos\n",
        encoding="utf-8",
    )
    r = load_rules(path)
    assert isinstance(r, SyncRules)
    assert r.source == str(path)
    assert len(r.content_hash) == 64
    assert r.definitions[0].is_global


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="cannot read"):
        load_rules(tmp_path / "nope.yaml")


def test_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(one_data("SELECT * FROM t WHERE"), encoding="utf-8")
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert str(info.value).startswith(f"sync rules: {path}: definition 'd', data query 1")
    assert info.value.source == str(path)


def test_rules_error_is_a_user_error() -> None:
    assert issubclass(RulesError, UserError)


def test_parameters_as_string_or_list_and_defaults() -> None:
    r = parse_rules(
        """
bucket_definitions:
  a:
    parameters: SELECT request.user_id() AS u
    data: [SELECT * FROM t WHERE o = bucket.u]
  b:
    parameters:
      - SELECT request.user_id() AS u
    priority: 0
    accept_potentially_dangerous_queries: false
    data: [SELECT * FROM t WHERE o = bucket.u]
"""
    )
    a, b = r.definitions
    assert (a.priority, b.priority) == (3, 0)
    assert len(a.parameter_queries) == len(b.parameter_queries) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty"),
        ("- a\n- b\n", "expected a mapping"),
        ("bucket_definitions: [1]\n", "must be a mapping"),
        ("config: {}\n", "missing bucket_definitions"),
        ("bucket_defs: {}\n", "unknown top-level key 'bucket_defs'"),
        (
            "bucket_definitions:\n  d:\n    paramters: SELECT 1 AS x\n    data: []\n",
            "definition 'd': unknown key 'paramters'",
        ),
        (
            "bucket_definitions:\n  d:\n    parameters: SELECT 1 AS x\n",
            "definition 'd': 'data' is required",
        ),
        ("bucket_definitions:\n  d:\n    data: SELECT * FROM t\n", "'data' must be a list"),
        (
            "bucket_definitions:\n  d:\n    data: [1]\n",
            "'data' entry 1 must be an SQL query string",
        ),
        (
            "bucket_definitions:\n  d:\n    priority: 4\n    data: []\n",
            "priority must be an integer from 0 to 3",
        ),
        (
            "bucket_definitions:\n  d:\n    priority: true\n    data: []\n",
            "priority must be an integer",
        ),
        (
            "bucket_definitions:\n  d:\n    accept_potentially_dangerous_queries: 1\n    data: []\n",
            "must be true or false",
        ),
        ("bucket_definitions:\n  d: [1]\n", "definition 'd': expected a mapping"),
        ("bucket_definitions:\n  'a[b]':\n    data: []\n", "must not contain brackets"),
        (
            "bucket_definitions:\n  d:\n    data: []\n  d:\n    data: []\n",
            "duplicate key 'd' at line 4",
        ),
        ("bucket_definitions:\n  d:\n   data: [\n", "invalid YAML at line 4"),
        (
            "streams:\n  s:\n    query: SELECT * FROM t\n",
            "sync streams need config.edition: 3",
        ),
        (
            "bucket_definitions: {}\nstreams:\n  s:\n    query: SELECT * FROM t\n",
            "sync streams need config.edition: 3",
        ),
        (
            "config:\n  edition: 2\nbucket_definitions: {}\n",
            "bucket_definitions are not allowed",
        ),
        (
            "config:\n  edition: 1\n  versioned_bucket_ids: true\nbucket_definitions: {}\n",
            "versioned_bucket_ids",
        ),
    ],
)
def test_file_shape_errors(text: str, message: str) -> None:
    assert message in str(err(text))


def test_config_unknown_keys_warn() -> None:
    r = parse_rules(
        "config:\n  edition: 1\n  frobnicate: 1\nbucket_definitions:\n  g:\n    data: []\n"
    )
    assert any("config.frobnicate" in w for w in r.warnings)


def test_event_definitions_ignored_with_warning() -> None:
    r = parse_rules("bucket_definitions: {}\nevent_definitions:\n  e:\n    payloads: [SELECT 1]\n")
    assert any("event_definitions" in w for w in r.warnings)
    assert any("empty" in w for w in r.warnings)


# --------------------------------------------------------------------------- SQL errors with positions


def test_brief_example_message() -> None:
    e = err(
        """
bucket_definitions:
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT * FROM lists WHERE owner_id = bucket.user_id
      - SELECT id, description FROM todos WHERE ownr = bucket.usr
"""
    )
    query = "SELECT id, description FROM todos WHERE ownr = bucket.usr"
    col = query.index("bucket.usr") + 1
    assert str(e) == (
        f"sync rules: definition 'by_user', data query 2 \"{query}\": "
        f"unknown bucket parameter 'usr' (defined: user_id) at column {col}"
    )
    assert (e.definition, e.query, e.line, e.column) == ("by_user", query, 1, col)


def test_multiline_query_positions() -> None:
    e = err(
        "bucket_definitions:\n  d:\n    data:\n      - |\n        SELECT id\n        FROM t\n        WHERE nope(x) = 1\n"
    )
    assert "at line 3, column 7" in str(e)
    assert "unknown function 'nope()'" in str(e)
    assert (e.line, e.column) == (3, 7)


P = "SELECT request.user_id() AS user_id"


@pytest.mark.parametrize(
    ("sql", "params", "message", "column"),
    [
        ("SELECT * FROM t WHERE x ==", None, "syntax error", 25),
        ("SELECT * FROM t WHERE (x = 1", None, "syntax error: expecting )", 28),
        ("SELECT * FROM t WHERE x = 'abc", None, "unterminated string", 27),
        ("SELECT id, FROM t", None, "unexpected ','", 10),
        ("SELECT * FROM t; SELECT * FROM u", None, "expected a single SELECT statement", 18),
        ("DELETE FROM t", None, "expected a SELECT statement", None),
        ("SELECT * FROM t JOIN u ON t.a = u.b", None, "joins are not supported", 17),
        ("SELECT * FROM t, u", None, "joins are not supported", 16),
        ("SELECT * FROM (SELECT 1) AS s", None, "subqueries are not supported", 15),
        ("SELECT * FROM t WHERE a IN (SELECT b FROM u)", None, "subqueries are not supported", 28),
        ("SELECT count(*) AS n FROM t", None, "aggregate functions are not supported", 8),
        ("SELECT * FROM t GROUP BY a", None, "GROUP BY is not supported", 17),
        ("SELECT * FROM t ORDER BY a", None, "ORDER BY is not supported", 17),
        ("SELECT * FROM t LIMIT 10", None, "LIMIT is not supported", 17),
        ("SELECT DISTINCT a FROM t", None, "DISTINCT is not supported", 8),
        ("SELECT a FROM t UNION SELECT a FROM u", None, "UNION is not supported", 17),
        ("SELECT upper(a) FROM t", None, "alias is required, e.g. upper(a) AS name", 8),
        ("SELECT nope(a) AS b FROM t", None, "unknown function 'nope()'", 19 - 11),
        (
            "SELECT a FROM t WHERE b = bucket.x",
            None,
            "unknown bucket parameter 'x' (defined: none)",
            27,
        ),
        ("SELECT a FROM t WHERE b = bucket.usr", P, "unknown bucket parameter 'usr'", 27),
        (
            "SELECT a FROM t WHERE archived = 0",
            P,
            "does not tie bucket parameter 'user_id' to the row",
            23,
        ),
        ("SELECT a FROM t", P, "does not tie bucket parameter 'user_id' to the row", None),
        (
            "SELECT a FROM t WHERE NOT (b = bucket.user_id)",
            P,
            "cannot be used inside an expression",
            None,
        ),
        (
            "SELECT a FROM t WHERE b = upper(bucket.user_id)",
            P,
            "can only be compared to the row",
            33,
        ),
        (
            "SELECT a FROM t WHERE b = bucket.user_id OR c = 1",
            P,
            "both sides of OR must use the same",
            23,
        ),
        ("SELECT a FROM t WHERE NOT bucket.user_id", P, "can only be compared to the row", 27),
        ("SELECT a FROM t WHERE b IN bucket.user_id", P, "cannot be on the right side of IN", 28),
        (
            "SELECT a FROM t WHERE bucket.user_id = bucket.user_id",
            P,
            "cannot compare two bucket parameters",
            23,
        ),
        (
            "SELECT bucket.user_id AS u FROM t WHERE b = bucket.user_id",
            P,
            "cannot be used in select columns",
            8,
        ),
        ("SELECT a FROM t WHERE b = request.user_id()", None, "cannot be used in data queries", 27),
        (
            "SELECT a FROM t WHERE b = token_parameters.x",
            None,
            "cannot be used in data queries",
            27,
        ),
        ("SELECT a FROM t", None, None, None),
        ("SELECT u.a FROM t", None, "unknown table 'u'", 8),
        ("SELECT x.* FROM t", None, "unknown table 'x'", 8),
        ("SELECT a", None, "a data query needs FROM <table>", 9),
        ("SELECT * FROM json_each('[1]')", None, "not supported in data queries", 15),
        ("SELECT * FROM a.b.c", None, "at most one qualifier", 15),
        ("SELECT CAST(a AS DATE) AS d FROM t", None, "CAST to DATE is not supported", 8),
        ("SELECT a FROM t WHERE a = ?", None, "query parameters", 27),
    ],
)
def test_data_query_errors(
    sql: str, params: str | None, message: str | None, column: int | None
) -> None:
    text = one_data(f'"{sql}"', f'"{params}"' if params else None)
    if message is None:
        parse_rules(text)
        return
    e = err(text)
    assert message in str(e)
    assert f"definition 'd', data query 1 \"{sql}\"" in str(e)
    if column is not None:
        assert e.column == column, str(e)
        assert str(e).endswith(f"at column {column}")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("SELECT user_id AS u", "unknown column 'user_id'"),
        ("SELECT request.user_id()", "alias is required"),
        ("SELECT * FROM t", "'*' is not supported here"),
        ("SELECT auth.user_id() AS u", "belongs to sync streams"),
        ("SELECT request.nope() AS u", "unknown function 'request.nope()'"),
        ("SELECT request.user_id(1) AS u", "takes no arguments"),
        ("SELECT bucket.x AS u", "only be used in data queries"),
        (
            "SELECT value AS u FROM json_each(request.jwt() ->> 'l') WHERE nope = 1",
            "json_each has no column 'nope'",
        ),
        ("SELECT value AS u FROM json_each(value)", "unknown column 'value'"),
        ("SELECT value AS u FROM json_each(1, 2)", "json_each() takes exactly 1 argument"),
        ("SELECT value AS u FROM generate_series(1, 2)", "only json_each is supported"),
        ("SELECT value AS u FROM json_each('{bad')", "malformed JSON"),
        ("SELECT a AS u FROM t WHERE upper(a) = request.user_id() || 'x'", None),
        (
            "SELECT a AS u FROM t WHERE a = upper(b || request.user_id())",
            "cannot mix table columns and request values",
        ),
        (
            "SELECT a AS u FROM t WHERE a IN token_parameters.x AND b IN token_parameters.y",
            "only one `column IN <request array>`",
        ),
        ("SELECT a AS u, a AS u FROM t", "duplicate output column 'u'"),
        (
            "SELECT a AS u FROM t WHERE a = request.user_id() OR b = 1",
            "both sides of OR must use the same request values",
        ),
        (
            "SELECT a AS u FROM t WHERE upper(a = request.user_id())",
            "cannot be used inside an expression",
        ),
    ],
)
def test_parameter_query_errors(params: str, message: str | None) -> None:
    text = f'bucket_definitions:\n  d:\n    parameters: "{params}"\n    data: []\n'
    if message is None:
        parse_rules(text)
        return
    e = err(text)
    assert message in str(e), str(e)
    assert f"definition 'd', parameter query 1 \"{params}\"" in str(e)


def test_parameter_queries_must_agree_on_outputs() -> None:
    e = err(
        """
bucket_definitions:
  d:
    parameters:
      - SELECT request.user_id() AS user_id
      - SELECT token_parameters.org AS org
    data: []
"""
    )
    assert "parameter query 2" in str(e)
    assert "outputs (org) differ from parameter query 1 (user_id)" in str(e)


def test_mixed_case_identifier_warning() -> None:
    r = parse_rules(one_data("SELECT ownerId FROM Todos"))
    assert any('use "ownerId"' in w and "column 8" in w for w in r.warnings)
    assert any('use "Todos"' in w for w in r.warnings)
    assert r.tables() == {"todos"}


def test_comments_in_sql() -> None:
    r = parse_rules(one_data("SELECT * FROM t -- everything\n", None))
    assert r.tables() == {"t"}
