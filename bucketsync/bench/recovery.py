"""``bucketsync bench recovery``: how long ingestion stalls when a processor dies.

For each driver, a live feed runs into a topic with several partitions (so every partition
moves all the time) and `bucketsync processor` processes run as separate processes, as a
user runs them:

- **restart**: one processor; SIGKILL while it applies batches; a new one starts at once.
  Reported: SIGKILL -> the restarted processor's first applied batch, and its start ->
  first applied batch, and SIGKILL -> every partition moving again.
- **takeover**: two processors in one group; one is SIGKILLed; the survivor must take the
  dead one's partitions. Reported: SIGKILL -> every partition moving again.

``--consistency transaction`` (``kafka.consistency: transaction``): the feed writes
Debezium transactions (BEGIN and END markers on ``<prefix>.transaction``, 3 events each,
spread over the partitions) and the processors hold each one until it is whole. One
processor of the group is active (a lease in the store), so the takeover is the standby
taking the lease after ``processor.session_timeout_ms`` and only then joining the group;
a restarted processor takes its own lease back at once (same static instance id). Each run
also reports how many transactions were applied "unverified" (the grace period is set far
away: any is a failure of the case).

Medians over ``--runs``; JSON, a markdown table and a PNG next to each other.
"""

from __future__ import annotations

import contextlib
import signal
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import redis

from bucketsync.bench.procs import (
    TODOS_BY_USER_RULES,
    delete_prefixes,
    kill,
    spawn_cli,
    write_config,
)
from bucketsync.bench.report import result_path, write_report
from bucketsync.config import Settings
from bucketsync.errors import UserError
from bucketsync.feed import TodoFeed, ensure_topics, make_producer

RULES = TODOS_BY_USER_RULES

PARTITIONS = 6
#: data events per transaction (``--consistency transaction``)
TX_EVENTS = 3


class _Feed(threading.Thread):
    """Produces at a steady rate until stopped, so that every partition keeps moving."""

    def __init__(self, settings: Settings, topic: str, rate: float, tx_topic: str | None = None):
        super().__init__(daemon=True)
        self.settings, self.topic, self.rate = settings, topic, rate
        #: transaction mode: markers go here, the events carry transaction blocks
        self.tx_topic = tx_topic
        self.halt = threading.Event()

    def run(self) -> None:
        p = make_producer(self.settings)
        feed = TodoFeed(users=50, rows=5_000, seed=7)
        n, t0 = 0, time.monotonic()
        while not self.halt.is_set():
            if self.tx_topic is None:
                key, value = feed.next()
                p.produce(self.topic, key=key, value=value)
                n += 1
            else:
                self._transaction(p, feed, n)
                n += TX_EVENTS
            ahead = n / self.rate - (time.monotonic() - t0)
            if ahead > 0:
                p.poll(0)
                time.sleep(ahead)
        p.flush(30)

    def _transaction(self, p: Any, feed: TodoFeed, n: int) -> None:
        """BEGIN, ``TX_EVENTS`` events of distinct rows (Debezium's envelope with the
        transaction block), END; the connector name is the topics' prefix."""
        assert self.tx_topic is not None
        connector = self.tx_topic.removesuffix(".transaction")
        tx_id = f"{n}:{feed.lsn + 1}"

        def marker(end: bool) -> None:
            value: dict[str, Any] = {"status": "END" if end else "BEGIN", "id": tx_id}
            value["event_count"] = TX_EVENTS if end else None
            value["data_collections"] = (
                [{"data_collection": "public.todos", "event_count": TX_EVENTS}] if end else None
            )
            value["ts_ms"] = int(time.time() * 1000)
            p.produce(self.tx_topic, key=orjson.dumps({"id": tx_id}), value=orjson.dumps(value))

        marker(False)
        order = 0
        while order < TX_EVENTS:
            key, value = feed.next()
            if value is None:
                continue
            order += 1
            ev = orjson.loads(value)
            ev["source"]["name"] = connector
            ev["transaction"] = {
                "id": tx_id,
                "total_order": order,
                "data_collection_order": order,
            }
            p.produce(self.topic, key=key, value=orjson.dumps(ev))
        marker(True)


class _Offsets:
    def __init__(self, r: redis.Redis, prefix: str, topic: str):
        self.r, self.key = r, f"{prefix}:offsets"
        self.tps = [f"{topic}/{i}" for i in range(PARTITIONS)]

    def now(self) -> dict[str, int]:
        raw = self.r.hgetall(self.key)
        return {tp: int(raw.get(tp.encode(), -1)) for tp in self.tps}

    def wait_all_moving(self, timeout: float) -> float:
        """Seconds until every partition's applied offset moved past where it is now."""
        t0 = time.monotonic()
        base = self.now()
        moved: set[str] = set()
        while time.monotonic() - t0 < timeout:
            cur = self.now()
            moved |= {tp for tp in self.tps if cur[tp] > base[tp]}
            if len(moved) == len(self.tps):
                return time.monotonic() - t0
            time.sleep(0.01)
        raise UserError(f"partitions {sorted(set(self.tps) - moved)} did not move in {timeout}s")

    def wait_any_moving(self, timeout: float) -> float:
        t0 = time.monotonic()
        base = sum(self.now().values())
        while time.monotonic() - t0 < timeout:
            if sum(self.now().values()) > base:
                return time.monotonic() - t0
            time.sleep(0.01)
        raise UserError(f"nothing applied in {timeout}s")


def _one_run(
    settings: Settings, driver: str, tmp: Path, rate: float, consistency: str = "event"
) -> dict[str, float]:
    run = uuid.uuid4().hex[:8]
    prefix = f"bench-recovery-{run}"
    topic = f"{prefix}.public.todos"
    ensure_topics(settings, [topic], partitions=PARTITIONS)
    topics = [topic]
    tx_topic = None
    processor: dict[str, Any] = {"metrics_port": 0, "batch_max_events": 200}
    if consistency == "transaction":
        tx_topic = f"{prefix}.transaction"
        ensure_topics(settings, [tx_topic], partitions=1)
        topics.append(tx_topic)
        processor["transaction_grace_s"] = 3600  # a transaction applied in part: a failure
    rules = tmp / "rules.yaml"
    rules.write_text(RULES)
    cfg = tmp / f"{run}.yaml"
    sections: dict[str, dict[str, Any]] = {
        "kafka": {"topics": topics, "group_id": prefix, "consistency": consistency},
        "redis": {"prefix": prefix},
        "processor": processor,
        "compaction": {"interval_s": 0},
        "stack": {"state_dir": str(settings.state_dir)},
    }
    write_config(settings, cfg, sections, sync_rules=str(rules))
    r = redis.Redis.from_url(settings.redis.url)
    offsets = _Offsets(r, prefix, topic)
    feed = _Feed(settings, topic, rate, tx_topic)
    feed.start()
    a = b = c = None
    out: dict[str, float] = {}
    log = tmp / f"{run}.log"
    try:
        # restart
        a = spawn_cli("processor", cfg, "--driver", driver, log=log)
        offsets.wait_all_moving(120)
        time.sleep(1.0)  # steady state: batches are being applied
        offsets.wait_any_moving(10)
        a.send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        a.wait(10)
        b = spawn_cli("processor", cfg, "--driver", driver, log=log)
        t_start = time.monotonic()
        first = offsets.wait_any_moving(120)
        out["restart_kill_to_first_batch_s"] = t_start - t_kill + first
        out["restart_start_to_first_batch_s"] = first
        out["restart_kill_to_all_partitions_s"] = (
            time.monotonic() - t_kill + offsets.wait_all_moving(120)
        )
        # takeover: a second processor joins, then one of the two dies
        c = spawn_cli("processor", cfg, "--driver", driver, log=log)
        time.sleep(8.0)  # the group rebalances onto both (transaction mode: c is a standby)
        offsets.wait_all_moving(120)
        b.send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        b.wait(10)
        offsets.wait_any_moving(60)
        out["takeover_kill_to_all_partitions_s"] = (
            time.monotonic() - t_kill + offsets.wait_all_moving(120)
        )
    finally:
        feed.halt.set()
        feed.join(30)
        kill(a, b, c)
        r.close()
        delete_prefixes(settings.redis.url, [prefix])
    if consistency == "transaction":
        text = log.read_text(errors="replace")
        out["unverified_transactions"] = float(text.count("(unverified)"))
        if "standby: processor" not in text:
            raise UserError("transaction mode: the second processor never waited as a standby")
    return out


def _report(result: dict[str, Any], out: Path) -> None:
    metrics = list(next(iter(result["drivers"].values()))["median"])
    lines = ["| metric | " + " | ".join(result["drivers"]) + " | goal |", "|---|"]
    lines[1] = "|" + "---|" * (len(result["drivers"]) + 2)
    goals = {
        "restart_start_to_first_batch_s": "≤ 5 s",
        "takeover_kill_to_all_partitions_s": "≤ 15 s",
    }
    goals["unverified_transactions"] = "0"
    for m in metrics:
        unit = "" if m == "unverified_transactions" else " s"
        vals = " | ".join(f"{d['median'][m]:.2f}{unit}" for d in result["drivers"].values())
        lines.append(f"| {m} (median) | {vals} | {goals.get(m, '')} |")
    print("\n".join(lines))
    write_report(result, out, "\n".join(lines) + "\n", lambda plt: _plot(plt, result, metrics))


def _plot(plt: Any, result: dict[str, Any], metrics: list[str]) -> None:
    _fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(1, len(result["drivers"]))
    for i, (name, d) in enumerate(result["drivers"].items()):
        xs = [j + i * width for j in range(len(metrics))]
        ax.bar(xs, [d["median"][m] for m in metrics], width, label=name)
        for j, m in enumerate(metrics):
            ax.scatter([xs[j]] * len(d["runs"]), [run[m] for run in d["runs"]], color="k", s=8)
    ax.set_xticks([j + width * (len(result["drivers"]) - 1) / 2 for j in range(len(metrics))])
    ax.set_xticklabels([m.removesuffix("_s").replace("_", " ") for m in metrics], fontsize=7)
    ax.set_ylabel("seconds")
    mode = "" if result.get("consistency", "event") == "event" else ", transaction mode"
    ax.set_title(f"bucketsync bench recovery{mode} (bars: median, dots: runs)")
    ax.legend()


def main(
    settings: Settings,
    *,
    drivers: list[str],
    runs: int,
    rate: float,
    out: str | None,
    consistency: str = "event",
) -> int:
    import tempfile

    result: dict[str, Any] = {
        "bench": "recovery",
        "consistency": consistency,
        "session_timeout_ms": settings.processor.session_timeout_ms,
        "instance_id": settings.processor.instance_id,
        "rate_events_per_s": rate,
        "drivers": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for d in drivers:
            measured: list[dict[str, float]] = []
            for i in range(runs):
                print(f"recovery: driver {d}, run {i + 1}/{runs} ...", flush=True)
                measured.append(_one_run(settings, d, Path(tmp), rate, consistency))
                print("  " + ", ".join(f"{k} {v:.2f}" for k, v in measured[-1].items()), flush=True)
            result["drivers"][d] = {
                "runs": measured,
                "median": {k: statistics.median(r[k] for r in measured) for k in measured[0]},
            }
    with contextlib.suppress(KeyboardInterrupt):
        name = "recovery" if consistency == "event" else "recovery-transaction"
        _report(result, result_path(out, name))
    return 0
