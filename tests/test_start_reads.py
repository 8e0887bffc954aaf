"""The shared first read of streams starting together (gateway.starts.StartReads over
Store.read_stream_starts), against real Redis and a model of what was written."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import orjson

from gateway.starts import START_BATCHES, StartReads
from pipeline.store import BucketState, Store, write_checkpoint_key


def test_concurrent_starts_share_reads_and_each_gets_its_own_values(
    stack: Any, ns: Any, redis_client: Any
) -> None:
    rnd = random.Random(12)
    p = ns.prefix
    # the model: bucket states and write checkpoints per key, written with plain commands
    states = {f"b{i}": (rnd.randrange(2**32), rnd.randrange(1, 50), 100 + i) for i in range(40)}
    redis_client.hset(
        f"{p}:states", mapping={b: f"{c} {n} {lo} 0" for b, (c, n, lo) in states.items()}
    )
    redis_client.set(f"{p}:checkpoint", 777)
    wcps: dict[str, dict[int, dict[str, int]]] = {}
    for u in range(30):
        key = write_checkpoint_key(f"u{u}", "c")
        wcps[key] = {}
        for wid in range(1, rnd.randrange(0, 4) + 1):
            pos = {"t/0": rnd.randrange(1000)}
            wcps[key][wid] = pos
            redis_client.hset(f"{p}:wcp:{key}", f"pos:{wid}", orjson.dumps(pos))
        if wcps[key]:
            redis_client.hset(f"{p}:wcp:{key}", "id", max(wcps[key]))
    requests = []
    for u in range(30):
        names = [*rnd.sample(sorted(states), rnd.randrange(0, 6)), "never-written"]
        requests.append((names, write_checkpoint_key(f"u{u}", "c")))

    async def go() -> tuple[list[Any], float]:
        store = Store.from_url(stack.redis_url, p)
        starts = StartReads(store, window_s=0.05, max_batch=8)
        before = START_BATCHES._value.get()
        try:
            got = await asyncio.gather(*(starts.read(n, k) for n, k in requests))
        finally:
            await starts.aclose()
            await store.close()
        return got, START_BATCHES._value.get() - before

    got, batches = asyncio.run(go())
    for (names, key), (cp, st, w) in zip(requests, got, strict=True):
        assert cp == 777
        want = {b: BucketState(*states[b]) if b in states else BucketState(0, 0, 0) for b in names}
        assert st == want
        assert w == wcps[key]
    # 30 streams starting together, 8 per read at most: 4 reads, not 60
    assert batches == 4


def test_a_failed_shared_read_fails_every_waiter(stack: Any, ns: Any) -> None:
    async def go() -> list[Any]:
        store = Store.from_url(stack.redis_url, ns.prefix)
        starts = StartReads(store, window_s=0.01, max_batch=100)
        await store.rr.set(f"{ns.prefix}:states", "not a hash")  # HMGET on it fails
        try:
            return await asyncio.gather(
                *(starts.read(["b"], write_checkpoint_key("u", str(i))) for i in range(3)),
                return_exceptions=True,
            )
        finally:
            await starts.aclose()
            await store.close()

    res = asyncio.run(go())
    assert len(res) == 3 and all(isinstance(x, Exception) for x in res)
