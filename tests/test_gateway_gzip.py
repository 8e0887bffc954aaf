"""gzip sync streams (``gateway.compression: gzip``, issue 12): a client whose
``Accept-Encoding`` allows gzip gets ``Content-Encoding: gzip``; the initial sync is
deflated, later lines (served by the stream's task or by the hub's batched delivery to a
detached stream, a chunk shared by many streams) are stored gzip blocks, and the body ends
as a valid gzip member at token expiry. Checked on a real gateway on the real Redis with
raw sockets; what the client decodes is compared with the lines the test expects, and the
whole body with Python's gzip (its CRC-32 and length)."""

from __future__ import annotations

import asyncio
import gzip
import socket
import zlib
from typing import Any

import orjson
import pytest

from bucketsync.tokens import make_dev_token
from gateway import protocol
from tests.gateway_helpers import feed, running_app, todo
from tests.test_gateway_detach import Raw, _eventually

pytestmark = pytest.mark.stack


class GzRaw(Raw):
    @classmethod
    async def open_gz(cls, port: int, token: str, accept: str | None) -> GzRaw:
        sock = socket.socket()
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        body = orjson.dumps({"raw_data": True, "client_id": "c1"})
        enc = f"Accept-Encoding: {accept}\r\n" if accept is not None else ""
        await loop.sock_sendall(
            sock,
            b"POST /sync/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"{enc}Authorization: Token {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body,
        )
        return cls(sock)

    def head(self) -> bytes:
        return self.raw.partition(b"\r\n\r\n")[0].lower()

    def body(self) -> bytes:
        """The response body with the chunk framing removed."""
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
        return data

    def lines(self) -> list[dict[str, Any]]:
        data = self.body()
        if b"content-encoding: gzip" in self.head():
            data = zlib.decompressobj(31).decompress(data)  # what arrived so far
        return [orjson.loads(x) for x in data.split(b"\n") if x.strip()]


def test_accept_encoding() -> None:
    assert protocol.accepts_gzip("gzip, deflate")  # the official Node client (Node 20 fetch)
    assert protocol.accepts_gzip("br, GZIP;q=0.5")
    assert protocol.accepts_gzip("*")
    assert not protocol.accepts_gzip("gzip;q=0, deflate")
    assert not protocol.accepts_gzip("deflate, br")
    assert not protocol.accepts_gzip("")
    assert not protocol.accepts_gzip(None)


async def test_gzip_stream_initial_sync_changes_and_end(gw_settings) -> None:
    s = gw_settings(compression="gzip", keepalive_s=0.5)
    await feed(s, [todo(f"t{i}", "u1", "x" * 200) for i in range(50)])
    async with running_app(s) as (port, gw, _runner):
        tok = make_dev_token(s, sub="u1", ttl_s=4)
        a = await GzRaw.open_gz(port, tok, "gzip, deflate")
        b = await GzRaw.open_gz(port, tok, "gzip, deflate")
        for c in (a, b):
            await c.until(lambda r: r.count("checkpoint_complete") >= 1)
            assert b"content-encoding: gzip" in c.head()
        first = a.lines()
        assert [op["object_id"] for x in first if "data" in x for op in x["data"]["data"]] == [
            f"t{i}" for i in range(50)
        ]
        assert len(a.body()) < 50 * 200 // 2, "the initial sync is deflated"
        # idle and detached: no compressor kept
        await _eventually(lambda: not gw.streams and gw.hub.connections == 2)
        owners = [sub.owner for sub in gw.hub._subs]
        assert all(o is not None and not o._gz.deflating for o in owners)  # type: ignore[union-attr]
        # a change: served by the hub's batched delivery, one shared chunk for both
        before = gw.hub.fast_deliveries
        await feed(s, [todo("t50", "u1", "new")])
        for c in (a, b):
            await c.until(lambda r: r.count("checkpoint_complete") >= 2)
            lines = c.lines()
            diff = next(x["checkpoint_diff"] for x in lines if "checkpoint_diff" in x)
            assert diff["updated_buckets"][0]["count"] == 51
            assert lines[-2]["data"]["data"][0]["object_id"] == "t50"
            assert lines[-1] == {"checkpoint_complete": {"last_op_id": diff["last_op_id"]}}
        assert gw.hub.fast_deliveries == before + 2
        # keepalives (the stream's own task), then the end at expiry: a whole gzip member
        for c in (a, b):
            await c.until(lambda r: r.closed, timeout=15)
            assert c.lines()[-1] == {"token_expires_in": 0}
            whole = gzip.decompress(c.body())  # checks the trailer's CRC-32 and length
            assert whole.split(b"\n")[-2] == b'{"token_expires_in":0}'
            c.close()


async def test_no_gzip_unless_accepted_and_configured(gw_settings) -> None:
    await feed(gw_settings(), [todo("t1", "u2")])
    for compression, accept, gz in (
        ("gzip", None, False),
        ("gzip", "gzip;q=0", False),
        ("off", "gzip, deflate", False),
        ("gzip", "gzip", True),
    ):
        s = gw_settings(compression=compression)
        async with running_app(s) as (port, _gw, _runner):
            c = await GzRaw.open_gz(port, make_dev_token(s, sub="u2"), accept)
            await c.until(lambda r: r.count("checkpoint_complete") >= 1)
            assert (b"content-encoding: gzip" in c.head()) == gz, (compression, accept)
            data = next(x["data"] for x in c.lines() if "data" in x)
            assert data["data"][0]["object_id"] == "t1"
            c.close()
