"""The apply step's fencing and the processor's row cache, against the real Redis.

The row index is resolved in the processor (``pipeline/rowindex.py``) and written in one
MULTI/EXEC guarded by WATCH; these tests put a second writer in the window between the
resolve and the EXEC, and make the cache stale in every way another writer can (another
processor's TRUNCATE, a takeover of the partition, an evicted row), then compare each bucket
with an independent model: the rows the events leave in it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
import pytest

from pipeline import core
from pipeline.compaction import verify
from pipeline.store import PlannedBatch, Store

pytestmark = pytest.mark.stack


class Out:
    def __init__(self, bucket: str, object_id: str, data: str) -> None:
        self.bucket, self.object_type, self.object_id, self.data = bucket, "todos", object_id, data


def upsert(table: str, key: str, *outs: Out) -> dict[str, Any]:
    rk = core.row_key(table, {"id": key})
    return {"k": rk, "t": table, "o": [core.output_entry(o) for o in outs], "s": "{}"}


def delete(table: str, key: str) -> dict[str, Any]:
    return {"k": core.row_key(table, {"id": key}), "t": table, "o": False, "s": False}


def batch(tp: str, first: int, events: list[dict[str, Any]]) -> PlannedBatch:
    return PlannedBatch(events, {tp: first}, {tp: first + len(events) - 1})  # type: ignore[arg-type]


class Model:
    """What each bucket must show: object id -> data, from the events alone."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}  # row key -> bucket -> its op (wire JSON)
        self.data: dict[str, dict[str, str]] = {}

    def apply(self, events: list[dict[str, Any]]) -> None:
        for ev in events:
            if "truncate" in ev:
                for rk in [rk for rk in self.rows if rk.startswith(ev["truncate"] + "\x1f")]:
                    self._set(rk, {})
                continue
            outs = ev["o"] or []
            self._set(ev["k"], {o[0]: orjson.loads(b"{" + o[5]) for o in outs})

    def _set(self, rk: str, outs: dict[str, Any]) -> None:
        self.rows[rk] = {b: tail for b, tail in outs.items()}

    def buckets(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for per_bucket in self.rows.values():
            for b, op in per_bucket.items():
                out.setdefault(b, {})[op["object_id"]] = op["data"]
        return out


async def replayed(store: Store) -> dict[str, dict[str, str]]:
    """Each bucket's rows as a client downloading the whole log ends up with."""
    out: dict[str, dict[str, str]] = {}
    for b in await store.all_buckets():
        rows: dict[str, str] = {}
        last = 0
        for op in await store.all_ops(b):
            assert op.op_id > last  # op ids unique and ascending
            last = op.op_id
            w = orjson.loads(op.wire)
            if w["op"] == "PUT":
                rows[w["object_id"]] = w["data"]
            elif w["op"] == "REMOVE":
                rows.pop(w["object_id"], None)
        if rows:
            out[b] = rows
    return out


def run(stack: Any, ns: Any, fn: Callable[..., Coroutine[Any, Any, None]], n: int = 2) -> None:
    async def go() -> None:
        stores = [Store.from_url(stack.redis_url, ns.prefix) for _ in range(n)]
        try:
            await fn(*stores)
        finally:
            for s in stores:
                await s.close()

    asyncio.run(go())


BUCKETS = ["b0", "b1", "b2", "b3"]


def test_a_writer_between_resolve_and_exec_makes_the_batch_resolve_again(stack, ns) -> None:
    """Another processor's batch lands after this one was resolved (its op ids are taken):
    the EXEC is refused by WATCH, the batch is resolved again with the new sequence, and no
    op id is used twice."""
    model = Model()

    async def go(a: Store, b: Store) -> None:
        first = [upsert("t1", "x", Out("B", "x", '"x1"')), upsert("t2", "y", Out("B", "y", '"y1"'))]
        await a.apply(batch("t1/0", 0, first[:1]))
        await b.apply(batch("t2/0", 0, first[1:]))
        model.apply(first)
        intruder = [
            upsert("t2", "y", Out("B", "y", '"y2"')),
            upsert("t2", "z", Out("C", "z", '"z"')),
        ]
        mine = [upsert("t1", "x", Out("B", "x", '"x2"')), upsert("t1", "w", Out("C", "w", '"w"'))]
        real = a._resolve
        intruded: list[Any] = []

        async def resolve_then_intrude(*args: Any) -> Any:
            res = await real(*args)
            if not intruded:
                intruded.append(await b.apply(batch("t2/0", 1, intruder)))
            return res

        a._resolve = resolve_then_intrude  # type: ignore[method-assign,assignment]
        res = await a.apply(batch("t1/0", 1, mine))
        model.apply(intruder)
        model.apply(mine)
        assert intruded[0].status == "ok" and res.status == "ok"
        assert res.checkpoint == 6 == await a.checkpoint()
        assert await replayed(a) == model.buckets()
        assert (await verify(a)).differences == []

    run(stack, ns, go)


def test_a_truncate_by_another_processor_empties_this_ones_cache(stack, ns) -> None:
    """Processor A cached row x; processor B truncates x's table (it walks every slot, A's
    rows too). A's next change of x must see the row as new: no MOVE of an op the TRUNCATE
    already removed, no second REMOVE."""
    model = Model()

    async def go(a: Store, b: Store) -> None:
        evs = [upsert("t", "x", Out("B", "x", '"x1"'))]
        await a.apply(batch("t/0", 0, evs))
        model.apply(evs)
        trunc: list[dict[str, Any]] = [{"truncate": "t"}]
        await b.apply(batch("t/1", 0, trunc))
        model.apply(trunc)
        evs = [upsert("t", "x", Out("B", "x", '"x2"')), delete("t", "x")]
        await a.apply(batch("t/0", 1, evs[:1]))
        await a.apply(batch("t/0", 2, evs[1:]))
        model.apply(evs)
        ops = [(o.kind, o.target) for o in await a.all_ops("B")]
        # PUT x1 -> MOVE (by the TRUNCATE's REMOVE), REMOVE, PUT x2 -> MOVE, REMOVE
        assert [k for k, _ in ops] == ["MOVE", "REMOVE", "MOVE", "REMOVE"]
        assert await replayed(a) == model.buckets()
        assert (await verify(a)).differences == []

    run(stack, ns, go)


def test_a_processor_that_lost_its_partition_is_refused_and_forgets_its_rows(stack, ns) -> None:
    """A cached row x, then B took the partition over and changed x. A's late batch is
    refused as stale; after reading its offsets again A continues from B's rows, not from
    its stale cache."""
    model = Model()

    async def go(a: Store, b: Store) -> None:
        e0 = [upsert("t", "x", Out("B", "x", '"x1"'))]
        await a.apply(batch("t/0", 0, e0))
        model.apply(e0)
        e1 = [upsert("t", "x", Out("C", "x", '"x2"'))]  # x moves from bucket B to C
        assert (await b.apply(batch("t/0", 1, e1))).status == "ok"
        model.apply(e1)
        late = [upsert("t", "x", Out("B", "x", '"late"'))]
        res = await a.apply(batch("t/0", 1, late))
        assert res.status == "stale" and res.stored_offset == 1
        e2 = [upsert("t", "x", Out("D", "x", '"x3"'))]
        assert (await a.apply(batch("t/0", 2, e2))).status == "ok"
        model.apply(e2)
        assert await replayed(a) == model.buckets()
        assert (await verify(a)).differences == []

    run(stack, ns, go)


def test_rows_evicted_from_the_cache_are_read_back(stack, ns) -> None:
    """A cache of 2 rows over 30 rows changed in many batches writes exactly what an
    unbounded cache writes (same ops, same ids): misses are read from Redis."""
    import random

    rng = random.Random(5)
    batches = []
    for n in range(40):
        evs = []
        for _ in range(rng.randrange(1, 6)):
            key = f"r{rng.randrange(30)}"
            if rng.random() < 0.15:
                evs.append(delete("t", key))
            else:
                evs.append(
                    upsert(
                        "t",
                        key,
                        *[Out(b, key, f'"{n}"') for b in rng.sample(BUCKETS, rng.randrange(3))],
                    )
                )
        batches.append(evs)

    logs: list[dict[str, list[tuple[int, bytes]]]] = []

    async def go(store: Store, limit: int) -> None:
        store.rows.limit = limit
        off = 0
        for evs in batches:
            assert (await store.apply(batch("t/0", off, evs))).status == "ok"
            off += len(evs)
        assert len(store.rows.rows) <= max(limit, 1) + 5
        logs.append(
            {
                b: [(o.op_id, o.wire) for o in await store.all_ops(b)]
                for b in await store.all_buckets()
            }
        )
        keys = await store.r.keys(f"{store.prefix}:*")
        await store.r.delete(*keys)

    async def both(s: Store) -> None:
        await go(s, 1_000_000)
        s.rows.clear()
        s.rows.epoch = None
        await go(s, 2)

    run(stack, ns, both, n=1)
    assert logs[0] == logs[1]


def test_a_state_change_in_the_fenced_window_retries_without_resolving_again(stack, ns) -> None:
    """A compaction step (another client) changes P:states between the fenced read and the
    EXEC: the transaction is refused, the states are read again, and the batch goes in
    without being resolved again (its op ids did not move); the bucket totals include the
    other writer's change."""
    model = Model()

    async def go(a: Store, b: Store) -> None:
        evs = [upsert("t", "x", Out("B", "x", '"x1"'))]
        await a.apply(batch("t/0", 0, evs))
        model.apply(evs)
        real_call, real_resolve = a._call, a._resolve
        resolves: list[int] = []
        intruded: list[bool] = []

        async def call(conn: Any, commands: list[bytes]) -> list[Any]:
            if commands and commands[-1].endswith(b"EXEC\r\n") and not intruded:
                intruded.append(True)  # another client: the state of an unrelated bucket
                await b.r.hset(f"{b.prefix}:states", "Z", "5 1 1 0")
            return await real_call(conn, commands)

        async def resolve(*args: Any) -> Any:
            resolves.append(1)
            return await real_resolve(*args)

        a._call = call  # type: ignore[method-assign]
        a._resolve = resolve  # type: ignore[method-assign,assignment]
        evs = [upsert("t", "x", Out("B", "x", '"x2"')), upsert("t", "y", Out("Z", "y", '"y"'))]
        assert (await a.apply(batch("t/0", 1, evs))).status == "ok"
        model.apply(evs)
        assert intruded and len(resolves) == 1
        state = await a.bucket_state("Z")
        assert state.count == 2  # the other writer's op count plus this batch's
        assert await replayed(a) == model.buckets()

    run(stack, ns, go)


def test_a_truncate_without_ops_by_another_processor_is_not_resolved_against_the_old_cache(
    stack, ns
) -> None:
    """A TRUNCATE of a table whose rows feed parameter lookups only (no bucket ops: the op
    sequence does not move, ``P:ri_epoch`` does). Processor A cached row m1; B truncates the
    table; A inserts m1 again with the same lookup value. A's first attempt was resolved
    against its stale cache (m1 already there, nothing to write); the epoch fence refuses
    it, and the retry must resolve again from the store (m1 is new: its index entry and
    its lookup count come back), not reuse the resolution made from the emptied cache."""
    lookup = [["mem_by_user", '["u1"]']]

    def mem(key: str) -> dict[str, Any]:
        rk = core.row_key("mem", {"id": key})
        return {"k": rk, "t": "mem", "o": [], "s": False, "l": lookup}

    async def counts(s: Store) -> dict[bytes, bytes]:
        return dict(await s.r.hgetall(s.k("lookup", "mem_by_user")))

    async def go(a: Store, b: Store) -> None:
        await a.apply(batch("mem/0", 0, [mem("m1")]))
        await b.apply(batch("mem/1", 0, [mem("m2")]))
        assert await counts(a) == {b'["u1"]': b"2"}  # two rows give the value
        seq = await a.checkpoint()
        await b.apply(batch("mem/1", 1, [{"truncate": "mem"}]))
        assert await counts(a) == {}
        assert await a.checkpoint() == seq  # no ops: the sequence did not move
        await a.apply(batch("mem/0", 1, [mem("m1")]))  # m1 inserted again after the TRUNCATE
        # the model: one row (m1) gives the value
        assert await counts(a) == {b'["u1"]': b"1"}
        assert (await a.read_lookups(["mem_by_user"])) is not None
        # m1 is indexed again: deleting it takes the value away
        await a.apply(batch("mem/0", 2, [delete("mem", "m1")]))
        assert await counts(a) == {}

    run(stack, ns, go)


def test_a_truncate_sees_rows_another_processor_wrote_without_ops(stack, ns) -> None:
    """Processor B's TRUNCATE reads every row of the table (every partition's) while
    processor A writes a row of that table whose change makes no bucket op (a lookup-only
    row: ``P:seq`` does not move) between that read and B's EXEC. A's write committed first,
    so the TRUNCATE must take that row away too: no lookup value, no index entry, left
    behind (the model: the table is empty after the TRUNCATE)."""
    lookup = [["mem_by_user", '["u1"]']]

    def mem(key: str, lk: list[list[str]]) -> dict[str, Any]:
        rk = core.row_key("mem", {"id": key})
        return {"k": rk, "t": "mem", "o": [], "s": False, "l": lk}

    async def counts(s: Store) -> dict[bytes, bytes]:
        return dict(await s.r.hgetall(s.k("lookup", "mem_by_user")))

    async def go(a: Store, b: Store) -> None:
        await a.apply(batch("mem/0", 0, [mem("m1", lookup)]))
        await b.apply(batch("mem/1", 0, [mem("m2", lookup)]))
        real = b._resolve
        intruded: list[Any] = []

        async def resolve_then_intrude(*args: Any) -> Any:
            res = await real(*args)
            if not intruded:  # A's partition: a new row, and m1 with another value
                evs = [mem("m3", lookup), mem("m1", [["mem_by_user", '["u2"]']])]
                intruded.append(await a.apply(batch("mem/0", 1, evs)))
            return res

        b._resolve = resolve_then_intrude  # type: ignore[method-assign,assignment]
        seq = await a.checkpoint()
        res = await b.apply(batch("mem/1", 1, [{"truncate": "mem"}]))
        assert intruded[0].status == "ok" and res.status == "ok"
        assert await a.checkpoint() == seq  # no op anywhere: only the lookups moved
        assert await counts(a) == {}
        assert await a.r.hgetall(a.k("lookup", "mem_by_user")) == {}
        ri = [k async for k in a.r.scan_iter(match=a.k("ri", "mem:*"))]
        rl = [k async for k in a.r.scan_iter(match=a.k("rl", "mem:*"))]
        assert ri == [] and rl == []
        # A's cache must not resurrect m3 either: deleting it changes nothing
        await a.apply(batch("mem/0", 3, [delete("mem", "m3")]))
        assert await counts(a) == {}

    run(stack, ns, go)
