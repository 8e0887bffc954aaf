"""Exact write checkpoints, the write path: PostgreSQL events carry ``source.lsn`` through the
decoder, the planner keeps the highest per connector, and the apply step records it in
``P:source_lsn`` (never lowered) and announces it in the change entry's ``o`` as
``lsn:<connector>``, in the same atomic step as the batch."""

from __future__ import annotations

import orjson
import pytest

from pipeline import core
from pipeline.cdc import KafkaRecord
from pipeline.store import PlannedBatch, Store
from tests.helpers.fixtures import load_fixture
from tests.test_cdc_fixtures import FIXTURES, decode_configured


def test_postgres_events_carry_their_lsn() -> None:
    rec = load_fixture(FIXTURES / "02-pg-schema-create.json")
    got = decode_configured(rec)
    src = orjson.loads(rec.value)["payload"]["source"]
    assert got["source_lsn"] == src["lsn"] and got["source_name"] == src["name"]


class _NoRules:
    def evaluate_row(self, table, row, *, schema=None):  # type: ignore[no-untyped-def]
        return []

    def is_relevant(self, table, schema=None):  # type: ignore[no-untyped-def]
        return False  # like the heartbeat table: not synced, its LSN still counts


def test_planner_keeps_the_highest_lsn_per_connector_even_of_skipped_tables() -> None:
    items = []
    for off, (name, lsn) in enumerate([("app", 500), ("app", 300), ("other", 7), ("app", 900)]):
        rec = KafkaRecord(topic=f"{name}.public.hb", partition=0, offset=off, key=b"", value=b"")
        ev = {
            "action": "upsert",
            "table": f"{name}.public.hb",
            "key": {"id": 1},
            "row": {"id": 1},
            "source_lsn": lsn,
            "source_name": name,
        }
        items.append((rec, ev))
    items.append((KafkaRecord("x", 0, 9, b"", b""), {"action": "progress", "connector": "app"}))
    plan = core.plan_batch(items, _NoRules(), {})
    assert plan.batch.source_lsn == {"app": 900, "other": 7}


@pytest.mark.stack
async def test_store_records_the_lsn_atomically_and_never_lowers_it(make_settings) -> None:
    s = make_settings()
    store = Store.from_settings(s)
    try:
        for off, lsn in [(0, 1000), (1, 400), (2, 2**40 + 5)]:
            batch = PlannedBatch(guard={"t/0": off}, offsets={"t/0": off}, source_lsn={"app": lsn})
            assert (await store.apply(batch)).status == "ok"
            if off == 1:
                assert await store.applied_source_lsns() == {"app": 1000}
        assert await store.applied_source_lsns() == {"app": 2**40 + 5}
        # P:offsets keeps topic/partitions only (the processor seeks from it)
        assert await store.applied_offsets() == {"t/0": 2}
        entries = await store.r.xrange(store.k("changes"))
        announced = [orjson.loads(f[b"o"]) for _, f in entries]
        assert [a.get("lsn:app") for a in announced] == ["1000", "1000", str(2**40 + 5)]
        # a batch without PostgreSQL events leaves it alone
        await store.apply(PlannedBatch(guard={"t/0": 3}, offsets={"t/0": 3}))
        assert await store.applied_source_lsns() == {"app": 2**40 + 5}
    finally:
        await store.close()
