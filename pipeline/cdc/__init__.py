"""Pure decoding core for Debezium change events on Kafka (docs: cdc-events.md).

``decode_record(record)`` turns one :class:`KafkaRecord` into exactly one normalised
result dict (§8.1). The only I/O is the schema resolver used for Avro records.
"""

from pipeline.cdc.convert import ColumnSpec, ConversionError, compact_json, format_unscaled
from pipeline.cdc.decode import decode_record, normalise_tx_id
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


def bench_decode(n: int = 100_000) -> float:
    """Decode fixture 02 ``n`` times and return events/s (see :mod:`pipeline.cdc.bench`)."""
    from pipeline.cdc.bench import bench_decode as run

    return run(n)


__all__ = [
    "DEFAULT_OPTIONS",
    "ColumnSpec",
    "ConversionError",
    "DecodeOptions",
    "HttpSchemaRegistry",
    "InvalidSchema",
    "KafkaRecord",
    "LocalSchemaDir",
    "RegistryUnavailable",
    "SchemaRegistryError",
    "SchemaResolver",
    "UnknownSchemaId",
    "bench_decode",
    "compact_json",
    "decode_record",
    "format_unscaled",
    "normalise_tx_id",
]
