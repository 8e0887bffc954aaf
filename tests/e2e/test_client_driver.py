"""Tests of the e2e test driver itself (tests/e2e/client/driver.mjs + powersync_client.py).

The official PowerSync Node client is pointed at a tiny in-test aiohttp mock of the sync
protocol (docs: sync-protocol §2-§5), NOT at the product. If these pass, failures in the
product e2e tests are about the product, not about the driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from .powersync_client import DriverError, PowerSyncNodeClient, require_node_client

pytestmark = pytest.mark.e2e

BUCKET = "global[]"
SCHEMA = {"todos": {"description": "text", "completed": "integer"}}
ROWS = [
    {"id": "t1", "description": "Buy milk", "completed": 0},
    {"id": "t2", "description": "Walk the dog", "completed": 1},
]


def op_checksum(s: str) -> int:
    """§5.1: first 4 bytes of sha256, unsigned little-endian."""
    return struct.unpack("<I", hashlib.sha256(s.encode("utf-8")).digest()[:4])[0]


def to_signed(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= (1 << 31) else x


def put_op(op_id: int, table: str, row: dict[str, Any]) -> dict[str, Any]:
    data = json.dumps(row, separators=(",", ":"))
    return {
        "op_id": str(op_id),
        "op": "PUT",
        "object_type": table,
        "object_id": row["id"],
        "checksum": op_checksum(f"put.{table}.{row['id']}.{data}"),
        "data": data,
    }


OPS = [put_op(i + 1, "todos", row) for i, row in enumerate(ROWS)]
LAST_OP = OPS[-1]["op_id"]
BUCKET_CHECKSUM = sum(op["checksum"] for op in OPS) & 0xFFFFFFFF


class MockSyncServer:
    """Minimal NDJSON sync server: one bucket, one checkpoint, write checkpoints, keepalives."""

    def __init__(self, *, checksum_delta: int = 0, keepalive_s: float = 1.0):
        self.checksum_delta = checksum_delta
        self.keepalive_s = keepalive_s
        self.requests: list[dict[str, Any]] = []
        self.write_checkpoint_requests: list[dict[str, Any]] = []
        self.write_checkpoint = 0
        self._queues: set[asyncio.Queue[list[dict[str, Any]] | None]] = set()
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/sync/stream", self.stream)
        app.router.add_get("/write-checkpoint2.json", self.write_checkpoint2)
        self._runner = web.AppRunner(app, shutdown_timeout=2.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        self._stopping.set()
        for q in list(self._queues):
            q.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()

    def checkpoint_line(self) -> dict[str, Any]:
        return {
            "checkpoint": {
                "last_op_id": LAST_OP,
                "write_checkpoint": str(self.write_checkpoint) if self.write_checkpoint else None,
                "buckets": [
                    {
                        "bucket": BUCKET,
                        "checksum": to_signed(BUCKET_CHECKSUM + self.checksum_delta),
                        "count": len(OPS),
                        "priority": 3,
                    }
                ],
            }
        }

    def expire_tokens(self) -> None:
        """Send token_expires_in 0 and end every open stream (the client refreshes its token)."""
        for q in list(self._queues):
            q.put_nowait([{"token_expires_in": 0}])
            q.put_nowait(None)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append({"headers": dict(request.headers), "body": body})
        after = {b["name"]: int(b["after"]) for b in body.get("buckets", [])}
        resp = web.StreamResponse(
            status=200, headers={"Content-Type": "application/x-ndjson", "X-Accel-Buffering": "no"}
        )
        await resp.prepare(request)

        async def send(line: dict[str, Any]) -> None:
            await resp.write((json.dumps(line) + "\n").encode())

        queue: asyncio.Queue[list[dict[str, Any]] | None] = asyncio.Queue()
        self._queues.add(queue)
        try:
            await send(self.checkpoint_line())
            ops = [op for op in OPS if int(op["op_id"]) > after.get(BUCKET, 0)]
            if ops:
                await send(
                    {
                        "data": {
                            "bucket": BUCKET,
                            "after": str(after.get(BUCKET, 0)),
                            "next_after": ops[-1]["op_id"],
                            "has_more": False,
                            "data": ops,
                        }
                    }
                )
            await send({"checkpoint_complete": {"last_op_id": LAST_OP}})
            while not self._stopping.is_set():
                try:
                    lines = await asyncio.wait_for(queue.get(), timeout=self.keepalive_s)
                except TimeoutError:
                    lines = [{"token_expires_in": 3600}]
                if lines is None:
                    break
                for line in lines:
                    await send(line)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._queues.discard(queue)
        with contextlib.suppress(Exception):
            await resp.write_eof()
        return resp

    async def write_checkpoint2(self, request: web.Request) -> web.Response:
        self.write_checkpoint += 1
        self.write_checkpoint_requests.append(
            {
                "client_id": request.query.get("client_id"),
                "auth": request.headers.get("Authorization"),
            }
        )
        diff = {
            "checkpoint_diff": {
                "last_op_id": LAST_OP,
                "write_checkpoint": str(self.write_checkpoint),
                "updated_buckets": [],
                "removed_buckets": [],
            }
        }
        for q in list(self._queues):
            q.put_nowait([diff, {"checkpoint_complete": {"last_op_id": LAST_OP}}])
        return web.json_response({"data": {"write_checkpoint": str(self.write_checkpoint)}})


@pytest.fixture(scope="module")
def node_client() -> None:
    require_node_client()


@pytest.fixture
async def server() -> AsyncIterator[MockSyncServer]:
    srv = MockSyncServer()
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def bad_server() -> AsyncIterator[MockSyncServer]:
    srv = MockSyncServer(checksum_delta=1)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def wait_until(pred, timeout: float = 15.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_checksum_helper_matches_worked_example() -> None:
    # sync-protocol §5.3
    assert (
        op_checksum('put.todos.t1.{"id":"t1","description":"Buy milk","completed":0}') == 903225261
    )
    assert op_checksum("delete.todos/t1") == 2191439428
    assert to_signed(903225261 + 3323683603) == -68058432


async def test_syncs_rows_and_write_checkpoint(node_client: None, server: MockSyncServer) -> None:
    sql = "SELECT id, description, completed FROM todos ORDER BY id"
    async with PowerSyncNodeClient(server.url, SCHEMA) as client:
        assert client.ready_info["sdk"]["@powersync/node"] == "1.1.0"
        assert (await client.status())["has_synced"] is False

        await client.connect("tok-1", retry_delay_ms=500)
        status = await client.wait_synced(timeout=20)
        assert status["has_synced"] is True
        assert status["last_synced_at"]
        assert await client.query(sql) == ROWS
        assert await client.wait_for(sql, ROWS, timeout=5) == ROWS
        assert await client.query("SELECT count(*) AS n FROM todos WHERE completed = ?", [1]) == [
            {"n": 1}
        ]

        # What the client sent (sanity of the driver's connect options).
        req = server.requests[0]
        assert req["headers"]["Authorization"] == "Token tok-1"
        assert req["body"]["raw_data"] is True
        assert req["body"]["buckets"] == []

        # Events: status with hasSynced, a checkpoint applied, SDK log lines, no mismatch.
        assert any(s.get("has_synced") for s in client.statuses)
        assert client.checkpoints_applied >= 1
        assert client.logs, "expected SDK log events at debug level"
        assert client.checksum_mismatches == []
        assert (await client.driver_logs())[-1]["seq"] >= 1

        # Errors come back as DriverError, the driver keeps running.
        with pytest.raises(DriverError, match="no such table"):
            await client.query("SELECT * FROM nope")

        # Local write -> uploadData acknowledges -> GET /write-checkpoint2.json -> the mock echoes
        # it in a checkpoint_diff; server state wins, so the local row disappears again.
        before = client.checkpoints_applied
        await client.write(
            "INSERT INTO todos (id, description, completed) VALUES (uuid(), ?, ?)", ["local", 0]
        )
        upload = await client.wait_event("upload", timeout=10)
        assert upload["crud"][0]["op"] == "PUT"
        assert upload["crud"][0]["type"] == "todos"
        await wait_until(lambda: server.write_checkpoint_requests, what="write checkpoint request")
        client_id = await client.client_id()
        assert server.write_checkpoint_requests[0]["client_id"] == client_id
        await client.wait_for(sql, ROWS, timeout=10)
        await client.wait_synced(timeout=10, min_checkpoints=before + 1)

        # Token refresh: the next fetchCredentials returns the new token.
        await client.set_token("tok-2")
        n_requests = len(server.requests)
        server.expire_tokens()
        await wait_until(lambda: len(server.requests) > n_requests, what="reconnect")
        assert server.requests[-1]["headers"]["Authorization"] == "Token tok-2"
        # Resumption on the same connection: the client now asks for ops after the checkpoint.
        assert server.requests[-1]["body"]["buckets"] == [{"name": BUCKET, "after": LAST_OP}]
        await client.wait_for(sql, ROWS, timeout=10)

        await client.disconnect()
        status = await client.status()
        assert status["connected"] is False
    assert not client.running


async def test_reports_checksum_mismatch(node_client: None, bad_server: MockSyncServer) -> None:
    async with PowerSyncNodeClient(bad_server.url, SCHEMA) as client:
        await client.connect("tok", retry_delay_ms=500)
        first = await client.wait_checksum_mismatch(timeout=20)
        assert first["message"].startswith("Could not apply checkpoint, Checksums didn't match")
        assert first["partial"] is False
        assert first["buckets"] == [
            {
                "bucket": BUCKET,
                "expected": (BUCKET_CHECKSUM + 1) & 0xFFFFFFFF,
                "actual": BUCKET_CHECKSUM,
                "op_checksum": BUCKET_CHECKSUM,
                "add_checksum": 0,
            }
        ]
        assert client.checksum_mismatches and client.checksum_mismatches[0] is first
        # Nothing was applied; the client keeps retrying (and keeps failing).
        assert await client.query("SELECT * FROM todos") == []
        second = await client.wait_checksum_mismatch(timeout=20, start=1)
        assert second["index"] == 1
        status = await client.status()
        assert status["has_synced"] is False
        assert status["checksum_mismatches"] >= 2
        assert client.checkpoints_applied == 0
        with pytest.raises(TimeoutError):
            await client.wait_synced(timeout=1)
        # The dropped bucket is not in the next request (sync-protocol §9.2 item 20).
        assert len(bad_server.requests) >= 2
        assert bad_server.requests[1]["body"]["buckets"] == []
