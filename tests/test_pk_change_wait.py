"""A primary-key change of a row with a TOASTed column, its halves on two partitions.

Debezium sends the change as a delete of the old key (``__debezium.newkey``) and a create of
the new key (``__debezium.oldkey``) whose TOASTed column carries the placeholder: only the
old row can fill it. The halves sit on the partitions of their keys, so the create half can
be consumed before the old row itself was applied (a processor starting on a backlog reads
its partitions at different paces; or another processor owns the old key's partition).
Found by scripts/qa-postgres.py (seed 12, faust driver, 2 processors): the row under the new
key kept NULL in the TOASTed column for good.

The create half now holds its partition until the old key's delete half is applied
(``processor.pk_change_wait_s``), through the real Kafka driver and Redis here; the expected
rows are written by hand."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from confluent_kafka import Producer

from pipeline import core
from pipeline.cdc import KafkaRecord
from pipeline.membership import Membership
from pipeline.processor import BatchApplier, DeadLetterSink, KafkaLoopDriver, load_sync_rules
from pipeline.store import Store
from tests.pipeline_helpers import debezium_json, store_view, write_rules
from tests.processes import drop_prefix

PLACEHOLDER = "__debezium_unavailable_value"
BODY = "x" * 3000 + "end"
OLD, NEW = {"id": 99}, {"id": 100}
BUCKET = 'by_user["u1"]'


def live_rows(ops: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Object id -> data after replaying a bucket's ops (MOVEs carry nothing)."""
    rows: dict[str, Any] = {}
    for _id, op, _cs, _t, oid, data, _target in sorted(ops):
        if op == "PUT":
            rows[oid] = json.loads(data)
        elif op == "REMOVE":
            rows.pop(oid, None)
    return rows


def produce(bootstrap: str, topic: str, part: int, msgs: list[tuple[Any, ...]]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for key, value, headers in msgs:
        p.produce(topic, key=key, value=value, partition=part, headers=headers)
    assert p.flush(30) == 0


def old_row_events() -> list[tuple[Any, ...]]:
    """Partition 1: the old row's creation, then the delete half of the change (+ tombstone)."""
    full = {"id": 99, "owner_id": "u1", "title": "t", "done": 0, "body": BODY}
    k, v = debezium_json("todos", "c", OLD, full)
    dk, dv = debezium_json("todos", "d", OLD, None)
    newkey = [("__debezium.newkey", orjson.dumps(NEW))]
    tk, _ = debezium_json("todos", "tombstone", OLD, None)
    return [(k, v, []), (dk, dv, newkey), (tk, None, newkey)]


def create_half() -> tuple[Any, ...]:
    """Partition 0: the new key's create half; its body was not in the WAL."""
    row = {"id": 100, "owner_id": "u1", "title": "t2", "done": 0, "body": PLACEHOLDER}
    k, v = debezium_json("todos", "c", NEW, row)
    return (k, v, [("__debezium.oldkey", orjson.dumps(OLD))])


def two_partitions(
    make_settings: Any, create_topic: Any, ns: Any, tmp_path: Path, *, wait_s: float
) -> tuple[str, Any]:
    """A 2-partition todos topic and settings for it with ``pk_change_wait_s``."""
    topic = create_topic(ns.topic("app.public.todos"), partitions=2)
    s = make_settings(
        kafka={"topics": [topic]},
        sync_rules=write_rules(tmp_path),
        compaction={"interval_s": 0},
        processor={"metrics_port": 0, "pk_change_wait_s": wait_s},
    )
    create_topic(s.kafka.dead_letter_topic)
    return topic, s


@pytest.mark.stack
async def test_create_half_waits_for_the_old_rows_delete_half_on_another_partition(
    make_settings: Any, create_topic: Any, ns: Any, tmp_path: Path
) -> None:
    topic, s = two_partitions(make_settings, create_topic, ns, tmp_path, wait_s=60)
    # the create half is all there is at first: it is read before the old row exists
    produce(s.kafka.bootstrap_servers, topic, 0, [create_half()])
    store = Store.from_settings(s)
    applier = BatchApplier(s, store, load_sync_rules(s), dead_letters=DeadLetterSink(s))
    driver = KafkaLoopDriver(s, applier, Membership(None))
    try:
        run = asyncio.ensure_future(driver.run(idle_exit_s=3))
        for _ in range(200):  # until the processor has read (and held) partition 0
            if applier.holds or run.done():
                break
            await asyncio.sleep(0.05)
        assert (topic, 0) in applier.holds, "the create half did not wait"
        produce(s.kafka.bootstrap_servers, topic, 1, old_row_events())
        await asyncio.wait_for(run, 60)
    finally:
        await store.close()
    view = await store_view(s, [BUCKET])
    try:
        rows = live_rows(view[BUCKET]["ops"])
        assert rows == {
            "100": {"id": 100, "owner_id": "u1", "title": "t2", "done": 0, "body": BODY}
        }
    finally:
        drop_prefix(redis.Redis.from_url(s.redis.url), s.redis.prefix)


@pytest.mark.stack
async def test_a_create_half_whose_delete_half_never_comes_waits_only_so_long(
    make_settings: Any, create_topic: Any, ns: Any, tmp_path: Path
) -> None:
    topic, s = two_partitions(make_settings, create_topic, ns, tmp_path, wait_s=1)
    k, v, _ = old_row_events()[0]  # the old row exists, its delete half never comes
    produce(s.kafka.bootstrap_servers, topic, 1, [(k, v, [])])
    produce(s.kafka.bootstrap_servers, topic, 0, [create_half()])
    store = Store.from_settings(s)
    applier = BatchApplier(s, store, load_sync_rules(s), dead_letters=DeadLetterSink(s))
    driver = KafkaLoopDriver(s, applier, Membership(None))
    try:
        await asyncio.wait_for(driver.run(idle_exit_s=3), 60)
        assert not applier.holds
        assert (await store.applied_offsets())[f"{topic}/0"] == 0
    finally:
        await store.close()
    view = await store_view(s, [BUCKET])
    try:
        rows = live_rows(view[BUCKET]["ops"])
        # after the wait, the old row as known (its creation) fills the column
        assert rows["100"]["body"] == BODY and set(rows) == {"99", "100"}
    finally:
        drop_prefix(redis.Redis.from_url(s.redis.url), s.redis.prefix)


# ---------------------------------------------------------------- the pure part

T = "app.public.docs"


def rec(part: int, offset: int) -> KafkaRecord:
    return KafkaRecord(T, part, offset, b"k", b"v")


def create(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    return {
        "action": "upsert",
        "table": T,
        "key": new,
        "row": dict(new),
        "keep_columns": ["body"],
        "pk_change_from": old,
    }


def delete(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    return {"action": "delete", "table": T, "key": old, "pk_change_to": new}


def test_waiting_creates_finds_the_first_create_half_per_partition() -> None:
    a, b, c = {"id": 1}, {"id": 2}, {"id": 3}
    items: list[Any] = [
        (rec(0, 5), {"action": "upsert", "table": T, "key": c, "row": c}),
        (rec(0, 6), create(b, a)),
        (rec(0, 7), create({"id": 4}, c)),
        (rec(1, 3), delete(c, {"id": 4})),
    ]
    waits = core.waiting_creates(items, departed=set())
    # partition 0 waits from offset 6 for its first create half's old key only: the next
    # one is looked at again once that goes on (awaiting both could deadlock, see the next
    # test); the delete half of c comes later in the batch, another partition, which does
    # not help the earlier create half
    assert waits == {(T, 0): (6, {core.row_key(T, a)})}
    # applied delete halves, or ones earlier in the batch, or a wait that ran out: no wait
    assert core.waiting_creates(items, departed={core.row_key(T, a)}) == {
        (T, 0): (7, {core.row_key(T, c)})
    }
    assert core.waiting_creates([items[3], items[0], items[2]], departed=set()) == {}
    assert core.waiting_creates(items[:2], departed=set(), waited_out={core.row_key(T, a)}) == {}
    # a delete half on a partition that is held before it is not applied in this batch:
    # it helps nobody (qa-postgres seed 23: partition 2 held at offset 8, its delete half
    # at 126 counted as seen, the create half on partition 0 went on without its old row)
    held_first: list[Any] = [
        (rec(1, 0), create({"id": 8}, {"id": 9})),
        (rec(1, 1), delete(a, b)),
        (rec(0, 0), create(b, a)),
    ]
    assert core.waiting_creates(held_first, departed=set()) == {
        (T, 1): (0, {core.row_key(T, {"id": 9})}),
        (T, 0): (0, {core.row_key(T, a)}),
    }
    # a create half without placeholders needs nothing from the old row
    plain = {**create(b, a), "keep_columns": []}
    assert core.waiting_creates([(rec(0, 1), plain)], departed=set()) == {}


def test_holds_never_wait_on_each_other() -> None:
    """Two partitions, each with PK changes whose halves cross (the QA run that found it:
    partition 0 held at a create half also awaited a later one's delete half, which sat
    behind partition 2's hold, which awaited a delete half behind partition 0's hold; both
    waited the full pk_change_wait_s and then filled a TOASTed column from a stale row).
    Replaying the partitions as a processor would (each stops at its first waiting create
    half, goes on once that create half's delete half is applied) must end with both fully
    applied."""
    k = {i: {"id": i} for i in range(10)}
    # source order: change 1 (k1 -> k2: delete on p1, create on p0), change 2 (k3 -> k4:
    # delete on p0, create on p1), change 3 (k5 -> k6: delete on p1, create on p0)
    parts: dict[int, list[Any]] = {
        0: [(rec(0, 0), create(k[2], k[1])), (rec(0, 1), delete(k[3], k[4])),
            (rec(0, 2), create(k[6], k[5]))],
        1: [(rec(1, 0), delete(k[1], k[2])), (rec(1, 1), create(k[4], k[3])),
            (rec(1, 2), delete(k[5], k[6]))],
    }  # fmt: skip
    pos = {0: 0, 1: 0}
    departed: set[str] = set()
    holds: dict[int, set[str]] = {}  # partition -> the old keys its hold awaits
    for _round in range(10):
        for p in (0, 1):  # p0 first: it meets its create half before p1 applied anything
            if p in holds:
                if not holds[p] <= departed:
                    continue
                del holds[p]  # released: read again from the held record
            batch = parts[p][pos[p] :]
            waits = core.waiting_creates(batch, departed)
            stop = len(parts[p])
            if (T, p) in waits:
                stop, holds[p] = waits[(T, p)]
            for r, ev in batch:
                if r.offset >= stop:
                    break
                if ev["action"] == "delete":
                    departed.add(core.row_key(T, ev["key"]))
                pos[p] = r.offset + 1
    assert pos == {0: 3, 1: 3} and not holds


def test_the_old_rows_delete_half_wins_over_its_stored_copy() -> None:
    from pipeline.rules import parse_rules

    rules = parse_rules("bucket_definitions:\n  all:\n    data:\n      - SELECT * FROM docs\n")
    old, new = {"id": 1}, {"id": 2}
    old_rk = core.row_key(T, old)
    stored = {old_rk: {"id": 1, "body": "stale"}}  # the old row before a later update
    gone = {old_rk: {"id": 1, "body": "as it was at the change"}}
    plan = core.plan_batch([(rec(0, 1), create(new, old))], rules, stored, gone_rows=gone)
    assert orjson.loads(plan.batch.events[0]["s"]) == {"id": 2, "body": "as it was at the change"}
    # without a kept row, the old row as the batch knows it
    plan = core.plan_batch([(rec(0, 1), create(new, old))], rules, stored)
    assert orjson.loads(plan.batch.events[0]["s"]) == {"id": 2, "body": "stale"}
