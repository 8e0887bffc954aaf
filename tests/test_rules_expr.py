"""Expression semantics of sync rules: every operator and function, checked against SQLite."""

from __future__ import annotations

import math
import sqlite3
from typing import Any

import pytest

from pipeline.rules import RulesError
from pipeline.rules.queries import compile_expression

ROW: dict[str, Any] = {
    "i": 7,
    "n": -3,
    "z": 0,
    "f": 2.5,
    "s": "hello",
    "num_text": "42",
    "real_text": "3.5",
    "nul": None,
    "doc": '{"a":{"b":[1,2,{"c":"x"}]},"k":"v","t":true,"f":false,"n":null,"r":1.5,"e":[]}',
    "arr": '["a","b",3]',
    "mixed": "MiXeD ß",
    "flag": True,
    "obj": {"x": 1},
}


def ev(expr: str, row: dict[str, Any] | None = None) -> Any:
    return compile_expression(expr)(ROW if row is None else row)


@pytest.fixture(scope="module")
def oracle() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    return conn


def sqlite_eval(conn: sqlite3.Connection, expr: str) -> Any:
    cols = ", ".join(f"? AS {k}" for k in ROW if k not in ("obj",))
    params = [v for k, v in ROW.items() if k not in ("obj",)]
    params = [int(v) if isinstance(v, bool) else v for v in params]
    return conn.execute(f"SELECT {expr} FROM (SELECT {cols})", params).fetchone()[0]


# Expressions whose result must equal SQLite's (value and type).
SQLITE_EXPRESSIONS = [
    # literals
    "1",
    "-1",
    "1.5",
    "1e3",
    "'it''s'",
    "NULL",
    "0x10",
    # comparison
    "i = 7",
    "i == 7",
    "i = 7.0",
    "i != 7",
    "i <> 8",
    "i < 8",
    "i <= 7",
    "i > 7",
    "i >= 8",
    "s = 'hello'",
    "s < 'world'",
    "num_text = 42",
    "i < 'a'",
    "nul = nul",
    "nul != 1",
    "i < nul",
    "i IS 7",
    "nul IS NULL",
    "nul IS nul",
    "i IS NOT nul",
    "i IS NULL",
    "i IS NOT NULL",
    "nul IS NOT NULL",
    "i IS TRUE",
    "z IS FALSE",
    "nul IS NOT TRUE",
    # logic (edition 1 is two-valued: NULL results are in test_legacy_logic)
    "1 AND 0",
    "0 AND nul",
    "nul OR 1",
    "NOT 0",
    "NOT 'abc'",
    "NOT '1'",
    "s AND 1",
    "'0.5' AND 1",
    "(i > 1 AND i < 10) OR s = 'x'",
    # arithmetic
    "i + 1",
    "i - 10",
    "i * 3",
    "i / 2",
    "n / 2",
    "i / 2.0",
    "i / 0",
    "i % 3",
    "n % 3",
    "f % 2",
    "i % 0",
    "-i",
    "-s",
    "- nul",
    "num_text + 1",
    "real_text + 1",
    "'5x' + 1",
    "s + 1",
    "f * 2",
    "nul + 1",
    "9223372036854775807 + 1",
    "i & 3",
    "i | 8",
    "i << 2",
    "n >> 1",
    "~i",
    # concatenation
    "s || ' world'",
    "i || f",
    "s || nul",
    # IN / BETWEEN / LIKE / CASE
    "i IN (1, 7)",
    "i IN (1, 2)",
    "i IN (1, NULL)",
    "i NOT IN (1, 2)",
    "nul IN (1)",
    "i BETWEEN 1 AND 10",
    "i NOT BETWEEN 1 AND 5",
    "nul BETWEEN 1 AND 2",
    "s LIKE 'HE%'",
    "s LIKE 'h_llo'",
    "s NOT LIKE '%z%'",
    "nul LIKE 'a'",
    "'a%c' LIKE 'a!%c' ESCAPE '!'",
    "CASE WHEN i > 5 THEN 'big' ELSE 'small' END",
    "CASE i WHEN 1 THEN 'one' WHEN 7 THEN 'seven' END",
    "CASE WHEN nul THEN 1 END",
    # casts
    "CAST(i AS TEXT)",
    "CAST(f AS TEXT)",
    "CAST(num_text AS INTEGER)",
    "CAST(real_text AS INTEGER)",
    "CAST(' 12abc' AS INTEGER)",
    "CAST('-1.9' AS INTEGER)",
    "CAST(f AS INTEGER)",
    "CAST(-2.9 AS INTEGER)",
    "CAST(1e20 AS INTEGER)",
    "CAST('99999999999999999999' AS INTEGER)",
    "CAST(s AS INTEGER)",
    "CAST(i AS REAL)",
    "CAST(real_text AS REAL)",
    "CAST('  2.5e1xyz' AS REAL)",
    "CAST(s AS REAL)",
    "CAST('3.0' AS NUMERIC)",
    "CAST('3.5' AS NUMERIC)",
    "CAST('1e3' AS NUMERIC)",
    "CAST(4.0 AS NUMERIC)",
    "CAST(s AS NUMERIC)",
    "CAST(nul AS TEXT)",
    "CAST(s AS BLOB)",
    # JSON operators and functions
    "doc -> 'k'",
    "doc ->> 'k'",
    "doc -> 'a'",
    "doc ->> 'a'",
    "doc ->> 'a.b'",
    "doc ->> '$.a.b[1]'",
    "doc ->> '$.a.b[#-1]'",
    "doc -> '$.a.b[2].c'",
    "doc ->> '$.a.b[2].c'",
    "doc ->> 't'",
    "doc ->> 'f'",
    "doc -> 'n'",
    "doc ->> 'n'",
    "doc ->> 'r'",
    "doc ->> 'missing'",
    "doc -> 'missing'",
    "doc -> '$'",
    "arr -> 1",
    "arr ->> 2",
    "arr ->> 9",
    "nul ->> 'a'",
    "json_extract(doc, '$.k')",
    "json_extract(doc, '$.a.b')",
    "json_extract(doc, '$.k', '$.r', '$.zz')",
    "json_extract(doc, '$.t')",
    "json_array_length(arr)",
    "json_array_length(doc)",
    "json_array_length(doc, '$.a.b')",
    "json_array_length(doc, '$.zz')",
    "json_array_length(nul)",
    "json_type(doc)",
    "json_type(doc, '$.r')",
    "json_type(doc, '$.t')",
    "json_type(doc, '$.a.b')",
    "json_valid(doc)",
    "json_valid(s)",
    "json(' [1, 2] ')",
    # scalar functions
    "upper(s)",
    "lower('ABC')",
    "upper(mixed)",
    "lower(mixed)",
    "upper(nul)",
    "length(s)",
    "length(i)",
    "length(f)",
    "length(nul)",
    "length('')",
    "substr(s, 2)",
    "substr(s, 2, 3)",
    "substr(s, -3)",
    "substr(s, -3, 2)",
    "substr(s, 0, 2)",
    "substr(s, 3, -2)",
    "substr(s, -10, 3)",
    "substr(12345, 2, 2)",
    "substr('héllo', 2, 2)",
    "substring(s, 1, 1)",
    "instr(s, 'l')",
    "instr(s, 'z')",
    "instr(s, '')",
    "replace(s, 'l', 'L')",
    "replace(s, '', 'x')",
    "trim('  a  ')",
    "ltrim('xxa', 'x')",
    "rtrim('axx', 'x')",
    "trim('xxaxx', 'x')",
    "hex(s)",
    "hex(i)",
    "hex(f)",
    "hex(nul)",
    "hex('é')",
    "typeof(i)",
    "typeof(f)",
    "typeof(s)",
    "typeof(nul)",
    "typeof(CAST(s AS BLOB))",
    "abs(n)",
    "abs(f)",
    "abs('-3')",
    "abs(nul)",
    "round(2.5)",
    "round(-2.5)",
    "round(1.2345, 2)",
    "round(i)",
    "ifnull(nul, 'x')",
    "ifnull(i, 'x')",
    "coalesce(nul, nul, 3)",
    "coalesce(nul, nul)",
    "nullif(i, 7)",
    "nullif(i, '7')",
    "iif(i > 5, 'y', 'n')",
    "iif(nul, 'y', 'n')",
    "iif('1', 'y', 'n')",
    # date/time
    "datetime('2024-01-02')",
    "datetime('2024-01-02 03:04')",
    "datetime('2024-01-02T03:04:05Z')",
    "datetime('2024-01-02T03:04:05.123Z')",
    "datetime('2024-01-02T03:04:05+02:00')",
    "datetime('2460000.5')",
    "datetime(2460000.5)",
    "datetime('12:30')",
    "datetime('bad')",
    "datetime(1700000000, 'unixepoch')",
    "datetime(1700000000.7, 'unixepoch')",
    "datetime(nul)",
    "unixepoch('2024-01-02T03:04:05Z')",
    "unixepoch('2024-01-02 03:04:05.999')",
    "unixepoch(1700000000.7, 'unixepoch')",
    "unixepoch('2024-01-02')",
]


@pytest.mark.parametrize("expr", SQLITE_EXPRESSIONS)
def test_matches_sqlite(oracle: sqlite3.Connection, expr: str) -> None:
    expected = sqlite_eval(oracle, expr)
    got = ev(expr)
    assert type(got) is type(expected), (expr, got, expected)
    if isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == expected, (expr, got, expected)


# Edition 1 (the reference's legacy engine): AND, OR and NOT never give NULL; NULL is false.
@pytest.mark.parametrize(
    ("expr", "expected"),
    [("1 AND nul", 0), ("nul OR 0", 0), ("NOT nul", 1), ("NOT (nul = 1)", 1), ("nul AND nul", 0)],
)
def test_legacy_logic(expr: str, expected: int) -> None:
    assert ev(expr) == expected


# PowerSync-specific or deliberately different behaviour.
@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("'a' IN arr", 1),
        ("'z' IN arr", 0),
        ("3 IN arr", 1),
        ("'3' IN arr", 0),
        ("nul IN arr", None),
        ("'a' IN nul", None),
        ("json_keys(doc)", '["a","k","t","f","n","r","e"]'),
        ("base64(s)", "aGVsbG8="),
        ("base64(nul)", ""),
        ("flag", 1),
        ("flag = 1", 1),
        ("obj", '{"x":1}'),
        ("obj ->> 'x'", 1),
        ("json_valid(nul)", 0),
        ("unixepoch('2024-01-02T03:04:05.250Z', 'subsec')", 1704164645.25),
        ("datetime('2024-01-02T03:04:05.250Z', 'subsec')", "2024-01-02 03:04:05.250"),
        ("datetime('2024-01-02', '+1 day')", None),
        ('"s"', "hello"),
        ("t.s", "hello"),
        ("S", "hello"),
    ],
)
def test_powersync_semantics(expr: str, expected: Any) -> None:
    got = ev(expr)
    assert type(got) is type(expected) and got == expected, (expr, got)


def test_missing_column_is_null() -> None:
    assert ev("missing") is None
    assert ev("missing IS NULL") == 1


def test_quoted_identifiers_keep_case() -> None:
    assert ev('"Name"', {"Name": "x", "name": "y"}) == "x"
    assert ev("Name", {"Name": "x", "name": "y"}) == "y"


def test_real_nan_and_inf() -> None:
    assert ev("f", {"f": float("nan")}) is None
    assert ev("CAST(f AS TEXT)", {"f": float("inf")}) == "Infinity"


# REAL -> TEXT as the reference prints it (JavaScript Number#toString), not SQLite's %!.15g
@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("1.0 || ''", "1"),
        ("CAST(1.0 AS TEXT)", "1"),
        ("CAST(1e20 AS TEXT)", "100000000000000000000"),
        ("CAST(0.1 + 0.2 AS TEXT)", "0.30000000000000004"),
        ("CAST(3e60 AS TEXT)", "3e+60"),
    ],
)
def test_real_to_text_like_reference(expr: str, expected: str) -> None:
    assert ev(expr) == expected


def test_runtime_errors_raise() -> None:
    from pipeline.rules.errors import SqlEvalError

    with pytest.raises(SqlEvalError, match="malformed JSON"):
        ev("s ->> 'a'")
    with pytest.raises(SqlEvalError, match="JSON array"):
        ev("'a' IN doc")
    with pytest.raises(SqlEvalError, match="json_keys"):
        ev("json_keys(arr)")


def test_constant_folding_errors_at_load() -> None:
    with pytest.raises(RulesError, match="malformed JSON"):
        compile_expression("'{bad' ->> 'a'")
    with pytest.raises(RulesError, match="bad JSON path"):
        compile_expression("json_extract(doc, 'a')")


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("frob(i)", "unknown function 'frob()'"),
        ("upper(i, s)", "upper() takes 1 argument, got 2"),
        ("substr(s)", "substr() takes 2 to 3 arguments, got 1"),
        ("coalesce(s)", "coalesce() takes at least 2 arguments"),
        ("count(*)", "aggregate functions are not supported"),
        ("max(i)", "aggregate functions are not supported"),
        ("json_each(s)", "only allowed as the FROM of a parameter query"),
        ("CAST(i AS DATE)", "CAST to DATE is not supported"),
        ("i = ?", "query parameters"),
        ("i IN (SELECT 1)", "subqueries are not supported"),
        ("EXISTS (SELECT 1)", "subqueries are not supported"),
        ("x.i", "unknown table 'x'"),
        ("s.t.i", "schema-qualified column references"),
        ("s GLOB 'a*'", "not supported"),
        ("request.user_id()", "cannot be used in data queries"),
        ("token_parameters.x", "cannot be used in data queries"),
        ("bucket.x", "unknown bucket parameter 'x'"),
    ],
)
def test_compile_errors(expr: str, message: str) -> None:
    with pytest.raises(
        RulesError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")
    ):
        compile_expression(expr)
