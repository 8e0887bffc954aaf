"""Micro-benchmark: ``python -m pipeline.cdc.bench [n]``."""

from __future__ import annotations

import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.cdc.decode import decode_record
from pipeline.cdc.record import KafkaRecord

__all__ = ["bench_decode", "load_fixture"]

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


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    print(f"{bench_decode(count):,.0f} events/s")
