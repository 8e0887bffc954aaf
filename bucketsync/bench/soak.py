"""``bucketsync bench soak``: minutes of mixed load on one gateway and one processor, watching
memory and errors (issue 13 part 5).

What runs (all on this machine, against the configured Kafka and Redis):

- a producer thread writing synthetic Debezium todo events at a steady ``--rate`` into a
  topic of its own (3 partitions); ownership moves between users, rows are deleted;
- one ``bucketsync processor`` process and one ``bucketsync gateway`` process (workers 1),
  as a user runs them, each logging to a file;
- ``--clients`` simulated clients in this process (:mod:`bucketsync.simclient`, which checks
  every checkpoint's checksums as the official client does), 4 per user, ramped up at
  :data:`RAMP_PER_S` per second:

  * idle (most, :data:`IDLE_SHARE`): one stream kept open; reconnect with their ``after``
    positions if the gateway ends it;
  * reconnecting (:data:`RECONNECT_SHARE`): streams of 10-60 s, then a new one with ``after``;
  * stalling (:data:`STALL_SHARE`): users of their own whose bucket holds
    :data:`HEAVY_ROWS` rows of ~300 bytes (more than the socket buffers take), so the
    gateway holds unsent bytes: open a stream on a socket with a small receive buffer, read
    the headers, then stop reading for 30-90 s (past ``gateway.stall_timeout_s`` or not),
    close, and catch up on a normal stream of 10-30 s; counted as dropped by the gateway if
    the stalled stream had ended by the time the client reads again.

Every ``--sample-s`` seconds: gateway and processor RSS (``/proc/<pid>/status`` VmRSS), open
streams, events produced and applied, checksum mismatches, protocol errors, and new ERROR /
CRITICAL / Traceback lines in the two logs. Reported: RSS start (once every client is
connected), end, max and least-squares slope over the steady part, per process; the verdict
(``ok``) needs no errors, no mismatches and each RSS end within ``--rss-bound-mb`` of its
start. JSON, a markdown table and a PNG next to each other, like the other benches.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis

from bucketsync.bench.procs import (
    TODOS_BY_USER_RULES,
    delete_prefixes,
    free_port,
    raise_nofile,
    rss_kb,
    spawn_cli,
    stop,
    write_config,
)
from bucketsync.bench.report import result_path, write_report
from bucketsync.config import Settings
from bucketsync.errors import UserError
from bucketsync.feed import WORDS, TodoFeed, ensure_topics, envelope, make_producer
from bucketsync.simclient import ClientState, stream_once
from bucketsync.tokens import make_dev_token

RULES = TODOS_BY_USER_RULES

PARTITIONS = 3
CLIENTS_PER_USER = 4
ROWS_PER_USER = 4
RECONNECT_SHARE = 0.10
STALL_SHARE = 0.05
IDLE_SHARE = 1 - RECONNECT_SHARE - STALL_SHARE
RAMP_PER_S = 100.0
#: rows in the bucket of each stalling client's user
HEAVY_ROWS = 100
#: log lines that count as errors
ERROR_RE = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback")


def slope_per_min(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over ts (seconds), per minute; 0 with fewer than 2 points."""
    n = len(ts)
    if n < 2:
        return 0.0
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    if var == 0:
        return 0.0
    return 60 * sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var


class _Producer(threading.Thread):
    """Synthetic Debezium events at a steady rate until stopped."""

    def __init__(self, settings: Settings, topic: str, rate: float, users: int):
        super().__init__(daemon=True)
        self.settings, self.topic, self.rate, self.users = settings, topic, rate, users
        self.halt = threading.Event()
        self.produced = 0
        self.errors = 0

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.errors += 1

    def run(self) -> None:
        p = make_producer(self.settings)
        feed = TodoFeed(users=self.users, rows=self.users * ROWS_PER_USER, seed=13)
        t0 = time.monotonic()
        while not self.halt.is_set():
            key, value = feed.next()
            p.produce(self.topic, key=key, value=value, on_delivery=self._delivered)
            self.produced += 1
            ahead = self.produced / self.rate - (time.monotonic() - t0)
            p.poll(0)
            if ahead > 0:
                time.sleep(ahead)
        p.flush(30)


def _seed_heavy(settings: Settings, topic: str, heavy_users: int) -> int:
    """HEAVY_ROWS rows of ~300 bytes per stalling user (ids apart from the feed's)."""
    p = make_producer(settings)
    rng = random.Random(3)
    n = 0
    for h in range(heavy_users):
        for j in range(HEAVY_ROWS):
            row = {
                "id": f"h{h + 1}-{j}",
                "list_id": f"hl{h + 1}",
                "owner_id": f"heavy{h + 1}",
                "description": " ".join(rng.choices(WORDS, k=50))[:300],
                "completed": False,
            }
            key = orjson.dumps({"id": row["id"]})
            p.produce(topic, key=key, value=envelope("todos", "c", None, row, lsn=1 + n))
            n += 1
            p.poll(0)
    p.flush(30)
    return n


class _LogWatch:
    """New error lines of one log file since the last look."""

    def __init__(self, path: Path):
        self.path, self.pos = path, 0
        self.errors = 0
        self.warnings = 0
        self.first: list[str] = []

    def scan(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.pos)
                chunk = f.read()
        except OSError:
            return
        end = chunk.rfind(b"\n") + 1
        self.pos += end
        for raw in chunk[:end].splitlines():
            line = raw.decode("utf-8", "replace")
            if ERROR_RE.search(line):
                self.errors += 1
                if len(self.first) < 20:
                    self.first.append(line[:400])
            elif " WARNING " in line:
                self.warnings += 1


@dataclass
class _Counters:
    open_streams: int = 0
    connects: int = 0
    reconnects: int = 0
    server_ended: int = 0
    stalls: int = 0
    stalls_dropped_by_gateway: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def status(self, code: int) -> None:
        self.statuses[str(code)] = self.statuses.get(str(code), 0) + 1

    def error(self, exc: BaseException) -> None:
        name = type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


class _Clients:
    def __init__(self, settings: Settings, url: str, n: int, ttl_s: int, seed: int = 5):
        self.url, self.n = url, n
        self.rng = random.Random(seed)
        self.users = max(1, n // CLIENTS_PER_USER)
        self.tokens = [
            make_dev_token(settings, sub=f"u{u + 1}", ttl_s=ttl_s) for u in range(self.users)
        ]
        self.states = [ClientState() for _ in range(n)]
        kinds = ["idle"] * n
        order = list(range(n))
        self.rng.shuffle(order)
        n_rec, n_stall = round(n * RECONNECT_SHARE), round(n * STALL_SHARE)
        for i in order[:n_rec]:
            kinds[i] = "reconnect"
        for i in order[n_rec : n_rec + n_stall]:
            kinds[i] = "stall"
        self.kinds = kinds
        #: stalling clients are users heavy1.. (at most CLIENTS_PER_USER each)
        self.heavy_of = {
            i: j // CLIENTS_PER_USER
            for j, i in enumerate(x for x in range(n) if kinds[x] == "stall")
        }
        self.heavy_users = max(self.heavy_of.values(), default=-1) + 1
        self.heavy_tokens = [
            make_dev_token(settings, sub=f"heavy{h + 1}", ttl_s=ttl_s)
            for h in range(self.heavy_users)
        ]
        self.c = _Counters()
        self.stop = asyncio.Event()
        self.session: aiohttp.ClientSession | None = None
        self.ramped = asyncio.Event()
        self._started = 0

    def token(self, i: int) -> str:
        if i in self.heavy_of:
            return self.heavy_tokens[self.heavy_of[i]]
        return self.tokens[i % self.users]

    def mismatches(self) -> int:
        return sum(len(s.mismatches) for s in self.states)

    def protocol_errors(self) -> int:
        return sum(len(s.protocol_errors) for s in self.states)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    async def _stream(self, i: int, timeout_s: float | None) -> None:
        assert self.session is not None
        self.c.connects += 1
        self.c.open_streams += 1
        t0 = time.monotonic()
        try:
            status = await stream_once(
                self.session,
                self.url,
                self.token(i),
                self.states[i],
                timeout_s=timeout_s,
                client_id=f"soak-{i}",
            )
            self.c.status(status)
            if timeout_s is None or time.monotonic() - t0 < timeout_s - 0.5:
                self.c.server_ended += 1
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            self.c.error(exc)
        finally:
            self.c.open_streams -= 1

    async def _stall(self, i: int, stall_s: float) -> None:
        """A stream whose client stops reading after the headers (small receive buffer)."""
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        writer: asyncio.StreamWriter | None = None
        self.c.connects += 1
        self.c.open_streams += 1
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
            reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
            body = orjson.dumps(self.states[i].request_body(f"soak-{i}"))
            writer.write(
                b"POST /sync/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\n"
                + f"Authorization: Token {self.token(i)}\r\n".encode()
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            self.c.status(int(head.split(b" ", 2)[1]))
            self.c.stalls += 1
            transport = writer.transport
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()
            await self._sleep(stall_s)
            transport.resume_reading()
            # ended by the gateway meanwhile: the rest of the stream reads to EOF at once
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    while await reader.read(65536):
                        pass
                    self.c.stalls_dropped_by_gateway += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as e:
            self.c.error(e)
        finally:
            self.c.open_streams -= 1
            if writer is not None:
                writer.close()
            else:
                sock.close()

    async def client(self, i: int, ramp_s: float) -> None:
        await self._sleep(ramp_s)
        self._started += 1
        if self._started >= self.n:
            self.ramped.set()
        rng = random.Random(i)
        kind = self.kinds[i]
        first = True
        while not self.stop.is_set():
            if not first:
                self.c.reconnects += 1
            first = False
            if kind == "idle":
                await self._stream(i, None)
                await self._sleep(rng.uniform(1, 3))
            elif kind == "reconnect":
                await self._stream(i, rng.uniform(10, 60))
                await self._sleep(rng.uniform(0.5, 2))
            else:
                await self._stall(i, rng.uniform(30, 90))
                await self._stream(i, rng.uniform(10, 30))  # catches up, checksums checked
                await self._sleep(rng.uniform(0.5, 2))

    async def run(self) -> list[asyncio.Task[None]]:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
        )
        return [
            asyncio.create_task(self.client(i, i / RAMP_PER_S), name=f"soak-client-{i}")
            for i in range(self.n)
        ]


async def soak(
    settings: Settings,
    *,
    minutes: float,
    clients: int,
    rate: float,
    sample_s: float,
    rss_bound_mb: float,
    workdir: Path,
) -> dict[str, Any]:
    raise_nofile()
    run = uuid.uuid4().hex[:8]
    prefix = f"bench-soak-{run}"
    topic = f"{prefix}.public.todos"
    ensure_topics(settings, [topic], partitions=PARTITIONS)
    (workdir / "rules.yaml").write_text(RULES)
    port = free_port()
    cfg = workdir / "bucketsync.yaml"
    sections: dict[str, dict[str, Any]] = {
        "kafka": {"topics": [topic], "group_id": prefix},
        "redis": {"prefix": prefix},
        "processor": {"metrics_port": 0},
        "gateway": {"port": port, "host": "127.0.0.1", "workers": 1},
        "compaction": {"interval_s": 0},
        "stack": {"state_dir": str(settings.state_dir)},
    }
    s = write_config(settings, cfg, sections, sync_rules=str(workdir / "rules.yaml"))
    url = f"http://127.0.0.1:{port}"
    glog, plog = workdir / "gateway.log", workdir / "processor.log"
    watches = {"gateway": _LogWatch(glog), "processor": _LogWatch(plog)}
    r = redis.Redis.from_url(s.redis.url)
    users = max(1, clients // CLIENTS_PER_USER)
    producer = _Producer(s, topic, rate, users)
    duration_s = minutes * 60
    sim = _Clients(s, url, clients, ttl_s=int(duration_s) + 900)
    samples: list[dict[str, Any]] = []
    gw = proc = None
    tasks: list[asyncio.Task[None]] = []
    result: dict[str, Any] = {
        "bench": "soak",
        "minutes": minutes,
        "clients": clients,
        "mix": {k: sim.kinds.count(k) for k in ("idle", "reconnect", "stall")},
        "users": users,
        "rate_events_per_s": rate,
        "sample_s": sample_s,
        "rss_bound_mb": rss_bound_mb,
        "cores": os.cpu_count(),
        "gateway": {
            k: getattr(s.gateway, k)
            for k in ("stall_timeout_s", "max_connections_per_user", "keepalive_s")
        },
        "split": "gateway and processor: one process each (`bucketsync gateway`, workers 1; "
        "`bucketsync processor`); producer and simulated clients: this process; Kafka and "
        "Redis: the local stack; all on the same cores",
    }

    def applied() -> int:
        raw = r.hgetall(f"{prefix}:offsets")
        return sum(int(v) + 1 for k, v in raw.items() if k.decode().startswith(topic + "/"))

    result["mix"]["stalling_users"] = sim.heavy_users
    result["events_seeded"] = _seed_heavy(s, topic, sim.heavy_users)
    try:
        with plog.open("ab") as pf, glog.open("ab") as gf:
            proc = spawn_cli("processor", cfg, out=pf, raise_nofile=True)
            gw = spawn_cli("gateway", cfg, out=gf, raise_nofile=True)
        for _ in range(300):
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            await asyncio.sleep(0.1)
        else:
            raise UserError(f"gateway did not listen on {port}; see {glog}")
        producer.start()
        t0 = time.monotonic()
        tasks = await sim.run()
        ramp_done_s: float | None = None
        while True:
            now = time.monotonic() - t0
            for w in watches.values():
                w.scan()
            if ramp_done_s is None and sim.ramped.is_set():
                ramp_done_s = now
            samples.append(
                {
                    "t_s": round(now, 1),
                    "gateway_rss_kb": rss_kb(gw.pid),
                    "processor_rss_kb": rss_kb(proc.pid),
                    "bench_rss_kb": rss_kb(os.getpid()),
                    "open_streams": sim.c.open_streams,
                    "produced": producer.produced + result["events_seeded"],
                    "applied": applied(),
                    "mismatches": sim.mismatches(),
                    "protocol_errors": sim.protocol_errors(),
                    "gateway_errors": watches["gateway"].errors,
                    "processor_errors": watches["processor"].errors,
                    "ramped": ramp_done_s is not None,
                }
            )
            if gw.poll() is not None or proc.poll() is not None:
                result["died"] = {"gateway": gw.poll(), "processor": proc.poll()}
                break
            if now >= duration_s:
                break
            if len(samples) % max(1, int(60 / sample_s)) == 0:
                last = samples[-1]
                print(
                    f"soak {now / 60:5.1f} min: streams {last['open_streams']}, gateway "
                    f"{last['gateway_rss_kb'] / 1024:.0f} MB, processor "
                    f"{last['processor_rss_kb'] / 1024:.0f} MB, lag "
                    f"{last['produced'] - last['applied']}, mismatches {last['mismatches']}, "
                    f"errors {last['gateway_errors'] + last['processor_errors']}",
                    flush=True,
                )
            await asyncio.sleep(sample_s)
        # drain: the producer stops, the processor catches up
        producer.halt.set()
        await asyncio.to_thread(producer.join, 30)
        t_drain = time.monotonic()
        total = producer.produced + result["events_seeded"]
        while time.monotonic() - t_drain < 60 and applied() < total:
            await asyncio.sleep(0.5)
        result["drain_s"] = round(time.monotonic() - t_drain, 1)
        result["lag_after_drain"] = total - applied()
        await asyncio.sleep(3)  # the last checkpoints reach the clients
    finally:
        sim.stop.set()
        producer.halt.set()
        if tasks:
            await asyncio.wait(tasks, timeout=15)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if sim.session is not None:
            await sim.session.close()
        result["gateway_exit"] = stop(gw)
        result["processor_exit"] = stop(proc)
        for w in watches.values():
            w.scan()
        r.close()
        with contextlib.suppress(Exception):
            delete_prefixes(s.redis.url, [prefix])
        with contextlib.suppress(Exception):
            from confluent_kafka.admin import AdminClient

            admin = AdminClient({"bootstrap.servers": s.kafka.bootstrap_servers})
            for fut in admin.delete_topics([topic], operation_timeout=10).values():
                fut.result(timeout=15)
            for fut in admin.delete_consumer_groups([prefix], request_timeout=5).values():
                fut.result(timeout=10)

    steady = [x for x in samples if x["ramped"]] or samples
    ts = [x["t_s"] for x in steady]
    for name in ("gateway", "processor"):
        ys = [x[f"{name}_rss_kb"] / 1024 for x in steady]
        all_ys = [x[f"{name}_rss_kb"] / 1024 for x in samples]
        result[f"{name}_rss_mb"] = {
            "idle": round(all_ys[0], 1),
            "start": round(ys[0], 1),
            "end": round(ys[-1], 1),
            "max": round(max(all_ys), 1),
            "growth": round(ys[-1] - ys[0], 1),
            "slope_mb_per_min": round(slope_per_min(ts, ys), 3),
        }
    result["ramp_s"] = round(ramp_done_s, 1) if ramp_done_s is not None else None
    result["events_produced"] = producer.produced + result["events_seeded"]
    result["producer_errors"] = producer.errors
    result["clients_final"] = {
        "connects": sim.c.connects,
        "reconnects": sim.c.reconnects,
        "server_ended_streams": sim.c.server_ended,
        "stalls": sim.c.stalls,
        "stalls_dropped_by_gateway": sim.c.stalls_dropped_by_gateway,
        "statuses": sim.c.statuses,
        "connection_errors": sim.c.errors,
        "checkpoints_completed": sum(st.completed for st in sim.states),
        "ops_received": sum(st.ops for st in sim.states),
    }
    result["checksum_mismatches"] = sim.mismatches()
    result["protocol_errors"] = sim.protocol_errors()
    result["log_errors"] = {k: w.errors for k, w in watches.items()}
    result["log_warnings"] = {k: w.warnings for k, w in watches.items()}
    result["first_error_lines"] = {k: w.first for k, w in watches.items() if w.first}
    result["samples"] = samples
    bounded = all(result[f"{n}_rss_mb"]["growth"] <= rss_bound_mb for n in ("gateway", "processor"))
    result["ok"] = bool(
        bounded
        and not result.get("died")
        and result["checksum_mismatches"] == 0
        and result["protocol_errors"] == 0
        and sum(result["log_errors"].values()) == 0
        and result["lag_after_drain"] == 0
    )
    return result


def _report(result: dict[str, Any], out: Path) -> None:
    g, p = result["gateway_rss_mb"], result["processor_rss_mb"]
    cf = result["clients_final"]
    lines = [
        f"soak: {result['minutes']:g} min, {result['clients']} clients "
        f"({result['mix']['idle']} idle, {result['mix']['reconnect']} reconnecting, "
        f"{result['mix']['stall']} stalling), {result['rate_events_per_s']:g} events/s, "
        f"{result['cores']} cores",
        "",
        "| metric | gateway | processor | bound |",
        "|---|---|---|---|",
        f"| RSS idle (no clients) | {g['idle']} MB | {p['idle']} MB | |",
        f"| RSS start (all connected) | {g['start']} MB | {p['start']} MB | |",
        f"| RSS end | {g['end']} MB | {p['end']} MB | |",
        f"| RSS max | {g['max']} MB | {p['max']} MB | |",
        f"| RSS growth start -> end | {g['growth']} MB | {p['growth']} MB "
        f"| ≤ {result['rss_bound_mb']:g} MB |",
        f"| RSS slope (least squares) | {g['slope_mb_per_min']} MB/min "
        f"| {p['slope_mb_per_min']} MB/min | |",
        f"| error log lines | {result['log_errors']['gateway']} "
        f"| {result['log_errors']['processor']} | 0 |",
        "",
        f"events produced {result['events_produced']}, lag after drain "
        f"{result['lag_after_drain']}; checksum mismatches {result['checksum_mismatches']}, "
        f"protocol errors {result['protocol_errors']}; connects {cf['connects']} "
        f"(server-ended {cf['server_ended_streams']}), stalls {cf['stalls']} "
        f"(dropped by the gateway {cf['stalls_dropped_by_gateway']}), statuses "
        f"{cf['statuses']}, connection errors {cf['connection_errors'] or 0}; "
        f"checkpoints completed {cf['checkpoints_completed']}; verdict: "
        f"{'ok' if result['ok'] else 'NOT OK'}",
    ]
    print("\n".join(lines))
    write_report(result, out, "\n".join(lines) + "\n", lambda plt: _plot(plt, result))


def _plot(plt: Any, result: dict[str, Any]) -> None:
    xs = [x["t_s"] / 60 for x in result["samples"]]
    _fig, ax = plt.subplots(figsize=(9, 4))
    for name in ("gateway", "processor"):
        ax.plot(xs, [x[f"{name}_rss_kb"] / 1024 for x in result["samples"]], label=f"{name} RSS")
    ax.set_xlabel("minutes")
    ax.set_ylabel("MB")
    ax2 = ax.twinx()
    ax2.plot(xs, [x["open_streams"] for x in result["samples"]], "k:", label="open streams")
    ax2.set_ylabel("open streams")
    ax.set_title(
        f"bucketsync bench soak: {result['clients']} clients, "
        f"{result['rate_events_per_s']:g} events/s"
    )
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower right")


def main(
    settings: Settings,
    *,
    minutes: float,
    clients: int,
    rate: float,
    sample_s: float,
    rss_bound_mb: float,
    out: str | None,
) -> int:
    with tempfile.TemporaryDirectory(prefix="bucketsync-soak-") as tmp:
        result = asyncio.run(
            soak(
                settings,
                minutes=minutes,
                clients=clients,
                rate=rate,
                sample_s=sample_s,
                rss_bound_mb=rss_bound_mb,
                workdir=Path(tmp),
            )
        )
        path = result_path(out, "soak")
        _report(result, path)
        # a failed soak keeps the two logs next to the results
        for name in ("gateway", "processor") if not result["ok"] else ():
            src = Path(tmp) / f"{name}.log"
            if src.exists():
                path.with_name(path.stem + f"-{name}.log").write_bytes(src.read_bytes())
    return 0 if result["ok"] else 1
