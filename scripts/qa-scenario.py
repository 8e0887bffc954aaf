"""Black-box acceptance scenario for bucketsync: only the CLI, config YAML, Kafka topics
(Debezium JSON) and the sync protocol. Independent model of the rules.

A backlog of Debezium JSON events (with and without schemas, three tables, owner moves,
updates without a before image, deletes with key-only before, tombstones, snapshot reads,
NULL bucket parameters, optionally BEGIN/END transaction markers and TRUNCATEs with
QA_TRUNCATE=1) is produced to fresh topics; `bucketsync processor` (1-2 processes) starts on
it while more is fed live, is SIGKILLed at random moments and restarted; a
`bucketsync gateway` serves one sync stream per user (tokens from `bucketsync token`, some
without the `org` claim). Every checkpoint_complete is checked (checksums; in transaction
mode the per-user ledger sum, which a half-applied transaction breaks), and at the end every
user's rows, live and from a fresh stream, must equal the model; `bucketsync verify` too.
Prints one JSON line; exit 0 when all agree. Needs the dev stack (Kafka, Redis).

usage: scripts/qa-scenario.py --seed N --driver kafka|faust [--tx] [--procs 2] [--kills K]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import requests
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

REPO = os.environ.get("REPO", str(Path(__file__).resolve().parent.parent))
BOOT = "127.0.0.1:9092"
USERS = {"u1": "acme", "u2": "acme", "u3": "globex", "u4": None, "u5": None, "u6": "initech"}
ORGS = ["acme", "globex", "initech", None]
LEDGER = 4  # ledger rows per user (lists), total amount constant per transaction

RULES = """bucket_definitions:
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT * FROM lists WHERE owner_id = bucket.user_id
      - SELECT id, list_id, owner_id, description FROM todos WHERE owner_id = bucket.user_id
  by_org:
    parameters: SELECT request.jwt() ->> 'org' AS org
    data:
      - SELECT * FROM docs WHERE org_id = bucket.org
  everyone:
    data:
      - SELECT id, title FROM docs WHERE pinned = 1
"""


def jd(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"))


def model_rows(table: str, row: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(bucket, object_type, object_id, data) for one live row: the rules by hand."""
    out = []
    if table == "lists" and row.get("owner_id") is not None:
        out.append((f"by_user[{jd(row['owner_id'])}]", "lists", str(row["id"]), dict(row)))
    if table == "todos" and row.get("owner_id") is not None:
        d = {k: row.get(k) for k in ("id", "list_id", "owner_id", "description")}
        out.append((f"by_user[{jd(row['owner_id'])}]", "todos", str(row["id"]), d))
    if table == "docs":
        if row.get("org_id") is not None:
            out.append((f"by_org[{jd(row['org_id'])}]", "docs", str(row["id"]), dict(row)))
        if row.get("pinned") == 1:
            out.append(
                ("everyone[]", "docs", str(row["id"]), {"id": row["id"], "title": row["title"]})
            )
    return out


def expected_for(user: str, org: str | None, live: dict[tuple[str, str], dict[str, Any]]) -> dict:
    mine = {f"by_user[{jd(user)}]", f"by_org[{jd(org)}]", "everyone[]"}
    exp: dict[tuple[str, str, str], dict[str, Any]] = {}
    for (table, _id), row in live.items():
        for b, t, oid, d in model_rows(table, row):
            if b in mine:
                exp[(b, t, oid)] = d
    return exp


# ---------------------------------------------------------------- Debezium JSON


def _schema_for(table: str, row: dict[str, Any] | None, prefix: str) -> dict[str, Any]:
    def ftype(v: Any) -> str:
        return "int64" if isinstance(v, int) else "string"

    cols = [{"type": ftype(v), "optional": k != "id", "field": k} for k, v in (row or {}).items()]
    val = {
        "type": "struct",
        "fields": cols,
        "optional": True,
        "name": f"{prefix}.public.{table}.Value",
    }
    return {
        "type": "struct",
        "name": f"{prefix}.public.{table}.Envelope",
        "optional": False,
        "fields": [
            dict(val, field="before"),
            dict(val, field="after"),
            {
                "type": "struct",
                "optional": False,
                "field": "source",
                "name": "io.debezium.connector.postgresql.Source",
                "fields": [
                    {"type": "string", "optional": False, "field": f}
                    for f in ("version", "connector", "name", "db", "schema", "table")
                ]
                + [
                    {"type": "int64", "optional": True, "field": f}
                    for f in ("txId", "lsn", "ts_ms")
                ],
            },
            {
                "type": "struct",
                "optional": True,
                "field": "transaction",
                "name": "event.block",
                "fields": [
                    {"type": "string", "optional": False, "field": "id"},
                    {"type": "int64", "optional": False, "field": "total_order"},
                    {"type": "int64", "optional": False, "field": "data_collection_order"},
                ],
            },
            {"type": "string", "optional": False, "field": "op"},
            {"type": "int64", "optional": True, "field": "ts_ms"},
        ],
    }


def source_block(prefix: str, table: str, txid: int, lsn: int) -> dict[str, Any]:
    """A Debezium PostgreSQL ``source`` block (connector ``prefix``, schema ``public``)."""
    return {
        "version": "2.7.0.Final",
        "connector": "postgresql",
        "name": prefix,
        "db": "app",
        "schema": "public",
        "table": table,
        "txId": txid,
        "lsn": lsn,
        "ts_ms": 1,
    }


def truncate_payload(prefix: str, table: str, txid: int, lsn: int) -> dict[str, Any]:
    """A Debezium TRUNCATE event of ``table`` (no envelope schema, no key)."""
    return {
        "before": None,
        "after": None,
        "op": "t",
        "ts_ms": 2,
        "source": source_block(prefix, table, txid, lsn),
    }


class Gen:
    def __init__(self, prefix: str, rnd: random.Random, tx: bool) -> None:
        self.prefix, self.rnd, self.tx = prefix, rnd, tx
        self.lsn = 1000
        self.txid = 500
        self.out: list[
            tuple[str, int | None, bytes | None, bytes | None]
        ] = []  # topic, part, key, value
        self.live: dict[tuple[str, str], dict[str, Any]] = {}
        self.parts = {"lists": 2, "todos": 3, "docs": 1}

    def topic(self, table: str) -> str:
        return f"{self.prefix}.public.{table}"

    def part(self, table: str, rid: str) -> int:
        return sum(rid.encode()) % self.parts[table]

    def event(
        self, table: str, op: str, rid: str, after: dict | None, txblock: dict | None
    ) -> None:
        before = self.live.get((table, rid))
        self.lsn += self.rnd.randint(8, 80)
        if op == "u" and self.rnd.random() < 0.4:
            before = None  # REPLICA IDENTITY DEFAULT: no before image on updates
        elif op == "d" and before is not None and self.rnd.random() < 0.5:
            before = {"id": rid}  # only the key columns
        if op == "c" and self.rnd.random() < 0.2:
            op = "r"  # snapshot read
        payload = {
            "before": before if op in ("u", "d") else None,
            "after": after,
            "source": source_block(self.prefix, table, self.txid, self.lsn),
            "transaction": txblock,
            "op": op,
            "ts_ms": 2,
        }
        with_schema = self.rnd.random() < 0.5
        key: dict[str, Any] = {"id": rid}
        if with_schema:
            value: Any = {
                "schema": _schema_for(table, after or before, self.prefix),
                "payload": payload,
            }
            key = {
                "schema": {
                    "type": "struct",
                    "fields": [{"type": "string", "optional": False, "field": "id"}],
                },
                "payload": key,
            }
        else:
            value = payload
        p = self.part(table, rid)
        self.out.append((self.topic(table), p, jd(key).encode(), jd(value).encode()))
        if op == "d":
            if self.rnd.random() < 0.7:
                self.out.append((self.topic(table), p, jd(key).encode(), None))
            self.live.pop((table, rid), None)
        else:
            self.live[(table, rid)] = after  # type: ignore[assignment]

    def truncate_docs(self) -> None:
        self.lsn += 10
        payload = truncate_payload(self.prefix, "docs", self.txid, self.lsn)
        self.out.append((self.topic("docs"), 0, None, jd(payload).encode()))
        for k in [k for k in self.live if k[0] == "docs"]:
            del self.live[k]

    def transaction(self, changes: list[tuple[str, str, str, dict | None]]) -> None:
        """changes: (table, op, id, after). In tx mode wrapped in BEGIN/END."""
        self.txid += 1
        tid = lambda: f"{self.txid}:{self.lsn}"  # noqa: E731  PostgreSQL: lsn part differs per record
        if self.tx:
            self.out.append(
                (
                    f"{self.prefix}.transaction",
                    0,
                    jd({"id": tid()}).encode(),
                    jd(
                        {
                            "status": "BEGIN",
                            "id": tid(),
                            "event_count": None,
                            "data_collections": None,
                            "ts_ms": 1,
                        }
                    ).encode(),
                )
            )
        counts: dict[str, int] = {}
        for n, (table, op, rid, after) in enumerate(changes, 1):
            counts[table] = counts.get(table, 0) + 1
            block = (
                {"id": tid(), "total_order": n, "data_collection_order": counts[table]}
                if self.tx
                else None
            )
            self.event(table, op, rid, after, block)
        if self.tx:
            self.lsn += 5
            self.out.append(
                (
                    f"{self.prefix}.transaction",
                    0,
                    jd({"id": tid()}).encode(),
                    jd(
                        {
                            "status": "END",
                            "id": tid(),
                            "event_count": len(changes),
                            "data_collections": [
                                {"data_collection": f"public.{t}", "event_count": c}
                                for t, c in counts.items()
                            ],
                            "ts_ms": 1,
                        }
                    ).encode(),
                )
            )

    def build(self, n_tx: int, ledgers: bool = True) -> None:
        rnd = self.rnd
        users = list(USERS)
        # ledgers: each user's LEDGER rows created in one transaction, amount 100 each
        for u in users if ledgers else []:
            self.transaction(
                [
                    (
                        "lists",
                        "c",
                        f"L{u}_{i}",
                        {"id": f"L{u}_{i}", "owner_id": u, "amount": 100, "name": f"ledger {i}"},
                    )
                    for i in range(LEDGER)
                ]
            )
        for _ in range(n_tx):
            kind = rnd.random()
            if kind < 0.002 and not self.tx and os.environ.get("QA_TRUNCATE"):
                self.truncate_docs()
            elif kind < 0.3:
                u = rnd.choice(users)
                a, b = rnd.sample(range(LEDGER), 2)
                ra, rb = (
                    dict(self.live[("lists", f"L{u}_{a}")]),
                    dict(self.live[("lists", f"L{u}_{b}")]),
                )
                x = rnd.randint(1, 50)
                ra["amount"] -= x
                rb["amount"] += x
                self.transaction([("lists", "u", ra["id"], ra), ("lists", "u", rb["id"], rb)])
            else:
                changes = []
                for _ in range(rnd.randint(1, 5)):
                    table = rnd.choice(["todos", "docs"])
                    rid = f"{table[0]}{rnd.randint(1, 40)}"
                    if any(c[2] == rid and c[0] == table for c in changes):
                        continue
                    exists = (table, rid) in self.live
                    if exists and rnd.random() < 0.15:
                        changes.append((table, "d", rid, None))
                        continue
                    if table == "todos":
                        row = {
                            "id": rid,
                            "list_id": f"L{rnd.choice(users)}_0",
                            "owner_id": rnd.choice([*users, None]),
                            "description": rnd.choice(["x", "ünï ☃", 'q"', str(rnd.random())]),
                            "secret": "s",
                        }
                    else:
                        row = {
                            "id": rid,
                            "org_id": rnd.choice(ORGS),
                            "title": f"t{rnd.randint(0, 999)}",
                            "pinned": rnd.choice([0, 1, None]),
                            "body": "b" * rnd.randint(0, 30),
                        }
                    changes.append((table, "u" if exists else "c", rid, row))
                if changes:
                    self.transaction(changes)


# ---------------------------------------------------------------- sync client


class Stream:
    """One sync stream; state committed at checkpoint_complete; checksums verified."""

    def __init__(
        self, url: str, token: str, user: str, check_ledger: bool, reconnect_s: float = 0.0
    ) -> None:
        self.url, self.token, self.user, self.check_ledger = url, token, user, check_ledger
        self.reconnect_s = reconnect_s  # > 0: drop the stream at random and resume with `after`
        self.rnd = random.Random(hash(user))
        self.reconnects = 0
        self.buckets: dict[str, dict[tuple[str, str], str]] = {}
        self.sums: dict[str, int] = {}
        self.after: dict[str, str] = {}
        self.cp: dict[str, Any] = {}
        self.visible: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.errors: list[str] = []
        self.completes = 0
        self.stop = False

    def run_once(self, until_complete: bool) -> None:
        body = {
            "buckets": [{"name": b, "after": a} for b, a in self.after.items()],
            "include_checksum": True,
            "raw_data": True,
            "client_id": "qa",
        }
        with requests.post(
            self.url + "/sync/stream",
            json=body,
            stream=True,
            timeout=(5, 30),
            headers={"Authorization": f"Token {self.token}"},
        ) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code} {r.text[:300]}")
            drop_at = (
                time.monotonic() + self.rnd.uniform(0.2, 2 * self.reconnect_s)
                if self.reconnect_s > 0 and not until_complete
                else None
            )
            for line in r.iter_lines():
                if self.stop:
                    return
                if drop_at is not None and time.monotonic() > drop_at:
                    self.reconnects += 1
                    return
                if not line:
                    continue
                m = json.loads(line)
                if "checkpoint" in m:
                    c = m["checkpoint"]
                    self.cp = {b["bucket"]: b for b in c["buckets"]}
                    for b in list(self.buckets):
                        if b not in self.cp:
                            del self.buckets[b]
                            self.sums.pop(b, None)
                            self.after.pop(b, None)
                elif "checkpoint_diff" in m:
                    c = m["checkpoint_diff"]
                    for b in c.get("updated_buckets", []):
                        self.cp[b["bucket"]] = b
                    for b in c.get("removed_buckets", []):
                        self.cp.pop(b, None)
                        self.buckets.pop(b, None)
                        self.sums.pop(b, None)
                        self.after.pop(b, None)
                elif "data" in m:
                    d = m["data"]
                    b = d["bucket"]
                    rows = self.buckets.setdefault(b, {})
                    for op in d["data"]:
                        cs = int(op["checksum"])
                        if op["op"] == "CLEAR":
                            rows.clear()
                            self.sums[b] = cs
                        else:
                            self.sums[b] = (self.sums.get(b, 0) + cs) % 2**32
                            key = (op.get("object_type"), op.get("object_id"))
                            if op["op"] == "PUT":
                                rows[key] = op["data"]
                            elif op["op"] == "REMOVE":
                                rows.pop(key, None)
                        self.after[b] = op["op_id"]
                elif "checkpoint_complete" in m:
                    self.completes += 1
                    vis = {}
                    for b, meta in self.cp.items():
                        if self.sums.get(b, 0) % 2**32 != int(meta["checksum"]) % 2**32:
                            self.errors.append(
                                f"{self.user}: checksum mismatch {b}: {self.sums.get(b, 0)} vs {meta['checksum']}"
                            )
                        for (t, oid), data in self.buckets.get(b, {}).items():
                            vis[(b, t, oid)] = json.loads(data)
                    self.visible = vis
                    if self.check_ledger:
                        led = [
                            v for (b, t, o), v in vis.items() if t == "lists" and o.startswith("L")
                        ]
                        if led and (
                            len(led) != LEDGER or sum(v["amount"] for v in led) != 100 * LEDGER
                        ):
                            self.errors.append(
                                f"{self.user}: half transaction visible at cp {m['checkpoint_complete']}: {[(v['id'], v['amount']) for v in led]}"
                            )
                    if until_complete:
                        return

    def watch(self) -> None:
        while not self.stop:
            try:
                self.run_once(False)
            except Exception:
                time.sleep(0.3)


# ---------------------------------------------------------------- driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(cfg: Path, *args: str, **kw: Any) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETSYNC_")}
    env["PYTHONPATH"] = REPO
    return subprocess.Popen(
        [sys.executable, "-m", "bucketsync.cli", "--config", str(cfg), *args],
        cwd=REPO,
        env=env,
        **kw,
    )


async def compare_client_tables(
    c: Any, schema: dict[str, dict[str, str]], want: dict[str, list[dict[str, Any]]], timeout: float
) -> dict[str, Any]:
    """Poll a connected official client's tables (``schema``, rows by id) until they equal
    ``want`` or ``timeout`` passes; then disconnect. The verdict, its checksum mismatches
    and, per differing table, a few missing and extra ids."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        got = {
            t: await c.query(f"SELECT {', '.join(['id', *cols])} FROM {t} ORDER BY id")
            for t, cols in schema.items()
        }
        if got == want or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    mism = list(c.checksum_mismatches)
    await c.disconnect()
    return {
        "ok": got == want and not mism,
        "mismatches": mism[:3],
        "diff": {
            t: {
                "missing": [r["id"] for r in want[t] if r not in got.get(t, [])][:5],
                "extra": [r["id"] for r in got.get(t, []) if r not in want[t]][:5],
            }
            for t in schema
            if got.get(t) != want[t]
        },
    }


def mint_tokens(cfg: Path, users: dict[str, str | None]) -> dict[str, str]:
    """user -> a token from `bucketsync token` (with an `org` claim where one is given)."""
    tokens = {}
    for u, org in users.items():
        args = ["token", "--sub", u] + (["--claim", f"org={org}"] if org else [])
        tokens[u] = subprocess.run(
            [sys.executable, "-m", "bucketsync.cli", "--config", str(cfg), *args],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=REPO),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    return tokens


def wait_for_gateway(url: str, timeout_s: float = 20.0) -> None:
    """Until the gateway at ``url`` answers HTTP (or ``timeout_s`` passed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            requests.get(url + "/openapi.json", timeout=1)
            return
        except Exception:
            time.sleep(0.1)


def drop_run_keys(redis_url: str, tag: str) -> None:
    """Remove a clean run's Redis keys (prefix ``tag``)."""
    import redis

    r = redis.Redis.from_url(redis_url)
    keys = list(r.scan_iter(match=f"{tag}:*", count=1000))
    if keys:
        r.unlink(*keys)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--dynamic",
        action="store_true",
        help='dynamic group membership (processor.instance_id: ""): kills move partitions',
    )
    ap.add_argument("--session-ms", type=int, default=6000, help="with --dynamic")
    ap.add_argument("--driver", default="kafka")
    ap.add_argument("--tx", action="store_true")
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--ntx", type=int, default=1500)
    ap.add_argument(
        "--live", type=int, default=0, help="transactions produced after processors start"
    )
    ap.add_argument("--no-restart-last", action="store_true")
    ap.add_argument("--pattern", action="store_true")
    ap.add_argument("--gzip", action="store_true", help="gateway.compression: gzip")
    ap.add_argument("--compact-interval", type=float, default=2.0, help="compaction.interval_s")
    ap.add_argument(
        "--reconnect", type=float, default=0.0, help="clients drop and resume every ~N s"
    )
    a = ap.parse_args()
    rnd = random.Random(a.seed)
    tag = f"qa{a.seed}{a.driver[0]}{'t' if a.tx else 'e'}{uuid.uuid4().hex[:6]}"
    work = Path(os.environ.get("QA_RUNS", "/tmp/qa-runs")) / tag
    work.mkdir(parents=True)
    gen = Gen(tag, rnd, a.tx)
    gen.build(a.ntx)
    backlog = list(gen.out)
    gen.out.clear()
    gen.build(a.live, ledgers=False)
    live_msgs = list(gen.out)
    model_backlog_end = dict(gen.live)
    topics = [gen.topic(t) for t in gen.parts] + ([f"{tag}.transaction"] if a.tx else [])
    admin = AdminClient({"bootstrap.servers": BOOT})
    fs = admin.create_topics(
        [NewTopic(gen.topic(t), n, 1) for t, n in gen.parts.items()]
        + ([NewTopic(f"{tag}.transaction", 1, 1)] if a.tx else [])
    )
    for f in fs.values():
        f.result()
    prod = Producer({"bootstrap.servers": BOOT, "linger.ms": 20, "enable.idempotence": True})
    for topic, p, k, v in backlog:
        prod.produce(topic, v, k, partition=p)
    prod.flush(60)
    (work / "rules.yaml").write_text(RULES)
    port = free_port()
    # --dynamic: no static group membership and a short session, so every kill and
    # restart is a rebalance that moves partitions between live processors
    dynamic = {"instance_id": "", "session_timeout_ms": a.session_ms} if a.dynamic else {}
    cfg = {
        "kafka": {
            "bootstrap_servers": BOOT,
            "topics": topics,
            "group_id": f"g-{tag}",
            "dead_letter_topic": f"{tag}.dlq",
            "consistency": "transaction" if a.tx else "event",
        },
        "redis": {"url": "redis://127.0.0.1:6379/0", "prefix": tag},
        "sync_rules": "rules.yaml",
        "auth": {"hs256_secret": "qa-secret-" + tag},
        "gateway": {"port": port, "compression": "gzip" if a.gzip else "off"},
        "processor": {"driver": a.driver, "metrics_port": 0, **dynamic},
        "compaction": {"interval_s": a.compact_interval},
    }
    import yaml

    if a.pattern:
        del cfg["kafka"]["topics"]
        cfg["kafka"]["topic_pattern"] = "^" + tag + r"\.(public\..*|transaction)$"
    cfgp = work / "bucketsync.yaml"
    cfgp.write_text(yaml.safe_dump(cfg))
    logs = [open(work / f"proc{i}.log", "ab") for i in range(a.procs)]  # noqa: SIM115 - held while they run
    procs = [
        cli(cfgp, "processor", stdout=logs[i], stderr=subprocess.STDOUT) for i in range(a.procs)
    ]
    glog = open(work / "gateway.log", "ab")  # noqa: SIM115
    gw = cli(cfgp, "gateway", stdout=glog, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    tokens = mint_tokens(cfgp, USERS)
    wait_for_gateway(url)
    watchers = [
        Stream(url, tokens[u], u, a.tx or bool(os.environ.get("QA_LEDGER")), a.reconnect)
        for u in USERS
    ]
    ths = [threading.Thread(target=w.watch, daemon=True) for w in watchers]
    for t in ths:
        t.start()

    def feed() -> None:
        p2 = Producer({"bootstrap.servers": BOOT, "linger.ms": 5, "enable.idempotence": True})
        for j, (topic, pp, k, v) in enumerate(live_msgs):
            p2.produce(topic, v, k, partition=pp)
            if j % 20 == 0:
                p2.poll(0)
                time.sleep(0.02)
        p2.flush(60)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    kills = 0
    t0 = time.monotonic()
    while kills < a.kills:
        time.sleep(rnd.uniform(0.2, 2.5))
        i = rnd.randrange(a.procs)
        procs[i].send_signal(signal.SIGKILL)
        procs[i].wait()
        kills += 1
        time.sleep(rnd.choice([0, 0, 0.5, 2]))
        if a.procs > 1 and kills == a.kills and a.no_restart_last:
            procs[i] = subprocess.Popen(["true"])
            continue
        procs[i] = cli(cfgp, "processor", stdout=logs[i], stderr=subprocess.STDOUT)
    feeder.join()
    # wait for convergence: every user's rows equal the model
    deadline = time.monotonic() + 150
    ok = False
    while time.monotonic() < deadline:
        diffs = {}
        for w in watchers:
            exp = expected_for(w.user, USERS[w.user], model_backlog_end)
            if w.visible != exp:
                diffs[w.user] = (len(w.visible), len(exp))
        if not diffs:
            ok = True
            break
        time.sleep(0.5)
    elapsed = time.monotonic() - t0
    for w in watchers:
        w.stop = True
    # a fresh stream per user as well (initial sync from scratch)
    fresh_diffs = []
    for u in USERS:
        s = Stream(url, tokens[u], u, a.tx)
        s.run_once(True)
        exp = expected_for(u, USERS[u], model_backlog_end)
        if s.visible != exp:
            missing = [k for k in exp if k not in s.visible][:5]
            extra = [k for k in s.visible if k not in exp][:5]
            wrong = [k for k in exp if k in s.visible and s.visible[k] != exp[k]][:3]
            fresh_diffs.append(
                (
                    u,
                    len(s.visible),
                    len(exp),
                    missing,
                    extra,
                    [(k, s.visible[k], exp[k]) for k in wrong],
                )
            )
        fresh_diffs += [("err", e) for e in s.errors]
    verify = cli(cfgp, "verify", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    vout = verify.communicate()[0].decode()
    for p in [*procs, gw]:
        p.terminate()
    for p in [*procs, gw]:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
    errs = [e for w in watchers for e in w.errors]
    res = {
        "tag": tag,
        "seed": a.seed,
        "driver": a.driver,
        "tx": a.tx,
        "procs": a.procs,
        "kills": kills,
        "events": len(backlog),
        "converged": ok,
        "elapsed_s": round(elapsed, 1),
        "stream_errors": errs[:10],
        "n_stream_errors": len(errs),
        "fresh_diffs": fresh_diffs[:6],
        "verify_rc": verify.returncode,
        "completes": sum(w.completes for w in watchers),
        "reconnects": sum(w.reconnects for w in watchers),
    }
    if not ok:
        res["diffs"] = {
            w.user: (len(w.visible), len(expected_for(w.user, USERS[w.user], model_backlog_end)))
            for w in watchers
        }
    if verify.returncode:
        res["verify_out"] = vout[-800:]
    print(json.dumps(res))
    if ok and not errs and not fresh_diffs and verify.returncode == 0:
        drop_run_keys("redis://127.0.0.1:6379/0", tag)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
