"""A SIGKILLed processor: its restart takes the partitions back at once (static group
membership), a second processor takes over a dead one's partitions, and nothing is lost
(every bucket equals the reference model). Timings are measured by `bucketsync bench
recovery`; the one bound asserted here is functional: with a 30 s session timeout, a
restart that resumes within 15 s did not wait for the dead member to expire."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.pipeline_helpers import produce
from tests.processes import (
    applied_offsets,
    drop_prefix,
    end_offsets,
    start_processor,
    stop,
    wait_applied,
    write_config,
)
from tests.test_backlog import TABLES, _setup, assert_matches_model

pytestmark = pytest.mark.stack


def _wait_applying(r: redis.Redis, prefix: str, timeout: float = 90) -> int:
    """Wait until batches are being applied back to back (offsets moved twice in a row)."""
    deadline = time.monotonic() + timeout
    last, moves = sum(applied_offsets(r, prefix).values()), 0
    while time.monotonic() < deadline:
        cur = sum(applied_offsets(r, prefix).values())
        if cur != last:
            moves, last = moves + 1, cur
            if moves >= 2:
                return cur
        time.sleep(0.002)
    raise AssertionError("the processor never applied two batches in a row")


@pytest.mark.parametrize("driver", ["kafka", "faust"])
def test_sigkill_while_applying_restart_resumes_without_waiting_for_the_session(
    driver: str, make_settings: Any, create_topic: Any, ns: Any, tmp_path: Path
) -> None:
    _topics, s, model, ends = _setup(make_settings, create_topic, ns, tmp_path, 11)
    cfg = write_config(
        tmp_path,
        s,
        "proc",
        processor={"batch_max_events": 300, "session_timeout_ms": 30_000, "metrics_port": 0},
    )
    r = redis.Redis.from_url(s.redis.url)
    try:
        a = start_processor(cfg, driver)
        try:
            at_kill = _wait_applying(r, s.redis.prefix)
        finally:
            # right after a batch landed: the next one is being planned or applied
            a.send_signal(signal.SIGKILL)
            a.wait(10)
        assert at_kill < sum(ends.values()), "the backlog was done before the kill"
        b = start_processor(cfg, driver)
        t0 = time.monotonic()
        try:
            while sum(applied_offsets(r, s.redis.prefix).values()) <= at_kill:
                assert time.monotonic() - t0 < 60, "the restarted processor applied nothing"
                assert b.poll() is None
                time.sleep(0.01)
            resumed_s = time.monotonic() - t0
            wait_applied(r, s.redis.prefix, ends, timeout=120, proc=b)
        finally:
            stop(b)
        print(f"{driver}: restart resumed applying {resumed_s:.2f}s after its start")
        assert resumed_s < 15, f"restart waited {resumed_s:.1f}s: the session timeout is 30 s"
        assert_matches_model(s, model)
    finally:
        drop_prefix(r, s.redis.prefix)
        r.close()


@pytest.mark.parametrize("driver", ["kafka", "faust"])
def test_second_processor_takes_over_a_dead_ones_partitions(
    driver: str, make_settings: Any, create_topic: Any, ns: Any, tmp_path: Path
) -> None:
    later: list[dict[str, list[tuple[bytes, bytes | None]]]] = []
    topics, s, model, _ = _setup(make_settings, create_topic, ns, tmp_path, 12, held_back=later)
    cfg = write_config(tmp_path, s, "proc", processor={"batch_max_events": 50, "metrics_port": 0})
    r = redis.Redis.from_url(s.redis.url)
    try:
        a = start_processor(cfg, driver)
        b = start_processor(cfg, driver)
        try:
            first = end_offsets(
                s.kafka.bootstrap_servers, [(topics[t], n) for t, n in TABLES.items()]
            )
            wait_applied(r, s.redis.prefix, first, timeout=120, proc=a)
            time.sleep(2)  # both members hold partitions by now
            a.send_signal(signal.SIGKILL)
            a.wait(10)
            # the second half arrives after the death: b must take a's partitions
            for topic, msgs in later[0].items():
                produce(s.kafka.bootstrap_servers, topic, msgs)
            ends = end_offsets(
                s.kafka.bootstrap_servers, [(topics[t], n) for t, n in TABLES.items()]
            )
            wait_applied(r, s.redis.prefix, ends, timeout=120, proc=b)
        finally:
            stop(a)
            stop(b)
        assert_matches_model(s, model)
    finally:
        drop_prefix(r, s.redis.prefix)
        r.close()
