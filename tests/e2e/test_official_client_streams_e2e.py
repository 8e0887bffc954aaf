"""End to end with the official PowerSync Node client and Sync Streams (edition 3), through
Kafka, the processor and Redis: default (auto_subscribe) streams sync without subscribing;
``db.syncStream('list_todos', {list_id}).subscribe()`` resolves ``waitForFirstSync()``
with exactly that list's rows (for a list the user is a member of); stream priorities are
honoured: the client's ``waitForFirstSync({priority})`` resolves, with that priority's rows
visible and its entry in ``priorityStatusEntries`` synced, while a large priority-3 stream is
still downloading. The exact order of lines on the wire (partial_checkpoint_complete per
level) is checked in tests/test_gateway_streams.py. Expected rows come from an independent
model."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bucketsync.config import Settings
from bucketsync.tokens import make_dev_token
from pipeline.store import Store
from tests.e2e.powersync_client import PowerSyncNodeClient, require_node_client
from tests.gateway_helpers import running_gateway
from tests.pipeline_helpers import debezium_json, produce, write_rules
from tests.test_gateway_lookups import running_processor

pytestmark = [pytest.mark.stack, pytest.mark.e2e]

RULES = """
config:
  edition: 3
with:
  my_lists: SELECT list_id FROM memberships WHERE user_id = auth.user_id()
streams:
  lists:
    auto_subscribe: true
    priority: 0
    query: SELECT id, name FROM lists WHERE id IN my_lists
  notes:
    auto_subscribe: true
    priority: 3
    query: SELECT id, owner_id, text FROM notes WHERE owner_id = auth.user_id()
  list_todos:
    query: |
      SELECT id, list_id, title FROM todos
      WHERE list_id = subscription.parameter('list_id') AND list_id IN my_lists
"""
SCHEMA = {
    "lists": {"name": "text"},
    "notes": {"owner_id": "text", "text": "text"},
    "todos": {"list_id": "text", "title": "text"},
}


def msg(table: str, row: dict[str, Any]) -> tuple[bytes, bytes | None]:
    return debezium_json(table, "c", {"id": row["id"]}, row)


async def test_official_client_streams_defaults_subscriptions_priorities(
    make_settings, create_topic, ns, tmp_path: Path
) -> None:
    require_node_client()
    topics = {
        t: create_topic(ns.topic(f"app.public.{t}"))
        for t in ("memberships", "lists", "notes", "todos")
    }
    s = make_settings(
        kafka={"topics": list(topics.values())},
        sync_rules=write_rules(tmp_path, RULES),
        processor={"batch_max_events": 50, "batch_max_wait_ms": 10},
        compaction={"interval_s": 0},
    )
    boot = s.kafka.bootstrap_servers
    # the model
    members = {("u1", "A"), ("u1", "B"), ("u2", "C")}
    lists = {lst: {"id": lst, "name": f"list {lst}"} for lst in "ABC"}
    notes = {
        n: {"id": n, "owner_id": o, "text": f"note {n}"} for n, o in [("n1", "u1"), ("n2", "u2")]
    }
    todos = {
        f"t{i}": {"id": f"t{i}", "list_id": lst, "title": f"todo {i}"}
        for i, lst in enumerate("AABBCC")
    }
    produce(
        boot,
        topics["memberships"],
        [
            msg("memberships", {"id": f"m{i}", "user_id": u, "list_id": lst})
            for i, (u, lst) in enumerate(sorted(members))
        ],
    )
    produce(boot, topics["lists"], [msg("lists", r) for r in lists.values()])
    produce(boot, topics["notes"], [msg("notes", r) for r in notes.values()])
    produce(boot, topics["todos"], [msg("todos", r) for r in todos.values()])

    def mine(user: str) -> set[str]:
        return {lst for u, lst in members if u == user}

    def rows(table: dict[str, dict[str, Any]], pred: Any) -> list[dict[str, Any]]:
        return sorted((r for r in table.values() if pred(r)), key=lambda r: r["id"])

    async with running_processor(s), running_gateway(s) as url:
        token = make_dev_token(s, sub="u1")
        async with PowerSyncNodeClient(url, SCHEMA, db_path=str(tmp_path / "c.db")) as c:
            await c.connect(token)
            await c.wait_synced(timeout=60)
            # default streams, without subscribing
            await c.wait_for(
                "SELECT id, name FROM lists ORDER BY id",
                rows(lists, lambda r: r["id"] in mine("u1")),
                timeout=30,
            )
            await c.wait_for(
                "SELECT id, owner_id, text FROM notes ORDER BY id",
                rows(notes, lambda r: r["owner_id"] == "u1"),
                timeout=30,
            )
            assert await c.query("SELECT id FROM todos") == []
            # an explicit subscription: waitForFirstSync resolves with exactly that list's rows
            await c.subscribe("list_todos", {"list_id": "B"}, timeout=30)
            got = await c.query("SELECT id, list_id, title FROM todos ORDER BY id")
            assert got == rows(todos, lambda r: r["list_id"] == "B")
            # a list the user is no member of: the subscription syncs, with no rows
            await c.subscribe("list_todos", {"list_id": "C"}, timeout=30)
            got = await c.query("SELECT id, list_id, title FROM todos ORDER BY id")
            assert got == rows(todos, lambda r: r["list_id"] == "B")
            assert c.checksum_mismatches == []
            await c.disconnect()


PRIORITY_RULES = """
config:
  edition: 3
streams:
  urgent:
    auto_subscribe: true
    priority: 0
    query: SELECT id, owner_id, name FROM lists WHERE owner_id = auth.user_id()
  soon:
    auto_subscribe: true
    priority: 1
    query: SELECT id, owner_id, title FROM todos WHERE owner_id = auth.user_id()
  bulk:
    auto_subscribe: true
    priority: 3
    query: SELECT id, owner_id, text FROM notes WHERE owner_id = auth.user_id()
"""
PRIORITY_SCHEMA = {
    "lists": {"owner_id": "text", "name": "text"},
    "todos": {"owner_id": "text", "title": "text"},
    "notes": {"owner_id": "text", "text": "text"},
}
#: rows of the priority-3 stream: enough that the client is still downloading them when the
#: priority-0/1 data is complete (the order is fixed by the protocol, the size only keeps the
#: window wide enough to read the client's tables inside it)
BULK_NOTES = 20_000


async def _wait_applied(settings: Settings, produced: dict[str, int], timeout: float = 120) -> None:
    """Until the processor applied every produced message (offsets in the store)."""
    store = Store.from_url(settings.redis.url, settings.redis.prefix)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            offs = await store.applied_offsets()
            done = {
                t: sum(o + 1 for tp, o in offs.items() if tp.rsplit("/", 1)[0] == t)
                for t in produced
            }
            if done == produced:
                return
            assert loop.time() < deadline, f"applied {done}, produced {produced}"
            await asyncio.sleep(0.2)
    finally:
        await store.close()


async def test_official_client_priority_streams_complete_before_a_large_low_priority_stream(
    make_settings, create_topic, ns, tmp_path: Path
) -> None:
    """Stream priorities end to end: with the official client, the priority-0 and priority-1
    streams are complete (their rows visible, ``waitForFirstSync({priority})`` resolved,
    their priority marked synced in ``priorityStatusEntries``) while the priority-3 stream's
    20,000 rows are still downloading (none of them visible, the full sync not done)."""
    require_node_client()
    topics = {t: create_topic(ns.topic(f"app.public.{t}")) for t in ("lists", "todos", "notes")}
    s = make_settings(
        kafka={"topics": list(topics.values())},
        sync_rules=write_rules(tmp_path, PRIORITY_RULES),
        processor={"batch_max_events": 500, "batch_max_wait_ms": 10},
        compaction={"interval_s": 0},
    )
    boot = s.kafka.bootstrap_servers
    # the model: u1 owns 2 lists, 3 todos and BULK_NOTES notes; u2 one of each
    lists = {
        f"l{i}": {"id": f"l{i}", "owner_id": o, "name": f"list {i}"}
        for i, o in [(1, "u1"), (2, "u1"), (3, "u2")]
    }
    todos = {
        f"t{i}": {"id": f"t{i}", "owner_id": o, "title": f"todo {i}"}
        for i, o in enumerate(["u1", "u1", "u1", "u2"])
    }
    filler = "x" * 120
    notes = {
        f"n{i:05d}": {"id": f"n{i:05d}", "owner_id": "u1", "text": f"note {i} {filler}"}
        for i in range(BULK_NOTES)
    }
    notes["n_u2"] = {"id": "n_u2", "owner_id": "u2", "text": "not mine"}
    produced = {}
    for name, table in (("lists", lists), ("todos", todos), ("notes", notes)):
        produce(boot, topics[name], [msg(name, r) for r in table.values()])
        produced[topics[name]] = len(table)

    def mine(table: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        return sorted((r for r in table.values() if r["owner_id"] == "u1"), key=lambda r: r["id"])

    async with running_processor(s), running_gateway(s) as url:
        # everything is in the store before the client connects: one checkpoint holds it all
        await _wait_applied(s, produced)
        token = make_dev_token(s, sub="u1")
        async with PowerSyncNodeClient(url, PRIORITY_SCHEMA, db_path=str(tmp_path / "p.db")) as c:
            counted = ["lists", "todos", "notes"]
            waits = [
                asyncio.create_task(c.wait_first_sync_priority(p, counted, timeout=90))
                for p in (0, 1)
            ]
            await asyncio.sleep(0)
            await c.connect(token)
            at_p0, at_p1 = await asyncio.gather(*waits)
            for prio, at in ((0, at_p0), (1, at_p1)):
                # the priority is marked synced, by its own entry (not the full-sync one) ...
                assert at["status_for_priority"]["has_synced"] is True, at
                entries = {e["priority"]: e for e in at["status_at_resolve"]["priority_status"]}
                assert entries[prio]["has_synced"] is True, at
                assert 2147483647 not in entries, at
                # ... while the full sync is not done, before and after reading the tables
                assert at["status_at_resolve"]["has_synced"] is not True, at
                assert at["status_after_counts"]["has_synced"] is not True, at
                # rows of priority <= prio are all visible, none of the priority-3 stream
                assert at["counts"]["lists"] == len(mine(lists)), at
                if prio == 1:
                    assert at["counts"]["todos"] == len(mine(todos)), at
                assert at["counts"]["notes"] == 0, at
                # the priority-3 ops were still downloading (the client's own progress count)
                assert at["oplog_rows"] < BULK_NOTES, at
                progress = at["status_after_counts"]["download_progress"]
                assert progress["downloaded"] < progress["total"] == BULK_NOTES + 5, at
            # then everything: exactly the model's rows
            await c.wait_synced(timeout=120)
            assert await c.query("SELECT id, owner_id, name FROM lists ORDER BY id") == mine(lists)
            assert await c.query("SELECT id, owner_id, title FROM todos ORDER BY id") == mine(todos)
            got = await c.query("SELECT id, owner_id, text FROM notes ORDER BY id")
            assert len(got) == BULK_NOTES and got == mine(notes)
            # the status the client published along the way: a priority entry synced strictly
            # before the full sync completed
            first_prio = next(
                i
                for i, st in enumerate(c.statuses)
                if any(e["priority"] <= 1 and e["has_synced"] for e in st["priority_status"])
                and st["has_synced"] is not True
            )
            first_full = next(i for i, st in enumerate(c.statuses) if st["has_synced"] is True)
            assert first_prio < first_full
            assert c.checksum_mismatches == []
            await c.disconnect()
