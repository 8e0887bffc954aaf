#!/usr/bin/env python3
"""Capture real Debezium records into tests/fixtures/cdc-real/ (tests/fixtures/cdc-real/README.md).

Runs a fixed scenario against the local stack's PostgreSQL source (`bucketsync stack up
--source postgres`, started if needed) with its own connector (topic prefix ``real``,
schema ``inventory``), then writes every record of the connector's topics, untouched, in
the corpus format of tests/fixtures/cdc/README.md, plus ``expected.json``: what
``pipeline.cdc.decode_record`` made of each record at capture time. That file is only a
draft until reviewed by hand against cdc-events.md (see the folder's README): where the
decoder is wrong, correct the entry and list the fixture in the test's KNOWN_DECODER_BUGS.

    python3 scripts/capture-cdc-real.py [--out tests/fixtures/cdc-real] [--config bucketsync.yaml]

Re-running replaces the files (LSNs, txIds and timestamps change from run to run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from confluent_kafka import Consumer, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient  # noqa: E402

from bucketsync import stack  # noqa: E402
from bucketsync.config import load_settings  # noqa: E402
from pipeline.cdc import KafkaRecord, decode_record  # noqa: E402

PREFIX = "real"
SCHEMA = "inventory"
NAME = "capture-cdc-real"
SLOT = PUB = "capture_cdc_real"

SETUP = f"""
DROP SCHEMA IF EXISTS {SCHEMA} CASCADE;
CREATE SCHEMA {SCHEMA};
CREATE TYPE {SCHEMA}.mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE {SCHEMA}.items (
  id integer PRIMARY KEY, name text, qty integer, big bigint, price numeric(10,2), flag boolean,
  happened_at timestamp, happened_tz timestamptz, day date, ref uuid, attrs jsonb, tags text[],
  blob bytea, notes text,
  -- types beyond the e2e test, for the decoder
  small smallint, ratio double precision, approx real, exact numeric, at_time time,
  span interval, mood {SCHEMA}.mood, label varchar(20), doc json, nums integer[],
  ts_ms timestamp(3), status text NOT NULL DEFAULT 'new', maybe text DEFAULT 'dflt');
-- out-of-line storage without compression: values above ~2 kB are TOASTed for sure
ALTER TABLE {SCHEMA}.items ALTER COLUMN notes SET STORAGE EXTERNAL,
  ALTER COLUMN blob SET STORAGE EXTERNAL, ALTER COLUMN tags SET STORAGE EXTERNAL,
  ALTER COLUMN nums SET STORAGE EXTERNAL, ALTER COLUMN attrs SET STORAGE EXTERNAL;
CREATE TABLE {SCHEMA}.customers (id integer PRIMARY KEY, email text NOT NULL, vip boolean NOT NULL DEFAULT false);
ALTER TABLE {SCHEMA}.customers REPLICA IDENTITY FULL;
CREATE TABLE {SCHEMA}.lines (order_id bigint, line_no integer, sku text NOT NULL,
  PRIMARY KEY (order_id, line_no));
INSERT INTO {SCHEMA}.customers VALUES (1, 'ada@example.com', true), (2, 'bob@example.com', false);
INSERT INTO {SCHEMA}.lines VALUES (7, 1, 'SKU-1');
"""

BIG = "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 100) AS i)"  # 3200 chars

CHANGES = f"""
INSERT INTO {SCHEMA}.items (id, name, qty, big, price, flag, happened_at, happened_tz, day, ref,
  attrs, tags, blob, notes, small, ratio, approx, exact, at_time, span, mood, label, doc, nums,
  ts_ms, status, maybe) VALUES
  (1, 'héllo ✓', 42, 9007199254740993, 1234.50, true, '2024-06-10 10:15:00.123456',
   '2024-06-10 10:15:00.5+02', '2024-06-10', 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11',
   '{{"b": [1, 2.5, null], "a": "ü"}}', ARRAY['a', NULL, 'd"e'], '\\x00ff10'::bytea, 'short',
   -32768, 'NaN', '-Infinity', 7.125, '23:59:59.999999', '1 year 2 mons 3 days 04:05:06.5', 'happy',
   'varchar', '{{"j":  1}}', ARRAY[1, NULL, 3], '2024-06-10 10:15:00.123', 'new', NULL);
INSERT INTO {SCHEMA}.items (id, name, notes, blob, tags, nums, attrs, status) VALUES
  (2, 'toasted', {BIG}, decode({BIG} || {BIG}, 'hex'), ARRAY[{BIG}], (SELECT array_agg(i) FROM generate_series(1, 1000) i),
   jsonb_build_object('big', {BIG}), 'new');
UPDATE {SCHEMA}.items SET qty = 1 WHERE id = 2;
UPDATE {SCHEMA}.items SET id = 20 WHERE id = 2;
UPDATE {SCHEMA}.items SET ratio = 'Infinity', exact = 'NaN', maybe = NULL WHERE id = 1;
UPDATE {SCHEMA}.customers SET vip = true WHERE id = 2;
DELETE FROM {SCHEMA}.customers WHERE id = 1;
DELETE FROM {SCHEMA}.items WHERE id = 20;
BEGIN;
  INSERT INTO {SCHEMA}.lines VALUES (8, 1, 'SKU-2'), (8, 2, 'SKU-3');
  UPDATE {SCHEMA}.customers SET email = 'bob@example.org' WHERE id = 2;
  SELECT pg_logical_emit_message(true, 'bucketsync', 'in a transaction');
COMMIT;
SELECT pg_logical_emit_message(false, 'bucketsync', 'not transactional');
TRUNCATE {SCHEMA}.lines;
"""


def _delete_old_topics(bootstrap: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    old = [
        t
        for t in admin.list_topics(timeout=10).topics
        if t.startswith(PREFIX + ".") or t == f"__debezium-heartbeat.{PREFIX}"
    ]
    if old:
        for fut in admin.delete_topics(old, operation_timeout=30).values():
            fut.result(timeout=60)
        time.sleep(2)


def _records(bootstrap: str) -> list[Any]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"capture-{time.time()}"})
    topics = [
        t
        for t in c.list_topics(timeout=10).topics
        if t.startswith(PREFIX + ".") or t == f"__debezium-heartbeat.{PREFIX}"
    ]
    out = []
    for topic in sorted(topics):
        low, high = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        if high <= low:
            continue
        c.assign([TopicPartition(topic, 0, low)])
        got: list[Any] = []
        while len(got) < high - low:
            got += [m for m in c.consume(500, 5) if not m.error()]
        out += got
    c.close()
    return sorted(out, key=_order_key(out))


def _order_key(records: list[Any]) -> Any:
    """Production order, as far as it can be told: Kafka (create) time; within a millisecond
    the source transaction (BEGIN, its data, END), heartbeats last; then topic and offset.
    Tombstones belong to the transaction of the record before them on their topic."""
    txid: dict[tuple[str, int], int] = {}
    rank: dict[tuple[str, int], tuple[int, int]] = {}
    last: dict[str, tuple[int, int]] = {}
    for m in sorted(records, key=lambda m: (m.topic(), m.offset())):
        ident = (m.topic(), m.offset())
        doc = json.loads(m.value()) if m.value() else None
        payload = (doc or {}).get("payload", doc) or {}
        tx: str | None = None
        if "status" in payload:  # BEGIN / END on the transaction topic
            tx, rank[ident] = payload.get("id"), (0 if payload["status"] == "BEGIN" else 2, 0)
        elif "source" in payload or "op" in payload:
            block = payload.get("transaction") or {}
            tx, rank[ident] = block.get("id"), (1, int(block.get("total_order") or 0))
        elif m.value() is None:  # tombstone: right after its delete
            txid[ident], rank[ident] = (
                last.get(m.topic(), (0, 0))[0],
                (1, last.get(m.topic(), (0, 0))[1]),
            )
            continue
        else:
            rank[ident] = (3, 0)  # heartbeat
        txid[ident] = int(str(tx).split(":", 1)[0]) if tx is not None else 0
        last[m.topic()] = (txid[ident], rank[ident][1])
    return lambda m: (
        m.timestamp()[1],
        txid[(m.topic(), m.offset())],
        rank[(m.topic(), m.offset())],
        m.topic(),
        m.offset(),
    )


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8")


def _name(i: int, m: Any, decoded: dict[str, Any]) -> str:
    topic = m.topic()
    if topic.startswith("__debezium-heartbeat"):
        what = "heartbeat"
    elif topic == f"{PREFIX}.transaction":
        what = "tx-" + decoded.get("action", "?").removeprefix("tx_")
    else:
        table = topic.rsplit(".", 1)[-1]
        if m.value() is None:
            op = "tombstone"
        else:
            payload = json.loads(m.value())
            op = {
                "c": "create",
                "u": "update",
                "d": "delete",
                "r": "read",
                "t": "truncate",
                "m": "message",
            }.get(payload.get("payload", payload).get("op"), "record")
        what = f"{table}-{op}"
    return f"{i:02d}-{what}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", default=str(REPO / "tests" / "fixtures" / "cdc-real"))
    ap.add_argument("--config", default=None)
    args = ap.parse_args()
    settings = load_settings(args.config)
    stack.ensure_up(settings, source="postgres")
    bootstrap = settings.kafka.bootstrap_servers
    su = stack.PG_SUPERUSER
    stack.remove_connector(settings, NAME)
    stack.psql(
        settings,
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
        f"WHERE slot_name = '{SLOT}' AND NOT active",
        user=su,
    )
    _delete_old_topics(bootstrap)
    stack.psql(settings, SETUP)
    stack.psql(settings, f"DROP PUBLICATION IF EXISTS {PUB}", user=su)
    stack.psql(settings, f"CREATE PUBLICATION {PUB} FOR TABLES IN SCHEMA {SCHEMA}", user=su)
    _, config = stack.connector_config(
        settings,
        {
            "name": NAME,
            "topic.prefix": PREFIX,
            "slot.name": SLOT,
            "slot.drop.on.stop": "true",
            "publication.name": PUB,
            "schema.include.list": SCHEMA,
            "table.include.list": rf"{SCHEMA}\..*",
            "heartbeat.interval.ms": "1000",
        },
    )
    try:
        stack.register_connector(settings, NAME, config, timeout=120)
        time.sleep(3)  # the snapshot
        stack.psql(settings, CHANGES)
        time.sleep(5)  # streaming + at least one heartbeat
    finally:
        stack.remove_connector(settings, NAME)
        stack.psql(settings, f"DROP PUBLICATION IF EXISTS {PUB}", user=su)
    records = _records(bootstrap)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("[0-9][0-9]-*.json"):
        old.unlink()
    decoded: dict[str, Any] = {}
    for i, m in enumerate(records, 1):
        rec = KafkaRecord(
            topic=m.topic(), partition=m.partition(), offset=m.offset(), key=m.key(),
            value=m.value(), headers=tuple(m.headers() or ()), timestamp_ms=m.timestamp()[1],
        )  # fmt: skip
        result = decode_record(rec)
        name = _name(i, m, result)
        decoded[name] = result
        doc = {
            "topic": m.topic(),
            "partition": m.partition(),
            "offset": m.offset(),
            "timestamp_ms": m.timestamp()[1],
            "key": _text(m.key()),
            "value": _text(m.value()),
            "headers": [{"key": k, "value": _text(v)} for k, v in m.headers() or ()],
        }
        (out / f"{name}.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    (out / "expected.json").write_text(json.dumps(decoded, indent=2, ensure_ascii=False) + "\n")
    print(f"{len(records)} records -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
