"""NULL bucket parameters end to end: Debezium events on Kafka -> processor -> gateway.

sync-protocol.md §8.5 (corrected): a row whose bucket parameter is NULL goes into no
bucket. A valid token lacking the claim still resolves to `region_work[null]`, which must
exist in its checkpoint and stay empty (checksum 0, count 0) -- not hand it the rows whose
region is NULL.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bucketsync.tokens import make_dev_token
from tests.gateway_helpers import Client, running_gateway
from tests.pipeline_helpers import (
    debezium_json,
    produce,
    run_processor,
    store_buckets,
    write_rules,
)

pytestmark = pytest.mark.stack

RULES = """
bucket_definitions:
  region_work:
    parameters: SELECT request.jwt() ->> 'region' AS region_id
    data:
      - SELECT * FROM sites WHERE region_id = bucket.region_id
"""

NULL_IDS = [f"n{i}" for i in range(5)]
EU_IDS = ["e1", "e2", "e3"]


def site(sid: str, region: str | None, op: str = "c") -> tuple[bytes, bytes | None]:
    return debezium_json("sites", op, {"id": sid}, {"id": sid, "region_id": region, "name": sid})


def history() -> list[tuple[bytes, bytes | None]]:
    msgs = [site(s, None) for s in NULL_IDS]
    msgs += [site(s, "eu") for s in EU_IDS]
    msgs += [site("u1", "us"), site("moved", "eu")]
    # a row leaving a region for NULL, and one arriving from NULL
    msgs += [site("moved", None, "u"), site("late", None), site("late", "eu", "u")]
    return msgs


async def first_checkpoint(url: str, token: str) -> list[dict[str, Any]]:
    """The raw lines of one stream up to the first checkpoint_complete."""
    lines: list[dict[str, Any]] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url + "/sync/stream",
            json={"buckets": [], "raw_data": True},
            headers={"Authorization": f"Token {token}"},
        ) as r,
    ):
        assert r.status == 200
        async for raw in r.content:
            if not raw.strip():
                continue
            lines.append(orjson.loads(raw))
            if "checkpoint_complete" in lines[-1]:
                break
    return lines


async def test_token_without_claim_gets_empty_null_bucket(
    make_settings, create_topic, ns, tmp_path: Path
) -> None:
    topic = create_topic(ns.topic("app.public.sites"))
    s = make_settings(
        kafka={"topics": [topic]},
        sync_rules=write_rules(tmp_path, RULES),
        processor={"batch_max_events": 4, "batch_max_wait_ms": 20},
        compaction={"interval_s": 0},
        gateway={"keepalive_s": 20},
    )
    msgs = history()
    produce(s.kafka.bootstrap_servers, topic, msgs)
    await asyncio.wait_for(run_processor(s, len(msgs)), 60)

    # the processor wrote no NULL bucket at all
    assert await store_buckets(s) == ['region_work["eu"]', 'region_work["us"]']

    eu_rows = {*EU_IDS, "late"}
    async with running_gateway(s) as url:
        # a valid token lacking the claim: region_work[null], empty
        anon = make_dev_token(s, sub="anon")
        lines = await first_checkpoint(url, anon)
        assert list(lines[0]) == ["checkpoint"]
        assert lines[0]["checkpoint"]["buckets"] == [
            {
                "bucket": "region_work[null]",
                "checksum": 0,
                "count": 0,
                "priority": 3,
                "subscriptions": [{"default": 0}],
            }
        ]
        assert [next(iter(line)) for line in lines[1:]] == ["checkpoint_complete"]
        assert not any(i.encode() in orjson.dumps(lines) for i in [*NULL_IDS, "moved"])

        async with Client(url, s, "anon") as c:
            assert await c.sync_until() == 200
            assert c.state.ops == 0
            assert c.state.tables() == {}
            assert list(c.state.buckets) == ["region_work[null]"]
            assert c.state.target == {"region_work[null]": 0}
            assert c.state.mismatches == [] and c.state.protocol_errors == []

        # a token with region 'eu': exactly the eu rows
        async with Client(url, s, "eu-user") as c:
            c.token = make_dev_token(s, sub="eu-user", claims={"region": "eu"})
            assert await c.sync_until() == 200
            sites = c.state.tables().get("sites", {})
            assert set(sites) == eu_rows
            assert all(row["region_id"] == "eu" for row in sites.values())
            assert list(c.state.buckets) == ['region_work["eu"]']
            assert c.state.mismatches == [] and c.state.protocol_errors == []
