"""``bucketsync bench compact``.

``--history mix`` (default): a realistic history -- the todo mix of :mod:`bucketsync.bench.mix`
(Debezium JSON with schemas, four tables, rows moving between buckets, deletes) where a few hot
rows take most updates and most rows never change after their insert -- decoded, planned and
applied through the real path, with the scheduled compaction every ``events / 5`` events.
Reports the ops a new client downloads per live row after it, and the rows existing clients
re-download, for several re-append budgets (0 = plain fold only).

``--history uniform``: 1M ops over 100k rows (90% superseded) in one bucket, written through
the real store step, then compacted; with defragmentation it must end at most ``live rows +
1`` ops.
"""

from __future__ import annotations

import asyncio
import random
import resource
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bucketsync.bench.mix import MIX_RULES, MixFeed
from bucketsync.bench.procs import drop_store, private_redis
from bucketsync.bench.report import bar_plot, report_rows, result_path, write_report
from bucketsync.config import Settings
from pipeline import core
from pipeline.cdc import KafkaRecord, decode_record
from pipeline.compaction import (
    CompactionStats,
    compact,
    compact_bucket,
    defragment_bucket,
    scan_ops,
    verify,
)
from pipeline.rules import parse_rules
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


class SkewedMix(MixFeed):
    """The todo mix where ``hot_share`` of the picks go to the first ``hot_rows`` of each table:
    hot rows are updated many times, most other rows never change after their insert."""

    hot_share = 0.8
    hot_rows = 0.05

    delete_share = 0.05

    def _pick(self, n: int) -> int:
        rng = self.rng
        if rng.random() < self.hot_share:
            return rng.randrange(max(1, int(n * self.hot_rows)))
        return rng.randrange(n)


async def _live_and_ops(store: Store) -> tuple[int, int, list[float]]:
    live = total = 0
    ratios = []
    for b in await store.all_buckets():
        puts, ops = await store.live_share(b)
        live += puts
        total += ops
        if puts >= 10:
            ratios.append(ops / puts)
    return live, total, ratios


async def run_mix(
    settings: Settings,
    events: int,
    budget: float | None,
    target: float = 0.0,
    batch: int = 500,
    seed: int = 11,
    schedule: int = 5,
    private: bool = False,
) -> dict[str, Any]:
    """One history; ``budget`` None = full defragmentation at every scheduled run;
    ``private``: ``settings.redis.url`` is the benchmark's own server (slowlog is read)."""
    store = Store.from_url(settings.redis.url, f"bench-compact-{uuid.uuid4().hex[:8]}")
    feed = SkewedMix("bc", users=40, lists=120, todos=4000, comments=2000, tags=200, seed=seed)
    rules = parse_rules(MIX_RULES)
    chunk = settings.compaction.chunk_ops
    every = max(batch, events // schedule // batch * batch)
    stats = CompactionStats()
    redownloaded = 0
    runs = 0
    server_ms: list[float] = []
    shas = {getattr(s, "sha", "") for s in (store._compact, store._defrag, store._defrag_scan)}

    async def scheduled() -> None:
        nonlocal redownloaded, runs
        cp = await store.checkpoint()
        if private:  # the server's own view of each compaction step (a private server)
            await store.r.config_set("slowlog-log-slower-than", 0)
            await store.r.config_set("slowlog-max-len", 1_000_000)
            await store.r.slowlog_reset()
        st = await compact(
            store,
            chunk,
            defragment=budget is None,
            reappend_budget=budget or 0.0,
            reappend_target=target,
            scan_ops=scan_ops(settings),
        )
        runs += 1
        if private:
            for e in await store.r.slowlog_get(1_000_000):
                cmd = e["command"]
                cmd = cmd.decode() if isinstance(cmd, bytes) else str(cmd)
                if any(sha in cmd for sha in shas if sha):
                    server_ms.append(e["duration"] / 1000)
            await store.r.config_set("slowlog-log-slower-than", 10_000)
        stats.rows_reappended += st.rows_reappended
        stats.ops_removed += st.ops_removed
        stats.steps += st.steps
        stats.longest_step_s = max(stats.longest_step_s, st.longest_step_s)
        # a client synced at cp downloads exactly the ops after cp: only the moved rows
        for b in await store.all_buckets():
            redownloaded += len(await store.read_ops(b, cp, 1 << 62, 1 << 30))

    try:
        offset = 0
        gen = feed.events(events)
        while offset < events:
            items = []
            for table, key, value in gen:
                rec = KafkaRecord(feed.topic(table), 0, offset, key, value)
                items.append((rec, decode_record(rec)))
                offset += 1
                if len(items) == batch:
                    break
            if not items:
                break
            keys = sorted({k for r, ev in items for k in core.base_keys(r.topic, ev)})
            stored = await store.source_rows(keys)
            plan = core.plan_batch(items, rules, stored)
            assert not plan.dead_letters, plan.dead_letters[:1]
            res = await store.apply(plan.batch)
            assert res.status == "ok", res
            if offset % every == 0:
                await scheduled()
        if offset % every:
            await scheduled()
        live, total, ratios = await _live_and_ops(store)
        ver = await verify(store)
        ratios.sort()
        return {
            "mode": (
                "full defragment"
                if budget is None
                else "plain fold"
                if not budget and not target
                else f"budget {budget:g}, target {target:g}"
            ),
            "budget": budget,
            "target": target,
            "events": events,
            "scheduled_runs": runs,
            "live_rows": live,
            "new_client_ops": total,
            "ops_per_live_row": round(total / max(1, live), 3),
            "worst_bucket_ops_per_live_row": round(ratios[-1], 2) if ratios else None,
            "rows_reappended": stats.rows_reappended,
            "existing_client_redownloads": redownloaded,
            "reappended_per_live_row": round(stats.rows_reappended / max(1, live), 3),
            "ops_folded": stats.ops_removed,
            "compaction_steps": stats.steps,
            "longest_step_ms": round(stats.longest_step_s * 1000, 2),
            "longest_step_server_ms": round(max(server_ms), 2) if server_ms else None,
            "steps_over_10ms_server": sum(1 for x in server_ms if x > 10) if private else None,
            "p99_step_server_ms": (
                round(sorted(server_ms)[int(0.99 * (len(server_ms) - 1))], 2) if server_ms else None
            ),
            "server_steps": len(server_ms),
            "verify_differences": ver.differences,
        }
    finally:
        keys = [k async for k in store.r.scan_iter(match=f"{store.prefix}:*", count=5000)]
        for i in range(0, len(keys), 1000):
            await store.r.unlink(*keys[i : i + 1000])
        await store.close()


#: (reappend_budget, reappend_target); budget None = full defragmentation
MIX_MODES: tuple[tuple[float | None, float], ...] = (
    (0.0, 0.0),
    (1.0, 0.0),
    (4.0, 0.0),
    (16.0, 0.0),
    (0.0, 1.15),
    (4.0, 1.1),
    (4.0, 1.15),
    (4.0, 1.2),
    (None, 0.0),
)


def _plot_mix(plt: Any, results: list[dict[str, Any]]) -> None:
    labels = [str(r["mode"]).replace(", ", "\n") for r in results]
    _fig, ax = plt.subplots(1, 2, figsize=(14, 5))
    ax[0].bar(labels, [r["ops_per_live_row"] for r in results])
    ax[0].axhline(1.2, color="red", linestyle="--", label="goal <= 1.2")
    ax[0].set_title("ops a new client downloads per live row")
    ax[0].tick_params(axis="x", labelsize=7)
    ax[0].legend()
    ax[1].bar(labels, [r["reappended_per_live_row"] for r in results], color="tab:orange")
    ax[1].set_title("rows re-appended (all runs) per live row")
    ax[1].tick_params(axis="x", labelsize=7)


def bench_compact_mix(settings: Settings, out: str | None, events: int) -> int:
    import tempfile

    c = settings.compaction
    with tempfile.TemporaryDirectory(prefix="bench-compact-") as tmp:
        own = private_redis(Path(tmp))
        private = own is not None
        if own is not None:
            settings = settings.model_copy(
                update={"redis": settings.redis.model_copy(update={"url": own[1]})}
            )
        try:
            results = [
                asyncio.run(run_mix(settings, events, b, t, private=private)) for b, t in MIX_MODES
            ]
            # one scheduled run at the end of the history (as a deployment's first compaction)
            once = [
                asyncio.run(run_mix(settings, events, b, t, schedule=1, private=private))
                for b, t in ((0.0, 0.0), (c.reappend_budget, c.reappend_target), (None, 0.0))
            ]
        finally:
            if own is not None:
                own[0].terminate()
                own[0].wait()
    default = (c.reappend_budget, c.reappend_target)
    head = (
        "| mode | live rows | new-client ops | ops / live row | worst bucket "
        "| rows re-appended | existing-client re-downloads | folded "
        "| compaction steps | p99 / longest step ms (server) |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )

    def row(r: dict[str, Any], mode: str) -> str:
        return (
            f"| {mode} | {r['live_rows']:,} | {r['new_client_ops']:,} | {r['ops_per_live_row']} "
            f"| {r['worst_bucket_ops_per_live_row']} | {r['rows_reappended']:,} "
            f"| {r['existing_client_redownloads']:,} | {r['ops_folded']:,} "
            f"| {r['server_steps']:,} | {r['p99_step_server_ms']} / {r['longest_step_server_ms']} |"
        )

    lines = [
        row(r, f"{r['mode']}{' (default)' if (r['budget'], r['target']) == default else ''}")
        for r in results
    ]
    lines_once = [row(r, r["mode"]) for r in once]
    md = (
        f"# bench compact --history mix ({events:,} events)\n\n"
        f"`python3 -m bucketsync.cli bench compact --events {events}` (private redis-server; "
        "default config: chunk_ops "
        f"{c.chunk_ops}, reappend_budget {c.reappend_budget:g}, reappend_target "
        f"{c.reappend_target:g}). The todo mix of `bucketsync/bench/mix.py` (four tables, "
        "MIX_RULES) where 80% of the picks go to 5% of the rows: hot rows are updated many "
        "times, most rows never change after their insert. `plain fold` is the compaction "
        "before the re-append; `new-client ops` is what a fresh client downloads (all "
        "buckets); `existing-client re-downloads` counts, over every run, the ops after the "
        "checkpoint a fully synced client held just before that run (exactly the moved rows). "
        "Step times are the server's (SLOWLOG) on a shared 2-core machine.\n\n"
        f"## Scheduled compaction every {max(500, events // 5 // 500 * 500):,} events (5 runs)\n\n"
        + head
        + "\n".join(lines)
        + "\n\n## One scheduled compaction at the end of the history\n\n"
        + head
        + "\n".join(lines_once)
        + "\n"
    )
    print(md)
    res = {"benchmark": "compact", "history": "mix", "results": results, "one_run": once}
    write_report(res, result_path(out, "compact-mix"), md, lambda plt: _plot_mix(plt, results))
    ok = all(not r["verify_differences"] for r in results + once) and all(
        r["existing_client_redownloads"] == r["rows_reappended"] for r in results + once
    )
    return 0 if ok else 1


def bench_compact(
    settings: Settings,
    out: str | None,
    ops: int = 1_000_000,
    rows: int = 100_000,
    history: str = "mix",
    events: int | None = None,
) -> int:
    if history == "mix":
        return bench_compact_mix(settings, out, events or 30_000)
    if events is not None:  # --events N: N ops over N/10 rows (default 1M over 100k)
        ops, rows = events, max(1, events // 10)
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
