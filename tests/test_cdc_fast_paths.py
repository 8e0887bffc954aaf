"""The decoder's fast paths decide every row exactly like its general path.

* ``compile_row_fast`` (straight-line row converters generated per schema) against the
  general per-column loop ``decode._Ctx._row``, on random schemas and random rows (nulls,
  TOAST placeholders, wrong types, missing, extra and reordered columns);
* ``_zoned``'s regular-expression path against the slicing rule it shortcuts.
"""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.cdc import DEFAULT_OPTIONS, ColumnSpec, ConversionError, KafkaRecord
from pipeline.cdc import decode as D
from pipeline.cdc.convert import (
    DEFAULT_PLACEHOLDER,
    NeedsExactNumbers,
    _zoned,
    compile_row_fast,
    compile_struct,
)
from tests.helpers.fixtures import CDC_FIXTURES, load_fixture

SPECS = [
    ColumnSpec("string"),
    ColumnSpec("int32"),
    ColumnSpec("int64"),
    ColumnSpec("boolean"),
    ColumnSpec("double"),
    ColumnSpec("bytes"),
    ColumnSpec("any"),
    ColumnSpec("string", "io.debezium.time.ZonedTimestamp"),
    ColumnSpec("string", "io.debezium.data.Json"),
    ColumnSpec("int32", "io.debezium.time.Date"),
    ColumnSpec("int64", "io.debezium.time.MicroTimestamp"),
    ColumnSpec("bytes", "org.apache.kafka.connect.data.Decimal", (("scale", "2"),)),
    ColumnSpec("array", items=ColumnSpec("string")),
    ColumnSpec("map", values=ColumnSpec("int32")),
    ColumnSpec("string", "io.debezium.data.Uuid"),
]
PH = DEFAULT_PLACEHOLDER
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.sampled_from(
        [
            PH.text,
            PH.b64,
            [PH.text],
            PH.int_list,
            {PH.text: PH.text},
            "2026-01-01T00:00:00Z",
            "2026-01-01T10:20:30.123456789Z",
            "AAE=",
            "12.5",
            "123e4567-e89b-12d3-a456-426614174000",
        ]
    ),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 3), max_size=2),
)


def general(cols: dict[str, Any], data: dict[str, Any], toast: bool) -> tuple[str, Any]:
    ctx = D._Ctx(KafkaRecord("t", 0, 0, b"", b""), None, None, None, DEFAULT_OPTIONS, False)
    try:
        return "ok", ctx._row(data, cols, toast=toast)
    except (ConversionError, NeedsExactNumbers) as exc:
        return type(exc).__name__, str(exc)


@settings(max_examples=600, deadline=None)
@given(
    specs=st.lists(st.sampled_from(SPECS), min_size=1, max_size=6),
    values=st.lists(VALUES, min_size=6, max_size=6),
    shape=st.sampled_from(["same", "same", "same", "missing", "extra", "reversed"]),
    toast=st.booleans(),
)
def test_fast_row_matches_general_path(specs, values, shape, toast) -> None:
    names = [f"c{i}" for i in range(len(specs))]
    cols = compile_struct(ColumnSpec("struct", fields=tuple(zip(names, specs, strict=True))))
    fast = compile_row_fast(cols, toast=toast)
    assert fast is not None
    data = dict(zip(names, values, strict=False))
    if shape == "missing":
        data.pop(names[-1])
    elif shape == "extra":
        data["zz"] = 1
    elif shape == "reversed":
        data = dict(reversed(list(data.items())))
    want = general(cols, data, toast)
    try:
        got = fast(data, PH)
    except (ConversionError, NeedsExactNumbers) as exc:
        assert want == (type(exc).__name__, str(exc))
        return
    if got is not None:
        assert want[0] == "ok"
        row, keep = want[1]
        assert keep is None
        assert list(got.items()) == list(row.items())  # same values, same column order
        assert [type(v) for v in got.values()] == [type(v) for v in row.values()]
    if shape != "same" and len(data) > 1:
        assert got is None


def _zoned_by_slicing(v: str) -> str | None:
    """The rule the regular expression shortcuts (as it stood before it)."""
    n = len(v)
    if (
        n >= 20
        and v[n - 1] == "Z"
        and v[10] == "T"
        and v[4] == "-"
        and v[7] == "-"
        and v[13] == ":"
        and v[16] == ":"
        and (n == 20 or (v[19] == "." and n <= 30))
        and (v[:4] + v[5:7] + v[8:10] + v[11:13] + v[14:16] + v[17:19] + v[20 : n - 1]).isdigit()
    ):
        return v[:19] + "." + (v[20 : n - 1] + "000000")[:6] + "Z"
    return None


DIGITS = st.sampled_from("0123456789٣")  # one non-ASCII digit, which isdigit() accepts


@settings(max_examples=400, deadline=None)
@given(
    parts=st.lists(DIGITS, min_size=14, max_size=14),
    frac=st.one_of(st.none(), st.lists(DIGITS, max_size=10)),
)
def test_zoned_fast_path_matches_slicing(parts: list[str], frac: list[str] | None) -> None:
    d = "".join(parts)
    v = f"{d[:4]}-{d[4:6]}-{d[6:8]}T{d[8:10]}:{d[10:12]}:{d[12:14]}"
    v += ("" if frac is None else "." + "".join(frac)) + "Z"
    want = _zoned_by_slicing(v)
    if want is not None:
        assert _zoned(v) == want


# --- decode_record's one-pass path for common envelopes (decode._fast_row_event) ---------

_BASES = [
    "12-tx-orders-create",
    "09-pg-schema-types-create",
    "10-pg-schema-toast-update",
    "01-pg-schema-snapshot-read",
]
_MISSING = object()


def _general_decode(rec: KafkaRecord) -> Any:
    fast = D.FAST_PATH
    D.FAST_PATH = False
    try:
        return D.decode_record(rec)
    finally:
        D.FAST_PATH = fast


def _split(raw: bytes) -> tuple[bytes, Any]:
    i = raw.index(b',"payload":')
    return raw[:i], orjson.loads(raw[i + 11 : -1])


def _join(head: bytes, payload: Any) -> bytes:
    return head + b',"payload":' + orjson.dumps(payload) + b"}"


def _set(d: dict[str, Any], key: str, v: Any) -> None:
    if v is _MISSING:
        d.pop(key, None)
    else:
        d[key] = v


TX = {"id": "7841:40400120", "total_order": 2, "data_collection_order": 1}


#: what a test may change in a record: source fields, envelope fields, the key, headers
_CHANGES: dict[str, list[Any]] = {
    "op": ["c", "u", "r", "d", "t", "m", "x", None, 3, _MISSING],
    "connector": ["mysql", "sqlserver", "mongodb", None, 5, _MISSING],
    "table": ["", None, 7, _MISSING],
    "schema": ["", None, _MISSING],
    "db": ["", None, _MISSING],
    "name": ["", None, _MISSING],
    "lsn": [0, -1, "1", None, True, _MISSING],
    "transaction": [
        None,
        TX,
        {**TX, "id": 5},
        {**TX, "total_order": "2"},
        {**TX, "total_order": True},
        {"id": "1"},
        "tx",
        _MISSING,
    ],
    "before": [None, "{}", {"id": 1}, _MISSING],
    "after": [None, "{}", 5, {"id": 1}, _MISSING],
    "column": ["status", "total", "placed_at", "tags", "notes", "is_gift", "zz", "id"],
    "key": [None, [1], {"id": "x"}, {"id": 1.5}, {}, {"id": 1, "b": 2}],
    "headers": [
        (("__debezium.oldkey", b'{"id":1}'),),
        (("__debezium.oldkey", None),),
        (("__debezium.oldkey", b"{"),),
        (("__debezium.newkey", b'{"id":1}'), ("__debezium.context.taskId", b"0")),
    ],
}
_SOURCE_FIELDS = ("connector", "table", "schema", "db", "name", "lsn")


@settings(max_examples=600, deadline=None)
@given(
    base=st.sampled_from(_BASES),
    fields=st.lists(st.sampled_from(sorted(_CHANGES)), max_size=3, unique=True),
    data=st.data(),
)
def test_one_pass_decode_matches_general_path(
    base: str, fields: list[str], data: st.DataObject
) -> None:
    """A few changes at a time to records the one-pass path takes: its result is the
    general path's, or it leaves the record to the general path."""
    rec = load_fixture(CDC_FIXTURES / f"{base}.json")
    assert rec.key is not None and rec.value is not None
    for _ in range(2):  # the second time, the schemas are the topic's last ones
        D.decode_record(rec)
    fast = D._fast_row_event(rec, DEFAULT_OPTIONS)
    assert (fast is None) == (base == "10-pg-schema-toast-update")  # a TOAST placeholder
    assert fast is None or repr(fast) == repr(_general_decode(rec))
    vhead, p = _split(rec.value)
    khead, k = _split(rec.key)
    headers = rec.headers
    for f in fields:
        v = data.draw(st.sampled_from(_CHANGES[f]), label=f)
        if f in _SOURCE_FIELDS:
            _set(p["source"], f, v)
        elif f == "column":
            if type(p.get("after")) is dict:
                p["after"][v] = data.draw(VALUES, label="value")
        elif f == "key":
            k = v
        elif f == "headers":
            headers = headers + v
        else:
            _set(p, f, v)
    mutated = KafkaRecord(rec.topic, 0, 1, _join(khead, k), _join(vhead, p), headers, None)
    want = _general_decode(mutated)
    fast = D._fast_row_event(mutated, DEFAULT_OPTIONS)
    if fast is not None:
        assert repr(fast) == repr(want)  # same result, same key order
    assert repr(D.decode_record(mutated)) == repr(want)


def test_one_pass_decode_takes_the_common_records() -> None:
    from bucketsync.bench.mix import MixFeed

    feed = MixFeed("fp")
    recs = [
        KafkaRecord(feed.topic(t), 0, i, k, v, (), None)
        for i, (t, k, v) in enumerate(feed.events(400))
    ]
    for r in recs:
        D.decode_record(r)
    taken = 0
    for r in recs:
        fast = D._fast_row_event(r, DEFAULT_OPTIONS)
        want = _general_decode(r)
        if fast is not None:
            taken += 1
            assert repr(fast) == repr(want)
    assert taken >= 350  # creates and updates; deletes take the general path
