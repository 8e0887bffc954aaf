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
