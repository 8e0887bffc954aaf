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
import gc
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Protocol

import orjson
from prometheus_client import Counter, Gauge

from gateway import protocol
from pipeline.store import BucketState, Store, StoredOp, parse_members, parse_score

log = logging.getLogger("bucketsync.gateway.hub")

LINES = Counter("bucketsync_gateway_lines_total", "Lines sent", ["type"])
OPS_SENT = Counter("bucketsync_gateway_ops_sent_total", "Ops sent in data lines")
BYTES_SENT = Counter("bucketsync_gateway_bytes_sent_total", "Bytes sent on sync streams")
CHECKPOINT_LAG = Gauge(
    "bucketsync_gateway_checkpoint_lag_seconds",
    "Time from the newest store change to the last checkpoint_complete sent",
)


def _record(stats: DeliveryStats) -> None:
    for kind, n in (
        ("checkpoint_diff", stats.diffs),
        ("data", stats.data),
        ("partial_checkpoint_complete", stats.partials),
        ("checkpoint_complete", stats.streams),
    ):
        if n:
            LINES.labels(kind).inc(n)
    if stats.bytes:
        BYTES_SENT.inc(stats.bytes)
    if stats.ops:
        OPS_SENT.inc(stats.ops)


class Wake:
    """``asyncio.Event`` for one waiter, without its deque and dict (one per connection).

    ``callback``: called (synchronously) whenever the flag goes up, for a connection that
    has no task waiting while idle (a detached stream, :meth:`SyncStream.detach`)."""

    __slots__ = ("_flag", "_waiter", "callback")

    def __init__(self) -> None:
        self._flag = False
        self._waiter: asyncio.Future[None] | None = None
        self.callback: Callable[[], None] | None = None

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        if not self._flag:
            self._flag = True
            w = self._waiter
            if w is not None and not w.done():
                w.set_result(None)
            cb = self.callback
            if cb is not None:
                cb()

    def clear(self) -> None:
        self._flag = False

    async def wait(self) -> None:
        if self._flag:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiter = fut
        try:
            await fut
        finally:
            self._waiter = None


class FastPath(Protocol):
    """A connection that can take a bucket change without its own task running (the
    hub's batched delivery, :meth:`CheckpointHub._deliver`)."""

    def fast_pages(self) -> list[PageKey] | None: ...

    def fast_deliver(self, stats: DeliveryStats, recheck: bool = True) -> bool: ...

    def fast_written(self) -> None: ...


class Subscriber:
    """What the hub knows of one connection."""

    __slots__ = (
        "buckets",
        "lookups",
        "lookups_dirty",
        "owner",
        "pending",
        "pending_cp",
        "resync",
        "wake",
        "wcp_key",
        "write_checkpoint_dirty",
    )

    def __init__(self, buckets: set[str], wcp_key: str, lookups: frozenset[str] = frozenset()):
        self.buckets = buckets
        self.wcp_key = wcp_key
        #: lookup keys the connection's bucket set was expanded from (fixed per request)
        self.lookups = lookups
        self.wake = Wake()
        #: bucket -> (checkpoint of the change, new state), merged until the connection reads it
        self.pending: dict[str, tuple[int, BucketState]] = {}
        self.pending_cp = 0
        self.write_checkpoint_dirty = False
        self.resync = False
        #: one of ``lookups`` changed: the bucket set must be resolved again
        self.lookups_dirty = False
        #: the connection's stream, when it takes bucket changes from the hub's delivery
        self.owner: FastPath | None = None


PageKey = tuple[str, int, int, int, int]

#: a delivery round reads a missing page at once (before looking at the next connection)
#: when its bucket has at least this many subscribers; other missing pages are read
#: together after the pass
FANOUT_SHARED = 16

#: an index entry: one subscriber, or a set of two or more (a set is ~200 bytes)
_Entry = Subscriber | set[Subscriber]


def _add(index: dict[str, _Entry], key: str, sub: Subscriber) -> None:
    cur = index.get(key)
    if cur is None:
        index[key] = sub
    elif isinstance(cur, set):
        cur.add(sub)
    elif cur is not sub:
        index[key] = {cur, sub}


def _members(index: dict[str, _Entry], key: str) -> Collection[Subscriber]:
    cur = index.get(key)
    if cur is None:
        return ()
    if isinstance(cur, set):
        return cur
    return (cur,)


@dataclass(slots=True)
class DeliveryStats:
    """Counts of one delivery round (metrics are updated once per round, not per line).
    Each stream served sends one ``checkpoint_diff`` and one ``checkpoint_complete``."""

    bytes: int = 0
    ops: int = 0
    streams: int = 0
    diffs: int = 0
    data: int = 0
    partials: int = 0


@dataclass(frozen=True, slots=True)
class Page:
    """Encoded ``data`` lines for ops in ``(after, upto]`` of one bucket, one read's worth."""

    lines: tuple[bytes, ...]
    next_after: int  # the position after the last op of the page
    has_more: bool
    ops: int
    max_target: int  # largest MOVE/CLEAR target in the page (invariant 6)


class PageCache:
    """Pages of one bucket's ops, read once and shared by every connection that needs them.

    Reads: :meth:`Store.read_ops_raw` only, once per key ``(bucket, after, upto, max_ops,
    max_bytes)`` while the key is cached; concurrent :meth:`get` calls for the same key
    share one read. A failed read is not cached: every waiter gets its exception and the
    next call reads again.

    Guarantees of a :class:`Page` from ``get(bucket, after, upto, max_ops, max_bytes)``: the
    ops of ``bucket`` with ``after < op_id <= upto``, ascending, at most ``max_ops`` of
    them, encoded as ``data`` lines; a line is closed once its ops reach ``max_bytes`` (an
    op is never split, so one op may exceed it). The first line's ``after`` is ``after``,
    each next line's ``after`` is the previous ``next_after`` (its last op id);
    ``has_more`` is true on every line but the last, and on the last exactly when ops in
    ``(next_after, upto]`` remain (then ``Page.has_more``; continue with ``after =
    next_after``). ``max_target``: the largest MOVE/CLEAR target among the ops (invariant
    6: the caller must not complete a checkpoint below it). No ops: an empty page at
    ``after``. Pages are not invalidated: a page cached before a later batch or compaction
    rewrote part of its range into MOVE/CLEAR holds the ops as read then (same checksums;
    its ``max_target`` describes what it holds).

    Bounds: at most ``max_entries`` keys (reads under way included) and ``max_bytes`` of
    encoded lines over the finished pages; the least recently used go first.

    The caller bounds ``upto`` by a checkpoint it read (ops above it may still change).
    :meth:`peek` answers from the cache only (no await), for the hub's batched delivery.
    """

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

    def peek(self, key: PageKey) -> Page | None:
        """The page of ``key`` if it is read already (no await, no Redis)."""
        fut = self._entries.get(key)
        if fut is None or not fut.done() or fut.cancelled() or fut.exception() is not None:
            return None
        return fut.result()

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
        # one op more than the page holds: it tells whether more remain (has_more is
        # "more ops <= upto remain", sync-protocol.md §3.3, not "the read was full")
        flat = await self.store.read_ops_raw(bucket, after, upto, max_ops + 1)
        if not flat and after < upto:
            # nothing in the range: or a compaction step folded it, with ops written after
            # ``upto``, into a CLEAR above ``upto`` (a CLEAR is always the bucket's first
            # op). Then the page targets that CLEAR, so the connection moves to a newer
            # checkpoint instead of completing this one without the ops (§4.5)
            head = await self.store.read_ops(bucket, -1, _NO_UPTO, 1)
            if head and head[0].op_id > upto and head[0].kind == "CLEAR":
                return Page((), after, False, 0, max(head[0].op_id, head[0].target))
        has_more_store = len(flat) > 2 * max_ops
        if has_more_store:
            del flat[2 * max_ops :]
        return encode_raw_page(bucket, after, flat, has_more_store, max_bytes)


def encode_raw_page(
    bucket: str, after: int, flat: list[bytes], has_more_store: bool, max_bytes: int
) -> Page:
    """:func:`encode_page` of ops as the store returns them (``[member, score, ...]``,
    :meth:`Store.read_ops_raw`). When every member is untagged (a PUT/REMOVE: the member is
    the op's wire JSON) and the ops fit one line, the members are spliced into that line as
    they are: no per-op objects, no re-encoding (the common page: an initial sync)."""
    members = flat[0::2]
    if not members:
        return Page((), after, False, 0, 0)
    last = members[-1]
    if sum(map(len, members)) - len(last) < max_bytes and all(m[:1] == b"{" for m in members):
        nxt = parse_score(flat[-1])
        line = protocol.data(bucket, after, nxt, has_more_store, members)
        return Page((line,), nxt, has_more_store, len(members), 0)
    return encode_page(bucket, after, parse_members(flat), has_more_store, max_bytes)


#: above every op id (op ids are decimal integers below 2**53)
_NO_UPTO = 2**53


def encode_page(
    bucket: str, after: int, ops: list[StoredOp], has_more_store: bool, max_bytes: int
) -> Page:
    """``ops`` (ascending, all after ``after``) as a :class:`Page` of ``data`` lines, closed
    at ``max_bytes``; ``has_more_store``: more ops up to the checkpoint remain after them."""
    if not ops:
        return Page((), after, False, 0, 0)
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
    """The process's one reader of the store's change stream, and its subscriber index.

    Reads: at :meth:`start` (retrying until the store answers) the change stream's tail,
    the checkpoint and the applied offsets; then the change entries after that tail
    (``read_changes``, blocking ``block_ms`` per call; errors are retried with backoff).
    It reads no bucket states; ops only through :attr:`pages` for the batched delivery.

    What each change entry does (fields as the store's apply step writes them):

    - ``cp``: :attr:`checkpoint` rises to it (never falls).
    - ``b`` (bucket -> [checksum, count]): every subscriber of that bucket, and only
      those, gets ``pending[bucket] = (cp, BucketState(checksum, count, last_op=cp))``
      (``last_op`` an upper bound) merged over earlier pending changes, and is woken, or,
      when it has an ``owner`` (:class:`FastPath`), queued for the batched delivery, which
      wakes it whenever it cannot serve it.
    - ``l`` (lookup keys): the subscribers whose ``lookups`` hold one of the keys, and
      only those, get ``lookups_dirty`` and are woken.
    - ``o`` (offsets): :attr:`offsets` take the higher values; subscribers marked by
      ``await_position(sub, True)`` get ``write_checkpoint_dirty`` and are woken.
    - ``w`` (a write-checkpoint key): the subscribers of that key get
      ``write_checkpoint_dirty`` and are woken.
    - A sequence number ``n`` that does not follow the previous one (entries trimmed
      unread, or the stream restarted from an older state) sets ``resync`` on every
      subscriber and wakes it: what it missed must be read again from the store.

    It writes no lines of its own; the batched delivery writes, through each owner's
    :meth:`FastPath.fast_deliver`, the lines that connection's task would have sent.

    Bounds: per subscriber its index entries and pending states (one per bucket, merged);
    shared caches of encoded lines (256 diff lines, 256 chunks, 64 complete lines) and
    :class:`PageCache` (``page_cache_bytes``).

    The caller must: :meth:`subscribe` before reading the states it will serve (no change
    after the read goes unseen), call :meth:`set_buckets` whenever the connection's bucket
    set changes (``BucketResolver.resolve``'s ``on_buckets``), :meth:`await_position`
    while it holds write checkpoints whose position is not reached, clear the flags it
    handled, and :meth:`unsubscribe` at the end; :meth:`start` once, :meth:`stop` at
    shutdown.
    """

    def __init__(
        self, store: Store, *, block_ms: int = 5000, page_cache_bytes: int = 64 * 1_048_576
    ):
        self.store = store
        self.block_ms = block_ms
        self.checkpoint = 0
        self.offsets: dict[str, int] = {}
        #: indexes key -> subscriber, or a set of them once a key has several (most keys
        #: of an idle gateway have one: a user's bucket, a write-checkpoint key)
        self._by_bucket: dict[str, _Entry] = {}
        self._by_wcp: dict[str, _Entry] = {}
        self._by_lookup: dict[str, _Entry] = {}
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
        #: connections with bucket changes for the batched delivery (insertion ordered)
        self._dirty: dict[Subscriber, None] = {}
        self._delivery: asyncio.Task[None] | None = None
        #: framed chunks shared by every connection that gets the same lines
        self._chunks: dict[tuple[bytes, ...], bytes] = {}
        self._stored_chunks: dict[tuple[bytes, ...], tuple[bytes, bytes]] = {}
        self._complete_lines: dict[int, bytes] = {}
        self.fast_deliveries = 0
        #: the last delivery round: connections, served by the hub, seconds
        self.last_round: tuple[int, int, float] = (0, 0, 0.0)
        self.slow_wakes = 0
        #: Redis time (ms) of the newest change entry read: the lag gauge's reference
        self.last_change_ms = 0
        #: streams waiting for :attr:`checkpoint` to reach a client's position (replicas)
        self._cp_waiters: list[tuple[int, asyncio.Future[None]]] = []
        #: False until the change stream's tail was read (``checkpoint`` is not known yet)
        self.started = False

    # ---- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        """Start the reader. Redis need not be reachable yet: the reader finds the
        stream's tail once it is (readiness reports Redis meanwhile)."""
        self._task = asyncio.create_task(self._run(), name="checkpoint-hub")

    async def _find_tail(self) -> None:
        backoff = 0.2
        while True:
            try:
                if not await self.store.reader_synced():
                    raise RuntimeError("the replica has not synced with the primary yet")
                self._last_id, self._last_n, cp, offsets = await self.store.read_tail()
                self.checkpoint = max(self.checkpoint, cp)
                for tp, off in offsets.items():
                    self.offsets[tp] = max(off, self.offsets.get(tp, -1))
                self.started = True
                self._release_waiters()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("store unreachable at start (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def stop(self) -> None:
        if self._delivery is not None:
            self._delivery.cancel()
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait_checkpoint(self, cp: int, timeout: float) -> bool:
        """Wait until :attr:`checkpoint` (what this gateway's store, e.g. a lagging replica,
        holds) reaches ``cp``; False after ``timeout`` seconds."""
        if self.started and self.checkpoint >= cp:
            return True
        if timeout <= 0:
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (cp, fut)
        self._cp_waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            with contextlib.suppress(ValueError):
                self._cp_waiters.remove(entry)

    def _release_waiters(self) -> None:
        if not self._cp_waiters:
            return
        cp = self.checkpoint
        for want, fut in self._cp_waiters:
            if want <= cp and not fut.done():
                fut.set_result(None)

    def complete_line(self, cp: int) -> bytes:
        """The ``checkpoint_complete`` line of ``cp``, encoded once for every connection."""
        line = self._complete_lines.get(cp)
        if line is None:
            if len(self._complete_lines) >= 64:
                self._complete_lines.clear()
            line = self._complete_lines[cp] = protocol.checkpoint_complete(cp)
        return line

    def chunk(self, lines: tuple[bytes, ...]) -> bytes:
        """``lines`` as one HTTP/1.1 chunk, built once for every connection sending the same
        lines (the key's hash is the lines' cached hashes; equal lines are the same objects)."""
        framed = self._chunks.get(lines)
        if framed is None:
            body = b"".join(lines)
            framed = b"%x\r\n%b\r\n" % (len(body), body)
            if len(self._chunks) >= 256:
                self._chunks.clear()
            self._chunks[lines] = framed
        return framed

    def stored_chunk(self, lines: tuple[bytes, ...]) -> tuple[bytes, bytes]:
        """For a gzip body past its deflated start (:class:`protocol.GzipBody`): ``lines``
        joined, and as stored deflate blocks in one HTTP/1.1 chunk, built once for every
        connection sending the same lines (each counts the joined lines in its trailer)."""
        got = self._stored_chunks.get(lines)
        if got is None:
            body = b"".join(lines)
            inner = protocol.stored_blocks(body)
            got = (body, b"%x\r\n%b\r\n" % (len(inner), inner))
            if len(self._stored_chunks) >= 64:
                self._stored_chunks.clear()
            self._stored_chunks[lines] = got
        return got

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
            _add(self._by_bucket, b, sub)
        _add(self._by_wcp, wcp_key, sub)
        for key in sub.lookups:
            _add(self._by_lookup, key, sub)
        return sub

    def set_buckets(self, sub: Subscriber, buckets: Iterable[str]) -> None:
        """Change the buckets a connection listens to (its set was resolved again)."""
        new = set(buckets)
        for b in sub.buckets - new:
            self._drop(self._by_bucket, b, sub)
        for b in new - sub.buckets:
            _add(self._by_bucket, b, sub)
        sub.buckets = new

    @staticmethod
    def _drop(index: dict[str, _Entry], key: str, sub: Subscriber) -> None:
        cur = index.get(key)
        if cur is None:
            return
        if isinstance(cur, set):
            cur.discard(sub)
            if len(cur) == 1:
                index[key] = next(iter(cur))
            elif not cur:
                del index[key]
        elif cur is sub:
            del index[key]

    def await_position(self, sub: Subscriber, waiting: bool) -> None:
        if waiting:
            self._awaiting.add(sub)
        else:
            self._awaiting.discard(sub)

    def unsubscribe(self, sub: Subscriber) -> None:
        sub.owner = None
        self._dirty.pop(sub, None)
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
            self._release_waiters()
        raw_b = fields.get(b"b")
        if raw_b:
            changed = orjson.loads(raw_b)
            if isinstance(changed, dict):
                for bucket, (cs, n) in changed.items():
                    subs = _members(self._by_bucket, bucket)
                    if not subs:
                        continue
                    change = (cp, BucketState(int(cs), int(n), cp))  # shared by all of them
                    dirty = self._dirty
                    for sub in subs:
                        sub.pending[bucket] = change
                        if cp > sub.pending_cp:
                            sub.pending_cp = cp
                        if sub.owner is not None:
                            dirty[sub] = None
                        else:
                            sub.wake.set()
                    if dirty and self._delivery is None:
                        self._delivery = asyncio.get_running_loop().create_task(
                            self._deliver_all(), name="checkpoint-hub-delivery"
                        )
        raw_l = fields.get(b"l")
        if raw_l:
            keys = orjson.loads(raw_l)
            if isinstance(keys, list):
                for key in keys:
                    for sub in _members(self._by_lookup, key):
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
            for sub in _members(self._by_wcp, raw_w.decode()):
                sub.write_checkpoint_dirty = True
                sub.wake.set()

    # ---- batched delivery -----------------------------------------------------

    async def _deliver_all(self) -> None:
        """Hand bucket changes to the connections that wait for them, in rounds: one task
        for all connections, each page read once, the same encoded chunk written to every
        connection that needs it. A connection that cannot take a change this way (busy,
        something else pending, a page that is not a simple append) is woken instead and
        its own task serves it (``SyncStream._on_change``)."""
        try:
            while self._dirty:
                batch = list(self._dirty)
                self._dirty.clear()
                await self._deliver(batch)
        finally:
            self._delivery = None

    async def _deliver(self, batch: list[Subscriber]) -> None:
        """One round over ``batch``, in order: a connection whose pages are cached (or
        needs none) is served as soon as it is looked at. A missing page of a bucket held
        by many connections (a fan-out) is read right away, so the pass goes on serving
        each connection as it comes (touching each connection's state once: a two-pass
        round cost ~10 µs more per connection at 10,000). Connections missing other pages
        (their own buckets) wait for the pages read all at once after the pass (each page
        once, concurrently: one round trip for the round), and are served then.

        The cyclic garbage collector is paused while the round runs without awaiting:
        a round allocates (and frees, by reference counting) a few objects per connection,
        and collector passes in the middle of it added ~10% to the last connection's wait
        (and a full pass, now and then, much more); they run after the round instead. What
        the round leaves for the collector is bounded by the round's connections. After
        all writes, each written connection looks at its socket's unsent bytes once (stall
        accounting, :meth:`FastPath.fast_written`): a syscall per connection that no
        longer delays the others' lines."""
        t0 = time.perf_counter()
        stats = DeliveryStats()
        written: list[FastPath] = []
        pages = self.pages
        waiting: list[tuple[Subscriber, FastPath]] = []
        missing: dict[PageKey, None] = {}
        shared_failed = False
        paused = gc.isenabled()
        if paused:
            gc.disable()
        try:
            for sub in batch:
                owner = sub.owner
                keys = owner.fast_pages() if owner is not None else None
                if keys is None or owner is None:
                    sub.wake.set()
                    continue
                recheck = False
                if keys:
                    miss = [k for k in keys if pages.peek(k) is None]
                    if miss and not shared_failed and self._shared_pages(miss):
                        # a page of a bucket many connections hold (a fan-out): read it
                        # now, so the rest of the pass finds it cached and serves each
                        # connection as it comes (one pass over the connections' state)
                        recheck = True  # other tasks run meanwhile
                        if paused:
                            gc.enable()
                        try:
                            await asyncio.gather(*(pages.get(*k) for k in miss))
                            miss = []
                        except asyncio.CancelledError:
                            raise
                        except Exception:
                            shared_failed = True  # left to the read after the pass
                        finally:
                            if paused:
                                gc.disable()
                    if miss:
                        for k in miss:
                            missing[k] = None
                        waiting.append((sub, owner))
                        continue
                self._serve(sub, owner, stats, written, recheck)
            if missing:
                if paused:
                    gc.enable()
                try:
                    await asyncio.gather(*(pages.get(*k) for k in missing))
                except asyncio.CancelledError:
                    raise
                except Exception:
                    for sub, _ in waiting:  # their own tasks read again and report
                        sub.wake.set()
                    waiting = []
                finally:
                    if paused:
                        gc.disable()
                for sub, owner in waiting:  # other tasks ran meanwhile: check again
                    self._serve(sub, owner, stats, written, True)
        finally:
            if paused:
                gc.enable()
        for owner in written:
            owner.fast_written()
        self.fast_deliveries += stats.streams
        self.last_round = (len(batch), stats.streams, time.perf_counter() - t0)
        if len(batch) >= 1000:
            log.debug(
                "delivery round: %d connections, %d served by the hub, %.1f ms",
                *self.last_round[:2],
                self.last_round[2] * 1000,
            )
        if stats.streams:
            _record(stats)
            if self.last_change_ms:
                CHECKPOINT_LAG.set(max(0.0, time.time() - self.last_change_ms / 1000))

    def _shared_pages(self, keys: list[PageKey]) -> bool:
        """Is one of these pages of a bucket held by many connections (``FANOUT_SHARED``)?"""
        by_bucket = self._by_bucket
        for k in keys:
            entry = by_bucket.get(k[0])
            if isinstance(entry, set) and len(entry) >= FANOUT_SHARED:
                return True
        return False

    def _serve(
        self,
        sub: Subscriber,
        owner: FastPath,
        stats: DeliveryStats,
        written: list[FastPath],
        recheck: bool,
    ) -> None:
        n = stats.streams
        try:
            done = owner.fast_deliver(stats, recheck)
        except Exception:
            log.exception("batched delivery failed; the stream serves itself")
            done = False
        if done:
            if stats.streams != n:
                written.append(owner)
        else:
            self.slow_wakes += 1
            sub.wake.set()

    def position_reached(self, position: dict[str, int]) -> bool:
        return all(self.offsets.get(tp, -1) >= off for tp, off in position.items())
