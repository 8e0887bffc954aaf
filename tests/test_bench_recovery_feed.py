"""``bench recovery --consistency transaction``'s feed (pure): what it produces decodes as
Debezium transactions (BEGIN, data events with transaction blocks, END with the counts of
``public.todos``) that the processor's stager holds until the END and then releases whole,
so a run measures recovery of transactions, not of events held until the grace period."""

from __future__ import annotations

from typing import Any

from bucketsync.bench.recovery import TX_EVENTS, _Feed
from bucketsync.config import Settings
from bucketsync.feed import TodoFeed
from pipeline.cdc import KafkaRecord, decode_record
from pipeline.transactions import TransactionStager


class _Producer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    def produce(self, topic: str, key: bytes, value: bytes) -> None:
        self.sent.append((topic, key, value))


def test_the_transaction_feed_is_released_whole_at_each_end() -> None:
    feed = _Feed(Settings(), "p.public.todos", rate=100.0, tx_topic="p.transaction")
    todos, producer = TodoFeed(users=5, rows=50, seed=3), _Producer()
    stager = TransactionStager(subscribed=lambda c: True, grace_s=3600)
    offsets: dict[tuple[str, int], int] = {}
    released: list[Any] = []
    for t in range(20):
        producer.sent.clear()
        feed._transaction(producer, todos, t * TX_EVENTS)
        assert [s[0] for s in producer.sent] == (
            ["p.transaction"] + ["p.public.todos"] * TX_EVENTS + ["p.transaction"]
        )
        events = []
        for i, (topic, key, value) in enumerate(producer.sent):
            part = 0 if topic == "p.transaction" else (t + i) % 3  # spread over partitions
            off = offsets[(topic, part)] = offsets.get((topic, part), -1) + 1
            rec = KafkaRecord(topic, part, off, key, value)
            events.append((rec, decode_record(rec)))
        begin, *data, end = (ev for _, ev in events)
        assert begin["action"] == "tx_begin" and end["action"] == "tx_end"
        assert end["event_count"] == TX_EVENTS
        assert end["data_collections"] == {"p.public.todos": TX_EVENTS}
        assert [ev["tx"]["id"] for ev in data] == [end["tx_id"]] * TX_EVENTS
        assert [ev["tx"]["total_order"] for ev in data] == list(range(1, TX_EVENTS + 1))
        for rec, ev in events[:-1]:
            stager.push(rec, ev)
        assert [ev for _, ev in stager.release() if ev["action"] != "tx_begin"] == []
        stager.push(*events[-1])
        out = [ev for _, ev in stager.release()]
        assert [ev for ev in out if ev["action"] not in ("tx_begin", "tx_end")] == data
        released += out
    assert stager.degraded == 0 and stager.staged == 0
    assert len(released) == 20 * (TX_EVENTS + 2)
