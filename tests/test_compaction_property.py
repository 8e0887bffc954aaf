"""Compaction at random points of random histories never changes what a client ends with.

For clients that stopped at any earlier checkpoint c, "what they had at c" plus the
compacted log after c reduces to the same rows and checksum as the reference model
(sync-protocol.md §7, the formal property). Real Redis, real store steps.
"""

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
from pipeline.compaction import compact, verify
from pipeline.rules import parse_rules
from pipeline.store import Store
from tests.model import MOD, BucketModel
from tests.pipeline_helpers import TEST_RULES, model_rules

pytestmark = pytest.mark.stack

RULES = parse_rules(TEST_RULES)

step = st.one_of(
    st.tuples(
        st.just("up"),
        st.integers(1, 5),
        st.sampled_from(["u1", "u2"]),
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from([0, 1]),
    ),
    st.tuples(st.just("del"), st.integers(1, 5), st.none(), st.none(), st.none()),
    # plain fold, full defragmentation, or the scheduled re-append (budget, target)
    st.tuples(
        st.just("compact"),
        st.none(),
        st.none(),
        st.none(),
        st.one_of(
            st.sampled_from(["plain", "full"]),
            st.tuples(st.sampled_from([0.0, 0.5, 1.0, 4.0]), st.sampled_from([0.0, 1.0, 1.5])),
        ),
    ),
    st.tuples(st.just("snap"), st.none(), st.none(), st.none(), st.none()),
)


def reduce_ops(
    ops: list[dict[str, Any]], rows: dict[tuple[str, str], str] | None = None, total: int = 0
):
    rows = dict(rows or {})
    for op in ops:
        cs = int(op["checksum"])
        if op["op"] == "CLEAR":
            rows, total = {}, cs
            continue
        total = (total + cs) % MOD
        if op["op"] == "PUT":
            rows[(op["object_type"], op["object_id"])] = op["data"]
        elif op["op"] == "REMOVE":
            rows.pop((op["object_type"], op["object_id"]), None)
    return rows, total


async def bucket_ops(store: Store, bucket: str, after: int = 0) -> list[dict[str, Any]]:
    return [orjson.loads(o.wire) for o in await store.all_ops(bucket) if o.op_id > after]


async def scenario(redis_url: str, raw: list[tuple[Any, ...]]) -> None:
    store = Store.from_url(redis_url, f"t-prop-{uuid.uuid4().hex[:8]}")
    model = BucketModel(model_rules)
    snaps: list[tuple[int, dict[str, tuple[dict[tuple[str, str], str], int]]]] = []
    offset = 0
    defragmented = False
    try:
        for kind, rid, owner, title, flag in raw:
            if kind in ("up", "del"):
                key = {"id": rid}
                if kind == "up":
                    ev = {
                        "action": "upsert",
                        "table": "t",
                        "source_table": "todos",
                        "key": key,
                        "row": {"id": rid, "owner_id": owner, "title": title, "done": flag},
                    }
                else:
                    ev = {"action": "delete", "table": "t", "source_table": "todos", "key": key}
                model.apply({**ev, "table": "t.public.todos"})
                plan = core.plan_batch([(KafkaRecord("t", 0, offset, b"", b""), ev)], RULES, {})
                offset += 1
                assert (await store.apply(plan.batch)).status == "ok"
            elif kind == "compact":
                budget, target = flag if isinstance(flag, tuple) else (0.0, 0.0)
                cp = await store.checkpoint()
                before = {b: await bucket_ops(store, b) for b in model.buckets}
                st_ = await compact(
                    store,
                    chunk=2,
                    every_bucket=True,
                    defragment=flag == "full",
                    reappend_budget=budget,
                    reappend_target=target,
                    scan_ops=3,
                )
                defragmented = defragmented or st_.rows_reappended > 0
                assert (await verify(store)).differences == []
                # a client synced at cp re-downloads exactly the moved rows, as PUTs of
                # rows it already holds with the same data
                after_cp = [op for b in model.buckets for op in await bucket_ops(store, b, cp)]
                assert len(after_cp) == st_.rows_reappended
                for b in model.buckets:
                    held, _ = reduce_ops(before[b])
                    for op in await bucket_ops(store, b, cp):
                        assert op["op"] == "PUT"
                        assert held[(op["object_type"], op["object_id"])] == op["data"]
            else:  # a client stops here, holding what it reduced at this checkpoint
                cp = await store.checkpoint()
                held = {b: reduce_ops(await bucket_ops(store, b)) for b in model.buckets}
                snaps.append((cp, held))
        await compact(store, chunk=3, every_bucket=True)
        assert (await verify(store)).differences == []
        for b, mb in model.buckets.items():
            want_rows = mb.live_rows()
            state = await store.bucket_state(b)
            # defragmentation appends ops, so totals are compared with the log, not the model
            fresh_rows, fresh_total = reduce_ops(await bucket_ops(store, b))
            assert fresh_rows == want_rows
            assert fresh_total == state.checksum
            if not defragmented:  # compaction alone never changes a bucket's total
                assert state.checksum == mb.checksum
            for cp, held in snaps:
                rows_c, total_c = held.get(b, ({}, 0))
                rows, total = reduce_ops(await bucket_ops(store, b, after=cp), rows_c, total_c)
                assert rows == want_rows, f"client resumed from {cp} in {b}"
                assert total == state.checksum, f"client resumed from {cp} in {b}"
    finally:
        keys = [k async for k in store.r.scan_iter(match=f"{store.prefix}:*")]
        if keys:
            await store.r.unlink(*keys)
        await store.close()


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.lists(step, min_size=1, max_size=40))
def test_compaction_keeps_every_client_correct(stack, raw) -> None:
    asyncio.run(scenario(stack.redis_url, raw))
