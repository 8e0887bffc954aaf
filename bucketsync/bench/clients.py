"""What the gateway benches (``bench e2e``, ``bench reconnect``) share.

- :class:`ClientPool`: simulated clients in **processes of their own** (``procs`` of them;
  client ``i`` in process ``i % procs``), apart from the gateway and from the bench's own
  process, which produces events and samples. Each client is
  :class:`bucketsync.simclient.ClientState` on a raw asyncio connection
  (:class:`bucketsync.simclient.RawStream`: a callback per read parsing HTTP/1.1 chunked
  ndjson, no task, stream reader or client session per connection): it verifies every
  bucket's checksum at every ``checkpoint_complete`` as the official client does, and
  resumes with its ``after`` positions. Latency: rows carry their produce time (``ts``,
  epoch seconds); when a checkpoint completes (validated), ``now - ts`` is recorded for
  every op that arrived in it.
- :func:`per_second`: the pool's per-second counts as a series for
  :func:`bucketsync.bench.report.cdf_and_series_plot`.

Processes, ports and ``/proc`` readings come from :mod:`bucketsync.bench.procs`, percentiles
and the report files from :mod:`bucketsync.bench.report`.

The pool is driven over one pipe per process: ``open`` (connect every client, or reconnect
them all at once with their positions, and wait for each one's first validated
``checkpoint_complete``), ``mark`` (start a measuring window), ``collect`` (its latencies,
per-second counts, errors), ``tables``, ``close`` (drop every stream), ``quit``. Each command
goes to every process at once; the answers are merged in client order.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import multiprocessing
import os
import re
import socket
import time
from collections import Counter, deque
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlsplit

import orjson

from bucketsync.bench.procs import cpu_seconds, raise_nofile
from bucketsync.bench.report import percentile
from bucketsync.simclient import ClientState, RawStream, stream_request

_TS = re.compile(rb'\\"ts\\":([0-9.]+)')
_TS_MARK = b'\\"ts\\"'
#: a client whose stream ended waits this long before it reconnects
RETRY_S = 0.5


# ---- the client process ------------------------------------------------------------------


class _Client:
    __slots__ = (
        "addr",
        "completed_at",
        "completed_seen",
        "conn",
        "connecting",
        "family",
        "first_at",
        "host_header",
        "index",
        "ops_seen",
        "pending",
        "retry",
        "state",
        "token",
    )

    def __init__(self, index: int, token: str, addr: _Addr):
        self.index = index
        self.token = token
        self.family, self.addr, self.host_header = addr
        self.state = ClientState()
        self.pending: list[float] = []
        self.conn: _Conn | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.retry: asyncio.TimerHandle | None = None
        #: when its first validated checkpoint_complete of the current ``open`` came (0: not yet)
        self.first_at = 0.0
        self.completed_at = 0.0
        self.completed_seen = 0
        self.ops_seen = 0


class _Conn(RawStream):
    """A :class:`RawStream` that knows its client."""

    __slots__ = ("client",)

    def __init__(self, client: _Client, request: bytes, pool: _Pool):
        super().__init__(client.state, request, pool.line, pool.ended)
        self.client = client


_Addr = tuple[int, tuple[Any, ...], str]


def _resolve(url: str) -> _Addr:
    """The socket family, address and Host header of ``url`` (resolved once per pool)."""
    u = urlsplit(url)
    host = u.hostname or "127.0.0.1"
    port = u.port or 80
    family, _type, _proto, _name, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    return family, addr, f"{host}:{port}"


class _Pool:
    def __init__(self, clients: list[tuple[int, str, str]]):
        addrs = {u: _resolve(u) for u in {u for _, _, u in clients}}
        self.clients = [_Client(i, t, addrs[u]) for i, t, u in clients]
        self.latencies: list[float] = []
        self.completes_per_s: Counter[int] = Counter()
        self.ops_per_s: Counter[int] = Counter()
        self.reconnects = 0
        self.http_errors: Counter[str] = Counter()
        self.closing = False
        #: clients still to start in a ramped ``open`` (one starts per first completion)
        self._ramp: deque[_Client] = deque()
        self._waiting = 0
        self._all_first: asyncio.Future[None] | None = None
        #: open connections
        self.live = 0
        self._none_live: asyncio.Future[None] | None = None

    # -- connections

    def connect(self, c: _Client) -> None:
        """Open ``c``'s stream: a non-blocking connect and the transport made on the spot
        (no task, no wait for the handshake: the request leaves once the socket is
        writable, and a refused connect arrives as the connection's loss)."""
        c.retry = None
        if self.closing or c.conn is not None or c.connecting is not None:
            return
        st = c.state
        body = orjson.dumps(st.request_body(f"c{c.index}"))
        conn = _Conn(c, stream_request(c.host_header, c.token, body), self)
        c.ops_seen = st.ops
        c.completed_seen = st.completed
        sock = socket.socket(c.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(c.addr)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.http_errors[errno.errorcode.get(err, str(err))] += 1
            self._again(c)
            return
        loop = asyncio.get_running_loop()
        make = getattr(loop, "_make_socket_transport", None)
        if make is not None:  # asyncio's selector loops
            c.conn = conn
            self.live += 1
            make(sock, conn)
        else:  # pragma: no cover (other loops: the public way, a task per connect)
            c.connecting = loop.create_task(self._open(c, conn, sock))

    async def _open(self, c: _Client, conn: _Conn, sock: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().create_connection(lambda: conn, sock=sock)
        except OSError as exc:
            sock.close()
            self.http_errors[type(exc).__name__] += 1
            self._again(c)
            return
        finally:
            c.connecting = None
        c.conn = conn
        self.live += 1

    def _again(self, c: _Client) -> None:
        if self.closing:
            return
        self.reconnects += 1
        c.retry = asyncio.get_running_loop().call_later(RETRY_S, self.connect, c)

    def ended(self, conn: RawStream, exc: BaseException | None) -> None:
        assert isinstance(conn, _Conn)
        c = conn.client
        if c.conn is conn:
            c.conn = None
        self.live -= 1
        if self.live == 0 and self._none_live is not None and not self._none_live.done():
            self._none_live.set_result(None)
        if self.closing:
            return
        if conn.status not in (0, 200):
            self.http_errors[str(conn.status)] += 1
        elif exc is not None:
            self.http_errors[type(exc).__name__] += 1
        self._again(c)

    # -- lines

    def line(self, conn: RawStream, kind: str, raw: bytes) -> None:
        assert isinstance(conn, _Conn)
        c = conn.client
        st = c.state
        if kind == "data":
            if _TS_MARK in raw:
                c.pending.extend(float(m) for m in _TS.findall(raw))
            self.ops_per_s[int(time.time())] += st.ops - c.ops_seen
            c.ops_seen = st.ops
        elif kind == "checkpoint_complete" and st.completed > c.completed_seen:
            c.completed_seen = st.completed
            now = time.time()
            self.completes_per_s[int(now)] += 1
            if c.pending:
                self.latencies.extend(now - ts for ts in c.pending)
                c.pending.clear()
            c.completed_at = now
            if not c.first_at:
                c.first_at = now
                self._first(c)

    def _first(self, c: _Client) -> None:
        if self._ramp:
            self.connect(self._ramp.popleft())
        self._waiting -= 1
        if self._waiting <= 0 and self._all_first is not None and not self._all_first.done():
            self._all_first.set_result(None)

    # -- commands

    async def open(self, concurrency: int, timeout: float, t0: float | None) -> dict[str, Any]:
        """(Re)open every client's stream at once (at most ``concurrency`` waiting for their
        first checkpoint at a time; 0 = all) and wait for each one's first validated
        checkpoint_complete. Times count from ``t0`` (epoch seconds; default now)."""
        loop = asyncio.get_running_loop()
        t0 = time.time() if t0 is None else t0
        ops0 = [c.state.ops for c in self.clients]
        bytes0 = sum(c.state.bytes_received for c in self.clients)
        self.closing = False
        self._waiting = len(self.clients)
        self._all_first = loop.create_future()
        if not self.clients:
            self._all_first.set_result(None)
        for c in self.clients:
            c.first_at = 0.0
        n = concurrency if concurrency > 0 else len(self.clients)
        self._ramp = deque(self.clients[n:])
        for c in self.clients[:n]:
            self.connect(c)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._all_first), timeout)
        self._ramp.clear()
        return {
            "clients": len(self.clients),
            "index": [c.index for c in self.clients],
            "times_s": [c.first_at - t0 if c.first_at else None for c in self.clients],
            "ops": [c.state.ops - o for c, o in zip(self.clients, ops0, strict=True)],
            "bytes": sum(c.state.bytes_received for c in self.clients) - bytes0,
        }

    async def close(self) -> None:
        """Drop every stream (and pending reconnects) and wait until all are gone."""
        self.closing = True
        loop = asyncio.get_running_loop()
        tasks = []
        for c in self.clients:
            if c.retry is not None:
                c.retry.cancel()
                c.retry = None
            if c.connecting is not None:
                tasks.append(c.connecting)
        if tasks:  # connections being made: let them finish, then close them too
            await asyncio.gather(*tasks, return_exceptions=True)
        self._none_live = loop.create_future()
        if self.live <= 0:
            self._none_live.set_result(None)
        for c in self.clients:
            if c.conn is not None:
                c.conn.close()
            c.pending.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._none_live, 30)
        self._none_live = None

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

    def tables(self) -> dict[str, Any]:
        return {
            "index": [c.index for c in self.clients],
            "tables": [c.state.tables() for c in self.clients],
        }


def _worker(conn: Connection, clients: list[tuple[int, str, str]]) -> None:
    raise_nofile()

    async def serve() -> None:
        pool = _Pool(clients)
        loop = asyncio.get_running_loop()
        while True:
            msg = await loop.run_in_executor(None, conn.recv)
            cmd = msg["cmd"]
            if cmd == "open":
                reply: Any = await pool.open(
                    msg.get("concurrency", 0), msg["timeout"], msg.get("t0")
                )
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

    asyncio.run(serve())


# ---- merging the processes' answers --------------------------------------------------------


def _in_order(replies: list[dict[str, Any]], key: str, n: int) -> list[Any]:
    out: list[Any] = [None] * n
    for r in replies:
        for i, v in zip(r["index"], r[key], strict=True):
            out[i] = v
    return out


def _sum_series(replies: list[dict[str, Any]], key: str) -> list[tuple[int, int]]:
    total: Counter[int] = Counter()
    for r in replies:
        for sec, n in r[key]:
            total[sec] += n
    return sorted(total.items())


def merge_open(replies: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """The ``open`` answers of every process as one: ``times_s`` and ``ops`` per client
    (client order), who resumed, and the spread of the times."""
    times = _in_order(replies, "times_s", n)
    took = [t for t in times if t is not None]
    return {
        "clients": n,
        "resumed": len(took),
        "not_resumed": n - len(took),
        "all_s": max(took) if took else float("nan"),
        "p50_s": percentile(took, 0.5),
        "p99_s": percentile(took, 0.99),
        "times_s": took,
        "ops": _in_order(replies, "ops", n),
        "bytes": sum(r["bytes"] for r in replies),
        "per_process": [
            {"clients": r["clients"], "resumed": sum(t is not None for t in r["times_s"])}
            for r in replies
        ],
    }


def merge_collect(replies: list[dict[str, Any]]) -> dict[str, Any]:
    errors: Counter[str] = Counter()
    for r in replies:
        errors.update(r["http_errors"])
    return {
        "latencies_s": [x for r in replies for x in r["latencies_s"]],
        "completes_per_s": _sum_series(replies, "completes_per_s"),
        "ops_per_s": _sum_series(replies, "ops_per_s"),
        **{
            k: sum(r[k] for r in replies)
            for k in ("mismatches", "protocol_errors", "completed", "ops", "reconnects")
        },
        "mismatch_samples": [m for r in replies for m in r["mismatch_samples"]][:5],
        "protocol_error_samples": [m for r in replies for m in r["protocol_error_samples"]][:5],
        "http_errors": dict(errors),
    }


class ClientPool:
    """Simulated clients in ``procs`` child processes (see the module docstring); client
    ``i`` uses gateway ``urls[i % len(urls)]`` and lives in process ``i % procs``."""

    def __init__(self, urls: str | list[str], tokens: list[str], *, procs: int = 1):
        ctx = multiprocessing.get_context("spawn")
        urls = [urls] if isinstance(urls, str) else urls
        self.n = len(tokens)
        procs = max(1, min(procs, max(1, self.n)))
        self._conns: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        for k in range(procs):
            mine = [(i, tokens[i], urls[i % len(urls)]) for i in range(k, self.n, procs)]
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, mine), daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self.procs.append(proc)

    @property
    def pid(self) -> int:
        """The first client process (the only one with ``procs=1``)."""
        return self.pids[0]

    @property
    def pids(self) -> list[int]:
        out = []
        for p in self.procs:
            assert p.pid is not None
            out.append(p.pid)
        return out

    def _broadcast(self, cmd: str, **kw: Any) -> list[Any]:
        for c in self._conns:
            c.send({"cmd": cmd, **kw})
        return [c.recv() for c in self._conns]

    def call(self, cmd: str, **kw: Any) -> Any:
        """``cmd`` in every client process; the answers merged (client order)."""
        replies = self._broadcast(cmd, **kw)
        if cmd == "open":
            return merge_open(replies, self.n)
        if cmd == "collect":
            return merge_collect(replies)
        if cmd == "tables":
            return _in_order(replies, "tables", self.n)
        if cmd == "cpu":
            return {"cpu_s": sum(r["cpu_s"] for r in replies), "pids": [r["pid"] for r in replies]}
        return replies[0]

    def open(
        self, *, concurrency: int = 0, timeout: float = 120.0, t0: float | None = None
    ) -> dict[str, Any]:
        """Open every client's stream (``concurrency`` > 0: that many waiting for their first
        checkpoint at a time, spread over the processes); times from ``t0`` (default: now)."""
        t0 = time.time() if t0 is None else t0
        if concurrency > 0:
            concurrency = max(1, concurrency // len(self.procs))
        res: dict[str, Any] = self.call("open", concurrency=concurrency, timeout=timeout, t0=t0)
        return res

    def quit(self) -> None:
        for c in self._conns:
            with contextlib.suppress(OSError, EOFError):
                c.send({"cmd": "quit"})
        for c in self._conns:
            with contextlib.suppress(OSError, EOFError):
                c.recv()
        for p in self.procs:
            p.join(20)
            if p.is_alive():
                p.kill()


def per_second(
    items: list[tuple[int, int]] | list[list[int]], t0: float
) -> list[tuple[float, float]]:
    return [(float(sec - int(t0)), float(n)) for sec, n in items]
