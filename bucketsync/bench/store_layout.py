"""Redis cost of the bucket-state layout, on a private redis-server (no other clients), for
before/after comparisons of store changes on a shared, loaded machine.

Measures the CPU time the redis-server process spends (from /proc, so other processes'
load inflates it far less than wall time):

- ``read``: one sync request's atomic read for a user with 1,000 memberships (checkpoint,
  1,000 bucket states, lookup rows; what ``bucketsync bench lookups`` times end to end),
  per read, and the request's wall time (``BucketResolver.resolve``, warm);
- ``apply``: one apply step (``Store.apply``) of 500 todo upserts spread over ``--buckets``
  buckets, per batch.

``bucketsync bench store-layout [--buckets N]`` measures both (to compare with an older
commit, export it with ``git archive`` and run the same command from there).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bucketsync.bench import lookups as bl
from bucketsync.bench.procs import cpu_seconds, private_redis, stop
from bucketsync.bench.report import bar_plot, report_rows
from bucketsync.errors import UserError
from gateway.buckets import BucketResolver
from pipeline import core
from pipeline.cdc import KafkaRecord
from pipeline.rules import parse_rules
from pipeline.store import Store

APPLY_RULES = """
bucket_definitions:
  by_list:
    parameters: SELECT request.jwt() ->> 'l' AS list_id
    data:
      - SELECT id, list_id, title FROM todos WHERE list_id = bucket.list_id
"""


async def _read(url: str, pid: int, requests: int) -> dict[str, Any]:
    store = Store.from_url(url, f"layout-{uuid.uuid4().hex[:8]}")
    rules = parse_rules(bl.RULES)
    n = 1000
    await bl._apply(store, rules, [bl._member(i, "heavy", f"L{i}") for i in range(n)], bl._MT)
    await bl._apply(store, rules, [bl._todo(i, f"L{i}") for i in range(n)], bl._TT)
    r = BucketResolver(
        rules,
        {"sub": "heavy"},
        {},
        include_defaults=True,
        max_buckets=n + 10,
        max_parameter_results=n + 10,
    )
    await r.resolve(store)
    c0 = cpu_seconds(pid)
    times = []
    for _ in range(requests):
        t0 = time.perf_counter()
        await r.resolve(store)
        times.append(time.perf_counter() - t0)
    c1 = cpu_seconds(pid)
    await store.close()
    return {
        "what": "read",
        "requests": requests,
        "redis_cpu_ms_per_read": round((c1 - c0) * 1000 / requests, 3),
        "request_ms_median": round(statistics.median(times) * 1000, 3),
    }


async def _apply(url: str, pid: int, buckets: int, batches: int) -> dict[str, Any]:
    store = Store.from_url(url, f"layout-{uuid.uuid4().hex[:8]}")
    rules = parse_rules(APPLY_RULES)
    off = 0
    plans = []
    for _ in range(batches + 1):
        items = []
        for _ in range(500):
            off += 1
            ev = bl._todo(off, f"L{off % buckets}")
            items.append((KafkaRecord(bl._TT, 0, off, b"", b""), ev))
        plans.append(core.plan_batch(items, rules, {}).batch)
    await store.apply(plans[0])
    c0 = cpu_seconds(pid)
    for p in plans[1:]:
        assert (await store.apply(p)).status == "ok"
    c1 = cpu_seconds(pid)
    await store.close()
    return {
        "what": "apply",
        "buckets": buckets,
        "batches": batches,
        "redis_cpu_ms_per_batch": round((c1 - c0) * 1000 / batches, 3),
    }


def main(
    *, requests: int = 400, buckets: int = 20, batches: int = 40, out: str | None = None
) -> int:
    """``bucketsync bench store-layout``: the read and the apply measurement, one report."""
    with tempfile.TemporaryDirectory() as tmp:
        own = private_redis(Path(tmp))
        if own is None:
            raise UserError("redis-server is not installed")
        proc, url = own
        try:
            read = asyncio.run(_read(url, proc.pid, requests))
            apply = asyncio.run(_apply(url, proc.pid, buckets, batches))
        finally:
            stop(proc)
    result = {"benchmark": "store-layout", "read": read, "apply": apply}
    rows = [(f"read: {k}", str(v)) for k, v in read.items() if k != "what"]
    rows += [(f"apply: {k}", str(v)) for k, v in apply.items() if k != "what"]
    cpu = {
        "one bucket-set resolve (read)": float(read["redis_cpu_ms_per_read"]),
        f"one batch of 500 upserts over {buckets} buckets": float(apply["redis_cpu_ms_per_batch"]),
    }
    plot = bar_plot("bench store-layout: Redis CPU", "Redis CPU ms", cpu)
    report_rows(
        result, out, "store-layout", "bench store-layout (private redis-server)", rows, plot
    )
    return 0
