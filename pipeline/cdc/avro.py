"""Confluent-framed Avro (cdc-events.md §3.1, §3.3, §3.4)."""

from __future__ import annotations

from io import BytesIO
from typing import Any, Final

import fastavro

from pipeline.cdc.convert import ColumnSpec
from pipeline.cdc.registry import UNION_KEY

__all__ = ["AvroFrameError", "avro_spec", "read_datum", "reading_schema", "split_frame"]

_PRIMS: Final = {
    "null": "null",
    "boolean": "boolean",
    "int": "int32",
    "long": "int64",
    "float": "float",
    "double": "double",
    "bytes": "bytes",
    "string": "string",
}

#: Avro logical types -> Connect semantic names (used when ``connect.name`` is absent)
_LOGICAL: Final = {
    "date": "org.apache.kafka.connect.data.Date",
    "time-millis": "org.apache.kafka.connect.data.Time",
    "timestamp-millis": "org.apache.kafka.connect.data.Timestamp",
    "time-micros": "io.debezium.time.MicroTime",
    "timestamp-micros": "io.debezium.time.MicroTimestamp",
    "uuid": "io.debezium.data.Uuid",
}


class AvroFrameError(ValueError):
    """Not Confluent wire format: fewer than 5 bytes or magic byte other than 0x00."""

    def __init__(self, magic: int | None, length: int) -> None:
        self.magic_byte = magic
        super().__init__(
            f"not Confluent Avro framing: {length} bytes, first byte "
            + ("absent" if magic is None else f"0x{magic:02x}")
        )


def split_frame(data: bytes) -> int:
    """Schema id of a Confluent frame (the datum starts at byte 5)."""
    if len(data) < 5 or data[0] != 0:
        raise AvroFrameError(data[0] if data else None, len(data))
    return int.from_bytes(data[1:5], "big")


def _strip_logical(o: Any) -> Any:
    if isinstance(o, dict):
        return {
            k: _strip_logical(v)
            for k, v in o.items()
            if k not in ("logicalType", "__fastavro_parsed", "__named_schemas")
        }
    if isinstance(o, list):
        return [_strip_logical(x) for x in o]
    return o


def reading_schema(writer: dict[str, Any]) -> Any:
    """The writer schema without Avro logical types, parsed for fastavro.

    Reading raw primitives is markedly faster than letting fastavro build ``Decimal``,
    ``date`` and ``datetime`` objects, and the converters handle the raw forms (the
    column specs are built from the original schema, which keeps ``scale`` etc.).
    """
    schema: Any = writer.get(UNION_KEY, writer)
    try:
        return fastavro.parse_schema(_strip_logical(schema))
    except Exception:  # keep the writer schema as it is: converters accept both forms
        return schema


def read_datum(data: bytes, writer: Any) -> Any:
    """Decode the datum after the 5-byte header; raises ``ValueError`` on trailing bytes.

    ``writer`` is a parsed schema (a resolver's answer or :func:`reading_schema`).
    """
    schema: Any = writer.get(UNION_KEY, writer) if isinstance(writer, dict) else writer
    bio = BytesIO(data)
    bio.seek(5)
    datum = fastavro.schemaless_reader(bio, schema, None)
    left = len(data) - bio.tell()
    if left:
        raise ValueError(f"{left} trailing bytes after the Avro datum")
    return datum


def avro_spec(schema: Any, names: dict[str, Any] | None = None, _depth: int = 0) -> ColumnSpec:
    """Connect-level description of an Avro (writer) schema, parsed or not."""
    if names is None:
        names = {}
        named = schema.get("__named_schemas") if isinstance(schema, dict) else None
        if isinstance(named, dict):
            names.update(named)
    if _depth > 64:
        return ColumnSpec("any")
    if isinstance(schema, str):
        prim = _PRIMS.get(schema)
        if prim is not None:
            return ColumnSpec(prim)
        ref = names.get(schema)
        if ref is None:
            return ColumnSpec("any")
        return avro_spec(ref, names, _depth + 1)
    if isinstance(schema, list):
        branches = [b for b in schema if b != "null"]
        if len(branches) == 1:
            return avro_spec(branches[0], names, _depth + 1)
        for b in branches:  # register named types of every branch
            avro_spec(b, names, _depth + 1)
        return ColumnSpec("any")
    if not isinstance(schema, dict):
        return ColumnSpec("any")
    if UNION_KEY in schema:
        return avro_spec(schema[UNION_KEY], names, _depth + 1)
    t = schema.get("type")
    cname = schema.get("connect.name")
    raw_params = schema.get("connect.parameters")
    params: tuple[tuple[str, str], ...] = ()
    if isinstance(raw_params, dict):
        params = tuple((str(k), str(v)) for k, v in raw_params.items())
    if t in ("record", "error"):
        full = schema.get("name")
        if isinstance(full, str):
            ns = schema.get("namespace")
            if "." not in full and isinstance(ns, str) and ns:
                full = f"{ns}.{full}"
            names[full] = schema
        fields = tuple(
            (str(f["name"]), avro_spec(f["type"], names, _depth + 1))
            for f in schema.get("fields", ())
            if isinstance(f, dict) and "name" in f
        )
        return ColumnSpec("struct", cname, params, fields=fields)
    if t in ("enum", "fixed"):
        full = schema.get("name")
        if isinstance(full, str):
            names[full] = schema
        return ColumnSpec("string" if t == "enum" else "bytes", cname, params)
    if t == "array":
        return ColumnSpec(
            "array", cname, params, items=avro_spec(schema.get("items"), names, _depth + 1)
        )
    if t == "map":
        return ColumnSpec(
            "map", cname, params, values=avro_spec(schema.get("values"), names, _depth + 1)
        )
    if isinstance(t, dict | list):
        return avro_spec(t, names, _depth + 1)
    prim = _PRIMS.get(t) if isinstance(t, str) else None
    if prim is None:
        return avro_spec(t, names, _depth + 1) if isinstance(t, str) else ColumnSpec("any")
    ctype = schema.get("connect.type")
    if isinstance(ctype, str) and ctype in ("int8", "int16"):
        prim = ctype
    logical = schema.get("logicalType")
    if cname is None and isinstance(logical, str):
        if logical == "decimal":
            cname = "org.apache.kafka.connect.data.Decimal"
            if not any(k == "scale" for k, _ in params):
                params = (*params, ("scale", str(schema.get("scale", 0))))
        else:
            cname = _LOGICAL.get(logical)
    return ColumnSpec(prim, cname if isinstance(cname, str) else None, params)
