"""``bench ingest``'s measuring window (pure): from the first applied batch to the last event,
or from the processors' start when one batch held every event (``--events 2000`` divided by
zero before)."""

from __future__ import annotations

import math

import pytest

from bucketsync.bench.ingest import Sample, per_event


def test_window_starts_at_the_first_applied_batch() -> None:
    spawned = Sample(t=0.0, done=0, cpu_s=0.0, redis_cpu_s=1.0)
    first = Sample(t=2.0, done=1000, cpu_s=0.5, redis_cpu_s=1.1)
    last = Sample(t=4.0, done=5000, cpu_s=2.5, redis_cpu_s=1.5)
    got = per_event(spawned, first, last)
    # 4,000 events in 2 s; 2 CPU s and 0.4 Redis CPU s over those 4,000 events
    assert got["events_per_s"] == pytest.approx(2000.0)
    assert got["processor_us_per_event"] == pytest.approx(500.0)
    assert got["redis_us_per_event"] == pytest.approx(100.0)


def test_a_run_applied_in_one_batch_counts_from_the_start() -> None:
    spawned = Sample(t=10.0, done=0, cpu_s=0.0, redis_cpu_s=3.0)
    first = last = Sample(t=12.0, done=2000, cpu_s=1.0, redis_cpu_s=3.2)
    got = per_event(spawned, first, last)
    assert got["events_per_s"] == pytest.approx(1000.0)
    assert got["processor_us_per_event"] == pytest.approx(500.0)
    assert got["redis_us_per_event"] == pytest.approx(100.0)
    assert not any(math.isnan(v) for v in got.values())
