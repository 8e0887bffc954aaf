"""Detached streams (issue 12): once a stream is idle, the connection leaves aiohttp's
request handling (no request object, handler or task while idle) and the stream serves
itself from a wake or its timer. Checked on a real gateway on the real Redis with raw
sockets: what the client receives afterwards (changes, keepalives, token expiry, the
end of the response at shutdown) and what the gateway holds (no handler task, no aiohttp
connection, the per-user slot released when the client leaves).

Before the change, every idle stream kept its aiohttp handler task: the first test fails
there (``gw.streams`` and the server's connections held the stream)."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import orjson
import pytest

from bucketsync.tokens import make_dev_token
from tests.gateway_helpers import feed, running_app, todo

pytestmark = pytest.mark.stack


class Raw:
    """A sync stream on a raw socket: the response's bytes, split into its JSON lines."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.raw = b""
        self.closed = False

    @classmethod
    async def open(cls, port: int, token: str) -> Raw:
        sock = socket.socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        body = orjson.dumps({"raw_data": True, "client_id": "c1"})
        await asyncio.get_running_loop().sock_sendall(
            sock,
            b"POST /sync/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Token {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body,
        )
        return cls(sock)

    def lines(self) -> list[dict[str, Any]]:
        """The JSON lines received so far (chunk framing removed)."""
        _head, _, body = self.raw.partition(b"\r\n\r\n")
        data = b""
        while body:
            size_s, sep, rest = body.partition(b"\r\n")
            if not sep:
                break
            size = int(size_s, 16)
            if size == 0 or len(rest) < size + 2:
                break
            data += rest[:size]
            body = rest[size + 2 :]
        return [orjson.loads(x) for x in data.split(b"\n") if x.strip()]

    async def until(self, pred: Any, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while not pred(self):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; received {self.raw[-400:]!r}"
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), left)
            except ConnectionError:
                chunk = b""
            if not chunk:
                self.closed = True
                assert pred(self), f"closed; received {self.raw[-400:]!r}"
                return
            self.raw += chunk

    def count(self, kind: str) -> int:
        return sum(1 for line in self.lines() if kind in line)

    def close(self) -> None:
        self.sock.close()


async def _eventually(pred: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def test_idle_stream_is_detached_and_serves_changes(gw_settings) -> None:
    s = gw_settings(max_connections_per_user=1)
    await feed(s, [todo("t1", "u1")])
    async with running_app(s) as (port, gw, runner):
        c = await Raw.open(port, make_dev_token(s, sub="u1"))
        await c.until(lambda r: r.count("checkpoint_complete") >= 1)
        # idle: no handler task and no aiohttp connection hold it; the hub still does
        await _eventually(lambda: not gw.streams and gw.hub.connections == 1)
        assert runner.server is not None and not runner.server.connections
        assert gw.user_streams == {"u1": 1}
        # a change reaches the detached stream: diff, the new op, completion
        await feed(s, [todo("t2", "u1", "second")])
        await c.until(lambda r: r.count("checkpoint_complete") >= 2)
        lines = c.lines()
        diff = next(x["checkpoint_diff"] for x in lines if "checkpoint_diff" in x)
        (bucket,) = diff["updated_buckets"]
        assert bucket["count"] == 2
        data = [x["data"] for x in lines if "data" in x]
        assert [op["object_id"] for d in data for op in d["data"]] == ["t1", "t2"]
        last = lines[-1]["checkpoint_complete"]["last_op_id"]
        assert last == diff["last_op_id"]
        # the client leaves: the stream ends, its slot is free for a new stream
        c.close()
        await _eventually(lambda: gw.hub.connections == 0 and not gw.user_streams)
        c2 = await Raw.open(port, make_dev_token(s, sub="u1"))
        await c2.until(lambda r: r.count("checkpoint_complete") >= 1)
        assert b"HTTP/1.1 200" in c2.raw
        c2.close()


async def test_detached_stream_keepalive_and_token_expiry(gw_settings) -> None:
    s = gw_settings(keepalive_s=0.5)
    await feed(s, [todo("t1", "u2")])
    async with running_app(s) as (port, gw, _runner):
        c = await Raw.open(port, make_dev_token(s, sub="u2", ttl_s=3))
        await c.until(lambda r: r.count("checkpoint_complete") >= 1)
        await _eventually(lambda: not gw.streams and gw.hub.connections == 1)
        await c.until(lambda r: r.count("token_expires_in") >= 2)
        # at expiry: token_expires_in 0, then the chunked response ends
        await c.until(lambda r: r.closed, timeout=15)
        lines = c.lines()
        assert lines[-1] == {"token_expires_in": 0}
        assert c.raw.endswith(b"0\r\n\r\n")
        await _eventually(lambda: gw.hub.connections == 0 and not gw.user_streams)
        c.close()


async def test_shutdown_ends_detached_streams(gw_settings) -> None:
    s = gw_settings()
    await feed(s, [todo("t1", "u3")])
    async with running_app(s) as (port, gw, runner):
        clients = [await Raw.open(port, make_dev_token(s, sub=f"u3-{i}")) for i in range(3)]
        for c in clients:
            await c.until(lambda r: r.count("checkpoint_complete") >= 1)
        await _eventually(lambda: not gw.streams and gw.hub.connections == 3)
        await runner.shutdown()
        for c in clients:
            await c.until(lambda r: r.closed, timeout=10)
            assert c.raw.endswith(b"0\r\n\r\n")  # ended, not cut
            c.close()
        assert gw.hub.connections == 0 and not gw.user_streams


async def test_detached_stream_releases_the_request_handler_at_once(gw_settings) -> None:
    """After the detach nothing holds aiohttp's handler of the connection: no keep-alive
    timer waits ``idle_timeout_s`` for a next request that cannot come (before: every
    detached stream's handler, its task and its timer lived on for 30 s after a storm)."""
    import gc

    from aiohttp.web_protocol import RequestHandler

    def handlers() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, RequestHandler))

    s = gw_settings(idle_timeout_s=30)
    n = 4
    await feed(s, [todo(f"t{i}", f"u{i}") for i in range(n)])
    async with running_app(s) as (port, gw, _runner):
        base = handlers()
        clients = [await Raw.open(port, make_dev_token(s, sub=f"u{i}")) for i in range(n)]
        for c in clients:
            await c.until(lambda r: r.count("checkpoint_complete") >= 1)
        await _eventually(lambda: not gw.streams and gw.hub.connections == n)
        await _eventually(lambda: handlers() == base)
        # the detached streams still serve their clients
        await feed(s, [todo("t0", "u0", "again")])
        await clients[0].until(lambda r: r.count("checkpoint_complete") >= 2)
        for c in clients:
            c.close()
