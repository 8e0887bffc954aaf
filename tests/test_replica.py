"""Gateways reading from a Redis replica (``redis.replica_urls``), under replication lag.

A private redis-server primary and a replica on free ports; the replica replicates through a
small TCP proxy that can hold the primary's stream back, so the replica lags while it keeps
answering reads (CLIENT PAUSE on the replica would block the gateway's scripts too).

- A replica is only ever at a batch boundary: Redis 7 replicates a Lua script's effects as
  one MULTI/EXEC, so polling the replica while batches stream in never shows part of one.
- A gateway on a lagging replica serves fresh clients the replica's (older) checkpoint,
  consistent (checksums hold), and, once the replica catches up, the rest.
- A client that synced through the primary and reconnects to the lagging replica's gateway
  is not served a checkpoint below its position (that would fail its checksums and make it
  download everything again): the stream waits for the replica (``redis.replica_wait_s``).
- A replica that dies: the gateway reads from the primary until it is back and caught up
  (``redis.replica_check_s``), its clients reconnect and keep syncing meanwhile.

Clients are the simulator (checksums verified at every ``checkpoint_complete``); their rows
are compared with a model of the rows fed (owner and text per todo id).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from bucketsync.config import Settings
from pipeline.store import Store
from tests.gateway_helpers import Client, feed, running_gateway, todo
from tests.processes import free_port
from tests.test_gateway_protocol import RULES

pytestmark = pytest.mark.stack


class HoldProxy:
    """TCP proxy replica -> primary; :meth:`hold` stops the primary's bytes to the replica
    (they queue in the proxy) until :meth:`release`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.gate = asyncio.Event()
        self.gate.set()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, gated: bool
    ) -> None:
        try:
            while data := await src.read(65536):
                if gated:
                    await self.gate.wait()
                dst.write(data)
                await dst.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            dst.close()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        for t in (
            asyncio.create_task(self._pipe(reader, up_w, False)),
            asyncio.create_task(self._pipe(up_r, writer, True)),
        ):
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        self.release()
        if self.server is not None:
            self.server.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _redis_server(folder: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    folder.mkdir(parents=True, exist_ok=True)
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
    argv += ["--save", "", "--appendonly", "no", *extra]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL)


async def _wait_for(pred: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError):
            if pred():
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.asynccontextmanager
async def primary_and_replica(
    tmp: Path, procs: list[subprocess.Popen[bytes]] | None = None
) -> AsyncIterator[tuple[str, str, HoldProxy]]:
    """``procs`` (given empty) receives the primary's and the replica's processes; the
    processes appended to it are ended on exit too."""
    pport, rport = free_port(), free_port()
    procs = [] if procs is None else procs
    procs.append(_redis_server(tmp / "primary", pport))
    proxy = HoldProxy(pport)
    try:
        await _wait_for(lambda: redis.Redis(port=pport).ping(), what="primary")
        await proxy.start()
        procs.append(_replica_server(tmp / "replica", rport, proxy.port))
        await _wait_for(lambda: _link_up(rport), what="replication link")
        yield f"redis://127.0.0.1:{pport}/0", f"redis://127.0.0.1:{rport}/0", proxy
    finally:
        await proxy.close()
        for p in procs:
            p.send_signal(signal.SIGCONT)  # a frozen one would not see SIGTERM
            p.terminate()
        for p in procs:
            p.wait(10)


def _replica_server(folder: Path, port: int, upstream_port: int) -> subprocess.Popen[bytes]:
    return _redis_server(folder, port, "--replicaof", "127.0.0.1", str(upstream_port))


def _link_up(port: int) -> bool:
    info = redis.Redis(port=port).info("replication")
    return info.get("master_link_status") == "up"


def _cp(url: str, prefix: str) -> int:
    v = redis.Redis.from_url(url).get(f"{prefix}:checkpoint")
    return int(v) if v else 0


async def _caught_up(primary: str, replica: str, prefix: str) -> None:
    await _wait_for(
        lambda: _cp(replica, prefix) == _cp(primary, prefix) > 0, what="replica catch-up"
    )


def _settings(
    make_settings: Any, tmp: Path, primary: str, replicas: list[str], **redis_over: Any
) -> Settings:
    rules = tmp / "rules.yaml"
    rules.write_text(RULES)
    s: Settings = make_settings(
        sync_rules=str(rules),
        redis={"url": primary, "replica_urls": replicas, "replica_wait_s": 20, **redis_over},
    )
    return s


def _rows_of(c: Client) -> dict[tuple[str, str], str]:
    return {
        k: json.loads(v[1])["description"]
        for b in c.state.buckets.values()
        for k, v in b.rows.items()
    }


def _want(rows: dict[str, tuple[str, str]], user: str) -> dict[tuple[str, str], str]:
    return {("todos", t): text for t, (o, text) in rows.items() if o == user}


async def test_replica_shows_whole_batches_only(make_settings: Any, tmp_path: Path) -> None:
    """Each batch adds one row to each of 20 users' buckets: at every checkpoint read on the
    replica (atomically with the states) all 20 counts equal the number of batches applied
    up to it; a torn batch would show counts that differ."""
    users = [f"u{i}" for i in range(20)]
    async with primary_and_replica(tmp_path) as (primary, replica, _proxy):
        s = _settings(make_settings, tmp_path, primary, [replica])
        reader = Store.from_url(primary, s.redis.prefix, reader_url=replica)
        buckets = [f'by_user["{u}"]' for u in users]
        batches_at: dict[int, int] = {0: 0}  # checkpoint -> batches applied
        seen: list[tuple[int, list[int]]] = []
        stop = asyncio.Event()

        async def poll() -> None:
            while not stop.is_set():
                cp, states = await reader.read_checkpoint(buckets)
                seen.append((cp, [states[b].count for b in buckets]))
                await asyncio.sleep(0)

        poller = asyncio.create_task(poll())
        try:
            for k in range(1, 61):
                cp = await feed(s, [todo(f"t{u}-{k}", u, f"v{k}") for u in users])
                batches_at[cp] = k
            await _caught_up(primary, replica, s.redis.prefix)
            await asyncio.sleep(0.05)
        finally:
            stop.set()
            await poller
            await reader.close()
        assert len({cp for cp, _ in seen}) > 5, "the poller saw too few checkpoints"
        for cp, counts in seen:
            assert cp in batches_at, cp
            assert counts == [batches_at[cp]] * len(users), (cp, counts)
        assert seen[-1][0] == max(batches_at)


async def test_gateway_on_a_lagging_replica_stays_correct(
    make_settings: Any, tmp_path: Path
) -> None:
    async with primary_and_replica(tmp_path) as (primary, replica, proxy):
        s = _settings(make_settings, tmp_path, primary, [replica])
        s_primary = _settings(make_settings, tmp_path, primary, [])
        rows = {f"t{u}-{k}": (f"u{u}", "v0") for u in range(3) for k in range(5)}
        cp1 = await feed(s, [todo(t, o, text) for t, (o, text) in rows.items()])
        await _caught_up(primary, replica, s.redis.prefix)
        async with (
            running_gateway(s) as on_replica,
            running_gateway(s_primary) as on_primary,
            Client(on_replica, s, "u0") as a,  # stays on the replica's gateway
            Client(on_replica, s, "u0") as fresh,  # first sync while the replica lags
            Client(on_primary, s, "u0") as mover,  # primary's gateway, then the replica's
        ):
            assert await a.sync_until(1) == 200
            assert a.state.applied_op == cp1 and _rows_of(a) == _want(rows, "u0")

            proxy.hold()  # the replica stays at cp1 from here
            rows["t0-0"] = ("u0", "v1")
            rows["t0-9"] = ("u0", "v1")
            cp2 = await feed(s, [todo("t0-0", "u0", "v1"), todo("t0-9", "u0", "v1")])
            assert cp2 > cp1 and _cp(replica, s.redis.prefix) == cp1

            # a fresh client on the lagging replica: the replica's checkpoint, consistent
            assert await fresh.sync_until(1) == 200
            assert fresh.state.applied_op == cp1 and fresh.state.mismatches == []
            assert _rows_of(fresh) == {
                ("todos", t): "v0" for t, (o, _) in rows.items() if o == "u0" and t != "t0-9"
            }

            # a client synced through the primary (at cp2) moves to the replica's gateway
            assert await mover.sync_until(1) == 200
            assert mover.state.applied_op == cp2
            mover_ops, a_ops = mover.state.ops, a.state.ops
            mover.endpoint = on_replica
            moved = asyncio.create_task(mover.sync_until(1, timeout_s=30))
            caught = asyncio.create_task(a.sync_until(2, timeout_s=30))
            await asyncio.sleep(1.0)
            assert not moved.done(), "served from a replica behind the client's position"
            proxy.release()
            assert await moved == 200
            assert await caught == 200
            await _caught_up(primary, replica, s.redis.prefix)
            assert await fresh.sync_until(1) == 200

        for c in (a, fresh, mover):
            assert c.state.mismatches == [], c.state.mismatches
            assert c.state.protocol_errors == [], c.state.protocol_errors
            assert c.state.applied_op == cp2
            assert _rows_of(c) == _want(rows, "u0")
        # nothing downloaded twice: the mover had everything, the other client lacked 2 ops
        assert mover.state.ops == mover_ops
        assert a.state.ops == a_ops + 2


async def test_a_replica_that_never_synced_is_not_ready(tmp_path: Path) -> None:
    """Before its first sync a replica serves an empty data set: the gateway's store reports
    not ready (readiness 400) rather than a store without a checkpoint."""
    async with primary_and_replica(tmp_path) as (primary, replica, _proxy):
        port = free_port()
        orphan = _redis_server(tmp_path / "orphan", port, "--replicaof", "127.0.0.1", "1")
        try:
            await _wait_for(lambda: redis.Redis(port=port).ping(), what="orphan replica")
            bad = Store.from_url(primary, "p", reader_url=f"redis://127.0.0.1:{port}/0")
            good = Store.from_url(primary, "p", reader_url=replica)
            try:
                assert not await bad.ping() and not await bad.reader_synced()
                assert await good.ping() and await good.reader_synced()
            finally:
                await bad.close()
                await good.close()
        finally:
            orphan.terminate()
            orphan.wait(10)


async def _metric(session: Any, base: str, name: str) -> float:
    async with session.get(f"{base}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def _sync_to(c: Client, cp: int, timeout_s: float = 60.0) -> int:
    """Reconnect as a client does (after a failed or ended stream) until it has completed
    checkpoint ``cp``; returns how many streams it took."""
    deadline = time.monotonic() + timeout_s
    streams = 0
    while c.state.applied_op < cp:
        assert time.monotonic() < deadline, f"client stuck at {c.state.applied_op} < {cp}"
        streams += 1
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            await c.sync_until(1, timeout_s=3)
        if c.state.applied_op < cp:
            await asyncio.sleep(0.2)
    return streams


@pytest.mark.parametrize("failure", ["killed", "frozen"])
async def test_a_dead_replica_falls_back_to_the_primary_and_back(
    failure: str, make_settings: Any, tmp_path: Path
) -> None:
    """The replica is killed (or frozen: SIGSTOP, reads on it hang) while clients stream
    from it: the gateway moves its reads to the primary (counted in
    ``bucketsync_gateway_replica_fallbacks_total``), the clients reconnect and sync what is
    fed meanwhile; a new replica process comes up on the same port (or the frozen one
    resumes), catches up, and the gateway reads from it again (a held replica then serves
    its own, older checkpoint: the reads are on it). Rows against the model throughout."""
    procs: list[subprocess.Popen[bytes]] = []
    async with primary_and_replica(tmp_path, procs) as (primary, replica, proxy):
        s = _settings(make_settings, tmp_path, primary, [replica], replica_check_s=0.2)
        rows = {f"t{u}-{k}": (f"u{u}", "v0") for u in range(2) for k in range(4)}
        cp = await feed(s, [todo(t, o, text) for t, (o, text) in rows.items()])
        await _caught_up(primary, replica, s.redis.prefix)
        async with (
            running_gateway(s) as gw,
            aiohttp.ClientSession() as http,
            Client(gw, s, "u0") as a,
            Client(gw, s, "u1") as b,
        ):
            fallbacks = await _metric(http, gw, "bucketsync_gateway_replica_fallbacks_total")
            for c in (a, b):
                await _sync_to(c, cp)
            assert await _metric(http, gw, "bucketsync_gateway_reading_replica") == 1

            # a stream open on the replica when it dies
            streaming = asyncio.create_task(a.sync_until(1, timeout_s=30))
            await asyncio.sleep(0.3)
            if failure == "killed":
                procs[1].kill()
                procs[1].wait(10)
            else:
                procs[1].send_signal(signal.SIGSTOP)
            for i in range(3):
                rows[f"t0-{i}"] = ("u0", f"v{i + 1}")
                rows[f"t1-n{i}"] = ("u1", "new")
                cp = await feed(
                    s, [todo(f"t0-{i}", "u0", f"v{i + 1}"), todo(f"t1-n{i}", "u1", "new")]
                )
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                await streaming
            for c in (a, b):
                await _sync_to(c, cp)  # served from the primary: the replica never had cp
            assert await _metric(http, gw, "bucketsync_gateway_reading_replica") == 0
            assert (
                await _metric(http, gw, "bucketsync_gateway_replica_fallbacks_total")
                == fallbacks + 1
            )
            for c, user in ((a, "u0"), (b, "u1")):
                assert _rows_of(c) == _want(rows, user)

            # the replica comes back (a new one syncs in full from the primary)
            if failure == "killed":
                rport = int(replica.rsplit(":", 1)[1].split("/")[0])
                procs.append(_replica_server(tmp_path / "replica", rport, proxy.port))
            else:
                procs[1].send_signal(signal.SIGCONT)
            await _caught_up(primary, replica, s.redis.prefix)

            async def back() -> bool:
                return await _metric(http, gw, "bucketsync_gateway_reading_replica") == 1

            deadline = time.monotonic() + 20
            while not await back():
                assert time.monotonic() < deadline, "the gateway never went back to the replica"
                await asyncio.sleep(0.1)
            held_at = cp
            proxy.hold()  # from here the replica stays at held_at
            rows["t0-0"] = ("u0", "last")
            cp = await feed(s, [todo("t0-0", "u0", "last")])
            async with Client(gw, s, "u0") as fresh:
                assert await fresh.sync_until(1) == 200
                assert fresh.state.applied_op == held_at  # the replica's checkpoint
            proxy.release()
            for c in (a, b):
                await _sync_to(c, cp)
            assert (
                await _metric(http, gw, "bucketsync_gateway_replica_fallbacks_total")
                == fallbacks + 1
            )
        for c, user in ((a, "u0"), (b, "u1")):
            assert c.state.mismatches == [], c.state.mismatches
            assert c.state.protocol_errors == [], c.state.protocol_errors
            assert _rows_of(c) == _want(rows, user)


async def test_switching_the_reader_moves_only_the_read_scripts() -> None:
    """Pure (no connection is made): the fallback and the way back point the read-only
    scripts at the new reader; the write scripts stay on the primary (a replica refuses
    writes)."""
    import redis.asyncio as aioredis

    primary, replica = aioredis.Redis(port=1), aioredis.Redis(port=2)
    store = Store(primary, "p", reader=replica)
    writes = ("_compact", "_notify", "_defrag", "_defrag_scan", "_issue_wcp")
    reads = ("_read_with_lookups", "_read_with_lookups_packed")
    try:
        for reader in (primary, replica, primary):
            store.set_reader(reader)
            assert store.rr is reader
            assert all(getattr(store, n).registered_client is reader for n in reads)
            assert all(getattr(store, n).registered_client is primary for n in writes)
    finally:
        await store.close()


async def test_a_gateway_on_a_replica_that_never_synced_reads_the_primary(
    make_settings: Any, tmp_path: Path
) -> None:
    """An orphan replica (its primary never answered) holds no data. Without replica checks
    (``redis.replica_check_s: 0``) the gateway is not ready: 400 (it answered 200 with
    ``"ready": false``, which a load balancer takes for ready). With them, the first check
    moves the reads to the primary: ready, and it serves the primary's rows."""
    async with primary_and_replica(tmp_path) as (primary, _replica, _proxy):
        port = free_port()
        orphan = _redis_server(tmp_path / "orphan", port, "--replicaof", "127.0.0.1", "1")
        try:
            await _wait_for(lambda: redis.Redis(port=port).ping(), what="orphan replica")
            orphan_url = f"redis://127.0.0.1:{port}/0"
            rows = {f"t{k}": ("u0", "v0") for k in range(3)}
            s = _settings(make_settings, tmp_path, primary, [orphan_url], replica_check_s=0)
            cp = await feed(s, [todo(t, o, text) for t, (o, text) in rows.items()])
            async with (
                running_gateway(s) as gw,
                aiohttp.ClientSession() as http,
                http.get(f"{gw}/probes/readiness") as resp,
            ):
                assert resp.status == 400, await resp.text()
                assert (await resp.json())["ready"] is False

            s = _settings(make_settings, tmp_path, primary, [orphan_url], replica_check_s=0.2)
            async with (
                running_gateway(s) as gw,
                aiohttp.ClientSession() as http,
                Client(gw, s, "u0") as c,
            ):
                deadline = time.monotonic() + 20
                while True:
                    async with http.get(f"{gw}/probes/readiness") as resp:
                        if resp.status == 200:
                            assert (await resp.json())["ready"] is True
                            break
                    assert time.monotonic() < deadline, "never ready"
                    await asyncio.sleep(0.1)
                assert await _metric(http, gw, "bucketsync_gateway_reading_replica") == 0
                await _sync_to(c, cp)
                assert _rows_of(c) == _want(rows, "u0") and c.state.mismatches == []
        finally:
            orphan.terminate()
            orphan.wait(10)
