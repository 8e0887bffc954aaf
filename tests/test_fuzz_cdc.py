"""Fuzzing the CDC path: every malformed fixture and more than 10,000 mutations of valid
events (truncation, byte flips, invalid UTF-8, wrong JSON types, huge values, deep nesting,
unknown Avro schema ids, oversized records) are decoded and planned without an exception;
what cannot be used is a dead letter with a documented reason (cdc-events.md §8.3).

Then a sample of the mutations goes through Kafka and the real processor, interleaved
with clean events of another table: the processor survives, every dead letter reaches the
dead-letter topic with its reason and the original bytes, and the clean rows equal the
reference model (the events after the bad ones were applied)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer

from pipeline import core
from pipeline.cdc import KafkaRecord, LocalSchemaDir, decode_record
from pipeline.rules import parse_rules
from tests.helpers.fixtures import load_fixture
from tests.model import BucketModel
from tests.pipeline_helpers import (
    debezium_json,
    model_rules,
    model_view,
    produce,
    run_processor,
    store_view,
    write_rules,
)

FIXTURES = Path(__file__).parent / "fixtures" / "cdc"
SCHEMAS = LocalSchemaDir(FIXTURES / "avro-schemas")
MAX_BYTES = 64 * 1024
REASONS = {
    "oversize",
    "invalid_json",
    "not_an_envelope",
    "missing_op",
    "unknown_op",
    "envelope_inconsistent",
    "missing_key",
    "wrong_magic_byte",
    "unknown_schema_id",
    "avro_decode_error",
    "type_conversion_error",
    "rule_evaluation_error",
}
ACTIONS = {"upsert", "delete", "truncate", "tx_begin", "tx_end", "progress", "ignore"}


def fixtures() -> list[KafkaRecord]:
    return [load_fixture(p) for p in sorted(FIXTURES.glob("[0-9][0-9]-*.json"))]


def _json_paths(obj: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_paths(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _json_paths(v, (*path, i))


def _replace(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    obj[path[0]] = _replace(obj[path[0]], path[1:], value)
    return obj


def _weird_value(rnd: random.Random) -> Any:
    return rnd.choice(
        [
            None,
            True,
            -(2**63),
            2**70,
            1e308,
            -0.0,
            "",
            "x" * rnd.randint(1, 5000),
            "\ud800" if rnd.random() < 0.1 else "ünï☃",
            [],
            {},
            [[[[[[[[1]]]]]]]],
            {"nested": {"deeper": [1, "2", None]}},
            "2024-13-45T99:99:99Z",
            "AAAA====",
        ]
    )


def mutate(rec: KafkaRecord, rnd: random.Random) -> KafkaRecord:
    value = rec.value or b""
    key = rec.key
    kind = rnd.randrange(9)
    if kind == 0 and value:  # truncation
        value = value[: rnd.randrange(len(value))]
    elif kind == 1 and value:  # byte flips
        b = bytearray(value)
        for _ in range(rnd.randint(1, 4)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        value = bytes(b)
    elif kind == 2:  # invalid UTF-8 inside
        i = rnd.randrange(len(value) + 1)
        value = value[:i] + rnd.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x00"]) + value[i:]
    elif kind in (3, 4, 5) and value[:1] in (b"{", b"["):  # a JSON value of another type
        try:
            doc = json.loads(value)
        except ValueError:
            doc = None
        if doc is not None:
            paths = list(_json_paths(doc))
            doc = _replace(doc, rnd.choice(paths), _weird_value(rnd))
            value = json.dumps(doc, ensure_ascii=rnd.random() < 0.5).encode(
                "utf-8", "surrogatepass"
            )
    elif kind == 6:  # deep nesting
        depth = rnd.choice([100, 2000, 50_000])
        value = b"[" * depth + b"]" * depth
    elif kind == 7 and value[:1] == b"\x00" and len(value) > 5:  # unknown Avro schema id
        value = b"\x00" + rnd.randrange(2**31).to_bytes(4, "big") + value[5:]
    elif kind == 8:  # oversized
        value = value + b" " * (MAX_BYTES + 1)
    if rnd.random() < 0.1:
        key = rnd.choice([None, b"", b"{not json", key[: len(key) // 2] if key else b"1"])
    return KafkaRecord(
        topic=rec.topic,
        partition=rec.partition,
        offset=rec.offset,
        key=key,
        value=value if value or rnd.random() < 0.5 else None,
        headers=rec.headers,
        timestamp_ms=rec.timestamp_ms,
    )


def _rules_for(records: list[KafkaRecord]) -> Any:
    tables = set()
    for r in records:
        ev = decode_record(r, schemas=SCHEMAS)
        if ev.get("action") == "upsert":
            tables.add(str(ev.get("source_table") or ev["table"]).rsplit(".", 1)[-1])
    data = "".join(f"\n      - SELECT * FROM {t}" for t in sorted(tables))
    return parse_rules(f"bucket_definitions:\n  everything:\n    data:{data}\n")


def decode(rec: KafkaRecord) -> dict[str, Any]:
    return decode_record(rec, schemas=SCHEMAS, max_record_bytes=MAX_BYTES)


def test_ten_thousand_mutations_never_crash_and_dead_letter_with_a_reason() -> None:
    base = fixtures()
    rules = _rules_for(base)
    rnd = random.Random(20261201)
    seen_reasons: dict[str, int] = {}
    n = 0
    for round_ in range(220):
        batch = [mutate(r, rnd) for r in base]
        items = []
        for rec in batch:
            ev = decode(rec)  # must not raise
            action = ev.get("action")
            assert action in ACTIONS | {"dead_letter"}, (rec, ev)
            if action == "dead_letter":
                assert ev.get("reason") in REASONS, ev
            items.append((rec, ev))
        plan = core.plan_batch(items, rules, {})  # must not raise either
        for dl in plan.dead_letters:
            assert dl.reason in REASONS, dl
            seen_reasons[dl.reason] = seen_reasons.get(dl.reason, 0) + 1
        n += len(batch)
        if round_ == 0:
            # the corpus' own malformed fixtures are among them too
            clean = core.plan_batch([(r, decode(r)) for r in base], rules, {})
            assert {d.reason for d in clean.dead_letters} >= {"invalid_json", "oversize"}
    assert n >= 10_000
    # the mutations reach most of the documented reasons
    assert len(seen_reasons) >= 8, seen_reasons


@pytest.mark.stack
def test_mutations_through_kafka_dead_letter_and_the_rest_is_applied(
    make_settings: Any, create_topic: Any, ns: Any, tmp_path: Path
) -> None:
    bad_topic = create_topic(ns.topic("fuzz.public.junk"))
    good_topic = create_topic(ns.topic("app.public.todos"))
    s = make_settings(
        kafka={"topics": [bad_topic, good_topic], "max_record_bytes": MAX_BYTES},
        sync_rules=write_rules(tmp_path),
        compaction={"interval_s": 0},
        processor={"metrics_port": 0, "batch_max_events": 100},
    )
    create_topic(s.kafka.dead_letter_topic)
    rnd = random.Random(7)
    # JSON records small enough for the broker (fixture 49 is beyond its message size)
    base = [
        r
        for r in fixtures()
        if r.value is None or (r.value[:1] != b"\x00" and len(r.value) < 100_000)
    ]
    bad = [mutate(rnd.choice(base), rnd) for _ in range(1_500)]
    # as the processor decodes them: no schema registry configured, no headers, same limit
    expected_dead = [
        (r.key, r.value)
        for r in bad
        if decode_record(
            KafkaRecord(bad_topic, 0, 0, r.key, r.value, (), None), max_record_bytes=MAX_BYTES
        ).get("action")
        == "dead_letter"
    ]
    assert len(expected_dead) > 300
    model = BucketModel(model_rules)
    good = []
    for i in range(300):
        n = rnd.randint(1, 40)
        row = {"id": n, "owner_id": f"u{i % 5}", "title": f"t{i}", "done": i % 2}
        good.append(debezium_json("todos", "c", {"id": n}, row))
        model.upsert("todos", {"id": n}, row)
    # clean events before, between and after the bad ones
    produce(s.kafka.bootstrap_servers, good_topic, good[:100])
    produce(s.kafka.bootstrap_servers, bad_topic, [(r.key, r.value) for r in bad])
    produce(s.kafka.bootstrap_servers, good_topic, good[100:])
    asyncio.run(run_processor(s, len(bad) + len(good), idle_exit_s=15))
    got = asyncio.run(store_view(s, list(model.buckets)))
    assert got == model_view(model)

    c = Consumer(
        {
            "bootstrap.servers": s.kafka.bootstrap_servers,
            "group.id": ns.group_id + "-dl",
            "auto.offset.reset": "earliest",
        }
    )
    c.subscribe([s.kafka.dead_letter_topic])
    dead: list[Any] = []
    deadline = time.monotonic() + 60
    while len(dead) < len(expected_dead) and time.monotonic() < deadline:
        for m in c.consume(500, 1.0):
            if not m.error():
                dead.append(m)
    c.close()
    assert [(m.key(), m.value()) for m in dead] == expected_dead
    for m in dead:
        h = dict(m.headers())
        assert h["bucketsync.reason"].decode() in REASONS
        assert h["bucketsync.source.topic"].decode() == bad_topic
        assert orjson.loads(h.get("bucketsync.details", b"{}")) is not None
