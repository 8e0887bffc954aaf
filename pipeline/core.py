"""The pure core of the processor: decoded CDC events in, one planned atomic batch out.

No Kafka, no Redis: the driver (Faust agent or a plain confluent-kafka loop) feeds
records in, fetches the few stored source rows a merge needs, and hands the plan
to :meth:`pipeline.store.Store.apply`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from pipeline.store import SEP, PlannedBatch, row_change, row_delete, table_truncate

if TYPE_CHECKING:
    from pipeline.cdc import DeadLetterEvent, DecodedEvent, KafkaRecord

_unpack = struct.Struct("<I").unpack_from


_sha256 = hashlib.sha256


def op_checksum(text: str) -> int:
    """First four bytes of SHA-256, little-endian (sync-protocol.md §5.1)."""
    return int(_unpack(_sha256(text.encode("utf-8")).digest())[0])


def put_checksum(object_type: str, object_id: str, data: str) -> int:
    return op_checksum(f"put.{object_type}.{object_id}.{data}")


_REMOVE_CACHE: dict[tuple[str, str], int] = {}


def remove_checksum(object_type: str, object_id: str) -> int:
    """REMOVE is hashed over ``delete.<object_type>/<object_id>`` (documented, never changed).
    Every PUT carries it (the row index keeps it for a later REMOVE), so recent ones are
    cached (bounded: cleared when full)."""
    k = (object_type, object_id)
    cs = _REMOVE_CACHE.get(k)
    if cs is None:
        if len(_REMOVE_CACHE) >= 200_000:
            _REMOVE_CACHE.clear()
        cs = _REMOVE_CACHE[k] = op_checksum(f"delete.{object_type}/{object_id}")
    return cs


class RowOutputLike(Protocol):
    @property
    def bucket(self) -> str: ...
    @property
    def object_type(self) -> str: ...
    @property
    def object_id(self) -> str: ...
    @property
    def data(self) -> str: ...


class RulesLike(Protocol):
    def evaluate_row(
        self, table: str, row: Mapping[str, Any], *, schema: str | None = None
    ) -> Sequence[RowOutputLike]: ...

    def is_relevant(self, table: str, schema: str | None = None) -> bool: ...


class LookupEntryLike(Protocol):
    @property
    def lookup(self) -> str: ...
    @property
    def values(self) -> Sequence[Any]: ...


def _parameter_rows(rules: RulesLike) -> Callable[..., Sequence[LookupEntryLike]] | None:
    """The rules' ``evaluate_parameter_row`` when some parameter query reads a table."""
    fn = getattr(rules, "evaluate_parameter_row", None)
    tables = getattr(rules, "parameter_tables", None)
    if fn is None or tables is None or not tables():
        return None
    return fn


def lookup_entries(entries: Iterable[LookupEntryLike]) -> list[list[str]]:
    """A row's lookup entries as the store keeps them: sorted, unique
    ``[lookup key, JSON array of values]`` pairs. Values holding a blob are left out: a
    bucket parameter that is a blob names no bucket (``buckets_for_request`` skips it)."""
    out: set[tuple[str, str]] = set()
    for e in entries:
        if any(isinstance(v, bytes | bytearray | memoryview) for v in e.values):
            continue
        out.add((e.lookup, orjson.dumps(list(e.values)).decode()))
    return [list(p) for p in sorted(out)]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: KafkaRecord
    reason: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


def dead_letter(rec: KafkaRecord, ev: DeadLetterEvent) -> DeadLetter:
    """The decoder's verdict on a record it could not use, with its details."""
    details = {k: v for k, v in ev.items() if k not in ("action", "reason", "message")}
    return DeadLetter(rec, str(ev["reason"]), str(ev.get("message") or ""), details)


@dataclass(slots=True)
class Plan:
    batch: PlannedBatch
    dead_letters: list[DeadLetter]
    #: row keys whose stored source row a merge needed but did not find
    merges_without_base: int = 0
    events: int = 0


def tp_of(record: KafkaRecord) -> str:
    return f"{record.topic}/{record.partition}"


def unapplied(records: Sequence[KafkaRecord], applied: Mapping[str, int]) -> list[KafkaRecord]:
    """The records past their partition's applied offset (``applied``: ``topic/partition``
    -> offset, see :func:`tp_of`), in order."""
    out: list[KafkaRecord] = []
    last_topic: str | None = None
    last_part = -1
    floor = -1
    for r in records:  # records come in runs of one partition: one lookup per run
        if r.topic is not last_topic or r.partition != last_part:
            last_topic, last_part = r.topic, r.partition
            floor = applied.get(f"{last_topic}/{last_part}", -1)
        if r.offset > floor:
            out.append(r)
    return out


def unapplied_items(
    items: Sequence[tuple[KafkaRecord, DecodedEvent]], applied: Mapping[str, int]
) -> list[tuple[KafkaRecord, DecodedEvent]]:
    """:func:`unapplied` for (record, decoded event) pairs."""
    out: list[tuple[KafkaRecord, DecodedEvent]] = []
    last_topic: str | None = None
    last_part = -1
    floor = -1
    for it in items:
        r = it[0]
        if r.topic is not last_topic or r.partition != last_part:
            last_topic, last_part = r.topic, r.partition
            floor = applied.get(f"{last_topic}/{last_part}", -1)
        if r.offset > floor:
            out.append(it)
    return out


def row_key(table: str, key: Mapping[str, Any]) -> str:
    return table + SEP + orjson.dumps(key, option=orjson.OPT_SORT_KEYS).decode()


def needs_base(ev: DecodedEvent) -> bool:
    """Does this decoded upsert need the stored row to be complete?"""
    return ev["action"] == "upsert" and bool(ev.get("keep_columns") or ev.get("partial"))


#: A row whose source JSON is shorter than this keeps no copy under ``source_rows: auto``
#: (unless its table needs merges): PostgreSQL moves a value out of line (and Debezium then
#: sends a placeholder for it while it is unchanged) only when the row's tuple exceeds
#: TOAST_TUPLE_THRESHOLD (~2,032 bytes). A tuple is at most ~2.5x the row's JSON here (the
#: worst case: one-letter columns of small int8 values, 15 bytes with padding on disk vs
#: 6 in JSON; text, bytea, timestamps and uuids are longer in JSON than on disk), so a
#: row under 600 bytes of JSON has no TOASTed value and never needs a merge.
TOAST_SAFE_BYTES = 600


def needs_merges(ev: DecodedEvent) -> bool:
    """Does this decoded event show that its table needs stored source rows? TOAST
    placeholders (``keep_columns``), MongoDB partial updates, any MongoDB document."""
    if ev["action"] != "upsert":
        return False
    return bool(ev.get("keep_columns") or ev.get("partial") or ev.get("replace_document"))


def waiting_creates(
    items: Sequence[tuple[KafkaRecord, DecodedEvent]],
    departed: Container[str],
    waited_out: Container[str] = (),
) -> dict[tuple[str, int], tuple[int, set[str]]]:
    """Create halves of primary-key changes that must wait for their old key's delete half.

    Such a create half carries TOAST placeholders that only the old row can fill, and it
    sits on the new key's partition: the old key's events (its creation, its updates, the
    delete half) sit on another partition and may not be applied yet. Only the delete half
    gives the old row exactly as it was at the change (the store keeps it a day, ``P:gone``,
    ``departed`` here); until then the create half and everything after it on its partition
    wait, or a merge would fill the columns from a stale old row, or leave them NULL.

    ``departed``: old row keys whose delete half is applied (or is earlier in ``items``:
    those are found here too). ``waited_out``: old row keys that waited long enough.
    Returns ``(topic, partition) -> (first offset that waits, the old row key it awaits)``.

    Only a partition's *first* waiting create half counts: later ones are looked at again
    once it goes on. Awaiting theirs too would deadlock: their delete halves may sit behind
    another partition's held record, which in turn awaits a delete half behind this one's.
    A single wait cannot: a create half awaits the delete half of its own source change, and
    every partition holds the changes in the source's commit order, so a chain of waits runs
    back in that order and ends at a partition that has the awaited record before its hold."""
    out: dict[tuple[str, int], tuple[int, set[str]]] = {}
    seen_deletes: set[str] = set()
    ev: Any  # narrowed by ``action`` below, which mypy does not follow
    for rec, ev in items:
        tp = (rec.topic, rec.partition)
        if tp in out:  # held from an earlier record: its deletes are not applied either
            continue
        action = ev["action"]
        if action == "delete":
            if ev.get("pk_change_to"):
                seen_deletes.add(row_key(rec.topic, ev["key"]))
            continue
        if action != "upsert":
            continue
        old = ev.get("pk_change_from")
        if not isinstance(old, Mapping) or not needs_base(ev):
            continue
        old_rk = row_key(rec.topic, old)
        if old_rk in seen_deletes or old_rk in departed or old_rk in waited_out:
            continue
        out[tp] = (rec.offset, {old_rk})
    return out


def _json_path(path: str) -> list[str | int] | None:
    """``$.a."b c"[2]`` -> ``["a", "b c", 2]`` (the decoder's paths, SQLite syntax); None
    when it is not one."""
    if not path.startswith("$"):
        return None
    out: list[str | int] = []
    i, n = 1, len(path)
    while i < n:
        c = path[i]
        if c == "[":
            j = path.find("]", i)
            if j < 0 or not path[i + 1 : j].isdigit():
                return None
            out.append(int(path[i + 1 : j]))
            i = j + 1
        elif c == "." and path[i + 1 : i + 2] == '"':
            j = i + 2
            part = []
            while j < n and path[j] != '"':
                if path[j] == "\\" and j + 1 < n:
                    j += 1
                part.append(path[j])
                j += 1
            if j >= n:
                return None
            out.append("".join(part))
            i = j + 1
        elif c == ".":
            j = i + 1
            while j < n and path[j] not in '.["':
                j += 1
            if j == i + 1:
                return None
            out.append(path[i + 1 : j])
            i = j
        else:
            return None
    return out


def _patch_value(doc: Any, steps: list[str | int], patch: Mapping[str, Any]) -> Any:
    """``doc`` (a parsed JSON value, or None) with one patch applied at ``steps`` (not
    empty), as MongoDB changed the document: ``set`` creates missing objects on the way (an
    array index past the end pads with nulls), ``remove`` drops an object member or array
    element, ``truncate`` shortens the array there. A path through a scalar changes
    nothing."""
    op = patch["op"]
    head, rest = steps[0], steps[1:]
    if isinstance(head, int):
        if not isinstance(doc, list):
            if doc is not None or op != "set":
                return doc
            doc = []
        doc = list(doc)
        if not rest:
            if op == "set":
                while len(doc) < head:
                    doc.append(None)
                value = orjson.loads(patch["value"])
                if head < len(doc):
                    doc[head] = value
                else:
                    doc.append(value)
            elif op == "remove":
                if head < len(doc):
                    del doc[head]
            elif head < len(doc) and isinstance(doc[head], list):
                doc[head] = doc[head][: int(patch["size"])]
            return doc
        if head < len(doc):
            doc[head] = _patch_value(doc[head], rest, patch)
        elif op == "set":
            while len(doc) < head:
                doc.append(None)
            doc.append(_patch_value(None, rest, patch))
        return doc
    if not isinstance(doc, dict):
        if doc is not None or op != "set":
            return doc
        doc = {}
    doc = dict(doc)
    if not rest:
        if op == "set":
            doc[head] = orjson.loads(patch["value"])
        elif op == "remove":
            doc.pop(head, None)
        elif isinstance(doc.get(head), list):
            doc[head] = doc[head][: int(patch["size"])]
        return doc
    if head in doc or op == "set":
        doc[head] = _patch_value(doc.get(head), rest, patch)
    return doc


def apply_json_patches(row: dict[str, Any], patches: Sequence[Mapping[str, Any]]) -> None:
    """Apply a MongoDB partial update's nested changes (``json_patches``: ``dims.w`` set,
    ``tags.2`` removed, arrays truncated) to the compact JSON text of their top-level
    columns in ``row``, in place (cdc-events.md §7). A column that does not hold JSON
    text of an object or array is left as it is, except that a ``set`` on a NULL column
    creates the document."""
    # truncations first: a pipeline update that shortens an array and sets elements of the
    # shorter array reports both, and the set elements must survive
    for patch in sorted(patches, key=lambda p: p["op"] != "truncate"):
        col = patch["column"]
        steps = _json_path(str(patch["path"]))
        if steps is None or (not steps and patch["op"] != "truncate"):
            continue
        text = row.get(col)
        if text is None:
            doc: Any = None
        elif isinstance(text, str):
            try:
                doc = orjson.loads(text)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(doc, dict | list):
                continue
        else:
            continue
        if steps:
            new = _patch_value(doc, steps, patch)
        elif isinstance(doc, list):  # the column itself is the truncated array
            new = doc[: int(patch["size"])]
        else:
            continue
        if new is not doc:
            row[col] = None if new is None else orjson.dumps(new).decode()


def base_keys(topic: str, ev: DecodedEvent) -> list[str]:
    """Row keys whose stored source rows this event may merge from: its own, and for the
    create half of a primary-key change also the old key's."""
    if ev["action"] != "upsert" or not needs_base(ev):
        return []
    keys = [row_key(topic, ev["key"])]
    old = ev.get("pk_change_from")
    if isinstance(old, Mapping):
        keys.append(row_key(topic, old))
    return keys


#: ``"op":"PUT","object_type":<JSON string>,"object_id":`` per object type
_TAIL_HEADS: dict[str, bytes] = {}


def output_entry(out: RowOutputLike) -> list[Any]:
    """``[bucket, object_type, object_id, put checksum, remove checksum, tail]``; the tail
    (the op's wire JSON after its op_id field) is UTF-8 bytes, as it goes to the store."""
    ot, oid, data = out.object_type, out.object_id, out.data
    # put_checksum, inlined (it runs for every output)
    cs = _unpack(_sha256(f"put.{ot}.{oid}.{data}".encode()).digest())[0]
    dumps = orjson.dumps
    head = _TAIL_HEADS.get(ot)
    if head is None:
        if len(_TAIL_HEADS) >= 10_000:
            _TAIL_HEADS.clear()
        head = _TAIL_HEADS[ot] = b'"op":"PUT","object_type":' + dumps(ot) + b',"object_id":'
    tail = b'%b%b,"checksum":%d,"data":%b}' % (head, dumps(oid), cs, dumps(data))
    return [out.bucket, ot, oid, cs, remove_checksum(ot, oid), tail]


def output_entries(outs: Sequence[RowOutputLike]) -> list[list[Any]]:
    """:func:`output_entry` of each of one row's outputs. The outputs of a row share
    their object (type and id), and often their data (one query, several buckets): what
    depends only on those is computed once per run of equal values."""
    res: list[list[Any]] = []
    last_ot: str | None = None
    last_oid: str | None = None
    last_data: str | None = None
    head = oid_json = b""
    rcs = cs = 0
    tail = b""
    dumps = orjson.dumps
    for out in outs:
        ot, oid, data = out.object_type, out.object_id, out.data
        if oid != last_oid or ot != last_ot:
            last_ot, last_oid, last_data = ot, oid, None
            rcs = remove_checksum(ot, oid)
            oid_json = dumps(oid)
            head = _TAIL_HEADS.get(ot)  # type: ignore[assignment]
            if head is None:
                if len(_TAIL_HEADS) >= 10_000:
                    _TAIL_HEADS.clear()
                head = _TAIL_HEADS[ot] = b'"op":"PUT","object_type":' + dumps(ot) + b',"object_id":'
        if data is not last_data and data != last_data:
            last_data = data
            # put_checksum, inlined (it runs for every output)
            cs = _unpack(_sha256(f"put.{ot}.{oid}.{data}".encode()).digest())[0]
            tail = b'%b%b,"checksum":%d,"data":%b}' % (head, oid_json, cs, dumps(data))
        res.append([out.bucket, ot, oid, cs, rcs, tail])
    return res


def plan_batch(
    items: Iterable[tuple[KafkaRecord, DecodedEvent]],
    rules: RulesLike,
    stored_rows: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    on_unknown_table: Callable[[str], None] | None = None,
    merge_tables: set[str] | None = None,
    gone_rows: Mapping[str, Mapping[str, Any]] | None = None,
) -> Plan:
    """Turn decoded events (in consumption order) into one atomic batch.

    ``stored_rows`` holds the source rows the store has for the row keys of events
    that :func:`needs_base`; later events in the batch see earlier ones' results.

    Rows of tables read by parameter queries also carry ``"l"``: the complete, sorted
    list of lookup entries the row contributes after the event (see :func:`lookup_entries`).
    Like ``"o"`` it is a full replacement, not a delta: the apply step compares it with
    the entries stored for the row (the row's previous contribution) inside the same
    atomic step, removes the ones that went away, adds the new ones and announces the
    lookup keys whose value sets changed. A delete (or TRUNCATE) drops all of a row's
    entries there. So the planner needs no stored lookup state, and a membership change
    lands in the same checkpoint as the ops of the batch.

    ``gone_rows``: source rows the store keeps after the delete half of a primary-key
    change (``P:gone``), for the old keys of create halves that need them.

    ``merge_tables``: ``None`` keeps every row's source row (``"s"``) in the store. A set
    keeps them only for rows of at least :data:`TOAST_SAFE_BYTES` of JSON and for the
    tables in it (topics); a table whose events show that it
    needs merges (:func:`needs_merges`) is added to the set and to
    ``batch.merge_tables`` (the store records it in the same atomic step), so rows of
    tables that never need merges cost no stored copy (``"s": false``; the store drops a
    copy kept earlier).
    """
    batch = PlannedBatch()
    dls: list[DeadLetter] = []
    plan = Plan(batch, dls)
    stored = stored_rows or {}
    known_rows: dict[str, dict[str, Any] | None] = {k: dict(v) for k, v in stored.items()}
    gone = gone_rows or {}
    #: rows deleted in this batch by the delete half of a primary-key change
    departed: dict[str, dict[str, Any]] = {}
    param_rows = _parameter_rows(rules)
    param_tables: set[str] = set(rules.parameter_tables()) if param_rows else set()  # type: ignore[attr-defined]
    #: the rules reuse the row's JSON text (SyncRules: the data of ``SELECT *``)
    row_json_ok = bool(getattr(rules, "takes_row_json", False))
    #: (table, schema) -> rules.is_relevant (it walks every query; asked once per batch)
    relevant: dict[tuple[str, Any], bool] = {}

    guard, offsets, events = batch.guard, batch.offsets, batch.events
    source_lsn = batch.source_lsn
    dumps = orjson.dumps
    last_topic: str | None = None
    last_part = -1
    tp = ""
    n = 0
    ev: Any  # narrowed by ``action`` below, which mypy does not follow
    for rec, ev in items:
        n += 1
        topic = rec.topic
        if topic is not last_topic or rec.partition != last_part:
            last_topic, last_part = topic, rec.partition
            tp = f"{topic}/{last_part}"
            if tp not in guard:
                guard[tp] = rec.offset
        offsets[tp] = rec.offset
        action = ev["action"]
        if action == "dead_letter":
            dls.append(dead_letter(rec, ev))
            continue
        if action != "upsert" and action != "delete" and action != "truncate":
            continue  # tx markers, heartbeats, ignored records: the offset still advances
        lsn = ev.get("source_lsn")
        if lsn is not None:  # PostgreSQL WAL position: exact write checkpoints
            name = ev.get("source_name")
            if type(name) is not str:
                name = str(name)
            if lsn > source_lsn.get(name, -1):
                source_lsn[name] = lsn
        # Rows are identified by topic + key, not by the envelope's table id: a tombstone
        # carries no envelope, so only the topic ties it to the row it deletes.
        table = topic
        src_table = ev.get("source_table")
        if src_table is None or type(src_table) is not str or not src_table:
            src_table = str(src_table or str(ev["table"]).rsplit(".", 1)[-1])
        schema = ev.get("source_schema")
        rel = relevant.get((src_table, schema))
        if rel is None:
            rel = relevant[(src_table, schema)] = rules.is_relevant(src_table, schema)
        if not rel:
            if on_unknown_table:
                on_unknown_table(src_table)
            continue
        if action == "truncate":
            events.append(table_truncate(table))
            for rk in [k for k in known_rows if k.startswith(table + SEP)]:
                known_rows[rk] = None
            continue
        rk = table + SEP + dumps(ev["key"], option=orjson.OPT_SORT_KEYS).decode()  # row_key
        if action == "delete":
            pk_change = bool(ev.get("pk_change_to"))
            events.append(row_delete(rk, table, pk_change=pk_change))
            if pk_change and known_rows.get(rk) is not None:
                departed[rk] = known_rows[rk]  # type: ignore[assignment]
            known_rows[rk] = None
            continue
        # not copied: nothing below changes it (a merge builds a new dict)
        row: dict[str, Any] = ev["row"]
        if "keep_columns" in ev or "partial" in ev or "replace_document" in ev:
            if merge_tables is not None and table not in merge_tables and needs_merges(ev):
                merge_tables.add(table)
                batch.merge_tables.append(table)
            if needs_base(ev):
                base = known_rows.get(rk)
                old_key = ev.get("pk_change_from")
                if base is None and isinstance(old_key, Mapping):
                    # the old row as its delete half left it (this batch, or kept by the
                    # store a day), else as the batch knows it (stored, or written earlier)
                    old_rk = row_key(table, old_key)
                    base = departed.get(old_rk) or gone.get(old_rk) or known_rows.get(old_rk)  # type: ignore[assignment]
                if base is None:
                    plan.merges_without_base += 1
                else:
                    merged = dict(base)
                    merged.update(row)
                    for col in ev.get("null_columns") or ():
                        merged[col] = None
                    row = merged
                patches = ev.get("json_patches")
                if patches:
                    if row is ev["row"]:
                        row = dict(row)
                    apply_json_patches(row, patches)
        source_json: str | None = None
        try:
            source_json = dumps(row).decode()
        except TypeError as exc:  # e.g. a schemaless integer beyond 64 bits
            not_json = exc
        lookups: Sequence[LookupEntryLike] | None = None
        try:
            if row_json_ok:
                outs = rules.evaluate_row(src_table, row, schema=schema, row_json=source_json)  # type: ignore[call-arg]
            else:
                outs = rules.evaluate_row(src_table, row, schema=schema)
            if param_rows is not None and src_table in param_tables:
                lookups = param_rows(src_table, row, schema)
        except Exception as exc:  # a rule that cannot be evaluated on this row
            dls.append(DeadLetter(rec, "rule_evaluation_error", str(exc), {"table": table}))
            continue
        if source_json is None:  # reported after a rule error, as before
            dls.append(DeadLetter(rec, "type_conversion_error", str(not_json), {"table": table}))
            continue
        known_rows[rk] = row
        keep_source = (
            merge_tables is None or table in merge_tables or len(source_json) >= TOAST_SAFE_BYTES
        )
        events.append(
            row_change(
                rk,
                table,
                output_entries(outs),
                source_json if keep_source else False,
                lookup_entries(lookups) if lookups is not None else None,
            )
        )
    plan.events += n
    return plan
