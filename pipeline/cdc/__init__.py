"""Pure decoding core for Debezium change events on Kafka (docs: cdc-events.md).

``decode_record(record)`` turns one :class:`KafkaRecord` into exactly one normalised
result dict (§8.1). The only I/O is the schema resolver used for Avro records.
"""

from pipeline.cdc.convert import ColumnSpec, ConversionError, compact_json, format_unscaled
from pipeline.cdc.decode import decode_record, normalise_tx_id
from pipeline.cdc.events import (
    DeadLetterEvent,
    DecodedEvent,
    DeleteEvent,
    IgnoreEvent,
    ProgressEvent,
    RowEvent,
    TruncateEvent,
    TxBeginEvent,
    TxBlock,
    TxEndEvent,
    UpsertEvent,
)
from pipeline.cdc.record import DEFAULT_OPTIONS, DecodeOptions, KafkaRecord
from pipeline.cdc.registry import (
    HttpSchemaRegistry,
    InvalidSchema,
    LocalSchemaDir,
    RegistryUnavailable,
    SchemaRegistryError,
    SchemaResolver,
    UnknownSchemaId,
)

__all__ = [
    "DEFAULT_OPTIONS",
    "ColumnSpec",
    "ConversionError",
    "DeadLetterEvent",
    "DecodeOptions",
    "DecodedEvent",
    "DeleteEvent",
    "HttpSchemaRegistry",
    "IgnoreEvent",
    "InvalidSchema",
    "KafkaRecord",
    "LocalSchemaDir",
    "ProgressEvent",
    "RegistryUnavailable",
    "RowEvent",
    "SchemaRegistryError",
    "SchemaResolver",
    "TruncateEvent",
    "TxBeginEvent",
    "TxBlock",
    "TxEndEvent",
    "UnknownSchemaId",
    "UpsertEvent",
    "compact_json",
    "decode_record",
    "format_unscaled",
    "normalise_tx_id",
]
