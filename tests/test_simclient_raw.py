"""The raw HTTP/1.1 client of the simulator (``bucketsync.simclient.ResponseLines``): pure
parsing, checked against responses this test encodes itself (chunked with random chunk
sizes, extensions and trailers; Content-Length; until the close), fed in random pieces."""

from __future__ import annotations

import random

import orjson
import pytest

from bucketsync.simclient import HttpError, ResponseLines, stream_request


def _lines(rng: random.Random, n: int) -> list[bytes]:
    out = []
    for i in range(n):
        kind = rng.choice(["data", "checkpoint", "token_expires_in", "blob"])
        if kind == "blob":
            # bytes that look like framing inside a line: CRLF-free, but hex, ';' and '0'
            body = {"blob": "0;x=1 " * rng.randint(0, 50) + "é\u2028" + str(i)}
        else:
            body = {kind: {"i": i, "pad": "x" * rng.randint(0, 3000)}}
        out.append(orjson.dumps(body))
    return out


def _chunked(body: bytes, rng: random.Random, *, trailers: bool) -> bytes:
    out = [b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"]
    out.append(b"Transfer-Encoding: chunked\r\nX-Other:  v \r\n\r\n")
    pos = 0
    while pos < len(body):
        n = rng.randint(1, 700)
        chunk = body[pos : pos + n]
        ext = b";name=value" if rng.random() < 0.2 else b""
        size = f"{len(chunk):x}".encode()
        if rng.random() < 0.5:
            size = size.upper()
        out.append(size + ext + b"\r\n" + chunk + b"\r\n")
        pos += n
    out.append(b"0\r\n")
    if trailers:
        out.append(b"X-Trailer: 1\r\nX-Another: 2\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def _feed_in_pieces(p: ResponseLines, wire: bytes, rng: random.Random) -> list[bytes]:
    got: list[bytes] = []
    pos = 0
    while pos < len(wire):
        n = rng.choice([1, 2, 3, rng.randint(1, 64), rng.randint(1, 5000)])
        got.extend(p.feed(wire[pos : pos + n]))
        pos += n
    return got


@pytest.mark.parametrize("seed", range(40))
def test_chunked_ndjson_in_random_pieces(seed: int) -> None:
    rng = random.Random(seed)
    lines = _lines(rng, rng.randint(0, 60))
    # blank lines between records are not records
    body = b"".join(line + (b"\n\n" if rng.random() < 0.1 else b"\n") for line in lines)
    wire = _chunked(body, rng, trailers=seed % 2 == 0)
    p = ResponseLines()
    got = _feed_in_pieces(p, wire + b"HTTP/1.1 garbage after the end", rng)
    assert got == lines
    assert p.done and p.status == 200
    assert p.headers["transfer-encoding"] == "chunked" and p.headers["x-other"] == "v"


def test_last_line_without_newline_ends_with_the_response() -> None:
    wire = _chunked(b'{"a":1}\n{"b":2}', random.Random(1), trailers=False)
    p = ResponseLines()
    assert p.feed(wire) == [b'{"a":1}', b'{"b":2}']
    assert p.done


@pytest.mark.parametrize("seed", range(10))
def test_content_length_body(seed: int) -> None:
    rng = random.Random(seed)
    body = orjson.dumps({"error": {"code": "PSYNC_S2101", "status": 401, "pad": "é" * seed}})
    wire = (
        b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    p = ResponseLines()
    assert _feed_in_pieces(p, wire, rng) == [body]
    assert p.done and p.status == 401


def test_empty_bodies() -> None:
    p = ResponseLines()
    assert p.feed(b"HTTP/1.1 204 No Content\r\n\r\n") == [] and p.done and p.status == 204
    p = ResponseLines()
    assert p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") == [] and p.done
    p = ResponseLines()
    assert p.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n") == []
    assert p.done


def test_body_until_the_connection_closes() -> None:
    p = ResponseLines()
    assert p.feed(b'HTTP/1.0 200 OK\r\nConnection: close\r\n\r\n{"a"') == []
    assert p.feed(b':1}\n{"b":') == [b'{"a":1}']
    assert not p.done
    assert p.eof() == [b'{"b":']
    assert p.done


def test_nothing_before_the_head_is_complete() -> None:
    p = ResponseLines()
    assert p.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n") == []
    assert p.status == 0
    assert p.feed(b"\r\n5\r\n{}\n{}\r\n") == [b"{}"]
    assert p.status == 200 and not p.done


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTX/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 2000,
    ],
)
def test_malformed_responses_raise(wire: bytes) -> None:
    with pytest.raises(HttpError):
        ResponseLines().feed(wire)


def test_stream_request_is_one_http_request() -> None:
    body = orjson.dumps({"buckets": [], "client_id": "c1"})
    raw = stream_request("127.0.0.1:8080", "tok.en", body)
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /sync/stream HTTP/1.1"
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    assert headers[b"Authorization"] == b"Token tok.en"
    assert headers[b"Host"] == b"127.0.0.1:8080"
    assert int(headers[b"Content-Length"]) == len(body) and rest == body
