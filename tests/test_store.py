"""The store's atomic batch step, against the real Redis (no Kafka needed)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson
import pytest

from pipeline import core
from pipeline.compaction import compact, verify
from pipeline.store import PlannedBatch, Store

pytestmark = pytest.mark.stack


@dataclass
class Out:
    bucket: str
    object_type: str
    object_id: str
    data: str


V1 = '{"id":"t1","description":"Buy milk","completed":0}'
V2 = '{"id":"t1","description":"Buy oat milk","completed":1}'


def upsert(key: str, *outs: Out) -> dict:
    return {"k": key, "t": "todos", "o": [core.output_entry(o) for o in outs], "s": "{}"}


def delete(key: str) -> dict:
    return {"k": key, "t": "todos", "o": False, "s": False}


def run(coro):
    return asyncio.run(coro)


async def _with_store(stack, ns, fn):
    store = Store.from_url(stack.redis_url, ns.prefix)
    try:
        return await fn(store)
    finally:
        await store.close()


def test_worked_example_checksums_move_and_remove(stack, ns) -> None:
    """sync-protocol.md §5.3: PUT, PUT, REMOVE of one row; then compaction to one CLEAR."""

    async def go(store: Store) -> None:
        b = PlannedBatch(
            events=[
                upsert("r1", Out('by_user["u1"]', "todos", "t1", V1)),
                upsert("r1", Out('by_user["u1"]', "todos", "t1", V2)),
                upsert("r1", Out('by_user["u1"]', "todos", "t1", V2)),  # unchanged: no op
                delete("r1"),
            ],
            guard={"t/0": 0},
            offsets={"t/0": 3},
        )
        res = await store.apply(b)
        assert res.status == "ok" and res.ops == 3 and res.checkpoint == 3
        ops = await store.all_ops('by_user["u1"]')
        assert [(o.op_id, o.kind, o.target) for o in ops] == [
            (1, "MOVE", 2),
            (2, "MOVE", 3),
            (3, "REMOVE", 0),
        ]
        assert b'"checksum":903225261' in ops[0].wire
        assert b'"checksum":3323683603' in ops[1].wire
        assert b'"checksum":2191439428' in ops[2].wire
        st = await store.bucket_state('by_user["u1"]')
        assert (st.checksum, st.count, st.last_op) == (2123380996, 3, 3)
        assert await store.dirty_buckets() == ['by_user["u1"]']

        stats = await compact(store, chunk=2)
        assert stats.ops_removed == 2
        ops = await store.all_ops('by_user["u1"]')
        assert [(o.op_id, o.kind, o.target) for o in ops] == [(3, "CLEAR", 3)]
        assert b'"checksum":2123380996' in ops[0].wire
        st = await store.bucket_state('by_user["u1"]')
        assert (st.checksum, st.count) == (2123380996, 1)
        assert (await verify(store)).differences == []
        assert await store.dirty_buckets() == []

    run(_with_store(stack, ns, go))


def test_stale_batch_is_refused_whole(stack, ns) -> None:
    async def go(store: Store) -> None:
        ok = await store.apply(
            PlannedBatch([upsert("r1", Out("g[]", "todos", "t1", V1))], {"t/0": 10}, {"t/0": 10})
        )
        assert ok.status == "ok"
        again = await store.apply(
            PlannedBatch(
                [upsert("r2", Out("g[]", "todos", "t2", V1))],
                {"t/0": 10, "t/1": 0},
                {"t/0": 11, "t/1": 0},
            )
        )
        assert (
            again.status == "stale" and again.stale_partition == "t/0" and again.stored_offset == 10
        )
        # nothing of the refused batch landed
        assert [o.op_id for o in await store.all_ops("g[]")] == [1]
        assert await store.applied_offsets() == {"t/0": 10}

    run(_with_store(stack, ns, go))


def test_row_moves_between_buckets_and_truncate(stack, ns) -> None:
    async def go(store: Store) -> None:
        await store.apply(
            PlannedBatch(
                [
                    upsert("r1", Out('u["a"]', "todos", "1", '{"id":1,"o":"a"}')),
                    upsert("r2", Out('u["a"]', "todos", "2", '{"id":2,"o":"a"}')),
                    upsert("r1", Out('u["b"]', "todos", "1", '{"id":1,"o":"b"}')),
                    {"truncate": "todos"},
                ],
                {"t/0": 0},
                {"t/0": 3},
            )
        )
        a = [(o.op_id, o.kind) for o in await store.all_ops('u["a"]')]
        b = [(o.op_id, o.kind) for o in await store.all_ops('u["b"]')]
        # r1 leaves a (REMOVE 4, its PUT 1 -> MOVE); truncate removes r1 from b and r2 from a
        assert a == [(1, "MOVE"), (2, "MOVE"), (4, "REMOVE"), (6, "REMOVE")]
        assert b == [(3, "MOVE"), (5, "REMOVE")]
        assert (await verify(store)).differences == []

    run(_with_store(stack, ns, go))


def test_bucket_states_read_back_atomically_with_the_checkpoint(stack, ns) -> None:
    """All bucket states live in one hash (``P:states``): every read path (a few buckets,
    the packed path for many, names that cannot be packed) gives the states recomputed from
    the op logs, and a read concurrent with batches never mixes two checkpoints."""
    n_buckets, n_batches = 40, 30
    buckets = [f'b["{i}"]' for i in range(n_buckets - 1)] + ['odd["x\\ny"]']

    def batch(k: int) -> PlannedBatch:
        # batch k rewrites one row per bucket: one op per bucket, every bucket's count = k
        return PlannedBatch(
            events=[
                upsert(f"r{i}", Out(b, "todos", f"t{i}", f'{{"v":{k}}}'))
                for i, b in enumerate(buckets)
            ],
            guard={"t/0": k},
            offsets={"t/0": k},
        )

    async def from_logs(store: Store, names: list[str]) -> dict[str, tuple[int, int, int]]:
        out = {}
        for b in names:
            ops = await store.all_ops(b)
            total = 0
            for op in ops:
                i = op.wire.index(b'"checksum":') + 11
                total += int(op.wire[i:].split(b",")[0].split(b"}")[0])
            out[b] = (total % 2**32, len(ops), ops[-1].op_id if ops else 0)
        return out

    async def go(store: Store) -> None:
        first = await store.apply(batch(1))
        assert first.status == "ok"
        reads: list[tuple[int, dict]] = []

        async def reader() -> None:
            for _ in range(60):
                cp, states, _ = await store.read_checkpoint_with_lookups(buckets[:-1], [])
                reads.append((cp, states))
                await asyncio.sleep(0)

        async def writer() -> None:
            for k in range(2, n_batches + 1):
                assert (await store.apply(batch(k))).status == "ok"
                await asyncio.sleep(0)

        await asyncio.gather(reader(), writer())
        # batch k ends at op k * n_buckets; at checkpoint cp every bucket holds cp/n ops
        for cp, states in reads:
            k, rest = divmod(cp, n_buckets)
            assert rest == 0
            assert {st.count for st in states.values()} == {k}
            # bucket i got op i + 1 of each batch
            assert [states[b].last_op for b in buckets[:-1]] == [
                (k - 1) * n_buckets + i + 1 for i in range(n_buckets - 1)
            ]
        want = await from_logs(store, [*buckets, "never"])
        assert want["never"] == (0, 0, 0)
        got_small = (await store.read_checkpoint([*buckets[:3], "never"]))[1]
        got_packed = (await store.read_checkpoint_with_lookups([*buckets[:-1], "never"], []))[1]
        got_unpacked = (await store.read_checkpoint_with_lookups([*buckets, "never"], []))[1]
        for got in (got_small, got_packed, got_unpacked):
            assert {b: (s.checksum, s.count, s.last_op) for b, s in got.items()} == {
                b: want[b] for b in got
            }
        assert len(got_unpacked) == n_buckets + 1
        _ops, state = await store.snapshot_bucket(buckets[5])
        assert (state.checksum, state.count, state.last_op) == want[buckets[5]]
        assert await store.all_buckets() == sorted(buckets)


def test_puts_are_stored_as_their_wire_json(stack, ns) -> None:
    """No row-key tag on PUT members (it kept them out of Redis's compact encodings)."""

    async def go(store: Store) -> None:
        await store.apply(
            PlannedBatch([upsert("r1", Out("g[]", "todos", "t1", V1))], {"t/0": 0}, {"t/0": 0})
        )
        (member,) = await store.r.zrange(store.k("ops", "g[]"), 0, -1)
        assert member.startswith(b'{"op_id":"1","op":"PUT","object_type":"todos"')

    run(_with_store(stack, ns, go))


def test_defragmented_row_is_followed_by_later_changes(stack, ns) -> None:
    """Defragmentation re-appends a live PUT without touching the row index; a later update,
    delete or TRUNCATE of that row must supersede the copy (followed through the bucket's
    relocations), never the old op, and leave no relocation behind. Expected logs by hand."""

    async def go(store: Store) -> None:
        b = 'u["a"]'
        await store.apply(
            PlannedBatch(
                [
                    upsert("r1", Out(b, "todos", "1", '{"id":1,"v":1}')),
                    upsert("r2", Out(b, "todos", "2", '{"id":2,"v":1}')),
                    upsert("r3", Out(b, "todos", "3", '{"id":3,"v":1}')),
                    upsert("r2", Out(b, "todos", "2", '{"id":2,"v":2}')),
                ],
                {"t/0": 0},
                {"t/0": 3},
            )
        )
        # ops 1..4: r1 PUT 1, r2 PUT 2 -> MOVE(4), r3 PUT 3, r2 PUT 4
        await compact(store, chunk=10, bucket=b, defragment=True)
        # defrag re-appends 1, 3, 4 as 5, 6, 7 and compaction folds 1..4 into one CLEAR
        assert [(o.op_id, o.kind, o.target) for o in await store.all_ops(b)] == [
            (4, "CLEAR", 7),
            (5, "PUT", 0),
            (6, "PUT", 0),
            (7, "PUT", 0),
        ]
        assert await store.r.exists(store.k("reloc", b)) == 1
        # defragment twice: r3's copy moves again (6 -> 9; r3's index entry 3 now maps to 9)
        await compact(store, chunk=10, bucket=b, defragment=True)
        assert [(o.op_id, o.kind) for o in await store.all_ops(b)][-3:] == [
            (8, "PUT"),
            (9, "PUT"),
            (10, "PUT"),
        ]
        await store.apply(
            PlannedBatch(
                [
                    upsert("r1", Out(b, "todos", "1", '{"id":1,"v":2}')),  # 11; copy 8 -> MOVE
                    delete("r2"),  # REMOVE 12; copy 10 -> MOVE
                    upsert("r3", Out(b, "todos", "3", '{"id":3,"v":1}')),  # unchanged: no op
                ],
                {"t/0": 4},
                {"t/0": 6},
            )
        )
        ops = {o.op_id: (o.kind, o.target) for o in await store.all_ops(b)}
        assert ops[8] == ("MOVE", 11) and ops[10] == ("MOVE", 12) and ops[9] == ("PUT", 0)
        assert ops[11] == ("PUT", 0) and ops[12] == ("REMOVE", 0)
        await store.apply(PlannedBatch([{"truncate": "todos"}], {"t/0": 7}, {"t/0": 7}))
        ops = {o.op_id: (o.kind, o.target) for o in await store.all_ops(b)}
        # r1 (op 11) then r3 (its copy 9, found through P:reloc 3 -> 9) leave the bucket
        assert ops[11] == ("MOVE", 13) and ops[9] == ("MOVE", 14)
        assert [k for k, v in ops.items() if v[0] == "PUT"] == []
        assert await store.r.exists(store.k("reloc", b), store.k("relocated")) == 0
        assert (await verify(store)).differences == []

    run(_with_store(stack, ns, go))


def test_puts_stored_with_a_row_key_tag_still_work(stack, ns) -> None:
    """Stores written before the tag was dropped: a tagged PUT is read, superseded,
    defragmented and left unfolded by compaction like an untagged one."""

    async def go(store: Store) -> None:
        b = "g[]"
        await store.apply(
            PlannedBatch(
                [
                    upsert("r1", Out(b, "todos", "1", V1)),
                    upsert("r2", Out(b, "todos", "2", V1)),
                ],
                {"t/0": 0},
                {"t/0": 1},
            )
        )
        k = store.k("ops", b)
        for m, op_id in await store.r.zrange(k, 0, -1, withscores=True):
            rk = b"r1" if op_id == 1 else b"r2"
            await store.r.zrem(k, m)
            await store.r.zadd(k, {b"R2:" + rk + m: op_id})  # the old form
        assert [(o.op_id, o.kind) for o in await store.all_ops(b)] == [(1, "PUT"), (2, "PUT")]
        assert await store.live_share(b) == (2, 2)
        await store.apply(
            PlannedBatch([upsert("r1", Out(b, "todos", "1", V2))], {"t/0": 2}, {"t/0": 2})
        )
        await compact(store, chunk=10, bucket=b, defragment=True)
        ops = [(o.op_id, o.kind, o.target) for o in await store.all_ops(b)]
        # 1 -> MOVE(3); tagged 2 re-appended as 4, 3 as 5: 1..3 fold into a CLEAR
        assert ops == [(3, "CLEAR", 5), (4, "PUT", 0), (5, "PUT", 0)]
        await store.apply(PlannedBatch([delete("r2")], {"t/0": 3}, {"t/0": 3}))
        ops = [(o.op_id, o.kind, o.target) for o in await store.all_ops(b)]
        assert ops == [(3, "CLEAR", 5), (4, "MOVE", 6), (5, "PUT", 0), (6, "REMOVE", 0)]
        assert (await verify(store)).differences == []

    run(_with_store(stack, ns, go))


def test_entry_field_escapes_the_packed_index_separators() -> None:
    """The row index packs a row's outputs into one string split at \\x1d / \\x1e (and each
    entry field at \\x1f): an id holding those bytes is escaped, injectively."""
    from pipeline.store import entry_field

    ids = ["a", "a\x1d1:2:3", "a\x1e", "a\x1f", "a\x1b", "a\x1b=", "\x1b\x1d", "é ✓"]
    fields = [entry_field('u["x"]', "todos", i) for i in ids]
    assert len(set(fields)) == len(ids)
    for f in fields:
        assert "\x1d" not in f and "\x1e" not in f and f.count("\x1f") == 2
    assert entry_field('u["x"]', "todos", "a") == 'u["x"]\x1ftodos\x1fa'


def test_ids_with_separator_bytes_round_trip(stack, ns) -> None:
    """Object ids holding the row index's separator bytes: a PUT, a change (MOVE), leaving the
    bucket (the REMOVE names the exact id) and TRUNCATE. Expected ops written out by hand."""
    odd = ["t\x1d1:2:3", "t\x1e", "t\x1f\x1f", "t\x1b?"]

    async def go(store: Store) -> None:
        b1 = PlannedBatch(
            [upsert(f"r{i}", Out('u["a"]', "todos", oid, V1)) for i, oid in enumerate(odd)],
            {"t/0": 0},
            {"t/0": 0},
        )
        assert (await store.apply(b1)).status == "ok"  # ops 1-4
        b2 = PlannedBatch(
            [
                upsert("r0", Out('u["a"]', "todos", odd[0], V2)),  # 5; 1 -> MOVE
                upsert("r1", Out('u["b"]', "todos", odd[1], V1)),  # 6 in b; REMOVE 7; 2 -> MOVE
                upsert("r2", Out('u["a"]', "todos", odd[2], V1)),  # unchanged: nothing
                {"truncate": "todos"},  # REMOVE 8 (r0), 9 (r1 in b), 10 (r2), 11 (r3)
            ],
            {"t/0": 1},
            {"t/0": 1},
        )
        assert (await store.apply(b2)).status == "ok"
        a = [(o.op_id, o.kind) for o in await store.all_ops('u["a"]')]
        moves = [(i, "MOVE") for i in range(1, 6)]
        assert a == [*moves, (7, "REMOVE"), (8, "REMOVE"), (10, "REMOVE"), (11, "REMOVE")]
        removed = {}
        for o in await store.all_ops('u["a"]') + await store.all_ops('u["b"]'):
            if o.kind == "REMOVE":
                w = orjson.loads(o.wire)
                removed[o.op_id] = w["object_id"]
                assert w["checksum"] == core.remove_checksum("todos", w["object_id"])
        assert removed == {7: odd[1], 8: odd[0], 9: odd[1], 10: odd[2], 11: odd[3]}
        assert (await verify(store)).differences == []

    run(_with_store(stack, ns, go))
