"""Kafka record -> exactly one normalised result (cdc-events.md §8.1).

:func:`decode_record` is pure apart from the schema resolver it is given. It never
raises for bad input (that becomes a ``dead_letter`` result); the only exception it
lets through is :class:`~pipeline.cdc.registry.RegistryUnavailable`, which the caller
must treat as "pause and retry".
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Final, Literal, TypeVar, cast

import orjson

from pipeline.cdc.avro import AvroFrameError, avro_spec, read_datum, reading_schema, split_frame
from pipeline.cdc.convert import (
    ANY,
    T_ANY,
    T_STR,
    Column,
    ColumnSpec,
    Conv,
    ConversionError,
    NeedsExactNumbers,
    Placeholder,
    RowFast,
    compact_json,
    compile_hints,
    compile_row_fast,
    compile_struct,
    generic_top,
    mongo_native,
    mongo_top,
)
from pipeline.cdc.events import (
    DeadLetterEvent,
    DecodedEvent,
    DeleteEvent,
    IgnoreEvent,
    JsonPatch,
    ProgressEvent,
    RowEvent,
    TruncateEvent,
    TxBeginEvent,
    TxBlock,
    TxEndEvent,
    UpsertEvent,
)
from pipeline.cdc.record import DEFAULT_OPTIONS, DecodeOptions, KafkaRecord
from pipeline.cdc.registry import (
    InvalidSchema,
    RegistryUnavailable,
    SchemaResolver,
    UnknownSchemaId,
)

log = logging.getLogger(__name__)

__all__ = ["decode_record", "normalise_tx_id"]

TopicFormat = Literal["auto", "json", "avro"]

_OPS: Final = frozenset({"c", "u", "d", "r", "t", "m"})
_TX_KEYS: Final = frozenset({"status", "id", "event_count", "data_collections", "ts_ms"})
KNOWN_KINDS: Final = frozenset(
    {"postgresql", "mysql", "mariadb", "mongodb", "sqlserver", "oracle", "db2", "informix",
     "vitess", "spanner", "jdbc"}
)  # fmt: skip
_CACHE_MAX: Final = 1024

_R = TypeVar("_R", UpsertEvent, DeleteEvent, TruncateEvent)


def _with_source_lsn(out: _R, src: dict[str, Any] | None, kind: str | None) -> _R:
    """PostgreSQL events carry their WAL position: ``source_lsn`` (``source.lsn``) and
    ``source_name`` (``source.name``, the connector's topic prefix), for exact write
    checkpoints (the processor records the highest applied LSN per connector)."""
    if src is None or kind != "postgresql":
        return out
    lsn, name = src.get("lsn"), src.get("name")
    if type(lsn) is int and lsn >= 0 and type(name) is str and name:
        out["source_lsn"] = lsn
        out["source_name"] = name
    return out


class _DL(Exception):
    def __init__(self, result: DeadLetterEvent) -> None:
        self.result = result


def _dead(reason: str, message: str, **details: Any) -> _DL:
    out: dict[str, Any] = {"action": "dead_letter", "reason": reason}
    out.update(details)
    out["message"] = message
    return _DL(cast(DeadLetterEvent, out))


def _ignore(reason: str) -> IgnoreEvent:
    return {"action": "ignore", "reason": reason}


# ---------------------------------------------------------------------------------------
# conversion plans, cached per schema
# ---------------------------------------------------------------------------------------


class _Plan:
    """Compiled converters for one key/value schema."""

    __slots__ = ("flat", "key_fast", "row", "row_fast")

    def __init__(self, spec: ColumnSpec) -> None:
        #: converters of the envelope's before/after row (envelope schemas)
        self.row: dict[str, Column] | None = None
        #: converters of the top-level struct's fields (keys, flattened rows)
        self.flat: dict[str, Column] | None = None
        #: straight-line versions for the common rows (None where not compiled)
        self.row_fast: RowFast | None = None
        self.key_fast: RowFast | None = None
        if spec.type != "struct" or not spec.fields:
            return
        fields = dict(spec.fields)
        if ("after" in fields or "before" in fields) and ("op" in fields or "source" in fields):
            image = fields.get("after") or fields.get("before")
            if image is not None and image.type == "struct":
                self.row = compile_struct(image)
                self.row_fast = compile_row_fast(self.row)
        else:
            self.flat = compile_struct(spec)
            self.key_fast = compile_row_fast(self.flat, toast=False)


def _put(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= _CACHE_MAX:
        try:
            del cache[next(iter(cache))]
        except (StopIteration, KeyError, RuntimeError):
            cache.clear()
    cache[key] = value


_JSON_PLANS: dict[bytes, _Plan] = {}
#: topic -> (schema text, plan, offset of ``,"payload":``) of the last key/value seen
_LAST_KEY: dict[str, tuple[bytes, _Plan, int]] = {}
_LAST_VALUE: dict[str, tuple[bytes, _Plan, int]] = {}
#: id(writer schema) -> (writer schema, plan, schema fastavro reads with)
_AVRO_PLANS: dict[int, tuple[dict[str, Any], _Plan, Any]] = {}
_HINT_PLANS: dict[int, tuple[Mapping[str, str], dict[str, str], dict[str, Column]]] = {}
_PLACEHOLDERS: dict[str, Placeholder] = {}


def json_spec(schema: Any, _depth: int = 0) -> ColumnSpec:
    """Connect-level description of an embedded JSON-converter schema (§2.2)."""
    if not isinstance(schema, dict) or _depth > 64:
        return ANY
    t = schema.get("type")
    t = t if isinstance(t, str) else "any"
    name = schema.get("name")
    name = name if isinstance(name, str) else None
    raw = schema.get("parameters")
    params = tuple((str(k), str(v)) for k, v in raw.items()) if isinstance(raw, dict) else ()
    if t == "struct":
        fields = tuple(
            (str(f["field"]), json_spec(f, _depth + 1))
            for f in schema.get("fields") or ()
            if isinstance(f, dict) and f.get("field") is not None
        )
        return ColumnSpec("struct", name, params, fields=fields)
    if t == "array":
        return ColumnSpec("array", name, params, items=json_spec(schema.get("items"), _depth + 1))
    if t == "map":
        return ColumnSpec("map", name, params, values=json_spec(schema.get("values"), _depth + 1))
    return ColumnSpec(t, name, params)


def normalise_tx_id(tx_id: str, kind: str | None) -> str:
    """Transaction key (§1.5): PostgreSQL ``txId:lsn`` -> ``txId``; others unchanged."""
    if kind == "postgresql":
        return tx_id.partition(":")[0]
    if kind is None or kind not in KNOWN_KINDS:
        head, sep, tail = tx_id.partition(":")
        if sep and head.isdigit() and tail.isdigit():
            return head
    return tx_id


def _mongo_path(dotted: str) -> tuple[str, str]:
    """``dims.w`` -> (``dims``, ``$.w``); ``tags.2`` -> (``tags``, ``$[2]``)."""
    col, _, rest = dotted.partition(".")
    path = "$"
    for part in rest.split(".") if rest else ():
        if part.isdigit():
            path += f"[{part}]"
        elif part.isidentifier():
            path += "." + part
        else:
            path += '."' + part.replace('"', '\\"') + '"'
    return col, path


# ---------------------------------------------------------------------------------------
# the decoder
# ---------------------------------------------------------------------------------------


class _Ctx:
    __slots__ = ("avro", "exact", "hints", "key_plan", "kinds", "opts", "ph", "rec", "schemas")

    def __init__(
        self,
        rec: KafkaRecord,
        schemas: SchemaResolver | None,
        hints: Mapping[str, Mapping[str, str]] | None,
        kinds: Mapping[str, str] | None,
        opts: DecodeOptions,
        avro: bool,
    ) -> None:
        self.rec = rec
        self.schemas = schemas
        self.hints = hints
        self.kinds = kinds
        self.opts = opts
        self.avro = avro
        self.exact = False
        self.key_plan: _Plan | None = None
        text = opts.unavailable_value_placeholder
        ph = _PLACEHOLDERS.get(text)
        if ph is None:
            ph = _PLACEHOLDERS[text] = Placeholder(text)
        self.ph = ph

    # -- parsing ----------------------------------------------------------------------

    def _loads_payload(self, data: bytes) -> Any:
        if self.exact:
            return json.loads(data.decode("utf-8"), parse_float=Decimal)
        return orjson.loads(data)

    def _loads(self, data: bytes, which: str) -> Any:
        if self.exact:
            try:
                return json.loads(data.decode("utf-8"), parse_float=Decimal)
            except (ValueError, RecursionError) as exc:
                raise _dead("invalid_json", f"{which} is not valid JSON: {exc}") from None
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            first = exc
        # second opinion: the stdlib accepts a few things orjson refuses
        try:
            doc = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError):
            raise _dead("invalid_json", f"{which} is not valid UTF-8 JSON: {first}") from None
        try:
            json.dumps(doc, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise _dead(
                "type_conversion_error",
                f"{which} contains text that is not valid Unicode (lone surrogate escape)",
            ) from None
        except (ValueError, RecursionError):
            pass
        return doc

    def _json_plan(self, schema: Any, data: bytes) -> _Plan:
        try:
            key: bytes | None = orjson.dumps(schema, default=str)
        except TypeError:
            key = None
        plan = _JSON_PLANS.get(key) if key is not None else None
        if plan is None:
            try:
                plan = _Plan(json_spec(schema))
            except (TypeError, KeyError, ValueError, AttributeError, RecursionError) as exc:
                raise _dead(
                    "envelope_inconsistent",
                    f"the record's embedded schema is malformed ({type(exc).__name__}: {exc})",
                ) from None
            if key is not None:
                _put(_JSON_PLANS, key, plan)
        # register the raw schema text for the fast path (payload-only parsing)
        if data[:10] == b'{"schema":':
            i = data.find(b',"payload":', 10)
            if i > 0:
                raw = data[10:i]
                if raw != key:
                    try:
                        same = orjson.loads(raw) == schema
                    except orjson.JSONDecodeError:
                        same = False
                    if same:
                        _put(_JSON_PLANS, raw, plan)
        return plan

    def _json_part(self, data: bytes, which: str) -> tuple[Any, _Plan | None]:
        # Fast path: the schema text is one we have verified and compiled before, so only
        # the payload is parsed. ``{"schema":S,"payload":P}`` with a known, complete S and
        # a P that parses on its own can only mean exactly that document.
        if data[-1:] == b"}" and data.startswith(b'{"schema":'):
            last_by_topic = _LAST_VALUE if which == "value" else _LAST_KEY
            topic = self.rec.topic
            last = last_by_topic.get(topic)
            if last is not None:
                text, plan, end = last
                if data.startswith(text, 10) and data.startswith(b',"payload":', end):
                    try:
                        if not self.exact:  # orjson reads a bytes slice faster than a view
                            return orjson.loads(data[end + 11 : -1]), plan
                        return self._loads_payload(data[end + 11 : -1]), plan
                    except ValueError:
                        pass  # let the full parse decide
            i = data.find(b',"payload":', 10)
            if i > 0:
                text = data[10:i]
                known = _JSON_PLANS.get(text)
                if known is not None:
                    plan = known
                    try:
                        payload = self._loads_payload(data[i + 11 : -1])
                    except ValueError:
                        pass
                    else:
                        if len(last_by_topic) >= _CACHE_MAX:
                            last_by_topic.clear()
                        last_by_topic[topic] = (text, plan, i)
                        return payload, plan
        doc = self._loads(data, which)
        if type(doc) is dict and len(doc) == 2 and "schema" in doc and "payload" in doc:
            return doc["payload"], self._json_plan(doc["schema"], data)
        return doc, None

    def _avro_part(self, data: bytes, which: str) -> tuple[Any, _Plan | None]:
        try:
            sid = split_frame(data)
        except AvroFrameError as exc:
            raise _dead("wrong_magic_byte", f"{which}: {exc}", magic_byte=exc.magic_byte) from None
        if self.schemas is None:
            raise _dead(
                "unknown_schema_id",
                f"{which} is Avro with schema id {sid} but no schema registry is configured",
                schema_id=sid,
            )
        try:
            writer = self.schemas.get(sid)
        except UnknownSchemaId as exc:
            raise _dead("unknown_schema_id", f"{which}: {exc}", schema_id=sid) from None
        except InvalidSchema as exc:
            raise _dead("avro_decode_error", f"{which}: {exc}", schema_id=sid) from None
        entry = _AVRO_PLANS.get(id(writer))
        if entry is None or entry[0] is not writer:
            entry = (writer, _Plan(avro_spec(writer)), reading_schema(writer))
            _put(_AVRO_PLANS, id(writer), entry)
        try:
            datum = read_datum(data, entry[2])
        except UnicodeDecodeError as exc:
            raise _dead(
                "type_conversion_error",
                f"{which}: Avro string is not valid UTF-8 (schema id {sid}): {exc}",
                schema_id=sid,
            ) from None
        except Exception as exc:  # fastavro raises EOFError, ValueError, IndexError, ...
            raise _dead(
                "avro_decode_error",
                f"{which} does not decode with writer schema {sid}: {type(exc).__name__}: {exc}",
                schema_id=sid,
            ) from None
        return datum, entry[1]

    def _part(self, data: bytes, which: str) -> tuple[Any, _Plan | None]:
        if self.avro:
            return self._avro_part(data, which)
        return self._json_part(data, which)

    # -- identity helpers ---------------------------------------------------------------

    def _kind_hint(self) -> str | None:
        kinds = self.kinds
        topic = self.rec.topic
        if kinds:
            k = kinds.get(topic.partition(".")[0])
            if k:
                return k
            best = ""
            for prefix, kd in kinds.items():
                if len(prefix) > len(best) and topic.startswith(prefix + "."):
                    best, k = prefix, kd
            if k:
                return k
        for hk, hv in self.rec.headers:
            if hk == "__debezium.context.connectorName" and hv:
                v = hv.decode("utf-8", "replace") if isinstance(hv, bytes) else str(hv)
                if v in KNOWN_KINDS:
                    return v
        return None

    def _topic_ids(self) -> tuple[str | None, str]:
        """(schema, table) from ``prefix.schema.table``; only the table for other shapes."""
        parts = self.rec.topic.split(".")
        if len(parts) == 3:
            return parts[1], parts[2]
        return None, parts[-1]

    def _hint_cols(self, table: str) -> dict[str, Column] | None:
        hints = self.hints
        if not hints:
            return None
        m = hints.get(table)
        if not m:
            return None
        e = _HINT_PLANS.get(id(m))
        if e is not None and e[0] is m and e[1] == m:
            return e[2]
        cols = compile_hints(m)
        _put(_HINT_PLANS, id(m), (m, dict(m), cols))
        return cols

    def _header(self, name: str) -> bytes | None:
        for hk, hv in self.rec.headers:
            if hk == name and hv is not None:
                return hv.encode("utf-8") if isinstance(hv, str) else hv
        return None

    # -- rows and keys ------------------------------------------------------------------

    def _row(
        self,
        data: dict[str, Any],
        cols: dict[str, Column] | None,
        *,
        toast: bool = True,
        skip_prefix: str | None = None,
    ) -> tuple[dict[str, Any], list[str] | None]:
        row: dict[str, Any] = {}
        keep: list[str] | None = None
        ph = self.ph
        text = ph.text
        get = cols.get if cols is not None else None
        for name, v in data.items():
            if skip_prefix is not None and name.startswith(skip_prefix):
                continue
            if v is None:
                row[name] = None
                continue
            c = get(name) if get is not None else None
            conv: Conv
            if c is None:
                conv, tk = generic_top, T_ANY
            else:
                conv, tk = c
            if toast and tk and ((v == text) if tk == T_STR else ph.matches(tk, v)):
                if keep is None:
                    keep = [name]
                else:
                    keep.append(name)
                continue
            row[name] = conv(v)
        return row, keep

    def _key_value(
        self, payload: Any, plan: _Plan | None, kind: str | None, table: str, mongo: bool
    ) -> dict[str, Any]:
        if payload is None:
            raise _dead("missing_key", "row event with a null key (JSON null)")
        if type(payload) is not dict:
            raise _dead("not_an_envelope", f"key is not a struct: {str(payload)[:80]}")
        if mongo or (kind is None and _looks_like_mongo_key(payload)):
            return {"_id": _mongo_key(payload)}
        if plan is not None and plan.key_fast is not None:
            key = plan.key_fast(payload, self.ph)
            if key is not None:
                return key
        cols = plan.flat if plan is not None else self._hint_cols(table)
        return self._row(payload, cols, toast=False)[0]

    def _key(self, kind: str | None, table: str, mongo: bool) -> dict[str, Any]:
        raw = self.rec.key
        if raw is None:
            raise _dead("missing_key", "row event without a Kafka key")
        payload, plan = self._avro_part(raw, "key") if self.avro else self._json_part(raw, "key")
        self.key_plan = plan
        return self._key_value(payload, plan, kind, table, mongo)

    def _header_key(self, name: str, kind: str | None, table: str) -> dict[str, Any] | None:
        raw = self._header(name)
        if raw is None:
            return None
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if type(obj) is dict and len(obj) == 2 and "schema" in obj and "payload" in obj:
            obj = obj["payload"]
        if type(obj) is not dict:
            return None
        try:
            return self._key_value(obj, self.key_plan, kind, table, False)
        except (_DL, ConversionError, NeedsExactNumbers):
            try:
                return {k: generic_top(v) for k, v in obj.items()}
            except ConversionError:
                return None

    def _tx_block(self, t: Any, kind: str | None) -> TxBlock | None:
        if t is None:
            return None
        if type(t) is not dict:
            raise _dead("envelope_inconsistent", "transaction block is not a struct")
        tid = t.get("id")
        try:
            if type(tid) is not str:
                raise TypeError("id")
            return {
                "id": normalise_tx_id(tid, kind),
                "total_order": int(t["total_order"]),
                "data_collection_order": int(t["data_collection_order"]),
            }
        except (KeyError, TypeError, ValueError):
            raise _dead(
                "envelope_inconsistent", f"malformed transaction block {str(t)[:120]}"
            ) from None

    # -- record kinds -------------------------------------------------------------------

    def run(self) -> DecodedEvent:
        rec = self.rec
        topic = rec.topic
        hb = self.opts.heartbeat_topic_prefix
        if topic.startswith(hb) and topic[len(hb) : len(hb) + 1] == ".":
            return self._heartbeat(topic[len(hb) + 1 :])
        kinds = self.kinds
        if kinds and topic in kinds:
            return _ignore("schema_change_topic")  # the topic named exactly like a prefix
        value = rec.value
        if value is None:
            return self._tombstone()
        if self.avro:
            payload, plan = self._avro_part(value, "value")
        else:
            payload, plan = self._json_part(value, "value")
        if payload is None:
            return self._flat_null()
        if type(payload) is not dict:
            raise _dead(
                "not_an_envelope", f"value is a JSON {type(payload).__name__}, not an object"
            )
        if "op" in payload or ("source" in payload and ("before" in payload or "after" in payload)):
            return self._envelope(payload, plan)
        st = payload.get("status")
        if (st == "BEGIN" or st == "END") and "id" in payload and payload.keys() <= _TX_KEYS:
            return self._tx(payload)
        src = payload.get("source")
        if (
            "ddl" in payload
            or "tableChanges" in payload
            or (type(src) is dict and src.get("name") == topic)
        ):
            return _ignore("schema_change_topic")
        return self._flat(payload, plan)

    def _heartbeat(self, connector: str) -> ProgressEvent | IgnoreEvent:
        if self.rec.value is None:
            return _ignore("heartbeat_tombstone")
        payload, _ = self._part(self.rec.value, "value")
        ts = payload.get("ts_ms") if type(payload) is dict else None
        if type(ts) is not int:
            ts = self.rec.timestamp_ms
        return {"action": "progress", "connector": connector, "ts_ms": ts}

    def _tx_connector(self) -> str:
        logical = self._header("__debezium.context.connectorLogicalName")
        if logical:
            return logical.decode("utf-8", "replace")
        topic = self.rec.topic
        if self.kinds:
            best = ""
            for prefix in self.kinds:
                if len(prefix) > len(best) and topic.startswith(prefix + "."):
                    best = prefix
            if best:
                return best
        suffix = "." + self.opts.transaction_topic_suffix
        if topic.endswith(suffix) and len(topic) > len(suffix):
            return topic[: -len(suffix)]
        return topic.rsplit(".", 1)[0]

    def _tx(self, p: dict[str, Any]) -> TxBeginEvent | TxEndEvent:
        connector = self._tx_connector()
        kind = (self.kinds.get(connector) if self.kinds else None) or self._kind_hint()
        raw_id = p["id"]
        if type(raw_id) is not str:
            raise _dead("envelope_inconsistent", "transaction marker without a string id")
        tx_id = normalise_tx_id(raw_id, kind)
        if p["status"] == "BEGIN":
            return {"action": "tx_begin", "connector": connector, "tx_id": tx_id}
        try:
            count = int(p["event_count"])
            collections: dict[str, int] = {}
            for item in p.get("data_collections") or ():
                dc = item["data_collection"]
                if type(dc) is not str:
                    raise TypeError("data_collection")
                table = f"{connector}.{dc}"
                collections[table] = collections.get(table, 0) + int(item["event_count"])
        except (KeyError, TypeError, ValueError):
            raise _dead(
                "envelope_inconsistent", f"malformed transaction END marker {str(p)[:160]}"
            ) from None
        return {
            "action": "tx_end",
            "connector": connector,
            "tx_id": tx_id,
            "event_count": count,
            "data_collections": collections,
        }

    def _with_ids(self, out: _R, source_schema: str | None, source_table: str | None) -> _R:
        if source_table:
            out["source_table"] = source_table
        if source_schema:
            out["source_schema"] = source_schema
        return out

    def _tombstone(self) -> DeleteEvent:
        kind = self._kind_hint()
        topic = self.rec.topic
        key = self._key(kind, topic, kind == "mongodb")
        sschema, stable = self._topic_ids()
        out: DeleteEvent = {"action": "delete", "table": topic, "key": key, "tombstone": True}
        return self._with_ids(out, sschema, stable)

    def _flat_null(self) -> DeleteEvent:
        kind = self._kind_hint()
        topic = self.rec.topic
        key = self._key(kind, topic, kind == "mongodb")
        sschema, stable = self._topic_ids()
        out: DeleteEvent = {"action": "delete", "table": topic, "key": key}
        return self._with_ids(out, sschema, stable)

    def _flat(self, p: dict[str, Any], plan: _Plan | None) -> UpsertEvent | DeleteEvent:
        meta = self.opts.metadata_prefix
        kind = self._kind_hint()
        topic = self.rec.topic
        sschema, stable = self._topic_ids()
        t = p.get(meta + "table")
        if type(t) is str and t:
            stable = t
        s = p.get(meta + "schema")
        if type(s) is str and s:
            sschema = s
        elif kind in ("mysql", "mariadb", "mongodb"):
            db = p.get(meta + "db")
            if type(db) is str and db:
                sschema = db
        deleted = p.get(meta + "deleted")
        fop = p.get(meta + "op")
        mongo = kind == "mongodb"
        key = self._key(kind, topic, mongo)
        if deleted is True or deleted == "true" or fop == "d":
            gone: DeleteEvent = {"action": "delete", "table": topic, "key": key}
            return self._with_ids(gone, sschema, stable)
        keep: list[str] | None = None
        if mongo:
            row = {k: mongo_top(v) for k, v in p.items() if not k.startswith(meta)}
        else:
            cols = plan.flat if plan is not None else self._hint_cols(topic)
            row, keep = self._row(p, cols, skip_prefix=meta)
        out: UpsertEvent = {"action": "upsert", "table": topic, "key": key, "row": row}
        if keep:
            out["keep_columns"] = keep
        if fop == "r":
            out["snapshot"] = True
        return self._with_ids(out, sschema, stable)

    def _envelope(self, p: dict[str, Any], plan: _Plan | None) -> RowEvent | IgnoreEvent:
        op = p.get("op")
        if op is None:
            raise _dead("missing_op", "envelope without 'op'")
        if type(op) is not str or op not in _OPS:
            raise _dead("unknown_op", f"unknown op {str(op)[:40]!r}")
        if op == "m":
            return _ignore("logical_decoding_message")
        src = p.get("source")
        if type(src) is not dict:
            src = None
        kind = src.get("connector") if src is not None else None
        if type(kind) is not str:
            kind = self._kind_hint()
        table = self.rec.topic
        sschema: str | None = None
        stable: str | None = None
        if src is not None:
            tbl = src.get("table")
            if type(tbl) is not str or not tbl:
                tbl = src.get("collection")
            mid = src.get("schema")
            if type(mid) is not str or not mid:
                mid = src.get("db")
            name = src.get("name")
            if type(tbl) is str and tbl:
                stable = tbl
                sschema = mid if type(mid) is str and mid else None
                if type(name) is str and name and sschema:
                    table = f"{name}.{sschema}.{tbl}"
            elif op == "t":
                raise _dead("envelope_inconsistent", "truncate event whose source names no table")
        if stable is None:
            sschema, stable = self._topic_ids()
        t = p.get("transaction")
        tx = None if t is None else self._tx_block(t, kind)
        if op == "t":
            trunc: TruncateEvent = {"action": "truncate", "table": table}
            if tx is not None:
                trunc["tx"] = tx
            return _with_source_lsn(self._with_ids(trunc, sschema, stable), src, kind)
        after = p.get("after")
        mongo = kind == "mongodb" or type(after) is str or type(p.get("before")) is str
        if op == "d":
            key = self._key(kind, table, mongo)
            dele: DeleteEvent = {"action": "delete", "table": table, "key": key}
            if tx is not None:
                dele["tx"] = tx
            if not mongo:
                to = self._header_key("__debezium.newkey", kind, table)
                if to is not None:
                    dele["pk_change_to"] = to
            return _with_source_lsn(self._with_ids(dele, sschema, stable), src, kind)
        out: UpsertEvent
        if mongo:
            out = self._mongo_upsert(p, after, op, kind, table)
        else:
            if type(after) is not dict:
                raise _dead("envelope_inconsistent", f"op '{op}' without an 'after' row")
            key = self._key(kind, table, False)
            fast = plan.row_fast(after, self.ph) if plan is not None and plan.row_fast else None
            if fast is not None:
                row, keep = fast, None
            else:
                cols = plan.row if plan is not None else self._hint_cols(table)
                row, keep = self._row(after, cols)
            out = {"action": "upsert", "table": table, "key": key, "row": row}
            if keep:
                out["keep_columns"] = keep
        if op == "r":
            out["snapshot"] = True
        if tx is not None:
            out["tx"] = tx
        if not mongo and self.rec.headers:
            frm = self._header_key("__debezium.oldkey", kind, table)
            if frm is not None:
                out["pk_change_from"] = frm
        return _with_source_lsn(self._with_ids(out, sschema, stable), src, kind)

    def _mongo_upsert(
        self, p: dict[str, Any], after: Any, op: str, kind: str | None, table: str
    ) -> UpsertEvent:
        doc: Any = None
        if type(after) is str:
            try:
                doc = orjson.loads(after)
            except orjson.JSONDecodeError as exc:
                raise _dead(
                    "invalid_json", f"MongoDB 'after' document is not JSON: {exc}"
                ) from None
            if type(doc) is not dict:
                raise _dead("envelope_inconsistent", "MongoDB 'after' is not a document")
        elif type(after) is dict:
            doc = after
        if doc is not None:
            key = self._key(kind, table, True)
            return {
                "action": "upsert",
                "table": table,
                "key": key,
                "row": {k: mongo_top(v) for k, v in doc.items()},
                "replace_document": True,
            }
        ud = p.get("updateDescription")
        if op != "u" or type(ud) is not dict:
            raise _dead(
                "envelope_inconsistent",
                f"MongoDB op '{op}' with neither 'after' nor 'updateDescription'",
            )
        updated = ud.get("updatedFields")
        if type(updated) is str:
            try:
                updated = orjson.loads(updated)
            except orjson.JSONDecodeError as exc:
                raise _dead("invalid_json", f"updatedFields is not JSON: {exc}") from None
        if updated is None:
            updated = {}
        removed = ud.get("removedFields") or []
        truncated = ud.get("truncatedArrays") or []
        if type(updated) is not dict or type(removed) is not list or type(truncated) is not list:
            raise _dead("envelope_inconsistent", "malformed MongoDB updateDescription")
        key = self._key(kind, table, True)
        row: dict[str, Any] = {}
        nulls: list[str] = []
        patches: list[JsonPatch] = []
        for f, v in updated.items():
            if "." in f:
                col, path = _mongo_path(f)
                patches.append(
                    {
                        "column": col,
                        "op": "set",
                        "path": path,
                        "value": compact_json(mongo_native(v)),
                    }
                )
            else:
                row[f] = mongo_top(v)
        for f in removed:
            if type(f) is not str:
                continue
            if "." in f:
                col, path = _mongo_path(f)
                patches.append({"column": col, "op": "remove", "path": path})
            else:
                nulls.append(f)
        for t in truncated:
            try:
                col, path = _mongo_path(str(t["field"]))
                patches.append(
                    {"column": col, "op": "truncate", "path": path, "size": int(t["size"])}
                )
            except (KeyError, TypeError, ValueError):
                raise _dead(
                    "envelope_inconsistent", f"malformed truncatedArrays entry {t!r}"
                ) from None
        out: UpsertEvent = {
            "action": "upsert",
            "table": table,
            "key": key,
            "row": row,
            "null_columns": nulls,
            "partial": True,
        }
        if patches:
            out["json_patches"] = patches
        return out


def _looks_like_mongo_key(payload: dict[str, Any]) -> bool:
    if len(payload) != 1:
        return False
    v = payload.get("id")
    if type(v) is not str:
        return False
    return v.startswith('{"$') or (len(v) >= 2 and v[0] == '"' and v[-1] == '"')


def _mongo_key(payload: dict[str, Any]) -> Any:
    v = payload.get("id")
    if v is None and len(payload) == 1:
        v = next(iter(payload.values()))
    if type(v) is str:
        try:
            v = orjson.loads(v)
        except orjson.JSONDecodeError:
            raise ConversionError(f"MongoDB key id is not Extended JSON: {v[:80]!r}") from None
    if v is None:
        raise _dead("missing_key", "MongoDB key without an id")
    return mongo_top(v)


#: whether :func:`decode_record` tries :func:`_fast_row_event` first (tests turn it off)
FAST_PATH = True


def _fast_row_event(record: KafkaRecord, opts: DecodeOptions) -> UpsertEvent | None:
    """The common record in one pass: a JSON-converter Debezium envelope (``c``, ``u`` or
    ``r``) of a relational connector whose key and value schemas the decoder has seen
    last on this topic, with no ``__debezium.oldkey`` header (a primary-key change) and
    a well-formed transaction block if any, whose key and row
    the straight-line converters take. It gives exactly what :meth:`_Ctx.run` gives for
    such a record; for any other record (or any doubt: a conversion error, an inexact
    number) it returns None and the general path decides."""
    topic = record.topic
    value = record.value
    key = record.key
    last = _LAST_VALUE.get(topic)
    last_key = _LAST_KEY.get(topic)
    if last is None or last_key is None or value is None or key is None:
        return None
    for hk, hv in record.headers:  # context headers are fine; a primary-key change is not
        if hv is not None and hk == "__debezium.oldkey":
            return None
    text, plan, end = last
    row_fast = plan.row_fast
    ktext, kplan, kend = last_key
    key_fast = kplan.key_fast
    if (
        row_fast is None
        or key_fast is None
        or value[-1:] != b"}"
        or key[-1:] != b"}"
        or not value.startswith(b'{"schema":')
        or not value.startswith(text, 10)
        or not value.startswith(b',"payload":', end)
        or not key.startswith(b'{"schema":')
        or not key.startswith(ktext, 10)
        or not key.startswith(b',"payload":', kend)
    ):
        return None
    hb = opts.heartbeat_topic_prefix
    if topic.startswith(hb) and topic[len(hb) : len(hb) + 1] == ".":
        return None
    try:
        p = orjson.loads(value[end + 11 : -1])
        kp = orjson.loads(key[kend + 11 : -1])
    except ValueError:
        return None
    if type(p) is not dict or type(kp) is not dict:
        return None
    op = p.get("op")
    if op != "c" and op != "u" and op != "r":
        return None
    src = p.get("source")
    after = p.get("after")
    if type(src) is not dict or type(after) is not dict or type(p.get("before")) is str:
        return None
    kind = src.get("connector")
    tbl = src.get("table")
    if type(kind) is not str or kind == "mongodb" or type(tbl) is not str or not tbl:
        return None
    t = p.get("transaction")
    tx: TxBlock | None = None
    if t is not None:  # _Ctx._tx_block for a well-formed block
        if type(t) is not dict:
            return None
        tid = t.get("id")
        total, dco = t.get("total_order"), t.get("data_collection_order")
        if type(tid) is not str or type(total) is not int or type(dco) is not int:
            return None
        tx = {
            "id": normalise_tx_id(tid, kind),
            "total_order": total,
            "data_collection_order": dco,
        }
    mid = src.get("schema")
    if type(mid) is not str or not mid:
        mid = src.get("db")
    sschema = mid if type(mid) is str and mid else None
    name = src.get("name")
    table = f"{name}.{sschema}.{tbl}" if type(name) is str and name and sschema else topic
    text_ph = opts.unavailable_value_placeholder
    ph = _PLACEHOLDERS.get(text_ph)
    if ph is None:
        ph = _PLACEHOLDERS[text_ph] = Placeholder(text_ph)
    try:
        k = key_fast(kp, ph)
        row = row_fast(after, ph)
    except Exception:  # the general path gives the verdict (dead letter, exact numbers)
        return None
    if k is None or row is None:
        return None
    out: UpsertEvent = {"action": "upsert", "table": table, "key": k, "row": row}
    if op == "r":
        out["snapshot"] = True
    if tx is not None:
        out["tx"] = tx
    out["source_table"] = tbl
    if sschema:
        out["source_schema"] = sschema
    if kind == "postgresql":
        lsn = src.get("lsn")
        if type(lsn) is int and lsn >= 0 and type(name) is str and name:
            out["source_lsn"] = lsn
            out["source_name"] = name
    return out


def decode_record(
    record: KafkaRecord,
    *,
    schemas: SchemaResolver | None = None,
    max_record_bytes: int = 1_048_576,
    topic_format: TopicFormat = "auto",
    type_hints: Mapping[str, Mapping[str, str]] | None = None,
    connector_kinds: Mapping[str, str] | None = None,
    options: DecodeOptions | None = None,
) -> DecodedEvent:
    """Decode one Kafka record into one normalised result (cdc-events.md §8.1).

    * ``topic_format="auto"`` treats the record as Confluent Avro when its key or value
      starts with the magic byte 0x00 (JSON text never does), else as JSON.
    * ``type_hints``: ``{table_id: {column: semantic type}}`` for schemaless JSON (§2.3);
      a hint may carry parameters: ``org.apache.kafka.connect.data.Decimal;scale=2``.
    * ``connector_kinds``: ``{topic.prefix: "postgresql" | "mysql" | "mongodb"}``; needed
      to recognise MongoDB keys on tombstones and flattened records when the record has
      no context headers, and to short-cut the schema-change topic.
    * Raises :class:`RegistryUnavailable` only; everything else becomes a result.
    """
    key = record.key
    value = record.value
    size = (0 if key is None else len(key)) + (0 if value is None else len(value))
    if size > max_record_bytes:
        return _dead(
            "oversize",
            f"key + value are {size} bytes, above the limit of {max_record_bytes}",
            limit_bytes=max_record_bytes,
        ).result
    if key is None and value is None:
        return _ignore("empty_record")
    if topic_format == "auto":
        avro = (value is not None and value[:1] == b"\x00") or (
            key is not None and key[:1] == b"\x00"
        )
    elif topic_format == "avro":
        avro = True
    elif topic_format == "json":
        avro = False
    else:
        raise ValueError(f"topic_format must be auto, json or avro, not {topic_format!r}")
    opts = options or DEFAULT_OPTIONS
    if FAST_PATH and not avro and not (connector_kinds and record.topic in connector_kinds):
        fast = _fast_row_event(record, opts)
        if fast is not None:
            return fast
    ctx = _Ctx(record, schemas, type_hints, connector_kinds, opts, avro)
    try:
        try:
            return ctx.run()
        except NeedsExactNumbers:
            # a decimal column arrived as a JSON number: parse again with exact decimals
            ctx.exact = True
            return ctx.run()
    except _DL as dl:
        return dl.result
    except ConversionError as exc:
        return _dead("type_conversion_error", str(exc)).result
    except NeedsExactNumbers:
        return _dead(
            "type_conversion_error", "decimal column holds a binary floating-point number"
        ).result
    except (RegistryUnavailable, MemoryError):
        raise
    except Exception as exc:  # a decoder bug must not block the partition
        log.exception(
            "unexpected error decoding %s/%s@%s", record.topic, record.partition, record.offset
        )
        return _dead("internal_error", f"unexpected {type(exc).__name__}: {exc}").result
