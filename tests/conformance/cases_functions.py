"""Cases from sql_functions.test.ts and sql_operators.test.ts (legacy compatibility, the
edition-1 default). Arguments come from row columns so that INTEGER (Python int, the
reference's bigint) and REAL (Python float, the reference's number) stay distinct."""

from __future__ import annotations

from typing import Any

from tests.conformance.harness import RAISES, Case, Expr

FN = "sql_functions.test.ts > "
OP = "sql_operators.test.ts > "


def call(fn: str, *args: Any) -> tuple[str, dict[str, Any]]:
    names = [f"a{i}" for i in range(len(args))]
    return f"{fn}({', '.join(names)})", dict(zip(names, args, strict=True))


def fcase(name: str, items: list[tuple[Any, ...]], **kw: Any) -> Case:
    """Items: ``(call, want)``, or ``(call, want, ours)`` for the legacy-json-null difference."""
    checks: list[Expr] = []
    for (sql, row), want, *ours in items:
        if ours:
            checks.append(Expr(want, sql=sql, row=row, ours=ours[0], diff=JSON_NULL, **kw))
        else:
            checks.append(Expr(want, sql=sql, row=row, **kw))
    return Case(FN + name, None, checks)


JSON_NULL = "legacy-json-null"


def opcase(name: str, op: str, items: list[tuple[Any, Any, Any]]) -> Case:
    return Case(
        OP + name, None, [Expr(w, sql=f"a {op} b", row={"a": a, "b": b}) for a, b, w in items]
    )


B = bytes


def _expr(want: Any, sql: str, row: dict[str, Any], *ours: Any) -> Expr:
    """``ours``: what we give instead (the legacy-json-null difference)."""
    if ours:
        return Expr(want, sql=sql, row=row, ours=ours[0], diff=JSON_NULL)
    return Expr(want, sql=sql, row=row)


CASES: list[Case] = [
    fcase(
        "json extract",
        [
            (call("json_extract", '{"foo":"bar"}', "$.foo"), "bar"),
            (call("json_extract", '{"foo":42}', "$.foo"), 42),
            (call("json_extract", '{"foo":true}', "$.foo"), 1),
            (call("json_extract", '{"foo": 42.0}', "$.foo"), 42.0),
            (call("json_extract", '{"foo":42}', "$.bar.baz"), None),
            (call("json_extract", '{"foo":42}', "$"), '{"foo":42}'),
            (call("json_extract", '{"foo": 42.0}', "$"), '{"foo":42.0}'),
            (call("json_extract", '{"foo": true}', "$"), '{"foo":true}'),
            (call("json_extract", '{"foo": null}', "$.foo"), "null", None),
            (call("json_extract", "{}", "$.foo"), None),
        ],
    ),
    Case(
        FN + "->>",
        None,
        [
            _expr(want, f"a ->> '{path}'", {"a": doc}, *ours)
            for doc, path, want, *ours in [
                ('{"foo":"bar"}', "$.foo", "bar"),
                ('{"foo":42}', "$.foo", 42),
                ('{"foo": 42.0}', "$.foo", 42.0),
                ('{"foo":"bar"}', "foo", "bar"),
                ('{"foo":42}', "foo", 42),
                ('{"foo": 42.0}', "foo", 42.0),
                ('{"foo": 42.0}', "$", '{"foo":42.0}'),
                ('{"foo": true}', "$.foo", 1),
                ('{"foo": null}', "$.foo", "null", None),
                ("{}", "$.foo", None),
            ]
        ],
    ),
    Case(
        FN + "->",
        None,
        [
            _expr(want, f"a -> '{path}'", {"a": doc}, *ours)
            for doc, path, want, *ours in [
                ('{"foo":"bar"}', "$.foo", '"bar"'),
                ('{"foo":42}', "$.foo", "42"),
                ('{"foo": 42.0}', "$.foo", "42.0"),
                ('{"foo":"bar"}', "foo", '"bar"'),
                ('{"foo":42}', "foo", "42"),
                ('{"foo":42}', "bar", None),
                ('{"foo": 42.0}', "foo", "42.0"),
                ('{"foo": 42.0}', "$", '{"foo":42.0}'),
                ('{"foo": true}', "$.foo", "true"),
                ('{"foo": null}', "$.foo", None, "null"),
                ("{}", "$.foo", None),
            ]
        ],
    ),
    fcase(
        "json_array_length",
        [
            (call("json_array_length", "[1,2,3,4]"), 4),
            (call("json_array_length", "[1,2,3,4]", "$"), 4),
            (call("json_array_length", "[1,2,3,4]", "$.a"), None),
            (call("json_array_length", '{"a":[1,2,3,4]}', "$.a"), 4),
            (call("json_array_length", '{"a":[1,2,3,4]}'), 0),
        ],
    ),
    fcase(
        "json_keys",
        [
            (
                call("json_keys", '{"a": 1, "b": "2", "0": "test", "c": {"d": "e"}}'),
                '["0","a","b","c"]',
            ),
            (call("json_keys", "{}"), "[]"),
            (call("json_keys", None), None),
            (call("json_keys", '{"a": 1, "a": 2}'), RAISES),
            (call("json_keys", "[1,2,3]"), RAISES),
            (call("json_keys", 3), RAISES),
        ],
    ),
    fcase(
        "json_valid",
        [
            (call("json_valid", '{"a": 1, "b": "2", "0": "test", "c": {"d": "e"}}'), 1),
            (call("json_valid", "{}"), 1),
            (call("json_valid", None), 0),
            (call("json_valid", '{"a": 1, "a": 2}'), 0),
            (call("json_valid", "[1,2,3]"), 1),
            (call("json_valid", 3), 1),
            (call("json_valid", "test"), 0),
            (call("json_valid", '"test"'), 1),
            (call("json_valid", "true"), 1),
            (call("json_valid", "TRUE"), 0),
        ],
    ),
    fcase(
        "typeof",
        [
            (call("typeof", None), "null"),
            (call("typeof", "test"), "text"),
            (call("typeof", ""), "text"),
            (call("typeof", 1), "integer"),
            (call("typeof", 1.0), "real"),
            (call("typeof", 1.5), "real"),
            (call("typeof", B([1, 2, 3])), "blob"),
        ],
    ),
    fcase(
        "length",
        [
            (call("length", None), None),
            (call("length", "abc"), 3),
            (call("length", 123), 3),
            (call("length", 123.4), 5),
            (call("length", B([1, 2, 3])), 3),
        ],
    ),
    fcase(
        "hex",
        [
            (call("hex", None), ""),
            (call("hex", "abC"), "616243"),
            (call("hex", B(b"abC")), "616243"),
            (call("hex", 123), "313233"),
            (call("hex", 123.4), "3132332E34"),
        ],
    ),
    fcase(
        "base64",
        [
            (call("base64", None), ""),
            (call("base64", "abc"), "YWJj"),
            (call("base64", B(b"abc")), "YWJj"),
            (call("base64", 123), "MTIz"),
            (call("base64", 123.4), "MTIzLjQ="),
        ],
    ),
    fcase(
        "uuid_blob",
        [
            (call("uuid_blob", None), None),
            (
                call("uuid_blob", "550e8400-e29b-41d4-a716-446655440000"),
                B([85, 14, 132, 0, 226, 155, 65, 212, 167, 22, 68, 102, 85, 68, 0, 0]),
            ),
            (
                call("uuid_blob", "877b8be2-5a63-48e9-8ece-5e45b1d4f4ae"),
                B([135, 123, 139, 226, 90, 99, 72, 233, 142, 206, 94, 69, 177, 212, 244, 174]),
            ),
            (call("uuid_blob", "non-uuid"), RAISES),
            (
                ("base64(uuid_blob(a0))", {"a0": "550e8400-e29b-41d4-a716-446655440000"}),
                "VQ6EAOKbQdSnFkRmVUQAAA==",
            ),
        ],
    ),
    fcase(
        "ifnull",
        [
            (call("ifnull", None, None), None),
            (call("ifnull", "test", None), "test"),
            (call("ifnull", None, "test"), "test"),
            (call("ifnull", "test1", "test2"), "test1"),
        ],
    ),
    fcase(
        "iif",
        [
            (call("iif", None, 1.0, 2.0), 2.0),
            (call("iif", 0.0, 1.0, 2.0), 2.0),
            (call("iif", 1.0, "first", "second"), "first"),
            (call("iif", 0.1, "is_true", "is_false"), "is_true"),
            (call("iif", "a", "is_true", "is_false"), "is_false"),
            (call("iif", 0, "is_true", "is_false"), "is_false"),
            (call("iif", 2, "is_true", "is_false"), "is_true"),
            (call("iif", B([]), "is_true", "is_false"), "is_false"),
            (call("iif", B(b"abC"), "is_true", "is_false"), "is_false"),
        ],
    ),
    fcase(
        "upper",
        [
            (call("upper", None), None),
            (call("upper", "abc"), "ABC"),
            (call("upper", 123), "123"),
            (call("upper", 3e60), "3E+60"),
            (call("upper", B(b"abC")), "ABC"),
        ],
    ),
    fcase(
        "lower",
        [
            (call("lower", None), None),
            (call("lower", "ABC"), "abc"),
            (call("lower", 123), "123"),
            (call("lower", 3e60), "3e+60"),
            (call("lower", B(b"abC")), "abc"),
        ],
    ),
    fcase(
        "substring",
        [
            (call("substring", "abcde", 2, 3), "bcd"),
            (call("substring", "abcde", 2), "bcde"),
            (call("substring", "abcde", 2, None), None),
            (call("substring", "abcde", 0, 1), ""),
            (call("substring", "abcde", 0, 2), "a"),
            (call("substring", "abcde", 1, 2), "ab"),
            (call("substring", "abcde", -2), "de"),
            (call("substring", "abcde", -2, 1), "d"),
            (call("substring", "abcde", 6, -5), "abcde"),
            (call("substring", "abcde", 5, -2), "cd"),
            (call("substring", "2023-06-28 14:12:00.999Z", 1, 10), "2023-06-28"),
        ],
    ),
    Case(
        FN + "cast",
        None,
        [
            Expr(want, sql=f"CAST(a AS {to})", row={"a": value})
            for value, to, want in [
                (None, "text", None),
                (None, "integer", None),
                (None, "numeric", None),
                (None, "real", None),
                (None, "blob", None),
                (1, "text", "1"),
                (1, "integer", 1),
                (1, "numeric", 1),
                (1, "real", 1.0),
                (1, "blob", B([49])),
                (1.2, "text", "1.2"),
                (1.2, "integer", 1),
                (1.2, "numeric", 1.2),
                (1.2, "real", 1.2),
                (1.2, "blob", B([49, 46, 50])),
                ("abc", "text", "abc"),
                ("abc", "integer", 0),
                ("abc", "numeric", 0),
                ("abc", "real", 0.0),
                ("1.2abc", "integer", 1),
                ("1.2abc", "numeric", 1.2),
                ("1.2abc", "real", 1.2),
                ("1.2e60abc", "numeric", 1.2e60),
                (" 1e60abc", "numeric", 1e60),
                ("-12abc", "integer", -12),
                ("+12abc", "integer", 12),
                ("-12.9abc", "integer", -12),
                ("-12.5abc", "numeric", -12.5),
                ("-.5abc", "numeric", -0.5),
                ("+1.2e2abc", "numeric", 120),
                ("-1.2e2abc", "numeric", -120),
                ("abc", "blob", B(b"abc")),
            ]
        ],
    ),
    fcase(
        "unixepoch",
        [
            (call("unixepoch", "now"), None),
            (call("unixepoch", "2023-06-28 14:12", "auto"), None),
            (call("unixepoch", "2023-06-28 14:12"), 1687961520),
            (call("unixepoch", "2023-06-28 14:12:00"), 1687961520),
            (call("unixepoch", "2023-06-28 14:12:00+00:00"), 1687961520),
            (call("unixepoch", "2023-06-28 14:12:00Z"), 1687961520),
            (call("unixepoch", "2023-06-28 14:12:00.999"), 1687961520),
            (call("unixepoch", "2023-06-28 14:12:00.999Z"), 1687961520),
            (call("unixepoch", "2023-06-28T14:12:00.999Z"), 1687961520),
            (call("unixepoch", "2023-06-28T14:12:00+00:00"), 1687961520),
            (call("unixepoch", "2023-06-28T14:12+00:00"), 1687961520),
            (call("unixepoch", "2023-06-28T16:12+02:00"), 1687961520),
            (call("unixepoch", "2023-06-28T16:12+02"), None),
            (call("unixepoch", "2023-06-28"), 1687910400),
            (call("unixepoch", "0000-01-01T00:00"), -62167219200),
            (call("unixepoch", "3000-01-01T00:00"), 32503680000),
            (call("unixepoch", "2023"), -210691972800),
            (call("unixepoch", "2023."), -210691972800),
            (call("unixepoch", "2023.123"), -210691962173),
            (call("unixepoch", 2023.0), -210691972800),
            (call("unixepoch", 2023), -210691972800),
            (call("unixepoch", 2023.123), -210691962173),
            (call("unixepoch", 1687961520, "unixepoch"), 1687961520),
            (call("unixepoch", 1687961520.0, "unixepoch"), 1687961520),
            (call("unixepoch", 1687961520.567, "unixepoch"), 1687961520),
            (call("unixepoch", 1687961520.567, "unixepoch", "subsec"), 1687961520.567),
            (call("unixepoch", 1687961520.567, "unixepoch", "subsecond"), 1687961520.567),
            (call("unixepoch", "2023-06-28 14:12:00.999", "subsec"), 1687961520.999),
            (call("unixepoch", "2023-06-28 14:12:00.999", "subsecond"), 1687961520.999),
            (call("unixepoch", "2023-06-28 14:12:00.0", "subsecond"), 1687961520.0),
        ],
    ),
    fcase(
        "datetime",
        [
            (call("datetime", "now"), None),
            (call("datetime", "2023-06-28 14:12", "auto"), None),
            (call("datetime", "2023-06-28 14:12"), "2023-06-28 14:12:00"),
            (call("datetime", "2023-06-28 14:12:00"), "2023-06-28 14:12:00"),
            (call("datetime", "2023-06-28 14:12:00+00:00"), "2023-06-28 14:12:00"),
            (call("datetime", "2023-06-28 14:12:00Z"), "2023-06-28 14:12:00"),
            (call("datetime", "2023-06-28 14:12:00.999"), "2023-06-28 14:12:00"),
            (call("datetime", "2023-06-28 14:12:00.999Z"), "2023-06-28 14:12:00"),
            (call("datetime", "2023-06-28T14:12:00.999Z"), "2023-06-28 14:12:00"),
            (call("datetime", "2023-06-28T14:12:00+00:00"), "2023-06-28 14:12:00"),
            (call("datetime", "2023-06-28T14:12+00:00"), "2023-06-28 14:12:00"),
            (call("datetime", "2023-06-28T16:12+02:00"), "2023-06-28 14:12:00"),
            (call("datetime", "2023-06-28T16:12+02"), None),
            (call("datetime", "2023-06-28"), "2023-06-28 00:00:00"),
            (call("datetime", "0000-01-01T00:00"), "0000-01-01 00:00:00"),
            (call("datetime", "3000-01-01T00:00"), "3000-01-01 00:00:00"),
            (call("datetime", "2023"), "-4707-06-08 12:00:00"),
            (call("datetime", "2023."), "-4707-06-08 12:00:00"),
            (call("datetime", "2023.123"), "-4707-06-08 14:57:07"),
            (call("datetime", 2023.0), "-4707-06-08 12:00:00"),
            (call("datetime", 2023), "-4707-06-08 12:00:00"),
            (call("datetime", 2023.123), "-4707-06-08 14:57:07"),
            (call("datetime", 1687961520, "unixepoch"), "2023-06-28 14:12:00"),
            (call("datetime", 1687961520.0, "unixepoch"), "2023-06-28 14:12:00"),
            (call("datetime", 1687961520.567, "unixepoch"), "2023-06-28 14:12:00"),
            (call("datetime", 1687961520.567, "unixepoch", "subsec"), "2023-06-28 14:12:00.567"),
            (call("datetime", 1687961520.567, "unixepoch", "subsecond"), "2023-06-28 14:12:00.567"),
            (call("datetime", "2023-06-28 14:12:00.999", "subsec"), "2023-06-28 14:12:00.999"),
            (call("datetime", "2023-06-28 14:12:00.999", "subsecond"), "2023-06-28 14:12:00.999"),
            (call("datetime", "2023-06-28 14:12:00.0", "subsecond"), "2023-06-28 14:12:00.000"),
        ],
    ),
    fcase(
        "instr",
        [
            (call("instr", None, None), None),
            (call("instr", None, "a"), None),
            (call("instr", "abc", None), None),
            (call("instr", "hello world", "world"), 7),
            (call("instr", "hello world", "hello"), 1),
            (call("instr", "hello world", "o"), 5),
            (call("instr", "hello world", "xyz"), 0),
            (call("instr", "hello", "HELLO"), 0),
            (call("instr", "abc", "a"), 1),
            (call("instr", "abc", "ab"), 1),
            (call("instr", "abc", "abc"), 1),
            (call("instr", "abc", "c"), 3),
            (call("instr", "abc", "bc"), 2),
            (call("instr", "a", "a"), 1),
            (call("instr", "a", "b"), 0),
            (call("instr", "abc", ""), 1),
            (call("instr", "", ""), 1),
            (call("instr", "", "a"), 0),
            (call("instr", "abcabc", "b"), 2),
            (call("instr", "aaa", "a"), 1),
            (call("instr", "Hello World", "hello"), 0),
            (call("instr", "Hello World", "Hello"), 1),
            (call("instr", "abcdef", "cde"), 3),
            (call("instr", "abcdef", "ef"), 5),
            (call("instr", "foo|bar|baz", "|"), 4),
            (call("instr", "foo.bar", "."), 4),
            (call("instr", "hello\nworld", "\n"), 6),
            (call("instr", "path/to/file", "/"), 5),
            (call("instr", "rofl \U0001f602", "\U0001f602"), 6),
            (call("instr", "\U0001f602\U0001f602", "\U0001f602"), 1),
            (call("instr", 12345.0, "3"), 3),
            (call("instr", "12345", 3.0), 3),
            (call("instr", 123.0, 123.0), 1),
            (call("instr", B(b"hello world"), B(b"world")), 7),
            (call("instr", B(b"hello world"), B(b"hello")), 1),
            (call("instr", B(b"hello world"), B(b"xyz")), 0),
            (call("instr", B(b"abc"), B(b"bc")), 2),
            (call("instr", B([0, 0xFF, 0xAB, 0xCD]), B([0xAB, 0xCD])), 3),
            (call("instr", B([0, 0xFF, 0xAB]), B([0xCD])), 0),
            (call("instr", B(b"abc"), B()), 1),
            (call("instr", B(), B()), 1),
            (call("instr", B(), B(b"a")), 0),
            (call("instr", B(b"hello world"), "world"), 7),
            (call("instr", "hello world", B(b"world")), 7),
            (call("instr", B(b"abc"), "xyz"), 0),
            (call("instr", None, B(b"a")), None),
            (call("instr", B(b"a"), None), None),
        ],
    ),
    # ------------------------------------------------------------------ operators
    opcase(
        "&&",
        "&&",
        [
            (None, '["foo"]', None),
            ('["foo"]', None, None),
            ('["bar"]', '["foo"]', 0),
            ("[]", '["foo"]', 0),
            ('["foo"]', "[]", 0),
            ('["foo"]', '["foo"]', 1),
            ('["bar","foo"]', '["foo"]', 1),
            ('["foo"]', '["bar","foo"]', 1),
            ('["0"]', '["foo"]', 0),
            ('["0","1"]', '["foo","bar"]', 0),
            ('["0"]', '["0"]', 1),
            ("[1]", "[1]", 1),
            ("[1,2,3]", "[4,3]", 1),
        ],
    ),
    opcase(
        "=",
        "=",
        [
            (1.0, 1, 1),
            (1.1, 1, 0),
            ("1", 1, 0),
            ("", 0, 0),
            (1.0, None, None),
            (0.0, None, None),
            (None, "", None),
            (None, None, None),
        ],
    ),
    opcase(
        "!=",
        "!=",
        [
            (1.0, 1, 0),
            (1.1, 1, 1),
            ("1", 1, 1),
            ("", 0, 1),
            (1.0, None, None),
            (0.0, None, None),
            (None, "", None),
            (None, None, None),
        ],
    ),
    opcase(
        "IS",
        "IS",
        [
            (1.0, 1, 1),
            (1.1, 1, 0),
            ("1", 1, 0),
            ("", 0, 0),
            (1.0, None, 0),
            (0.0, None, 0),
            (None, "", 0),
            (None, None, 1),
        ],
    ),
    opcase(
        "IS NOT",
        "IS NOT",
        [
            (1.0, 1, 0),
            (1.1, 1, 1),
            ("1", 1, 1),
            ("", 0, 1),
            (1.0, None, 1),
            (0.0, None, 1),
            (None, "", 1),
            (None, None, 0),
        ],
    ),
    opcase(
        ">",
        ">",
        [
            (1.0, 1, 0),
            (2.0, 1, 1),
            (2, 1.0, 1),
            ("text", 1.0, 1),
            (1.0, "text", 0),
            (1.0, None, None),
            (None, None, None),
        ],
    ),
    opcase(
        ">=",
        ">=",
        [
            (1.0, 1, 1),
            (2.0, 1, 1),
            (2, 1.0, 1),
            ("text", 1.0, 1),
            (1.0, "text", 0),
            (1.0, None, None),
            (None, None, None),
        ],
    ),
    opcase(
        "<",
        "<",
        [
            (1.0, 1, 0),
            (1, 2.0, 1),
            (1.0, 2, 1),
            ("text", 1.0, 0),
            (1.0, "text", 1),
            (1.0, None, None),
            (None, None, None),
        ],
    ),
    opcase(
        "<=",
        "<=",
        [
            (1.0, 1, 1),
            (1, 2.0, 1),
            (1.0, 2, 1),
            ("text", 1.0, 0),
            (1.0, "text", 1),
            (1.0, None, None),
            (None, None, None),
        ],
    ),
    opcase("||", "||", [("test", None, None), ("a", 31, "a31"), (3.1, "a", "3.1a")]),
    opcase(
        "+",
        "+",
        [(1, None, None), (1, 2.0, 3.0), (1, 2, 3), (1.0, 2.0, 3.0), (1, "2", 3), (1, "2.0", 3.0)],
    ),
    opcase(
        "/",
        "/",
        [(1, None, None), (5, 2.0, 2.5), (5, 2, 2), (5.0, 2.0, 2.5), (5, "2", 2), (5, "2.0", 2.5)],
    ),
    opcase(
        "division by zero follows SQLite null semantics",
        "/",
        [(5, 0, None), (5, 0.0, None), (5.0, 0.0, None), (-5, "0", None), (0, 0, None)],
    ),
    opcase(
        "*",
        "*",
        [
            (3, None, None),
            (3, 2.0, 6.0),
            (3, 2, 6),
            (3.0, 2.0, 6.0),
            (3, "2", 6),
            (3, "2.0", 6.0),
            ("3", "2.0", 6.0),
        ],
    ),
    opcase(
        "-",
        "-",
        [
            (3, None, None),
            (3, 2.0, 1.0),
            (3, 2, 1),
            (3.0, 2.0, 1.0),
            (3, "2", 1),
            (3, "2.0", 1.0),
            ("3", "2.0", 1.0),
        ],
    ),
]
