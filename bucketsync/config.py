"""Typed settings: one YAML file plus ``BUCKETSYNC_`` environment overrides.

Every public config key lives here and nowhere else. Unknown keys are refused
with a message naming them, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEFAULT_CONFIG_PATH = "bucketsync.yaml"
ENV_PREFIX = "BUCKETSYNC_"


class ConfigError(Exception):
    """A configuration problem, phrased for the person who has to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class KafkaSettings(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    topics: list[str] = Field(default_factory=list)
    topic_pattern: str | None = None
    group_id: str = "bucketsync"
    dead_letter_topic: str = "bucketsync.dead-letter"
    #: Records whose key + value exceed this are dead-lettered before decoding.
    max_record_bytes: int = Field(default=1_048_576, gt=0)
    #: Confluent schema registry for Avro topics (optional).
    schema_registry_url: str | None = None
    #: Local folder of ``<id>.avsc`` writer schemas (alternative to a registry).
    avro_schemas_dir: str | None = None
    #: ``event``: every batch is a checkpoint; ``transaction``: checkpoints never
    #: expose part of a source transaction (needs Debezium transaction metadata).
    consistency: Literal["event", "transaction"] = "event"
    #: Types for schemaless JSON (``schemas.enable=false``, cdc-events.md §2.3): table id
    #: (``<topic.prefix>.<schema or database>.<table>``) -> column -> semantic type or Connect
    #: type, with parameters after ``;``: ``io.debezium.time.Date``,
    #: ``org.apache.kafka.connect.data.Decimal;scale=2``. A hinted column is converted as if
    #: the schema had named that type; unhinted values map JSON-natively.
    type_hints: dict[str, dict[str, str]] = Field(default_factory=dict)
    #: Connector kind per ``topic.prefix`` (``postgresql``, ``mysql``, ``mariadb``,
    #: ``mongodb``): records without a ``source`` block (tombstones, flattened records)
    #: of a MongoDB connector then get their ``_id`` from the key even when it is an
    #: integer, and the topic named exactly like a prefix is its schema-change topic.
    connector_kinds: dict[
        str,
        Literal[
            "postgresql", "mysql", "mariadb", "mongodb", "sqlserver", "oracle", "db2",
            "informix", "vitess", "spanner", "jdbc",
        ],
    ] = Field(default_factory=dict)  # fmt: skip

    @field_validator("topic_pattern")
    @classmethod
    def _pattern_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from exc
        return v

    @model_validator(mode="after")
    def _topics_or_pattern(self) -> KafkaSettings:
        if self.topics and self.topic_pattern:
            raise ValueError("set either kafka.topics or kafka.topic_pattern, not both")
        if self.schema_registry_url and self.avro_schemas_dir:
            raise ValueError(
                "set either kafka.schema_registry_url or kafka.avro_schemas_dir, not both"
            )
        return self


class RedisSettings(_Section):
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "bs"
    #: Length the change-notification stream is trimmed to (approximate).
    changes_maxlen: int = Field(default=10_000, gt=0)
    #: Read-only replicas of ``url`` the gateway reads from (checkpoints, bucket states,
    #: op pages, the change stream); writes (write checkpoints) still go to ``url``. Each
    #: gateway process reads from one of them (by process id) and only from it, so
    #: everything it serves is at one batch boundary of that replica. Empty: read ``url``.
    replica_urls: list[str] = Field(default_factory=list)
    #: Seconds a new stream waits for a lagging replica to reach the client's positions
    #: (its ``after`` op ids) before its first checkpoint (then it proceeds anyway).
    replica_wait_s: float = Field(default=5.0, ge=0)
    #: Seconds between the gateway's checks of its replica. While the replica does not
    #: answer (or has lost its primary) the gateway reads from ``url``, and goes back once
    #: the replica has caught up with it. 0: no checks (reads stay on the replica).
    replica_check_s: float = Field(default=1.0, ge=0)

    @field_validator("replica_urls", mode="before")
    @classmethod
    def _replica_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [u for u in (x.strip() for x in v.split(",")) if u]
        return v

    @field_validator("url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        return _check_redis_url(v)

    @field_validator("replica_urls")
    @classmethod
    def _replica_urls(cls, v: list[str]) -> list[str]:
        return [_check_redis_url(u) for u in v]


def _check_redis_url(url: str) -> str:
    """redis-py accepts only these schemes, and says so only at the first command."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"{url!r} is not a Redis URL (redis://, rediss:// or unix://)")
    return url


class AuthSettings(_Section):
    audience: list[str] = Field(default_factory=lambda: ["bucketsync"])
    hs256_secret: str | None = "change-me"
    jwks_file: str | None = None
    jwks_url: str | None = None
    #: Longest accepted ``exp - iat`` in seconds (PSYNC_S2104 beyond it).
    max_lifetime_s: int = Field(default=86_400, gt=0)
    #: Clock tolerance for ``exp``/``iat`` checks, in seconds.
    leeway_s: int = Field(default=60, ge=0)
    #: Verified tokens remembered (token text -> key and claims; least recently used out):
    #: a token seen again skips decoding and the signature check, its claims are checked
    #: again each time and an entry whose key left the key set is not used. 0: none.
    token_cache_entries: int = Field(default=20_000, ge=0, le=1_000_000)

    @field_validator("audience", mode="before")
    @classmethod
    def _audience_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class GatewaySettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    #: Interval between ``token_expires_in`` keepalive lines, seconds.
    keepalive_s: float = Field(default=20.0, gt=0)
    #: At most this many ops per ``data`` line.
    max_ops_per_line: int = Field(default=1000, gt=0)
    #: A ``data`` line is closed once its payload reaches this many bytes.
    max_line_bytes: int = Field(default=1_048_576, gt=0)
    #: Most buckets one connection may hold (PSYNC_S2305 beyond it).
    max_buckets_per_connection: int = Field(default=1000, gt=0)
    #: Most lookup rows (parameter query results over synced tables) one connection's
    #: bucket set may be expanded from (PSYNC_S2305 beyond it).
    max_parameter_query_results: int = Field(default=1000, gt=0)
    #: Streams starting within this many milliseconds share one atomic read of the
    #: checkpoint, their bucket states and write checkpoints (one round trip for a
    #: reconnect storm instead of two per stream). 0: those of one event-loop turn.
    start_read_window_ms: float = Field(default=1.0, ge=0, le=100)
    #: Most streams in one shared first read (a full batch is read at once); 1: every
    #: stream reads alone.
    start_read_max_batch: int = Field(default=256, ge=1, le=10_000)
    #: Bytes a connection may have queued but unsent before it is dropped.
    max_buffered_bytes: int = Field(default=4 * 1_048_576, gt=0)
    #: Seconds a write may stay blocked on a slow client before it is dropped.
    slow_client_timeout_s: float = Field(default=30.0, gt=0)
    #: Seconds a stream may hold unsent bytes (in the gateway or its socket's send queue)
    #: without the client reading any of them before it is dropped, whatever the amount.
    stall_timeout_s: float = Field(default=60.0, gt=0)
    #: Most concurrent sync streams per user (``sub``) in one gateway process; past it new
    #: streams get 429 ``PSYNC_S2304``. ``null`` disables the cap.
    max_connections_per_user: int | None = Field(default=10, gt=0)
    #: Seconds a connection may take from its first byte to the end of a request's headers.
    header_timeout_s: float = Field(default=10.0, gt=0)
    #: Seconds a request body may take to arrive once its headers are in (408 beyond it).
    body_timeout_s: float = Field(default=10.0, gt=0)
    #: Seconds an open connection may stay without a request (fresh or between keep-alive
    #: requests) before it is closed.
    idle_timeout_s: float = Field(default=30.0, gt=0)
    #: Client-controlled values (client_id, the ``after`` map, user agent, ...) are cut to
    #: this many characters in log lines.
    log_field_max_chars: int = Field(default=200, ge=16)
    #: "stream opened" lines per second per process; the streams beyond it are counted and
    #: said in one line per second (a reconnect storm logs a few dozen lines, not one per
    #: stream). 0: only those summary lines; ``null``: every stream. (aiohttp's access log
    #: leaves out started streams: their "stream opened" line says more.)
    stream_log_per_s: int | None = Field(default=20, ge=0)
    #: Write checkpoints read the CDC topics' end offsets from Kafka through a lazily made
    #: consumer; after a failure Kafka is not asked again for this long, doubling per
    #: failure up to ``kafka_backoff_max_s`` (write checkpoints answer 503 meanwhile).
    kafka_backoff_initial_s: float = Field(default=1.0, gt=0)
    kafka_backoff_max_s: float = Field(default=30.0, gt=0)
    #: Bytes of encoded op pages the per-process page cache may hold.
    page_cache_max_bytes: int = Field(default=64 * 1_048_576, gt=0)
    #: Sync stream response compression. ``gzip``: when the request's ``Accept-Encoding``
    #: allows it (the official Node/JS clients send ``gzip, deflate``), the body is gzip:
    #: deflated at ``compression_level`` up to the first ``checkpoint_complete`` (the
    #: initial sync), stored (uncompressed) gzip blocks after it, so an idle stream keeps
    #: no compressor (8 bytes instead of ~300 KB). ``off``: never compressed.
    compression: Literal["off", "gzip"] = "off"
    #: zlib level of the initial sync's deflate (1: fastest).
    compression_level: int = Field(default=1, ge=1, le=9)
    #: What a write checkpoint is bound to. ``kafka``: the CDC topics' end offsets at request
    #: time (no database access; a write Debezium has not published yet is not covered, so a
    #: client's own row can vanish for a moment). ``source``: the source PostgreSQL's
    #: ``pg_current_wal_lsn()`` through ``source_dsn``, acknowledged once the processor has
    #: applied events of ``source_connector`` at or past it (exact; see README).
    write_checkpoint_mode: Literal["kafka", "source"] = "kafka"
    #: ``source`` mode: libpq connection string of the source database; the gateway only runs
    #: ``SELECT pg_current_wal_lsn()`` on it (its session is read-only): use a role without
    #: write rights, e.g. ``postgresql://reader:secret@db:5432/app``.
    source_dsn: str | None = None
    #: ``source`` mode: the Debezium connector's ``topic.prefix`` (``source.name`` of its
    #: events) whose applied LSN acknowledges write checkpoints.
    source_connector: str = "app"
    #: ``source`` mode: seconds to connect to / query the source database (503 beyond).
    source_timeout_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _source_mode_needs_dsn(self) -> GatewaySettings:
        if self.write_checkpoint_mode == "source" and not self.source_dsn:
            raise ValueError("gateway.write_checkpoint_mode 'source' needs gateway.source_dsn")
        return self


class ProcessorSettings(_Section):
    #: Most events applied in one atomic Redis step.
    batch_max_events: int = Field(default=2000, gt=0)
    #: Longest wait to fill a batch, milliseconds; 0: no waiting, a batch is what has arrived.
    batch_max_wait_ms: int = Field(default=50, ge=0)
    #: ``kafka`` (a plain confluent-kafka loop, the default) or ``faust`` (faust-streaming;
    #: it drops buffered records around rebalances, which the offset gap guard re-reads).
    driver: Literal["faust", "kafka"] = "kafka"
    #: Static group membership (``group.instance.id``), so a restarted processor takes its
    #: partitions back at once instead of after the session timeout. ``auto``: a stable id
    #: per host and slot (the first free slot lock in the state dir); empty: dynamic
    #: membership; anything else: used as given (must be unique within the group).
    instance_id: str = "auto"
    #: Consumer group session timeout: how long until another processor takes over the
    #: partitions of one that died. The broker's group.min/max.session.timeout.ms bound it
    #: (6,000-1,800,000 by default); a processor refuses a value outside them at start.
    session_timeout_ms: int = Field(default=9000, ge=1000, le=3_600_000)
    #: Heartbeat interval of the group membership (a third of the session timeout or less).
    heartbeat_interval_ms: int = Field(default=2000, ge=100, le=3_600_000)
    #: Rows whose row index entries the processor keeps in memory (its partitions' rows;
    #: a row it has not kept is read from Redis once per batch). About 300 bytes a row;
    #: 0 keeps none.
    row_cache_rows: int = Field(default=200_000, ge=0)
    #: Faust driver only: records buffered per stream (faust's stream_buffer_maxsize).
    stream_buffer_maxsize: int = Field(default=4096, gt=0)
    #: Seconds to wait for a record the gap guard asked to read again before asking again.
    gap_reread_retry_s: float = Field(default=5.0, gt=0)
    #: kafka.consistency=event: seconds the create half of a primary-key change that
    #: carries TOAST placeholders waits for the old key's delete half (on another
    #: partition, maybe not applied yet): only it gives the old row as it was. Its partition
    #: waits meanwhile; after this the row is applied with the old row as known (or NULL in
    #: those columns). 0: never wait.
    pk_change_wait_s: float = Field(default=60.0, ge=0)
    #: With kafka.consistency=transaction: most events held for open transactions;
    #: beyond it they are applied at once (a checkpoint may then expose part of one).
    max_staged_events: int = Field(default=100_000, gt=0)
    #: Seconds an incomplete transaction is held before its events are applied anyway.
    transaction_grace_s: float = Field(default=60.0, gt=0)
    #: Prometheus endpoint of the processor on 127.0.0.1; 0 or null disables it.
    metrics_port: int | None = Field(default=9108, ge=0, le=65535)
    #: Which rows keep a copy of their source row in the store (for merging TOAST
    #: placeholders, MongoDB partial updates and primary-key changes of such rows):
    #: ``all`` (the default): every row, so no placeholder ever meets a row without its
    #: copy; ``auto``: rows of at least 600 bytes of JSON (smaller PostgreSQL rows hold no
    #: TOASTed value, see pipeline.core.TOAST_SAFE_BYTES), rows of the tables in
    #: ``merge_tables`` and of tables whose events showed they need merges (a TOAST
    #: placeholder, any MongoDB event; remembered in the store) -- less Redis memory; for
    #: MongoDB sources that start mid-stream, list the collections in ``merge_tables``.
    source_rows: Literal["auto", "all"] = "all"
    #: Tables (topics, e.g. ``app.public.docs``) whose rows always keep their source row.
    merge_tables: list[str] = Field(default_factory=list)


class CompactionSettings(_Section):
    #: Seconds between scheduled compaction runs inside processor/run; 0 disables.
    interval_s: float = Field(default=300.0, ge=0)
    #: Ops folded per Redis step (bounds how long one step blocks Redis).
    chunk_ops: int = Field(default=200, gt=0)
    #: Opt-in defragmentation: re-append live rows when at least this fraction of a
    #: bucket's ops are MOVEs stuck behind them. ``null`` disables it.
    defragment_threshold: float | None = Field(default=None, gt=0, le=1)
    #: Automatic re-append: the scheduled compaction re-appends the live rows that block a
    #: long foldable run when each row moved lets at least this many more ops fold (existing
    #: clients re-download only the moved rows); 0 disables it.
    reappend_budget: float = Field(default=4.0, ge=0)
    #: ... and, for a bucket holding more than this many ops per live row, the fewest live
    #: rows (those at the head) that bring it back to this; 0 disables it.
    reappend_target: float = Field(default=1.15, ge=0)


class StackSettings(_Section):
    state_dir: str = ".stack"
    kafka_port: int = Field(default=9092, ge=1, le=65535)
    kafka_controller_port: int = Field(default=9093, ge=1, le=65535)
    kafka_version: str = "4.1.1"
    kafka_heap: str = "512m"
    redis_port: int = Field(default=6379, ge=1, le=65535)
    redis_appendfsync: Literal["always", "everysec", "no"] = "everysec"
    #: Port of a read-only Redis replica of ``redis_port`` that ``stack up`` starts too
    #: (point ``redis.replica_urls`` at it); 0: no replica.
    redis_replica_port: int = Field(default=0, ge=0, le=65535)
    postgres_port: int = Field(default=5432, ge=1, le=65535)
    connect_port: int = Field(default=8083, ge=1, le=65535)
    start_timeout_s: float = Field(default=90.0, gt=0)


class DemoSettings(_Section):
    #: Port of the demo's web page and its backend (``bucketsync demo``), on ``gateway.host``;
    #: 0 turns the page off.
    web_port: int = Field(default=8090, ge=0, le=65535)
    #: Sync rules the demo runs with (relative to the config file): lists shared through
    #: memberships. ``null``: the top-level ``sync_rules``.
    sync_rules: str | None = "sync-rules.demo.yaml"


class _YamlSource(PydanticBaseSettingsSource):
    """Feeds the YAML file's mapping to pydantic-settings (lowest precedence after env)."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def _env_key(name: str) -> tuple[str, ...] | None:
    """``BUCKETSYNC_SECTION__KEY`` -> ``("section", "key")`` (``None``: not a settings variable)."""
    if not name.upper().startswith(ENV_PREFIX) or name.upper().startswith(ENV_PREFIX + "TEST_"):
        return None
    return tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))


def _is_list(annotation: Any) -> bool:
    return get_origin(annotation) is list or any(
        get_origin(a) is list for a in get_args(annotation)
    )


def _accepts_none(annotation: Any) -> bool:
    return annotation is None or type(None) in get_args(annotation)


def _env_value(name: str, raw: str, annotation: Any) -> Any:
    """The text of one environment variable as the value of a field of ``annotation``:
    ``null`` is None where the key allows it; a list key takes JSON (``["a","b"]``) or
    comma-separated names (``a,b``); anything else is left to the field's validation."""
    text = raw.strip()
    if text == "null" and _accepts_none(annotation):
        return None
    if _is_list(annotation):
        if text.startswith("["):
            try:
                return json.loads(text)
            except ValueError as exc:
                raise ConfigError(
                    f"environment variable {name}: not a JSON list ({exc}); "
                    'give ["a","b"] or comma-separated values a,b'
                ) from None
        return [part.strip() for part in text.split(",") if part.strip()]
    return raw


class _EnvSource(PydanticBaseSettingsSource):
    """``BUCKETSYNC_<SECTION>__<KEY>`` overrides (above the YAML file), decoded per field
    (:func:`_env_value`); remembers which key came from which variable for error messages."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        self.origin: dict[tuple[str, ...], str] = {}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        fields = self.settings_cls.model_fields
        for name, raw in sorted(os.environ.items()):
            key = _env_key(name)
            if key is None or key[0] not in fields or key[0] == "config_dir":
                continue
            top = fields[key[0]]
            section = top.annotation
            if len(key) == 1:
                out[key[0]] = _env_value(name, raw, top.annotation)
            elif len(key) == 2 and isinstance(section, type) and issubclass(section, BaseModel):
                sub = section.model_fields.get(key[1])
                value = _env_value(name, raw, sub.annotation) if sub is not None else raw
                out.setdefault(key[0], {})[key[1]] = value
            else:
                raise ConfigError(f"unknown config key in environment variable {name}")
            self.origin[key] = name
        _env_origin.clear()
        _env_origin.update(self.origin)
        return out


_yaml_data: dict[str, Any] = {}
_env_origin: dict[tuple[str, ...], str] = {}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    sync_rules: str = "sync-rules.yaml"
    auth: AuthSettings = Field(default_factory=AuthSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    processor: ProcessorSettings = Field(default_factory=ProcessorSettings)
    compaction: CompactionSettings = Field(default_factory=CompactionSettings)
    stack: StackSettings = Field(default_factory=StackSettings)
    demo: DemoSettings = Field(default_factory=DemoSettings)

    #: Directory of the config file; relative paths in the config resolve against it.
    config_dir: Path = Field(default_factory=Path.cwd, exclude=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _EnvSource(settings_cls), _YamlSource(settings_cls, _yaml_data))

    def resolve_path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.config_dir / p)

    @property
    def sync_rules_path(self) -> Path:
        return self.resolve_path(self.sync_rules)

    @property
    def state_dir(self) -> Path:
        return self.resolve_path(self.stack.state_dir)


def _did_you_mean(loc: tuple[str, ...]) -> str:
    """`` (did you mean 'processor.batch_max_events'?)`` for a misspelt key, else ``""``."""
    import difflib

    if len(loc) == 1:
        known = [k for k in Settings.model_fields if k != "config_dir"]
    elif len(loc) == 2 and loc[0] in Settings.model_fields:
        section = Settings.model_fields[loc[0]].annotation
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            return ""
        known = list(section.model_fields)
    else:
        return ""
    close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.75)
    return f" (did you mean '{'.'.join((*loc[:-1], close[0]))}'?)" if close else ""


def _describe(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        var = _env_origin.get(tuple(str(p) for p in e["loc"][:2]))
        where = f"environment variable {var}" if var else source
        if e["type"] == "extra_forbidden":
            hint = _did_you_mean(tuple(str(p) for p in e["loc"]))
            lines.append(f"unknown config key '{loc}' in {where}{hint}")
        else:
            lines.append(f"invalid config key '{loc}' in {where}: {e['msg']}")
    return "; ".join(lines)


def load_settings(
    path: str | os.PathLike[str] | None = None, *, required: bool = False
) -> Settings:
    """Read the YAML file at ``path`` (default ``./bucketsync.yaml``) plus env overrides.

    A missing default file is fine (defaults apply); a missing explicit file is an error.
    """
    global _yaml_data
    explicit = path is not None
    cfg_path = Path(path if path is not None else DEFAULT_CONFIG_PATH)
    data: dict[str, Any] = {}
    if cfg_path.exists():
        try:
            text = cfg_path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"config file {cfg_path} is not UTF-8 text (byte {exc.start})"
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"config file {cfg_path} cannot be read: {exc.strerror or exc}"
            ) from None
        try:
            loaded = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"config file {cfg_path} is not valid YAML: {_yaml_problem(exc)}"
            ) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {cfg_path} must hold a mapping at the top level")
        data = loaded
    elif explicit or required:
        raise ConfigError(
            f"config file {cfg_path} not found; pass --config PATH or copy bucketsync.example.yaml"
        )
    if "config_dir" in data:
        raise ConfigError(f"unknown config key 'config_dir' in {cfg_path}")
    unknown_env = _unknown_env_keys()
    if unknown_env:
        top = unknown_env[0][len(ENV_PREFIX) :].split("__", 1)[0].lower()
        hint = _did_you_mean((top,))
        raise ConfigError(
            f"unknown config key in environment variable {unknown_env[0]}{hint} "
            f"(known sections: {', '.join(sorted(set(Settings.model_fields) - {'config_dir'}))})"
        )
    _yaml_data = data
    try:
        return Settings(config_dir=cfg_path.resolve().parent)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, str(cfg_path))) from None
    finally:
        _yaml_data = {}


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the
    last silently: a second ``processor:`` block would drop every key of the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            if (key_node.tag, key_node.value) in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key_node.value!r} appears twice", key_node.start_mark
                )
            seen.add((key_node.tag, key_node.value))
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error (PyYAML's own text spans several, with a caret drawing)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(exc).split())


def _unknown_env_keys() -> list[str]:
    known = set(Settings.model_fields) - {"config_dir"}
    bad = []
    for name in os.environ:
        if not name.startswith(ENV_PREFIX) or name.startswith(ENV_PREFIX + "TEST_"):
            continue  # BUCKETSYNC_TEST_* steer the test suite, not the settings
        top = name[len(ENV_PREFIX) :].split("__", 1)[0].lower()
        if top not in known:
            bad.append(name)
    return bad


def config_json_schema() -> dict[str, Any]:
    """JSON schema of ``bucketsync.yaml`` (schemas/config.schema.json is generated from it:
    ``python3 -m bucketsync.config > schemas/config.schema.json``)."""
    schema = Settings.model_json_schema()
    schema["properties"].pop("config_dir", None)  # where the file was found, not a key
    return schema


if __name__ == "__main__":
    import json

    print(json.dumps(config_json_schema(), indent=2))
