"""A fast PowerSync-protocol client simulator (for load, benchmarks, tests and the demo).

:class:`ClientState` is a pure state machine that applies stream lines the way the
official client's core does (sync-protocol.md §3, §5.4, §7): per-bucket ops, running
checksums, CLEAR resets, validation at ``checkpoint_complete``. :func:`stream_once`
is the thin HTTP shell around it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

MOD = 1 << 32


@dataclass
class BucketData:
    rows: dict[tuple[str, str], tuple[int, str]] = field(default_factory=dict)  # -> (op_id, data)
    total: int = 0  # running checksum since the last CLEAR
    last_op: int = 0


@dataclass
class ClientState:
    buckets: dict[str, BucketData] = field(default_factory=dict)
    #: checkpoint being received: bucket -> expected checksum
    target: dict[str, int] = field(default_factory=dict)
    target_op: int = 0
    write_checkpoint: int | None = None
    #: last checkpoint that validated: bucket -> after
    applied_op: int = 0
    applied_write_checkpoint: int | None = None
    mismatches: list[str] = field(default_factory=list)
    completed: int = 0
    lines: int = 0
    ops: int = 0
    bytes_received: int = 0
    seen_checkpoint: bool = False
    token_expires_in: int | None = None
    protocol_errors: list[str] = field(default_factory=list)

    def request_body(self, client_id: str = "sim") -> dict[str, Any]:
        return {
            "buckets": [
                {"name": b, "after": str(max(d.last_op, self.applied_op))}
                for b, d in sorted(self.buckets.items())
            ],
            "include_checksum": True,
            "raw_data": True,
            "binary_data": True,
            "client_id": client_id,
            "parameters": {},
            "streams": {"include_defaults": True, "subscriptions": []},
        }

    def tables(self) -> dict[str, dict[str, dict[str, Any]]]:
        """What the app sees: object_type -> id -> row, the newest op winning across buckets."""
        best: dict[tuple[str, str], tuple[int, str]] = {}
        for b in self.buckets.values():
            for key, (op_id, data) in b.rows.items():
                if key not in best or best[key][0] < op_id:
                    best[key] = (op_id, data)
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for (ot, oid), (_, data) in sorted(best.items()):
            out.setdefault(ot, {})[oid] = orjson.loads(data)
        return out

    def apply_line(self, raw: bytes) -> str:
        self.lines += 1
        self.bytes_received += len(raw)
        obj = orjson.loads(raw)
        if not isinstance(obj, dict) or len(obj) != 1:
            self.protocol_errors.append(f"line must have exactly one key: {raw[:200]!r}")
            return "error"
        ((kind, body),) = obj.items()
        if kind == "checkpoint":
            self.seen_checkpoint = True
            self._checkpoint(body, full=True)
        elif kind == "checkpoint_diff":
            if not self.seen_checkpoint:
                self.protocol_errors.append("checkpoint_diff before any checkpoint")
            self._checkpoint(body, full=False)
        elif kind == "data":
            self._data(body)
        elif kind == "checkpoint_complete":
            self._complete(body)
        elif kind == "partial_checkpoint_complete":
            pass
        elif kind == "token_expires_in":
            self.token_expires_in = int(body)
        return kind

    def _checkpoint(self, body: dict[str, Any], *, full: bool) -> None:
        for f in ("last_op_id",):
            if not isinstance(body.get(f), str):
                self.protocol_errors.append(f"{f} must be a string")
        wc = body.get("write_checkpoint")
        if wc is not None and not isinstance(wc, str):
            self.protocol_errors.append("write_checkpoint must be a string")
        self.target_op = int(body["last_op_id"])
        self.write_checkpoint = int(wc) if wc is not None else None
        if full:
            listed = {b["bucket"]: int(b["checksum"]) % MOD for b in body["buckets"]}
            for name in list(self.buckets):
                if name not in listed:
                    del self.buckets[name]
            self.target = listed
        else:
            for name in body["removed_buckets"]:
                self.target.pop(name, None)
                self.buckets.pop(name, None)
            for b in body["updated_buckets"]:
                self.target[b["bucket"]] = int(b["checksum"]) % MOD

    def _data(self, body: dict[str, Any]) -> None:
        name = body["bucket"]
        if name not in self.target:
            self.protocol_errors.append(f"data for bucket {name} not in the checkpoint")
        b = self.buckets.setdefault(name, BucketData())
        for op in body["data"]:
            self.ops += 1
            if not isinstance(op["op_id"], str):
                self.protocol_errors.append("op_id must be a string")
            op_id = int(op["op_id"])
            if op_id > self.target_op:
                self.protocol_errors.append(f"op {op_id} beyond checkpoint {self.target_op}")
            if op_id <= b.last_op:
                self.protocol_errors.append(f"op {op_id} not ascending in {name}")
            b.last_op = op_id
            kind = op["op"]
            cs = int(op["checksum"]) % MOD
            if kind == "CLEAR":
                b.rows.clear()
                b.total = cs
                continue
            b.total = (b.total + cs) % MOD
            if kind == "PUT":
                if not isinstance(op.get("data"), str):
                    self.protocol_errors.append("PUT data must be a JSON string")
                b.rows[(op["object_type"], op["object_id"])] = (op_id, op["data"])
            elif kind == "REMOVE":
                b.rows.pop((op["object_type"], op["object_id"]), None)

    def _complete(self, body: dict[str, Any]) -> None:
        if body.get("last_op_id") != str(self.target_op):
            self.protocol_errors.append(
                "checkpoint_complete last_op_id differs from the checkpoint"
            )
        bad = []
        for name, expected in self.target.items():
            got = self.buckets.get(name, BucketData()).total
            if got != expected:
                bad.append(f"{name} (expected {expected:#x}, got {got:#x})")
        if bad:
            # like the real client: drop the mismatched buckets and start them again
            self.mismatches.extend(bad)
            for entry in bad:
                self.buckets.pop(entry.split(" (")[0], None)
            return
        self.completed += 1
        self.applied_op = self.target_op
        self.applied_write_checkpoint = self.write_checkpoint
        for name in self.target:
            self.buckets.setdefault(name, BucketData())


LineHook = Callable[[str, ClientState], Awaitable[bool] | bool]


async def stream_once(
    session: aiohttp.ClientSession,
    endpoint: str,
    token: str,
    state: ClientState,
    *,
    on_line: LineHook | None = None,
    timeout_s: float | None = None,
    client_id: str = "sim",
) -> int:
    """One connection: POST /sync/stream and apply lines until the hook says stop.

    Returns the HTTP status. ``on_line(kind, state)`` returning True ends the stream.
    """
    deadline = time.monotonic() + timeout_s if timeout_s else None
    async with session.post(
        endpoint + "/sync/stream",
        json=state.request_body(client_id),
        headers={"Authorization": f"Token {token}"},
    ) as resp:
        if resp.status != 200:
            await resp.read()
            return resp.status
        buf = b""
        while True:
            remaining = None if deadline is None else max(0.01, deadline - time.monotonic())
            try:
                chunk = await asyncio.wait_for(resp.content.readany(), remaining)
            except TimeoutError:
                return resp.status
            if not chunk:
                return resp.status
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                kind = state.apply_line(line)
                if on_line is not None:
                    r = on_line(kind, state)
                    if not isinstance(r, bool):
                        r = await r
                    if r:
                        return resp.status


# ---- a raw HTTP/1.1 client: many streams per process (benchmarks) ------------------------


class HttpError(Exception):
    """The response is not HTTP/1.1 as :class:`ResponseLines` reads it."""


_HEAD, _SIZE, _DATA, _CRLF, _TRAILER, _LENGTH, _UNTIL_CLOSE, _DONE = range(8)


class ResponseLines:
    """Incremental parser of one HTTP/1.1 response whose body is newline-delimited JSON.

    :meth:`feed` takes bytes as they arrive and returns the body's complete, non-empty lines
    (without the newline); :meth:`eof` the last line of a body that had no final newline.
    It reads the status line and headers, then a chunked body (chunk extensions and
    trailers skipped), a ``Content-Length`` body, or one that runs until the connection
    closes. ``status``, ``headers`` (lower-case names) and ``done`` say where it is; a
    malformed response raises :class:`HttpError`. A callback per read and a few slices per
    chunk: no task, no stream reader, no per-line object beyond the line itself.
    """

    __slots__ = ("_buf", "_left", "_state", "_tail", "done", "headers", "status")

    def __init__(self) -> None:
        self._buf = b""
        self._tail = b""
        self._state = _HEAD
        self._left = 0
        self.status = 0
        self.headers: dict[str, str] = {}
        self.done = False

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        pos = 0
        end = len(buf)
        parts: list[bytes] = []
        state = self._state
        while pos < end:
            if state == _DATA:
                stop = min(end, pos + self._left)
                parts.append(buf[pos:stop])
                self._left -= stop - pos
                pos = stop
                if not self._left:
                    state = _CRLF
            elif state == _SIZE:
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    if end - pos > 1024:
                        raise HttpError("chunk size line too long")
                    break
                field = buf[pos:i].split(b";", 1)[0].strip()
                try:
                    size = int(field, 16)
                except ValueError:
                    raise HttpError(f"bad chunk size {field[:40]!r}") from None
                if size < 0:
                    raise HttpError(f"bad chunk size {field[:40]!r}")
                pos = i + 2
                if size:
                    self._left = size
                    state = _DATA
                else:
                    state = _TRAILER
            elif state == _CRLF:
                if end - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise HttpError("chunk data not followed by CRLF")
                pos += 2
                state = _SIZE
            elif state == _TRAILER:
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    break
                if i == pos:  # the empty line after the trailers: the response's end
                    state = _DONE
                pos = i + 2
            elif state == _LENGTH:
                stop = min(end, pos + self._left)
                parts.append(buf[pos:stop])
                self._left -= stop - pos
                pos = stop
                if not self._left:
                    state = _DONE
            elif state == _UNTIL_CLOSE:
                parts.append(buf[pos:])
                pos = end
            elif state == _HEAD:
                i = buf.find(b"\r\n\r\n", pos)
                if i < 0:
                    if end - pos > 65536:
                        raise HttpError("response head too long")
                    break
                state = self._head(buf[pos:i])
                pos = i + 4
            else:  # _DONE: bytes after the response are not ours
                pos = end
        self._state = state
        self.done = state == _DONE
        self._buf = buf[pos:] if pos < end else b""
        if not parts:
            return self._flush() if self.done else []
        if self._tail:
            parts.insert(0, self._tail)
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        lines = body.split(b"\n")
        self._tail = lines.pop()
        if self.done:
            lines.extend(self._flush())
        return [line for line in lines if line]

    def _flush(self) -> list[bytes]:
        tail, self._tail = self._tail, b""
        return [tail] if tail else []

    def eof(self) -> list[bytes]:
        """The connection closed: the last line of a body that runs until the close."""
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
            self.done = True
            return self._flush()
        return []

    def _head(self, head: bytes) -> int:
        lines = head.split(b"\r\n")
        status = lines[0].split(b" ", 2)
        if len(status) < 2 or not status[0].startswith(b"HTTP/1."):
            raise HttpError(f"bad status line {lines[0][:80]!r}")
        try:
            self.status = int(status[1])
        except ValueError:
            raise HttpError(f"bad status line {lines[0][:80]!r}") from None
        headers = self.headers
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise HttpError(f"bad header line {line[:80]!r}")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return _SIZE
        if "content-length" in headers:
            try:
                self._left = int(headers["content-length"])
            except ValueError:
                raise HttpError("bad Content-Length") from None
            return _LENGTH if self._left else _DONE
        if self.status in (204, 304) or 100 <= self.status < 200:
            return _DONE
        return _UNTIL_CLOSE


def stream_request(host: str, token: str, body: bytes) -> bytes:
    """The bytes of a ``POST /sync/stream`` request carrying ``body`` (JSON)."""
    return (
        b"POST /sync/stream HTTP/1.1\r\nHost: "
        + host.encode()
        + b"\r\nContent-Type: application/json\r\nAccept: application/x-ndjson\r\n"
        + b"Authorization: Token "
        + token.encode()
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


RawLineHook = Callable[["RawStream", str, bytes], None]
RawEndHook = Callable[["RawStream", BaseException | None], None]


class RawStream(asyncio.Protocol):
    """One sync stream on a raw asyncio connection, applying its lines to ``state`` (the
    same :class:`ClientState` as :func:`stream_once`: checksums verified at every
    ``checkpoint_complete``). Writes ``request`` once connected; for each line of a 200
    response calls ``on_line(stream, kind, line)`` after applying it; a non-200 response's
    body is kept in ``error_body`` and the connection closed. ``on_end(stream, exc)`` runs
    once when the connection is gone (``exc``: the transport's error or a
    :class:`HttpError`; None for a clean close)."""

    __slots__ = (
        "error",
        "error_body",
        "on_end",
        "on_line",
        "parser",
        "request",
        "state",
        "transport",
    )

    def __init__(
        self,
        state: ClientState,
        request: bytes,
        on_line: RawLineHook | None = None,
        on_end: RawEndHook | None = None,
    ):
        self.state = state
        self.request = request
        self.on_line = on_line
        self.on_end = on_end
        self.parser = ResponseLines()
        self.transport: asyncio.Transport | None = None
        self.error_body = b""
        self.error: BaseException | None = None

    @property
    def status(self) -> int:
        return self.parser.status

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)
        self.request = b""

    def data_received(self, data: bytes) -> None:
        try:
            lines = self.parser.feed(data)
        except HttpError as exc:
            self.error = exc
            self.close()
            return
        self._lines(lines)

    def eof_received(self) -> bool | None:
        self._lines(self.parser.eof())
        return None

    def _lines(self, lines: list[bytes]) -> None:
        if self.parser.status != 200:
            if lines:
                self.error_body += b"\n".join(lines)
            if self.parser.done:
                self.close()
            return
        state = self.state
        hook = self.on_line
        for line in lines:
            kind = state.apply_line(line)
            if hook is not None:
                hook(self, kind, line)
            if self.transport is None or self.transport.is_closing():
                return
        if self.parser.done:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        if exc is not None and self.error is None:
            self.error = exc
        hook, self.on_end = self.on_end, None
        if hook is not None:
            hook(self, self.error)


async def raw_stream_once(
    host: str,
    port: int,
    token: str,
    state: ClientState,
    *,
    on_line: Callable[[str, ClientState], bool] | None = None,
    timeout_s: float | None = None,
    client_id: str = "sim",
) -> int:
    """:func:`stream_once` on a :class:`RawStream`: one connection, lines applied until
    ``on_line(kind, state)`` says stop (True), the response ends or ``timeout_s`` passes.
    Returns the HTTP status (0 when none arrived)."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def line(stream: RawStream, kind: str, _raw: bytes) -> None:
        if on_line is not None and on_line(kind, stream.state):
            stream.close()

    def end(_stream: RawStream, _exc: BaseException | None) -> None:
        if not ended.done():
            ended.set_result(None)

    body = orjson.dumps(state.request_body(client_id))
    stream = RawStream(state, stream_request(f"{host}:{port}", token, body), line, end)
    await loop.create_connection(lambda: stream, host, port)
    try:
        await asyncio.wait_for(asyncio.shield(ended), timeout_s)
    except TimeoutError:
        pass
    finally:
        stream.close()
    if stream.error is not None and isinstance(stream.error, HttpError):
        raise stream.error
    return stream.status
