"""Hostile clients against a real gateway on the real Redis (issue 13, part 1).

Each test here failed before the fix it covers: stalled streams under the buffer limit,
no per-user cap, hour-long idle / partial-request sockets, 2^64 op ids, colliding
write-checkpoint keys, body-before-auth, unbounded log fields, Kafka log floods.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bucketsync.tokens import make_dev_token
from pipeline.store import Store, write_checkpoint_key
from tests.gateway_helpers import Client, feed, running_gateway, todo
from tests.test_gateway_protocol import RULES

pytestmark = pytest.mark.stack


@pytest.fixture
def gw_settings(make_settings, tmp_path: Path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)

    def make(kafka: dict[str, Any] | None = None, **gateway: Any):
        extra = {"kafka": kafka} if kafka else {}
        return make_settings(sync_rules=str(rules), gateway={"keepalive_s": 20, **gateway}, **extra)

    return make


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def _raw_connect(url: str, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", _port(url)))
    return sock


async def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Read until the server closes (True) or ``seconds`` pass (False); returns what came."""
    loop = asyncio.get_running_loop()
    got = b""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False, got
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), left)
        except TimeoutError:
            return False, got
        except ConnectionError:
            return True, got
        if not chunk:
            return True, got
        got += chunk


def _stream_request(token: str | None, body: bytes, extra: str = "") -> bytes:
    auth = f"Authorization: Token {token}\r\n" if token else ""
    return (
        f"POST /sync/stream HTTP/1.1\r\nHost: x\r\n{auth}{extra}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _open_streams(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url + "/probes/readiness") as r:
        return int((await r.json())["streams"])


@asynccontextmanager
async def _held_stream(
    session: aiohttp.ClientSession, url: str, token: str
) -> AsyncIterator[aiohttp.ClientResponse]:
    """A stream that has answered (status read; the first line too when 200), kept open."""
    async with session.post(
        url + "/sync/stream", json={}, headers={"Authorization": f"Token {token}"}
    ) as r:
        if r.status == 200:
            await asyncio.wait_for(r.content.readline(), 5)
        yield r


# ---- 1. stalled streams -----------------------------------------------------------


async def test_stalled_stream_is_dropped_whatever_its_buffer_holds(gw_settings, caplog) -> None:
    """A client that stops reading with far less than max_buffered_bytes unsent is dropped
    after stall_timeout_s, and its connection and stream slot are released."""
    s = gw_settings(
        max_buffered_bytes=4 * 1_048_576,
        slow_client_timeout_s=30,
        stall_timeout_s=1.0,
        max_connections_per_user=1,
    )
    big = "x" * 20_000
    await feed(s, [todo(f"t{i}", "u1", big) for i in range(40)])  # ~800 KB, under 4 MiB
    caplog.set_level(logging.INFO, logger="bucketsync.gateway")
    async with running_gateway(s) as url:
        token = make_dev_token(s, sub="u1")
        sock = await _raw_connect(url, rcvbuf=4096)
        start = time.monotonic()
        await asyncio.get_running_loop().sock_sendall(sock, _stream_request(token, b"{}"))
        # never read: the gateway must give up on us within the stall timeout
        dropped_after = None
        while time.monotonic() - start < 8:
            if any("gateway.stall_timeout_s" in r.getMessage() for r in caplog.records):
                dropped_after = time.monotonic() - start
                break
            await asyncio.sleep(0.05)
        try:
            assert dropped_after is not None, "a stalled stream under the buffer limit was kept"
            assert dropped_after < 4
            # the connection, the hub subscription and the user's stream slot are released
            for _ in range(50):
                if await _open_streams(url) == 0:
                    break
                await asyncio.sleep(0.05)
            assert await _open_streams(url) == 0
            async with Client(url, s, "u1") as c:  # cap 1: only possible if the slot was freed
                assert await c.sync_until(timeout_s=10) == 200
        finally:
            sock.close()


async def test_reading_client_is_not_dropped_by_the_stall_timeout(gw_settings) -> None:
    s = gw_settings(stall_timeout_s=0.5, keepalive_s=0.2)
    await feed(s, [todo(f"t{i}", "u1", "y" * 5000) for i in range(50)])
    async with running_gateway(s) as url, Client(url, s, "u1") as c:
        seen: list[str] = []

        def hook(kind: str, _state: Any) -> bool:
            seen.append(kind)
            return False

        assert c.session is not None
        from bucketsync.simclient import stream_once

        # a client that keeps reading stays connected well past the stall timeout
        await stream_once(c.session, url, c.token, c.state, on_line=hook, timeout_s=2.0)
        assert seen.count("token_expires_in") >= 5
        assert c.state.mismatches == []


# ---- 2. per-user connection cap ---------------------------------------------------


async def test_per_user_connection_cap_answers_429_psync_s2304(gw_settings) -> None:
    s = gw_settings(max_connections_per_user=2)
    await feed(s, [todo("t1", "u1"), todo("t2", "u2")])
    t1 = make_dev_token(s, sub="u1")
    t2 = make_dev_token(s, sub="u2")
    async with running_gateway(s) as url, aiohttp.ClientSession() as session:
        async with _held_stream(session, url, t1) as a, _held_stream(session, url, t1) as b:
            assert (a.status, b.status) == (200, 200)
            async with _held_stream(session, url, t1) as third:
                assert third.status == 429
                assert third.headers["Content-Type"].startswith("application/json")
                err = (await third.json())["error"]
                assert err["code"] == "PSYNC_S2304" and err["status"] == 429
            async with _held_stream(session, url, t2) as other:  # another user is not affected
                assert other.status == 200
        # both closed: the slots come back
        for _ in range(50):
            if await _open_streams(url) == 0:
                break
            await asyncio.sleep(0.05)
        async with _held_stream(session, url, t1) as again:
            assert again.status == 200


# ---- 3. header / body / idle timeouts ----------------------------------------------


async def test_sockets_that_never_finish_a_request_are_closed(gw_settings) -> None:
    s = gw_settings(header_timeout_s=0.5, body_timeout_s=0.5, idle_timeout_s=2.0)
    token = make_dev_token(s, sub="u1")
    loop = asyncio.get_running_loop()
    async with running_gateway(s) as url:

        async def idle() -> float:
            sock = await _raw_connect(url)
            t0 = time.monotonic()
            try:
                closed, _ = await _closed_within(sock, 6)
                assert closed, "an idle connection was kept"
                return time.monotonic() - t0
            finally:
                sock.close()

        async def dribbled_headers() -> float:
            sock = await _raw_connect(url)
            t0 = time.monotonic()
            try:
                for byte in _stream_request(token, b"{}"):
                    try:
                        await loop.sock_sendall(sock, bytes([byte]))
                    except ConnectionError:
                        break
                    await asyncio.sleep(0.05)
                    if time.monotonic() - t0 > 6:
                        break
                closed, got = await _closed_within(sock, 1)
                assert closed and b"200 OK" not in got, "headers sent a byte at a time were kept"
                return time.monotonic() - t0
            finally:
                sock.close()

        async def partial_body() -> tuple[float, bytes]:
            sock = await _raw_connect(url)
            try:
                req = _stream_request(token, b"{" + b" " * 99)
                await loop.sock_sendall(sock, req[: len(req) - 90])  # headers + 10 body bytes
                t0 = time.monotonic()
                closed, got = await _closed_within(sock, 6)
                assert closed, "a partial body was kept"
                return time.monotonic() - t0, got
            finally:
                sock.close()

        idle_s, dribble_s, (body_s, body_reply) = await asyncio.gather(
            idle(), dribbled_headers(), partial_body()
        )
    assert 1.5 < idle_s < 4, idle_s  # gateway.idle_timeout_s
    assert dribble_s < 1.8, dribble_s  # gateway.header_timeout_s, long before the idle timeout
    assert body_s < 1.8, body_s  # gateway.body_timeout_s
    head, _, payload = body_reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert orjson.loads(payload)["error"]["code"] == "PSYNC_S2001"


async def test_keep_alive_connection_serves_requests_then_closes_when_idle(gw_settings) -> None:
    s = gw_settings(header_timeout_s=0.5, idle_timeout_s=1.0)
    token = make_dev_token(s, sub="u1")
    async with running_gateway(s) as url:
        sock = await _raw_connect(url)
        loop = asyncio.get_running_loop()
        try:
            req = (
                f"GET /write-checkpoint2.json?client_id=k HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Token {token}\r\n\r\n"
            ).encode()
            for _ in range(2):  # two requests on one connection, slower than header_timeout_s
                await loop.sock_sendall(sock, req)
                reply = await asyncio.wait_for(loop.sock_recv(sock, 65536), 3)
                assert reply.startswith(b"HTTP/1.1 200")
                await asyncio.sleep(0.7)
            closed, _ = await _closed_within(sock, 3)
            assert closed
        finally:
            sock.close()


# ---- 4. op id validation -------------------------------------------------------------


@pytest.mark.parametrize(
    "after",
    [
        str(2**64),
        str(2**63),
        "99999999999999999999999",
        "-1",
        "1e3",
        " 5",
        "1_000",
        "\u0661\u0662",  # Arabic-Indic digits: int() would take them
        "",
        5,
        None,
        True,
    ],
)
async def test_bad_after_is_rejected_with_400_before_the_stream(gw_settings, after) -> None:
    s = gw_settings()
    await feed(s, [todo("t1", "u1")])
    token = make_dev_token(s, sub="u1")
    body = {"buckets": [{"name": 'by_user["u1"]', "after": after}]}
    async with (
        running_gateway(s) as url,
        aiohttp.ClientSession() as session,
        session.post(
            url + "/sync/stream", json=body, headers={"Authorization": f"Token {token}"}
        ) as r,
    ):
        assert r.status == 400
        assert r.headers["Content-Type"].startswith("application/json")
        assert (await r.json())["error"]["code"] == "PSYNC_S2001"


async def test_largest_op_id_is_accepted(gw_settings) -> None:
    s = gw_settings()
    await feed(s, [todo("t1", "u1")])
    token = make_dev_token(s, sub="u1")
    body = {"buckets": [{"name": 'by_user["u1"]', "after": str(2**63 - 1)}]}
    async with running_gateway(s) as url, aiohttp.ClientSession() as session:
        async with session.post(
            url + "/sync/stream", json=body, headers={"Authorization": f"Token {token}"}
        ) as r:
            assert r.status == 200
            lines = []
            async for raw in r.content:
                lines.append(orjson.loads(raw))
                if "checkpoint_complete" in lines[-1]:
                    break
        assert "checkpoint" in lines[0]


# ---- 5. write-checkpoint keys ----------------------------------------------------------


async def test_write_checkpoint_keys_do_not_collide(gw_settings) -> None:
    s = gw_settings()
    await feed(s, [todo("t1", "p"), todo("t2", "p/q")])
    assert write_checkpoint_key("p", "q/r") != write_checkpoint_key("p/q", "r")
    async with (
        running_gateway(s) as url,
        Client(url, s, "p") as a,
        Client(url, s, "p/q") as b,
    ):
        assert a.session is not None and b.session is not None

        async def wcp(c: Client, client_id: str) -> str:
            assert c.session is not None
            async with c.session.get(
                url + "/write-checkpoint2.json",
                params={"client_id": client_id},
                headers={"Authorization": f"Token {c.token}"},
            ) as r:
                assert r.status == 200
                return str((await r.json())["data"]["write_checkpoint"])

        # user p/q (client r) is connected while user p (client q/r) gets write checkpoints
        reader = asyncio.create_task(
            b.sync_until(stop_after_completes=3, timeout_s=2.5, client_id="r")
        )
        await asyncio.sleep(0.3)
        assert [await wcp(a, "q/r") for _ in range(3)] == ["1", "2", "3"]
        await reader
        assert b.state.write_checkpoint is None, "p/q's stream echoed p's write checkpoint"
        assert await wcp(b, "r") == "1"  # its own counter
        await a.sync_until(timeout_s=5, client_id="q/r")
        assert a.state.write_checkpoint == 3


async def test_write_checkpoint_ids_keep_increasing_across_the_key_change(
    gw_settings, redis_client
) -> None:
    """A client with ids under the old ``sub/client_id`` key continues above them."""
    s = gw_settings()
    redis_client.hset(f"{s.redis.prefix}:wcp:u9/c1", "id", 41)
    store = Store.from_settings(s)
    try:
        assert await store.issue_write_checkpoint(write_checkpoint_key("u9", "c1"), {}) == 42
        assert await store.issue_write_checkpoint(write_checkpoint_key("u9", "c1"), {}) == 43
    finally:
        await store.close()


# ---- 6. auth before the body ----------------------------------------------------------


async def test_anonymous_bad_body_gets_401_not_400(gw_settings) -> None:
    s = gw_settings()
    async with running_gateway(s) as url, aiohttp.ClientSession() as session:
        for headers, code in (
            ({}, "PSYNC_S2106"),
            ({"Authorization": "Token x.y.z"}, "PSYNC_S2101"),
        ):
            for body in (
                b'{"buckets": 3}',
                b"not json",
                b'{"buckets":[{"name":"a","after":"-1"}]}',
            ):
                async with session.post(url + "/sync/stream", data=body, headers=headers) as r:
                    assert r.status == 401, (headers, body)
                    assert (await r.json())["error"]["code"] == code


# ---- 7. client-controlled log fields ----------------------------------------------------


async def test_client_controlled_log_fields_are_truncated(gw_settings, caplog) -> None:
    s = gw_settings(log_field_max_chars=100)
    await feed(s, [todo("t1", "u1")])
    token = make_dev_token(s, sub="u1")
    body = {
        "client_id": "X\nforged log line" + "C" * 20_000,
        "buckets": [{"name": f"b{i}" + "N" * 200, "after": str(i)} for i in range(500)],
    }
    caplog.set_level(logging.DEBUG, logger="bucketsync")
    async with running_gateway(s) as url, aiohttp.ClientSession() as session:
        async with session.post(
            url + "/sync/stream",
            json=body,
            headers={"Authorization": f"Token {token}", "x-user-agent": "A" * 7000},
        ) as r:
            assert r.status == 200
            async for raw in r.content:
                if b"checkpoint_complete" in raw:
                    break
        async with session.post(
            url + "/sync/stream", json={}, headers={"Authorization": "Token " + "e" * 6000}
        ) as r:
            assert r.status == 401
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("bucketsync")]
    opened = [m for m in messages if m.startswith("stream opened")]
    assert opened
    assert max(len(m) for m in messages) < 1000, max(messages, key=len)[:300]
    assert "CCCC" in opened[0] and "chars)" in opened[0]
    assert not any("\nforged" in m for m in messages)
    assert "AAAA" in opened[0] and "\\nforged" in opened[0]  # escaped, not a new line


# ---- 8. Kafka unreachable ---------------------------------------------------------------


async def test_unreachable_kafka_is_not_a_log_flood(gw_settings, capfd, caplog) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]  # nothing listens here once the socket is closed
    s = gw_settings(
        kafka={"bootstrap_servers": f"127.0.0.1:{closed_port}", "topics": ["nowhere"]},
        kafka_backoff_initial_s=1.0,
        kafka_backoff_max_s=5.0,
    )
    await feed(s, [todo("t1", "u1")])
    caplog.set_level(logging.INFO, logger="bucketsync")
    async with running_gateway(s, with_position=True) as url, Client(url, s, "u1") as c:
        assert c.session is not None
        t0 = time.monotonic()
        assert await c.sync_until(timeout_s=5) == 200  # streams do not need Kafka
        statuses = []
        while time.monotonic() - t0 < 4:
            async with c.session.get(
                url + "/write-checkpoint2.json?client_id=k",
                headers={"Authorization": f"Token {c.token}"},
            ) as r:
                statuses.append(r.status)
                assert (await r.json())["error"]["code"] == "PSYNC_S2003"
            await asyncio.sleep(0.2)
        elapsed = time.monotonic() - t0
    assert set(statuses) == {503}
    err = capfd.readouterr().err
    noisy = [line for line in err.splitlines() if "Connection refused" in line or "FAIL" in line]
    logged = [
        r.getMessage()
        for r in caplog.records
        if "Kafka" in r.getMessage() or "librdkafka" in r.getMessage()
    ]
    # at most a line or two per backoff window, not 20 a second
    assert len(noisy) + len(logged) <= 2 + 2 * elapsed, (noisy[:5], logged[:5])
