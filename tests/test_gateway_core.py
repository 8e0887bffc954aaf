"""The gateway core (PageCache, CheckpointHub, SyncStream) against the in-memory store.

No services: ``tests/helpers/memory_store.py`` stands in for the Redis store. Lines are
captured through the ``write`` callable a SyncStream takes. Expected values come from the
fake's own records (op ids, wire JSON, bucket states) or are written out by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import orjson
import pytest

from gateway.buckets import BucketResolver, Resolution
from gateway.hub import FANOUT_SHARED, CheckpointHub, PageCache
from gateway.stream import StreamLimits, SyncStream
from pipeline.rules.parse import parse_rules
from pipeline.store import BucketState, Store, StoredOp, write_checkpoint_key
from tests.helpers.memory_store import (
    GatewayStoreReads,
    Lookup,
    MemoryStore,
    Put,
    Remove,
    as_store,
)

U1 = 'by_user["u1"]'
U2 = 'by_user["u2"]'
BY_USER = """
bucket_definitions:
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT * FROM todos WHERE owner_id = bucket.user_id
"""
PRIORITIES = """
bucket_definitions:
  hi:
    priority: 0
    data: [SELECT * FROM a]
  lo:
    data: [SELECT * FROM b]
"""
BY_LIST = """
bucket_definitions:
  by_list:
    parameters: SELECT list_id FROM list_members WHERE user_id = request.user_id()
    data:
      - SELECT * FROM todos WHERE list_id = bucket.list_id
"""
WCP_KEY = write_checkpoint_key("u1", "c1")
BIG = 1 << 20


async def until(pred: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.002)


def put(bucket: str, oid: str, **data: Any) -> Put:
    return Put(bucket, "todos", oid, {"id": oid, **data})


def wire(mem: MemoryStore, bucket: str, ids: Sequence[int]) -> list[dict[str, Any]]:
    """The ops of ``bucket`` with these ids as the fake stores them (client JSON)."""
    by_id = {op.op_id: op for op in mem.ops(bucket)}
    return [orjson.loads(by_id[i].wire) for i in ids]


def data_line(
    mem: MemoryStore, bucket: str, after: int, ids: Sequence[int], has_more: bool
) -> dict[str, Any]:
    return {
        "data": {
            "bucket": bucket,
            "after": str(after),
            "next_after": str(ids[-1]),
            "has_more": has_more,
            "data": wire(mem, bucket, ids),
        }
    }


def bucket_entry(
    mem: MemoryStore, bucket: str, priority: int = 3, stream: int = 0
) -> dict[str, Any]:
    st = mem.state(bucket)
    return {
        "bucket": bucket,
        "checksum": st.checksum,
        "count": st.count,
        "priority": priority,
        "subscriptions": [{"default": stream}],  # index into the checkpoint's streams
    }


def kind(line: dict[str, Any]) -> str:
    (k,) = line
    return k


# --------------------------------------------------------------------------- the double


def test_memory_store_matches_the_store_read_api() -> None:
    """The double offers the gateway's reads with the real store's signatures."""
    names = [n for n in vars(GatewayStoreReads) if not n.startswith("_")]
    assert len(names) == 14
    for name in names:
        real, fake = getattr(Store, name), getattr(MemoryStore, name)
        assert inspect.signature(real) == inspect.signature(fake), name
        assert inspect.iscoroutinefunction(fake), name


def test_memory_store_writes_like_apply_batch() -> None:
    mem = MemoryStore()
    cp = mem.apply([put("b", "t1", v=1), put("b", "t2"), put("b", "t1", v=1)], offsets={"f/0": 3})
    assert cp == 2  # the identical PUT adds no op
    cp = mem.apply([put("b", "t1", v=2), Remove("b", "todos", "t2")])
    assert cp == 4
    assert [(o.op_id, o.kind) for o in mem.ops("b")] == [
        (1, "MOVE"),
        (2, "MOVE"),
        (3, "PUT"),
        (4, "REMOVE"),
    ]
    ops = mem.ops("b")
    assert mem.state("b") == BucketState(sum(o.checksum for o in ops) % 2**32, 4, 4)
    assert mem.buckets["b"].members[1].startswith(b"T3|")  # target: the superseding op
    assert mem.buckets["b"].members[2].startswith(b"T4|")
    assert mem.compact("b") == 2
    assert [(o.op_id, o.kind) for o in mem.ops("b")] == [(2, "CLEAR"), (3, "PUT"), (4, "REMOVE")]
    assert mem.buckets["b"].members[2].startswith(b"T4|")
    assert mem.state("b").checksum == sum(o.checksum for o in mem.ops("b")) % 2**32
    fields = mem.changes[-1][1]
    assert fields[b"n"] == b"2" and fields[b"cp"] == b"4"
    assert orjson.loads(fields[b"b"]) == {"b": [mem.state("b").checksum, 4]}


# --------------------------------------------------------------------------- PageCache


@pytest.fixture
def mem8() -> MemoryStore:
    """Bucket U1 holds ops 1, 3, 4, 5, 7; U2 holds 2, 6, 8; checkpoint 8."""
    mem = MemoryStore()
    mem.apply([put(U1, "t1"), put(U2, "x1"), put(U1, "t2")])
    mem.apply([put(U1, "t3"), put(U1, "t4"), put(U2, "x2"), put(U1, "t5")])
    mem.apply([put(U2, "x3")])
    assert [o.op_id for o in mem.ops(U1)] == [1, 3, 4, 5, 7] and mem.cp == 8
    return mem


def lines_of(page_lines: Sequence[bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in page_lines]


async def test_page_holds_ops_after_upto_bounded(mem8: MemoryStore) -> None:
    pages = PageCache(as_store(mem8))
    page = await pages.get(U1, 0, 8, 2, BIG)
    assert lines_of(page.lines) == [data_line(mem8, U1, 0, [1, 3], True)]
    assert (page.next_after, page.has_more, page.ops, page.max_target) == (3, True, 2, 0)
    # bounded by upto: op 5 and 7 are beyond 4
    page = await pages.get(U1, 3, 4, 2, BIG)
    assert lines_of(page.lines) == [data_line(mem8, U1, 3, [4], False)]
    # nothing in range: an empty page at after
    page = await pages.get(U1, 7, 8, 2, BIG)
    assert (page.lines, page.next_after, page.has_more, page.ops) == ((), 7, False, 0)


async def test_full_last_page_says_no_more(mem8: MemoryStore) -> None:
    """The bucket's last ops fill the page exactly while the checkpoint lies beyond them
    (other buckets' ops): has_more is false, as nothing remains (sync-protocol.md §3.3)."""
    pages = PageCache(as_store(mem8))
    page = await pages.get(U1, 4, 8, 2, BIG)
    assert lines_of(page.lines) == [data_line(mem8, U1, 4, [5, 7], False)]
    assert not page.has_more


async def test_page_lines_close_at_max_bytes(mem8: MemoryStore) -> None:
    pages = PageCache(as_store(mem8))
    page = await pages.get(U1, 0, 8, 3, 1)  # every op closes its line
    assert lines_of(page.lines) == [
        data_line(mem8, U1, 0, [1], True),
        data_line(mem8, U1, 1, [3], True),
        data_line(mem8, U1, 3, [4], True),  # the page's last line: more in the store
    ]
    page = await pages.get(U1, 4, 8, 3, 1)
    assert lines_of(page.lines) == [
        data_line(mem8, U1, 4, [5], True),
        data_line(mem8, U1, 5, [7], False),
    ]


async def test_page_read_once_and_shared(mem8: MemoryStore) -> None:
    pages = PageCache(as_store(mem8))
    assert pages.peek((U1, 0, 8, 2, BIG)) is None
    a, b = await asyncio.gather(pages.get(U1, 0, 8, 2, BIG), pages.get(U1, 0, 8, 2, BIG))
    assert a is b and mem8.calls["read_ops"] == 1
    assert await pages.get(U1, 0, 8, 2, BIG) is a and mem8.calls["read_ops"] == 1
    assert pages.peek((U1, 0, 8, 2, BIG)) is a
    await pages.get(U1, 0, 8, 3, BIG)  # another key: another read
    assert mem8.calls["read_ops"] == 2


async def test_failed_read_is_not_cached(mem8: MemoryStore) -> None:
    real = mem8.read_ops
    fail = [True]

    async def flaky(bucket: str, after: int, upto: int, limit: int) -> Any:
        if fail.pop() if fail else False:
            raise ConnectionError("store down")
        return await real(bucket, after, upto, limit)

    mem8.read_ops = flaky  # type: ignore[method-assign]
    pages = PageCache(as_store(mem8))
    with pytest.raises(ConnectionError):
        await pages.get(U1, 0, 8, 2, BIG)
    assert pages.peek((U1, 0, 8, 2, BIG)) is None
    page = await pages.get(U1, 0, 8, 2, BIG)
    assert page.ops == 2


async def test_page_cache_entry_bound_evicts_least_recently_used(mem8: MemoryStore) -> None:
    pages = PageCache(as_store(mem8), max_entries=2)
    k1, k2, k3, k4 = ((U1, a, 8, 1, BIG) for a in (0, 1, 3, 4))
    for k in (k1, k2, k3):
        await pages.get(*k)
    assert pages.peek(k1) is None and pages.peek(k2) and pages.peek(k3)
    await pages.get(*k2)  # used: k3 is now the oldest
    await pages.get(*k4)
    assert pages.peek(k3) is None and pages.peek(k2) and pages.peek(k4)
    reads = mem8.calls["read_ops"]
    await pages.get(*k1)  # evicted: read again
    assert mem8.calls["read_ops"] == reads + 1


async def test_page_cache_byte_bound(mem8: MemoryStore) -> None:
    probe = await PageCache(as_store(mem8)).get(U1, 0, 8, 1, BIG)
    one = sum(len(line) for line in probe.lines)
    pages = PageCache(as_store(mem8), max_bytes=one + one // 2)  # room for one page
    k1, k2 = (U1, 0, 8, 1, BIG), (U1, 1, 8, 1, BIG)
    await pages.get(*k1)
    assert pages.bytes == one
    p2 = await pages.get(*k2)
    assert pages.peek(k1) is None and pages.peek(k2) is p2
    assert pages.bytes == sum(len(line) for line in p2.lines) <= pages.max_bytes


# --------------------------------------------------------------------------- CheckpointHub


@contextlib.asynccontextmanager
async def running_hub(mem: MemoryStore) -> AsyncIterator[CheckpointHub]:
    hub = CheckpointHub(as_store(mem), block_ms=50)
    await hub.start()
    await until(lambda: mem.calls["read_changes"] > 0)  # the tail is found
    try:
        yield hub
    finally:
        await hub.stop()


async def test_bucket_change_wakes_only_its_subscribers() -> None:
    mem = MemoryStore()
    async with running_hub(mem) as hub:
        a = hub.subscribe(["b1"], "ka")
        b = hub.subscribe(["b2"], "kb")
        c = hub.subscribe(["b1", "b2"], "kc")
        cp = mem.apply([put("b1", "t1")])
        await until(lambda: hub.notifications == 1)
        st = mem.state("b1")
        assert hub.checkpoint == cp
        assert a.wake.is_set() and c.wake.is_set() and not b.wake.is_set()
        assert a.pending == c.pending == {"b1": (cp, BucketState(st.checksum, st.count, cp))}
        assert b.pending == {}
        assert not (a.resync or a.lookups_dirty or a.write_checkpoint_dirty)
        # a moved subscription follows its new buckets; an ended one gets nothing
        a.wake.clear()
        c.wake.clear()
        hub.set_buckets(a, ["b2"])
        hub.unsubscribe(c)
        cp2 = mem.apply([put("b1", "t2"), put("b2", "t1")])
        await until(lambda: hub.notifications == 2)
        assert set(a.pending) == {"b1", "b2"} and a.pending["b2"][0] == cp2
        assert a.pending["b1"][0] == cp  # earlier, and b1 is no longer its bucket
        assert set(b.pending) == {"b2"} and not c.wake.is_set() and c.pending["b1"][0] == cp
        assert hub.connections == 2


async def test_lookup_change_reaches_only_its_connections() -> None:
    mem = MemoryStore()
    async with running_hub(mem) as hub:
        a = hub.subscribe([], "ka", ["k1"])
        b = hub.subscribe([], "kb", ["k2"])
        c = hub.subscribe(["b1"], "kc")
        mem.apply([Lookup("k1", ("l1",))])
        await until(lambda: hub.notifications == 1)
        assert a.lookups_dirty and a.wake.is_set()
        assert not b.lookups_dirty and not b.wake.is_set() and not c.wake.is_set()
        a.lookups_dirty = False
        a.wake.clear()
        # a second row with the same value: the value set is unchanged, no announcement
        mem.apply([Lookup("k1", ("l1",))])
        await until(lambda: hub.notifications == 2)
        assert not a.lookups_dirty and not a.wake.is_set()


async def test_gap_in_change_sequence_resyncs_everyone() -> None:
    mem = MemoryStore()
    async with running_hub(mem) as hub:
        a = hub.subscribe(["b1"], "ka")
        b = hub.subscribe(["b9"], "kb", ["k1"])
        mem.apply([put("b1", "t1")])
        await until(lambda: hub.notifications == 1)
        assert not a.resync and not b.resync
        a.wake.clear()
        mem.apply([put("b1", "t2")])  # n = 2, trimmed before the hub reads it
        mem.apply([put("b2", "t1")])  # n = 3
        mem.drop_changes(2)
        await until(lambda: hub.notifications == 2)
        assert a.resync and b.resync and a.wake.is_set() and b.wake.is_set()


async def test_write_checkpoint_notifications() -> None:
    mem = MemoryStore()
    async with running_hub(mem) as hub:
        a = hub.subscribe([], "ka")
        b = hub.subscribe([], "kb")
        mem.issue_write_checkpoint("ka", {"f/0": 5})
        await until(lambda: hub.notifications == 1)
        assert a.write_checkpoint_dirty and a.wake.is_set()
        assert not b.write_checkpoint_dirty and not b.wake.is_set()
        # offsets reaching a position wake the connections that wait for one
        hub.await_position(b, True)
        assert not hub.position_reached({"f/0": 5})
        mem.set_offsets({"f/0": 5})
        await until(lambda: hub.notifications == 2)
        assert b.write_checkpoint_dirty and b.wake.is_set()
        assert hub.offsets == {"f/0": 5}
        assert hub.position_reached({"f/0": 5}) and not hub.position_reached({"f/0": 6})


# --------------------------------------------------------------------------- SyncStream


class Capture:
    """The ``write`` callable: records every line (and that writes hold whole lines)."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    async def __call__(self, chunk: bytes) -> None:
        assert chunk.endswith(b"\n")
        self.lines.extend(orjson.loads(line) for line in chunk.splitlines())

    def kinds(self) -> list[str]:
        return [kind(line) for line in self.lines]

    def completes(self) -> int:
        return self.kinds().count("checkpoint_complete")


def make_stream(
    mem: MemoryStore,
    hub: CheckpointHub,
    rules: str = BY_USER,
    *,
    after: dict[str, int] | None = None,
    exp: float | None = None,
    max_ops: int = 2,
    keepalive_s: float = 60.0,
    resolver: BucketResolver | None = None,
    resolution: Resolution | None = None,
    sub: Any = None,
    transport: asyncio.BaseTransport | None = None,
) -> tuple[SyncStream, Capture]:
    out = Capture()
    stream = SyncStream(
        store=as_store(mem),
        hub=hub,
        resolver=resolver or make_resolver(rules),
        after=after or {},
        wcp_key=WCP_KEY,
        exp=int(exp if exp is not None else time.time() + 3600),
        limits=StreamLimits(keepalive_s, max_ops, BIG, 5.0),
        write=out,
        closing=asyncio.Event(),
        describe="test",
        sub=sub,
        resolution=resolution,
        transport=transport,
    )
    return stream, out


def make_resolver(rules: str) -> BucketResolver:
    return BucketResolver(
        parse_rules(rules),  # a fresh rules object: no expansion cached by another test
        {"sub": "u1"},
        {},
        include_defaults=True,
        max_buckets=100,
        max_parameter_results=100,
    )


@contextlib.asynccontextmanager
async def running(stream: SyncStream) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(stream.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_fresh_client_gets_checkpoint_bounded_data_and_complete(mem8: MemoryStore) -> None:
    async with running_hub(mem8) as hub:
        stream, out = make_stream(mem8, hub)
        async with running(stream):
            await until(lambda: out.completes() == 1)
        cp_line = out.lines[0]["checkpoint"]
        assert cp_line["last_op_id"] == "8"
        assert cp_line["buckets"] == [bucket_entry(mem8, U1)]
        assert "write_checkpoint" not in cp_line
        assert out.lines[1:] == [
            data_line(mem8, U1, 0, [1, 3], True),
            data_line(mem8, U1, 3, [4, 5], True),
            data_line(mem8, U1, 5, [7], False),
            {"checkpoint_complete": {"last_op_id": "8"}},
        ]
        # what the client checks: the ops received add up to the checkpoint's checksum
        ops = [op for line in out.lines[1:-1] for op in line["data"]["data"]]
        assert sum(op["checksum"] for op in ops) % 2**32 == cp_line["buckets"][0]["checksum"]
        assert hub.connections == 0  # unsubscribed at the end


async def test_resume_sends_only_newer_ops(mem8: MemoryStore) -> None:
    async with running_hub(mem8) as hub:
        # a bucket of another user named in the request is ignored (never a grant)
        stream, out = make_stream(mem8, hub, after={U1: 1, U2: 0})
        async with running(stream):
            await until(lambda: out.completes() == 1)
        assert [b["bucket"] for b in out.lines[0]["checkpoint"]["buckets"]] == [U1]
        assert out.lines[1:] == [
            data_line(mem8, U1, 1, [3, 4], True),
            data_line(mem8, U1, 4, [5, 7], False),  # nothing of U1 in (7, 8]
            {"checkpoint_complete": {"last_op_id": "8"}},
        ]
        stream, out = make_stream(mem8, hub, after={U1: 8})
        async with running(stream):
            await until(lambda: out.completes() == 1)
        assert out.kinds() == ["checkpoint", "checkpoint_complete"]


async def test_change_sends_checkpoint_diff_and_only_new_ops(mem8: MemoryStore) -> None:
    async with running_hub(mem8) as hub:
        stream, out = make_stream(mem8, hub)
        async with running(stream):
            await until(lambda: out.completes() == 1)
            n = len(out.lines)
            mem8.apply([put(U2, "x1", v=2)])  # op 9: not this client's bucket
            mem8.apply([put(U1, "t1", v=2)])  # op 10; op 1 becomes a MOVE
            await until(lambda: out.completes() == 2)
            assert out.lines[n:] == [
                {
                    "checkpoint_diff": {
                        "last_op_id": "10",
                        "write_checkpoint": None,
                        "updated_buckets": [bucket_entry(mem8, U1)],
                        "removed_buckets": [],
                    }
                },
                data_line(mem8, U1, 8, [10], False),
                {"checkpoint_complete": {"last_op_id": "10"}},
            ]
            n = len(out.lines)
            mem8.apply([Remove(U1, "todos", "t2")])  # op 11
            await until(lambda: out.completes() == 3)
            assert [kind(line) for line in out.lines[n:]] == [
                "checkpoint_diff",
                "data",
                "checkpoint_complete",
            ]
            assert out.lines[n + 1] == data_line(mem8, U1, 10, [11], False)
            assert out.lines[n + 1]["data"]["data"][0]["op"] == "REMOVE"


@pytest.mark.parametrize("compacted", [False, True], ids=["move", "clear"])
async def test_target_beyond_checkpoint_keeps_it_from_completing(compacted: bool) -> None:
    """sync-protocol.md §4.5's example: served at checkpoint 2, op 1 already superseded by
    op 3 (a MOVE, or a CLEAR after compaction, targeting 3). Checkpoint 2 must not
    complete; the stream moves on to 3 and completes that."""
    mem = MemoryStore()
    mem.apply([put(U1, "t1", v=1), put(U1, "t2")])
    async with running_hub(mem) as hub:
        resolver = make_resolver(BY_USER)
        sub = hub.subscribe((), WCP_KEY, resolver.lookup_keys)
        first = await resolver.resolve(as_store(mem), lambda b: hub.set_buckets(sub, b))
        assert first.cp == 2
        at2 = bucket_entry(mem, U1)
        mem.apply([put(U1, "t1", v=2)])  # op 3
        if compacted:
            assert mem.compact(U1) == 1
        assert mem.ops(U1)[0].kind == ("CLEAR" if compacted else "MOVE")
        stream, out = make_stream(mem, hub, resolver=resolver, resolution=first, sub=sub)
        async with running(stream):
            await until(lambda: out.completes() == 1)
            await asyncio.sleep(0.05)  # the hub's notification of op 3 adds nothing
        assert out.lines == [
            {"checkpoint": {"last_op_id": "2", "buckets": [at2], "streams": ANY_STREAMS}},
            data_line(mem, U1, 0, [1, 2], False),
            {
                "checkpoint_diff": {
                    "last_op_id": "3",
                    "write_checkpoint": None,
                    "updated_buckets": [bucket_entry(mem, U1)],
                    "removed_buckets": [],
                }
            },
            data_line(mem, U1, 2, [3], False),
            {"checkpoint_complete": {"last_op_id": "3"}},
        ]


class _HotStore(MemoryStore):
    """A row written again between every checkpoint read and the page read after it (a row
    updated faster than the gateway reads, as under sustained load): each page then holds
    a MOVE targeting past its checkpoint."""

    def __init__(self, rounds: int):
        super().__init__()
        self.left = rounds

    async def read_ops(self, bucket: str, after: int, upto: int, limit: int) -> list[StoredOp]:
        if self.left > 0:
            self.left -= 1
            self.apply([put(U1, "t1", v=100 + self.left)])
        return await super().read_ops(bucket, after, upto, limit)


async def test_hot_row_completes_after_one_invalidation() -> None:
    """An invalidated checkpoint is followed by one read of the next checkpoint and the ops
    after the connection's positions in one atomic step, so it completes however often the
    row is written meanwhile. Before, each round read its pages after the checkpoint and was
    invalidated again: 20 writes, 20 checkpoint_diffs before the first complete (under
    sustained writes a connection completed nothing; bench e2e found it)."""
    mem = _HotStore(rounds=20)
    mem.apply([put(U1, "t1", v=1), put(U1, "t2")])
    async with running_hub(mem) as hub:
        stream, out = make_stream(mem, hub)
        async with running(stream):
            await until(lambda: out.completes() >= 1)
        kinds = out.kinds()
        first = kinds.index("checkpoint_complete")
        assert kinds[:first].count("checkpoint_diff") == 1, kinds
        assert mem.calls["read_checkpoint_with_ops"] == 1
        # what the client holds at that checkpoint is the row's newest version
        rows: dict[str, Any] = {}
        for line in out.lines[:first]:
            for op in line.get("data", {}).get("data", []):
                if op["op"] == "PUT":
                    rows[op["object_id"]] = json.loads(op["data"])
        # ops 1, 2; the first page read wrote op 3 (v=119), and op 1 became its MOVE
        assert out.lines[first] == {"checkpoint_complete": {"last_op_id": "3"}}
        assert rows == {"t1": {"id": "t1", "v": 119}, "t2": {"id": "t2"}}


class _AnyStreams:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, list)


ANY_STREAMS: Any = _AnyStreams()


async def test_token_expiry_ends_the_stream(mem8: MemoryStore) -> None:
    async with running_hub(mem8) as hub:
        stream, out = make_stream(mem8, hub, exp=time.time() - 1)
        await asyncio.wait_for(stream.run(), 3)
        assert out.kinds()[-2:] == ["checkpoint_complete", "token_expires_in"]
        assert out.lines[-1] == {"token_expires_in": 0}
        assert hub.connections == 0
        # keepalives count the seconds down, then 0 and the end
        stream, out = make_stream(mem8, hub, exp=int(time.time()) + 2, keepalive_s=0.05)
        await asyncio.wait_for(stream.run(), 4)
        ticks = [line["token_expires_in"] for line in out.lines if "token_expires_in" in line]
        assert len(ticks) >= 3 and ticks[-1] == 0
        assert all(t in (1, 2) for t in ticks[:-1]) and ticks[:-1] == sorted(
            ticks[:-1], reverse=True
        )


async def test_priorities_partial_checkpoint_complete() -> None:
    mem = MemoryStore()
    mem.apply([put("hi[]", "a1"), put("lo[]", "b1"), put("hi[]", "a2"), put("lo[]", "b2")])
    async with running_hub(mem) as hub:
        stream, out = make_stream(mem, hub, PRIORITIES)
        async with running(stream):
            await until(lambda: out.completes() == 1)
        buckets = out.lines[0]["checkpoint"]["buckets"]
        assert sorted(buckets, key=lambda b: b["bucket"]) == [
            bucket_entry(mem, "hi[]", 0),
            bucket_entry(mem, "lo[]", 3, stream=1),
        ]
        assert out.lines[1:] == [
            data_line(mem, "hi[]", 0, [1, 3], False),
            {"partial_checkpoint_complete": {"last_op_id": "4", "priority": 0}},
            data_line(mem, "lo[]", 0, [2, 4], False),
            {"checkpoint_complete": {"last_op_id": "4"}},
        ]


async def test_write_checkpoint_echoed_once_its_position_is_applied(mem8: MemoryStore) -> None:
    mem8.issue_write_checkpoint(WCP_KEY, {"f/0": 5})
    async with running_hub(mem8) as hub:
        stream, out = make_stream(mem8, hub)
        async with running(stream):
            await until(lambda: out.completes() == 1)
            assert "write_checkpoint" not in out.lines[0]["checkpoint"]
            n = len(out.lines)
            mem8.set_offsets({"f/0": 5})  # no ops: the checkpoint stays 8
            await until(lambda: out.completes() == 2)
            assert out.lines[n:] == [
                {
                    "checkpoint_diff": {
                        "last_op_id": "8",
                        "write_checkpoint": "1",
                        "updated_buckets": [],
                        "removed_buckets": [],
                    }
                },
                {"checkpoint_complete": {"last_op_id": "8"}},
            ]


async def test_lookup_change_moves_the_bucket_set() -> None:
    mem = MemoryStore()
    resolver = make_resolver(BY_LIST)
    (key,) = resolver.lookup_keys
    l1, l2 = 'by_list["l1"]', 'by_list["l2"]'
    mem.apply([Lookup(key, ("l1",)), put(l1, "t1"), put(l2, "t2"), put(l2, "t3")])
    async with running_hub(mem) as hub:
        stream, out = make_stream(mem, hub, resolver=resolver)
        async with running(stream):
            await until(lambda: out.completes() == 1)
            assert out.lines[0]["checkpoint"]["buckets"] == [bucket_entry(mem, l1)]
            n = len(out.lines)
            mem.apply([Lookup(key, ("l1",), -1), Lookup(key, ("l2",))])
            await until(lambda: out.completes() == 2)
            assert out.lines[n:] == [
                {
                    "checkpoint_diff": {
                        "last_op_id": "3",
                        "write_checkpoint": None,
                        "updated_buckets": [bucket_entry(mem, l2)],
                        "removed_buckets": [l1],
                    }
                },
                data_line(mem, l2, 0, [2, 3], False),  # a bucket that joins starts at 0
                {"checkpoint_complete": {"last_op_id": "3"}},
            ]


# --------------------------------------------------------------------------- batched delivery


def one_change(mem: MemoryStore, bucket: str, after: int, op: int) -> list[dict[str, Any]]:
    """The lines of a change that adds op ``op`` (the new checkpoint) to ``bucket``."""
    diff = {
        "last_op_id": str(op),
        "write_checkpoint": None,
        "updated_buckets": [bucket_entry(mem, bucket)],
        "removed_buckets": [],
    }
    return [
        {"checkpoint_diff": diff},
        data_line(mem, bucket, after, [op], False),
        {"checkpoint_complete": {"last_op_id": str(op)}},
    ]


class FakeTransport(asyncio.WriteTransport):
    """The connection's socket for the hub's batched delivery: records the HTTP/1.1 chunks
    written to it; ``backlog`` stands for bytes the kernel has not sent yet."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[bytes] = []
        self.backlog = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.chunks.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self.backlog

    def lines(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for chunk in self.chunks:
            size, _, rest = chunk.partition(b"\r\n")
            body = rest[: int(size, 16)]
            assert rest == body + b"\r\n" and body.endswith(b"\n")  # one whole chunk
            out.extend(orjson.loads(line) for line in body.splitlines())
        return out


async def test_hub_delivers_a_change_itself_on_the_transport(mem8: MemoryStore) -> None:
    """A parked stream with an idle socket: the hub's delivery round writes the same lines
    the stream's task would (diff, the new ops, complete) straight to the transport, as
    one chunk, and the stream's own ``write`` sees nothing; its positions move on, so the
    next change starts after it."""
    async with running_hub(mem8) as hub:
        tr = FakeTransport()
        stream, out = make_stream(mem8, hub, transport=tr)
        async with running(stream):
            await until(lambda: out.completes() == 1)
            n = len(out.lines)
            await until(lambda: stream._parked)  # waiting, nothing queued: the hub may serve
            mem8.apply([put(U2, "x1", v=2)])  # op 9: not this client's bucket
            mem8.apply([put(U1, "t1", v=2)])  # op 10
            await until(lambda: hub.fast_deliveries == 1)
            assert len(tr.chunks) == 1 and out.lines[n:] == []
            assert tr.lines() == one_change(mem8, U1, 8, 10)
            await until(lambda: stream._parked)
            mem8.apply([Remove(U1, "todos", "t2")])  # op 11
            await until(lambda: hub.fast_deliveries == 2)
            assert tr.lines()[3:] == one_change(mem8, U1, 10, 11)
            assert out.lines[n:] == []


async def test_hub_leaves_a_busy_socket_to_the_stream(mem8: MemoryStore) -> None:
    """Bytes still queued on the socket: the hub wakes the stream instead, and its task
    sends the change through ``write`` (the slow client's stall accounting stays with it)."""
    async with running_hub(mem8) as hub:
        tr = FakeTransport()
        stream, out = make_stream(mem8, hub, transport=tr)
        async with running(stream):
            await until(lambda: out.completes() == 1)
            n = len(out.lines)
            await until(lambda: stream._parked)
            tr.backlog = 1
            mem8.apply([put(U1, "t1", v=2)])  # op 9
            await until(lambda: out.completes() == 2)
            assert tr.chunks == [] and hub.fast_deliveries == 0
            assert out.lines[n:] == one_change(mem8, U1, 8, 9)


class _SlowReads(MemoryStore):
    """Page reads that take a loop turn each, counting how many are under way at once."""

    def __init__(self) -> None:
        super().__init__()
        self.inflight = 0
        self.most_inflight = 0

    async def read_ops(self, bucket: str, after: int, upto: int, limit: int) -> list[StoredOp]:
        self.inflight += 1
        self.most_inflight = max(self.most_inflight, self.inflight)
        try:
            await asyncio.sleep(0.01)
            return await super().read_ops(bucket, after, upto, limit)
        finally:
            self.inflight -= 1


async def test_hub_round_reads_the_pages_of_many_connections_at_once() -> None:
    """One delivery round for connections that each need a page of their own (a batch that
    touched three users' buckets): the hub reads those pages concurrently, one round trip
    for the round. A round that awaited each connection's page in turn (bench e2e: 2,000
    per-user streams at 1,000 events/s, p50 32 ms -> 2.2 s) read one at a time."""
    mem = _SlowReads()
    users = ["u1", "u2", "u3"]
    mem.apply([put(f'by_user["{u}"]', "t0") for u in users])
    async with running_hub(mem) as hub:
        streams = []
        for u in users:
            resolver = BucketResolver(
                parse_rules(BY_USER),
                {"sub": u},
                {},
                include_defaults=True,
                max_buckets=100,
                max_parameter_results=100,
            )
            tr = FakeTransport()
            stream, out = make_stream(mem, hub, resolver=resolver, transport=tr)
            streams.append((stream, out, tr))
        async with contextlib.AsyncExitStack() as stack:
            for stream, _out, _ in streams:
                await stack.enter_async_context(running(stream))
            for stream, out, _ in streams:
                await until(lambda out=out: out.completes() == 1)  # type: ignore[misc]
                await until(lambda stream=stream: stream._parked)  # type: ignore[misc]
            mem.most_inflight = 0
            mem.apply([put(f'by_user["{u}"]', "t1", v=2) for u in users])  # one change entry
            await until(lambda: hub.fast_deliveries == 3)
            assert mem.most_inflight == 3
            for _, _, tr in streams:
                assert [kind(x) for x in tr.lines()] == [
                    "checkpoint_diff",
                    "data",
                    "checkpoint_complete",
                ]


GLOBAL = """
bucket_definitions:
  everyone:
    data: [SELECT * FROM news]
"""


async def test_hub_round_serves_a_fanout_from_one_page_read() -> None:
    """A change to a bucket held by many connections (at least ``FANOUT_SHARED``): the
    round reads the page once, when the first connection needs it, and every connection
    gets the same lines (diff, the op, complete) from the hub."""
    mem = _SlowReads()
    bucket = "everyone[]"
    mem.apply([put(bucket, "n0")])
    n = FANOUT_SHARED + 4
    async with running_hub(mem) as hub:
        streams = [make_stream(mem, hub, GLOBAL, transport=FakeTransport()) for _ in range(n)]
        async with contextlib.AsyncExitStack() as stack:
            for stream, _out in streams:
                await stack.enter_async_context(running(stream))
            for stream, out in streams:
                await until(lambda out=out: out.completes() == 1)  # type: ignore[misc]
                await until(lambda stream=stream: stream._parked)  # type: ignore[misc]
            reads = mem.calls["read_ops"]
            mem.apply([put(bucket, "n1", v=2)])
            await until(lambda: hub.fast_deliveries == n)
            assert mem.calls["read_ops"] == reads + 1
            firsts = set()
            for stream, _out in streams:
                tr = stream._transport
                assert isinstance(tr, FakeTransport)
                lines = tr.lines()
                assert [kind(x) for x in lines] == [
                    "checkpoint_diff",
                    "data",
                    "checkpoint_complete",
                ]
                assert [op["object_id"] for op in lines[1]["data"]["data"]] == ["n1"]
                firsts.add(tr.chunks[0])
            assert len(firsts) == 1  # the same chunk for all
