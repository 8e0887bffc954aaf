"""Micro-benchmarks: ``python -m pipeline.cdc.bench [n]`` (fixture 02, events/s) and
``python -m pipeline.cdc.bench --mix [n]`` (the realistic mix, CPU µs per record)."""

from __future__ import annotations

import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.cdc.decode import decode_record
from pipeline.cdc.record import KafkaRecord

__all__ = ["bench_decode", "bench_decode_mix", "load_fixture"]

FIXTURE_DIR = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "cdc"


def load_fixture(path: str | Path) -> KafkaRecord:
    """A fixture file (tests/fixtures/cdc/README.md "Record file format") as a record."""
    d: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))

    def raw(field: str) -> bytes | None:
        s = d.get(field)
        if s is None:
            return None
        if d.get(field + "_encoding") == "base64":
            return base64.b64decode(s)
        return str(s).encode("utf-8")

    headers = tuple(
        (str(h["key"]), None if h.get("value") is None else str(h["value"]).encode("utf-8"))
        for h in d.get("headers") or ()
    )
    return KafkaRecord(
        topic=d["topic"],
        partition=int(d["partition"]),
        offset=int(d["offset"]),
        key=raw("key"),
        value=raw("value"),
        headers=headers,
        timestamp_ms=d.get("timestamp_ms"),
    )


def bench_decode(n: int = 100_000, record: KafkaRecord | None = None) -> float:
    """Decode fixture 02 (schema-embedded JSON insert) ``n`` times; returns events/s."""
    rec = record or load_fixture(FIXTURE_DIR / "02-pg-schema-create.json")
    decode_record(rec)  # warm the plan cache
    start = time.perf_counter()
    for _ in range(n):
        decode_record(rec)
    elapsed = time.perf_counter() - start
    return n / elapsed if elapsed > 0 else float("inf")


def bench_decode_mix(n: int = 20_000, repeats: int = 5) -> float:
    """CPU microseconds per record to decode the realistic mix of ``bench ingest``
    (:mod:`bucketsync.bench_mix`: Debezium JSON with schemas, four tables, ~2.1 KB a value);
    the best of ``repeats`` passes over ``n`` records, in process CPU time (other load on the
    machine barely moves it)."""
    from bucketsync.bench_mix import MixFeed

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
