"""End to end: Debezium events on Kafka -> processor (faust) -> Redis -> gateway -> the
official PowerSync Node client. Its tables must equal the reference model at each
completed checkpoint, it never logs a checksum mismatch, and a reconnect resumes."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from bucketsync.tokens import make_dev_token
from gateway import stream as gw_stream
from tests.e2e.powersync_client import PowerSyncNodeClient, require_node_client
from tests.gateway_helpers import running_gateway
from tests.model import BucketModel
from tests.pipeline_helpers import debezium_json, expected_normalised, produce
from tests.processes import child_env, start_processor, write_config

pytestmark = [pytest.mark.stack, pytest.mark.e2e]

RULES = """
bucket_definitions:
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT id, owner_id, description, completed FROM todos WHERE owner_id = bucket.user_id
"""
SCHEMA = {"todos": {"owner_id": "text", "description": "text", "completed": "integer"}}


def model_rules(table, row):
    if not table.endswith(".todos"):
        return []
    data = {k: row.get(k) for k in ("id", "owner_id", "description", "completed")}
    return [(f'by_user["{row["owner_id"]}"]', "todos", str(row["id"]), orjson.dumps(data).decode())]


def expected_rows(model: BucketModel, user: str) -> list[dict]:
    b = model.buckets.get(f'by_user["{user}"]')
    rows = [] if b is None else [orjson.loads(d) for d in b.live_rows().values()]
    return sorted(rows, key=lambda r: r["id"])


def ops_sent() -> float:
    return gw_stream.OPS_SENT._value.get()  # type: ignore[attr-defined]


async def test_official_client_syncs_live_changes_and_resumes(
    make_settings, create_topic, ns, tmp_path: Path, caplog
) -> None:
    require_node_client()
    topic = create_topic(ns.topic("app.public.todos"))
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    s = make_settings(
        kafka={"topics": [topic]}, sync_rules=str(rules), compaction={"interval_s": 0}
    )
    cfg = write_config(tmp_path, s, "bucketsync")
    env = child_env()
    proc = start_processor(cfg, "faust", inherit_output=True)
    model = BucketModel(model_rules)

    def send(op: str, tid: str, owner: str | None = None, text: str = "", done: int = 0) -> None:
        key = {"id": tid}
        after = (
            None
            if op == "d"
            else {"id": tid, "owner_id": owner, "description": text, "completed": done}
        )
        produce(s.kafka.bootstrap_servers, topic, [debezium_json("todos", op, key, after)])
        model.apply(expected_normalised(topic, op, key, after))

    select = "SELECT id, owner_id, description, completed FROM todos ORDER BY id"
    caplog.set_level(logging.INFO, logger="bucketsync.gateway")
    try:
        for i in range(5):
            send("c", f"t{i}", "u1", f"task {i}")
        send("c", "x1", "u2", "someone else's")
        async with running_gateway(s) as url:
            db = tmp_path / "client.sqlite"
            token = make_dev_token(s, sub="u1")
            async with PowerSyncNodeClient(url, SCHEMA, db_path=str(db)) as c:
                await c.connect(token)
                await c.wait_synced(timeout=60)
                await c.wait_for(select, expected_rows(model, "u1"), timeout=30)
                send("u", "t1", "u1", "task 1 edited", 1)
                await c.wait_for(select, expected_rows(model, "u1"), timeout=30)
                send("d", "t2")
                await c.wait_for(select, expected_rows(model, "u1"), timeout=30)
                send("u", "t3", "u2", "moved to u2")  # ownership move: leaves u1's bucket
                await c.wait_for(select, expected_rows(model, "u1"), timeout=30)
                assert len(expected_rows(model, "u1")) == 3
                assert c.checksum_mismatches == []
                await c.disconnect()
            # the server has noticed the disconnect before anything new happens
            for _ in range(100):
                if gw_stream.OPEN_STREAMS._value.get() == 0:  # type: ignore[attr-defined]
                    break
                await asyncio.sleep(0.1)
            before = ops_sent()
            send("c", "t9", "u1", "while offline")
            async with PowerSyncNodeClient(url, SCHEMA, db_path=str(db)) as c2:
                await c2.connect(token)
                await c2.wait_for(select, expected_rows(model, "u1"), timeout=60)
                assert c2.checksum_mismatches == []
                await c2.disconnect()
            # the reconnect asked for ops after what it had, and got only the new one
            opened = [r.getMessage() for r in caplog.records if "stream opened" in r.getMessage()]
            afters = [orjson.loads(re.search(r"after=(\{.*\})", m).group(1)) for m in opened]
            assert afters[0] == {}
            assert int(afters[-1]['by_user["u1"]']) > 0
            assert ops_sent() - before == 1

            # history grows, compaction folds a prefix the client already holds part of,
            # and the client resumes from an op id inside the folded range
            send("u", "t0", "u1", "edit 1")
            send("u", "t0", "u1", "edit 2")
            send("d", "t1")
            send("u", "t4", "u1", "edit 3")
            await asyncio.sleep(2)
            out = subprocess.run(
                [sys.executable, "-m", "bucketsync.cli", "--config", str(cfg), "compact", "--all"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 0, out.stderr
            assert re.search(r"[1-9]\d* ops removed", out.stdout), out.stdout
            async with PowerSyncNodeClient(url, SCHEMA, db_path=str(db)) as c3:
                await c3.connect(token)
                await c3.wait_for(select, expected_rows(model, "u1"), timeout=60)
                await asyncio.sleep(1)
                assert c3.checksum_mismatches == []
                await c3.disconnect()
            verify = subprocess.run(
                [sys.executable, "-m", "bucketsync.cli", "--config", str(cfg), "verify"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert verify.returncode == 0, verify.stdout
    finally:
        proc.terminate()
        proc.wait(30)
