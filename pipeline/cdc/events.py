"""The decoder's output: one normalised event per Kafka record (cdc-events.md §8.1).

A tagged union on ``action``: the planner (:func:`pipeline.core.plan_batch`) and the
transaction stager narrow an event by comparing ``ev["action"]`` with a literal, and mypy
then knows which keys it has. At runtime they are plain dicts (what the fixtures'
``expected.json`` holds), so building one costs nothing extra.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

__all__ = [
    "DeadLetterEvent",
    "DecodedEvent",
    "DeleteEvent",
    "IgnoreEvent",
    "JsonPatch",
    "ProgressEvent",
    "RowEvent",
    "TruncateEvent",
    "TxBeginEvent",
    "TxBlock",
    "TxEndEvent",
    "UpsertEvent",
]


class TxBlock(TypedDict):
    """An event's ``transaction`` block: its normalised transaction id and position."""

    id: str
    total_order: int
    data_collection_order: int


class JsonPatch(TypedDict):
    """A MongoDB partial update of a nested field (``column`` holds the document part)."""

    column: str
    op: Literal["set", "remove", "truncate"]
    path: str
    value: NotRequired[str]
    size: NotRequired[int]


class _Source(TypedDict, total=False):
    """Where a row event came from: the source table and schema (database for MySQL and
    MongoDB), its transaction, and for PostgreSQL the WAL position and connector name."""

    source_table: str
    source_schema: str
    tx: TxBlock
    source_lsn: int
    source_name: str


class UpsertEvent(_Source):
    action: Literal["upsert"]
    table: str
    key: dict[str, Any]
    row: dict[str, Any]
    #: columns sent as the TOAST placeholder: keep the stored value
    keep_columns: NotRequired[list[str]]
    #: MongoDB update without a post-image: merge ``row`` and ``null_columns`` into the stored row
    partial: NotRequired[bool]
    null_columns: NotRequired[list[str]]
    json_patches: NotRequired[list[JsonPatch]]
    #: MongoDB full document: the row is complete
    replace_document: NotRequired[bool]
    #: op ``r``
    snapshot: NotRequired[bool]
    #: the create half of a primary-key change: the row's old key
    pk_change_from: NotRequired[dict[str, Any]]


class DeleteEvent(_Source):
    action: Literal["delete"]
    table: str
    key: dict[str, Any]
    #: the Kafka tombstone (no value) rather than an ``op=d`` envelope
    tombstone: NotRequired[bool]
    #: the delete half of a primary-key change: the row's new key
    pk_change_to: NotRequired[dict[str, Any]]


class TruncateEvent(_Source):
    action: Literal["truncate"]
    table: str


class TxBeginEvent(TypedDict):
    action: Literal["tx_begin"]
    connector: str
    tx_id: str


class TxEndEvent(TypedDict):
    action: Literal["tx_end"]
    connector: str
    tx_id: str
    event_count: int
    #: events of the transaction per table id (``<connector>.<schema>.<table>``)
    data_collections: dict[str, int]


class ProgressEvent(TypedDict):
    """A heartbeat: the connector is alive at ``ts_ms``."""

    action: Literal["progress"]
    connector: str
    ts_ms: int | None


class IgnoreEvent(TypedDict):
    action: Literal["ignore"]
    reason: str


class DeadLetterEvent(TypedDict):
    """A record the decoder could not use (cdc-events.md §8.3); the offset still advances."""

    action: Literal["dead_letter"]
    reason: str
    message: str
    limit_bytes: NotRequired[int]
    magic_byte: NotRequired[int | None]
    schema_id: NotRequired[int]


#: the events that change rows
RowEvent = UpsertEvent | DeleteEvent | TruncateEvent

DecodedEvent = (
    UpsertEvent
    | DeleteEvent
    | TruncateEvent
    | TxBeginEvent
    | TxEndEvent
    | ProgressEvent
    | IgnoreEvent
    | DeadLetterEvent
)
