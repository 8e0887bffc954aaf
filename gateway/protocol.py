"""Line shapes of the PowerSync sync stream (sync-protocol.md §3). The only module
that knows them. Every line is one JSON object with exactly one key; op ids and
write checkpoints are strings; op ``data`` arrives pre-encoded from the store.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

_dumps = orjson.dumps


@dataclass(frozen=True, slots=True)
class BucketChecksum:
    bucket: str
    checksum: int  # unsigned 32-bit
    count: int
    priority: int = 3
    #: why the connection holds the bucket (sync-streams.md §1b):
    #: ``{"default": <index into the checkpoint's streams>}`` / ``{"sub": <subscription index>}``
    subscriptions: tuple[tuple[str, int], ...] = (("default", 0),)

    def wire(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "checksum": self.checksum,
            "count": self.count,
            "priority": self.priority,
            "subscriptions": [{k: v} for k, v in self.subscriptions],
        }


def _line(obj: Any) -> bytes:
    return _dumps(obj) + b"\n"


def checkpoint(
    last_op_id: int,
    buckets: Iterable[BucketChecksum],
    write_checkpoint: int | None,
    streams: Sequence[str | dict[str, Any]],
) -> bytes:
    """``streams``: ``{name, is_default, errors}`` entries (a bare name: a default stream
    without errors)."""
    body: dict[str, Any] = {
        "last_op_id": str(last_op_id),
        "buckets": [b.wire() for b in buckets],
        "streams": [
            {"name": s, "is_default": True, "errors": []} if isinstance(s, str) else s
            for s in streams
        ],
    }
    if write_checkpoint is not None:
        body["write_checkpoint"] = str(write_checkpoint)
    return _line({"checkpoint": body})


def checkpoint_diff(
    last_op_id: int,
    updated: Iterable[BucketChecksum],
    removed: Iterable[str],
    write_checkpoint: int | None,
) -> bytes:
    body: dict[str, Any] = {
        "last_op_id": str(last_op_id),
        "write_checkpoint": str(write_checkpoint) if write_checkpoint is not None else None,
        "updated_buckets": [b.wire() for b in updated],
        "removed_buckets": list(removed),
    }
    return _line({"checkpoint_diff": body})


def data(bucket: str, after: int, next_after: int, has_more: bool, ops: Sequence[bytes]) -> bytes:
    """A ``data`` line around ops already encoded as wire JSON by the store."""
    head = _dumps(
        {"bucket": bucket, "after": str(after), "next_after": str(next_after), "has_more": has_more}
    )
    return b'{"data":' + head[:-1] + b',"data":[' + b",".join(ops) + b"]}}\n"


def checkpoint_complete(last_op_id: int) -> bytes:
    return _line({"checkpoint_complete": {"last_op_id": str(last_op_id)}})


def partial_checkpoint_complete(last_op_id: int, priority: int) -> bytes:
    return _line(
        {"partial_checkpoint_complete": {"last_op_id": str(last_op_id), "priority": priority}}
    )


def token_expires_in(seconds: int) -> bytes:
    return _line({"token_expires_in": max(0, seconds)})


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """The validated body of ``POST /sync/stream``; unknown fields are ignored."""

    after: dict[str, int]
    client_id: str | None
    parameters: dict[str, Any]
    include_defaults: bool
    raw_data: bool
    #: ``streams.subscriptions``: (stream, parameters, override_priority), checked later
    #: (a bad entry becomes an error in the checkpoint's ``streams``, not a failed request)
    subscriptions: tuple[tuple[str, Any, Any], ...] = ()


class BadRequest(ValueError):
    pass


#: Op ids are unsigned 63-bit integers (the reference validates 1..2^63-1; ``"0"`` means
#: "from the beginning"), sent as base-10 strings.
MAX_OP_ID = 2**63 - 1
_OP_ID = re.compile(r"[0-9]{1,19}")


def parse_op_id(raw: Any, what: str) -> int:
    """A client-sent op id: a base-10 string of ASCII digits in ``0..2^63-1``."""
    if not isinstance(raw, str):
        raise BadRequest(f"{what} must be a string op id (base-10 digits)")
    if _OP_ID.fullmatch(raw) is None:
        raise BadRequest(f"{what} is not an op id: {raw[:40]!r}")
    value = int(raw)
    if value > MAX_OP_ID:
        raise BadRequest(f"{what} is out of range: op ids are at most 2^63-1")
    return value


def parse_stream_request(body: Any) -> StreamRequest:
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    after: dict[str, int] = {}
    buckets = body.get("buckets", [])
    if buckets is None:
        buckets = []
    if not isinstance(buckets, list):
        raise BadRequest("'buckets' must be an array of {name, after}")
    for i, b in enumerate(buckets):
        if not isinstance(b, dict) or not isinstance(b.get("name"), str):
            raise BadRequest(f"buckets[{i}] must be an object with a string 'name'")
        after[b["name"]] = parse_op_id(b.get("after", "0"), f"buckets[{i}].after")
    client_id = body.get("client_id")
    if client_id is not None and not isinstance(client_id, str):
        raise BadRequest("'client_id' must be a string")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be an object")
    streams = body.get("streams") or {}
    if not isinstance(streams, dict):
        raise BadRequest("'streams' must be an object")
    include_defaults = streams.get("include_defaults", True)
    if not isinstance(include_defaults, bool):
        raise BadRequest("'streams.include_defaults' must be a boolean")
    raw_data = body.get("raw_data", True)
    subs_raw = streams.get("subscriptions") or []
    if not isinstance(subs_raw, list):
        raise BadRequest("'streams.subscriptions' must be an array")
    subscriptions: list[tuple[str, Any, Any]] = []
    for item in subs_raw:
        if not isinstance(item, dict):
            item = {}
        name = item.get("stream")
        subscriptions.append(
            (
                name if isinstance(name, str) else "",
                item.get("parameters"),
                item.get("override_priority"),
            )
        )
    return StreamRequest(
        after, client_id, params, include_defaults, bool(raw_data), tuple(subscriptions)
    )


# ---- gzip (Content-Encoding) ----------------------------------------------------------

_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name/time, OS unknown
#: a final, empty stored block: ends the deflate data
_DEFLATE_END = b"\x01\x00\x00\xff\xff"


def stored_blocks(data: bytes) -> bytes:
    """``data`` as non-final stored (uncompressed) deflate blocks: 5 bytes per 65,535."""
    if len(data) <= 0xFFFF:
        n = len(data)
        return b"\x00" + struct.pack("<HH", n, n ^ 0xFFFF) + data
    out = []
    for i in range(0, len(data), 0xFFFF):
        part = data[i : i + 0xFFFF]
        n = len(part)
        out.append(b"\x00" + struct.pack("<HH", n, n ^ 0xFFFF) + part)
    return b"".join(out)


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Does an ``Accept-Encoding`` header allow ``gzip`` (RFC 9110, Accept-Encoding; ``q=0`` refuses)?"""
    if not accept_encoding:
        return False
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        if name.strip().lower() not in ("gzip", "x-gzip", "*"):
            continue
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        if q > 0:
            return True
    return False


class GzipBody:
    """A sync stream's body as one gzip member (``Content-Encoding: gzip``), written in
    pieces that each end on a byte boundary, so the client can decode every line as soon as
    it arrives.

    Until :meth:`settle` the pieces are deflated (a zlib compressor at ``level``, sync-flushed
    per piece: the initial sync, where the bytes are). After it the compressor is dropped
    and pieces go out as stored blocks (:func:`stored_blocks`): an idle stream keeps two
    integers (the CRC-32 and the length), not a compressor's ~300 KB; its small diffs would
    compress little anyway. :meth:`end` closes the member (the final block and the gzip
    trailer); a stream cut before that leaves the client a truncated gzip body, as a cut
    stream leaves it a truncated line.
    """

    __slots__ = ("_comp", "crc", "size", "started")

    def __init__(self, level: int = 1) -> None:
        self._comp: zlib._Compress | None = zlib.compressobj(level, zlib.DEFLATED, -15, 9)
        self.crc = 0
        self.size = 0
        self.started = False

    @property
    def deflating(self) -> bool:
        return self._comp is not None

    def _head(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        return _GZIP_HEADER

    def encode(self, data: bytes) -> bytes:
        """``data`` (whole lines) as the next piece of the body."""
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        comp = self._comp
        if comp is not None:
            return self._head() + comp.compress(data) + comp.flush(zlib.Z_SYNC_FLUSH)
        return self._head() + stored_blocks(data)

    def count(self, data: bytes) -> None:
        """``data`` went out as :func:`stored_blocks` framed elsewhere (a chunk shared by
        many streams, after :meth:`settle`): only the trailer's CRC-32 and length move."""
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)

    def settle(self) -> None:
        """Drop the compressor (the last piece was sync-flushed: byte aligned)."""
        self._comp = None

    def end(self) -> bytes:
        comp, self._comp = self._comp, None
        tail = comp.flush(zlib.Z_FINISH) if comp is not None else _DEFLATE_END
        return self._head() + tail + struct.pack("<II", self.crc, self.size & 0xFFFFFFFF)
