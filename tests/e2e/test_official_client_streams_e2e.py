"""End to end with the official PowerSync Node client and Sync Streams (edition 3), through
Kafka, the processor and Redis: default (auto_subscribe) streams sync without subscribing;
``db.syncStream('list_todos', {list_id}).subscribe()`` resolves ``waitForFirstSync()``
with exactly that list's rows (for a list the user is a member of). Priority order on the
wire (partial_checkpoint_complete per level) is checked in tests/test_gateway_streams.py.
Expected rows come from an independent model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bucketsync.tokens import make_dev_token
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
