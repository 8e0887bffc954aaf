"""``bucketsync demo``: the whole system on local defaults, with a demo feed and a live client.

1. the local stack (Kafka + Redis) comes up;
2. the processor and the gateway start as child processes (as ``bucketsync run``);
3. a feed writes Debezium change events for a ``todos`` table to Kafka;
4. a demo client (the project's protocol simulator) syncs user ``u1``'s bucket over
   ``POST /sync/stream`` and prints every completed checkpoint it applies.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
import urllib.request

import aiohttp

from bucketsync.config import Settings
from bucketsync.errors import UserError
from bucketsync.feed import TodoFeed, ensure_topics, make_producer, produce_events
from bucketsync.run import Supervisor, start_pipeline
from bucketsync.simclient import ClientState, stream_once
from bucketsync.tokens import make_dev_token


def _wait_ready(url: str, timeout: float, sup: Supervisor) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, p in sup.procs:
            if p.poll() is not None:
                raise UserError(f"{name} exited with code {p.returncode} during start-up (see its output above)")
        try:
            with urllib.request.urlopen(url + "/probes/readiness", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise UserError(f"gateway at {url} not ready after {timeout:.0f}s")


def _feed_forever(settings: Settings, topic: str, stop: threading.Event, rate: float) -> None:
    feed = TodoFeed(users=5, rows=40, topic_table=topic.rsplit(".", 1)[-1])
    producer = make_producer(settings)
    produce_events(producer, topic, feed.events(60))  # an initial burst, then a steady trickle
    while not stop.is_set():
        produce_events(producer, topic, feed.events(1))
        stop.wait(1.0 / rate)


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
                await stream_once(session, url, token, state, on_line=on_line, timeout_s=left, client_id="demo")
            except aiohttp.ClientError as exc:
                print(f"demo client: connection error ({exc}); reconnecting", flush=True)
                await asyncio.sleep(1)


def main(settings: Settings, args: argparse.Namespace) -> int:
    if args.source == "postgres":
        raise UserError("--source postgres is not built yet (issue 6); use the default feed")
    if not args.no_stack:
        from bucketsync import stack

        stack.ensure_up(settings)
    topics = settings.kafka.topics
    if not topics:
        raise UserError("the demo needs kafka.topics (e.g. app.public.todos) in the config")
    ensure_topics(settings, list(topics))
    url = f"http://{settings.gateway.host}:{settings.gateway.port}"
    sup = Supervisor()
    sup.install_signals()
    stop = threading.Event()
    try:
        start_pipeline(sup, settings, args.config)
        _wait_ready(url, 60, sup)
        print(f"bucketsync: gateway ready at {url}; feeding {topics[0]} and syncing user u1", flush=True)
        print(f"bucketsync: try another client:  bucketsync token --sub u2   (endpoint {url})", flush=True)
        feeder = threading.Thread(target=_feed_forever, args=(settings, topics[0], stop, 2.0), daemon=True)
        feeder.start()
        until = time.monotonic() + args.duration if args.duration else None
        token = make_dev_token(settings, sub="u1", ttl_s=int(args.duration or 3600) + 600)
        client = threading.Thread(target=lambda: asyncio.run(_client(url, token, stop, until)), daemon=True)
        client.start()
        rc = sup.wait_any(until)
        return rc
    finally:
        stop.set()
        sup.stop()
