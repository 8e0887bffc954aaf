"""Running `bucketsync processor` as a separate process, as a user does, for tests that
kill, restart and race processors, and reading what it reached from the store."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import redis
import yaml
from confluent_kafka import Consumer, TopicPartition

from bucketsync.bench.procs import child_env
from bucketsync.config import Settings
from bucketsync.run import child_argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp: Path, s: Settings, name: str, **over: dict[str, Any]) -> Path:
    """The settings as a YAML file, with sections overridden."""
    data = s.model_dump(mode="json", exclude={"config_dir"})
    for section, values in over.items():
        data[section].update(values)
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def start_processor(
    cfg: Path, driver: str, log: IO[bytes] | None = None, *, inherit_output: bool = False
) -> subprocess.Popen[bytes]:
    """``bucketsync processor`` on ``cfg``, without the caller's ``BUCKETSYNC_*`` variables;
    its output to ``log``, else to the test's own output (``inherit_output``), else dropped."""
    env = child_env()
    out: IO[bytes] | int | None = subprocess.DEVNULL
    if log is not None:
        out = log
    elif inherit_output:
        out = None
    return subprocess.Popen(
        child_argv("processor", str(cfg), "--driver", driver),
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT if log is not None else out,
    )


def stop(p: subprocess.Popen[bytes], timeout: float = 60) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def end_offsets(bootstrap: str, topics: Iterable[tuple[str, int]]) -> dict[str, int]:
    """``topic/partition`` -> offset of the last record (high watermark - 1)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "bucketsync-test-watermarks"})
    try:
        out = {}
        for topic, parts in topics:
            for p in range(parts):
                _low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                if high > 0:
                    out[f"{topic}/{p}"] = high - 1
        return out
    finally:
        c.close()


def applied_offsets(r: redis.Redis, prefix: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall(f"{prefix}:offsets").items()}


def wait_applied(
    r: redis.Redis,
    prefix: str,
    targets: dict[str, int],
    timeout: float = 120,
    proc: subprocess.Popen[bytes] | None = None,
) -> float:
    """Wait until every partition's applied offset reaches its target; returns the time."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        have = applied_offsets(r, prefix)
        if all(have.get(tp, -1) >= off for tp, off in targets.items()):
            return time.monotonic() - t0
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"processor exited with {proc.returncode}")
        time.sleep(0.05)
    have = applied_offsets(r, prefix)
    behind = {tp: (have.get(tp), off) for tp, off in targets.items() if have.get(tp, -1) < off}
    raise AssertionError(f"not applied within {timeout}s: (applied, wanted) {behind}")


def drop_prefix(r: redis.Redis, prefix: str) -> None:
    keys = list(r.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        r.unlink(*keys)
