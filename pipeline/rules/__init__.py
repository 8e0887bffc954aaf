"""Sync rules: PowerSync ``bucket_definitions`` (legacy edition 1), compiled to closures.

Usage::

    rules = load_rules("sync-rules.yaml")            # RulesError if invalid
    rules.evaluate_row("todos", row, schema="public") # -> [RowOutput(bucket, object_type, object_id, data)]
    rules.evaluate_parameter_row("list_members", row) # -> [LookupEntry(lookup, values)]
    rules.buckets_for_request(jwt_payload, client_params, lookups=reader)  # -> [BucketDescription]

See ``docs/sync-protocol.md`` §8 for the file format and the SQL subset.
"""

from pipeline.rules.bucket_id import bucket_id, lookup_key, serialize_value, serialize_values
from pipeline.rules.errors import (
    RequestEvaluationError,
    RowEvaluationError,
    RulesError,
    RulesEvaluationError,
)
from pipeline.rules.evaluate import BucketDefinition, SyncRules
from pipeline.rules.model import (
    BucketDescription,
    LookupEntry,
    LookupReader,
    LookupResults,
    RowOutput,
)
from pipeline.rules.parse import load_rules, load_sync_rules, parse_rules
from pipeline.rules.values import SqliteValue

__all__ = [
    "BucketDefinition",
    "BucketDescription",
    "LookupEntry",
    "LookupReader",
    "LookupResults",
    "RequestEvaluationError",
    "RowEvaluationError",
    "RowOutput",
    "RulesError",
    "RulesEvaluationError",
    "SqliteValue",
    "SyncRules",
    "bucket_id",
    "load_rules",
    "load_sync_rules",
    "lookup_key",
    "parse_rules",
    "serialize_value",
    "serialize_values",
]
