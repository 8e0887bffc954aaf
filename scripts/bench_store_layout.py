#!/usr/bin/env python3
"""Redis cost of the bucket-state layout, on a private redis-server (no other clients), for
before/after comparisons of store changes on a shared, loaded machine.

Measures the CPU time the redis-server process spends (from /proc, so other processes'
load inflates it far less than wall time):

- ``read``: one sync request's atomic read for a user with 1,000 memberships (checkpoint,
  1,000 bucket states, lookup rows; what ``bucketsync bench lookups`` times end to end),
  per read, and the request's wall time (``BucketResolver.resolve``, warm);
- ``apply``: one ``apply_batch.lua`` call of 500 todo upserts spread over ``--buckets``
  buckets, per batch.

Run it with the code to measure first on the path, e.g. an exported older commit::

    git archive <commit> | tar -x -C /tmp/base
    (cd /tmp && PYTHONPATH=/tmp/base python3 /path/to/scripts/bench_store_layout.py read)
    (cd /tmp && PYTHONPATH=$PWD_OF_WORKTREE python3 scripts/bench_store_layout.py read)

(run from a directory that holds no ``bucketsync`` package, so PYTHONPATH decides).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from typing import Any

import redis as sync_redis

from gateway import bench_lookups as bl
from gateway.buckets import BucketResolver
from pipeline import core
from pipeline.cdc import KafkaRecord
from pipeline.rules import parse_rules
from pipeline.store import Store

APPLY_RULES = """
bucket_definitions:
  by_list:
    parameters: SELECT request.jwt() ->> 'l' AS list_id
    data:
      - SELECT id, list_id, title FROM todos WHERE list_id = bucket.list_id
"""


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _read(url: str, pid: int, requests: int) -> dict[str, Any]:
    store = Store.from_url(url, f"layout-{uuid.uuid4().hex[:8]}")
    rules = parse_rules(bl.RULES)
    n = 1000
    await bl._apply(store, rules, [bl._member(i, "heavy", f"L{i}") for i in range(n)], bl._MT)
    await bl._apply(store, rules, [bl._todo(i, f"L{i}") for i in range(n)], bl._TT)
    r = BucketResolver(
        rules,
        {"sub": "heavy"},
        {},
        include_defaults=True,
        max_buckets=n + 10,
        max_parameter_results=n + 10,
    )
    await r.resolve(store)
    c0 = _cpu_s(pid)
    times = []
    for _ in range(requests):
        t0 = time.perf_counter()
        await r.resolve(store)
        times.append(time.perf_counter() - t0)
    c1 = _cpu_s(pid)
    await store.close()
    return {
        "what": "read",
        "requests": requests,
        "redis_cpu_ms_per_read": round((c1 - c0) * 1000 / requests, 3),
        "request_ms_median": round(statistics.median(times) * 1000, 3),
    }


async def _apply(url: str, pid: int, buckets: int, batches: int) -> dict[str, Any]:
    store = Store.from_url(url, f"layout-{uuid.uuid4().hex[:8]}")
    rules = parse_rules(APPLY_RULES)
    off = 0
    plans = []
    for _ in range(batches + 1):
        items = []
        for _ in range(500):
            off += 1
            ev = bl._todo(off, f"L{off % buckets}")
            items.append((KafkaRecord(bl._TT, 0, off, b"", b""), ev))
        plans.append(core.plan_batch(items, rules, {}).batch)
    await store.apply(plans[0])
    c0 = _cpu_s(pid)
    for p in plans[1:]:
        assert (await store.apply(p)).status == "ok"
    c1 = _cpu_s(pid)
    await store.close()
    return {
        "what": "apply",
        "buckets": buckets,
        "batches": batches,
        "redis_cpu_ms_per_batch": round((c1 - c0) * 1000 / batches, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["read", "apply"])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--buckets", type=int, default=20)
    ap.add_argument("--batches", type=int, default=40)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            cwd=tmp,
            stdout=subprocess.DEVNULL,
        )
        try:
            url = f"redis://127.0.0.1:{port}/0"
            client = sync_redis.Redis.from_url(url)
            for _ in range(200):
                try:
                    client.ping()
                    break
                except sync_redis.ConnectionError:
                    if proc.poll() is not None:
                        raise SystemExit(f"redis-server exited with {proc.returncode}") from None
                    time.sleep(0.05)
            else:
                raise SystemExit("redis-server did not answer within 10 s")
            if args.what == "read":
                res = asyncio.run(_read(url, proc.pid, args.requests))
            else:
                res = asyncio.run(_apply(url, proc.pid, args.buckets, args.batches))
            print(json.dumps(res))
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
