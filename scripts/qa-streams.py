"""Black-box acceptance scenario for data-dependent buckets and Sync Streams (a companion of
scripts/qa-scenario.py; only the CLI, config YAML, Debezium JSON on Kafka, the sync protocol
and the official Node client).

Tables lists / memberships / todos / docs. `--mode rules`: legacy `bucket_definitions` with
parameter queries over lists (owner) and memberships (shared lists), plus a per-org bucket
from a token claim (some tokens lack the claim; some rows have a NULL org / owner / list /
member). `--mode streams`: edition-3 Sync Streams (a global CTE over memberships,
auto-subscribed streams, a `list_todos` stream subscribed per client with
`subscription.parameter('list_id')`, one client with `include_defaults: false`).
Memberships are added, removed and moved while clients are connected; processors are
SIGKILLed and restarted; the scheduled compaction runs often; clients drop their streams and
resume with `after`. Every checkpoint_complete is checksum-checked; at the end each user's
rows (live streams, a fresh stream, and with `--node` the official Node client) must equal
an independent model of the rules. `--replica`: the run uses a private redis-server primary
with a replica, the gateway reads from the replica (`redis.replica_urls`). `--redis-restart`:
the private primary is shut down and restarted in the middle of the run.
Prints one JSON line; exit 0 when everything agrees.

usage: scripts/qa-streams.py --seed N [--mode rules|streams] [--driver kafka|faust] [--tx]
       [--procs 2] [--kills K] [--replica] [--redis-restart] [--node]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import random
import shutil
import signal
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

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("qa_scenario", HERE / "qa-scenario.py")
assert _spec and _spec.loader
qa = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qa)

REPO = qa.REPO
BOOT = qa.BOOT
jd = qa.jd
USERS: dict[str, str | None] = {
    "u1": "acme",
    "u2": "acme",
    "u3": "globex",
    "u4": None,
    "u5": None,
    "u6": "initech",
}
ORGS = ["acme", "globex", "initech", None]
LISTS = [f"L{i}" for i in range(1, 13)]
PARTS = {"lists": 2, "memberships": 2, "todos": 3, "docs": 1}
FENCE = "<fence>"  # in the live feed: wait until the store applied everything produced

RULES_LEGACY = """bucket_definitions:
  shared:
    parameters:
      - SELECT id AS list_id FROM lists WHERE owner_id = request.user_id()
      - SELECT list_id FROM memberships WHERE user_id = request.user_id()
    data:
      - SELECT id, owner_id, name FROM lists WHERE id = bucket.list_id
      - SELECT id, list_id, description FROM todos WHERE list_id = bucket.list_id
  by_org:
    parameters: SELECT request.jwt() ->> 'org' AS org
    data:
      - SELECT id, org_id, title FROM docs WHERE org_id = bucket.org
"""

RULES_STREAMS = """config:
  edition: 3
with:
  my_lists: SELECT list_id FROM memberships WHERE user_id = auth.user_id()
streams:
  owned:
    auto_subscribe: true
    query: SELECT id, owner_id, name FROM lists WHERE owner_id = auth.user_id()
  shared:
    auto_subscribe: true
    priority: 1
    query: SELECT id, owner_id, name FROM lists WHERE id IN my_lists
  list_todos:
    query: |
      SELECT id, list_id, description FROM todos
      WHERE list_id = subscription.parameter('list_id') AND list_id IN my_lists
  org_docs:
    auto_subscribe: true
    query: SELECT id, org_id, title FROM docs WHERE org_id = auth.parameter('org')
"""

Live = dict[tuple[str, str], dict[str, Any]]
Rows = dict[tuple[str, str], dict[str, Any]]


def project(table: str, row: dict[str, Any]) -> dict[str, Any]:
    cols = {
        "lists": ("id", "owner_id", "name"),
        "todos": ("id", "list_id", "description"),
        "docs": ("id", "org_id", "title"),
    }[table]
    return {c: row.get(c) for c in cols}


def expected(
    mode: str,
    user: str,
    org: str | None,
    subs: list[str],
    defaults: bool,
    live: Live,
) -> Rows:
    """The rows `user` must hold (table, id) -> data: the rules by hand."""
    owned = {r["id"] for (t, _), r in live.items() if t == "lists" and r.get("owner_id") == user}
    member = {
        r["list_id"]
        for (t, _), r in live.items()
        if t == "memberships" and r.get("user_id") == user and r.get("list_id") is not None
    }
    out: Rows = {}
    for (t, rid), r in live.items():
        if mode == "rules":
            grant = owned | member
            ok = (
                (t == "lists" and rid in grant)
                or (t == "todos" and r.get("list_id") in grant)
                or (t == "docs" and org is not None and r.get("org_id") == org)
            )
        else:
            ok = (
                (t == "lists" and defaults and (r.get("owner_id") == user or rid in member))
                or (t == "todos" and r.get("list_id") in (set(subs) & member))
                or (t == "docs" and defaults and org is not None and r.get("org_id") == org)
            )
        if ok:
            out[(t, rid)] = project(t, r)
    return out


class Gen:
    """Debezium JSON events (half with schemas) over the four tables; the model in `live`."""

    def __init__(self, prefix: str, rnd: random.Random, tx: bool) -> None:
        self.prefix, self.rnd, self.tx = prefix, rnd, tx
        self.lsn = 1000
        self.txid = 500
        self.out: list[tuple[str, int | None, bytes | None, bytes | None]] = []
        self.live: Live = {}
        self.truncates = 0

    def topic(self, table: str) -> str:
        return f"{self.prefix}.public.{table}"

    def event(self, table: str, op: str, rid: str, after: dict | None, block: dict | None) -> None:
        rnd = self.rnd
        before = self.live.get((table, rid))
        self.lsn += rnd.randint(8, 80)
        if op == "u" and rnd.random() < 0.4:
            before = None
        elif op == "d" and before is not None and rnd.random() < 0.5:
            before = {"id": rid}
        if op == "c" and rnd.random() < 0.2:
            op = "r"
        payload = {
            "before": before if op in ("u", "d") else None,
            "after": after,
            "source": qa.source_block(self.prefix, table, self.txid, self.lsn),
            "transaction": block,
            "op": op,
            "ts_ms": 2,
        }
        key: dict[str, Any] = {"id": rid}
        value: Any = payload
        if rnd.random() < 0.5:
            value = {
                "schema": qa._schema_for(table, after or before, self.prefix),
                "payload": payload,
            }
            key = {
                "schema": {
                    "type": "struct",
                    "fields": [{"type": "string", "optional": False, "field": "id"}],
                },
                "payload": key,
            }
        p = sum(rid.encode()) % PARTS[table]
        self.out.append((self.topic(table), p, jd(key).encode(), jd(value).encode()))
        if op == "d":
            if rnd.random() < 0.7:
                self.out.append((self.topic(table), p, jd(key).encode(), None))
            self.live.pop((table, rid), None)
        else:
            self.live[(table, rid)] = after  # type: ignore[assignment]

    def transaction(self, changes: list[tuple[str, str, str, dict | None]]) -> None:
        self.txid += 1
        tid = f"{self.txid}:{self.lsn}"
        tx_topic = f"{self.prefix}.transaction"
        if self.tx:
            self.out.append(
                (
                    tx_topic,
                    0,
                    jd({"id": tid}).encode(),
                    jd({"status": "BEGIN", "id": tid, "event_count": None, "ts_ms": 1}).encode(),
                )
            )
        counts: dict[str, int] = {}
        for n, (table, op, rid, after) in enumerate(changes, 1):
            counts[table] = counts.get(table, 0) + 1
            block = (
                {"id": tid, "total_order": n, "data_collection_order": counts[table]}
                if self.tx
                else None
            )
            self.event(table, op, rid, after, block)
        if self.tx:
            self.out.append(
                (
                    tx_topic,
                    0,
                    jd({"id": tid}).encode(),
                    jd(
                        {
                            "status": "END",
                            "id": tid,
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

    def random_row(self, table: str, rid: str) -> dict[str, Any]:
        rnd = self.rnd
        users = [*USERS, None]
        if table == "lists":
            return {"id": rid, "owner_id": rnd.choice(users), "name": f"n{rnd.randint(0, 99)}"}
        if table == "memberships":
            return {
                "id": rid,
                "list_id": rnd.choice([*LISTS, None] if rnd.random() < 0.1 else LISTS),
                "user_id": rnd.choice(users if rnd.random() < 0.1 else list(USERS)),
                "role": rnd.choice(["r", "w"]),
            }
        if table == "todos":
            return {
                "id": rid,
                "list_id": rnd.choice([*LISTS, None]),
                "description": rnd.choice(["x", "ünï ☃", 'q"', str(rnd.random())]),
                "secret": "s",
            }
        return {
            "id": rid,
            "org_id": rnd.choice(ORGS),
            "title": f"t{rnd.randint(0, 999)}",
            "body": "b" * rnd.randint(0, 30),
        }

    def truncate(self, table: str) -> None:
        """A fence (the feeder waits until everything produced is applied), the TRUNCATE on
        a random partition of the table, another fence: the truncate is unordered relative to
        the table's other partitions (docs/cdc-events.md 4.4), the fences make the model
        exact."""
        self.lsn += 10
        payload = qa.truncate_payload(self.prefix, table, self.txid, self.lsn)
        fence = not os.environ.get("QA_TRUNCATE_RACY")
        if fence:
            self.out.append((FENCE, None, None, None))
        p = self.rnd.randrange(PARTS[table])
        self.out.append((self.topic(table), p, None, jd(payload).encode()))
        if fence:
            self.out.append((FENCE, None, None, None))
        for k in [k for k in self.live if k[0] == table]:
            del self.live[k]
        self.truncates += 1

    def build(self, n_tx: int, truncates: int = 0) -> None:
        rnd = self.rnd
        sizes = {"lists": len(LISTS), "memberships": 30, "todos": 60, "docs": 25}
        weights = {"lists": 1, "memberships": 4, "todos": 4, "docs": 2}
        at = set(rnd.sample(range(1, n_tx), min(truncates, max(n_tx - 1, 0)))) if n_tx else set()
        for i in range(n_tx):
            if i in at:  # memberships: rows that feed lookups only (no bucket ops)
                self.truncate(rnd.choice(["memberships", "memberships", "todos", "lists"]))
            changes: list[tuple[str, str, str, dict | None]] = []
            for _ in range(rnd.randint(1, 4)):
                table = rnd.choices(list(weights), list(weights.values()))[0]
                prefix = {"lists": "L", "memberships": "m", "todos": "t", "docs": "d"}[table]
                rid = f"{prefix}{rnd.randint(1, sizes[table])}"
                if any(c[0] == table and c[2] == rid for c in changes):
                    continue
                exists = (table, rid) in self.live
                if exists and rnd.random() < (0.3 if table == "memberships" else 0.12):
                    changes.append((table, "d", rid, None))
                    continue
                changes.append((table, "u" if exists else "c", rid, self.random_row(table, rid)))
            if changes:
                self.transaction(changes)


class Stream:
    """One sync stream; rows committed at checkpoint_complete, checksums verified; the rows
    of all buckets merged by (table, id) (a row held by two buckets must agree)."""

    def __init__(
        self,
        url: str,
        token: str,
        user: str,
        subs: list[str],
        defaults: bool,
        mode: str,
        reconnect_s: float,
        seed: int,
    ) -> None:
        self.url, self.token, self.user = url, token, user
        self.subs, self.defaults, self.mode = subs, defaults, mode
        self.reconnect_s = reconnect_s
        self.rnd = random.Random(seed)
        self.buckets: dict[str, dict[tuple[str, str], str]] = {}
        self.sums: dict[str, int] = {}
        self.after: dict[str, str] = {}
        self.cp: dict[str, Any] = {}
        self.visible: Rows = {}
        self.errors: list[str] = []
        self.stream_errors: list[Any] = []
        self.completes = 0
        self.reconnects = 0
        self.stop = False
        #: per bucket, what this client saw of it (for a mismatch report)
        self.trace: dict[str, list[Any]] = {}
        self.dumps: list[dict[str, Any]] = []
        self.received: dict[str, dict[int, str]] = {}  # bucket -> op id -> op, this stream
        self.redis_url: str | None = None  # set: a mismatch also snapshots the bucket's log
        self.prefix = ""

    def note(self, b: str, *what: Any) -> None:
        t = self.trace.setdefault(b, [])
        t.append(what)
        del t[:-60]

    def body(self) -> dict[str, Any]:
        b: dict[str, Any] = {
            "buckets": [{"name": k, "after": a} for k, a in self.after.items()],
            "include_checksum": True,
            "raw_data": True,
            "client_id": f"qa-{self.user}",
        }
        if self.mode == "streams":
            b["streams"] = {
                "include_defaults": self.defaults,
                "subscriptions": [
                    {
                        "stream": "list_todos",
                        "parameters": {"list_id": s},
                        "override_priority": None,
                    }
                    for s in self.subs
                ],
            }
        return b

    def drop(self, b: str) -> None:
        self.received.pop(b, None)
        self.buckets.pop(b, None)
        self.sums.pop(b, None)
        self.after.pop(b, None)

    def run_once(self, until_complete: bool) -> None:
        with requests.post(
            self.url + "/sync/stream",
            json=self.body(),
            stream=True,
            timeout=(5, 30),
            headers={"Authorization": f"Token {self.token}"},
        ) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code} {r.text[:300]}")
            for b, a in self.after.items():
                self.note(b, "open", a, self.sums.get(b))
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
                            self.note(b, "cp-dropped", c["last_op_id"])
                            self.drop(b)
                    for b, meta in self.cp.items():
                        self.note(b, "cp", c["last_op_id"], meta["checksum"], meta.get("count"))
                    for s in c.get("streams", []):
                        if s.get("errors"):
                            self.stream_errors.append(s)
                elif "checkpoint_diff" in m:
                    c = m["checkpoint_diff"]
                    for b in c["updated_buckets"]:
                        self.cp[b["bucket"]] = b
                        self.note(
                            b["bucket"], "diff", c["last_op_id"], b["checksum"], b.get("count")
                        )
                    for b in c["removed_buckets"]:
                        self.cp.pop(b, None)
                        self.note(b, "removed", c["last_op_id"])
                        self.drop(b)
                elif "data" in m:
                    d = m["data"]
                    b = d["bucket"]
                    self.note(
                        b,
                        "data",
                        d.get("after"),
                        [(o["op_id"], o["op"], o["checksum"]) for o in d["data"]][:40],
                    )
                    rows = self.buckets.setdefault(b, {})
                    got = self.received.setdefault(b, {})
                    for op in d["data"]:
                        got[int(op["op_id"])] = op["op"]
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
                    vis: Rows = {}
                    for b, meta in self.cp.items():
                        if self.sums.get(b, 0) % 2**32 != int(meta["checksum"]) % 2**32:
                            self.errors.append(
                                f"{self.user}: checksum mismatch {b}: {self.sums.get(b, 0)} vs {meta['checksum']}"
                            )
                            snap: Any = None
                            if self.redis_url:
                                import redis

                                log = redis.Redis.from_url(self.redis_url).zrange(
                                    f"{self.prefix}:ops:{b}", 0, -1, withscores=True
                                )
                                got = self.received.get(b, {})
                                snap = [
                                    (int(sc), mb.decode()[:160])
                                    for mb, sc in log
                                    if int(sc) not in got
                                    and int(sc) <= int(m["checkpoint_complete"]["last_op_id"])
                                ][-12:]
                            self.dumps.append(
                                {
                                    "not_received": snap,
                                    "user": self.user,
                                    "bucket": b,
                                    "complete": m["checkpoint_complete"],
                                    "trace": list(self.trace.get(b, [])),
                                }
                            )
                        for (t, oid), data in self.buckets.get(b, {}).items():
                            v = json.loads(data)
                            if (t, oid) in vis and vis[(t, oid)] != v:
                                self.errors.append(
                                    f"{self.user}: {t}/{oid} differs between buckets: {vis[(t, oid)]} vs {v}"
                                )
                            vis[(t, oid)] = v
                    self.visible = vis
                    if until_complete:
                        return

    def watch(self) -> None:
        while not self.stop:
            try:
                self.run_once(False)
            except Exception:
                time.sleep(0.3)


def lookup_counts_vs_rows(redis_url: str, prefix: str) -> list[Any]:
    """The store's lookup counts (``P:lookup:<key>``: values -> rows giving them) against the
    rows' own lookup entries (``P:rl:*``), counted here: (key, values, stored, counted) where
    they differ. A count without a row grants access nobody has (a TRUNCATE that missed a
    row's change); a row without its count hides one."""
    import redis

    r = redis.Redis.from_url(redis_url)
    counted: dict[tuple[str, str], int] = {}
    for k in r.scan_iter(match=f"{prefix}:rl:*", count=1000):
        for v in r.hgetall(k).values():
            for key, vals in json.loads(v):
                counted[(key, vals)] = counted.get((key, vals), 0) + 1
    stored: dict[tuple[str, str], int] = {}
    head = len(f"{prefix}:lookup:")
    for k in r.scan_iter(match=f"{prefix}:lookup:*", count=1000):
        for f, v in r.hgetall(k).items():
            stored[(k.decode()[head:], f.decode())] = int(v)
    return [
        (key, vals, stored.get((key, vals), 0), counted.get((key, vals), 0))
        for key, vals in sorted(set(stored) | set(counted))
        if stored.get((key, vals), 0) != counted.get((key, vals), 0)
    ]


# ---------------------------------------------------------------- private redis


class PrivateRedis:
    """A redis-server primary (AOF, fsync always) and optionally a replica, on free ports."""

    def __init__(self, work: Path, replica: bool) -> None:
        self.work = work
        self.port = qa.free_port()
        self.rport = qa.free_port() if replica else 0
        self.procs: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, port: int, *extra: str) -> None:
        d = self.work / f"redis-{name}"
        d.mkdir(exist_ok=True)
        log = open(d / "log", "ab")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(d),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        import redis

        r = redis.Redis(port=port)
        for _ in range(100):
            try:
                r.ping()
                return
            except Exception:
                time.sleep(0.1)
        raise RuntimeError(f"redis-server {name} did not start")

    def start(self) -> None:
        self._start("primary", self.port)
        if self.rport:
            self._start("replica", self.rport, "--replicaof", "127.0.0.1", str(self.port))

    def restart_primary(self, down_s: float) -> None:
        import redis

        with contextlib.suppress(Exception):
            redis.Redis(port=self.port).shutdown(nosave=False)
        self.procs["primary"].wait(10)
        time.sleep(down_s)
        self._start("primary", self.port)

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


# ---------------------------------------------------------------- official client


async def node_check(
    url: str,
    mode: str,
    token: str,
    subs: list[str],
    defaults: bool,
    exp: Rows,
    work: Path,
    timeout: float,
) -> dict[str, Any]:
    sys.path.insert(0, REPO)
    from tests.e2e.powersync_client import PowerSyncNodeClient

    schema = {
        "lists": {"owner_id": "text", "name": "text"},
        "todos": {"list_id": "text", "description": "text"},
        "docs": {"org_id": "text", "title": "text"},
    }
    want = {
        t: sorted((r for (tt, _), r in exp.items() if tt == t), key=lambda r: r["id"])
        for t in schema
    }
    async with PowerSyncNodeClient(url, schema, db_path=str(work / "node.db")) as c:
        # the same include_defaults as the user's raw streams (u6: false), which `exp` models
        await c.connect(token, **({} if mode == "rules" else {"include_default_streams": defaults}))
        await c.wait_synced(timeout=timeout)
        if mode == "streams":
            for s in subs:
                await c.subscribe("list_todos", {"list_id": s}, timeout=timeout)
        return await qa.compare_client_tables(c, schema, want, timeout)


# ---------------------------------------------------------------- driver


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--dynamic",
        action="store_true",
        help='dynamic group membership (processor.instance_id: ""): kills move partitions',
    )
    ap.add_argument("--session-ms", type=int, default=6000, help="with --dynamic")
    ap.add_argument("--mode", choices=["rules", "streams"], default="streams")
    ap.add_argument("--driver", default="kafka")
    ap.add_argument("--tx", action="store_true")
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--ntx", type=int, default=600)
    ap.add_argument("--live", type=int, default=600)
    ap.add_argument("--compact-interval", type=float, default=0.5)
    ap.add_argument("--reconnect", type=float, default=1.5)
    ap.add_argument(
        "--reappend-budget", type=float, default=None, help="compaction.reappend_budget"
    )
    ap.add_argument("--replica", action="store_true")
    ap.add_argument("--redis-restart", action="store_true")
    ap.add_argument("--node", action="store_true", help="check users with the official client")
    ap.add_argument("--gzip", action="store_true", help="gateway.compression: gzip")
    ap.add_argument(
        "--compact-cli",
        action="store_true",
        help="run `bucketsync compact --all [--defragment]` over and over while ingesting",
    )
    ap.add_argument(
        "--truncates",
        type=int,
        default=0,
        help="TRUNCATEs in the live feed (multi-partition tables, fenced; not with --tx)",
    )
    a = ap.parse_args()
    if a.truncates and a.tx:
        ap.error("--truncates: TRUNCATE events outside transactions only (no --tx)")
    rnd = random.Random(a.seed)
    tag = f"qs{a.seed}{a.mode[0]}{a.driver[0]}{'t' if a.tx else 'e'}{uuid.uuid4().hex[:6]}"
    work = Path(os.environ.get("QA_RUNS", "/tmp/qa-runs")) / tag
    work.mkdir(parents=True)
    gen = Gen(tag, rnd, a.tx)
    gen.build(a.ntx)
    backlog = list(gen.out)
    gen.out.clear()
    gen.build(a.live, a.truncates)
    live_msgs = list(gen.out)
    model = dict(gen.live)
    subs = {u: sorted(rnd.sample(LISTS, rnd.randint(0, 4))) for u in USERS}
    defaults = {u: u != "u6" for u in USERS}  # u6: include_defaults false
    tx_topic = f"{tag}.transaction"
    topics = [gen.topic(t) for t in PARTS] + ([tx_topic] if a.tx else [])
    admin = AdminClient({"bootstrap.servers": BOOT})
    fs = admin.create_topics(
        [NewTopic(gen.topic(t), n, 1) for t, n in PARTS.items()]
        + ([NewTopic(tx_topic, 1, 1)] if a.tx else [])
    )
    for f in fs.values():
        f.result()
    produced: dict[str, int] = {}  # "topic/partition" -> highest offset produced (fences)

    def delivered(err: Any, msg: Any) -> None:
        if err is None:
            tp = f"{msg.topic()}/{msg.partition()}"
            produced[tp] = max(produced.get(tp, -1), msg.offset())

    prod = Producer({"bootstrap.servers": BOOT, "linger.ms": 20, "enable.idempotence": True})
    for topic, p, k, v in backlog:
        prod.produce(topic, v, k, partition=p, on_delivery=delivered)
    prod.flush(60)
    (work / "rules.yaml").write_text(RULES_LEGACY if a.mode == "rules" else RULES_STREAMS)
    priv: PrivateRedis | None = None
    redis_url = "redis://127.0.0.1:6379/0"
    if a.replica or a.redis_restart:
        priv = PrivateRedis(work, a.replica)
        priv.start()
        redis_url = f"redis://127.0.0.1:{priv.port}/0"
    port = qa.free_port()
    # --dynamic: no static group membership and a short session, so every kill and
    # restart is a rebalance that moves partitions between live processors
    dynamic = {"instance_id": "", "session_timeout_ms": a.session_ms} if a.dynamic else {}
    cfg: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": BOOT,
            "topics": topics,
            "group_id": f"g-{tag}",
            "dead_letter_topic": f"{tag}.dlq",
            "consistency": "transaction" if a.tx else "event",
        },
        "redis": {"url": redis_url, "prefix": tag},
        "sync_rules": "rules.yaml",
        "auth": {"hs256_secret": "qa-secret-" + tag},
        "gateway": {"port": port, "compression": "gzip" if a.gzip else "off"},
        "processor": {"driver": a.driver, "metrics_port": 0, **dynamic},
        "compaction": {"interval_s": a.compact_interval},
    }
    if a.reappend_budget is not None:
        cfg["compaction"]["reappend_budget"] = a.reappend_budget
    if priv and priv.rport:
        cfg["redis"]["replica_urls"] = [f"redis://127.0.0.1:{priv.rport}/0"]
    import yaml

    cfgp = work / "bucketsync.yaml"
    cfgp.write_text(yaml.safe_dump(cfg))
    logs = [open(work / f"proc{i}.log", "ab") for i in range(a.procs)]  # noqa: SIM115
    procs = [
        qa.cli(cfgp, "processor", stdout=logs[i], stderr=subprocess.STDOUT) for i in range(a.procs)
    ]
    glog = open(work / "gateway.log", "ab")  # noqa: SIM115
    if os.environ.get("QA_GW_DEBUG"):  # the stream's page reads in the gateway log
        gw = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import logging, sys; from bucketsync.cli import main; "
                "logging.getLogger('bucketsync.gateway.stream').setLevel(logging.DEBUG); "
                "sys.exit(main())",
                "--config",
                str(cfgp),
                "gateway",
            ],
            cwd=REPO,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("BUCKETSYNC_")}},
            stdout=glog,
            stderr=subprocess.STDOUT,
        )
    else:
        gw = qa.cli(cfgp, "gateway", stdout=glog, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    tokens = qa.mint_tokens(cfgp, USERS)
    qa.wait_for_gateway(url)
    watchers = [
        Stream(url, tokens[u], u, subs[u], defaults[u], a.mode, a.reconnect, a.seed * 10 + i)
        for i, u in enumerate(USERS)
    ]
    for w in watchers:
        w.redis_url, w.prefix = redis_url, tag
        threading.Thread(target=w.watch, daemon=True).start()

    fences: list[float] = []

    def fence(p2: Producer) -> None:
        """Until the store's applied offsets reach everything produced (processors are
        killed meanwhile: restarted ones get there too)."""
        import redis

        p2.flush(60)
        t = time.monotonic()
        r = redis.Redis.from_url(redis_url)
        while time.monotonic() - t < 120:
            with contextlib.suppress(Exception):
                got = {k.decode(): int(v) for k, v in r.hgetall(f"{tag}:offsets").items()}
                if all(got.get(tp, -1) >= off for tp, off in produced.items()):
                    break
            time.sleep(0.05)
        else:
            fence_timeouts.append(dict(produced))
        fences.append(time.monotonic() - t)

    fence_timeouts: list[Any] = []

    def feed() -> None:
        p2 = Producer({"bootstrap.servers": BOOT, "linger.ms": 5, "enable.idempotence": True})
        for j, (topic, pp, k, v) in enumerate(live_msgs):
            if topic == FENCE:
                fence(p2)
                continue
            p2.produce(topic, v, k, partition=pp, on_delivery=delivered)
            if j % 10 == 0:
                p2.poll(0)
                time.sleep(0.03)
        p2.flush(60)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    compact_runs: list[int] = []  # return codes of `bucketsync compact` run meanwhile

    def compact_cli() -> None:
        """`bucketsync compact --all` (every other one with --defragment), back to back,
        while the processors ingest: their applies race its steps (WATCH on P:states and
        P:seq) and must retry, never stall or corrupt."""
        n = 0
        while feeder.is_alive() or n < 2:
            extra = ["--defragment"] if n % 2 else []
            c = qa.cli(cfgp, "compact", "--all", *extra, stdout=subprocess.DEVNULL, stderr=clog)
            compact_runs.append(c.wait())
            n += 1

    clog = open(work / "compact.log", "ab")  # noqa: SIM115
    compactor = threading.Thread(target=compact_cli, daemon=True)
    if a.compact_cli:
        compactor.start()
    t0 = time.monotonic()
    kills = 0
    restarted_redis = False
    while kills < a.kills or (a.redis_restart and not restarted_redis):
        time.sleep(rnd.uniform(0.2, 2.5))
        if priv and a.redis_restart and not restarted_redis and (kills >= a.kills // 2):
            priv.restart_primary(rnd.choice([0.2, 1.0, 3.0]))
            restarted_redis = True
            continue
        if kills < a.kills:
            i = rnd.randrange(a.procs)
            procs[i].send_signal(signal.SIGKILL)
            procs[i].wait()
            kills += 1
            time.sleep(rnd.choice([0, 0, 0.5, 2]))
            procs[i] = qa.cli(cfgp, "processor", stdout=logs[i], stderr=subprocess.STDOUT)
    feeder.join()
    if a.compact_cli:
        compactor.join()
    exp = {u: expected(a.mode, u, USERS[u], subs[u], defaults[u], model) for u in USERS}
    # unfenced TRUNCATEs: the model cannot know which rows of other partitions they took
    # (docs/cdc-events.md 4.4); the store's own invariants (verify, lookups) still hold
    deadline = time.monotonic() + (20 if os.environ.get("QA_TRUNCATE_RACY") else 150)
    ok = False
    while time.monotonic() < deadline:
        if all(w.visible == exp[w.user] for w in watchers):
            ok = True
            break
        time.sleep(0.5)
    elapsed = time.monotonic() - t0
    for w in watchers:
        w.stop = True

    def rowdiff(got: Rows, want: Rows) -> dict[str, Any]:
        return {
            "n": (len(got), len(want)),
            "missing": [k for k in want if k not in got][:5],
            "extra": [k for k in got if k not in want][:5],
            "wrong": [(k, got[k], want[k]) for k in want if k in got and got[k] != want[k]][:3],
        }

    fresh_diffs: list[Any] = []
    for i, u in enumerate(USERS):
        s = Stream(url, tokens[u], u, subs[u], defaults[u], a.mode, 0, i)
        try:
            s.run_once(True)
        except Exception as e:
            fresh_diffs.append((u, repr(e)))
            continue
        if s.visible != exp[u]:
            fresh_diffs.append((u, rowdiff(s.visible, exp[u])))
        fresh_diffs += [("err", e) for e in s.errors]
    node: dict[str, Any] = {}
    if a.node:
        for u in rnd.sample(list(USERS), 2):
            (work / u).mkdir()
            try:
                node[u] = asyncio.run(
                    node_check(url, a.mode, tokens[u], subs[u], defaults[u], exp[u], work / u, 90)
                )
            except Exception as e:
                node[u] = {"ok": False, "error": repr(e)[:500]}
    verify = qa.cli(cfgp, "verify", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    vout = verify.communicate()[0].decode()
    for p in [*procs, gw]:
        p.terminate()
    for p in [*procs, gw]:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
    errs = [e for w in watchers for e in w.errors]
    serrs = [e for w in watchers for e in w.stream_errors]
    lookup_diffs = lookup_counts_vs_rows(redis_url, tag)
    res: dict[str, Any] = {
        "tag": tag,
        "seed": a.seed,
        "mode": a.mode,
        "driver": a.driver,
        "tx": a.tx,
        "procs": a.procs,
        "kills": kills,
        "replica": a.replica,
        "redis_restart": restarted_redis,
        "events": len(backlog) + len(live_msgs),
        "converged": ok,
        "elapsed_s": round(elapsed, 1),
        "stream_errors": errs[:10],
        "n_stream_errors": len(errs),
        "subscription_errors": serrs[:3],
        "fresh_diffs": fresh_diffs[:6],
        "node": node,
        "verify_rc": verify.returncode,
        "completes": sum(w.completes for w in watchers),
        "reconnects": sum(w.reconnects for w in watchers),
        "rows": {u: len(e) for u, e in exp.items()},
        "lookup_diffs": lookup_diffs[:5],
    }
    if a.compact_cli:
        res["compact_runs"] = len(compact_runs)
        res["compact_failed"] = [rc for rc in compact_runs if rc]
    if a.truncates:
        res["truncates"] = gen.truncates
        res["fence_s_max"] = round(max(fences, default=0.0), 1)
        res["fence_timeouts"] = fence_timeouts[:2]
    if not ok:
        res["diffs"] = {
            w.user: rowdiff(w.visible, exp[w.user]) for w in watchers if w.visible != exp[w.user]
        }
    if verify.returncode:
        res["verify_out"] = vout[-800:]
    dumps = [d for w in watchers for d in w.dumps]
    if dumps:
        (work / "mismatches.json").write_text(json.dumps(dumps, indent=1, default=str))
    print(json.dumps(res, default=str))
    good = (
        ok
        and not fence_timeouts
        and not lookup_diffs
        # with --redis-restart, a compact run started while Redis is down exits 1 (refused)
        and (a.redis_restart or not any(compact_runs))
        and not errs
        and not fresh_diffs
        and verify.returncode == 0
        and all(n.get("ok") for n in node.values())
    )
    if priv:
        priv.stop()
        if good:
            shutil.rmtree(work / "redis-primary", ignore_errors=True)
            shutil.rmtree(work / "redis-replica", ignore_errors=True)
    elif good:
        qa.drop_run_keys(redis_url, tag)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
