"""The Redis op-log store. The only module that knows Redis key names and Lua scripts.

Layout under the configured prefix ``P`` (docs/store.md has the long form):

- ``P:ops:{bucket}``     sorted set, score = op_id, member = the op's wire JSON; MOVE/CLEAR
                         behind a tag ``T<target>|`` (target = the op that superseded it).
                         PUTs of stores written before 2026-12 may carry ``R<len>:<row key>``
                         in front (still read). Tags are never sent to clients.
- ``P:bucket:{bucket}``  hash: checksum (unsigned running total), count, last_op, moved.
- ``P:row:{row key}``    hash: ``bucket\\x1fobject_type\\x1fobject_id`` -> ``op_id:checksum:
                         remove_checksum`` of the row's current op there; field ``""`` holds
                         the source row JSON (for TOAST / partial-update merges; under
                         ``source_rows: auto`` only rows that can need one); field
                         ``"\x1fL"`` the row's lookup entries (JSON ``[[lookup, values], ...]``,
                         rows of tables read by parameter queries only).
- ``P:lookup:{lookup}``  hash: JSON array of bucket parameter values -> number of source rows
                         contributing it (``LookupEntry.lookup`` is the key; gateway reads
                         the field names).
- ``P:table:{table}``    set of row keys of a source table (TRUNCATE).
- ``P:seq``              op_id sequence.   ``P:checkpoint``  current checkpoint.
- ``P:offsets``          hash ``topic/partition`` -> last applied offset.
- ``P:source_lsn``       hash connector (``source.name``) -> highest applied PostgreSQL LSN
                         (``source.lsn``), never lowered; also announced in the change
                         entry's ``o`` as ``lsn:<connector>`` (exact write checkpoints).
- ``P:changes``          stream: one entry per applied batch (cp, changed buckets ``b``, lookup
                         keys whose value sets changed ``l``, offsets ``o``).
- ``P:merge_tables``     set of tables (topics) whose events showed they need merges.
- ``P:dirty``            set of buckets with MOVEs since their last compaction.
- ``P:reloc:{bucket}``   hash op id -> op id: live PUTs re-appended by defragmentation (the
                         row index keeps the old id; apply_batch.lua follows these).
- ``P:relocated``        set of buckets that have a ``P:reloc:{bucket}``.
- ``P:gone:{row key}``   source row of a row deleted by a primary-key change (expires in a
                         day): the create half may need it to fill TOAST placeholders.
- ``P:wcp:{key}``        hash: write-checkpoint ``id`` and ``pos:<id>`` -> position JSON; the
                         key is ``write_checkpoint_key(sub, client_id)``, the JSON array
                         ``[sub, client_id]`` (unambiguous, unlike ``sub/client_id``: sub ``p``
                         with client ``q/r`` and sub ``p/q`` with client ``r`` differ).
- ``P:dl:count``         hash ``reason`` -> dead letters (informational).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

SEP = "\x1f"


# Every change entry carries a gap-free sequence number "n", so a reader can tell
# that entries it never saw were trimmed away.
_NOTIFY_LUA = """
local n = redis.call("INCR", ARGV[1] .. ":changes:n")
redis.call("XADD", ARGV[1] .. ":changes", "MAXLEN", "~", ARGV[2], "*", "n", n, ARGV[3], ARGV[4])
return n
"""


# The checkpoint, bucket states (flat: checksum, count, last_op per bucket) and lookup
# rows in one atomic step and one command: ARGV = prefix, n buckets, buckets..., keys...
_READ_WITH_LOOKUPS_LUA = """
local P, nb = ARGV[1], tonumber(ARGV[2])
local flat = {}
for i = 1, nb do
  local v = redis.call("HMGET", P .. ":bucket:" .. ARGV[2 + i], "checksum", "count", "last_op")
  flat[#flat + 1] = v[1] or "0"
  flat[#flat + 1] = v[2] or "0"
  flat[#flat + 1] = v[3] or "0"
end
local out = {redis.call("GET", P .. ":checkpoint") or "0", flat}
for i = 3 + nb, #ARGV do
  out[#out + 1] = redis.call("HKEYS", P .. ":lookup:" .. ARGV[i])
end
return out
"""


# The same, packed for large bucket sets: ARGV = prefix, buckets joined by "\n", keys...;
# the states come back as one string "checksum count last_op ..." (one argument and one
# reply string instead of 3 per bucket: redis-py packs and parses 1,000 buckets ~10x faster)
_READ_WITH_LOOKUPS_PACKED_LUA = """
local P = ARGV[1]
local parts = {}
for b in string.gmatch(ARGV[2], "[^\\n]+") do
  local v = redis.call("HMGET", P .. ":bucket:" .. b, "checksum", "count", "last_op")
  parts[#parts + 1] = (v[1] or "0") .. " " .. (v[2] or "0") .. " " .. (v[3] or "0")
end
local out = {redis.call("GET", P .. ":checkpoint") or "0", table.concat(parts, " ")}
for i = 3, #ARGV do
  out[#out + 1] = redis.call("HKEYS", P .. ":lookup:" .. ARGV[i])
end
return out
"""


# Issue the next write-checkpoint id of KEYS[1]. A key that has none yet starts from the
# counter of its legacy ``sub/client_id`` key (KEYS[2]), so ids stay increasing for
# clients across the key change (a shared legacy counter only makes them start higher).
_ISSUE_WCP_LUA = """
if KEYS[2] ~= KEYS[1] and redis.call("HEXISTS", KEYS[1], "id") == 0 then
  local old = redis.call("HGET", KEYS[2], "id")
  if old then redis.call("HSET", KEYS[1], "id", old) end
end
local wid = redis.call("HINCRBY", KEYS[1], "id", 1)
redis.call("HSET", KEYS[1], "pos:" .. wid, ARGV[1])
return wid
"""


def write_checkpoint_key(sub: Any, client_id: str | None) -> str:
    """The store's name for the write checkpoints of ``(sub, client_id)``.

    A JSON array, so no pair of (sub, client_id) maps to the same key whatever characters
    either holds; ``sub`` is stringified (a numeric ``sub`` is the same user as its text).
    """
    return orjson.dumps([str(sub), client_id or None]).decode()


def _legacy_write_checkpoint_key(key: str) -> str:
    try:
        sub, client_id = orjson.loads(key)
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return key
    return f"{sub}/{client_id}" if client_id else str(sub)


def _lua(name: str) -> str:
    return (Path(__file__).parent / name).read_text()


@dataclass(frozen=True, slots=True)
class StoredOp:
    op_id: int
    target: int  # 0 for PUT / REMOVE
    wire: bytes  # the op's JSON as sent to clients

    @property
    def kind(self) -> str:
        i = self.wire.find(b'"op":"') + 6
        return self.wire[i : self.wire.index(b'"', i)].decode()


@dataclass(frozen=True, slots=True)
class BucketState:
    checksum: int  # unsigned 32-bit
    count: int
    last_op: int


LookupRows = dict[str, frozenset[bytes]]
"""Per lookup key, the JSON-encoded value arrays stored under it (see :func:`decode_lookups`)."""


def decode_lookups(raw: LookupRows) -> dict[str, list[tuple[Any, ...]]]:
    """Lookup rows as ``SyncRules.buckets_for_request(lookups=...)`` takes them (sorted, so a
    request resolves to the same bucket order whatever Redis returned)."""
    return {k: [tuple(orjson.loads(v)) for v in sorted(vals)] for k, vals in raw.items()}


@dataclass(slots=True)
class ApplyResult:
    status: str  # "ok" or "stale"
    checkpoint: int = 0
    ops: int = 0
    stale_partition: str | None = None
    stored_offset: int | None = None
    merge_tables: int = 0  # how many tables the store knows to need source rows


@dataclass(slots=True)
class PlannedBatch:
    """What one atomic apply needs; built by :mod:`pipeline.core` (pure)."""

    events: list[dict[str, Any]] = field(default_factory=list)
    guard: dict[str, int] = field(default_factory=dict)  # tp -> lowest offset
    offsets: dict[str, int] = field(default_factory=dict)  # tp -> highest offset
    #: connector (source.name) -> highest PostgreSQL LSN of the batch's events
    source_lsn: dict[str, int] = field(default_factory=dict)
    #: tables (topics) newly known to need stored source rows (see core.plan_batch)
    merge_tables: list[str] = field(default_factory=list)


_B = b"$%d\r\n%b\r\n"
_B2 = _B * 2
_B3 = _B * 3
_B4 = _B * 4
_B6 = _B * 6


def apply_payload(prefix: str, batch: PlannedBatch, maxlen: int) -> tuple[int, bytes]:
    """``apply_batch.lua``'s arguments, already in the wire protocol (RESP bulk strings):
    the prefix, a small JSON header (offset guard, offsets, LSNs, merge tables) and the
    events as flat raw strings (the script's header comment has the layout), so the script
    decodes no JSON per event. Returns (number of arguments, their encoding).

    Packed here rather than by the client library: a batch has ~17 arguments per event,
    and redis-py packs each one in Python (~20 us per event, measured)."""
    head = orjson.dumps(
        {
            "guard": batch.guard,
            "offsets": batch.offsets,
            "source_lsn": batch.source_lsn or None,
            "merge_tables": batch.merge_tables,
            "maxlen": maxlen,
        }
    )
    pre = prefix.encode()
    parts = [_B2 % (len(pre), pre, len(head), head)]
    add = parts.append
    n = 2
    for ev in batch.events:
        outs = ev.get("o")
        if outs is False:
            k, t = ev["k"].encode(), ev["t"].encode()
            add(_B4 % (1, b"D", len(k), k, len(t), t, 1, b"1" if ev.get("g") else b"0"))
            n += 4
        elif outs is None:
            t = ev["truncate"].encode()
            add(_B2 % (1, b"X", len(t), t))
            n += 2
        else:
            k, t = ev["k"].encode(), ev["t"].encode()
            src = ev.get("s")
            sb = src.encode() if src else b""
            lk = ev.get("l")
            lb = b"" if lk is None else orjson.dumps(lk)
            cnt = b"%d" % len(outs)
            add(_B6 % (1, b"U", len(k), k, len(t), t, len(sb), sb, len(lb), lb, len(cnt), cnt))
            n += 6
            for o in outs:
                bk, ot, oid, tail = o[0].encode(), o[1].encode(), o[2].encode(), o[5]
                if type(tail) is str:
                    tail = tail.encode()
                cs, rcs = b"%d" % o[3], b"%d" % o[4]
                add(
                    _B6
                    % (
                        len(bk),
                        bk,
                        len(ot),
                        ot,
                        len(oid),
                        oid,
                        len(cs),
                        cs,
                        len(rcs),
                        rcs,
                        len(tail),
                        tail,
                    )
                )
                n += 6
    return n, b"".join(parts)


def parse_member(member: bytes, score: float) -> StoredOp:
    first = member[:1]
    if first == b"T":  # MOVE / CLEAR: T<target>|<wire>
        bar = member.index(b"|")
        return StoredOp(int(score), int(member[1:bar]), member[bar + 1 :])
    if first == b"R":  # a PUT written before 2026-12: R<len>:<row key><wire>
        colon = member.index(b":")
        return StoredOp(int(score), 0, member[colon + 1 + int(member[1:colon]) :])
    return StoredOp(int(score), 0, member)  # PUT / REMOVE: the wire JSON itself


def is_put(member: bytes) -> bool:
    """Is this stored op log member a PUT (untagged ``{"op_id":"<id>","op":"PUT",...``, or
    the older ``R<len>:<row key>`` form)?"""
    if member[:1] == b"R":
        return True
    i = member.find(b'","op":"', 9, 40)
    return i > 0 and member[i + 8 : i + 11] == b"PUT"


class Store:
    """Async access to one deployment's keys (prefix)."""

    def __init__(self, client: aioredis.Redis, prefix: str, *, changes_maxlen: int = 10_000):
        self.r = client
        self.prefix = prefix
        self.changes_maxlen = changes_maxlen
        self._apply_lua = _lua("apply_batch.lua")
        self._apply_sha = hashlib.sha1(self._apply_lua.encode()).hexdigest().encode()
        self._compact = client.register_script(_lua("compact_step.lua"))
        self._notify = client.register_script(_NOTIFY_LUA)
        self._defrag = client.register_script(_lua("defrag_step.lua"))
        self._read_with_lookups = client.register_script(_READ_WITH_LOOKUPS_LUA)
        self._read_with_lookups_packed = client.register_script(_READ_WITH_LOOKUPS_PACKED_LUA)
        self._issue_wcp = client.register_script(_ISSUE_WCP_LUA)

    @classmethod
    def from_url(cls, url: str, prefix: str, **kw: Any) -> Store:
        return cls(aioredis.Redis.from_url(url, decode_responses=False), prefix, **kw)

    async def close(self) -> None:
        await self.r.aclose()  # type: ignore[attr-defined]

    def k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # ---- write side -------------------------------------------------------

    async def apply(self, batch: PlannedBatch) -> ApplyResult:
        n, body = apply_payload(self.prefix, batch, self.changes_maxlen)
        sha = self._apply_sha
        command = b"*%d\r\n$7\r\nEVALSHA\r\n$%d\r\n%b\r\n$1\r\n0\r\n" % (n + 3, len(sha), sha)
        try:
            res = await self._send_packed(command + body)
        except NoScriptError:  # a restarted or flushed Redis: load the script, once
            await self.r.script_load(self._apply_lua)
            res = await self._send_packed(command + body)
        status = res[0].decode() if isinstance(res[0], bytes) else res[0]
        if status == "stale":
            return ApplyResult("stale", stale_partition=res[1].decode(), stored_offset=int(res[2]))
        return ApplyResult("ok", checkpoint=int(res[1]), ops=int(res[2]), merge_tables=int(res[3]))

    async def _send_packed(self, command: bytes) -> Any:
        """Send one command already in the wire protocol on a pooled connection and read
        its reply (a connection that failed mid-way is dropped, never reused)."""
        pool = self.r.connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(command)
            return await conn.read_response()
        except ResponseError:
            raise  # an error reply: the connection is in sync
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)

    async def applied_offsets(self) -> dict[str, int]:
        raw = await self.r.hgetall(self.k("offsets"))
        return {k.decode(): int(v) for k, v in raw.items()}

    async def merge_tables(self) -> set[str]:
        """Tables (topics) whose rows keep their source row for merges."""
        return {m.decode() for m in await self.r.smembers(self.k("merge_tables"))}

    async def applied_source_lsns(self) -> dict[str, int]:
        """Highest applied PostgreSQL LSN per connector (``P:source_lsn``)."""
        raw = await self.r.hgetall(self.k("source_lsn"))
        return {k.decode(): int(v) for k, v in raw.items()}

    async def source_rows(self, row_keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Stored source rows (for merging TOAST placeholders and partial updates)."""
        if not row_keys:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for rk in row_keys:
            pipe.hget(self.k("row", rk), "")
        out: dict[str, dict[str, Any]] = {}
        for rk, val in zip(row_keys, await pipe.execute(), strict=True):
            if val is not None:
                out[rk] = orjson.loads(val)
        return out

    async def departed_rows(self, row_keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Source rows kept after the delete half of a primary-key change (one day)."""
        if not row_keys:
            return {}
        vals = await self.r.mget([self.k("gone", rk) for rk in row_keys])
        return {rk: orjson.loads(v) for rk, v in zip(row_keys, vals, strict=True) if v is not None}

    async def count_dead_letter(self, reason: str) -> None:
        await self.r.hincrby(self.k("dl", "count"), reason, 1)

    # ---- read side (gateway) ---------------------------------------------

    async def checkpoint(self) -> int:
        v = await self.r.get(self.k("checkpoint"))
        return int(v) if v else 0

    async def read_checkpoint(self, buckets: Sequence[str]) -> tuple[int, dict[str, BucketState]]:
        """The checkpoint and the state of ``buckets`` in one atomic step (invariant 5)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.get(self.k("checkpoint"))
        for b in buckets:
            pipe.hmget(self.k("bucket", b), "checksum", "count", "last_op")
        res = await pipe.execute()
        cp = int(res[0]) if res[0] else 0
        states = {}
        for b, (cs, n, last) in zip(buckets, res[1:], strict=True):
            states[b] = BucketState(int(cs or 0), int(n or 0), int(last or 0))
        return cp, states

    async def read_lookups(self, keys: Sequence[str]) -> LookupRows:
        """The value arrays stored under each lookup key, in one round trip (not atomic
        with anything: confirm with :meth:`read_checkpoint_with_lookups`)."""
        if not keys:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for key in keys:
            pipe.hkeys(self.k("lookup", key))
        res = await pipe.execute()
        return {key: frozenset(vals) for key, vals in zip(keys, res, strict=True)}

    async def read_checkpoint_with_lookups(
        self, buckets: Sequence[str], keys: Sequence[str]
    ) -> tuple[int, dict[str, BucketState], LookupRows]:
        """The checkpoint, the state of ``buckets`` and the lookup rows of ``keys``, all in
        one atomic step: when the lookup rows equal those the bucket set was computed from,
        that bucket set is exactly the one at this checkpoint."""
        if len(buckets) > 16 and not any("\n" in b or not b for b in buckets):
            res = await self._read_with_lookups_packed(
                args=[self.prefix, "\n".join(buckets), *keys]
            )
            vals = res[1].split()
            states = {
                b: BucketState(int(vals[i]), int(vals[i + 1]), int(vals[i + 2]))
                for b, i in zip(buckets, range(0, 3 * len(buckets), 3), strict=True)
            }
            return (
                int(res[0]),
                states,
                {k: frozenset(v) for k, v in zip(keys, res[2:], strict=True)},
            )
        res = await self._read_with_lookups(args=[self.prefix, len(buckets), *buckets, *keys])
        cp = int(res[0])
        flat = res[1]
        states = {
            b: BucketState(int(flat[i]), int(flat[i + 1]), int(flat[i + 2]))
            for b, i in zip(buckets, range(0, 3 * len(buckets), 3), strict=True)
        }
        lookups = {key: frozenset(v) for key, v in zip(keys, res[2:], strict=True)}
        return cp, states, lookups

    async def read_ops(self, bucket: str, after: int, upto: int, limit: int) -> list[StoredOp]:
        """Ops with ``after < op_id <= upto``, ascending, at most ``limit``."""
        rows = await self.r.zrangebyscore(
            self.k("ops", bucket), f"({after}", upto, start=0, num=limit, withscores=True
        )
        return [parse_member(m, s) for m, s in rows]

    async def all_ops(self, bucket: str) -> list[StoredOp]:
        rows = await self.r.zrange(self.k("ops", bucket), 0, -1, withscores=True)
        return [parse_member(m, s) for m, s in rows]

    async def snapshot_bucket(self, bucket: str) -> tuple[list[StoredOp], BucketState]:
        """A bucket's whole log and its running totals, read in one atomic step."""
        pipe = self.r.pipeline(transaction=True)
        pipe.zrange(self.k("ops", bucket), 0, -1, withscores=True)
        pipe.hmget(self.k("bucket", bucket), "checksum", "count", "last_op")
        rows, (cs, n, last) = await pipe.execute()
        ops = [parse_member(m, s) for m, s in rows]
        return ops, BucketState(int(cs or 0), int(n or 0), int(last or 0))

    async def bucket_state(self, bucket: str) -> BucketState:
        _, states = await self.read_checkpoint([bucket])
        return states[bucket]

    async def changes_tail(self) -> tuple[bytes, int]:
        """Id and sequence number of the newest change entry (start reading after it)."""
        res = await self.r.xrevrange(self.k("changes"), count=1)
        if not res:
            return b"0-0", 0
        return res[0][0], int(res[0][1].get(b"n", 0))

    async def read_changes(
        self, last_id: bytes, block_ms: int, count: int = 500
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        res = await self.r.xread({self.k("changes"): last_id}, count=count, block=block_ms)
        if not res:
            return []
        return list(res[0][1])

    async def changes_first_id(self) -> bytes | None:
        res = await self.r.xrange(self.k("changes"), count=1)
        return res[0][0] if res else None

    # ---- write checkpoints --------------------------------------------------

    async def issue_write_checkpoint(self, key: str, position: Mapping[str, int]) -> int:
        """Next id for ``key`` (from :func:`write_checkpoint_key`), bound to ``position``."""
        keys = [self.k("wcp", key), self.k("wcp", _legacy_write_checkpoint_key(key))]
        wid = int(await self._issue_wcp(keys=keys, args=[orjson.dumps(dict(position))]))
        await self._notify(args=[self.prefix, self.changes_maxlen, "w", key])
        return wid

    async def write_checkpoints(self, key: str) -> dict[int, dict[str, int]]:
        raw = await self.r.hgetall(self.k("wcp", key))
        out = {}
        for f, v in raw.items():
            if f.startswith(b"pos:"):
                out[int(f[4:])] = orjson.loads(v)
        return out

    async def forget_write_checkpoints(self, key: str, upto: int) -> None:
        fields = [f"pos:{i}" for i in (await self.write_checkpoints(key)) if i < upto]
        if fields:
            await self.r.hdel(self.k("wcp", key), *fields)

    # ---- compaction ---------------------------------------------------------

    async def dirty_buckets(self) -> list[str]:
        return sorted(m.decode() for m in await self.r.smembers(self.k("dirty")))

    async def take_dirty(self, bucket: str) -> None:
        await self.r.srem(self.k("dirty"), bucket)

    async def compact_step(self, bucket: str, chunk: int) -> tuple[int, int, bool, float]:
        t0 = time.perf_counter()
        folded, freed, more = await self._compact(args=[self.prefix, bucket, chunk])
        return int(folded), int(freed), bool(more), time.perf_counter() - t0

    async def defrag_step(
        self, bucket: str, chunk: int, cursor: int, cutoff: int
    ) -> tuple[int, int, bool, float]:
        t0 = time.perf_counter()
        moved, new_cursor, done = await self._defrag(
            args=[self.prefix, bucket, chunk, cursor, cutoff, self.changes_maxlen]
        )
        return int(moved), int(new_cursor), bool(done), time.perf_counter() - t0

    async def live_share(self, bucket: str, chunk: int = 5000) -> tuple[int, int]:
        """(PUT ops, all ops) of a bucket, counted in bounded reads."""
        k = self.k("ops", bucket)
        start, puts, total = 0, 0, 0
        while True:
            rows = await self.r.zrange(k, start, start + chunk - 1)
            if not rows:
                return puts, total
            puts += sum(1 for m in rows if is_put(m))
            total += len(rows)
            start += chunk

    async def all_buckets(self) -> list[str]:
        pat = self.k("bucket", "*")
        cut = len(self.k("bucket", ""))
        out = []
        async for key in self.r.scan_iter(match=pat, count=1000):
            out.append(key.decode()[cut:])
        return sorted(out)

    async def stored_totals(self, buckets: Iterable[str]) -> dict[str, BucketState]:
        blist = list(buckets)
        _, states = await self.read_checkpoint(blist)
        return states

    async def ping(self) -> bool:
        return bool(await self.r.ping())
