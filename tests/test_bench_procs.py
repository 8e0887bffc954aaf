"""The benchmarks' process helpers against real processes: a private redis-server, a primary
with a replica that replicates, waiting for a listener, and /proc readings of a process tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from bucketsync.bench.procs import (
    primary_and_replica,
    private_redis,
    process_tree,
    stop,
    tree_rss_kb,
    wait_for,
    wait_listening,
)
from bucketsync.bench.report import percentile

needs_redis_server = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server not installed"
)


@needs_redis_server
def test_private_redis_answers_and_stops(tmp_path: Path) -> None:
    own = private_redis(tmp_path)
    assert own is not None
    proc, url = own
    try:
        r = redis.Redis.from_url(url)
        assert r.ping()
        r.close()
    finally:
        assert stop(proc) is not None
    assert proc.poll() is not None


@needs_redis_server
def test_primary_and_replica_replicate(tmp_path: Path) -> None:
    servers, primary_url, replica_url = primary_and_replica(tmp_path)
    try:
        primary = redis.Redis.from_url(primary_url)
        replica = redis.Redis.from_url(replica_url)
        primary.set("k", "v")
        wait_for(lambda: replica.get("k") == b"v", 20, "replication")
        with pytest.raises(redis.ResponseError):
            replica.set("k", "w")  # read-only
        primary.close()
        replica.close()
    finally:
        for srv in servers:
            stop(srv)


def test_wait_listening_raises_when_the_process_exits(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait(10)
    with pytest.raises(RuntimeError, match=r"exited \(3\)"):
        wait_listening(1, proc, tmp_path / "x.log", timeout=5)


def test_process_tree_sees_a_child() -> None:
    code = "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(30)']); time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        wait_for(lambda: len(process_tree(parent.pid)) >= 2, 20, "the child")
        tree = process_tree(parent.pid)
        assert tree[0] == parent.pid and len(tree) == 2
        assert tree_rss_kb(parent.pid) > 0
    finally:
        for pid in reversed(process_tree(parent.pid)):
            subprocess.run(["kill", "-9", str(pid)], check=False)
        parent.wait(10)


@pytest.mark.parametrize(
    ("values", "q", "want"),
    [
        ([5, 1, 3, 2, 4], 0.5, 3),
        ([5, 1, 3, 2, 4], 0.99, 5),
        ([7], 0.01, 7),
        (list(range(1, 101)), 0.9, 90),
    ],
)
def test_percentile_is_nearest_rank(values: list[float], q: float, want: float) -> None:
    assert percentile(values, q) == want
