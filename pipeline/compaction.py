"""Compaction and verification of bucket op logs (sync-protocol.md §7).

Online MOVE happens in the write path (``apply_batch.lua``). This module folds
the leading MOVE/REMOVE/CLEAR run of each marked bucket into one CLEAR, one
bounded atomic step at a time, and verifies running totals against the logs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import orjson
from prometheus_client import Counter, Histogram

from bucketsync.config import Settings
from pipeline.store import Store

log = logging.getLogger("bucketsync.compaction")

OPS_REMOVED = Counter("bucketsync_compaction_ops_removed_total", "Ops folded away by compaction")
BYTES_FREED = Counter("bucketsync_compaction_bytes_freed_total", "Op bytes freed by compaction")
RUN_SECONDS = Histogram("bucketsync_compaction_run_seconds", "Duration of one compaction run")
STEP_SECONDS = Histogram(
    "bucketsync_compaction_step_seconds",
    "Duration of one atomic compaction step",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
)


@dataclass
class CompactionStats:
    buckets: int = 0
    ops_removed: int = 0
    bytes_freed: int = 0
    steps: int = 0
    longest_step_s: float = 0.0
    duration_s: float = 0.0
    rows_reappended: int = 0
    longest_fold_step_s: float = 0.0
    longest_defrag_step_s: float = 0.0

    def add(self, folded: int, freed: int, step_s: float) -> None:
        self.ops_removed += folded
        self.bytes_freed += freed
        self.steps += 1
        self.longest_step_s = max(self.longest_step_s, step_s)
        self.longest_fold_step_s = max(self.longest_fold_step_s, step_s)
        OPS_REMOVED.inc(folded)
        BYTES_FREED.inc(max(0, freed))
        STEP_SECONDS.observe(step_s)


async def compact_bucket(store: Store, bucket: str, chunk: int, stats: CompactionStats) -> None:
    while True:
        step = await store.compact_step(bucket, chunk)
        stats.add(step.folded, step.bytes_freed, step.seconds)
        if not step.more or step.folded == 0:
            return


async def defragment_bucket(store: Store, bucket: str, chunk: int, stats: CompactionStats) -> int:
    """Re-append the bucket's live PUTs at its end so compaction can fold what was before."""
    cutoff = (await store.bucket_state(bucket)).last_op
    cursor, moved = 0, 0
    # re-appending a PUT costs several writes, so a defrag step takes a fifth of the ops
    chunk = max(1, chunk // 5)
    while True:
        step = await store.defrag_step(bucket, chunk, cursor, cutoff)
        cursor = step.cursor
        moved += step.moved
        stats.steps += 1
        stats.longest_step_s = max(stats.longest_step_s, step.seconds)
        stats.longest_defrag_step_s = max(stats.longest_defrag_step_s, step.seconds)
        STEP_SECONDS.observe(step.seconds)
        if step.done:
            stats.rows_reappended += moved
            return moved


async def compact(
    store: Store,
    chunk: int,
    *,
    bucket: str | None = None,
    every_bucket: bool = False,
    progress: bool = False,
    defragment: bool = False,
    defragment_threshold: float | None = None,
) -> CompactionStats:
    """Compact one bucket, every bucket, or (default) the buckets marked since last time."""
    t0 = time.perf_counter()
    stats = CompactionStats()
    if bucket is not None:
        targets = [bucket]
    elif every_bucket:
        targets = await store.all_buckets()
    else:
        targets = await store.dirty_buckets()
    if progress:
        from rich.progress import Progress

        with Progress(transient=False) as bar:
            task = bar.add_task("compacting", total=len(targets))
            for b in targets:
                await _one(store, b, chunk, stats, defragment, defragment_threshold)
                bar.advance(task)
    else:
        for b in targets:
            await _one(store, b, chunk, stats, defragment, defragment_threshold)
    stats.duration_s = time.perf_counter() - t0
    RUN_SECONDS.observe(stats.duration_s)
    return stats


async def _one(
    store: Store,
    bucket: str,
    chunk: int,
    stats: CompactionStats,
    defragment: bool,
    threshold: float | None,
) -> None:
    # unmark first: MOVEs written while we work mark the bucket again
    await store.take_dirty(bucket)
    await compact_bucket(store, bucket, chunk, stats)
    if not defragment and threshold is not None:
        puts, total = await store.live_share(bucket)
        defragment = total > 1 and (total - puts) / total >= threshold
    if defragment:
        await defragment_bucket(store, bucket, chunk, stats)
        await store.take_dirty(bucket)
        await compact_bucket(store, bucket, chunk, stats)
    stats.buckets += 1


@dataclass
class VerifyResult:
    checked: int = 0
    differences: list[str] = field(default_factory=list)


async def verify(store: Store, bucket: str | None = None) -> VerifyResult:
    """Recompute each bucket's checksum and count from its log and compare with the totals.

    Runs against a live store: each bucket is read in one atomic step.
    """
    res = VerifyResult()
    targets = [bucket] if bucket else await store.all_buckets()
    for b in targets:
        ops, state = await store.snapshot_bucket(b)
        total = 0
        for o in ops:
            total += int(orjson.loads(o.wire)["checksum"])
        total %= 1 << 32
        res.checked += 1
        if total != state.checksum or len(ops) != state.count:
            res.differences.append(
                f"{b}: stored checksum={state.checksum} count={state.count}, "
                f"log checksum={total} count={len(ops)}"
            )
        last = ops[-1].op_id if ops else 0
        if ops and last != state.last_op:
            res.differences.append(f"{b}: stored last_op={state.last_op}, log last op={last}")
    return res


async def schedule(settings: Settings, store: Store, stop: asyncio.Event) -> None:
    """The periodic job inside the processor and ``bucketsync run``."""
    interval = settings.compaction.interval_s
    if interval <= 0:
        return
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), interval)
            return
        except TimeoutError:
            pass
        try:
            st = await compact(
                store,
                settings.compaction.chunk_ops,
                defragment_threshold=settings.compaction.defragment_threshold,
            )
            if st.ops_removed:
                log.info(
                    "compaction: %d buckets, %d ops removed, %d bytes freed, longest step %.1f ms",
                    st.buckets,
                    st.ops_removed,
                    st.bytes_freed,
                    st.longest_step_s * 1000,
                )
        except Exception:
            log.exception("compaction run failed; retrying next interval")


def _store(settings: Settings) -> Store:
    return Store.from_settings(settings)


def main(
    settings: Settings,
    *,
    bucket: str | None = None,
    every_bucket: bool = False,
    defragment: bool = False,
) -> int:
    """``bucketsync compact [--bucket B | --all] [--defragment]``."""

    async def go() -> int:
        store = _store(settings)
        try:
            st = await compact(
                store,
                settings.compaction.chunk_ops,
                bucket=bucket,
                every_bucket=every_bucket,
                progress=True,
                defragment=defragment,
                defragment_threshold=settings.compaction.defragment_threshold,
            )
        finally:
            await store.close()
        print(
            f"compacted {st.buckets} bucket(s): {st.ops_removed} ops removed, "
            f"{st.bytes_freed} bytes freed, {st.rows_reappended} rows re-appended, "
            f"{st.steps} steps, longest step "
            f"{st.longest_step_s * 1000:.2f} ms, {st.duration_s:.2f} s"
        )
        return 0

    return asyncio.run(go())


def verify_main(settings: Settings, *, bucket: str | None = None) -> int:
    """``bucketsync verify [--bucket B]``: exit code 1 when a bucket differs."""

    async def go() -> int:
        store = _store(settings)
        try:
            res = await verify(store, bucket)
        finally:
            await store.close()
        for d in res.differences:
            print(d)
        print(f"verified {res.checked} bucket(s): {len(res.differences)} difference(s)")
        return 1 if res.differences else 0

    return asyncio.run(go())
