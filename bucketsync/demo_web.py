"""The demo's web page and its small backend (``bucketsync demo``, port ``demo.web_port``).

The page (``web/``, built with Vite into ``web/dist``) runs the official PowerSync web SDK
against the gateway. This module serves it and plays the application backend:

* ``GET /api/config``: the gateway's URL, the demo users, whether lists can be shared;
* ``GET /api/token?user=u2``: a dev HS256 token for that user (like ``bucketsync token``);
* ``POST /api/upload``: the client's CRUD batch (``uploadData``). It is applied to the
  demo's source tables (:class:`DemoSource`), which publishes Debezium change events on
  Kafka (one topic per table, as a Debezium PostgreSQL connector would) and waits until
  the broker has them; with ``--source postgres`` (:class:`PostgresSource`) it runs as one
  transaction in PostgreSQL and waits until Debezium has published the changed rows. Only
  then does the page acknowledge the batch and ask the gateway for a write checkpoint, so
  the checkpoint is bound to offsets that include the write and the client keeps its
  optimistic rows until the write has come back through CDC.

:class:`DemoSource` is the demo's "database": lists, todos and memberships, with a small
random activity of its own (other people editing), and the writes of the pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson
from aiohttp import web

from bucketsync.config import Settings
from bucketsync.feed import WORDS, ensure_topics, envelope, make_producer
from bucketsync.tokens import make_dev_token

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
DIST_DIR = WEB_DIR / "dist"

#: columns of each source table (what a Debezium ``after`` image carries), in order
TABLES: dict[str, tuple[str, ...]] = {
    "lists": ("id", "owner_id", "name"),
    "todos": ("id", "list_id", "owner_id", "description", "completed"),
    "memberships": ("id", "list_id", "user_id"),
}
LIST_NAMES = ("errands", "work", "home", "trip")


def topic_for(settings: Settings, table: str) -> str | None:
    """The CDC topic of ``table`` if the processor consumes it (named like the first topic)."""
    topics = settings.kafka.topics
    if topics:
        prefix = topics[0].rsplit(".", 1)[0]
        name = f"{prefix}.{table}"
        return name if name in topics else None
    if settings.kafka.topic_pattern:
        name = f"app.public.{table}"
        return name if re.search(settings.kafka.topic_pattern, name) else None
    return None


class UploadRejected(ValueError):
    """A CRUD entry the backend refuses (acknowledged anyway, so the queue moves on)."""


class DemoSource:
    """The demo's source tables; every change becomes a Debezium event on the table's topic.

    Thread-safe: the random activity runs in its own thread, uploads in the web server's.
    """

    def __init__(self, settings: Settings, users: int = 5, seed: int | None = None) -> None:
        self.settings = settings
        self.users = [f"u{i}" for i in range(1, users + 1)]
        self.topics = {t: topic_for(settings, t) for t in TABLES}
        missing = [t for t in ("lists", "todos") if self.topics[t] is None]
        if missing:
            raise ValueError(
                f"kafka.topics must include the demo tables {missing} "
                "(e.g. app.public.todos, app.public.lists)"
            )
        ensure_topics(settings, [t for t in self.topics.values() if t is not None])
        self.rows: dict[str, dict[str, dict[str, Any]]] = {t: {} for t in TABLES}
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.producer = make_producer(settings)
        self.lsn = int(time.time() * 1000)
        self.events = 0

    kind = "kafka"

    @property
    def sharing(self) -> bool:
        """Can lists be shared: memberships are replicated and the rules look them up."""
        from pipeline.rules import load_rules

        if self.topics["memberships"] is None:
            return False
        try:
            return "memberships" in load_rules(self.settings.sync_rules_path).parameter_tables()
        except Exception:
            return False

    # ---------------------------------------------------------------- writes (lock held)

    def _emit(
        self, table: str, op: str, before: dict[str, Any] | None, after: dict[str, Any] | None
    ) -> None:
        topic = self.topics[table]
        if topic is None:
            raise UploadRejected(f"table {table} is not replicated")
        self.lsn += 1
        row = after if after is not None else before
        assert row is not None
        key = orjson.dumps({"id": row["id"]})
        while True:
            try:
                self.producer.produce(
                    topic, key=key, value=envelope(table, op, before, after, lsn=self.lsn)
                )
                break
            except BufferError:
                self.producer.poll(0.05)
        self.events += 1

    def _put(self, table: str, row: dict[str, Any]) -> None:
        cols = TABLES[table]
        before = self.rows[table].get(row["id"])
        after = {c: row.get(c, before.get(c) if before else None) for c in cols}
        if table == "todos":
            after["completed"] = bool(after["completed"])
        self.rows[table][row["id"]] = after
        self._emit(table, "u" if before else "c", before, after)

    def _delete(self, table: str, rid: str) -> None:
        before = self.rows[table].pop(rid, None)
        if before is None:  # unknown here (e.g. a row of an earlier demo run): still delete it
            before = {c: None for c in TABLES[table]} | {"id": rid}
        self._emit(table, "d", before, None)

    def flush(self, timeout: float = 10.0) -> None:
        left = self.producer.flush(timeout)
        if left:
            raise RuntimeError(f"{left} change events not delivered to Kafka in {timeout}s")

    # ---------------------------------------------------------------- seed and activity

    def seed(self, todos_per_user: int = 5) -> None:
        """Two lists and a few todos per user (fixed ids: a restart updates, not duplicates)."""
        with self.lock:
            for n, u in enumerate(self.users):
                for k, name in enumerate((LIST_NAMES[n % len(LIST_NAMES)], "shared with friends")):
                    lid = f"l-{u}" if k == 0 else f"l-{u}-2"
                    self._put("lists", {"id": lid, "owner_id": u, "name": f"{u}: {name}"})
                for i in range(todos_per_user):
                    self._put(
                        "todos",
                        {
                            "id": f"t-{u}-{i:02d}",
                            "list_id": f"l-{u}",
                            "owner_id": u,
                            "description": " ".join(self.rng.sample(WORDS, 3)),
                            "completed": i % 3 == 0,
                        },
                    )
            self.flush()

    def step(self) -> str:
        """One random change by "someone else"; returns what it did."""
        with self.lock:
            todos = self.rows["todos"]
            u = self.rng.choice(self.users)
            mine = [t for t in todos.values() if t["owner_id"] == u]
            roll = self.rng.random()
            if roll < 0.3 or len(mine) < 3:
                tid = f"t-{u}-{self.lsn % 100_000:05d}"
                desc = " ".join(self.rng.sample(WORDS, 3))
                self._put(
                    "todos",
                    {
                        "id": tid,
                        "list_id": f"l-{u}",
                        "owner_id": u,
                        "description": desc,
                        "completed": False,
                    },
                )
                what = f"{u} adds '{desc}'"
            elif roll < 0.65:
                t = self.rng.choice(mine)
                self._put("todos", t | {"completed": not t["completed"]})
                what = f"{u} {'reopens' if t['completed'] else 'completes'} '{t['description']}'"
            elif roll < 0.85:
                t = self.rng.choice(mine)
                desc = " ".join(self.rng.sample(WORDS, 3))
                self._put("todos", t | {"description": desc})
                what = f"{u} renames a todo to '{desc}'"
            else:
                t = self.rng.choice(mine)
                self._delete("todos", t["id"])
                what = f"{u} deletes '{t['description']}'"
            self.producer.poll(0)
            return what

    def run_activity(
        self, stop: threading.Event, rate: float, on_change: Callable[[str], None] | None = None
    ) -> None:
        while not stop.wait(1.0 / rate):
            what = self.step()
            if on_change is not None:
                on_change(what)
        self.flush()

    # ---------------------------------------------------------------- uploads

    def apply_upload(self, user: str, ops: list[dict[str, Any]]) -> list[str]:
        """Applies one CRUD batch of ``user`` (PUT/PATCH/DELETE); returns what was refused."""
        refused: list[str] = []
        with self.lock:
            for entry in ops:
                try:
                    self._apply_one(user, entry)
                except (UploadRejected, KeyError, TypeError) as exc:
                    refused.append(
                        f"{entry.get('op')} {entry.get('table')}/{entry.get('id')}: {exc}"
                    )
            self.flush()
        return refused

    def _apply_one(self, user: str, entry: dict[str, Any]) -> None:
        op, table, rid = entry["op"], entry["table"], str(entry["id"])
        data = entry.get("data") or {}
        if table not in TABLES:
            raise UploadRejected(f"unknown table {table}")
        if op == "DELETE":
            self._delete(table, rid)
            return
        if op not in ("PUT", "PATCH"):
            raise UploadRejected(f"unknown op {op}")
        base = self.rows[table].get(rid) if op == "PATCH" else None
        row = dict(base or {}) | {k: v for k, v in data.items() if k in TABLES[table]} | {"id": rid}
        if table == "todos" and op == "PUT":
            row.setdefault("owner_id", user)
        self._put(table, row)


# ------------------------------------------------------------------------------ PostgreSQL


#: columns of the PostgreSQL demo tables (bucketsync.demo.PG_DEMO_DDL) the page may write
PG_COLUMNS: dict[str, tuple[str, ...]] = {
    "lists": ("id", "owner_id", "name"),
    "todos": ("id", "list_id", "owner_id", "description", "completed"),
}


def sql_literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"  # standard_conforming_strings is on


def _key_id(raw: bytes | None) -> str | None:
    """The ``id`` of a Debezium record key (JSON, with or without the schema envelope)."""
    if not raw:
        return None
    try:
        key = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(key, dict) and isinstance(key.get("payload"), dict):
        key = key["payload"]
    return str(key["id"]) if isinstance(key, dict) and "id" in key else None


class PostgresSource:
    """``demo --source postgres``: uploads are applied to PostgreSQL in one transaction;
    the upload is answered once Debezium has published every changed row on Kafka, so the
    write checkpoint the client asks for next covers them."""

    kind = "postgres"
    sharing = False

    def __init__(self, settings: Settings, topics: dict[str, str], users: int = 5) -> None:
        self.settings = settings
        self.topics = topics  # table -> Debezium topic
        self.users = [f"u{i}" for i in range(1, users + 1)]
        self.lock = threading.Lock()

    def seed(self) -> None:
        from bucketsync import stack

        values = ", ".join(f"('l-{u}', '{u}', '{u}: todos')" for u in self.users)
        stack.psql(
            self.settings,
            f"INSERT INTO lists (id, owner_id, name) VALUES {values} ON CONFLICT (id) DO NOTHING;",
        )

    def _statement(self, user: str, entry: dict[str, Any]) -> tuple[str, str, str]:
        """(table, id, SQL) of one CRUD entry."""
        op, table, rid = entry["op"], entry["table"], str(entry["id"])
        if table not in PG_COLUMNS:
            raise UploadRejected(f"unknown table {table}")
        cols = PG_COLUMNS[table]
        data = {k: v for k, v in (entry.get("data") or {}).items() if k in cols and k != "id"}
        if table == "todos" and "completed" in data:
            data["completed"] = bool(data["completed"])
        if op == "DELETE":
            return table, rid, f"DELETE FROM {table} WHERE id = {sql_literal(rid)} RETURNING id;"
        if op == "PUT":
            if table == "todos":
                data.setdefault("owner_id", user)
            names = ["id", *data]
            values = ", ".join(sql_literal(v) for v in [rid, *data.values()])
            update = ", ".join(f"{c} = EXCLUDED.{c}" for c in data) or "id = EXCLUDED.id"
            return (
                table,
                rid,
                (
                    f"INSERT INTO {table} ({', '.join(names)}) VALUES ({values}) "
                    f"ON CONFLICT (id) DO UPDATE SET {update} RETURNING id;"
                ),
            )
        if op == "PATCH":
            if not data:
                raise UploadRejected("nothing to update")
            sets = ", ".join(f"{c} = {sql_literal(v)}" for c, v in data.items())
            return (
                table,
                rid,
                f"UPDATE {table} SET {sets} WHERE id = {sql_literal(rid)} RETURNING id;",
            )
        raise UploadRejected(f"unknown op {op}")

    def apply_upload(self, user: str, ops: list[dict[str, Any]]) -> list[str]:
        from confluent_kafka import Consumer, TopicPartition

        from bucketsync import stack

        refused: list[str] = []
        statements: list[tuple[str, str, str]] = []
        for entry in ops:
            try:
                statements.append(self._statement(user, entry))
            except (UploadRejected, KeyError, TypeError) as exc:
                refused.append(f"{entry.get('op')} {entry.get('table')}/{entry.get('id')}: {exc}")
        if not statements:
            return refused
        with self.lock:
            consumer = Consumer(
                {
                    "bootstrap.servers": self.settings.kafka.bootstrap_servers,
                    "group.id": "bucketsync-demo-upload",
                    "enable.auto.commit": False,
                }
            )
            try:
                tables = sorted({t for t, _, _ in statements})
                start = []
                for table in tables:
                    topic = self.topics[table]
                    meta = consumer.list_topics(topic, timeout=10).topics[topic]
                    for p in meta.partitions:
                        _low, high = consumer.get_watermark_offsets(
                            TopicPartition(topic, p), timeout=10
                        )
                        start.append(TopicPartition(topic, p, high))
                sql = "BEGIN;\n" + "\n".join(q for _, _, q in statements) + "\nCOMMIT;\n"
                try:
                    out = stack.psql(self.settings, sql)
                except (
                    Exception
                ) as exc:  # refused whole; the client's rows revert at the next checkpoint
                    return [*refused, f"PostgreSQL refused the batch: {exc}"]
                # the ids the statements touched (RETURNING id); a DELETE of a missing row
                # touches nothing and publishes nothing
                touched = {line.strip() for line in out.splitlines() if line.strip()}
                waiting = {(self.topics[t], rid) for t, rid, _ in statements if rid in touched}
                consumer.assign(start)
                deadline = time.monotonic() + 15
                while waiting and time.monotonic() < deadline:
                    msg = consumer.poll(0.2)
                    if msg is None or msg.error():
                        continue
                    waiting.discard((msg.topic(), _key_id(msg.key()) or ""))
                if waiting:
                    refused.append(f"not seen on Kafka within 15 s: {sorted(waiting)}")
            finally:
                consumer.close()
        return refused


# ------------------------------------------------------------------------------ web server


@dataclass
class WebDemo:
    settings: Settings
    source: DemoSource | PostgresSource
    gateway_url: str
    token_ttl_s: int = 3600
    on_event: Callable[[str], None] | None = None

    def _user_of(self, request: web.Request) -> str:
        header = request.headers.get("Authorization", "")
        scheme, _, tok = header.partition(" ")
        if scheme.lower() not in ("bearer", "token") or not tok:
            raise web.HTTPUnauthorized(text="missing bearer token")
        auth = self.settings.auth
        try:
            claims = jwt.decode(
                tok,
                auth.hs256_secret or "",
                algorithms=["HS256"],
                audience=auth.audience,
                leeway=auth.leeway_s,
            )
        except jwt.PyJWTError as exc:
            raise web.HTTPUnauthorized(text=f"bad token: {exc}") from None
        return str(claims["sub"])

    async def config(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {
                "endpoint": self.gateway_url,
                "users": self.source.users,
                "sharing": self.source.sharing,
                "source": self.source.kind,
            }
        )

    async def token(self, request: web.Request) -> web.Response:
        user = request.query.get("user", "")
        if user not in self.source.users:
            raise web.HTTPBadRequest(text=f"unknown user {user!r}; one of {self.source.users}")
        tok = make_dev_token(self.settings, sub=user, ttl_s=self.token_ttl_s)
        return web.json_response({"token": tok, "endpoint": self.gateway_url})

    async def upload(self, request: web.Request) -> web.Response:
        user = self._user_of(request)
        body = await request.json()
        ops = body.get("ops")
        if not isinstance(ops, list):
            raise web.HTTPBadRequest(text="expected {ops: [...]}")
        t0 = time.perf_counter()
        refused = await asyncio.to_thread(self.source.apply_upload, user, ops)
        ms = (time.perf_counter() - t0) * 1000
        if self.on_event is not None:
            self.on_event(
                f"upload from {user}: {len(ops)} change(s) -> "
                + ("PostgreSQL -> Debezium -> Kafka" if self.source.kind == "postgres" else "Kafka")
                + f" in {ms:.0f} ms"
                + (f"; refused {refused}" if refused else "")
            )
        # refused entries are acknowledged too: a 2xx lets the client's queue move on
        return web.json_response({"applied": len(ops) - len(refused), "refused": refused})

    async def index(self, _request: web.Request) -> web.StreamResponse:
        index = DIST_DIR / "index.html"
        if not index.is_file():
            return web.Response(
                status=503,
                text="the demo page is not built: run scripts/build-web.sh (or scripts/demo)",
            )
        return web.FileResponse(index, headers={"Cache-Control": "no-cache"})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.index)
        app.router.add_get("/index.html", self.index)
        app.router.add_get("/api/config", self.config)
        app.router.add_get("/api/token", self.token)
        app.router.add_post("/api/upload", self.upload)
        if (DIST_DIR / "assets").is_dir():
            app.router.add_static("/assets", DIST_DIR / "assets")
        return app


class WebServer:
    """Runs a :class:`WebDemo` app on its own event loop in a daemon thread."""

    def __init__(self, demo: WebDemo, host: str, port: int) -> None:
        self.demo = demo
        self.host = host
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="demo-web", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.demo.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        if self.port == 0 and server is not None:
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> WebServer:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._runner is not None and self._loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
            with contextlib.suppress(Exception):
                fut.result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def web_built() -> bool:
    return (DIST_DIR / "index.html").is_file()
