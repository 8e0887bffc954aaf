"""Run the real gateway in-process against the real Redis, and feed the store directly."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web

from bucketsync.config import Settings
from bucketsync.simclient import ClientState, stream_once
from bucketsync.tokens import make_dev_token
from gateway.server import GATEWAY_KEY, Gateway, build_app, make_runner
from pipeline import core
from pipeline.cdc import KafkaRecord
from pipeline.processor import load_sync_rules
from pipeline.store import Store

_offsets = itertools.count()


async def feed(settings: Settings, events: Sequence[dict[str, Any]]) -> int:
    """Apply normalised row events as one atomic batch (the processor's core and store)."""
    rules = load_sync_rules(settings)
    store = Store.from_settings(settings)
    try:
        items = []
        for ev in events:
            rec = KafkaRecord(topic="feed", partition=0, offset=next(_offsets), key=b"", value=b"")
            items.append((rec, ev))
        plan = core.plan_batch(items, rules, {})
        res = await store.apply(plan.batch)
        assert res.status == "ok", res
        return res.checkpoint
    finally:
        await store.close()


def todo(tid: str, owner: str | None, text: str = "x", done: int = 0) -> dict[str, Any]:
    return {
        "action": "upsert",
        "table": "app.public.todos",
        "source_table": "todos",
        "source_schema": "public",
        "key": {"id": tid},
        "row": {"id": tid, "owner_id": owner, "description": text, "completed": done},
    }


def delete_todo(tid: str) -> dict[str, Any]:
    return {
        "action": "delete",
        "table": "app.public.todos",
        "source_table": "todos",
        "key": {"id": tid},
    }


@asynccontextmanager
async def running_gateway(settings: Settings, *, with_position: bool = False) -> AsyncIterator[str]:
    """The gateway's base URL."""
    async with running_app(settings, with_position=with_position) as (port, _gw, _runner):
        yield f"http://127.0.0.1:{port}"


@asynccontextmanager
async def running_app(
    settings: Settings, *, with_position: bool = False
) -> AsyncIterator[tuple[int, Gateway, web.AppRunner]]:
    """The gateway on a free port: the port, its state and its runner."""
    app = await build_app(settings, with_position=with_position)
    runner = make_runner(app, settings, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = getattr(site, "_server", None)
    assert server is not None and server.sockets
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, app[GATEWAY_KEY], runner
    finally:
        await runner.cleanup()


class Client:
    """The simulator plus a session and a token, with a record of the lines it saw."""

    def __init__(self, endpoint: str, settings: Settings, sub: str, ttl_s: int = 3600):
        self.endpoint = endpoint
        self.token = make_dev_token(settings, sub=sub, ttl_s=ttl_s)
        self.state = ClientState()
        self.kinds: list[str] = []
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.session is not None
        await self.session.close()

    async def sync_until(
        self, stop_after_completes: int = 1, timeout_s: float = 10.0, **kw: Any
    ) -> int:
        """Open a stream and read until ``stop_after_completes`` checkpoints completed."""
        assert self.session is not None
        start = self.state.completed

        def hook(kind: str, state: ClientState) -> bool:
            self.kinds.append(kind)
            return state.completed - start >= stop_after_completes

        return await stream_once(
            self.session,
            self.endpoint,
            self.token,
            self.state,
            on_line=hook,
            timeout_s=timeout_s,
            **kw,
        )
