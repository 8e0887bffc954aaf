"""No flicker with exact write checkpoints (issue 13 part 4), end to end with the real
PostgreSQL source: PostgreSQL -> Debezium -> Kafka -> processor -> Redis -> gateway -> the
official PowerSync Node client.

The client inserts a row locally; its "backend" inserts the same row into PostgreSQL before the
upload handler returns (see ``_write_row``), then the SDK asks for a write checkpoint. The
connector polls slowly (``poll.interval.ms`` of :data:`POLL_MS`), so Debezium publishes the row
seconds after the commit. The client's local table is polled every few milliseconds from the
local write until the server's copy has been applied:

* ``gateway.write_checkpoint_mode: source``: the write checkpoint is bound to
  ``pg_current_wal_lsn()`` and acknowledged only after an event at or past it (the connector's
  heartbeat rows, captured in the test schema) has been applied, so the row must never be absent;
* ``kafka`` (control, same connector and processor): the checkpoint is bound to Kafka's end
  offsets, acknowledged before Debezium has published the row; the SDK then applies the server
  state without the row and it disappears until Debezium catches up. The control shows that the
  poller sees such gaps; it is required to flicker at least once over :data:`WRITES` writes
  (each flickers unless Debezium publishes within ~:data:`UPLOAD_DELAY_MS`, i.e. ~80 %).

Unique schema, connector, slot, publication, topic prefix and Redis prefix per run (``ns``);
all removed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bucketsync import stack as stack_mod
from bucketsync.config import Settings
from bucketsync.tokens import make_dev_token
from tests.conftest import Namespace
from tests.e2e.powersync_client import PowerSyncNodeClient, require_node_client
from tests.e2e.test_postgres_e2e import (
    debezium_source,
    pg_settings,  # noqa: F401  (fixture)
)
from tests.gateway_helpers import running_gateway
from tests.processes import start_processor, write_config

pytestmark = [pytest.mark.stack, pytest.mark.e2e, pytest.mark.timeout(240)]

#: Debezium waits this long between polls of its queue: the row reaches Kafka up to this late
POLL_MS = 4000
#: the connector writes its heartbeat row this often (passes pending source-mode checkpoints)
HEARTBEAT_MS = 500
#: uploadData holds the local transaction this long; the row is committed in PostgreSQL inside
UPLOAD_DELAY_MS = 800
#: local writes per mode
WRITES = 3
#: the client's local table is read this often while a write settles
POLL_INTERVAL_S = 0.01

RULES = """
bucket_definitions:
  everything:
    data:
      - SELECT * FROM items
"""
CLIENT_SCHEMA = {"items": {"name": "text"}}


@contextlib.contextmanager
def slow_connector(settings: Settings, ns: Namespace, schema: str) -> Iterator[None]:
    """A connector of our own for ``schema`` (``debezium_source``: unique slot/publication/
    prefix, removed after), with slow polls and heartbeat rows in ``<schema>.heartbeat``."""
    hb_prefix = f"{ns.prefix}.__heartbeat"
    ns.track(f"{hb_prefix}.{ns.prefix}")  # Debezium's own heartbeat topic, deleted by ns
    extra = {
        "poll.interval.ms": str(POLL_MS),
        "heartbeat.interval.ms": str(HEARTBEAT_MS),
        "topic.heartbeat.prefix": hb_prefix,
        "heartbeat.action.query": (
            f"INSERT INTO {schema}.heartbeat (id, ts) VALUES (1, now()) "
            "ON CONFLICT (id) DO UPDATE SET ts = EXCLUDED.ts"
        ),
    }
    with debezium_source(settings, ns, schema, tag="wcp", extra=extra):
        yield


@dataclass
class WriteTrace:
    """What the poller saw of one local write, times in seconds since the local write."""

    row_id: str
    committed_s: float = 0.0
    uploaded_s: float | None = None
    server_copy_s: float | None = None
    polls: int = 0
    #: (start, end) of each interval in which the row was absent from the local table
    gaps: list[tuple[float, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        r = 3
        return {
            "row": self.row_id,
            "committed_s": round(self.committed_s, r),
            "uploaded_s": None if self.uploaded_s is None else round(self.uploaded_s, r),
            "server_copy_s": None if self.server_copy_s is None else round(self.server_copy_s, r),
            "polls": self.polls,
            "gaps_s": [(round(a, r), round(b, r)) for a, b in self.gaps],
        }


async def _write_row(
    c: PowerSyncNodeClient, pg: Any, schema: str, row_id: str, settle_s: float
) -> WriteTrace:
    """Local INSERT, the same row committed in PostgreSQL while uploadData holds the
    transaction, then poll the local table until the server's copy is applied (+ settle_s)."""
    trace = WriteTrace(row_id)
    uploads_before = len(c.uploads)
    t0 = time.monotonic()
    await c.write("INSERT INTO items (id, name) VALUES (?, ?)", [row_id, f"row {row_id}"])
    # the "backend" of the upload handler: uploadData started after the local write and
    # sleeps UPLOAD_DELAY_MS before completing the transaction (only then does the SDK ask for
    # a write checkpoint), so a commit that ends before t0 + delay precedes that request
    await pg.execute(
        f"INSERT INTO {schema}.items (id, name) VALUES (%s, %s)", (row_id, f"row {row_id}")
    )
    trace.committed_s = time.monotonic() - t0
    assert trace.committed_s < UPLOAD_DELAY_MS / 1000 * 0.75, (
        f"PostgreSQL commit took {trace.committed_s:.3f}s: not inside the upload window, "
        "the run proves nothing"
    )
    sql = (
        "SELECT (SELECT count(*) FROM items WHERE id = ?) AS local, "
        "(SELECT count(*) FROM ps_oplog WHERE row_type = 'items' AND row_id = ?) AS server"
    )
    gap_start: float | None = None
    done_at: float | None = None
    deadline = t0 + (POLL_MS + UPLOAD_DELAY_MS) / 1000 + 15
    while True:
        row = (await c.query(sql, [row_id, row_id]))[0]
        now = time.monotonic() - t0
        trace.polls += 1
        if trace.uploaded_s is None and len(c.uploads) > uploads_before:
            trace.uploaded_s = now
        if not row["local"] and gap_start is None:
            gap_start = now
        elif row["local"] and gap_start is not None:
            trace.gaps.append((gap_start, now))
            gap_start = None
        if row["server"] and row["local"] and trace.server_copy_s is None:
            trace.server_copy_s = now
            done_at = now + settle_s
        if done_at is not None and now >= done_at:
            break
        if t0 + now > deadline:
            raise AssertionError(f"write {row_id} not settled in time: {trace.summary()}")
        await asyncio.sleep(POLL_INTERVAL_S)
    if gap_start is not None:
        trace.gaps.append((gap_start, time.monotonic() - t0))
    return trace


async def _run_mode(
    mode: str,
    settings: Settings,
    tmp_path: Path,
    pg: Any,
    schema: str,
) -> list[WriteTrace]:
    async with running_gateway(settings, with_position=True) as url:
        token = make_dev_token(settings, sub=f"u-{mode}")
        db = str(tmp_path / f"client-{mode}.db")
        async with PowerSyncNodeClient(url, CLIENT_SCHEMA, db_path=db) as c:
            await c.connect(token, upload_delay_ms=UPLOAD_DELAY_MS)
            await c.wait_synced(timeout=60)
            traces = [
                await _write_row(c, pg, schema, f"{mode}-{i}", settle_s=0.5) for i in range(WRITES)
            ]
            want = [{"id": t.row_id} for t in traces]
            got = await c.query("SELECT id FROM items WHERE id LIKE ? ORDER BY id", [f"{mode}-%"])
            assert got == want
            assert c.checksum_mismatches == []
            await c.disconnect()
    return traces


async def test_own_writes_never_flicker_in_source_mode(
    pg_settings: Settings,  # noqa: F811
    make_settings: Callable[..., Settings],
    create_topic: Callable[..., str],
    ns: Namespace,
    tmp_path: Path,
) -> None:
    require_node_client()
    import psycopg

    t_start = time.monotonic()
    schema = f"bs_wcp_{ns.hex}"
    stack_mod.psql(
        pg_settings,
        f"""
        CREATE SCHEMA {schema};
        CREATE TABLE {schema}.items (id text PRIMARY KEY, name text);
        CREATE TABLE {schema}.heartbeat (id integer PRIMARY KEY, ts timestamptz);
        """,
    )
    topics = [create_topic(f"{ns.prefix}.{schema}.{t}") for t in ("items", "heartbeat")]
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES)
    dsn = stack_mod.postgres_dsn(pg_settings)
    base = make_settings(
        kafka={"topics": topics}, sync_rules=str(rules_file), compaction={"interval_s": 0}
    )
    proc_log = (tmp_path / "processor.log").open("wb")
    proc = start_processor(write_config(tmp_path, base, "bucketsync"), "kafka", proc_log)
    results: dict[str, list[WriteTrace]] = {}
    timings: dict[str, float] = {}
    try:
        with slow_connector(pg_settings, ns, schema):
            timings["connector running"] = time.monotonic() - t_start
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as pg:
                for mode in ("source", "kafka"):
                    gateway: dict[str, Any] = {"write_checkpoint_mode": mode}
                    if mode == "source":
                        gateway |= {"source_dsn": dsn, "source_connector": ns.prefix}
                    s = make_settings(
                        kafka={"topics": topics},
                        sync_rules=str(rules_file),
                        compaction={"interval_s": 0},
                        gateway=gateway,
                    )
                    results[mode] = await _run_mode(mode, s, tmp_path, pg, schema)
                    timings[f"{mode} done"] = time.monotonic() - t_start
    finally:
        proc.terminate()
        proc.wait(30)
        proc_log.close()
    report = {
        "poll_interval_ms": POLL_MS,
        "upload_delay_ms": UPLOAD_DELAY_MS,
        "heartbeat_ms": HEARTBEAT_MS,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        **{mode: [t.summary() for t in traces] for mode, traces in results.items()},
    }
    print("\nwrite-checkpoint flicker report: " + json.dumps(report, indent=1))
    proc_text = (tmp_path / "processor.log").read_text(errors="replace")
    assert "Traceback" not in proc_text, proc_text[-3000:]
    # the point: in source mode the client's own row is never absent after its local write
    for t in results["source"]:
        assert t.gaps == [], f"source mode: row {t.row_id} disappeared: {t.summary()}"
    # the control: the same poller does see kafka mode's gaps
    flickered = [t for t in results["kafka"] if t.gaps]
    assert flickered, f"kafka mode never flickered (control not reproduced): {report['kafka']}"
