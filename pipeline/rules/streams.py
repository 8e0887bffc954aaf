"""Sync Streams (``config: edition: 3``, sync-streams.md §1a), lowered onto bucket definitions.

A stream query ``SELECT ... FROM t [JOIN ...] WHERE ...`` is split into *variants* (the OR
alternatives that need different parameters, like the reference: ``stream|0``,
``stream|1``, ...). Each variant becomes one :class:`BucketDefinition` named
``<version>#<stream>|<n>`` (versioned bucket ids), whose

- data query is the stream query with its row-only conditions, and one
  ``<row expr> = bucket.pN`` (or ``bucket.pN IN <row column>``) per parameter;
- parameter query (:class:`StreamParameterQuery`) computes the parameter tuples from the
  request: ``auth.*``/``connection.*``/``subscription.*`` values, JSON arrays of them
  (``col IN subscription.parameter('ids')``), and lookups (``col IN (SELECT c FROM t WHERE
  ...)``, ``IN <cte>``, inner JOINs to the selected table) that reuse the lookup index of
  parameter queries over tables; the cross product of its parts gives the buckets.

Request-only conditions filter the parameter query; row-only conditions filter the data.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import yaml
from sqlglot import exp

from pipeline.rules import values as sv
from pipeline.rules.errors import RulesError
from pipeline.rules.evaluate import BucketDefinition, Stream
from pipeline.rules.expr import Compiler, Mode, RequestContext, Scope, ValueFn
from pipeline.rules.model import LookupResults
from pipeline.rules.queries import (
    ParameterQuery,
    Projection,
    QueryContext,
    TableParameterQuery,
    _compile_err,
    _table_query,
    compile_data_query,
    single_value_ids,
)
from pipeline.rules.sql import (
    SqlSyntaxError,
    identifier_name,
    node_offset,
    parse_select,
)
from pipeline.rules.values import SqliteValue

STREAM_KEYS: Final = (
    "query",
    "queries",
    "with",
    "auto_subscribe",
    "priority",
    "accept_potentially_dangerous_queries",
)
_ALLOWED_ARGS: Final = frozenset({"expressions", "from", "from_", "where", "joins"})
_MAX_VARIANTS: Final = 100


# --------------------------------------------------------------------------- parameter query


@dataclass(eq=False)
class StreamParameterQuery(ParameterQuery):
    """Bucket parameter tuples of one stream variant: the cross product of its parts.

    Parts (in parameter order): ``("value", fn)`` one value, ``("expand", fn)`` the elements
    of a JSON array, ``("lookup", TableParameterQuery)`` the values stored in the lookup
    index (no value when the lookup has no output: it only has to exist).
    """

    parts: list[tuple[str, Any]] = field(default_factory=list)
    filters: list[ValueFn] = field(default_factory=list)

    def reorder(self, names: tuple[str, ...]) -> None:
        pass

    @property
    def lookups(self) -> list[TableParameterQuery]:
        return [arg for kind, arg in self.parts if kind == "lookup"]

    def request_keys(self, req: RequestContext) -> list[str]:
        if not self._passes(req):
            return []
        out: list[str] = []
        for q in self.lookups:
            out.extend(q.request_keys(req))
        return out

    def _passes(self, req: RequestContext) -> bool:
        return all(sv.truth(f(None, req)) == 1 for f in self.filters)

    def bucket_ids(
        self, name: str, req: RequestContext, keys: list[str], results: LookupResults
    ) -> list[str]:
        parts = self.parts
        if len(parts) == 1 and parts[0][0] == "lookup" and len(parts[0][1].plan) == 1:
            # `col IN (SELECT c FROM t WHERE ...)`: many stored values per request
            if not self._passes(req):
                return []
            q: TableParameterQuery = parts[0][1]
            return single_value_ids(name + "[", 0, q.request_keys(req), results)
        return super().bucket_ids(name, req, keys, results)

    def resolve(
        self, req: RequestContext, keys: list[str], results: LookupResults
    ) -> list[tuple[SqliteValue, ...]]:
        if not self._passes(req):
            return []
        choices: list[list[tuple[SqliteValue, ...]]] = []
        for kind, arg in self.parts:
            if kind == "value":
                choices.append([(arg(None, req),)])
            elif kind == "expand":
                v = arg(None, req)
                items = sv.json_array_items(v) if v is not None else None
                vals = list(
                    dict.fromkeys(x for x in items or () if x is not None and type(x) is not bytes)
                )
                choices.append([(x,) for x in vals])
            else:
                q: TableParameterQuery = arg
                rows: list[tuple[SqliteValue, ...]] = []
                width = len(q.plan)  # 0: the lookup only has to find a row
                for key in q.request_keys(req):
                    rows.extend(tuple(r)[:width] for r in results.get(key, ()))
                choices.append(list(dict.fromkeys(rows)))
            if not choices[-1]:
                return []
        return [tuple(v for part in combo for v in part) for combo in itertools.product(*choices)]


# --------------------------------------------------------------------------- YAML


def _scalar_origin(node: yaml.Node | None) -> tuple[int, int] | None:
    """Line and column (1-based) of the first character of a YAML string's text."""
    if not isinstance(node, yaml.ScalarNode):
        return None
    mark = node.start_mark
    style = node.style
    if style in ("'", '"'):
        return mark.line + 1, mark.column + 2
    if style in ("|", ">"):
        # the text starts on the next line, at the block's indentation
        lines = mark.buffer.splitlines() if mark.buffer else []
        nxt = mark.line + 1
        if nxt < len(lines):
            text = lines[nxt].rstrip("\0")
            return nxt + 1, len(text) - len(text.lstrip()) + 1
        return None
    return mark.line + 1, mark.column + 1


def _child(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key:
            return v
    return None


def _item(node: yaml.Node | None, index: int) -> yaml.Node | None:
    if isinstance(node, yaml.SequenceNode) and index < len(node.value):
        return node.value[index]
    return None


# --------------------------------------------------------------------------- compiling


@dataclass
class _Cte:
    name: str
    sql: str
    stmt: exp.Select
    ctx: QueryContext


class _Compiler:
    def __init__(
        self,
        *,
        source: str,
        prefix: str,
        version: int,
        warnings: list[str],
        projections: dict[tuple[Any, ...], Projection],
    ):
        self.source = source
        self.prefix = prefix
        self.version = version
        self.warnings = warnings
        self.projections = projections

    def fail(self, message: str, stream: str | None = None) -> RulesError:
        where = f"stream '{stream}': " if stream else ""
        return RulesError(self.prefix + where + message, source=self.source, definition=stream)

    # ---- CTEs -------------------------------------------------------------

    def ctes(
        self, doc: Any, node: yaml.Node | None, stream: str | None, inherited: dict[str, _Cte]
    ) -> dict[str, _Cte]:
        out = dict(inherited)
        if doc is None:
            return out
        if not isinstance(doc, dict):
            raise self.fail("'with' must be a mapping of names to SELECT queries", stream)
        for name, sql in doc.items():
            if not isinstance(name, str) or not isinstance(sql, str) or not sql.strip():
                raise self.fail(f"'with' entry {name!r} must be an SQL query string", stream)
            where = (f"stream '{stream}', " if stream else "") + f"with '{name}'"
            ctx = QueryContext(
                self.source,
                stream or name,
                "with",
                1,
                sql.strip(),
                streams=True,
                where=where,
                origin=_scalar_origin(_child(node, name)),
            )
            try:
                stmt = parse_select(ctx.sql)
            except SqlSyntaxError as e:
                raise ctx.error(e.message, e.offset) from None
            assert isinstance(stmt, exp.Select)
            out[name.lower()] = _Cte(name, ctx.sql, stmt, ctx)
        return out

    # ---- streams ----------------------------------------------------------

    def stream(
        self,
        name: Any,
        body: Any,
        node: yaml.Node | None,
        global_ctes: dict[str, _Cte],
    ) -> Stream:
        if not isinstance(name, str) or not name:
            raise self.fail(f"stream names must be non-empty strings, got {name!r}")
        if any(c in name for c in '[]"\x1f|#') or any(ord(c) < 32 for c in name):
            raise self.fail(
                "the name must not contain brackets, quotes, '|', '#' or control characters", name
            )
        if not isinstance(body, dict):
            raise self.fail("expected a mapping with 'query' or 'queries'", name)
        for key in body:
            if key not in STREAM_KEYS:
                raise self.fail(f"unknown key {key!r} (allowed: {', '.join(STREAM_KEYS)})", name)
        auto = body.get("auto_subscribe", False)
        if type(auto) is not bool:
            raise self.fail(f"auto_subscribe must be true or false, got {auto!r}", name)
        priority = body.get("priority", 3)
        if type(priority) is not int or not 0 <= priority <= 3:
            raise self.fail(f"priority must be an integer from 0 to 3, got {priority!r}", name)
        accept = body.get("accept_potentially_dangerous_queries", False)
        if type(accept) is not bool:
            raise self.fail(
                f"accept_potentially_dangerous_queries must be true or false, got {accept!r}", name
            )
        if ("query" in body) == ("queries" in body):
            raise self.fail("needs exactly one of 'query' or 'queries'", name)
        if "query" in body:
            sqls = [body["query"]]
            nodes = [_child(node, "query")]
        else:
            raw = body["queries"]
            if not isinstance(raw, list) or not raw:
                raise self.fail("'queries' must be a non-empty list of SELECT queries", name)
            sqls = list(raw)
            qnode = _child(node, "queries")
            nodes = [_item(qnode, i) for i in range(len(sqls))]
        ctes = self.ctes(body.get("with"), _child(node, "with"), name, global_ctes)
        variants: list[BucketDefinition] = []
        uses_subscription = False
        for i, (sql, qnode) in enumerate(zip(sqls, nodes, strict=True), 1):
            if not isinstance(sql, str) or not sql.strip():
                raise self.fail(f"query {i} must be an SQL query string, got {sql!r}", name)
            ctx = QueryContext(
                self.source,
                name,
                "query",
                i,
                sql.strip(),
                streams=True,
                where=f"stream '{name}', query {i}",
                origin=_scalar_origin(qnode),
            )
            built, subs = self.query(ctx, name, priority, ctes, len(variants))
            variants.extend(built)
            uses_subscription = uses_subscription or subs
            if len(variants) > _MAX_VARIANTS:
                raise ctx.error(
                    f"this stream would need more than {_MAX_VARIANTS} bucket definitions; "
                    "simplify its OR conditions",
                    0,
                )
        if auto and uses_subscription:
            self.warnings.append(
                f"{self.prefix}stream '{name}': Clients subscribe to this stream by default, but it "
                "uses subscription parameters (they are null for the default subscription)"
            )
        return Stream(name, auto, priority, tuple(variants), uses_subscription)

    # ---- one query --------------------------------------------------------

    def query(
        self,
        ctx: QueryContext,
        stream: str,
        priority: int,
        ctes: dict[str, _Cte],
        first_variant: int,
    ) -> tuple[list[BucketDefinition], bool]:
        try:
            stmt = parse_select(ctx.sql)
        except SqlSyntaxError as e:
            raise ctx.error(e.message, e.offset) from None
        assert isinstance(stmt, exp.Select)
        try:
            return self._query(ctx, stmt, stream, priority, ctes, first_variant)
        except SqlSyntaxError as e:
            raise _compile_err(ctx, e) from None

    def _query(
        self,
        ctx: QueryContext,
        stmt: exp.Select,
        stream: str,
        priority: int,
        ctes: dict[str, _Cte],
        first_variant: int,
    ) -> tuple[list[BucketDefinition], bool]:
        for key, value in stmt.args.items():
            if key in _ALLOWED_ARGS or not value:
                continue
            node = value[0] if isinstance(value, list) else value
            what = "WITH inside a query" if key in ("with", "with_") else key.upper()
            raise SqlSyntaxError(
                f"{what} is not supported in stream queries",
                node_offset(node) if isinstance(node, exp.Expr) else 0,
            )
        if not stmt.expressions:
            raise SqlSyntaxError("syntax error: no columns selected", 0)
        f = stmt.args.get("from_") or stmt.args.get("from")
        src = f.this if isinstance(f, exp.From) else None
        if src is None:
            raise SqlSyntaxError("a stream query needs FROM <table>", len(ctx.sql))
        if not isinstance(src, exp.Table) or not isinstance(src.this, exp.Identifier):
            raise SqlSyntaxError(
                "FROM must name a table (subqueries and table-valued functions are not "
                "supported in stream queries)",
                node_offset(src),
            )
        tables: dict[str, exp.Table] = {_alias(src): src}
        conjuncts_on: list[exp.Expr] = []
        for join in stmt.args.get("joins") or []:
            side = (join.args.get("side") or "").upper()
            kind = (join.args.get("kind") or "").upper()
            if side or kind not in ("", "INNER"):
                raise SqlSyntaxError(
                    f"{' '.join(x for x in (side, kind) if x)} JOIN is not supported; use JOIN "
                    "(inner join)",
                    node_offset(join),
                )
            if join.args.get("using"):
                raise SqlSyntaxError("JOIN ... USING is not supported; use ON", node_offset(join))
            t = join.this
            if not isinstance(t, exp.Table) or not isinstance(t.this, exp.Identifier):
                raise SqlSyntaxError("JOIN must name a table", node_offset(join))
            on = join.args.get("on")
            if on is None:
                raise SqlSyntaxError("JOIN needs an ON condition", node_offset(join))
            if _alias(t) in tables:
                raise SqlSyntaxError(f"duplicate table name '{_alias(t)}'", node_offset(t))
            tables[_alias(t)] = t
            conjuncts_on.extend(_split_and(on))
        main = _output_table(stmt, tables, src)
        where_node = stmt.args.get("where")
        where = where_node.this if where_node is not None else None
        scope = _Classifier(main, set(tables), ctes)
        variants = _dnf(where, scope) if where is not None else [[]]
        variants = [v + conjuncts_on for v in variants]
        if len(variants) > _MAX_VARIANTS:
            raise SqlSyntaxError(
                f"this query would need more than {_MAX_VARIANTS} bucket definitions",
                node_offset(where),
            )
        out: list[BucketDefinition] = []
        uses_subscription = False
        for n, atoms in enumerate(variants):
            name = f"{self.version}#{stream}|{first_variant + n}"
            d, subs = self._variant(ctx, stmt, name, priority, main, tables, atoms, scope)
            out.append(d)
            uses_subscription = uses_subscription or subs
        return out, uses_subscription

    def _variant(
        self,
        ctx: QueryContext,
        stmt: exp.Select,
        name: str,
        priority: int,
        main: str,
        tables: dict[str, exp.Table],
        atoms: list[exp.Expr],
        scope: _Classifier,
    ) -> tuple[BucketDefinition, bool]:
        # joined tables: their conditions become an IN (SELECT ...) on the selected table
        others = [t for t in tables if t != main]
        own: list[exp.Expr] = []
        per_table: dict[str, list[exp.Expr]] = {t: [] for t in others}
        keys: dict[str, tuple[exp.Expr, exp.Expr]] = {}
        for atom in atoms:
            refs = scope.tables_of(atom)
            joined = refs - {main}
            if not joined:
                own.append(atom)
                continue
            if len(joined) > 1:
                raise SqlSyntaxError(
                    "a condition may only relate a joined table to the selected table "
                    f"'{main}' (joins between joined tables are not supported)",
                    node_offset(atom),
                )
            (t,) = joined
            if main in refs:
                pair = _join_key(atom, main, t)
                if pair is None or t in keys:
                    raise SqlSyntaxError(
                        f"the join of '{t}' needs exactly one condition "
                        f"<{main}.column> = <{t}.column>",
                        node_offset(atom),
                    )
                keys[t] = pair
            else:
                per_table[t].append(atom)
        for t in others:
            if t not in keys:
                raise SqlSyntaxError(
                    f"table '{t}' must be joined to '{main}' with <{main}.column> = <{t}.column>",
                    node_offset(tables[t]),
                )
            key_left, key_right = keys[t]
            sub = exp.Select(expressions=[key_right.copy()])
            sub.set("from_", exp.From(this=tables[t].copy()))
            if per_table[t]:
                sub.set("where", exp.Where(this=_and_all([a.copy() for a in per_table[t]])))
            own.append(exp.In(this=key_left.copy(), query=exp.Subquery(this=sub)))

        req_scope = Scope(Mode.REQUEST, row_kind="none", streams=True)
        req_compiler = Compiler(req_scope)
        params: list[str] = []
        parts: list[tuple[str, Any]] = []
        filters: list[ValueFn] = []
        data_conds: list[exp.Expr] = []
        lookups = 0
        subs = False

        def new_param() -> exp.Column:
            p = f"p{len(params)}"
            params.append(p)
            return exp.Column(this=exp.to_identifier(p), table=exp.to_identifier("bucket"))

        def request_fn(node: exp.Expr) -> ValueFn:
            return req_compiler.compile_value(node, "parameters").fn

        for atom in own:
            kind = scope.kind(atom)
            if kind == "subquery" and isinstance(atom, exp.ArrayOverlaps):
                # `<row array> && (SELECT c FROM t WHERE ...)`: a bucket per element of the
                # row's array, the request's buckets from the lookup
                left = atom.this
                if scope.kind(left) != "row":
                    raise SqlSyntaxError(
                        "The left-hand side of an && operator must be derived from the row to "
                        "sync.",
                        node_offset(left),
                    )
                lookups += 1
                as_in = exp.In(this=left.copy(), query=atom.expression.copy())
                q = self._lookup(ctx, name, lookups, as_in, None)
                subs = subs or q[1]
                data_conds.append(exp.In(this=new_param(), field=left.copy()))
                parts.append(("lookup", q[0]))
            elif kind == "subquery":
                assert isinstance(atom, exp.In)
                lookups += 1
                left = atom.this
                left_kind = scope.kind(left)
                q = self._lookup(ctx, name, lookups, atom, left if left_kind == "request" else None)
                subs = subs or q[1]
                if left_kind == "row":
                    data_conds.append(exp.EQ(this=left.copy(), expression=new_param()))
                elif left_kind != "request":
                    raise SqlSyntaxError(
                        "For IN subqueries, the left operand must either depend on the row to "
                        "sync or stream parameters.",
                        node_offset(left),
                    )
                parts.append(("lookup", q[0]))
            elif kind in ("row", "static"):
                data_conds.append(atom.copy())
            elif kind == "request":
                filters.append(request_fn(atom))
            else:  # row and request values together: a parameter
                if isinstance(atom, exp.EQ):
                    a, b = atom.this, atom.expression
                    ka, kb = scope.kind(a), scope.kind(b)
                    if ka == "request" and kb in ("row", "static"):
                        a, b, ka, kb = b, a, kb, ka
                    if ka in ("row", "static") and kb == "request":
                        data_conds.append(exp.EQ(this=a.copy(), expression=new_param()))
                        parts.append(("value", request_fn(b)))
                        continue
                elif isinstance(atom, exp.ArrayOverlaps):
                    # a row array and a parameter array overlap: a bucket per element
                    a, b = atom.this, atom.expression
                    ka, kb = scope.kind(a), scope.kind(b)
                    if ka == "request" and kb == "row":
                        a, b, ka, kb = b, a, kb, ka
                    if ka == "row" and kb == "request":
                        data_conds.append(exp.In(this=new_param(), field=a.copy()))
                        parts.append(("expand", request_fn(b)))
                        continue
                elif isinstance(atom, exp.In) and not atom.args.get("query"):
                    left = atom.this
                    right = atom.args.get("field")
                    items = atom.expressions
                    if right is None and len(items) == 1:
                        right = items[0]
                    if right is not None:
                        kl, kr = scope.kind(left), scope.kind(right)
                        if kl == "row" and kr == "request":
                            data_conds.append(exp.EQ(this=left.copy(), expression=new_param()))
                            parts.append(("expand", request_fn(right)))
                            continue
                        if kl == "request" and kr == "row":
                            data_conds.append(exp.In(this=new_param(), field=right.copy()))
                            parts.append(("value", request_fn(left)))
                            continue
                raise SqlSyntaxError(
                    "unsupported condition: compare a row value with a parameter using "
                    "`<row expr> = <parameter>`, `<row expr> IN <parameter array>`, "
                    "`<parameter> IN <row column>` or `<row expr> IN (SELECT ...)`",
                    node_offset(atom),
                )
        subs = subs or req_scope.uses_subscription

        data_stmt = exp.Select(expressions=[e.copy() for e in stmt.expressions])
        data_stmt.set("from_", exp.From(this=tables[main].copy()))
        if data_conds:
            data_stmt.set("where", exp.Where(this=_and_all(data_conds)))
        data_ctx = QueryContext(
            ctx.source,
            name,
            "data",
            1,
            ctx.sql,
            streams=True,
            where=ctx.where,
            origin=ctx.origin,
        )
        dq = compile_data_query(data_ctx, tuple(params), self.projections, self.warnings, data_stmt)
        if len(tables) > 1:
            dq.object_type = _table_name(tables[main])
        pqs: tuple[ParameterQuery, ...] = ()
        if parts or filters:
            pqs = (
                StreamParameterQuery(
                    definition=name,
                    number=1,
                    sql=ctx.sql,
                    output_names=tuple(params),
                    uses_client=False,
                    parts=parts,
                    filters=filters,
                ),
            )
        return (
            BucketDefinition(
                name=name,
                priority=priority,
                parameter_names=tuple(params),
                parameter_queries=pqs,
                data_queries=(dq,),
                accept_potentially_dangerous_queries=True,
            ),
            subs,
        )

    def _lookup(
        self,
        ctx: QueryContext,
        name: str,
        number: int,
        atom: exp.In,
        request_left: exp.Expr | None,
    ) -> tuple[TableParameterQuery, bool]:
        """``x IN (SELECT col FROM t WHERE ...)`` / ``x IN cte`` -> a lookup query."""
        query = atom.args.get("query")
        sub_ctx = ctx
        if query is not None:
            sub = query.this if isinstance(query, exp.Subquery) else query
        else:
            cte = self._cte_of(atom)
            assert cte is not None
            sub, sub_ctx = cte.stmt, cte.ctx
        if not isinstance(sub, exp.Select):
            raise SqlSyntaxError("unsupported subquery", node_offset(atom))
        try:
            return self._lookup_select(sub_ctx, name, number, sub, request_left)
        except SqlSyntaxError as e:
            if sub_ctx is ctx:
                raise
            raise _compile_err(sub_ctx, e) from None

    def _cte_of(self, atom: exp.In) -> _Cte | None:
        return getattr(atom, "_stream_cte", None)

    def _lookup_select(
        self,
        ctx: QueryContext,
        name: str,
        number: int,
        sub: exp.Select,
        request_left: exp.Expr | None,
    ) -> tuple[TableParameterQuery, bool]:
        for key, value in sub.args.items():
            if key in ("expressions", "from", "from_", "where") or not value:
                continue
            node = value[0] if isinstance(value, list) else value
            raise SqlSyntaxError(
                f"{'JOIN' if key == 'joins' else key.upper()} is not supported in stream "
                "subqueries",
                node_offset(node) if isinstance(node, exp.Expr) else None,
            )
        if len(sub.expressions) != 1:
            raise SqlSyntaxError(
                "This subquery must return exactly one column", node_offset(sub) or 0
            )
        col = sub.expressions[0]
        if isinstance(col, exp.Star) or (
            isinstance(col, exp.Column) and isinstance(col.this, exp.Star)
        ):
            raise SqlSyntaxError(
                "* columns are not allowed in subqueries or common table expressions",
                node_offset(col),
            )
        if isinstance(col, exp.Alias):
            col = col.this
        f = sub.args.get("from_") or sub.args.get("from")
        src = f.this if isinstance(f, exp.From) else None
        if not isinstance(src, exp.Table) or not isinstance(src.this, exp.Identifier):
            raise SqlSyntaxError("a stream subquery must select FROM a table", node_offset(sub))
        where_node = sub.args.get("where")
        conds: list[exp.Expr] = []
        if where_node is not None:
            for c in _split_and(where_node.this):
                if isinstance(c, exp.Or) or (isinstance(c, exp.Paren) and _has_or(c)):
                    raise SqlSyntaxError("Stream subqueries can't use OR filters", node_offset(c))
                if c.find(exp.Subquery, exp.Select) is not None:
                    raise SqlSyntaxError(
                        "Unsupported condition for stream subqueries", node_offset(c)
                    )
                conds.append(c.copy())
        stmt = exp.Select()
        if request_left is None:
            stmt.set("expressions", [exp.alias_(col.copy(), "result")])
        else:
            conds.append(exp.EQ(this=col.copy(), expression=request_left.copy()))
        stmt.set("from_", exp.From(this=src.copy()))
        where = _and_all(conds) if conds else None
        if where is not None:
            stmt.set("where", exp.Where(this=where))
        lctx = QueryContext(
            ctx.source,
            name,
            "lookup",
            number,
            ctx.sql,
            streams=True,
            where=ctx.where,
            origin=ctx.origin,
        )
        q = _table_query(lctx, stmt, stmt.args["from_"].this, where, self.warnings)
        subs = any(_is_subscription(n) for n in stmt.walk())
        return q, subs


# --------------------------------------------------------------------------- helpers


def _alias(t: exp.Table) -> str:
    a = t.args.get("alias")
    if isinstance(a, exp.TableAlias) and a.this is not None:
        return identifier_name(a.this)[0]
    return identifier_name(t.this)[0]


def _table_name(t: exp.Table) -> str:
    return identifier_name(t.this)[0]


def _output_table(stmt: exp.Select, tables: dict[str, exp.Table], src: exp.Table) -> str:
    if len(tables) == 1:
        return _alias(src)
    qualifiers: set[str] = set()
    for e in stmt.expressions:
        for c in e.find_all(exp.Column):
            t = c.args.get("table")
            if t is not None:
                qualifiers.add(identifier_name(t)[0])
    qualifiers &= set(tables)
    if len(qualifiers) > 1:
        raise SqlSyntaxError(
            "a stream query with JOIN must select columns of one table only "
            f"(found {', '.join(sorted(qualifiers))})",
            node_offset(stmt.expressions[0]),
        )
    return qualifiers.pop() if qualifiers else _alias(src)


def _split_and(node: exp.Expr) -> list[exp.Expr]:
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.And):
        return _split_and(node.this) + _split_and(node.expression)
    return [node]


def _has_or(node: exp.Expr) -> bool:
    while isinstance(node, exp.Paren):
        node = node.this
    return isinstance(node, exp.Or)


def _and_all(nodes: Sequence[exp.Expr]) -> exp.Expr:
    out = nodes[0]
    for n in nodes[1:]:
        out = exp.And(this=out, expression=n)
    return out


def _join_key(atom: exp.Expr, main: str, other: str) -> tuple[exp.Expr, exp.Expr] | None:
    if not isinstance(atom, exp.EQ):
        return None
    a, b = atom.this, atom.expression
    for x, y in ((a, b), (b, a)):
        if (
            isinstance(y, exp.Column)
            and _qualifier(y) == other
            and other not in _qualifiers(x)
            and main in _qualifiers(x)
        ):
            return x, y
    return None


def _qualifier(c: exp.Column) -> str | None:
    t = c.args.get("table")
    return identifier_name(t)[0] if t is not None else None


def _qualifiers(node: exp.Expr) -> set[str]:
    return {q for c in node.find_all(exp.Column) if (q := _qualifier(c)) is not None}


def _is_subscription(node: exp.Expr) -> bool:
    return (
        isinstance(node, exp.Dot)
        and isinstance(node.this, exp.Identifier)
        and node.this.this.lower() == "subscription"
    )


_REQUEST_SCHEMAS: Final = ("auth", "connection", "subscription", "request")


class _Classifier:
    """What an expression depends on: the row, the request, a subquery."""

    def __init__(self, main: str, tables: set[str], ctes: Mapping[str, _Cte]):
        self.main = main
        self.tables = tables
        self.ctes = ctes

    def tables_of(self, node: exp.Expr) -> set[str]:
        out: set[str] = set()
        for c in node.find_all(exp.Column):
            if c.find_ancestor(exp.Subquery) is not None:
                continue
            q = _qualifier(c)
            if q is None:
                if not self._is_cte_ref(c):
                    out.add(self.main)
            elif q in self.tables:
                out.add(q)
        return out

    def _is_cte_ref(self, c: exp.Column) -> bool:
        parent = c.parent
        return (
            isinstance(parent, exp.In)
            and parent.args.get("field") is c
            and _qualifier(c) is None
            and identifier_name(c.this)[0] in self.ctes
        )

    def kind(self, node: exp.Expr) -> str:
        """``row``, ``request``, ``static``, ``mixed`` or ``subquery``."""
        if isinstance(node, exp.ArrayOverlaps) and isinstance(node.expression, exp.Subquery):
            return "subquery"
        if isinstance(node, exp.In):
            fld = node.args.get("field")
            if isinstance(fld, exp.Column) and self._is_cte_ref(fld):
                node._stream_cte = self.ctes[identifier_name(fld.this)[0]]  # type: ignore[attr-defined]
                return "subquery"
            if node.args.get("query") is not None:
                return "subquery"
        row = req = False
        for n in node.walk():
            if isinstance(n, (exp.Subquery, exp.Select)):
                return "mixed"
            if isinstance(n, exp.Column) and not isinstance(n.this, exp.Star):
                row = True
            elif (
                isinstance(n, exp.Dot)
                and isinstance(n.this, exp.Identifier)
                and n.this.this.lower() in _REQUEST_SCHEMAS
            ):
                req = True
        if row and req:
            return "mixed"
        return "row" if row else "request" if req else "static"


def _dnf(node: exp.Expr, scope: _Classifier) -> list[list[exp.Expr]]:
    """Variants (OR alternatives) of a WHERE clause, each a list of AND-ed conditions;
    an OR over row values only or request values only stays one condition."""
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.And):
        left, right = _dnf(node.this, scope), _dnf(node.expression, scope)
        return [a + b for a in left for b in right]
    if isinstance(node, exp.Or):
        if scope.kind(node) in ("row", "request", "static"):
            return [[node]]
        return _dnf(node.this, scope) + _dnf(node.expression, scope)
    if isinstance(node, exp.Not):
        inner = node.this
        while isinstance(inner, exp.Paren):
            inner = inner.this
        if isinstance(inner, exp.Not):
            return _dnf(inner.this, scope)
        k = scope.kind(node)
        if k in ("row", "request", "static"):
            return [[node]]
        if isinstance(inner, exp.Or):  # NOT (a OR b) = NOT a AND NOT b
            return _dnf(
                exp.And(
                    this=exp.Not(this=inner.this.copy()),
                    expression=exp.Not(this=inner.expression.copy()),
                ),
                scope,
            )
        if isinstance(inner, exp.And):  # NOT (a AND b) = NOT a OR NOT b
            return _dnf(
                exp.Or(
                    this=exp.Not(this=inner.this.copy()),
                    expression=exp.Not(this=inner.expression.copy()),
                ),
                scope,
            )
        raise SqlSyntaxError("Negations are not allowed here", node_offset(node))
    return [[node]]


def compile_streams(
    doc: Mapping[str, Any],
    root: yaml.Node | None,
    *,
    source: str,
    prefix: str,
    version: int,
    warnings: list[str],
) -> list[Stream]:
    """Compile the ``with`` and ``streams`` sections of an edition-3 document."""
    compiler = _Compiler(
        source=source, prefix=prefix, version=version, warnings=warnings, projections={}
    )
    global_ctes = compiler.ctes(doc.get("with"), _child(root, "with"), None, {})
    streams_doc = doc.get("streams")
    if streams_doc is None:
        raise compiler.fail("missing streams")
    if not isinstance(streams_doc, dict):
        raise compiler.fail("streams must be a mapping of stream names to streams")
    if not streams_doc:
        warnings.append(f"{prefix}streams is empty; no client will receive any data")
    snode = _child(root, "streams")
    return [
        compiler.stream(
            name, body, _child(snode, name) if isinstance(name, str) else None, global_ctes
        )
        for name, body in streams_doc.items()
    ]
