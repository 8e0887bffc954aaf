"""Invariant 7: with ``consistency: transaction`` a checkpoint never exposes part of a
source transaction. Unit tests of the stager, then the real processor on Kafka + Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.cdc import KafkaRecord
from pipeline.transactions import TransactionStager
from tests.pipeline_helpers import produce, run_processor, store_view, write_rules

RULES = """
bucket_definitions:
  by_customer:
    parameters: SELECT request.user_id() AS customer_id
    data:
      - SELECT id, customer_id, total FROM orders WHERE customer_id = bucket.customer_id
      - SELECT id, customer_id, sku FROM order_lines WHERE customer_id = bucket.customer_id
"""


def rec(topic: str, offset: int) -> KafkaRecord:
    return KafkaRecord(topic, 0, offset, b"k", b"v")


def data(table: str, tx: str | None, order: int, rid: int) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "action": "upsert",
        "table": table,
        "key": {"id": rid},
        "row": {"id": rid},
    }
    if tx:
        ev["tx"] = {"id": tx, "total_order": order, "data_collection_order": order}
    return ev


def end(tx: str, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "action": "tx_end",
        "connector": "p",
        "tx_id": tx,
        "event_count": sum(counts.values()),
        "data_collections": counts,
    }


def test_stager_holds_until_end_and_counts_then_releases_whole_transaction() -> None:
    st = TransactionStager(subscribed=lambda c: True)
    st.push(rec("p.transaction", 0), {"action": "tx_begin", "connector": "p", "tx_id": "1"})
    st.push(rec("p.s.a", 0), data("p.s.a", "1", 1, 1))
    st.push(rec("p.s.b", 0), data("p.s.b", "1", 2, 2))
    assert st.release() == []
    st.push(rec("p.transaction", 1), end("1", {"p.s.a": 1, "p.s.b": 2}))
    assert st.release() == []  # END read, but one event of p.s.b is still missing
    st.push(rec("p.s.b", 1), data("p.s.b", "1", 3, 3))
    out = st.release()
    assert sorted((r.topic, r.offset) for r, _ in out) == [
        ("p.s.a", 0),
        ("p.s.b", 0),
        ("p.s.b", 1),
        ("p.transaction", 0),
        ("p.transaction", 1),
    ]
    assert st.staged == 0
    # a replayed event of an applied transaction keeps its offset but has no effect
    st.push(rec("p.s.a", 5), data("p.s.a", "1", 1, 1))
    ((_, ev),) = st.release()
    assert ev["action"] == "ignore"


def test_stager_releases_partitions_only_as_prefixes() -> None:
    st = TransactionStager(subscribed=lambda c: True)
    st.push(rec("p.s.a", 0), data("p.s.a", "1", 1, 1))  # tx 1 open
    st.push(rec("p.s.a", 1), data("p.s.a", None, 0, 9))  # not transactional, but behind it
    st.push(rec("p.s.c", 0), data("p.s.c", None, 0, 8))  # other partition: free
    assert [(r.topic, r.offset) for r, _ in st.release()] == [("p.s.c", 0)]
    st.push(rec("p.transaction", 0), end("1", {"p.s.a": 1}))
    assert [(r.topic, r.offset) for r, _ in st.release()] == [
        ("p.s.a", 0),
        ("p.s.a", 1),
        ("p.transaction", 0),
    ]


def test_stager_grace_period_and_cap() -> None:
    now = [0.0]
    st = TransactionStager(
        subscribed=lambda c: True, grace_s=10, clock=lambda: now[0], max_staged_events=3
    )
    st.push(rec("p.s.a", 0), data("p.s.a", "1", 1, 1))
    assert st.release() == []
    now[0] = 11
    assert len(st.release()) == 1 and st.degraded == 1
    for i in range(4):
        st.push(rec("p.s.b", i), data("p.s.b", "2", i + 1, i))
    assert len(st.release()) == 4  # over the cap: applied at once
    assert st.degraded == 2


def _dbz(
    prefix: str, table: str, rid: int, row: dict[str, Any], tx: str, order: int
) -> tuple[bytes, bytes]:
    value = {
        "before": None,
        "after": row,
        "source": {
            "connector": "postgresql",
            "name": prefix,
            "schema": "public",
            "table": table,
            "db": "app",
        },
        "op": "c",
        "ts_ms": 1,
        "transaction": {"id": tx, "total_order": order, "data_collection_order": order},
    }
    return orjson.dumps({"id": rid}), orjson.dumps(value)


def _marker(
    prefix: str, tx: str, status: str, counts: dict[str, int] | None
) -> tuple[bytes, bytes]:
    value = {
        "status": status,
        "id": tx,
        "event_count": None if counts is None else sum(counts.values()),
        "data_collections": None
        if counts is None
        else [{"data_collection": k, "event_count": v} for k, v in counts.items()],
        "ts_ms": 1,
    }
    return orjson.dumps({"id": tx}), orjson.dumps(value)


@pytest.mark.stack
def test_processor_never_exposes_part_of_a_transaction(
    make_settings, create_topic, ns, tmp_path: Path
) -> None:
    prefix = ns.topic("app")
    orders = create_topic(f"{prefix}.public.orders")
    lines = create_topic(f"{prefix}.public.order_lines")
    txt = create_topic(f"{prefix}.transaction")
    (tmp_path / "r.yaml").write_text(RULES)
    s = make_settings(
        kafka={"topics": [orders, lines, txt], "consistency": "transaction"},
        sync_rules=write_rules(tmp_path, RULES),
        compaction={"interval_s": 0},
    )
    bucket = 'by_customer["c1"]'
    bs = s.kafka.bootstrap_servers
    produce(bs, txt, [_marker(prefix, "77", "BEGIN", None)])
    produce(
        bs,
        orders,
        [_dbz(prefix, "orders", 1, {"id": 1, "customer_id": "c1", "total": "9.50"}, "77", 1)],
    )
    produce(
        bs,
        lines,
        [_dbz(prefix, "order_lines", 11, {"id": 11, "customer_id": "c1", "sku": "A"}, "77", 2)],
    )
    asyncio.run(run_processor(s, 3, idle_exit_s=3))
    assert asyncio.run(store_view(s, [bucket]))[bucket]["ops"] == []  # nothing of tx 77 yet

    produce(
        bs,
        lines,
        [_dbz(prefix, "order_lines", 12, {"id": 12, "customer_id": "c1", "sku": "B"}, "77", 3)],
    )
    produce(bs, txt, [_marker(prefix, "77", "END", {"public.orders": 1, "public.order_lines": 2})])
    asyncio.run(run_processor(s, 5, idle_exit_s=3))
    view = asyncio.run(store_view(s, [bucket]))[bucket]
    assert [op[4] for op in view["ops"]] == ["1", "11", "12"]  # all three, in one step
    assert len({op[0] for op in view["ops"]}) == 3
