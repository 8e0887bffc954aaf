"""A dead letter larger than the dead-letter topic accepts (an ``oversize`` record of a
source topic that allows large messages, cdc-events.md §8.3) is written without its bytes
instead of stopping the processor; the records after it are applied. Found by
scripts/qa-formats.py: the processor died on MSG_SIZE_TOO_LARGE at every restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from tests.pipeline_helpers import debezium_json, run_processor, store_view, write_rules

pytestmark = pytest.mark.stack


def _read_all(bootstrap: str, topic: str) -> list[tuple[bytes | None, dict[str, bytes]]]:
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{topic}-reader",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        end = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
        c.assign([TopicPartition(topic, 0, 0)])
        out: list[tuple[bytes | None, dict[str, bytes]]] = []
        while len(out) < end:
            m = c.poll(5.0)
            assert m is not None, f"{len(out)} of {end} dead letters read"
            if m.error():
                continue
            out.append((m.value(), dict(m.headers() or [])))
        return out
    finally:
        c.close()


def test_oversize_dead_letter_too_large_for_the_dead_letter_topic(
    make_settings, create_topic, ns, tmp_path: Path
) -> None:
    # the source topic takes 3 MB messages; the dead-letter topic keeps the broker default
    topic = create_topic(ns.topic("app.public.todos"), config={"max.message.bytes": "3000000"})
    dlq = create_topic(ns.topic("dlq"), config={"max.message.bytes": "200000"})
    s = make_settings(
        kafka={"topics": [topic], "dead_letter_topic": dlq, "max_record_bytes": 100_000},
        sync_rules=write_rules(tmp_path),
    )
    big_k, big_v = debezium_json(
        "todos", "c", {"id": 1}, {"id": 1, "owner_id": "u1", "title": "x" * 1_500_000}
    )
    small = debezium_json("todos", "c", {"id": 2}, {"id": 2, "owner_id": "u1", "title": "ok"})
    p = Producer({"bootstrap.servers": s.kafka.bootstrap_servers, "message.max.bytes": 4_000_000})
    for k, v in (
        (big_k, big_v),
        # above max_record_bytes but small enough for the dead-letter topic: kept whole
        debezium_json("todos", "c", {"id": 3}, {"id": 3, "owner_id": "u1", "title": "y" * 150_000}),
        small,
    ):
        p.produce(topic, key=k, value=v)
    assert p.flush(30) == 0

    asyncio.run(run_processor(s, expect_events=3, idle_exit_s=8))

    got = asyncio.run(store_view(s, ['by_user["u1"]']))
    rows = {op[4] for op in got['by_user["u1"]']["ops"] if op[1] == "PUT"}
    assert rows == {"2"}
    dls = _read_all(s.kafka.bootstrap_servers, dlq)
    assert [h["bucketsync.reason"] for _, h in dls] == [b"oversize", b"oversize"]
    # the refused one is written again after the others: order by source offset
    (v0, h0), (v1, h1) = sorted(dls, key=lambda d: int(d[1]["bucketsync.source.offset"]))
    assert v0 is None and h0["bucketsync.value_omitted"] == str(len(big_v)).encode()
    assert h0["bucketsync.source.offset"] == b"0"
    assert orjson.loads(h0["bucketsync.details"]) == {"limit_bytes": 100_000}
    assert v1 is not None and len(v1) > 150_000 and "bucketsync.value_omitted" not in h1
