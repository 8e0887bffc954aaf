"""The official PowerSync Node client on a gzip sync stream (``gateway.compression:
gzip``; its fetch sends ``Accept-Encoding: gzip, deflate``): a multi-page initial sync
(deflated), then changes served to the idle, detached stream by the hub's batched
delivery (stored gzip blocks). Its table must equal the rows written, with no checksum
mismatch, and the gateway must have sent gzip."""

from __future__ import annotations

from pathlib import Path

import pytest

from bucketsync.tokens import make_dev_token
from gateway import stream as gw_stream
from tests.e2e.powersync_client import PowerSyncNodeClient, require_node_client
from tests.e2e.test_official_client_e2e import RULES, SCHEMA
from tests.gateway_helpers import delete_todo, feed, running_gateway, todo

pytestmark = [pytest.mark.stack, pytest.mark.e2e]

SELECT = "SELECT id, owner_id, description, completed FROM todos ORDER BY id"


def gz_streams() -> float:
    return gw_stream.GZIP_STREAMS._value.get()  # type: ignore[attr-defined]


async def test_official_client_on_a_gzip_stream(make_settings, tmp_path: Path) -> None:
    require_node_client()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    s = make_settings(
        sync_rules=str(rules),
        gateway={"compression": "gzip", "max_ops_per_line": 100},
    )
    rows = {f"t{i:04d}": f"task {i} " + "lorem ipsum " * 5 for i in range(1500)}
    await feed(s, [todo(t, "u1", text) for t, text in rows.items()])

    def expected() -> list[dict]:
        return [
            {"id": t, "owner_id": "u1", "description": text, "completed": 0}
            for t, text in sorted(rows.items())
        ]

    before = gz_streams()
    async with (
        running_gateway(s) as url,
        PowerSyncNodeClient(url, SCHEMA, db_path=str(tmp_path / "c.sqlite")) as c,
    ):
        await c.connect(make_dev_token(s, sub="u1"))
        await c.wait_synced(timeout=60)
        await c.wait_for(SELECT, expected(), timeout=30)
        assert gz_streams() == before + 1
        for i in range(3):  # changes on the idle stream: stored blocks
            rows[f"t{i:04d}"] = f"edited {i}"
            await feed(s, [todo(f"t{i:04d}", "u1", f"edited {i}")])
            await c.wait_for(SELECT, expected(), timeout=30)
        del rows["t0100"]
        await feed(s, [delete_todo("t0100")])
        await c.wait_for(SELECT, expected(), timeout=30)
        assert c.checksum_mismatches == []
        await c.disconnect()
