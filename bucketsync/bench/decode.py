"""Micro-benchmarks of the pure decoder: ``python -m bucketsync.bench.decode [n]`` (one
record, events/s) and ``python -m bucketsync.bench.decode --mix [n]`` (the realistic mix,
CPU µs per record).

The record is one schema-embedded Debezium PostgreSQL JSON insert from the bench mix
(:class:`bucketsync.bench.mix.MixFeed`), so the benchmark needs no test fixtures.
"""

from __future__ import annotations

import sys
import time

from bucketsync.bench.mix import MixFeed
from pipeline.cdc.decode import decode_record
from pipeline.cdc.record import KafkaRecord

__all__ = ["bench_decode", "bench_decode_mix", "sample_record"]


def sample_record() -> KafkaRecord:
    """One schema-embedded JSON insert of the ``todos`` table."""
    feed = MixFeed("bench-decode")
    for table, key, value in feed.events(10_000):
        if table == "todos":
            return KafkaRecord(topic=feed.topic(table), partition=0, offset=0, key=key, value=value)
    raise RuntimeError("the bench mix produced no todos insert")


def bench_decode(n: int = 100_000, record: KafkaRecord | None = None) -> float:
    """Decode one record ``n`` times; returns events/s."""
    rec = record or sample_record()
    decode_record(rec)  # warm the plan cache
    start = time.perf_counter()
    for _ in range(n):
        decode_record(rec)
    elapsed = time.perf_counter() - start
    return n / elapsed if elapsed > 0 else float("inf")


def bench_decode_mix(n: int = 20_000, repeats: int = 5) -> float:
    """CPU microseconds per record to decode the realistic mix of ``bench ingest``
    (:mod:`bucketsync.bench.mix`: Debezium JSON with schemas, four tables, ~2.1 KB a value);
    the best of ``repeats`` passes over ``n`` records, in process CPU time (other load on the
    machine barely moves it)."""
    feed = MixFeed("bm", seed=3)
    recs = [KafkaRecord(feed.topic(t), 0, i, k, v) for i, (t, k, v) in enumerate(feed.events(n))]
    for r in recs[:500]:
        decode_record(r)  # warm the plan caches
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        for r in recs:
            decode_record(r)
        best = min(best, time.process_time() - t0)
    return best / len(recs) * 1e6


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--mix":
        count = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
        print(f"{bench_decode_mix(count):.2f} us/record (realistic mix, CPU time)")
    else:
        count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
        print(f"{bench_decode(count):,.0f} events/s")
