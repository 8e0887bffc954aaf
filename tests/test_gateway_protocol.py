"""The sync stream against the real Redis, read by the protocol simulator (sync-protocol.md)."""

from __future__ import annotations

import asyncio
import itertools

import aiohttp
import orjson
import pytest

from bucketsync.simclient import ClientState, stream_once
from bucketsync.tokens import make_dev_token
from pipeline.store import PlannedBatch, Store
from tests.gateway_helpers import Client, delete_todo, feed, running_gateway, todo

pytestmark = pytest.mark.stack

RULES = """
bucket_definitions:
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT * FROM todos WHERE owner_id = bucket.user_id
"""


def rows_of(client: Client) -> dict[str, dict]:
    return client.state.tables().get("todos", {})


async def test_initial_sync_only_own_rows_and_line_order(gw_settings) -> None:
    s = gw_settings()
    await feed(s, [todo("t1", "u1", "a"), todo("t2", "u2", "b"), todo("t3", "u1", "c")])
    async with running_gateway(s) as url, Client(url, s, "u1") as c:
        assert await c.sync_until() == 200
        assert c.kinds[0] == "checkpoint"
        assert c.kinds[-1] == "checkpoint_complete"
        assert set(c.kinds[1:-1]) == {"data"}
        assert set(rows_of(c)) == {"t1", "t3"}
        assert c.state.mismatches == [] and c.state.protocol_errors == []
        assert list(c.state.buckets) == ['by_user["u1"]']


async def test_live_update_delete_and_ownership_move(gw_settings) -> None:
    s = gw_settings()
    await feed(s, [todo("t1", "u1", "a"), todo("t2", "u1", "b")])
    async with running_gateway(s) as url, Client(url, s, "u1") as c:
        assert c.session is not None

        async def changes() -> None:
            await asyncio.sleep(0.3)
            await feed(s, [todo("t1", "u1", "a2")])
            await asyncio.sleep(0.3)
            await feed(s, [delete_todo("t2"), todo("t3", "u1", "new")])
            await asyncio.sleep(0.3)
            await feed(s, [todo("t3", "u2", "moved away")])

        task = asyncio.create_task(changes())
        await c.sync_until(stop_after_completes=4, timeout_s=15)
        await task
        assert rows_of(c) == {
            "t1": {"id": "t1", "owner_id": "u1", "description": "a2", "completed": 0}
        }
        assert c.kinds.count("checkpoint") == 1 and c.kinds.count("checkpoint_diff") == 3
        assert c.state.mismatches == [] and c.state.protocol_errors == []


async def test_resume_sends_only_new_ops(gw_settings) -> None:
    s = gw_settings()
    await feed(s, [todo(f"t{i}", "u1", "x" * 100) for i in range(20)])
    async with running_gateway(s) as url, Client(url, s, "u1") as c:
        await c.sync_until()
        first_ops, first_bytes = c.state.ops, c.state.bytes_received
        assert first_ops == 20
        await feed(s, [todo("t0", "u1", "changed")])
        body = c.state.request_body()
        assert body["buckets"] == [{"name": 'by_user["u1"]', "after": str(c.state.applied_op)}]
        await c.sync_until()
        assert c.state.ops - first_ops == 1  # only the new op travelled
        assert c.state.bytes_received - first_bytes < first_bytes / 5
        assert rows_of(c)["t0"]["description"] == "changed"
        assert c.state.mismatches == []


async def test_foreign_bucket_names_are_ignored(gw_settings) -> None:
    s = gw_settings()
    await feed(s, [todo("t1", "u1"), todo("t2", "u2", "secret")])
    async with running_gateway(s) as url, aiohttp.ClientSession() as session:
        token = make_dev_token(s, sub="u1")
        body = {"buckets": [{"name": 'by_user["u2"]', "after": "0"}], "raw_data": True}
        lines = []
        async with session.post(
            url + "/sync/stream", json=body, headers={"Authorization": f"Bearer {token}"}
        ) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("application/x-ndjson")
            async for raw in r.content:
                lines.append(orjson.loads(raw))
                if "checkpoint_complete" in lines[-1]:
                    break
        buckets = [b["bucket"] for b in lines[0]["checkpoint"]["buckets"]]
        assert buckets == ['by_user["u1"]']
        assert all(line.get("data", {}).get("bucket") != 'by_user["u2"]' for line in lines)
        assert b"secret" not in orjson.dumps(lines)


async def test_data_lines_respect_op_bound(gw_settings) -> None:
    s = gw_settings(max_ops_per_line=3)
    await feed(s, [todo(f"t{i:02}", "u1") for i in range(10)])
    async with running_gateway(s) as url, aiohttp.ClientSession() as session:
        token = make_dev_token(s, sub="u1")
        datas = []
        async with session.post(
            url + "/sync/stream", json={}, headers={"Authorization": f"Token {token}"}
        ) as r:
            async for raw in r.content:
                line = orjson.loads(raw)
                if "data" in line:
                    datas.append(line["data"])
                if "checkpoint_complete" in line:
                    break
        assert [len(d["data"]) for d in datas] == [3, 3, 3, 1]
        assert [d["has_more"] for d in datas] == [True, True, True, False]
        assert datas[0]["after"] == "0"
        for prev, nxt in itertools.pairwise(datas):
            assert nxt["after"] == prev["next_after"]
        for d in datas:
            assert d["next_after"] == d["data"][-1]["op_id"]
            assert all(
                isinstance(op["op_id"], str) and isinstance(op["data"], str) for op in d["data"]
            )


async def test_keepalive_and_expiry_end_the_stream(gw_settings) -> None:
    s = gw_settings(keepalive_s=0.3)
    await feed(s, [todo("t1", "u1")])
    async with running_gateway(s) as url, aiohttp.ClientSession() as session:
        state = ClientState()
        token = make_dev_token(s, sub="u1", ttl_s=2)
        kinds: list[int] = []

        def hook(kind: str, st: ClientState) -> bool:
            if kind == "token_expires_in":
                kinds.append(st.token_expires_in or 0)
            return False

        status = await stream_once(session, url, token, state, on_line=hook, timeout_s=10)
        assert status == 200
        assert len(kinds) >= 3 and kinds[-1] == 0  # keepalives, then 0 at expiry, then the end
        assert all(k <= 2 for k in kinds)


async def test_invalidated_checkpoint_is_not_completed(gw_settings, monkeypatch) -> None:
    """A MOVE whose target lies past the served checkpoint forces a newer checkpoint (§4.5)."""
    s = gw_settings()
    await feed(s, [todo("t1", "u1", "v1"), todo("t2", "u1", "b")])
    original = Store.read_checkpoint
    fired = {"n": 0}

    async def racing_read(self, buckets):
        result = await original(self, buckets)
        if fired["n"] == 0:
            fired["n"] = 1
            await feed(s, [todo("t1", "u1", "v2")])  # turns op 1 into MOVE(target 3)
        return result

    monkeypatch.setattr(Store, "read_checkpoint", racing_read)
    original_starts = Store.read_stream_starts

    async def racing_starts(self, starts):  # streams starting together read this way
        result = await original_starts(self, starts)
        if fired["n"] == 0:
            fired["n"] = 1
            await feed(s, [todo("t1", "u1", "v2")])
        return result

    monkeypatch.setattr(Store, "read_stream_starts", racing_starts)
    async with running_gateway(s) as url, Client(url, s, "u1") as c:
        await c.sync_until()
        # checkpoint 2 was never completed: a diff to 3 came first, then the complete
        assert c.kinds[0] == "checkpoint" and "checkpoint_diff" in c.kinds
        assert c.kinds.index("checkpoint_diff") < c.kinds.index("checkpoint_complete")
        assert c.state.applied_op == 3
        assert rows_of(c)["t1"]["description"] == "v2"
        assert c.state.mismatches == []


async def test_write_checkpoint_alone_sends_diff_and_complete(gw_settings) -> None:
    s = gw_settings()
    await feed(s, [todo("t1", "u1")])
    async with running_gateway(s) as url, Client(url, s, "u1") as c:
        assert c.session is not None
        token = c.token

        async def ask() -> None:
            await asyncio.sleep(0.3)
            for expected in ("1", "2"):
                async with c.session.get(
                    url + "/write-checkpoint2.json?client_id=sim",
                    headers={"Authorization": f"Token {token}"},
                ) as r:
                    assert r.status == 200
                    assert (await r.json()) == {"data": {"write_checkpoint": expected}}

        task = asyncio.create_task(ask())
        await c.sync_until(stop_after_completes=2, timeout_s=10)
        await task
        assert (
            c.state.applied_write_checkpoint is not None and c.state.applied_write_checkpoint >= 1
        )
        assert "checkpoint_diff" in c.kinds


async def test_bad_body_and_auth_errors(gw_settings) -> None:
    s = gw_settings()
    async with running_gateway(s) as url, aiohttp.ClientSession() as session:
        token = make_dev_token(s, sub="u1")
        async with session.post(
            url + "/sync/stream",
            data=b'{"buckets": 3}',
            headers={"Authorization": f"Token {token}"},
        ) as r:
            assert r.status == 400
            assert (await r.json())["error"]["code"] == "PSYNC_S2001"
        async with session.post(url + "/sync/stream", json={}) as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "PSYNC_S2106"
        async with session.post(
            url + "/sync/stream", json={}, headers={"Authorization": "Token x.y.z"}
        ) as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "PSYNC_S2101"
        async with session.get(url + "/nope") as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "PSYNC_S2002"
        async with session.get(url + "/probes/readiness") as r:
            assert r.status == 200
        async with session.get(url + "/metrics") as r:
            assert "bucketsync_gateway_open_streams" in await r.text()


async def test_compaction_mid_download_and_resume_inside_folded_range(gw_settings) -> None:
    from pipeline.compaction import compact

    s = gw_settings()
    await feed(s, [todo("t1", "u1", "a"), todo("t2", "u1", "b")])
    async with running_gateway(s) as url, Client(url, s, "u1") as old, Client(url, s, "u1") as new:
        await old.sync_until()
        await feed(s, [todo("t1", "u1", "a2")])
        await feed(s, [delete_todo("t1")])
        await feed(s, [todo("t2", "u1", "b2")])
        store = Store.from_settings(s)
        try:
            st = await compact(store, chunk=2)
            assert st.ops_removed > 0
        finally:
            await store.close()
        await old.sync_until()  # resumes from an op id inside the folded range
        await new.sync_until()
        for c in (old, new):
            assert rows_of(c) == {
                "t2": {"id": "t2", "owner_id": "u1", "description": "b2", "completed": 0}
            }
            assert c.state.mismatches == []
        assert new.state.ops < 5
    assert isinstance(PlannedBatch(), PlannedBatch)


async def test_scheduled_reappend_existing_client_gets_only_the_moved_row(gw_settings) -> None:
    """A row that never changes heads the bucket and blocks the fold of another row's eight
    superseded versions: the scheduled re-append moves it, an existing client downloads it
    (and nothing else) again, a new client downloads CLEAR + the two live rows."""
    from pipeline.compaction import compact

    s = gw_settings()
    await feed(s, [todo("t0", "u1", "never changes")])
    for i in range(9):
        await feed(s, [todo("t1", "u1", f"v{i}")])
    want = {
        "t0": {"id": "t0", "owner_id": "u1", "description": "never changes", "completed": 0},
        "t1": {"id": "t1", "owner_id": "u1", "description": "v8", "completed": 0},
    }
    async with running_gateway(s) as url, Client(url, s, "u1") as old, Client(url, s, "u1") as new:
        await old.sync_until()
        held = old.state.ops
        store = Store.from_url(s.redis.url, s.redis.prefix)
        try:
            st = await compact(store, chunk=200, reappend_budget=4.0, reappend_target=1.15)
            assert st.rows_reappended == 1
        finally:
            await store.close()
        await old.sync_until()
        await new.sync_until()
        assert old.state.ops - held == 1
        assert new.state.ops == 3
        for c in (old, new):
            assert rows_of(c) == want
            assert c.state.mismatches == []


async def test_client_that_stops_reading_is_dropped(gw_settings, caplog) -> None:
    import logging
    import socket

    s = gw_settings(max_buffered_bytes=65536, slow_client_timeout_s=1.0)
    big = "x" * 20_000
    for start in range(0, 1500, 250):
        await feed(s, [todo(f"t{i}", "u1", big) for i in range(start, start + 250)])
    caplog.set_level(logging.WARNING, logger="bucketsync.gateway")
    async with running_gateway(s) as url:
        port = int(url.rsplit(":", 1)[1])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        token = make_dev_token(s, sub="u1")
        body = b"{}"
        req = (
            f"POST /sync/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Token {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        await asyncio.get_running_loop().sock_sendall(sock, req)
        # never read: the gateway must give up on us, say so, and free the connection
        for _ in range(100):
            if any("did not read" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.1)
        sock.close()
    assert any("did not read" in r.getMessage() for r in caplog.records)


async def test_write_checkpoint_waits_for_the_pipeline_position(
    gw_settings, create_topic, ns, tmp_path
) -> None:
    """The id is bound to the CDC topics' end offsets; it shows only once they are applied."""
    from tests.pipeline_helpers import debezium_json, produce, run_processor

    topic = create_topic(ns.topic("app.public.todos"))
    base = gw_settings()
    s = base.model_copy(update={"kafka": base.kafka.model_copy(update={"topics": [topic]})})
    await feed(s, [todo("t0", "u1")])
    produce(
        s.kafka.bootstrap_servers,
        topic,
        [
            debezium_json(
                "todos",
                "c",
                {"id": "t1"},
                {"id": "t1", "owner_id": "u1", "description": "w", "completed": 0},
            )
        ],
    )
    async with running_gateway(s, with_position=True) as url, Client(url, s, "u1") as c:
        assert c.session is not None
        await c.sync_until()
        async with c.session.get(
            url + "/write-checkpoint2.json?client_id=sim",
            headers={"Authorization": f"Token {c.token}"},
        ) as r:
            wid = int((await r.json())["data"]["write_checkpoint"])
        # not applied yet: no checkpoint may carry the id
        await c.sync_until(timeout_s=1.5)
        assert c.state.write_checkpoint is None or c.state.write_checkpoint < wid
        await run_processor(s, 1)
        await c.sync_until(timeout_s=10)
        assert c.state.applied_write_checkpoint == wid
        assert "t1" in rows_of(c)
