"""The Redis op-log store. The only module that knows Redis key names and Lua scripts.

Layout under the configured prefix ``P`` (docs/store.md has the long form):

- ``P:ops:{bucket}``     sorted set, score = op_id, member = the op's wire JSON; MOVE/CLEAR
                         behind a tag ``T<target>|`` (target = the op that superseded it).
                         PUTs of stores written before 2026-12 may carry ``R<len>:<row key>``
                         in front (still read). Tags are never sent to clients.
- ``P:states``          hash: bucket -> its state ``"checksum count last_op moved"``
                         (checksum: unsigned running total; moved: MOVEs since the last
                         compaction). One hash for all buckets, so a connection's 1,000
                         states are one HMGET.
- ``P:ri:{table}:{slot}`` hash (the row index; :func:`row_slot`: ``ROW_SLOTS`` hashes per
                         table, field = the row key without its table) -> one packed string
                         per row: a flag digit (1: a source row copy, 2: lookup entries, 3:
                         both) then per output ``\x1e<entry field>\x1d<op_id>:<checksum>:
                         <remove checksum>`` (:func:`entry_field`). TRUNCATE walks the slots.
- ``P:src:{table}:{slot}`` hash: same field -> the source row JSON (for TOAST / partial-update
                         merges; under ``source_rows: auto`` only rows that can need one).
- ``P:rl:{table}:{slot}`` hash: same field -> the row's lookup entries (JSON ``[[lookup,
                         values], ...]``, rows of tables read by parameter queries only).
- ``P:seq``              op_id sequence.   ``P:checkpoint``  current checkpoint.
- ``P:offsets``          hash ``topic/partition`` -> last applied offset.
- ``P:source_lsn``       hash connector (``source.name``) -> highest applied PostgreSQL LSN
                         (``source.lsn``), never lowered; also announced in the change
                         entry's ``o`` as ``lsn:<connector>`` (exact write checkpoints).
- ``P:changes``          stream: one entry per applied batch (cp, changed buckets ``b``, lookup
                         keys whose value sets changed ``l``, offsets ``o``).
- ``P:merge_tables``     set of tables (topics) whose events showed they need merges.
- ``P:tx_done``          zset: the latest source transactions applied whole (score: op
                         sequence), so a restarted processor knows their replays.
- ``P:active:{group}``   transaction mode: token of the group's active processor (TTL;
                         ``ActiveLease``).
- ``P:dirty``            set of buckets with MOVEs since their last compaction.
- ``P:reloc:{bucket}``   hash: a row index entry's op id -> the live copy defragmentation
                         re-appended, and ``~<copy id>`` -> that op id back (a copy moved
                         again replaces its entry: no chains); the apply step follows them.
- ``P:relocated``        set of buckets that have a ``P:reloc:{bucket}``.
- ``P:ri_epoch``         bumped by every TRUNCATE: processors empty their row cache
                         (:class:`RowCache`) when it changes.
- ``P:gone:{row key}``   source row of a row deleted by a primary-key change (expires in a
                         day): the create half may need it to fill TOAST placeholders.
- ``P:wcp:{key}``        hash: write-checkpoint ``id`` and ``pos:<id>`` -> position JSON; the
                         key is ``write_checkpoint_key(sub, client_id)``, the JSON array
                         ``[sub, client_id]`` (unambiguous, unlike ``sub/client_id``: sub ``p``
                         with client ``q/r`` and sub ``p/q`` with client ``r`` differ).
- ``P:dl:count``         hash ``reason`` -> dead letters (informational).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, NotRequired, TypedDict

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from pipeline.rowindex import ROW_SLOTS as ROW_SLOTS
from pipeline.rowindex import SEP as SEP
from pipeline.rowindex import Resolution, StoredRow, resolve, stored_row_ids
from pipeline.rowindex import entry_field as entry_field
from pipeline.rowindex import row_slot as row_slot

log = logging.getLogger("bucketsync.store")

if TYPE_CHECKING:
    from bucketsync.config import Settings

# Every change entry carries a gap-free sequence number "n", so a reader can tell
# that entries it never saw were trimmed away.
_NOTIFY_LUA = """
local n = redis.call("INCR", ARGV[1] .. ":changes:n")
redis.call("XADD", ARGV[1] .. ":changes", "MAXLEN", "~", ARGV[2], "*", "n", n, ARGV[3], ARGV[4])
return n
"""


# The checkpoint, bucket states and lookup rows in one atomic step and one command:
# ARGV = prefix, n buckets, buckets..., lookup keys...; the states come back as HMGET's
# array (false for a bucket without one). For bucket names that cannot be packed.
_READ_WITH_LOOKUPS_LUA = """
local P, nb = ARGV[1], tonumber(ARGV[2])
local flat = {}
for i = 1, nb, 1000 do
  local v = redis.call("HMGET", P .. ":states", unpack(ARGV, 2 + i, 2 + math.min(nb, i + 999)))
  for j = 1, #v do flat[#flat + 1] = v[j] end
end
local out = {redis.call("GET", P .. ":checkpoint") or "0", flat}
for i = 3 + nb, #ARGV do
  out[#out + 1] = redis.call("HKEYS", P .. ":lookup:" .. ARGV[i])
end
return out
"""


# The same, packed for large bucket sets: ARGV = prefix, buckets joined by "\n", keys...;
# the states come back as one string "checksum count last_op moved ..." (one argument and
# one reply string instead of one per bucket: redis-py packs and parses 1,000 buckets ~10x
# faster). All states are in one hash (P:states), so 1,000 buckets are one HMGET.
_READ_WITH_LOOKUPS_PACKED_LUA = """
local P = ARGV[1]
local names, parts = {}, {}
for b in string.gmatch(ARGV[2], "[^\\n]+") do names[#names + 1] = b end
for i = 1, #names, 1000 do
  local v = redis.call("HMGET", P .. ":states", unpack(names, i, math.min(#names, i + 999)))
  for j = 1, #v do parts[#parts + 1] = v[j] or "0 0 0 0" end
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
# The end of every apply (inside its MULTI/EXEC, after the batch's plain writes): the parts
# that depend on what Redis holds at that moment. ARGV:
#   [1] prefix, [2] changes maxlen, [3] checkpoint, [4] changed buckets JSON ("" if none),
#   [5] offsets JSON, [6] source LSNs JSON ("" if none), [7] number L of lookup changes,
#   then L x (lookup key, values JSON, +1/-1), then buckets whose P:reloc:<bucket> may have
#   emptied.
# - P:source_lsn: highest applied PostgreSQL LSN per connector, never lowered; announced
#   with the offsets as "lsn:<connector>" (exact write checkpoints compare against it);
# - P:lookup:<key>: values JSON -> number of rows contributing it; a key whose value set
#   changed over the batch (a value appeared or vanished) is announced ("l");
# - the change entry, with its gap-free sequence number "n".
_APPLY_END_LUA = """
local P = ARGV[1]
local offsets = ARGV[5]
if ARGV[6] ~= "" then
  local o = cjson.decode(offsets)
  for name, lsn in pairs(cjson.decode(ARGV[6])) do
    local cur = tonumber(redis.call("HGET", P .. ":source_lsn", name) or "-1")
    if lsn > cur then
      cur = lsn
      redis.call("HSET", P .. ":source_lsn", name, string.format("%d", lsn))
    end
    o["lsn:" .. name] = string.format("%d", cur)
  end
  offsets = cjson.encode(o)
end
local nl = tonumber(ARGV[7])
local counts, order = {}, {}
for i = 8, 7 + 3 * nl, 3 do
  local key, values, delta = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local k = P .. ":lookup:" .. key
  local now = redis.call("HINCRBY", k, values, delta)
  if now <= 0 then
    redis.call("HDEL", k, values)
  end
  local id = key .. "\31\31" .. values
  local c = counts[id]
  if not c then
    c = {key, now - delta, now}
    counts[id] = c
    order[#order + 1] = id
  end
  c[3] = now
end
for i = 8 + 3 * nl, #ARGV do
  if redis.call("EXISTS", P .. ":reloc:" .. ARGV[i]) == 0 then
    redis.call("SREM", P .. ":relocated", ARGV[i])
  end
end
local note = {"n", redis.call("INCR", P .. ":changes:n"), "cp", ARGV[3]}
if ARGV[4] ~= "" then
  note[#note + 1] = "b"
  note[#note + 1] = ARGV[4]
end
local seen, keys = {}, {}
for _, id in ipairs(order) do
  local c = counts[id]
  if (c[2] > 0) ~= (c[3] > 0) and not seen[c[1]] then
    seen[c[1]] = true
    keys[#keys + 1] = c[1]
  end
end
if #keys > 0 then
  table.sort(keys)
  note[#note + 1] = "l"
  note[#note + 1] = cjson.encode(keys)
end
note[#note + 1] = "o"
note[#note + 1] = offsets
redis.call("XADD", P .. ":changes", "MAXLEN", "~", ARGV[2], "*", unpack(note))
return 1
"""


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


def parse_state(value: bytes | None) -> BucketState:
    """A ``P:states`` field (``b"checksum count last_op moved"``; none: an empty bucket)."""
    if not value:
        return BucketState(0, 0, 0)
    cs, n, last = value.split()[:3]
    return BucketState(int(cs), int(n), int(last))


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


# ---- the events of a planned batch (pipeline/rowindex.py resolves them) ----

#: one output of a row: [bucket, object_type, object_id, put_checksum, remove_checksum, tail]
OutputEntry = list[Any]


class RowChange(TypedDict):
    """A row after an insert or update: its complete set of outputs and its source row."""

    k: str
    t: str
    o: list[OutputEntry]
    s: str | Literal[False]
    l: NotRequired[list[list[str]]]  # noqa: E741 (the wire key)


class RowDelete(TypedDict):
    """A deleted row; ``g``: the delete half of a primary-key change (the store keeps the
    old source row a while, ``P:gone:<row key>``)."""

    k: str
    t: str
    o: Literal[False]
    s: Literal[False]
    g: NotRequired[bool]


class TableTruncate(TypedDict):
    truncate: str


BatchEvent = RowChange | RowDelete | TableTruncate


def row_change(
    row_key: str,
    table: str,
    outputs: list[OutputEntry],
    source: str | Literal[False],
    lookups: list[list[str]] | None = None,
) -> RowChange:
    """``source`` False keeps no stored copy of the source row; ``lookups`` (rows of
    tables read by parameter queries) is the row's complete set of lookup entries."""
    ev: RowChange = {"k": row_key, "t": table, "o": outputs, "s": source}
    if lookups is not None:
        ev["l"] = lookups
    return ev


def row_delete(row_key: str, table: str, *, pk_change: bool = False) -> RowDelete:
    return {"k": row_key, "t": table, "o": False, "s": False, "g": pk_change}


def table_truncate(table: str) -> TableTruncate:
    return {"truncate": table}


@dataclass(slots=True)
class PlannedBatch:
    """What one atomic apply needs; built by :mod:`pipeline.core` (pure)."""

    events: list[BatchEvent] = field(default_factory=list)
    guard: dict[str, int] = field(default_factory=dict)  # tp -> lowest offset
    offsets: dict[str, int] = field(default_factory=dict)  # tp -> highest offset
    #: connector (source.name) -> highest PostgreSQL LSN of the batch's events
    source_lsn: dict[str, int] = field(default_factory=dict)
    #: tables (topics) newly known to need stored source rows (see core.plan_batch)
    merge_tables: list[str] = field(default_factory=list)
    #: source transactions the batch completes (kafka.consistency: transaction)
    done_txs: list[str] = field(default_factory=list)


class CompactStep(NamedTuple):
    """One ``compact_step.lua`` call on a bucket."""

    #: ops folded into the leading CLEAR (0: nothing left to fold)
    folded: int
    #: bytes of op wire JSON the fold removed
    bytes_freed: int
    #: the leading run may go on past this chunk: call again
    more: bool
    #: wall time of the call, client side
    seconds: float


class DefragStep(NamedTuple):
    """One ``defrag_step.lua`` call on a bucket."""

    #: live PUTs re-appended at the end of the bucket (each old one became a MOVE)
    moved: int
    #: op_id to pass as the next call's cursor (exclusive)
    cursor: int
    #: no live PUT left below the cutoff
    done: bool
    #: wall time of the call, client side
    seconds: float


try:
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _HIREDIS_NOT_ENOUGH
except ImportError:  # redis-py without hiredis (or another layout): replies one by one
    _HIREDIS_NOT_ENOUGH = None


def _resp(*args: bytes) -> bytes:
    """One command in the Redis wire protocol (RESP)."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


def _resp_flat(head: Sequence[bytes], args: Sequence[bytes]) -> bytes:
    """``head`` then ``args`` as one command (variadic ZADD/HSET/HDEL)."""
    parts = [b"*%d\r\n" % (len(head) + len(args))]
    parts.extend(b"$%d\r\n%b\r\n" % (len(a), a) for a in head)
    parts.extend(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)
    return b"".join(parts)


def parse_member(member: bytes, score: float) -> StoredOp:
    first = member[:1]
    if first == b"T":  # MOVE / CLEAR: T<target>|<wire>
        bar = member.index(b"|")
        return StoredOp(int(score), int(member[1:bar]), member[bar + 1 :])
    if first == b"R":  # a PUT written before 2026-12: R<len>:<row key><wire>
        colon = member.index(b":")
        return StoredOp(int(score), 0, member[colon + 1 + int(member[1:colon]) :])
    return StoredOp(int(score), 0, member)  # PUT / REMOVE: the wire JSON itself


def parse_score(raw: bytes) -> int:
    """An op id as Redis returns a member's score (``b"42"``; ``%.17g`` may use an exponent)."""
    try:
        return int(raw)
    except ValueError:
        return int(float(raw))


def parse_members(flat: Sequence[bytes]) -> list[StoredOp]:
    """``[member, score, ...]`` (:meth:`Store.read_ops_raw`) as :class:`StoredOp` s."""
    return [parse_member(m, parse_score(s)) for m, s in zip(flat[0::2], flat[1::2], strict=True)]


def is_put(member: bytes) -> bool:
    """Is this stored op log member a PUT (untagged ``{"op_id":"<id>","op":"PUT",...``, or
    the older ``R<len>:<row key>`` form)?"""
    if member[:1] == b"R":
        return True
    i = member.find(b'","op":"', 9, 40)
    return i > 0 and member[i + 8 : i + 11] == b"PUT"


_LEASE_LUA = """
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_LEASE_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


#: the key layout the apply step writes (``P:layout``). 3: the row index in
#: ``P:ri:<table>:<slot>`` hashes (one packed string per row; source rows and lookup
#: entries in ``P:src:`` / ``P:rl:``), no table sets. 2: a ``P:row:{row key}`` hash per row
#: and ``P:table:{table}`` sets. Both: bucket states in one hash (``P:states``), untagged PUT
#: members, relocations in ``P:reloc:{bucket}``. A store with ops but no marker was written
#: by layout 1 (a hash per bucket, tagged PUTs).
STORE_LAYOUT = "3"
#: completed source transactions kept in ``P:tx_done`` (the stager remembers as many)
TX_DONE_KEEP = 10_000


#: Redis encoding thresholds this store is sized for (the deployment's ``redis.conf``; `bucketsync
#: stack up`, docker-compose and the benchmarks' private servers use them). With Redis's
#: defaults (64-byte members, 128 entries) every op log is a skiplist + dict, ~150 bytes per
#: op beyond its wire JSON; op members are ~200 bytes of wire JSON, so these keep a bucket of
#: up to 256 ops (and a row-index hash of up to 256 rows) a listpack: ~35 bytes per op.
#: Larger buckets convert to a skiplist as before. docs/store.md, "Redis settings".
REDIS_ENCODING: dict[str, str] = {
    "zset-max-listpack-entries": "256",
    "zset-max-listpack-value": "4096",
    "hash-max-listpack-entries": "256",
    "hash-max-listpack-value": "4096",
}


def redis_encoding_args() -> list[str]:
    """:data:`REDIS_ENCODING` as ``redis-server`` command-line options."""
    return [a for k, v in REDIS_ENCODING.items() for a in (f"--{k}", v)]


class StoreLayoutMismatch(Exception):
    """The prefix holds a store of another key layout (see :func:`check_layout`)."""

    def __init__(self, prefix: str, found: str) -> None:
        super().__init__(
            f"the Redis keys under prefix {prefix!r} were written by an older bucketsync "
            f"(store layout {found}; this version writes layout {STORE_LAYOUT}: the row index "
            "in slot hashes, bucket states in one hash, untagged ops). The store is rebuilt "
            "from Kafka: set redis.prefix "
            f"to a new value, or delete the keys {prefix}:* (then the processor re-applies "
            "every retained event)"
        )
        self.prefix = prefix
        self.found = found


def check_layout(url: str, prefix: str) -> None:
    """Raise :class:`StoreLayoutMismatch` when ``prefix`` holds ops of another layout; an
    empty prefix is fine (the first batch marks it)."""
    import redis

    r = redis.Redis.from_url(url)
    try:
        layout, seq = r.get(f"{prefix}:layout"), r.exists(f"{prefix}:seq")
    finally:
        r.close()
    found = found_layout(layout, bool(seq))
    if found != STORE_LAYOUT:
        raise StoreLayoutMismatch(prefix, found)


def found_layout(marker: Any, has_ops: bool) -> str:
    """The layout a prefix holds, from its ``P:layout`` marker and whether it has ops
    (``P:seq``): the marker; else layout 1 if it has ops; an empty prefix is this layout."""
    if isinstance(marker, bytes):
        return marker.decode()
    if isinstance(marker, str):
        return marker
    return "1" if has_ops else STORE_LAYOUT


def drop_prefix(url: str, prefix: str) -> int:
    """Delete every key under ``prefix:`` (a store to rebuild from Kafka); returns how many."""
    import redis

    r = redis.Redis.from_url(url)
    n = 0
    try:
        batch: list[bytes] = []
        for key in r.scan_iter(match=f"{prefix}:*", count=5000):
            batch.append(key)
            if len(batch) >= 1000:
                n += int(r.unlink(*batch))
                batch = []
        if batch:
            n += int(r.unlink(*batch))
    finally:
        r.close()
    return n


class ActiveLease:
    """``P:active:{group}``: which processor of a consumer group is the active one, for
    ``kafka.consistency: transaction`` (a transaction's events and its END marker lie in
    different partitions, so one processor must read them all; the others wait). The value
    is the holder's token (its static group instance id, so a restarted processor takes its
    own lease back at once), with a TTL the holder keeps renewing. Synchronous: it is held
    from a thread of its own, outside the processor's event loop."""

    def __init__(self, url: str, prefix: str, group_id: str, token: str, ttl_ms: int) -> None:
        import redis

        self.r = redis.Redis.from_url(url, socket_timeout=max(1.0, ttl_ms / 3000))
        self.key = f"{prefix}:active:{group_id}"
        self.token = token
        self.ttl_ms = ttl_ms
        self._take = self.r.register_script(_LEASE_LUA)
        self._drop = self.r.register_script(_LEASE_RELEASE_LUA)

    def take(self) -> bool:
        """Acquire or renew: true while this token holds the lease."""
        return bool(self._take(keys=[self.key], args=[self.token, self.ttl_ms]))

    def holder(self) -> str | None:
        v = self.r.get(self.key)
        return v.decode() if isinstance(v, bytes) else None

    def release(self) -> None:
        self._drop(keys=[self.key], args=[self.token])
        self.r.close()


class RowCache:
    """The row index entries of the rows a processor applies (its partitions' rows: a row
    belongs to one partition, so one processor writes its entries), kept so a batch reads
    only the rows it has not seen. Bounded (:attr:`limit` rows; the oldest go first); a
    miss is read from Redis. Cleared whenever another writer may have touched the rows:
    partitions assigned or revoked, a stale batch, a store outage, another processor's
    TRUNCATE (``P:ri_epoch``). ``seq``: the op sequence this processor last saw."""

    def __init__(self, limit: int = 500_000) -> None:
        self.limit = limit
        self.rows: dict[str, StoredRow | None] = {}
        self.seq: int | None = None
        self.epoch: int | None = None
        self.invalid = False

    def clear(self) -> None:
        self.rows.clear()
        self.seq = None

    def invalidate(self) -> None:
        """Empty the cache before the next batch is resolved. Safe from another thread (the
        kafka driver's rebalance callbacks run in its consume thread while a batch may be
        in flight on the event loop); a batch in flight then still stores its rows, and
        they go too."""
        self.invalid = True

    def update(self, rows: Mapping[str, StoredRow | None]) -> None:
        cache = self.rows
        cache.update(rows)
        excess = len(cache) - self.limit
        if excess > 0:
            drop = max(excess, self.limit // 10)
            for rk in list(itertools.islice(cache, drop)):
                del cache[rk]


class Store:
    """Async access to one deployment's keys (prefix).

    ``reader``: a read-only replica of ``client`` (the gateway's ``redis.replica_urls``).
    The read side (every method under "read side" and :meth:`write_checkpoints`) then reads
    only from it; the write side and the processor's reads stay on ``client``. A replica is
    always at a batch boundary: an apply is one MULTI/EXEC, a compaction or defragmentation
    step one Lua script, and Redis 7 replicates a script's effects as one MULTI/EXEC, so a
    replica never shows part of one (``tests/test_replica.py`` checks it). Reading all of a gateway's
    state from the one replica keeps what it serves consistent: a change entry it read there
    means that replica holds the ops and states of that checkpoint.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        *,
        changes_maxlen: int = 10_000,
        reader: aioredis.Redis | None = None,
    ):
        self.r = client
        #: where the gateway's reads go: the replica, or ``client`` itself
        self.rr = reader if reader is not None else client
        self.replica = reader is not None
        #: the replica's client (kept while :meth:`set_reader` points reads at the primary)
        self.replica_client = reader
        self.prefix = prefix
        self.changes_maxlen = changes_maxlen
        self._apply_end_lua = _APPLY_END_LUA.encode()
        #: the row index entries of rows this processor wrote or read (see :class:`RowCache`)
        self.rows = RowCache()
        #: the batch resolved last, at which op sequence and row index epoch (resolved again
        #: if either moved: a TRUNCATE without ops moves the epoch only), with its rendered
        #: writes and encoded buckets (see :meth:`_render_writes`)
        self._resolution: (
            tuple[PlannedBatch, int, int | None, Resolution, list[bytes], list[bytes]] | None
        ) = None
        self._compact = client.register_script(_lua("compact_step.lua"))
        self._notify = client.register_script(_NOTIFY_LUA)
        self._defrag = client.register_script(_lua("defrag_step.lua"))
        self._defrag_scan = client.register_script(_lua("defrag_scan.lua"))
        # read-only scripts: EVALSHA runs on a read-only replica (a write would be refused)
        self._read_with_lookups = self.rr.register_script(_READ_WITH_LOOKUPS_LUA)
        self._read_with_lookups_packed = self.rr.register_script(_READ_WITH_LOOKUPS_PACKED_LUA)
        self._issue_wcp = client.register_script(_ISSUE_WCP_LUA)

    @classmethod
    def from_url(cls, url: str, prefix: str, *, reader_url: str | None = None, **kw: Any) -> Store:
        reader = aioredis.Redis.from_url(reader_url, decode_responses=False) if reader_url else None
        return cls(
            aioredis.Redis.from_url(url, decode_responses=False), prefix, reader=reader, **kw
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, *, prefix: str | None = None, reader_url: str | None = None
    ) -> Store:
        """The store the settings name: ``redis.url``, ``redis.prefix`` (or ``prefix``, for a
        benchmark's own keys) and ``redis.changes_maxlen``; reads from ``reader_url`` (a
        replica) when given. Every process opens its store this way, so no command trims the
        change stream to a length of its own."""
        return cls.from_url(
            settings.redis.url,
            settings.redis.prefix if prefix is None else prefix,
            changes_maxlen=settings.redis.changes_maxlen,
            reader_url=reader_url,
        )

    async def close(self) -> None:
        await self.r.aclose()  # type: ignore[attr-defined]
        if self.replica_client is not None:
            await self.replica_client.aclose()  # type: ignore[attr-defined]

    def set_reader(self, reader: aioredis.Redis) -> None:
        """Point the read side at ``reader``: the replica, or the primary (``self.r``) while
        the replica is down (``gateway/store_health.py`` decides when, and when back)."""
        self.rr = reader
        # the read-only scripts only: those registered on ``self.r`` write
        self._read_with_lookups = reader.register_script(_READ_WITH_LOOKUPS_LUA)
        self._read_with_lookups_packed = reader.register_script(_READ_WITH_LOOKUPS_PACKED_LUA)

    def k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # ---- write side -------------------------------------------------------

    async def apply(self, batch: PlannedBatch) -> ApplyResult:
        """Apply one planned batch atomically (architecture invariants 1-4).

        The row index is resolved here, in the processor (:func:`pipeline.rowindex.resolve`,
        on rows from :attr:`rows` or read once per batch), and everything is written as plain
        commands in one MULTI/EXEC. WATCH fences it: on ``P:offsets`` (the offset guard: a
        partition applied past this batch's first offset elsewhere makes it stale), ``P:seq``
        (op ids are handed out here: another writer's ops, a defragmentation), ``P:states``
        (bucket totals are computed here: a compaction step) and ``P:ri_epoch`` (a TRUNCATE
        rewrote rows this processor may have cached). The batch is resolved and its writes
        rendered before the WATCH, with the op sequence it last saw, so the fenced window is
        one round trip and the bucket states; when something moved, it is read again
        (resolved again only if the sequence moved), with a short pause after a few misses so
        a compaction run beside it cannot starve it."""
        conn = await self.r.connection_pool.get_connection()
        try:
            attempts = 0
            while True:
                res = await self._apply_once(conn, batch)
                if res is not None:
                    return res
                attempts += 1
                if attempts % 100 == 0:
                    log.warning(
                        "apply: %d attempts, the store keeps changing under the batch "
                        "(another writer or a compaction run on %s)",
                        attempts,
                        self.prefix,
                    )
                if attempts >= 5:  # give the other writer room
                    await asyncio.sleep(min(0.002 * attempts, 0.05))
        except BaseException:
            # mid-way through a WATCH or MULTI: never reuse it. Closing a connection the
            # server reset can raise (ConnectionResetError from wait_closed): the error
            # that matters is the one being raised
            with contextlib.suppress(Exception):
                await conn.disconnect()
            raise
        finally:
            await self.r.connection_pool.release(conn)

    async def _call(self, conn: Any, commands: list[bytes]) -> list[Any]:
        """Send ``commands`` (RESP) at once and read their replies; error replies are
        returned, not raised."""
        await conn.send_packed_command(b"".join(commands), check_health=False)
        out: list[Any] = []
        n = len(commands)
        parser = conn._parser
        reader = getattr(parser, "_reader", None)
        if _HIREDIS_NOT_ENOUGH is not None and reader is not None and hasattr(reader, "gets"):
            # redis-py's hiredis parser, read straight from its reader: a batch has several
            # thousand replies (QUEUED ones inside MULTI) and read_response costs ~3 us each;
            # error replies come back as exception objects, as they do below
            gets = reader.gets
            while len(out) < n:
                r = gets()
                if r is _HIREDIS_NOT_ENOUGH:
                    try:
                        await parser.read_from_socket()
                    except OSError as exc:  # as read_response reports it: a store outage
                        raise RedisConnectionError(f"reading from Redis: {exc}") from exc
                else:
                    out.append(r)
            return out
        for _ in commands:
            try:
                out.append(await conn.read_response())
            except ResponseError as exc:
                out.append(exc)
        return out

    async def _load_rows(
        self, conn: Any, slots: Mapping[str, tuple[str, str]]
    ) -> dict[str, StoredRow | None]:
        """The stored rows (row key -> :func:`row_slot`): from the cache, the others read
        (one round trip; a second one for the lookup entries of rows that have some)."""
        cache = self.rows
        rows = cache.rows
        missing = [rk for rk in slots if rk not in rows]
        out = {rk: rows[rk] for rk in slots if rk in rows}
        if not missing:
            return out
        refs = [slots[rk] for rk in missing]
        ri = self.k("ri", "").encode()
        replies = await self._call(
            conn,
            [
                b"*3\r\n$4\r\nHGET\r\n$%d\r\n%b%b\r\n$%d\r\n%b\r\n"
                % (len(ri) + len(tsb), ri, tsb, len(rfb), rfb)
                for ts, rf in refs
                for tsb, rfb in ((ts.encode(), rf.encode()),)
            ],
        )
        found: dict[str, StoredRow | None] = {}
        need_lookups: list[tuple[str, str, str]] = []
        for rk, (ts, rf), v in zip(missing, refs, replies, strict=True):
            if isinstance(v, Exception):
                raise v
            if v is None:
                found[rk] = None
                continue
            value = v.decode()
            found[rk] = StoredRow(value)
            if value[:1] in ("2", "3"):
                need_lookups.append((rk, ts, rf))
        if need_lookups:
            replies = await self._call(
                conn,
                [
                    _resp(b"HGET", self.k("rl", ts).encode(), rf.encode())
                    for _rk, ts, rf in need_lookups
                ],
            )
            for (rk, _ts, _rf), v in zip(need_lookups, replies, strict=True):
                row = found[rk]
                if row is not None and isinstance(v, bytes):
                    row.lookups = v.decode()
        out.update(found)
        return out

    async def _resolve(self, conn: Any, batch: PlannedBatch, seq: int) -> Resolution:
        """Read what the batch needs beyond the cache and resolve it at ``seq``."""
        events: list[Any] = batch.events
        slots: dict[str, tuple[str, str]] = {}
        crc, mask = zlib.crc32, ROW_SLOTS - 1
        for ev in events:  # row_slot, inlined: it runs for every event
            rk = ev.get("k")
            if rk is None or rk in slots:
                continue
            table = ev["t"]
            n = len(table)
            rf = rk[n + 1 :] if rk.startswith(table) and rk[n : n + 1] == SEP else rk
            slots[rk] = (f"{table}:{crc(rf.encode()) & mask}", rf)
        stored = await self._load_rows(conn, slots)
        # the source rows the delete half of a primary-key change keeps a day (P:gone)
        gone = [
            ev["k"]
            for ev in events
            if ev.get("g") and (r := stored.get(ev["k"])) is not None and r.value
            if r.value[:1] in ("1", "3")
        ]
        if gone:
            refs = [slots[rk] for rk in gone]
            replies = await self._call(
                conn,
                [_resp(b"HGET", self.k("src", ts).encode(), rf.encode()) for ts, rf in refs],
            )
            for rk, v in zip(gone, replies, strict=True):
                row = stored[rk]
                if row is not None and isinstance(v, bytes):
                    stored[rk] = StoredRow(row.value, row.lookups, v.decode())
        truncated: dict[str, dict[str, StoredRow]] = {}
        for ev in events:
            if "truncate" in ev and ev["truncate"] not in truncated:
                truncated[ev["truncate"]] = await self._table_rows(conn, ev["truncate"])
        relocations: dict[str, dict[int, int]] = {}
        (relocated,) = await self._call(conn, [_resp(b"SMEMBERS", self.k("relocated").encode())])
        if relocated:
            names = {m.decode() for m in relocated}
            wanted: dict[str, set[int]] = {}
            rows_seen = list(stored.values()) + [r for t in truncated.values() for r in t.values()]
            for row in rows_seen:
                for b, op_id in stored_row_ids(row):
                    if b in names:
                        wanted.setdefault(b, set()).add(op_id)
            if wanted:
                order = [(b, sorted(ids)) for b, ids in wanted.items()]
                replies = await self._call(
                    conn,
                    [
                        _resp_flat(
                            (b"HMGET", self.k("reloc", b).encode()), [b"%d" % i for i in ids]
                        )
                        for b, ids in order
                    ],
                )
                for (b, ids), vals in zip(order, replies, strict=True):
                    m = {i: int(v) for i, v in zip(ids, vals, strict=True) if v is not None}
                    if m:
                        relocations[b] = m
        return resolve(
            events, stored, seq, truncated_rows=truncated, relocations=relocations, slots=slots
        )

    async def _table_rows(self, conn: Any, table: str) -> dict[str, StoredRow]:
        """Every stored row of ``table`` (a TRUNCATE): its slot hashes, with lookups."""
        slots = [f"{table}:{i}" for i in range(ROW_SLOTS)]
        ri = await self._call(conn, [_resp(b"HGETALL", self.k("ri", ts).encode()) for ts in slots])
        rl = await self._call(conn, [_resp(b"HGETALL", self.k("rl", ts).encode()) for ts in slots])
        out: dict[str, StoredRow] = {}
        for fields, lookups in zip(ri, rl, strict=True):
            flat_l = lookups if isinstance(lookups, list) else []
            lk = {flat_l[i]: flat_l[i + 1] for i in range(0, len(flat_l), 2)}
            flat = fields if isinstance(fields, list) else []
            for i in range(0, len(flat), 2):
                rf = flat[i]
                got = lk.get(rf)
                out[table + SEP + rf.decode()] = StoredRow(
                    flat[i + 1].decode(), got.decode() if got is not None else None
                )
        return out

    def _render_writes(
        self, batch: PlannedBatch, res: Resolution
    ) -> tuple[list[bytes], list[bytes]]:
        """The batch's writes that do not depend on what the fenced read finds (everything
        but the bucket states and the end step), as RESP commands; and the batch's buckets
        encoded (in ``res.deltas`` order). Rendered once per resolution, before the WATCH,
        so the fenced window stays short."""
        k = self.k
        commands: list[bytes] = []
        add = commands.append
        buckets = list(res.deltas)
        encoded = [b.encode() for b in buckets]
        drops = res.drops
        ops_base = k("ops", "").encode()
        n_ops_base = len(ops_base)
        for b, bb in zip(buckets, encoded, strict=True):
            members = res.members[b]  # every bucket with a delta has new ops
            head = b"$%d\r\n%b%b\r\n" % (n_ops_base + len(bb), ops_base, bb)
            for old in drops.get(b, ()):
                score = b"%d" % old
                add(
                    b"*4\r\n$16\r\nZREMRANGEBYSCORE\r\n%b$%d\r\n%b\r\n$%d\r\n%b\r\n"
                    % (head, len(score), score, len(score), score)
                )
            zadd = [b"*%d\r\n$4\r\nZADD\r\n" % (2 + 2 * len(members)), head]
            for op_id, member in members.items():
                score = b"%d" % op_id
                if member[:1] == b"T":  # a MOVE: complete
                    zadd.append(
                        b"$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(score), score, len(member), member)
                    )
                else:  # a new op: its wire JSON after the op_id field
                    zadd.append(
                        b'$%d\r\n%b\r\n$%d\r\n{"op_id":"%b",%b\r\n'
                        % (len(score), score, len(member) + len(score) + 12, score, member)
                    )
            add(b"".join(zadd))
        for kind, writes in (("ri", res.index), ("src", res.sources), ("rl", res.lookups)):
            base = k(kind, "").encode()
            n_base = len(base)
            for ts, rf, v in writes:  # one command per write: most slots get one row
                tsb, rfb = ts.encode(), rf.encode()
                if v is None:
                    add(
                        b"*3\r\n$4\r\nHDEL\r\n$%d\r\n%b%b\r\n$%d\r\n%b\r\n"
                        % (n_base + len(tsb), base, tsb, len(rfb), rfb)
                    )
                else:
                    vb = v.encode()
                    add(
                        b"*4\r\n$4\r\nHSET\r\n$%d\r\n%b%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"
                        % (n_base + len(tsb), base, tsb, len(rfb), rfb, len(vb), vb)
                    )
        for rk, src in res.gone.items():
            add(_resp(b"SET", k("gone", rk).encode(), src.encode(), b"EX", b"86400"))
        for b, dropped in res.reloc_dropped.items():
            add(_resp_flat((b"HDEL", k("reloc", b).encode()), [f.encode() for f in dropped]))
        if batch.merge_tables:
            add(
                _resp_flat(
                    (b"SADD", k("merge_tables").encode()), [t.encode() for t in batch.merge_tables]
                )
            )
        if batch.done_txs:  # the latest TX_DONE_KEEP, for replays after a restart
            score = b"%d" % res.seq
            key = k("tx_done").encode()
            add(
                _resp_flat((b"ZADD", key), [x for t in batch.done_txs for x in (score, t.encode())])
            )
            add(_resp(b"ZREMRANGEBYRANK", key, b"0", b"%d" % -(TX_DONE_KEEP + 1)))
        if batch.offsets:
            add(
                _resp_flat(
                    (b"HSET", k("offsets").encode()),
                    [x for tp, off in batch.offsets.items() for x in (tp.encode(), b"%d" % off)],
                )
            )
        cp = b"%d" % res.seq
        if res.ops:
            add(_resp(b"SET", k("seq").encode(), cp))
        add(_resp(b"SET", k("checkpoint").encode(), cp))
        # the layout these keys follow (STORE_LAYOUT): a processor refuses to apply to a
        # store of another layout instead of mixing two
        add(_resp(b"SET", k("layout").encode(), STORE_LAYOUT.encode()))
        if res.truncated:
            add(_resp(b"INCR", k("ri_epoch").encode()))
        return commands, encoded

    async def _apply_once(self, conn: Any, batch: PlannedBatch) -> ApplyResult | None:
        """One attempt; None when something moved under it (try again)."""
        cache = self.rows
        if cache.invalid:
            cache.invalid = False
            cache.clear()
            self._resolution = None  # it was resolved against the rows just forgotten
        k = self.k
        offsets_key, seq_key, states_key, epoch_key = (
            k("offsets").encode(),
            k("seq").encode(),
            k("states").encode(),
            k("ri_epoch").encode(),
        )
        if cache.seq is None or cache.epoch is None:
            seq_raw, epoch_raw = await self._call(
                conn, [_resp(b"GET", seq_key), _resp(b"GET", epoch_key)]
            )
            if cache.epoch != int(epoch_raw or 0):
                cache.clear()
                cache.epoch = int(epoch_raw or 0)
            cache.seq = int(seq_raw or 0)
        seq, epoch = cache.seq, cache.epoch
        assert seq is not None
        memo = self._resolution
        if memo is not None and memo[3].truncated:
            memo = None  # a TRUNCATE's rows are read again every time, inside the WATCH
        if memo is None or memo[0] is not batch or memo[1] != seq or memo[2] != epoch:
            # resolved against the cache: a cache emptied since (another processor's
            # TRUNCATE moved the epoch, maybe not the sequence) means resolving again
            if any("truncate" in ev for ev in batch.events):
                # a TRUNCATE reads the rows of every partition of its table: other
                # processors write them, and a change that makes no op (a lookup-only row)
                # moves neither P:seq nor this batch's offsets; watched from before the
                # read, any other apply (it writes P:offsets) makes this one read again
                await self._call(
                    conn, [_resp(b"WATCH", offsets_key, seq_key, states_key, epoch_key)]
                )
            res = await self._resolve(conn, batch, seq)
            writes, encoded = self._render_writes(batch, res)
            memo = self._resolution = (batch, seq, epoch, res, writes, encoded)
        _b, _s, _e, res, writes, encoded = memo
        guard = list(batch.guard.items())
        buckets = list(res.deltas)
        reads = [
            _resp(b"WATCH", offsets_key, seq_key, states_key, epoch_key),
            _resp(b"GET", seq_key),
            _resp(b"GET", epoch_key),
        ]
        if guard:
            reads.append(_resp_flat((b"HMGET", offsets_key), [tp.encode() for tp, _ in guard]))
        for i in range(0, len(encoded), 1000):
            reads.append(_resp_flat((b"HMGET", states_key), encoded[i : i + 1000]))
        replies = await self._call(conn, reads)
        for r in replies:
            if isinstance(r, Exception):
                raise r
        now_seq, now_epoch = int(replies[1] or 0), int(replies[2] or 0)
        pos = 3
        if guard:
            for (tp, low), stored in zip(guard, replies[3], strict=True):
                if stored is not None and int(stored) >= low:
                    await self._call(conn, [_resp(b"UNWATCH")])
                    self._resolution = None
                    cache.clear()  # another processor applied these rows
                    return ApplyResult("stale", stale_partition=tp, stored_offset=int(stored))
            pos = 4
        if now_epoch != cache.epoch or now_seq != seq:
            await self._call(conn, [_resp(b"UNWATCH")])
            if now_epoch != cache.epoch:
                cache.clear()
                cache.epoch = now_epoch
            cache.seq = now_seq
            return None
        # the fenced part: from here to EXEC only the bucket states and the end step
        states: list[bytes | None] = [v for part in replies[pos:] for v in part]
        changed: list[bytes] = []
        state_args: list[bytes] = []
        dirty: list[bytes] = []
        deltas = res.deltas
        dumps = orjson.dumps
        for b, bb, st in zip(buckets, encoded, states, strict=True):
            d_cs, d_n, last, d_moved = deltas[b]
            if st:
                p_cs, p_n, _last, p_moved = st.split()
                cs = (int(p_cs) + d_cs) % 4294967296
                count = int(p_n) + d_n
                moved = int(p_moved) + d_moved
            else:
                cs, count, moved = d_cs % 4294967296, d_n, d_moved
            state_args.append(b"$%d\r\n%b\r\n" % (len(bb), bb))
            sv = b"%d %d %d %d" % (cs, count, last, moved)
            state_args.append(b"$%d\r\n%b\r\n" % (len(sv), sv))
            if moved > 0:
                dirty.append(bb)
            changed.append(b"%b:[%d,%d]" % (dumps(b), cs, count))
        commands = [_resp(b"MULTI"), *writes]
        add = commands.append
        for i in range(0, len(state_args), 2000):  # state_args: RESP bulk strings already
            part = state_args[i : i + 2000]
            add(
                b"*%d\r\n$4\r\nHSET\r\n$%d\r\n%b\r\n%b"
                % (2 + len(part), len(states_key), states_key, b"".join(part))
            )
        if dirty:
            add(_resp_flat((b"SADD", k("dirty").encode()), dirty))
        end_args = [
            self.prefix.encode(),
            b"%d" % self.changes_maxlen,
            b"%d" % res.seq,
            (b"{" + b",".join(changed) + b"}") if changed else b"",
            orjson.dumps(batch.offsets),
            orjson.dumps(batch.source_lsn) if batch.source_lsn else b"",
            b"%d" % len(res.lookup_deltas),
        ]
        for key_, values, delta in res.lookup_deltas:
            end_args += (key_.encode(), values.encode(), b"%d" % delta)
        end_args += [b.encode() for b in res.reloc_dropped]
        add(_resp_flat((b"EVAL", self._apply_end_lua, b"0"), end_args))
        add(_resp(b"SCARD", k("merge_tables").encode()))
        add(_resp(b"EXEC"))
        replies = await self._call(conn, commands)
        result = replies[-1]
        if isinstance(result, Exception):
            raise result
        if result is None:  # a watched key changed meanwhile: read again
            return None
        for r in result:
            if isinstance(r, Exception):
                raise RuntimeError(f"apply: a write failed inside the transaction: {r}")
        cache.seq = res.seq
        if res.truncated:  # rows were deleted under row keys the cache may not know
            cache.clear()
            cache.seq = res.seq
            cache.epoch = now_epoch + 1
        cache.update(res.rows)
        self._resolution = None
        return ApplyResult("ok", checkpoint=res.seq, ops=res.ops, merge_tables=int(result[-1]))

    async def applied_offsets(self) -> dict[str, int]:
        raw = await self.r.hgetall(self.k("offsets"))
        return {k.decode(): int(v) for k, v in raw.items()}

    async def done_transactions(self, limit: int = 10_000) -> list[str]:
        """The latest source transactions applied whole (``P:tx_done``), oldest first."""
        raw = await self.r.zrange(self.k("tx_done"), -max(1, limit), -1)
        return [m.decode() for m in raw]

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
            pipe.hget(*self.source_row_ref(rk))
        out: dict[str, dict[str, Any]] = {}
        for rk, val in zip(row_keys, await pipe.execute(), strict=True):
            if val is not None:
                out[rk] = orjson.loads(val)
        return out

    def row_ref(self, row_key: str, kind: Literal["ri", "src", "rl"] = "ri") -> tuple[str, str]:
        """(key, field) of a row's packed row index value (``P:ri:<table>:<slot>``), its
        source row copy (``src``) or its lookup entries (``rl``)."""
        ts, field = row_slot(row_key)
        return self.k(kind, ts), field

    def source_row_ref(self, row_key: str) -> tuple[str, str]:
        """(key, field) of a row's stored source row copy (``P:src:<table>:<slot>``)."""
        return self.row_ref(row_key, "src")

    async def row_memory(self, table: str = "*", sample: int = 0) -> dict[str, int]:
        """Memory of the row index (for benchmarks): per kind (``ri`` row index, ``src``
        source row copies, ``rl`` lookup entries) the ``MEMORY USAGE`` of its slot hashes of
        ``table`` (a glob; all tables by default) and the rows they hold (``<kind>_rows``).
        ``sample``: at most that many slot hashes per kind (0: all)."""
        out: dict[str, int] = {}
        for kind in ("ri", "src", "rl"):
            used = rows = keys = 0
            async for key in self.r.scan_iter(match=self.k(kind, table, "*"), count=1000):
                used += int(await self.r.memory_usage(key, samples=0) or 0)
                rows += int(await self.r.hlen(key))
                keys += 1
                if sample and keys >= sample:
                    break
            out[kind], out[f"{kind}_rows"] = used, rows
        return out

    async def departed_rows(self, row_keys: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        """Source rows kept after the delete half of a primary-key change (one day); None for
        a row that went without a copy. Rows whose delete half is not applied are absent."""
        if not row_keys:
            return {}
        vals = await self.r.mget([self.k("gone", rk) for rk in row_keys])
        return {rk: orjson.loads(v) for rk, v in zip(row_keys, vals, strict=True) if v is not None}

    async def count_dead_letter(self, reason: str) -> None:
        await self.r.hincrby(self.k("dl", "count"), reason, 1)

    # ---- read side (gateway) ---------------------------------------------

    async def checkpoint(self) -> int:
        v = await self.rr.get(self.k("checkpoint"))
        return int(v) if v else 0

    async def read_checkpoint(self, buckets: Sequence[str]) -> tuple[int, dict[str, BucketState]]:
        """The checkpoint and the state of ``buckets`` in one atomic step (invariant 5)."""
        if len(buckets) > 16:
            cp, states, _ = await self.read_checkpoint_with_lookups(buckets, ())
            return cp, states
        pipe = self.rr.pipeline(transaction=True)
        pipe.get(self.k("checkpoint"))
        if buckets:
            pipe.hmget(self.k("states"), list(buckets))
        res = await pipe.execute()
        cp = int(res[0]) if res[0] else 0
        if not buckets:
            return cp, {}
        return cp, {b: parse_state(v) for b, v in zip(buckets, res[1], strict=True)}

    async def read_stream_starts(
        self, starts: Sequence[tuple[Sequence[str], str]]
    ) -> tuple[int, list[tuple[dict[str, BucketState], dict[int, dict[str, int]]]]]:
        """What streams starting together read first, in one atomic step (one MULTI, one
        round trip): the checkpoint and, per ``(buckets, write checkpoint key)`` of
        ``starts``, the states of those buckets and the write checkpoints of that key (as
        :meth:`write_checkpoints`). Every stream gets the same checkpoint (invariant 5)."""
        pipe = self.rr.pipeline(transaction=True)
        pipe.get(self.k("checkpoint"))
        for buckets, wkey in starts:
            if buckets:
                pipe.hmget(self.k("states"), list(buckets))
            pipe.hgetall(self.k("wcp", wkey))
        res = await pipe.execute()
        cp = int(res[0]) if res[0] else 0
        out: list[tuple[dict[str, BucketState], dict[int, dict[str, int]]]] = []
        i = 1
        for buckets, _ in starts:
            states: dict[str, BucketState] = {}
            if buckets:
                states = {b: parse_state(v) for b, v in zip(buckets, res[i], strict=True)}
                i += 1
            wcps = {int(f[4:]): orjson.loads(v) for f, v in res[i].items() if f[:4] == b"pos:"}
            i += 1
            out.append((states, wcps))
        return cp, out

    async def read_checkpoint_with_ops(
        self, buckets: Sequence[str], after: Mapping[str, int], limit: int
    ) -> tuple[int, dict[str, BucketState], dict[str, tuple[list[StoredOp], bool]]]:
        """The checkpoint, the state of ``buckets`` and, per bucket of ``after``, its first
        ops with ``after[b] < op_id <= checkpoint`` (at most ``limit``; the flag says more
        remain), all in one atomic step. Every MOVE/CLEAR among them targets an op at or
        below that checkpoint (a batch supersedes an op and raises the checkpoint past its
        target in one step), so a connection serving these ops can complete the checkpoint
        however hot its rows are: no newer write can turn them into MOVEs in between."""
        pipe = self.rr.pipeline(transaction=True)
        pipe.get(self.k("checkpoint"))
        if buckets:
            pipe.hmget(self.k("states"), list(buckets))
        order = list(after)
        for b in order:
            pipe.zrangebyscore(
                self.k("ops", b), f"({after[b]}", "+inf", start=0, num=limit + 1, withscores=True
            )
        res = await pipe.execute()
        cp = int(res[0]) if res[0] else 0
        first = 2 if buckets else 1
        states = (
            {b: parse_state(v) for b, v in zip(buckets, res[1], strict=True)} if buckets else {}
        )
        ops: dict[str, tuple[list[StoredOp], bool]] = {}
        for b, rows in zip(order, res[first:], strict=True):
            got = [parse_member(m, sc) for m, sc in rows if sc <= cp]
            ops[b] = (got[:limit], len(got) > limit)
        return cp, states, ops

    async def read_lookups(self, keys: Sequence[str]) -> LookupRows:
        """The value arrays stored under each lookup key, in one round trip (not atomic
        with anything: confirm with :meth:`read_checkpoint_with_lookups`)."""
        if not keys:
            return {}
        pipe = self.rr.pipeline(transaction=False)
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
            vals = list(map(int, res[1].split()))
            if len(vals) != 4 * len(buckets):
                raise ValueError(f"{len(vals)} state numbers for {len(buckets)} buckets")
            states = dict(
                zip(buckets, map(BucketState, vals[0::4], vals[1::4], vals[2::4]), strict=True)
            )
            return (
                int(res[0]),
                states,
                {k: frozenset(v) for k, v in zip(keys, res[2:], strict=True)},
            )
        res = await self._read_with_lookups(args=[self.prefix, len(buckets), *buckets, *keys])
        cp = int(res[0])
        states = {b: parse_state(v) for b, v in zip(buckets, res[1], strict=True)}
        lookups = {key: frozenset(v) for key, v in zip(keys, res[2:], strict=True)}
        return cp, states, lookups

    async def read_ops(self, bucket: str, after: int, upto: int, limit: int) -> list[StoredOp]:
        """Ops with ``after < op_id <= upto``, ascending, at most ``limit``."""
        return parse_members(await self.read_ops_raw(bucket, after, upto, limit))

    async def read_ops_raw(self, bucket: str, after: int, upto: int, limit: int) -> list[bytes]:
        """:meth:`read_ops` as Redis answers it: ``[member, score, member, score, ...]``
        (members as stored, :func:`parse_member`; scores as decimal strings), with no
        per-op Python: the gateway splices untagged members into ``data`` lines as they are."""
        raw: list[bytes] = await self.rr.execute_command(
            "ZRANGEBYSCORE",
            self.k("ops", bucket),
            f"({after}",
            upto,
            "WITHSCORES",
            "LIMIT",
            0,
            limit,
        )
        return raw

    async def all_ops(self, bucket: str) -> list[StoredOp]:
        rows = await self.rr.zrange(self.k("ops", bucket), 0, -1, withscores=True)
        return [parse_member(m, s) for m, s in rows]

    async def snapshot_bucket(self, bucket: str) -> tuple[list[StoredOp], BucketState]:
        """A bucket's whole log and its running totals, read in one atomic step."""
        pipe = self.rr.pipeline(transaction=True)
        pipe.zrange(self.k("ops", bucket), 0, -1, withscores=True)
        pipe.hget(self.k("states"), bucket)
        rows, state = await pipe.execute()
        ops = [parse_member(m, s) for m, s in rows]
        return ops, parse_state(state)

    async def bucket_state(self, bucket: str) -> BucketState:
        _, states = await self.read_checkpoint([bucket])
        return states[bucket]

    async def read_tail(self) -> tuple[bytes, int, int, dict[str, int]]:
        """The newest change entry's id and ``n``, the checkpoint and the applied offsets
        (with ``lsn:<connector>`` entries, as change entries announce them), in one atomic
        step: a reader that starts after this entry knows the offsets of this checkpoint."""
        pipe = self.rr.pipeline(transaction=True)
        pipe.xrevrange(self.k("changes"), count=1)
        pipe.get(self.k("checkpoint"))
        pipe.hgetall(self.k("offsets"))
        pipe.hgetall(self.k("source_lsn"))
        tail, cp, offs, lsns = await pipe.execute()
        entry_id, n = (tail[0][0], int(tail[0][1].get(b"n", 0))) if tail else (b"0-0", 0)
        offsets = {k.decode(): int(v) for k, v in offs.items()}
        offsets.update({f"lsn:{k.decode()}": int(v) for k, v in lsns.items()})
        return entry_id, n, int(cp) if cp else 0, offsets

    async def changes_tail(self) -> tuple[bytes, int]:
        """Id and sequence number of the newest change entry (start reading after it)."""
        res = await self.rr.xrevrange(self.k("changes"), count=1)
        if not res:
            return b"0-0", 0
        return res[0][0], int(res[0][1].get(b"n", 0))

    async def read_changes(
        self, last_id: bytes, block_ms: int, count: int = 500
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        res = await self.rr.xread({self.k("changes"): last_id}, count=count, block=block_ms)
        if not res:
            return []
        return list(res[0][1])

    async def changes_first_id(self) -> bytes | None:
        res = await self.rr.xrange(self.k("changes"), count=1)
        return res[0][0] if res else None

    # ---- write checkpoints --------------------------------------------------

    async def issue_write_checkpoint(self, key: str, position: Mapping[str, int]) -> int:
        """Next id for ``key`` (from :func:`write_checkpoint_key`), bound to ``position``."""
        keys = [self.k("wcp", key), self.k("wcp", _legacy_write_checkpoint_key(key))]
        wid = int(await self._issue_wcp(keys=keys, args=[orjson.dumps(dict(position))]))
        await self._notify(args=[self.prefix, self.changes_maxlen, "w", key])
        return wid

    async def write_checkpoints(self, key: str) -> dict[int, dict[str, int]]:
        raw = await self.rr.hgetall(self.k("wcp", key))
        out = {}
        for f, v in raw.items():
            if f.startswith(b"pos:"):
                out[int(f[4:])] = orjson.loads(v)
        return out

    async def forget_write_checkpoints(self, key: str, upto: int) -> None:
        raw = await self.r.hkeys(self.k("wcp", key))
        ids = [int(f[4:]) for f in raw if f.startswith(b"pos:")]
        fields = [f"pos:{i}" for i in ids if i < upto]
        if fields:
            await self.r.hdel(self.k("wcp", key), *fields)

    # ---- compaction ---------------------------------------------------------

    async def dirty_buckets(self) -> list[str]:
        return sorted(m.decode() for m in await self.r.smembers(self.k("dirty")))

    async def take_dirty(self, bucket: str) -> None:
        await self.r.srem(self.k("dirty"), bucket)

    async def compact_step(self, bucket: str, chunk: int) -> CompactStep:
        t0 = time.perf_counter()
        folded, freed, more = await self._compact(args=[self.prefix, bucket, chunk])
        return CompactStep(int(folded), int(freed), bool(more), time.perf_counter() - t0)

    async def defrag_step(self, bucket: str, chunk: int, cursor: int, cutoff: int) -> DefragStep:
        t0 = time.perf_counter()
        moved, new_cursor, done = await self._defrag(
            args=[self.prefix, bucket, chunk, cursor, cutoff, self.changes_maxlen]
        )
        return DefragStep(int(moved), int(new_cursor), bool(done), time.perf_counter() - t0)

    async def defrag_scan(
        self, bucket: str, cursor: int, count: int
    ) -> tuple[int, list[tuple[bool, int, int]]]:
        """Up to ``count`` ops after op ``cursor``, run-length encoded: (ops read, runs of
        (live PUT?, length, last op_id)). Read-only and bounded (defrag_scan.lua)."""
        raw = await self._defrag_scan(args=[self.prefix, bucket, cursor, count])
        runs = [(int(raw[i]) == 1, int(raw[i + 1]), int(raw[i + 2])) for i in range(1, len(raw), 3)]
        return int(raw[0]), runs

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

    async def has_bucket(self, bucket: str) -> bool:
        """Whether the store holds a bucket of this name (ever written, not dropped)."""
        return bool(await self.r.hexists(self.k("states"), bucket))

    async def all_buckets(self) -> list[str]:
        out = []
        async for key, _ in self.r.hscan_iter(self.k("states"), count=1000):
            out.append(key.decode())
        return sorted(out)

    async def stored_totals(self, buckets: Iterable[str]) -> dict[str, BucketState]:
        blist = list(buckets)
        _, states = await self.read_checkpoint(blist)
        return states

    async def reader_synced(self) -> bool:
        """Whether the read side holds the primary's data: always for the primary itself;
        a replica once it has finished a first sync (before it, a replica serves an empty
        data set, which would look like a store without a checkpoint)."""
        if self.rr is self.r:
            return True
        info = await self.rr.info("replication")
        if info.get("role") != "slave":
            return True  # promoted, or pointed at a primary
        if int(info.get("master_sync_in_progress", 0)):
            return False
        never = int(info.get("master_link_down_since_seconds", 0)) == -1
        return not (info.get("master_link_status") != "up" and never)

    async def ping(self) -> bool:
        """The primary answers (and the replica, synced, when the gateway reads one)."""
        ok = bool(await self.r.ping())
        if self.rr is not self.r:
            ok = ok and await self.reader_synced()
        return ok
