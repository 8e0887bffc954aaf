"""Compile sqlglot expressions into Python closures.

Every compiled value is a closure ``fn(row, req) -> SqliteValue`` (``row``: the source row
or json_each row, ``req``: the :class:`RequestContext`). Compilation classifies each
expression, like PowerSync's sync-rules compiler does:

- :class:`Static` -- a constant (folded at compile time);
- :class:`RowValue` -- depends on the row (in parameter queries without a table: on the
  request, which then plays the role of the row);
- :class:`ParamValue` -- a bucket parameter (data queries) or a request value (parameter
  queries over a table); these may only be *matched* against row values;
- :class:`MatchClause` -- a WHERE condition that ties parameters to the row: given a row
  it returns the alternative parameter assignments under which the condition holds
  (``owner_id = bucket.user_id`` -> ``[{"user_id": row["owner_id"]}]``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final, TypeAlias

from sqlglot import exp

from pipeline.rules import functions as fns
from pipeline.rules import values as sv
from pipeline.rules.errors import SqlEvalError
from pipeline.rules.sql import RulesDialect, SqlSyntaxError, identifier_name, node_offset
from pipeline.rules.values import SqliteValue

Row: TypeAlias = Mapping[str, Any]
ValueFn: TypeAlias = Callable[[Any, Any], SqliteValue]
Assignment: TypeAlias = dict[str, SqliteValue]
FilterFn: TypeAlias = Callable[[Any, Any], list[Assignment]]

NO_MATCH: Final[list[Assignment]] = []
TRUE_MATCH: Final[list[Assignment]] = [{}]

REQUEST_FUNCTIONS: Final = ("user_id", "jwt", "parameters", "parameter")
STREAM_SCHEMAS: Final = ("auth", "subscription", "connection")
STREAM_FUNCTIONS: Final = {
    "auth": ("user_id", "parameter", "parameters"),
    "connection": ("parameter", "parameters"),
    "subscription": ("parameter", "parameters"),
}


class RequestContext:
    """What parameter queries see of a request: the verified token payload and client params."""

    __slots__ = (
        "_jwt_text",
        "_legacy_jwt_text",
        "_parameters_text",
        "_subscription_text",
        "client_parameters",
        "payload",
        "subscription_parameters",
        "token_parameters",
        "user_id",
        "user_parameters",
    )

    def __init__(
        self,
        payload: Mapping[str, Any],
        client_parameters: Mapping[str, Any] | None = None,
        subscription_parameters: Mapping[str, Any] | None = None,
    ) -> None:
        self.payload = payload
        self.client_parameters: Mapping[str, Any] = client_parameters or {}
        #: the parameters of one stream subscription (``subscription.parameter()``)
        self.subscription_parameters: Mapping[str, Any] = subscription_parameters or {}
        self._subscription_text: str | None = None
        self.user_id: SqliteValue = _request_value(payload.get("sub"))
        claim = payload.get("parameters")
        token_parameters: dict[str, SqliteValue] = {}
        if isinstance(claim, Mapping):
            token_parameters = {str(k): _request_value(v) for k, v in claim.items()}
        token_parameters["user_id"] = self.user_id  # sub wins over an embedded user_id
        self.token_parameters = token_parameters
        self.user_parameters: dict[str, SqliteValue] = {
            str(k): _request_value(v) for k, v in self.client_parameters.items()
        }
        self._jwt_text: str | None = None
        self._legacy_jwt_text: str | None = None
        self._parameters_text: str | None = None

    @property
    def jwt_text(self) -> str:
        if self._jwt_text is None:
            self._jwt_text = sv.json_dumps(dict(self.payload))
        return self._jwt_text

    @property
    def legacy_jwt_text(self) -> str:
        """``request.jwt()`` of bucket_definitions: the reference prints the token's numbers
        as JavaScript doubles (``123.0``), so they read back as REAL."""
        if self._legacy_jwt_text is None:
            self._legacy_jwt_text = sv.json_dumps(_reals(dict(self.payload)))
        return self._legacy_jwt_text

    @property
    def parameters_text(self) -> str:
        if self._parameters_text is None:
            self._parameters_text = sv.json_dumps(dict(self.client_parameters))
        return self._parameters_text

    @property
    def subscription_text(self) -> str:
        if self._subscription_text is None:
            self._subscription_text = sv.json_dumps(dict(self.subscription_parameters))
        return self._subscription_text

    def with_subscription(self, parameters: Mapping[str, Any] | None) -> RequestContext:
        """The same request seen by one stream subscription (token values computed once)."""
        other = RequestContext.__new__(RequestContext)
        other.payload = self.payload
        other.client_parameters = self.client_parameters
        other.user_id = self.user_id
        other.token_parameters = self.token_parameters
        other.user_parameters = self.user_parameters
        other._jwt_text = self._jwt_text
        other._legacy_jwt_text = self._legacy_jwt_text
        other._parameters_text = self._parameters_text
        other.subscription_parameters = parameters or {}
        other._subscription_text = None
        return other


# --------------------------------------------------------------------------- clauses


@dataclass(slots=True)
class Static:
    value: SqliteValue
    fn: ValueFn


@dataclass(slots=True)
class RowValue:
    fn: ValueFn
    column: str | None = None  # set for a plain column reference (fast paths)


@dataclass(slots=True)
class ParamValue:
    key: str
    fn: ValueFn  # called as fn(None, req); unused for bucket parameters
    node: exp.Expr
    bucket_param: str | None = None
    uses_client: bool = False


@dataclass(frozen=True, slots=True)
class InputParam:
    """A value the request side must supply to match (a bucket parameter or a request value)."""

    key: str
    fn: ValueFn  # request side, fn(None, req)
    expands: bool = False  # the request value is a JSON array; each element is looked up
    is_bool: bool = False  # a request-only condition; the row side always stores 1
    bucket_param: str | None = None
    uses_client: bool = False


@dataclass(slots=True)
class MatchClause:
    inputs: tuple[InputParam, ...]
    filter: FilterFn
    simple: tuple[str, str] | None = None  # (column, key) for `column = <param>`


Clause: TypeAlias = Static | RowValue | ParamValue | MatchClause


class Mode(Enum):
    DATA = "data"  # data query: row columns + bucket.<param>
    LOOKUP = "lookup"  # parameter query over a table: row columns vs request values
    REQUEST = "request"  # parameter query without table / over json_each: everything is a value


class CompileError(SqlSyntaxError):
    pass


def _error(message: str, node: exp.Expr | None) -> CompileError:
    return CompileError(message, node_offset(node), node)


def _const_fn(value: SqliteValue) -> ValueFn:
    return lambda row, req: value


def static(value: SqliteValue) -> Static:
    return Static(value, _const_fn(value))


@dataclass
class Scope:
    mode: Mode
    table_names: frozenset[str] = frozenset()  # names qualifying row columns
    row_kind: str = "table"  # "table", "json_each" or "none"
    bucket_params: tuple[str, ...] = ()
    warnings: list[tuple[str, int | None]] = field(default_factory=list)
    uses_client: bool = False  # request.parameters() / user_parameters seen
    uses_request: bool = False
    uses_auth: bool = False  # request.user_id() / request.jwt() / token_parameters seen
    streams: bool = False  # sync streams: auth.*, connection.*, subscription.* (not request.*)
    uses_subscription: bool = False  # subscription.parameter(s)() seen


_INT_LITERAL = re.compile(r"^\d+$")

_COMPARISONS: Final[dict[type[exp.Expr], Callable[[SqliteValue, SqliteValue], SqliteValue]]] = {
    exp.NEQ: sv.op_ne,
    exp.LT: sv.op_lt,
    exp.LTE: sv.op_le,
    exp.GT: sv.op_gt,
    exp.GTE: sv.op_ge,
    exp.NullSafeEQ: sv.op_is,
    exp.NullSafeNEQ: sv.op_is_not,
    exp.Add: sv.op_add,
    exp.Sub: sv.op_sub,
    exp.Mul: sv.op_mul,
    exp.Div: sv.op_div,
    exp.Mod: sv.op_mod,
    exp.DPipe: sv.op_concat,
    exp.BitwiseAnd: sv.op_bit_and,
    exp.BitwiseOr: sv.op_bit_or,
    exp.BitwiseLeftShift: sv.op_lshift,
    exp.BitwiseRightShift: sv.op_rshift,
}

_CAST_TYPES: Final = {
    "TEXT": ("TEXT", sv.to_text),
    "VARCHAR": ("TEXT", sv.to_text),
    "CHAR": ("TEXT", sv.to_text),
    "NVARCHAR": ("TEXT", sv.to_text),
    "NCHAR": ("TEXT", sv.to_text),
    "INT": ("INTEGER", sv.cast_integer),
    "BIGINT": ("INTEGER", sv.cast_integer),
    "SMALLINT": ("INTEGER", sv.cast_integer),
    "TINYINT": ("INTEGER", sv.cast_integer),
    "MEDIUMINT": ("INTEGER", sv.cast_integer),
    "DOUBLE": ("REAL", sv.cast_real),
    "FLOAT": ("REAL", sv.cast_real),
    "DECIMAL": ("NUMERIC", sv.cast_numeric),
    "VARBINARY": ("BLOB", sv.cast_blob),
    "BLOB": ("BLOB", sv.cast_blob),
    "BINARY": ("BLOB", sv.cast_blob),
}

_UNSUPPORTED_NODES: Final[dict[type[exp.Expr], str]] = {
    exp.Subquery: "subqueries are not supported",
    exp.Select: "subqueries are not supported",
    exp.Exists: "subqueries are not supported",
    exp.Window: "window functions are not supported",
    exp.Placeholder: "query parameters ('?', ':name') are not supported",
    exp.Parameter: "query parameters ('@name') are not supported",
    exp.Star: "'*' is only allowed as a select column",
}


class Compiler:
    def __init__(self, scope: Scope) -> None:
        self.scope = scope

    # ----------------------------------------------------------------- entry points

    def compile(self, node: exp.Expr) -> Clause:
        method = _DISPATCH.get(type(node))
        if method is not None:
            return method(self, node)
        for cls, message in _UNSUPPORTED_NODES.items():
            if isinstance(node, cls):
                raise _error(message, node)
        if isinstance(node, (exp.Func, exp.Binary)):
            raise _error(f"{_sql(node)!r} is not supported", node)
        raise _error(f"{node.key} expression {_sql(node)!r} is not supported", node)

    def compile_value(self, node: exp.Expr, what: str) -> Static | RowValue:
        """A value computable from the row (and request, in REQUEST mode)."""
        clause = self.compile(node)
        if isinstance(clause, (Static, RowValue)):
            return clause
        if isinstance(clause, ParamValue):
            if self.scope.mode is Mode.DATA:
                raise _error(f"bucket parameters cannot be used in {what}", node)
            raise _error(
                f"request values cannot be used in {what} of a parameter query over a table", node
            )
        raise _error(f"a parameter comparison cannot be used in {what}", node)

    def compile_output(self, node: exp.Expr) -> Static | RowValue | ParamValue:
        clause = self.compile(node)
        if isinstance(clause, MatchClause):
            raise _error("a parameter comparison cannot be selected", node)
        if isinstance(clause, ParamValue) and self.scope.mode is Mode.DATA:
            raise _error("bucket parameters cannot be selected in data queries", node)
        return clause

    def compile_where(self, node: exp.Expr | None) -> MatchClause:
        if node is None:
            return MatchClause((), lambda row, req: TRUE_MATCH)
        return self.to_match(self.compile(node), node)

    # ----------------------------------------------------------------- composition

    def compose(
        self,
        impl: Callable[..., SqliteValue],
        args: list[Clause],
        node: exp.Expr,
        lazy: bool = False,
    ) -> Clause:
        """Apply a function to compiled arguments; the result kind follows the arguments.

        ``lazy``: ``impl`` receives the argument closures plus (row, req) instead of values.
        """
        kind = "static"
        for arg, arg_node in zip(args, _arg_nodes(node, len(args)), strict=False):
            if isinstance(arg, MatchClause):
                raise _error(
                    "a parameter comparison cannot be used inside an expression", arg_node or node
                )
            if isinstance(arg, ParamValue):
                if self.scope.mode is Mode.DATA:
                    raise _error(
                        f"bucket parameter '{arg.bucket_param}' can only be compared to the row "
                        f"(`column = bucket.{arg.bucket_param}` or `bucket.{arg.bucket_param} IN column`)",
                        arg.node,
                    )
                if kind == "row":
                    raise _error(
                        "cannot mix table columns and request values in one expression", node
                    )
                kind = "param"
            elif isinstance(arg, RowValue):
                if kind == "param":
                    raise _error(
                        "cannot mix table columns and request values in one expression", node
                    )
                kind = "row"
        arg_fns = [a.fn for a in args]  # type: ignore[union-attr]
        fn = _lazy_closure(impl, arg_fns) if lazy else _closure(impl, args, arg_fns)
        if kind == "static":
            try:
                return static(fn(None, None))
            except SqlEvalError as e:
                raise _error(str(e), node) from None
        if kind == "row":
            return RowValue(fn)
        params = [a for a in args if isinstance(a, ParamValue)]
        return ParamValue(
            key=_sql(node),
            fn=fn,
            node=node,
            uses_client=any(p.uses_client for p in params),
        )

    def to_match(self, clause: Clause, node: exp.Expr) -> MatchClause:
        if isinstance(clause, MatchClause):
            return clause
        if isinstance(clause, Static):
            result = TRUE_MATCH if sv.truth(clause.value) == 1 else NO_MATCH
            return MatchClause((), lambda row, req: result)
        if isinstance(clause, RowValue):
            f = clause.fn
            truth = sv.truth

            def row_filter(row: Any, req: Any) -> list[Assignment]:
                return TRUE_MATCH if truth(f(row, req)) == 1 else NO_MATCH

            return MatchClause((), row_filter)
        if self.scope.mode is Mode.DATA:
            # a bare bucket parameter as a condition (`WHERE bucket.is_admin`): the row goes
            # into the bucket whose parameter is true (1), like the reference
            return self._eq_match(static(1), clause)
        # a bare request-side condition (parameter query over a table)
        pf = clause.fn
        key = f"{clause.key} IS TRUE"

        def bool_request(row: Any, req: Any) -> SqliteValue:
            return 1 if sv.truth(pf(row, req)) == 1 else 0

        inp = InputParam(key=key, fn=bool_request, is_bool=True, uses_client=clause.uses_client)
        match: list[Assignment] = [{key: 1}]
        return MatchClause((inp,), lambda row, req: match)

    # ----------------------------------------------------------------- leaves

    def _literal(self, node: exp.Literal) -> Clause:
        text = node.this
        if node.is_string:
            return static(text)
        if _INT_LITERAL.match(text):
            i = int(text)
            return static(i if i <= sv.INT64_MAX else float(i))
        try:
            return static(float(text))
        except ValueError:
            raise _error(f"invalid number {text!r}", node) from None

    def _null(self, node: exp.Null) -> Clause:
        return static(None)

    def _boolean(self, node: exp.Boolean) -> Clause:
        return static(1 if node.this else 0)

    def _hex(self, node: exp.HexString) -> Clause:
        try:
            return static(bytes.fromhex(node.this))
        except ValueError:
            raise _error("invalid blob literal", node) from None

    def _paren(self, node: exp.Paren) -> Clause:
        return self.compile(node.this)

    def _warn_case(self, ident: exp.Expr | None) -> None:
        if (
            isinstance(ident, exp.Identifier)
            and not ident.quoted
            and ident.this != ident.this.lower()
        ):
            self.scope.warnings.append(
                (
                    f"unquoted identifier {ident.this} is converted to lower case; "
                    f'use "{ident.this}" to keep its case',
                    node_offset(ident),
                )
            )

    def _column(self, node: exp.Column) -> Clause:
        ident = node.this
        if isinstance(ident, exp.Star):
            raise _error("'*' is only allowed as a select column", node)
        if node.args.get("db") is not None or node.args.get("catalog") is not None:
            raise _error("schema-qualified column references are not supported", node)
        name, _ = identifier_name(ident)
        table_ident = node.args.get("table")
        self._warn_case(ident)
        if table_ident is None:
            return self._row_column(name, node)
        table, quoted = identifier_name(table_ident)
        scope = self.scope
        if table in scope.table_names:
            self._warn_case(table_ident)
            return self._row_column(name, node)
        if not quoted and table == "bucket":
            if scope.mode is not Mode.DATA:
                raise _error("bucket parameters can only be used in data queries", node)
            if name not in scope.bucket_params:
                defined = ", ".join(scope.bucket_params) or "none"
                raise _error(f"unknown bucket parameter '{name}' (defined: {defined})", node)
            return ParamValue(key=name, fn=_const_fn(None), node=node, bucket_param=name)
        if not quoted and table in ("token_parameters", "user_parameters"):
            if scope.streams:
                raise _error(
                    f"{table}.{name} is not available in sync streams; use auth.parameter() or "
                    "connection.parameter()",
                    node,
                )
            if scope.mode is Mode.DATA:
                raise _error(f"{table} cannot be used in data queries; use bucket parameters", node)
            client = table == "user_parameters"
            scope.uses_request = True
            if client:
                scope.uses_client = True
            else:
                scope.uses_auth = True
            if client:

                def user_param(row: Any, req: RequestContext) -> SqliteValue:
                    return req.user_parameters.get(name)

                fn: ValueFn = user_param
            else:

                def token_param(row: Any, req: RequestContext) -> SqliteValue:
                    return req.token_parameters.get(name)

                fn = token_param
            return self._request_value(f"{table}.{name}", fn, node, client)
        known = ", ".join(sorted(scope.table_names)) or "none"
        raise _error(f"unknown table '{table}' in column reference (FROM names: {known})", node)

    def _row_column(self, name: str, node: exp.Expr) -> Clause:
        scope = self.scope
        if scope.row_kind == "none":
            raise _error(
                f"unknown column '{name}': a parameter query without FROM can only use request "
                "values (request.user_id(), request.jwt(), request.parameters(), token_parameters.<name>)",
                node,
            )
        if scope.row_kind == "json_each" and name not in fns.JSON_EACH_COLUMNS:
            raise _error(f"json_each has no column '{name}' (columns: key, value, type)", node)
        to_sqlite = sv.to_sqlite

        def column(row: Any, req: Any) -> SqliteValue:
            v = row.get(name)
            t = type(v)
            if t is str or t is int or v is None:
                return v
            return to_sqlite(v)

        return RowValue(column, column=name)

    def _request_value(self, key: str, fn: ValueFn, node: exp.Expr, client: bool) -> Clause:
        if self.scope.mode is Mode.LOOKUP:
            return ParamValue(key=key, fn=fn, node=node, uses_client=client)
        return RowValue(fn)  # REQUEST mode: request values are plain values

    def _dot(self, node: exp.Dot) -> Clause:
        schema_node, call = node.this, node.expression
        if not isinstance(call, exp.Anonymous) or not isinstance(schema_node, exp.Identifier):
            raise _error(f"unsupported reference {_sql(node)!r}", node)
        schema = schema_node.this.lower()
        fname = str(call.this).lower()
        if self.scope.streams:
            return self._stream_function(node, schema, fname, call)
        if schema in STREAM_SCHEMAS:
            raise _error(
                f"{schema}.{fname}() belongs to sync streams (edition 2+); in bucket_definitions "
                "use request.user_id(), request.jwt() or request.parameters()",
                node,
            )
        if schema != "request":
            raise _error(f"unknown function '{schema}.{fname}()'", node)
        if self.scope.mode is Mode.DATA:
            raise _error(
                f"request.{fname}() cannot be used in data queries; select buckets with parameter "
                "queries and refer to them as bucket.<name>",
                node,
            )
        if fname not in REQUEST_FUNCTIONS:
            raise _error(
                f"unknown function 'request.{fname}()' (known: request.user_id(), request.jwt(), "
                "request.parameters(), request.parameter(name))",
                node,
            )
        if fname == "parameter":
            return self._request_parameter(node, call)
        if call.expressions:
            raise _error(f"request.{fname}() takes no arguments", node)
        self.scope.uses_request = True
        client = fname == "parameters"
        if client:
            self.scope.uses_client = True
        else:
            self.scope.uses_auth = True
        fn: ValueFn
        if fname == "user_id":

            def user_id(row: Any, req: RequestContext) -> SqliteValue:
                return req.user_id

            fn = user_id
        elif fname == "jwt":

            def jwt(row: Any, req: RequestContext) -> SqliteValue:
                return req.legacy_jwt_text

            fn = jwt
        else:

            def parameters(row: Any, req: RequestContext) -> SqliteValue:
                return req.parameters_text

            fn = parameters
        return self._request_value(f"request.{fname}()", fn, node, client)

    def _request_parameter(self, node: exp.Dot, call: exp.Anonymous) -> Clause:
        """``request.parameter(name)``: one client parameter, like ``user_parameters.<name>``
        (the reference's ``jsonExtractFromRecord(userParameters, name, '->>')``: a name
        starting with ``$`` is a path split on ``.``, other names are a single key)."""
        args = list(call.expressions)
        if len(args) != 1:
            raise _error("request.parameter() takes 1 argument", node)
        key_clause = Compiler(Scope(Mode.REQUEST, row_kind="none")).compile(args[0])
        if not isinstance(key_clause, Static):
            raise _error("request.parameter() takes a constant name", args[0])
        scope = self.scope
        scope.uses_request = True
        scope.uses_client = True
        path = sv.to_text(key_clause.value)
        fn: ValueFn
        if path is None:
            fn = _const_fn(None)
        elif not path.startswith("$"):
            name = path

            def user_param(row: Any, req: RequestContext) -> SqliteValue:
                return req.user_parameters.get(name)

            fn = user_param
        else:
            components = path.split(".")[1:]

            def user_param_path(row: Any, req: RequestContext) -> SqliteValue:
                return _record_path(req.user_parameters, components)

            fn = user_param_path
        return self._request_value(_sql(node), fn, node, True)

    def _stream_function(
        self, node: exp.Dot, schema: str, fname: str, call: exp.Anonymous
    ) -> Clause:
        """``auth.*``, ``connection.*``, ``subscription.*`` of sync streams (sync-streams.md §1a)."""
        if schema not in STREAM_SCHEMAS or fname not in STREAM_FUNCTIONS[schema]:
            raise _error(f"Function '{schema}.{fname}' is not defined", node)
        if self.scope.mode is Mode.DATA:
            raise _error(f"{schema}.{fname}() cannot be used here", node)
        args = list(call.expressions)
        want = 1 if fname == "parameter" else 0
        if len(args) != want:
            raise _error(
                f"{schema}.{fname}() takes {want} argument{'s' if want != 1 else ''}", node
            )
        scope = self.scope
        scope.uses_request = True
        client = schema != "auth"
        if schema == "auth":
            scope.uses_auth = True
        else:
            scope.uses_client = True
        if schema == "subscription":
            scope.uses_subscription = True
        fn: ValueFn
        if fname == "user_id":

            def auth_user_id(row: Any, req: RequestContext) -> SqliteValue:
                return stream_value(req.payload.get("sub"))

            fn = auth_user_id
        elif fname == "parameters":
            attr = {"auth": "jwt_text", "connection": "parameters_text"}.get(
                schema, "subscription_text"
            )

            def all_parameters(row: Any, req: RequestContext) -> SqliteValue:
                return getattr(req, attr)

            fn = all_parameters
        else:
            key_clause = Compiler(Scope(Mode.REQUEST, row_kind="none", streams=True)).compile(
                args[0]
            )
            if not isinstance(key_clause, Static):
                raise _error(f"{schema}.parameter() takes a constant name", args[0])
            key = sv.to_text(key_clause.value) or ""
            if schema == "auth":
                if key.startswith("$"):
                    try:
                        fns.parse_json_path(key)
                    except SqlEvalError as e:
                        raise _error(str(e), args[0]) from None

                    def auth_path(row: Any, req: RequestContext) -> SqliteValue:
                        return fns.fn_json_extract(req.jwt_text, key)

                    fn = auth_path
                else:

                    def auth_param(row: Any, req: RequestContext) -> SqliteValue:
                        return stream_value(req.payload.get(key))

                    fn = auth_param
            elif schema == "connection":

                def connection_param(row: Any, req: RequestContext) -> SqliteValue:
                    return stream_value(req.client_parameters.get(key))

                fn = connection_param
            else:

                def subscription_param(row: Any, req: RequestContext) -> SqliteValue:
                    return stream_value(req.subscription_parameters.get(key))

                fn = subscription_param
        return self._request_value(f"{schema}.{fname}()", fn, node, client)

    # ----------------------------------------------------------------- functions

    def _anonymous(self, node: exp.Anonymous) -> Clause:
        name = str(node.this).lower()
        args = list(node.expressions)
        if name in fns.AGGREGATE_FUNCTIONS and (len(args) <= 1 or name not in ("min", "max")):
            raise _error(f"aggregate functions are not supported ({name}())", node)
        if name in fns.TABLE_VALUED_FUNCTIONS:
            raise _error(f"{name}() is only allowed as the FROM of a parameter query", node)
        fn = fns.FUNCTIONS.get(name)
        if fn is None:
            raise _error(f"unknown function '{name}()'", node)
        if len(args) < fn.min_args or (fn.max_args >= 0 and len(args) > fn.max_args):
            if fn.min_args == fn.max_args:
                expected = f"{fn.min_args} argument{'s' if fn.min_args != 1 else ''}"
            elif fn.max_args < 0:
                expected = f"at least {fn.min_args} arguments"
            else:
                expected = f"{fn.min_args} to {fn.max_args} arguments"
            raise _error(f"{name}() takes {expected}, got {len(args)}", node)
        for a in args:
            if isinstance(a, (exp.Star, exp.Distinct)):
                raise _error(f"{name}() does not accept {_sql(a)!r}", a)
        compiled = [self.compile(a) for a in args]
        if name == "iif":
            return self.compose(_lazy_iif, compiled, node, lazy=True)
        if name in ("ifnull", "coalesce"):
            return self.compose(_lazy_coalesce, compiled, node, lazy=True)
        # pre-validate constant JSON paths
        if name in ("json_extract", "json_array_length", "json_type"):
            for a, c in zip(args[1:], compiled[1:], strict=True):
                if isinstance(c, Static) and c.value is not None:
                    try:
                        fns.parse_json_path(sv.to_text(c.value) or "")
                    except SqlEvalError as e:
                        raise _error(str(e), a) from None
        return self.compose(fn.impl, compiled, node)

    def _cast(self, node: exp.Cast) -> Clause:
        to = node.args.get("to")
        type_name = ""
        if isinstance(to, exp.DataType):
            type_name = to.this.name if hasattr(to.this, "name") else str(to.this)
            if type_name == "USERDEFINED":
                type_name = str(to.args.get("kind") or "").upper()
        entry = _CAST_TYPES.get(type_name)
        if entry is None:
            shown = _sql(to) if isinstance(to, exp.Expr) else type_name
            raise _error(
                f"CAST to {shown} is not supported (use TEXT, INTEGER, REAL, NUMERIC or BLOB)", node
            )
        return self.compose(entry[1], [self.compile(node.this)], node)

    def _json_arrow(self, node: exp.JSONExtract | exp.JSONExtractScalar) -> Clause:
        left = self.compile(node.this)
        right = self.compile(node.expression)
        impl = fns.json_arrow if isinstance(node, exp.JSONExtract) else fns.json_arrow2
        if isinstance(right, Static):
            try:
                steps = fns.arrow_path(right.value)
            except SqlEvalError as e:
                raise _error(str(e), node.expression) from None

            def with_path(doc: SqliteValue) -> SqliteValue:
                return impl(doc, steps)

            return self.compose(with_path, [left], node)

        def dynamic(doc: SqliteValue, path: SqliteValue) -> SqliteValue:
            return impl(doc, fns.arrow_path(path))

        return self.compose(dynamic, [left, right], node)

    # ----------------------------------------------------------------- operators

    def _binary(self, node: exp.Binary) -> Clause:
        impl = _COMPARISONS[type(node)]
        return self.compose(impl, [self.compile(node.this), self.compile(node.expression)], node)

    def _neg(self, node: exp.Neg) -> Clause:
        return self.compose(sv.op_neg, [self.compile(node.this)], node)

    def _bitnot(self, node: exp.BitwiseNot) -> Clause:
        return self.compose(sv.op_bit_not, [self.compile(node.this)], node)

    def _not(self, node: exp.Not) -> Clause:
        inner = node.this
        if isinstance(inner, exp.Is):
            return self._is(inner, negate=True)
        return self.compose(_legacy_not, [self.compile(inner)], node)

    def _is(self, node: exp.Is, negate: bool = False) -> Clause:
        operand = self.compile(node.this)
        rhs = node.expression
        if isinstance(rhs, exp.Null):
            impl = _is_not_null if negate else _is_null
        elif isinstance(rhs, exp.Boolean):
            if rhs.this:
                impl = _is_not_true if negate else _is_true
            else:
                impl = _is_not_false if negate else _is_false
        else:
            raise _error(f"unsupported IS expression {_sql(node)!r}", node)
        return self.compose(impl, [operand], node)

    def _eq(self, node: exp.EQ) -> Clause:
        left = self.compile(node.this)
        right = self.compile(node.expression)
        lp, rp = isinstance(left, ParamValue), isinstance(right, ParamValue)
        if lp and rp:
            if self.scope.mode is Mode.DATA:
                raise _error("cannot compare two bucket parameters; compare each to a column", node)
            return self.compose(sv.op_eq, [left, right], node)
        if lp or rp:
            param, other = (left, right) if lp else (right, left)
            assert isinstance(param, ParamValue)
            if isinstance(other, MatchClause):
                raise _error("a parameter comparison cannot be compared", node)
            return self._eq_match(other, param)
        return self.compose(sv.op_eq, [left, right], node)

    def _eq_match(self, value: Static | RowValue | ParamValue, param: ParamValue) -> MatchClause:
        inp = InputParam(
            key=param.key,
            fn=param.fn,
            bucket_param=param.bucket_param,
            uses_client=param.uses_client,
        )
        key = param.key
        vf = value.fn

        # NULL never matches (SQL semantics), in data queries too: a row whose bucket
        # parameter is NULL goes into no bucket (sync-protocol.md §8.5); blobs cannot be
        # parameters
        def eq_filter(row: Any, req: Any) -> list[Assignment]:
            v = vf(row, req)
            if v is None or type(v) is bytes:
                return NO_MATCH
            return [{key: v}]

        simple = (value.column, key) if isinstance(value, RowValue) and value.column else None
        return MatchClause((inp,), eq_filter, simple)

    def _in(self, node: exp.In) -> Clause:
        if node.args.get("query") is not None:
            raise _error("subqueries are not supported", node.args["query"])
        if node.args.get("unnest") is not None:
            raise _error("IN UNNEST is not supported", node)
        left = self.compile(node.this)
        if isinstance(left, MatchClause):
            raise _error("a parameter comparison cannot be used with IN", node)
        field_node = node.args.get("field")
        if field_node is None and len(node.expressions) == 1:
            # `x IN (expr)`: like the reference, the one value is a JSON array
            field_node = node.expressions[0]
        if field_node is not None:
            right = self.compile(field_node)
            if isinstance(right, MatchClause):
                raise _error("a parameter comparison cannot be used with IN", node)
            lp, rp = isinstance(left, ParamValue), isinstance(right, ParamValue)
            if lp and not rp:
                assert isinstance(left, ParamValue) and not isinstance(right, ParamValue)
                return self._param_in_row(left, right)
            if rp and not lp:
                if self.scope.mode is Mode.DATA:
                    raise _error(
                        "bucket parameters cannot be on the right side of IN; use `bucket.<name> IN column`",
                        field_node,
                    )
                assert isinstance(right, ParamValue) and not isinstance(left, ParamValue)
                return self._row_in_param(left, right)
            return self.compose(sv.op_in_json, [left, right], node)
        items = [self.compile(e) for e in node.expressions]
        if not items:
            raise _error("IN () needs at least one value", node)
        return self.compose(_in_list, [left, *items], node)

    def _param_in_row(self, param: ParamValue, value: Static | RowValue) -> MatchClause:
        """``bucket.p IN column`` / ``request.user_id() IN column``: column holds a JSON array."""
        inp = InputParam(
            key=param.key,
            fn=param.fn,
            bucket_param=param.bucket_param,
            uses_client=param.uses_client,
        )
        key = param.key
        vf = value.fn

        def in_filter(row: Any, req: Any) -> list[Assignment]:
            items = sv.json_array_items(vf(row, req))
            if not items:
                return NO_MATCH
            seen: set[SqliteValue] = set()
            out: list[Assignment] = []
            for item in items:
                # a JSON null element matches nothing (NULL IN ... is not true; §8.5)
                if item is None or type(item) is bytes or item in seen:
                    continue
                seen.add(item)
                out.append({key: item})
            return out

        return MatchClause((inp,), in_filter)

    def _overlap(self, node: exp.ArrayOverlaps) -> Clause:
        """``a && b`` (the JSON arrays share an element); ``<request value> && <row array>``
        in a parameter query over a table is ``<request value> IN <row array>``, like the
        reference. Sync streams rewrite row/parameter overlaps before they get here."""
        left = self.compile(node.this)
        right = self.compile(node.expression)
        if (
            self.scope.mode is Mode.LOOKUP
            and isinstance(left, ParamValue)
            and isinstance(right, RowValue)
        ):
            return self._param_in_row(left, right)
        return self.compose(sv.op_overlap, [left, right], node)

    def _row_in_param(self, value: Static | RowValue, param: ParamValue) -> MatchClause:
        """``column IN request_value`` (parameter query over a table): the request value is a
        JSON array and every element is looked up."""
        key = f"{param.key}[*]"
        inp = InputParam(key=key, fn=param.fn, expands=True, uses_client=param.uses_client)
        vf = value.fn

        def expand_filter(row: Any, req: Any) -> list[Assignment]:
            v = vf(row, req)
            if v is None or type(v) is bytes:
                return NO_MATCH
            return [{key: v}]

        return MatchClause((inp,), expand_filter)

    def _between(self, node: exp.Between) -> Clause:
        args = [
            self.compile(node.this),
            self.compile(node.args["low"]),
            self.compile(node.args["high"]),
        ]
        return self.compose(_between, args, node)

    def _like(self, node: exp.Like, escape: exp.Expr | None = None) -> Clause:
        args = [self.compile(node.this), self.compile(node.expression)]
        if escape is not None:
            args.append(self.compile(escape))
        result = self.compose(sv.op_like, args, node)
        if node.args.get("negate"):
            return self.compose(_legacy_not, [result], node)
        return result

    def _escape(self, node: exp.Escape) -> Clause:
        inner = node.this
        if not isinstance(inner, exp.Like):
            raise _error(f"unsupported ESCAPE expression {_sql(node)!r}", node)
        return self._like(inner, node.expression)

    def _and_or(self, node: exp.And | exp.Or) -> Clause:
        left = self.compile(node.this)
        right = self.compile(node.expression)
        is_and = isinstance(node, exp.And)
        if not any(isinstance(c, (MatchClause, ParamValue)) for c in (left, right)):
            return self.compose(_legacy_and if is_and else _legacy_or, [left, right], node)
        if self.scope.mode is Mode.REQUEST:  # pragma: no cover - no ParamValue in this mode
            raise _error("unexpected parameter comparison", node)
        lm = self.to_match(left, node.this)
        rm = self.to_match(right, node.expression)
        return _and_match(lm, rm) if is_and else self._or_match(lm, rm, node)

    def _or_match(self, a: MatchClause, b: MatchClause, node: exp.Expr) -> MatchClause:
        if {i.key for i in a.inputs} != {i.key for i in b.inputs}:
            what = "bucket parameters" if self.scope.mode is Mode.DATA else "request values"
            raise _error(
                f"both sides of OR must use the same {what}; split into separate queries", node
            )
        fa, fb = a.filter, b.filter

        def or_filter(row: Any, req: Any) -> list[Assignment]:
            ra = fa(row, req)
            rb = fb(row, req)
            if not rb:
                return ra
            if not ra:
                return rb
            return ra + rb

        return MatchClause(a.inputs, or_filter)

    def _case(self, node: exp.Case) -> Clause:
        operand_node = node.this
        ifs = node.args.get("ifs") or []
        default_node = node.args.get("default")
        args: list[Clause] = []
        has_operand = operand_node is not None
        if has_operand:
            args.append(self.compile(operand_node))
        for branch in ifs:
            args.append(self.compile(branch.this))
            args.append(self.compile(branch.args["true"]))
        has_default = default_node is not None
        if default_node is not None:
            args.append(self.compile(default_node))
        n_branches = len(ifs)

        def case_impl(arg_fns: list[ValueFn], row: Any, req: Any) -> SqliteValue:
            i = 0
            base: SqliteValue = None
            if has_operand:
                base = arg_fns[0](row, req)
                i = 1
            for _ in range(n_branches):
                cond = arg_fns[i](row, req)
                hit = sv.op_eq(base, cond) == 1 if has_operand else sv.truth(cond) == 1
                if hit:
                    return arg_fns[i + 1](row, req)
                i += 2
            return arg_fns[i](row, req) if has_default else None

        return self.compose(case_impl, args, node, lazy=True)


# --------------------------------------------------------------------------- helpers


def _sql(node: exp.Expr | None) -> str:
    if node is None:
        return ""
    try:
        return node.sql(dialect=RulesDialect)
    except Exception:  # pragma: no cover - defensive
        return node.key


def _arg_nodes(node: exp.Expr, n: int) -> list[exp.Expr | None]:
    if isinstance(node, exp.Anonymous):
        return list(node.expressions)
    if isinstance(node, exp.Binary):
        return [node.this, node.expression]
    if isinstance(node, (exp.Unary, exp.Cast)):
        return [node.this]
    return [None] * n


def _closure(
    impl: Callable[..., SqliteValue], args: list[Clause], arg_fns: list[ValueFn]
) -> ValueFn:
    """A closure applying ``impl`` to argument closures, specialised for common shapes."""
    n = len(arg_fns)
    if n == 1:
        (f0,) = arg_fns
        return lambda row, req: impl(f0(row, req))
    if n == 2:
        f0, f1 = arg_fns
        a1 = args[1]
        if isinstance(a1, Static):
            c1 = a1.value
            return lambda row, req: impl(f0(row, req), c1)
        return lambda row, req: impl(f0(row, req), f1(row, req))
    if n == 3:
        f0, f1, f2 = arg_fns
        return lambda row, req: impl(f0(row, req), f1(row, req), f2(row, req))
    return lambda row, req: impl(*[f(row, req) for f in arg_fns])


def _lazy_closure(impl: Callable[..., SqliteValue], arg_fns: list[ValueFn]) -> ValueFn:
    return lambda row, req: impl(arg_fns, row, req)


def _lazy_iif(arg_fns: list[ValueFn], row: Any, req: Any) -> SqliteValue:
    if sv.truth(arg_fns[0](row, req)) == 1:
        return arg_fns[1](row, req)
    return arg_fns[2](row, req)


def _lazy_coalesce(arg_fns: list[ValueFn], row: Any, req: Any) -> SqliteValue:
    for f in arg_fns:
        v = f(row, req)
        if v is not None:
            return v
    return None


# Edition 1 (the reference's legacy engine): NOT, AND and OR are two-valued, NULL is false;
# `NOT col` with col NULL is true (SQLite would give NULL).
def _legacy_not(a: SqliteValue) -> SqliteValue:
    return 0 if sv.truth(a) == 1 else 1


def _legacy_and(a: SqliteValue, b: SqliteValue) -> SqliteValue:
    return 1 if sv.truth(a) == 1 and sv.truth(b) == 1 else 0


def _legacy_or(a: SqliteValue, b: SqliteValue) -> SqliteValue:
    return 1 if sv.truth(a) == 1 or sv.truth(b) == 1 else 0


def _request_value(v: object) -> SqliteValue:
    """A value of the token or the client parameters, as the reference sees it: numbers
    are REAL (JSON numbers are doubles), also inside objects and arrays (``{"a":123.0}``)."""
    t = type(v)
    if t is int:
        return float(v)  # type: ignore[arg-type]
    if t is dict or t is list:
        return sv.json_dumps(_reals(v))
    return sv.to_sqlite(v)


def _record_path(record: Mapping[str, SqliteValue], components: list[str]) -> SqliteValue:
    """Walk ``$.a.b`` through the client parameters as the reference does: the first step
    reads a parameter, later steps index its (text) value like JavaScript does."""
    value: Any = record
    for c in components:
        if value is None:
            break
        if type(value) is str:
            value = value[int(c)] if c.isdigit() and int(c) < len(value) else None
        elif isinstance(value, Mapping):
            value = value.get(c)
        else:
            value = None
    if isinstance(value, Mapping):
        return sv.json_dumps(dict(value))
    return value


def stream_value(v: object) -> SqliteValue:
    """A token / connection / subscription value in sync streams: JSON integers stay
    INTEGER (edition 2+), objects and arrays are JSON text, booleans 1/0."""
    t = type(v)
    if t is dict or t is list:
        return sv.json_dumps(v)
    return sv.to_sqlite(v)


def _reals(v: Any) -> Any:
    t = type(v)
    if t is int:
        return float(v)
    if t is dict:
        return {k: _reals(x) for k, x in v.items()}
    if t is list:
        return [_reals(x) for x in v]
    return v


def _in_list(a: SqliteValue, *items: SqliteValue) -> SqliteValue:
    return sv.op_in_list(a, list(items))


def _between(a: SqliteValue, low: SqliteValue, high: SqliteValue) -> SqliteValue:
    return sv.op_and(sv.op_ge(a, low), sv.op_le(a, high))


def _is_null(a: SqliteValue) -> SqliteValue:
    return 1 if a is None else 0


def _is_not_null(a: SqliteValue) -> SqliteValue:
    return 0 if a is None else 1


def _is_true(a: SqliteValue) -> SqliteValue:
    return 1 if sv.truth(a) == 1 else 0


def _is_false(a: SqliteValue) -> SqliteValue:
    return 1 if sv.truth(a) == 0 else 0


def _is_not_true(a: SqliteValue) -> SqliteValue:
    return 0 if sv.truth(a) == 1 else 1


def _is_not_false(a: SqliteValue) -> SqliteValue:
    return 0 if sv.truth(a) == 0 else 1


def _and_match(a: MatchClause, b: MatchClause) -> MatchClause:
    keys = {i.key for i in a.inputs}
    inputs = a.inputs + tuple(i for i in b.inputs if i.key not in keys)
    fa, fb = a.filter, b.filter
    if not a.inputs and a.simple is None:
        # row-only condition on the left: a cheap gate
        def gate_left(row: Any, req: Any) -> list[Assignment]:
            if not fa(row, req):
                return NO_MATCH
            return fb(row, req)

        return MatchClause(inputs, gate_left)
    if not b.inputs:

        def gate_right(row: Any, req: Any) -> list[Assignment]:
            ra = fa(row, req)
            if not ra or not fb(row, req):
                return NO_MATCH
            return ra

        return MatchClause(inputs, gate_right)

    def and_filter(row: Any, req: Any) -> list[Assignment]:
        ra = fa(row, req)
        if not ra:
            return NO_MATCH
        rb = fb(row, req)
        if not rb:
            return NO_MATCH
        out: list[Assignment] = []
        for x in ra:
            for y in rb:
                merged = dict(x)
                ok = True
                for k, v in y.items():
                    if k in merged and sv.op_is(merged[k], v) != 1:
                        ok = False
                        break
                    merged[k] = v
                if ok:
                    out.append(merged)
        return out

    return MatchClause(inputs, and_filter)


_DISPATCH: Final[dict[type[exp.Expr], Callable[[Compiler, Any], Clause]]] = {
    exp.Literal: Compiler._literal,
    exp.Null: Compiler._null,
    exp.Boolean: Compiler._boolean,
    exp.HexString: Compiler._hex,
    exp.Paren: Compiler._paren,
    exp.ArrayOverlaps: Compiler._overlap,
    exp.Column: Compiler._column,
    exp.Dot: Compiler._dot,
    exp.Anonymous: Compiler._anonymous,
    exp.Cast: Compiler._cast,
    exp.JSONExtract: Compiler._json_arrow,
    exp.JSONExtractScalar: Compiler._json_arrow,
    exp.EQ: Compiler._eq,
    exp.Neg: Compiler._neg,
    exp.BitwiseNot: Compiler._bitnot,
    exp.Not: Compiler._not,
    exp.Is: Compiler._is,
    exp.In: Compiler._in,
    exp.Between: Compiler._between,
    exp.Like: Compiler._like,
    exp.Escape: Compiler._escape,
    exp.And: Compiler._and_or,
    exp.Or: Compiler._and_or,
    exp.Case: Compiler._case,
    **{cls: Compiler._binary for cls in _COMPARISONS},
}
