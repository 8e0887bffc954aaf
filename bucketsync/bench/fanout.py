"""``bucketsync bench fanout``: idle streams held by one gateway process.

Measures, at 1k/5k/10k idle streams: gateway RSS per stream; the time for one change
in a bucket shared by every stream to reach all of them (``checkpoint_complete``
received; median over ``REPEAT`` changes of each change's p50/p99, plus the gateway's
CPU per delivered stream); the latency of a per-user change; and of a membership change
(a row of the table a parameter query reads: the affected client gets a
``checkpoint_diff`` adding the list's bucket, its data and ``checkpoint_complete``).

The split: the gateway is a separate ``bucketsync gateway`` process (``workers``
processes sharing the port; RSS and CPU are summed over them); the clients are raw
asyncio protocols (a callback per read, no task per stream), timestamps taken when the
bytes arrive, in this process and in ``client_procs`` helper processes (each connects
from its own loopback address, 127.0.0.2 and up: a process holds at most its open-files
limit of sockets, and one source address at most the ephemeral port range). The streams
are spread evenly over the client processes; per-user and membership changes go to
streams of this process. Everything shares the machine's cores with Redis. JSON, a
markdown table and a PNG are written side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from bucketsync.bench.procs import (
    drop_store,
    free_port,
    raise_nofile,
    spawn_cli,
    tree_cpu_seconds,
    tree_rss_kb,
    wait_listening,
    write_config,
)
from bucketsync.bench.report import percentile, result_path, write_report
from bucketsync.config import Settings, load_settings
from bucketsync.tokens import make_dev_token
from pipeline import core
from pipeline.cdc import UpsertEvent
from pipeline.store import Store

RULES = """
bucket_definitions:
  everyone:
    data:
      - SELECT id, title FROM news
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT id, owner_id, description FROM todos WHERE owner_id = bucket.user_id
  lists:
    parameters: SELECT list_id FROM memberships WHERE user_id = request.user_id()
    data:
      - SELECT id, list_id, title FROM items WHERE list_id = bucket.list_id
"""

#: shared changes measured per level (the report gives the median of their p50 / p99)
REPEAT = 5
#: per-user and membership changes measured per level
SAMPLES = 60


class Group:
    """Streams waited on together: done once each armed stream saw a checkpoint_complete."""

    __slots__ = ("done", "left")

    def __init__(self, streams: list[Stream]):
        self.left = len(streams)
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for st in streams:
            st.group = self
        if not streams:
            self.done.set_result(None)

    def hit(self) -> None:
        self.left -= 1
        if self.left == 0 and not self.done.done():
            self.done.set_result(None)


_MARK = b"checkpoint_complete"


class Stream(asyncio.Protocol):
    """One idle sync stream on a raw connection; records when checkpoints complete (at
    the read that brings the line: a callback, no task per stream)."""

    __slots__ = ("completes", "group", "tail", "transport", "user")

    def __init__(self, user: str):
        self.user = user
        self.completes: list[float] = []
        self.group: Group | None = None
        self.tail = b""
        self.transport: asyncio.Transport | None = None

    async def open(self, port: int, token: str, src: str | None = None) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_connection(
            lambda: self, "127.0.0.1", port, local_addr=(src, 0) if src else None
        )
        assert self.transport is not None
        body = orjson.dumps({"buckets": [], "raw_data": True, "client_id": self.user})
        self.transport.write(
            b"POST /sync/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Authorization: Token {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.tail + data
        n = buf.count(_MARK)
        self.tail = buf[-(len(_MARK) - 1) :]
        if n:
            t = time.perf_counter()
            self.completes.extend([t] * n)
            g, self.group = self.group, None
            if g is not None:
                g.hit()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _open_streams(
    streams: list[Stream], n: int, s: Settings, port: int, prefix: str, src: str | None
) -> None:
    """Open ``n`` more streams (users ``{prefix}{i}``), 500 at a time, each until its first
    checkpoint_complete."""
    target = len(streams) + n
    while len(streams) < target:
        batch = [
            Stream(f"{prefix}{len(streams) + i}") for i in range(min(500, target - len(streams)))
        ]
        group = Group(batch)
        await asyncio.gather(
            *(st.open(port, make_dev_token(s, sub=st.user, ttl_s=7200), src) for st in batch)
        )
        streams.extend(batch)
        await asyncio.wait_for(group.done, 300)


async def _client_main(cfg: str, port: int, prefix: str, src: str) -> None:
    """A helper client process: holds idle streams; commands on stdin, answers on stdout.
    ``open N`` -> ``ok TOTAL``; ``arm`` -> ``armed``, then ``done [times]`` (perf_counter of
    each stream's next checkpoint_complete: CLOCK_MONOTONIC, comparable across processes)."""
    s = load_settings(Path(cfg))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    streams: list[Stream] = []

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    async def report(group: Group, marks: list[int]) -> None:
        await asyncio.wait_for(group.done, 300)
        times = [st.completes[m] for st, m in zip(streams, marks, strict=True)]
        say("done " + orjson.dumps(times).decode())

    pending: set[asyncio.Task[None]] = set()
    while True:
        line = (await reader.readline()).decode().split()
        if not line or line[0] == "quit":
            break
        if line[0] == "open":
            await _open_streams(streams, int(line[1]), s, port, prefix, src)
            say(f"ok {len(streams)}")
        elif line[0] == "arm":
            marks = [len(st.completes) for st in streams]
            t = asyncio.create_task(report(Group(streams), marks))
            pending.add(t)
            t.add_done_callback(pending.discard)
            say("armed")
    for st in streams:
        st.close()


def client_main(argv: list[str]) -> None:
    raise_nofile()
    asyncio.run(_client_main(argv[0], int(argv[1]), argv[2], argv[3]))


class Helper:
    """The bench's handle on one helper client process."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.held = 0

    @classmethod
    async def start(cls, cfg: Path, port: int, k: int) -> Helper:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import sys; from bucketsync.bench.fanout import client_main; client_main(sys.argv[1:])",
            str(cfg),
            str(port),
            f"p{k}u",
            f"127.0.0.{k + 2}",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            limit=64 * 1_048_576,
        )
        return cls(proc)

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b"\n")

    async def answer(self, word: str) -> str:
        assert self.proc.stdout is not None
        line = (await asyncio.wait_for(self.proc.stdout.readline(), 600)).decode()
        if not line.startswith(word):
            raise RuntimeError(f"helper client process: expected {word!r}, got {line[:200]!r}")
        return line[len(word) :].strip()


async def _feed(store: Store, events: list[UpsertEvent], offset: int) -> None:
    from pipeline.rules import parse_rules

    rules = parse_rules(RULES)
    from pipeline.cdc import KafkaRecord

    plan = core.plan_batch(
        [(KafkaRecord("bench", 0, offset + i, b"", b""), ev) for i, ev in enumerate(events)],
        rules,
        {},
    )
    res = await store.apply(plan.batch)
    assert res.status == "ok", res


def _news(i: int) -> UpsertEvent:
    return {
        "action": "upsert",
        "table": "news",
        "source_table": "news",
        "key": {"id": i},
        "row": {"id": i, "title": f"news {i} {time.time()}"},
    }


def _member(user: str, lst: str) -> UpsertEvent:
    return {
        "action": "upsert",
        "table": "memberships",
        "source_table": "memberships",
        "key": {"id": f"{user}-{lst}"},
        "row": {"id": f"{user}-{lst}", "user_id": user, "list_id": lst},
    }


def _item(lst: str, i: int) -> UpsertEvent:
    return {
        "action": "upsert",
        "table": "items",
        "source_table": "items",
        "key": {"id": f"{lst}-{i}"},
        "row": {"id": f"{lst}-{i}", "list_id": lst, "title": f"item {i} of {lst}"},
    }


def _todo(user: str, i: int) -> UpsertEvent:
    return {
        "action": "upsert",
        "table": "todos",
        "source_table": "todos",
        "key": {"id": f"{user}-{i}"},
        "row": {"id": f"{user}-{i}", "owner_id": user, "description": f"todo {time.time()}"},
    }


async def run(
    settings: Settings, levels: list[int], workers: int = 1, client_procs: int = 0
) -> dict[str, Any]:
    raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="bucketsync-fanout-"))
    (tmp / "rules.yaml").write_text(RULES)
    prefix = f"bench-fanout-{uuid.uuid4().hex[:8]}"
    port = free_port()
    cfg = tmp / "bucketsync.yaml"
    sections: dict[str, dict[str, Any]] = {
        "redis": {"prefix": prefix},
        "gateway": {"port": port, "workers": workers, "keepalive_s": 20},
    }
    s = write_config(settings, cfg, sections, sync_rules=str(tmp / "rules.yaml"))
    store = Store.from_settings(s)
    offset = 0
    await _feed(store, [_news(i) for i in range(20)], offset)
    offset += 20
    gw = spawn_cli("gateway", cfg, raise_nofile=True)
    streams: list[Stream] = []
    helpers: list[Helper] = []
    result: dict[str, Any] = {
        "benchmark": "fanout",
        "split": f"gateway: one `bucketsync gateway` (workers {workers}; RSS and CPU summed over "
        f"its processes); clients: raw asyncio protocols in the bench process"
        + (f" and {client_procs} helper processes" if client_procs else "")
        + "; Redis local; all on the same cores",
        "cores": os.cpu_count(),
        "gateway_workers": workers,
        "client_processes": 1 + client_procs,
        "levels": [],
    }
    # lists with a few items each, for membership changes
    lists = [f"L{i}" for i in range(SAMPLES * len(levels) + 10)]
    await _feed(store, [_item(lst, i) for lst in lists for i in range(3)], offset)
    offset += len(lists) * 3
    next_list = 0
    try:
        await asyncio.to_thread(wait_listening, port, gw)
        await asyncio.sleep(0.5 if workers == 1 else 3.0)  # every worker listening
        base_rss = tree_rss_kb(gw.pid)
        result["gateway_rss_kb_idle"] = base_rss
        for k in range(client_procs):
            helpers.append(await Helper.start(cfg, port, k))
        for level in levels:
            share = level // (1 + client_procs)
            for h in helpers:
                h.send(f"open {share - h.held}")
            t_open = time.perf_counter()
            await _open_streams(
                streams, level - share * client_procs - len(streams), s, port, "u", None
            )
            for h in helpers:
                h.held = int(await h.answer("ok"))
            open_s = time.perf_counter() - t_open
            await asyncio.sleep(1.0)
            rss = tree_rss_kb(gw.pid)
            entry: dict[str, Any] = {
                "streams": level,
                "all_first_checkpoint_complete": True,  # _open_streams waits for each
                "open_s": round(open_s, 1),
                "gateway_rss_kb": rss,
                "rss_per_stream_bytes": round((rss - base_rss) * 1024 / level),
            }
            # one change in the bucket every stream holds, REPEAT times
            p50s, p99s, alls, cpus = [], [], [], []
            lat: list[float] = []
            for _ in range(REPEAT):
                group = Group(streams)
                marks = [len(st.completes) for st in streams]
                for h in helpers:
                    h.send("arm")
                for h in helpers:
                    await h.answer("armed")
                cpu0 = tree_cpu_seconds(gw.pid)
                t0 = time.perf_counter()
                await _feed(store, [_news(0)], offset)
                offset += 1
                await asyncio.wait_for(group.done, 300)
                times = [st.completes[m] for st, m in zip(streams, marks, strict=True)]
                for h in helpers:
                    times.extend(orjson.loads(await h.answer("done")))
                cpus.append(tree_cpu_seconds(gw.pid) - cpu0)
                lat = sorted(t - t0 for t in times)
                p50s.append(lat[len(lat) // 2] * 1000)
                p99s.append(percentile(lat, 0.99) * 1000)
                alls.append(lat[-1] * 1000)
                await asyncio.sleep(0.3)
            entry["shared_change_p50_ms"] = round(statistics.median(p50s), 1)
            entry["shared_change_p99_ms"] = round(statistics.median(p99s), 1)
            entry["shared_change_all_ms"] = round(statistics.median(alls), 1)
            entry["shared_change_p99_runs_ms"] = [round(x, 1) for x in p99s]
            entry["gateway_cpu_us_per_delivered_stream"] = round(
                statistics.median(cpus) * 1e6 / level, 1
            )
            entry["shared_change_cdf_ms"] = [
                round(x * 1000, 2) for x in lat[:: max(1, level // 200)]
            ]
            # per-user changes while every stream is open
            user_lat = []
            for i in range(SAMPLES):
                st = random.choice(streams)
                group = Group([st])
                m = len(st.completes)
                t0 = time.perf_counter()
                await _feed(store, [_todo(st.user, i)], offset)
                offset += 1
                await asyncio.wait_for(group.done, 30)
                user_lat.append(st.completes[m] - t0)
                await asyncio.sleep(0.02)
            entry["user_change_p50_ms"] = round(statistics.median(user_lat) * 1000, 2)
            entry["user_change_p99_ms"] = round(percentile(user_lat, 0.99) * 1000, 2)
            # membership changes: a user joins a list (its lookup key changes); the client
            # gets the list's bucket, its rows and checkpoint_complete on the open stream
            member_lat = []
            for _ in range(SAMPLES):
                st = random.choice(streams)
                group = Group([st])
                m = len(st.completes)
                lst = lists[next_list]
                next_list += 1
                t0 = time.perf_counter()
                await _feed(store, [_member(st.user, lst)], offset)
                offset += 1
                await asyncio.wait_for(group.done, 30)
                member_lat.append(st.completes[m] - t0)
                await asyncio.sleep(0.02)
            entry["membership_change_p50_ms"] = round(statistics.median(member_lat) * 1000, 2)
            entry["membership_change_p99_ms"] = round(percentile(member_lat, 0.99) * 1000, 2)
            result["levels"].append(entry)
            print({k: v for k, v in entry.items() if not k.endswith("cdf_ms")}, flush=True)
    finally:
        for st in streams:
            st.close()
        for h in helpers:
            with contextlib.suppress(Exception):
                h.send("quit")
                await asyncio.wait_for(h.proc.wait(), 30)
            if h.proc.returncode is None:
                h.proc.kill()
        gw.terminate()
        try:
            gw.wait(20)
        except subprocess.TimeoutExpired:
            gw.kill()
        await drop_store(store)
    return result


GOALS = {
    "rss_per_stream_bytes": "≤ 12 KB (issue 12)",
    "shared_change_p99_ms": "≤ 500 ms at 10k (issue 12)",
    "user_change_p99_ms": "≤ 20 ms",
    "membership_change_p99_ms": "≤ 100 ms",
}


def _report(res: dict[str, Any], out: Path) -> None:
    levels = res["levels"]
    head = "| measure | " + " | ".join(f"{e['streams']:,} streams" for e in levels) + " | goal |"
    lines = [head, "|" + "---|" * (len(levels) + 2)]

    def row(name: str, fmt: Any, goal: str = "") -> None:
        lines.append(f"| {name} | " + " | ".join(fmt(e) for e in levels) + f" | {goal} |")

    row(
        "all streams got their first checkpoint_complete (time to open them all)",
        lambda e: (
            f"{'yes' if e.get('all_first_checkpoint_complete') else 'no'} "
            f"({e.get('open_s', '-')} s)"
        ),
    )
    row("gateway RSS (all its processes)", lambda e: f"{e['gateway_rss_kb'] / 1024:,.0f} MB")
    row(
        "RSS per idle stream",
        lambda e: f"{e['rss_per_stream_bytes']:,} B",
        GOALS["rss_per_stream_bytes"],
    )
    row(
        "shared change → all checkpoint_complete, p50 / p99 / all (median of runs)",
        lambda e: (
            f"{e['shared_change_p50_ms']} / {e['shared_change_p99_ms']} / "
            f"{e['shared_change_all_ms']} ms"
        ),
        GOALS["shared_change_p99_ms"],
    )
    row(
        "gateway CPU per delivered stream (shared change)",
        lambda e: f"{e['gateway_cpu_us_per_delivered_stream']} µs",
    )
    row(
        "per-user change p50 / p99",
        lambda e: f"{e['user_change_p50_ms']} / {e['user_change_p99_ms']} ms",
        GOALS["user_change_p99_ms"],
    )
    row(
        "membership change → affected client's checkpoint_complete, p50 / p99",
        lambda e: f"{e['membership_change_p50_ms']} / {e['membership_change_p99_ms']} ms",
        GOALS["membership_change_p99_ms"],
    )
    md = "\n".join(lines) + "\n\n" + res["split"] + "\n"
    print(md)
    write_report(res, out, md, lambda plt: _plot(plt, levels))


def _plot(plt: Any, levels: list[dict[str, Any]]) -> None:
    _fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 4))
    for e in levels:
        cdf = e["shared_change_cdf_ms"]
        a1.plot(cdf, [i / max(1, len(cdf) - 1) for i in range(len(cdf))], label=f"{e['streams']:,}")
    a1.set_xlabel("ms after the change")
    a1.set_ylabel("streams completed (fraction)")
    a1.set_title("shared change: latency CDF (last run)")
    a1.legend(title="streams")
    xs = [e["streams"] for e in levels]
    a2.plot(xs, [e["rss_per_stream_bytes"] / 1024 for e in levels], marker="o")
    a2.set_xlabel("idle streams")
    a2.set_ylabel("KB per stream")
    a2.set_title("gateway RSS per idle stream")
    a2.set_ylim(bottom=0)
    for key, label in (
        ("shared_change_p99_ms", "shared change p99"),
        ("membership_change_p99_ms", "membership change p99"),
        ("user_change_p99_ms", "per-user change p99"),
    ):
        a3.plot(xs, [e[key] for e in levels], marker="o", label=label)
    a3.set_yscale("log")
    a3.set_xlabel("idle streams")
    a3.set_ylabel("ms")
    a3.set_title("latency p99")
    a3.legend()


def bench_fanout(
    settings: Settings,
    out: str | None,
    levels: list[int] | None = None,
    *,
    workers: int = 1,
    client_procs: int = 0,
) -> int:
    res = asyncio.run(run(settings, levels or [1000, 5000, 10000], workers, client_procs))
    _report(res, result_path(out, "fanout"))
    return 0
