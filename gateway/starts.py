"""Streams starting together share one read.

In a reconnect storm thousands of streams start within milliseconds, each needing the
checkpoint, the states of its buckets and its write checkpoints. One round trip (and one
redis-py command dispatch) per stream and per read made the Redis client the gateway's top
cost. :class:`StartReads` gathers the requests arriving within ``window_s`` (or until
``max_batch`` are waiting) and reads them all in one atomic MULTI
(:meth:`pipeline.store.Store.read_stream_starts`): every stream of a batch gets the same
checkpoint, with its own states and write checkpoints read at that checkpoint.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from prometheus_client import Counter

from pipeline.store import BucketState, Store

START_BATCHES = Counter(
    "bucketsync_gateway_start_read_batches_total", "Shared first reads of starting streams"
)
START_READS = Counter(
    "bucketsync_gateway_start_reads_total", "Starting streams served by a shared first read"
)

StartRead = tuple[int, dict[str, BucketState], dict[int, dict[str, int]]]


class StartReads:
    """Coalesces the first reads of streams starting within ``window_s`` (at most
    ``max_batch`` in one read)."""

    def __init__(self, store: Store, *, window_s: float, max_batch: int):
        self.store = store
        self.window_s = window_s
        self.max_batch = max_batch
        self._queue: list[tuple[Sequence[str], str, asyncio.Future[StartRead]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def read(self, buckets: Sequence[str], wcp_key: str) -> StartRead:
        """The checkpoint, the states of ``buckets`` and the write checkpoints of
        ``wcp_key``, read atomically (with the other streams of the batch)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[StartRead] = loop.create_future()
        self._queue.append((buckets, wcp_key, fut))
        if len(self._queue) >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.window_s, self._flush)
        return await fut

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._queue = self._queue, []
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[Sequence[str], str, asyncio.Future[StartRead]]]) -> None:
        live = [x for x in batch if not x[2].done()]  # a waiter may have gone already
        if not live:
            return
        try:
            cp, got = await self.store.read_stream_starts([(b, k) for b, k, _ in live])
        except BaseException as exc:
            for _, _, fut in live:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError(exc))
            if not isinstance(exc, Exception):
                raise
            return
        START_BATCHES.inc()
        START_READS.inc(len(live))
        for (_, _, fut), (states, wcps) in zip(live, got, strict=True):
            if not fut.done():
                fut.set_result((cp, states, wcps))

    async def aclose(self) -> None:
        """Cancel what is pending (shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for _, _, fut in self._queue:
            fut.cancel()
        self._queue = []
        for task in list(self._tasks):
            task.cancel()
