"""The source database's position, for exact write checkpoints
(``gateway.write_checkpoint_mode: source``).

A write checkpoint is bound to PostgreSQL's current WAL position (``pg_current_wal_lsn()``)
read through an optional read-only connection, as ``{"lsn:<connector>": <lsn>}``. The
processor records the highest ``source.lsn`` it applied per connector in the same atomic
step as each batch and announces it with the applied offsets under the same name, so the
gateway's existing check (every entry of the position reached) acknowledges the write
checkpoint once events at or past that LSN have been applied: every transaction that
committed before the request (the client's own upload) has then been published by
Debezium and applied too. On an idle database the LSN is passed by the connector's
``heartbeat.action.query`` writes, when their table is captured and its topic consumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from bucketsync.config import Settings
from gateway.logutil import RateLimitedLog, clip

log = logging.getLogger("bucketsync.gateway.source")


class SourceUnavailable(Exception):
    """The source database could not be asked for its position (now, or recently)."""


def parse_lsn(text: str) -> int:
    """PostgreSQL's ``X/Y`` text form of an LSN as the 64-bit integer Debezium puts in
    ``source.lsn``."""
    hi, _, lo = text.strip().partition("/")
    if not lo:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(hi, 16) << 32) | int(lo, 16)


def position_key(connector: str) -> str:
    """The name a source position has among the applied offsets (``lsn:<connector>``)."""
    return f"lsn:{connector}"


class SourcePosition:
    """``pg_current_wal_lsn()`` through one lazily opened read-only connection; after a
    failure the database is not asked again for a backoff that doubles up to
    ``gateway.kafka_backoff_max_s`` (write checkpoints answer 503 meanwhile)."""

    def __init__(self, settings: Settings):
        g = settings.gateway
        if not g.source_dsn:
            raise ValueError("gateway.write_checkpoint_mode=source needs gateway.source_dsn")
        self.dsn = g.source_dsn
        self.key = position_key(g.source_connector)
        self.timeout_s = g.source_timeout_s
        self.backoff_initial_s = g.kafka_backoff_initial_s
        self.backoff_max_s = g.kafka_backoff_max_s
        self._backoff_s = 0.0
        self._retry_at = 0.0
        self._conn: Any = None
        self._lock = asyncio.Lock()
        self._log = RateLimitedLog(log, interval_s=max(1.0, g.kafka_backoff_initial_s))
        self.failures = 0

    async def _connect(self) -> Any:
        import psycopg

        conn = await psycopg.AsyncConnection.connect(
            self.dsn,
            autocommit=True,
            connect_timeout=max(1, int(self.timeout_s)),
            application_name="bucketsync-gateway",
        )
        # only ever reads; refuse writes even if the role could make them
        await conn.execute("SET default_transaction_read_only = on")
        return conn

    async def lsn(self) -> int:
        async with self._lock:
            now = time.monotonic()
            if now < self._retry_at:
                raise SourceUnavailable(
                    f"source database unreachable; next attempt in {self._retry_at - now:.1f}s"
                )
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = await asyncio.wait_for(self._connect(), self.timeout_s)
                cur = await asyncio.wait_for(
                    self._conn.execute("SELECT pg_current_wal_lsn()::text"), self.timeout_s
                )
                row = await cur.fetchone()
                value = parse_lsn(row[0])
            except Exception as exc:
                self.failures += 1
                await self._close()
                self._backoff_s = min(
                    self.backoff_max_s, max(self.backoff_initial_s, self._backoff_s * 2)
                )
                self._retry_at = time.monotonic() + self._backoff_s
                self._log.log(
                    "read",
                    logging.WARNING,
                    "could not read the source database's WAL position (%s); "
                    "write checkpoints answer 503 for the next %.1fs",
                    clip(f"{type(exc).__name__}: {exc}", 300),
                    self._backoff_s,
                )
                raise SourceUnavailable(str(exc)) from None
            self._backoff_s = 0.0
            return value

    async def read(self) -> dict[str, int]:
        """The position a write checkpoint is bound to: ``{"lsn:<connector>": lsn}``."""
        return {self.key: await self.lsn()}

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken
                await conn.close()

    async def close(self) -> None:
        async with self._lock:
            await self._close()
