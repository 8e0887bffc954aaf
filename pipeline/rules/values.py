"""The SQLite value model used by sync rules: conversions, casts, comparisons, operators.

Values are plain Python objects: ``str`` (TEXT), ``int`` (INTEGER), ``float`` (REAL),
``bytes`` (BLOB) and ``None`` (NULL). Booleans are INTEGER 1/0, JSON objects and arrays
are JSON text. Semantics follow SQLite (three-valued logic, type ordering NULL < numbers <
text < blob, no implicit affinity conversions in comparisons).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from decimal import Decimal
from functools import lru_cache
from typing import Any, Final, TypeAlias

import orjson

from pipeline.rules.errors import SqlEvalError

SqliteValue: TypeAlias = str | int | float | bytes | None

INT64_MIN: Final = -(1 << 63)
INT64_MAX: Final = (1 << 63) - 1


# --------------------------------------------------------------------------- JSON text


def json_dumps(obj: Any) -> str:
    """Compact JSON, raw UTF-8 (``json.dumps(v, separators=(",", ":"), ensure_ascii=False)``)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def dumps_flat_object(obj: dict[str, SqliteValue]) -> str:
    """Serialise a flat object of SQLite values exactly like :func:`json_dumps`, fast.

    orjson gives identical output for str/int/None values; floats are formatted
    differently for small/large exponents, so objects holding floats (or ints beyond 64
    bits) go through ``json.dumps``. Non-finite floats become ``null`` (as in
    JavaScript's ``JSON.stringify``) so the output is always valid JSON.
    """
    has_float = False
    for v in obj.values():
        if type(v) is float:
            has_float = True
            if not math.isfinite(v):
                obj = {
                    k: (None if type(x) is float and not math.isfinite(x) else x)
                    for k, x in obj.items()
                }
                break
    if has_float:
        return json_dumps(obj)
    try:
        return orjson.dumps(obj).decode()
    except TypeError:  # int beyond 64 bits, str subclass keys, ...
        return json_dumps(obj)


def _json_loads_uncached(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:  # orjson refuses integers beyond 64 bits; json accepts them
        return json.loads(text)
    except ValueError:
        raise SqlEvalError(f"malformed JSON: {_preview(text)}") from None


# The same JSON text is often read several times per row or request (``doc ->> 'a'``,
# ``doc ->> 'b'``); small texts are cached. Parsed values are never mutated.
_json_loads_cached = lru_cache(maxsize=512)(_json_loads_uncached)
_CACHE_MAX_TEXT: Final = 4096


def json_loads(value: SqliteValue) -> Any:
    """Parse JSON text (the SQL value is converted to text first). Raises SqlEvalError."""
    text = value if type(value) is str else to_text(value)
    if text is None:
        return None
    if len(text) <= _CACHE_MAX_TEXT:
        return _json_loads_cached(text)
    return _json_loads_uncached(text)


def _preview(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def json_value_to_sqlite(v: Any) -> SqliteValue:
    """A parsed JSON value as an SQLite value: objects/arrays -> JSON text, bools -> 1/0."""
    t = type(v)
    if t is str or t is int or v is None:
        return v
    if t is float:
        return None if v != v else v
    if t is bool:
        return 1 if v else 0
    return json_dumps(v)


def to_sqlite(v: object) -> SqliteValue:
    """Convert a Python value from a row or token into an SQLite value."""
    if v is None:
        return None
    t = type(v)
    if t is str or t is int:
        return v  # type: ignore[return-value]
    if t is float:
        return None if v != v else v  # type: ignore[return-value]
    if t is bool:
        return 1 if v else 0
    if isinstance(v, (dict, list, tuple)):
        return json_dumps(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, bool):
        return 1 if v else 0
    if isinstance(v, int):
        return int(v)
    if isinstance(v, str):
        return str(v)
    if isinstance(v, float):
        f = float(v)
        return None if f != f else f
    if isinstance(v, Decimal):
        if not v.is_finite():
            return None if v.is_nan() else float(v)
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, Mapping):
        return json_dumps(dict(v))
    raise SqlEvalError(f"unsupported value type {t.__name__}")


# --------------------------------------------------------------------------- text / numbers


def real_to_text(f: float) -> str:
    """The text form of a REAL as the reference prints it (JavaScript ``Number#toString``):
    1.0 -> '1', 2.5 -> '2.5', 3e60 -> '3e+60', 1e-7 -> '1e-7'."""
    if math.isinf(f):
        return "Infinity" if f > 0 else "-Infinity"
    if f != f:
        return "NaN"
    r = repr(f)
    if "e" in r or "E" in r:
        mantissa, exp_text = r.split("e")
        exp = int(exp_text)
        if mantissa.endswith(".0"):
            mantissa = mantissa[:-2]
        if -7 < exp < 21:
            text = format(Decimal(r), "f")
            return text[:-2] if text.endswith(".0") else text
        return f"{mantissa}e{'+' if exp > 0 else '-'}{abs(exp)}"
    return r[:-2] if r.endswith(".0") else r


def sqlite_real_to_text(f: float) -> str:
    """SQLite's text form of a REAL (``%!.15g``): 1.0 -> '1.0', 1e20 -> '1.0e+20'."""
    if math.isinf(f):
        return "Inf" if f > 0 else "-Inf"
    if f != f:
        return "NaN"
    s = f"{f:.15g}"
    if "e" in s:
        mantissa, exp = s.split("e")
        if "." not in mantissa:
            mantissa += ".0"
        return f"{mantissa}e{exp}"
    if "." not in s:
        s += ".0"
    return s


def to_text(v: SqliteValue) -> str | None:
    if v is None:
        return None
    t = type(v)
    if t is str:
        return v  # type: ignore[return-value]
    if t is int:
        return str(v)
    if t is float:
        return real_to_text(v)  # type: ignore[arg-type]
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


_NUM_PREFIX = re.compile(r"[ \t\n\f\r]*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)")
_INT_PREFIX = re.compile(r"[ \t\n\f\r]*([+-]?\d+)")


def _clamp_int64(i: int) -> int:
    return INT64_MAX if i > INT64_MAX else INT64_MIN if i < INT64_MIN else i


def text_to_number(s: str) -> int | float:
    """Numeric value of text as used by arithmetic: integer-looking prefix -> int, else real.

    '5' -> 5, '5x' -> 5, '3.0' -> 3.0, '1e3' -> 1000.0, 'abc' -> 0.
    """
    m = _NUM_PREFIX.match(s)
    if m is None:
        return 0
    num = m.group(1)
    if "." in num or "e" in num or "E" in num:
        return float(num)
    i = int(num)
    return i if INT64_MIN <= i <= INT64_MAX else float(i)


def to_number(v: SqliteValue) -> int | float:
    """Numeric value of a non-NULL SQLite value (as for arithmetic operands)."""
    t = type(v)
    if t is int or t is float:
        return v  # type: ignore[return-value]
    if t is str:
        return text_to_number(v)  # type: ignore[arg-type]
    if isinstance(v, bytes):
        return text_to_number(v.decode("utf-8", "replace"))
    raise SqlEvalError(f"not a number: {v!r}")


def cast_integer(v: SqliteValue) -> int | None:
    if v is None:
        return None
    t = type(v)
    if t is int:
        return v  # type: ignore[return-value]
    if t is float:
        f: float = v  # type: ignore[assignment]
        if f != f:
            return 0
        if f >= 9.223372036854775807e18:
            return INT64_MAX
        if f <= -9.223372036854775808e18:
            return INT64_MIN
        return int(f)
    s = v if t is str else to_text(v)
    m = _INT_PREFIX.match(s)  # type: ignore[arg-type]
    if m is None:
        return 0
    return _clamp_int64(int(m.group(1)))


def cast_real(v: SqliteValue) -> float | None:
    if v is None:
        return None
    t = type(v)
    if t is float:
        return v  # type: ignore[return-value]
    if t is int:
        return float(v)
    s = v if t is str else to_text(v)
    m = _NUM_PREFIX.match(s)  # type: ignore[arg-type]
    if m is None:
        return 0.0
    return float(m.group(1))


def cast_numeric(v: SqliteValue) -> int | float | None:
    if v is None:
        return None
    t = type(v)
    if t is int or t is float:
        return v  # type: ignore[return-value]
    s = v if t is str else to_text(v)
    n = text_to_number(s)  # type: ignore[arg-type]
    if (
        type(n) is float
        and n.is_integer()
        and -9.223372036854775808e18 <= n < 9.223372036854775807e18
    ):
        return int(n)
    return n


def cast_blob(v: SqliteValue) -> bytes | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        return v
    return to_text(v).encode()  # type: ignore[union-attr]


def cast_to(type_name: str) -> Any:
    """The cast function for an SQLite type name, by SQLite's affinity rules."""
    name = type_name.upper()
    if "INT" in name:
        return cast_integer
    if "CHAR" in name or "CLOB" in name or "TEXT" in name:
        return to_text
    if "BLOB" in name or not name:
        return cast_blob
    if "REAL" in name or "FLOA" in name or "DOUB" in name:
        return cast_real
    return cast_numeric


def truth(v: SqliteValue) -> int | None:
    """SQLite truth value: 1, 0, or None (NULL)."""
    if v is None:
        return None
    t = type(v)
    if t is int or t is float:
        return 1 if v else 0
    return 1 if to_number(v) else 0


def typeof(v: SqliteValue) -> str:
    if v is None:
        return "null"
    t = type(v)
    if t is str:
        return "text"
    if t is int:
        return "integer"
    if t is float:
        return "real"
    return "blob"


# --------------------------------------------------------------------------- comparison


def _rank(v: SqliteValue) -> int:
    t = type(v)
    if t is int or t is float:
        return 1
    if t is str:
        return 2
    return 3


def compare(a: SqliteValue, b: SqliteValue) -> int:
    """Order two non-NULL values: numbers < text < blob, numbers numerically."""
    ta = type(a)
    if ta is type(b) or (_rank(a) == 1 and _rank(b) == 1):
        return (a > b) - (a < b)  # type: ignore[operator]
    return _rank(a) - _rank(b)


def op_eq(a: SqliteValue, b: SqliteValue) -> int | None:
    if a is None or b is None:
        return None
    if type(a) is type(b):
        return 1 if a == b else 0
    return 1 if compare(a, b) == 0 else 0


def op_ne(a: SqliteValue, b: SqliteValue) -> int | None:
    if a is None or b is None:
        return None
    if type(a) is type(b):
        return 1 if a != b else 0
    return 1 if compare(a, b) != 0 else 0


def op_lt(a: SqliteValue, b: SqliteValue) -> int | None:
    if a is None or b is None:
        return None
    return 1 if compare(a, b) < 0 else 0


def op_le(a: SqliteValue, b: SqliteValue) -> int | None:
    if a is None or b is None:
        return None
    return 1 if compare(a, b) <= 0 else 0


def op_gt(a: SqliteValue, b: SqliteValue) -> int | None:
    if a is None or b is None:
        return None
    return 1 if compare(a, b) > 0 else 0


def op_ge(a: SqliteValue, b: SqliteValue) -> int | None:
    if a is None or b is None:
        return None
    return 1 if compare(a, b) >= 0 else 0


def op_is(a: SqliteValue, b: SqliteValue) -> int:
    if a is None or b is None:
        return 1 if a is None and b is None else 0
    return 1 if compare(a, b) == 0 else 0


def op_is_not(a: SqliteValue, b: SqliteValue) -> int:
    return 1 - op_is(a, b)


def op_and(a: SqliteValue, b: SqliteValue) -> int | None:
    ta = truth(a)
    if ta == 0:
        return 0
    tb = truth(b)
    if tb == 0:
        return 0
    if ta is None or tb is None:
        return None
    return 1


def op_or(a: SqliteValue, b: SqliteValue) -> int | None:
    ta = truth(a)
    if ta == 1:
        return 1
    tb = truth(b)
    if tb == 1:
        return 1
    if ta is None or tb is None:
        return None
    return 0


def op_not(a: SqliteValue) -> int | None:
    t = truth(a)
    return None if t is None else 1 - t


def op_in_list(a: SqliteValue, items: list[SqliteValue]) -> int | None:
    """``a IN (x, y, ...)`` with SQL NULL semantics."""
    if a is None:
        return None
    saw_null = False
    for item in items:
        if item is None:
            saw_null = True
        elif op_eq(a, item) == 1:
            return 1
    return None if saw_null else 0


def json_array_items(v: SqliteValue) -> list[SqliteValue] | None:
    """Elements of a JSON array text as SQLite values; None for NULL. Raises if not an array."""
    if v is None:
        return None
    parsed = json_loads(v)
    if type(parsed) is not list:
        raise SqlEvalError(f"expected a JSON array, got {_preview(to_text(v) or '')}")
    return [json_value_to_sqlite(x) for x in parsed]


def op_in_json(a: SqliteValue, array_text: SqliteValue) -> int | None:
    """``a IN column`` where the column holds a JSON array (PowerSync semantics)."""
    if a is None or array_text is None:
        return None
    items = json_array_items(array_text)
    assert items is not None
    for item in items:
        if item is not None and op_eq(a, item) == 1:
            return 1
    return 0


def op_overlap(a: SqliteValue, b: SqliteValue) -> int | None:
    """``a && b``: both JSON arrays, 1 if they share an element (the reference's ``&&``)."""
    if a is None or b is None:
        return None
    items_a = json_array_items(a)
    items_b = [y for y in json_array_items(b) or () if y is not None]
    for x in items_a or ():
        if x is not None:
            for y in items_b:
                if op_eq(x, y) == 1:
                    return 1
    return 0


# --------------------------------------------------------------------------- arithmetic


def _real(r: float) -> float | None:
    """SQLite turns a NaN result (inf - inf, 0 * inf) into NULL."""
    return None if r != r else r


def _int_result(r: int, a: int | float, b: int | float, op: str) -> int | float:
    if INT64_MIN <= r <= INT64_MAX:
        return r
    fa, fb = float(a), float(b)
    return fa + fb if op == "+" else fa - fb if op == "-" else fa * fb


def op_add(a: SqliteValue, b: SqliteValue) -> int | float | None:
    if a is None or b is None:
        return None
    x, y = to_number(a), to_number(b)
    r = x + y
    return _int_result(r, x, y, "+") if type(r) is int else _real(r)


def op_sub(a: SqliteValue, b: SqliteValue) -> int | float | None:
    if a is None or b is None:
        return None
    x, y = to_number(a), to_number(b)
    r = x - y
    return _int_result(r, x, y, "-") if type(r) is int else _real(r)


def op_mul(a: SqliteValue, b: SqliteValue) -> int | float | None:
    if a is None or b is None:
        return None
    x, y = to_number(a), to_number(b)
    r = x * y
    return _int_result(r, x, y, "*") if type(r) is int else _real(r)


def op_div(a: SqliteValue, b: SqliteValue) -> int | float | None:
    if a is None or b is None:
        return None
    x, y = to_number(a), to_number(b)
    if y == 0:
        return None
    if type(x) is int and type(y) is int:
        q = abs(x) // abs(y)
        r = q if (x < 0) == (y < 0) else -q
        return r if r <= INT64_MAX else float(r)
    return x / y


def op_mod(a: SqliteValue, b: SqliteValue) -> int | float | None:
    if a is None or b is None:
        return None
    x, y = to_number(a), to_number(b)
    ix = cast_integer(x)
    iy = cast_integer(y)
    assert ix is not None and iy is not None
    if iy == 0:
        return None
    r = abs(ix) % abs(iy)
    if ix < 0:
        r = -r
    if type(x) is float or type(y) is float:
        return float(r)
    return r


def op_neg(a: SqliteValue) -> int | float | None:
    if a is None:
        return None
    x = to_number(a)
    r = -x
    if type(r) is int and r > INT64_MAX:
        return float(r)
    return r


def op_concat(a: SqliteValue, b: SqliteValue) -> str | None:
    if a is None or b is None:
        return None
    return to_text(a) + to_text(b)  # type: ignore[operator]


def _wrap64(i: int) -> int:
    i &= (1 << 64) - 1
    return i - (1 << 64) if i >= (1 << 63) else i


def op_bit_and(a: SqliteValue, b: SqliteValue) -> int | None:
    if a is None or b is None:
        return None
    return cast_integer(a) & cast_integer(b)  # type: ignore[operator]


def op_bit_or(a: SqliteValue, b: SqliteValue) -> int | None:
    if a is None or b is None:
        return None
    return cast_integer(a) | cast_integer(b)  # type: ignore[operator]


def _shift(x: int, n: int) -> int:
    if n < 0:
        return _shift_right(x, -n)
    if n >= 64:
        return 0
    return _wrap64(x << n)


def _shift_right(x: int, n: int) -> int:
    if n < 0:
        return _shift(x, -n)
    if n >= 64:
        return -1 if x < 0 else 0
    return x >> n


def op_lshift(a: SqliteValue, b: SqliteValue) -> int | None:
    if a is None or b is None:
        return None
    return _shift(cast_integer(a), cast_integer(b))  # type: ignore[arg-type]


def op_rshift(a: SqliteValue, b: SqliteValue) -> int | None:
    if a is None or b is None:
        return None
    return _shift_right(cast_integer(a), cast_integer(b))  # type: ignore[arg-type]


def op_bit_not(a: SqliteValue) -> int | None:
    if a is None:
        return None
    return ~cast_integer(a)  # type: ignore[operator]


# --------------------------------------------------------------------------- LIKE

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


@lru_cache(maxsize=512)
def like_regex(pattern: str, escape: str | None) -> re.Pattern[str]:
    out: list[str] = []
    i = 0
    pattern = pattern.translate(_ASCII_LOWER)
    while i < len(pattern):
        c = pattern[i]
        if escape is not None and c == escape and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if c == "%":
            out.append(".*")
        elif c == "_":
            out.append(".")
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def op_like(a: SqliteValue, pattern: SqliteValue, escape: SqliteValue = None) -> int | None:
    """SQLite LIKE: case-insensitive for ASCII letters, % and _ wildcards."""
    if a is None or pattern is None:
        return None
    esc: str | None = None
    if escape is not None:
        esc = to_text(escape)
        if esc is None or len(esc) != 1:
            raise SqlEvalError("ESCAPE expression must be a single character")
    rx = like_regex(to_text(pattern), esc)
    text = to_text(a).translate(_ASCII_LOWER)  # type: ignore[union-attr]
    return 1 if rx.fullmatch(text) else 0


def ascii_upper(s: str) -> str:
    return s.translate(_ASCII_UPPER)


def ascii_lower(s: str) -> str:
    return s.translate(_ASCII_LOWER)
