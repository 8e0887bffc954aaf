"""``bucketsync bench cdc``: COMMIT-to-client latency through the real CDC source.

N single-row transactions (``INSERT``, autocommit, one psql session, paced at ``--rate``)
go PostgreSQL -> Debezium (Kafka Connect) -> Kafka -> processor -> Redis -> gateway -> a
simulated PowerSync client (:mod:`bucketsync.simclient`). For every row:

* ``commit``: the transaction's commit time, from Debezium's ``source.ts_us`` (PostgreSQL's
  commit timestamp as pgoutput reports it);
* ``debezium``: when Debezium built the event (envelope ``ts_us``);
* ``kafka``: when the broker appended the record (the topic is created with
  ``message.timestamp.type=LogAppendTime``; millisecond resolution);
* ``client``: when the client first read a ``checkpoint_complete`` that includes the row.

All on one machine and one clock. Reported: p50/p90/p99/max of commit->kafka (the Debezium
hop), kafka->client (ours: processor + Redis + gateway + client) and commit->client.

Runs against the local stack (``stack up --source postgres`` is done if needed) with its own
schema, publication, slot, connector, topics, Redis prefix and consumer group, all removed
afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from bucketsync.bench.procs import (
    delete_prefixes,
    free_port,
    own_topics,
    spawn_cli,
    stop,
    write_config,
)
from bucketsync.bench.report import bar_plot, report_rows
from bucketsync.config import Settings
from bucketsync.errors import UserError

RULES = """
bucket_definitions:
  everything:
    data:
      - SELECT * FROM ticks
"""


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    xs = sorted(values)

    def pct(p: float) -> float:
        return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))]

    return {
        "p50": round(pct(50), 1),
        "p90": round(pct(90), 1),
        "p99": round(pct(99), 1),
        "max": round(xs[-1], 1),
        "mean": round(statistics.fmean(xs), 1),
    }


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"gateway exited with code {proc.returncode} during start-up")
        with contextlib.suppress(OSError), opener.open(url + "/probes/readiness", timeout=1) as r:
            if r.status == 200:
                return
        time.sleep(0.2)
    raise UserError(f"gateway at {url} not ready after {timeout:.0f} s")


class _Writer:
    """One psql session fed over stdin: each INSERT is its own (autocommit) transaction."""

    def __init__(self, settings: Settings) -> None:
        from bucketsync import stack

        argv, env = stack.psql_argv(settings)
        self.proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
        )

    def send(self, sql: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(sql.encode() + b"\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            rc = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if rc != 0:
            raise UserError(f"psql (the benchmark's writer) exited with code {rc}")


async def _client(
    url: str, token: str, ids: set[str], seen: dict[str, float], stop: asyncio.Event
) -> None:
    from bucketsync.simclient import ClientState, stream_once

    state = ClientState()
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():

            def on_line(kind: str, st: ClientState) -> bool:
                if kind == "checkpoint_complete":
                    now = time.time()
                    for b in st.buckets.values():
                        for _ot, oid in b.rows:
                            if oid not in seen and oid in ids:
                                seen[oid] = now
                return stop.is_set() or len(seen) >= len(ids)

            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                await stream_once(session, url, token, state, on_line=on_line)
            if len(seen) >= len(ids):
                return
            if st_errors := state.protocol_errors or state.mismatches:
                raise UserError(f"client saw protocol errors / mismatches: {st_errors[:3]}")


def _kafka_times(settings: Settings, topic: str, n: int, timeout: float = 60.0) -> dict[str, Any]:
    """id -> (commit µs, debezium µs, kafka append ms) from the records of ``topic``."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(
        {
            "bootstrap.servers": settings.kafka.bootstrap_servers,
            "group.id": f"{topic}-peek",
            "enable.auto.commit": False,
        }
    )
    out: dict[str, tuple[int, int, int]] = {}
    try:
        c.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            for m in c.consume(1000, 1.0):
                value = m.value()
                if m.error() or value is None:
                    continue
                ts_type, ts = m.timestamp()
                doc = json.loads(value)
                p = doc.get("payload", doc)
                if p.get("op") != "c":
                    continue
                out[str(p["after"]["id"])] = (int(p["source"]["ts_us"]), int(p["ts_us"]), ts)
                if ts_type != 2:  # TIMESTAMP_LOG_APPEND_TIME
                    raise UserError(f"{topic} is not a LogAppendTime topic (type {ts_type})")
    finally:
        c.close()
    return out


def run(
    settings: Settings,
    *,
    events: int = 1000,
    rate: float = 50.0,
    driver: str = "faust",
    connector_overrides: dict[str, str] | None = None,
) -> dict[str, Any]:
    from confluent_kafka.admin import AdminClient, NewTopic

    from bucketsync import stack
    from bucketsync.tokens import make_dev_token

    stack.ensure_up(settings, source="postgres")
    hexid = uuid.uuid4().hex[:8]
    schema = slot = pub = f"bench_{hexid}"
    prefix = f"bench-{hexid}"
    name = f"bench-cdc-{hexid}"
    topic = f"{prefix}.{schema}.ticks"
    su = stack.PG_SUPERUSER
    tmp = Path(tempfile.mkdtemp(prefix="bucketsync-bench-cdc-"))
    (tmp / "rules.yaml").write_text(RULES)
    port = free_port()
    cfg = tmp / "bucketsync.yaml"
    sections: dict[str, dict[str, Any]] = {
        "kafka": own_topics([topic], prefix, f"{prefix}.dead-letter"),
        "redis": {"prefix": prefix},
        "compaction": {"interval_s": 0},
        "processor": {"metrics_port": None},
        "gateway": {"port": port, "host": "127.0.0.1", "workers": 1},
        "stack": {"state_dir": str(settings.state_dir)},
    }
    s = write_config(settings, cfg, sections, sync_rules=str(tmp / "rules.yaml"))
    admin = AdminClient({"bootstrap.servers": s.kafka.bootstrap_servers})
    new = [
        NewTopic(topic, 1, 1, config={"message.timestamp.type": "LogAppendTime"}),
        NewTopic(s.kafka.dead_letter_topic, 1, 1),
    ]
    for fut in admin.create_topics(new, operation_timeout=30).values():
        fut.result(timeout=60)
    procs: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {}
    try:
        stack.psql(
            settings,
            f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.ticks "
            "(id text PRIMARY KEY, n integer NOT NULL, note text)",
        )
        stack.psql(settings, f"CREATE PUBLICATION {pub} FOR TABLES IN SCHEMA {schema}", user=su)
        overrides = {
            "name": name,
            "topic.prefix": prefix,
            "slot.name": slot,
            "slot.drop.on.stop": "true",
            "publication.name": pub,
            "schema.include.list": schema,
            "table.include.list": rf"{schema}\.ticks",
            "heartbeat.interval.ms": "0",
            **(connector_overrides or {}),
        }
        _, config = stack.connector_config(settings, overrides)
        stack.register_connector(settings, name, config, timeout=120)
        procs.append(spawn_cli("processor", cfg, "--driver", driver))
        procs.append(spawn_cli("gateway", cfg, "--port", str(port)))
        url = f"http://127.0.0.1:{port}"
        _wait_http(url, procs[1])
        ids = [f"r{i:06d}" for i in range(events)]
        seen: dict[str, float] = {}

        async def go() -> None:
            stop = asyncio.Event()
            token = make_dev_token(s, sub="bench", ttl_s=3600)
            task = asyncio.create_task(_client(url, token, set(ids), seen, stop))
            # warm-up: the pipeline is idle and connected before the measured transactions
            writer = _Writer(settings)
            writer.send(f"INSERT INTO {schema}.ticks VALUES ('warmup', -1, NULL);")
            await asyncio.sleep(5)
            t0 = time.monotonic()
            for i, rid in enumerate(ids):
                writer.send(f"INSERT INTO {schema}.ticks VALUES ('{rid}', {i}, 'x');")
                delay = t0 + (i + 1) / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await asyncio.get_running_loop().run_in_executor(None, writer.close)
            deadline = time.monotonic() + 120
            while len(seen) < len(ids) and time.monotonic() < deadline and not task.done():
                await asyncio.sleep(0.1)
            stop.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        print(f"bench cdc: {events} single-row transactions at {rate:g}/s ...", flush=True)
        asyncio.run(go())
        if len(seen) < len(ids):
            raise UserError(f"only {len(seen)} of {len(ids)} rows reached the client in time")
        times = _kafka_times(s, topic, len(ids) + 1)
        commit_kafka, kafka_client, commit_client, commit_dbz = [], [], [], []
        for rid in ids:
            commit_us, dbz_us, kafka_ms = times[rid]
            client_s = seen[rid]
            commit_kafka.append(kafka_ms - commit_us / 1000)
            kafka_client.append(client_s * 1000 - kafka_ms)
            commit_client.append(client_s * 1000 - commit_us / 1000)
            commit_dbz.append((dbz_us - commit_us) / 1000)
        result = {
            "benchmark": "cdc",
            "transactions": events,
            "rate_per_s": rate,
            "driver": driver,
            "connector_overrides": connector_overrides or {},
            "poll_interval_ms": config.get("poll.interval.ms", "500 (Debezium default)"),
            "processor_batch_max_wait_ms": s.processor.batch_max_wait_ms,
            "ms": {
                "commit_to_client": _percentiles(commit_client),
                "commit_to_kafka (Debezium hop)": _percentiles(commit_kafka),
                "  commit_to_debezium_event": _percentiles(commit_dbz),
                "kafka_to_client (ours)": _percentiles(kafka_client),
            },
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            stop(p)
        with contextlib.suppress(Exception):
            stack.remove_connector(settings, name)
        with contextlib.suppress(Exception):
            stack.psql(
                settings,
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                f"WHERE slot_name = '{slot}' AND NOT active",
                user=su,
            )
        with contextlib.suppress(Exception):
            stack.psql(settings, f"DROP PUBLICATION IF EXISTS {pub}", user=su)
            stack.psql(settings, f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        with contextlib.suppress(Exception):
            doomed = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix)]
            for fut in admin.delete_topics(doomed, operation_timeout=30).values():
                fut.result(timeout=60)
        with contextlib.suppress(Exception):
            delete_prefixes(s.redis.url, [prefix])
    return result


def _report(result: dict[str, Any], out: str | None) -> None:
    rows = []
    for label, stats in result["ms"].items():
        rows.append(
            (
                label,
                f"p50 {stats['p50']:.1f}  p90 {stats['p90']:.1f}  p99 {stats['p99']:.1f}  "
                f"max {stats['max']:.1f} ms",
            )
        )
    title = (
        f"bench cdc: {result['transactions']} single-row transactions at "
        f"{result['rate_per_s']:g}/s ({result['driver']} driver)"
    )
    p50 = {label: stats["p50"] for label, stats in result["ms"].items()}
    report_rows(result, out, "cdc", title, rows, bar_plot(title, "ms (p50)", p50))


def main(
    settings: Settings,
    *,
    events: int = 1000,
    rate: float = 50.0,
    driver: str | None = None,
    connector_overrides: dict[str, str] | None = None,
    out: str | None = None,
) -> int:
    """``bucketsync bench cdc``: ``driver`` defaults to ``processor.driver``."""
    result = run(
        settings,
        events=events,
        rate=rate,
        driver=driver or settings.processor.driver,
        connector_overrides=connector_overrides,
    )
    _report(result, out)
    return 0
