"""End to end with a real CDC source (issue 6): PostgreSQL -> Debezium on Kafka Connect ->
Kafka -> processor (faust) -> Redis -> gateway -> the official PowerSync Node client.

Every column type of cdc-events.md §3.5 that PostgreSQL apps commonly use goes through
INSERT, UPDATE (also a primary-key change and an UPDATE that leaves a TOASTed column
out of the WAL), DELETE, TRUNCATE and a multi-table transaction; a pre-existing table
arrives through Debezium's initial snapshot. The client's tables must equal a direct
``SELECT`` on PostgreSQL after the §3.5 conversion (done here in Python from PostgreSQL's
own text output, independently of pipeline.cdc).

Needs ``bucketsync stack up --source postgres`` (started here if needed: the first run
downloads the Connect and Debezium jars). Skipped loudly only if PostgreSQL or Java cannot
be installed; ``BUCKETSYNC_TEST_REQUIRE_POSTGRES=1`` turns that skip into a failure.
Each run has its own schema, topic prefix, replication slot, publication and connector.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from bucketsync import stack as stack_mod
from bucketsync.config import Settings
from bucketsync.errors import UserError
from bucketsync.tokens import make_dev_token
from tests.conftest import Namespace, StackInfo, hidden_test_env
from tests.e2e.powersync_client import PowerSyncNodeClient, require_node_client
from tests.gateway_helpers import running_gateway
from tests.processes import start_processor, write_config

pytestmark = [pytest.mark.stack, pytest.mark.e2e, pytest.mark.timeout(900)]

REQUIRE_ENV = "BUCKETSYNC_TEST_REQUIRE_POSTGRES"

RULES = """
bucket_definitions:
  everything:
    data:
      - SELECT * FROM items
      - SELECT * FROM notes
      - SELECT * FROM pre
"""

#: column -> PostgreSQL type tag (drives the SELECT casts and the §3.5 conversion below)
COLUMNS: dict[str, dict[str, str]] = {
    "items": {
        "id": "int",
        "name": "text",
        "qty": "int",
        "big": "bigint",
        "price": "numeric2",
        "flag": "bool",
        "happened_at": "timestamp",
        "happened_tz": "timestamptz",
        "day": "date",
        "ref": "uuid",
        "attrs": "jsonb",
        "tags": "text[]",
        "blob": "bytea",
        "notes": "text",
    },
    "notes": {"id": "text", "item_id": "int", "body": "text"},
    "pre": {
        "id": "bigint",
        "label": "text",
        "amount": "numeric2",
        "created": "date",
        "seen_at": "timestamptz",
    },
}
#: §3.5 storage class per type tag, as declared in the client schema
CLIENT_TYPE = {"int": "integer", "bigint": "integer", "bool": "integer"}

DDL = """
CREATE SCHEMA {s};
CREATE TABLE {s}.items (
  id integer PRIMARY KEY, name text, qty integer, big bigint, price numeric(10,2), flag boolean,
  happened_at timestamp, happened_tz timestamptz, day date, ref uuid, attrs jsonb, tags text[],
  blob bytea, notes text);
CREATE TABLE {s}.notes (id text PRIMARY KEY, item_id integer NOT NULL, body text NOT NULL);
CREATE TABLE {s}.pre (id bigint PRIMARY KEY, label text NOT NULL, amount numeric(10,2),
  created date, seen_at timestamptz);
-- rows that exist before the connector: they arrive through the initial snapshot (op r)
INSERT INTO {s}.pre VALUES
  (1, 'first', 10.00, '2024-01-31', '2024-01-31 23:59:59.999999+00'),
  (2, 'second', NULL, NULL, NULL),
  (9007199254740993, 'key beyond 2^53', -0.05, '1970-01-01', '1969-12-31 23:59:59.5-08');
"""

INSERTS = """
INSERT INTO {s}.items VALUES
  (1, 'héllo ✓ 🚀 "quoted"', 42, 9007199254740993, 1234.50, true,
   '2024-06-10 10:15:00.123456', '2024-06-10 10:15:00.5+02', '2024-06-10',
   'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '{{"b": [1, 2.5, null], "a": "ünï", "n": {{"x": true}}}}',
   ARRAY['a', 'b c', NULL, 'd"e', 'f,g', 'ü'], '\\x00ff10'::bytea, 'short note'),
  (2, 'to be re-keyed', -7, -9223372036854775808, -0.05, false,
   '1969-07-20 20:17:40', '1969-07-20 20:17:40+00', '1900-01-01',
   '00000000-0000-0000-0000-000000000000', '[]', '{{}}', '\\x'::bytea, NULL),
  (3, 'toasted', 0, 0, 99999999.99, NULL,
   '2000-02-29 00:00:00.000001', '2038-01-19 03:14:08+00', '9999-12-31', NULL, 'null', NULL, NULL,
   (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 4000) AS i)),
  (4, 'doomed', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
INSERT INTO {s}.notes VALUES ('n1', 1, 'first note'), ('n2', 2, 'second note');
"""

CHANGES = """
-- the TOASTed 128 kB 'notes' is not in the WAL record: Debezium sends its placeholder
UPDATE {s}.items SET qty = qty + 1, flag = true WHERE id = 3;
-- primary-key change: delete of key 2 + tombstone + create of key 200
UPDATE {s}.items SET id = 200, name = 're-keyed' WHERE id = 2;
UPDATE {s}.items SET tags = ARRAY['x'], price = 0.10, happened_tz = '2024-12-31 23:00:00-05'
  WHERE id = 1;
DELETE FROM {s}.items WHERE id = 4;
TRUNCATE {s}.notes;
INSERT INTO {s}.notes VALUES ('n3', 200, 'after the truncate');
BEGIN;
  INSERT INTO {s}.items (id, name, qty) VALUES (5, 'in a transaction', 5);
  INSERT INTO {s}.notes VALUES ('n4', 5, 'same transaction, other table');
  UPDATE {s}.pre SET label = 'first, edited', amount = 11.00 WHERE id = 1;
  DELETE FROM {s}.pre WHERE id = 2;
COMMIT;
"""


# --------------------------------------------------------------------------- expected values


def _select_expr(col: str, kind: str) -> str:
    if kind in ("int", "bool", "text"):
        return col
    if kind == "text[]":
        return f"to_json({col})"
    return f"{col}::text"  # PostgreSQL's own text output, converted below


def canonical(kind: str, v: Any) -> Any:
    """cdc-events.md §3.5: the value the client must end with, from PostgreSQL's text output."""
    if v is None:
        return None
    if kind in ("int", "text", "date", "jsonb"):
        return v  # jsonb: PostgreSQL's normalised text, unchanged
    if kind == "bigint":
        return str(int(v))  # compared as CAST(x AS TEXT): JS numbers cannot hold int64
    if kind == "numeric2":
        return str(Decimal(v).quantize(Decimal("0.01")))
    if kind == "bool":
        return 1 if v else 0
    if kind == "timestamp":
        return datetime.fromisoformat(v).strftime("%Y-%m-%dT%H:%M:%S.%f")
    if kind == "timestamptz":
        utc = datetime.fromisoformat(v).astimezone(UTC)
        return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if kind == "uuid":
        return v.lower()
    if kind == "text[]":
        return json.dumps(v, separators=(",", ":"), ensure_ascii=False)
    if kind == "bytea":
        assert v.startswith("\\x"), v
        return base64.b64encode(bytes.fromhex(v[2:])).decode()
    raise AssertionError(kind)


def pg_expected(
    settings: Settings,
    schema: str,
    table: str,
    skip: tuple[str, ...] = (),
    columns: dict[str, dict[str, str]] = COLUMNS,
) -> list[dict]:
    cols = {c: k for c, k in columns[table].items() if c not in skip}
    exprs = ", ".join(f"{_select_expr(c, k)} AS {c}" for c, k in cols.items())
    # a non-UTC session zone, so timestamptz text carries an offset to convert
    out = stack_mod.psql(
        settings,
        "SET TimeZone = 'Asia/Kolkata';\n"
        f"SELECT coalesce(json_agg(row_to_json(x)), '[]') FROM (SELECT {exprs} FROM {schema}.{table}) x",
    )
    rows = [{c: canonical(k, r[c]) for c, k in cols.items()} for r in json.loads(out)]
    for r in rows:
        r["id"] = str(r["id"])  # the client's id column is text
    return sorted(rows, key=lambda r: r["id"])


def client_select(
    table: str, skip: tuple[str, ...] = (), columns: dict[str, dict[str, str]] = COLUMNS
) -> str:
    cols = [
        f"CAST({c} AS TEXT) AS {c}" if k == "bigint" and c != "id" else c
        for c, k in columns[table].items()
        if c not in skip
    ]
    return f"SELECT {', '.join(cols)} FROM {table} ORDER BY id"


def client_schema(columns: dict[str, dict[str, str]] = COLUMNS) -> dict[str, dict[str, str]]:
    return {
        t: {c: CLIENT_TYPE.get(k, "text") for c, k in cols.items() if c != "id"}
        for t, cols in columns.items()
    }


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pg_settings(stack: StackInfo) -> Settings:
    """The shared stack with its PostgreSQL source up (``stack up --source postgres``)."""
    t0 = time.monotonic()
    try:
        with hidden_test_env():
            stack_mod.ensure_up(stack.settings, source="postgres")
    except stack_mod.SourceUnavailable as exc:
        msg = f"POSTGRES CDC SOURCE UNAVAILABLE, real-CDC e2e test not run: {exc}"
        if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
            pytest.fail(msg, pytrace=False)
        warnings.warn(msg, stacklevel=1)
        print(f"\n{'!' * 30}\n{msg}\n{'!' * 30}", file=sys.stderr)
        pytest.skip(msg)
    except UserError as exc:
        pytest.fail(f"could not start the postgres source: {exc}", pytrace=False)
    print(f"\npostgres source up in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return stack.settings


@contextlib.contextmanager
def debezium_source(
    settings: Settings,
    ns: Namespace,
    schema: str,
    register: bool = True,
    *,
    tag: str = "test",
    extra: dict[str, str] | None = None,
) -> Iterator[Callable[[], None]]:
    """A connector of our own for ``schema`` (unique slot/publication/prefix, named after
    ``tag``; ``extra`` connector settings on top); removed after, with its slot, publication
    and the schema. Yields the function that registers it (called already if ``register``)."""
    name = f"bs-{tag}-{ns.hex}"
    slot = pub = f"bs_{tag}_{ns.hex}"
    su = stack_mod.PG_SUPERUSER
    stack_mod.psql(settings, f"CREATE PUBLICATION {pub} FOR TABLES IN SCHEMA {schema}", user=su)
    _, config = stack_mod.connector_config(
        settings,
        {
            "name": name,
            "topic.prefix": ns.prefix,
            "slot.name": slot,
            "slot.drop.on.stop": "true",
            "publication.name": pub,
            "schema.include.list": schema,
            "table.include.list": rf"{schema}\..*",
            "heartbeat.interval.ms": "0",
            **(extra or {}),
        },
    )

    def start() -> None:
        stack_mod.register_connector(settings, name, config, timeout=120)

    try:
        if register:
            start()
        yield start
    finally:
        with contextlib.suppress(Exception):
            stack_mod.remove_connector(settings, name)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                stack_mod.psql(
                    settings,
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                    f"WHERE slot_name = '{slot}' AND NOT active",
                    user=su,
                )
                left = stack_mod.psql(
                    settings,
                    f"SELECT 1 FROM pg_replication_slots WHERE slot_name = '{slot}'",
                    user=su,
                )
            except UserError:
                left = "?"
            if not left.strip():
                break
            time.sleep(0.5)
        with contextlib.suppress(UserError):
            stack_mod.psql(settings, f"DROP PUBLICATION IF EXISTS {pub}", user=su)
        with contextlib.suppress(UserError):
            stack_mod.psql(settings, f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def _dead_letters(bootstrap: str, topic: str) -> int:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{topic}-peek"})
    try:
        if topic not in c.list_topics(timeout=5).topics:
            return 0
        low, high = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=5)
        return int(high - low)
    finally:
        c.close()


# --------------------------------------------------------------------------- the pipeline


@contextlib.asynccontextmanager
async def synced_client(
    pg_settings: Settings,
    make_settings: Callable[..., Settings],
    create_topic: Callable[..., str],
    ns: Namespace,
    tmp_path: Path,
    schema: str,
    rules: str,
    columns: dict[str, dict[str, str]],
) -> AsyncIterator[tuple[Settings, PowerSyncNodeClient]]:
    """Connector for ``schema`` + processor (faust, subprocess) + gateway + official client."""
    topics = [create_topic(f"{ns.prefix}.{schema}.{t}") for t in columns]
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(rules)
    s = make_settings(
        kafka={"topics": topics}, sync_rules=str(rules_file), compaction={"interval_s": 0}
    )
    proc = start_processor(write_config(tmp_path, s, "bucketsync"), "faust", inherit_output=True)
    try:
        with debezium_source(pg_settings, ns, schema):
            async with running_gateway(s) as url:
                token = make_dev_token(s, sub="u1")
                db = str(tmp_path / "client.db")
                async with PowerSyncNodeClient(url, client_schema(columns), db_path=db) as c:
                    await c.connect(token)
                    await c.wait_synced(timeout=90)
                    yield s, c
                    assert c.checksum_mismatches == []
                    await c.disconnect()
        assert _dead_letters(s.kafka.bootstrap_servers, s.kafka.dead_letter_topic) == 0
    finally:
        proc.terminate()
        proc.wait(30)


# --------------------------------------------------------------------------- the tests


async def test_postgres_debezium_to_official_client(
    pg_settings: Settings,
    make_settings: Callable[..., Settings],
    create_topic: Callable[..., str],
    ns: Namespace,
    tmp_path: Path,
) -> None:
    require_node_client()
    t_start = time.monotonic()
    schema = f"bs_{ns.hex}"
    stack_mod.psql(pg_settings, DDL.format(s=schema))
    timings: dict[str, float] = {}

    async def check(c: PowerSyncNodeClient, timeout: float = 90) -> None:
        for table in COLUMNS:
            skip = ("notes",) if table == "items" else ()  # 128 kB values: compared below
            await c.wait_for(
                client_select(table, skip), pg_expected(pg_settings, schema, table, skip), timeout
            )
        got = await c.query("SELECT id, notes FROM items ORDER BY id")
        want = [
            {"id": r["id"], "notes": r["notes"]} for r in pg_expected(pg_settings, schema, "items")
        ]
        assert got == want, "items.notes differ (TOAST placeholder leaked?)"

    args = (pg_settings, make_settings, create_topic, ns, tmp_path, schema, RULES, COLUMNS)
    async with synced_client(*args) as (_, c):
        timings["connected"] = time.monotonic() - t_start
        await check(c)  # the snapshot of 'pre' (op r)
        assert len(await c.query("SELECT id FROM pre")) == 3
        timings["snapshot synced"] = time.monotonic() - t_start
        stack_mod.psql(pg_settings, INSERTS.format(s=schema))
        await check(c)
        timings["inserts synced"] = time.monotonic() - t_start
        stack_mod.psql(pg_settings, CHANGES.format(s=schema))
        await check(c)
        timings["changes synced"] = time.monotonic() - t_start
        items = {r["id"]: r for r in await c.query("SELECT id, qty, flag FROM items")}
        assert set(items) == {"1", "200", "3", "5"}
        assert items["3"] == {"id": "3", "qty": 1, "flag": 1}
        notes = await c.query("SELECT id FROM notes ORDER BY id")
        assert [n["id"] for n in notes] == ["n3", "n4"]
    print(f"\ntimings (s since start): {json.dumps({k: round(v, 1) for k, v in timings.items()})}")


DOCS_COLUMNS = {"docs": {"id": "int", "title": "text", "body": "text"}}
DOCS_RULES = """
bucket_definitions:
  everything:
    data:
      - SELECT * FROM docs
"""


# DEFAULT identity: the create half carries TOAST placeholders that only the old key's
# row can fill (pk_change_from); FULL identity sends the whole row.
@pytest.mark.parametrize("identity", ["DEFAULT", "FULL"])
async def test_primary_key_change_of_a_toasted_row(
    identity: str,
    pg_settings: Settings,
    make_settings: Callable[..., Settings],
    create_topic: Callable[..., str],
    ns: Namespace,
    tmp_path: Path,
) -> None:
    """UPDATE docs SET id = 2 WHERE id = 1 on a row whose large body is TOASTed."""
    require_node_client()
    schema = f"bs_{ns.hex}"
    stack_mod.psql(
        pg_settings,
        f"""
        CREATE SCHEMA {schema};
        CREATE TABLE {schema}.docs (id integer PRIMARY KEY, title text, body text);
        ALTER TABLE {schema}.docs REPLICA IDENTITY {identity};
        ALTER TABLE {schema}.docs ALTER COLUMN body SET STORAGE EXTERNAL;
        """,
    )
    args = (
        pg_settings,
        make_settings,
        create_topic,
        ns,
        tmp_path,
        schema,
        DOCS_RULES,
        DOCS_COLUMNS,
    )
    select = client_select("docs", columns=DOCS_COLUMNS)
    async with synced_client(*args) as (_, c):
        stack_mod.psql(
            pg_settings,
            f"INSERT INTO {schema}.docs VALUES "
            f"(1, 'big', (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 200) AS i))",
        )
        want = pg_expected(pg_settings, schema, "docs", columns=DOCS_COLUMNS)
        await c.wait_for(select, want, timeout=60)
        stack_mod.psql(pg_settings, f"UPDATE {schema}.docs SET id = 2 WHERE id = 1")
        want = pg_expected(pg_settings, schema, "docs", columns=DOCS_COLUMNS)
        assert [r["id"] for r in want] == ["2"] and len(want[0]["body"]) == 6400
        await c.wait_for(select, want, timeout=10)


def test_connector_file_topics_match_demo_config(pg_settings: Settings) -> None:
    """The repo's connector publishes app.public.todos, which the demo's processor reads."""
    name, config = stack_mod.connector_config(pg_settings)
    assert config["topic.prefix"] == "app"
    body = stack_mod.connector_status(pg_settings, name)
    assert body is not None and body["connector"]["state"] == "RUNNING"
    rows = {r["name"]: r for r in stack_mod.stack_status(pg_settings, source="postgres")}
    assert rows["postgres"]["state"] == rows["connect"]["state"] == "running"
    assert rows["debezium"]["state"] == "running", rows["debezium"]
    assert isinstance(rows["debezium"].get("slot_lag_bytes"), int)
