"""Shared helpers for tests that push Debezium events through the real processor."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Producer

from bucketsync.config import Settings
from pipeline.membership import Membership
from pipeline.processor import BatchApplier, DeadLetterSink, KafkaLoopDriver, load_sync_rules
from pipeline.store import Store
from tests.model import BucketModel

TEST_RULES = """
bucket_definitions:
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT * FROM todos WHERE owner_id = bucket.user_id
  done:
    data:
      - SELECT id, title FROM todos WHERE done = 1
"""


def model_rules(table: str, row: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """TEST_RULES, by hand (independent of pipeline.rules)."""
    if table.rsplit(".", 1)[-1] != "todos":
        return []
    out = []
    dumps = lambda v: json.dumps(v, separators=(",", ":"), ensure_ascii=False)  # noqa: E731
    oid = str(row["id"])
    if row.get("owner_id") is not None:  # a NULL owner goes into no bucket (sync-protocol §8.5)
        out.append((f"by_user[{dumps(row['owner_id'])}]", "todos", oid, dumps(row)))
    if row.get("done") == 1:
        out.append(("done[]", "todos", oid, dumps({"id": row["id"], "title": row.get("title")})))
    return out


def debezium_json(
    table: str, op: str, key: dict[str, Any], after: dict[str, Any] | None
) -> tuple[bytes, bytes | None]:
    """A schemaless Debezium PostgreSQL change event (cdc-events.md §2.3)."""
    if op == "tombstone":
        return orjson.dumps(key), None
    value = {
        "before": None,
        "after": after,
        "source": {
            "version": "3.3.0.Final",
            "connector": "postgresql",
            "name": "app",
            "db": "app",
            "schema": "public",
            "table": table,
            "ts_ms": 1718010000000,
            "snapshot": "false",
        },
        "op": op,
        "ts_ms": 1718010000001,
    }
    return orjson.dumps(key), orjson.dumps(value)


def produce(bootstrap: str, topic: str, messages: Sequence[tuple[bytes, bytes | None]]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    for k, v in messages:
        p.produce(topic, key=k, value=v)
        p.poll(0)
    assert p.flush(30) == 0


def expected_normalised(
    table_id: str, op: str, key: dict[str, Any], after: dict[str, Any] | None
) -> dict[str, Any]:
    if op in ("c", "u", "r"):
        return {"action": "upsert", "table": table_id, "key": key, "row": after}
    return {"action": "delete", "table": table_id, "key": key}


async def run_processor(
    settings: Settings, expect_events: int, *, idle_exit_s: float = 10.0
) -> int:
    rules = load_sync_rules(settings)
    store = Store.from_settings(settings)
    applier = BatchApplier(settings, store, rules, dead_letters=DeadLetterSink(settings))
    driver = KafkaLoopDriver(settings, applier, Membership(None))
    try:
        return await driver.run(max_events=expect_events, idle_exit_s=idle_exit_s)
    finally:
        await store.close()


def write_rules(tmp_path: Path, text: str = TEST_RULES) -> str:
    p = tmp_path / "rules.yaml"
    p.write_text(text)
    return str(p)


async def store_view(settings: Settings, buckets: Sequence[str]) -> dict[str, Any]:
    """Every bucket's ops (op_id, op, checksum, type, id, data, target), count and checksum."""
    store = Store.from_settings(settings)
    try:
        out: dict[str, Any] = {}
        for b in buckets:
            ops = []
            for o in await store.all_ops(b):
                w = orjson.loads(o.wire)
                ops.append(
                    (
                        int(w["op_id"]),
                        w["op"],
                        int(w["checksum"]),
                        w.get("object_type"),
                        w.get("object_id"),
                        w.get("data"),
                        o.target,
                    )
                )
            st = await store.bucket_state(b)
            out[b] = {"ops": ops, "count": st.count, "checksum": st.checksum}
        return out
    finally:
        await store.close()


async def store_buckets(settings: Settings) -> list[str]:
    """Every bucket the store holds under the settings' prefix, sorted."""
    store = Store.from_settings(settings)
    try:
        return await store.all_buckets()
    finally:
        await store.close()


def model_view(model: BucketModel) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, b in model.buckets.items():
        ops = [
            (o.op_id, o.op, o.checksum, o.object_type, o.object_id, o.data, o.target)
            for o in (b.ops[i] for i in sorted(b.ops))
        ]
        out[name] = {"ops": ops, "count": b.count, "checksum": b.checksum}
    return out


def run(coro: Any) -> Any:
    return asyncio.get_event_loop().run_until_complete(coro)
