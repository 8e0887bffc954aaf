"""``bucketsync bench fanout``: idle streams held by one gateway process.

Measures gateway RSS per stream at 1k/5k/10k idle streams, the time for one change
in a bucket shared by every stream to reach all of them (``checkpoint_complete``
received), and the latency of a per-user change while all streams are open. The
clients are raw asyncio connections in this process; the gateway is a separate
``bucketsync gateway`` process, so its RSS is its own.
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import yaml

from bucketsync.bench import _print_table, _write
from bucketsync.config import Settings, load_settings
from bucketsync.tokens import make_dev_token
from pipeline import core
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
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Stream:
    """One idle sync stream on a raw connection; records when checkpoints complete."""

    __slots__ = ("completes", "event", "reader", "user", "writer")

    def __init__(self, user: str):
        self.user = user
        self.completes: list[float] = []
        self.event = asyncio.Event()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self, port: int, token: str) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        body = orjson.dumps({"buckets": [], "raw_data": True, "client_id": self.user})
        self.writer.write(
            b"POST /sync/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Authorization: Token {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await self.writer.drain()

    async def read_loop(self) -> None:
        assert self.reader is not None
        while True:
            line = await self.reader.readline()
            if not line:
                return
            if b"checkpoint_complete" in line:
                self.completes.append(time.perf_counter())
                self.event.set()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _feed(store: Store, events: list[dict[str, Any]], offset: int) -> None:
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


def _news(i: int) -> dict[str, Any]:
    return {
        "action": "upsert",
        "table": "news",
        "source_table": "news",
        "key": {"id": i},
        "row": {"id": i, "title": f"news {i} {time.time()}"},
    }


def _todo(user: str, i: int) -> dict[str, Any]:
    return {
        "action": "upsert",
        "table": "todos",
        "source_table": "todos",
        "key": {"id": f"{user}-{i}"},
        "row": {"id": f"{user}-{i}", "owner_id": user, "description": f"todo {time.time()}"},
    }


async def run(settings: Settings, levels: list[int]) -> dict[str, Any]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = Path(tempfile.mkdtemp(prefix="bucketsync-fanout-"))
    (tmp / "rules.yaml").write_text(RULES)
    prefix = f"bench-fanout-{uuid.uuid4().hex[:8]}"
    port = _free_port()
    data = settings.model_dump(mode="json", exclude={"config_dir"})
    data["sync_rules"] = str(tmp / "rules.yaml")
    data["redis"]["prefix"] = prefix
    data["gateway"].update({"port": port, "workers": 1, "keepalive_s": 20})
    cfg = tmp / "bucketsync.yaml"
    cfg.write_text(yaml.safe_dump(data))
    s = load_settings(cfg)
    store = Store.from_url(s.redis.url, prefix)
    offset = 0
    await _feed(store, [_news(i) for i in range(20)], offset)
    offset += 20
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETSYNC_")}
    gw = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import resource as r; h=r.getrlimit(r.RLIMIT_NOFILE)[1]; "
            "r.setrlimit(r.RLIMIT_NOFILE,(h,h)); from bucketsync.cli import main; "
            f"main(['--config', {str(cfg)!r}, 'gateway'])",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    streams: list[Stream] = []
    tasks: list[asyncio.Task[None]] = []
    result: dict[str, Any] = {"benchmark": "fanout", "levels": []}
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        base_rss = _rss_kb(gw.pid)
        result["gateway_rss_kb_idle"] = base_rss
        for level in levels:
            while len(streams) < level:
                batch: list[Stream] = []
                for _ in range(min(500, level - len(streams))):
                    u = f"u{len(streams) + len(batch)}"
                    st = Stream(u)
                    batch.append(st)
                await asyncio.gather(
                    *(st.open(port, make_dev_token(s, sub=st.user, ttl_s=7200)) for st in batch)
                )
                for st in batch:
                    tasks.append(asyncio.create_task(st.read_loop()))
                streams.extend(batch)
                await asyncio.wait_for(asyncio.gather(*(st.event.wait() for st in batch)), 120)
            await asyncio.sleep(1.0)
            rss = _rss_kb(gw.pid)
            entry: dict[str, Any] = {
                "streams": level,
                "gateway_rss_kb": rss,
                "rss_per_stream_bytes": round((rss - base_rss) * 1024 / level),
            }
            # one change in the bucket every stream holds
            for st in streams:
                st.event.clear()
            marks = [len(st.completes) for st in streams]
            t0 = time.perf_counter()
            await _feed(store, [_news(0)], offset)
            offset += 1
            await asyncio.wait_for(asyncio.gather(*(st.event.wait() for st in streams)), 300)
            lat = sorted(st.completes[m] - t0 for st, m in zip(streams, marks, strict=True))
            entry["shared_change_p50_ms"] = round(lat[len(lat) // 2] * 1000, 1)
            entry["shared_change_p99_ms"] = round(lat[int(len(lat) * 0.99) - 1] * 1000, 1)
            entry["shared_change_all_ms"] = round(lat[-1] * 1000, 1)
            # per-user changes while every stream is open
            user_lat = []
            for i in range(50):
                st = random.choice(streams)
                st.event.clear()
                m = len(st.completes)
                t0 = time.perf_counter()
                await _feed(store, [_todo(st.user, i)], offset)
                offset += 1
                await asyncio.wait_for(st.event.wait(), 30)
                user_lat.append(st.completes[m] - t0)
                await asyncio.sleep(0.02)
            user_lat.sort()
            entry["user_change_p50_ms"] = round(statistics.median(user_lat) * 1000, 2)
            entry["user_change_p99_ms"] = round(user_lat[int(len(user_lat) * 0.99) - 1] * 1000, 2)
            result["levels"].append(entry)
            print(entry, flush=True)
    finally:
        for st in streams:
            st.close()
        for t in tasks:
            t.cancel()
        gw.terminate()
        try:
            gw.wait(20)
        except subprocess.TimeoutExpired:
            gw.kill()
        keys = [k async for k in store.r.scan_iter(match=f"{prefix}:*", count=5000)]
        for i in range(0, len(keys), 1000):
            await store.r.unlink(*keys[i : i + 1000])
        await store.close()
    return result


def bench_fanout(settings: Settings, out: str | None, levels: list[int] | None = None) -> int:
    res = asyncio.run(run(settings, levels or [1000, 5000, 10000]))
    rows = []
    for e in res["levels"]:
        n = e["streams"]
        rows.append((f"{n:,} streams: RSS per stream", f"{e['rss_per_stream_bytes']:,} B"))
        rows.append(
            (
                f"{n:,} streams: shared change p50/p99/all",
                f"{e['shared_change_p50_ms']} / {e['shared_change_p99_ms']} / {e['shared_change_all_ms']} ms",
            )
        )
        rows.append(
            (
                f"{n:,} streams: per-user change p50/p99",
                f"{e['user_change_p50_ms']} / {e['user_change_p99_ms']} ms",
            )
        )
    _print_table("bench fanout (one gateway process)", rows)
    _write(res, out, "fanout")
    return 0
