"""``bucketsync bench ingest``: events/s per driver against a raw consume of the same topics.

Never timed assertions: these report medians and ratios on a shared, noisy machine.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

from confluent_kafka import Consumer, TopicPartition

from bucketsync.bench.mix import MIX_TABLES
from bucketsync.bench.procs import (
    cpu_seconds,
    delete_prefixes,
    own_topics,
    private_redis,
    spawn_cli,
    stop,
    write_config,
)
from bucketsync.bench.report import Plot, result_path, write_report
from bucketsync.config import Settings
from bucketsync.errors import UserError
from bucketsync.feed import ensure_topics, make_producer
from pipeline.store import parse_member

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


def raw_consume_rate(settings: Settings, topics: list[str], n: int) -> float:
    """Records/s of a plain confluent-kafka consume of ``topics`` (partition 0 each)."""
    c = Consumer(
        {
            "bootstrap.servers": settings.kafka.bootstrap_servers,
            "group.id": f"bench-raw-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    c.assign([TopicPartition(t, 0, 0) for t in topics])
    got = 0
    t0 = time.perf_counter()
    while got < n:
        msgs = c.consume(2000, 1.0)
        got += sum(1 for m in msgs if not m.error())
    dt = time.perf_counter() - t0
    c.close()
    return n / dt


def _redis_cpu(r: Any) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])


class Sample(NamedTuple):
    """What the processors had done at ``t`` (perf_counter): events applied, their CPU
    seconds and Redis's."""

    t: float
    done: int
    cpu_s: float
    redis_cpu_s: float


def per_event(spawned: Sample, first: Sample, last: Sample) -> dict[str, float]:
    """Rate and CPU per event from the first applied batch to the last event; when the first
    sample already held every event (a run smaller than a batch), from the processors'
    start instead (then the rate includes their start-up)."""
    start = first if last.done > first.done else spawned
    applied = last.done - start.done
    dt = last.t - start.t
    return {
        "events_per_s": applied / dt if dt > 0 else float("nan"),
        "processor_us_per_event": 1e6 * (last.cpu_s - start.cpu_s) / applied,
        "redis_us_per_event": 1e6 * (last.redis_cpu_s - start.redis_cpu_s) / applied,
    }


def _run_processors(
    cfg_path: Path, settings: Settings, driver: str, n_procs: int, events: int
) -> dict[str, Any]:
    """Start ``n_procs`` processors (one group) on the prefilled topics; time them from the
    first applied batch to the last event, sampling applied offsets for the timeline."""
    import redis

    r = redis.Redis.from_url(settings.redis.url)
    key = f"{settings.redis.prefix}:offsets"
    procs = [
        spawn_cli("processor", cfg_path, "--driver", driver, err=subprocess.PIPE)
        for _ in range(n_procs)
    ]
    pids = [p.pid for p in procs]
    timeline: list[tuple[float, int]] = []
    spawned = Sample(time.perf_counter(), 0, 0.0, _redis_cpu(r))
    first: Sample | None = None
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            done = sum(int(v) + 1 for v in r.hgetall(key).values())
            now = time.perf_counter()
            if done and first is None:
                first = Sample(now, done, cpu_seconds(*pids), _redis_cpu(r))
            if first is not None:
                timeline.append((now - first.t, done))
            if done >= events:
                assert first is not None
                last = Sample(now, done, cpu_seconds(*pids), _redis_cpu(r))
                return {**per_event(spawned, first, last), "timeline": timeline}
            for p in procs:
                if p.poll() is not None:
                    err = p.stderr.read().decode()[-2000:] if p.stderr else ""
                    raise UserError(f"{driver} processor exited early: {err}")
            time.sleep(0.1)
        raise UserError(f"{driver} processors did not finish in 900 s")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            stop(p)
        r.close()


def memory_stats(settings: Settings, sample: int = 300) -> dict[str, Any]:
    """Redis bytes per op beyond its wire JSON (sampled buckets: MEMORY USAGE of the op log
    minus the wire bytes of its ops, per op) and per live row (sampled row index slot
    hashes, with the lookup entries; the kept source-row copy per row that has one,
    separately: ``MEMORY USAGE`` of its slot hashes, so including their overhead)."""
    import redis

    r = redis.Redis.from_url(settings.redis.url)
    pre = settings.redis.prefix
    try:
        ops_keys = []
        for k in r.scan_iter(match=f"{pre}:ops:*", count=1000):
            ops_keys.append(k)
            if len(ops_keys) >= sample:
                break
        n_ops = wire = usage = 0
        for k in ops_keys:
            rows = r.zrange(k, 0, -1)
            n_ops += len(rows)
            wire += sum(len(parse_member(m, 0.0).wire) for m in rows)
            usage += int(r.memory_usage(k, samples=0) or 0)
        # the row index: slot hashes P:ri:<table>:<slot> (row index), P:src: (source row
        # copies) and P:rl: (lookup entries) of the sampled slots
        mem: dict[str, tuple[int, int]] = {}
        for kind in ("ri", "src", "rl"):
            used = held = 0
            for i, k in enumerate(r.scan_iter(match=f"{pre}:{kind}:*", count=1000)):
                if i >= sample:
                    break
                used += int(r.memory_usage(k, samples=0) or 0)
                held += int(r.hlen(k))
            mem[kind] = (used, held)
        return {
            "ops_sampled": n_ops,
            "op_wire_bytes": round(wire / max(n_ops, 1), 1),
            "op_bytes_beyond_wire": round((usage - wire) / max(n_ops, 1), 1),
            "rows_sampled": mem["ri"][1],
            "row_index_bytes_per_live_row": round(mem["ri"][0] / max(mem["ri"][1], 1), 1),
            "lookup_entries_bytes_per_row_with_lookups": round(
                mem["rl"][0] / max(mem["rl"][1], 1), 1
            ),
            "source_copy_bytes_per_live_row": round(mem["src"][0] / max(mem["src"][1], 1), 1),
            "rows_with_source_copy": mem["src"][1],
            "redis_used_memory": int(r.info("memory")["used_memory"]),
        }
    finally:
        r.close()


def _plot(timelines: dict[str, list[tuple[float, int]]]) -> Plot:
    return lambda plt: _draw(plt, timelines)


def _draw(plt: Any, timelines: dict[str, list[tuple[float, int]]]) -> None:
    _fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, tl in timelines.items():
        xs, ys = [], []
        j = 0
        for i in range(len(tl)):
            while tl[i][0] - tl[j][0] > 1.0:
                j += 1
            if i > j and tl[i][0] > tl[j][0]:
                xs.append(tl[i][0])
                ys.append((tl[i][1] - tl[j][1]) / (tl[i][0] - tl[j][0]))
        ax.plot(xs, ys, label=label)
    ax.set_xlabel("seconds since the first applied batch")
    ax.set_ylabel("events/s (1 s window)")
    ax.set_title("bucketsync bench ingest: throughput over time")
    ax.grid(alpha=0.3)
    ax.legend()


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# bench ingest: {result['events']:,} events (realistic mix), median of "
        f"{result['runs']} run(s)",
        "",
        f"raw confluent-kafka consume of the same topics: {result['raw_consume_median']:,}/s",
        "",
        "| configuration | events/s | ratio to raw consume | processor CPU µs/event "
        "| Redis CPU µs/event |",
        "|---|---|---|---|---|",
    ]
    for name, c in result["configs"].items():
        lines.append(
            f"| {name} | {c['events_per_s']:,} | {c['ratio_to_raw']:.3f} | "
            f"{c['processor_us_per_event']} | {c['redis_us_per_event']} |"
        )
    m = result.get("memory") or {}
    if m:
        lines += [
            "",
            "| memory | bytes |",
            "|---|---|",
            f"| Redis per op beyond its wire JSON | {m['op_bytes_beyond_wire']} |",
            f"| op wire JSON (mean) | {m['op_wire_bytes']} |",
            f"| row index per live row | {m['row_index_bytes_per_live_row']} |",
            f"| source-row copy per live row (rows kept: {m['rows_with_source_copy']}"
            f"/{m['rows_sampled']}) | {m['source_copy_bytes_per_live_row']} |",
        ]
    return "\n".join(lines) + "\n"


def bench_ingest(
    settings: Settings, events: int, out: str | None, drivers: list[str], runs: int
) -> int:
    """Issue 11's table: events/s per driver and for 2 processors, ratio to a raw consume
    of the same topics, processor and Redis CPU per event, Redis bytes per op and per row.
    The processors run as child processes against a private redis-server (when one is
    installed) so ``INFO cpu`` counts only their work."""
    from bucketsync import stack
    from bucketsync.bench.mix import MIX_RULES, MixFeed

    stack.ensure_up(settings)
    run_id = uuid.uuid4().hex[:8]
    tmp = Path(tempfile.mkdtemp(prefix="bucketsync-bench-"))
    private = private_redis(tmp)
    feed = MixFeed(f"bench-{run_id}")
    topics = [feed.topic(t) for t in MIX_TABLES]
    (tmp / "rules.yaml").write_text(MIX_RULES)
    redis_url = private[1] if private is not None else settings.redis.url
    processor = {"batch_max_events": 5000, "metrics_port": 0, "instance_id": "", "driver": "kafka"}

    def config(name: str) -> tuple[Path, Settings]:
        path = tmp / f"{name}.yaml"
        sections: dict[str, dict[str, Any]] = {
            "kafka": own_topics(topics, f"bench-{run_id}-{name}", f"bench-{run_id}.dead-letter"),
            "redis": {"url": redis_url, "prefix": f"bench-{run_id}-{name}"},
            "compaction": {"interval_s": 0},
            "processor": processor,
        }
        return path, write_config(settings, path, sections, sync_rules=str(tmp / "rules.yaml"))

    _, s = config("setup")
    try:
        ensure_topics(s, [*topics, s.kafka.dead_letter_topic])
        print(f"prefilling {len(topics)} topics with {events:,} Debezium JSON events ...")
        producer = make_producer(s)
        sizes = 0
        t0 = time.perf_counter()
        for table, key, value in feed.events(events):
            sizes += len(key) + len(value)
            while True:
                try:
                    producer.produce(feed.topic(table), key=key, value=value)
                    break
                except BufferError:
                    producer.poll(0.05)
        producer.flush(120)
        produce_s = time.perf_counter() - t0

        raw = [raw_consume_rate(s, topics, events) for _ in range(max(3, runs))]
        raw_med = statistics.median(raw)
        # each driver alone, then two processors of it in one group over the 4 partitions
        plan = [(d, 1) for d in drivers] + [(d, 2) for d in drivers]
        measured: dict[str, list[dict[str, Any]]] = {}
        timelines: dict[str, list[tuple[float, int]]] = {}
        memory: dict[str, Any] = {}
        for i in range(runs):
            for driver, n in plan:
                name = f"{driver} driver" + (f", {n} processors" if n > 1 else "")
                label = f"{driver}-{n}-{i}"
                path, cs = config(label)
                print(f"run {i + 1}/{runs}: {name} ...", flush=True)
                res = _run_processors(path, cs, driver, n, events)
                measured.setdefault(name, []).append(res)
                timelines[f"{name} (run {i + 1})"] = res.pop("timeline")
                if driver == "kafka" and n == 1 and not memory:
                    memory = memory_stats(cs)
                delete_prefixes(cs.redis.url, [cs.redis.prefix])
    finally:
        if private is not None:
            private[0].terminate()
            private[0].wait(20)
    configs = {}
    for name, rs in measured.items():
        rate = statistics.median(x["events_per_s"] for x in rs)
        configs[name] = {
            "events_per_s": round(rate),
            "runs_events_per_s": [round(x["events_per_s"]) for x in rs],
            "ratio_to_raw": round(rate / raw_med, 4),
            "processor_us_per_event": round(
                statistics.median(x["processor_us_per_event"] for x in rs), 1
            ),
            "redis_us_per_event": round(statistics.median(x["redis_us_per_event"] for x in rs), 1),
        }
    result = {
        "benchmark": "ingest",
        "events": events,
        "runs": runs,
        "mix": "Debezium PostgreSQL JSON with schemas, 4 tables (bucketsync/bench/mix.py)",
        "bytes_per_record": round(sizes / events),
        "redis": "private redis-server" if private is not None else "the stack's Redis (shared)",
        "topics": topics,
        "produce_seconds": round(produce_s, 2),
        "raw_consume_events_per_s": [round(x) for x in raw],
        "raw_consume_median": round(raw_med),
        "configs": configs,
        "memory": memory,
    }
    md = _markdown(result)
    print(md)
    write_report(result, result_path(out, "ingest"), md, _plot(timelines))
    return 0
