"""The offset gap guard: no record is ever stepped over silently.

The store records, per topic-partition, the highest applied offset; everything at or below
it is skipped on replay. That is only sound if every record between the previous applied
offset and the new one was in the batch. A consumer can fail that silently (faust-streaming
drops prefetched or buffered records around rebalances and under stream-buffer pressure,
while its fetch position has moved past them), so the guard sits between a driver's
delivery and the applier and lets a partition's records through only as a contiguous run
after the last admitted offset.

A gap (a record whose offset is beyond the next expected one) is either

- **real**: no record exists there to read — transaction control markers, records removed
  by log compaction or retention. Confirmed by reading the partition at the gap position
  (the injected ``probe``): if the first record at or after the expected offset is the one
  we got (or a later one), the gap is real and is stepped over; or
- **dropped**: the probe finds a record inside the gap, so the consumer lost it. The rest of
  that partition's delivery is discarded and the driver is asked to seek back to the first
  missing offset (``Admission.reread``); until the missing record arrives, later records of
  that partition are discarded too (they come again after the seek). If the record does not
  come within ``reread_retry_s``, the seek is asked for again.

If the probe cannot answer (broker unreachable), the guard asks for a reread: it never steps
over a gap it could not confirm.

Pure apart from the injected probe and clock: the drivers supply both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pipeline.cdc import KafkaRecord

log = logging.getLogger("bucketsync.gaps")

#: ``probe(topic, partition, offset)`` -> offset of the first record at or after ``offset``
#: (None: nothing there yet, or the probe could not tell)
Probe = Callable[[str, int, int], Awaitable[int | None]]

Resolution = Literal["real", "reread"]


@dataclass(frozen=True)
class Gap:
    tp: str
    expected: int  # first offset that was not delivered
    got: int  # offset of the record that arrived instead
    resolution: Resolution
    first_found: int | None  # what the probe found at ``expected``


@dataclass
class Admission:
    """What the guard made of one delivery."""

    records: list[KafkaRecord] = field(default_factory=list)
    #: tp -> offset to seek back to (the first missing one)
    reread: dict[tuple[str, int], int] = field(default_factory=dict)
    gaps: list[Gap] = field(default_factory=list)
    duplicates: int = 0  # at or below the last admitted offset
    discarded: int = 0  # beyond a missing record (they come again after the seek)


@dataclass
class _Part:
    next: int  # next expected offset
    awaiting_since: float | None = None  # a reread was asked for at this time
    progress_at: float = 0.0  # when a record was last admitted (or the position set)


class OffsetGapGuard:
    def __init__(
        self,
        probe: Probe,
        *,
        reread_retry_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._probe = probe
        self._retry_s = reread_retry_s
        self._clock = clock
        self._parts: dict[tuple[str, int], _Part] = {}

    def expect(self, positions: Iterable[tuple[str, int, int]]) -> None:
        """Set the next expected offset of partitions (on assignment, after a seek of the
        driver's own: ``(topic, partition, next offset)``). Unknown partitions start at 0."""
        now = self._clock()
        for topic, part, nxt in positions:
            self._parts[(topic, part)] = _Part(nxt, progress_at=now)

    def forget(self, partitions: Iterable[tuple[str, int]]) -> None:
        for tp in partitions:
            self._parts.pop(tp, None)

    def partitions(self) -> list[tuple[str, int]]:
        """The partitions the guard tracks (those delivered or assigned since the last
        :meth:`forget`)."""
        return list(self._parts)

    def next_offset(self, topic: str, partition: int) -> int | None:
        p = self._parts.get((topic, partition))
        return p.next if p is not None else None

    async def admit(self, records: Sequence[KafkaRecord]) -> Admission:
        """Records of one delivery, in delivery order -> those that may be processed."""
        out = Admission()
        blocked: set[tuple[str, int]] = set()
        for rec in records:
            tp = (rec.topic, rec.partition)
            if tp in blocked:
                out.discarded += 1
                continue
            part = self._parts.get(tp)
            if part is None:
                part = self._parts[tp] = _Part(0, progress_at=self._clock())
            off = rec.offset
            if off == part.next:
                part.next = off + 1
                part.awaiting_since = None
                part.progress_at = self._clock()
                out.records.append(rec)
                continue
            if off < part.next:
                out.duplicates += 1
                continue
            # off > part.next: a gap
            if (
                part.awaiting_since is not None
                and self._clock() - part.awaiting_since < self._retry_s
            ):
                # already asked to read it again; these come again after the seek
                blocked.add(tp)
                out.discarded += 1
                continue
            found: int | None
            try:
                found = await self._probe(rec.topic, rec.partition, part.next)
            except Exception as exc:  # unreachable broker: do not guess, read again
                log.warning(
                    "gap probe %s/%d@%d failed: %s", rec.topic, rec.partition, part.next, exc
                )
                found = None
            if found is not None and found >= off:
                gap = Gap(f"{rec.topic}/{rec.partition}", part.next, off, "real", found)
                log.info(
                    "offset gap %s/%d %d..%d: no records there (control records or "
                    "compaction); stepping over",
                    rec.topic,
                    rec.partition,
                    part.next,
                    off - 1,
                )
                out.gaps.append(gap)
                part.next = off + 1
                part.awaiting_since = None
                part.progress_at = self._clock()
                out.records.append(rec)
                continue
            gap = Gap(f"{rec.topic}/{rec.partition}", part.next, off, "reread", found)
            log.warning(
                "offset gap %s/%d: expected %d, got %d (the partition has a record at %s): "
                "the consumer dropped records; reading again from %d",
                rec.topic,
                rec.partition,
                part.next,
                off,
                found,
                part.next,
            )
            out.gaps.append(gap)
            out.reread[tp] = part.next
            part.awaiting_since = self._clock()
            blocked.add(tp)
            out.discarded += 1
        return out

    async def check_stalled(self, highwater: dict[tuple[str, int], int]) -> Admission:
        """A dropped *tail* shows no gap: nothing arrives after it. Called when deliveries
        are idle, with the partitions' end offsets: a partition whose end lies beyond the
        next expected offset and that made no progress for ``reread_retry_s`` is read again
        from there if the probe finds a record (control markers at the end are no gap)."""
        out = Admission()
        now = self._clock()
        for tp, high in highwater.items():
            part = self._parts.get(tp)
            if part is None or high <= part.next or now - part.progress_at < self._retry_s:
                continue
            if part.awaiting_since is not None and now - part.awaiting_since < self._retry_s:
                continue
            try:
                found = await self._probe(tp[0], tp[1], part.next)
            except Exception as exc:
                log.warning("gap probe %s/%d@%d failed: %s", tp[0], tp[1], part.next, exc)
                continue  # asked again at the next idle check
            if found is None or found >= high:
                part.progress_at = now  # only control records up to the end
                continue
            log.warning(
                "partition %s/%d: nothing delivered since offset %d although it ends at %d: "
                "reading again from %d",
                tp[0],
                tp[1],
                part.next,
                high,
                part.next,
            )
            out.gaps.append(Gap(f"{tp[0]}/{tp[1]}", part.next, high, "reread", found))
            out.reread[tp] = part.next
            part.awaiting_since = now
        return out
