"""Compaction and verification of bucket op logs (sync-protocol.md §7).

Online MOVE happens in the write path (``pipeline/rowindex.py``). This module folds
the leading MOVE/REMOVE/CLEAR run of each marked bucket into one CLEAR, one
bounded atomic step at a time, and verifies running totals against the logs.

A live row at a bucket's head blocks the fold of everything behind it. The scheduled
compaction therefore re-appends the few live rows that block a long foldable run
(:func:`plan_reappend`: each row moved must pay for itself with ``reappend_budget``
folded ops), then folds; existing clients re-download only the rows it moved.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson
from prometheus_client import Counter, Histogram
from redis import exceptions as redis_exceptions

from bucketsync.config import Settings
from bucketsync.errors import UserError
from pipeline.store import Store, StoreLayoutMismatch, check_layout

log = logging.getLogger("bucketsync.compaction")

OPS_REMOVED = Counter("bucketsync_compaction_ops_removed_total", "Ops folded away by compaction")
BYTES_FREED = Counter("bucketsync_compaction_bytes_freed_total", "Op bytes freed by compaction")
REAPPENDED = Counter(
    "bucketsync_compaction_rows_reappended_total",
    "Live rows re-appended by compaction (existing clients download them again)",
)
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
    """Re-append all of the bucket's live PUTs at its end so compaction can fold what was before."""
    cutoff = (await store.bucket_state(bucket)).last_op
    return await reappend_bucket(store, bucket, cutoff, chunk, stats)


@dataclass(frozen=True, slots=True)
class ReappendPlan:
    """Re-append the live PUTs with op_id <= ``cutoff``; then ``folded`` more ops fold."""

    cutoff: int
    moved: int
    folded: int


def plan_reappend(
    runs: Sequence[tuple[bool, int, int]], budget: float, target: float = 0.0
) -> ReappendPlan | None:
    """The log prefix whose live rows are worth re-appending (pure).

    ``runs`` is the bucket's log in op order, run-length encoded as (live PUT?, length, last
    op_id). Re-appending the live PUTs of a prefix ending in a foldable run lets the whole
    prefix fold: a new client downloads ``folded`` fewer ops (the moved rows come back at the
    end) and an existing one re-downloads ``moved`` rows.

    * ``budget``: the prefix maximising ``folded - budget * moved`` (every run of moved rows
      pays ``budget`` folded ops per row);
    * ``target`` (ops per live row, 0 = none): when the bucket holds more than ``target`` ops
      per live row and the budget's prefix leaves it above, the shortest prefix that brings
      it to ``target`` instead (the fewest rows moved that reach it); where no prefix can
      (small buckets: the CLEAR alone is one op), the prefix that folds the most while each
      moved row still folds at least one op, when that folds more than the budget's.

    ``None`` when nothing is worth moving (a prefix without live rows folds without help).
    """
    live = sum(n for is_put, n, _ in runs if is_put)
    ops = sum(n for _, n, _ in runs)
    if budget <= 0 and target <= 0:
        return None
    moved = folded = 0
    gain = best_gain = even_gain = 0.0
    best: ReappendPlan | None = None
    even: ReappendPlan | None = None  # the budget-1 choice: folded - moved is largest
    reach: ReappendPlan | None = None
    for is_put, n, last in runs:
        if is_put:
            moved += n
            gain -= budget * n
            continue
        folded += n
        gain += n
        if not moved:
            continue
        if budget > 0 and gain > best_gain:
            best_gain, best = gain, ReappendPlan(last, moved, folded)
        if folded - moved > even_gain:
            even_gain, even = folded - moved, ReappendPlan(last, moved, folded)
        if reach is None and target > 0 and ops - folded + 1 <= target * live:
            reach = ReappendPlan(last, moved, folded)
    if target <= 0 or ops <= target * live:
        return best
    if best is not None and ops - best.folded + 1 <= target * live:
        return best
    if reach is not None:
        return reach
    if even is not None and (best is None or even.folded > best.folded):
        return even
    return best


async def plan_bucket(
    store: Store, bucket: str, budget: float, scan_ops: int, target: float = 0.0
) -> ReappendPlan | None:
    """Scan one bucket in bounded read-only steps and plan its re-append."""
    runs: list[tuple[bool, int, int]] = []
    cursor = 0
    while True:
        n, chunk = await store.defrag_scan(bucket, cursor, scan_ops)
        for r in chunk:  # merge runs split by the scan's chunking
            if runs and runs[-1][0] == r[0]:
                runs[-1] = (r[0], runs[-1][1] + r[1], r[2])
            else:
                runs.append(r)
        if n < scan_ops or not chunk:
            return plan_reappend(runs, budget, target)
        cursor = chunk[-1][2]


async def reappend_bucket(
    store: Store, bucket: str, cutoff: int, chunk: int, stats: CompactionStats
) -> int:
    """Re-append the bucket's live PUTs with op_id <= ``cutoff`` at its end."""
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
            REAPPENDED.inc(moved)
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
    reappend_budget: float = 0.0,
    reappend_target: float = 0.0,
    scan_ops: int = 5000,
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

    async def one(b: str) -> None:
        await _one(
            store,
            b,
            chunk,
            stats,
            defragment,
            defragment_threshold,
            reappend_budget,
            reappend_target,
            scan_ops,
        )

    if progress:
        from rich.progress import Progress

        with Progress(transient=False) as bar:
            task = bar.add_task("compacting", total=len(targets))
            for b in targets:
                await one(b)
                bar.advance(task)
    else:
        for b in targets:
            await one(b)
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
    budget: float = 0.0,
    target: float = 0.0,
    scan_ops: int = 5000,
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
    elif budget > 0 or target > 0:
        plan = await plan_bucket(store, bucket, budget, scan_ops, target)
        if plan is not None:
            await reappend_bucket(store, bucket, plan.cutoff, chunk, stats)
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


def scan_ops(settings: Settings) -> int:
    """Ops one read-only planning step reads: the scan is cheaper per op than a fold."""
    return settings.compaction.chunk_ops * 10


async def compact_marked(store: Store, settings: Settings) -> CompactionStats:
    """One scheduled run over the marked buckets, with the configured re-append budget."""
    return await compact(
        store,
        settings.compaction.chunk_ops,
        defragment_threshold=settings.compaction.defragment_threshold,
        reappend_budget=settings.compaction.reappend_budget,
        reappend_target=settings.compaction.reappend_target,
        scan_ops=scan_ops(settings),
    )


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
            st = await compact_marked(store, settings)
            if st.ops_removed:
                log.info(
                    "compaction: %d buckets, %d ops removed, %d bytes freed, %d rows re-appended, "
                    "longest step %.1f ms",
                    st.buckets,
                    st.ops_removed,
                    st.bytes_freed,
                    st.rows_reappended,
                    st.longest_step_s * 1000,
                )
        except (redis_exceptions.ConnectionError, redis_exceptions.TimeoutError) as exc:
            # the store is away (the processor waits for it on its own): one line per run,
            # not a traceback every interval while Redis restarts
            log.warning("compaction: store unreachable (%s); retrying next interval", exc)
        except Exception:
            log.exception("compaction run failed; retrying next interval")


def _store(settings: Settings) -> Store:
    """The store ``compact`` and ``verify`` work on; a prefix of another key layout is
    refused with the processor's error (its checksums would be read with the wrong keys)."""
    try:
        check_layout(settings.redis.url, settings.redis.prefix)
    except StoreLayoutMismatch as exc:
        raise UserError(str(exc)) from None
    except redis_exceptions.RedisError:
        pass  # Redis down: the command's first read says so
    return Store.from_settings(settings)


async def refuse_unknown_bucket(store: Store, bucket: str) -> None:
    """``--bucket B`` naming no bucket of the store is a user error (a typo would otherwise
    "compact" or "verify" an empty bucket and report success)."""
    if not await store.has_bucket(bucket):
        from bucketsync.errors import UserError

        raise UserError(
            f"no bucket {bucket!r} in the store (redis.prefix {store.prefix!r}); "
            "`bucketsync inspect` lists the buckets"
        )


def main(
    settings: Settings,
    *,
    bucket: str | None = None,
    every_bucket: bool = False,
    defragment: bool = False,
    reappend_budget: float | None = None,
    reappend_target: float | None = None,
) -> int:
    """``bucketsync compact [--bucket B | --all] [--defragment] [--reappend-budget X]
    [--reappend-target Y]`` (None: the configured ``compaction.reappend_*``)."""

    async def go() -> int:
        store = _store(settings)
        try:
            if bucket is not None:
                await refuse_unknown_bucket(store, bucket)
            st = await compact(
                store,
                settings.compaction.chunk_ops,
                bucket=bucket,
                every_bucket=every_bucket,
                progress=True,
                defragment=defragment,
                defragment_threshold=settings.compaction.defragment_threshold,
                reappend_budget=(
                    settings.compaction.reappend_budget
                    if reappend_budget is None
                    else reappend_budget
                ),
                reappend_target=(
                    settings.compaction.reappend_target
                    if reappend_target is None
                    else reappend_target
                ),
                scan_ops=scan_ops(settings),
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
            if bucket is not None:
                await refuse_unknown_bucket(store, bucket)
            res = await verify(store, bucket)
        finally:
            await store.close()
        for d in res.differences:
            print(d)
        print(f"verified {res.checked} bucket(s): {len(res.differences)} difference(s)")
        return 1 if res.differences else 0

    return asyncio.run(go())
