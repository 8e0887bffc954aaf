"""A processor killed with SIGKILL mid-stream and restarted ends byte-identical to an
uncrashed run (architecture invariant 2), and bad records go to the dead-letter topic."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer

from bucketsync.feed import TodoFeed, make_producer, produce_events
from tests.pipeline_helpers import produce, write_rules
from tests.processes import applied_offsets, start_processor, wait_applied, write_config

pytestmark = pytest.mark.stack

N_EVENTS = 6_000


def _wait_offset(r: redis.Redis, prefix: str, tp: str, at_least: int, timeout: float = 180) -> int:
    wait_applied(r, prefix, {tp: at_least}, timeout)
    return applied_offsets(r, prefix)[tp]


def snapshot(r: redis.Redis, prefix: str) -> dict[str, Any]:
    """Every key of a deployment except the change stream (its entry ids are timestamps)."""
    out: dict[str, Any] = {}
    for key in r.scan_iter(match=f"{prefix}:*", count=1000):
        name = key.decode()[len(prefix) + 1 :]
        if name.startswith("changes"):
            continue
        t = r.type(key).decode()
        if t == "zset":
            out[name] = r.zrange(key, 0, -1, withscores=True)
        elif t == "hash":
            out[name] = r.hgetall(key)
        elif t == "set":
            out[name] = sorted(r.smembers(key))
        elif t == "string":
            out[name] = r.get(key)
        else:
            out[name] = t
    return out


def test_sigkill_mid_batch_restart_is_identical(
    make_settings, create_topic, ns, tmp_path: Path
) -> None:
    topic = create_topic(ns.topic("app.public.todos"))
    base = make_settings(
        kafka={"topics": [topic]},
        sync_rules=write_rules(tmp_path),
        compaction={"interval_s": 0},
    )
    feed = TodoFeed(users=20, rows=800, seed=3)
    # the test rules use owner_id and done/title; feed rows carry owner_id, which is what matters
    produce_events(make_producer(base), topic, feed.events(N_EVENTS))
    tp = f"{topic}/0"
    r = redis.Redis.from_url(base.redis.url)
    ref_prefix, crash_prefix = ns.prefix + "-ref", ns.prefix + "-crash"
    ref_cfg = write_config(
        tmp_path,
        base,
        "ref",
        redis={"prefix": ref_prefix},
        kafka={"group_id": ns.group_id + "-ref"},
        processor={"batch_max_events": 2000},
    )
    crash_cfg = write_config(
        tmp_path,
        base,
        "crash",
        redis={"prefix": crash_prefix},
        kafka={"group_id": ns.group_id + "-crash"},
        processor={"batch_max_events": 300},
    )
    try:
        ref = start_processor(ref_cfg, "kafka")
        try:
            _wait_offset(r, ref_prefix, tp, N_EVENTS - 1)
        finally:
            ref.terminate()
            ref.wait(30)

        kills = 0
        for frac in (0.2, 0.5):
            p = start_processor(crash_cfg, "faust")
            try:
                _wait_offset(r, crash_prefix, tp, int(N_EVENTS * frac))
                # a kill at an arbitrary instant: most likely while a batch is in flight
                time.sleep(0.05)
            finally:
                p.send_signal(signal.SIGKILL)
                p.wait(30)
                kills += 1
        p = start_processor(crash_cfg, "faust")
        try:
            _wait_offset(r, crash_prefix, tp, N_EVENTS - 1)
        finally:
            p.terminate()
            p.wait(60)
        assert kills == 2
        ref_state = snapshot(r, ref_prefix)
        crash_state = snapshot(r, crash_prefix)
        assert len(ref_state) > 100
        assert crash_state == ref_state
    finally:
        for prefix in (ref_prefix, crash_prefix):
            keys = list(r.scan_iter(match=f"{prefix}:*", count=1000))
            if keys:
                r.unlink(*keys)
        r.close()


def test_bad_records_go_to_dead_letter_topic_and_processing_continues(
    make_settings, create_topic, ns, tmp_path: Path
) -> None:
    topic = create_topic(ns.topic("app.public.todos"))
    s = make_settings(
        kafka={"topics": [topic]}, sync_rules=write_rules(tmp_path), compaction={"interval_s": 0}
    )
    create_topic(s.kafka.dead_letter_topic)
    good = b'{"before":null,"after":{"id":1,"owner_id":"u1","title":"a","done":0},"source":{"table":"todos","schema":"public"},"op":"c"}'
    bad = [
        (b'{"id":2}', b"{not json"),
        (b'{"id":3}', b'{"after":{"id":3},"source":{"table":"todos"}}'),
        (b'{"id":4}', b'{"before":null,"after":{"id":4},"source":{"table":"todos"},"op":"x"}'),
    ]
    produce(s.kafka.bootstrap_servers, topic, [*bad, (b'{"id":1}', good)])
    import asyncio

    from tests.pipeline_helpers import run_processor, store_view

    asyncio.run(run_processor(s, 4))
    view = asyncio.run(store_view(s, ['by_user["u1"]']))
    assert [op[1] for op in view['by_user["u1"]']["ops"]] == [
        "PUT"
    ]  # the good event after them landed

    c = Consumer(
        {
            "bootstrap.servers": s.kafka.bootstrap_servers,
            "group.id": ns.group_id + "-dl",
            "auto.offset.reset": "earliest",
        }
    )
    c.subscribe([s.kafka.dead_letter_topic])
    got = []
    deadline = time.monotonic() + 30
    while len(got) < 3 and time.monotonic() < deadline:
        m = c.poll(1.0)
        if m is not None and not m.error():
            got.append(m)
    c.close()
    reasons = [dict(m.headers())["bucketsync.reason"].decode() for m in got]
    assert reasons == ["invalid_json", "missing_op", "unknown_op"]
    for m, (k, v) in zip(got, bad, strict=True):
        h = dict(m.headers())
        assert m.value() == v and m.key() == k  # the original bytes
        assert h["bucketsync.source.topic"].decode() == topic
        assert h["bucketsync.source.partition"] == b"0"
    assert [int(dict(m.headers())["bucketsync.source.offset"]) for m in got] == [0, 1, 2]
