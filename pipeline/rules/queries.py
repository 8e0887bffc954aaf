"""Compiled data queries and parameter queries of one bucket definition."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from sqlglot import exp

from pipeline.rules import functions as fns
from pipeline.rules import values as sv
from pipeline.rules.bucket_id import json_string, lookup_key, serialize_value, serialize_values
from pipeline.rules.errors import RulesError, SqlEvalError
from pipeline.rules.expr import (
    NO_MATCH,
    Compiler,
    InputParam,
    MatchClause,
    Mode,
    ParamValue,
    RequestContext,
    Row,
    RowValue,
    Scope,
    Static,
    ValueFn,
    _sql,
)
from pipeline.rules.model import LookupEntry, LookupResults
from pipeline.rules.sql import (
    SqlSyntaxError,
    identifier_name,
    locate,
    node_offset,
    node_text,
    parse_select,
    position_of,
)
from pipeline.rules.values import SqliteValue

EMPTY: Final[tuple[str, ...]] = ()
#: bucket ids a data query's single-parameter bucket function keeps per parameter value
BUCKET_ID_CACHE: Final = 4096


# --------------------------------------------------------------------------- context / errors


@dataclass
class QueryContext:
    """Where a query comes from, for messages."""

    source: str
    definition: str
    kind: str  # "data" | "parameter"
    number: int  # 1-based
    sql: str
    streams: bool = False  # a sync stream query (auth.*, connection.*, subscription.*)
    #: how messages name the query (default: ``definition 'x', data query 1 "..."``)
    where: str | None = None
    #: line and column of the query's first character in the YAML file (1-based)
    origin: tuple[int, int] | None = None

    @property
    def multiline(self) -> bool:
        return "\n" in self.sql

    @property
    def label(self) -> str:
        if self.where is not None:
            return f'{self.where} "{self.sql}"'
        return f"definition '{self.definition}', {self.kind} query {self.number} \"{self.sql}\""

    def error(self, message: str, offset: int | None) -> RulesError:
        prefix = "sync rules: " if self.source == "<rules>" else f"sync rules: {self.source}: "
        line = column = None
        where = ""
        if offset is not None:
            pos = position_of(self.sql, offset)
            line, column = pos.line, pos.column
            where = f" at {pos.describe(self.multiline)}"
            if self.origin is not None:
                line = self.origin[0] + pos.line - 1
                column = pos.column + (self.origin[1] - 1 if pos.line == 1 else 0)
                where += f" (file line {line}, column {column})"
        return RulesError(
            f"{prefix}{self.label}: {message}{where}",
            source=self.source,
            definition=self.definition,
            query=self.sql,
            line=line,
            column=column,
        )

    def warning(self, message: str, offset: int | None) -> str:
        where = ""
        if offset is not None:
            where = f" at {position_of(self.sql, offset).describe(self.multiline)}"
        return f"sync rules: {self.label}: {message}{where}"


# --------------------------------------------------------------------------- shared parsing


_CLAUSE_NAMES: Final = {
    "joins": "joins are not supported",
    "laterals": "joins are not supported",
    "group": "GROUP BY is not supported",
    "having": "HAVING is not supported",
    "order": "ORDER BY is not supported",
    "limit": "LIMIT is not supported",
    "offset": "OFFSET is not supported",
    "distinct": "DISTINCT is not supported",
    "with": "WITH (common table expressions) is not supported",
    "with_": "WITH (common table expressions) is not supported",
    "qualify": "QUALIFY is not supported",
    "windows": "window definitions are not supported",
}
_ALLOWED_SELECT_ARGS: Final = frozenset({"expressions", "from", "from_", "where"})


def _parse(ctx: QueryContext, allow_empty: bool = False) -> exp.Select:
    try:
        stmt = parse_select(ctx.sql)
    except SqlSyntaxError as e:
        raise ctx.error(e.message, e.offset) from None
    assert isinstance(stmt, exp.Select)
    for key, value in stmt.args.items():
        if key in _ALLOWED_SELECT_ARGS or not value:
            continue
        node = value[0] if isinstance(value, list) else value
        raise ctx.error(
            _CLAUSE_NAMES.get(key, f"{key.upper()} is not supported"),
            locate(ctx.sql, node) if isinstance(node, exp.Expr) else None,
        )
    if not stmt.expressions and not allow_empty:
        raise ctx.error("syntax error: no columns selected", 0)
    return stmt


def _take_priority(ctx: QueryContext, stmt: exp.Select) -> int | None:
    """Remove a ``<integer literal> AS _priority`` output (the bucket priority, 0..3)."""
    for i, e in enumerate(stmt.expressions):
        if not isinstance(e, exp.Alias) or identifier_name(e.args.get("alias"))[0] != "_priority":
            continue
        node = e.this
        if not (isinstance(node, exp.Literal) and not node.is_string and node.this.isdigit()):
            raise ctx.error("priority must be a simple integer literal", node_offset(e))
        value = int(node.this)
        if not 0 <= value <= 3:
            raise ctx.error(
                "invalid value for priority, must be between 0 and 3 (inclusive)", node_offset(e)
            )
        del stmt.expressions[i]
        return value
    return None


def _from(stmt: exp.Select) -> exp.Expr | None:
    f = stmt.args.get("from_") or stmt.args.get("from")
    return f.this if isinstance(f, exp.From) else None


@dataclass(frozen=True)
class TableRef:
    name: str  # as written (case folded unless quoted); may end with % (wildcard)
    schema: str | None
    alias: str | None

    @property
    def wildcard(self) -> bool:
        return self.name.endswith("%")

    @property
    def prefix(self) -> str:
        return self.name[:-1]

    @property
    def sql_name(self) -> str:
        return self.alias or self.name

    def matches(self, table: str, schema: str | None) -> bool:
        if self.schema is not None and self.schema != schema:
            return False
        return table.startswith(self.prefix) if self.wildcard else table == self.name


def _table_ref(node: exp.Table, ctx: QueryContext, warnings: list[str]) -> TableRef:
    if node.args.get("catalog") is not None:
        raise ctx.error(
            "table names may have at most one qualifier (schema.table)", node_offset(node)
        )
    if not isinstance(node.this, exp.Identifier):
        raise ctx.error(f"unsupported FROM {_sql(node)!r}", node_offset(node))
    name, quoted = identifier_name(node.this)
    if not quoted and node.this.this != name:
        warnings.append(
            ctx.warning(
                f'unquoted table name {node.this.this} is converted to lower case; use "{node.this.this}"',
                node_offset(node.this),
            )
        )
    db = node.args.get("db")
    schema = identifier_name(db)[0] if db is not None else None
    alias_node = node.args.get("alias")
    alias = identifier_name(alias_node.this)[0] if isinstance(alias_node, exp.TableAlias) else None
    if alias_node is not None and isinstance(alias_node, exp.TableAlias) and alias_node.columns:
        raise ctx.error("column aliases on tables are not supported", node_offset(alias_node))
    return TableRef(name=name, schema=schema, alias=alias)


@dataclass
class _Output:
    name: str | None  # None: '*'
    node: exp.Expr | None


def _outputs(
    stmt: exp.Select, ctx: QueryContext, table_names: frozenset[str], allow_star: bool
) -> list[_Output]:
    outputs: list[_Output] = []
    seen: set[str] = set()
    for e in stmt.expressions:
        if isinstance(e, exp.Star) or (isinstance(e, exp.Column) and isinstance(e.this, exp.Star)):
            if not allow_star:
                raise ctx.error(
                    "'*' is not supported here; select explicit columns with names", node_offset(e)
                )
            if isinstance(e, exp.Column):
                qualifier, _ = identifier_name(e.args.get("table"))
                if qualifier not in table_names:
                    raise ctx.error(f"unknown table '{qualifier}' in {qualifier}.*", node_offset(e))
            outputs.append(_Output(None, None))
            continue
        if isinstance(e, exp.Alias):
            name, _ = identifier_name(e.args.get("alias"))
            node = e.this
        elif isinstance(e, exp.Column) and isinstance(e.this, exp.Identifier):
            name, _ = identifier_name(e.this)
            node = e
        else:
            raise ctx.error(
                f"alias is required, e.g. {node_text(ctx.sql, e)} AS name", node_offset(e)
            )
        if not name:
            raise ctx.error("empty column name", node_offset(e))
        if name in seen and not allow_star:
            raise ctx.error(f"duplicate output column '{name}'", node_offset(e))
        seen.add(name)
        outputs.append(_Output(name, node))
    return outputs


def _warn_alias_case(stmt: exp.Select, ctx: QueryContext, warnings: list[str]) -> None:
    """Parameter queries: an unquoted mixed-case output alias folds to lower case (the
    reference warns, as the bucket parameter then has the lower-case name)."""
    for e in stmt.expressions:
        ident = e.args.get("alias") if isinstance(e, exp.Alias) else None
        if (
            isinstance(ident, exp.Identifier)
            and not ident.quoted
            and ident.this != ident.this.lower()
        ):
            w = ctx.warning(
                f'unquoted alias {ident.this} is converted to lower case; use "{ident.this}" '
                "to keep its case",
                node_offset(ident),
            )
            if w not in warnings:
                warnings.append(w)


def _compile_err(ctx: QueryContext, e: SqlSyntaxError) -> RulesError:
    return ctx.error(e.message, e.offset_in(ctx.sql))


def _flush_warnings(ctx: QueryContext, scope: Scope, warnings: list[str]) -> None:
    for message, offset in scope.warnings:
        w = ctx.warning(message, offset)
        if w not in warnings:
            warnings.append(w)


# --------------------------------------------------------------------------- data queries


def _object_id(v: SqliteValue) -> str:
    if v is None:
        return ""
    if type(v) is str:
        return v
    return sv.to_text(v) or ""


class Projection:
    """The output columns of a data query: computes ``(object_id, data)`` for a row."""

    __slots__ = ("_columns", "key", "project")

    def __init__(
        self,
        star: bool,
        columns: list[tuple[str, ValueFn]],
        key: tuple[Any, ...],
        plain: list[tuple[str, str]] | None = None,
        items: list[tuple[str, ValueFn] | None] | None = None,
        skip: frozenset[str] = frozenset(),
    ) -> None:
        """``items``: the select list in order (None: ``*``) when ``*`` is not only first;
        ``skip``: columns ``*`` leaves out."""
        self.key = key
        self._columns = columns
        if items is not None:
            self.project: Callable[[Row], tuple[str, str]] = self._make_ordered(items, skip)
        elif star and not columns:
            self.project = _project_star
        elif not star and plain is not None:
            self.project = self._make_plain(plain)
        else:
            self.project = self._make_general(star, columns)

    @staticmethod
    def _make_ordered(
        items: list[tuple[str, ValueFn] | None], skip: frozenset[str]
    ) -> Callable[[Row], tuple[str, str]]:
        """``*`` anywhere in the select list, like the reference: a column sets its name, ``*``
        fills in the row's columns not set yet (or NULL), except ``skip``
        (``_table_suffix``)."""
        dumps = sv.dumps_flat_object

        def project(row: Row) -> tuple[str, str]:
            d: dict[str, SqliteValue] = {}
            for item in items:
                if item is None:
                    for k, v in _star_dict(row).items():
                        if d.get(k) is None and k not in skip:
                            d[k] = v
                else:
                    d[item[0]] = item[1](row, None)
            for k in [k for k, v in d.items() if type(v) is bytes]:
                del d[k]  # binary values are dropped (sync-protocol.md §8.3)
            oid = d.get("id")
            return (oid if type(oid) is str else _object_id(oid)), dumps(d)

        return project

    @staticmethod
    def _make_plain(plain: list[tuple[str, str]]) -> Callable[[Row], tuple[str, str]]:
        """Only plain column references (``SELECT id, a, b AS c``): no closures per column."""
        to_sqlite = sv.to_sqlite
        dumps = sv.dumps_flat_object
        orjson_dumps = orjson.dumps

        def project(row: Row) -> tuple[str, str]:
            d: dict[str, SqliteValue] = {}
            simple = True
            get = row.get
            for name, col in plain:
                v = get(col)
                t = type(v)
                if t is not str and t is not int and v is not None:
                    v = to_sqlite(v)
                    t = type(v)
                    if t is bytes:  # binary values are dropped (§8.3)
                        d.pop(name, None)
                        continue
                    if t is float:
                        simple = False
                d[name] = v
            if simple:
                try:
                    data = orjson_dumps(d).decode()
                except TypeError:
                    data = sv.json_dumps(d)
            else:
                data = dumps(d)
            oid = d.get("id")
            return (oid if type(oid) is str else _object_id(oid)), data

        return _straight_plain(plain, project) or project

    @staticmethod
    def _make_general(
        star: bool, columns: list[tuple[str, ValueFn]]
    ) -> Callable[[Row], tuple[str, str]]:
        dumps = sv.dumps_flat_object

        def project(row: Row) -> tuple[str, str]:
            d: dict[str, SqliteValue] = _star_dict(row) if star else {}
            for name, fn in columns:
                v = fn(row, None)
                if type(v) is bytes:  # binary values are dropped (§8.3)
                    d.pop(name, None)
                    continue
                d[name] = v
            oid = d.get("id")
            return (oid if type(oid) is str else _object_id(oid)), dumps(d)

        return project


def _straight_plain(
    plain: list[tuple[str, str]], general: Callable[[Row], tuple[str, str]]
) -> Callable[[Row], tuple[str, str]] | None:
    """A straight-line ``project`` for plain column references, for rows whose selected
    values are all text, integers or NULL (JSON as they are); any other row goes to
    ``general``, the loop of :meth:`Projection._make_plain`, which gives the same result
    for these rows. Generated once per query; names reach the code only as constants."""
    if not plain or len(plain) > 64:
        return None
    env: dict[str, Any] = {
        "_str": str,
        "_int": int,
        "_dumps": orjson.dumps,
        "_json_dumps": sv.json_dumps,
        "_object_id": _object_id,
        "_general": general,
    }
    lines = ["def project(row):", "    get = row.get"]
    checks = []
    items = []
    oid = "None"
    for i, (name, col) in enumerate(plain):
        env[f"C{i}"], env[f"N{i}"] = col, name
        lines.append(f"    v{i} = get(C{i})")
        lines.append(f"    t{i} = type(v{i})")
        checks.append(f"(t{i} is _str or t{i} is _int or v{i} is None)")
        items.append(f"N{i}: v{i}")
        if name == "id":
            oid = f"v{i}"  # the last one wins, as in the dict
    lines += [
        "    if not (" + " and ".join(checks) + "):",
        "        return _general(row)",
        "    d = {" + ", ".join(items) + "}",
        "    try:",
        "        data = _dumps(d).decode()",
        "    except TypeError:",
        "        data = _json_dumps(d)",
        f"    oid = {oid}",
        "    return (oid if type(oid) is _str else _object_id(oid)), data",
    ]
    exec("\n".join(lines), env)  # names and columns enter only through env constants
    fn: Callable[[Row], tuple[str, str]] = env["project"]
    return fn


def _star_dict(row: Row) -> dict[str, SqliteValue]:
    d: dict[str, SqliteValue] = {}
    to_sqlite = sv.to_sqlite
    for k, v in row.items():
        t = type(v)
        if t is not str and t is not int and v is not None:
            v = to_sqlite(v)
            if type(v) is bytes:
                continue
        d[k] = v
    return d


def project_star_json(row: Row, row_json: str) -> tuple[str, str]:
    """:func:`_project_star` of a row whose ``orjson.dumps`` text is ``row_json``: that
    text is the data when every value is text, an integer or NULL (the fastest path
    there encodes the row the same way)."""
    for v in row.values():
        t = type(v)
        if t is not str and t is not int and v is not None:
            return _project_star(row)
    oid = row.get("id")
    return (oid if type(oid) is str else _object_id(oid)), row_json


def _project_star(row: Row) -> tuple[str, str]:
    # fastest path: only str/int/None values (decoded rows hold booleans as 1/0)
    for v in row.values():
        t = type(v)
        if t is not str and t is not int and v is not None:
            break
    else:
        try:
            data = orjson.dumps(row if type(row) is dict else dict(row)).decode()
        except TypeError:
            data = sv.json_dumps(dict(row))
        oid = row.get("id")
        return (oid if type(oid) is str else _object_id(oid)), data
    # fast path: str/int/None values, and booleans (SQLite integers 1/0) in a copy
    d: Any = row
    for k, v in row.items():
        t = type(v)
        if t is str or t is int or v is None:
            continue
        if t is bool:
            if d is row:
                d = dict(row)
            d[k] = 1 if v else 0
            continue
        break
    else:
        try:
            data = orjson.dumps(d if type(d) is dict else dict(d)).decode()
        except TypeError:
            data = sv.json_dumps(dict(d))
        oid = d.get("id")
        return (oid if type(oid) is str else _object_id(oid)), data
    d = _star_dict(row)
    data = sv.dumps_flat_object(d)
    oid = d.get("id")
    return (oid if type(oid) is str else _object_id(oid)), data


@dataclass(eq=False)
class DataQuery:
    definition: str
    number: int
    sql: str
    table: TableRef
    projection: Projection
    buckets: Callable[[Row], Sequence[str]]
    # the alias or table name; None for a wildcard table without alias (source table name)
    object_type: str | None
    schema: str | None  # required source schema (FROM schema.table), else None
    #: wildcard table whose query reads ``_table_suffix``: the length of its prefix
    suffix_at: int | None = None


def _bucket_fn(
    name: str, params: tuple[str, ...], match: MatchClause, has_where: bool
) -> Callable[[Row], Sequence[str]]:
    """The bucket ids a row lands in for one data query.

    A parameter value that would serialise as ``null`` (NULL, or a non-finite REAL) assigns
    no bucket: ``col = bucket.p`` is not true for NULL (sync-protocol.md §8.5). Only the
    request side produces ``name[null]`` ids, and those stay empty.
    """
    prefix = name + "["
    f = match.filter
    if not params:
        ids = (name + "[]",)
        if not has_where:
            return lambda row: ids
        return lambda row: ids if f(row, None) else EMPTY
    if len(params) == 1 and match.simple is not None:
        col = match.simple[0]
        to_sqlite = sv.to_sqlite
        # bucket ids of recent parameter values (text and integers only: they never
        # compare equal to each other); bounded, cleared when full
        ids_of: dict[str | int, tuple[str]] = {}
        cached = ids_of.get

        def simple(row: Row) -> Sequence[str]:
            v = row.get(col)
            t = type(v)
            if t is str or t is int:
                found = cached(v)  # type: ignore[arg-type]
                if found is not None:
                    return found
                if len(ids_of) >= BUCKET_ID_CACHE:
                    ids_of.clear()
                text = json_string(v) if t is str else str(v)  # type: ignore[arg-type]
                found = ids_of[v] = (prefix + text + "]",)  # type: ignore[index]
                return found
            if v is None:
                return EMPTY  # NULL column: no bucket (§8.5)
            v = to_sqlite(v)
            if v is None or type(v) is bytes:
                return EMPTY
            text = serialize_value(v)
            if text == "null":  # +-Infinity
                return EMPTY
            return (prefix + text + "]",)

        return simple

    def general(row: Row) -> Sequence[str]:
        assignments = f(row, None)
        if not assignments:
            return EMPTY
        if len(assignments) == 1:
            parts = [serialize_value(assignments[0][p]) for p in params]
            if "null" in parts:  # a NULL / non-finite parameter: no bucket (§8.5)
                return EMPTY
            return (prefix + ",".join(parts) + "]",)
        out: dict[str, None] = {}
        for a in assignments:
            parts = [serialize_value(a[p]) for p in params]
            if "null" not in parts:
                out[prefix + ",".join(parts) + "]"] = None
        return tuple(out)

    return general


def compile_data_query(
    ctx: QueryContext,
    params: tuple[str, ...],
    projections: dict[tuple[Any, ...], Projection],
    warnings: list[str],
    stmt: exp.Select | None = None,
) -> DataQuery:
    """``stmt``: an already parsed (sync streams: rewritten) statement of ``ctx.sql``."""
    if stmt is None:
        stmt = _parse(ctx)
    src = _from(stmt)
    if src is None:
        raise ctx.error("a data query needs FROM <table>", len(ctx.sql))
    if isinstance(src, exp.Subquery):
        raise ctx.error("subqueries are not supported", locate(ctx.sql, src))
    if not isinstance(src, exp.Table) or isinstance(src.this, exp.Anonymous):
        what = "table-valued functions" if isinstance(src, exp.Table) else f"FROM {_sql(src)!r}"
        raise ctx.error(f"{what} are not supported in data queries", node_offset(src))
    table = _table_ref(src, ctx, warnings)
    names = frozenset({table.sql_name})
    scope = Scope(
        Mode.DATA, table_names=names, row_kind="table", bucket_params=params, streams=ctx.streams
    )
    compiler = Compiler(scope)
    try:
        outputs = _outputs(stmt, ctx, names, allow_star=True)
        star = False
        columns: list[tuple[str, ValueFn]] = []
        plain: list[tuple[str, str]] = []
        all_plain = True
        key_parts: list[Any] = []
        items: list[tuple[str, ValueFn] | None] = []
        ordered = False  # '*' after a column, or twice: the select order decides
        for out in outputs:
            if out.name is None:
                if columns or star:
                    ordered = True
                star = True
                key_parts.append("*")
                items.append(None)
                continue
            assert out.node is not None
            clause = compiler.compile_value(out.node, "select columns")
            columns.append((out.name, clause.fn))
            items.append((out.name, clause.fn))
            if isinstance(clause, RowValue) and clause.column is not None:
                plain.append((out.name, clause.column))
            else:
                all_plain = False
            key_parts.append((out.name, _sql(out.node)))
        where_node = stmt.args.get("where")
        match = compiler.compile_where(where_node.this if where_node is not None else None)
    except SqlSyntaxError as e:
        raise _compile_err(ctx, e) from None
    _flush_warnings(ctx, scope, warnings)

    covered = {i.bucket_param for i in match.inputs}
    for p in params:
        if p not in covered:
            offset = node_offset(where_node) if where_node is not None else len(ctx.sql)
            raise ctx.error(
                f"does not tie bucket parameter '{p}' to the row; add `<column> = bucket.{p}` "
                f"or `bucket.{p} IN <column>` to the WHERE clause",
                offset,
            )
    suffix_at: int | None = None
    if table.wildcard and any(
        identifier_name(c.this)[0] == "_table_suffix" for c in stmt.find_all(exp.Column)
    ):
        suffix_at = len(table.prefix)
        if star:
            ordered = True  # '*' must leave out the added _table_suffix
    key = (star, ordered, suffix_at is not None, *key_parts)
    projection = projections.get(key)
    if projection is None:
        projection = projections[key] = Projection(
            star,
            columns,
            key,
            plain if all_plain else None,
            items if ordered else None,
            frozenset({"_table_suffix"}) if suffix_at is not None else frozenset(),
        )
    return DataQuery(
        definition=ctx.definition,
        number=ctx.number,
        sql=ctx.sql,
        table=table,
        projection=projection,
        buckets=_bucket_fn(ctx.definition, params, match, where_node is not None),
        object_type=table.alias or (None if table.wildcard else table.name),
        schema=table.schema,
        suffix_at=suffix_at,
    )


# --------------------------------------------------------------------------- parameter queries


@dataclass(eq=False)
class ParameterQuery:
    definition: str
    number: int
    sql: str
    output_names: tuple[str, ...]
    uses_client: bool  # "potentially dangerous" (see Scope.dangerous)
    priority: int | None = field(default=None, kw_only=True)  # from `<n> AS _priority`

    def reorder(self, names: tuple[str, ...]) -> None:
        """Arrange outputs in the definition's bucket parameter order."""
        raise NotImplementedError

    def request_keys(self, req: RequestContext) -> list[str]:
        return []

    def resolve(
        self, req: RequestContext, keys: list[str], results: LookupResults
    ) -> list[tuple[SqliteValue, ...]]:
        raise NotImplementedError

    def bucket_ids(
        self, name: str, req: RequestContext, keys: list[str], results: LookupResults
    ) -> list[str]:
        """The bucket ids of :meth:`resolve` (``name`` + JSON array; rows holding a blob give
        none), possibly with duplicates."""
        out: list[str] = []
        for values in self.resolve(req, keys, results):
            if any(type(v) is bytes for v in values):
                continue
            out.append(name + serialize_values(values))
        return out


@dataclass(eq=False)
class StaticParameterQuery(ParameterQuery):
    """``SELECT request.user_id() AS user_id [WHERE ...]``: computed from the request."""

    outputs: list[ValueFn] = field(default_factory=list)
    where: ValueFn | None = None

    def reorder(self, names: tuple[str, ...]) -> None:
        idx = [self.output_names.index(n) for n in names]
        self.outputs = [self.outputs[i] for i in idx]
        self.output_names = names

    def resolve(
        self, req: RequestContext, keys: list[str], results: LookupResults
    ) -> list[tuple[SqliteValue, ...]]:
        if self.where is not None and sv.truth(self.where(None, req)) != 1:
            return []
        return [tuple(f(None, req) for f in self.outputs)]


@dataclass(eq=False)
class JsonEachParameterQuery(ParameterQuery):
    """``SELECT value AS p FROM json_each(<request value>) [WHERE ...]``: one row per element."""

    source: ValueFn | None = None
    outputs: list[ValueFn] = field(default_factory=list)
    where: ValueFn | None = None

    def reorder(self, names: tuple[str, ...]) -> None:
        idx = [self.output_names.index(n) for n in names]
        self.outputs = [self.outputs[i] for i in idx]
        self.output_names = names

    def resolve(
        self, req: RequestContext, keys: list[str], results: LookupResults
    ) -> list[tuple[SqliteValue, ...]]:
        assert self.source is not None
        rows = fns.json_each(self.source(None, req))
        out: list[tuple[SqliteValue, ...]] = []
        where = self.where
        for row in rows:
            if where is not None and sv.truth(where(row, req)) != 1:
                continue
            out.append(tuple(f(row, req) for f in self.outputs))
        return out


@dataclass(eq=False)
class TableParameterQuery(ParameterQuery):
    """``SELECT list_id FROM list_members WHERE user_id = request.user_id()``: a lookup.

    The processor feeds source rows to :meth:`evaluate_row` and stores the resulting
    :class:`LookupEntry` values under their keys; the gateway computes the keys of a request
    with :meth:`request_keys` and reads the stored values back.
    """

    table: TableRef | None = None
    match: MatchClause | None = None
    row_outputs: list[ValueFn] = field(default_factory=list)  # stored in LookupEntry.values
    # per output (query order): ("row", index into row_outputs) or ("req", fn)
    plan: list[tuple[str, Any]] = field(default_factory=list)

    def reorder(self, names: tuple[str, ...]) -> None:
        idx = [self.output_names.index(n) for n in names]
        self.plan = [self.plan[i] for i in idx]
        self.output_names = names

    @property
    def inputs(self) -> tuple[InputParam, ...]:
        assert self.match is not None
        return self.match.inputs

    def evaluate_row(self, row: Row) -> list[LookupEntry]:
        assert self.match is not None
        assignments = self.match.filter(row, None)
        if not assignments:
            return []
        values = tuple(f(row, None) for f in self.row_outputs)
        if any(type(v) is bytes for v in values):
            return []
        inputs = self.match.inputs
        keys = dict.fromkeys(
            lookup_key(self.definition, self.number, [a[i.key] for i in inputs])
            for a in assignments
        )
        return [LookupEntry(k, values) for k in keys]

    def request_keys(self, req: RequestContext) -> list[str]:
        per_input: list[list[SqliteValue]] = []
        for inp in self.inputs:
            v = inp.fn(None, req)
            if inp.is_bool:
                if v != 1:
                    return []
                per_input.append([1])
            elif inp.expands:
                items = sv.json_array_items(v) if v is not None else None
                vals: list[SqliteValue] = list(
                    dict.fromkeys(x for x in items or () if x is not None and type(x) is not bytes)
                )
                if not vals:
                    return []
                per_input.append(vals)
            else:
                if v is None or type(v) is bytes:
                    return []
                per_input.append([v])
        return list(
            dict.fromkeys(
                lookup_key(self.definition, self.number, combo)
                for combo in itertools.product(*per_input)
            )
        )

    def bucket_ids(
        self, name: str, req: RequestContext, keys: list[str], results: LookupResults
    ) -> list[str]:
        plan = self.plan
        if len(plan) != 1 or plan[0][0] != "row":
            return super().bucket_ids(name, req, keys, results)
        # one output read from the row (`SELECT list_id FROM ...`): the common case, many
        # stored values per request
        return single_value_ids(name + "[", plan[0][1], keys, results)

    def resolve(
        self, req: RequestContext, keys: list[str], results: LookupResults
    ) -> list[tuple[SqliteValue, ...]]:
        out: list[tuple[SqliteValue, ...]] = []
        req_values = {i: fn(None, req) for i, (kind, fn) in enumerate(self.plan) if kind == "req"}
        for key in keys:
            for stored in results.get(key, ()):
                vals: list[SqliteValue] = []
                for i, (kind, arg) in enumerate(self.plan):
                    vals.append(stored[arg] if kind == "row" else req_values[i])
                out.append(tuple(vals))
        return out


def single_value_ids(
    prefix: str, index: int, keys: Sequence[str], results: LookupResults
) -> list[str]:
    """``prefix + <value> + "]"`` for the ``index``-th value of every stored lookup result
    (a blob gives no id); what :func:`serialize_values` gives for one value, faster."""
    out: list[str] = []
    append = out.append
    dumps = orjson.dumps
    get = results.get
    for key in keys:
        for stored in get(key, ()):
            v = stored[index]
            t = type(v)
            if t is str:
                try:
                    append(prefix + dumps(v).decode() + "]")
                except TypeError:  # lone surrogates
                    append(prefix + json_string(v) + "]")  # type: ignore[arg-type]
            elif t is int:
                append(prefix + str(v) + "]")
            elif t is not bytes:
                append(prefix + serialize_value(v) + "]")
    return out


def compile_parameter_query(ctx: QueryContext, warnings: list[str]) -> ParameterQuery:
    stmt = _parse(ctx, allow_empty=True)
    priority = _take_priority(ctx, stmt)
    query = _compile_parameter_query(ctx, stmt, warnings)
    query.priority = priority
    return query


def _compile_parameter_query(
    ctx: QueryContext, stmt: exp.Select, warnings: list[str]
) -> ParameterQuery:
    src = _from(stmt)
    where_node = stmt.args.get("where")
    where_expr = where_node.this if where_node is not None else None
    _warn_alias_case(stmt, ctx, warnings)
    try:
        if src is None:
            return _static_query(ctx, stmt, where_expr, warnings)
        if isinstance(src, exp.Subquery):
            raise SqlSyntaxError("subqueries are not supported", node_offset(src), src)
        if isinstance(src, exp.Table) and isinstance(src.this, exp.Anonymous):
            return _json_each_query(ctx, stmt, src, where_expr, warnings)
        if isinstance(src, exp.Table):
            return _table_query(ctx, stmt, src, where_expr, warnings)
        raise SqlSyntaxError(f"unsupported FROM {_sql(src)!r}", node_offset(src))
    except SqlSyntaxError as e:
        raise _compile_err(ctx, e) from None


def _request_outputs(
    ctx: QueryContext, stmt: exp.Select, compiler: Compiler, names: frozenset[str]
) -> tuple[tuple[str, ...], list[ValueFn]]:
    outs = _outputs(stmt, ctx, names, allow_star=False)
    fns_: list[ValueFn] = []
    for out in outs:
        assert out.node is not None
        clause = compiler.compile_value(out.node, "select columns")
        fns_.append(clause.fn)
    return tuple(o.name for o in outs if o.name is not None), fns_


def _static_query(
    ctx: QueryContext, stmt: exp.Select, where: exp.Expr | None, warnings: list[str]
) -> StaticParameterQuery:
    scope = Scope(Mode.REQUEST, row_kind="none", streams=ctx.streams)
    compiler = Compiler(scope)
    names, outputs = _request_outputs(ctx, stmt, compiler, frozenset())
    auth_outputs = scope.uses_auth  # a filter on the token alone is not enough
    where_fn = compiler.compile_value(where, "WHERE").fn if where is not None else None
    _flush_warnings(ctx, scope, warnings)
    return StaticParameterQuery(
        definition=ctx.definition,
        number=ctx.number,
        sql=ctx.sql,
        output_names=names,
        uses_client=scope.uses_client and not auth_outputs,
        outputs=outputs,
        where=where_fn,
    )


def _json_each_query(
    ctx: QueryContext, stmt: exp.Select, src: exp.Table, where: exp.Expr | None, warnings: list[str]
) -> JsonEachParameterQuery:
    call = src.this
    assert isinstance(call, exp.Anonymous)
    fname = str(call.this).lower()
    if fname != "json_each":
        raise SqlSyntaxError(
            f"unknown table-valued function '{fname}()' (only json_each is supported)",
            node_offset(src),
        )
    if len(call.expressions) != 1:
        raise SqlSyntaxError("json_each() takes exactly 1 argument", node_offset(call))
    arg_scope = Scope(Mode.REQUEST, row_kind="none")
    source = Compiler(arg_scope).compile_value(call.expressions[0], "the json_each argument")
    if isinstance(source, Static):
        try:
            fns.json_each(source.value)
        except SqlEvalError as e:
            raise SqlSyntaxError(str(e), node_offset(call)) from None
    alias_node = src.args.get("alias")
    alias = (
        identifier_name(alias_node.this)[0]
        if isinstance(alias_node, exp.TableAlias)
        else "json_each"
    )
    names = frozenset({alias, "json_each"})
    scope = Scope(Mode.REQUEST, table_names=names, row_kind="json_each")
    compiler = Compiler(scope)
    out_names, outputs = _request_outputs(ctx, stmt, compiler, names)
    auth_outputs = scope.uses_auth or arg_scope.uses_auth
    where_fn = compiler.compile_value(where, "WHERE").fn if where is not None else None
    _flush_warnings(ctx, arg_scope, warnings)
    _flush_warnings(ctx, scope, warnings)
    return JsonEachParameterQuery(
        definition=ctx.definition,
        number=ctx.number,
        sql=ctx.sql,
        output_names=out_names,
        uses_client=(arg_scope.uses_client or scope.uses_client) and not auth_outputs,
        source=source.fn,
        outputs=outputs,
        where=where_fn,
    )


def _table_query(
    ctx: QueryContext, stmt: exp.Select, src: exp.Table, where: exp.Expr | None, warnings: list[str]
) -> TableParameterQuery:
    table = _table_ref(src, ctx, warnings)
    if table.wildcard:
        raise SqlSyntaxError(
            "wildcard tables are not supported in parameter queries", node_offset(src)
        )
    names = frozenset({table.sql_name})
    scope = Scope(Mode.LOOKUP, table_names=names, row_kind="table", streams=ctx.streams)
    compiler = Compiler(scope)
    outs = _outputs(stmt, ctx, names, allow_star=False)
    row_outputs: list[ValueFn] = []
    plan: list[tuple[str, Any]] = []
    for out in outs:
        assert out.node is not None
        clause = compiler.compile_output(out.node)
        if isinstance(clause, (ParamValue, Static)):
            plan.append(("req", clause.fn))
        else:
            assert isinstance(clause, RowValue)
            plan.append(("row", len(row_outputs)))
            row_outputs.append(clause.fn)
    match = compiler.compile_where(where)
    expanding = [i for i in match.inputs if i.expands]
    if len(expanding) > 1:
        raise SqlSyntaxError(
            "only one `column IN <request array>` filter is supported per query", node_offset(where)
        )
    _flush_warnings(ctx, scope, warnings)
    return TableParameterQuery(
        definition=ctx.definition,
        number=ctx.number,
        sql=ctx.sql,
        output_names=tuple(o.name for o in outs if o.name is not None),
        uses_client=scope.uses_client and not scope.uses_auth,
        table=table,
        match=match,
        row_outputs=row_outputs,
        plan=plan,
    )


__all__ = [
    "NO_MATCH",
    "DataQuery",
    "JsonEachParameterQuery",
    "ParameterQuery",
    "Projection",
    "QueryContext",
    "StaticParameterQuery",
    "TableParameterQuery",
    "TableRef",
    "compile_data_query",
    "compile_parameter_query",
]


def compile_expression(expr_sql: str, *, table: str = "t") -> Callable[[Row], SqliteValue]:
    """Compile one SQL expression over a row, e.g. ``compile_expression("upper(name)")``.

    For tests and debugging; raises :class:`RulesError` on invalid expressions.
    """
    ctx = QueryContext(
        "<expression>", "<expression>", "data", 1, f"SELECT {expr_sql} AS v FROM {table}"
    )
    stmt = _parse(ctx)
    scope = Scope(Mode.DATA, table_names=frozenset({table}), row_kind="table")
    try:
        clause = Compiler(scope).compile_value(stmt.expressions[0].this, "the expression")
    except SqlSyntaxError as e:
        raise _compile_err(ctx, e) from None
    fn = clause.fn
    return lambda row: fn(row, None)
