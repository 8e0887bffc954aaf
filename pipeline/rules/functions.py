"""SQLite-like scalar functions, JSON access and ``json_each`` for sync rules."""

from __future__ import annotations

import base64
import json
import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

from pipeline.rules.errors import SqlEvalError
from pipeline.rules.values import (
    SqliteValue,
    ascii_lower,
    ascii_upper,
    cast_blob,
    cast_integer,
    json_dumps,
    json_loads,
    json_value_to_sqlite,
    op_ne,
    to_number,
    to_text,
    truth,
    typeof,
)

# --------------------------------------------------------------------------- JSON paths

PathStep = str | int  # object key, or array index (negative: counted from the end)
_MISSING: Final = object()

_PATH_KEY = re.compile(r'\.(?:"((?:[^"\\]|\\.)*)"|([^.\[]+))')
_PATH_INDEX = re.compile(r"\[(?:(\d+)|#-(\d+))\]")


@lru_cache(maxsize=1024)
def parse_json_path(path: str) -> tuple[PathStep, ...]:
    """Parse an SQLite JSON path (``$``, ``.key``, ``."key"``, ``[N]``, ``[#-N]``)."""
    if not path.startswith("$"):
        raise SqlEvalError(f"bad JSON path: {path!r}")
    steps: list[PathStep] = []
    i = 1
    while i < len(path):
        m = _PATH_KEY.match(path, i)
        if m is not None:
            steps.append(m.group(1) if m.group(1) is not None else m.group(2))
            i = m.end()
            continue
        m = _PATH_INDEX.match(path, i)
        if m is not None:
            steps.append(int(m.group(1)) if m.group(1) is not None else -int(m.group(2)))
            i = m.end()
            continue
        raise SqlEvalError(f"bad JSON path: {path!r}")
    return tuple(steps)


def arrow_path(operand: SqliteValue) -> tuple[PathStep, ...] | None:
    """The path named by the right operand of ``->`` / ``->>`` (SQLite rules).

    An integer N means ``$[N]``; text starting with ``$`` is a path; other text X means
    ``$.X``. NULL gives None (the result is NULL).
    """
    if operand is None:
        return None
    if type(operand) is int:
        return (operand,) if operand >= 0 else None
    text = to_text(operand)
    assert text is not None
    if text.startswith("$"):
        return parse_json_path(text)
    return parse_json_path("$." + text)


def json_walk(value: Any, steps: tuple[PathStep, ...]) -> Any:
    """Follow a path through a parsed JSON value; ``_MISSING`` if absent."""
    for step in steps:
        if type(step) is str:
            if type(value) is not dict:
                return _MISSING
            value = value.get(step, _MISSING)
            if value is _MISSING:
                return _MISSING
        else:
            if type(value) is not list:
                return _MISSING
            idx: int = step  # type: ignore[assignment]
            if idx < 0:
                idx += len(value)
                if idx < 0:
                    return _MISSING
            if idx >= len(value):
                return _MISSING
            value = value[idx]
    return value


def json_arrow(doc: SqliteValue, steps: tuple[PathStep, ...] | None) -> SqliteValue:
    """``doc -> path``: the JSON text of the sub-value, NULL if absent."""
    if doc is None or steps is None:
        return None
    found = json_walk(json_loads(doc), steps)
    if found is _MISSING:
        return None
    return json_dumps(found)


def json_arrow2(doc: SqliteValue, steps: tuple[PathStep, ...] | None) -> SqliteValue:
    """``doc ->> path``: the SQL value of the sub-value, NULL if absent."""
    if doc is None or steps is None:
        return None
    found = json_walk(json_loads(doc), steps)
    if found is _MISSING:
        return None
    return json_value_to_sqlite(found)


def fn_json_extract(doc: SqliteValue, *paths: SqliteValue) -> SqliteValue:
    if doc is None or any(p is None for p in paths):
        return None
    parsed = json_loads(doc)
    if len(paths) == 1:
        found = json_walk(parsed, parse_json_path(to_text(paths[0])))
        return None if found is _MISSING else json_value_to_sqlite(found)
    results = []
    for p in paths:
        found = json_walk(parsed, parse_json_path(to_text(p)))
        results.append(None if found is _MISSING else found)
    return json_dumps(results)


def fn_json_array_length(doc: SqliteValue, path: SqliteValue = "$") -> SqliteValue:
    if doc is None or path is None:
        return None
    found = json_walk(json_loads(doc), parse_json_path(to_text(path)))
    if found is _MISSING:
        return None
    return len(found) if type(found) is list else 0


def _json_type_name(v: Any) -> str:
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    t = type(v)
    if t is int:
        return "integer"
    if t is float:
        return "real"
    if t is str:
        return "text"
    if t is list:
        return "array"
    return "object"


def fn_json_type(doc: SqliteValue, path: SqliteValue = "$") -> SqliteValue:
    if doc is None or path is None:
        return None
    found = json_walk(json_loads(doc), parse_json_path(to_text(path)))
    return None if found is _MISSING else _json_type_name(found)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate key")
    return d


def _has_duplicate_keys(doc: SqliteValue) -> bool:
    """An object with a key twice (the reference's JSON parser refuses it)."""
    text = doc if type(doc) is str else to_text(doc)
    if text is None or "{" not in text:
        return False
    try:
        json.loads(text, object_pairs_hook=_no_duplicates)
    except ValueError:
        return True
    return False


def _js_key_order(keys: list[str]) -> list[str]:
    """Object keys in JavaScript's order: array-index keys (``"0"``, ``"42"``) first,
    ascending, then the others in document order."""
    index = [k for k in keys if k.isascii() and k.isdigit() and (k == "0" or k[0] != "0")]
    index = [k for k in index if int(k) < 4294967295]
    if not index:
        return keys
    chosen = set(index)
    return sorted(index, key=int) + [k for k in keys if k not in chosen]


def fn_json_valid(doc: SqliteValue) -> SqliteValue:
    if doc is None:
        return 0
    try:
        json_loads(doc)
    except SqlEvalError:
        return 0
    return 0 if _has_duplicate_keys(doc) else 1


def fn_json_keys(doc: SqliteValue) -> SqliteValue:
    if doc is None:
        return None
    parsed = json_loads(doc)
    if type(parsed) is not dict:
        raise SqlEvalError("json_keys expects a JSON object")
    if _has_duplicate_keys(doc):
        raise SqlEvalError("json_keys: duplicate key in JSON object")
    return json_dumps(_js_key_order(list(parsed)))


def fn_json(doc: SqliteValue) -> SqliteValue:
    """``json(x)``: minified JSON text."""
    if doc is None:
        return None
    return json_dumps(json_loads(doc))


def json_each(doc: SqliteValue) -> list[dict[str, SqliteValue]]:
    """Rows of ``json_each(doc)``: columns key, value, type (value as SQLite value)."""
    if doc is None:
        return []
    parsed = json_loads(doc)
    if type(parsed) is list:
        return [
            {"key": i, "value": json_value_to_sqlite(v), "type": _json_type_name(v)}
            for i, v in enumerate(parsed)
        ]
    if type(parsed) is dict:
        return [
            {"key": k, "value": json_value_to_sqlite(v), "type": _json_type_name(v)}
            for k, v in parsed.items()
        ]
    return [{"key": None, "value": json_value_to_sqlite(parsed), "type": _json_type_name(parsed)}]


JSON_EACH_COLUMNS: Final = ("key", "value", "type")


# --------------------------------------------------------------------------- text functions


def fn_upper(v: SqliteValue) -> SqliteValue:
    t = to_text(v)
    return None if t is None else ascii_upper(t)


def fn_lower(v: SqliteValue) -> SqliteValue:
    t = to_text(v)
    return None if t is None else ascii_lower(t)


def fn_length(v: SqliteValue) -> SqliteValue:
    if v is None:
        return None
    if isinstance(v, bytes):
        return len(v)
    return len(to_text(v))  # type: ignore[arg-type]


def fn_substr(v: SqliteValue, start: SqliteValue, length: SqliteValue = ...) -> SqliteValue:  # type: ignore[assignment]
    if v is None or start is None or length is None:
        return None
    seq: str | bytes = v if isinstance(v, bytes) else to_text(v)  # type: ignore[assignment]
    p1 = cast_integer(start)
    assert p1 is not None
    neg = False
    if length is ...:
        p2 = 1 << 62
    else:
        p2_ = cast_integer(length)
        assert p2_ is not None
        p2 = p2_
        if p2 < 0:
            neg = True
            p2 = -p2
    n = len(seq)
    if p1 < 0:
        p1 += n
        if p1 < 0:
            p2 += p1
            if p2 < 0:
                p2 = 0
            p1 = 0
    elif p1 > 0:
        p1 -= 1
    elif p2 > 0:
        p2 -= 1
    if neg:
        p1 -= p2
        if p1 < 0:
            p2 += p1
            p1 = 0
    return seq[p1 : p1 + p2]


def fn_instr(haystack: SqliteValue, needle: SqliteValue) -> SqliteValue:
    if haystack is None or needle is None:
        return None
    if isinstance(haystack, bytes) and isinstance(needle, bytes):
        return haystack.find(needle) + 1
    return to_text(haystack).find(to_text(needle)) + 1  # type: ignore[union-attr,arg-type]


def fn_replace(v: SqliteValue, old: SqliteValue, new: SqliteValue) -> SqliteValue:
    if v is None or old is None or new is None:
        return None
    text, o, n = to_text(v), to_text(old), to_text(new)
    assert text is not None and o is not None and n is not None
    if not o:
        return text
    return text.replace(o, n)


def _trim(which: str) -> Callable[..., SqliteValue]:
    def trim(v: SqliteValue, chars: SqliteValue = " ") -> SqliteValue:
        if v is None or chars is None:
            return None
        text, cs = to_text(v), to_text(chars)
        assert text is not None and cs is not None
        if which == "l":
            return text.lstrip(cs)
        if which == "r":
            return text.rstrip(cs)
        return text.strip(cs)

    return trim


def fn_hex(v: SqliteValue) -> SqliteValue:
    if v is None:
        return ""
    return cast_blob(v).hex().upper()  # type: ignore[union-attr]


def fn_base64(v: SqliteValue) -> SqliteValue:
    if v is None:
        return ""
    return base64.b64encode(cast_blob(v)).decode()  # type: ignore[arg-type]


def fn_uuid_blob(v: SqliteValue) -> SqliteValue:
    """``uuid_blob('550e8400-...')``: the 16 bytes of a UUID (the reference's function)."""
    if v is None:
        return None
    try:
        return uuid.UUID(to_text(v)).bytes
    except ValueError:
        raise SqlEvalError(f"uuid_blob: not a UUID: {v!r}") from None


def fn_typeof(v: SqliteValue) -> SqliteValue:
    return typeof(v)


# --------------------------------------------------------------------------- numeric functions


def fn_abs(v: SqliteValue) -> SqliteValue:
    if v is None:
        return None
    if type(v) is int:
        if v == -(1 << 63):
            raise SqlEvalError("integer overflow")
        return abs(v)
    if type(v) is float:
        return abs(v)
    return abs(float(to_number(v)))


def fn_round(v: SqliteValue, digits: SqliteValue = 0) -> SqliteValue:
    if v is None or digits is None:
        return None
    x = float(to_number(v))
    n = cast_integer(digits)
    assert n is not None
    n = max(0, min(n, 30))
    if not math.isfinite(x):
        return x
    if n == 0:
        if abs(x) >= 4503599627370496.0:
            return x
        return float(math.floor(abs(x) + 0.5)) * (1.0 if x >= 0 else -1.0)
    return float(f"{x:.{n}f}")


# --------------------------------------------------------------------------- null handling


def fn_ifnull(a: SqliteValue, b: SqliteValue) -> SqliteValue:
    return b if a is None else a


def fn_coalesce(*args: SqliteValue) -> SqliteValue:
    for a in args:
        if a is not None:
            return a
    return None


def fn_nullif(a: SqliteValue, b: SqliteValue) -> SqliteValue:
    return a if op_ne(a, b) != 0 else None


def fn_iif(c: SqliteValue, a: SqliteValue, b: SqliteValue) -> SqliteValue:
    return a if truth(c) == 1 else b


# --------------------------------------------------------------------------- date/time

_JD_UNIX_EPOCH: Final = 2440587.5
_DATE_RE = re.compile(
    r"^\s*(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?)?"
    r"\s*(Z|[+-]\d{2}:\d{2})?\s*$",
    re.IGNORECASE,
)
_TIME_RE = re.compile(
    r"^\s*()()()(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?\s*(Z|[+-]\d{2}:\d{2})?\s*$", re.IGNORECASE
)
_JULIAN_TEXT = re.compile(r"^\s*\d+(\.\d*)?\s*$")


def _parse_time(
    value: SqliteValue, modifiers: tuple[SqliteValue, ...]
) -> tuple[float, bool] | None:
    """Unix time in seconds (ms resolution) and the subsecond flag, or None (NULL)."""
    unix = False
    subsec = False
    for modifier in modifiers:
        if modifier is None:
            return None
        mod = to_text(modifier).strip().lower()  # type: ignore[union-attr]
        if mod == "unixepoch" and not unix:
            unix = True
        elif mod in ("subsec", "subsecond"):
            subsec = True
        else:
            return None  # modifiers beyond these are not supported
    if value is None:
        return None
    if type(value) is int or type(value) is float:
        num = float(value)
        seconds = num if unix else (num - _JD_UNIX_EPOCH) * 86400.0
    else:
        text = to_text(value)
        assert text is not None
        if unix:
            return None
        if _JULIAN_TEXT.match(text):
            seconds = (float(text) - _JD_UNIX_EPOCH) * 86400.0
        else:
            m = _DATE_RE.match(text) or _TIME_RE.match(text)
            if m is None:
                return None
            year, month, day = (
                (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m.group(1) else (2000, 1, 1)
            )
            hour = int(m.group(4) or 0)
            minute = int(m.group(5) or 0)
            sec = int(m.group(6) or 0)
            frac = float(m.group(7)) if m.group(7) else 0.0
            if not 1 <= month <= 12 or not 1 <= day <= _days_in_month(year, month):
                return None
            if hour > 24 or minute > 59 or sec > 59:
                return None
            seconds = _days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60
            seconds += sec + frac
            tz = m.group(8)
            if tz and tz.upper() != "Z":
                sign = 1 if tz[0] == "+" else -1
                seconds -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    if not math.isfinite(seconds):
        return None
    return round(seconds * 1000.0) / 1000.0, subsec


def fn_unixepoch(value: SqliteValue, *modifiers: SqliteValue) -> SqliteValue:
    parsed = _parse_time(value, modifiers)
    if parsed is None:
        return None
    seconds, subsec = parsed
    return seconds if subsec else math.floor(seconds)


def fn_datetime(value: SqliteValue, *modifiers: SqliteValue) -> SqliteValue:
    parsed = _parse_time(value, modifiers)
    if parsed is None:
        return None
    seconds, subsec = parsed
    days, ms = divmod(round(seconds * 1000), 86_400_000)
    year, month, day = _civil_from_days(days)
    if not -4713 <= year <= 9999:  # SQLite's range (julian day 0 is in -4713)
        return None
    secs, milli = divmod(ms, 1000)
    sign = "-" if year < 0 else ""
    text = f"{sign}{abs(year):04d}-{month:02d}-{day:02d} {secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}"
    if subsec:
        text += f".{milli:03d}"
    return text


# proleptic Gregorian calendar for any year (Python's datetime starts at year 1; SQLite and
# the reference accept year 0000); H. Hinnant's days_from_civil / civil_from_days


def _days_in_month(year: int, month: int) -> int:
    if month == 2:
        return 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01."""
    y = year - (month <= 2)
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _civil_from_days(days: int) -> tuple[int, int, int]:
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + (3 if mp < 10 else -9)
    return yoe + era * 400 + (month <= 2), month, day


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True, slots=True)
class SqlFunction:
    name: str
    impl: Callable[..., SqliteValue]
    min_args: int
    max_args: int  # -1: unbounded


def _f(name: str, impl: Callable[..., SqliteValue], min_args: int, max_args: int) -> SqlFunction:
    return SqlFunction(name, impl, min_args, max_args)


FUNCTIONS: Final[dict[str, SqlFunction]] = {
    f.name: f
    for f in (
        _f("upper", fn_upper, 1, 1),
        _f("lower", fn_lower, 1, 1),
        _f("length", fn_length, 1, 1),
        _f("substr", fn_substr, 2, 3),
        _f("substring", fn_substr, 2, 3),
        _f("instr", fn_instr, 2, 2),
        _f("replace", fn_replace, 3, 3),
        _f("trim", _trim("b"), 1, 2),
        _f("ltrim", _trim("l"), 1, 2),
        _f("rtrim", _trim("r"), 1, 2),
        _f("hex", fn_hex, 1, 1),
        _f("base64", fn_base64, 1, 1),
        _f("typeof", fn_typeof, 1, 1),
        _f("uuid_blob", fn_uuid_blob, 1, 1),
        _f("abs", fn_abs, 1, 1),
        _f("round", fn_round, 1, 2),
        _f("ifnull", fn_ifnull, 2, 2),
        _f("coalesce", fn_coalesce, 2, -1),
        _f("nullif", fn_nullif, 2, 2),
        _f("iif", fn_iif, 3, 3),
        _f("json", fn_json, 1, 1),
        _f("json_extract", fn_json_extract, 2, -1),
        _f("json_array_length", fn_json_array_length, 1, 2),
        _f("json_type", fn_json_type, 1, 2),
        _f("json_valid", fn_json_valid, 1, 1),
        _f("json_keys", fn_json_keys, 1, 1),
        _f("unixepoch", fn_unixepoch, 1, 3),
        _f("datetime", fn_datetime, 1, 3),
    )
}

AGGREGATE_FUNCTIONS: Final = frozenset(
    {
        "count",
        "sum",
        "avg",
        "total",
        "min",
        "max",
        "group_concat",
        "string_agg",
        "json_group_array",
        "json_group_object",
    }
)

TABLE_VALUED_FUNCTIONS: Final = frozenset({"json_each"})
