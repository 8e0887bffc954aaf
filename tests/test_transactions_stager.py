"""Pure tests of :class:`pipeline.transactions.TransactionStager` (invariant 7).

Events of several transactions spread over several partitions, read at different
speeds: every release must be a union of whole transactions (plus events outside any
transaction) and, per partition, a prefix of what was pushed. The checks here are
written independently of the stager's own bookkeeping.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cdc import KafkaRecord
from pipeline.transactions import TransactionStager

DATA = "p.public.accounts"
TXT = "p.transaction"


# ------------------------------------------------------------------ event builders


def begin(tx: str) -> dict[str, Any]:
    return {"action": "tx_begin", "connector": "p", "tx_id": tx}


def end(tx: str, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "action": "tx_end",
        "connector": "p",
        "tx_id": tx,
        "event_count": sum(counts.values()),
        "data_collections": counts,
    }


def upd(tx: str | None, order: int, acct: int, table: str = DATA) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "action": "upsert",
        "table": table,
        "key": {"id": acct},
        "row": {"id": acct},
    }
    if tx is not None:
        ev["tx"] = {"id": tx, "total_order": order, "data_collection_order": order}
    return ev


@dataclass
class Feed:
    """Partition logs with their offsets, and which events belong to which transaction."""

    stager: TransactionStager
    next_offset: dict[tuple[str, int], int] = field(default_factory=dict)
    tx_events: dict[str, set[tuple[str, int, int]]] = field(default_factory=dict)
    pushed: list[tuple[str, int, int]] = field(default_factory=list)
    released: list[tuple[str, int, int]] = field(default_factory=list)

    def push(
        self,
        topic: str,
        part: int,
        ev: dict[str, Any],
        tx: str | None = None,
        at: int | None = None,
    ) -> tuple[str, int, int]:
        off = self.next_offset.get((topic, part), 0) if at is None else at
        self.next_offset[(topic, part)] = off + 1
        self.stager.push(KafkaRecord(topic, part, off, b"k", b"v"), ev)
        ident = (topic, part, off)
        self.pushed.append(ident)
        if tx is not None:
            self.tx_events.setdefault(tx, set()).add(ident)
        return ident

    def release(self) -> list[tuple[str, int, int]]:
        out = [(r.topic, r.partition, r.offset) for r, _ in self.stager.release()]
        self.released.extend(out)
        check_whole_and_prefix(self.pushed, self.released, self.tx_events)
        return out


def check_whole_and_prefix(
    pushed: Sequence[tuple[str, int, int]],
    released: Sequence[tuple[str, int, int]],
    tx_events: dict[str, set[tuple[str, int, int]]],
) -> None:
    rel = set(released)
    assert len(rel) == len(released), "an event was released twice"
    assert rel <= set(pushed)
    for tx, evs in tx_events.items():
        got = evs & rel
        assert not got or got == evs, f"part of transaction {tx} released: {sorted(got)}"
    by_tp: dict[tuple[str, int], list[int]] = {}
    for t, p, o in pushed:
        by_tp.setdefault((t, p), []).append(o)
    for tp, offs in by_tp.items():
        mine = [o for t, p, o in released if (t, p) == tp]
        assert mine == offs[: len(mine)], f"{tp}: released {mine} is not a prefix of {offs}"


def stager(**kw: Any) -> TransactionStager:
    return TransactionStager(subscribed=lambda c: True, clock=kw.pop("clock", lambda: 0.0), **kw)


# ------------------------------------------------------------------ scenarios


def test_traced_scenario_complete_transactions_behind_an_incomplete_one_wait_everywhere() -> None:
    """The field trace: accounts p0 up to 227 and p1 up to 263 applied, transaction topic
    up to 743; 9374 and 9376 (END at 749, 753) have p0 events 226, 227 and p1 events 265,
    266, which sit behind 264 of transaction 9370, whose event in p2 was not read yet."""
    f = Feed(stager())
    f.push(TXT, 0, begin("9370"), "9370", at=744)
    f.push(DATA, 1, upd("9370", 1, 1), "9370", at=264)
    f.push(TXT, 0, end("9370", {DATA: 2}), "9370", at=745)  # its p2 event is late
    for tx, p0, p1, b, e in (("9374", 226, 265, 746, 749), ("9376", 227, 266, 750, 753)):
        f.push(TXT, 0, begin(tx), tx, at=b)
        f.push(DATA, 0, upd(tx, 1, 10), tx, at=p0)
        f.push(DATA, 1, upd(tx, 2, 11), tx, at=p1)
        f.push(TXT, 0, end(tx, {DATA: 2}), tx, at=e)
    assert f.release() == []
    f.push(DATA, 2, upd("9370", 2, 12), "9370", at=80)
    assert sorted(f.release()) == sorted(f.pushed)
    assert f.stager.staged == 0


def test_data_before_begin() -> None:
    f = Feed(stager())
    # tx B's data is read before its BEGIN and END; its p1 event waits behind tx A's
    f.push(DATA, 1, upd("A", 1, 1), "A")
    f.push(DATA, 0, upd("B", 1, 2), "B")
    f.push(DATA, 1, upd("B", 2, 3), "B")
    f.push(DATA, 2, upd(None, 0, 4))  # not in a transaction, nothing ahead of it
    assert f.release() == [(DATA, 2, 0)]
    f.push(TXT, 0, begin("A"), "A")
    f.push(TXT, 0, end("A", {DATA: 2}), "A")  # A's second event (p2) is still unread
    f.push(TXT, 0, begin("B"), "B")
    f.push(TXT, 0, end("B", {DATA: 2}), "B")
    assert f.release() == []
    f.push(DATA, 2, upd("A", 2, 5), "A")
    assert len(f.release()) == 8
    assert f.stager.staged == 0


def test_end_before_data() -> None:
    f = Feed(stager())
    f.push(TXT, 0, begin("A"), "A")
    f.push(TXT, 0, end("A", {DATA: 2}), "A")
    f.push(TXT, 0, begin("B"), "B")
    f.push(TXT, 0, end("B", {DATA: 2}), "B")
    assert f.release() == []
    f.push(DATA, 0, upd("B", 1, 1), "B")
    assert f.release() == []
    f.push(DATA, 1, upd("A", 1, 2), "A")
    f.push(DATA, 1, upd("B", 2, 3), "B")  # B complete, but behind A in p1
    assert f.release() == []
    f.push(DATA, 2, upd("A", 2, 4), "A")
    assert len(f.release()) == 8


def test_neither_begin_nor_end_read() -> None:
    f = Feed(stager())
    f.push(DATA, 0, upd("A", 1, 1), "A")  # A: neither BEGIN nor END read yet
    f.push(DATA, 1, upd("A", 2, 2), "A")
    f.push(DATA, 1, upd(None, 0, 3))  # behind A in p1: waits for it
    f.push(DATA, 2, upd(None, 0, 4))
    f.push(DATA, 2, upd("B", 1, 5), "B")  # B: complete, but its p1 event is behind A's
    f.push(DATA, 1, upd("B", 2, 6), "B")
    f.push(TXT, 0, begin("B"), "B")
    f.push(TXT, 0, end("B", {DATA: 2}), "B")
    assert f.release() == [(DATA, 2, 0)]
    f.push(TXT, 0, begin("A"), "A")
    assert f.release() == []
    f.push(TXT, 0, end("A", {DATA: 2}), "A")
    assert len(f.release()) == 9
    assert f.stager.staged == 0


def _speed_logs() -> dict[tuple[str, int], list[tuple[dict[str, Any], str | None]]]:
    txs = [("T1", [0, 1]), ("T2", [1, 2]), ("T3", [0, 2]), ("T4", [0, 1, 2]), ("T5", [2])]
    logs: dict[tuple[str, int], list[tuple[dict[str, Any], str | None]]] = {}
    for tx, parts in txs:
        logs.setdefault((TXT, 0), []).append((begin(tx), tx))
        for n, p in enumerate(parts, 1):
            logs.setdefault((DATA, p), []).append((upd(tx, n, 100 * p + n), tx))
            logs[(DATA, p)].append((upd(None, 0, 100 * p), None))  # a heartbeat-like event
        logs[(TXT, 0)].append((end(tx, {DATA: len(parts)}), tx))
    return logs


def test_partitions_read_one_after_another_in_every_order() -> None:
    logs = _speed_logs()
    for order in itertools.permutations(sorted(logs)):
        f = Feed(stager())
        for tp in order:
            for ev, tx in logs[tp]:
                f.push(tp[0], tp[1], ev, tx)
                f.release()
        assert sorted(f.released) == sorted(f.pushed), order
        assert f.stager.staged == 0


def test_partitions_read_at_different_rates() -> None:
    logs = _speed_logs()
    tps = sorted(logs)
    for rates in itertools.product([1, 2, 3], repeat=len(tps)):
        f = Feed(stager())
        pos = dict.fromkeys(tps, 0)
        while any(pos[tp] < len(logs[tp]) for tp in tps):
            for tp, rate in zip(tps, rates, strict=True):
                for ev, tx in logs[tp][pos[tp] : pos[tp] + rate]:
                    f.push(tp[0], tp[1], ev, tx)
                pos[tp] += rate
            f.release()
        assert sorted(f.released) == sorted(f.pushed), rates


def test_complete_transactions_come_out_in_end_order() -> None:
    f = Feed(stager())
    f.push(DATA, 0, upd("B", 1, 1), "B")  # read first, but B commits after A
    f.push(DATA, 1, upd("A", 1, 2), "A")
    f.push(DATA, 2, upd("A", 2, 3), "A")
    f.push(TXT, 0, begin("A"), "A")
    f.push(TXT, 0, end("A", {DATA: 2}), "A")
    f.push(TXT, 0, begin("B"), "B")
    f.push(TXT, 0, end("B", {DATA: 1}), "B")
    out = f.release()
    assert out == [
        (TXT, 0, 0),  # BEGIN A
        (DATA, 1, 0),
        (DATA, 2, 0),
        (TXT, 0, 1),  # END A
        (TXT, 0, 2),  # BEGIN B
        (DATA, 0, 0),
        (TXT, 0, 3),  # END B
    ]


def test_complete_transactions_holding_each_other_are_released_together() -> None:
    """p0 has A then B, p1 has B then A (e.g. after a connector replay): neither is at the
    head of both partitions, but both are complete, so both go out in one release."""
    f = Feed(stager())
    f.push(DATA, 0, upd("A", 1, 1), "A")
    f.push(DATA, 0, upd("B", 1, 2), "B")
    f.push(DATA, 1, upd("B", 2, 3), "B")
    f.push(DATA, 1, upd("A", 2, 4), "A")
    f.push(TXT, 0, end("A", {DATA: 2}), "A")
    assert f.release() == []
    f.push(TXT, 0, end("B", {DATA: 2}), "B")
    assert sorted(f.release()) == sorted(f.pushed)


def test_forget_drops_a_partition_that_is_read_again() -> None:
    f = Feed(stager())
    f.push(TXT, 0, begin("A"), "A")
    f.push(DATA, 0, upd("A", 1, 1), "A")
    f.push(DATA, 1, upd("A", 2, 2), "A")
    f.push(DATA, 1, upd(None, 0, 3))
    assert f.release() == [] and f.stager.staged == 4
    f.stager.forget(iter([f"{DATA}/1", "other/0"]))  # revoked, reassigned, read again
    assert f.stager.staged == 2
    f.push(TXT, 0, end("A", {DATA: 2}), "A")
    assert f.stager.release() == []  # A's p1 event is gone: A is incomplete again
    f.stager.push(KafkaRecord(DATA, 1, 0, b"k", b"v"), upd("A", 2, 2))
    f.stager.push(KafkaRecord(DATA, 1, 1, b"k", b"v"), upd(None, 0, 3))
    out = [(r.topic, r.partition, r.offset) for r, _ in f.stager.release()]
    assert sorted(out) == [(DATA, 0, 0), (DATA, 1, 0), (DATA, 1, 1), (TXT, 0, 0), (TXT, 0, 1)]
    assert f.stager.staged == 0
    # a forgotten transaction's only events: nothing of it remains
    f.push(DATA, 2, upd("C", 1, 9), "C")
    f.stager.forget([f"{DATA}/2"])
    assert f.stager.staged == 0 and f.stager.release() == []


def test_a_partition_read_again_without_forget_is_not_staged_twice() -> None:
    st = stager()
    for _ in range(2):  # the driver sought p1 back to 0 and re-delivered it
        st.push(KafkaRecord(DATA, 1, 0, b"k", b"v"), upd("A", 1, 1))
        st.push(KafkaRecord(DATA, 1, 1, b"k", b"v"), upd("A", 2, 2))
        assert st.release() == []
    assert st.staged == 2
    st.push(KafkaRecord(TXT, 0, 0, b"k", b"v"), end("A", {DATA: 2}))
    out = [(r.topic, r.partition, r.offset) for r, _ in st.release()]
    assert sorted(out) == [(DATA, 1, 0), (DATA, 1, 1), (TXT, 0, 0)]


def test_grace_releases_the_blocker_and_the_complete_transaction_behind_it_together() -> None:
    now = [0.0]
    f = Feed(stager(grace_s=10, clock=lambda: now[0]))
    f.push(DATA, 1, upd("A", 1, 1), "A")  # A: END never read
    f.push(DATA, 0, upd("B", 1, 2), "B")
    f.push(DATA, 1, upd("B", 2, 3), "B")
    f.push(TXT, 0, begin("B"), "B")
    f.push(TXT, 0, end("B", {DATA: 2}), "B")
    assert f.release() == []
    now[0] = 11
    assert len(f.release()) == 5
    assert f.stager.degraded == 1 and f.stager.staged == 0


def test_an_event_arriving_after_a_grace_release_is_applied_not_dropped() -> None:
    now = [0.0]
    st = stager(grace_s=10, clock=lambda: now[0])
    st.push(KafkaRecord(DATA, 0, 0, b"k", b"v"), upd("A", 1, 1))
    now[0] = 11
    assert len(st.release()) == 1
    st.push(KafkaRecord(DATA, 1, 0, b"k", b"v"), upd("A", 2, 2))
    ((_, ev),) = st.release()
    assert ev["action"] == "upsert"
    st.push(KafkaRecord(TXT, 0, 0, b"k", b"v"), end("A", {DATA: 2}))
    assert len(st.release()) == 1  # now complete: later copies are replays
    st.push(KafkaRecord(DATA, 1, 1, b"k", b"v"), upd("A", 2, 2))
    ((_, ev),) = st.release()
    assert ev["action"] == "ignore"
    assert st.degraded == 1


def test_cap_releases_everything_and_later_events_flow() -> None:
    st = stager(max_staged_events=3)
    for i in range(4):
        st.push(KafkaRecord(DATA, i % 3, i, b"k", b"v"), upd("A", i + 1, i))
    assert len(st.release()) == 4 and st.degraded == 1 and st.staged == 0
    st.push(KafkaRecord(DATA, 0, 9, b"k", b"v"), upd("A", 5, 5))
    assert len(st.release()) == 1


# ------------------------------------------------------------------ property


@dataclass
class World:
    logs: dict[tuple[str, int], list[tuple[dict[str, Any], str | None]]]
    commit_order: dict[str, int]


@st.composite
def worlds(draw: Any) -> World:
    n_tx = draw(st.integers(1, 8))
    logs: dict[tuple[str, int], list[tuple[dict[str, Any], str | None]]] = {
        (TXT, 0): [],
        (DATA, 0): [],
        (DATA, 1): [],
        (DATA, 2): [],
    }
    order: dict[str, int] = {}
    for i in range(n_tx):
        tx = str(1000 + i)
        order[tx] = i
        # events outside transactions (snapshot reads, heartbeats) between commits
        for p in draw(st.lists(st.integers(0, 2), max_size=2)):
            logs[(DATA, p)].append((upd(None, 0, p), None))
        parts = draw(st.lists(st.integers(0, 2), min_size=0, max_size=4))
        other = draw(st.integers(0, 2))  # events of a collection we do not consume
        logs[(TXT, 0)].append((begin(tx), tx))
        for n, p in enumerate(parts, 1):
            logs[(DATA, p)].append((upd(tx, n, 10 * p + n), tx))
        counts = {DATA: len(parts)}
        if other:
            counts["p.public.ignored"] = other
        logs[(TXT, 0)].append((end(tx, counts), tx))
    return World(logs, order)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(world=worlds(), seed=st.integers(0, 2**32 - 1), chunk_max=st.integers(1, 12))
def test_every_release_is_whole_transactions_and_partition_prefixes(
    world: World, seed: int, chunk_max: int
) -> None:
    rnd = random.Random(seed)
    # one random interleaving of the partitions, each partition's order kept
    cursors = {tp: 0 for tp in world.logs}
    reading: list[tuple[tuple[str, int], int]] = []
    while True:
        left = [tp for tp, c in cursors.items() if c < len(world.logs[tp])]
        if not left:
            break
        tp = rnd.choice(left)
        reading.append((tp, cursors[tp]))
        cursors[tp] += 1
    sub = {DATA, TXT}
    f = Feed(TransactionStager(subscribed=lambda c: c in sub, clock=lambda: 0.0))
    i = 0
    while i < len(reading):
        chunk = reading[i : i + rnd.randint(1, chunk_max)]
        i += len(chunk)
        for (topic, part), off in chunk:
            ev, tx = world.logs[(topic, part)][off]
            f.push(topic, part, ev, tx, at=off)
        batch = f.release()  # checks wholeness and prefixes
        assert_commit_order(batch, world)
    assert sorted(f.released) == sorted(f.pushed)
    assert f.stager.staged == 0


def assert_commit_order(batch: Iterable[tuple[str, int, int]], world: World) -> None:
    """Transaction events of one release come out in commit order, BEGIN first, END last."""
    keys = []
    for topic, part, off in batch:
        ev, tx = world.logs[(topic, part)][off]
        if tx is None:
            continue
        a = ev["action"]
        within = -1 if a == "tx_begin" else 10**9 if a == "tx_end" else ev["tx"]["total_order"]
        keys.append((world.commit_order[tx], within))
    assert keys == sorted(keys)
