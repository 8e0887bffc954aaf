"""``SyncRules``: the compiled rules, evaluated per CDC row and per sync request."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.rules.errors import RequestEvaluationError, RowEvaluationError, SqlEvalError
from pipeline.rules.expr import RequestContext
from pipeline.rules.model import (
    BucketDescription,
    LookupEntry,
    LookupReader,
    LookupResults,
    RowOutput,
)
from pipeline.rules.queries import (
    DataQuery,
    ParameterQuery,
    TableParameterQuery,
    _project_star,
    project_star_json,
)


@dataclass(frozen=True, eq=False)
class BucketDefinition:
    """One entry of ``bucket_definitions``."""

    name: str
    priority: int
    parameter_names: tuple[str, ...]  # bucket parameters, in bucket id order
    parameter_queries: tuple[ParameterQuery, ...]
    data_queries: tuple[DataQuery, ...]
    accept_potentially_dangerous_queries: bool = False

    @property
    def is_global(self) -> bool:
        """No parameter queries: every client gets the single bucket ``<name>[]``."""
        return not self.parameter_queries


@dataclass(frozen=True, eq=False)
class Stream:
    """One entry of ``streams`` (edition 3), or one bucket definition of edition 1 (a
    default stream of the legacy format, sync-streams.md §1b)."""

    name: str
    is_default: bool  # auto_subscribe (every bucket definition of edition 1)
    priority: int
    variants: tuple[BucketDefinition, ...]
    uses_subscription: bool = False
    legacy: bool = False


@dataclass(frozen=True, slots=True)
class StreamSubscription:
    """One entry of the request's ``streams.subscriptions``."""

    stream: str
    parameters: Any = None  # must be an object (or null)
    override_priority: Any = None  # 0..3 or null


@dataclass(slots=True)
class StreamStatus:
    """An entry of the first checkpoint's ``streams``."""

    name: str
    is_default: bool
    errors: list[dict[str, Any]]

    def wire(self) -> dict[str, Any]:
        return {"name": self.name, "is_default": self.is_default, "errors": self.errors}


@dataclass(slots=True)
class ResolvedBucket:
    bucket: str
    definition: str
    priority: int
    #: ``{"default": <index into streams>}`` or ``{"sub": <index into subscriptions>}``
    subscriptions: list[dict[str, int]]


@dataclass(slots=True)
class _Entry:
    stream: Stream
    req: RequestContext
    reason: dict[str, int]
    priority: int
    status: StreamStatus
    subscription: int | str  # for errors: the subscription index or "default"
    #: the lookup keys of each parameter query (by id), computed once by the plan
    keys: dict[int, list[str]] = field(default_factory=dict)


class RequestPlan:
    """A request's stream subscriptions, ready to be resolved against lookup rows.

    Built once per connection (:meth:`SyncRules.plan_request`); :attr:`streams` is the
    first checkpoint's ``streams``, :attr:`lookup_keys` the lookup keys to read, and
    :meth:`buckets` the bucket set for the rows read. Problems of one subscription (unknown
    stream, bad parameters, values that cannot be evaluated) land in that stream's
    ``errors``, never in an exception -- except for edition-1 rules, which raise
    :class:`RequestEvaluationError` as they always did.
    """

    def __init__(self, streams: list[StreamStatus], entries: list[_Entry], legacy: bool):
        self.streams = streams
        self._entries = entries
        self._legacy = legacy
        keys: dict[str, None] = {}
        for e in list(entries):
            try:
                for d in e.stream.variants:
                    for q in d.parameter_queries:
                        q_keys = e.keys[id(q)] = q.request_keys(e.req)
                        for k in q_keys:
                            keys[k] = None
            except Exception as ex:
                if legacy:
                    raise RequestEvaluationError(
                        f"sync rules: definition '{e.stream.name}': {_describe_error(ex)}",
                        definition=e.stream.name,
                    ) from ex
                self._error(e, ex)
                entries.remove(e)
        self.lookup_keys: list[str] = list(keys)

    @staticmethod
    def _error(e: _Entry, ex: BaseException) -> None:
        msg = f"cannot evaluate the stream's parameters: {_describe_error(ex)}"
        e.status.errors.append({"subscription": e.subscription, "message": msg})

    def buckets(self, lookups: LookupResults | None = None) -> list[ResolvedBucket]:
        results: LookupResults = lookups or {}
        out: dict[str, ResolvedBucket] = {}
        for e in self._entries:
            found: list[tuple[list[str], str]] = []
            try:
                for d in e.stream.variants:
                    if not d.parameter_queries:
                        found.append(([d.name + "[]"], d.name))
                        continue
                    for q in d.parameter_queries:
                        q_keys = e.keys.get(id(q))
                        if q_keys is None:
                            q_keys = q.request_keys(e.req)
                        found.append((q.bucket_ids(d.name, e.req, q_keys, results), d.name))
            except Exception as ex:
                if self._legacy:
                    raise RequestEvaluationError(
                        f"sync rules: definition '{e.stream.name}': {_describe_error(ex)}",
                        definition=e.stream.name,
                    ) from ex
                self._error(e, ex)
                continue
            priority = e.priority
            reason = e.reason
            for ids, definition in found:
                for bid in ids:
                    b = out.get(bid)
                    if b is None:
                        out[bid] = ResolvedBucket(bid, definition, priority, [reason])
                    else:
                        if priority < b.priority:
                            b.priority = priority
                        if reason not in b.subscriptions:
                            b.subscriptions.append(reason)
        return list(out.values())


def _describe_error(e: BaseException) -> str:
    if isinstance(e, SqlEvalError):
        return str(e)
    return f"{type(e).__name__}: {e}"


#: (schema, suffix_at, buckets, projection, project, object type, query) of a data query
_Step = tuple[
    str | None,
    int | None,
    Callable[[Any], Sequence[str]],
    Any,
    Callable[[Any], tuple[str, str]],
    str,
    DataQuery,
]


def _steps(queries: Sequence[DataQuery], table: str) -> tuple[_Step, ...]:
    """A table's data queries as plain tuples: no attribute lookups per row."""
    return tuple(
        (
            q.schema,
            q.suffix_at,
            q.buckets,
            q.projection,
            q.projection.project,
            q.object_type or table,
            q,
        )
        for q in queries
    )


class SyncRules:
    """Compiled sync rules. Immutable and safe to share between threads and tasks.

    Build with :func:`pipeline.rules.load_rules` / :func:`pipeline.rules.parse_rules`.
    """

    def __init__(
        self,
        definitions: Sequence[BucketDefinition],
        *,
        warnings: Sequence[str] = (),
        source: str = "<rules>",
        content_hash: str = "",
        streams: Sequence[Stream] | None = None,
        edition: int = 1,
    ) -> None:
        self.edition = edition
        if streams is None:
            streams = [Stream(d.name, True, d.priority, (d,), legacy=True) for d in definitions]
        else:
            definitions = [d for s in streams for d in s.variants]
        #: edition 3: the streams; edition 1: one default stream per bucket definition
        self.streams: tuple[Stream, ...] = tuple(streams)
        self._streams_by_name = {s.name: s for s in self.streams}
        self.definitions: tuple[BucketDefinition, ...] = tuple(definitions)
        self.warnings: tuple[str, ...] = tuple(warnings)
        self.source = source
        self.content_hash = content_hash
        self._by_name = {d.name: d for d in self.definitions}

        self._data_queries: tuple[DataQuery, ...] = tuple(
            q for d in self.definitions for q in d.data_queries
        )
        self._lookup_queries: tuple[TableParameterQuery, ...] = tuple(
            q
            for d in self.definitions
            for pq in d.parameter_queries
            for q in (pq.lookups if hasattr(pq, "lookups") else [pq])
            if isinstance(q, TableParameterQuery)
        )
        self._data_wildcards = tuple(q for q in self._data_queries if q.table.wildcard)
        self._data_by_table: dict[str, tuple[tuple[DataQuery, ...], bool]] = {}
        #: per source table, what :meth:`evaluate_row` reads of each of its data queries
        self._steps_by_table: dict[str, tuple[_Step, ...]] = {}
        for name in {q.table.name for q in self._data_queries if not q.table.wildcard}:
            self._data_by_table[name] = self._index_data(name)
        self._params_by_table: dict[str, tuple[TableParameterQuery, ...]] = {}
        for q in self._lookup_queries:
            assert q.table is not None
            self._params_by_table[q.table.name] = (*self._params_by_table.get(q.table.name, ()), q)

    def _index_data(self, table: str) -> tuple[tuple[DataQuery, ...], bool]:
        queries = tuple(
            q
            for q in self._data_queries
            if (table.startswith(q.table.prefix) if q.table.wildcard else q.table.name == table)
        )
        per_definition: dict[str, int] = {}
        for q in queries:
            per_definition[q.definition] = per_definition.get(q.definition, 0) + 1
        dedupe = any(n > 1 for n in per_definition.values())
        return queries, dedupe

    # ----------------------------------------------------------------- introspection

    def definition(self, name: str) -> BucketDefinition:
        return self._by_name[name]

    def tables(self) -> set[str]:
        """Source table names the rules read (data and parameter queries).

        Wildcard patterns appear as written (``todos_%``); use :meth:`is_relevant` to test a
        concrete table.
        """
        return self.data_tables() | self.parameter_tables()

    def data_tables(self) -> set[str]:
        return {q.table.name for q in self._data_queries}

    def parameter_tables(self) -> set[str]:
        """Tables read by parameter queries (lookups); feed their rows to
        :meth:`evaluate_parameter_row`."""
        return set(self._params_by_table)

    def is_relevant(self, table: str, schema: str | None = None) -> bool:
        for q in self._data_queries:
            if q.table.matches(table, schema):
                return True
        return any(
            q.table is not None and q.table.matches(table, schema) for q in self._lookup_queries
        )

    @property
    def has_lookups(self) -> bool:
        """Whether some parameter query reads a table (``buckets_for_request`` needs lookups)."""
        return bool(self._lookup_queries)

    # ----------------------------------------------------------------- rows

    #: :meth:`evaluate_row` takes ``row_json`` (see :func:`pipeline.core.plan_batch`)
    takes_row_json = True

    def evaluate_row(
        self,
        table: str,
        row: Mapping[str, Any],
        *,
        schema: str | None = None,
        row_json: str | None = None,
    ) -> list[RowOutput]:
        """The buckets a source row lands in, with its object type, id and data.

        One entry per (bucket, data query); when two data queries of one definition give
        the same bucket, object type and object id, the first is kept. Raises
        :class:`RowEvaluationError` for a row that cannot be evaluated.

        ``row_json``: ``orjson.dumps(row)`` as text when the caller has it; ``SELECT *``
        then uses it as the data of a row that needs no conversion instead of encoding
        the row again.
        """
        star_json = row_json if row_json is not None and type(row) is dict else None
        entry = self._data_by_table.get(table)
        if entry is None:
            if not self._data_wildcards:
                return []
            entry = self._index_data(table)
            self._data_by_table[table] = entry
        steps = self._steps_by_table.get(table)
        if steps is None:
            steps = self._steps_by_table[table] = _steps(entry[0], table)
        dedupe = entry[1]
        out: list[RowOutput] = []
        last_projection: Any = None
        projected: tuple[str, str] = ("", "")
        cache: dict[Any, tuple[str, str]] | None = None
        for q_schema, suffix_at, buckets, projection, project, object_type, q in steps:
            if q_schema is not None and q_schema != schema:
                continue
            try:
                # a wildcard table's `_table_suffix` is read like a column
                r = row if suffix_at is None else {**row, "_table_suffix": table[suffix_at:]}
                ids = buckets(r)
                if not ids:
                    continue
                if projection is not last_projection:
                    if last_projection is None:
                        if star_json is not None and project is _project_star and r is row:
                            projected = project_star_json(row, star_json)
                        else:
                            projected = project(r)
                    else:
                        if cache is None:
                            cache = {last_projection: projected}
                        found = cache.get(projection)
                        if found is None:
                            if star_json is not None and project is _project_star and r is row:
                                found = project_star_json(row, star_json)
                            else:
                                found = project(r)
                            cache[projection] = found
                        projected = found
                    last_projection = projection
            except Exception as e:
                raise RowEvaluationError(
                    f"sync rules: definition '{q.definition}', data query {q.number} \"{q.sql}\": "
                    f"{_describe_error(e)} (table {table!r})",
                    definition=q.definition,
                    query=q.sql,
                ) from e
            object_id, data = projected
            for bucket in ids:
                out.append(RowOutput(bucket, object_type, object_id, data))
        if dedupe and len(out) > 1:
            seen: set[tuple[str, str, str]] = set()
            unique: list[RowOutput] = []
            for o in out:
                k = (o.bucket, o.object_type, o.object_id)
                if k not in seen:
                    seen.add(k)
                    unique.append(o)
            out = unique
        return out

    def evaluate_parameter_row(
        self, table: str, row: Mapping[str, Any], schema: str | None = None
    ) -> list[LookupEntry]:
        """Lookup entries a source row contributes to parameter queries over ``table``.

        The processor keeps, per source row, the entries it last contributed; on a change it
        removes the old entries and adds the new ones (a deleted row contributes none).
        """
        queries = self._params_by_table.get(table)
        if not queries:
            return []
        out: list[LookupEntry] = []
        for q in queries:
            assert q.table is not None
            if q.table.schema is not None and q.table.schema != schema:
                continue
            try:
                out.extend(q.evaluate_row(row))
            except Exception as e:
                raise RowEvaluationError(
                    f"sync rules: definition '{q.definition}', parameter query {q.number} \"{q.sql}\": "
                    f"{_describe_error(e)} (table {table!r})",
                    definition=q.definition,
                    query=q.sql,
                ) from e
        return out

    # ----------------------------------------------------------------- requests

    def _request(
        self, payload: Mapping[str, Any], client_parameters: Mapping[str, Any] | None
    ) -> RequestContext:
        try:
            return RequestContext(payload, client_parameters)
        except Exception as e:
            raise RequestEvaluationError(
                f"sync rules: cannot evaluate request: {_describe_error(e)}"
            ) from e

    def _request_keys(self, req: RequestContext) -> dict[int, list[str]]:
        keys: dict[int, list[str]] = {}
        for q in self._lookup_queries:
            try:
                keys[id(q)] = q.request_keys(req)
            except Exception as e:
                raise RequestEvaluationError(
                    f"sync rules: definition '{q.definition}', parameter query {q.number} \"{q.sql}\": "
                    f"{_describe_error(e)}",
                    definition=q.definition,
                    query=q.sql,
                ) from e
        return keys

    def plan_request(
        self,
        payload: Mapping[str, Any],
        client_parameters: Mapping[str, Any] | None = None,
        *,
        include_defaults: bool = True,
        subscriptions: Sequence[StreamSubscription] = (),
    ) -> RequestPlan:
        """The streams a request subscribes to (defaults and explicit subscriptions).

        Streams are listed in rules order (the first checkpoint's ``streams``); a
        subscription to a stream the rules do not define is listed after them, with an
        error. Priorities: the stream's, or the subscription's ``override_priority``.
        """
        base = self._request(payload, client_parameters)
        legacy = self.edition < 2
        status: dict[str, StreamStatus] = {}
        entries: list[_Entry] = []
        subscribed = {s.stream for s in subscriptions}
        for st in self.streams:
            if (st.is_default and include_defaults) or st.name in subscribed:
                status[st.name] = StreamStatus(st.name, st.is_default, [])
        index = {name: i for i, name in enumerate(status)}
        if include_defaults:
            for st in self.streams:
                if st.is_default:
                    entries.append(
                        _Entry(
                            st,
                            base,
                            {"default": index[st.name]},
                            st.priority,
                            status[st.name],
                            "default",
                        )
                    )
        for i, sub in enumerate(subscriptions):
            st_ = self._streams_by_name.get(sub.stream)
            if st_ is None:
                s = status.get(sub.stream)
                if s is None:
                    s = status[sub.stream] = StreamStatus(sub.stream, False, [])
                s.errors.append({"subscription": i, "message": f"unknown stream '{sub.stream}'"})
                continue
            err = None
            if sub.parameters is not None and not isinstance(sub.parameters, Mapping):
                err = "subscription parameters must be an object"
            prio = sub.override_priority
            if prio is not None and (type(prio) is not int or not 0 <= prio <= 3):
                err = f"override_priority must be an integer from 0 to 3, got {prio!r}"
            if err is not None:
                status[sub.stream].errors.append({"subscription": i, "message": err})
                continue
            req = base.with_subscription(sub.parameters)
            entries.append(
                _Entry(
                    st_,
                    req,
                    {"sub": i},
                    st_.priority if prio is None else prio,
                    status[sub.stream],
                    i,
                )
            )
        return RequestPlan(list(status.values()), entries, legacy)

    def lookup_keys_for_request(
        self, payload: Mapping[str, Any], client_parameters: Mapping[str, Any] | None = None
    ) -> list[str]:
        """The lookup keys a request needs (to prefetch them, e.g. asynchronously, and pass
        the result to :meth:`buckets_for_request` as a mapping)."""
        req = self._request(payload, client_parameters)
        return list(dict.fromkeys(k for keys in self._request_keys(req).values() for k in keys))

    def buckets_for_request(
        self,
        payload: Mapping[str, Any],
        client_parameters: Mapping[str, Any] | None = None,
        lookups: LookupReader | None = None,
    ) -> list[BucketDescription]:
        """The buckets a verified token payload (and client parameters) may see.

        ``lookups`` is needed when the rules have parameter queries over tables
        (:attr:`has_lookups`): a callable ``reader(keys) -> {key: [values, ...]}`` called
        once with all keys, or a mapping prefetched for :meth:`lookup_keys_for_request`.
        Buckets come in definition order, without duplicates.
        """
        req = self._request(payload, client_parameters)
        keys_by_query: dict[int, list[str]] = {}
        results: LookupResults = {}
        if self._lookup_queries:
            keys_by_query = self._request_keys(req)
            all_keys = list(dict.fromkeys(k for keys in keys_by_query.values() for k in keys))
            if all_keys:
                if lookups is None:
                    raise ValueError(
                        "these sync rules have parameter queries over tables; pass lookups= to "
                        "buckets_for_request (see SyncRules.lookup_keys_for_request)"
                    )
                results = lookups(all_keys) if callable(lookups) else lookups
        buckets: dict[str, BucketDescription] = {}
        for d in self.definitions:
            if not d.parameter_queries:
                bid = d.name + "[]"
                if bid not in buckets:
                    buckets[bid] = BucketDescription(bid, d.name, d.priority)
                continue
            for q in d.parameter_queries:
                try:
                    ids = q.bucket_ids(d.name, req, keys_by_query.get(id(q), []), results)
                except Exception as e:
                    raise RequestEvaluationError(
                        f"sync rules: definition '{q.definition}', parameter query {q.number} "
                        f'"{q.sql}": {_describe_error(e)}',
                        definition=q.definition,
                        query=q.sql,
                    ) from e
                for bid in ids:
                    if bid not in buckets:
                        buckets[bid] = BucketDescription(bid, d.name, d.priority)
        return list(buckets.values())

    def __repr__(self) -> str:
        names = ", ".join(d.name for d in self.definitions)
        return f"SyncRules({self.source!r}: {names})"
