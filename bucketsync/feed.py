"""Synthetic Debezium change events for the demo, ``loadgen`` and benchmarks.

Events are what a Debezium PostgreSQL connector with the JSON converter and
``schemas.enable=false`` writes for a ``todos`` table (cdc-events.md §2.3).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from bucketsync.config import Settings
from bucketsync.errors import UserError

WORDS = [
    "buy",
    "milk",
    "call",
    "mom",
    "fix",
    "bike",
    "write",
    "report",
    "plan",
    "trip",
    "read",
    "book",
]


def envelope(
    table: str, op: str, before: dict[str, Any] | None, after: dict[str, Any] | None, *, lsn: int
) -> bytes:
    now = int(time.time() * 1000)
    return orjson.dumps(
        {
            "before": before,
            "after": after,
            "source": {
                "version": "3.3.0.Final",
                "connector": "postgresql",
                "name": "app",
                "ts_ms": now,
                "snapshot": "false",
                "db": "app",
                "schema": "public",
                "table": table,
                "txId": lsn,
                "lsn": lsn,
            },
            "op": op,
            "ts_ms": now,
            "transaction": None,
        }
    )


@dataclass
class TodoFeed:
    """A random but plausible stream of todo changes over ``rows`` rows and ``users`` owners."""

    users: int = 5
    rows: int = 50
    seed: int = 1
    topic_table: str = "todos"
    live: dict[int, dict[str, Any]] = field(default_factory=dict)
    lsn: int = 1000

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def user(self, i: int | None = None) -> str:
        return f"u{self.rng.randrange(1, self.users + 1) if i is None else i}"

    def _row(self, rid: int, owner: str) -> dict[str, Any]:
        return {
            "id": f"t{rid}",
            "list_id": f"l{rid % 7}",
            "owner_id": owner,
            "description": " ".join(self.rng.choices(WORDS, k=3)),
            "completed": False,
        }

    def next(self) -> tuple[bytes, bytes | None]:
        self.lsn += 1
        rid = self.rng.randrange(self.rows)
        key = orjson.dumps({"id": f"t{rid}"})
        cur = self.live.get(rid)
        if cur is None:
            row = self._row(rid, self.user())
            self.live[rid] = row
            return key, envelope(self.topic_table, "c", None, row, lsn=self.lsn)
        dice = self.rng.random()
        if dice < 0.1:
            del self.live[rid]
            return key, envelope(self.topic_table, "d", cur, None, lsn=self.lsn)
        new = dict(cur)
        if dice < 0.25:
            new["owner_id"] = self.user()  # ownership moves between buckets
        elif dice < 0.6:
            new["completed"] = not cur["completed"]
        else:
            new["description"] = " ".join(self.rng.choices(WORDS, k=3))
        self.live[rid] = new
        return key, envelope(self.topic_table, "u", cur, new, lsn=self.lsn)

    def events(self, n: int) -> Iterator[tuple[bytes, bytes | None]]:
        for _ in range(n):
            yield self.next()


def ensure_topics(settings: Settings, topics: list[str], partitions: int = 1) -> None:
    """Create the topics that do not exist; Kafka unreachable is a :class:`UserError` naming
    ``kafka.bootstrap_servers`` (librdkafka's own connection lines are not printed)."""
    quiet = logging.Logger("bucketsync.feed.rdkafka")  # outside the logging tree: dropped
    quiet.addHandler(logging.NullHandler())
    servers = settings.kafka.bootstrap_servers
    admin = AdminClient({"bootstrap.servers": servers}, logger=quiet)
    try:
        existing = set(admin.list_topics(timeout=10).topics)
    except KafkaException as exc:
        reason = exc.args[0].str() if exc.args and hasattr(exc.args[0], "str") else exc
        raise UserError(
            f"Kafka at {servers} is unreachable ({reason}); is it running? "
            "(kafka.bootstrap_servers / BUCKETSYNC_KAFKA__BOOTSTRAP_SERVERS)"
        ) from None
    new = [
        NewTopic(t, num_partitions=partitions, replication_factor=1)
        for t in topics
        if t not in existing
    ]
    if not new:
        return
    for t, fut in admin.create_topics(new).items():
        try:
            fut.result(15)
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise UserError(f"could not create topic {t}: {exc}") from None


def make_producer(settings: Settings) -> Producer:
    return Producer(
        {
            "bootstrap.servers": settings.kafka.bootstrap_servers,
            "linger.ms": 20,
            "batch.num.messages": 10000,
            "queue.buffering.max.messages": 500000,
            "compression.type": "lz4",
            "enable.idempotence": True,
        }
    )


def produce_events(
    producer: Producer, topic: str, events: Iterator[tuple[bytes, bytes | None]], rate: float = 0
) -> int:
    n = 0
    t0 = time.monotonic()
    for key, value in events:
        while True:
            try:
                producer.produce(topic, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.05)
        n += 1
        if n % 1000 == 0:
            producer.poll(0)
        if rate > 0:
            ahead = n / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    producer.flush(60)
    return n


def loadgen_main(
    settings: Settings,
    *,
    topic: str | None = None,
    events: int = 10_000,
    users: int = 100,
    rows: int = 1_000,
    rate: float = 0,
) -> int:
    """``bucketsync loadgen``: ``events`` synthetic todo changes to ``topic``."""
    topic = topic or (settings.kafka.topics[0] if settings.kafka.topics else None)
    if not topic:
        raise UserError("no topic: pass --topic or configure kafka.topics")
    ensure_topics(settings, [topic])
    feed = TodoFeed(users=users, rows=rows, topic_table=topic.rsplit(".", 1)[-1])
    from rich.progress import Progress

    producer = make_producer(settings)
    t0 = time.monotonic()
    with Progress() as bar:
        task = bar.add_task(f"producing to {topic}", total=events)
        done = 0
        while done < events:
            chunk = min(10_000, events - done)
            produce_events(producer, topic, feed.events(chunk), rate)
            done += chunk
            bar.update(task, completed=done)
    dt = time.monotonic() - t0
    print(f"produced {events} events to {topic} in {dt:.1f}s ({events / dt:,.0f}/s)")
    return 0
