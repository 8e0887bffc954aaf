"""The pure batch planner: merges, primary-key changes, dead letters, offsets."""

from __future__ import annotations

import orjson

from pipeline import core
from pipeline.cdc import KafkaRecord
from pipeline.rules import parse_rules

RULES = parse_rules(
    """
bucket_definitions:
  all_docs:
    data:
      - SELECT * FROM docs
"""
)
T = "app.public.docs"


def rec(offset: int) -> KafkaRecord:
    return KafkaRecord(T, 0, offset, b"k", b"v")


def ev(action: str, key: dict, row: dict | None = None, **extra: object) -> dict:
    e: dict = {"action": action, "table": T, "source_table": "docs", "key": key}
    if row is not None:
        e["row"] = row
    e.update(extra)
    return e


def data_of(plan: core.Plan, i: int) -> dict:
    return orjson.loads(plan.batch.events[i]["s"])


def test_toast_placeholder_merges_from_the_stored_row() -> None:
    stored = {core.row_key(T, {"id": 1}): {"id": 1, "body": "big text", "n": 1}}
    plan = core.plan_batch(
        [(rec(5), ev("upsert", {"id": 1}, {"id": 1, "n": 2}, keep_columns=["body"]))], RULES, stored
    )
    assert data_of(plan, 0) == {"id": 1, "body": "big text", "n": 2}
    assert plan.batch.guard == {f"{T}/0": 5} and plan.batch.offsets == {f"{T}/0": 5}


def test_primary_key_change_fills_toast_columns_from_the_old_key() -> None:
    old, new = {"id": 1}, {"id": 2}
    stored = {core.row_key(T, old): {"id": 1, "body": "big text", "n": 1}}
    items = [
        (rec(1), ev("delete", old, pk_change_to=new)),
        (rec(2), ev("delete", old, tombstone=True)),
        (rec(3), ev("upsert", new, {"id": 2, "n": 1}, keep_columns=["body"], pk_change_from=old)),
    ]
    plan = core.plan_batch(items, RULES, stored)
    assert plan.batch.events[0]["g"] is True  # the store keeps the old source row a while
    assert data_of(plan, 2) == {"id": 2, "body": "big text", "n": 1}
    # the delete half applied in an earlier batch: the kept row comes in as a stored row
    plan2 = core.plan_batch([items[2]], RULES, stored)
    assert data_of(plan2, 0) == {"id": 2, "body": "big text", "n": 1}
    assert core.base_keys(T, items[2][1]) == [core.row_key(T, new), core.row_key(T, old)]


def test_dead_letters_keep_their_offsets_and_the_batch_goes_on() -> None:
    items = [
        (rec(7), {"action": "dead_letter", "reason": "invalid_json", "message": "bad"}),
        (rec(8), ev("upsert", {"id": 3}, {"id": 3})),
    ]
    plan = core.plan_batch(items, RULES, {})
    assert [d.reason for d in plan.dead_letters] == ["invalid_json"]
    assert len(plan.batch.events) == 1 and plan.batch.offsets == {f"{T}/0": 8}
    assert plan.batch.guard == {f"{T}/0": 7}


def test_checksums_match_the_protocol_worked_example() -> None:
    data = '{"id":"t1","description":"Buy milk","completed":0}'
    assert core.put_checksum("todos", "t1", data) == 903225261
    assert core.remove_checksum("todos", "t1") == 2191439428


def test_source_copies_only_where_a_merge_can_need_them() -> None:
    """source_rows: auto (merge_tables is a set): small rows keep no copy; a row large
    enough to hold a TOASTed value does; a placeholder marks its table for good."""
    small = {"id": 1, "n": 1}
    big = {"id": 2, "body": "x" * core.TOAST_SAFE_BYTES}
    learned: set[str] = set()
    items = [
        (rec(1), ev("upsert", {"id": 1}, small)),
        (rec(2), ev("upsert", {"id": 2}, big)),
    ]
    plan = core.plan_batch(items, RULES, {}, merge_tables=learned)
    assert plan.batch.events[0]["s"] is False
    assert data_of(plan, 1) == big
    assert plan.batch.merge_tables == [] and learned == set()
    toast = [(rec(3), ev("upsert", {"id": 2}, {"id": 2}, keep_columns=["body"]))]
    stored = {core.row_key(T, {"id": 2}): big}
    plan = core.plan_batch(
        [*toast, (rec(4), ev("upsert", {"id": 1}, small))], RULES, stored, merge_tables=learned
    )
    assert data_of(plan, 0) == big and data_of(plan, 1) == small
    assert plan.batch.merge_tables == [T] and learned == {T}


def _model_tail(ot: str, oid: str, data: str) -> tuple[int, int, bytes]:
    """Independent model of an op's checksums and wire JSON tail (sync-protocol.md §5.1)."""
    import hashlib
    import json

    def cs(text: str) -> int:
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")

    put = cs(f"put.{ot}.{oid}.{data}")
    text = (
        f'"op":"PUT","object_type":{json.dumps(ot, ensure_ascii=False)},'
        f'"object_id":{json.dumps(oid, ensure_ascii=False)},"checksum":{put},'
        f'"data":{json.dumps(data, ensure_ascii=False)}}}'
    )
    return put, cs(f"delete.{ot}/{oid}"), text.encode()


def test_output_entries_match_an_independent_serialization_on_random_rows() -> None:
    import json
    import random

    from pipeline.rules.model import RowOutput

    rnd = random.Random(11)
    alphabet = ['"', "\\", "/", "é", "字", "\u2028", "\n", "\t", "\x01", "a", "Z", "0", " ", "😀"]

    def text(n: int) -> str:
        return "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, n)))

    for i in range(3000):
        row = {
            "id": text(6) or str(i),
            "n": rnd.randint(-(2**63), 2**63 - 1),
            "b": rnd.choice([0, 1, None]),
            "s": text(40),
        }
        data = json.dumps(row, separators=(",", ":"), ensure_ascii=False)
        ot = rnd.choice(["todos", 'we"ird', "t\\x", "täble"])
        out = RowOutput(f"b[{json.dumps(row['id'])}]", ot, row["id"], data)
        entry = core.output_entry(out)
        put, remove, tail = _model_tail(ot, row["id"], data)
        assert entry == [out.bucket, ot, row["id"], put, remove, tail]
        assert core.put_checksum(ot, row["id"], data) == put


MONGO_RULES = parse_rules(
    """
bucket_definitions:
  all_items:
    data:
      - SELECT _id AS id, qty, dims, tags, sub, promo FROM items
"""
)


def test_mongo_partial_update_patches_nested_fields_of_the_stored_document() -> None:
    """cdc-events.md §7: dotted paths in updatedFields / removedFields and truncatedArrays
    change the JSON text of the top-level column (they were decoded, then dropped)."""
    from pipeline.cdc import decode_record

    topic = "cat.c.items"
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
    r = KafkaRecord(topic, 0, 7, orjson.dumps({"id": '"abc"'}), orjson.dumps(value))
    decoded = decode_record(r)
    # the document before: {_id: "abc", qty: 1, dims: {w: 30, h: 40, d: 2},
    # tags: ["a", "b", "c", "d"], promo: true}; MongoDB's document after the update:
    # {_id: "abc", qty: 3, dims: {w: 31, d: 2}, tags: ["a", "b", "x"], sub: {"a b": 5}}
    stored = {
        core.row_key(topic, {"_id": "abc"}): {
            "_id": "abc",
            "qty": 1,
            "dims": '{"w":30,"h":40,"d":2}',
            "tags": '["a","b","c","d"]',
            "promo": 1,
        }
    }
    plan = core.plan_batch([(r, decoded)], MONGO_RULES, stored)
    assert not plan.dead_letters
    ops = plan.batch.events[0]["o"]
    assert len(ops) == 1
    data = orjson.loads(orjson.loads(b"{" + ops[0][5])["data"])  # the op after its op_id
    assert data == {
        "id": "abc",
        "qty": 3,
        "dims": '{"w":31,"d":2}',
        "tags": '["a","b","x"]',
        "sub": '{"a b":5}',
        "promo": None,
    }
