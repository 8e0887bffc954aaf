"""What the gateway benches (``bench e2e``, ``bench reconnect``, ``bench initial-sync``) share.

- :class:`ClientPool`: simulated clients in a **separate process** from the gateway (and from
  the bench's own process, which produces events and samples). Each client is
  :class:`bucketsync.simclient.ClientState` on an aiohttp stream: it verifies every bucket's
  checksum at every ``checkpoint_complete`` as the official client does, and resumes with its
  ``after`` positions. Latency: rows carry their produce time (``ts``, epoch seconds); when a
  checkpoint completes (validated), ``now - ts`` is recorded for every op that arrived in it.
- :func:`per_second`: the pool's per-second counts as a series for
  :func:`bucketsync.bench.report.cdf_and_series_plot`.

Processes, ports and ``/proc`` readings come from :mod:`bucketsync.bench.procs`, percentiles
and the report files from :mod:`bucketsync.bench.report`.

The pool is driven over a pipe: ``open`` (connect every client, or reconnect them all at once
with their positions, and wait for each one's first validated ``checkpoint_complete``),
``mark`` (start a measuring window), ``collect`` (its latencies, per-second counts, errors),
``close`` (drop every stream), ``quit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import re
import time
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

import aiohttp

from bucketsync.bench.procs import cpu_seconds, raise_nofile
from bucketsync.bench.report import percentile
from bucketsync.simclient import ClientState

_TS = re.compile(rb'\\"ts\\":([0-9.]+)')


# ---- the client process ------------------------------------------------------------------


class _Client:
    __slots__ = (
        "completed_at",
        "first",
        "index",
        "opened_at",
        "pending",
        "state",
        "task",
        "token",
        "url",
    )

    def __init__(self, index: int, token: str, url: str):
        self.index = index
        self.token = token
        self.url = url
        self.state = ClientState()
        self.pending: list[float] = []
        self.task: asyncio.Task[None] | None = None
        self.first: asyncio.Future[None] | None = None
        self.opened_at = 0.0
        self.completed_at = 0.0


class _Pool:
    def __init__(self, urls: list[str], tokens: list[str]):
        self.clients = [_Client(i, t, urls[i % len(urls)]) for i, t in enumerate(tokens)]
        self.session: aiohttp.ClientSession | None = None
        self.latencies: list[float] = []
        self.completes_per_s: Counter[int] = Counter()
        self.ops_per_s: Counter[int] = Counter()
        self.reconnects = 0
        self.http_errors: Counter[str] = Counter()

    async def _stream(self, c: _Client) -> None:
        assert self.session is not None
        while True:
            try:
                async with self.session.post(
                    c.url + "/sync/stream",
                    json=c.state.request_body(f"c{c.index}"),
                    headers={"Authorization": f"Token {c.token}"},
                ) as resp:
                    if resp.status != 200:
                        self.http_errors[str(resp.status)] += 1
                        await resp.read()
                    else:
                        await self._read(c, resp)
            except asyncio.CancelledError:
                raise
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                self.http_errors[type(exc).__name__] += 1
            self.reconnects += 1
            await asyncio.sleep(0.5)

    async def _read(self, c: _Client, resp: aiohttp.ClientResponse) -> None:
        st = c.state
        buf = b""
        while True:
            chunk = await resp.content.readany()
            if not chunk:
                return
            buf += chunk
            if b"\n" not in buf:
                continue
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if not line:
                    continue
                done = st.completed
                ops = st.ops
                kind = st.apply_line(line)
                if kind == "data":
                    c.pending.extend(float(m) for m in _TS.findall(line))
                    self.ops_per_s[int(time.time())] += st.ops - ops
                elif kind == "checkpoint_complete" and st.completed > done:
                    now = time.time()
                    self.completes_per_s[int(now)] += 1
                    if c.pending:
                        self.latencies.extend(now - ts for ts in c.pending)
                        c.pending.clear()
                    c.completed_at = now
                    if c.first is not None and not c.first.done():
                        c.first.set_result(None)

    async def open(self, concurrency: int, timeout: float) -> dict[str, Any]:
        """(Re)open every client's stream at once (at most ``concurrency`` connecting at a
        time; 0 = all) and wait for each one's first validated checkpoint_complete."""
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=False),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=60),
            )
        loop = asyncio.get_running_loop()
        ops0 = [c.state.ops for c in self.clients]
        bytes0 = sum(c.state.bytes_received for c in self.clients)
        sem = asyncio.Semaphore(concurrency) if concurrency > 0 else None
        t0 = time.time()

        async def start(c: _Client) -> None:
            c.first = loop.create_future()
            c.opened_at = time.time()
            if sem is None:
                c.task = asyncio.create_task(self._stream(c))
                return
            async with sem:
                c.task = asyncio.create_task(self._stream(c))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(c.first), timeout)

        await asyncio.gather(*(start(c) for c in self.clients))
        firsts = [c.first for c in self.clients if c.first is not None]
        _done, pending = await asyncio.wait(firsts, timeout=timeout) if firsts else (set(), set())
        took = [c.completed_at - t0 for c in self.clients if c.first is not None and c.first.done()]
        return {
            "clients": len(self.clients),
            "resumed": len(took),
            "not_resumed": len(pending),
            "all_s": max(took) if took else float("nan"),
            "p50_s": percentile(took, 0.5),
            "p99_s": percentile(took, 0.99),
            "times_s": took,
            "ops": [c.state.ops - o for c, o in zip(self.clients, ops0, strict=True)],
            "bytes": sum(c.state.bytes_received for c in self.clients) - bytes0,
        }

    async def close(self) -> None:
        tasks = [c.task for c in self.clients if c.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in self.clients:
            c.task = None
            c.pending.clear()

    def mark(self) -> None:
        self.latencies = []
        self.completes_per_s.clear()
        self.ops_per_s.clear()

    def collect(self) -> dict[str, Any]:
        states = [c.state for c in self.clients]
        return {
            "latencies_s": self.latencies,
            "completes_per_s": sorted(self.completes_per_s.items()),
            "ops_per_s": sorted(self.ops_per_s.items()),
            "mismatches": sum(len(s.mismatches) for s in states),
            "mismatch_samples": [m for s in states for m in s.mismatches][:5],
            "protocol_errors": sum(len(s.protocol_errors) for s in states),
            "protocol_error_samples": [e for s in states for e in s.protocol_errors][:5],
            "completed": sum(s.completed for s in states),
            "ops": sum(s.ops for s in states),
            "reconnects": self.reconnects,
            "http_errors": dict(self.http_errors),
        }

    def tables(self) -> list[dict[str, dict[str, dict[str, Any]]]]:
        return [c.state.tables() for c in self.clients]


def _worker(conn: Connection, urls: list[str], tokens: list[str]) -> None:
    raise_nofile()

    async def serve() -> None:
        pool = _Pool(urls, tokens)
        loop = asyncio.get_running_loop()
        try:
            while True:
                msg = await loop.run_in_executor(None, conn.recv)
                cmd = msg["cmd"]
                if cmd == "open":
                    reply: Any = await pool.open(msg.get("concurrency", 0), msg["timeout"])
                elif cmd == "close":
                    await pool.close()
                    reply = {"ok": True}
                elif cmd == "mark":
                    pool.mark()
                    reply = {"ok": True}
                elif cmd == "collect":
                    reply = pool.collect()
                elif cmd == "tables":
                    reply = pool.tables()
                elif cmd == "cpu":
                    reply = {"cpu_s": cpu_seconds(os.getpid()), "pid": os.getpid()}
                else:  # quit
                    await pool.close()
                    conn.send({"ok": True})
                    return
                conn.send(reply)
        finally:
            if pool.session is not None:
                await pool.session.close()

    asyncio.run(serve())


class ClientPool:
    """Simulated clients in a child process (see the module docstring); client ``i`` uses
    gateway ``urls[i % len(urls)]``."""

    def __init__(self, urls: str | list[str], tokens: list[str]):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        urls = [urls] if isinstance(urls, str) else urls
        self.proc = ctx.Process(target=_worker, args=(child, urls, tokens), daemon=True)
        self.proc.start()
        child.close()

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def call(self, cmd: str, **kw: Any) -> Any:
        self._conn.send({"cmd": cmd, **kw})
        return self._conn.recv()

    def open(self, *, concurrency: int = 0, timeout: float = 120.0) -> dict[str, Any]:
        res: dict[str, Any] = self.call("open", concurrency=concurrency, timeout=timeout)
        return res

    def quit(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self.call("quit")
        self.proc.join(20)
        if self.proc.is_alive():
            self.proc.kill()


def per_second(
    items: list[tuple[int, int]] | list[list[int]], t0: float
) -> list[tuple[float, float]]:
    return [(float(sec - int(t0)), float(n)) for sec, n in items]
