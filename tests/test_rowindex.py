"""pipeline/rowindex.py (pure): a planned batch resolved against the row index, checked
against an independent model of what each bucket must hold, without Redis."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import core
from pipeline.rowindex import (
    StoredRow,
    entry_field,
    parse_row,
    resolve,
    row_slot,
)

TABLE = "app.public.todos"


class Out:
    def __init__(self, bucket: str, object_id: str, data: str) -> None:
        self.bucket, self.object_type, self.object_id, self.data = bucket, "todos", object_id, data


def upsert(key: str, outs: list[tuple[str, Any]]) -> dict[str, Any]:
    rk = core.row_key(TABLE, {"id": key})
    entries = [core.output_entry(Out(b, key, orjson.dumps(d).decode())) for b, d in outs]
    return {"k": rk, "t": TABLE, "o": entries, "s": False}


def delete(key: str) -> dict[str, Any]:
    return {"k": core.row_key(TABLE, {"id": key}), "t": TABLE, "o": False, "s": False}


class Log:
    """Applies resolutions the way the store does (members by op id per bucket, dropped
    ids first), keeps the packed index values, and replays the logs as a client would."""

    def __init__(self) -> None:
        self.ops: dict[str, dict[int, bytes]] = {}
        self.index: dict[str, str] = {}  # rf -> packed value
        self.seq = 0
        self.totals: dict[str, int] = {}

    def apply(self, events: list[dict[str, Any]]) -> None:
        stored: dict[str, StoredRow | None] = {}
        truncated: dict[str, dict[str, StoredRow]] = {}
        for ev in events:
            if "truncate" in ev:
                truncated[TABLE] = {
                    TABLE + "\x1f" + rf: StoredRow(v) for rf, v in self.index.items()
                }
                continue
            _ts, rf = row_slot(ev["k"], TABLE)
            v = self.index.get(rf)
            stored[ev["k"]] = StoredRow(v) if v is not None else None
        res = resolve(events, stored, self.seq, truncated_rows=truncated)
        for b, members in res.members.items():
            log = self.ops.setdefault(b, {})
            for old in res.drops.get(b, ()):
                assert old in log, "a MOVE must replace an op that exists"
                del log[old]
            for op_id, m in members.items():
                log[op_id] = m if m[:1] == b"T" else b'{"op_id":"%d",%b' % (op_id, m)
        for b, (cs, _n, _last, _moved) in res.deltas.items():
            self.totals[b] = (self.totals.get(b, 0) + cs) % (1 << 32)
        for _ts, rf, v in res.index:
            if v is None:
                self.index.pop(rf, None)
            else:
                self.index[rf] = v
        assert res.seq == self.seq + res.ops
        self.seq = res.seq

    def replay(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for b, log in self.ops.items():
            rows: dict[str, Any] = {}
            total = 0
            for op_id in sorted(log):
                m = log[op_id]
                wire = orjson.loads(m[m.index(b"|") + 1 :] if m[:1] == b"T" else m)
                assert int(wire["op_id"]) == op_id
                total += wire["checksum"]
                if wire["op"] == "PUT":
                    rows[wire["object_id"]] = wire["data"]
                elif wire["op"] == "REMOVE":
                    rows.pop(wire["object_id"], None)
            assert total % (1 << 32) == self.totals[b]  # MOVE keeps the checksum
            if rows:
                out[b] = rows
        return out


def model_after(batches: list[list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}  # key -> bucket -> data
    for evs in batches:
        for ev in evs:
            if "truncate" in ev:
                rows.clear()
                continue
            key = orjson.loads(ev["k"].split("\x1f", 1)[1])["id"]
            if ev["o"] is False:
                rows.pop(key, None)
            else:
                rows[key] = {o[0]: orjson.loads(b"{" + o[5])["data"] for o in ev["o"]}
    out: dict[str, dict[str, Any]] = {}
    for key, per_bucket in rows.items():
        for b, data in per_bucket.items():
            out.setdefault(b, {})[key] = data
    return out


event = st.one_of(
    st.builds(
        upsert,
        st.sampled_from(["a", "b", "c", "d"]),
        st.lists(
            st.tuples(st.sampled_from(["B1", "B2", 'u["x"]', "b\x1fodd"]), st.integers(0, 2)),
            max_size=3,
            unique_by=lambda t: t[0],
        ),
    ),
    st.builds(delete, st.sampled_from(["a", "b", "c", "d"])),
    st.just({"truncate": TABLE}),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(event, min_size=1, max_size=6), min_size=1, max_size=6))
def test_resolved_batches_leave_every_bucket_as_the_events_say(
    batches: list[list[dict[str, Any]]],
) -> None:
    log = Log()
    for evs in batches:
        log.apply(evs)
    assert log.replay() == model_after(batches)


def test_an_unchanged_row_writes_nothing_and_a_changed_one_moves_its_op() -> None:
    log = Log()
    log.apply([upsert("a", [("B1", 1)])])
    log.apply([upsert("a", [("B1", 1)])])  # same data: no op
    assert log.seq == 1
    log.apply([upsert("a", [("B1", 2)])])
    assert log.ops["B1"][1] == b'T2|{"op_id":"1","op":"MOVE","checksum":%d}' % (
        core.put_checksum("todos", "a", "1")
    )
    assert orjson.loads(log.ops["B1"][2])["data"] == "2"


def test_packed_values_parse_back() -> None:
    """Separator bytes inside a bucket or object id are escaped, so a packed value splits
    back into the same entries."""
    f = entry_field("b\x1fodd", "todos", "a\x1e\x1d:")
    assert f.count("\x1f") == 2 and "\x1e" not in f and "\x1d" not in f
    g = entry_field("B1", "todos", "z")
    flags, entries = parse_row(f"3\x1e{f}\x1d7:11:12\x1e{g}\x1d8:13:14")
    assert flags == 3 and entries == {f: (7, 11, 12), g: (8, 13, 14)}
