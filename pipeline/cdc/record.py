"""Input record and decoder options."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_OPTIONS", "DecodeOptions", "KafkaRecord"]


# Not frozen: a frozen dataclass's __init__ sets every field through object.__setattr__,
# which cost ~3 us per consumed record (9% of the processor's main thread); treat instances
# as immutable all the same (hashed by value, like a frozen one).
@dataclass(slots=True, unsafe_hash=True)
class KafkaRecord:
    """One consumed Kafka record, untouched (what a dead letter must preserve)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()
    timestamp_ms: int | None = None


@dataclass(frozen=True, slots=True)
class DecodeOptions:
    """Connector settings the decoder must take from configuration (cdc-events.md §1.1, §2.4, §3.6)."""

    #: ``topic.heartbeat.prefix``: heartbeat topics are ``<prefix>.<topic.prefix>``
    heartbeat_topic_prefix: str = "__debezium-heartbeat"
    #: ``topic.transaction``: transaction topics are ``<topic.prefix>.<suffix>``
    transaction_topic_suffix: str = "transaction"
    #: ``ExtractNewRecordState`` ``add.fields.prefix``
    metadata_prefix: str = "__"
    #: ``unavailable.value.placeholder`` (unchanged TOAST columns)
    unavailable_value_placeholder: str = "__debezium_unavailable_value"


DEFAULT_OPTIONS = DecodeOptions()
