"""Exact write checkpoints (gateway.write_checkpoint_mode: source) against the stack's real
PostgreSQL: the id is bound to ``pg_current_wal_lsn()`` read through a read-only connection
and appears in a checkpoint only once the processor applied an event of that connector at or
past that LSN (here fed straight into the store, as the processor's apply step does)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from bucketsync import stack as stack_mod
from bucketsync.errors import UserError
from gateway.source_position import parse_lsn
from pipeline.store import PlannedBatch, Store
from tests.conftest import hidden_test_env
from tests.gateway_helpers import Client, feed, running_gateway, todo
from tests.test_gateway_protocol import RULES

pytestmark = pytest.mark.stack


def test_parse_lsn() -> None:
    assert parse_lsn("0/16B3748") == 0x16B3748
    assert parse_lsn("1/0") == 1 << 32
    with pytest.raises(ValueError):
        parse_lsn("16B3748")


@pytest.fixture
def pg_dsn(stack) -> str:
    try:
        with hidden_test_env():
            stack_mod.ensure_up(stack.settings, source="postgres")
    except (stack_mod.SourceUnavailable, UserError) as exc:
        if os.environ.get("BUCKETSYNC_TEST_REQUIRE_POSTGRES", "") not in ("", "0"):
            pytest.fail(f"postgres source unavailable: {exc}", pytrace=False)
        pytest.skip(f"postgres source unavailable: {exc}")
    return stack_mod.postgres_dsn(stack.settings)


def _source_settings(make_settings: Any, pg_dsn: str, tmp_path: Path, ns: Any) -> tuple[Any, str]:
    """Settings of a gateway in source mode, and the connector name it binds LSNs to."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    connector = f"{ns.prefix}-app"
    s = make_settings(
        sync_rules=str(rules),
        gateway={
            "write_checkpoint_mode": "source",
            "source_dsn": pg_dsn,
            "source_connector": connector,
        },
    )
    return s, connector


async def _wcp(c: Client, url: str) -> int:
    assert c.session is not None
    async with c.session.get(
        url + "/write-checkpoint2.json?client_id=sim",
        headers={"Authorization": f"Token {c.token}"},
    ) as r:
        assert r.status == 200, await r.text()
        return int((await r.json())["data"]["write_checkpoint"])


async def test_source_mode_acknowledges_at_the_applied_lsn(
    make_settings, pg_dsn: str, tmp_path: Path, ns
) -> None:
    s, connector = _source_settings(make_settings, pg_dsn, tmp_path, ns)
    await feed(s, [todo("t0", "u1")])
    store = Store.from_settings(s)
    try:
        async with running_gateway(s, with_position=True) as url, Client(url, s, "u1") as c:
            await c.sync_until()
            wid = await _wcp(c, url)
            stored = await store.r.hget(store.k("wcp", '["u1","sim"]'), f"pos:{wid}")
            assert stored is not None and f"lsn:{connector}".encode() in stored
            lsn = int(orjson.loads(stored)[f"lsn:{connector}"])
            # an event before the LSN (another connector's, or this one's older) is not enough
            for off, (name, pos) in enumerate([(connector, lsn - 1), ("other", lsn + 10)]):
                b = PlannedBatch(guard={"x/0": off}, offsets={"x/0": off}, source_lsn={name: pos})
                assert (await store.apply(b)).status == "ok"
            await c.sync_until(timeout_s=1.5)
            assert c.state.write_checkpoint is None or c.state.write_checkpoint < wid
            # an event at the LSN: acknowledged
            b = PlannedBatch(guard={"x/0": 2}, offsets={"x/0": 2}, source_lsn={connector: lsn})
            assert (await store.apply(b)).status == "ok"
            await c.sync_until(timeout_s=10)
            assert c.state.applied_write_checkpoint == wid
    finally:
        await store.close()


async def test_source_mode_waits_for_the_checkpoint_that_carries_the_lsn(
    make_settings, pg_dsn: str, tmp_path: Path, ns
) -> None:
    """The store's applied LSN can be ahead of the change entries the hub has read (the
    batch's entry is written in the same step, but the hub reads it a moment later). A write
    checkpoint requested in that moment must wait for the hub to reach the batch's entry:
    acknowledging it at the older checkpoint makes the client drop its local row before the
    server's copy arrives (the flicker the e2e test caught). The window is held open here by
    raising the stored LSN without a change entry."""
    s, connector = _source_settings(make_settings, pg_dsn, tmp_path, ns)
    await feed(s, [todo("t0", "u1")])
    store = Store.from_settings(s)
    try:
        async with running_gateway(s, with_position=True) as url, Client(url, s, "u1") as c:
            await c.sync_until()
            await store.r.hset(store.k("source_lsn"), connector, str(1 << 62))
            wid = await _wcp(c, url)
            await c.sync_until(timeout_s=1.5)
            assert c.state.write_checkpoint is None or c.state.write_checkpoint < wid
            # the batch's change entry reaches the hub: acknowledged
            b = PlannedBatch(guard={"x/0": 0}, offsets={"x/0": 0}, source_lsn={connector: 1 << 62})
            assert (await store.apply(b)).status == "ok"
            await c.sync_until(timeout_s=10)
            assert c.state.applied_write_checkpoint == wid
    finally:
        await store.close()


async def test_source_mode_answers_503_when_the_database_is_unreachable(
    make_settings, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    s = make_settings(
        sync_rules=str(rules),
        gateway={
            "write_checkpoint_mode": "source",
            "source_dsn": "postgresql://nobody:x@127.0.0.1:1/app",
            "source_timeout_s": 2,
        },
    )
    async with running_gateway(s, with_position=True) as url, Client(url, s, "u1") as c:
        assert c.session is not None
        async with c.session.get(
            url + "/write-checkpoint2.json?client_id=sim",
            headers={"Authorization": f"Token {c.token}"},
        ) as r:
            assert r.status == 503
            assert (await r.json())["error"]["code"] == "PSYNC_S2003"
