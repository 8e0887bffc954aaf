"""``bucketsync bench lookups``: data-dependent buckets (parameter queries over a table).

Measures, against the configured Redis:

- bucket expansion for a user with 1,000 memberships: one sync request's bucket set
  resolved through the lookup index and its checkpoint read (what the gateway does
  before the first line), median and p99 over repeated requests (warm: the expansion
  cache holds the user's last rows, one atomic read confirms them) and cold (a new
  connection with an empty cache: plan, lookup read, evaluation, atomic read); and the
  atomic read alone (checkpoint, 1,000 bucket states and the lookup rows in one Lua call:
  Redis, transport and parsing the states), so the rest is the resolver's Python;
- the lookup index's memory per membership row: the lookup hash field (a user with
  1,000 memberships, and 1,000 users with one each), the row's stored lookup entries,
  and the whole membership row as stored (source row, entries, table set member);
- the processor's apply rate for membership rows.

The store keys live under a fresh prefix that is deleted afterwards. With ``--out``, the
JSON is written there and a markdown table (.md) and a histogram (.png) next to it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from typing import Any

from bucketsync.bench.procs import drop_store
from bucketsync.bench.report import Plot, report_rows
from bucketsync.config import Settings
from gateway.buckets import BucketResolver, _cache_for
from pipeline import core
from pipeline.cdc import KafkaRecord, UpsertEvent
from pipeline.rules import parse_rules
from pipeline.store import Store

RULES = """
bucket_definitions:
  lists:
    parameters: SELECT list_id FROM memberships WHERE user_id = request.user_id()
    data:
      - SELECT id, list_id, title FROM todos WHERE list_id = bucket.list_id
"""

_MT = "bench.public.memberships"
_TT = "bench.public.todos"


def _member(mid: int, user: str, lst: str) -> UpsertEvent:
    return {
        "action": "upsert",
        "table": _MT,
        "source_table": "memberships",
        "key": {"id": f"m{mid}"},
        "row": {"id": f"m{mid}", "user_id": user, "list_id": lst, "role": "member"},
    }


def _todo(tid: int, lst: str) -> UpsertEvent:
    return {
        "action": "upsert",
        "table": _TT,
        "source_table": "todos",
        "key": {"id": f"t{tid}"},
        "row": {"id": f"t{tid}", "list_id": lst, "title": f"todo {tid}"},
    }


async def _apply(store: Store, rules: Any, events: list[UpsertEvent], topic: str) -> float:
    """Apply in batches of 500 (the processor's core and store); returns seconds."""
    off = 0
    spent = 0.0
    for i in range(0, len(events), 500):
        items = []
        for ev in events[i : i + 500]:
            off += 1
            items.append((KafkaRecord(topic, 0, off, b"", b""), ev))
        t0 = time.perf_counter()
        plan = core.plan_batch(items, rules, {})
        res = await store.apply(plan.batch)
        spent += time.perf_counter() - t0
        assert res.status == "ok", res
    return spent


async def _mem(store: Store, key: str) -> int:
    return int(await store.r.memory_usage(key, samples=0) or 0)


async def _run(settings: Settings, memberships: int, requests: int) -> dict[str, Any]:
    prefix = f"bench-lookups-{uuid.uuid4().hex[:8]}"
    store = Store.from_settings(settings, prefix=prefix)
    rules = parse_rules(RULES)
    try:
        # one user in `memberships` lists, each list with one todo
        heavy = [_member(i, "heavy", f"L{i}") for i in range(memberships)]
        apply_s = await _apply(store, rules, heavy, _MT)
        await _apply(store, rules, [_todo(i, f"L{i}") for i in range(memberships)], _TT)
        # `memberships` users with one membership each
        light = [_member(memberships + i, f"u{i}", "shared") for i in range(memberships)]
        await _apply(store, rules, light, _MT + "2")

        resolver = BucketResolver(
            rules,
            {"sub": "heavy"},
            {},
            include_defaults=True,
            max_buckets=memberships + 10,
            max_parameter_results=memberships + 10,
        )
        res = await resolver.resolve(store)
        assert len(res.grants) == memberships, len(res.grants)
        assert all(st.count == 1 for st in res.states.values())
        times = []
        for _ in range(requests):
            t0 = time.perf_counter()
            await resolver.resolve(store)
            times.append(time.perf_counter() - t0)
        times.sort()
        # the atomic read alone (what resolve() awaits once per warm request)
        names = [g.bucket for g in res.grants]
        reads = []
        for _ in range(requests):
            t0 = time.perf_counter()
            await store.read_checkpoint_with_lookups(names, resolver.lookup_keys)
            reads.append(time.perf_counter() - t0)
        reads.sort()
        # cold: a new connection of a user whose expansion is not cached (the plan, the
        # lookup read, the evaluation and the atomic read)
        cold = []
        for _ in range(max(20, requests // 5)):
            _cache_for(rules).clear()  # forget every expansion
            t0 = time.perf_counter()
            fresh = BucketResolver(
                rules,
                {"sub": "heavy"},
                {},
                include_defaults=True,
                max_buckets=memberships + 10,
                max_parameter_results=memberships + 10,
            )
            await fresh.resolve(store)
            cold.append(time.perf_counter() - t0)
        cold.sort()

        # memory
        heavy_key = store.k("lookup", resolver.lookup_keys[0])
        heavy_lookup = await _mem(store, heavy_key)
        light_lookup = 0
        for i in range(memberships):
            key = store.k("lookup", f'lists\x1f1\x1f["u{i}"]')
            light_lookup += await _mem(store, key)
        rows = await store.row_memory(_MT)  # the row index, its source rows and lookups
        row_total = rows["ri"] + rows["src"] + rows["rl"]
        entries_bytes = 0
        for i in range(memberships):
            key, field = store.row_ref(core.row_key(_MT, {"id": f"m{i}"}), "rl")
            entries_bytes += int(await store.r.hstrlen(key, field))
        table_set = 0  # no table sets since store layout 3 (TRUNCATE walks the row index)
        n = memberships
        return {
            "memberships": n,
            "expansion_requests": requests,
            "expansion_ms_median": round(statistics.median(times) * 1000, 3),
            "expansion_ms_p99": round(times[int(len(times) * 0.99) - 1] * 1000, 3),
            "expansion_ms_max": round(times[-1] * 1000, 3),
            "atomic_read_ms_median": round(statistics.median(reads) * 1000, 3),
            "atomic_read_ms_p99": round(reads[int(len(reads) * 0.99) - 1] * 1000, 3),
            "expansion_ms": [round(t * 1000, 3) for t in times],
            "expansion_cold_ms": [round(t * 1000, 3) for t in cold],
            "expansion_cold_ms_median": round(statistics.median(cold) * 1000, 3),
            "expansion_cold_ms_p99": round(cold[int(len(cold) * 0.99) - 1] * 1000, 3),
            "lookup_hash_bytes_per_membership_one_user": round(heavy_lookup / n, 1),
            "lookup_hash_bytes_per_membership_one_each": round(light_lookup / n, 1),
            "row_lookup_entries_bytes_per_membership": round(entries_bytes / n, 1),
            "membership_row_bytes": round(row_total / n, 1),
            "table_set_bytes_per_membership": round(table_set / n, 1),
            "membership_apply_rows_per_s": round(n / apply_s),
        }
    finally:
        await drop_store(store)


def bench_lookups(
    settings: Settings, out: str | None, memberships: int = 1000, requests: int = 300
) -> int:
    res = asyncio.run(_run(settings, memberships, requests))
    rows = [
        (
            f"bucket expansion, {memberships} memberships: median",
            f"{res['expansion_ms_median']} ms",
        ),
        ("  p99 (goal <= 5 ms)", f"{res['expansion_ms_p99']} ms"),
        (
            "  of which the atomic read (states + lookups, one Lua call): median / p99",
            f"{res['atomic_read_ms_median']} / {res['atomic_read_ms_p99']} ms",
        ),
        (
            "  cold (new connection, nothing cached): median / p99",
            f"{res['expansion_cold_ms_median']} / {res['expansion_cold_ms_p99']} ms",
        ),
        (
            "lookup hash per membership (one user, all)",
            f"{res['lookup_hash_bytes_per_membership_one_user']} B",
        ),
        (
            "lookup hash per membership (one per user)",
            f"{res['lookup_hash_bytes_per_membership_one_each']} B",
        ),
        (
            "row's lookup entries (row hash field)",
            f"{res['row_lookup_entries_bytes_per_membership']} B",
        ),
        (
            "membership row: its row index, source row and entries fields",
            f"{res['membership_row_bytes']} B",
        ),
        (
            "table set member (none since store layout 3)",
            f"{res['table_set_bytes_per_membership']} B",
        ),
        ("membership rows applied", f"{res['membership_apply_rows_per_s']}/s"),
    ]
    title = "bench lookups (data-dependent buckets)"
    report_rows(res, out, "lookups", title, rows, _histogram(res))
    return 0


def _histogram(res: dict[str, Any]) -> Plot:
    """Per-request times, warm and cold, against the 5 ms goal."""

    def draw(plt: Any) -> None:
        _fig, ax = plt.subplots(figsize=(8, 4))
        top = max(res["expansion_ms"][int(len(res["expansion_ms"]) * 0.99) - 1] * 2, 10.0)
        bins = [top * i / 60 for i in range(61)]
        ax.hist([min(t, top) for t in res["expansion_ms"]], bins=bins, alpha=0.7, label="repeat")
        ax.hist([min(t, top) for t in res["expansion_cold_ms"]], bins=bins, alpha=0.7, label="cold")
        ax.axvline(5.0, color="k", linestyle=":", label="goal 5 ms")
        ax.set_xlabel(f"ms per request ({res['memberships']} memberships; last bin: >= {top:.0f})")
        ax.set_ylabel("requests")
        ax.set_title("bucketsync bench lookups: bucket expansion")
        ax.legend()

    return draw
