"""``bucketsync demo``: the whole system on local defaults, with a demo feed and a live client.

1. the local stack (Kafka + Redis) comes up;
2. the processor and the gateway start as child processes (as ``bucketsync run``);
3. the demo source (:class:`bucketsync.demo_web.DemoSource`) writes Debezium change events
   for ``lists`` and ``todos`` (and ``memberships`` when its topic is consumed) to Kafka:
   a seed, then a trickle of random edits;
4. the demo web page (``web/``, the official PowerSync web SDK) is served with its small
   backend on ``demo.web_port``: pick a user, watch rows, status and buckets live, write
   todos (uploads become Debezium events and come back through CDC);
5. a demo client (the project's protocol simulator) syncs user ``u1``'s bucket over
   ``POST /sync/stream`` and prints every completed checkpoint it applies.

With ``--source postgres`` step 1 also starts PostgreSQL and Debezium (``stack up --source
postgres``) and step 3 is real CDC: a writer INSERTs/UPDATEs/DELETEs rows of ``todos`` in
PostgreSQL (one psql session), Debezium publishes them to ``app.public.todos``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import aiohttp
import yaml

from bucketsync import demo_web
from bucketsync.config import Settings
from bucketsync.errors import UserError
from bucketsync.feed import WORDS, ensure_topics
from bucketsync.run import Supervisor, start_pipeline
from bucketsync.simclient import ClientState, stream_once
from bucketsync.tokens import make_dev_token


def _wait_ready(url: str, timeout: float, sup: Supervisor) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, p in sup.procs:
            if p.poll() is not None:
                raise UserError(
                    f"{name} exited with code {p.returncode} during start-up (see its output above)"
                )
        try:
            with urllib.request.urlopen(url + "/probes/readiness", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise UserError(f"gateway at {url} not ready after {timeout:.0f}s")


def _derived_config(
    settings: Settings, *, topics: list[str] | None = None, sync_rules: Path | None = None
) -> tuple[Settings, str, tempfile.TemporaryDirectory[str]]:
    """A copy of the config (for the processor and the gateway) with other topics or rules."""
    kafka = settings.kafka
    if topics is not None:
        kafka = kafka.model_copy(update={"topics": topics, "topic_pattern": None})
    rules = sync_rules if sync_rules is not None else settings.sync_rules_path
    derived = settings.model_copy(update={"kafka": kafka, "sync_rules": str(rules)})
    data = derived.model_dump(mode="json", exclude={"config_dir"})
    data["stack"]["state_dir"] = str(settings.state_dir)
    tmp = tempfile.TemporaryDirectory(prefix="bucketsync-demo-")
    path = Path(tmp.name) / "bucketsync.yaml"
    path.write_text(yaml.safe_dump(data))
    return derived, str(path), tmp


def _demo_tables_config(
    settings: Settings,
) -> tuple[Settings, str | None, tempfile.TemporaryDirectory[str] | None]:
    """The demo's sync rules (``demo.sync_rules``) and its tables' topics, when they differ
    from the config's: (settings, config path for the children or None, temp dir)."""
    topics = list(settings.kafka.topics)
    prefix = topics[0].rsplit(".", 1)[0]
    wanted = topics + [f"{prefix}.{t}" for t in demo_web.TABLES if f"{prefix}.{t}" not in topics]
    rules = settings.resolve_path(settings.demo.sync_rules) if settings.demo.sync_rules else None
    if rules is not None and not rules.is_file():
        raise UserError(f"demo.sync_rules: {rules} does not exist")
    if wanted == topics and (rules is None or rules == settings.sync_rules_path):
        return settings, None, None
    return _derived_config(settings, topics=wanted, sync_rules=rules)


def _start_web(
    settings: Settings,
    source: demo_web.DemoSource | demo_web.PostgresSource,
    url: str,
    ttl_s: int,
) -> demo_web.WebServer | None:
    """The demo page and its backend on ``demo.web_port`` (None when off or not built)."""
    if not settings.demo.web_port:
        return None
    if not demo_web.web_built():
        print(
            "bucketsync: note: the demo web page is not built (web/dist); scripts/demo builds it "
            "(or run scripts/build-web.sh)",
            flush=True,
        )
    demo = demo_web.WebDemo(
        settings,
        source,
        url,
        token_ttl_s=min(ttl_s, settings.auth.max_lifetime_s),
        on_event=lambda what: print(f"demo web: {what}", flush=True),
    )
    try:
        server = demo_web.WebServer(demo, settings.gateway.host, settings.demo.web_port).start()
    except OSError as exc:
        raise UserError(
            f"demo web page: cannot listen on {settings.gateway.host}:{settings.demo.web_port} "
            f"({exc}); set demo.web_port (0 turns the page off)"
        ) from None
    print(
        f"bucketsync: open the live demo page:  {server.url}/?user=u1   "
        f"(and {server.url}/?user=u2 in another tab)",
        flush=True,
    )
    if not source.sharing:
        print(
            "bucketsync: note: no memberships in these sync rules, so lists are per user "
            "(no sharing)",
            flush=True,
        )
    return server


async def _client(url: str, token: str, stop: threading.Event, until: float | None) -> None:
    state = ClientState()
    shown = 0
    async with aiohttp.ClientSession() as session:
        while not stop.is_set() and (until is None or time.monotonic() < until):

            def on_line(kind: str, st: ClientState) -> bool:
                nonlocal shown
                if kind == "checkpoint_complete" and st.completed != shown:
                    shown = st.completed
                    rows = st.tables().get("todos", {})
                    done = sum(1 for r in rows.values() if r.get("completed"))
                    print(
                        f"demo client u1: checkpoint {st.applied_op:>6}  rows {len(rows):>3}  "
                        f"completed {done:>3}  ops received {st.ops:>5}  checksum mismatches "
                        f"{len(st.mismatches)}",
                        flush=True,
                    )
                return stop.is_set() or (until is not None and time.monotonic() >= until)

            left = None if until is None else max(0.1, until - time.monotonic())
            try:
                await stream_once(
                    session, url, token, state, on_line=on_line, timeout_s=left, client_id="demo"
                )
            except aiohttp.ClientError as exc:
                print(f"demo client: connection error ({exc}); reconnecting", flush=True)
                await asyncio.sleep(1)


# --------------------------------------------------------------------------- --source postgres

#: the demo schema in PostgreSQL (database ``app``, schema ``public``)
PG_DEMO_DDL = """
CREATE TABLE IF NOT EXISTS lists (
  id text PRIMARY KEY, owner_id text NOT NULL, name text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS todos (
  id text PRIMARY KEY, list_id text, owner_id text, description text,
  completed boolean NOT NULL DEFAULT false, created_at timestamptz NOT NULL DEFAULT now());
"""
PG_DEMO_USERS = 5


def _pg_statement(rng: random.Random, written: int, n: int) -> tuple[str, str]:
    """The ``written``-th demo write as (SQL, what it does): 20 inserts first, then a mix."""
    owner = f"u{rng.randint(1, PG_DEMO_USERS)}"
    tid = f"t-{n:05d}"
    words = " ".join(rng.sample(WORDS, 2))
    pick = "(SELECT id FROM todos ORDER BY random() LIMIT 1)"
    roll = rng.random() if written > 20 else 0.0
    if roll < 0.35:
        return (
            f"INSERT INTO todos (id, list_id, owner_id, description) VALUES "
            f"('{tid}', 'l-{owner}', '{owner}', '{words}') ON CONFLICT DO NOTHING;",
            f"INSERT todo {tid} for {owner}: {words}",
        )
    if roll < 0.65:
        return (
            f"UPDATE todos SET completed = NOT completed WHERE id = {pick};",
            "UPDATE: toggle a todo",
        )
    if roll < 0.8:
        return f"UPDATE todos SET description = '{words}' WHERE id = {pick};", f"UPDATE: '{words}'"
    if roll < 0.9:
        return (
            f"UPDATE todos SET owner_id = '{owner}', list_id = 'l-{owner}' WHERE id = {pick};",
            f"UPDATE: a todo moves to {owner}",
        )
    return (
        "BEGIN; "
        f"DELETE FROM todos WHERE id = {pick}; "
        f"INSERT INTO todos (id, list_id, owner_id, description) VALUES "
        f"('{tid}', 'l-{owner}', '{owner}', '{words}'); "
        "COMMIT;",
        f"TRANSACTION: DELETE a todo + INSERT {tid} for {owner}",
    )


def _pg_writer(settings: Settings, stop: threading.Event, rate: float) -> None:
    """Writes to PostgreSQL through one long-lived psql session (each statement commits)."""
    from bucketsync import stack

    argv, env = stack.psql_argv(settings)
    argv = [a for a in argv if a != "ON_ERROR_STOP=1" and a != "-v"]
    rng = random.Random()
    first = int(time.time()) % 10_000 * 10  # ids stay unique across demo runs
    proc: subprocess.Popen[bytes] | None = None
    written = 0
    try:
        while not stop.is_set():
            if proc is None or proc.poll() is not None:
                proc = subprocess.Popen(
                    argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
                )
            written += 1
            sql, what = _pg_statement(rng, written, first + written)
            assert proc.stdin is not None
            try:
                proc.stdin.write(sql.encode() + b"\n")
                proc.stdin.flush()
            except (BrokenPipeError, OSError):
                proc = None
                continue
            print(f"postgres: {what}", flush=True)
            stop.wait(1.0 / rate)
    finally:
        if proc is not None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


def _holds_foreign_events(settings: Settings, topic: str) -> bool:
    """Does ``topic`` start with records Debezium did not write (the synthetic feed demo's)?"""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": settings.kafka.bootstrap_servers, "group.id": "demo-peek"})
    try:
        low, high = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=5)
        if high <= low:
            return False
        c.assign([TopicPartition(topic, 0, low)])
        msg = c.poll(5)
        if msg is None or msg.error():
            return False
        raw = msg.headers() or ()
        names = list(raw) if isinstance(raw, dict) else [h[0] for h in raw]
        return not any(str(n).startswith("__debezium.context.") for n in names)
    except Exception:
        return False
    finally:
        c.close()


def _postgres_demo(
    settings: Settings, *, no_stack: bool, config_path: str | None, duration: float | None
) -> int:
    """``demo --source postgres``: real CDC. PostgreSQL writes -> Debezium -> Kafka -> the rest."""
    from bucketsync import stack

    if not no_stack:
        stack.ensure_up(settings, source="postgres")
    _, connector = stack.connector_config(settings)
    prefix = connector.get("topic.prefix", "app")
    topics = [f"{prefix}.public.todos", f"{prefix}.public.lists"]
    stack.psql(settings, PG_DEMO_DDL)
    ensure_topics(settings, topics)
    if _holds_foreign_events(settings, topics[0]):
        print(
            f"bucketsync: note: {topics[0]} also holds events of the synthetic feed demo, so the "
            "client shows those rows too; `bucketsync stack reset` gives a clean start",
            flush=True,
        )
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if not set(topics) <= set(settings.kafka.topics):
        # the processor must read the connector's topics: a copy of the config that says so
        settings, config_path, tmp = _derived_config(settings, topics=topics)
    dsn = stack.postgres_dsn(settings)

    def start_source(stop: threading.Event) -> demo_web.PostgresSource:
        writer = threading.Thread(target=_pg_writer, args=(settings, stop, 2.0), daemon=True)
        writer.start()
        source = demo_web.PostgresSource(
            settings, {"todos": topics[0], "lists": topics[1]}, users=PG_DEMO_USERS
        )
        source.seed()
        return source

    return _serve_demo(
        settings,
        config_path,
        tmp,
        duration,
        [
            f"PostgreSQL {dsn} -> Debezium -> {topics[0]}; syncing user u1",
            f"write yourself:  psql {dsn}",
        ],
        start_source,
    )


def _serve_demo(
    settings: Settings,
    config_path: str | None,
    tmp: tempfile.TemporaryDirectory[str] | None,
    duration: float | None,
    intro: list[str],
    start_source: Callable[[threading.Event], demo_web.DemoSource | demo_web.PostgresSource],
) -> int:
    """Both demos once their topics and config are there: the processor and gateway, the
    ``intro`` lines once the gateway is ready, the data source (``start_source``: seeded,
    its writer running until the event is set), the web page and the client of user u1;
    until ``duration`` or a process exits. Cleans up ``tmp`` (a derived config) after."""
    url = f"http://{settings.gateway.host}:{settings.gateway.port}"
    sup = Supervisor()
    sup.install_signals()
    stop = threading.Event()
    web_server: demo_web.WebServer | None = None
    try:
        _rebuild_outdated_store(settings)
        start_pipeline(sup, settings, config_path)
        _wait_ready(url, 60, sup)
        print(f"bucketsync: gateway ready at {url}; {intro[0]}", flush=True)
        for line in intro[1:]:
            print(f"bucketsync: {line}", flush=True)
        print(
            f"bucketsync: try another client:  bucketsync token --sub u2   (endpoint {url})",
            flush=True,
        )
        source = start_source(stop)
        web_server = _start_web(settings, source, url, int(duration or 3600) + 600)
        until = time.monotonic() + duration if duration else None
        token = make_dev_token(settings, sub="u1", ttl_s=int(duration or 3600) + 600)
        client = threading.Thread(
            target=lambda: asyncio.run(_client(url, token, stop, until)), daemon=True
        )
        client.start()
        return sup.wait_any(until)
    finally:
        stop.set()
        if web_server is not None:
            web_server.stop()
        sup.stop()
        if tmp is not None:
            tmp.cleanup()


def _rebuild_outdated_store(settings: Settings) -> None:
    """The demo's store is a cache of its Kafka topics: one written by an older bucketsync
    (another key layout) is dropped and rebuilt, where a deployment's processor refuses it."""
    from pipeline.store import StoreLayoutMismatch, check_layout, drop_prefix

    try:
        check_layout(settings.redis.url, settings.redis.prefix)
    except StoreLayoutMismatch as exc:
        n = drop_prefix(settings.redis.url, settings.redis.prefix)
        print(
            f"bucketsync: the demo store {settings.redis.prefix!r} had layout {exc.found} "
            f"(older bucketsync): dropped its {n} keys; rebuilding it from Kafka",
            flush=True,
        )


def main(
    settings: Settings,
    *,
    data_source: str = "feed",
    no_stack: bool = False,
    config_path: str | None = None,
    duration: float | None = None,
) -> int:
    """``bucketsync demo [--source postgres] [--duration S] [--no-stack]``."""
    if data_source == "postgres":
        return _postgres_demo(
            settings, no_stack=no_stack, config_path=config_path, duration=duration
        )
    if not no_stack:
        from bucketsync import stack

        stack.ensure_up(settings)
    topics = settings.kafka.topics
    if not topics:
        raise UserError("the demo needs kafka.topics (e.g. app.public.todos) in the config")
    settings, derived_path, tmp = _demo_tables_config(settings)
    topics = settings.kafka.topics
    ensure_topics(settings, list(topics))

    def start_source(stop: threading.Event) -> demo_web.DemoSource:
        source = demo_web.DemoSource(settings)
        source.seed()
        feeder = threading.Thread(target=source.run_activity, args=(stop, 2.0), daemon=True)
        feeder.start()
        return source

    intro = (
        f"feeding {', '.join(topics)} and syncing user u1 "
        f"(sync rules {settings.sync_rules_path.name})"
    )
    return _serve_demo(settings, derived_path or config_path, tmp, duration, [intro], start_source)
