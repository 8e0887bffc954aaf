"""What the gateway benches (``bench e2e``, ``bench reconnect``, ``bench initial-sync``) share.

- :class:`ClientPool`: simulated clients in a **separate process** from the gateway (and from
  the bench's own process, which produces events and samples). Each client is
  :class:`bucketsync.simclient.ClientState` on an aiohttp stream: it verifies every bucket's
  checksum at every ``checkpoint_complete`` as the official client does, and resumes with its
  ``after`` positions. Latency: rows carry their produce time (``ts``, epoch seconds); when a
  checkpoint completes (validated), ``now - ts`` is recorded for every op that arrived in it.
- a deployment of its own for one bench run (prefix, topic, port) and the processes of it
  (``bucketsync gateway``, ``bucketsync processor``), logging to files;
- percentiles, CPU seconds from ``/proc``, and the PNG plots (latency CDF, throughput over
  time).

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
import resource
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp

from bucketsync.simclient import ClientState

_TS = re.compile(rb'\\"ts\\":([0-9.]+)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_tree_s(pid: int) -> float:
    """:func:`cpu_s` of a process and its direct children (``--workers`` > 1 forks)."""
    total = cpu_s(pid)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(len(s) * q + 0.5) - 1))] if s else float("nan")


def spawn(command: str, cfg: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``bucketsync <command>`` with ``cfg``, its output in ``log`` (no BUCKETSYNC_* env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETSYNC_")}
    args = ["--config", str(cfg), command, *extra]
    code = (
        "import resource as r; h=r.getrlimit(r.RLIMIT_NOFILE)[1]; "
        "r.setrlimit(r.RLIMIT_NOFILE,(h,h)); from bucketsync.cli import main; "
        f"raise SystemExit(main({args!r}))"
    )
    with log.open("ab") as f:
        return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=f, stderr=f)


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def wait_listening(
    port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}); see {log}")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s; see {log}")


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
            "p50_s": pct(took, 0.5),
            "p99_s": pct(took, 0.99),
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
                    reply = {"cpu_s": cpu_s(os.getpid()), "pid": os.getpid()}
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


# ---- plots ---------------------------------------------------------------------------------


def plot(
    path: Path,
    title: str,
    cdfs: dict[str, list[float]],
    series: dict[str, list[tuple[float, float]]],
    *,
    cdf_xlabel: str = "ms",
    series_ylabel: str = "per second",
) -> None:
    """Two panels: latency CDFs (values in ms) and throughput over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for label, values in cdfs.items():
        s = sorted(values)
        if s:
            a1.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=label)
    a1.set_xlabel(cdf_xlabel)
    a1.set_ylabel("fraction")
    a1.set_title("latency CDF")
    a1.grid(alpha=0.3)
    if cdfs:
        a1.legend()
    for label, pts in series.items():
        if pts:
            a2.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
    a2.set_xlabel("seconds")
    a2.set_ylabel(series_ylabel)
    a2.set_title("throughput over time")
    a2.grid(alpha=0.3)
    if series:
        a2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def per_second(
    items: list[tuple[int, int]] | list[list[int]], t0: float
) -> list[tuple[float, float]]:
    return [(float(sec - int(t0)), float(n)) for sec, n in items]
