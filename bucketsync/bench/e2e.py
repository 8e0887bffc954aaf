"""``bucketsync bench e2e``: produce → ``checkpoint_complete`` latency under load.

A producer thread in the bench process writes Debezium todo events to a Kafka topic of the
run's own (3 partitions) at ``--rate`` events/s for ``--seconds``; each row carries its
produce time (``ts``, epoch seconds). One ``bucketsync processor`` applies them to Redis;
``bucketsync gateway`` (``--workers``) serves ``--clients`` simulated clients (one per user;
each event changes a row of one connected user), which run in a process of their own
(:class:`bucketsync.bench.clients.ClientPool`: checksums verified at every checkpoint) and
record ``now - ts`` for every op when its checkpoint completes.

The split of the cores: nothing is pinned; the gateway, the processor, the client process,
the producer (this process), Kafka and Redis share the machine's cores, and the report gives
each one's CPU seconds over the measured window (so its share of the cores).

Writes ``<out>.json``, ``<out>.md`` and ``<out>.png`` (latency CDF; produced, applied and
client-received ops per second).
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import redis
from confluent_kafka import Producer as KafkaProducer

from bucketsync.bench import clients as kit
from bucketsync.bench.procs import (
    TODOS_BY_USER_RULES,
    cpu_seconds,
    delete_prefixes,
    free_port,
    gateway_metric_lines,
    own_topics,
    primary_and_replica,
    raise_nofile,
    spawn_cli,
    stop,
    tree_cpu_seconds,
    wait_listening,
    write_config,
)
from bucketsync.bench.report import cdf_and_series_plot, percentile, result_path, write_report
from bucketsync.config import Settings
from bucketsync.feed import WORDS, ensure_topics, envelope, make_producer
from bucketsync.tokens import make_dev_token

RULES = TODOS_BY_USER_RULES

PARTITIONS = 3
ROWS_PER_USER = 2
GOALS = {"p50_ms": 50.0, "p99_ms": 250.0, "rate": 5000, "clients": 10_000}


class Producer(threading.Thread):
    """Paced Debezium todo events, each row stamped with its produce time."""

    def __init__(
        self,
        settings: Settings,
        topic: str,
        rate: float,
        seconds: float,
        users: int,
        lsn: int = 1_000_000,
        producer: KafkaProducer | None = None,
    ):
        super().__init__(daemon=True)
        self.lsn = lsn
        #: shared with the warm-up, so the measured window has no producer start-up (its
        #: metadata and idempotence handshake held the first events back ~0.5 s)
        self.producer = producer
        self.settings, self.topic = settings, topic
        self.rate, self.seconds, self.users = rate, seconds, users
        self.produced = 0
        self.started_at = 0.0
        self.ended_at = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the bench
            self.error = exc

    def _run(self) -> None:
        p = self.producer or make_producer(self.settings)
        p_conf_rows = self.users * ROWS_PER_USER
        live: dict[int, dict[str, Any]] = {}
        rng = random.Random(7)
        lsn = self.lsn
        self.started_at = t0 = time.monotonic()
        total = int(self.rate * self.seconds)
        while self.produced < total:
            due = min(total, int((time.monotonic() - t0) * self.rate) + 1)
            while self.produced < due:
                rid = rng.randrange(p_conf_rows)
                lsn += 1
                before = live.get(rid)
                row = {
                    "id": f"t{rid}",
                    "owner_id": f"u{rid % self.users}",
                    "description": " ".join(rng.choices(WORDS, k=3)),
                    "completed": rng.random() < 0.5,
                    "ts": time.time(),
                }
                live[rid] = row
                value = envelope("todos", "u" if before else "c", before, row, lsn=lsn)
                while True:
                    try:
                        p.produce(self.topic, key=orjson.dumps({"id": row["id"]}), value=value)
                        break
                    except BufferError:
                        p.poll(0.01)
                self.produced += 1
            p.poll(0)
            time.sleep(0.002)
        p.flush(60)
        self.ended_at = time.monotonic()


def run(
    settings: Settings,
    *,
    clients: int,
    rate: float,
    seconds: float,
    workers: int,
    batch_wait_ms: int,
    workdir: Path,
    replica: bool = False,
) -> dict[str, Any]:
    from bucketsync import stack

    raise_nofile()
    stack.ensure_up(settings)
    servers: list[subprocess.Popen[bytes]] = []
    run_id = uuid.uuid4().hex[:8]
    prefix = f"bench-e2e-{run_id}"
    topic = f"{prefix}.public.todos"
    ensure_topics(settings, [topic], partitions=PARTITIONS)
    (workdir / "rules.yaml").write_text(RULES)
    port = free_port()
    sections: dict[str, dict[str, Any]] = {
        "kafka": own_topics([topic], prefix, f"{prefix}.dead-letter"),
        "redis": {"prefix": prefix},
        "processor": {"metrics_port": 0, "batch_max_wait_ms": batch_wait_ms},
        "gateway": {
            "port": port,
            "host": "127.0.0.1",
            "workers": workers,
            "max_connections_per_user": 10,
        },
        "compaction": {"interval_s": 0},
        "stack": {"state_dir": str(settings.state_dir)},
    }
    if replica:
        servers, primary, replica_url = primary_and_replica(workdir)
        sections["redis"].update(url=primary, replica_urls=[replica_url])
    cfg = workdir / "bucketsync.yaml"
    rules = str(workdir / "rules.yaml")
    s = write_config(settings, cfg, sections, sync_rules=rules)
    # with --replica a second gateway on the same replica; clients alternate between them
    ports = [port]
    gw_cfgs = [cfg]
    if replica:
        ports.append(free_port())
        gw_cfgs.append(workdir / "gateway-2.yaml")
        sections["gateway"]["port"] = ports[1]
        write_config(settings, gw_cfgs[1], sections, sync_rules=rules)
    r = redis.Redis.from_url(s.redis.url)
    users = clients
    tokens = [make_dev_token(s, sub=f"u{i}", ttl_s=int(seconds) + 3600) for i in range(users)]
    glog, plog = workdir / "gateway.log", workdir / "processor.log"
    gw = proc = gw2 = None
    pool: kit.ClientPool | None = None
    result: dict[str, Any] = {
        "benchmark": "e2e",
        "clients": clients,
        "users": users,
        "target_rate_events_per_s": rate,
        "seconds": seconds,
        "gateway_workers": workers,
        "topology": (
            "private Redis primary + 1 replica; the processor writes the primary; 2 gateway "
            "processes read the replica; clients alternate between them"
            if replica
            else "the configured Redis; 1 gateway"
        ),
        "processor_batch_max_wait_ms": batch_wait_ms,
        "partitions": PARTITIONS,
        "cores": os.cpu_count(),
        "split": "no pinning: gateway (`bucketsync gateway`, workers as given), one "
        "`bucketsync processor`, the simulated clients (one process, raw asyncio streams + the "
        "checksum-verifying simulator), the producer (bench process), Kafka and Redis share the cores; "
        "cpu_s gives each one's CPU seconds over the measured window",
    }

    def applied() -> int:
        raw = r.hgetall(f"{prefix}:offsets")
        return sum(int(v) + 1 for k, v in raw.items() if k.decode().startswith(topic + "/"))

    try:
        proc = spawn_cli("processor", cfg, log=plog, raise_nofile=True)
        gw = spawn_cli("gateway", cfg, log=glog, raise_nofile=True)
        wait_listening(port, gw, glog)
        if replica:
            gw2 = spawn_cli("gateway", gw_cfgs[1], log=glog, raise_nofile=True)
            wait_listening(ports[1], gw2, glog)
        pool = kit.ClientPool([f"http://127.0.0.1:{p}" for p in ports], tokens)
        t_open = time.monotonic()
        opened = pool.open(concurrency=500, timeout=300)
        result["connect"] = {
            "took_s": round(time.monotonic() - t_open, 2),
            "connected": opened["resumed"],
        }
        # warm-up: the processor has joined its group and applies before the window opens
        kp = make_producer(s)
        warm = Producer(s, topic, 50, 1.0, users, lsn=1_000, producer=kp)
        warm.run()
        deadline = time.monotonic() + 120
        while applied() < warm.produced and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        print(f"{opened['resumed']}/{clients} clients synced; producing ...", flush=True)
        pool.call("mark")
        pids = {"gateway": gw.pid, "processor": proc.pid, "clients": pool.pid}
        if gw2 is not None:
            pids["gateway-2"] = gw2.pid
        cpu0 = {k: tree_cpu_seconds(p) for k, p in pids.items()}
        cpu0["producer (bench process)"] = cpu_seconds(os.getpid())
        rcpu0 = _redis_cpu(r)
        producer = Producer(s, topic, rate, seconds, users, producer=kp)
        t0 = time.time()
        producer.start()
        series: list[tuple[float, int, int]] = []
        deadline = time.monotonic() + seconds + 120
        while time.monotonic() < deadline:
            time.sleep(0.1)
            done = applied() - warm.produced
            series.append((time.time() - t0, producer.produced, done))
            if not producer.is_alive() and done >= producer.produced:
                break
            if producer.error is not None:
                raise RuntimeError(f"producer failed: {producer.error}")
        window = time.time() - t0
        time.sleep(2.0)  # the last checkpoints reach the clients
        cpu = {k: tree_cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
        cpu["producer (bench process)"] = (
            cpu_seconds(os.getpid()) - cpu0["producer (bench process)"]
        )
        cpu["redis"] = _redis_cpu(r) - rcpu0
        got = pool.call("collect")
        result["gateway_metrics"] = _gateway_metrics(port)
        lat_ms = [x * 1000 for x in got.pop("latencies_s")]
        produce_s = (producer.ended_at - producer.started_at) or float("nan")
        result.update(
            {
                "produced": producer.produced,
                "applied": series[-1][2] if series else 0,
                "achieved_rate_events_per_s": round(producer.produced / produce_s),
                "latency_samples": len(lat_ms),
                "latency_p50_ms": round(percentile(lat_ms, 0.5), 1),
                "latency_p90_ms": round(percentile(lat_ms, 0.9), 1),
                "latency_p99_ms": round(percentile(lat_ms, 0.99), 1),
                "latency_max_ms": round(max(lat_ms), 1) if lat_ms else None,
                **_apply_lag(series),
                "mismatches": got["mismatches"],
                "protocol_errors": got["protocol_errors"],
                "reconnects": got["reconnects"],
                "http_errors": got["http_errors"],
                "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
                "cpu_share_of_window": {k: round(v / window, 3) for k, v in cpu.items()},
                "window_s": round(window, 2),
                "latency_cdf_ms": [
                    round(x, 2) for x in sorted(lat_ms)[:: max(1, len(lat_ms) // 400)]
                ],
                "series": {
                    "produced": [(round(t, 2), n) for t, n, _ in series],
                    "applied": [(round(t, 2), n) for t, _, n in series],
                    "client_ops_per_s": kit.per_second(got["ops_per_s"], t0),
                },
            }
        )
    finally:
        if pool is not None:
            pool.quit()
        stop(gw)
        stop(gw2)
        stop(proc)
        delete_prefixes(s.redis.url, [prefix])
        r.close()
        for srv in servers:
            stop(srv)
    return result


_METRICS = (
    "bucketsync_gateway_invalidated_checkpoints_total",
    'bucketsync_gateway_lines_total{type="checkpoint_complete"}',
    'bucketsync_gateway_lines_total{type="checkpoint_diff"}',
    'bucketsync_gateway_lines_total{type="data"}',
    "bucketsync_gateway_ops_sent_total",
)


_COMPLETES = _METRICS[1]


def _gateway_metrics(port: int) -> dict[str, float]:
    """A few counters from the gateway's /metrics (one worker's, with ``--workers`` > 1)."""
    out = {}
    for name, value in gateway_metric_lines(port):
        if name in _METRICS:
            out[name] = float(value)
    return out


def _redis_cpu(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])


def _apply_lag(series: list[tuple[float, int, int]]) -> dict[str, float]:
    """Produce → applied to Redis (the processor's part of the latency), from the 0.1 s
    samples of the produced and applied counts: for each event index, when the producer
    had produced it and when the store had applied it."""
    if not series or series[-1][2] <= 0:
        return {}
    lags = []
    total = min(series[-1][1], series[-1][2])
    for k in range(1, total + 1, max(1, total // 2000)):
        tp = next(t for t, p, _ in series if p >= k)
        ta = next(t for t, _, a in series if a >= k)
        lags.append(max(0.0, ta - tp) * 1000)
    return {
        "apply_lag_p50_ms": round(percentile(lags, 0.5), 1),
        "apply_lag_p99_ms": round(percentile(lags, 0.99), 1),
    }


def _rates(points: list[tuple[float, int]]) -> list[tuple[float, float]]:
    out = []
    for (t0, n0), (t1, n1) in itertools.pairwise(points):
        if t1 > t0:
            out.append((t1, (n1 - n0) / (t1 - t0)))
    return out


def report(res: dict[str, Any], out: Path) -> None:
    ok = res["mismatches"] == 0 and res["protocol_errors"] == 0
    md = "\n".join(
        [
            f"# bench e2e: {res['clients']:,} clients, {res['target_rate_events_per_s']:,.0f} "
            f"events/s target for {res['seconds']:g} s",
            "",
            "| measure | value | goal (issue 12) |",
            "|---|---|---|",
            f"| events produced / applied | {res['produced']:,} / {res['applied']:,} | - |",
            f"| achieved produce rate | {res['achieved_rate_events_per_s']:,}/s "
            f"| {GOALS['rate']:,}/s with {GOALS['clients']:,} clients |",
            f"| produce → checkpoint_complete p50 | {res['latency_p50_ms']} ms "
            f"| ≤ {GOALS['p50_ms']:g} ms |",
            f"| p90 / p99 / max | {res['latency_p90_ms']} / {res['latency_p99_ms']} / "
            f"{res['latency_max_ms']} ms | p99 ≤ {GOALS['p99_ms']:g} ms |",
            f"| of which produce → applied to Redis (processor), p50 / p99, ±0.1 s | "
            f"{res.get('apply_lag_p50_ms')} / {res.get('apply_lag_p99_ms')} ms | - |",
            f"| PUTs measured (a row's newest version; superseded ones arrive as MOVEs) "
            f"| {res['latency_samples']:,} | - |",
            f"| gateway: checkpoint_complete lines / invalidated checkpoints | "
            f"{res['gateway_metrics'].get(_COMPLETES, 0):,.0f} / "
            f"{res['gateway_metrics'].get(_METRICS[0], 0):,.0f} | - |",
            f"| checksum mismatches / protocol errors | {res['mismatches']} / "
            f"{res['protocol_errors']} | 0 / 0 |",
            f"| client reconnects / HTTP errors | {res['reconnects']} / {res['http_errors']} | - |",
            "| CPU share of the window (cores) | "
            + ", ".join(f"{k} {v}" for k, v in res["cpu_share_of_window"].items())
            + " | - |",
            "",
            f"Topology: {res['topology']}. Gateway workers {res['gateway_workers']}; processor batch_max_wait_ms "
            f"{res['processor_batch_max_wait_ms']}; {res['partitions']} partitions; "
            f"{res['cores']} cores. {res['split']}. Verdict: "
            + ("no mismatches, no protocol errors." if ok else "ERRORS (see JSON)."),
            "",
        ]
    )
    print(md)
    ser = res["series"]
    plot = cdf_and_series_plot(
        f"bench e2e: {res['clients']:,} clients, {res['target_rate_events_per_s']:,.0f} events/s",
        {"produce → checkpoint_complete": res["latency_cdf_ms"]},
        {
            "produced/s": _rates([tuple(x) for x in ser["produced"]]),
            "applied/s": _rates([tuple(x) for x in ser["applied"]]),
            "ops received by clients/s": [tuple(x) for x in ser["client_ops_per_s"]],
        },
        cdf_xlabel="ms from produce to checkpoint_complete",
        series_ylabel="events or ops per second",
    )
    write_report(res, out, md, plot)


def main(
    settings: Settings,
    *,
    clients: int = 2000,
    rate: float = 5000.0,
    seconds: float = 30.0,
    workers: int = 1,
    batch_wait_ms: int = 20,
    replica: bool = False,
    out: str | None = None,
) -> int:
    """``bucketsync bench e2e``: one run; exit code 1 on checksum mismatches or protocol
    errors."""
    with tempfile.TemporaryDirectory(prefix="bucketsync-e2e-") as tmp:
        res = run(
            settings,
            clients=clients,
            rate=rate,
            seconds=seconds,
            workers=workers,
            batch_wait_ms=batch_wait_ms,
            workdir=Path(tmp),
            replica=replica,
        )
    report(res, result_path(out, "e2e"))
    return 0 if res["mismatches"] == 0 and res["protocol_errors"] == 0 else 1
