"""``bucketsync bench reconnect``: a reconnect storm.

``--clients`` simulated clients (one per user, each user's bucket holding
:data:`ROWS_PER_USER` rows) sync through the gateway, then every stream is dropped at once;
while they are away one row of every other user changes; then all of them reconnect **at
the same moment** with their positions (``after``). Measured: the time until every client has
a validated ``checkpoint_complete`` again (per-client CDF), and the ops each one downloaded
on the way back against a model of what it lacked (1 op for a changed user, 0 otherwise):
``ops twice`` counts any op beyond that, ``ops missing`` any shortfall; each client's rows
must equal its user's rows of the model.

``--replica``: the store is a private redis-server primary with one replica, and two
gateway processes read from the replica (``redis.replica_urls``); clients alternate between
them (capacity of 2 gateways x 1 replica). Without it: the configured Redis, one gateway
process (``--workers``).

The split of the cores: nothing is pinned; the gateway process(es), the client process(es)
(``--client-procs``, default 1: :class:`bucketsync.bench.clients.ClientPool`, raw asyncio
streams, checksums verified at every checkpoint), Redis and this process share the cores;
CPU seconds of each over the storm are reported, and the CPU per reconnect of the gateways
and of the clients.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from bucketsync.bench import clients as kit
from bucketsync.bench.procs import (
    delete_prefixes,
    free_port,
    gateway_metric_lines,
    primary_and_replica,
    raise_nofile,
    rss_kb,
    spawn_cli,
    stop,
    tree_cpu_seconds,
    wait_for,
    wait_listening,
    write_config,
)
from bucketsync.bench.report import cdf_and_series_plot, result_path, write_report
from bucketsync.config import Settings
from bucketsync.tokens import make_dev_token
from pipeline import core
from pipeline.cdc import KafkaRecord, UpsertEvent
from pipeline.rules import parse_rules
from pipeline.store import Store

RULES = """
bucket_definitions:
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT id, owner_id, description FROM todos WHERE owner_id = bucket.user_id
"""

ROWS_PER_USER = 4
GOALS = {"all_resumed_s": 10.0, "clients": 10_000}


def _todo(user: str, k: int, text: str) -> UpsertEvent:
    return {
        "action": "upsert",
        "table": "todos",
        "source_table": "todos",
        "key": {"id": f"{user}-{k}"},
        "row": {"id": f"{user}-{k}", "owner_id": user, "description": text},
    }


async def _apply(store: Store, events: list[UpsertEvent], offset: int) -> int:
    rules = parse_rules(RULES)
    for i in range(0, len(events), 5000):
        chunk = events[i : i + 5000]
        plan = core.plan_batch(
            [(KafkaRecord("seed", 0, offset + j, b"", b""), ev) for j, ev in enumerate(chunk)],
            rules,
            {},
        )
        res = await store.apply(plan.batch)
        assert res.status == "ok", res
        offset += len(chunk)
    return offset


def run(
    settings: Settings,
    *,
    clients: int,
    workers: int,
    replica: bool,
    workdir: Path,
    client_procs: int = 1,
) -> dict[str, Any]:
    raise_nofile()
    prefix = f"bench-reconnect-{uuid.uuid4().hex[:8]}"
    servers: list[subprocess.Popen[bytes]] = []
    sections: dict[str, dict[str, Any]] = {
        "redis": {"prefix": prefix},
        "stack": {"state_dir": str(settings.state_dir)},
    }
    if replica:
        servers, primary, replica_url = primary_and_replica(workdir)
        sections["redis"].update(url=primary, replica_urls=[replica_url])
    else:
        from bucketsync import stack

        stack.ensure_up(settings)
    (workdir / "rules.yaml").write_text(RULES)
    n_gw = 2 if replica else 1
    ports = [free_port() for _ in range(n_gw)]
    cfgs = []
    configs = []
    for i, port in enumerate(ports):
        sections["gateway"] = {
            "port": port,
            "host": "127.0.0.1",
            "workers": 1 if replica else workers,
            "max_connections_per_user": 10,
        }
        cfg = workdir / f"gateway-{i}.yaml"
        configs.append(
            write_config(settings, cfg, sections, sync_rules=str(workdir / "rules.yaml"))
        )
        cfgs.append(cfg)
    s = configs[0]
    users = [f"u{i}" for i in range(clients)]
    model = {(u, k): "v0" for u in users for k in range(ROWS_PER_USER)}
    store = Store.from_settings(s)
    result: dict[str, Any] = {
        "benchmark": "reconnect",
        "clients": clients,
        "rows_per_user": ROWS_PER_USER,
        "topology": (
            "private Redis primary + 1 replica, 2 gateway processes (workers 1) reading the "
            "replica, clients alternating between them"
            if replica
            else f"the configured Redis, 1 gateway (`--workers {workers}`)"
        ),
        "cores": os.cpu_count(),
        "client_procs": client_procs,
        "split": f"no pinning: gateway process(es), the simulated clients ({client_procs} "
        "process(es): raw asyncio HTTP/1.1 streams + the checksum-verifying simulator), Redis "
        "and the bench process share the cores; cpu_s gives each one's CPU seconds over the "
        "storm",
    }
    gws: list[subprocess.Popen[bytes]] = []
    pool: kit.ClientPool | None = None
    r = redis.Redis.from_url(s.redis.url)
    try:
        seed = [_todo(u, k, t) for (u, k), t in model.items()]
        offset = asyncio.run(_apply_and_close(store, seed, 0))
        if replica:
            rr = redis.Redis.from_url(s.redis.replica_urls[0])
            cp = r.get(f"{prefix}:checkpoint")
            wait_for(lambda: rr.get(f"{prefix}:checkpoint") == cp, 60, "replica catch-up")
        for i, cfg in enumerate(cfgs):
            gws.append(
                spawn_cli("gateway", cfg, log=workdir / f"gateway-{i}.log", raise_nofile=True)
            )
        for gw, port, i in zip(gws, ports, range(n_gw), strict=True):
            wait_listening(port, gw, workdir / f"gateway-{i}.log")
        tokens = [make_dev_token(s, sub=u, ttl_s=7200) for u in users]
        pool = kit.ClientPool([f"http://127.0.0.1:{p}" for p in ports], tokens, procs=client_procs)
        first = pool.open(concurrency=500, timeout=300)
        result["first_sync"] = {
            "synced": first["resumed"],
            "took_s": round(first["all_s"], 2),
            "bytes": first["bytes"],
        }
        print(f"{first['resumed']}/{clients} clients synced; dropping every stream", flush=True)
        pool.call("close")
        changed = set(users[::2])
        for u in sorted(changed):
            model[(u, 0)] = "v1"
        asyncio.run(_apply_and_close_new(s, [_todo(u, 0, "v1") for u in sorted(changed)], offset))
        if replica:
            cp = r.get(f"{prefix}:checkpoint")
            wait_for(lambda: rr.get(f"{prefix}:checkpoint") == cp, 60, "replica catch-up")
        time.sleep(0.5)
        pool.call("mark")
        pids = {f"gateway-{i}": gw.pid for i, gw in enumerate(gws)} | {
            f"clients-{k}": pid for k, pid in enumerate(pool.pids)
        }
        gc0 = [_gc_seconds(p) for p in ports]
        cpu0 = {k: tree_cpu_seconds(p) for k, p in pids.items()}
        rss0 = {k: rss_kb(p) for k, p in pids.items() if k.startswith("gateway")}
        t0 = time.time()
        storm = pool.open(concurrency=0, timeout=120, t0=t0)
        cpu = {k: round(tree_cpu_seconds(p) - cpu0[k], 2) for k, p in pids.items()}
        gc_s = {
            f"gateway-{i}": {g: round(v - gc0[i].get(g, 0.0), 3) for g, v in _gc_seconds(p).items()}
            for i, p in enumerate(ports)
        }
        gw_cpu = sum(v for k, v in cpu.items() if k.startswith("gateway"))
        cl_cpu = sum(v for k, v in cpu.items() if k.startswith("clients"))
        got = pool.call("collect")
        tables = pool.call("tables")
        expected = [1 if u in changed else 0 for u in users]
        twice = sum(max(0, g - e) for g, e in zip(storm["ops"], expected, strict=True))
        missing = sum(max(0, e - g) for g, e in zip(storm["ops"], expected, strict=True))
        wrong_rows = 0
        for u, t in zip(users, tables, strict=True):
            want = {f"{u}-{k}": model[(u, k)] for k in range(ROWS_PER_USER)}
            have = {oid: row.get("description") for oid, row in t.get("todos", {}).items()}
            wrong_rows += want != have
        result.update(
            {
                "changed_users": len(changed),
                "resumed": storm["resumed"],
                "not_resumed": storm["not_resumed"],
                "all_resumed_s": round(storm["all_s"], 3),
                "resume_p50_s": round(storm["p50_s"], 3),
                "resume_p99_s": round(storm["p99_s"], 3),
                "ops_downloaded": sum(storm["ops"]),
                "ops_expected": sum(expected),
                "ops_twice": twice,
                "ops_missing": missing,
                "clients_with_wrong_rows": wrong_rows,
                "bytes_on_resume": storm["bytes"],
                "mismatches": got["mismatches"],
                "protocol_errors": got["protocol_errors"],
                "http_errors": got["http_errors"],
                "cpu_s": cpu,
                "gateway_cpu_ms_per_reconnect": round(gw_cpu * 1000 / clients, 3),
                "client_cpu_ms_per_reconnect": round(cl_cpu * 1000 / clients, 3),
                "per_client_process": storm["per_process"],
                "gateway_gc_s": gc_s,
                "gateway_rss_kb": {k: rss_kb(p) for k, p in pids.items() if k in rss0},
                "completes_per_s": kit.per_second(got["completes_per_s"], t0),
                "resume_cdf_ms": [
                    round(x * 1000, 1)
                    for x in sorted(storm["times_s"])[:: max(1, len(storm["times_s"]) // 400)]
                ],
            }
        )
    finally:
        if pool is not None:
            pool.quit()
        for gw in gws:
            stop(gw)
        if not replica:
            delete_prefixes(s.redis.url, [prefix])
        r.close()
        for srv in servers:
            stop(srv)
    return result


def _gc_seconds(port: int) -> dict[str, float]:
    """The gateway's seconds in the garbage collector so far, per generation (from its
    /metrics; with ``--workers`` > 1 the worker that answers)."""
    out = {}
    for name, value in gateway_metric_lines(port):
        if name.startswith("bucketsync_gateway_gc_seconds_total{"):
            out[name.split('"')[1]] = float(value)
    return out


async def _apply_and_close(store: Store, events: list[UpsertEvent], offset: int) -> int:
    try:
        return await _apply(store, events, offset)
    finally:
        await store.close()


async def _apply_and_close_new(s: Settings, events: list[UpsertEvent], offset: int) -> int:
    return await _apply_and_close(Store.from_settings(s), events, offset)


def report(res: dict[str, Any], out: Path) -> None:
    ok = (
        res["not_resumed"] == 0
        and res["ops_twice"] == 0
        and res["ops_missing"] == 0
        and res["clients_with_wrong_rows"] == 0
        and res["mismatches"] == 0
        and res["protocol_errors"] == 0
    )
    md = "\n".join(
        [
            f"# bench reconnect: {res['clients']:,} clients reconnect at once",
            "",
            "| measure | value | goal (issue 12) |",
            "|---|---|---|",
            f"| resumed (validated checkpoint_complete) | {res['resumed']:,} / "
            f"{res['clients']:,} | all, with {GOALS['clients']:,} clients |",
            f"| all resumed after | {res['all_resumed_s']} s "
            f"(p50 {res['resume_p50_s']} s, p99 {res['resume_p99_s']} s) "
            f"| ≤ {GOALS['all_resumed_s']:g} s |",
            f"| ops downloaded / lacked (model) | {res['ops_downloaded']:,} / "
            f"{res['ops_expected']:,} | equal |",
            f"| ops downloaded twice / missing | {res['ops_twice']} / {res['ops_missing']} "
            "| 0 / 0 |",
            f"| clients whose rows differ from the model | {res['clients_with_wrong_rows']} | 0 |",
            f"| checksum mismatches / protocol errors | {res['mismatches']} / "
            f"{res['protocol_errors']} | 0 / 0 |",
            f"| bytes sent on resume | {res['bytes_on_resume']:,} | - |",
            "| CPU seconds during the storm | "
            + ", ".join(f"{k} {v}" for k, v in res["cpu_s"].items())
            + " | - |",
            "| of which the gateway's garbage collector (by generation) | "
            + "; ".join(
                f"{k}: " + ", ".join(f"gen{g} {v} s" for g, v in sorted(gens.items()))
                for k, gens in res.get("gateway_gc_s", {}).items()
            )
            + " | - |",
            f"| CPU per reconnect: gateway(s) / client process(es) | "
            f"{res['gateway_cpu_ms_per_reconnect']} ms / "
            f"{res['client_cpu_ms_per_reconnect']} ms | - |",
            f"| first sync of all clients (ramped, 500 at a time) | "
            f"{res['first_sync']['took_s']} s | - |",
            "",
            f"Topology: {res['topology']}. {res['cores']} cores; {res['split']}. Verdict: "
            + ("ok." if ok else "FAILED (see JSON)."),
            "",
        ]
    )
    print(md)
    plot = cdf_and_series_plot(
        f"bench reconnect: {res['clients']:,} clients at once",
        {"reconnect → checkpoint_complete": res["resume_cdf_ms"]},
        {"checkpoint_complete/s (clients)": [tuple(x) for x in res["completes_per_s"]]},
        cdf_xlabel="ms",
    )
    write_report(res, out, md, plot)


def main(
    settings: Settings,
    *,
    clients: int = 2000,
    workers: int = 1,
    replica: bool = False,
    client_procs: int = 1,
    out: str | None = None,
) -> int:
    """``bucketsync bench reconnect``: exit code 1 when a client did not resume, got an op
    twice, or saw a checksum mismatch."""
    with tempfile.TemporaryDirectory(prefix="bucketsync-reconnect-") as tmp:
        res = run(
            settings,
            clients=clients,
            workers=workers,
            replica=replica,
            workdir=Path(tmp),
            client_procs=max(1, client_procs),
        )
    report(res, result_path(out, "reconnect"))
    ok = res["not_resumed"] == 0 and res["ops_twice"] == 0 and res["mismatches"] == 0
    return 0 if ok else 1
