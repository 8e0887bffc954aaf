"""Loading the sync rules YAML (PowerSync ``bucket_definitions``, legacy edition 1)."""

from __future__ import annotations

import hashlib
from os import PathLike
from pathlib import Path
from typing import Any, Final

import yaml

from pipeline.rules.errors import RulesError
from pipeline.rules.evaluate import BucketDefinition, SyncRules
from pipeline.rules.queries import (
    DataQuery,
    ParameterQuery,
    Projection,
    QueryContext,
    compile_data_query,
    compile_parameter_query,
)

TOP_LEVEL_KEYS: Final = ("bucket_definitions", "streams", "with", "config", "event_definitions")
DEFINITION_KEYS: Final = ("parameters", "data", "priority", "accept_potentially_dangerous_queries")
# config keys of the service that need no behaviour here (documented in sync-protocol.md §8.1)
KNOWN_CONFIG_KEYS: Final = (
    "edition",
    "storage_version",
    "timestamps_iso8601",
    "versioned_bucket_ids",
    "fixed_json_extract",
    "custom_postgres_types",
)
STREAMS_UNSUPPORTED: Final = "sync streams need config.edition: 3"
#: versioned bucket ids of streams: ``<version>#<stream>|<variant>[...]`` (sync-streams.md §1a);
#: fixed, as this service serves one rules version per store
STREAMS_BUCKET_VERSION: Final = 1


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (YAML would keep the last silently)."""


def _construct_mapping(
    loader: _Loader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # unhashable: construct_mapping reports it
        if duplicate:
            mark = key_node.start_mark
            raise RulesError(
                f"duplicate key {key!r} at line {mark.line + 1}, column {mark.column + 1}"
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_rules(path: str | PathLike[str]) -> SyncRules:
    """Read and compile a sync rules file; raises :class:`RulesError` if it is invalid."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise RulesError(f"sync rules: cannot read {p}: {e.strerror or e}", source=str(p)) from None
    except UnicodeDecodeError as e:
        raise RulesError(f"sync rules: {p} is not valid UTF-8: {e}", source=str(p)) from None
    return parse_rules(text, source=str(p))


def load_sync_rules(settings: Any) -> SyncRules:
    """The rules a configuration names (config key ``sync_rules``, a path relative to the
    config file): what the processor and the gateway both load at start."""
    path = Path(settings.sync_rules_path)
    if not path.exists():
        raise RulesError(
            f"sync rules file {path} not found (config key sync_rules)", source=str(path)
        )
    return load_rules(path)


def parse_rules(text: str, source: str = "<rules>") -> SyncRules:
    """Compile sync rules from YAML text; raises :class:`RulesError` if they are invalid."""
    prefix = "sync rules: " if source == "<rules>" else f"sync rules: {source}: "

    def fail(message: str, definition: str | None = None) -> RulesError:
        return RulesError(prefix + message, source=source, definition=definition)

    try:
        doc = yaml.load(text, Loader=_Loader)
    except RulesError as e:
        raise fail(str(e)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise fail(f"invalid YAML{where}: {problem}") from None

    if doc is None:
        raise fail("the file is empty; expected bucket_definitions")
    if not isinstance(doc, dict):
        raise fail(
            f"expected a mapping with bucket_definitions at the top level, got {type(doc).__name__}"
        )
    warnings: list[str] = []
    for key in doc:
        if key not in TOP_LEVEL_KEYS:
            raise fail(f"unknown top-level key {key!r} (allowed: {', '.join(TOP_LEVEL_KEYS)})")

    config = doc.get("config")
    if config is not None:
        if not isinstance(config, dict):
            raise fail("config must be a mapping")
        edition = config.get("edition", 1)
        if type(edition) is not int:
            raise fail(f"config.edition must be an integer, got {edition!r}")
        if edition not in (1, 2, 3):
            raise fail(f"config.edition must be 1, 2 or 3, got {edition}")
        if edition == 1 and config.get("versioned_bucket_ids") is True:
            raise fail("config.versioned_bucket_ids is not supported yet")
        for key in config:
            if key not in KNOWN_CONFIG_KEYS:
                warnings.append(f"{prefix}config.{key} is not known and is ignored")
    edition = config.get("edition", 1) if isinstance(config, dict) else 1
    if edition >= 2:
        return _parse_streams(doc, text, source, prefix, warnings, edition, fail)

    if doc.get("streams"):
        raise fail(
            f"{STREAMS_UNSUPPORTED} (add config: {{edition: 3}}), or define buckets under "
            "bucket_definitions"
        )
    if doc.get("with"):
        raise fail(f"{STREAMS_UNSUPPORTED}: 'with' only applies to streams")
    if doc.get("event_definitions"):
        warnings.append(f"{prefix}event_definitions are not supported and are ignored")

    definitions_doc = doc.get("bucket_definitions")
    if definitions_doc is None:
        raise fail("missing bucket_definitions")
    if not isinstance(definitions_doc, dict):
        raise fail("bucket_definitions must be a mapping of definition names to definitions")
    if not definitions_doc:
        warnings.append(f"{prefix}bucket_definitions is empty; no client will receive any data")

    projections: dict[tuple[Any, ...], Projection] = {}
    definitions: list[BucketDefinition] = []
    for name, body in definitions_doc.items():
        definitions.append(_definition(name, body, source, prefix, projections, warnings))
    content_hash = hashlib.sha256(text.encode()).hexdigest()
    return SyncRules(definitions, warnings=warnings, source=source, content_hash=content_hash)


def _parse_streams(
    doc: dict[str, Any],
    text: str,
    source: str,
    prefix: str,
    warnings: list[str],
    edition: int,
    fail: Any,
) -> SyncRules:
    """Edition 2/3: ``streams`` (and global ``with``), compiled by :mod:`pipeline.rules.streams`."""
    from pipeline.rules.streams import compile_streams

    if "bucket_definitions" in doc:
        raise fail(
            f"config.edition {edition} uses streams; bucket_definitions are not allowed "
            "(use edition 1 for bucket_definitions)"
        )
    if doc.get("event_definitions"):
        warnings.append(f"{prefix}event_definitions are not supported and are ignored")
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError:
        root = None
    streams = compile_streams(
        doc, root, source=source, prefix=prefix, version=STREAMS_BUCKET_VERSION, warnings=warnings
    )
    content_hash = hashlib.sha256(text.encode()).hexdigest()
    return SyncRules(
        (),
        warnings=warnings,
        source=source,
        content_hash=content_hash,
        streams=streams,
        edition=edition,
    )


def _queries(value: Any, what: str, name: str, fail_prefix: str, *, required: bool) -> list[str]:
    def fail(message: str) -> RulesError:
        return RulesError(f"{fail_prefix}definition '{name}': {message}", definition=name)

    if value is None:
        if required:
            raise fail(f"'{what}' is required (a list of SELECT queries)")
        return []
    items = [value] if isinstance(value, str) and what == "parameters" else value
    if not isinstance(items, list):
        raise fail(
            f"'{what}' must be a list of SELECT queries"
            + (" or a single query" if what == "parameters" else "")
        )
    out: list[str] = []
    for i, item in enumerate(items, 1):
        if not isinstance(item, str) or not item.strip():
            raise fail(f"'{what}' entry {i} must be an SQL query string, got {item!r}")
        out.append(item.strip())
    return out


def _definition(
    name: Any,
    body: Any,
    source: str,
    prefix: str,
    projections: dict[tuple[Any, ...], Projection],
    warnings: list[str],
) -> BucketDefinition:
    if not isinstance(name, str) or not name:
        raise RulesError(f"{prefix}definition names must be non-empty strings, got {name!r}")
    if any(c in name for c in '[]"\x1f') or any(ord(c) < 32 for c in name):
        raise RulesError(
            f"{prefix}definition '{name}': the name must not contain brackets, quotes or control characters",
            definition=name,
        )

    def fail(message: str) -> RulesError:
        return RulesError(f"{prefix}definition '{name}': {message}", source=source, definition=name)

    if not isinstance(body, dict):
        raise fail("expected a mapping with 'data' (and optionally 'parameters', 'priority')")
    for key in body:
        if key not in DEFINITION_KEYS:
            raise fail(f"unknown key {key!r} (allowed: {', '.join(DEFINITION_KEYS)})")
    priority = body.get("priority", 3)
    if type(priority) is not int or not 0 <= priority <= 3:
        raise fail(f"priority must be an integer from 0 to 3, got {priority!r}")
    accept = body.get("accept_potentially_dangerous_queries", False)
    if type(accept) is not bool:
        raise fail(f"accept_potentially_dangerous_queries must be true or false, got {accept!r}")

    param_sql = _queries(body.get("parameters"), "parameters", name, prefix, required=False)
    data_sql = _queries(body.get("data"), "data", name, prefix, required=True)
    if not data_sql:
        warnings.append(f"{prefix}definition '{name}': no data queries; its buckets stay empty")

    parameter_queries: list[ParameterQuery] = []
    names: tuple[str, ...] = ()
    query_priority: int | None = None
    for i, sql in enumerate(param_sql, 1):
        ctx = QueryContext(source, name, "parameter", i, sql)
        q = compile_parameter_query(ctx, warnings)
        if q.priority is not None:
            if "priority" in body or (query_priority is not None and q.priority != query_priority):
                raise ctx.error("cannot set the priority more than once", 0)
            query_priority = q.priority
        if i == 1:
            names = q.output_names
        elif set(q.output_names) != set(names) or len(q.output_names) != len(names):
            raise ctx.error(
                f"outputs ({', '.join(q.output_names)}) differ from parameter query 1 "
                f"({', '.join(names)}); all parameter queries of a definition must select the same names",
                0,
            )
        q.reorder(names)
        if q.uses_client and not accept:
            warnings.append(
                ctx.warning(
                    "uses client parameters (request.parameters() / user_parameters) to select "
                    "buckets; clients can send any value, so do not rely on them for authorization. "
                    "Set accept_potentially_dangerous_queries: true on the definition to accept this",
                    None,
                )
            )
        parameter_queries.append(q)

    data_queries: list[DataQuery] = []
    for i, sql in enumerate(data_sql, 1):
        ctx = QueryContext(source, name, "data", i, sql)
        data_queries.append(compile_data_query(ctx, names, projections, warnings))

    return BucketDefinition(
        name=name,
        priority=priority if query_priority is None else query_priority,
        parameter_names=names,
        parameter_queries=tuple(parameter_queries),
        data_queries=tuple(data_queries),
        accept_potentially_dangerous_queries=accept,
    )
