"""Bucket id serialisation (sync-protocol.md §8.5) and lookup keys."""

from __future__ import annotations

import json

import pytest

from pipeline.rules import bucket_id, lookup_key, serialize_value, serialize_values


@pytest.mark.parametrize(
    ("name", "values", "expected"),
    [
        ("global", [], "global[]"),
        ("by_user", ["u1"], 'by_user["u1"]'),
        ("by_org", [42], "by_org[42]"),
        ("team_project", ["t1", "p9"], 'team_project["t1","p9"]'),
        ("by_org", [42.0], "by_org[42]"),
        ("by_org", [-3.0], "by_org[-3]"),
        ("by_user", [None], "by_user[null]"),
        ("mixed", ["a", 1, None, 2.5], 'mixed["a",1,null,2.5]'),
    ],
)
def test_spec_examples(name: str, values: list[object], expected: str) -> None:
    assert bucket_id(name, values) == expected  # type: ignore[arg-type]


def test_default_no_parameters() -> None:
    assert bucket_id("global") == "global[]"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", '"plain"'),
        ('q"uote', '"q\\"uote"'),
        ("back\\slash", '"back\\\\slash"'),
        ("new\nline\ttab", '"new\\nline\\ttab"'),
        ("\x00\x1f", '"\\u0000\\u001f"'),
        ("é ü 日本 😀", '"é ü 日本 😀"'),  # raw UTF-8, no ASCII escaping
        ("\u2028", '"\u2028"'),
        ("", '""'),
        (0, "0"),
        (-7, "-7"),
        (2**63 - 1, "9223372036854775807"),
        (1.0, "1"),
        (1e21, "1000000000000000000000"),
        (-0.0, "0"),
        (0.5, "0.5"),
        (1e-05, "0.00001"),
        (1e-07, "1e-7"),
        (123.456, "123.456"),
        (float("inf"), "null"),
        (None, "null"),
        (True, "1"),
        (False, "0"),
    ],
)
def test_value_serialisation(value: object, expected: str) -> None:
    assert serialize_value(value) == expected  # type: ignore[arg-type]


def test_strings_match_json_stringify_escaping() -> None:
    # JSON.stringify escapes exactly what json.dumps(ensure_ascii=False) escapes
    sample = "".join(chr(c) for c in range(0, 0x300))
    assert serialize_value(sample) == json.dumps(sample, ensure_ascii=False)


def test_integral_real_and_integer_give_the_same_bucket() -> None:
    assert bucket_id("b", [3.0]) == bucket_id("b", [3])


def test_blob_is_refused() -> None:
    with pytest.raises(TypeError):
        serialize_value(b"x")


def test_serialize_values() -> None:
    assert serialize_values(["a", 1]) == '["a",1]'


def test_lookup_key() -> None:
    assert lookup_key("by_list", 1, ["u1"]) == 'by_list\x1f1\x1f["u1"]'
    assert lookup_key("by_list", 2, [4.0, None]) == "by_list\x1f2\x1f[4,null]"
