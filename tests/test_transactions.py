"""Invariant 7: with ``consistency: transaction`` a checkpoint never exposes part of a
source transaction. Unit tests of the stager, then the real processor on Kafka + Redis."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.cdc import KafkaRecord
from pipeline.transactions import TransactionStager
from tests.bank import BANK_RULES, account_event, bank_marker
from tests.pipeline_helpers import produce, run_processor, store_view, write_rules

RULES = """
bucket_definitions:
  by_customer:
    parameters: SELECT request.user_id() AS customer_id
    data:
      - SELECT id, customer_id, total FROM orders WHERE customer_id = bucket.customer_id
      - SELECT id, customer_id, sku FROM order_lines WHERE customer_id = bucket.customer_id
"""


def rec(topic: str, offset: int) -> KafkaRecord:
    return KafkaRecord(topic, 0, offset, b"k", b"v")


def data(table: str, tx: str | None, order: int, rid: int) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "action": "upsert",
        "table": table,
        "key": {"id": rid},
        "row": {"id": rid},
    }
    if tx:
        ev["tx"] = {"id": tx, "total_order": order, "data_collection_order": order}
    return ev


def end(tx: str, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "action": "tx_end",
        "connector": "p",
        "tx_id": tx,
        "event_count": sum(counts.values()),
        "data_collections": counts,
    }


def test_stager_holds_until_end_and_counts_then_releases_whole_transaction() -> None:
    st = TransactionStager(subscribed=lambda c: True)
    st.push(rec("p.transaction", 0), {"action": "tx_begin", "connector": "p", "tx_id": "1"})
    st.push(rec("p.s.a", 0), data("p.s.a", "1", 1, 1))
    st.push(rec("p.s.b", 0), data("p.s.b", "1", 2, 2))
    assert st.release() == []
    st.push(rec("p.transaction", 1), end("1", {"p.s.a": 1, "p.s.b": 2}))
    assert st.release() == []  # END read, but one event of p.s.b is still missing
    st.push(rec("p.s.b", 1), data("p.s.b", "1", 3, 3))
    out = st.release()
    assert sorted((r.topic, r.offset) for r, _ in out) == [
        ("p.s.a", 0),
        ("p.s.b", 0),
        ("p.s.b", 1),
        ("p.transaction", 0),
        ("p.transaction", 1),
    ]
    assert st.staged == 0
    # a replayed event of an applied transaction keeps its offset but has no effect
    st.push(rec("p.s.a", 5), data("p.s.a", "1", 1, 1))
    ((_, ev),) = st.release()
    assert ev["action"] == "ignore"


def test_stager_releases_partitions_only_as_prefixes() -> None:
    st = TransactionStager(subscribed=lambda c: True)
    st.push(rec("p.s.a", 0), data("p.s.a", "1", 1, 1))  # tx 1 open
    st.push(rec("p.s.a", 1), data("p.s.a", None, 0, 9))  # not transactional, but behind it
    st.push(rec("p.s.c", 0), data("p.s.c", None, 0, 8))  # other partition: free
    assert [(r.topic, r.offset) for r, _ in st.release()] == [("p.s.c", 0)]
    st.push(rec("p.transaction", 0), end("1", {"p.s.a": 1}))
    assert [(r.topic, r.offset) for r, _ in st.release()] == [
        ("p.s.a", 0),
        ("p.s.a", 1),
        ("p.transaction", 0),
    ]


def test_stager_grace_period_and_cap() -> None:
    now = [0.0]
    st = TransactionStager(
        subscribed=lambda c: True, grace_s=10, clock=lambda: now[0], max_staged_events=3
    )
    st.push(rec("p.s.a", 0), data("p.s.a", "1", 1, 1))
    assert st.release() == []
    now[0] = 11
    assert len(st.release()) == 1 and st.degraded == 1
    for i in range(4):
        st.push(rec("p.s.b", i), data("p.s.b", "2", i + 1, i))
    assert len(st.release()) == 4  # over the cap: applied at once
    assert st.degraded == 2


def _dbz(
    prefix: str, table: str, rid: int, row: dict[str, Any], tx: str, order: int
) -> tuple[bytes, bytes]:
    value = {
        "before": None,
        "after": row,
        "source": {
            "connector": "postgresql",
            "name": prefix,
            "schema": "public",
            "table": table,
            "db": "app",
        },
        "op": "c",
        "ts_ms": 1,
        "transaction": {"id": tx, "total_order": order, "data_collection_order": order},
    }
    return orjson.dumps({"id": rid}), orjson.dumps(value)


def _marker(
    prefix: str, tx: str, status: str, counts: dict[str, int] | None
) -> tuple[bytes, bytes]:
    value = {
        "status": status,
        "id": tx,
        "event_count": None if counts is None else sum(counts.values()),
        "data_collections": None
        if counts is None
        else [{"data_collection": k, "event_count": v} for k, v in counts.items()],
        "ts_ms": 1,
    }
    return orjson.dumps({"id": tx}), orjson.dumps(value)


@pytest.mark.stack
def test_processor_never_exposes_part_of_a_transaction(
    make_settings, create_topic, ns, tmp_path: Path
) -> None:
    prefix = ns.topic("app")
    orders = create_topic(f"{prefix}.public.orders")
    lines = create_topic(f"{prefix}.public.order_lines")
    txt = create_topic(f"{prefix}.transaction")
    (tmp_path / "r.yaml").write_text(RULES)
    s = make_settings(
        kafka={"topics": [orders, lines, txt], "consistency": "transaction"},
        sync_rules=write_rules(tmp_path, RULES),
        compaction={"interval_s": 0},
    )
    bucket = 'by_customer["c1"]'
    bs = s.kafka.bootstrap_servers
    produce(bs, txt, [_marker(prefix, "77", "BEGIN", None)])
    produce(
        bs,
        orders,
        [_dbz(prefix, "orders", 1, {"id": 1, "customer_id": "c1", "total": "9.50"}, "77", 1)],
    )
    produce(
        bs,
        lines,
        [_dbz(prefix, "order_lines", 11, {"id": 11, "customer_id": "c1", "sku": "A"}, "77", 2)],
    )
    asyncio.run(run_processor(s, 3, idle_exit_s=3))
    assert asyncio.run(store_view(s, [bucket]))[bucket]["ops"] == []  # nothing of tx 77 yet

    produce(
        bs,
        lines,
        [_dbz(prefix, "order_lines", 12, {"id": 12, "customer_id": "c1", "sku": "B"}, "77", 3)],
    )
    produce(bs, txt, [_marker(prefix, "77", "END", {"public.orders": 1, "public.order_lines": 2})])
    asyncio.run(run_processor(s, 5, idle_exit_s=3))
    view = asyncio.run(store_view(s, [bucket]))[bucket]
    assert [op[4] for op in view["ops"]] == ["1", "11", "12"]  # all three, in one step
    assert len({op[0] for op in view["ops"]}) == 3


def test_reset_done_takes_the_stores_word_for_what_was_applied() -> None:
    """A transaction whose batch was lost in a store outage is read again: it must be
    staged and applied, not dropped as a replay of itself; one the store has applied is a
    replay, in a new stager too."""
    st = TransactionStager(subscribed=lambda t: True, clock=lambda: 0.0)
    st.push(rec("o", 0), data("orders", "t1", 1, 1))
    st.push(rec("tx", 0), end("t1", {"orders": 1}))
    assert len(st.release()) == 2 and st.take_done() == ["t1"]
    st.reset_done([])  # the store has not got it (the batch was lost): read again
    st.push(rec("o", 0), data("orders", "t1", 1, 1))
    st.push(rec("tx", 0), end("t1", {"orders": 1}))
    assert [ev["action"] for _r, ev in st.release()] == ["upsert", "tx_end"]
    fresh = TransactionStager(subscribed=lambda t: True, clock=lambda: 0.0)
    fresh.reset_done(["t1"])  # applied before this stager existed
    fresh.push(rec("o", 1), data("orders", "t1", 1, 1))
    assert [ev.get("reason") for _r, ev in fresh.release()] == ["replayed_transaction"]


@pytest.mark.stack
def test_a_replay_after_a_restart_is_known_as_one(
    make_settings, create_topic, ns, tmp_path: Path
) -> None:
    """A restarted Debezium connector sends its last records again. A processor started
    after the transaction was applied (a restart, or another processor) staged such a
    replay as a new transaction, held it for transaction_grace_s (60 s) and everything
    after it on its partitions with it, then applied the old row images "unverified"
    (found by scripts/qa-formats.py --tx --replays). The store now keeps the latest
    completed transactions (P:tx_done), and a new processor knows their replays."""
    prefix = ns.topic("app")
    orders = create_topic(f"{prefix}.public.orders")
    txt = create_topic(f"{prefix}.transaction")
    s = make_settings(
        kafka={"topics": [orders, txt], "consistency": "transaction"},
        sync_rules=write_rules(tmp_path, RULES),
        compaction={"interval_s": 0},
        processor={"transaction_grace_s": 60},
    )
    bucket = 'by_customer["c1"]'
    bs = s.kafka.bootstrap_servers
    first = _dbz(prefix, "orders", 1, {"id": 1, "customer_id": "c1", "total": "9.50"}, "77", 1)
    produce(bs, txt, [_marker(prefix, "77", "BEGIN", None)])
    produce(bs, orders, [first])
    produce(bs, txt, [_marker(prefix, "77", "END", {"public.orders": 1})])
    asyncio.run(run_processor(s, 3, idle_exit_s=3))
    ops = asyncio.run(store_view(s, [bucket]))[bucket]["ops"]
    assert [op[4] for op in ops] == ["1"]
    # the connector restarts and sends tx 77's event again; then a new transaction follows
    later = _dbz(prefix, "orders", 2, {"id": 2, "customer_id": "c1", "total": "1.00"}, "78", 1)
    produce(bs, orders, [first, later])
    produce(bs, txt, [_marker(prefix, "78", "BEGIN", None)])
    produce(bs, txt, [_marker(prefix, "78", "END", {"public.orders": 1})])
    asyncio.run(run_processor(s, 4, idle_exit_s=3))  # a new processor: a restart
    ops2 = asyncio.run(store_view(s, [bucket]))[bucket]["ops"]
    # the replay changed nothing, and tx 78 behind it was not held for the grace period
    assert ops2[: len(ops)] == ops and [op[4] for op in ops2[len(ops) :]] == ["2"]


# ---------------------------------------------------------------- transfers, 3 partitions

USERS = 5
START = 1000  # every account's opening balance


@pytest.mark.stack
def test_transfers_over_three_partitions_never_show_a_wrong_balance_sum(
    make_settings, create_topic, ns, tmp_path: Path
) -> None:
    """1,500 transfers between a user's accounts (one account per partition, 2-3 updates
    each), produced so that the partitions and the transaction topic are read at
    different speeds: one partition lags a wave behind, and waves alternate between data
    before BEGIN/END and END before data. After every applied batch (each one is a
    checkpoint) the sum of each user's stored balances must be the opening total."""
    import functools
    import random

    from confluent_kafka import Consumer, Producer, TopicPartition

    from pipeline.core import row_key
    from pipeline.membership import Membership
    from pipeline.processor import BatchApplier, DeadLetterSink, KafkaLoopDriver, load_sync_rules
    from pipeline.store import Store

    prefix = ns.topic("bank")
    accounts = create_topic(f"{prefix}.public.accounts", partitions=3)
    txt = create_topic(f"{prefix}.transaction")
    s = make_settings(
        kafka={"topics": [accounts, txt], "consistency": "transaction"},
        # source_rows "all": the check below reads each account's stored source row
        processor={
            "batch_max_events": 16,
            "batch_max_wait_ms": 5,
            "driver": "kafka",
            "source_rows": "all",
        },
        sync_rules=write_rules(tmp_path, BANK_RULES),
        compaction={"interval_s": 0},
    )
    rnd = random.Random(20240611)
    ids = list(range(USERS * 3))  # account a belongs to user a // 3 and lives in partition a % 3
    balance = dict.fromkeys(ids, START)

    def row(a: int) -> dict[str, Any]:
        return {"id": a, "user_id": f"u{a // 3}", "balance": balance[a]}

    lsn = iter(range(10_000, 10**9))
    snapshot = {
        p: [account_event(prefix, row(a), None, next(lsn)) for a in ids if a % 3 == p]
        for p in range(3)
    }
    waves: list[tuple[list[tuple[bytes, bytes]], dict[int, list[tuple[bytes, bytes]]]]] = []
    transfers, per_wave = 1500, 50
    for w in range(transfers // per_wave):
        markers: list[tuple[bytes, bytes]] = []
        data: dict[int, list[tuple[bytes, bytes]]] = {0: [], 1: [], 2: []}
        for i in range(per_wave):
            tx = str(5000 + w * per_wave + i)
            user = rnd.randrange(USERS)
            accts = rnd.sample([3 * user, 3 * user + 1, 3 * user + 2], rnd.choice([2, 3]))
            markers.append(bank_marker(tx, next(lsn), None))
            moved = 0
            for n, a in enumerate(accts, 1):
                if n < len(accts):
                    amount = rnd.randint(1, 50)
                    balance[a] -= amount
                    moved += amount
                else:
                    balance[a] += moved
                data[a % 3].append(account_event(prefix, row(a), (tx, n), next(lsn)))
            markers.append(bank_marker(tx, next(lsn), len(accts)))
        waves.append((markers, data))
    final = dict(balance)

    def produce_waves(p: Producer) -> None:
        # Each partition gets its transfers in commit order (as Debezium writes them), but
        # partition `lag` of wave w gets wave w's data only with wave w + 1, after the other
        # partitions' data of wave w + 1: meanwhile the transfers that touch it are open.
        held: tuple[int, list[tuple[bytes, bytes]]] | None = None
        for w, (markers, data) in enumerate(waves):
            lag = w % 3
            steps: list[tuple[str, int, list[tuple[bytes, bytes]]]] = [
                (accounts, q, data[q]) for q in range(3) if q != lag and (not held or q != held[0])
            ]
            if w % 2:  # BEGIN/END first, then the data
                steps.insert(0, (txt, 0, markers))
            else:  # the data first (before its BEGIN), then BEGIN/END
                steps.append((txt, 0, markers))
            if held is not None:  # the lagging partition catches up
                steps.append((accounts, held[0], held[1] + data[held[0]]))
            held = (lag, data[lag])
            for topic, part, msgs in steps:
                for k, v in msgs:
                    p.produce(topic, key=k, value=v, partition=part)
                p.flush(10)
                time.sleep(0.003)
        assert held is not None
        for k, v in held[1]:
            p.produce(accounts, key=k, value=v, partition=held[0])
        assert p.flush(30) == 0

    async def go() -> tuple[int, list[str], dict[int, int], int]:
        store = Store.from_settings(s)
        applier = BatchApplier(s, store, load_sync_rules(s), dead_letters=DeadLetterSink(s))
        driver = KafkaLoopDriver(s, applier, Membership(None))
        keys = {a: store.source_row_ref(row_key(accounts, {"id": a})) for a in ids}
        target: dict[str, int] = {}
        checkpoints = 0
        violations: list[str] = []
        latest: dict[int, int] = {}
        apply = store.apply

        async def apply_and_check(batch: Any) -> Any:
            nonlocal checkpoints
            res = await apply(batch)
            if res.status != "ok":
                return res
            checkpoints += 1
            pipe = store.r.pipeline(transaction=True)  # the checkpoint's state, atomically
            for a in ids:
                pipe.hget(*keys[a])
            pipe.hgetall(store.k("offsets"))
            *raw, offsets = await pipe.execute()
            rows = {a: orjson.loads(v) for a, v in zip(ids, raw, strict=True) if v is not None}
            latest.clear()
            latest.update({a: int(r["balance"]) for a, r in rows.items()})
            for u in range(USERS):
                mine = [a for a in rows if a // 3 == u]
                total = sum(int(rows[a]["balance"]) for a in mine)
                if total != START * len(mine):
                    violations.append(
                        f"checkpoint {res.checkpoint}: user u{u} holds {total} in {len(mine)} "
                        f"accounts (offsets {offsets})"
                    )
            return res

        store.apply = apply_and_check  # type: ignore[method-assign]
        loop = asyncio.get_running_loop()
        producer = Producer({"bootstrap.servers": s.kafka.bootstrap_servers, "linger.ms": 1})
        probe = Consumer(
            {"bootstrap.servers": s.kafka.bootstrap_servers, "group.id": ns.group_id + "-w"}
        )
        for part, msgs in snapshot.items():
            for k, v in msgs:
                producer.produce(accounts, key=k, value=v, partition=part)
        assert producer.flush(30) == 0
        run = asyncio.create_task(driver.run())
        try:
            # the consumer is reading once the opening balances are applied: then the
            # transfers come in waves, read while they are produced
            deadline = time.monotonic() + 30
            while len(latest) < len(ids):
                assert time.monotonic() < deadline, "the processor applied no opening balances"
                assert not run.done(), run
                await asyncio.sleep(0.05)
            await loop.run_in_executor(None, produce_waves, producer)
            for topic, parts in ((accounts, 3), (txt, 1)):
                for part in range(parts):
                    tp = TopicPartition(topic, part)
                    _, high = await loop.run_in_executor(
                        None, functools.partial(probe.get_watermark_offsets, tp, timeout=10)
                    )
                    target[f"{topic}/{part}"] = high - 1
            deadline = time.monotonic() + 30
            while True:
                done = await store.applied_offsets()
                if all(done.get(tp, -1) >= off for tp, off in target.items()):
                    break
                assert time.monotonic() < deadline, f"applied {done}, produced {target}"
                assert not run.done(), run
                await asyncio.sleep(0.05)
        finally:
            driver.stop()
            if not run.done():
                await asyncio.wait_for(run, 15)
            probe.close()
            close = getattr(applier, "close", None)
            if close is not None:
                close()
            await store.close()
        return checkpoints, violations, latest, len(target)

    checkpoints, violations, latest, n_parts = asyncio.run(go())
    assert not violations, (
        f"{len(violations)} checkpoints showed part of a transfer: {violations[:5]}"
    )
    assert latest == final  # every transfer applied
    buckets = [f'by_user["u{u}"]' for u in range(USERS)]
    view = asyncio.run(store_view(s, buckets))
    served = {
        int(op[4]): orjson.loads(op[5])["balance"]
        for b in buckets
        for op in view[b]["ops"]
        if op[1] == "PUT"
    }
    assert served == final  # and so are the buckets clients sync
    assert n_parts == 4
    assert checkpoints > 20  # many intermediate checkpoints were checked
