"""Random histories through the real processor, Kafka and Redis, compared with the model."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.model import BucketModel
from tests.pipeline_helpers import (
    debezium_json,
    expected_normalised,
    model_rules,
    model_view,
    produce,
    run_processor,
    store_buckets,
    store_view,
    write_rules,
)

pytestmark = pytest.mark.stack

OWNERS = ["u1", "u2", "u3", None]

row_ids = st.integers(min_value=1, max_value=6)
rows = st.fixed_dictionaries(
    {
        "owner_id": st.sampled_from(OWNERS),
        "title": st.sampled_from(["a", "b", "milk", "ünïcode ☃", 'q"uote']),
        "done": st.sampled_from([0, 1]),
    }
)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("c"), row_ids, rows),
        st.tuples(st.just("u"), row_ids, rows),
        st.tuples(st.just("d"), row_ids, st.none()),
        st.tuples(st.just("tombstone"), row_ids, st.none()),
        st.tuples(st.just("dup"), st.integers(0, 50), st.none()),
    ),
    min_size=1,
    max_size=40,
)


def build_history(
    raw: list[tuple[str, int, Any]],
) -> tuple[list[tuple[bytes, bytes | None]], list[dict[str, Any]]]:
    msgs: list[tuple[bytes, bytes | None]] = []
    events: list[dict[str, Any]] = []
    for op, n, data in raw:
        if op == "dup":
            if msgs:  # a producer retry: the same record again, later in the log
                i = n % len(msgs)
                msgs.append(msgs[i])
                events.append(events[i])
            continue
        key = {"id": n}
        after = None if data is None else {"id": n, **data}
        msgs.append(debezium_json("todos", op, key, after))
        if op == "tombstone":
            events.append({"action": "delete", "table": "app.public.todos", "key": key})
        else:
            events.append(expected_normalised("app.public.todos", op, key, after))
    return msgs, events


@settings(
    max_examples=int(__import__("os").environ.get("BUCKETSYNC_TEST_EXAMPLES", "8")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(raw=steps, batch=st.sampled_from([1, 3, 1000]))
def test_random_histories_match_model(
    raw, batch, stack, ns, make_settings, create_topic, tmp_path_factory
) -> None:
    import uuid

    msgs, events = build_history(raw)
    tmp = tmp_path_factory.mktemp("rules")
    topic = create_topic(ns.topic(f"hist-{uuid.uuid4().hex[:8]}.public.todos"))
    s = make_settings(
        kafka={"topics": [topic]},
        sync_rules=write_rules(tmp),
        processor={"batch_max_events": batch, "batch_max_wait_ms": 20},
    )
    # every example gets a fresh key prefix, so examples never see each other's state
    s.redis.prefix = s.redis.prefix + "-" + uuid.uuid4().hex[:6]
    produce(s.kafka.bootstrap_servers, topic, msgs)
    model = BucketModel(model_rules)
    model.apply_all(events)
    asyncio.run(run_processor(s, len(msgs)))
    got = asyncio.run(store_view(s, list(model.buckets)))
    assert got == model_view(model)
    # and no bucket the model lacks (e.g. `by_user[null]` for NULL owners, §8.5)
    assert asyncio.run(store_buckets(s)) == sorted(model.buckets)

    # replaying the topic from offset 0 (a new consumer group) changes nothing
    s.kafka.group_id = s.kafka.group_id + "-replay"
    asyncio.run(run_processor(s, len(msgs)))
    again = asyncio.run(store_view(s, list(model.buckets)))
    assert again == got
