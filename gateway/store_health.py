"""What the gateway checks of its store besides a ping: the key layout (a gateway never
serves a store of another layout: its streams would never complete a checkpoint) and, with
``redis.replica_urls``, whether its replica is up (while it is not, reads go to the primary).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from redis import exceptions as redis_exceptions

from bucketsync.config import Settings
from bucketsync.errors import UserError
from pipeline.store import (
    STORE_LAYOUT,
    Store,
    StoreLayoutMismatch,
    check_layout,
    found_layout,
)

log = logging.getLogger("bucketsync.gateway")

REPLICA_FALLBACKS = Counter(
    "bucketsync_gateway_replica_fallbacks_total",
    "Times the gateway's reads moved from its replica to the primary (the replica did not "
    "answer or had lost its primary)",
)
READING_REPLICA = Gauge(
    "bucketsync_gateway_reading_replica",
    "1 while the gateway reads from its replica, 0 while it reads from the primary instead",
)


def refuse_other_layout(settings: Settings) -> None:
    """Before the gateway binds its port: a prefix holding another key layout is a
    :class:`UserError` (one line, no traceback). Redis down is no error here: readiness
    reports it, and the layout once Redis answers (:class:`LayoutCheck`)."""
    try:
        check_layout(settings.redis.url, settings.redis.prefix)
    except StoreLayoutMismatch as exc:
        raise UserError(f"the gateway does not serve this store: {exc}") from None
    except redis_exceptions.RedisError:
        pass


class LayoutCheck:
    """The readiness probe's layout check: once the prefix carries this version's marker it
    is not read again; before (an empty prefix, or Redis down at start) every probe reads it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.ok = False

    async def problem(self) -> str | None:
        if self.ok:
            return None
        pipe = self.store.r.pipeline(transaction=False)
        pipe.get(self.store.k("layout"))
        pipe.exists(self.store.k("seq"))
        marker, seq = await pipe.execute()
        found = found_layout(marker, bool(seq))
        if found != STORE_LAYOUT:
            return str(StoreLayoutMismatch(self.store.prefix, found))
        self.ok = marker is not None
        return None


class ReplicaFailover:
    """Moves the store's reads to the primary while the replica is down, and back.

    Every ``interval_s`` the replica is asked for its replication state. It is down when it
    does not answer within ``timeout_s`` or has lost its link to the primary (it would
    serve a data set that no longer advances); the reads then go to the primary at once,
    through a client of their own (a newer state than the replica's: what was served stays
    valid), the replica's open connections are dropped (reads stuck on it fail and are
    retried on the primary), and ``bucketsync_gateway_replica_fallbacks_total`` counts it.

    Back to the replica only once it answers, its link is up, and its checkpoint has
    reached the primary's, read just before (twice: before and after waiting for the
    replica): it then holds every checkpoint the gateway served, so no client is taken back
    in time (the rule new streams follow with ``redis.replica_wait_s``). The reads still on
    their way to the primary at that instant are cut (their client is closed, in-flight
    commands included): the hub reads its change stream again from the replica, a stream
    whose read failed ends and its client reconnects under the start rule. Not closed: a
    read that completed on the primary between the last checkpoint read and the switch,
    if a batch was applied in that sub-millisecond window and has not reached the replica
    when the stream's next read does.
    """

    def __init__(
        self,
        store: Store,
        primary_url: str,
        replica_url: str,
        interval_s: float,
        timeout_s: float = 2.0,
    ) -> None:
        assert store.replica_client is not None
        self.store = store
        self.replica: aioredis.Redis = store.replica_client
        self.primary: aioredis.Redis = store.r
        self.primary_url = primary_url
        #: the reads' client while on the primary (closed, with what is in flight, on return)
        self.fallback: aioredis.Redis | None = None
        self.url = replica_url
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.on_replica = True
        self._task: asyncio.Task[None] | None = None
        self._dropping: set[asyncio.Task[None]] = set()
        READING_REPLICA.set(1)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="replica-failover")

    async def stop(self) -> None:
        for t in (self._task, *self._dropping):
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        if self.fallback is not None:
            await self.fallback.aclose()  # type: ignore[attr-defined]
            self.fallback = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("replica check failed")

    async def check(self) -> None:
        problem = await self.replica_problem()
        if self.on_replica and problem is not None:
            self._fall_back(problem)
        elif not self.on_replica and problem is None and await self._caught_up():
            self.on_replica = True
            self.store.set_reader(self.replica)
            READING_REPLICA.set(1)
            log.warning("replica %s is back and caught up; reading from it again", self.url)
            if self.fallback is not None:
                self._drop(self.fallback, close=True)
                self.fallback = None

    async def replica_problem(self) -> str | None:
        try:
            info = await asyncio.wait_for(self.replica.info("replication"), self.timeout_s)
        except (redis_exceptions.RedisError, OSError, TimeoutError) as exc:
            return f"does not answer ({type(exc).__name__}: {exc})"
        if info.get("role") != "slave":
            return None  # promoted, or pointed at a primary
        if info.get("master_link_status") != "up":
            return "has lost its link to the primary"
        return None

    def _fall_back(self, problem: str) -> None:
        self.on_replica = False
        self.fallback = aioredis.Redis.from_url(self.primary_url, decode_responses=False)
        self.store.set_reader(self.fallback)
        REPLICA_FALLBACKS.inc()
        READING_REPLICA.set(0)
        log.warning("replica %s %s; reading from the primary until it is back", self.url, problem)
        self._drop(self.replica, close=False)

    def _drop(self, client: aioredis.Redis, *, close: bool) -> None:
        """Disconnect every connection of ``client``, in use or not (what waits on one
        fails), in the background; ``close``: then close the client."""

        async def drop() -> None:
            with contextlib.suppress(Exception):
                await client.connection_pool.disconnect(inuse_connections=True)
            if close:
                with contextlib.suppress(Exception):
                    await client.aclose()  # type: ignore[attr-defined]

        t = asyncio.create_task(drop())
        self._dropping.add(t)
        t.add_done_callback(self._dropping.discard)

    async def _caught_up(self) -> bool:
        """The replica's checkpoint has reached the primary's, read before the wait and
        again after it (what the primary applied meanwhile must have arrived too)."""
        key = self.store.k("checkpoint")

        async def get(client: aioredis.Redis) -> int:
            return int(await asyncio.wait_for(client.get(key), self.timeout_s) or 0)

        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.timeout_s
            want = await get(self.primary)
            while True:
                have = await get(self.replica)
                if have >= want:
                    want = await get(self.primary)
                    if have >= want:
                        return True
                if loop.time() >= deadline:
                    return False
                await asyncio.sleep(0.02)
        except (redis_exceptions.RedisError, OSError, TimeoutError):
            return False
