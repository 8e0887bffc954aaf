#!/usr/bin/env python3
"""Black-box acceptance scenario on a real source: PostgreSQL -> Debezium on Kafka Connect ->
Kafka -> `bucketsync processor` (SIGKILLed and restarted) -> Redis -> `bucketsync gateway` ->
sync streams. Independent model: the rules evaluated by hand over PostgreSQL's own tables.

Five tables in a schema of the run's own (its own connector, slot, publication and topic
prefix; removed at the end):
- ``lists``: each user's ledger of 4 rows of amount 100 (``by_user``); transfers between two
  of them run in one transaction, so in transaction mode (``--tx``) every checkpoint must
  show the user's sum at 400 (a half-applied transaction breaks it);
- ``boards``, ``members`` and ``cards``: data-dependent buckets (``boards`` from a parameter
  query on ``members``), membership rows added, moved and deleted, NULL board ids (no
  bucket), card moves between boards, primary-key changes, 8 kB bodies stored out of line
  (TOAST) with updates that leave them out of the WAL (Debezium's placeholder: the stored
  value must survive);
- ``docs``: ``by_org`` from a JWT claim, NULL org ids (no bucket; sync-protocol.md §8.5),
  tokens without the claim, and an occasional TRUNCATE.

A backlog of transactions is written first; then processors start on it while more is
written, are SIGKILLed at random moments and restarted. At the end every user's rows (live
streams and a fresh stream) must equal the model, `bucketsync verify` must pass and the
dead-letter topic must be empty. Prints one JSON line; exit 0 when all agree.

Needs the dev stack with its source: `bucketsync stack up --source postgres`.

usage: scripts/qa-postgres.py --seed N [--driver kafka|faust] [--tx] [--procs 2] [--kills K]
                              [--ntx N] [--live N] [--dynamic] [--node]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

_spec = importlib.util.spec_from_file_location(
    "qa_scenario", Path(__file__).with_name("qa-scenario.py")
)
assert _spec is not None and _spec.loader is not None
qs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qs)

REPO, BOOT, USERS, LEDGER = qs.REPO, qs.BOOT, qs.USERS, qs.LEDGER
jd = qs.jd
sys.path.insert(0, REPO)  # bucketsync itself, for the stack's PostgreSQL and connector
PARTS = {"lists": 2, "boards": 1, "members": 2, "cards": 3, "docs": 1}
BOARDS = [f"b{i}" for i in range(1, 13)]
ORGS = ["acme", "globex", "initech", None]

RULES = """bucket_definitions:
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT * FROM lists WHERE owner_id = bucket.user_id
  boards:
    parameters: SELECT board_id FROM members WHERE user_id = request.user_id()
    data:
      - SELECT * FROM boards WHERE id = bucket.board_id
      - SELECT id, board_id, title, body FROM cards WHERE board_id = bucket.board_id
  by_org:
    parameters: SELECT request.jwt() ->> 'org' AS org
    data:
      - SELECT * FROM docs WHERE org_id = bucket.org
"""

DDL = """
CREATE SCHEMA {s};
CREATE TABLE {s}.lists (id text PRIMARY KEY, owner_id text, amount integer NOT NULL, name text);
CREATE TABLE {s}.boards (id text PRIMARY KEY, title text, org text);
CREATE TABLE {s}.members (id integer PRIMARY KEY, board_id text, user_id text);
CREATE TABLE {s}.cards (id text PRIMARY KEY, board_id text, title text, body text);
CREATE TABLE {s}.docs (id integer PRIMARY KEY, org_id text, title text);
"""


def big_body(rnd: random.Random) -> str:
    """~8 kB that pglz cannot shrink under the TOAST threshold: stored out of line."""
    seed = rnd.getrandbits(64)
    return "".join(hashlib.sha256(f"{seed}.{i}".encode()).hexdigest() for i in range(128))


# ---------------------------------------------------------------- the model


def expected_for(user: str, org: str | None, tables: dict[str, list[dict[str, Any]]]) -> dict:
    """(bucket, object type, object id) -> data, for every row ``user`` may see: the rules
    above by hand, over PostgreSQL's rows (text, integers)."""
    exp: dict[tuple[str, str, str], dict[str, Any]] = {}
    mine = f"by_user[{jd(user)}]"
    for r in tables["lists"]:
        if r["owner_id"] == user:
            exp[(mine, "lists", r["id"])] = dict(r)
    boards = {m["board_id"] for m in tables["members"] if m["user_id"] == user}
    boards.discard(None)
    for r in tables["boards"]:
        if r["id"] in boards:
            exp[(f"boards[{jd(r['id'])}]", "boards", r["id"])] = dict(r)
    for r in tables["cards"]:
        if r["board_id"] in boards:
            d = {k: r[k] for k in ("id", "board_id", "title", "body")}
            exp[(f"boards[{jd(r['board_id'])}]", "cards", r["id"])] = d
    if org is not None:
        for r in tables["docs"]:
            if r["org_id"] == org:
                exp[(f"by_org[{jd(org)}]", "docs", str(r["id"]))] = dict(r)
    return exp


def read_tables(dsn: str, schema: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    with psycopg.connect(dsn) as conn:
        for t in PARTS:
            cur = conn.execute(f"SELECT * FROM {schema}.{t} ORDER BY id")
            cols = [c.name for c in cur.description or ()]
            out[t] = [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]
    return out


# ---------------------------------------------------------------- the workload


class Workload:
    """Random transactions on PostgreSQL; each one commits or is left out whole."""

    def __init__(self, dsn: str, schema: str, rnd: random.Random) -> None:
        self.dsn, self.s, self.rnd = dsn, schema, rnd
        self.next_member = 1
        self.next_card = 1
        self.next_doc = 1
        self.txs = 0
        self.kinds: dict[str, int] = {}

    def setup(self) -> None:
        """Rows that exist before the connector: they arrive through its snapshot."""
        s, rnd = self.s, self.rnd
        with psycopg.connect(self.dsn) as conn:
            for u in USERS:
                for i in range(LEDGER):
                    conn.execute(
                        f"INSERT INTO {s}.lists VALUES (%s, %s, 100, %s)",
                        (f"L{u}_{i}", u, f"ledger {i}"),
                    )
            for b in BOARDS[:6]:
                conn.execute(f"INSERT INTO {s}.boards VALUES (%s, %s, %s)", (b, f"board {b}", "x"))
            for u in USERS:
                self._member(conn, rnd.choice(BOARDS[:6]), u)
            for _ in range(10):
                self._card(conn)

    def _member(self, conn: Any, board: str | None, user: str | None) -> None:
        conn.execute(
            f"INSERT INTO {self.s}.members VALUES (%s, %s, %s)", (self.next_member, board, user)
        )
        self.next_member += 1

    def _card(self, conn: Any) -> None:
        rnd = self.rnd
        body = big_body(rnd) if rnd.random() < 0.3 else f"body {rnd.random()}"
        conn.execute(
            f"INSERT INTO {self.s}.cards VALUES (%s, %s, %s, %s)",
            (f"c{self.next_card}", rnd.choice([*BOARDS, None]), f"card {self.next_card}", body),
        )
        self.next_card += 1

    def _pick(self, conn: Any, table: str) -> Any:
        row = conn.execute(f"SELECT id FROM {self.s}.{table} ORDER BY random() LIMIT 1").fetchone()
        return None if row is None else row[0]

    def transaction(self) -> None:
        s, rnd = self.s, self.rnd
        kind = rnd.choices(
            ["ledger", "member", "board", "card", "card_pk", "doc", "truncate", "mixed"],
            [25, 15, 8, 25, 4, 15, 0.3, 8],
        )[0]
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        with psycopg.connect(self.dsn) as conn, conn.transaction():
            steps = (
                [kind]
                if kind != "mixed"
                else rnd.choices(["ledger", "member", "board", "card", "doc"], k=rnd.randint(2, 5))
            )
            for step in steps:
                if step == "ledger":
                    u = rnd.choice(list(USERS))
                    a, b = rnd.sample(range(LEDGER), 2)
                    x = rnd.randint(1, 50)
                    conn.execute(
                        f"UPDATE {s}.lists SET amount = amount - %s WHERE id = %s",
                        (x, f"L{u}_{a}"),
                    )
                    conn.execute(
                        f"UPDATE {s}.lists SET amount = amount + %s WHERE id = %s",
                        (x, f"L{u}_{b}"),
                    )
                elif step == "member":
                    r = rnd.random()
                    mid = self._pick(conn, "members")
                    if r < 0.45 or mid is None:
                        self._member(
                            conn,
                            rnd.choice([*BOARDS, None]),
                            rnd.choice([*USERS, None]),
                        )
                    elif r < 0.7:
                        conn.execute(f"DELETE FROM {s}.members WHERE id = %s", (mid,))
                    else:
                        conn.execute(
                            f"UPDATE {s}.members SET board_id = %s WHERE id = %s",
                            (rnd.choice([*BOARDS, None]), mid),
                        )
                elif step == "board":
                    b = rnd.choice(BOARDS)
                    if rnd.random() < 0.2:
                        conn.execute(f"DELETE FROM {s}.boards WHERE id = %s", (b,))
                    else:
                        conn.execute(
                            f"INSERT INTO {s}.boards VALUES (%s, %s, %s) ON CONFLICT (id) "
                            "DO UPDATE SET title = EXCLUDED.title, org = EXCLUDED.org",
                            (b, f"board {b} {rnd.randint(0, 99)}", rnd.choice(["x", "y", None])),
                        )
                elif step == "card":
                    r = rnd.random()
                    cid = self._pick(conn, "cards")
                    if r < 0.3 or cid is None:
                        self._card(conn)
                    elif r < 0.65:  # title only: a TOASTed body stays out of the WAL
                        conn.execute(
                            f"UPDATE {s}.cards SET title = %s WHERE id = %s",
                            (f"t{rnd.randint(0, 9999)}", cid),
                        )
                    elif r < 0.8:  # moves to another board (or to none)
                        conn.execute(
                            f"UPDATE {s}.cards SET board_id = %s WHERE id = %s",
                            (rnd.choice([*BOARDS, None]), cid),
                        )
                    elif r < 0.9:
                        body = big_body(rnd) if rnd.random() < 0.5 else "short"
                        conn.execute(f"UPDATE {s}.cards SET body = %s WHERE id = %s", (body, cid))
                    else:
                        conn.execute(f"DELETE FROM {s}.cards WHERE id = %s", (cid,))
                elif step == "card_pk":  # delete + create in Debezium; the body may be TOASTed
                    cid = self._pick(conn, "cards")
                    if cid is not None:
                        conn.execute(
                            f"UPDATE {s}.cards SET id = %s WHERE id = %s",
                            (f"c{self.next_card}", cid),
                        )
                        self.next_card += 1
                elif step == "doc":
                    r = rnd.random()
                    did = self._pick(conn, "docs")
                    if r < 0.45 or did is None:
                        conn.execute(
                            f"INSERT INTO {s}.docs VALUES (%s, %s, %s)",
                            (self.next_doc, rnd.choice(ORGS), f"doc {self.next_doc}"),
                        )
                        self.next_doc += 1
                    elif r < 0.8:
                        conn.execute(
                            f"UPDATE {s}.docs SET org_id = %s, title = %s WHERE id = %s",
                            (rnd.choice(ORGS), f"d{rnd.randint(0, 999)}", did),
                        )
                    else:
                        conn.execute(f"DELETE FROM {s}.docs WHERE id = %s", (did,))
                elif step == "truncate":
                    conn.execute(f"TRUNCATE {s}.docs")
        self.txs += 1


# ---------------------------------------------------------------- the source


@contextlib.contextmanager
def debezium_source(settings: Any, schema: str, prefix: str, tag: str) -> Any:
    """A connector, slot and publication of the run's own; removed after, with the schema."""
    from bucketsync import stack as stack_mod

    su = stack_mod.PG_SUPERUSER
    name, slot = f"bs-{tag}", f"bs_{tag}"
    stack_mod.psql(settings, f"CREATE PUBLICATION {slot} FOR TABLES IN SCHEMA {schema}", user=su)
    _, config = stack_mod.connector_config(
        settings,
        {
            "name": name,
            "topic.prefix": prefix,
            "slot.name": slot,
            "slot.drop.on.stop": "true",
            "publication.name": slot,
            "schema.include.list": schema,
            "table.include.list": rf"{schema}\..*",
            "heartbeat.interval.ms": "0",
        },
    )
    try:
        stack_mod.register_connector(settings, name, config, timeout=120)
        yield
    finally:
        with contextlib.suppress(Exception):
            stack_mod.remove_connector(settings, name)
        for _ in range(60):
            with contextlib.suppress(Exception):
                stack_mod.psql(
                    settings,
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                    f"WHERE slot_name = '{slot}' AND NOT active",
                    user=su,
                )
                if not stack_mod.psql(
                    settings, f"SELECT 1 FROM pg_replication_slots WHERE slot_name = '{slot}'"
                ).strip():
                    break
            time.sleep(0.5)
        with contextlib.suppress(Exception):
            stack_mod.psql(settings, f"DROP PUBLICATION IF EXISTS {slot}", user=su)


def dead_letters(topic: str) -> int:
    c = Consumer({"bootstrap.servers": BOOT, "group.id": f"{topic}-peek"})
    try:
        if topic not in c.list_topics(timeout=5).topics:
            return 0
        low, high = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=5)
        return int(high - low)
    finally:
        c.close()


# ---------------------------------------------------------------- official client

CLIENT_SCHEMA = {
    "lists": {"owner_id": "text", "amount": "integer", "name": "text"},
    "boards": {"title": "text", "org": "text"},
    "cards": {"board_id": "text", "title": "text", "body": "text"},
    "docs": {"org_id": "text", "title": "text"},
}


async def node_check(
    url: str, token: str, exp: dict[tuple[str, str, str], Any], db: Path, timeout: float
) -> dict[str, Any]:
    """The official PowerSync Node client's tables against the model's rows of one user."""
    from tests.e2e.powersync_client import PowerSyncNodeClient

    want: dict[str, list[dict[str, Any]]] = {t: [] for t in CLIENT_SCHEMA}
    for (_b, t, oid), data in exp.items():
        want[t].append({"id": oid, **{c: data.get(c) for c in CLIENT_SCHEMA[t]}})
    for rows in want.values():
        rows.sort(key=lambda r: r["id"])
    async with PowerSyncNodeClient(url, CLIENT_SCHEMA, db_path=str(db)) as c:
        await c.connect(token)
        await c.wait_synced(timeout=timeout)
        return await qs.compare_client_tables(c, CLIENT_SCHEMA, want, timeout)


# ---------------------------------------------------------------- driver


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--driver", default="kafka", choices=["kafka", "faust"])
    ap.add_argument("--tx", action="store_true", help="kafka.consistency: transaction")
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--ntx", type=int, default=400, help="transactions before processors start")
    ap.add_argument("--live", type=int, default=300, help="transactions while they run")
    ap.add_argument("--compact-interval", type=float, default=2.0, help="compaction.interval_s")
    ap.add_argument("--dynamic", action="store_true", help="dynamic group membership")
    ap.add_argument(
        "--node", action="store_true", help="also check two users with the official Node client"
    )
    a = ap.parse_args()

    import yaml

    from bucketsync.config import load_settings
    from bucketsync.stack import PG_APP_USER, PG_DATABASE

    settings = load_settings()
    user, pw = PG_APP_USER
    dsn = f"postgresql://{user}:{pw}@127.0.0.1:{settings.stack.postgres_port}/{PG_DATABASE}"
    rnd = random.Random(a.seed)
    tag = f"qp{a.seed}{a.driver[0]}{'t' if a.tx else 'e'}{uuid.uuid4().hex[:6]}"
    schema, prefix = f"s_{tag}", tag
    work = Path(os.environ.get("QA_RUNS", "/tmp/qa-runs")) / tag
    work.mkdir(parents=True)
    from bucketsync import stack as stack_mod

    stack_mod.psql(settings, DDL.format(s=schema))
    wl = Workload(dsn, schema, rnd)
    wl.setup()
    topics = [f"{prefix}.{schema}.{t}" for t in PARTS]
    admin = AdminClient({"bootstrap.servers": BOOT})
    fs = admin.create_topics(
        [NewTopic(f"{prefix}.{schema}.{t}", n, 1) for t, n in PARTS.items()]
        + [NewTopic(f"{prefix}.transaction", 1, 1)]
    )
    for f in fs.values():
        f.result()
    if a.tx:
        topics.append(f"{prefix}.transaction")
    procs: list[subprocess.Popen[bytes]] = []
    gw = None
    res: dict[str, Any] = {"tag": tag, "seed": a.seed, "driver": a.driver, "tx": a.tx}
    t0 = time.monotonic()
    try:
        with debezium_source(settings, schema, prefix, tag):
            for _ in range(a.ntx):
                wl.transaction()
            res["backlog_s"] = round(time.monotonic() - t0, 1)
            (work / "rules.yaml").write_text(RULES)
            port = qs.free_port()
            dynamic = {"instance_id": "", "session_timeout_ms": 6000} if a.dynamic else {}
            cfg = {
                "kafka": {
                    "bootstrap_servers": BOOT,
                    "topics": topics,
                    "group_id": f"g-{tag}",
                    "dead_letter_topic": f"{tag}.dlq",
                    "consistency": "transaction" if a.tx else "event",
                },
                "redis": {"url": settings.redis.url, "prefix": tag},
                "sync_rules": "rules.yaml",
                "auth": {"hs256_secret": "qa-secret-" + tag},
                "gateway": {"port": port},
                "processor": {"driver": a.driver, "metrics_port": 0, **dynamic},
                "compaction": {"interval_s": a.compact_interval},
            }
            cfgp = work / "bucketsync.yaml"
            cfgp.write_text(yaml.safe_dump(cfg))
            logs = [open(work / f"proc{i}.log", "ab") for i in range(a.procs)]  # noqa: SIM115
            procs = [
                qs.cli(cfgp, "processor", stdout=logs[i], stderr=subprocess.STDOUT)
                for i in range(a.procs)
            ]
            glog = open(work / "gateway.log", "ab")  # noqa: SIM115
            gw = qs.cli(cfgp, "gateway", stdout=glog, stderr=subprocess.STDOUT)
            url = f"http://127.0.0.1:{port}"
            tokens = qs.mint_tokens(cfgp, USERS)
            qs.wait_for_gateway(url, 30)
            watchers = [qs.Stream(url, tokens[u], u, a.tx) for u in USERS]
            for w in watchers:
                threading.Thread(target=w.watch, daemon=True).start()

            live_rnd = random.Random(a.seed * 7919)

            def feed() -> None:
                for _ in range(a.live):
                    wl.transaction()
                    time.sleep(live_rnd.uniform(0, 0.03))

            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
            kills = 0
            while kills < a.kills:
                time.sleep(rnd.uniform(0.3, 3.0))
                i = rnd.randrange(a.procs)
                procs[i].send_signal(signal.SIGKILL)
                procs[i].wait()
                kills += 1
                time.sleep(rnd.choice([0, 0, 0.5, 2]))
                procs[i] = qs.cli(cfgp, "processor", stdout=logs[i], stderr=subprocess.STDOUT)
            feeder.join()
            tables = read_tables(dsn, schema)
            deadline = time.monotonic() + 180
            ok = False
            diffs: dict[str, Any] = {}
            while time.monotonic() < deadline:
                diffs = {}
                for w in watchers:
                    exp = expected_for(w.user, USERS[w.user], tables)
                    if w.visible != exp:
                        diffs[w.user] = (len(w.visible), len(exp))
                if not diffs:
                    ok = True
                    break
                time.sleep(0.5)
            res["elapsed_s"] = round(time.monotonic() - t0, 1)
            for w in watchers:
                w.stop = True
            fresh_diffs: list[Any] = []
            for u in USERS:
                st = qs.Stream(url, tokens[u], u, a.tx)
                st.run_once(True)
                exp = expected_for(u, USERS[u], tables)
                if st.visible != exp:
                    missing = [k for k in exp if k not in st.visible][:5]
                    extra = [k for k in st.visible if k not in exp][:5]
                    wrong = [k for k in exp if k in st.visible and st.visible[k] != exp[k]][:3]
                    fresh_diffs.append(
                        (u, len(st.visible), len(exp), missing, extra,
                         [(k, str(st.visible[k])[:200], str(exp[k])[:200]) for k in wrong])
                    )  # fmt: skip
                fresh_diffs += [("err", e) for e in st.errors]
            if a.node:
                node = {}
                for u in ("u1", "u4"):  # with and without the org claim
                    exp = expected_for(u, USERS[u], tables)
                    node[u] = asyncio.run(
                        node_check(url, tokens[u], exp, work / f"node-{u}.db", 120)
                    )
                res["node"] = node
                if not all(n["ok"] for n in node.values()):
                    fresh_diffs.append(("node", node))
            verify = qs.cli(cfgp, "verify", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            vout = verify.communicate()[0].decode()
            errs = [e for w in watchers for e in w.errors]
            n_dead = dead_letters(f"{tag}.dlq")
            res.update(
                {
                    "procs": a.procs,
                    "kills": kills,
                    "transactions": wl.txs,
                    "kinds": wl.kinds,
                    "rows": {t: len(v) for t, v in tables.items()},
                    "converged": ok,
                    "stream_errors": errs[:10],
                    "n_stream_errors": len(errs),
                    "fresh_diffs": fresh_diffs[:6],
                    "verify_rc": verify.returncode,
                    "dead_letters": n_dead,
                    "completes": sum(w.completes for w in watchers),
                }
            )
            if not ok:
                res["diffs"] = diffs
            if verify.returncode:
                res["verify_out"] = vout[-800:]
    finally:
        for p in [*procs, *([gw] if gw else [])]:
            p.terminate()
        for p in [*procs, *([gw] if gw else [])]:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        with contextlib.suppress(Exception):
            stack_mod.psql(settings, f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    print(json.dumps(res, default=str))
    clean = (
        res.get("converged")
        and not res.get("n_stream_errors")
        and not res.get("fresh_diffs")
        and res.get("verify_rc") == 0
        and res.get("dead_letters") == 0
    )
    if clean:
        qs.drop_run_keys(settings.redis.url, tag)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
