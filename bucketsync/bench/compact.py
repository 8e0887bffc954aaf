"""``bucketsync bench compact``: 1M ops over 100k rows (90% superseded) in one bucket.

The bucket is written through the real store step (the same Lua as the processor),
then compacted; with defragmentation it must end at most ``live rows + 1`` ops.
"""

from __future__ import annotations

import asyncio
import random
import resource
import time
import uuid
from dataclasses import dataclass
from typing import Any

from bucketsync.bench.procs import drop_store
from bucketsync.bench.report import bar_plot, report_rows
from bucketsync.config import Settings
from pipeline import core
from pipeline.compaction import CompactionStats, compact_bucket, defragment_bucket, verify
from pipeline.store import BatchEvent, PlannedBatch, Store, row_change

BUCKET = "bench_all[]"


@dataclass
class _Out:
    bucket: str
    object_type: str
    object_id: str
    data: str


async def fill(store: Store, ops: int, rows: int, batch: int = 5000, seed: int = 11) -> None:
    rng = random.Random(seed)
    from rich.progress import Progress

    written = 0
    version = 0
    with Progress() as bar:
        task = bar.add_task(f"writing {ops:,} ops over {rows:,} rows", total=ops)
        # every row once, then random updates: 90% of the ops end up superseded
        order = list(range(rows)) + [rng.randrange(rows) for _ in range(ops - rows)]
        for start in range(0, ops, batch):
            events: list[BatchEvent] = []
            for rid in order[start : start + batch]:
                version += 1
                data = f'{{"id":"r{rid}","v":{version},"pad":"{"x" * 40}"}}'
                out = _Out(BUCKET, "items", f"r{rid}", data)
                events.append(
                    row_change(f"bench{core.SEP}{rid}", "bench", [core.output_entry(out)], False)
                )
            await store.apply(
                PlannedBatch(events, {"bench/0": start}, {"bench/0": start + len(events) - 1})
            )
            written += len(events)
            bar.update(task, completed=written)


async def wire_bytes(store: Store, bucket: str) -> int:
    return sum(len(o.wire) for o in await store.all_ops(bucket))


async def run(settings: Settings, ops: int, rows: int) -> dict[str, Any]:
    store = Store.from_settings(settings, prefix=f"bench-compact-{uuid.uuid4().hex[:8]}")
    try:
        await fill(store, ops, rows)
        before = await store.bucket_state(BUCKET)
        bytes_before = await wire_bytes(store, BUCKET)
        info0 = await store.r.info("memory")
        stats = CompactionStats()
        # the server's own view of the longest step: every script slower than 1 ms
        old_slow = (await store.r.config_get("slowlog-log-slower-than"))["slowlog-log-slower-than"]
        await store.r.config_set("slowlog-log-slower-than", 1000)
        await store.r.slowlog_reset()
        t0 = time.perf_counter()
        await compact_bucket(store, BUCKET, settings.compaction.chunk_ops, stats)
        plain_count = (await store.bucket_state(BUCKET)).count
        await defragment_bucket(store, BUCKET, settings.compaction.chunk_ops, stats)
        await compact_bucket(store, BUCKET, settings.compaction.chunk_ops, stats)
        duration = time.perf_counter() - t0
        slow = await store.r.slowlog_get(10_000)
        await store.r.config_set("slowlog-log-slower-than", old_slow)
        server_max_ms = max((e["duration"] for e in slow), default=0) / 1000
        server_over_10ms = sum(1 for e in slow if e["duration"] > 10_000)
        after = await store.bucket_state(BUCKET)
        bytes_after = await wire_bytes(store, BUCKET)
        info1 = await store.r.info("memory")
        ver = await verify(store, BUCKET)
        return {
            "benchmark": "compact",
            "ops_before": before.count,
            "rows": rows,
            "ops_after_fold_only": plain_count,
            "ops_after_defragment_and_fold": after.count,
            "goal_ops_at_most": rows + 1,
            "goal_met": after.count <= rows + 1,
            "rows_reappended": stats.rows_reappended,
            "duration_s": round(duration, 2),
            "steps": stats.steps,
            "longest_step_ms": round(stats.longest_step_s * 1000, 2),
            "longest_step_server_ms": round(server_max_ms, 2),
            "steps_over_10ms_server": server_over_10ms,
            "longest_fold_step_ms": round(stats.longest_fold_step_s * 1000, 2),
            "longest_defrag_step_ms": round(stats.longest_defrag_step_s * 1000, 2),
            "chunk_ops": settings.compaction.chunk_ops,
            "new_client_download_bytes_before": bytes_before,
            "new_client_download_bytes_after": bytes_after,
            "redis_used_memory_before": info0["used_memory"],
            "redis_used_memory_after": info1["used_memory"],
            "bench_process_peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "verify_differences": ver.differences,
        }
    finally:
        await drop_store(store)


def bench_compact(
    settings: Settings, out: str | None, ops: int = 1_000_000, rows: int = 100_000
) -> int:
    res = asyncio.run(run(settings, ops, rows))
    title = f"bench compact: {res['ops_before']:,} ops over {rows:,} rows"
    table = [
        ("ops after fold only", f"{res['ops_after_fold_only']:,}"),
        (
            "ops after defragment + fold",
            f"{res['ops_after_defragment_and_fold']:,} (goal <= {rows + 1:,})",
        ),
        ("duration", f"{res['duration_s']} s"),
        (
            "longest single Redis step (server / client)",
            f"{res['longest_step_server_ms']} / {res['longest_step_ms']} ms",
        ),
        ("steps over 10 ms (server)", str(res["steps_over_10ms_server"])),
        (
            "longest fold / defrag step",
            f"{res['longest_fold_step_ms']} / {res['longest_defrag_step_ms']} ms",
        ),
        ("new-client download before", f"{res['new_client_download_bytes_before']:,} B"),
        ("new-client download after", f"{res['new_client_download_bytes_after']:,} B"),
        (
            "Redis used memory before/after",
            f"{res['redis_used_memory_before']:,} / {res['redis_used_memory_after']:,} B",
        ),
        ("verify differences", str(len(res["verify_differences"]))),
    ]
    counts = {
        "before": res["ops_before"],
        "after fold only": res["ops_after_fold_only"],
        "after defragment + fold": res["ops_after_defragment_and_fold"],
    }
    report_rows(res, out, "compact", title, table, bar_plot(title, "ops in the bucket", counts))
    return 0 if res["goal_met"] and not res["verify_differences"] else 1
