"""Public result types of sync rules evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from pipeline.rules.values import SqliteValue


# Not frozen: a frozen dataclass's __init__ sets every field through object.__setattr__,
# and one is built for every (row, bucket); treat instances as immutable all the same.
@dataclass(slots=True, unsafe_hash=True)
class RowOutput:
    """One (bucket, data query) a source row lands in.

    ``data`` is the compact JSON text of the selected columns (sync-protocol.md §8.3).
    """

    bucket: str
    object_type: str
    object_id: str
    data: str


@dataclass(frozen=True, slots=True)
class BucketDescription:
    """A bucket a request may see."""

    bucket: str
    definition: str
    priority: int


@dataclass(frozen=True, slots=True)
class LookupEntry:
    """A source row's contribution to a lookup set of a parameter query over a table.

    ``lookup`` is ``<definition>\\x1f<parameter query number>\\x1f<JSON array of the
    request-side values>``; ``values`` are the bucket parameter values the row provides
    (the query's row-side output columns, in select order). The processor keeps, per
    lookup key, the set of ``values`` of all rows currently contributing; the gateway
    reads them back through a :data:`LookupReader`.
    """

    lookup: str
    values: tuple[SqliteValue, ...]


LookupResults: TypeAlias = Mapping[str, Iterable[Sequence[SqliteValue]]]
"""For each lookup key, the value tuples stored under it (missing key: no rows)."""

LookupReader: TypeAlias = Callable[[Sequence[str]], LookupResults] | LookupResults
"""Either a callable ``reader(keys) -> {key: [values, ...]}`` (called once per request with
all keys) or an already fetched mapping (see ``SyncRules.lookup_keys_for_request``)."""
