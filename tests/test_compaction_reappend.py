"""The scheduled re-append (compaction.plan_reappend): the planner against a brute-force model
over single ops, and the whole compaction against the real Redis, with applies interleaved
between its atomic steps (exactly-once, every resuming client correct)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import core
from pipeline.cdc import KafkaRecord
from pipeline.compaction import ReappendPlan, compact, plan_reappend, verify
from pipeline.rules import parse_rules
from pipeline.store import Store
from tests.model import BucketModel
from tests.pipeline_helpers import TEST_RULES, model_rules
from tests.test_compaction_property import bucket_ops, reduce_ops

RULES = parse_rules(TEST_RULES)


# ---- the planner (pure) ------------------------------------------------------------------


def brute_force(log: list[bool], budget: float, target: float) -> int:
    """Rows to move, from the op-by-op log (True = live PUT): every cut after a foldable op."""
    n, live = len(log), sum(log)
    cuts = []  # (moved, folded) for each cut ending on a foldable op with live rows before it
    for i, put in enumerate(log):
        if not put and any(log[:i]):
            moved = sum(log[: i + 1])
            cuts.append((moved, i + 1 - moved))

    def argmax(weight: float) -> tuple[int, int] | None:
        gains = [f - weight * m for m, f in cuts]
        if gains and max(gains) > 0:
            return cuts[gains.index(max(gains))]
        return None

    best = argmax(budget) if budget > 0 else None
    if target > 0 and n > target * live:
        reach = [c for c in cuts if n - c[1] + 1 <= target * live]
        if best is not None and n - best[1] + 1 <= target * live:
            pass
        elif reach:
            return reach[0][0]
        else:
            even = argmax(1.0)
            if even is not None and (best is None or even[1] > best[1]):
                return even[0]
    return best[0] if best else 0


def runs_of(log: list[bool], split: int) -> list[tuple[bool, int, int]]:
    """Run-length encode, splitting runs every ``split`` ops as a chunked scan may."""
    runs: list[tuple[bool, int, int]] = []
    for i, put in enumerate(log, start=1):
        if runs and runs[-1][0] == put and runs[-1][1] < split:
            runs[-1] = (put, runs[-1][1] + 1, i)
        else:
            runs.append((put, 1, i))
    return runs


@settings(max_examples=400, deadline=None)
@given(
    log=st.lists(st.booleans(), max_size=60),
    budget=st.sampled_from([0.0, 0.5, 1.0, 2.0, 4.0]),
    target=st.sampled_from([0.0, 1.0, 1.1, 1.5]),
    split=st.integers(1, 70),
)
def test_planner_matches_brute_force(log: list[bool], budget: float, target: float, split: int):
    plan = plan_reappend(runs_of(log, split), budget, target)
    moved = brute_force(log, budget, target)
    if plan is None:
        assert moved == 0
    else:
        assert plan.moved == moved
        assert plan.moved == sum(log[: plan.cutoff])  # op ids are positions here
        assert not log[plan.cutoff - 1]  # the cut ends on a foldable op


def test_planner_by_hand() -> None:
    # a row that never changes at the head, then 8 superseded ops, then 2 live rows
    log = [True] + [False] * 8 + [True, True]
    runs = runs_of(log, 100)
    assert plan_reappend(runs, 4.0) == ReappendPlan(cutoff=9, moved=1, folded=8)
    assert plan_reappend(runs, 8.0) is None  # 8 folded ops do not pay 8 per row and more
    assert plan_reappend(runs, 0.0) is None
    # 11 ops for 3 live rows; a target of 1.5 moves the head row
    assert plan_reappend(runs, 0.0, 1.5) == ReappendPlan(cutoff=9, moved=1, folded=8)
    assert plan_reappend(runs_of([False, False, True], 100), 1.0) is None  # plain fold does it


# ---- against Redis, with applies interleaved ----------------------------------------------


class InterleavingStore(Store):
    """The real store; before each compaction step it applies one more event (as a processor
    would between two atomic compaction steps)."""

    pending: list[tuple[KafkaRecord, dict[str, Any]]]

    async def _one_event(self) -> None:
        if self.pending:
            plan = core.plan_batch([self.pending.pop(0)], RULES, {})
            assert (await self.apply(plan.batch)).status == "ok"

    async def defrag_scan(self, bucket: str, cursor: int, count: int) -> Any:
        await self._one_event()
        return await super().defrag_scan(bucket, cursor, count)

    async def defrag_step(self, *a: Any, **kw: Any) -> Any:
        await self._one_event()
        return await super().defrag_step(*a, **kw)

    async def compact_step(self, bucket: str, chunk: int) -> Any:
        await self._one_event()
        return await super().compact_step(bucket, chunk)


def _event(rid: int, owner: str | None, title: str, done: int) -> dict[str, Any]:
    if owner is None:
        return {"action": "delete", "table": "t", "source_table": "todos", "key": {"id": rid}}
    return {
        "action": "upsert",
        "table": "t",
        "source_table": "todos",
        "key": {"id": rid},
        "row": {"id": rid, "owner_id": owner, "title": title, "done": done},
    }


change = st.tuples(
    st.integers(1, 6),
    st.sampled_from(["u1", "u2", None]),
    st.sampled_from(["a", "b", "c"]),
    st.sampled_from([0, 1]),
)


async def interleaved(redis_url: str, history: list, during: list, budget: float, target: float):
    store = InterleavingStore.from_url(redis_url, f"t-reapp-{uuid.uuid4().hex[:8]}")
    assert isinstance(store, InterleavingStore)
    store.pending = []
    model = BucketModel(model_rules)
    offset = 0

    def record(ev: dict[str, Any]) -> tuple[KafkaRecord, dict[str, Any]]:
        nonlocal offset
        model.apply({**ev, "table": "t.public.todos"})
        offset += 1
        return KafkaRecord("t", 0, offset - 1, b"", b""), ev

    try:
        # a row that never changes heads each bucket, then the history
        for ev in [_event(0, "u1", "x", 1), _event(7, "u2", "y", 1)]:
            plan = core.plan_batch([record(ev)], RULES, {})
            assert (await store.apply(plan.batch)).status == "ok"
        for c in history:
            plan = core.plan_batch([record(_event(*c))], RULES, {})
            assert (await store.apply(plan.batch)).status == "ok"
        cp = await store.checkpoint()
        held = {b: reduce_ops(await bucket_ops(store, b)) for b in model.buckets}
        store.pending = [record(_event(*c)) for c in during]
        await compact(
            store,
            chunk=2,
            every_bucket=True,
            reappend_budget=budget,
            reappend_target=target,
            scan_ops=3,
        )
        while store.pending:
            await store._one_event()
        await compact(store, chunk=2, every_bucket=True, reappend_budget=budget, scan_ops=3)
        assert (await verify(store)).differences == []
        for b, mb in model.buckets.items():
            state = await store.bucket_state(b)
            rows, total = reduce_ops(await bucket_ops(store, b))
            assert rows == mb.live_rows(), b
            assert total == state.checksum, b
            rows_c, total_c = held.get(b, ({}, 0))
            rows, total = reduce_ops(await bucket_ops(store, b, after=cp), rows_c, total_c)
            assert rows == mb.live_rows(), f"client resumed from {cp} in {b}"
            assert total == state.checksum, f"client resumed from {cp} in {b}"
        # exactly once: every event applied once, in order
        assert await store.applied_offsets() == {"t/0": offset - 1}
    finally:
        keys = [k async for k in store.r.scan_iter(match=f"{store.prefix}:*")]
        if keys:
            await store.r.unlink(*keys)
        await store.close()


@pytest.mark.stack
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    history=st.lists(change, min_size=1, max_size=40),
    during=st.lists(change, max_size=15),
    budget=st.sampled_from([0.5, 1.0, 4.0]),
    target=st.sampled_from([0.0, 1.1]),
)
def test_reappend_with_interleaved_applies(stack, history, during, budget, target) -> None:
    asyncio.run(interleaved(stack.redis_url, history, during, budget, target))


@pytest.mark.stack
def test_scheduled_compaction_moves_the_row_that_blocks_the_fold(stack) -> None:
    """A row that never changes sits at the head; another is updated ten times: plain fold
    folds nothing, the re-append moves one row and the bucket ends with live rows + 1 ops."""

    async def go() -> None:
        store = Store.from_url(stack.redis_url, f"t-reapp-{uuid.uuid4().hex[:8]}")
        try:
            evs = [_event(1, "u1", "a", 0)] + [_event(2, "u1", t, 0) for t in "abcabcabca"]
            for i, ev in enumerate(evs):
                plan = core.plan_batch([(KafkaRecord("t", 0, i, b"", b""), ev)], RULES, {})
                assert (await store.apply(plan.batch)).status == "ok"
            b = 'by_user["u1"]'
            plain = await compact(store, chunk=200)
            assert plain.ops_removed == 0 and (await store.bucket_state(b)).count == 11
            await store.r.sadd(store.k("dirty"), b)
            cp = await store.checkpoint()
            st_ = await compact(store, chunk=200, reappend_budget=4.0)
            assert st_.rows_reappended == 1
            ops = [orjson.loads(o.wire) for o in await store.all_ops(b)]
            assert [o["op"] for o in ops] == ["CLEAR", "PUT", "PUT"]
            assert [o["object_id"] for o in ops[1:]] == ["2", "1"]
            assert [o["object_id"] for o in await bucket_ops(store, b, cp)] == ["1"]
            assert (await verify(store)).differences == []
        finally:
            keys = [k async for k in store.r.scan_iter(match=f"{store.prefix}:*")]
            if keys:
                await store.r.unlink(*keys)
            await store.close()

    asyncio.run(go())


# ---- re-appended rows changed later: untagged PUTs, relocation chains ----------------------

_ROW_STEP = st.one_of(
    st.tuples(st.just("up"), change),
    st.tuples(st.just("del"), st.integers(1, 6)),
    st.tuples(st.just("truncate"), st.none()),
    st.tuples(st.just("compact"), st.none()),
    st.tuples(st.just("snap"), st.none()),
)


async def _puts(store: Store, bucket: str) -> list[tuple[tuple[str, str], str]]:
    return sorted(
        ((op["object_type"], op["object_id"]), op["data"])
        for op in await bucket_ops(store, bucket)
        if op["op"] == "PUT"
    )


async def _relocations_bounded(store: Store, bucket: str, live: int) -> None:
    """``P:reloc:{bucket}`` (docs/store.md) maps a row index's op id straight to the live
    copy: at most one mapping per live row, each to a PUT in the bucket (a row moved by
    several runs must not leave a chain behind: it would grow with every run)."""
    raw = await store.r.hgetall(store.k("reloc", bucket))
    fwd = {int(k): int(v) for k, v in raw.items() if not k.startswith(b"~")}
    assert len(fwd) <= live, (bucket, fwd)
    puts = {o.op_id for o in await store.all_ops(bucket) if o.kind == "PUT"}
    assert set(fwd.values()) <= puts, (bucket, fwd, puts)
    assert {int(k[1:]): int(v) for k, v in raw.items() if k.startswith(b"~")} == {
        v: k for k, v in fwd.items()
    }


async def reappended_then_changed(redis_url: str, steps: list[tuple[str, Any]]) -> int:
    """Steps against the real store and the model; returns the rows re-appended in all.

    PUT members carry no row key, so a re-appended row's index entry keeps its old op id and
    the apply step follows ``P:reloc:{bucket}``. If it failed to, the old copy would stay a
    live PUT next to the new op: checked here as "every bucket holds exactly one PUT per row
    the model says is live, with the model's data" after every step (a client reducing the
    log would not notice, the later PUT or the REMOVE wins)."""
    from bucketsync.config import Settings
    from pipeline.compaction import compact_marked

    settings = Settings(compaction={"chunk_ops": 2})  # the default re-append budget/target
    store = Store.from_url(redis_url, f"t-reloc-{uuid.uuid4().hex[:8]}")
    model = BucketModel(model_rules)
    snaps: list[tuple[int, dict[str, Any]]] = []
    offset, moved = 0, 0

    async def apply(ev: dict[str, Any]) -> None:
        nonlocal offset
        model.apply({**ev, "table": "t.public.todos"})
        plan = core.plan_batch([(KafkaRecord("t", 0, offset, b"", b""), ev)], RULES, {})
        offset += 1
        assert (await store.apply(plan.batch)).status == "ok"

    try:
        # rows that never change head the buckets, so the fold needs the re-append
        await apply(_event(0, "u1", "x", 1))
        await apply(_event(7, "u2", "y", 1))
        for kind, arg in steps:
            if kind == "up":
                await apply(_event(*arg))
            elif kind == "del":
                await apply(_event(arg, None, "", 0))
            elif kind == "truncate":
                await apply({"action": "truncate", "table": "t", "source_table": "todos"})
            elif kind == "compact":
                moved += (await compact_marked(store, settings)).rows_reappended
            else:
                cp = await store.checkpoint()
                snaps.append(
                    (cp, {b: reduce_ops(await bucket_ops(store, b)) for b in model.buckets})
                )
            for b, mb in model.buckets.items():
                assert await _puts(store, b) == sorted(mb.live_rows().items()), (kind, b)
                await _relocations_bounded(store, b, len(mb.live_rows()))
        assert (await verify(store)).differences == []
        for b, mb in model.buckets.items():
            state = await store.bucket_state(b)
            assert reduce_ops(await bucket_ops(store, b)) == (mb.live_rows(), state.checksum)
            for cp, held in snaps:
                rows_c, total_c = held.get(b, ({}, 0))
                got = reduce_ops(await bucket_ops(store, b, after=cp), rows_c, total_c)
                assert got == (mb.live_rows(), state.checksum), f"client resumed from {cp} in {b}"
        # every row gone: every relocation was followed and dropped
        await apply({"action": "truncate", "table": "t", "source_table": "todos"})
        for b in model.buckets:
            assert await _puts(store, b) == []
        assert [k async for k in store.r.scan_iter(match=f"{store.prefix}:reloc*")] == []
        assert await store.applied_offsets() == {"t/0": offset - 1}
        return moved
    finally:
        keys = [k async for k in store.r.scan_iter(match=f"{store.prefix}:*")]
        if keys:
            await store.r.unlink(*keys)
        await store.close()


@pytest.mark.stack
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=st.lists(_ROW_STEP, min_size=1, max_size=40))
def test_reappended_rows_changed_later_match_the_model(stack, steps) -> None:
    asyncio.run(reappended_then_changed(stack.redis_url, steps))


@pytest.mark.stack
def test_twice_reappended_rows_updated_deleted_truncated(stack) -> None:
    """By hand: the scheduled compaction re-appends the unchanged head rows twice (chains
    old -> copy -> copy), then each is updated, moved to another bucket, deleted, truncated."""
    churn = [("up", (2, "u1", t, 1)) for t in "abcabc"] + [("up", (3, "u2", t, 0)) for t in "abcab"]
    steps: list[tuple[str, Any]] = [
        *churn,
        ("snap", None),
        ("compact", None),
        *churn,
        ("compact", None),
        ("snap", None),
        ("up", (0, "u1", "x2", 1)),  # head row of u1 / done[]: updated in place
        ("up", (7, "u1", "y", 0)),  # head row of u2: moves to u1, leaves done[]
        ("del", 2),
        ("compact", None),
        ("up", (3, "u1", "z", 1)),
        ("truncate", None),
        ("up", (4, "u2", "n", 1)),
        ("compact", None),
    ]
    moved = asyncio.run(reappended_then_changed(stack.redis_url, steps))
    assert moved >= 4  # both head rows in two buckets each, at least once
