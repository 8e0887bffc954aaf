"""An in-memory double of the store's read side, as the gateway core uses it.

:class:`MemoryStore` implements exactly the :class:`pipeline.store.Store` methods that
``gateway/hub.py``, ``gateway/stream.py`` and ``gateway/buckets.py`` call
(:class:`GatewayStoreReads`), with the contracts of their docstrings in ``pipeline/store.py``:
``read_checkpoint`` / ``read_checkpoint_with_lookups`` are one atomic step (here: no await
in between), ``read_ops`` returns ``after < op_id <= upto`` ascending, at most ``limit``,
``read_changes`` returns the change entries after an id (blocking up to ``block_ms``), each
with the gap-free sequence number ``n``.

It is a double of our own store interface, not of Redis. The write side mimics what
the store's apply step stores, op by op (:meth:`MemoryStore.apply`), so the gateway sees the
same members and change entries as from the real store:

- a PUT is stored as its wire JSON ``{"op_id":"N","op":"PUT",...}`` and a PUT of a row
  already in the bucket turns the row's previous op into ``T<N>|{"op_id":..,"op":"MOVE",
  "checksum":..}`` (same op id and checksum, target = the new op); an identical PUT (same
  checksum) adds no op;
- a REMOVE is a new op (untagged) and turns the row's previous op into a MOVE targeting it;
- the bucket's running checksum (mod 2^32), count and last op advance with each new op;
- the checkpoint is the op sequence after the batch, and one change entry is appended:
  ``n``, ``cp``, ``b`` (``{bucket: [checksum, count]}`` of every bucket touched), ``l``
  (sorted lookup keys whose value set changed), ``o`` (the batch's offsets);
- :meth:`MemoryStore.compact` folds a bucket's leading MOVE/REMOVE/CLEAR run into one CLEAR
  as ``compact_step.lua`` does (op id = last folded, checksum = their sum, target = the
  highest target, a REMOVE counting as its own target; no change entry);
- :meth:`MemoryStore.issue_write_checkpoint` appends a ``{n, w: key}`` entry as the store's
  notify script does.

``calls`` counts the read calls per method, so tests can assert what was read and how often.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import orjson

from pipeline.store import BucketState, LookupRows, Store, StoredOp, parse_member

SEP = "\x1f"
ChangeEntry = tuple[bytes, dict[bytes, bytes]]


class GatewayStoreReads(Protocol):
    """The store methods the gateway core (hub, stream, resolver) calls."""

    async def checkpoint(self) -> int: ...

    async def applied_offsets(self) -> dict[str, int]: ...

    async def read_checkpoint(
        self, buckets: Sequence[str]
    ) -> tuple[int, dict[str, BucketState]]: ...

    async def read_lookups(self, keys: Sequence[str]) -> LookupRows: ...

    async def read_checkpoint_with_lookups(
        self, buckets: Sequence[str], keys: Sequence[str]
    ) -> tuple[int, dict[str, BucketState], LookupRows]: ...

    async def read_ops(self, bucket: str, after: int, upto: int, limit: int) -> list[StoredOp]: ...

    async def read_ops_raw(self, bucket: str, after: int, upto: int, limit: int) -> list[bytes]: ...

    async def read_checkpoint_with_ops(
        self, buckets: Sequence[str], after: Mapping[str, int], limit: int
    ) -> tuple[int, dict[str, BucketState], dict[str, tuple[list[StoredOp], bool]]]: ...

    async def changes_tail(self) -> tuple[bytes, int]: ...

    async def read_tail(self) -> tuple[bytes, int, int, dict[str, int]]: ...

    async def reader_synced(self) -> bool: ...

    async def read_changes(
        self, last_id: bytes, block_ms: int, count: int = 500
    ) -> list[tuple[bytes, dict[bytes, bytes]]]: ...

    async def write_checkpoints(self, key: str) -> dict[int, dict[str, int]]: ...

    async def read_stream_starts(
        self, starts: Sequence[tuple[Sequence[str], str]]
    ) -> tuple[int, list[tuple[dict[str, BucketState], dict[int, dict[str, int]]]]]: ...


def op_checksum(text: str) -> int:
    """First four bytes of SHA-256, little-endian (sync-protocol.md §5.1)."""
    return int(struct.unpack_from("<I", hashlib.sha256(text.encode()).digest())[0])


@dataclass(frozen=True, slots=True)
class Put:
    bucket: str
    object_type: str
    object_id: str
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Remove:
    bucket: str
    object_type: str
    object_id: str


@dataclass(frozen=True, slots=True)
class Lookup:
    """One source row starts (``delta`` 1) or stops (-1) contributing ``values`` to ``key``."""

    key: str
    values: tuple[Any, ...]
    delta: int = 1


Change = Put | Remove | Lookup


@dataclass(slots=True)
class _Bucket:
    checksum: int = 0
    count: int = 0
    last_op: int = 0
    #: op_id -> the member as the sorted set holds it (tagged)
    members: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OpRecord:
    """What the fake stored for one op, for tests to compute expectations from."""

    op_id: int
    bucket: str
    kind: str
    checksum: int
    wire: bytes


class MemoryStore:
    def __init__(self, *, changes_maxlen: int = 10_000):
        self.changes_maxlen = changes_maxlen
        self.seq = 0
        self.cp = 0
        self.offsets: dict[str, int] = {}
        self.buckets: dict[str, _Bucket] = {}
        #: (bucket, object_type, object_id) -> (op_id, checksum, remove checksum)
        self.rows: dict[tuple[str, str, str], tuple[int, int, int]] = {}
        #: lookup key -> values JSON -> rows contributing it
        self.lookups: dict[str, dict[bytes, int]] = {}
        self.changes: list[ChangeEntry] = []
        self.change_n = 0
        self._last_id = (0, 0)
        self.wcp: dict[str, dict[int, dict[str, int]]] = {}
        self.calls: Counter[str] = Counter()
        self._appended = asyncio.Event()

    # ---- the read side (GatewayStoreReads) ------------------------------------

    async def checkpoint(self) -> int:
        self.calls["checkpoint"] += 1
        return self.cp

    async def applied_offsets(self) -> dict[str, int]:
        self.calls["applied_offsets"] += 1
        return dict(self.offsets)

    def _state(self, bucket: str) -> BucketState:
        b = self.buckets.get(bucket)
        return BucketState(b.checksum, b.count, b.last_op) if b else BucketState(0, 0, 0)

    def _lookup_rows(self, keys: Sequence[str]) -> LookupRows:
        return {k: frozenset(self.lookups.get(k, {})) for k in keys}

    async def read_checkpoint(self, buckets: Sequence[str]) -> tuple[int, dict[str, BucketState]]:
        self.calls["read_checkpoint"] += 1
        return self.cp, {b: self._state(b) for b in buckets}

    async def read_lookups(self, keys: Sequence[str]) -> LookupRows:
        self.calls["read_lookups"] += 1
        return self._lookup_rows(keys)

    async def read_checkpoint_with_lookups(
        self, buckets: Sequence[str], keys: Sequence[str]
    ) -> tuple[int, dict[str, BucketState], LookupRows]:
        self.calls["read_checkpoint_with_lookups"] += 1
        return self.cp, {b: self._state(b) for b in buckets}, self._lookup_rows(keys)

    async def read_ops(self, bucket: str, after: int, upto: int, limit: int) -> list[StoredOp]:
        self.calls["read_ops"] += 1
        b = self.buckets.get(bucket)
        if b is None:
            return []
        ids = sorted(i for i in b.members if after < i <= upto)[:limit]
        return [parse_member(b.members[i], float(i)) for i in ids]

    async def read_ops_raw(self, bucket: str, after: int, upto: int, limit: int) -> list[bytes]:
        """Through :meth:`read_ops` (counted there; a test may replace it), back in the
        stored member form Redis returns."""
        out: list[bytes] = []
        for op in await self.read_ops(bucket, after, upto, limit):
            out.append(b"T%d|%b" % (op.target, op.wire) if op.target else op.wire)
            out.append(b"%d" % op.op_id)
        return out

    async def read_checkpoint_with_ops(
        self, buckets: Sequence[str], after: Mapping[str, int], limit: int
    ) -> tuple[int, dict[str, BucketState], dict[str, tuple[list[StoredOp], bool]]]:
        self.calls["read_checkpoint_with_ops"] += 1
        ops: dict[str, tuple[list[StoredOp], bool]] = {}
        for b, a in after.items():
            bk = self.buckets.get(b)
            ids = sorted(i for i in bk.members if a < i <= self.cp) if bk else []
            got = [parse_member(bk.members[i], float(i)) for i in ids[:limit]] if bk else []
            ops[b] = (got, len(ids) > limit)
        return self.cp, {b: self._state(b) for b in buckets}, ops

    async def changes_tail(self) -> tuple[bytes, int]:
        self.calls["changes_tail"] += 1
        if not self.changes:
            return b"0-0", 0
        entry_id, fields = self.changes[-1]
        return entry_id, int(fields[b"n"])

    async def reader_synced(self) -> bool:
        return True

    async def read_tail(self) -> tuple[bytes, int, int, dict[str, int]]:
        self.calls["read_tail"] += 1
        entry_id, n = (
            (self.changes[-1][0], int(self.changes[-1][1][b"n"])) if self.changes else (b"0-0", 0)
        )
        return entry_id, n, self.cp, dict(self.offsets)

    async def read_changes(
        self, last_id: bytes, block_ms: int, count: int = 500
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        self.calls["read_changes"] += 1
        after = _parse_id(last_id)
        out = [e for e in self.changes if _parse_id(e[0]) > after][:count]
        if out or not block_ms:
            return out
        self._appended.clear()
        try:
            await asyncio.wait_for(self._appended.wait(), block_ms / 1000)
        except TimeoutError:
            return []
        return [e for e in self.changes if _parse_id(e[0]) > after][:count]

    async def write_checkpoints(self, key: str) -> dict[int, dict[str, int]]:
        self.calls["write_checkpoints"] += 1
        return {i: dict(p) for i, p in self.wcp.get(key, {}).items()}

    async def read_stream_starts(
        self, starts: Sequence[tuple[Sequence[str], str]]
    ) -> tuple[int, list[tuple[dict[str, BucketState], dict[int, dict[str, int]]]]]:
        self.calls["read_stream_starts"] += 1
        return self.cp, [
            (
                {b: self._state(b) for b in buckets},
                {i: dict(p) for i, p in self.wcp.get(key, {}).items()},
            )
            for buckets, key in starts
        ]

    # ---- the write side (what the apply step and friends store) --------------

    def apply(self, changes: Sequence[Change], *, offsets: Mapping[str, int] | None = None) -> int:
        """Apply one batch atomically; returns the new checkpoint."""
        touched: dict[str, None] = {}
        before: dict[str, dict[bytes, int]] = {}
        for ch in changes:
            if isinstance(ch, Lookup):
                vals = self.lookups.setdefault(ch.key, {})
                before.setdefault(ch.key, dict(vals))
                v = orjson.dumps(list(ch.values))
                now = vals.get(v, 0) + ch.delta
                if now <= 0:
                    vals.pop(v, None)
                else:
                    vals[v] = now
                continue
            f = (ch.bucket, ch.object_type, ch.object_id)
            cur = self.rows.get(f)
            bucket = self.buckets.setdefault(ch.bucket, _Bucket())
            if isinstance(ch, Put):
                data = orjson.dumps(dict(ch.data)).decode()
                cs = op_checksum(f"put.{ch.object_type}.{ch.object_id}.{data}")
                rcs = op_checksum(f"delete.{ch.object_type}/{ch.object_id}")
                if cur is not None and cur[1] == cs:
                    continue  # identical data: no new op
                op_id = self._add(bucket, cs, b"", self._put_tail(ch, cs, data))
                self.rows[f] = (op_id, cs, rcs)
            else:
                if cur is None:
                    continue  # the row is not in the bucket: nothing to remove
                op_id = self._add(bucket, cur[2], b"", self._remove_tail(ch, cur[2]))
                del self.rows[f]
            if cur is not None:  # the row's previous op is superseded: MOVE
                old_id, old_cs = cur[0], cur[1]
                bucket.members[old_id] = (
                    b"T%d|" % op_id + b'{"op_id":"%d","op":"MOVE","checksum":%d}' % (old_id, old_cs)
                )
            touched[ch.bucket] = None
        for tp, off in (offsets or {}).items():
            self.offsets[tp] = off
        self.cp = self.seq
        fields: dict[bytes, bytes] = {b"cp": b"%d" % self.cp}
        if touched:
            fields[b"b"] = orjson.dumps(
                {b: [self.buckets[b].checksum, self.buckets[b].count] for b in touched}
            )
        changed_keys = sorted(
            k for k, old in before.items() if set(old) != set(self.lookups.get(k, {}))
        )
        if changed_keys:
            fields[b"l"] = orjson.dumps(changed_keys)
        fields[b"o"] = orjson.dumps(dict(offsets or {}))
        self._append(fields)
        return self.cp

    def _add(self, bucket: _Bucket, cs: int, tag: bytes, tail: bytes) -> int:
        """A new op: ``tag`` + ``{"op_id":"<id>",`` + ``tail`` (the wire JSON's rest)."""
        self.seq += 1
        op_id = self.seq
        bucket.members[op_id] = tag + b'{"op_id":"%d",' % op_id + tail
        bucket.checksum = (bucket.checksum + cs) % 2**32
        bucket.count += 1
        bucket.last_op = op_id
        return op_id

    @staticmethod
    def _put_tail(ch: Put, cs: int, data: str) -> bytes:
        return (
            b'"op":"PUT","object_type":'
            + orjson.dumps(ch.object_type)
            + b',"object_id":'
            + orjson.dumps(ch.object_id)
            + b',"checksum":%d,"data":' % cs
            + orjson.dumps(data)
            + b"}"
        )

    @staticmethod
    def _remove_tail(ch: Remove, rcs: int) -> bytes:
        return (
            b'"op":"REMOVE","object_type":'
            + orjson.dumps(ch.object_type)
            + b',"object_id":'
            + orjson.dumps(ch.object_id)
            + b',"checksum":%d}' % rcs
        )

    def compact(self, bucket: str) -> int:
        """Fold the bucket's leading MOVE/REMOVE/CLEAR run into one CLEAR (compact_step.lua,
        unbounded chunk); returns the number of ops folded (0: nothing to do)."""
        b = self.buckets[bucket]
        run: list[int] = []
        target = total = 0
        for op_id in sorted(b.members):
            op = parse_member(b.members[op_id], float(op_id))
            if op.kind == "PUT":
                break
            t = op_id if op.kind == "REMOVE" else op.target
            target = max(target, t)
            total = (total + orjson.loads(op.wire)["checksum"]) % 2**32
            run.append(op_id)
        if not run or (len(run) == 1 and b.members[run[0]].find(b'"op":"CLEAR"') >= 0):
            return 0
        for op_id in run:
            del b.members[op_id]
        last = run[-1]
        b.members[last] = b"T%d|" % target + b'{"op_id":"%d","op":"CLEAR","checksum":%d}' % (
            last,
            total,
        )
        b.count += 1 - len(run)
        return len(run)

    def issue_write_checkpoint(self, key: str, position: Mapping[str, int]) -> int:
        ids = self.wcp.setdefault(key, {})
        wid = max(ids, default=0) + 1
        ids[wid] = dict(position)
        self._append({b"w": key.encode()})
        return wid

    def set_offsets(self, offsets: Mapping[str, int]) -> int:
        """A batch that only moves offsets (no ops): a change entry with ``o`` only."""
        return self.apply([], offsets=offsets)

    def _append(self, fields: dict[bytes, bytes]) -> None:
        self.change_n += 1
        ms = max(int(time.time() * 1000), self._last_id[0])
        seq = self._last_id[1] + 1 if ms == self._last_id[0] else 0
        self._last_id = (ms, seq)
        self.changes.append((b"%d-%d" % (ms, seq), {b"n": b"%d" % self.change_n, **fields}))
        if len(self.changes) > self.changes_maxlen:
            del self.changes[: len(self.changes) - self.changes_maxlen]
        self._appended.set()

    def drop_changes(self, count: int) -> None:
        """Trim the oldest ``count`` entries (as MAXLEN would): a reader behind them sees
        a gap in ``n``."""
        del self.changes[:count]

    # ---- for expectations --------------------------------------------------

    def ops(self, bucket: str) -> list[OpRecord]:
        """The bucket's log as stored now (client-visible wire JSON, tags stripped)."""
        b = self.buckets.get(bucket)
        out = []
        for op_id in sorted(b.members if b else ()):
            assert b is not None
            op = parse_member(b.members[op_id], float(op_id))
            doc = orjson.loads(op.wire)
            out.append(OpRecord(op_id, bucket, doc["op"], doc["checksum"], op.wire))
        return out

    def state(self, bucket: str) -> BucketState:
        return self._state(bucket)


def _parse_id(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def as_store(mem: MemoryStore) -> Store:
    """The double where the gateway's constructors expect a :class:`Store`."""
    return cast(Store, mem)


if __debug__:  # static checks (mypy): the real store and the double offer the same reads
    _real: type[GatewayStoreReads] = Store
    _fake: type[GatewayStoreReads] = MemoryStore
