"""Value conversion to SQLite-ready canonical values (cdc-events.md §3.5, §3.6, §7).

Every Connect column is described by a :class:`ColumnSpec` (built from an embedded
JSON schema, an Avro writer schema or a type hint) and compiled once into a
converter function. Converters take a non-null value and return the canonical
value: ``int``, ``float``, ``str`` or ``None``. They raise :class:`ConversionError`
for values that cannot be converted (bad base64, out-of-range temporal values, ...).

Inside arrays, maps and structs the *JSON-native* form is used (booleans stay
``true``/``false``, decimals and temporal values become strings, bytes base64) and
the container is rendered as compact JSON text.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Context, Decimal, InvalidOperation
from typing import Any, Final

import orjson

log = logging.getLogger(__name__)

Conv = Callable[[Any], Any]

__all__ = [
    "ColumnSpec",
    "ConversionError",
    "NeedsExactNumbers",
    "Placeholder",
    "compact_json",
    "compile_column",
    "format_unscaled",
]


class ConversionError(ValueError):
    """A value that cannot be converted to its canonical form (``type_conversion_error``)."""


class NeedsExactNumbers(Exception):
    """A decimal column arrived as a binary float: the JSON must be re-parsed exactly."""


# ---------------------------------------------------------------------------------------
# column descriptions
# ---------------------------------------------------------------------------------------

CONNECT_PRIMITIVES: Final = frozenset(
    {"int8", "int16", "int32", "int64", "float", "float32", "float64", "double", "boolean",
     "string", "bytes"}
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ColumnSpec:
    """Connect type of one column: ``type`` plus optional semantic ``name`` and parameters.

    ``type`` is a Connect type (``int8`` .. ``int64``, ``float``, ``double``, ``boolean``,
    ``string``, ``bytes``, ``array``, ``map``, ``struct``) or ``any`` when unknown.
    """

    type: str
    name: str | None = None
    params: tuple[tuple[str, str], ...] = ()
    items: ColumnSpec | None = None
    values: ColumnSpec | None = None
    fields: tuple[tuple[str, ColumnSpec], ...] | None = None

    def param(self, key: str) -> str | None:
        for k, v in self.params:
            if k == key:
                return v
        return None


ANY: Final = ColumnSpec("any")


# ---------------------------------------------------------------------------------------
# primitives
# ---------------------------------------------------------------------------------------


def _json_default(o: Any) -> Any:
    if isinstance(o, Decimal):
        if o.is_finite():
            return float(o)
        return None
    if isinstance(o, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(o)).decode("ascii")
    raise TypeError(f"cannot render {type(o).__name__} as JSON")


def _sanitize(o: Any) -> Any:
    """For the stdlib fallback: NaN/Infinity become null, as orjson renders them."""
    if isinstance(o, float):
        return o if o == o and o not in (float("inf"), float("-inf")) else None
    if isinstance(o, dict):
        return {k: _sanitize(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_sanitize(v) for v in o]
    return o


def compact_json(o: Any) -> str:
    """UTF-8 JSON text without insignificant whitespace, non-ASCII kept, key order kept."""
    try:
        return orjson.dumps(o, default=_json_default).decode("utf-8")
    except TypeError:
        # integers beyond 64 bits (orjson refuses them); rare, so the slow path is fine
        try:
            return json.dumps(
                _sanitize(o),
                separators=(",", ":"),
                ensure_ascii=False,
                default=_json_default,
                allow_nan=False,
            )
        except (TypeError, ValueError) as exc:
            raise ConversionError(f"value cannot be rendered as JSON: {exc}") from None


def b64_bytes(v: str) -> bytes:
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise ConversionError(f"invalid base64 {_short(v)}") from None


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


_INFS: Final = (float("inf"), float("-inf"))


def _int(v: Any) -> int:
    t = type(v)
    if t is int:
        return v
    if t is bool:
        return 1 if v else 0
    if (t is float or t is Decimal) and v == v and v not in _INFS and int(v) == v:
        return int(v)
    raise ConversionError(f"expected an integer, got {_short(v)}")


def _int_native(v: Any) -> Any:
    return None if v is None else _int(v)


_FLOAT_WORDS: Final = {"NaN": None, "Infinity": float("inf"), "-Infinity": float("-inf")}


def _float(v: Any) -> float | None:
    t = type(v)
    if t is float:
        return v if v == v else None
    if t is int or t is Decimal:
        f = float(v)
        return f if f == f else None
    if t is str:
        if v in _FLOAT_WORDS:
            return _FLOAT_WORDS[v]
        raise ConversionError(f"expected a number, got {_short(v)}")
    if t is bool:
        return 1.0 if v else 0.0
    raise ConversionError(f"expected a number, got {_short(v)}")


def _float_native(v: Any) -> Any:
    # "number or string as received"
    if v is None or type(v) is float or type(v) is int or type(v) is str:
        return v
    if type(v) is Decimal:
        return float(v)
    return _float(v)


def _bool(v: Any) -> int:
    if v is True:
        return 1
    if v is False:
        return 0
    if type(v) is int and v in (0, 1):
        return v
    raise ConversionError(f"expected a boolean, got {_short(v)}")


def _bool_native(v: Any) -> Any:
    if v is None or v is True or v is False:
        return v
    return bool(_bool(v))


def _str(v: Any) -> str:
    if type(v) is str:
        return v
    raise ConversionError(f"expected a string, got {_short(v)}")


def _str_native(v: Any) -> Any:
    return None if v is None else _str(v)


def _bytes(v: Any) -> str:
    t = type(v)
    if t is str:
        return base64.b64encode(b64_bytes(v)).decode("ascii")
    if t is bytes or t is bytearray or t is memoryview:
        return base64.b64encode(bytes(v)).decode("ascii")
    if t is list:  # Connect arrays of int8 occasionally show up for bytes in old releases
        try:
            return base64.b64encode(bytes(x & 0xFF for x in v)).decode("ascii")
        except TypeError:
            pass
    raise ConversionError(f"expected bytes, got {_short(v)}")


def _bytes_native(v: Any) -> Any:
    return None if v is None else _bytes(v)


# ---------------------------------------------------------------------------------------
# decimals
# ---------------------------------------------------------------------------------------

_DEC_CTX: Final = Context(prec=100_000)


def format_unscaled(unscaled: int, scale: int) -> str:
    """Plain decimal notation of ``unscaled * 10**-scale`` with exactly ``scale`` digits."""
    if scale <= 0:
        return str(unscaled * 10 ** (-scale))
    digits = str(-unscaled if unscaled < 0 else unscaled)
    if len(digits) <= scale:
        digits = "0" * (scale + 1 - len(digits)) + digits
    text = digits[:-scale] + "." + digits[-scale:]
    return "-" + text if unscaled < 0 else text


def _decimal_text(d: Decimal, scale: int | None) -> str:
    if not d.is_finite():
        raise ConversionError(f"decimal value {d} is not finite")
    if scale is None:
        return format(d, "f")
    try:
        q = d.quantize(Decimal(1).scaleb(-scale), context=_DEC_CTX)
    except InvalidOperation:
        raise ConversionError(f"decimal {d} cannot be scaled to {scale}") from None
    return format(q, "f")


def decimal_converter(scale: int) -> Conv:
    """``org.apache.kafka.connect.data.Decimal``: base64/bytes unscaled, or a number."""

    def conv(v: Any) -> Any:
        if v is None:
            return None
        t = type(v)
        if t is str:
            return format_unscaled(int.from_bytes(b64_bytes(v), "big", signed=True), scale)
        if t is bytes:
            return format_unscaled(int.from_bytes(v, "big", signed=True), scale)
        if t is int:
            return (
                format_unscaled(v * 10**scale, scale)
                if scale >= 0
                else _decimal_text(Decimal(v), scale)
            )
        if t is Decimal:
            return _decimal_text(v, scale)
        if t is float:
            raise NeedsExactNumbers
        raise ConversionError(f"expected a decimal, got {_short(v)}")

    return conv


def _vsd(v: Any) -> Any:
    """``io.debezium.data.VariableScaleDecimal``: ``{scale, value}``."""
    if v is None:
        return None
    if type(v) is not dict:
        if type(v) is Decimal:
            return _decimal_text(v, None)
        raise ConversionError(f"expected a VariableScaleDecimal struct, got {_short(v)}")
    scale = v.get("scale")
    raw = v.get("value")
    if type(scale) is not int:
        raise ConversionError(f"VariableScaleDecimal without integer scale: {_short(v)}")
    if type(raw) is str:
        raw = b64_bytes(raw)
    elif type(raw) is not bytes:
        raise ConversionError(f"VariableScaleDecimal without bytes value: {_short(v)}")
    return format_unscaled(int.from_bytes(raw, "big", signed=True), scale)


# ---------------------------------------------------------------------------------------
# temporal values
# ---------------------------------------------------------------------------------------

_EPOCH_ORDINAL: Final = date(1970, 1, 1).toordinal()
_MAX_ORDINAL: Final = date.max.toordinal()
# PostgreSQL +-infinity for date/timestamp columns, in the column's unit (§3.5)
_POS_INF: Final = 9223372036825200000
_NEG_INF: Final = -9223372036832400000
_I64_MAX: Final = 2**63 - 1
_I64_MIN: Final = -(2**63)
_SENTINELS: Final = {_POS_INF: "infinity", _NEG_INF: "-infinity",
                     _I64_MAX: "infinity", _I64_MIN: "-infinity"}  # fmt: skip
_NANO_SENTINELS: Final = {_I64_MAX: "infinity", _I64_MIN: "-infinity"}


def _date_text(ordinal_offset: int) -> str:
    o = _EPOCH_ORDINAL + ordinal_offset
    if o < 1 or o > _MAX_ORDINAL:
        raise ConversionError("date outside years 0001-9999")
    return date.fromordinal(o).isoformat()


def _date(v: Any) -> Any:
    """``io.debezium.time.Date`` / Connect ``Date``: days since the epoch -> YYYY-MM-DD."""
    if v is None:
        return None
    t = type(v)
    if t is int:
        s = _SENTINELS.get(v)
        if s is not None:
            return s
        return _date_text(v)
    if t is date:
        return v.isoformat()
    if t is datetime:
        return v.date().isoformat()
    raise ConversionError(f"expected days since epoch, got {_short(v)}")


def time_converter(unit: int, digits: int) -> Conv:
    """Time of day (may be negative or exceed 24 h for MySQL TIME): HH:MM:SS.f{digits}."""
    frac_fmt = "%s%02d:%02d:%02d.%0" + str(digits) + "d"

    def conv(v: Any) -> Any:
        if v is None:
            return None
        t = type(v)
        if t is time:
            frac = (
                v.microsecond // 10 ** (6 - digits)
                if digits <= 6
                else v.microsecond * 10 ** (digits - 6)
            )
            return frac_fmt % ("", v.hour, v.minute, v.second, frac)
        if t is float and v.is_integer():
            v = int(v)
            t = int
        if t is not int:
            raise ConversionError(f"expected a time of day as integer, got {_short(v)}")
        sign = ""
        if v < 0:
            sign, v = "-", -v
        secs, frac = divmod(v, unit)
        h, rem = divmod(secs, 3600)
        m, s = divmod(rem, 60)
        return frac_fmt % (sign, h, m, s, frac)

    return conv


def timestamp_converter(unit: int, digits: int, *, nano: bool = False, suffix: str = "") -> Conv:
    """Wall-clock timestamp since the epoch -> YYYY-MM-DDTHH:MM:SS.f{digits}{suffix}."""
    per_day = 86400 * unit
    frac_fmt = "%sT%02d:%02d:%02d.%0" + str(digits) + "d" + suffix
    sentinels = _NANO_SENTINELS if nano else _SENTINELS

    def conv(v: Any) -> Any:
        if v is None:
            return None
        t = type(v)
        if t is not int:
            if t is datetime:
                return _datetime_text(v, digits, suffix)
            if t is float and v.is_integer():
                v = int(v)
            else:
                raise ConversionError(f"expected a timestamp as integer, got {_short(v)}")
        s = sentinels.get(v)
        if s is not None:
            return s
        days, rem = divmod(v, per_day)
        secs, frac = divmod(rem, unit)
        h, rem = divmod(secs, 3600)
        m, sec = divmod(rem, 60)
        return frac_fmt % (_date_text(days), h, m, sec, frac)

    return conv


def _datetime_text(v: datetime, digits: int, suffix: str) -> str:
    if v.tzinfo is not None:
        try:
            v = v.astimezone(UTC).replace(tzinfo=None)
        except OverflowError:
            raise ConversionError("timestamp outside years 0001-9999") from None
    us = v.microsecond
    frac = us // 10 ** (6 - digits) if digits <= 6 else us * 10 ** (digits - 6)
    return f"{v.date().isoformat()}T{v.hour:02d}:{v.minute:02d}:{v.second:02d}.{frac:0{digits}d}{suffix}"


def parse_iso_datetime(v: str) -> datetime:
    """ISO-8601 date-time with 0-9 fraction digits (beyond 6 truncated) and optional offset."""
    s = v.strip()
    dot = s.find(".", 19)
    if dot != -1:
        end = dot + 1
        n = len(s)
        while end < n and s[end].isdigit():
            end += 1
        frac = s[dot + 1 : end]
        if len(frac) > 6:
            s = s[: dot + 7] + s[end:]
        elif not frac:
            s = s[:dot] + s[end:]
    try:
        return datetime.fromisoformat(s)
    except ValueError:
        raise ConversionError(f"invalid ISO-8601 timestamp {_short(v)}") from None


_UTC_TEXT: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.([0-9]{0,9}))?Z"
)

_UTC_SECONDS: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")


def _zoned(v: Any) -> Any:
    """``io.debezium.time.ZonedTimestamp`` -> UTC ``YYYY-MM-DDTHH:MM:SS.ffffffZ``."""
    if v is None:
        return None
    if type(v) is not str:
        if type(v) is datetime:
            return _datetime_text(v if v.tzinfo else v.replace(tzinfo=UTC), 6, "Z")
        raise ConversionError(f"expected a zoned timestamp string, got {_short(v)}")
    if (
        len(v) == 27
        and v[26] == "Z"
        and v[19] == "."
        and v[10] == "T"
        and v[4] == "-"
        and v[13] == ":"
    ):
        return v  # already canonical (the common case)
    if len(v) == 20 and _UTC_SECONDS.fullmatch(v) is not None:
        return v[:19] + ".000000Z"  # whole seconds (Debezium leaves out a zero fraction)
    if v in ("infinity", "-infinity"):
        return v
    m = _UTC_TEXT.fullmatch(v)
    if m is not None:  # already UTC in ASCII digits (the branch below, without its slicing)
        return v[:19] + "." + ((m.group(1) or "") + "000000")[:6] + "Z"
    n = len(v)
    if (
        n >= 20
        and v[n - 1] == "Z"
        and v[10] == "T"
        and v[4] == "-"
        and v[7] == "-"
        and v[13] == ":"
        and v[16] == ":"
        and (n == 20 or (v[19] == "." and n <= 30))
        and (v[:4] + v[5:7] + v[8:10] + v[11:13] + v[14:16] + v[17:19] + v[20 : n - 1]).isdigit()
    ):
        # already UTC: only the fraction needs padding or truncation to 6 digits
        frac = v[20 : n - 1]
        return v[:19] + "." + (frac + "000000")[:6] + "Z"
    dt = parse_iso_datetime(v)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return _datetime_text(dt, 6, "Z")


def _uuid(v: Any) -> Any:
    if v is None:
        return None
    if type(v) is str:
        if len(v) == 36 and v[8] == "-" and v[13] == "-" and v[18] == "-" and v[23] == "-":
            return v.lower()
        try:
            return str(uuid.UUID(v))
        except ValueError:
            pass
    elif isinstance(v, uuid.UUID):  # fastavro's "uuid" logical type
        return str(v)
    raise ConversionError(f"invalid UUID {_short(v)}")


def _duration(v: Any) -> Any:
    """``io.debezium.time.MicroDuration``: INTEGER microseconds (a float when fractional)."""
    if v is None:
        return None
    t = type(v)
    if t is int:
        return v
    if t is float or t is Decimal:
        return int(v) if v == v and int(v) == v else float(v)
    raise ConversionError(f"expected a duration number, got {_short(v)}")


# ---------------------------------------------------------------------------------------
# compiling specs into converters
# ---------------------------------------------------------------------------------------

_DEC = "org.apache.kafka.connect.data.Decimal"

#: semantic name -> (top-level converter, JSON-native converter) for scalar semantic types
_SCALAR_SEMANTIC: dict[str, tuple[Conv, Conv]] = {}


def _same(conv: Conv) -> tuple[Conv, Conv]:
    return conv, conv


for _n in ("io.debezium.time.Date", "org.apache.kafka.connect.data.Date"):
    _SCALAR_SEMANTIC[_n] = _same(_date)
_SCALAR_SEMANTIC["io.debezium.time.Time"] = _same(time_converter(1000, 3))
_SCALAR_SEMANTIC["org.apache.kafka.connect.data.Time"] = _same(time_converter(1000, 3))
_SCALAR_SEMANTIC["io.debezium.time.MicroTime"] = _same(time_converter(1_000_000, 6))
_SCALAR_SEMANTIC["io.debezium.time.NanoTime"] = _same(time_converter(1_000_000_000, 9))
_SCALAR_SEMANTIC["io.debezium.time.Timestamp"] = _same(timestamp_converter(1000, 3))
_SCALAR_SEMANTIC["org.apache.kafka.connect.data.Timestamp"] = _same(timestamp_converter(1000, 3))
_SCALAR_SEMANTIC["io.debezium.time.MicroTimestamp"] = _same(timestamp_converter(1_000_000, 6))
_SCALAR_SEMANTIC["io.debezium.time.NanoTimestamp"] = _same(
    timestamp_converter(1_000_000_000, 9, nano=True)
)
_SCALAR_SEMANTIC["io.debezium.time.ZonedTimestamp"] = _same(_zoned)
_SCALAR_SEMANTIC["io.debezium.data.Uuid"] = _same(_uuid)
_SCALAR_SEMANTIC["io.debezium.data.VariableScaleDecimal"] = _same(_vsd)
_SCALAR_SEMANTIC["io.debezium.time.MicroDuration"] = _same(_duration)
_SCALAR_SEMANTIC["io.debezium.time.Year"] = (_int, _int_native)
_SCALAR_SEMANTIC["io.debezium.data.Bits"] = (_bytes, _bytes_native)
for _n in (
    "io.debezium.time.ZonedTime",
    "io.debezium.time.IsoDate",
    "io.debezium.time.IsoTime",
    "io.debezium.time.IsoTimestamp",
    "io.debezium.time.Interval",
    "io.debezium.data.Json",
    "io.debezium.data.Enum",
    "io.debezium.data.EnumSet",
    "io.debezium.data.Xml",
    "io.debezium.data.Ltree",
    "io.debezium.data.Tsvector",
):
    _SCALAR_SEMANTIC[_n] = (_str, _str_native)

#: names handled by the ordinary type rules on purpose (structs rendered as compact JSON)
_STRUCTURAL_SEMANTIC: Final = frozenset(
    {
        "io.debezium.data.geometry.Geometry",
        "io.debezium.data.geometry.Geography",
        "io.debezium.data.geometry.Point",
        "io.debezium.data.DoubleVector",
        "io.debezium.data.FloatVector",
        "io.debezium.data.SparseVector",
    }
)

#: Connect type implied by a semantic name (used for type hints, which carry only the name)
IMPLIED_TYPE: Final[Mapping[str, str]] = {
    "io.debezium.time.Date": "int32",
    "org.apache.kafka.connect.data.Date": "int32",
    "io.debezium.time.Time": "int32",
    "org.apache.kafka.connect.data.Time": "int32",
    "io.debezium.time.MicroTime": "int64",
    "io.debezium.time.NanoTime": "int64",
    "io.debezium.time.Timestamp": "int64",
    "org.apache.kafka.connect.data.Timestamp": "int64",
    "io.debezium.time.MicroTimestamp": "int64",
    "io.debezium.time.NanoTimestamp": "int64",
    "io.debezium.time.Year": "int32",
    "io.debezium.time.MicroDuration": "int64",
    _DEC: "bytes",
    "io.debezium.data.Bits": "bytes",
    "io.debezium.data.VariableScaleDecimal": "struct",
    "io.debezium.data.geometry.Geometry": "struct",
    "io.debezium.data.geometry.Geography": "struct",
    "io.debezium.data.geometry.Point": "struct",
    "io.debezium.data.DoubleVector": "array",
    "io.debezium.data.FloatVector": "array",
}

_warned_names: set[str] = set()


def _warn_unknown(name: str) -> None:
    if name not in _warned_names:
        _warned_names.add(name)
        log.warning("unknown semantic type %s: converting by its primitive type", name)


def generic_top(v: Any) -> Any:
    """JSON-native mapping for values without a schema (§2.3)."""
    t = type(v)
    if t is str or t is int or v is None:
        return v
    if t is bool:
        return 1 if v else 0
    if t is float:
        return v if v == v else None
    if t is dict or t is list:
        return compact_json(v)
    if t is Decimal:
        f = float(v)
        return f if f == f else None
    if t is bytes or t is bytearray:
        return base64.b64encode(bytes(v)).decode("ascii")
    if t is datetime or t is date or t is time:
        return v.isoformat()
    raise ConversionError(f"unsupported value {_short(v)}")


def _identity(v: Any) -> Any:
    return v


# toast placeholder check kinds, chosen per column type
T_NONE: Final = 0
T_STR: Final = 1
T_BYTES: Final = 2
T_ARRAY: Final = 3
T_MAP: Final = 4
T_ANY: Final = 5

Column = tuple[Conv, int]


def toast_kind(spec: ColumnSpec) -> int:
    t = spec.type
    if t == "string":
        return T_STR
    if t == "bytes":
        return T_BYTES
    if t == "array":
        return T_ARRAY
    if t == "map":
        return T_MAP
    if t == "any":
        return T_ANY
    return T_NONE


def compile_column(spec: ColumnSpec) -> Column:
    """Top-level converter plus the TOAST-placeholder check kind for one column."""
    return _compile(spec)[0], toast_kind(spec)


def compile_struct(spec: ColumnSpec) -> dict[str, Column]:
    return {name: compile_column(f) for name, f in spec.fields or ()}


def _compile(spec: ColumnSpec) -> tuple[Conv, Conv]:
    """(top-level converter, JSON-native converter). Both accept ``None``."""
    name = spec.name
    if name is not None:
        sem = _SCALAR_SEMANTIC.get(name)
        if sem is not None:
            return sem
        if name == _DEC:
            scale_text = spec.param("scale")
            try:
                scale = int(scale_text) if scale_text is not None else 0
            except ValueError:
                scale = 0
            return _same(decimal_converter(scale))
        if (
            name.startswith("io.debezium.")
            and name not in _STRUCTURAL_SEMANTIC
            and spec.type not in ("struct", "array", "map")
        ):
            _warn_unknown(name)
    t = spec.type
    if t in ("int8", "int16", "int32", "int64"):
        return _int, _int_native
    if t in ("float", "double", "float32", "float64"):
        return _float, _float_native
    if t == "boolean":
        return _bool, _bool_native
    if t == "string":
        return _str, _str_native
    if t == "bytes":
        return _bytes, _bytes_native
    if t == "array":
        return _compile_array(spec.items or ANY)
    if t == "map":
        return _compile_map(spec.values or ANY)
    if t == "struct":
        return _compile_struct(spec.fields)
    return generic_top, _identity


_PLAIN_NAMES: Final = frozenset(
    {"io.debezium.data.Json", "io.debezium.data.Enum", "io.debezium.data.EnumSet",
     "io.debezium.time.Year"}
)  # fmt: skip
#: types whose values orjson renders in their JSON-native form as they are
#: (floats "as received", bytes through the default hook as base64)
_PLAIN_TYPES: Final = frozenset(
    {"int8", "int16", "int32", "int64", "string", "any", "boolean", "float", "double",
     "float32", "float64", "bytes"}
)  # fmt: skip


def _is_plain(spec: ColumnSpec) -> bool:
    """Values of this spec need no per-item conversion inside compact JSON."""
    name = spec.name
    if name is not None and (name in _SCALAR_SEMANTIC or name == _DEC):
        return name in _PLAIN_NAMES
    return spec.type in _PLAIN_TYPES


def _top_of(native: Conv) -> Conv:
    def top(v: Any) -> Any:
        return None if v is None else compact_json(native(v))

    return top


def _compile_array(items: ColumnSpec) -> tuple[Conv, Conv]:
    if _is_plain(items):

        def native_plain(v: Any) -> Any:
            if v is None or type(v) is list:
                return v
            raise ConversionError(f"expected an array, got {_short(v)}")

        return _top_of(native_plain), native_plain
    item_native = _compile(items)[1]

    def native(v: Any) -> Any:
        if v is None:
            return None
        if type(v) is not list:
            raise ConversionError(f"expected an array, got {_short(v)}")
        return [item_native(x) for x in v]

    return _top_of(native), native


def _compile_map(values: ColumnSpec) -> tuple[Conv, Conv]:
    value_native = _compile(values)[1]

    def native(v: Any) -> Any:
        if v is None:
            return None
        if type(v) is dict:
            return {k: value_native(x) for k, x in v.items()}
        if type(v) is list:  # Connect JSON encodes maps with non-string keys as [[k, v], ...]
            return v
        raise ConversionError(f"expected a map, got {_short(v)}")

    return _top_of(native), native


def _compile_struct(fields: tuple[tuple[str, ColumnSpec], ...] | None) -> tuple[Conv, Conv]:
    if not fields:

        def native_any(v: Any) -> Any:
            if v is None or type(v) is dict:
                return v
            raise ConversionError(f"expected a struct, got {_short(v)}")

        return _top_of(native_any), native_any
    convs = {name: _compile(f)[1] for name, f in fields}

    def native(v: Any) -> Any:
        if v is None:
            return None
        if type(v) is not dict:
            raise ConversionError(f"expected a struct, got {_short(v)}")
        get = convs.get
        out = {}
        for k, x in v.items():
            c = get(k)
            out[k] = x if c is None or x is None else c(x)
        return out

    return _top_of(native), native


# ---------------------------------------------------------------------------------------
# type hints for schemaless JSON (§2.3)
# ---------------------------------------------------------------------------------------


RowFast = Callable[[Mapping[str, Any], "Placeholder"], "dict[str, Any] | None"]


def compile_row_fast(cols: Mapping[str, Column], toast: bool = True) -> RowFast | None:
    """A straight-line converter for rows whose columns are exactly ``cols``, in order.

    Generated once per schema: no per-column dictionary lookups, type dispatch inlined for
    strings, integers and booleans, every other column through its compiled converter. It
    returns ``None`` (the caller then takes the general path, which decides everything the
    same way) for any row it does not cover: other columns or order, a TOAST placeholder, a
    value of another type than the column's plain one. Its results are those of the
    general path (``decode._Ctx._row``) for the rows it covers.
    """
    if not cols or len(cols) > 200:
        return None
    names = list(cols)
    env: dict[str, Any] = {"NAMES": tuple(names), "_tuple": tuple, "_str": str, "_int": int}
    lines = [
        "def fast(data, ph):",
        "    if _tuple(data) != NAMES:",
        "        return None",
        "    text = ph.text",
    ]
    out = []
    for i, name in enumerate(names):
        conv, tk = cols[name]
        env[f"C{i}"], env[f"K{i}"] = conv, tk
        v, x = f"v{i}", f"x{i}"
        lines.append(f"    {v} = data[{name!r}]")
        lines.append(f"    if {v} is None:")
        lines.append(f"        {x} = None")
        if conv is _str and (tk == T_STR or not toast):
            cond = f"type({v}) is _str" + (f" and {v} != text" if toast else "")
            lines += [f"    elif {cond}:", f"        {x} = {v}"]
        elif conv is _int and tk == T_NONE:
            lines += [f"    elif type({v}) is _int:", f"        {x} = {v}"]
        elif conv is _bool and tk == T_NONE:
            lines += [f"    elif {v} is True:", f"        {x} = 1"]
            lines += [f"    elif {v} is False:", f"        {x} = 0"]
        elif not toast or tk == T_NONE:
            lines += ["    else:", f"        {x} = C{i}({v})"]
            out.append(f"{name!r}: {x}")
            continue
        elif tk == T_STR:
            lines += [f"    elif type({v}) is _str and {v} != text:", f"        {x} = C{i}({v})"]
        else:
            lines += [f"    elif not ph.matches(K{i}, {v}):", f"        {x} = C{i}({v})"]
        lines += ["    else:", "        return None"]
        out.append(f"{name!r}: {x}")
    lines.append("    return {" + ", ".join(out) + "}")
    exec("\n".join(lines), env)  # generated from column names through repr() only
    fast: RowFast = env["fast"]
    return fast


def spec_from_hint(hint: str) -> ColumnSpec:
    """A hint is a semantic name or Connect type, optionally with parameters:
    ``io.debezium.time.Date``, ``bytes``, ``org.apache.kafka.connect.data.Decimal;scale=2``.
    """
    name, _, rest = hint.partition(";")
    name = name.strip()
    params: list[tuple[str, str]] = []
    for part in rest.split(";") if rest else ():
        k, _, v = part.partition("=")
        if k.strip():
            params.append((k.strip(), v.strip()))
    if name in CONNECT_PRIMITIVES or name in ("array", "map", "struct"):
        return ColumnSpec(name, None, tuple(params))
    return ColumnSpec(IMPLIED_TYPE.get(name, "any"), name, tuple(params))


def compile_hints(hints: Mapping[str, str]) -> dict[str, Column]:
    out: dict[str, Column] = {}
    for col, hint in hints.items():
        spec = spec_from_hint(hint)
        conv = _compile(spec)[0]
        out[col] = (conv, toast_kind(spec))
    return out


# ---------------------------------------------------------------------------------------
# TOAST placeholder (§3.6)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placeholder:
    """The shapes Debezium gives ``unavailable.value.placeholder`` in each column type."""

    text: str = "__debezium_unavailable_value"
    raw: bytes = field(init=False)
    b64: str = field(init=False)
    int_list: list[int] = field(init=False)
    uuid_text: str = field(init=False)

    def __post_init__(self) -> None:
        raw = self.text.encode("utf-8")
        object.__setattr__(self, "raw", raw)
        object.__setattr__(self, "b64", base64.b64encode(raw).decode("ascii"))
        object.__setattr__(self, "int_list", list(raw))
        # java.util.UUID.nameUUIDFromBytes: MD5, version 3
        h = bytearray(hashlib.md5(raw).digest())
        h[6] = (h[6] & 0x0F) | 0x30
        h[8] = (h[8] & 0x3F) | 0x80
        object.__setattr__(self, "uuid_text", str(uuid.UUID(bytes=bytes(h))))

    def matches(self, kind: int, v: Any) -> bool:
        t = type(v)
        if t is str:
            return v == self.text or (kind == T_BYTES and v == self.b64)
        if t is bytes:
            return v == self.raw
        if t is list:
            if kind not in (T_ARRAY, T_ANY):
                return False
            if len(v) == 1:
                return v[0] == self.text or v[0] == self.uuid_text
            return v == self.int_list
        if t is dict:
            return kind in (T_MAP, T_ANY) and len(v) == 1 and v.get(self.text) == self.text
        return False


DEFAULT_PLACEHOLDER: Final = Placeholder()


# ---------------------------------------------------------------------------------------
# MongoDB Extended JSON (§7)
# ---------------------------------------------------------------------------------------

_WRAPPERS: Final = frozenset(
    {"$oid", "$numberInt", "$numberLong", "$numberDouble", "$numberDecimal", "$date",
     "$binary", "$timestamp", "$regex", "$regularExpression", "$symbol", "$code",
     "$minKey", "$maxKey", "$undefined", "$dbPointer", "$uuid"}
)  # fmt: skip

_NOT: Final = object()


def mongo_date(v: Any) -> str:
    """``$date`` payload (ms, ISO text or ``{"$numberLong": s}``) -> ``...fffZ`` in UTC."""
    if type(v) is dict:
        v = v.get("$numberLong", v.get("$numberInt"))
        if type(v) is str:
            try:
                v = int(v)
            except ValueError:
                raise ConversionError(f"invalid $date {_short(v)}") from None
    if type(v) is int:
        return _mongo_ms(v)
    if type(v) is float and v.is_integer():
        return _mongo_ms(int(v))
    if type(v) is str:
        dt = parse_iso_datetime(v)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return _datetime_text(dt, 3, "Z")
    raise ConversionError(f"invalid $date {_short(v)}")


_mongo_ms = timestamp_converter(1000, 3, suffix="Z")


def _mongo_wrapper(d: dict[str, Any]) -> Any:
    """Scalar value of an Extended JSON wrapper, or ``_NOT`` when ``d`` is a document."""
    for k in d:
        if k[:1] != "$":
            return _NOT
    for k in d:
        if k in _WRAPPERS:
            break
    else:
        return _NOT
    v = d[k]
    try:
        if k == "$oid":
            return str(v)
        if k == "$numberInt" or k == "$numberLong":
            return int(v)
        if k == "$numberDouble":
            if v in _FLOAT_WORDS:
                return _FLOAT_WORDS[v]
            f = float(v)
            return f if f == f else None
        if k == "$numberDecimal":
            return str(v)
        if k == "$date":
            return mongo_date(v)
        if k == "$binary":
            if type(v) is dict:
                v = v.get("base64")
            if type(v) is str:
                return v
            raise ConversionError(f"invalid $binary {_short(d)}")
        if k == "$uuid" and type(v) is str:
            return str(uuid.UUID(v))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConversionError):
            raise
        raise ConversionError(f"invalid Extended JSON {_short(d)}") from None
    return _NOT_SCALAR


_NOT_SCALAR: Final = object()


def mongo_native(v: Any) -> Any:
    """Extended JSON value -> JSON-native value for use inside compact JSON."""
    t = type(v)
    if t is dict:
        w = _mongo_wrapper(v)
        if w is _NOT:
            return {k: mongo_native(x) for k, x in v.items()}
        if w is _NOT_SCALAR:
            return v  # $timestamp, $regex, ... stay as the wrapper object
        return w
    if t is list:
        return [mongo_native(x) for x in v]
    return v


def mongo_top(v: Any) -> Any:
    """Extended JSON value -> canonical SQLite value."""
    t = type(v)
    if t is str or t is int or v is None:
        return v
    if t is bool:
        return 1 if v else 0
    if t is float:
        return v if v == v else None
    if t is dict:
        w = _mongo_wrapper(v)
        if w is _NOT:
            return compact_json({k: mongo_native(x) for k, x in v.items()})
        if w is _NOT_SCALAR:
            return compact_json(v)
        return w
    if t is list:
        return compact_json([mongo_native(x) for x in v])
    return generic_top(v)


def mongo_row(doc: Mapping[str, Any], skip: Iterable[str] = ()) -> dict[str, Any]:
    skipped = set(skip)
    return {k: mongo_top(v) for k, v in doc.items() if k not in skipped}
