"""Outages of the store: Redis SIGKILLed in the middle of a backlog and restarted from its
AOF. The processor does not exit: it waits for Redis with backoff, takes the store's
applied offsets as the truth again (an AOF may lack the last second of writes) and reads
everything after them again; every bucket ends equal to the reference model.

Runs against a private redis-server (its own port and AOF directory), never the shared
stack's, so that killing it disturbs no other test."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.processes import (
    applied_offsets,
    drop_prefix,
    start_processor,
    stop,
    wait_applied,
    write_config,
)
from tests.test_backlog import _setup, assert_matches_model

pytestmark = pytest.mark.stack


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    def __init__(self, folder: Path):
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.port = _free_port()
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


@pytest.mark.parametrize("driver", ["kafka", "faust"])
def test_redis_killed_mid_backlog_and_restarted_from_aof(
    driver: str, make_settings: Any, create_topic: Any, ns: Any, tmp_path: Path
) -> None:
    red = PrivateRedis(tmp_path)
    red.start()
    try:
        _t, s, model, ends = _setup(
            make_settings, create_topic, ns, tmp_path, 21, redis_url=red.url
        )
        cfg = write_config(
            tmp_path, s, "proc", processor={"batch_max_events": 20, "metrics_port": 0}
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
        assert_matches_model(s, model)
        drop_prefix(r, s.redis.prefix)
    finally:
        if red.proc is not None and red.proc.poll() is None:
            red.kill()
