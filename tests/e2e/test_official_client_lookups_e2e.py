"""End to end with the official PowerSync Node client: a user added to a shared group
(a membership row, a Debezium event on Kafka) receives the group's rows while connected,
and loses them when removed -- on the same stream, without reconnecting. Expected rows
come from an independent model."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bucketsync.tokens import make_dev_token
from tests.e2e.powersync_client import PowerSyncNodeClient, require_node_client
from tests.gateway_helpers import running_gateway
from tests.pipeline_helpers import debezium_json, produce, write_rules
from tests.test_gateway_lookups import Model, member_msg, running_processor, todo_msg

pytestmark = [pytest.mark.stack, pytest.mark.e2e]

RULES = """
bucket_definitions:
  groups:
    parameters: SELECT list_id FROM memberships WHERE user_id = request.user_id()
    data:
      - SELECT id, list_id, title FROM todos WHERE list_id = bucket.list_id
"""
SCHEMA = {"todos": {"list_id": "text", "title": "text"}}
SELECT = "SELECT id, list_id, title FROM todos ORDER BY id"


async def test_official_client_joins_and_leaves_a_group_while_connected(
    make_settings, create_topic, ns, tmp_path: Path, caplog
) -> None:
    require_node_client()
    mt = create_topic(ns.topic("app.public.memberships"))
    tt = create_topic(ns.topic("app.public.todos"))
    s = make_settings(
        kafka={"topics": [mt, tt]},
        sync_rules=write_rules(tmp_path, RULES),
        processor={"batch_max_events": 50, "batch_max_wait_ms": 10},
        compaction={"interval_s": 0},
    )
    boot = s.kafka.bootstrap_servers
    m = Model()

    def todos(*rows: tuple[str, str, str]) -> None:
        for tid, lst, title in rows:
            m.todos[tid] = {"id": tid, "list_id": lst, "title": title}
        produce(boot, tt, [todo_msg(*r) for r in rows])

    def join(mid: str, user: str, lst: str) -> None:
        m.members[mid] = (user, lst)
        produce(boot, mt, [member_msg(mid, user, lst)])

    def leave(mid: str) -> None:
        user, lst = m.members.pop(mid)
        produce(
            boot,
            mt,
            [
                member_msg(mid, user, lst, "d"),
                debezium_json("memberships", "tombstone", {"id": mid}, None),
            ],
        )

    def expected(user: str) -> list[dict]:
        return sorted(m.rows(user).values(), key=lambda r: r["id"])

    todos(("a1", "A", "mine"), ("g1", "G", "group 1"), ("g2", "G", "group 2"))
    todos(("x1", "X", "not mine"))
    join("m1", "u1", "A")
    join("m2", "u2", "G")
    caplog.set_level(logging.INFO, logger="bucketsync.gateway")
    async with running_processor(s), running_gateway(s) as url:
        token = make_dev_token(s, sub="u1")
        async with PowerSyncNodeClient(url, SCHEMA, db_path=str(tmp_path / "c.db")) as c:
            await c.connect(token)
            await c.wait_synced(timeout=60)
            await c.wait_for(SELECT, expected("u1"), timeout=30)
            join("m3", "u1", "G")
            await c.wait_for(SELECT, expected("u1"), timeout=30)
            assert {r["id"] for r in expected("u1")} == {"a1", "g1", "g2"}
            todos(("g3", "G", "added while a member"))
            await c.wait_for(SELECT, expected("u1"), timeout=30)
            leave("m3")
            await c.wait_for(SELECT, expected("u1"), timeout=30)
            assert [r["id"] for r in expected("u1")] == ["a1"]
            assert c.checksum_mismatches == []
            await c.disconnect()
    opened = [r for r in caplog.records if "stream opened: sub=u1" in r.getMessage()]
    assert len(opened) == 1  # one stream: the bucket set changed without a reconnect
    changed = [r.getMessage() for r in caplog.records if "bucket set changed" in r.getMessage()]
    assert len(changed) == 2 and "+1 -0" in changed[0] and "+0 -1" in changed[1]
