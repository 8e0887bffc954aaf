"""Several processors in one consumer group split the partitions and together reach the
state the reference model predicts (checksums and counts do not depend on how op ids of
different rows interleave)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from pipeline.membership import Membership
from pipeline.processor import BatchApplier, DeadLetterSink, KafkaLoopDriver, load_sync_rules
from pipeline.store import Store
from tests.model import BucketModel
from tests.pipeline_helpers import (
    debezium_json,
    expected_normalised,
    model_rules,
    produce,
    store_view,
    write_rules,
)

pytestmark = pytest.mark.stack


async def _one_processor(settings) -> tuple[int, set[str]]:
    store = Store.from_settings(settings)
    applier = BatchApplier(
        settings, store, load_sync_rules(settings), dead_letters=DeadLetterSink(settings)
    )
    driver = KafkaLoopDriver(settings, applier, Membership(None))
    try:
        n = await driver.run(idle_exit_s=6)
        return n, set(applier.applied)
    finally:
        await store.close()


def test_two_processors_share_a_group(make_settings, create_topic, ns, tmp_path: Path) -> None:
    topic = create_topic(ns.topic("app.public.todos"), partitions=2)
    s = make_settings(
        kafka={"topics": [topic]},
        sync_rules=write_rules(tmp_path),
        processor={"batch_max_events": 50},
    )
    rng = random.Random(5)
    model = BucketModel(model_rules)
    msgs = []
    for _ in range(600):
        rid = rng.randrange(40)
        key = {"id": rid}
        if rng.random() < 0.15:
            msgs.append(debezium_json("todos", "d", key, None))
            model.apply(expected_normalised("app.public.todos", "d", key, None))
        else:
            after = {
                "id": rid,
                "owner_id": rng.choice(["u1", "u2", "u3"]),
                "title": rng.choice("abc"),
                "done": rng.randrange(2),
            }
            msgs.append(debezium_json("todos", "u", key, after))
            model.apply(expected_normalised("app.public.todos", "u", key, after))
    produce(s.kafka.bootstrap_servers, topic, msgs)

    async def both():
        return await asyncio.gather(_one_processor(s), _one_processor(s))

    results = asyncio.run(both())
    assert sum(n for n, _ in results) >= len(msgs)
    got = asyncio.run(store_view(s, list(model.buckets)))
    for name, b in model.buckets.items():
        assert got[name]["checksum"] == b.checksum, name
        assert got[name]["count"] == b.count, name
        live = {(op[3], op[4]): op[5] for op in got[name]["ops"] if op[1] == "PUT"}
        assert live == b.live_rows(), name


def test_topic_pattern_consumes_every_matching_topic(
    make_settings, create_topic, ns, tmp_path: Path
) -> None:
    a = create_topic(ns.topic("pat.public.todos"))
    b = create_topic(ns.topic("pat.other.todos"))
    create_topic(ns.topic("nomatch.public.todos"))
    pattern = "^" + ns.topic("pat").replace(".", r"\.") + r"\..*"
    s = make_settings(
        kafka={"topics": [], "topic_pattern": pattern}, sync_rules=write_rules(tmp_path)
    )
    produce(
        s.kafka.bootstrap_servers,
        a,
        [
            debezium_json(
                "todos", "c", {"id": 1}, {"id": 1, "owner_id": "u1", "title": "a", "done": 0}
            )
        ],
    )
    produce(
        s.kafka.bootstrap_servers,
        b,
        [
            debezium_json(
                "todos", "c", {"id": 2}, {"id": 2, "owner_id": "u1", "title": "b", "done": 0}
            )
        ],
    )
    asyncio.run(_one_processor(s))
    view = asyncio.run(store_view(s, ['by_user["u1"]']))['by_user["u1"]']
    assert sorted(op[4] for op in view["ops"]) == ["1", "2"]
