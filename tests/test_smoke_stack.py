"""Smoke tests against the real local stack: Kafka produce/consume and a Redis round trip."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Producer

from bucketsync.stack import stack_status

pytestmark = pytest.mark.stack


def _produce(bootstrap: str, topic: str, records: dict[bytes, bytes]) -> None:
    errors: list[Any] = []
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})

    def on_delivery(err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            errors.append(err)

    for key, value in records.items():
        producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
    assert producer.flush(30) == 0, "messages still queued after 30 s"
    assert errors == []


def _consume(bootstrap: str, topic: str, group_id: str, want: int) -> dict[bytes, bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group_id,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    got: dict[bytes, bytes] = {}
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 60
        while len(got) < want and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            key, value = msg.key(), msg.value()
            assert key is not None and value is not None
            got[key] = value
    finally:
        consumer.close()
    return got


def test_kafka_produce_consume(stack: Any, ns: Any, create_topic: Callable[..., str]) -> None:
    topic = create_topic(ns.topic("smoke"), partitions=2)
    records = {f"k{i}".encode(): f"v{i}".encode() for i in range(50)}
    _produce(stack.bootstrap_servers, topic, records)
    assert _consume(stack.bootstrap_servers, topic, ns.group_id, len(records)) == records


def test_kafka_auto_creates_topics(stack: Any, ns: Any) -> None:
    topic = ns.topic("auto-created")
    _produce(stack.bootstrap_servers, topic, {b"k": b"v"})
    assert _consume(stack.bootstrap_servers, topic, ns.group_id, 1) == {b"k": b"v"}


def test_redis_round_trip(ns: Any, redis_client: Any) -> None:
    key = f"{ns.prefix}:smoke"
    redis_client.set(key, b"\x00value\xff")
    assert redis_client.get(key) == b"\x00value\xff"
    appendonly = {
        k if isinstance(k, str) else k.decode(): v
        for k, v in redis_client.config_get("appendonly").items()
    }
    assert appendonly["appendonly"] in ("yes", b"yes")


def test_make_settings_points_at_stack(
    stack: Any, ns: Any, make_settings: Callable[..., Any]
) -> None:
    topic = ns.topic("todos")
    s = make_settings(kafka={"topics": [topic]}, processor={"batch_max_events": 7})
    assert s.kafka.bootstrap_servers == stack.bootstrap_servers
    assert s.kafka.topics == [topic]
    assert s.kafka.group_id == ns.group_id
    assert s.kafka.dead_letter_topic == ns.topic("dead-letter")
    assert s.redis.url == stack.redis_url
    assert s.redis.prefix == ns.prefix
    assert s.processor.batch_max_events == 7
    assert s.state_dir == stack.settings.state_dir.resolve()


def test_stack_reports_running(stack: Any) -> None:
    rows = stack_status(stack.settings)
    assert {r["name"]: r["state"] for r in rows} == {"kafka": "running", "redis": "running"}
    assert all(isinstance(r["pid"], int) for r in rows)
