"""Errors raised by the sync rules: at load (``RulesError``) and at evaluation time."""

from __future__ import annotations

from bucketsync.errors import UserError


class RulesError(UserError):
    """The sync rules file is invalid; refused at load.

    The message names the definition, the query and the position of the problem, e.g.
    ``sync rules: definition 'by_user', data query 2 "SELECT ...": unknown bucket
    parameter 'usr' at column 42``. The parts are also available as attributes.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        definition: str | None = None,
        query: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        super().__init__(message)
        self.source = source
        self.definition = definition
        self.query = query
        self.line = line
        self.column = column


class RulesEvaluationError(ValueError):
    """A value could not be evaluated by a compiled query (base class)."""

    def __init__(
        self, message: str, *, definition: str | None = None, query: str | None = None
    ) -> None:
        super().__init__(message)
        self.definition = definition
        self.query = query


class RowEvaluationError(RulesEvaluationError):
    """A source row cannot be evaluated (e.g. malformed JSON in a column used by a filter).

    The processor dead-letters the event; the message names the definition, the query and
    the problem.
    """


class RequestEvaluationError(RulesEvaluationError):
    """A request's token/client parameters cannot be evaluated by a parameter query."""


class SqlEvalError(Exception):
    """Internal: raised by SQL value functions; wrapped into a RulesEvaluationError."""
