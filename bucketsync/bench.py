"""``bucketsync bench …``: benchmarks with JSON results and a short table.

Never timed assertions: these report medians and ratios on a shared, noisy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Consumer, TopicPartition
from rich.console import Console
from rich.table import Table

from bucketsync.config import Settings
from bucketsync.errors import UserError
from bucketsync.feed import TodoFeed, ensure_topics, make_producer, produce_events

BENCH_RULES = """
bucket_definitions:
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT * FROM todos WHERE owner_id = bucket.user_id
  by_list:
    parameters: SELECT request.jwt() ->> 'list' AS list_id
    data:
      - SELECT id, description, completed FROM todos WHERE list_id = bucket.list_id
"""


def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)


def _write(result: dict[str, Any], out: str | None, name: str) -> None:
    path = (
        Path(out)
        if out
        else Path("bench-results") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"results: {path}")


def raw_consume_rate(settings: Settings, topic: str, n: int) -> float:
    c = Consumer(
        {
            "bootstrap.servers": settings.kafka.bootstrap_servers,
            "group.id": f"bench-raw-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    c.assign([TopicPartition(topic, 0, 0)])
    got = 0
    t0 = time.perf_counter()
    while got < n:
        msgs = c.consume(2000, 1.0)
        got += sum(1 for m in msgs if not m.error())
    dt = time.perf_counter() - t0
    c.close()
    return n / dt


async def _kafka_driver_rate(settings: Settings, n: int) -> tuple[float, dict[str, float]]:
    from pipeline.membership import Membership
    from pipeline.processor import BatchApplier, KafkaLoopDriver, load_sync_rules
    from pipeline.store import Store

    store = Store.from_url(settings.redis.url, settings.redis.prefix)
    applier = BatchApplier(settings, store, load_sync_rules(settings))
    driver = KafkaLoopDriver(settings, applier, Membership(None))
    t0 = time.perf_counter()
    await driver.run(max_events=n, idle_exit_s=30)
    dt = time.perf_counter() - t0
    await store.close()
    return n / dt, dict(applier.timings)


def _faust_driver_rate(cfg_path: Path, settings: Settings, topic: str, n: int) -> float:
    import redis

    r = redis.Redis.from_url(settings.redis.url)
    env = dict(os.environ)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bucketsync.cli",
            "--config",
            str(cfg_path),
            "processor",
            "--driver",
            "faust",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    key = f"{settings.redis.prefix}:offsets"
    t0 = None
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            off = r.hget(key, f"{topic}/0")
            if off is not None and t0 is None:
                t0 = time.perf_counter()
                first = int(off)
            if off is not None and int(off) >= n - 1:
                assert t0 is not None
                dt = time.perf_counter() - t0
                return (n - first) / dt if dt > 0 else float("nan")
            if proc.poll() is not None:
                err = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
                raise UserError(f"faust processor exited early: {err}")
            time.sleep(0.05)
        raise UserError("faust processor did not finish in 600 s")
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        r.close()


def _cleanup(settings: Settings, prefixes: list[str]) -> None:
    import redis

    r = redis.Redis.from_url(settings.redis.url)
    for prefix in prefixes:
        batch = []
        for key in r.scan_iter(match=f"{prefix}:*", count=5000):
            batch.append(key)
            if len(batch) >= 1000:
                r.unlink(*batch)
                batch = []
        if batch:
            r.unlink(*batch)
    r.close()


def bench_ingest(settings: Settings, events: int, out: str | None) -> int:
    from bucketsync import stack

    stack.ensure_up(settings)
    run_id = uuid.uuid4().hex[:8]
    topic = f"bench-{run_id}.public.todos"
    tmp = Path(tempfile.mkdtemp(prefix="bucketsync-bench-"))
    (tmp / "rules.yaml").write_text(BENCH_RULES)
    base = settings.model_dump(mode="json", exclude={"config_dir"})
    base["sync_rules"] = str(tmp / "rules.yaml")
    base["kafka"].update({"topics": [topic], "topic_pattern": None, "group_id": f"bench-{run_id}"})
    base["kafka"]["dead_letter_topic"] = f"bench-{run_id}.dead-letter"
    base["redis"]["prefix"] = f"bench-{run_id}"
    base["compaction"]["interval_s"] = 0
    base["processor"]["batch_max_events"] = 5000
    cfg = tmp / "bucketsync.yaml"
    cfg.write_text(yaml.safe_dump(base))
    from bucketsync.config import load_settings

    s = load_settings(cfg)
    ensure_topics(s, [topic, s.kafka.dead_letter_topic])
    print(f"prefilling {topic} with {events:,} Debezium JSON events ...", flush=True)
    feed = TodoFeed(users=1000, rows=100_000, seed=7)
    t0 = time.perf_counter()
    produce_events(make_producer(s), topic, feed.events(events))
    produce_s = time.perf_counter() - t0

    raw = [raw_consume_rate(s, topic, events) for _ in range(3)]
    raw_med = statistics.median(raw)
    kafka_rate, timings = asyncio.run(_kafka_driver_rate(s, events))

    faust_rate = None
    if os.environ.get("BUCKETSYNC_BENCH_SKIP_FAUST") != "1":
        s2 = base.copy()
        s2["redis"] = dict(base["redis"], prefix=f"bench-{run_id}-faust")
        s2["kafka"] = dict(base["kafka"], group_id=f"bench-{run_id}-faust")
        cfg2 = tmp / "faust.yaml"
        cfg2.write_text(yaml.safe_dump(s2))
        faust_rate = _faust_driver_rate(cfg2, load_settings(cfg2), topic, events)

    _cleanup(s, [s.redis.prefix, f"bench-{run_id}-faust"])
    total_stage = sum(timings.values()) or 1.0
    result = {
        "benchmark": "ingest",
        "events": events,
        "topic": topic,
        "produce_seconds": round(produce_s, 2),
        "raw_consume_events_per_s": [round(x) for x in raw],
        "raw_consume_median": round(raw_med),
        "kafka_driver_events_per_s": round(kafka_rate),
        "kafka_driver_ratio_to_raw": round(kafka_rate / raw_med, 3),
        "faust_driver_events_per_s": round(faust_rate) if faust_rate else None,
        "faust_ratio_to_kafka_driver": round(faust_rate / kafka_rate, 3) if faust_rate else None,
        "stage_seconds": {k: round(v, 3) for k, v in timings.items()},
        "stage_share": {k: round(v / total_stage, 3) for k, v in timings.items()},
    }
    _print_table(
        f"bench ingest: {events:,} events",
        [
            ("raw confluent-kafka consume (median of 3)", f"{raw_med:,.0f}/s"),
            ("processor, kafka driver", f"{kafka_rate:,.0f}/s"),
            ("ratio to raw consume", f"{kafka_rate / raw_med:.3f}"),
            ("processor, faust driver", f"{faust_rate:,.0f}/s" if faust_rate else "skipped"),
            *[(f"stage {k}", f"{v:.2f}s ({v / total_stage:.0%})") for k, v in timings.items()],
        ],
    )
    _write(result, out, "ingest")
    return 0


def main(settings: Settings, args: argparse.Namespace) -> int:
    if args.which == "ingest":
        return bench_ingest(settings, args.events or 500_000, args.out)
    if args.which == "compact":
        from pipeline.bench_compact import bench_compact

        return bench_compact(settings, args.out)
    if args.which == "fanout":
        from gateway.bench_fanout import bench_fanout

        return bench_fanout(settings, args.out)
    if args.which == "lookups":
        from gateway.bench_lookups import bench_lookups

        return bench_lookups(settings, args.out)
    raise UserError(f"unknown benchmark {args.which}")
