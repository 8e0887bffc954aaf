"""Harness of the edition-1 conformance suite (cases ported from powersync-service).

A :class:`Case` names the reference test it comes from (``file > test name``), holds the
rules (YAML text, or built by :func:`data_rules` / :func:`param_rules`) and a list of
checks. Every check states the reference's expectation; a check we deliberately differ on
carries ``diff="<id>"`` (an entry of ``DIFFERENCES.md``) and ``ours=`` (what we do instead),
and the suite asserts ``ours``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.rules import RulesError, SyncRules, parse_rules
from pipeline.rules.bucket_id import LOOKUP_SEPARATOR
from pipeline.rules.queries import compile_expression

_UNSET: Any = object()

# our informational warnings without a counterpart in the reference
_IGNORED_WARNINGS = re.compile(r"no data queries|bucket_definitions is empty")


def data_rules(sql: str | Sequence[str], params: Sequence[str] = (), name: str = "mybucket") -> str:
    """Rules with one definition whose bucket parameters are ``params`` (from the token)."""
    queries = [sql] if isinstance(sql, str) else list(sql)
    lines = ["bucket_definitions:", f"  {name}:"]
    if params:
        cols = ", ".join(f"token_parameters.{p} AS {p}" for p in params)
        lines.append(f"    parameters: {json.dumps('SELECT ' + cols)}")
    lines.append("    data:")
    lines += [f"      - {json.dumps(q)}" for q in queries]
    return "\n".join(lines) + "\n"


def param_rules(
    sql: str | Sequence[str], *, accept_dangerous: bool = False, name: str = "mybucket"
) -> str:
    """Rules with one definition made of the given parameter queries and no data query."""
    queries = [sql] if isinstance(sql, str) else list(sql)
    lines = ["bucket_definitions:", f"  {name}:"]
    if accept_dangerous:
        lines.append("    accept_potentially_dangerous_queries: true")
    lines.append("    parameters:")
    lines += [f"      - {json.dumps(q)}" for q in queries]
    lines.append("    data: []")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- checks


@dataclass
class Check:
    expect: Any = None
    ours: Any = _UNSET
    diff: str | None = None

    @property
    def wanted(self) -> Any:
        return self.expect if self.ours is _UNSET else self.ours

    def run(self, rules: SyncRules) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class Row(Check):
    """``evaluate_row``: expect a list of ``(bucket, object_type, id, data dict)``."""

    table: str = ""
    row: Mapping[str, Any] = field(default_factory=dict)
    schema: str | None = "test_schema"
    subset: bool = False  # only (bucket, object_type, id) are compared (toMatchObject)

    def run(self, rules: SyncRules) -> None:
        out = rules.evaluate_row(self.table, self.row, schema=self.schema)
        if self.subset:
            got: list[Any] = [(o.bucket, o.object_type, o.object_id) for o in out]
            want = [tuple(w[:3]) for w in self.wanted]
        else:
            got = [(o.bucket, o.object_type, o.object_id, json.loads(o.data)) for o in out]
            want = [tuple(w) for w in self.wanted]
        assert got == want


@dataclass
class ParamRow(Check):
    """``evaluate_parameter_row``: expect ``(query number, lookup values, bucket param values)``."""

    table: str = ""
    row: Mapping[str, Any] = field(default_factory=dict)

    def run(self, rules: SyncRules) -> None:
        out = rules.evaluate_parameter_row(self.table, self.row, schema="test_schema")
        got = []
        for e in out:
            _definition, number, values = e.lookup.split(LOOKUP_SEPARATOR)
            got.append((int(number), _norm(json.loads(values)), _norm(list(e.values))))
        want = [(n, _norm(list(lk)), _norm(list(v))) for n, lk, v in self.wanted]
        assert got == want


@dataclass
class Lookups(Check):
    """``lookup_keys_for_request``: expect a list of lookup value lists (any query)."""

    jwt: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] | None = None

    def run(self, rules: SyncRules) -> None:
        keys = rules.lookup_keys_for_request(dict(self.jwt), self.params)
        got = [_norm(json.loads(k.split(LOOKUP_SEPARATOR)[2])) for k in keys]
        assert got == [_norm(list(v)) for v in self.wanted]


@dataclass
class Request(Check):
    """``buckets_for_request``: expect ``[(bucket, priority), ...]`` (in order).

    ``param_rows`` (table -> rows) fill the lookup index through ``evaluate_parameter_row``.
    """

    jwt: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] | None = None
    param_rows: Mapping[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict)
    unordered: bool = False

    def run(self, rules: SyncRules) -> None:
        index: dict[str, list[tuple[Any, ...]]] = {}
        for table, rows in self.param_rows.items():
            for r in rows:
                for e in rules.evaluate_parameter_row(table, r, schema="test_schema"):
                    index.setdefault(e.lookup, []).append(e.values)
        out = rules.buckets_for_request(dict(self.jwt), self.params, lookups=index)
        got = [(b.bucket, b.priority) for b in out]
        want = [tuple(w) for w in self.wanted]
        if self.unordered:
            assert sorted(got) == sorted(want)
        else:
            assert got == want


@dataclass
class Warnings(Check):
    """The rules load; ``expect`` is a list of regexes, one per expected warning (in any
    order); ``[]`` means no warning."""

    def run(self, rules: SyncRules) -> None:
        got = [w for w in rules.warnings if not _IGNORED_WARNINGS.search(w)]
        patterns = list(self.wanted)
        assert len(got) == len(patterns), got
        for p in patterns:
            assert any(re.search(p, w, re.IGNORECASE) for w in got), (p, got)


@dataclass
class Expr(Check):
    """One SQL expression over a row (``compile_expression``); ``expect`` is the SQLite
    value (int = INTEGER, float = REAL, bytes = BLOB) or :data:`RAISES`."""

    sql: str = ""
    row: Mapping[str, Any] = field(default_factory=dict)

    def run(self, rules: SyncRules) -> None:
        fn = compile_expression(self.sql)
        if self.wanted is RAISES:
            try:
                value = fn(self.row)
            except Exception:
                return
            raise AssertionError(f"expected an error, got {value!r}")
        value = fn(self.row)
        want = self.wanted
        assert type(value) is type(want) and (value == want or (value != value and want != want)), (
            value,
            want,
        )


RAISES: Any = type("Raises", (), {"__repr__": lambda self: "RAISES"})()


@dataclass
class Custom(Check):
    fn: Callable[[SyncRules], None] | None = None

    def run(self, rules: SyncRules) -> None:
        assert self.fn is not None
        self.fn(rules)


def _norm(values: list[Any]) -> list[Any]:
    """Lookup values compare like the reference's normalised lookups (3.0 == 3)."""
    out: list[Any] = []
    for v in values:
        if type(v) is float and v.is_integer():
            v = int(v)
        out.append(v)
    return out


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    ref: str  # "<reference test file> > <test name>"
    rules: str | None = None  # None: expression-only case
    checks: Sequence[Check] = ()
    error: str | None = None  # the rules are refused (RulesError matching this regex)
    ours_error: Any = _UNSET  # what we do instead: a regex, or None (we accept)
    diff: str | None = None  # DIFFERENCES.md id for a load-level difference
    open_: str | None = None  # DIFFERENCES.md id of a gap not closed yet (the case xfails)

    @property
    def id(self) -> str:
        return self.ref

    def run(self) -> None:
        error = self.error if self.ours_error is _UNSET else self.ours_error
        if error is not None:
            assert self.rules is not None
            try:
                parse_rules(self.rules)
            except RulesError as e:
                assert re.search(error, str(e), re.IGNORECASE), str(e)
                return
            raise AssertionError(f"expected the rules to be refused ({error})")
        rules = parse_rules(self.rules) if self.rules is not None else _EMPTY
        for check in self.checks:
            check.run(rules)


_EMPTY = parse_rules("bucket_definitions: {}\n")


def all_diffs(cases: Sequence[Case]) -> set[str]:
    ids = {c.diff for c in cases if c.diff}
    ids |= {ch.diff for c in cases for ch in c.checks if ch.diff}
    ids |= {c.open_ for c in cases if c.open_}
    return ids


__all__ = [
    "RAISES",
    "Case",
    "Check",
    "Custom",
    "Expr",
    "Lookups",
    "ParamRow",
    "Request",
    "Row",
    "Warnings",
    "all_diffs",
    "data_rules",
    "param_rules",
]
