"""Type conversion (cdc-events.md §3.5, §3.6, §7) and record-level edge cases."""

from __future__ import annotations

import base64
import io
import math
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

import fastavro
import orjson
import pytest

from pipeline.cdc import (
    ColumnSpec,
    ConversionError,
    KafkaRecord,
    compact_json,
    decode_record,
    format_unscaled,
)
from pipeline.cdc.convert import Placeholder, compile_column, mongo_top, spec_from_hint


def parsed(schema: dict[str, Any]) -> dict[str, Any]:
    out = fastavro.parse_schema(schema)
    assert isinstance(out, dict)
    return out


def conv(type_: str, name: str | None = None, **params: str) -> Any:
    return compile_column(ColumnSpec(type_, name, tuple(params.items())))[0]


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def unscaled(n: int) -> str:
    """Connect Decimal JSON encoding: base64 of the big-endian two's complement."""
    length = max(1, (n.bit_length() + 8) // 8)
    return b64(n.to_bytes(length, "big", signed=True))


# ---------------------------------------------------------------------------------------
# primitives
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", ["int8", "int16", "int32", "int64"])
def test_integers(t: str) -> None:
    c = conv(t)
    assert c(5) == 5
    assert c(-(2**63)) == -(2**63)
    assert c(True) == 1  # MySQL snapshot booleans, either way INTEGER
    with pytest.raises(ConversionError):
        c("5")


@pytest.mark.parametrize("t", ["float", "double"])
def test_floats(t: str) -> None:
    c = conv(t)
    assert c(1.5) == 1.5
    assert c(3) == 3.0
    assert c("NaN") is None
    assert c(float("nan")) is None
    assert c("Infinity") == math.inf
    assert c("-Infinity") == -math.inf
    with pytest.raises(ConversionError):
        c("1.5x")


def test_boolean() -> None:
    c = conv("boolean")
    assert c(True) == 1 and c(False) == 0
    assert c(1) == 1 and c(0) == 0


def test_string() -> None:
    assert conv("string")("héllo") == "héllo"


def test_bytes() -> None:
    c = conv("bytes")
    assert c("3q2+7w==") == "3q2+7w=="
    assert c(b"\xde\xad\xbe\xef") == "3q2+7w=="  # Avro gives bytes
    with pytest.raises(ConversionError):
        c("not base64!")
    with pytest.raises(ConversionError):
        c("3q2+7w")  # unpadded


# ---------------------------------------------------------------------------------------
# decimals
# ---------------------------------------------------------------------------------------

DEC = "org.apache.kafka.connect.data.Decimal"


def test_format_unscaled() -> None:
    assert format_unscaled(123450, 2) == "1234.50"
    assert format_unscaled(-5, 2) == "-0.05"
    assert format_unscaled(0, 3) == "0.000"
    assert format_unscaled(42, 0) == "42"
    assert format_unscaled(42, -2) == "4200"


def test_decimal_base64() -> None:
    c = conv("bytes", DEC, scale="2")
    assert c("AeI6") == "1234.50"
    assert c(unscaled(-5)) == "-0.05"
    assert c(unscaled(10**30 + 1)) == "10000000000000000000000000000.01"
    assert c(b"\x01\xe2\x3a") == "1234.50"  # Avro without logicalType


def test_decimal_numeric_format_and_avro_objects() -> None:
    c = conv("bytes", DEC, scale="2")
    assert c(1234) == "1234.00"
    assert c(Decimal("1234.5")) == "1234.50"
    assert c(Decimal("-0.05")) == "-0.05"


def test_decimal_bad_base64() -> None:
    with pytest.raises(ConversionError):
        conv("bytes", DEC, scale="2")("@@@@")


def test_variable_scale_decimal() -> None:
    c = conv("struct", "io.debezium.data.VariableScaleDecimal")
    assert c({"scale": 2, "value": "B8Y="}) == "19.90"
    assert c({"scale": 3, "value": "G9U="}) == "7.125"
    assert c({"scale": 6, "value": (1084512).to_bytes(3, "big")}) == "1.084512"
    assert c({"scale": 0, "value": unscaled(-12)}) == "-12"
    with pytest.raises(ConversionError):
        c({"value": "B8Y="})


# ---------------------------------------------------------------------------------------
# temporal types
# ---------------------------------------------------------------------------------------


def test_date() -> None:
    c = conv("int32", "io.debezium.time.Date")
    assert c(19884) == "2024-06-10"
    assert c(0) == "1970-01-01"
    assert c(-1) == "1969-12-31"
    assert c(-719162) == "0001-01-01"
    assert c(9223372036825200000) == "infinity"
    assert c(-9223372036832400000) == "-infinity"
    with pytest.raises(ConversionError):
        c(3_000_000)  # beyond 9999
    with pytest.raises(ConversionError):
        c("2024-06-10")


def test_time_ms() -> None:
    c = conv("int32", "io.debezium.time.Time")
    assert c(3_723_004) == "01:02:03.004"
    assert c(0) == "00:00:00.000"


def test_micro_time_keeps_sign_and_long_hours() -> None:
    c = conv("int64", "io.debezium.time.MicroTime")
    assert c(64_800_000_000) == "18:00:00.000000"
    assert c(-3_723_000_004) == "-01:02:03.000004"
    assert c(838 * 3_600_000_000 + 59 * 60_000_000 + 59_000_000) == "838:59:59.000000"


def test_nano_time() -> None:
    assert conv("int64", "io.debezium.time.NanoTime")(3_723_000_000_005) == "01:02:03.000000005"


def test_timestamp_ms() -> None:
    c = conv("int64", "io.debezium.time.Timestamp")
    assert c(1717243200000) == "2024-06-01T12:00:00.000"
    assert c(-1) == "1969-12-31T23:59:59.999"
    assert c(9223372036825200000) == "infinity"
    assert c(-9223372036832400000) == "-infinity"
    with pytest.raises(ConversionError):
        c(300_000_000_000_000)  # year > 9999


def test_micro_timestamp() -> None:
    c = conv("int64", "io.debezium.time.MicroTimestamp")
    assert c(1718010000123456) == "2024-06-10T09:00:00.123456"
    assert c(-62135596800000000) == "0001-01-01T00:00:00.000000"
    with pytest.raises(ConversionError):
        c(-62135596800000001)


def test_nano_timestamp() -> None:
    c = conv("int64", "io.debezium.time.NanoTimestamp")
    assert c(1718010000123456789) == "2024-06-10T09:00:00.123456789"
    assert c(2**63 - 1) == "infinity"
    assert c(-(2**63)) == "-infinity"
    # the ms/us sentinel is a real instant in nanoseconds (2262)
    assert c(9223372036825200000).startswith("2262-")


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("2024-06-10T09:00:00.123456Z", "2024-06-10T09:00:00.123456Z"),
        ("2024-06-10T09:01:02.5Z", "2024-06-10T09:01:02.500000Z"),
        ("2024-06-10T09:15:02.250Z", "2024-06-10T09:15:02.250000Z"),
        ("2024-06-10T09:30:00Z", "2024-06-10T09:30:00.000000Z"),
        ("2024-06-10T11:30:00+02:00", "2024-06-10T09:30:00.000000Z"),
        ("2024-06-10T01:00:00.123456789-05:30", "2024-06-10T06:30:00.123456Z"),
        ("infinity", "infinity"),
        ("-infinity", "-infinity"),
    ],
)
def test_zoned_timestamp(raw: str, canonical: str) -> None:
    assert conv("string", "io.debezium.time.ZonedTimestamp")(raw) == canonical


def test_zoned_timestamp_invalid() -> None:
    with pytest.raises(ConversionError):
        conv("string", "io.debezium.time.ZonedTimestamp")("yesterday")


@pytest.mark.parametrize(
    "name",
    [
        "io.debezium.time.ZonedTime",
        "io.debezium.time.IsoDate",
        "io.debezium.time.IsoTime",
        "io.debezium.time.IsoTimestamp",
        "io.debezium.time.Interval",
        "io.debezium.data.Enum",
        "io.debezium.data.EnumSet",
        "io.debezium.data.Xml",
        "io.debezium.data.Ltree",
        "io.debezium.data.Tsvector",
    ],
)
def test_text_semantic_types_pass_through(name: str) -> None:
    assert conv("string", name)("10:15:30.5Z, <a/>, P1DT2H") == "10:15:30.5Z, <a/>, P1DT2H"


def test_year_and_duration_are_integers() -> None:
    assert conv("int32", "io.debezium.time.Year")(2024) == 2024
    assert conv("int64", "io.debezium.time.MicroDuration")(90_061_000_000) == 90_061_000_000
    assert conv("float64", "io.debezium.time.MicroDuration")(1.0e6) == 1_000_000


def test_connect_logical_types() -> None:
    d = conv("int32", "org.apache.kafka.connect.data.Date")
    t = conv("int32", "org.apache.kafka.connect.data.Time")
    ts = conv("int64", "org.apache.kafka.connect.data.Timestamp")
    assert d(19884) == "2024-06-10"
    assert t(45_296_789) == "12:34:56.789"
    assert ts(1717243200123) == "2024-06-01T12:00:00.123"
    # Avro: fastavro already converted them
    assert d(date(2024, 6, 10)) == "2024-06-10"
    assert t(time(12, 34, 56, 789000)) == "12:34:56.789"
    assert ts(datetime(2024, 6, 1, 12, 0, 0, 123000, tzinfo=UTC)) == "2024-06-01T12:00:00.123"


# ---------------------------------------------------------------------------------------
# strings with meaning, structs, arrays, maps
# ---------------------------------------------------------------------------------------


def test_json_text_is_unchanged() -> None:
    raw = '{"gift": false, "coupon": null}'
    assert conv("string", "io.debezium.data.Json")(raw) == raw


def test_uuid_lowercase() -> None:
    c = conv("string", "io.debezium.data.Uuid")
    assert c("7F1D5C3E-9A4B-4E2F-8C61-2B9D0E4A7C13") == "7f1d5c3e-9a4b-4e2f-8c61-2b9d0e4a7c13"
    assert c("7F1D5C3E9A4B4E2F8C612B9D0E4A7C13") == "7f1d5c3e-9a4b-4e2f-8c61-2b9d0e4a7c13"
    with pytest.raises(ConversionError):
        c("not-a-uuid")


def test_bits() -> None:
    c = conv("bytes", "io.debezium.data.Bits")
    assert c("BQ==") == "BQ=="
    assert c(b"\x05") == "BQ=="


def test_geometry_and_point() -> None:
    geom = ColumnSpec(
        "struct",
        "io.debezium.data.geometry.Geometry",
        fields=(("wkb", ColumnSpec("bytes")), ("srid", ColumnSpec("int32"))),
    )
    c = compile_column(geom)[0]
    wkb = "AQEAAACPwvUoXM8qQMP1KFyPQkpA"
    assert c({"wkb": wkb, "srid": 4326}) == f'{{"wkb":"{wkb}","srid":4326}}'
    assert c({"wkb": base64.b64decode(wkb), "srid": None}) == f'{{"wkb":"{wkb}","srid":null}}'
    point = ColumnSpec(
        "struct",
        "io.debezium.data.geometry.Point",
        fields=(("x", ColumnSpec("double")), ("y", ColumnSpec("double"))),
    )
    assert compile_column(point)[0]({"x": 1.5, "y": -2.0}) == '{"x":1.5,"y":-2.0}'


def test_arrays() -> None:
    text_array = compile_column(ColumnSpec("array", items=ColumnSpec("string")))[0]
    assert text_array(["priority", "eu", None]) == '["priority","eu",null]'
    assert text_array([]) == "[]"
    dates = compile_column(ColumnSpec("array", items=ColumnSpec("int32", "io.debezium.time.Date")))
    assert dates[0]([19884, None]) == '["2024-06-10",null]'
    decs = compile_column(ColumnSpec("array", items=ColumnSpec("bytes", DEC, (("scale", "2"),))))
    assert decs[0](["AeI6"]) == '["1234.50"]'
    bools = compile_column(ColumnSpec("array", items=ColumnSpec("boolean")))[0]
    assert bools([True, False]) == "[true,false]"
    vec = compile_column(
        ColumnSpec("array", "io.debezium.data.DoubleVector", items=ColumnSpec("double"))
    )
    assert vec[0]([0.5, "NaN", 1]) == '[0.5,"NaN",1]'  # number or string as received
    with pytest.raises(ConversionError):
        text_array("x")


def test_map_and_struct() -> None:
    hstore = compile_column(ColumnSpec("map", values=ColumnSpec("string")))[0]
    assert hstore({"a": "1", "b": None}) == '{"a":"1","b":null}'
    nested = ColumnSpec(
        "struct",
        "x.Y",
        fields=(
            ("when", ColumnSpec("int32", "io.debezium.time.Date")),
            ("ok", ColumnSpec("boolean")),
            ("name", ColumnSpec("string")),
        ),
    )
    assert compile_column(nested)[0]({"when": 0, "ok": True, "name": "é"}) == (
        '{"when":"1970-01-01","ok":true,"name":"é"}'
    )


def test_compact_json_keeps_non_ascii_and_order() -> None:
    assert compact_json({"z": "« »", "a": [1, 2.5, None]}) == '{"z":"« »","a":[1,2.5,null]}'
    assert compact_json({"big": 2**70}) == '{"big":1180591620717411303424}'


def test_unknown_debezium_name_falls_back_to_primitive() -> None:
    assert conv("string", "io.debezium.data.SomethingNew")("x") == "x"
    assert conv("int64", "io.debezium.time.SomethingNew")(7) == 7


def test_hints() -> None:
    assert spec_from_hint("io.debezium.time.Date") == ColumnSpec("int32", "io.debezium.time.Date")
    dec = spec_from_hint(f"{DEC};scale=2")
    assert dec.type == "bytes" and dec.param("scale") == "2"
    assert spec_from_hint("bytes") == ColumnSpec("bytes")


def test_placeholder_shapes() -> None:
    ph = Placeholder()
    assert ph.uuid_text == "b68a35a7-17ad-35b3-af2a-ae46edb4545a"
    assert ph.b64 == "X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ=="
    assert ph.matches(2, ph.b64)
    assert not ph.matches(1, ph.b64)  # a text column may legitimately hold that string
    assert ph.matches(3, ["__debezium_unavailable_value"])
    assert ph.matches(3, [ph.uuid_text])
    assert ph.matches(3, list(b"__debezium_unavailable_value"))
    assert ph.matches(4, {"__debezium_unavailable_value": "__debezium_unavailable_value"})
    assert not ph.matches(3, ["a"])


# ---------------------------------------------------------------------------------------
# MongoDB Extended JSON
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ext", "canonical"),
    [
        ({"$oid": "665f1c2e9b1e8a3d4c2b1a09"}, "665f1c2e9b1e8a3d4c2b1a09"),
        ({"$numberInt": "7"}, 7),
        ({"$numberLong": "1200"}, 1200),
        (1200, 1200),
        (2.5, 2.5),
        ({"$numberDouble": "2.5"}, 2.5),
        ({"$numberDouble": "NaN"}, None),
        ({"$numberDouble": "-Infinity"}, -math.inf),
        ({"$numberDecimal": "19.90"}, "19.90"),
        ({"$date": 1717999200000}, "2024-06-10T06:00:00.000Z"),
        ({"$date": "2024-06-10T10:15:00Z"}, "2024-06-10T10:15:00.000Z"),
        ({"$date": "2024-06-10T12:15:00.1234+02:00"}, "2024-06-10T10:15:00.123Z"),
        ({"$date": {"$numberLong": "-1"}}, "1969-12-31T23:59:59.999Z"),
        ({"$binary": "3q2+7w==", "$type": "00"}, "3q2+7w=="),
        ({"$binary": {"base64": "3q2+7w==", "subType": "00"}}, "3q2+7w=="),
        ({"$timestamp": {"t": 1, "i": 2}}, '{"$timestamp":{"t":1,"i":2}}'),
        ({"$regularExpression": {"pattern": "^a", "options": "i"}},
         '{"$regularExpression":{"pattern":"^a","options":"i"}}'),
        ({"$minKey": 1}, '{"$minKey":1}'),
        (True, 1),
        (False, 0),
        ("abc", "abc"),
        ({"w": 30, "h": {"$numberLong": "40"}}, '{"w":30,"h":40}'),
        ([{"$oid": "665f1c2e9b1e8a3d4c2b1a09"}, True, {"$date": 0}],
         '["665f1c2e9b1e8a3d4c2b1a09",true,"1970-01-01T00:00:00.000Z"]'),
        ({"ts": {"$timestamp": {"t": 1, "i": 2}}}, '{"ts":{"$timestamp":{"t":1,"i":2}}}'),
    ],
)  # fmt: skip
def test_mongo_extended_json(ext: Any, canonical: Any) -> None:
    assert mongo_top(ext) == canonical


# ---------------------------------------------------------------------------------------
# record level
# ---------------------------------------------------------------------------------------


def jrec(
    value: Any,
    key: Any = None,
    *,
    topic: str = "shop.public.things",
    headers: tuple[tuple[str, bytes | None], ...] = (),
    raw_value: bytes | None = None,
) -> KafkaRecord:
    return KafkaRecord(
        topic=topic,
        partition=0,
        offset=1,
        key=None if key is None else orjson.dumps(key),
        value=raw_value
        if raw_value is not None
        else (None if value is None else orjson.dumps(value)),
        headers=headers,
    )


SOURCE_SCHEMA = {
    "type": "struct",
    "optional": False,
    "name": "io.debezium.connector.postgresql.Source",
    "field": "source",
    "fields": [
        {"type": "string", "optional": False, "field": "connector"},
        {"type": "string", "optional": False, "field": "name"},
        {"type": "string", "optional": False, "field": "schema"},
        {"type": "string", "optional": False, "field": "table"},
    ],
}


def envelope(
    columns: list[dict[str, Any]],
    after: dict[str, Any] | None,
    *,
    op: str = "c",
    table: str = "things",
) -> dict[str, Any]:
    row = {
        "type": "struct",
        "optional": True,
        "name": f"shop.public.{table}.Value",
        "fields": columns,
    }
    return {
        "schema": {
            "type": "struct",
            "optional": False,
            "name": f"shop.public.{table}.Envelope",
            "fields": [
                {**row, "field": "before"},
                {**row, "field": "after"},
                SOURCE_SCHEMA,
                {"type": "string", "optional": False, "field": "op"},
            ],
        },
        "payload": {
            "before": None,
            "after": after,
            "source": {
                "connector": "postgresql",
                "name": "shop",
                "schema": "public",
                "table": table,
            },
            "op": op,
        },
    }


KEY = {
    "schema": {"type": "struct", "fields": [{"type": "int32", "optional": False, "field": "id"}]},
    "payload": {"id": 1},
}
ID = {"type": "int32", "optional": False, "field": "id"}


def test_null_key_and_null_value_is_ignored() -> None:
    got = decode_record(KafkaRecord("shop.public.things", 0, 5, None, None))
    assert got == {"action": "ignore", "reason": "empty_record"}


def test_column_removed_upstream() -> None:
    """After ALTER TABLE ... DROP COLUMN the field is simply absent from ``after``: the
    upsert lists the remaining columns; the SQLite column is left in place (§8.2)."""
    cols = [ID, {"type": "string", "optional": True, "field": "name"}]
    before = decode_record(jrec(envelope([*cols, {"type": "string", "optional": True, "field": "gone"}],
                                         {"id": 1, "name": "a", "gone": "x"}), KEY))  # fmt: skip
    after = decode_record(jrec(envelope(cols, {"id": 1, "name": "b"}), KEY))
    assert before["row"] == {"id": 1, "name": "a", "gone": "x"}
    assert after["row"] == {"id": 1, "name": "b"}
    assert after["action"] == "upsert" and "gone" not in after["row"]
    # schemaless: same
    bare = decode_record(
        jrec(
            {"op": "u", "after": {"id": 1, "name": "c"}, "source": {}},
            {"id": 1},
            topic="crm.public.x",
        )
    )
    assert bare["row"] == {"id": 1, "name": "c"}


def test_type_conversion_error_dead_letters() -> None:
    cols = [
        ID,
        {
            "type": "bytes",
            "optional": False,
            "name": DEC,
            "parameters": {"scale": "2"},
            "field": "p",
        },
    ]
    got = decode_record(jrec(envelope(cols, {"id": 1, "p": "%%%%"}), KEY))
    assert got["action"] == "dead_letter"
    assert got["reason"] == "type_conversion_error"
    assert "base64" in got["message"]


def test_out_of_range_temporal_dead_letters() -> None:
    cols = [ID, {"type": "int32", "optional": True, "name": "io.debezium.time.Date", "field": "d"}]
    got = decode_record(jrec(envelope(cols, {"id": 1, "d": 10**7}), KEY))
    assert got["reason"] == "type_conversion_error"


def test_decimal_numeric_format_is_parsed_exactly() -> None:
    """decimal.format=NUMERIC: JSON numbers must not go through binary floats (§2.1)."""
    cols = [
        ID,
        {
            "type": "bytes",
            "optional": False,
            "name": DEC,
            "parameters": {"scale": "2"},
            "field": "p",
        },
    ]
    doc = envelope(cols, {"id": 1, "p": 0})
    raw = orjson.dumps(doc).replace(b'"p":0', b'"p":12345678901234567.10')
    got = decode_record(jrec(None, KEY, raw_value=raw))
    assert got["row"]["p"] == "12345678901234567.10"
    raw2 = orjson.dumps(doc).replace(b'"p":0', b'"p":1234.5')
    assert decode_record(jrec(None, KEY, raw_value=raw2))["row"]["p"] == "1234.50"
    raw3 = orjson.dumps(doc).replace(b'"p":0', b'"p":123456789012345678901234567890')
    assert decode_record(jrec(None, KEY, raw_value=raw3))["row"]["p"] == (
        "123456789012345678901234567890.00"
    )


def test_hinted_decimal_in_schemaless_json() -> None:
    rec = jrec(
        {"op": "c", "after": {"id": 1, "amount": "AeI6", "n": 2.50}, "source": {}},
        {"id": 1},
        topic="crm.public.x",
    )
    hints = {"crm.public.x": {"amount": f"{DEC};scale=2"}}
    got = decode_record(rec, type_hints=hints)
    assert got["row"] == {"id": 1, "amount": "1234.50", "n": 2.5}


def test_schemaless_values_map_json_natively() -> None:
    after = {"i": 1, "f": 1.25, "b": True, "s": "x", "o": {"a": [1, True]}, "l": [1], "n": None}
    got = decode_record(jrec({"op": "c", "after": {"id": 1, **after}, "source": {}}, {"id": 1}))
    assert got["row"] == {
        "id": 1, "i": 1, "f": 1.25, "b": 1, "s": "x", "o": '{"a":[1,true]}', "l": "[1]", "n": None,
    }  # fmt: skip


def test_invalid_utf8_and_lone_surrogates() -> None:
    bad = b'{"op":"c","after":{"id":1,"s":"\xff"},"source":{}}'
    assert decode_record(jrec(None, {"id": 1}, raw_value=bad))["reason"] == "invalid_json"
    lone = b'{"op":"c","after":{"id":1,"s":"\\ud800"},"source":{}}'
    assert decode_record(jrec(None, {"id": 1}, raw_value=lone))["reason"] == "type_conversion_error"


def test_toast_shapes_are_kept() -> None:
    cols = [
        ID,
        {"type": "string", "optional": True, "field": "t"},
        {"type": "bytes", "optional": True, "field": "b"},
        {"type": "array", "items": {"type": "string"}, "optional": True, "field": "ta"},
        {"type": "array", "items": {"type": "int32"}, "optional": True, "field": "ia"},
        {"type": "array", "items": {"type": "string", "name": "io.debezium.data.Uuid"},
         "optional": True, "field": "ua"},
        {"type": "map", "keys": {"type": "string"}, "values": {"type": "string"},
         "optional": True, "field": "h"},
        {"type": "string", "optional": True, "field": "plain"},
    ]  # fmt: skip
    ph = "__debezium_unavailable_value"
    after = {
        "id": 1,
        "t": ph,
        "b": "X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ==",
        "ta": [ph],
        "ia": list(ph.encode()),
        "ua": ["b68a35a7-17ad-35b3-af2a-ae46edb4545a"],
        "h": {ph: ph},
        "plain": "X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ==",
    }
    got = decode_record(jrec(envelope(cols, after, op="u"), KEY))
    assert got["keep_columns"] == ["t", "b", "ta", "ia", "ua", "h"]
    assert got["row"] == {"id": 1, "plain": "X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ=="}


def test_custom_placeholder() -> None:
    from pipeline.cdc import DecodeOptions

    cols = [ID, {"type": "string", "optional": True, "field": "t"}]
    rec = jrec(envelope(cols, {"id": 1, "t": "<toast>"}, op="u"), KEY)
    got = decode_record(rec, options=DecodeOptions(unavailable_value_placeholder="<toast>"))
    assert got["keep_columns"] == ["t"]
    assert decode_record(rec)["row"]["t"] == "<toast>"


def test_flattened_with_schema_and_null_payload() -> None:
    schema = {
        "type": "struct",
        "name": "flat.public.p.Value",
        "fields": [ID, {"type": "int32", "optional": True, "name": "io.debezium.time.Date", "field": "d"},
                   {"type": "string", "optional": True, "field": "__op"}],
    }  # fmt: skip
    up = decode_record(jrec({"schema": schema, "payload": {"id": 1, "d": 1, "__op": "r"}}, KEY,
                            topic="flat.public.p"))  # fmt: skip
    assert up == {
        "action": "upsert", "table": "flat.public.p", "key": {"id": 1},
        "row": {"id": 1, "d": "1970-01-02"}, "snapshot": True,
        "source_table": "p", "source_schema": "public",
    }  # fmt: skip
    gone = decode_record(jrec({"schema": schema, "payload": None}, KEY, topic="flat.public.p"))
    assert (gone["action"], gone["key"]) == ("delete", {"id": 1})
    assert "tombstone" not in gone


def test_flattened_delete_markers() -> None:
    for marker in ({"__deleted": True}, {"__deleted": "true"}, {"__op": "d"}):
        got = decode_record(jrec({"id": 3, **marker}, {"id": 3}, topic="mirror.public.p"))
        assert got["action"] == "delete" and got["key"] == {"id": 3}


def test_flattened_row_without_key_is_missing_key() -> None:
    got = decode_record(jrec({"id": 3, "name": "x"}, None, topic="mirror.public.p"))
    assert got["reason"] == "missing_key"


def test_truncate_without_table_is_inconsistent() -> None:
    got = decode_record(jrec({"op": "t", "before": None, "after": None, "source": {"name": "x"}}))
    assert got["reason"] == "envelope_inconsistent"


def test_pk_change_headers_json_converter_form() -> None:
    hdr = orjson.dumps({"schema": KEY["schema"], "payload": {"id": 2}})
    cols = [ID]
    got = decode_record(jrec(envelope(cols, {"id": 2}), {**KEY, "payload": {"id": 2}},
                             headers=(("__debezium.oldkey", hdr),)))  # fmt: skip
    assert got["pk_change_from"] == {"id": 2}
    junk = decode_record(
        jrec(envelope(cols, {"id": 2}), KEY, headers=(("__debezium.oldkey", b"{"),))
    )
    assert "pk_change_from" not in junk


def test_transaction_markers_strings_and_mysql_ids() -> None:
    end = decode_record(
        jrec(
            {"status": "END", "id": "4c5e2a18-26f0-11ef-9d3c-0242ac120002:1043", "event_count": "2",
             "data_collections": [{"data_collection": "inventory.products", "event_count": "2"}],
             "ts_ms": 1},
            {"id": "x"},
            topic="legacy.transaction",
        ),
        connector_kinds={"legacy": "mysql"},
    )  # fmt: skip
    assert end == {
        "action": "tx_end", "connector": "legacy",
        "tx_id": "4c5e2a18-26f0-11ef-9d3c-0242ac120002:1043", "event_count": 2,
        "data_collections": {"legacy.inventory.products": 2},
    }  # fmt: skip
    begin = decode_record(jrec({"status": "BEGIN", "id": "file=mysql-bin.000007,pos=1"}, None,
                               topic="legacy.tx"))  # fmt: skip
    assert begin == {
        "action": "tx_begin",
        "connector": "legacy",
        "tx_id": "file=mysql-bin.000007,pos=1",
    }


def test_data_event_transaction_block_string_orders() -> None:
    doc = envelope([ID], {"id": 1})
    doc["payload"]["transaction"] = {
        "id": "9:100",
        "total_order": "2",
        "data_collection_order": "1",
    }
    got = decode_record(jrec(doc, KEY))
    assert got["tx"] == {"id": "9", "total_order": 2, "data_collection_order": 1}


def test_heartbeat_with_configured_prefix() -> None:
    from pipeline.cdc import DecodeOptions

    rec = jrec({"ts_ms": 5}, {"serverName": "shop"}, topic="hb.shop")
    assert decode_record(rec, options=DecodeOptions(heartbeat_topic_prefix="hb")) == {
        "action": "progress",
        "connector": "shop",
        "ts_ms": 5,
    }


def test_schema_change_topic_by_connector_map() -> None:
    rec = jrec({"anything": 1}, {"databaseName": "inventory"}, topic="legacy")
    assert (
        decode_record(rec, connector_kinds={"legacy": "mysql"})["reason"] == "schema_change_topic"
    )


def test_mongo_partial_update_with_paths() -> None:
    value = {
        "op": "u",
        "after": None,
        "source": {"connector": "mongodb", "name": "cat", "db": "c", "collection": "items"},
        "updateDescription": {
            "updatedFields": orjson.dumps(
                {"qty": 3, "dims.w": 31, "tags.2": "x", "sub.a b": {"$numberLong": "5"}}
            ).decode(),
            "removedFields": ["promo", "dims.h"],
            "truncatedArrays": [{"field": "tags", "size": 2}],
        },
    }
    got = decode_record(jrec(value, {"id": '"abc"'}, topic="cat.c.items"))
    assert got["key"] == {"_id": "abc"}
    assert got["row"] == {"qty": 3}
    assert got["null_columns"] == ["promo"]
    assert got["partial"] is True
    assert got["json_patches"] == [
        {"column": "dims", "op": "set", "path": "$.w", "value": "31"},
        {"column": "tags", "op": "set", "path": "$[2]", "value": '"x"'},
        {"column": "sub", "op": "set", "path": '$."a b"', "value": "5"},
        {"column": "dims", "op": "remove", "path": "$.h"},
        {"column": "tags", "op": "truncate", "path": "$", "size": 2},
    ]


def test_mongo_update_without_after_or_description() -> None:
    value = {"op": "u", "after": None, "source": {"connector": "mongodb", "name": "cat", "db": "c",
                                                   "collection": "items"}}  # fmt: skip
    assert decode_record(jrec(value, {"id": "1004"}))["reason"] == "envelope_inconsistent"


def test_mongo_keys() -> None:
    src = {"connector": "mongodb", "name": "cat", "db": "c", "collection": "i"}
    for key, expected in [("1004", 1004), ('"abc"', "abc"), ('{"$oid": "665f"}', "665f"),
                          ('{"a": 1}', '{"a":1}')]:  # fmt: skip
        got = decode_record(
            jrec({"op": "d", "before": None, "after": None, "source": src}, {"id": key})
        )
        assert got["key"] == {"_id": expected}


def test_mongo_tombstone_needs_kind_for_ambiguous_keys() -> None:
    rec = jrec(None, {"id": "1004"}, topic="cat.c.i")
    assert decode_record(rec)["key"] == {"id": "1004"}  # could be a relational text key
    assert decode_record(rec, connector_kinds={"cat": "mongodb"})["key"] == {"_id": 1004}


def test_key_that_is_not_a_struct() -> None:
    got = decode_record(jrec(envelope([ID], {"id": 1}), 5))
    assert got["reason"] == "not_an_envelope"


def test_auto_detects_avro_from_the_key_alone() -> None:
    """Tombstone on an Avro topic: only the key is framed."""
    schema: dict[str, Any] = parsed(
        {
            "type": "record",
            "name": "Key",
            "namespace": "b.p.t",
            "fields": [{"name": "id", "type": "long"}],
        }
    )
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, {"id": 7})
    key = b"\x00" + (5).to_bytes(4, "big") + buf.getvalue()

    class One:
        def get(self, schema_id: int) -> dict[str, Any]:
            assert schema_id == 5
            return schema

    got = decode_record(KafkaRecord("b.p.t", 0, 0, key, None), schemas=One())
    assert got == {"action": "delete", "table": "b.p.t", "key": {"id": 7}, "tombstone": True,
                   "source_table": "t", "source_schema": "p"}  # fmt: skip


def test_avro_invalid_utf8_string_is_type_conversion_error() -> None:
    schema: dict[str, Any] = parsed(
        {
            "type": "record",
            "name": "V",
            "fields": [{"name": "id", "type": "long"}, {"name": "s", "type": "string"}],
        }
    )
    body = b"\x02" + b"\x02\xff"  # id=1, s = 1 byte 0xff
    value = b"\x00" + (6).to_bytes(4, "big") + body

    class One:
        def get(self, schema_id: int) -> dict[str, Any]:
            return schema

    got = decode_record(KafkaRecord("b.p.t", 0, 0, None, value), schemas=One())
    assert got["reason"] == "type_conversion_error"


def test_avro_trailing_bytes_are_decode_errors() -> None:
    schema: dict[str, Any] = parsed(
        {"type": "record", "name": "K", "fields": [{"name": "id", "type": "long"}]}
    )
    value = b"\x00" + (6).to_bytes(4, "big") + b"\x02\x00"

    class One:
        def get(self, schema_id: int) -> dict[str, Any]:
            return schema

    got = decode_record(KafkaRecord("b.p.t", 0, 0, None, value), schemas=One())
    assert (got["reason"], got["schema_id"]) == ("avro_decode_error", 6)
    short = decode_record(KafkaRecord("b.p.t", 0, 0, None, b"\x00\x00"), schemas=One())
    assert (short["reason"], short["magic_byte"]) == ("wrong_magic_byte", 0)
