"""Parsing sync-rule SQL with sqlglot, and locating problems inside the query text.

A dialect derived from sqlglot's SQLite dialect:
- function calls stay ``exp.Anonymous`` with their original name (sqlglot would otherwise
  rewrite e.g. ``ifnull`` into ``Coalesce`` and ``instr`` into ``StrPosition``);
- ``->`` / ``->>`` keep their raw right operand (sqlglot would turn it into a JSONPath);
- ``request.user_id()`` parses natively as ``Dot(Identifier(request), Anonymous(user_id))``,
  ``bucket.x`` / ``token_parameters.x`` as qualified columns, so no pre-processing is needed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import sqlglot
from sqlglot import exp
from sqlglot.dialects.sqlite import SQLite
from sqlglot.errors import ParseError, TokenError
from sqlglot.parser import binary_range_parser
from sqlglot.parsers.sqlite import SQLiteParser
from sqlglot.tokens import TokenType


def _raw_arrow(cls: type[exp.Expr]) -> Callable[[Any, exp.Expr, exp.Expr], exp.Expr]:
    def build(self: Any, this: exp.Expr, path: exp.Expr) -> exp.Expr:
        return self.expression(cls(this=this, expression=path))

    return build


class _RulesParser(SQLiteParser):
    FUNCTIONS: ClassVar[dict[str, Callable[..., Any]]] = {}
    FUNCTION_PARSERS: ClassVar = {"CAST": SQLiteParser.FUNCTION_PARSERS["CAST"]}
    NO_PAREN_FUNCTION_PARSERS: ClassVar = {"CASE": SQLiteParser.NO_PAREN_FUNCTION_PARSERS["CASE"]}
    NO_PAREN_FUNCTIONS: ClassVar = {}
    CONCAT_OPERATORS: ClassVar = {
        **SQLiteParser.CONCAT_OPERATORS,
        TokenType.ARROW: _raw_arrow(exp.JSONExtract),
        TokenType.DARROW: _raw_arrow(exp.JSONExtractScalar),
    }
    #: `a && b`: the JSON arrays overlap (sync streams)
    RANGE_PARSERS: ClassVar = {
        **SQLiteParser.RANGE_PARSERS,
        TokenType.DAMP: binary_range_parser(exp.ArrayOverlaps),
    }

    def _parse_in(self, this: exp.Expr | None, alias: bool = False) -> exp.In:
        node = super()._parse_in(this, alias)
        # `x IN request.parameters() -> 'ids'`: `->` / `->>` bind tighter than IN (as in the
        # reference); sqlglot's IN takes only a column after it
        field = node.args.get("field")
        while field is not None and self._match_set((TokenType.ARROW, TokenType.DARROW)):
            cls = (
                exp.JSONExtract
                if self._prev.token_type == TokenType.ARROW
                else exp.JSONExtractScalar
            )
            field = self.expression(cls(this=field, expression=self._parse_unary()))
            node.set("field", field)
        return node


class RulesDialect(SQLite):
    Parser = _RulesParser


class SqlSyntaxError(Exception):
    """A problem at a character offset of the query text (offset None: unknown).

    ``node``: the offending node, located precisely with :func:`locate` once the query
    text is at hand.
    """

    def __init__(
        self, message: str, offset: int | None = None, node: exp.Expr | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.node = node

    def offset_in(self, sql: str) -> int | None:
        if self.node is not None:
            found = locate(sql, self.node)
            if found is not None:
                return found
        return self.offset


@dataclass(frozen=True, slots=True)
class Position:
    line: int  # 1-based
    column: int  # 1-based

    def describe(self, multiline: bool) -> str:
        return f"line {self.line}, column {self.column}" if multiline else f"column {self.column}"


def position_of(text: str, offset: int) -> Position:
    offset = max(0, min(offset, len(text)))
    line = text.count("\n", 0, offset) + 1
    line_start = text.rfind("\n", 0, offset) + 1
    return Position(line, offset - line_start + 1)


def offset_of(text: str, line: int, column: int) -> int:
    """Character offset of a 1-based line/column."""
    start = 0
    for _ in range(line - 1):
        nxt = text.find("\n", start)
        if nxt < 0:
            break
        start = nxt + 1
    return start + max(column - 1, 0)


def node_offset(node: exp.Expr | None) -> int | None:
    """Start offset of the earliest token of a node (walks up to parents if unknown)."""
    while node is not None:
        best: int | None = None
        for n in node.walk():
            meta = n._meta
            if meta and "start" in meta:
                start = meta["start"]
                if best is None or start < best:
                    best = start
        if best is not None:
            return best
        node = node.parent
    return None


# keyword that starts a node whose first positioned token comes later (e.g. JOIN, CAST)
_LEADING_KEYWORD: Final[tuple[tuple[type[exp.Expr], re.Pattern[str]], ...]] = tuple(
    (cls, re.compile(pattern, re.IGNORECASE))
    for cls, pattern in (
        (exp.Join, r"\bjoin\b|,"),
        (exp.Subquery, r"\("),
        (exp.Exists, r"\bexists\b"),
        (exp.Cast, r"\bcast\b"),
        (exp.Group, r"\bgroup\b"),
        (exp.Order, r"\border\b"),
        (exp.Limit, r"\blimit\b"),
        (exp.Offset, r"\boffset\b"),
        (exp.Having, r"\bhaving\b"),
        (exp.Distinct, r"\bdistinct\b"),
        (exp.With, r"\bwith\b"),
        (exp.Select, r"\bselect\b"),
    )
)
_PARAMETER_TOKEN = re.compile(r"\?|[:@$]\w")


def locate(sql: str, node: exp.Expr) -> int | None:
    """Offset of a node in the query text, pointing at its leading keyword if it has one."""
    inner = node_offset(node)
    if inner is None:
        return None
    if isinstance(node, (exp.Placeholder, exp.Parameter)) and not node._meta:
        m = _PARAMETER_TOKEN.search(sql, inner)
        return m.start() if m else inner
    for cls, pattern in _LEADING_KEYWORD:
        if isinstance(node, cls):
            last = None
            for m in pattern.finditer(sql, 0, inner):
                last = m.start()
            return inner if last is None else last
    return inner


def node_text(sql: str, node: exp.Expr) -> str:
    """The source text of a node (falls back to generated SQL)."""
    start: int | None = None
    end: int | None = None
    for n in node.walk():
        meta = n._meta
        if meta and "start" in meta:
            start = meta["start"] if start is None else min(start, meta["start"])
            end = meta["end"] if end is None else max(end, meta["end"])
    if start is None or end is None:
        return node.sql(dialect=RulesDialect)
    text = sql[start : end + 1]
    # a trailing ')' of a call is not part of any token's span
    while text.count("(") > text.count(")") and end + 1 < len(sql):
        end += 1
        text = sql[start : end + 1]
    return text


def _unterminated_quote(sql: str) -> int | None:
    """Offset of an unterminated quote or comment, if any."""
    i = 0
    n = len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`":
            j = i + 1
            while True:
                j = sql.find(c, j)
                if j < 0:
                    return i
                if j + 1 < n and sql[j + 1] == c:
                    j += 2
                    continue
                break
            i = j + 1
        elif c == "[":
            j = sql.find("]", i + 1)
            if j < 0:
                return i
            i = j + 1
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            if j < 0:
                return i
            i = j + 2
        else:
            i += 1
    return None


_DANGLING_COMMA_BEFORE: frozenset[TokenType] = frozenset(
    {TokenType.FROM, TokenType.WHERE, TokenType.R_PAREN, TokenType.COMMA}
)


def parse_select(sql: str) -> exp.Expr:
    """Parse one statement; raises SqlSyntaxError with an offset."""
    try:
        tokens = RulesDialect().tokenize(sql)
    except TokenError:
        bad = _unterminated_quote(sql)
        raise SqlSyntaxError(
            "syntax error: unterminated string, identifier or comment"
            if bad is not None
            else "syntax error: invalid token",
            bad,
        ) from None
    if not tokens:
        raise SqlSyntaxError("empty query", 0)
    # sqlglot tolerates a trailing comma in lists ("SELECT a, FROM t"); SQL does not
    for tok, nxt in zip(tokens, [*tokens[1:], None], strict=True):
        if tok.token_type == TokenType.COMMA and (
            nxt is None or nxt.token_type in _DANGLING_COMMA_BEFORE
        ):
            raise SqlSyntaxError("syntax error: unexpected ','", tok.start)
    try:
        statements = sqlglot.parse(sql, read=RulesDialect)
    except ParseError as e:
        if e.errors:
            err = e.errors[0]
            highlight = err.get("highlight") or ""
            line = err.get("line") or 1
            col = err.get("col") or 1
            offset = offset_of(sql, line, max(col - len(highlight) + 1, 1))
            desc = str(err.get("description") or "invalid syntax")
            if desc.startswith("Invalid expression / Unexpected token"):
                desc = f"unexpected {highlight!r}" if highlight else "unexpected token"
            elif desc.startswith("Required keyword"):
                desc = f"incomplete expression near {highlight!r}"
            elif desc.startswith("Expecting"):
                desc = desc[0].lower() + desc[1:]
            raise SqlSyntaxError(f"syntax error: {desc}", offset) from None
        raise SqlSyntaxError(f"syntax error: {e}") from None
    except TokenError:
        raise SqlSyntaxError("syntax error: invalid token") from None
    found = [s for s in statements if s is not None]
    if len(found) != 1:
        if not found:
            raise SqlSyntaxError("empty query", 0)
        raise SqlSyntaxError("expected a single SELECT statement", locate(sql, found[1]))
    stmt = found[0]
    if isinstance(stmt, exp.SetOperation):
        second_start = node_offset(stmt.expression)
        last = None
        for m in re.finditer(r"\b(union|intersect|except)\b", sql[:second_start], re.IGNORECASE):
            last = m.start()
        raise SqlSyntaxError(
            f"{stmt.key.upper()} is not supported; split into separate queries",
            last if last is not None else second_start,
        )
    if not isinstance(stmt, exp.Select):
        raise SqlSyntaxError("expected a SELECT statement", node_offset(stmt) or 0)
    return stmt


def identifier_name(ident: exp.Identifier | exp.Expr | str | None) -> tuple[str, bool]:
    """(name, quoted): unquoted identifiers fold to lower case, as in PostgreSQL/PowerSync."""
    if ident is None:
        return "", False
    if isinstance(ident, str):
        return ident.lower(), False
    if isinstance(ident, exp.Identifier):
        if ident.quoted:
            return ident.this, True
        return ident.this.lower(), False
    return ident.name.lower(), False
