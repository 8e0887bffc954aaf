"""Transaction mode with two processors in one consumer group (`kafka.consistency:
transaction`, two `bucketsync processor` processes sharing `kafka.group_id`).

Issue found by the black-box scenarios: the group split the partitions, so the processor
holding the `<prefix>.transaction` topic saw the END markers but only part of each
transaction's events, and the other saw events but no END at all. Both staged until
`processor.transaction_grace_s` (60 s: ingestion stalled) and then applied what they had,
"unverified": every user saw half transactions. In transaction mode one processor of a group
is active (a lease in the store) and the others are standbys that take over when it dies.

Transfers between a user's accounts (one account per partition) on a backlog; with the grace
period far away, every partition must be applied and every stored balance must equal the
independent model (and no transaction applied "unverified")."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from confluent_kafka import Producer

from tests.bank import BANK_RULES, account_event, bank_marker
from tests.pipeline_helpers import store_buckets, store_view, write_rules
from tests.processes import end_offsets, start_processor, stop, wait_applied, write_config

pytestmark = pytest.mark.stack

USERS = 4
START = 1000


@pytest.mark.parametrize("driver", ["kafka", "faust"])
def test_two_processors_in_transaction_mode_apply_every_transaction_whole(
    make_settings, create_topic, ns, tmp_path: Path, stack, driver: str
) -> None:
    prefix = ns.topic("grp")
    accounts = create_topic(f"{prefix}.public.accounts", partitions=3)
    txt = create_topic(f"{prefix}.transaction")
    s = make_settings(
        kafka={"topics": [accounts, txt], "consistency": "transaction"},
        processor={
            "batch_max_events": 50,
            "transaction_grace_s": 3600,
            "metrics_port": 0,
            "stream_buffer_maxsize": 64,
        },
        sync_rules=write_rules(tmp_path, BANK_RULES),
        compaction={"interval_s": 0},
    )
    rnd = random.Random(7)
    balance = dict.fromkeys(range(USERS * 3), START)
    lsn = iter(range(10_000, 10**9))
    p = Producer({"bootstrap.servers": s.kafka.bootstrap_servers, "enable.idempotence": True})

    def put(a: int, tx: str | None, n: int) -> None:
        row = {"id": a, "user_id": f"u{a // 3}", "balance": balance[a]}
        k, v = account_event(prefix, row, None if tx is None else (tx, n), next(lsn))
        p.produce(accounts, key=k, value=v, partition=a % 3)

    def transfers(first: int, count: int) -> None:
        for i in range(first, first + count):
            transfer(i)
        assert p.flush(30) == 0

    def transfer(i: int) -> None:
        tx = str(5000 + i)
        user = rnd.randrange(USERS)
        accts = rnd.sample([3 * user, 3 * user + 1, 3 * user + 2], rnd.choice([2, 3]))
        k, v = bank_marker(tx, next(lsn), None)
        p.produce(txt, key=k, value=v, partition=0)
        moved = 0
        for n, a in enumerate(accts, 1):
            amount = rnd.randint(1, 50) if n < len(accts) else -moved
            balance[a] -= amount
            moved += amount
            put(a, tx, n)
        k, v = bank_marker(tx, next(lsn), len(accts))
        p.produce(txt, key=k, value=v, partition=0)

    for a in balance:
        put(a, None, 0)
    transfers(0, 50)  # a backlog
    cfg = write_config(tmp_path, s, "proc")
    logs = [open(tmp_path / f"p{i}.log", "wb") for i in range(2)]  # noqa: SIM115
    procs = [start_processor(cfg, driver, logs[i]) for i in range(2)]
    r = redis.Redis.from_url(s.redis.url)
    try:
        # the rest once the backlog is applied and both processors are up (in one group
        # they would now split the partitions)
        tps = [(accounts, 3), (txt, 1)]
        wait_applied(r, s.redis.prefix, end_offsets(s.kafka.bootstrap_servers, tps), timeout=90)
        time.sleep(3)
        for first in range(50, 400, 50):
            transfers(first, 50)
        targets = end_offsets(s.kafka.bootstrap_servers, tps)
        wait_applied(r, s.redis.prefix, targets, timeout=90)
    finally:
        for proc in procs:
            stop(proc)
        for f in logs:
            f.close()
    text = "".join((tmp_path / f"p{i}.log").read_text(errors="replace") for i in range(2))
    assert "unverified" not in text
    names = asyncio.run(store_buckets(s))
    view = asyncio.run(store_view(s, names))
    got: dict[int, int] = {}
    for b in names:
        live: dict[str, str] = {}
        for _id, op, _cs, _ot, oid, data, _t in view[b]["ops"]:
            if op == "PUT":
                live[oid] = data
            elif op in ("REMOVE", "CLEAR"):
                live.pop(oid, None) if op == "REMOVE" else live.clear()
        for oid, data in live.items():
            got[int(oid)] = orjson.loads(data)["balance"]
    assert got == balance


def test_transaction_mode_without_the_transaction_topic_is_warned_about() -> None:
    """Pure: the processor logs this at start (no END marker would ever arrive)."""
    from bucketsync.config import Settings
    from pipeline.processor import missing_transaction_topic

    def warn(**kafka: Any) -> str | None:
        return missing_transaction_topic(Settings(kafka=kafka))

    msg = warn(topics=["app.public.todos"], consistency="transaction")
    assert msg is not None and "app" not in msg.split("kafka.topics")[0]
    assert "transaction_grace_s" in msg
    assert warn(topics=["app.public.todos", "app.transaction"], consistency="transaction") is None
    assert (
        warn(topics=["app.public.todos", "app.tx_transaction"], consistency="transaction") is None
    )
    assert warn(topics=["app.public.todos"], consistency="event") is None
    assert warn(topic_pattern="^app\\..*", consistency="transaction") is None
