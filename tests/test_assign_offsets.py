"""Kafka driver: a partition assigned to a processor resumes right after the store's applied
offset as it is at the assignment, not after the one the processor held (read at its start,
or its own last batch of that partition). With round-robin assignment, partitions move
between live members of a group at every rebalance, and another member may have applied
far past what this one knew: it resumed from there, fetched and planned everything since
again, only to have the batch refused as stale by the store's offset guard (the QA round saw
"assigned .../todos/0@280" for a partition applied up to 1346 elsewhere)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import TopicPartition

from pipeline.membership import Membership
from pipeline.processor import BatchApplier, DeadLetterSink, KafkaLoopDriver, load_sync_rules
from pipeline.store import Store
from tests.pipeline_helpers import debezium_json, produce, run_processor, write_rules
from tests.processes import drop_prefix

pytestmark = pytest.mark.stack


async def test_assigned_partition_resumes_after_the_stores_applied_offset(
    make_settings: Any, create_topic: Any, ns: Any, tmp_path: Path
) -> None:
    topic = create_topic(ns.topic("app.public.todos"))
    s = make_settings(
        kafka={"topics": [topic]},
        sync_rules=write_rules(tmp_path),
        compaction={"interval_s": 0},
        processor={"metrics_port": 0},
    )
    create_topic(s.kafka.dead_letter_topic)
    msgs = [
        debezium_json(
            "todos",
            "u",
            {"id": i % 7},
            {"id": i % 7, "owner_id": "u1", "title": f"t{i}", "done": 0},
        )
        for i in range(30)
    ]
    produce(s.kafka.bootstrap_servers, topic, msgs)
    # processor B starts first (it has applied nothing, so it holds no applied offsets) ...
    store = Store.from_settings(s)
    applier = BatchApplier(s, store, load_sync_rules(s), dead_letters=DeadLetterSink(s))
    driver = KafkaLoopDriver(s, applier, Membership(None))
    try:
        await applier.load_offsets()
        assert applier.applied == {}
        # ... another member of the group applies the whole partition meanwhile ...
        assert await run_processor(s, len(msgs), idle_exit_s=5) >= len(msgs)
        assert (await store.applied_offsets())[f"{topic}/0"] == len(msgs) - 1
        # ... and the partition moves to B: the rebalance callback runs in the consume
        # thread while the loop awaits it
        tps = [TopicPartition(topic, 0)]
        await asyncio.get_running_loop().run_in_executor(
            None, driver._on_assign, driver.consumer, tps
        )
        assert tps[0].offset == len(msgs)
        assert applier.applied[f"{topic}/0"] == len(msgs) - 1
    finally:
        await asyncio.get_running_loop().run_in_executor(None, driver.consumer.close)
        await store.close()
        drop_prefix(redis.Redis.from_url(s.redis.url), s.redis.prefix)
