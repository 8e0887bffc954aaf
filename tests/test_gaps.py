"""The offset gap guard (pipeline/gaps.py), without services: a delivery double drops or
reorders records; the partition's real content is a list of existing offsets."""

from __future__ import annotations

import random

import pytest

from pipeline.cdc import KafkaRecord
from pipeline.gaps import OffsetGapGuard


def rec(topic: str, part: int, off: int) -> KafkaRecord:
    return KafkaRecord(topic=topic, partition=part, offset=off, key=b"k", value=b"v")


class Log:
    """What the broker holds: existing offsets per partition (gaps = control records)."""

    def __init__(self, offsets: dict[tuple[str, int], list[int]]):
        self.offsets = {tp: sorted(o) for tp, o in offsets.items()}
        self.probes = 0

    async def probe(self, topic: str, part: int, off: int) -> int | None:
        self.probes += 1
        return next((o for o in self.offsets[(topic, part)] if o >= off), None)


def offsets(records: list[KafkaRecord]) -> list[int]:
    return [r.offset for r in records]


async def test_contiguous_delivery_passes_without_probing() -> None:
    log = Log({("t", 0): list(range(10))})
    g = OffsetGapGuard(log.probe)
    adm = await g.admit([rec("t", 0, i) for i in range(10)])
    assert offsets(adm.records) == list(range(10))
    assert not adm.gaps and not adm.reread and log.probes == 0


async def test_dropped_record_is_read_again_not_skipped() -> None:
    log = Log({("t", 0): list(range(10))})
    clock = [0.0]
    g = OffsetGapGuard(log.probe, clock=lambda: clock[0])
    # the consumer drops 4 and 5 (as Faust did under buffer pressure)
    adm = await g.admit([rec("t", 0, i) for i in (0, 1, 2, 3, 6, 7)])
    assert offsets(adm.records) == [0, 1, 2, 3]
    assert adm.reread == {("t", 0): 4}
    assert [(x.expected, x.got, x.resolution) for x in adm.gaps] == [(4, 6, "reread")]
    # what was prefetched before the seek keeps arriving: discarded, no new probe
    probes = log.probes
    adm = await g.admit([rec("t", 0, 8), rec("t", 0, 9)])
    assert adm.records == [] and adm.discarded == 2 and not adm.reread
    assert log.probes == probes
    # after the seek: 4.. arrives and passes
    adm = await g.admit([rec("t", 0, i) for i in range(4, 10)])
    assert offsets(adm.records) == [4, 5, 6, 7, 8, 9]


async def test_real_gap_is_stepped_over_once_confirmed() -> None:
    # offsets 3 and 4 are transaction control markers: no records there
    log = Log({("t", 0): [0, 1, 2, 5, 6]})
    g = OffsetGapGuard(log.probe)
    adm = await g.admit([rec("t", 0, i) for i in (0, 1, 2, 5, 6)])
    assert offsets(adm.records) == [0, 1, 2, 5, 6]
    assert [(x.expected, x.got, x.resolution) for x in adm.gaps] == [(3, 5, "real")]
    assert not adm.reread


async def test_start_of_a_partition_removed_by_retention() -> None:
    log = Log({("t", 0): [100, 101]})
    g = OffsetGapGuard(log.probe)
    adm = await g.admit([rec("t", 0, 100), rec("t", 0, 101)])
    assert offsets(adm.records) == [100, 101]
    assert adm.gaps[0].resolution == "real"


async def test_expected_position_after_assignment() -> None:
    log = Log({("t", 0): list(range(50))})
    g = OffsetGapGuard(log.probe)
    g.expect([("t", 0, 20)])
    adm = await g.admit([rec("t", 0, 18), rec("t", 0, 19), rec("t", 0, 20), rec("t", 0, 22)])
    assert offsets(adm.records) == [20]
    assert adm.duplicates == 2
    assert adm.reread == {("t", 0): 21}


async def test_probe_failure_never_steps_over() -> None:
    async def broken(topic: str, part: int, off: int) -> int | None:
        raise RuntimeError("broker down")

    g = OffsetGapGuard(broken)
    adm = await g.admit([rec("t", 0, 0), rec("t", 0, 2)])
    assert offsets(adm.records) == [0]
    assert adm.reread == {("t", 0): 1}


async def test_reread_asked_again_when_the_record_does_not_come() -> None:
    log = Log({("t", 0): list(range(10))})
    clock = [0.0]
    g = OffsetGapGuard(log.probe, reread_retry_s=5.0, clock=lambda: clock[0])
    assert (await g.admit([rec("t", 0, 0), rec("t", 0, 3)])).reread == {("t", 0): 1}
    clock[0] = 1.0
    assert (await g.admit([rec("t", 0, 4)])).reread == {}
    clock[0] = 7.0
    assert (await g.admit([rec("t", 0, 5)])).reread == {("t", 0): 1}


async def test_other_partitions_flow_while_one_rereads() -> None:
    log = Log({("a", 0): list(range(5)), ("b", 0): list(range(5))})
    g = OffsetGapGuard(log.probe)
    adm = await g.admit([rec("a", 0, 0), rec("b", 0, 0), rec("a", 0, 2), rec("b", 0, 1)])
    assert [(r.topic, r.offset) for r in adm.records] == [("a", 0), ("b", 0), ("b", 1)]
    assert adm.reread == {("a", 0): 1}


@pytest.mark.parametrize("seed", range(30))
async def test_lossy_delivery_double_ends_with_every_record_once(seed: int) -> None:
    """A delivery that drops random records and seeks back on request: everything that
    exists is admitted exactly once, in order, and nothing that does not exist."""
    rnd = random.Random(seed)
    tps = [("t", 0), ("t", 1), ("u", 0)]
    # each partition has some control-marker holes
    content = {tp: [o for o in range(60) if rnd.random() > 0.1] for tp in tps}
    log = Log(content)
    g = OffsetGapGuard(log.probe, reread_retry_s=0.0)
    position = {tp: 0 for tp in tps}
    admitted: dict[tuple[str, int], list[int]] = {tp: [] for tp in tps}
    for _ in range(500):
        batch = []
        for tp in tps:
            ahead = [o for o in content[tp] if o >= position[tp]][: rnd.randint(0, 8)]
            if ahead:
                position[tp] = ahead[-1] + 1
            batch.extend(rec(tp[0], tp[1], o) for o in ahead if rnd.random() > 0.15)
        rnd.shuffle(batch)  # partitions interleave; order within one is kept below
        batch.sort(key=lambda r: (r.topic, r.partition, r.offset))
        adm = await g.admit(batch)
        for r in adm.records:
            admitted[(r.topic, r.partition)].append(r.offset)
        for tp, off in adm.reread.items():
            position[tp] = off
        if not batch:  # idle: a dropped tail shows no gap; the idle check finds it
            high = {tp: content[tp][-1] + 1 for tp in tps}
            for tp, off in (await g.check_stalled(high)).reread.items():
                position[tp] = off
        if all(admitted[tp] == content[tp] for tp in tps):
            break
    assert admitted == content


async def test_dropped_tail_is_found_when_idle() -> None:
    log = Log({("t", 0): list(range(6))})
    clock = [0.0]
    g = OffsetGapGuard(log.probe, reread_retry_s=5.0, clock=lambda: clock[0])
    assert offsets((await g.admit([rec("t", 0, i) for i in range(4)])).records) == [0, 1, 2, 3]
    # 4 and 5 never arrive; nothing after them does either
    assert (await g.check_stalled({("t", 0): 6})).reread == {}  # too early to tell
    clock[0] = 6.0
    adm = await g.check_stalled({("t", 0): 6})
    assert adm.reread == {("t", 0): 4} and adm.gaps[0].resolution == "reread"


async def test_control_records_at_the_end_are_no_stall() -> None:
    log = Log({("t", 0): [0, 1]})  # offsets 2, 3: commit markers; the end offset is 4
    clock = [0.0]
    g = OffsetGapGuard(log.probe, reread_retry_s=1.0, clock=lambda: clock[0])
    await g.admit([rec("t", 0, 0), rec("t", 0, 1)])
    clock[0] = 2.0
    assert (await g.check_stalled({("t", 0): 4})).reread == {}
