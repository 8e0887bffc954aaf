"""A compaction step may fold a bucket's leading run into a CLEAR whose op id lies above the
checkpoint a connection is serving (the run goes on into ops written after it). Reading
``(after, checkpoint]`` then finds nothing: the ops below the checkpoint are gone and the
CLEAR is above it. The page must say so (its target past the checkpoint), so the
connection moves to a newer checkpoint instead of completing this one with the ops
missing (the client's checksum failed: scripts/qa-streams.py with a short
``compaction.interval_s``, buckets joining a connection's set). Pure logic: the in-memory
store of the gateway tests."""

from __future__ import annotations

from gateway.hub import PageCache
from tests.helpers.memory_store import MemoryStore, Put, Remove

B = 'lists["L1"]'


def put(oid: str, n: int) -> Put:
    return Put(B, "todos", oid, {"id": oid, "n": n})


async def test_a_range_folded_into_a_clear_above_it_is_not_an_empty_page() -> None:
    mem = MemoryStore()
    mem.apply([put("t1", 1), put("t2", 1)])
    mem.apply([put("t1", 2), Remove(B, "todos", "t2")])
    cp = mem.cp  # a connection read this checkpoint and the bucket's state
    assert mem.state(B).count == 4
    # newer writes supersede the rest, and a compaction step folds everything into a CLEAR
    mem.apply([Remove(B, "todos", "t1")])
    assert mem.compact(B) > 0
    clear = mem.ops(B)[0]
    assert clear.kind == "CLEAR" and clear.op_id > cp
    page = await PageCache(mem).get(B, 0, cp, 100, 1 << 20)  # type: ignore[arg-type]
    assert page.ops == 0
    assert page.max_target > cp, "an empty page would let the connection complete cp"


async def test_an_empty_range_below_live_ops_stays_an_empty_page() -> None:
    mem = MemoryStore()
    mem.apply([put("t1", 1)])
    cp = mem.cp
    mem.apply([put("t2", 1)])
    page = await PageCache(mem).get(B, cp, cp + 1, 100, 1 << 20)  # type: ignore[arg-type]
    assert page.ops == 1 and page.max_target == 0
    empty = await PageCache(mem).get(B, cp, cp, 100, 1 << 20)  # type: ignore[arg-type]
    assert empty.ops == 0 and empty.max_target == 0
