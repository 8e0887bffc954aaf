"""``bucketsync bench initial-sync``: one big bucket, synced from nothing.

The store gets ``--ops`` rows in one global bucket (one PUT op each, ~150 bytes of wire JSON),
written straight to Redis under a prefix of the run's own. Then, against a ``bucketsync
gateway`` process (workers 1):

- **cold**: a freshly started gateway (empty page cache) streams the whole bucket to a raw
  HTTP reader in this process that only counts the bytes and ops (no parsing, so the
  gateway is what is measured): ops/s from the request to ``checkpoint_complete``, and ops
  per gateway CPU-second. ``--runs`` times, the gateway restarted before each;
- **warm**: the same request again on the last gateway (pages from its shared cache);
- **simulator**: :mod:`bucketsync.simclient` parsing every line and verifying the checksum
  (the bench's check that the stream is right; its time is the Python client's);
- **official client**: the official PowerSync Node SDK (``tests/e2e/client``, when it is
  installed and this runs from a checkout; ``--no-node`` skips it): connect → first
  complete checkpoint applied to its SQLite, and the row count it ends with;
- **gzip**: a fresh gateway with ``gateway.compression: gzip``; a cold run of the raw
  reader asking ``Accept-Encoding: gzip`` (it inflates what it receives, to count ops):
  bytes on the wire and gateway CPU next to the plain cold run; then the official client
  again on that gateway (its fetch asks for gzip).

The split of the cores: nothing is pinned; the gateway, the reader (this process), the Node
client (its own process) and Redis share the cores.

Writes ``<out>.json``, ``<out>.md`` and ``<out>.png`` (share of ops received over time, and
ops/s over time, per run).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import resource
import statistics
import tempfile
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bucketsync.bench.procs import (
    cpu_seconds,
    drop_store,
    free_port,
    raise_nofile,
    spawn_cli,
    stop,
    wait_listening,
    write_config,
)
from bucketsync.bench.report import Plot, result_path, write_report
from bucketsync.config import Settings
from bucketsync.simclient import ClientState, stream_once
from bucketsync.tokens import make_dev_token
from pipeline import core
from pipeline.cdc import KafkaRecord, UpsertEvent
from pipeline.rules import parse_rules
from pipeline.store import Store

RULES = """
bucket_definitions:
  everything:
    data:
      - SELECT id, title, body FROM items
"""

GOALS = {"cold_ops_per_s": 300_000, "ops": 1_000_000}
_OP = b'"op_id"'
_DONE = b"checkpoint_complete"


def _item(i: int) -> UpsertEvent:
    return {
        "action": "upsert",
        "table": "items",
        "source_table": "items",
        "key": {"id": f"i{i:07d}"},
        "row": {
            "id": f"i{i:07d}",
            "title": f"item number {i}",
            "body": f"body of item {i}: " + "lorem ipsum dolor sit amet " * 2,
        },
    }


async def seed(store: Store, ops: int) -> int:
    rules = parse_rules(RULES)
    step = 5000
    for start in range(0, ops, step):
        evs = [_item(i) for i in range(start, min(ops, start + step))]
        plan = core.plan_batch(
            [(KafkaRecord("seed", 0, start + j, b"", b""), ev) for j, ev in enumerate(evs)],
            rules,
            {},
        )
        res = await store.apply(plan.batch)
        assert res.status == "ok", res
    return await store.checkpoint()


async def raw_sync(port: int, token: str, gzip: bool = False) -> dict[str, Any]:
    """POST /sync/stream and read until checkpoint_complete, counting ops (no parsing).
    ``gzip``: ask for it and inflate what arrives (chunk framing is left in the inflater's
    input only when the response is not gzip: then the count runs on the raw bytes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    body = orjson.dumps({"buckets": [], "raw_data": True, "client_id": "bench"})
    t0 = time.perf_counter()
    enc = "Accept-Encoding: gzip\r\n" if gzip else ""
    writer.write(
        b"POST /sync/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"{enc}Authorization: Token {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    ops = 0
    size = 0
    tail = b""
    marks: list[tuple[float, int]] = []
    dechunk = _Dechunk() if gzip else None
    try:
        while True:
            chunk = await reader.read(1 << 20)
            if not chunk:
                raise RuntimeError("the gateway closed the stream before checkpoint_complete")
            size += len(chunk)
            if dechunk is not None:
                chunk = dechunk.feed(chunk)
            buf = tail + chunk
            ops += buf.count(_OP) - tail.count(_OP)
            tail = buf[-32:]
            marks.append((time.perf_counter() - t0, ops))
            if _DONE in buf:
                break
    finally:
        writer.close()
    return {"seconds": time.perf_counter() - t0, "ops": ops, "bytes": size, "marks": marks}


class _Dechunk:
    """A gzip response's body, inflated as it arrives (HTTP/1.1 chunk framing removed)."""

    def __init__(self) -> None:
        self.buf = b""
        self.head_done = False
        self.gz = False
        self.inflate = zlib.decompressobj(31)

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        if not self.head_done:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return b""
            self.head_done = True
            self.gz = b"content-encoding: gzip" in head.lower()
            self.buf = rest
        out = []
        while True:
            size_s, sep, rest = self.buf.partition(b"\r\n")
            if not sep:
                break
            size = int(size_s, 16)
            if len(rest) < size + 2:
                break
            out.append(rest[:size])
            self.buf = rest[size + 2 :]
            if size == 0:
                break
        body = b"".join(out)
        return self.inflate.decompress(body) if self.gz else body


async def simulator_sync(url: str, token: str) -> dict[str, Any]:
    state = ClientState()
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await stream_once(
            session,
            url,
            token,
            state,
            on_line=lambda kind, st: kind == "checkpoint_complete",
            timeout_s=600,
        )
    return {
        "seconds": time.perf_counter() - t0,
        "ops": state.ops,
        "completed": state.completed,
        "mismatches": len(state.mismatches),
        "protocol_errors": len(state.protocol_errors),
        "rows": sum(len(b.rows) for b in state.buckets.values()),
    }


async def node_sync(url: str, token: str, timeout: float) -> dict[str, Any]:
    try:
        from tests.e2e.powersync_client import PowerSyncNodeClient, node_client_available
    except ImportError:
        return {"skipped": "tests/e2e/powersync_client.py not importable (run from a checkout)"}
    ok, why = node_client_available()
    if not ok:
        return {"skipped": f"official Node client unavailable: {why}"}
    schema = {"items": {"title": "text", "body": "text"}}
    async with PowerSyncNodeClient(url, schema, log_level="warn") as client:
        t0 = time.perf_counter()
        await client.connect(token)
        await client.wait_synced(timeout=timeout, this_run=True)
        took = time.perf_counter() - t0
        rows = await client.query("SELECT count(*) AS n FROM items")
        return {
            "seconds": took,
            "rows": int(rows[0]["n"]),
            "checksum_mismatches": len(client.checksum_mismatches),
        }


def run(settings: Settings, *, ops: int, runs: int, node: bool, workdir: Path) -> dict[str, Any]:
    from bucketsync import stack

    raise_nofile()
    stack.ensure_up(settings)
    prefix = f"bench-isync-{uuid.uuid4().hex[:8]}"
    (workdir / "rules.yaml").write_text(RULES)
    port = free_port()
    cfg = workdir / "bucketsync.yaml"
    sections: dict[str, dict[str, Any]] = {
        "redis": {"prefix": prefix},
        "gateway": {"port": port, "host": "127.0.0.1", "workers": 1},
        "stack": {"state_dir": str(settings.state_dir)},
    }
    s = write_config(settings, cfg, sections, sync_rules=str(workdir / "rules.yaml"))
    cfg_gz = workdir / "bucketsync-gzip.yaml"
    gz_sections = {**sections, "gateway": {**sections["gateway"], "compression": "gzip"}}
    write_config(settings, cfg_gz, gz_sections, sync_rules=str(workdir / "rules.yaml"))
    token = make_dev_token(s, sub="bench", ttl_s=7200)
    url = f"http://127.0.0.1:{port}"
    log = workdir / "gateway.log"
    result: dict[str, Any] = {
        "benchmark": "initial-sync",
        "ops": ops,
        "cores": os.cpu_count(),
        "split": "no pinning: the gateway (`bucketsync gateway`, workers 1), the raw reader "
        "and the simulator (bench process), the Node client (its own process) and Redis "
        "share the cores",
    }
    gw = None

    async def go() -> None:
        nonlocal gw
        store = Store.from_settings(s)
        try:
            await measure(store)
        finally:
            stop(gw)
            await drop_store(store)

    async def measure(store: Store) -> None:
        nonlocal gw
        t0 = time.perf_counter()
        cp = await seed(store, ops)
        result["seed_seconds"] = round(time.perf_counter() - t0, 1)
        result["checkpoint"] = cp
        colds = []
        for i in range(runs):
            stop(gw)
            gw = spawn_cli("gateway", cfg, log=log, raise_nofile=True)
            wait_listening(port, gw, log)
            await asyncio.sleep(0.5)
            cpu0 = cpu_seconds(gw.pid)
            others0 = await _other_cpu(store)
            res = await raw_sync(port, token)
            res["gateway_cpu_s"] = cpu_seconds(gw.pid) - cpu0
            others1 = await _other_cpu(store)
            res["reader_cpu_s"] = others1[0] - others0[0]
            res["redis_cpu_s"] = others1[1] - others0[1]
            colds.append(res)
            print(f"cold run {i + 1}: {res['ops'] / res['seconds']:,.0f} ops/s", flush=True)
        assert gw is not None
        cpu0 = cpu_seconds(gw.pid)
        warm = await raw_sync(port, token)
        warm["gateway_cpu_s"] = cpu_seconds(gw.pid) - cpu0
        sim = await simulator_sync(url, token)
        nd: dict[str, Any] = (
            await node_sync(url, token, timeout=900) if node else {"skipped": "--no-node"}
        )
        result["cold_runs"] = [
            {
                "ops": c["ops"],
                "seconds": round(c["seconds"], 3),
                "ops_per_s": round(c["ops"] / c["seconds"]),
                "ops_per_gateway_cpu_s": round(c["ops"] / max(c["gateway_cpu_s"], 1e-9)),
                "bytes": c["bytes"],
                "gateway_cpu_s": round(c["gateway_cpu_s"], 3),
                "reader_cpu_s": round(c["reader_cpu_s"], 3),
                "redis_cpu_s": round(c["redis_cpu_s"], 3),
            }
            for c in colds
        ]
        result["cold_ops_per_s_median"] = round(
            statistics.median(c["ops"] / c["seconds"] for c in colds)
        )
        result["warm"] = {
            "ops": warm["ops"],
            "seconds": round(warm["seconds"], 3),
            "ops_per_s": round(warm["ops"] / warm["seconds"]),
            "ops_per_gateway_cpu_s": round(warm["ops"] / max(warm["gateway_cpu_s"], 1e-9)),
        }
        result["simulator"] = {**sim, "seconds": round(sim["seconds"], 3)}
        if "seconds" in nd:
            nd["seconds"] = round(nd["seconds"], 3)
            nd["ops_per_s"] = round(ops / nd["seconds"])
        result["node_client"] = nd
        # gzip: a fresh gateway that compresses; the raw reader cold, then the Node client
        stop(gw)
        gw = spawn_cli("gateway", cfg_gz, log=log, raise_nofile=True)
        wait_listening(port, gw, log)
        await asyncio.sleep(0.5)
        cpu0 = cpu_seconds(gw.pid)
        gz = await raw_sync(port, token, gzip=True)
        gz_cpu = cpu_seconds(gw.pid) - cpu0
        result["gzip"] = {
            "ops": gz["ops"],
            "seconds": round(gz["seconds"], 3),
            "ops_per_s": round(gz["ops"] / gz["seconds"]),
            "gateway_cpu_s": round(gz_cpu, 3),
            "plain_gateway_cpu_s": round(colds[-1]["gateway_cpu_s"], 3),
            "bytes": gz["bytes"],
            "plain_bytes": colds[-1]["bytes"],
        }
        ndz: dict[str, Any] = (
            await node_sync(url, token, timeout=900) if node else {"skipped": "--no-node"}
        )
        if "seconds" in ndz:
            ndz["seconds"] = round(ndz["seconds"], 3)
            ndz["ops_per_s"] = round(ops / ndz["seconds"])
        result["node_client_gzip"] = ndz
        result["arrival"] = {
            "cold (last run)": _downsample(colds[-1]["marks"]),
            "warm": _downsample(warm["marks"]),
        }

    asyncio.run(go())
    return result


async def _other_cpu(store: Store) -> tuple[float, float]:
    """CPU seconds so far of this process (the raw reader) and of the Redis server (all of
    its clients: on a shared Redis, other users' load too)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    info = await store.r.info("cpu")
    return (
        ru.ru_utime + ru.ru_stime,
        float(info.get("used_cpu_user", 0)) + float(info.get("used_cpu_sys", 0)),
    )


def _downsample(marks: list[tuple[float, int]], n: int = 300) -> list[tuple[float, int]]:
    step = max(1, len(marks) // n)
    out = [(round(t, 4), k) for t, k in marks[::step]]
    if marks and out[-1] != (round(marks[-1][0], 4), marks[-1][1]):
        out.append((round(marks[-1][0], 4), marks[-1][1]))
    return out


def report(res: dict[str, Any], out: Path) -> None:
    nd = res["node_client"]
    node_row = (
        f"{nd['seconds']} s ({nd['ops_per_s']:,} ops/s), {nd['rows']:,} rows, "
        f"{nd['checksum_mismatches']} checksum mismatches"
        if "seconds" in nd
        else f"skipped: {nd.get('skipped')}"
    )
    ndz = res["node_client_gzip"]
    node_gz_row = (
        f"{ndz['seconds']} s ({ndz['ops_per_s']:,} ops/s), {ndz['rows']:,} rows, "
        f"{ndz['checksum_mismatches']} checksum mismatches"
        if "seconds" in ndz
        else f"skipped: {ndz.get('skipped')}"
    )
    gz = res["gzip"]
    sim = res["simulator"]
    cold_runs = ", ".join(f"{c['ops_per_s']:,}" for c in res["cold_runs"])
    md = "\n".join(
        [
            f"# bench initial-sync: one bucket of {res['ops']:,} ops",
            "",
            "| measure | value | goal (issue 12) |",
            "|---|---|---|",
            f"| server encode rate, cold (median of {len(res['cold_runs'])}: {cold_runs}) | "
            f"{res['cold_ops_per_s_median']:,} ops/s | ≥ {GOALS['cold_ops_per_s']:,} ops/s for "
            f"{GOALS['ops']:,} ops |",
            f"| cold: ops per gateway CPU-second (last run) | "
            f"{res['cold_runs'][-1]['ops_per_gateway_cpu_s']:,} | - |",
            "| cold: CPU seconds per run, gateway / raw reader / Redis (all its clients) / "
            "wall | "
            + "; ".join(
                f"{c['gateway_cpu_s']} / {c['reader_cpu_s']} / {c['redis_cpu_s']} / {c['seconds']}"
                for c in res["cold_runs"]
            )
            + " | - |",
            f"| warm (shared page cache) | {res['warm']['ops_per_s']:,} ops/s | - |",
            f"| official Node client: connect → first checkpoint applied | {node_row} | report |",
            f"| Python simulator (parses, verifies checksums) | {sim['seconds']} s, "
            f"{sim['ops']:,} ops, {sim['mismatches']} mismatches, "
            f"{sim['protocol_errors']} protocol errors | 0 / 0 |",
            f"| bytes on the wire (cold) | {res['cold_runs'][-1]['bytes']:,} | - |",
            f"| gzip (`gateway.compression: gzip`, level 1), cold: bytes on the wire | "
            f"{gz['bytes']:,} ({gz['bytes'] / max(1, gz['plain_bytes']):.1%} of plain) | - |",
            f"| gzip, cold: gateway CPU / wall rate | {gz['gateway_cpu_s']} s "
            f"(plain: {gz['plain_gateway_cpu_s']} s) / {gz['ops_per_s']:,} ops/s | - |",
            f"| official Node client on the gzip gateway | {node_gz_row} | report |",
            "",
            f"{res['cores']} cores; {res['split']}. Seeding took {res['seed_seconds']} s.",
            "",
        ]
    )
    print(md)
    series_rates: dict[str, list[tuple[float, float]]] = {}
    for label, pts in res["arrival"].items():
        series_rates[label] = [
            (t1, (k1 - k0) / (t1 - t0)) for (t0, k0), (t1, k1) in itertools.pairwise(pts) if t1 > t0
        ]
    write_report(res, out, md, _arrival_plot(res, max(1, res["ops"]), series_rates))


def _arrival_plot(
    res: dict[str, Any], total: int, rates: dict[str, list[tuple[float, float]]]
) -> Plot:
    return lambda plt: _draw_arrival(plt, res, total, rates)


def _draw_arrival(
    plt: Any, res: dict[str, Any], total: int, rates: dict[str, list[tuple[float, float]]]
) -> None:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for label, pts in res["arrival"].items():
        a1.plot([t * 1000 for t, _ in pts], [k / total for _, k in pts], label=label)
    a1.set_xlabel("ms since the request")
    a1.set_ylabel("share of the bucket's ops received")
    a1.set_title("ops received over time (CDF)")
    a1.grid(alpha=0.3)
    a1.legend()
    for label, pts in rates.items():
        a2.plot([t for t, _ in pts], [v for _, v in pts], label=label)
    a2.set_xlabel("seconds since the request")
    a2.set_ylabel("ops/s")
    a2.set_title("throughput over time")
    a2.grid(alpha=0.3)
    a2.legend()
    fig.suptitle(f"bench initial-sync: {res['ops']:,} ops in one bucket")


def main(
    settings: Settings,
    *,
    ops: int = 200_000,
    runs: int = 3,
    node: bool = True,
    out: str | None = None,
) -> int:
    """``bucketsync bench initial-sync``: exit code 1 when the simulator saw checksum
    mismatches or protocol errors."""
    with tempfile.TemporaryDirectory(prefix="bucketsync-isync-") as tmp:
        res = run(settings, ops=ops, runs=max(1, runs), node=node, workdir=Path(tmp))
    report(res, result_path(out, "initial-sync"))
    sim = res["simulator"]
    return 0 if sim["mismatches"] == 0 and sim["protocol_errors"] == 0 else 1
