"""One sync stream: checkpoint -> data -> checkpoint_complete, then diffs as things change.

Follows sync-protocol.md §4: a full checkpoint first, data bounded by the
checkpoint, ``checkpoint_complete`` only when every bucket is caught up and no
MOVE/CLEAR sent for the checkpoint points past it (invariant 6), write
checkpoints echoed once the pipeline has applied the position they are bound
to, ``token_expires_in`` keepalives and the end of the stream at expiry.

The bucket set comes from a :class:`gateway.buckets.BucketResolver`. When one of the
connection's lookup keys changes (the hub says so), the set is resolved again at a
newer checkpoint and the client gets a ``checkpoint_diff`` adding buckets (sent from
op 0) and removing the ones it lost, on the same open stream (§4.2 step 4, §4.4).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from gateway import protocol
from gateway.buckets import BucketResolver, Grant, Resolution
from gateway.hub import (
    BYTES_SENT,
    CHECKPOINT_LAG,
    LINES,
    OPS_SENT,
    CheckpointHub,
    DeliveryStats,
    Page,
    PageKey,
    Subscriber,
    encode_page,
)
from pipeline.store import BucketState, Store

log = logging.getLogger("bucketsync.gateway.stream")

OPEN_STREAMS = Gauge("bucketsync_gateway_open_streams", "Open sync streams")
_LINE_COUNTERS = {
    kind: LINES.labels(kind)
    for kind in (
        "checkpoint",
        "checkpoint_diff",
        "data",
        "checkpoint_complete",
        "partial_checkpoint_complete",
        "token_expires_in",
    )
}
GZIP_STREAMS = Counter(
    "bucketsync_gateway_gzip_streams_total",
    "Sync streams sent with Content-Encoding: gzip (gateway.compression)",
)
SLOW_CLIENTS = Counter("bucketsync_gateway_slow_clients_total", "Streams dropped for not reading")
INVALIDATED = Counter(
    "bucketsync_gateway_invalidated_checkpoints_total",
    "Checkpoints not completed because a MOVE/CLEAR target lay beyond them",
)


class SlowClient(Exception):
    pass


@dataclass(frozen=True, slots=True)
class StreamLimits:
    keepalive_s: float
    max_ops_per_line: int
    max_line_bytes: int
    slow_client_timeout_s: float
    max_buffered_bytes: int = 4 * 1_048_576
    #: unsent bytes that see no progress for this long end the stream, whatever the amount
    stall_timeout_s: float = 60.0


BucketGrant = Grant


class SyncStream:
    """One connection's sync stream (sync-protocol.md §4): :meth:`run` writes its lines.

    Reads: the write checkpoints of ``wcp_key`` (at the start, on a write-checkpoint
    notification, on a resync); the bucket set and its states at one checkpoint through
    ``resolver`` (at the start unless ``resolution`` is given; again when a lookup key of
    the request changed or the hub asks for a resync); ops through the hub's
    :class:`~gateway.hub.PageCache`; ``read_checkpoint`` of its buckets when a checkpoint
    is invalidated. Later bucket states come from the hub's notifications.

    Lines, through ``write`` (the lines of one burst in one call, always whole lines):

    1. ``checkpoint`` C: every granted bucket with its checksum, count, priority and
       subscriptions at C, the request's streams, ``write_checkpoint`` when one is reached.
    2. ``data`` for each bucket with ops in ``(position, C]``, ascending, the position
       starting at the request's ``after`` for that bucket (0 when absent, and for a
       bucket that joins later); by priority (0 first), then bucket name; after each
       priority level but the last, ``partial_checkpoint_complete`` (C, level).
    3. ``checkpoint_complete`` C, unless a MOVE/CLEAR sent has a target beyond C
       (invariant 6): then no (partial) completion for C; it reads a newer checkpoint,
       sends a ``checkpoint_diff`` with the buckets whose checksum or count changed, the
       remaining ops, and completes that one.
    4. Then per change that is visible to the connection (a bucket's checksum/count, its
       bucket set, its write checkpoint): ``checkpoint_diff`` (updated, removed buckets,
       write checkpoint), the new ops, ``checkpoint_complete``; nothing otherwise.
    5. ``token_expires_in`` every ``keepalive_s``; at ``exp`` ``token_expires_in`` 0, then
       :meth:`run` returns.

    Bounds: a data line holds at most ``max_ops_per_line`` ops and is closed at
    ``max_line_bytes``; a write past ``max_buffered_bytes`` buffered waits at most
    ``slow_client_timeout_s``, and unsent bytes that see no progress for
    ``stall_timeout_s`` end the stream (both raise :class:`SlowClient`).

    The caller: calls :meth:`run` once and closes the response when it returns or raises;
    to end it early sets ``closing`` and wakes the connection (``hub.wake_all()``). A
    ``sub`` passed in must be subscribed with ``wcp_key`` and ``resolver.lookup_keys``,
    and ``resolution`` resolved with ``on_buckets`` setting that subscription's buckets.
    A ``transport`` lets the hub write to the socket directly (batched delivery): pass it
    only for a chunked response whose headers were sent, and that aiohttp does not compress
    (``gzip``: the stream's own :class:`~gateway.protocol.GzipBody`, then the response
    carries ``Content-Encoding: gzip``). :meth:`run`
    unsubscribes from the hub when it ends.
    """

    __slots__ = (
        "_after",
        "_buffered",
        "_by_prio",
        "_conn",
        "_detachable",
        "_ended",
        "_gz",
        "_levels",
        "_lost",
        "_memo",
        "_on_end",
        "_out",
        "_out_size",
        "_parked",
        "_resolution",
        "_stall_mark",
        "_stall_since",
        "_started",
        "_task",
        "_tasks",
        "_timer",
        "_transport",
        "_unsent",
        "_write",
        "closing",
        "cp",
        "describe",
        "exp",
        "grants",
        "hub",
        "last_op",
        "limits",
        "next_keepalive",
        "positions",
        "resolver",
        "sent",
        "sent_wcp",
        "store",
        "stream_names",
        "sub",
        "wcp_key",
        "write_checkpoints",
    )

    def __init__(
        self,
        *,
        store: Store,
        hub: CheckpointHub,
        resolver: BucketResolver,
        after: dict[str, int],
        wcp_key: str,
        exp: int,
        limits: StreamLimits,
        write: Callable[[bytes], Awaitable[None]],
        buffered: Callable[[], int] = lambda: 0,
        unsent: Callable[[], int] | None = None,
        closing: asyncio.Event,
        describe: str,
        sub: Subscriber | None = None,
        resolution: Resolution | None = None,
        transport: asyncio.BaseTransport | None = None,
        detachable: bool = False,
        gzip: protocol.GzipBody | None = None,
    ):
        """``sub`` and ``resolution``: the hub subscription and the first bucket set when the
        caller resolved it already (to answer PSYNC_S2305 before the 200)."""
        self.store = store
        self.hub = hub
        self.resolver = resolver
        self.stream_names = resolver.stream_names  # shared, never changed
        self.grants: dict[str, Grant] = {}
        self.positions: dict[str, int] = {}
        self._after = after
        self._started = False  # the first bucket set was adopted
        self._resolution = resolution
        self.wcp_key = wcp_key
        self.exp = exp
        self.limits = limits
        self._write = write
        self._buffered = buffered
        #: bytes written but not taken by the client yet (gateway buffer + socket send queue)
        self._unsent = unsent if unsent is not None else buffered
        self._stall_mark = 0
        self._stall_since: float | None = None
        self._out: list[bytes] = []
        self._out_size = 0
        self.closing = closing
        self.describe = describe
        self.cp = 0
        self.sent: dict[str, tuple[int, int]] = {}
        #: newest op id each bucket may hold (upper bound): skip reads of unchanged buckets
        self.last_op: dict[str, int] = {}
        self.write_checkpoints: dict[int, dict[str, int]] = {}
        self.sent_wcp: int | None = None
        self.next_keepalive = time.monotonic() + limits.keepalive_s
        self.sub: Subscriber | None = sub
        #: for the hub's batched delivery: chunks written straight to the socket (the
        #: response is chunked, not compressed by aiohttp; its headers went out with the
        #: first checkpoint)
        self._transport = transport if isinstance(transport, asyncio.WriteTransport) else None
        #: the task waits in ``_wait`` with nothing queued: the hub may deliver for it
        self._parked = False
        self._by_prio: list[Grant] = []
        self._levels: list[int] = []
        #: fast_pages' plan, reused by fast_deliver while nothing new is pending:
        #: ((pending_cp, cp, len(pending)), checkpoint, states, page keys, newest op bounds)
        self._memo: (
            tuple[tuple[int, int, int], int, dict[str, BucketState], list[PageKey], dict[str, int]]
            | None
        ) = None
        #: run() may return at its first idle moment so the caller detaches the connection
        self._detachable = detachable
        #: once detached: the connection's protocol, and what ends it
        self._conn: _Detached | None = None
        self._on_end: Callable[[BaseException | None], None] | None = None
        self._tasks: set[asyncio.Task[None]] | None = None
        #: the task serving a detached stream now (None while it is idle)
        self._task: asyncio.Task[None] | None = None
        #: a detached idle stream's one timer (keepalive, token expiry, stall deadline)
        self._timer: asyncio.TimerHandle | None = None
        self._lost = False
        self._ended = False
        #: the body's gzip encoding (``Content-Encoding: gzip``): deflated until the first
        #: checkpoint is complete, stored blocks after (no compressor kept while idle)
        self._gz = gzip
        if gzip is not None:
            GZIP_STREAMS.inc()

    def _set_grants(self, grants: Sequence[Grant]) -> list[str]:
        """Adopt a (re)resolved bucket set; returns the buckets that left it."""
        new = {g.bucket: g for g in grants}
        removed = [b for b in self.grants if b not in new]
        for b in removed:
            self.positions.pop(b, None)
            self.sent.pop(b, None)
            self.last_op.pop(b, None)
        for b in new:
            if b not in self.positions:
                # the request's ``after`` counts only for the first checkpoint; a bucket
                # that enters the set later starts from the beginning (§4.4)
                self.positions[b] = self._after.get(b, 0) if not self._started else 0
        self.grants = new
        self._by_prio = sorted(new.values(), key=lambda g: (g.priority, g.bucket))
        self._levels = sorted({g.priority for g in self._by_prio})
        self._started = True
        self._after = _NO_AFTER  # counts for the first bucket set only
        return removed

    @staticmethod
    def _unsettled(sub: Subscriber, res: Resolution) -> None:
        """A bucket set the lookup rows changed under on every read (``res.settled``
        false) holds only buckets granted throughout: resolve again once this round is
        served."""
        if not res.settled:
            sub.lookups_dirty = True
            sub.wake.set()

    async def _resolve(self, sub: Subscriber) -> Resolution:
        return await self.resolver.resolve(
            self.store, lambda names: self.hub.set_buckets(sub, names)
        )

    # ---- output -------------------------------------------------------------

    async def send(self, line: bytes, kind: str) -> None:
        """Queue a line; lines produced in one burst leave in one write (one syscall)."""
        self._out.append(line)
        self._out_size += len(line)
        _LINE_COUNTERS[kind].inc()
        BYTES_SENT.inc(len(line))
        if self._out_size >= 65536:
            await self.flush()

    def check_stall(self) -> float | None:
        """Seconds left before a client that takes none of its unsent bytes is dropped
        (None: nothing unsent, or it is reading). Raises SlowClient once that time is up.

        Progress is the unsent amount going down between looks; writes raise the mark
        (``flush``), so a trickle of keepalives never hides a client that stopped reading.
        """
        now = time.monotonic()
        cur = self._unsent()
        if cur == 0 or cur < self._stall_mark:
            self._stall_mark = cur
            self._stall_since = now if cur else None
            return None
        if self._stall_since is None:
            self._stall_since = now
        self._stall_mark = cur
        left = self._stall_since + self.limits.stall_timeout_s - now
        if left <= 0:
            SLOW_CLIENTS.inc()
            self._out.clear()
            self._out_size = 0
            raise SlowClient(
                f"{self.describe}: client did not read any of {cur} unsent bytes for "
                f"{self.limits.stall_timeout_s:g}s; closing the stream (gateway.stall_timeout_s)"
            )
        return left

    async def flush(self) -> None:
        self.check_stall()
        if not self._out:
            return
        chunk = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        self._out_size = 0
        if self._gz is not None:
            chunk = self._gz.encode(chunk)
        try:
            if self._buffered() + len(chunk) <= self.limits.max_buffered_bytes:
                await self._write(chunk)  # fits the buffer: cannot block, no timer needed
            else:
                await asyncio.wait_for(self._write(chunk), self.limits.slow_client_timeout_s)
        except TimeoutError:
            SLOW_CLIENTS.inc()
            raise SlowClient(
                f"{self.describe}: client did not read for {self.limits.slow_client_timeout_s:.0f}s; "
                "closing the stream (gateway.slow_client_timeout_s)"
            ) from None
        # what is unsent now includes this chunk: progress is measured from here
        cur = self._unsent()
        if cur and self._stall_since is None:
            self._stall_since = time.monotonic()
        self._stall_mark = cur

    def _checksums(
        self, states: dict[str, BucketState], names: Sequence[str]
    ) -> list[protocol.BucketChecksum]:
        out = []
        for b in names:
            g = self.grants[b]
            st = states[b]
            out.append(
                protocol.BucketChecksum(b, st.checksum, st.count, g.priority, g.subscriptions)
            )
        return out

    # ---- write checkpoints --------------------------------------------------

    async def _reload_write_checkpoints(self) -> None:
        self.write_checkpoints = await self.store.write_checkpoints(self.wcp_key)

    def _current_wcp(self) -> int | None:
        best = self.sent_wcp
        waiting = False
        for wid, pos in self.write_checkpoints.items():
            if best is not None and wid <= best:
                continue
            if self.hub.position_reached(pos):
                best = wid if best is None else max(best, wid)
            else:
                waiting = True
        if self.sub is not None:
            self.hub.await_position(self.sub, waiting)
        return best

    # ---- the loop -----------------------------------------------------------

    async def run(self) -> bool:
        """Serve the stream. Returns False when it ended; True (only when ``detachable``)
        when it went idle: the caller must then :meth:`detach` it at once (no await in
        between) and leave the connection to it."""
        if self.sub is None:
            self.sub = self.hub.subscribe((), self.wcp_key, self.resolver.lookup_keys)
        sub = self.sub
        OPEN_STREAMS.inc()
        idle = False
        try:
            res = self._resolution
            self._resolution = None
            if res is None or res.write_checkpoints is None:
                await self._reload_write_checkpoints()
            else:
                # read with the states, after the subscription (a newer one is notified)
                self.write_checkpoints = res.write_checkpoints
                res.write_checkpoints = None
            wcp = self._current_wcp()
            if res is None:
                res = await self._resolve(sub)
            self._unsettled(sub, res)
            self._set_grants(res.grants)
            buckets = list(self.grants)
            cp, states = res.cp, res.states
            self.cp = cp
            self.sent = {b: (s.checksum, s.count) for b, s in states.items()}
            self.last_op = {b: s.last_op for b, s in states.items()}
            self.sent_wcp = wcp
            await self.send(
                protocol.checkpoint(cp, self._checksums(states, buckets), wcp, self.stream_names),
                "checkpoint",
            )
            await self._serve(states)
            if self._gz is not None:
                await self.flush()  # the initial sync's last deflated piece
                self._gz.settle()
            if self._transport is not None:
                sub.owner = self
            idle = await self._loop(sub)
            return idle
        finally:
            if not idle:
                self.hub.unsubscribe(sub)
                OPEN_STREAMS.dec()

    async def _loop(self, sub: Subscriber) -> bool:
        """Serve changes until the end (False) or, detachable, until idle (True: parked,
        its timer armed)."""
        while True:
            woke = await self._wait(sub)
            if woke is None:
                await self._end_body()
                return False
            if not woke:
                return True
            await self._on_change(sub)

    async def _end_body(self) -> None:
        """A gzip body's end (its trailer) when the stream ends normally."""
        gz = self._gz
        if gz is None or self._lost:
            return
        t = self._transport
        if t is not None and t.is_closing():
            return
        with contextlib.suppress(ConnectionResetError):
            await self._write(gz.end())

    async def _wait(self, sub: Subscriber) -> bool | None:
        """Wait for a change, a keepalive tick or the end. True = changed, None = end,
        False = parked without waiting (detached or detachable: the timer is armed and the
        stream's wake or timer starts a task for it, :meth:`_kick`)."""
        while True:
            await self.flush()
            if self.closing.is_set() or self._lost:
                return None
            if sub.wake.is_set():
                sub.wake.clear()
                return True
            now = time.monotonic()
            left_token = self.exp - time.time()
            if left_token <= 0:
                await self.send(protocol.token_expires_in(0), "token_expires_in")
                await self.flush()
                return None
            if now >= self.next_keepalive:
                self.next_keepalive = now + self.limits.keepalive_s
                await self.send(
                    protocol.token_expires_in(math.ceil(left_token)), "token_expires_in"
                )
                continue
            # one timer per wait, no task: idle connections must stay cheap
            timeout = min(self.next_keepalive - now, left_token)
            stall_left = self.check_stall()
            if stall_left is not None:
                timeout = min(timeout, stall_left + 0.01)
            if self._conn is not None or self._may_detach():
                # no task while idle: a wake or the timer starts one (_kick)
                self._timer = asyncio.get_running_loop().call_later(timeout, self._kick)
                self._parked = not self._out
                return False
            timer = asyncio.get_running_loop().call_later(timeout, sub.wake.set)
            self._parked = not self._out
            try:
                await sub.wake.wait()
            finally:
                self._parked = False
                timer.cancel()
            timer_due = (
                time.monotonic() >= self.next_keepalive
                or self.exp - time.time() <= 0
                or stall_left is not None
            )
            if timer_due and not (
                sub.pending or sub.write_checkpoint_dirty or sub.resync or sub.lookups_dirty
            ):
                sub.wake.clear()  # only the timer fired

    # ---- detached connections: no aiohttp request and no task while idle -------

    def _may_detach(self) -> bool:
        t = self._transport
        return (
            self._detachable
            and t is not None
            and not self._out
            and not t.is_closing()
            and not t.get_write_buffer_size()
        )

    def detach(
        self,
        transport: asyncio.Transport,
        on_end: Callable[[BaseException | None], None],
        tasks: set[asyncio.Task[None]],
    ) -> None:
        """Take the connection over after :meth:`run` returned True: its transport's
        protocol becomes a small one of this stream (the HTTP handler must drop it without
        writing or closing), writes are HTTP/1.1 chunks straight to the transport, and
        while idle the stream holds no task: a wake (hub) or its timer starts one that
        serves the change and parks again. ``on_end(exc)`` is called once when the stream
        ends (None: ended normally, e.g. token expiry or shutdown; else the error); it
        must close the transport. The tasks it starts are kept in ``tasks`` while they run.
        """
        assert self.sub is not None and self._conn is None
        conn = _Detached(self, transport)
        self._conn = conn
        self._on_end = on_end
        self._tasks = tasks
        self._write = conn.write
        self._buffered = transport.get_write_buffer_size
        transport.set_protocol(conn)
        self.sub.wake.callback = self._kick
        if self.sub.wake.is_set():
            self._kick()

    def _kick(self) -> None:
        """A detached stream's wake or timer: start its task unless one runs already
        (which then sees the wake flag before it parks again)."""
        if self._task is not None or self._ended or self._conn is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._parked = False
        task = asyncio.get_running_loop().create_task(self._resume())
        self._task = task
        tasks = self._tasks
        if tasks is not None:
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _resume(self) -> None:
        err: BaseException | None = None
        parked = False
        try:
            assert self.sub is not None
            parked = await self._loop(self.sub)
        except BaseException as exc:
            err = exc
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._task = None
            if not parked:
                self._finish(err)

    def _finish(self, exc: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._parked = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.sub is not None:
            self.sub.wake.callback = None
            self.hub.unsubscribe(self.sub)
        OPEN_STREAMS.dec()
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end(exc)

    def abandon(self) -> None:
        """End a stream that :meth:`run` left idle (True) but that is not detached: what
        ``run`` leaves to :meth:`detach` is undone (the caller closes the connection)."""
        self._on_end = None
        self._finish(None)

    def _connection_lost(self) -> None:
        self._lost = True
        self._kick()

    async def _on_change(self, sub: Subscriber) -> None:
        removed: list[str] = []
        if sub.resync or sub.lookups_dirty:
            if sub.resync:
                await self._reload_write_checkpoints()
            sub.resync = sub.lookups_dirty = False
            res = await self._resolve(sub)
            self._unsettled(sub, res)
            # what the hub queued up to this checkpoint is in the states just read
            sub.pending = {b: v for b, v in sub.pending.items() if v[0] > res.cp}
            removed = self._set_grants(res.grants)
            cp, states = max(self.cp, res.cp), res.states
        else:
            pending, sub.pending = sub.pending, {}
            cp = max(self.cp, self.hub.checkpoint)
            states = {}
            for b, (c, st) in pending.items():
                if c > self.cp and b in self.grants:
                    states[b] = st
        if sub.write_checkpoint_dirty:
            sub.write_checkpoint_dirty = False
            await self._reload_write_checkpoints()
        wcp = self._current_wcp()
        updated = [b for b, st in states.items() if self.sent.get(b) != (st.checksum, st.count)]
        if not updated and not removed and wcp == self.sent_wcp:
            return
        if removed or any(b not in self.sent for b in updated):
            log.info(
                "%s: bucket set changed at %s: +%d -%d (now %d)",
                self.describe,
                cp,
                sum(1 for b in updated if b not in self.sent),
                len(removed),
                len(self.grants),
            )
        await self._diff(cp, states, updated, wcp, removed)

    async def _diff(
        self,
        cp: int,
        states: dict[str, BucketState],
        updated: Sequence[str],
        wcp: int | None,
        removed: Sequence[str] = (),
    ) -> None:
        self.cp = max(self.cp, cp)
        for b, st in states.items():
            self.last_op[b] = max(self.last_op.get(b, 0), st.last_op)
        for b in updated:
            self.sent[b] = (states[b].checksum, states[b].count)
        self.sent_wcp = wcp
        key = (
            self.cp,
            wcp,
            tuple((b, self.grants[b].priority, self.grants[b].subscriptions) for b in updated),
            tuple(removed),
        )
        line = self.hub.lines.get(key)
        if line is None:
            line = protocol.checkpoint_diff(self.cp, self._checksums(states, updated), removed, wcp)
            self.hub.remember_line(key, line)
        await self.send(line, "checkpoint_diff")
        await self._serve(states)

    async def _serve(self, states: dict[str, BucketState]) -> None:
        """Send every missing op up to ``self.cp``; complete unless invalidated (§4.5)."""
        target = await self._send_data()
        while True:
            if target <= self.cp:
                await self.send(protocol.checkpoint_complete(self.cp), "checkpoint_complete")
                if self.hub.last_change_ms:
                    CHECKPOINT_LAG.set(max(0.0, time.time() - self.hub.last_change_ms / 1000))
                return
            # a MOVE/CLEAR points past this checkpoint: move on to a newer one first. The
            # newer checkpoint and the ops after our positions are read in one atomic step:
            # a page read after its checkpoint may hold ops that later writes turned into
            # MOVEs targeting past it, and with hot rows every such round would be
            # invalidated again (a connection that never completes while writes go on)
            INVALIDATED.inc()
            buckets = list(self.grants)
            lim = self.limits
            cp, fresh, read = await self.store.read_checkpoint_with_ops(
                buckets, {b: self.positions[b] for b in buckets}, lim.max_ops_per_line
            )
            changed = [b for b, st in fresh.items() if self.sent.get(b) != (st.checksum, st.count)]
            self.cp = max(self.cp, cp)
            for b, st in fresh.items():
                self.last_op[b] = max(self.last_op.get(b, 0), st.last_op)
            for b in changed:
                self.sent[b] = (fresh[b].checksum, fresh[b].count)
            await self.send(
                protocol.checkpoint_diff(
                    self.cp, self._checksums(fresh, changed), (), self.sent_wcp
                ),
                "checkpoint_diff",
            )
            target = 0
            if cp == self.cp:  # (a lagging read below what was sent already: page as usual)
                for g in self._by_prio:
                    b = g.bucket
                    ops, more = read[b]
                    if not ops:
                        if not more:
                            self.positions[b] = max(self.positions[b], cp)
                        continue
                    page = encode_page(b, self.positions[b], ops, more, lim.max_line_bytes)
                    for line in page.lines:
                        await self.send(line, "data")
                    OPS_SENT.inc(page.ops)
                    target = max(target, page.max_target)
                    self.positions[b] = page.next_after if more else cp
            # what remains (buckets with more than one read's worth) through the page cache
            target = await self._send_data(target)

    # ---- the hub's batched delivery (no await, no task switch) ----------------

    def _fast_states(self, sub: Subscriber) -> dict[str, BucketState] | None:
        """The pending changes if the hub may deliver them for this stream, else None."""
        if not self._fast_ok(sub):
            return None
        cp0 = self.cp
        grants = self.grants
        return {b: st for b, (c, st) in sub.pending.items() if c > cp0 and b in grants}

    def _fast_ok(self, sub: Subscriber) -> bool:
        if (
            not self._parked
            or sub.wake.is_set()
            or sub.resync
            or sub.lookups_dirty
            or sub.write_checkpoint_dirty
            or self._out
            or self.closing.is_set()
            or self._lost
            or self.exp <= time.time()
        ):
            return False
        t = self._transport
        return (
            t is not None
            and not t.is_closing()
            and not t.get_write_buffer_size()
            and self._stall_cleared()
        )

    def _stall_cleared(self) -> bool:
        """No unsent bytes count against the stall deadline (looked at again: the client
        may have taken them since the last write)."""
        if self._stall_since is None:
            return True
        if self._unsent() == 0:
            self._stall_since = None
            self._stall_mark = 0
            return True
        return False

    def _look_by_stall_deadline(self) -> None:
        """After a write the client has not taken yet: the stream must look again by its
        stall deadline. A detached idle stream moves its timer earlier if it is due later
        (no task for it); a waiting task is woken and re-arms its own timer."""
        timer = self._timer
        if self._conn is not None and timer is not None and self._task is None:
            loop = asyncio.get_running_loop()
            due = loop.time() + self.limits.stall_timeout_s + 0.01
            if timer.when() > due:
                timer.cancel()
                self._timer = loop.call_at(due, self._kick)
        elif self.sub is not None:
            self.sub.wake.set()

    def _fast_plan(
        self, cp: int, states: dict[str, BucketState]
    ) -> tuple[list[PageKey], dict[str, int]]:
        """Page keys in the order ``_send_data`` would read them (pages may be missing),
        and each bucket's newest op bound after ``states``."""
        last_op = self.last_op
        newest = {b: max(last_op.get(b, 0), st.last_op) for b, st in states.items()}
        keys: list[PageKey] = []
        lim = self.limits
        for b, pos in self.positions.items():
            lo = newest[b] if b in newest else last_op.get(b, cp)
            if lo > pos and pos < cp:
                keys.append((b, pos, cp, lim.max_ops_per_line, lim.max_line_bytes))
        return keys, newest

    def fast_pages(self) -> list[PageKey] | None:
        """For the hub: the pages a batched delivery needs first (None: not now)."""
        sub = self.sub
        if sub is None:
            return None
        self._memo = None
        states = self._fast_states(sub)
        if states is None:
            return None
        if not states:
            return []
        cp = max(self.cp, self.hub.checkpoint)
        keys, newest = self._fast_plan(cp, states)
        self._memo = ((sub.pending_cp, self.cp, len(sub.pending)), cp, states, keys, newest)
        return keys

    def fast_deliver(self, stats: DeliveryStats, recheck: bool = True) -> bool:
        """Take the pending bucket changes without this stream's task: the same lines, in
        the same order, as ``_on_change`` -> ``_diff`` -> ``_serve`` would send, written at
        once. False (nothing changed) when that needs anything else: a page not read yet,
        a page that continues, a MOVE/CLEAR past the checkpoint, a client behind.
        ``recheck=False``: nothing ran since :meth:`fast_pages` (no await), so its checks
        of the connection still hold."""
        sub = self.sub
        if sub is None:
            return False
        memo, self._memo = self._memo, None
        if memo is not None and memo[0] == (sub.pending_cp, self.cp, len(sub.pending)):
            # nothing new for this stream since the plan: its checkpoint still holds
            # (every change up to it is pending here), whatever else moved the hub's
            if recheck and not self._fast_ok(sub):
                return False
            _, cp, states, keys, newest = memo
        else:
            fresh = self._fast_states(sub)
            if fresh is None:
                return False
            states = fresh
            cp = max(self.cp, self.hub.checkpoint)
            keys, newest = self._fast_plan(cp, states) if states else ([], {})
        wcp = self._current_wcp()
        sent = self.sent
        updated = [b for b, st in states.items() if sent.get(b) != (st.checksum, st.count)]
        if not updated and wcp == self.sent_wcp:
            sub.pending.clear()
            return True
        if any(b not in sent for b in updated):
            return False  # a bucket joins the set: the stream logs and serves it itself
        # data lines by priority, as _send_data: read pages must cover each range whole
        grants = self.grants
        pages = self.hub.pages
        by_bucket: dict[str, list[bytes]] = {}
        ops = 0
        for key in keys:
            b, pos = key[0], key[1]
            out: list[bytes] = []
            while True:
                page = pages.peek((b, pos, cp, key[3], key[4]))
                if page is None or page.max_target > cp:
                    return False
                out.extend(page.lines)
                ops += page.ops
                if not page.has_more:
                    break
                pos = page.next_after
            by_bucket[b] = out
        # commit (what _diff and _serve record), then build the lines
        sub.pending.clear()
        self.cp = cp
        last_op = self.last_op
        for b, lo in newest.items():
            last_op[b] = lo
        for b in updated:
            st = states[b]
            sent[b] = (st.checksum, st.count)
        self.sent_wcp = wcp
        dkey = (
            cp,
            wcp,
            tuple((b, grants[b].priority, grants[b].subscriptions) for b in updated),
            (),
        )
        diff = self.hub.lines.get(dkey)
        if diff is None:
            diff = protocol.checkpoint_diff(cp, self._checksums(states, updated), (), wcp)
            self.hub.remember_line(dkey, diff)
        lines = [diff]
        positions = self.positions
        n_data = 0
        levels = self._levels
        for level in levels:
            if by_bucket:
                for g in self._by_prio:
                    if g.priority == level and g.bucket in by_bucket:
                        data = by_bucket[g.bucket]
                        lines.extend(data)
                        n_data += len(data)
            if level != levels[-1]:
                lines.append(protocol.partial_checkpoint_complete(cp, level))
        n_partial = max(0, len(levels) - 1)
        for b in positions:
            if positions[b] < cp:
                positions[b] = cp
        lines.append(self.hub.complete_line(cp))
        gz = self._gz
        if gz is None:
            chunk = self.hub.chunk(tuple(lines))
        else:
            body, chunk = self.hub.stored_chunk(tuple(lines))
            gz.count(body)
        assert self._transport is not None
        self._transport.write(chunk)
        stats.streams += 1
        stats.bytes += len(chunk)
        stats.ops += ops
        stats.diffs += 1
        stats.data += n_data
        stats.partials += n_partial
        return True

    def fast_written(self) -> None:
        """After the hub's round wrote a chunk here (:meth:`fast_deliver`): what is unsent
        now includes it, so progress is measured from here (as ``flush`` does)."""
        t = self._transport
        if t is None or t.is_closing() or self._ended:
            return
        cur = self._unsent()
        if cur:
            self._stall_since = time.monotonic()
            self._stall_mark = cur
            self._look_by_stall_deadline()

    async def _send_data(self, max_target: int = 0) -> int:
        """Send ops in ``(position, cp]`` for every bucket, by priority. Returns the largest
        MOVE/CLEAR target sent (0 if none; at least ``max_target``, the largest already sent
        for this checkpoint)."""
        cp = self.cp
        by_prio = sorted(self.grants.values(), key=lambda g: (g.priority, g.bucket))
        levels = sorted({g.priority for g in by_prio})
        for level in levels:
            for g in by_prio:
                if g.priority != level:
                    continue
                b = g.bucket
                if self.last_op.get(b, cp) <= self.positions[b]:
                    self.positions[b] = max(self.positions[b], cp)  # nothing new: no read
                    continue
                pages = self.hub.pages
                lim = self.limits
                #: the next page's read, started before this page's lines are written (a
                #: big bucket: the store read overlaps the socket writes)
                ahead: asyncio.Future[Page] | None = None
                try:
                    while self.positions[b] < cp:
                        if ahead is not None:
                            page, ahead = await ahead, None
                        else:
                            page = await pages.get(
                                b, self.positions[b], cp, lim.max_ops_per_line, lim.max_line_bytes
                            )
                        if page.has_more:
                            ahead = asyncio.ensure_future(
                                pages.get(
                                    b, page.next_after, cp, lim.max_ops_per_line, lim.max_line_bytes
                                )
                            )
                        log.debug(
                            "%s: %s ops of %s in (%s, %s]",
                            self.describe,
                            page.ops,
                            b,
                            self.positions[b],
                            cp,
                        )
                        for line in page.lines:
                            await self.send(line, "data")
                        OPS_SENT.inc(page.ops)
                        max_target = max(max_target, page.max_target)
                        if page.has_more:
                            self.positions[b] = page.next_after
                        else:
                            self.positions[b] = cp
                finally:
                    if ahead is not None:
                        # not cancelled: the read may be shared (PageCache); it fills the
                        # cache, and its outcome is taken here so no error goes unretrieved
                        ahead.add_done_callback(_retrieve)
            if level != levels[-1] and max_target <= cp:
                await self.send(
                    protocol.partial_checkpoint_complete(cp, level), "partial_checkpoint_complete"
                )
        return max_target


_NO_AFTER: dict[str, int] = {}


def _retrieve(fut: asyncio.Future[Page]) -> None:
    if not fut.cancelled():
        fut.exception()


class _Detached(asyncio.Protocol):
    """The protocol of a detached stream's connection (:meth:`SyncStream.detach`): write
    flow control, and the end of the connection. The client sends nothing more on a sync
    stream: bytes it sends are ignored; its end of the connection closes it."""

    __slots__ = ("drain", "paused", "stream", "transport")

    def __init__(self, stream: SyncStream, transport: asyncio.Transport):
        self.stream = stream
        self.transport = transport
        self.paused = False
        self.drain: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool | None:
        return None  # close

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        d, self.drain = self.drain, None
        if d is not None and not d.done():
            d.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.paused = False
        d, self.drain = self.drain, None
        if d is not None and not d.done():
            d.set_exception(ConnectionResetError("connection lost"))
        self.stream._connection_lost()

    async def write(self, data: bytes) -> None:
        """``data`` as one HTTP/1.1 chunk; waits while the transport is over its limit."""
        t = self.transport
        if t.is_closing():
            raise ConnectionResetError("connection lost")
        t.write(b"%x\r\n%b\r\n" % (len(data), data))
        if self.paused:
            fut = asyncio.get_running_loop().create_future()
            self.drain = fut
            await fut
