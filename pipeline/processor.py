"""The stream processor: CDC topics in, one atomic Redis step per batch out.

Two drivers run the same :class:`BatchApplier`:

- ``faust`` (the design's choice): a faust-streaming agent, concurrency 1, batches
  through ``stream.take_events``. Faust's own exactly-once mode is not used.
- ``kafka``: a plain confluent-kafka consumer loop (seeks each assigned partition
  to the offset after the last applied one, so a restart reads nothing twice).

Exactly-once effect comes from the store: applied offsets are recorded inside the
same atomic step as the ops, and anything at or below them is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Container, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from prometheus_client import Counter, Gauge, Histogram, start_http_server
from redis import exceptions as redis_exceptions

from bucketsync.config import ConfigError, Settings
from bucketsync.errors import UserError
from pipeline import compaction, core
from pipeline.cdc import (
    DecodedEvent,
    HttpSchemaRegistry,
    KafkaRecord,
    LocalSchemaDir,
    RegistryUnavailable,
    SchemaResolver,
    decode_record,
)
from pipeline.gaps import Admission, OffsetGapGuard
from pipeline.membership import Membership, claim
from pipeline.rules import SyncRules, load_sync_rules
from pipeline.store import ActiveLease, Store, StoreLayoutMismatch, check_layout
from pipeline.transactions import TransactionStager

log = logging.getLogger("bucketsync.processor")

EVENTS = Counter("bucketsync_processor_events_total", "CDC records consumed", ["topic"])
OPS = Counter("bucketsync_processor_ops_total", "Bucket ops written")
DEAD = Counter(
    "bucketsync_processor_dead_letters_total", "Records dead-lettered", ["topic", "reason"]
)
BATCH = Histogram(
    "bucketsync_processor_batch_events",
    "Events per applied batch",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
)
APPLY_SECONDS = Histogram("bucketsync_processor_apply_seconds", "Time of one atomic Redis step")
LAG = Gauge("bucketsync_processor_lag", "High watermark minus next offset", ["tp"])
OPS_RATE = Gauge("bucketsync_processor_ops_per_second", "Ops written per second (last batch)")
STAGED = Gauge("bucketsync_processor_staged_events", "Events held for incomplete transactions")
DUPLICATES = Counter(
    "bucketsync_processor_skipped_total", "Records at or below the applied offset (replays)"
)

GAPS = Counter(
    "bucketsync_processor_offset_gaps_total",
    "Offset gaps in a partition's delivery, by how they were resolved: real (no record "
    "there: control records, compaction) or reread (the consumer dropped records)",
    ["resolution"],
)
DISCARDED = Counter(
    "bucketsync_processor_gap_discarded_total",
    "Records delivered beyond a missing one, discarded until it is read again",
)

STORE_OUTAGES = Counter(
    "bucketsync_processor_store_outages_total",
    "Times the store (Redis) was unreachable in the middle of a batch",
)
#: the store is down or still loading its data set: wait and read again, never crash
STORE_ERRORS = (redis_exceptions.ConnectionError, redis_exceptions.TimeoutError)

MERGES_WITHOUT_BASE = Counter(
    "bucketsync_processor_merges_without_base_total",
    "Upserts with TOAST placeholders / partial updates whose stored source row was "
    "missing (evaluated on the columns the event carries)",
)

PK_CHANGE_WAITS = Counter(
    "bucketsync_processor_pk_change_waits_total",
    "Partitions held because the create half of a primary-key change waited for its old "
    "key's delete half (TOAST placeholders), by outcome",
    ["outcome"],
)

PIPELINE_VERSION = "bucketsync-0.1.0"

#: the driver's seek: {(topic, partition): offset} -> None
Seeker = Callable[[dict[tuple[str, int], int]], Awaitable[None]]


class _RdkafkaForward(logging.Handler):
    """librdkafka's own log lines (it prints them to stderr by default: a connection refused
    line per client and attempt, ~20 a second with a wrong ``kafka.bootstrap_servers``),
    forwarded to the processor's log at most once per facility every ``interval_s``, naming
    the setting, at WARNING at most (the broker being away is waited out, not an error)."""

    def __init__(self, servers: str, interval_s: float = 30.0) -> None:
        super().__init__()
        self.servers = servers
        self.interval_s = interval_s
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:
            return
        facility = msg.split(" ", 1)[0]
        now = time.monotonic()
        with self._lock:
            if now < self._next.get(facility, 0.0):
                self._held[facility] = self._held.get(facility, 0) + 1
                return
            self._next[facility] = now + self.interval_s
            held = self._held.pop(facility, 0)
        more = f"; {held} more like it in the last {self.interval_s:.0f}s" if held else ""
        log.log(
            min(record.levelno, logging.WARNING),
            "librdkafka: %s (kafka.bootstrap_servers %s%s)",
            msg[:300],
            self.servers,
            more,
        )


def rdkafka_logger(settings: Settings, client: str) -> logging.Logger:
    """The ``logger`` of a librdkafka client of the processor (see :class:`_RdkafkaForward`);
    a private logger outside the logging tree, one per client."""
    lg = logging.Logger(f"bucketsync.processor.rdkafka.{client}", logging.INFO)
    lg.addHandler(_RdkafkaForward(settings.kafka.bootstrap_servers))
    return lg


class PartitionProbe:
    """Reads a partition at an offset with a consumer of its own (no group, no commits),
    to tell the gap guard whether a record exists inside a gap."""

    def __init__(self, settings: Settings, timeout_s: float = 10.0):
        self._conf = {
            "bootstrap.servers": settings.kafka.bootstrap_servers,
            "group.id": settings.kafka.group_id + ".gap-probe",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
            "fetch.message.max.bytes": 16 * 1_048_576,
            "max.partition.fetch.bytes": 16 * 1_048_576,
            "logger": rdkafka_logger(settings, "gap-probe"),
        }
        self._timeout = timeout_s
        self._consumer: Consumer | None = None
        self._lock = threading.Lock()

    def first_at(self, topic: str, partition: int, offset: int) -> int | None:
        with self._lock:
            if self._consumer is None:
                self._consumer = Consumer(self._conf)
            c = self._consumer
            tp = TopicPartition(topic, partition)
            low, high = c.get_watermark_offsets(tp, timeout=self._timeout, cached=False)
            if offset < low:
                return int(low)  # removed by retention
            if offset >= high:
                return None
            c.assign([TopicPartition(topic, partition, offset)])
            try:
                deadline = time.monotonic() + self._timeout
                while time.monotonic() < deadline:
                    m = c.poll(0.5)
                    if m is None:
                        continue
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            return int(high)  # only control records up to the end
                        raise RuntimeError(str(err))
                    return int(m.offset() or 0)
                raise TimeoutError(f"no answer reading {topic}/{partition}@{offset}")
            finally:
                c.unassign()

    async def __call__(self, topic: str, partition: int, offset: int) -> int | None:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.first_at, topic, partition, offset)

    def close(self) -> None:
        with self._lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None


def make_schema_resolver(settings: Settings) -> SchemaResolver | None:
    k = settings.kafka
    if k.schema_registry_url:
        return HttpSchemaRegistry(k.schema_registry_url)
    if k.avro_schemas_dir:
        path = settings.resolve_path(k.avro_schemas_dir)
        if not path.is_dir():
            raise ConfigError(f"kafka.avro_schemas_dir {path} is not a directory")
        return LocalSchemaDir(path)
    return None


class DeadLetterWriter(Protocol):
    """Where the applier puts records the decoder or the rules could not use: ``send``
    queues one, ``flush`` returns once all queued ones are stored (raises otherwise: the
    batch is then not applied, so its offsets do not move past a lost dead letter)."""

    def send(self, dl: core.DeadLetter) -> None: ...

    def flush(self, timeout: float = 30.0) -> None: ...


#: partition end offset as the consumer last saw it, or None
Highwater = Callable[[str, int], "int | None"]


class Watermarks:
    """The lag gauge's source of partition end offsets. Wiring creates one and hands it to
    both the applier (which reads it after each applied batch) and the driver that owns
    the consumer (which connects its reader, :meth:`connect`, once the consumer exists);
    until then, or without a driver that has one, no lag is reported."""

    def __init__(self, read: Highwater | None = None) -> None:
        self._read = read

    def connect(self, read: Highwater) -> None:
        self._read = read

    def high(self, topic: str, partition: int) -> int | None:
        if self._read is None:
            return None
        try:
            return self._read(topic, partition)
        except Exception:  # a consumer mid-rebalance: no reading this time
            return None


class DeadLetterSink:
    """Writes dead letters to the configured topic: original bytes plus reason headers
    (the production :class:`DeadLetterWriter`).

    A record the dead-letter topic refuses as too large (its ``max.message.bytes`` is
    below the source topic's, e.g. an ``oversize`` record of a topic that allows large
    messages) is written again without its value (and without its key if that alone is
    too large), with ``bucketsync.value_omitted`` / ``bucketsync.key_omitted`` headers
    holding the omitted byte counts: its coordinates and reason are kept, and a permanent
    error never stops the processor."""

    def __init__(self, settings: Settings):
        self.topic = settings.kafka.dead_letter_topic
        self._producer = Producer(
            {
                "bootstrap.servers": settings.kafka.bootstrap_servers,
                "enable.idempotence": True,
                "linger.ms": 5,
                "message.max.bytes": 16 * 1_048_576,
                "logger": rdkafka_logger(settings, "dead-letters"),
            }
        )
        self._errors: list[str] = []
        #: dead letters refused as too large, to be written again without their bytes
        self._too_large: list[core.DeadLetter] = []

    def send(self, dl: core.DeadLetter) -> None:
        self._send(dl, omit=False)

    def _send(self, dl: core.DeadLetter, *, omit: bool) -> None:
        r = dl.record
        headers: list[tuple[str, str | bytes | None]] = [
            ("bucketsync.reason", dl.reason.encode()),
            ("bucketsync.message", dl.message.encode()[:4000]),
            ("bucketsync.source.topic", r.topic.encode()),
            ("bucketsync.source.partition", str(r.partition).encode()),
            ("bucketsync.source.offset", str(r.offset).encode()),
            ("bucketsync.pipeline.version", PIPELINE_VERSION.encode()),
            ("bucketsync.time", str(int(time.time() * 1000)).encode()),
        ]
        if r.timestamp_ms is not None:
            headers.append(("bucketsync.source.timestamp", str(r.timestamp_ms).encode()))
        if dl.details:
            headers.append(("bucketsync.details", orjson.dumps(dl.details, default=str)))
        key, value = r.key, r.value
        if omit:
            if value is not None:
                headers.append(("bucketsync.value_omitted", str(len(value)).encode()))
                value = None
            if key is not None and len(key) > 65_536:
                headers.append(("bucketsync.key_omitted", str(len(key)).encode()))
                key = None
        else:
            headers.extend((k, v if v is not None else b"") for k, v in r.headers)

        def delivered(err: Any, _msg: Any) -> None:
            if err is None:
                return
            if not omit and err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                self._too_large.append(dl)
            else:
                self._errors.append(str(err))

        try:
            self._producer.produce(
                self.topic, key=key, value=value, headers=headers, on_delivery=delivered
            )
        except KafkaException as exc:  # larger than the producer's own message.max.bytes
            if omit or exc.args[0].code() != KafkaError.MSG_SIZE_TOO_LARGE:
                raise
            self._too_large.append(dl)
        self._producer.poll(0)

    def flush(self, timeout: float = 30.0) -> None:
        left = self._producer.flush(timeout)
        if self._too_large and not left:
            again, self._too_large = self._too_large, []
            for dl in again:
                log.warning(
                    "dead letter %s/%s@%s (%s) is too large for %s: written without its bytes",
                    dl.record.topic,
                    dl.record.partition,
                    dl.record.offset,
                    dl.reason,
                    self.topic,
                )
                self._send(dl, omit=True)
            left = self._producer.flush(timeout)
        if left or self._errors or self._too_large:
            errs, self._errors = self._errors, []
            self._too_large = []
            raise RuntimeError(f"dead-letter topic {self.topic}: delivery failed: {errs or left}")


@dataclass(slots=True)
class _Hold:
    """A partition held at ``offset``: its record there waits for the delete halves of
    ``old_keys`` (see :func:`pipeline.core.waiting_creates`)."""

    offset: int
    old_keys: set[str]
    since: float
    checked: float


#: how often a held partition asks the store whether its delete halves are applied
HOLD_CHECK_S = 0.2


class BatchApplier:
    """Decode -> plan -> dead letters -> one atomic apply. Shared by both drivers."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        rules: SyncRules,
        *,
        dead_letters: DeadLetterWriter,
        watermarks: Watermarks | None = None,
        probe: Callable[[str, int, int], Awaitable[int | None]] | None = None,
    ):
        self.settings = settings
        self.store = store
        store.rows.limit = settings.processor.row_cache_rows
        self.rules = rules
        self._probe = PartitionProbe(settings) if probe is None else None
        self.guard = OffsetGapGuard(
            probe if probe is not None else self._probe,  # type: ignore[arg-type]
            reread_retry_s=settings.processor.gap_reread_retry_s,
        )
        #: set by the driver: seeks partitions back for records the consumer dropped
        self.seek: Seeker | None = None
        self.schemas = make_schema_resolver(settings)
        self.dead_letters = dead_letters
        self.watermarks = watermarks or Watermarks()
        self.applied: dict[str, int] = {}
        self._unknown_tables: set[str] = set()
        self._lock = asyncio.Lock()
        self.stager: TransactionStager | None = None
        if settings.kafka.consistency == "transaction":
            self.stager = TransactionStager(
                subscribed=_subscription_filter(settings),
                max_staged_events=settings.processor.max_staged_events,
                grace_s=settings.processor.transaction_grace_s,
            )
        #: tables whose rows keep their source row (None: every row; see core.plan_batch)
        self.merge_tables: set[str] | None = (
            None
            if settings.processor.source_rows == "all"
            else set(settings.processor.merge_tables)
        )
        self._stored_merge_tables = 0
        self._merge_confirmed: set[str] = set(self.merge_tables or ())
        #: the apply in flight (pipelined mode): (task, plan, items, start time)
        self._inflight: tuple[asyncio.Future[Any], core.Plan, list[Any], float] | None = None
        self._last_ops = 0
        #: set by the kafka driver: plan batch N+1 while batch N is being applied
        self.pipelined = False
        #: seconds spent per stage, for ``bucketsync bench`` and profiling
        self.timings: dict[str, float] = {"decode": 0.0, "read": 0.0, "plan": 0.0, "apply": 0.0}
        #: partitions held at a create half waiting for its old key's delete half
        #: (core.waiting_creates): (topic, partition) -> hold
        self.holds: dict[tuple[str, int], _Hold] = {}
        #: old row keys whose create half waited processor.pk_change_wait_s in vain
        self._waited_out: set[str] = set()
        #: transactions the stager completed, for the next apply to record (P:tx_done)
        self._done_txs: list[str] = []
        #: (topic, partition) -> highest offset whose dead letter this processor sent
        self._dl_sent: dict[tuple[str, int], int] = {}

    def _observe_lag(self, records: Sequence[KafkaRecord]) -> None:
        last: dict[tuple[str, int], int] = {}
        prev: KafkaRecord | None = None
        for r in records:  # records come in runs of one partition
            if prev is not None and (r.topic is not prev.topic or r.partition != prev.partition):
                last[(prev.topic, prev.partition)] = prev.offset
            prev = r
        if prev is not None:
            last[(prev.topic, prev.partition)] = prev.offset
        for (topic, part), off in last.items():
            high = self.watermarks.high(topic, part)
            if high is not None and high >= 0:
                LAG.labels(f"{topic}/{part}").set(max(0, high - off - 1))

    async def load_offsets(self) -> dict[str, int]:
        self.applied = await self.store.applied_offsets()
        await self._load_merge_tables()
        if self.stager is not None:
            done = await self.store.done_transactions(self.stager.remember)
            if self._inflight is not None:  # on its way to the store
                done += self._inflight[1].batch.done_txs
            self.stager.reset_done(done + self._done_txs)
        return self.applied

    async def _load_merge_tables(self) -> None:
        if self.merge_tables is not None:
            stored = await self.store.merge_tables()
            self._stored_merge_tables = len(stored)
            self.merge_tables |= stored
            self._merge_confirmed |= stored

    def resume_positions(self, partitions: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Where to read assigned partitions from: right after the store's applied offset
        (the truth, not the group's committed offsets: staged events were consumed but not
        applied), or 0. Resets the gap guard and drops staged events of those partitions,
        which are read again. Call after :meth:`load_offsets`."""
        parts = list(partitions)
        # rows of these partitions may have been written by another processor meanwhile
        self.store.rows.invalidate()
        for tp in parts:
            self.holds.pop(tp, None)
        pos = {(t, p): self.applied.get(f"{t}/{p}", -1) + 1 for t, p in parts}
        self.guard.expect((t, p, off) for (t, p), off in pos.items())
        if self.stager is not None:
            self.stager.forget(f"{t}/{p}" for t, p in parts)
            STAGED.set(self.stager.staged)
        return pos

    def revoked(self, partitions: Iterable[tuple[str, int]]) -> None:
        parts = list(partitions)
        self.store.rows.invalidate()
        self.guard.forget(parts)
        for tp in parts:
            self.holds.pop(tp, None)
        if self.stager is not None:
            self.stager.forget(f"{t}/{p}" for t, p in parts)
            STAGED.set(self.stager.staged)

    def close(self) -> None:
        if self._probe is not None:
            self._probe.close()

    def _decode(self, rec: KafkaRecord) -> DecodedEvent:
        k = self.settings.kafka
        return decode_record(
            rec,
            schemas=self.schemas,
            max_record_bytes=k.max_record_bytes,
            type_hints=k.type_hints or None,
            connector_kinds=k.connector_kinds or None,
        )

    async def _decode_all(self, records: Sequence[KafkaRecord]) -> list[DecodedEvent]:
        delay = 0.5
        k = self.settings.kafka
        schemas, limit = self.schemas, k.max_record_bytes
        hints, kinds = k.type_hints or None, k.connector_kinds or None
        while True:
            try:  # self._decode, inlined (it runs for every record)
                return [
                    decode_record(
                        r,
                        schemas=schemas,
                        max_record_bytes=limit,
                        type_hints=hints,
                        connector_kinds=kinds,
                    )
                    for r in records
                ]
            except RegistryUnavailable as exc:
                # never dead-letter a registry outage: wait and retry the whole batch
                log.warning("schema registry unavailable, retrying in %.1fs: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _note_unknown(self, table: str) -> None:
        if table not in self._unknown_tables:
            self._unknown_tables.add(table)
            log.info("table %s is not used by any sync rule; its events are skipped", table)

    async def handle(self, records: Sequence[KafkaRecord]) -> int:
        """Apply one batch; returns the number of ops written. An empty batch only
        releases transactions whose grace period ran out."""
        async with self._lock:
            if self.holds:
                # a held partition's records come again once it is released (a seek)
                records = [r for r in records if (r.topic, r.partition) not in self.holds]
                try:
                    await self._check_holds()
                except STORE_ERRORS as exc:  # everything is read again once it is back
                    await self._recover_store(exc)
                    return 0
            if records:
                adm = await self.guard.admit(records)
                await self._resolve(adm)
                records = adm.records
            try:
                return await self._handle(records)
            except STORE_ERRORS as exc:
                await self._recover_store(exc)
                return 0

    async def check_stalled(self, highwater: dict[tuple[str, int], int]) -> None:
        """While deliveries are idle: read again a partition whose tail was dropped."""
        async with self._lock:
            if self.holds:  # a held partition makes no progress on purpose
                highwater = {tp: h for tp, h in highwater.items() if tp not in self.holds}
            await self._resolve(await self.guard.check_stalled(highwater))
            if self.holds:
                try:
                    await self._check_holds()
                except STORE_ERRORS as exc:
                    await self._recover_store(exc)

    async def _check_holds(self) -> None:
        """Release held partitions whose delete halves are applied now, or that waited
        ``processor.pk_change_wait_s``: the partition is read again from the held record."""
        now = time.monotonic()
        due = [tp for tp, h in self.holds.items() if now - h.checked >= HOLD_CHECK_S]
        if not due:
            return
        keys = sorted({k for tp in due for k in self.holds[tp].old_keys})
        gone = await self.store.departed_rows(keys)
        release: dict[tuple[str, int], int] = {}
        for tp in due:
            h = self.holds[tp]
            h.checked = now
            if all(k in gone for k in h.old_keys):
                PK_CHANGE_WAITS.labels("released").inc()
                release[tp] = h.offset
            elif now - h.since >= self.settings.processor.pk_change_wait_s:
                PK_CHANGE_WAITS.labels("waited_out").inc()
                log.warning(
                    "%s/%d@%d: the delete half of primary-key change(s) from %s did not come "
                    "in %.0f s (processor.pk_change_wait_s); applying the new row with the "
                    "old row as known",
                    tp[0],
                    tp[1],
                    h.offset,
                    ", ".join(sorted(h.old_keys)),
                    now - h.since,
                )
                if len(self._waited_out) > 100_000:
                    self._waited_out.clear()
                self._waited_out |= h.old_keys
                release[tp] = h.offset
        if release:
            for tp in release:
                del self.holds[tp]
            self.guard.expect((t, p, off) for (t, p), off in release.items())
            if self.seek is not None:
                await self.seek(release)

    async def _hold_waiting(
        self, items: list[tuple[KafkaRecord, DecodedEvent]], departed: Container[str]
    ) -> list[tuple[KafkaRecord, DecodedEvent]]:
        """Event mode: hold the partitions of create halves whose old key's delete half is
        not applied yet (not in ``departed``: core.waiting_creates); returns the items that
        go on now."""
        waits = core.waiting_creates(items, departed, self._waited_out)
        if not waits:
            return items
        now = time.monotonic()
        for (topic, part), (offset, keys) in waits.items():
            PK_CHANGE_WAITS.labels("held").inc()
            log.info(
                "%s/%d@%d: a primary-key change waits for the delete half of %s (another "
                "partition): the partition is held",
                topic,
                part,
                offset,
                ", ".join(sorted(keys)),
            )
            self.holds[(topic, part)] = _Hold(offset, keys, now, now)
        self.guard.expect((t, p, h[0]) for (t, p), h in waits.items())
        assert self.seek is not None
        await self.seek({tp: h[0] for tp, h in waits.items()})
        return [
            (r, ev)
            for r, ev in items
            if (w := waits.get((r.topic, r.partition))) is None or r.offset < w[0]
        ]

    async def _recover_store(self, exc: BaseException) -> None:
        """Redis went away mid-batch. Wait for it (backoff), then take its applied offsets
        as the truth again and read everything after them again: a Redis restarted from
        its AOF may lack its last writes, and a batch whose reply was lost may or may not
        have been applied (the offset guard in the store sorts out which)."""
        STORE_OUTAGES.inc()
        self.store.rows.invalidate()  # a Redis restarted from its AOF may lack its last writes
        if self._inflight is not None:  # its result is unknown: everything is read again
            self._inflight[0].cancel()
            self._inflight = None
        self._done_txs = []  # their events are read again too
        log.warning("store unreachable (%s); this batch is read again once it is back", exc)
        waited = await self._wait_for_store()
        await self.load_offsets()
        pos = self.resume_positions(self.guard.partitions())
        if pos and self.seek is not None:
            await self.seek(pos)
        log.info(
            "store back after %.1fs; reading again from %s",
            waited,
            ", ".join(f"{t}/{p}@{o}" for (t, p), o in sorted(pos.items())),
        )

    async def _wait_for_store(self) -> float:
        """Until Redis answers (backoff up to 5 s, a log line every 10 s); seconds waited."""
        delay, waited, last_log = 0.2, 0.0, 0.0
        while True:
            try:
                if await self.store.ping():
                    return waited
            except STORE_ERRORS as again:
                if waited - last_log >= 10:
                    last_log = waited
                    log.warning("store still unreachable after %.0fs: %s", waited, again)
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 5.0)

    async def load_offsets_when_up(self) -> dict[str, int]:
        """:meth:`load_offsets`, waiting for Redis first if it is down (a processor started
        before its store waits for it instead of exiting)."""
        while True:
            try:
                return await self.load_offsets()
            except STORE_ERRORS as exc:
                log.warning("store unreachable at start (%s); waiting for it", exc)
                await self._wait_for_store()

    async def _resolve(self, adm: Admission) -> None:
        for gap in adm.gaps:
            GAPS.labels(gap.resolution).inc()
        if adm.discarded:
            DISCARDED.inc(adm.discarded)
        if adm.reread:
            if self.seek is None:
                raise RuntimeError("records were dropped and the driver cannot seek")
            await self.seek(adm.reread)

    async def _handle(self, records: Sequence[KafkaRecord]) -> int:
        fresh = core.unapplied(records, self.applied)
        skipped = len(records) - len(fresh)
        if skipped:
            DUPLICATES.inc(skipped)
        t = time.perf_counter()
        decoded = await self._decode_all(fresh)
        self.timings["decode"] += time.perf_counter() - t
        items: list[tuple[KafkaRecord, DecodedEvent]] = list(zip(fresh, decoded, strict=True))
        if self.stager is not None:
            for rec, ev in items:
                self.stager.push(rec, ev)
            items = self.stager.release()
            self._done_txs.extend(self.stager.take_done())
            STAGED.set(self.stager.staged)
        return await self._apply_items(items)

    async def _apply_items(self, items: list[tuple[KafkaRecord, DecodedEvent]]) -> int:
        """Plan and apply; with :attr:`pipelined`, the apply is left in flight (awaited by
        the next batch once it is planned, or by :meth:`flush`). Applies stay strictly
        sequential: a batch is sent only after the previous one's result is known, so a
        refused (stale) batch is planned again together with everything after it."""
        for _attempt in range(5):
            items = core.unapplied_items(items, self.applied)
            if not items:
                return 0
            if self.holds:  # records a stale batch brings back (redo) stay held
                items = [
                    (r, ev)
                    for r, ev in items
                    if (h := self.holds.get((r.topic, r.partition))) is None or r.offset < h.offset
                ]
                if not items:
                    return 0
            t1 = time.perf_counter()
            merging = [(r, ev) for r, ev in items if "keep_columns" in ev or "partial" in ev]
            base_keys = sorted({k for r, ev in merging for k in core.base_keys(r.topic, ev)})
            gone: dict[str, Any] = {}
            if base_keys:  # merges read what the batch in flight may still write
                redo = await self._settle()
                if redo is not None:
                    items = redo + items
                    continue
                old_keys = {
                    core.row_key(r.topic, old)
                    for r, ev in merging
                    if (old := cast(Any, ev).get("pk_change_from")) is not None
                }
                if old_keys:
                    # the old rows as their delete halves left them (None: without a copy)
                    departed = await self.store.departed_rows(sorted(old_keys))
                    if (
                        self.stager is None
                        and self.seek is not None
                        and self.settings.processor.pk_change_wait_s > 0
                    ):
                        items = await self._hold_waiting(items, departed)
                        if not items:
                            return 0
                    gone = {k: v for k, v in departed.items() if v is not None}
            stored = await self.store.source_rows(base_keys)
            t2 = time.perf_counter()
            merge_tables = None if self.merge_tables is None else set(self.merge_tables)
            plan = core.plan_batch(
                items,
                self.rules,
                stored,
                on_unknown_table=self._note_unknown,
                merge_tables=merge_tables,
                gone_rows=gone,
            )
            if plan.merges_without_base:
                MERGES_WITHOUT_BASE.inc(plan.merges_without_base)
            t3 = time.perf_counter()
            self.timings["read"] += t2 - t1
            self.timings["plan"] += t3 - t2
            redo = await self._settle()
            if redo is not None:  # the batch in flight was refused: plan both again
                items = redo + items
                continue
            if len(core.unapplied_items(items, self.applied)) != len(items):
                continue  # re-delivered records the batch in flight has just applied
            if merge_tables is not None:
                self.merge_tables = merge_tables
            # a batch refused as stale is planned again with its dead letters: send each
            # record's once (this processor; the topic is at-least-once across processors)
            sent = self._dl_sent
            dead = [
                dl
                for dl in plan.dead_letters
                if dl.record.offset > sent.get((dl.record.topic, dl.record.partition), -1)
            ]
            for dl in dead:
                self.dead_letters.send(dl)
                DEAD.labels(dl.record.topic, dl.reason).inc()
                log.warning(
                    "dead letter %s/%s@%s: %s: %s",
                    dl.record.topic,
                    dl.record.partition,
                    dl.record.offset,
                    dl.reason,
                    dl.message,
                )
            if dead:
                await asyncio.get_running_loop().run_in_executor(None, self.dead_letters.flush)
                for dl in dead:
                    tp = (dl.record.topic, dl.record.partition)
                    sent[tp] = max(sent.get(tp, -1), dl.record.offset)
            plan.batch.done_txs, self._done_txs = self._done_txs, []
            self._inflight = (
                asyncio.ensure_future(self.store.apply(plan.batch)),
                plan,
                items,
                time.perf_counter(),
            )
            if self.pipelined:
                return 0
            ops = self._last_ops
            redo = await self._settle()
            if redo is None:
                return self._last_ops - ops
            items = redo
        raise RuntimeError("batch kept colliding with another processor's offsets")

    async def _settle(self) -> list[tuple[KafkaRecord, DecodedEvent]] | None:
        """Wait for the apply in flight. None when it was applied (or there was none);
        its items when the store refused it as stale (offsets are reloaded)."""
        if self._inflight is None:
            return None
        task, plan, items, t0 = self._inflight
        try:
            res = await task
        finally:
            self._inflight = None
        dt = time.perf_counter() - t0
        if res.status == "stale":
            self._done_txs = plan.batch.done_txs + self._done_txs  # recorded with the redo
            log.info(
                "partition %s already applied up to %s elsewhere; re-reading offsets",
                res.stale_partition,
                res.stored_offset,
            )
            if self.merge_tables is not None:
                self.merge_tables = set(self._merge_confirmed)
            await self.load_offsets()
            return items
        self.applied.update(plan.batch.offsets)
        if self.merge_tables is not None:
            self._merge_confirmed |= set(plan.batch.merge_tables)
            self._stored_merge_tables += len(plan.batch.merge_tables)
            if res.merge_tables != self._stored_merge_tables:  # learned by another one
                await self._load_merge_tables()
        self._last_ops += res.ops
        self.timings["apply"] += dt
        APPLY_SECONDS.observe(dt)
        BATCH.observe(len(items))
        OPS.inc(res.ops)
        if dt > 0:
            OPS_RATE.set(res.ops / dt)
        per_topic: dict[str, int] = {}
        records = [r for r, _ev in items]
        for r in records:
            per_topic[r.topic] = per_topic.get(r.topic, 0) + 1
        for topic, n in per_topic.items():
            EVENTS.labels(topic).inc(n)
        self._observe_lag(records)
        return None

    async def flush(self) -> None:
        """Wait until the batch in flight (pipelined mode) is applied."""
        async with self._lock:
            try:
                redo = await self._settle()
                if redo is not None:
                    pipelined, self.pipelined = self.pipelined, False
                    try:
                        await self._apply_items(redo)
                    finally:
                        self.pipelined = pipelined
            except STORE_ERRORS as exc:
                await self._recover_store(exc)


def _subscription_filter(settings: Settings) -> Callable[[str], bool]:
    """Is a data collection (``prefix.schema.table``) one of our topics? Default naming."""
    topics, pattern = _topic_matcher(settings)
    if pattern is not None:
        return lambda name: pattern.search(name) is not None
    wanted = set(topics)
    return lambda name: name in wanted


def claim_membership(settings: Settings) -> Membership:
    """The group instance id for ``processor.instance_id`` (see pipeline.membership)."""
    topics, pattern = _topic_matcher(settings)
    return claim(
        settings.processor.instance_id,
        group_id=settings.kafka.group_id,
        state_dir=settings.state_dir,
        subscription=pattern.pattern if pattern is not None else ",".join(sorted(topics)),
    )


def _topic_matcher(settings: Settings) -> tuple[list[str], re.Pattern[str] | None]:
    k = settings.kafka
    if k.topic_pattern:
        return [], re.compile(k.topic_pattern)
    if not k.topics:
        raise UserError("no CDC topics configured: set kafka.topics or kafka.topic_pattern")
    return list(k.topics), None


# ---------------------------------------------------------------- kafka driver


def _headers(raw: Any) -> tuple[tuple[str, bytes | None], ...]:
    """A consumed message's headers (a list of pairs, or a dict) as a record keeps them."""
    return tuple(
        (hk, hv if not isinstance(hv, str) else hv.encode())
        for hk, hv in (raw.items() if isinstance(raw, dict) else raw)
    )


class KafkaLoopDriver:
    """A plain confluent-kafka consumer loop around :class:`BatchApplier`."""

    def __init__(
        self, settings: Settings, applier: BatchApplier, membership: Membership | None = None
    ):
        self.settings = settings
        self.applier = applier
        self._stop = asyncio.Event()
        k = settings.kafka
        p = settings.processor
        self.membership = membership or claim_membership(settings)
        conf: dict[str, Any] = {
            "bootstrap.servers": k.bootstrap_servers,
            "group.id": k.group_id,
            # offsets are the store's (applied in the same atomic step as the ops); the
            # group's commits only serve tools that show consumer lag
            "enable.auto.commit": True,
            "auto.offset.reset": "earliest",
            "fetch.message.max.bytes": 16 * 1_048_576,
            "max.partition.fetch.bytes": 16 * 1_048_576,
            "topic.metadata.refresh.interval.ms": 5000,
            "session.timeout.ms": p.session_timeout_ms,
            "heartbeat.interval.ms": min(p.heartbeat_interval_ms, p.session_timeout_ms // 3),
            # round robin over all subscribed partitions: librdkafka's default ("range,
            # roundrobin", range first) assigns per topic, so Debezium's usual single-
            # partition topics all went to one member and a second processor stood idle
            "partition.assignment.strategy": "roundrobin",
            "logger": rdkafka_logger(settings, "consumer"),
        }
        if self.membership.instance_id:
            conf["group.instance.id"] = self.membership.instance_id
        self._conf = conf
        self.consumer = Consumer(conf)
        #: the loop :meth:`run` awaits the consumer on (rebalance callbacks read the store's
        #: applied offsets through it)
        self._loop: asyncio.AbstractEventLoop | None = None
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()
        applier.seek = self._seek
        applier.pipelined = True  # plan batch N+1 while batch N is applied (2 cores)

    def stop(self) -> None:
        self._stop.set()

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        # runs inside consume() (executor thread) while the loop awaits it: no batch is
        # being handled at the same time (one may be in flight: pipelined)
        self._reload_applied()
        pos = self.applier.resume_positions((tp.topic, tp.partition) for tp in partitions)
        for tp in partitions:
            tp.offset = pos[(tp.topic, tp.partition)] or OFFSET_BEGINNING
        consumer.assign(partitions)
        log.info("assigned %s", ", ".join(f"{t}/{p}@{o}" for (t, p), o in sorted(pos.items())))

    def _reload_applied(self) -> None:
        """The store's applied offsets, read again before resuming assigned partitions (as
        the faust driver does): the ones this processor holds date from its own last batch
        of a partition, or its start, and with partitions moving between live members
        another one may have applied far past them meanwhile. Resuming from there read
        (and fetched from Kafka) everything since again, only to have the batch refused as
        stale. Called from the consume thread: the read runs on the loop, which is free
        (it awaits consume()); if the store does not answer, the offsets held are kept
        (the offset guard in the store fences what they let through)."""
        loop = self._loop
        if loop is None or not loop.is_running():
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # the consume thread, as expected
        else:
            return  # on the loop's own thread: waiting here would block it
        fut = asyncio.run_coroutine_threadsafe(self.applier.load_offsets(), loop)
        try:
            fut.result(timeout=10)
        except Exception as exc:
            fut.cancel()
            log.warning(
                "assignment: applied offsets not read again (%s); resuming from the ones held", exc
            )

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.applier.revoked((tp.topic, tp.partition) for tp in partitions)
        consumer.unassign()

    async def _seek(self, positions: dict[tuple[str, int], int]) -> None:
        for (topic, part), off in positions.items():
            # drops what librdkafka prefetched for the partition and fetches from ``off``
            try:
                self.consumer.seek(TopicPartition(topic, part, off))
            except KafkaException as exc:  # the guard asks again after gap_reread_retry_s
                log.warning("seek %s/%d@%d failed: %s", topic, part, off, exc)

    def _ends(self) -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], int] = {}
        for tp in self.consumer.assignment():
            high = self._highwater(tp.topic, tp.partition)
            if high is not None and high >= 0:
                out[(tp.topic, tp.partition)] = high
        return out

    def _highwater(self, topic: str, partition: int) -> int | None:
        _low, high = self.consumer.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=0.5, cached=True
        )
        return int(high) if high is not None else None

    async def _replace_consumer(self, err: Any, subs: list[str]) -> None:
        """A fatal consumer error leaves the consumer unusable for good. Seen in practice:
        after a broker restart a static member's rejoin raced its own old session and the
        coordinator fenced it ("static consumer fenced by other consumer with same
        group.instance.id"). What it read is not lost: the store's applied offsets are the
        truth, so a new consumer under the same instance id resumes right after them."""
        log.warning("consumer failed for good (%s); starting a new one", err)
        loop = asyncio.get_running_loop()
        await self.applier.flush()  # what was read before the failure is applied first
        try:
            await loop.run_in_executor(None, self.consumer.close)
        except Exception as exc:  # a fenced consumer may refuse to close cleanly
            log.info("closing the failed consumer: %s", exc)
        self.applier.revoked(self.applier.guard.partitions())
        self.consumer = Consumer(self._conf)
        self.consumer.subscribe(subs, on_assign=self._on_assign, on_revoke=self._on_revoke)

    async def run(self, max_events: int | None = None, idle_exit_s: float | None = None) -> int:
        topics, pattern = _topic_matcher(self.settings)
        self._loop = asyncio.get_running_loop()
        # a stop (SIGTERM, Ctrl-C) while Redis is still down at start ends the wait
        offsets = asyncio.ensure_future(self.applier.load_offsets_when_up())
        stopped = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({offsets, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not offsets.done():
            offsets.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await offsets
            log.info("stopped while waiting for the store")
            return 0
        offsets.result()
        self.applier.watermarks.connect(self._highwater)
        subs = topics if not pattern else ["^" + pattern.pattern.lstrip("^")]
        self.consumer.subscribe(subs, on_assign=self._on_assign, on_revoke=self._on_revoke)
        p = self.settings.processor
        loop = asyncio.get_running_loop()
        total = 0
        last_data = last_stall_check = time.monotonic()
        try:
            while not self._stop.is_set():
                if p.batch_max_wait_ms:
                    msgs = await loop.run_in_executor(
                        None, self.consumer.consume, p.batch_max_events, p.batch_max_wait_ms / 1000
                    )
                else:  # 0: no waiting to fill a batch, what has arrived (or the next record)
                    msgs = await loop.run_in_executor(
                        None, self.consumer.consume, p.batch_max_events, 0
                    ) or await loop.run_in_executor(None, self.consumer.consume, 1, 0.05)
                records = []
                fatal = None
                for m in msgs:
                    err = m.error()
                    if err is not None:
                        if err.fatal() or err.code() == KafkaError._FATAL:
                            fatal = err
                        elif err.code() != KafkaError._PARTITION_EOF:
                            log.warning("consumer error: %s", err)
                        continue
                    ts_type, ts = m.timestamp()
                    raw_headers = m.headers()
                    # positional: a keyword call costs more, for every consumed record
                    records.append(
                        KafkaRecord(
                            m.topic(),  # type: ignore[arg-type]  # set: not an error
                            m.partition(),  # type: ignore[arg-type]
                            m.offset(),  # type: ignore[arg-type]
                            m.key(),
                            m.value(),
                            _headers(raw_headers) if raw_headers else (),
                            ts if ts_type else None,
                        )
                    )
                if fatal is not None:
                    await self._replace_consumer(fatal, subs)
                    continue
                if records:
                    await self.applier.handle(records)
                    total += len(records)
                    last_data = time.monotonic()
                    if max_events is not None and total >= max_events:
                        break
                else:
                    await self.applier.flush()
                    if self.applier.stager is not None and self.applier.stager.staged:
                        await self.applier.handle([])  # transactions past their grace period
                    if time.monotonic() - last_stall_check > 1.0:
                        last_stall_check = time.monotonic()
                        await self.applier.check_stalled(
                            await loop.run_in_executor(None, self._ends)
                        )
                    if idle_exit_s is not None and time.monotonic() - last_data > idle_exit_s:
                        break
        finally:
            try:
                await self.applier.flush()
            finally:
                await loop.run_in_executor(None, self.consumer.close)
            self.membership.release()
        return total


# ---------------------------------------------------------------- faust driver


def build_faust_app(
    settings: Settings, applier_factory: Any, membership: Membership | None = None
) -> Any:
    import faust

    k = settings.kafka
    p = settings.processor
    datadir = settings.state_dir / "faust" / k.group_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        k.group_id,
        # Faust keeps a data dir per app; keep it in the stack's state dir, not the cwd
        datadir=str(datadir),
        broker="kafka://" + ",".join(k.bootstrap_servers.split(",")),
        store="memory://",
        web_enabled=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        stream_buffer_maxsize=p.stream_buffer_maxsize,
        broker_max_poll_records=p.batch_max_events,
        consumer_max_fetch_size=16 * 1_048_576,
        topic_allow_declare=False,
        value_serializer="raw",
        key_serializer="raw",
        producer_max_request_size=16 * 1_048_576,
        broker_session_timeout=p.session_timeout_ms / 1000,
        broker_heartbeat_interval=min(p.heartbeat_interval_ms, p.session_timeout_ms // 3) / 1000,
        consumer_group_instance_id=membership.instance_id if membership else None,
        # topics that do not exist yet (the connector creates them later) are ignored at
        # assignment and only noticed at a metadata refresh: every 5 s, like the kafka
        # driver's topic.metadata.refresh.interval.ms (aiokafka's default is 5 minutes)
        consumer_metadata_max_age_ms=5000,
    )
    topics, pattern = _topic_matcher(settings)
    if pattern is not None:
        source = app.topic(pattern=pattern, value_type=bytes, key_type=bytes)
    else:
        source = app.topic(*topics, value_type=bytes, key_type=bytes)
    state: dict[str, BatchApplier] = {}
    made = asyncio.Lock()

    async def ensure_applier() -> BatchApplier:
        async with made:
            applier = state.get("a")
            if applier is None:
                applier = state["a"] = await applier_factory()
                await applier.load_offsets_when_up()

                def highwater(topic: str, partition: int) -> int | None:
                    from faust.types import TP

                    return int(app.consumer.highwater(TP(topic, partition)))

                applier.watermarks.connect(highwater)

                async def seek(positions: dict[tuple[str, int], int]) -> None:
                    from faust.types import TP

                    consumer: Any = app.consumer
                    thread = getattr(consumer, "_thread", None)
                    if thread is None or not hasattr(thread, "call_thread"):
                        for (topic, part), off in positions.items():
                            await consumer.seek(TP(topic, part), off)
                        return

                    def seek_in_thread() -> None:
                        # faust's Consumer.seek calls aiokafka from this (the agent's) thread
                        # while aiokafka's fetcher runs in faust's consumer thread: a seek in
                        # the middle of a fetch crashed it (KeyError in fetched_records, the
                        # worker died; faust-streaming/aiokafka#19). Run it in that thread, as
                        # faust's own seek_wait does.
                        c = thread._ensure_consumer()
                        for (topic, part), off in positions.items():
                            c.seek(TP(topic, part), off)

                    await thread.call_thread(seek_in_thread)
                    for (topic, part), off in positions.items():  # what Consumer.seek sets
                        consumer._read_offset[TP(topic, part)] = off if off else None

                applier.seek = seek
            return applier

    @app.agent(source, concurrency=1)
    async def apply_cdc(stream: Any) -> Any:
        applier = await ensure_applier()
        # faust reads within=0 as "no timeout": it would hold a batch until it is full
        async for events in stream.take_events(
            p.batch_max_events, within=max(p.batch_max_wait_ms, 1) / 1000
        ):
            records = []
            for ev in events:
                m = ev.message
                records.append(
                    KafkaRecord(
                        topic=m.topic,
                        partition=m.partition,
                        offset=m.offset,
                        key=m.key,
                        value=m.value,
                        headers=tuple((hk, hv) for hk, hv in (m.headers or ())),
                        timestamp_ms=int(m.timestamp * 1000) if m.timestamp else None,
                    )
                )
            await applier.handle(records)
            yield len(records)

    if settings.compaction.interval_s > 0:

        @app.timer(interval=settings.compaction.interval_s)
        async def compact_marked() -> None:
            a = state.get("a")
            if a is not None:
                try:
                    st = await compaction.compact_marked(a.store, settings)
                except STORE_ERRORS as exc:  # a timer that raises crashes Faust's worker
                    log.warning("compaction: store unreachable (%s); retrying next interval", exc)
                    return
                except Exception:  # as compaction.schedule (the Kafka driver's) does
                    log.exception("compaction run failed; retrying next interval")
                    return
                if st.ops_removed:
                    log.info("compaction: %d buckets, %d ops removed", st.buckets, st.ops_removed)

    @app.timer(interval=max(1.0, p.gap_reread_retry_s / 2))
    async def check_stalled_partitions() -> None:
        # a dropped tail shows no gap (nothing arrives after it): compare with the ends
        from faust.types import TP

        a = state.get("a")
        if a is None:
            return
        ends: dict[tuple[str, int], int] = {}
        for tp in app.consumer.assignment():
            high = app.consumer.highwater(TP(tp.topic, tp.partition))
            if high is not None and high >= 0:
                ends[(tp.topic, tp.partition)] = int(high)
        await a.check_stalled(ends)

    if settings.kafka.consistency == "transaction":

        @app.timer(interval=1.0)
        async def release_overdue_transactions() -> None:
            a = state.get("a")
            if a is not None and a.stager is not None and a.stager.staged:
                await a.handle([])

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _reload_offsets(app_: Any, assigned: Any, **kw: Any) -> None:
        # The store's applied offsets are the truth, not the group's committed ones:
        # events held for open transactions were consumed (and maybe committed) but
        # not applied. Resume every partition right after its last applied offset.
        a = await ensure_applier()
        async with a._lock:  # not while a batch of the old assignment is being applied
            await a.load_offsets_when_up()
            pos = a.resume_positions((tp.topic, tp.partition) for tp in assigned)
        for tp in assigned:
            await app.consumer.seek(tp, pos[(tp.topic, tp.partition)])

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _forget_revoked(app_: Any, revoked: Any, **kw: Any) -> None:
        a = state.get("a")
        if a is not None:
            a.revoked((tp.topic, tp.partition) for tp in revoked)

    return app


# ---------------------------------------------------------------- entry point


async def _make_applier(settings: Settings) -> BatchApplier:
    rules = load_sync_rules(settings)
    store = Store.from_settings(settings)
    return BatchApplier(settings, store, rules, dead_letters=DeadLetterSink(settings))


def run_kafka_driver(settings: Settings, membership: Membership | None = None) -> int:
    async def go() -> int:
        applier = await _make_applier(settings)
        driver = KafkaLoopDriver(settings, applier, membership)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal() -> None:
            driver.stop()
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        log.info(
            "processor (kafka driver) consuming %s",
            settings.kafka.topics or settings.kafka.topic_pattern,
        )
        compactor = asyncio.create_task(compaction.schedule(settings, applier.store, stop))
        try:
            await driver.run()
        finally:
            stop.set()
            await compactor
            applier.close()
            await applier.store.close()
        return 0

    return asyncio.run(go())


def run_faust_driver(settings: Settings, membership: Membership | None = None) -> int:
    import faust

    async def factory() -> BatchApplier:
        return await _make_applier(settings)

    membership = membership or claim_membership(settings)
    wait_for_broker(settings)  # Faust's worker exits if it cannot bootstrap at start
    try:
        # Faust's worker, once started, does not stop while its agent waits for Redis
        if not wait_for_store(settings):
            log.info("stopped while waiting for the store")
            return 0
        app = build_faust_app(settings, factory, membership)
        worker = faust.Worker(app, loglevel="WARNING", quiet=True)
        worker.execute_from_commandline()
    finally:
        membership.release()
    return 0


def wait_for_store(settings: Settings) -> bool:
    """Until Redis at ``redis.url`` answers (backoff up to 5 s, a log line every 30 s);
    False when SIGTERM or SIGINT came first."""

    async def go() -> bool:
        store = Store.from_settings(settings)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        delay, last_log = 0.2, -math.inf
        try:
            while not stop.is_set():
                try:
                    if await store.ping():
                        return True
                except STORE_ERRORS as exc:
                    if time.monotonic() - last_log >= 30:
                        last_log = time.monotonic()
                        log.warning("store unreachable at start (%s); waiting for it", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 5.0)
            return False
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await store.close()

    return asyncio.run(go())


def _quiet_admin(settings: Settings) -> Any:
    """An AdminClient on ``kafka.bootstrap_servers`` whose librdkafka logs go nowhere (the
    start-up checks report what matters themselves)."""
    from confluent_kafka.admin import AdminClient

    quiet = logging.getLogger("bucketsync.processor.bootstrap")
    if not quiet.handlers:
        quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    conf: dict[str, Any] = {"bootstrap.servers": settings.kafka.bootstrap_servers, "logger": quiet}
    return AdminClient(conf)


def wait_for_broker(settings: Settings) -> None:
    """Until the brokers in ``kafka.bootstrap_servers`` answer a metadata request (backoff up
    to 5 s, a log line every 30 s). The kafka driver's librdkafka keeps trying by itself."""
    admin = _quiet_admin(settings)
    delay, last_log = 0.5, None
    while True:
        try:
            admin.list_topics(timeout=5)
            return
        except KafkaException as exc:
            now = time.monotonic()
            if last_log is None or now - last_log >= 30:
                last_log = now
                log.warning(
                    "Kafka unreachable at %s (%s); waiting for it",
                    settings.kafka.bootstrap_servers,
                    exc.args[0] if exc.args else exc,
                )
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def check_session_timeout(settings: Settings) -> None:
    """Refuse a ``processor.session_timeout_ms`` the broker rejects (its
    ``group.min.session.timeout.ms`` .. ``group.max.session.timeout.ms``, 6,000-1,800,000 by
    default): librdkafka only logs the failed JoinGroup every few seconds, so the processor
    would run without ever consuming. Best effort: a broker that does not answer or does
    not describe its config is not checked."""
    from confluent_kafka.admin import ConfigResource

    admin = _quiet_admin(settings)
    try:
        brokers = list(admin.list_topics(timeout=5).brokers)
        if not brokers:
            return
        res = ConfigResource(ConfigResource.Type.BROKER, str(brokers[0]))
        cfg = admin.describe_configs([res])[res].result(timeout=5)
        low = int(cfg["group.min.session.timeout.ms"].value)
        high = int(cfg["group.max.session.timeout.ms"].value)
    except Exception as exc:  # best effort: the consumer reports what matters
        log.debug("broker session timeout range not read: %s", exc)
        return
    value = settings.processor.session_timeout_ms
    if not low <= value <= high:
        raise UserError(
            f"processor.session_timeout_ms is {value}, outside what the broker accepts "
            f"({low}-{high}: its group.min.session.timeout.ms / group.max.session.timeout.ms);"
            " the processor could never join its consumer group"
        )


def tune_gc() -> None:
    """The batch loop allocates millions of short-lived objects that reference counting
    frees; the cyclic collector's default young-generation threshold (700) made it scan
    the process's long-lived objects often enough to cost ~40% of planning time. Freeze
    what exists at start (modules, rules) and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def main(settings: Settings, *, driver: str | None = None) -> int:
    """``bucketsync processor [--driver kafka|faust]`` (default: ``processor.driver``)."""
    tune_gc()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    load_sync_rules(settings)  # fail fast on bad rules, before any consumer starts
    _topic_matcher(settings)
    make_schema_resolver(settings)  # a missing kafka.avro_schemas_dir, before consuming
    check_session_timeout(settings)
    try:  # never mix two key layouts under one prefix
        check_layout(settings.redis.url, settings.redis.prefix)
    except StoreLayoutMismatch as exc:
        raise UserError(str(exc)) from None
    except redis_exceptions.RedisError:
        pass  # Redis down at start: the applier waits for it (and the batch marks the layout)
    port = settings.processor.metrics_port
    if port:
        try:
            start_http_server(port, addr="127.0.0.1")
            log.info("processor metrics at http://127.0.0.1:%d/metrics", port)
        except OSError as exc:
            log.warning("metrics port %d unavailable (%s); set processor.metrics_port", port, exc)
    driver = driver or settings.processor.driver
    if driver == "faust" and settings.kafka.topic_pattern:
        # faust-streaming's aiokafka driver cannot subscribe by pattern (it subscribes to an
        # empty topic set and crashes); librdkafka follows new matching topics natively
        log.warning(
            "kafka.topic_pattern is set: using the confluent-kafka driver, since Faust "
            "cannot subscribe by pattern"
        )
        driver = "kafka"
    missing = missing_transaction_topic(settings)
    if missing:
        log.warning("%s", missing)
    if settings.kafka.consistency != "transaction":
        return run_kafka_driver(settings) if driver == "kafka" else run_faust_driver(settings)
    membership = claim_membership(settings)
    lease = hold_active_lease(settings, membership)
    try:
        if driver == "kafka":
            return run_kafka_driver(settings, membership)
        return run_faust_driver(settings, membership)
    finally:
        try:
            lease.release()  # a standby may start at once (it gets the partitions when
        except Exception as exc:  # the group hands them over)
            log.warning("releasing the active lease: %s", exc)


def missing_transaction_topic(settings: Settings) -> str | None:
    """A warning when ``kafka.consistency: transaction`` is set but ``kafka.topics`` names no
    transaction-metadata topic (Debezium's ``<prefix>.transaction``; renamed ones end in
    ``transaction`` too, by convention): then no END marker ever arrives, and every
    transaction is held for ``processor.transaction_grace_s`` and applied unverified."""
    k = settings.kafka
    if k.consistency != "transaction" or k.topic_pattern or not k.topics:
        return None
    if any(t.rsplit(".", 1)[-1].endswith("transaction") for t in k.topics):
        return None
    return (
        "kafka.consistency is 'transaction' but kafka.topics has no transaction-metadata "
        "topic (the connector's <topic.prefix>.transaction, with "
        "provide.transaction.metadata=true): transactions will be held for "
        f"processor.transaction_grace_s ({settings.processor.transaction_grace_s} s) "
        "and then applied unverified"
    )


def hold_active_lease(settings: Settings, membership: Membership) -> ActiveLease:
    """Transaction mode: wait until this processor is its group's active one, then keep
    the lease from a daemon thread (docs/design.md, "Transactions"). Standbys do not join
    the consumer group: a group would split the partitions, and a processor holding only
    some of them sees part of each transaction's events, or its END without them.

    The lease's TTL is ``processor.session_timeout_ms``: a dead holder's standby takes
    over after it, like the group's takeover of a dead member's partitions. The token is
    the static group instance id, so a holder restarted after a crash takes its lease back
    at once. A holder that finds the lease taken by another (it was stalled for longer than
    the TTL) exits at once: the survivor reads from the store's applied offsets."""
    ttl_ms = settings.processor.session_timeout_ms
    token = membership.instance_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
    lease = ActiveLease(
        settings.redis.url, settings.redis.prefix, settings.kafka.group_id, token, ttl_ms
    )
    waiting = False
    while True:
        try:
            if lease.take():
                break
            if not waiting:
                log.info(
                    "standby: processor %s is active for group %s (transaction mode); "
                    "waiting for its lease",
                    lease.holder(),
                    settings.kafka.group_id,
                )
                waiting = True
        except Exception as exc:  # Redis unreachable: keep asking
            log.warning("active lease: %s", exc)
        time.sleep(min(0.5, ttl_ms / 6000))
    log.info("active processor of group %s (transaction mode)", settings.kafka.group_id)

    def renew() -> None:
        while True:
            time.sleep(ttl_ms / 3000)
            try:
                held = lease.take()
            except Exception as exc:  # the survivor, if any, takes over after the TTL
                log.warning("renewing the active lease: %s", exc)
                continue
            if not held:
                log.error(
                    "lost the active lease of group %s to %s; exiting",
                    settings.kafka.group_id,
                    lease.holder(),
                )
                os._exit(75)

    threading.Thread(target=renew, name="active-lease", daemon=True).start()
    return lease
