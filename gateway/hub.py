"""CheckpointHub: one reader of the store's change stream per gateway process.

It fans notifications out to the connections subscribed to the changed buckets
through an in-process index (bucket -> subscribers), and lookup-key changes (a
membership row added or removed) to the connections whose bucket set depends on
that key (index lookup key -> subscribers; never a scan), so idle connections cost
memory only, never Redis round trips. It also keeps the pipeline's applied
offsets (for write checkpoints) and a small shared cache of encoded op pages,
so a page read for one connection serves every connection needing that range.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson

from gateway import protocol
from pipeline.store import BucketState, Store

log = logging.getLogger("bucketsync.gateway.hub")


@dataclass(eq=False)
class Subscriber:
    """What the hub knows of one connection."""

    buckets: set[str]
    wcp_key: str
    #: lookup keys the connection's bucket set was expanded from (fixed per request)
    lookups: frozenset[str] = frozenset()
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: bucket -> (checkpoint of the change, new state), merged until the connection reads it
    pending: dict[str, tuple[int, BucketState]] = field(default_factory=dict)
    pending_cp: int = 0
    write_checkpoint_dirty: bool = False
    resync: bool = False
    #: one of ``lookups`` changed: the bucket set must be resolved again
    lookups_dirty: bool = False


@dataclass(frozen=True, slots=True)
class Page:
    """Encoded ``data`` lines for ops in ``(after, upto]`` of one bucket, one read's worth."""

    lines: tuple[bytes, ...]
    next_after: int  # the position after the last op of the page
    has_more: bool
    ops: int
    max_target: int  # largest MOVE/CLEAR target in the page (invariant 6)


class PageCache:
    def __init__(self, store: Store, max_entries: int = 2048, max_bytes: int = 64 * 1_048_576):
        self.store = store
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple[str, int, int, int, int], asyncio.Future[Page]] = (
            OrderedDict()
        )
        self._sizes: dict[tuple[str, int, int, int, int], int] = {}

    def _evict(self) -> None:
        while self._entries and (
            len(self._entries) > self.max_entries or self.bytes > self.max_bytes
        ):
            key, _ = self._entries.popitem(last=False)
            self.bytes -= self._sizes.pop(key, 0)

    async def get(self, bucket: str, after: int, upto: int, max_ops: int, max_bytes: int) -> Page:
        key = (bucket, after, upto, max_ops, max_bytes)
        fut = self._entries.get(key)
        if fut is not None:
            self._entries.move_to_end(key)
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._entries[key] = fut
        self._evict()
        try:
            page = await self._read(bucket, after, upto, max_ops, max_bytes)
        except BaseException as exc:
            if self._entries.get(key) is fut:
                del self._entries[key]
            fut.set_exception(exc)
            fut.exception()  # mark retrieved
            raise
        fut.set_result(page)
        if self._entries.get(key) is fut:
            size = sum(len(line) for line in page.lines)
            self._sizes[key] = size
            self.bytes += size
            self._evict()
        return page

    async def _read(self, bucket: str, after: int, upto: int, max_ops: int, max_bytes: int) -> Page:
        ops = await self.store.read_ops(bucket, after, upto, max_ops)
        if not ops:
            return Page((), after, False, 0, 0)
        has_more_store = len(ops) == max_ops and ops[-1].op_id < upto
        lines: list[bytes] = []
        chunk: list[bytes] = []
        size = 0
        pos = after
        max_target = 0
        for i, op in enumerate(ops):
            if op.target > max_target:
                max_target = op.target
            chunk.append(op.wire)
            size += len(op.wire)
            last = i == len(ops) - 1
            if size >= max_bytes or last:
                nxt = op.op_id
                more = has_more_store or not last
                lines.append(protocol.data(bucket, pos, nxt, more, chunk))
                pos = nxt
                chunk, size = [], 0
        return Page(tuple(lines), pos, has_more_store, len(ops), max_target)


class CheckpointHub:
    def __init__(
        self, store: Store, *, block_ms: int = 5000, page_cache_bytes: int = 64 * 1_048_576
    ):
        self.store = store
        self.block_ms = block_ms
        self.checkpoint = 0
        self.offsets: dict[str, int] = {}
        self._by_bucket: dict[str, set[Subscriber]] = {}
        self._by_wcp: dict[str, set[Subscriber]] = {}
        self._by_lookup: dict[str, set[Subscriber]] = {}
        self._subs: set[Subscriber] = set()
        #: connections holding write checkpoints whose position is not reached yet
        self._awaiting: set[Subscriber] = set()
        self._task: asyncio.Task[None] | None = None
        self._last_id = b"0-0"
        self._last_n = 0
        self.pages = PageCache(store, max_bytes=page_cache_bytes)
        #: encoded diff lines shared by connections that need the same one (bounded)
        self.lines: dict[object, bytes] = {}
        self.notifications = 0
        #: Redis time (ms) of the newest change entry read: the lag gauge's reference
        self.last_change_ms = 0

    # ---- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        """Start the reader. Redis need not be reachable yet: the reader finds the
        stream's tail once it is (readiness reports Redis meanwhile)."""
        self._task = asyncio.create_task(self._run(), name="checkpoint-hub")

    async def _find_tail(self) -> None:
        backoff = 0.2
        while True:
            try:
                self._last_id, self._last_n = await self.store.changes_tail()
                self.checkpoint = await self.store.checkpoint()
                self.offsets = await self.store.applied_offsets()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("store unreachable at start (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def remember_line(self, key: object, line: bytes) -> None:
        if len(self.lines) >= 256:
            self.lines.clear()
        self.lines[key] = line

    @property
    def connections(self) -> int:
        return len(self._subs)

    # ---- subscriptions ------------------------------------------------------

    def subscribe(
        self, buckets: Iterable[str], wcp_key: str, lookups: Iterable[str] = ()
    ) -> Subscriber:
        sub = Subscriber(set(buckets), wcp_key, frozenset(lookups))
        self._subs.add(sub)
        for b in sub.buckets:
            self._by_bucket.setdefault(b, set()).add(sub)
        self._by_wcp.setdefault(wcp_key, set()).add(sub)
        for key in sub.lookups:
            self._by_lookup.setdefault(key, set()).add(sub)
        return sub

    def set_buckets(self, sub: Subscriber, buckets: Iterable[str]) -> None:
        """Change the buckets a connection listens to (its set was resolved again)."""
        new = set(buckets)
        for b in sub.buckets - new:
            self._drop(self._by_bucket, b, sub)
        for b in new - sub.buckets:
            self._by_bucket.setdefault(b, set()).add(sub)
        sub.buckets = new

    @staticmethod
    def _drop(index: dict[str, set[Subscriber]], key: str, sub: Subscriber) -> None:
        s = index.get(key)
        if s is not None:
            s.discard(sub)
            if not s:
                del index[key]

    def await_position(self, sub: Subscriber, waiting: bool) -> None:
        if waiting:
            self._awaiting.add(sub)
        else:
            self._awaiting.discard(sub)

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subs.discard(sub)
        self._awaiting.discard(sub)
        for b in sub.buckets:
            self._drop(self._by_bucket, b, sub)
        self._drop(self._by_wcp, sub.wcp_key, sub)
        for key in sub.lookups:
            self._drop(self._by_lookup, key, sub)

    # ---- the reader ---------------------------------------------------------

    async def _run(self) -> None:
        await self._find_tail()
        backoff = 0.2
        while True:
            try:
                entries = await self.store.read_changes(self._last_id, self.block_ms)
                backoff = 0.2
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("change stream read failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if not entries:
                continue
            for entry_id, fields in entries:
                self._last_id = entry_id
                self.last_change_ms = int(entry_id.split(b"-")[0])
                n = int(fields.get(b"n", 0))
                if self._last_n and n != self._last_n + 1:
                    self._resync_all()
                self._last_n = n
                self._dispatch(fields)

    def wake_all(self) -> None:
        for sub in self._subs:
            sub.wake.set()

    def _resync_all(self) -> None:
        log.warning("gateway fell behind the trimmed change stream; resyncing every connection")
        for sub in self._subs:
            sub.resync = True
            sub.wake.set()

    def _dispatch(self, fields: dict[bytes, bytes]) -> None:
        self.notifications += 1
        cp_raw = fields.get(b"cp")
        cp = int(cp_raw) if cp_raw is not None else self.checkpoint
        if cp > self.checkpoint:
            self.checkpoint = cp
        raw_b = fields.get(b"b")
        if raw_b:
            changed = orjson.loads(raw_b)
            if isinstance(changed, dict):
                for bucket, (cs, n) in changed.items():
                    subs = self._by_bucket.get(bucket)
                    if not subs:
                        continue
                    state = BucketState(int(cs), int(n), cp)
                    for sub in subs:
                        sub.pending[bucket] = (cp, state)
                        sub.pending_cp = max(sub.pending_cp, cp)
                        sub.wake.set()
        raw_l = fields.get(b"l")
        if raw_l:
            keys = orjson.loads(raw_l)
            if isinstance(keys, list):
                for key in keys:
                    for sub in self._by_lookup.get(key, ()):
                        sub.lookups_dirty = True
                        sub.wake.set()
        raw_o = fields.get(b"o")
        if raw_o:
            offs = orjson.loads(raw_o)
            if isinstance(offs, dict) and offs:
                for tp, off in offs.items():
                    self.offsets[tp] = max(int(off), self.offsets.get(tp, -1))
                for sub in self._awaiting:
                    sub.write_checkpoint_dirty = True
                    sub.wake.set()
        raw_w = fields.get(b"w")
        if raw_w:
            for sub in self._by_wcp.get(raw_w.decode(), ()):
                sub.write_checkpoint_dirty = True
                sub.wake.set()

    def position_reached(self, position: dict[str, int]) -> bool:
        return all(self.offsets.get(tp, -1) >= off for tp, off in position.items())
