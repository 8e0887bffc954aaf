"""The lookup index of parameter queries over synced tables (memberships).

Pure planner tests (no Redis), then the atomic store step against the real Redis,
compared with an independent model of the index (a multiset of (user, list) pairs).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import orjson
import pytest

from pipeline import core
from pipeline.cdc import KafkaRecord
from pipeline.rules import LookupEntry, parse_rules
from pipeline.store import Store

RULES = parse_rules(
    """
bucket_definitions:
  lists:
    parameters: SELECT list_id FROM memberships WHERE user_id = request.user_id()
    data:
      - SELECT * FROM todos WHERE list_id = bucket.list_id
  roles:
    parameters: SELECT role AS r, team AS t FROM memberships WHERE user_id = request.user_id()
    data: []
"""
)
MT = "app.public.memberships"
TT = "app.public.todos"
_off = iter(range(1, 10**9))


def lk(user: Any, definition: str = "lists", query: int = 1) -> str:
    """A lookup key, spelled out by hand (LookupEntry docs)."""
    return f"{definition}\x1f{query}\x1f{orjson.dumps([user]).decode()}"


def rec(topic: str = MT) -> KafkaRecord:
    return KafkaRecord(topic, 0, next(_off), b"k", b"v")


def member(mid: str, user: Any, lst: Any, **extra: Any) -> dict[str, Any]:
    row = {"id": mid, "user_id": user, "list_id": lst, **extra}
    return {
        "action": "upsert",
        "table": MT,
        "source_table": "memberships",
        "key": {"id": mid},
        "row": row,
    }


def unmember(mid: str) -> dict[str, Any]:
    return {"action": "delete", "table": MT, "source_table": "memberships", "key": {"id": mid}}


def todo(tid: str, lst: str) -> dict[str, Any]:
    row = {"id": tid, "list_id": lst}
    return {
        "action": "upsert",
        "table": TT,
        "source_table": "todos",
        "key": {"id": tid},
        "row": row,
    }


def plan(*evs: dict[str, Any], stored: dict | None = None) -> core.Plan:
    return core.plan_batch([(rec(TT if e["table"] == TT else MT), e) for e in evs], RULES, stored)


# --------------------------------------------------------------------------- planner (pure)


def test_membership_row_carries_its_complete_lookup_entries() -> None:
    p = plan(member("m1", "u1", "L1", role="admin", team="T"))
    (e,) = p.batch.events
    assert e["o"] == []  # memberships feed no data bucket
    assert e["l"] == [
        [lk("u1"), '["L1"]'],
        [lk("u1", "roles"), '["admin","T"]'],
    ]


def test_data_rows_and_deletes_carry_no_lookup_field() -> None:
    p = plan(todo("t1", "L1"), unmember("m1"))
    assert "l" not in p.batch.events[0]
    assert p.batch.events[1]["o"] is False and "l" not in p.batch.events[1]


def test_values_keep_their_types_and_blobs_name_no_bucket() -> None:
    p = plan(member("m1", 7, 2.5))
    assert p.batch.events[0]["l"][0] == [lk(7), "[2.5]"]
    # a blob bucket parameter names no bucket: nothing to store; duplicates kept once
    entries = [
        LookupEntry(lk("u1"), (b"\x00blob",)),
        LookupEntry(lk("u1"), ("L1",)),
        LookupEntry(lk("u1"), ("L1",)),
    ]
    assert core.lookup_entries(entries) == [[lk("u1"), '["L1"]']]


def test_partial_update_evaluates_the_merged_row() -> None:
    stored = {core.row_key(MT, {"id": "m1"}): {"id": "m1", "user_id": "u1", "list_id": "L1"}}
    ev = member("m1", None, "L2")
    ev["row"] = {"id": "m1", "list_id": "L2"}
    ev["keep_columns"] = ["user_id"]
    p = plan(ev, stored=stored)
    assert p.batch.events[0]["l"][0] == [lk("u1"), '["L2"]']


def test_a_row_the_parameter_query_cannot_evaluate_is_a_dead_letter() -> None:
    class Broken:
        def evaluate_row(self, table: str, row: Any, *, schema: str | None = None) -> list:
            return []

        def is_relevant(self, table: str, schema: str | None = None) -> bool:
            return True

        def parameter_tables(self) -> set[str]:
            return {"memberships"}

        def evaluate_parameter_row(self, table: str, row: Any, schema: str | None = None):
            raise ValueError("boom")

    p = core.plan_batch([(rec(), member("m1", "u1", "L1"))], Broken(), {})
    assert p.batch.events == [] and [d.reason for d in p.dead_letters] == ["rule_evaluation_error"]
    assert p.batch.offsets == {f"{MT}/0": p.dead_letters[0].record.offset}


# --------------------------------------------------------------------------- store (Redis)


def _run(stack: Any, ns: Any, fn: Any) -> Any:
    async def go() -> Any:
        store = Store.from_url(stack.redis_url, ns.prefix)
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(go())


async def _changes(store: Store) -> list[dict[bytes, bytes]]:
    return [f for _id, f in await store.r.xrange(store.k("changes"))]


@pytest.mark.stack
def test_membership_and_unlocked_rows_share_one_atomic_step(stack, ns) -> None:
    async def go(store: Store) -> None:
        res = await store.apply(plan(todo("t1", "L1"), member("m1", "u1", "L1")).batch)
        assert res.status == "ok"
        (entry,) = await _changes(store)
        # one change entry, one checkpoint: the bucket's new state and the lookup change
        assert int(entry[b"cp"]) == res.checkpoint
        assert orjson.loads(entry[b"b"]) == {
            'lists["L1"]': [orjson.loads(entry[b"b"])['lists["L1"]'][0], 1]
        }
        assert orjson.loads(entry[b"l"]) == [lk("u1"), lk("u1", "roles")]
        cp, states, rows = await store.read_checkpoint_with_lookups(['lists["L1"]'], [lk("u1")])
        assert cp == res.checkpoint and states['lists["L1"]'].count == 1
        assert rows == {lk("u1"): frozenset({b'["L1"]'})}

    _run(stack, ns, go)


@pytest.mark.stack
def test_refcounts_change_announcements_update_delete_and_truncate(stack, ns) -> None:
    async def go(store: Store) -> None:
        key = lk("u1")

        async def step(*evs: dict[str, Any]) -> list[str]:
            await store.apply(plan(*evs).batch)
            entry = (await _changes(store))[-1]
            return sorted(k for k in orjson.loads(entry.get(b"l", b"[]")) if k.startswith("lists"))

        assert await step(member("m1", "u1", "L1")) == [key]
        # a second row contributing the same value: the value set does not change
        assert await step(member("m2", "u1", "L1")) == []
        assert await step(unmember("m1")) == []
        assert await store.read_lookups([key]) == {key: frozenset({b'["L1"]'})}
        # the same row again, unchanged: nothing announced
        assert await step(member("m2", "u1", "L1")) == []
        # the row moves to another user and list: both keys change
        assert await step(member("m2", "u2", "L9")) == [key, lk("u2")]
        assert await store.read_lookups([key, lk("u2")]) == {
            key: frozenset(),
            lk("u2"): frozenset({b'["L9"]'}),
        }
        assert await step(member("m3", "u1", "L1"), member("m4", "u1", "L2")) == [key]
        await store.apply(PlannedBatchTruncate(MT))
        assert await store.read_lookups([key, lk("u2")]) == {
            key: frozenset(),
            lk("u2"): frozenset(),
        }
        assert not [k async for k in store.r.scan_iter(match=store.k("lookup", "*"))]

    _run(stack, ns, go)


def PlannedBatchTruncate(topic: str) -> Any:
    from pipeline.store import PlannedBatch

    return PlannedBatch(events=[{"truncate": topic}], guard={}, offsets={})


@pytest.mark.stack
def test_random_membership_histories_match_an_independent_model(stack, ns) -> None:
    """Random upserts, deletes, moves and truncates in random batches; after every batch
    the stored index equals the model's, and the announced keys are exactly the keys whose
    value sets changed."""
    rnd = random.Random(1234)
    users, lists = ["u1", "u2", "u3"], ["A", "B", "C", "D"]

    async def go(store: Store) -> None:
        rows: dict[str, tuple[str, str]] = {}  # model: membership id -> (user, list)

        def model_index() -> dict[str, set[str]]:
            out: dict[str, set[str]] = {lk(u): set() for u in users}
            for u, lst in rows.values():
                out[lk(u)].add(orjson.dumps([lst]).decode())
            return out

        for _batch in range(60):
            before = model_index()
            evs: list[dict[str, Any]] = []
            truncate = rnd.random() < 0.05
            if truncate:
                rows.clear()
                batch = PlannedBatchTruncate(MT)
            else:
                for _ in range(rnd.randint(1, 6)):
                    mid = f"m{rnd.randint(1, 8)}"
                    if rnd.random() < 0.3:
                        evs.append(unmember(mid))
                        rows.pop(mid, None)
                    else:
                        u, lst = rnd.choice(users), rnd.choice(lists)
                        evs.append(member(mid, u, lst))
                        rows[mid] = (u, lst)
                batch = plan(*evs).batch
            res = await store.apply(batch)
            assert res.status == "ok"
            after = model_index()
            got = await store.read_lookups([lk(u) for u in users])
            assert {k: {v.decode() for v in vs} for k, vs in got.items()} == after
            entry = (await _changes(store))[-1]
            announced = {k for k in orjson.loads(entry.get(b"l", b"[]")) if k.startswith("lists")}
            assert announced == {k for k in after if after[k] != before[k]}
            # per value, the stored count is the number of contributing rows
            for u in users:
                counts = Counter(lst for uu, lst in rows.values() if uu == u)
                raw = await store.r.hgetall(store.k("lookup", lk(u)))
                assert {orjson.loads(f)[0]: int(v) for f, v in raw.items()} == dict(counts)

    _run(stack, ns, go)
