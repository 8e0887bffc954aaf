"""Outages of the store: Redis SIGKILLed in the middle of a backlog and restarted from its
AOF. The processor does not exit: it waits for Redis with backoff, takes the store's
applied offsets as the truth again (an AOF may lack the last second of writes) and reads
everything after them again; every bucket ends equal to the reference model.

Runs against a private redis-server (its own port and AOF directory), never the shared
stack's, so that killing it disturbs no other test."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.pipeline_helpers import store_buckets, store_view
from tests.processes import (
    applied_offsets,
    drop_prefix,
    free_port,
    start_processor,
    stop,
    wait_applied,
    write_config,
)
from tests.test_backlog import _setup, assert_matches_model, live_rows

pytestmark = pytest.mark.stack


def assert_live_rows_match(settings: Any, model: Any) -> None:
    view = asyncio.run(store_view(settings, asyncio.run(store_buckets(settings))))
    got = {b: rows for b, v in view.items() if (rows := live_rows(v["ops"]))}
    want = {b: rows for b, m in model.buckets.items() if (rows := m.live_rows())}
    assert got == want


class PrivateRedis:
    def __init__(self, folder: Path):
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.port = free_port()
        self.argv = [
            exe,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(folder),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url).ping():
                    return
            except redis.exceptions.RedisError:
                time.sleep(0.05)
        raise AssertionError("private redis-server did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.mark.parametrize(("driver", "compact_s"), [("kafka", 0.2), ("faust", 0.0), ("faust", 0.2)])
def test_redis_killed_mid_backlog_and_restarted_from_aof(
    driver: str, compact_s: float, make_settings: Any, create_topic: Any, ns: Any, tmp_path: Path
) -> None:
    """``compact_s``: the scheduled compaction runs (and fails) during the outage too; the
    Faust driver's compaction timer crashed the worker on it (qa-streams seed 622)."""
    red = PrivateRedis(tmp_path)
    red.start()
    try:
        _t, s, model, ends = _setup(
            make_settings, create_topic, ns, tmp_path, 21, redis_url=red.url
        )
        cfg = write_config(
            tmp_path,
            s,
            "proc",
            processor={"batch_max_events": 20, "metrics_port": 0},
            compaction={"interval_s": compact_s},
        )
        r = redis.Redis.from_url(red.url)
        p = start_processor(cfg, driver)
        try:
            total = sum(ends.values())
            deadline = time.monotonic() + 90
            while sum(applied_offsets(r, s.redis.prefix).values()) < total // 4:
                assert time.monotonic() < deadline and p.poll() is None
                time.sleep(0.01)
            red.kill()  # mid-backlog, most likely mid-batch
            time.sleep(2.0)
            assert p.poll() is None, "the processor exited when Redis went away"
            red.start()  # from its AOF
            wait_applied(r, s.redis.prefix, ends, timeout=120, proc=p)
            assert p.poll() is None
        finally:
            stop(p)
        if compact_s:  # compaction rewrites logs (checksums, counts): the live rows only
            assert_live_rows_match(s, model)
        else:
            assert_matches_model(s, model)
        drop_prefix(r, s.redis.prefix)
    finally:
        if red.proc is not None and red.proc.poll() is None:
            red.kill()


async def _readiness(session: Any, url: str) -> int | None:
    import aiohttp

    try:
        async with session.get(url + "/probes/readiness") as r:
            return int(r.status)
    except aiohttp.ClientError:
        return None


async def _wait_status(session: Any, url: str, want: int, timeout: float = 30) -> None:
    import asyncio

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await _readiness(session, url) == want:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"readiness never answered {want}")


async def _sync_rows(session: Any, url: str, token: str) -> dict[tuple[str, str], str]:
    from bucketsync.simclient import ClientState, stream_once

    st = ClientState()

    def done(kind: str, state: ClientState) -> bool:
        return kind == "checkpoint_complete"

    status = await stream_once(session, url, token, st, on_line=done, timeout_s=30)
    assert status == 200 and st.mismatches == [] and st.completed
    return {k: v[1] for b in st.buckets.values() for k, v in b.rows.items()}


async def test_gateway_stays_up_through_redis_outages(
    make_settings: Any, create_topic: Any, ns: Any, tmp_path: Path
) -> None:
    """Redis unreachable when the gateway starts, then killed mid-stream and restarted:
    the gateway process stays up, readiness follows Redis, no traceback is logged, and a
    client afterwards gets exactly the model's rows."""
    import aiohttp

    from bucketsync.run import child_argv
    from bucketsync.tokens import make_dev_token
    from tests.model import BucketModel
    from tests.pipeline_helpers import debezium_json, model_rules, produce, write_rules

    red = PrivateRedis(tmp_path)
    topic = create_topic(ns.topic("app.public.todos"))
    port = free_port()
    s = make_settings(
        kafka={"topics": [topic]},
        sync_rules=write_rules(tmp_path),
        redis={"url": red.url},
        gateway={"port": port},
        processor={"metrics_port": 0},
        compaction={"interval_s": 0},
    )
    cfg = write_config(tmp_path, s, "all")
    url = f"http://127.0.0.1:{port}"
    model = BucketModel(model_rules)
    n = 0

    def write(count: int) -> None:
        nonlocal n
        msgs = []
        for _ in range(count):
            n += 1
            row = {"id": n % 37, "owner_id": "u1", "title": f"v{n}", "done": 0}
            msgs.append(debezium_json("todos", "u", {"id": n % 37}, row))
            model.upsert("todos", {"id": n % 37}, row)
        produce(s.kafka.bootstrap_servers, topic, msgs)

    def expected() -> dict[tuple[str, str], str]:
        return model.buckets['by_user["u1"]'].live_rows()

    log = open(tmp_path / "gateway.log", "wb")  # noqa: SIM115
    gw = subprocess.Popen(child_argv("gateway", str(cfg)), stdout=log, stderr=subprocess.STDOUT)
    proc = None
    token = make_dev_token(s, sub="u1")
    try:
        async with aiohttp.ClientSession() as session:
            # 1. Redis down at start: up, not ready
            deadline = time.monotonic() + 30
            while (status := await _readiness(session, url)) is None:
                assert time.monotonic() < deadline and gw.poll() is None
                time.sleep(0.2)
            assert status == 400
            red.start()
            await _wait_status(session, url, 200)
            proc = start_processor(cfg, "kafka")
            write(50)
            r = redis.Redis.from_url(red.url)
            wait_applied(r, s.redis.prefix, {f"{topic}/0": n - 1}, 60, proc)
            assert await _sync_rows(session, url, token) == expected()
            # 2. killed mid-stream and restarted from its AOF
            red.kill()
            await _wait_status(session, url, 400)
            assert gw.poll() is None and proc.poll() is None
            write(20)
            red.start()
            await _wait_status(session, url, 200)
            wait_applied(r, s.redis.prefix, {f"{topic}/0": n - 1}, 60, proc)
            assert await _sync_rows(session, url, token) == expected()
            assert gw.poll() is None
    finally:
        if proc is not None:
            stop(proc)
        stop(gw)
        log.close()
        if red.proc is not None and red.proc.poll() is None:
            red.kill()
    text = (tmp_path / "gateway.log").read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]


@pytest.mark.parametrize("driver", ["kafka", "faust"])
def test_processor_started_while_redis_is_down_waits_for_it(
    driver: str, make_settings: Any, create_topic: Any, ns: Any, tmp_path: Path
) -> None:
    """A processor started before its Redis (a compose file or a reboot starting services
    in any order) waits for the store instead of exiting, then applies the whole backlog."""
    red = PrivateRedis(tmp_path)
    try:
        _t, s, model, ends = _setup(
            make_settings, create_topic, ns, tmp_path, 23, redis_url=red.url
        )
        cfg = write_config(
            tmp_path, s, "proc", processor={"batch_max_events": 50, "metrics_port": 0}
        )
        log = (tmp_path / "proc.log").open("ab")
        p = start_processor(cfg, driver, log)
        try:
            # until the processor has tried the store (Faust's agent starts only once the
            # group assigned its partitions), or exited
            deadline = time.monotonic() + 60
            while p.poll() is None and time.monotonic() < deadline:
                if b"store unreachable at start" in (tmp_path / "proc.log").read_bytes():
                    break
                time.sleep(0.2)
            time.sleep(1.0)
            assert p.poll() is None, "the processor exited because Redis was down at start"
            red.start()
            r = redis.Redis.from_url(red.url)
            try:
                wait_applied(r, s.redis.prefix, ends, timeout=120, proc=p)
            except AssertionError:
                print((tmp_path / "proc.log").read_text()[-4000:])
                raise
            assert p.poll() is None
        finally:
            stop(p)
            log.close()
        assert_matches_model(s, model)
    finally:
        if red.proc is not None and red.proc.poll() is None:
            red.kill()


async def test_scheduled_compaction_logs_one_line_while_redis_is_away(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The kafka driver's compaction schedule, with nothing listening at the store's
    address: each run logs one warning naming the outage, no traceback per interval."""
    import asyncio
    import logging

    from bucketsync.config import Settings
    from pipeline import compaction
    from pipeline.store import Store
    from tests.processes import free_port

    settings = Settings(
        redis={"url": f"redis://127.0.0.1:{free_port()}/0", "prefix": "t-away"},
        compaction={"interval_s": 0.05},
    )
    store = Store.from_settings(settings)
    stop = asyncio.Event()
    caplog.set_level(logging.WARNING, logger="bucketsync.compaction")
    task = asyncio.create_task(compaction.schedule(settings, store, stop))
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.wait_for(task, 10)
    await store.close()
    runs = [r for r in caplog.records if "compaction" in r.getMessage()]
    assert runs, "no compaction run was attempted"
    assert all(r.exc_info is None for r in runs), "a traceback was logged"
    assert all("store unreachable" in r.getMessage() for r in runs)
