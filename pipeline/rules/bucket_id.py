"""Bucket id serialisation (sync-protocol.md §8.5) and lookup keys.

``id = definition name + JSON array of the parameter values``: strings as JSON strings
(standard escaping, raw UTF-8 like ``JSON.stringify``), integers bare, a real with an
integral value printed like the integer (``1``, not ``1.0``), NULL as ``null``, no spaces.
Examples: ``global[]``, ``by_user["u1"]``, ``by_org[42]``, ``team_project["t1","p9"]``.
Only requests produce ids with ``null`` in them (a NULL request parameter); a data row whose
parameter would print as ``null`` goes into no bucket (``queries._bucket_fn``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from decimal import Decimal
from typing import Final

import orjson

from pipeline.rules.values import SqliteValue

LOOKUP_SEPARATOR: Final = "\x1f"


def _js_number(f: float) -> str:
    """A non-integral finite float as JavaScript's ``Number.prototype.toString`` prints it."""
    r = repr(f)
    if "e" not in r:
        return r
    mantissa, exp_text = r.split("e")
    exp = int(exp_text)
    if -7 < exp < 21:
        return format(Decimal(r), "f")
    return f"{mantissa}e{'+' if exp > 0 else '-'}{abs(exp)}"


def json_string(s: str) -> str:
    try:
        return orjson.dumps(s).decode()
    except TypeError:  # lone surrogates: escape them like JSON.stringify does
        return json.dumps(s, ensure_ascii=False).encode("utf-8", "backslashreplace").decode()


def serialize_value(v: SqliteValue) -> str:
    """One bucket parameter value as JSON text (see module docstring)."""
    t = type(v)
    if t is str:
        return json_string(v)  # type: ignore[arg-type]
    if t is int:
        return str(v)
    if v is None:
        return "null"
    if t is float:
        f: float = v  # type: ignore[assignment]
        if not math.isfinite(f):
            return "null"
        if f.is_integer():
            return str(int(f))
        return _js_number(f)
    if t is bool:
        return "1" if v else "0"
    raise TypeError(f"bucket parameter values must be text, numbers or NULL, got {t.__name__}")


def serialize_values(values: Iterable[SqliteValue]) -> str:
    """A JSON array of parameter values, e.g. ``["t1","p9"]``."""
    return "[" + ",".join([serialize_value(v) for v in values]) + "]"


def bucket_id(definition: str, values: Iterable[SqliteValue] = ()) -> str:
    """``bucket_id("by_user", ["u1"]) == 'by_user["u1"]'``; ``bucket_id("global") == 'global[]'``."""
    return definition + serialize_values(values)


def lookup_key(definition: str, query_index: int, values: Iterable[SqliteValue]) -> str:
    """Key of a lookup set of a parameter query over a table.

    ``<definition>\\x1f<query index>\\x1f<JSON array of the request-side values>``; the
    row side (processor) and the request side (gateway) build it the same way, so equal
    values meet in the same key (integral reals normalised like bucket ids).
    """
    return (
        f"{definition}{LOOKUP_SEPARATOR}{query_index}{LOOKUP_SEPARATOR}{serialize_values(values)}"
    )
