"""The row index, resolved in the processor: a planned batch plus the index entries of its
rows in, every write of the atomic apply out (pure; no Redis).

The row index (``P:ri:<table>:<slot>``, docs/store.md) tells, per row, which op each of its
outputs has in its bucket: so a changed row gets new ops, its previous op in a bucket turns
into MOVE (same op id and checksum, target = the new op), an output the row no longer
produces becomes a REMOVE, and an unchanged output (same checksum) writes nothing. This
used to run inside the apply script in Redis, where every string it touched cost Redis's
single thread (~30 us per event). A row belongs to one Kafka partition, so one processor
owns its entries: :func:`resolve` runs in that processor on entries it cached or read, and
the store sends the result as plain commands in one MULTI/EXEC (``Store.apply``), fenced by
WATCH on the offsets, the op sequence, the bucket states and the row index epoch.

Semantics are those of the former ``apply_batch.lua``, op for op (the differential and
replay tests hold them): op ids are handed out in event order, outputs in output order,
removed outputs in the order of their op ids.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

#: the row index of a table is spread over this many hashes, ``P:ri:<table>:<slot>``
#: (:func:`row_slot`): a key per row cost ~70-100 bytes by itself, a field in a small hash a
#: few. TRUNCATE walks the table's slots.
ROW_SLOTS = 1024

SEP = "\x1f"

#: bytes escaped in a row index entry field (\x1b -> \x1b;, \x1d -> \x1b=, \x1e -> \x1b>,
#: \x1f -> \x1b?): the packed value is split at \x1d / \x1e and the field at \x1f, and the
#: escape (byte - 32) is undone for a REMOVE.
_ENTRY_ESCAPE = {c: "\x1b" + chr(c + 32) for c in (0x1B, 0x1D, 0x1E, 0x1F)}


def _esc(part: str) -> str:
    return part.translate(_ENTRY_ESCAPE) if not part.isprintable() else part


def _unesc(part: str) -> str:
    if "\x1b" not in part:
        return part
    out, i = [], 0
    while i < len(part):
        c = part[i]
        if c == "\x1b" and i + 1 < len(part):
            out.append(chr(ord(part[i + 1]) - 32))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def entry_field(bucket: str, object_type: str, object_id: str) -> str:
    """The row index's name of one output (``bucket \x1f object_type \x1f object_id``, each
    part escaped so the packed row value parses unambiguously)."""
    if bucket.isprintable() and object_type.isprintable() and object_id.isprintable():
        return f"{bucket}{SEP}{object_type}{SEP}{object_id}"
    return f"{_esc(bucket)}{SEP}{_esc(object_type)}{SEP}{_esc(object_id)}"


def row_slot(row_key: str, table: str | None = None) -> tuple[str, str]:
    """``("<table>:<slot>", field)``: where a row sits in the row index
    ``P:ri:<table>:<slot>`` (also ``P:src:`` and ``P:rl:``, its source row copy and lookup
    entries). A row key is ``<topic>\x1f<key JSON>`` (``core.row_key``) and its table the
    topic: the field is the row key without it. ``table``: the event's table, for a row key
    that does not start with it (then the field is the whole row key)."""
    if table is None:
        table = row_key.partition(SEP)[0]
    field = row_key[len(table) + 1 :] if row_key.startswith(table + SEP) else row_key
    return f"{table}:{zlib.crc32(field.encode()) & (ROW_SLOTS - 1)}", field


#: one entry of a row: entry field -> (op id, put checksum, remove checksum)
Entries = dict[str, tuple[int, int, int]]


def parse_row(value: str) -> tuple[int, Entries]:
    """A packed row value: a flag digit (1: a source row copy is stored, 2: lookup entries,
    3: both) then per output ``\x1e<entry field>\x1d<op id>:<checksum>:<remove checksum>``.
    A repeated field keeps its last entry."""
    parts = value.split("\x1e")
    entries: Entries = {}
    for p in parts[1:]:
        f, _, nums = p.partition("\x1d")
        a, c, r = nums.split(":")
        entries[f] = (int(a), int(c), int(r))
    return int(parts[0] or 0), entries


_FLAGS = ("0", "1", "2", "3")


@dataclass(slots=True)
class StoredRow:
    """What the store holds for one row before the batch: its packed index value (None:
    the row is unknown), its lookup entries JSON (only read when flag 2 is set) and its
    source row copy (only read for the delete half of a primary-key change)."""

    value: str | None
    lookups: str | None = None
    source: str | None = None


@dataclass(slots=True)
class Resolution:
    """Every write of one batch, by concept (the store names the keys)."""

    seq: int  # the op sequence after the batch
    ops: int = 0
    #: bucket -> op id -> member, in order of first write (a MOVE of an op written earlier
    #: in the batch replaces it there). A new op's member is its wire JSON after the op_id
    #: field (the store writes ``{"op_id":"<id>",`` in front); a MOVE's, starting with ``T``,
    #: is complete.
    members: dict[str, dict[int, bytes]] = field(default_factory=dict)
    #: bucket -> op ids of earlier batches to delete first (their MOVE is in ``members``)
    drops: dict[str, list[int]] = field(default_factory=dict)
    #: bucket -> [checksum of its new ops (unbounded), their count, its last op, MOVEs]
    deltas: dict[str, list[int]] = field(default_factory=dict)
    #: (ts, rf, packed value or None to delete), in order (a later write of a field wins)
    index: list[tuple[str, str, str | None]] = field(default_factory=list)
    #: (ts, rf, source row JSON or None to delete), in order
    sources: list[tuple[str, str, str | None]] = field(default_factory=list)
    #: (ts, rf, lookup entries JSON or None to delete), in order
    lookups: list[tuple[str, str, str | None]] = field(default_factory=list)
    #: (lookup key, values JSON, +1 / -1) in order
    lookup_deltas: list[tuple[str, str, int]] = field(default_factory=list)
    #: row key -> source row kept a day after the delete half of a primary-key change
    gone: dict[str, str] = field(default_factory=dict)
    #: bucket -> relocation fields to delete (``P:reloc:<bucket>``)
    reloc_dropped: dict[str, list[str]] = field(default_factory=dict)
    #: row key -> its row after the batch (for the processor's cache); None: deleted
    rows: dict[str, StoredRow | None] = field(default_factory=dict)
    truncated: bool = False


def stored_row_ids(row: StoredRow | None) -> list[tuple[str, int]]:
    """(bucket, op id) of a stored row's entries: what may have been relocated."""
    if row is None or row.value is None:
        return []
    return [(_bucket_of(f), e[0]) for f, e in parse_row(row.value)[1].items()]


def _bucket_of(f: str) -> str:
    return _unesc(f.split(SEP, 1)[0])


def resolve(
    events: Sequence[Any],
    stored: Mapping[str, StoredRow | None],
    seq: int,
    *,
    truncated_rows: Mapping[str, Mapping[str, StoredRow]] | None = None,
    relocations: Mapping[str, Mapping[int, int]] | None = None,
    slots: Mapping[str, tuple[str, str]] | None = None,
) -> Resolution:
    """Resolve a planned batch's events (``core.plan_batch``: ``row_change``, ``row_delete``,
    ``table_truncate``) against the stored rows.

    ``stored``: row key -> what the store holds for every row key the events name (None or
    a value of None: unknown). ``seq``: the op sequence before the batch. ``truncated_rows``:
    per truncated table, its stored rows (row key -> row). ``relocations``: bucket -> indexed
    op id -> the live copy defragmentation re-appended (``P:reloc``), for the stored
    entries' buckets that have relocations. ``slots``: :func:`row_slot` of row keys, where
    the caller has it already."""
    res = Resolution(seq)
    relocs = {b: dict(m) for b, m in (relocations or {}).items()}
    # the batch's view of each row: starts as stored, follows every event
    rows: dict[str, StoredRow | None] = res.rows
    #: row key -> its table, for the rows the events name (a TRUNCATE finds them by table)
    row_table: dict[str, str] = {}
    members, drops, deltas = res.members, res.drops, res.deltas
    known_slots = slots or {}
    #: source rows written in the batch (a primary-key change's delete half may keep one)
    sources: dict[str, str | None] = {}

    def add_op(b: str, cs: int, member_tail: bytes) -> int:
        op_id = res.seq = res.seq + 1
        res.ops += 1
        m = members.get(b)
        if m is None:
            m = members[b] = {}
        m[op_id] = member_tail  # the store puts '{"op_id":"<id>",' in front
        d = deltas.get(b)
        if d is None:
            deltas[b] = [cs, 1, op_id, 0]
        else:
            d[0] += cs
            d[1] += 1
            d[2] = op_id
        return op_id

    def to_move(b: str, old_id: int, old_cs: int, target: int) -> None:
        r = relocs.get(b)
        if r:
            copy = r.pop(old_id, None)
            if copy is not None:
                res.reloc_dropped.setdefault(b, []).extend((str(old_id), f"~{copy}"))
                old_id = copy
        m = members[b]  # the bucket has the superseding op already
        if old_id not in m:
            dr = drops.get(b)
            if dr is None:
                drops[b] = [old_id]
            else:
                dr.append(old_id)
        m[old_id] = b'T%d|{"op_id":"%d","op":"MOVE","checksum":%d}' % (target, old_id, old_cs)
        deltas[b][3] += 1

    def remove_entry(f: str, e: tuple[int, int, int]) -> None:
        b, ot, oid = (_unesc(x) for x in f.split(SEP))
        tail = b'"op":"REMOVE","object_type":%b,"object_id":%b,"checksum":%d}' % (
            orjson.dumps(ot),
            orjson.dumps(oid),
            e[2],
        )
        op_id = add_op(b, e[2], tail)
        to_move(b, e[0], e[1], op_id)

    def update_lookups(old_raw: str | None, new: list[list[str]] | None) -> None:
        old: dict[tuple[str, str], None] = {}
        if old_raw:
            for k, v in orjson.loads(old_raw):
                old[(k, v)] = None
        keep = set()
        for k, v in new or ():
            if (k, v) in old:
                keep.add((k, v))
            else:
                res.lookup_deltas.append((k, v, 1))
        for kv in old:
            if kv not in keep:
                res.lookup_deltas.append((kv[0], kv[1], -1))

    index_w, sources_w, lookups_w = res.index.append, res.sources.append, res.lookups.append

    def apply_row(
        rk: str,
        ts: str,
        rf: str,
        outs: list[Any] | None,
        src: str | None,
        lk: list[list[str]] | None,
        has_lk_field: bool,
        pk_gone: bool,
    ) -> None:
        row = rows[rk] if rk in rows else stored.get(rk)
        value = row.value if row is not None else None
        if value is not None:
            flags, cur = parse_row(value)
        else:
            flags, cur = 0, {}
        parts: list[str] = []  # the packed entries of the row after the event
        if outs is not None:
            for bucket, ot, oid, cs, rcs, tail in outs:
                # entry_field's common case, inlined (it runs for every output)
                if bucket.isprintable() and ot.isprintable() and oid.isprintable():
                    f = f"{bucket}{SEP}{ot}{SEP}{oid}"
                else:
                    f = entry_field(bucket, ot, oid)
                e = cur.pop(f, None) if cur else None
                if e is not None and e[1] == cs:  # unchanged data: no new op
                    parts.append(f"\x1e{f}\x1d{e[0]}:{cs}:{e[2]}")
                    continue
                op_id = add_op(bucket, cs, tail.encode() if type(tail) is str else tail)
                if e is not None:
                    to_move(bucket, e[0], e[1], op_id)
                parts.append(f"\x1e{f}\x1d{op_id}:{cs}:{rcs}")
        # whatever the row no longer produces leaves its bucket, in op id order (replays
        # are byte-identical)
        if cur:
            for f, e in sorted(cur.items(), key=lambda fe: fe[1][0]):
                remove_entry(f, e)
        had_src, had_lk = flags % 2 == 1, flags >= 2
        if outs is not None:
            has_lk = had_lk
            new_lookups = row.lookups if row is not None else None
            if has_lk_field:
                update_lookups(row.lookups if (had_lk and row is not None) else None, lk)
                has_lk = bool(lk)
                if has_lk:
                    new_lookups = orjson.dumps(lk).decode()
                    lookups_w((ts, rf, new_lookups))
                else:
                    new_lookups = None
                    if had_lk:
                        lookups_w((ts, rf, None))
            if src is not None:
                sources_w((ts, rf, src))
            elif had_src:
                sources_w((ts, rf, None))  # the table needs no merges: no stored copy
            packed = _FLAGS[(1 if src is not None else 0) + (2 if has_lk else 0)] + "".join(parts)
            if packed != value:
                index_w((ts, rf, packed))
            rows[rk] = StoredRow(packed, new_lookups if has_lk else None)
            sources[rk] = src
        elif value is not None:
            if had_lk:
                update_lookups(row.lookups if row is not None else None, None)
                lookups_w((ts, rf, None))
            old_src = None
            if had_src:
                old_src = sources.get(rk, row.source if row else None)
                sources_w((ts, rf, None))
            if pk_gone:
                # the delete half of a primary-key change: keep the source row a while, the
                # create half may carry TOAST placeholders only the old row can fill; kept
                # as "null" when there is no copy, so a create half waiting for it goes on
                res.gone[rk] = old_src if old_src is not None else "null"
            index_w((ts, rf, None))
            rows[rk] = None
        else:
            if pk_gone:
                res.gone[rk] = "null"  # an unknown row: nothing to keep, but it has gone
            rows[rk] = None

    for ev in events:
        outs = ev.get("o")
        if outs is None:  # TRUNCATE: every row of the table, in row field order
            table = ev["truncate"]
            res.truncated = True
            stored_rows = (truncated_rows or {}).get(table, {})
            found: dict[str, tuple[str, str]] = {}  # rf -> (row key, ts)
            for rk in stored_rows:
                ts, rf = row_slot(rk, table)
                found[rf] = (rk, ts)
            for rk, t in row_table.items():  # rows this batch touched (maybe deleted)
                if t == table:
                    ts, rf = row_slot(rk, table)
                    found[rf] = (rk, ts)
            for rf in sorted(found):
                rk, ts = found[rf]
                if rk not in rows:
                    rows[rk] = stored_rows.get(rk)
                apply_row(rk, ts, rf, None, None, None, False, False)
            continue
        rk, table = ev["k"], ev["t"]
        row_table[rk] = table
        ref = known_slots.get(rk)
        ts, rf = ref if ref is not None else row_slot(rk, table)
        if outs is False:
            apply_row(rk, ts, rf, None, None, None, False, bool(ev.get("g")))
            continue
        src = ev.get("s") or None
        lk = ev.get("l")
        apply_row(rk, ts, rf, outs, src, lk, lk is not None, False)
    return res
