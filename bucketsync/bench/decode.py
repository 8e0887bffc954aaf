"""Micro-benchmark of the pure decoder: ``python -m bucketsync.bench.decode [n]``.

The record is one schema-embedded Debezium PostgreSQL JSON insert from the bench mix
(:class:`bucketsync.bench.mix.MixFeed`), so the benchmark needs no test fixtures.
"""

from __future__ import annotations

import sys
import time

from bucketsync.bench.mix import MixFeed
from pipeline.cdc.decode import decode_record
from pipeline.cdc.record import KafkaRecord

__all__ = ["bench_decode", "sample_record"]


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


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    print(f"{bench_decode(count):,.0f} events/s")
