"""The benchmarks' raw-connection clients (``bucketsync.simclient.RawStream`` and
``bucketsync.bench.clients.ClientPool``) against the real gateway and Redis: what each
client holds and downloads is compared with a model of the rows fed to the store."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from bucketsync.bench.clients import ClientPool
from bucketsync.simclient import ClientState, raw_stream_once
from bucketsync.tokens import make_dev_token
from tests.gateway_helpers import feed, running_gateway, todo

pytestmark = pytest.mark.stack

RULES = """
bucket_definitions:
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT * FROM todos WHERE owner_id = bucket.user_id
"""


@pytest.fixture
def settings(make_settings: Any, tmp_path: Path) -> Any:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    return make_settings(sync_rules=str(rules), gateway={"keepalive_s": 20})


def _rows(state: ClientState) -> dict[str, str]:
    return {k: v["description"] for k, v in state.tables().get("todos", {}).items()}


def _complete_once(kind: str, st: ClientState) -> bool:
    return kind == "checkpoint_complete"


async def test_raw_stream_syncs_resumes_and_reads_errors(settings: Any) -> None:
    model = {f"t{i}": f"v{i}" for i in range(5)}
    await feed(settings, [todo(k, "u1", v) for k, v in model.items()] + [todo("x", "u2")])
    async with running_gateway(settings) as url:
        u = urlsplit(url)
        assert u.hostname is not None and u.port is not None
        host, port = u.hostname, u.port
        token = make_dev_token(settings, sub="u1", ttl_s=600)
        st = ClientState()
        assert await raw_stream_once(host, port, token, st, on_line=_complete_once) == 200
        assert _rows(st) == model and st.ops == 5 and st.completed == 1
        # resume with the positions: nothing again; then exactly the one change
        assert await raw_stream_once(host, port, token, st, on_line=_complete_once) == 200
        assert st.ops == 5 and st.completed == 2
        await feed(settings, [todo("t0", "u1", "changed")])
        model["t0"] = "changed"
        assert await raw_stream_once(host, port, token, st, on_line=_complete_once) == 200
        assert _rows(st) == model and st.ops == 6
        assert st.mismatches == [] and st.protocol_errors == []
        bad = ClientState()
        assert await raw_stream_once(host, port, "not-a-token", bad, timeout_s=10) == 401
        assert bad.lines == 0


async def test_client_pool_reconnects_with_positions(settings: Any) -> None:
    """Three client processes; a client with a bad token keeps failing (401) without
    holding up the others (each ``open`` waits its timeout for it)."""
    procs = 3
    users = [f"u{i}" for i in range(10)]
    model = {(u, k): "v0" for u in users for k in range(3)}
    await feed(settings, [todo(f"{u}-{k}", u, v) for (u, k), v in model.items()])
    tokens = [make_dev_token(settings, sub=u, ttl_s=600) for u in users] + ["not-a-token"]
    loop = asyncio.get_running_loop()
    async with running_gateway(settings) as url:
        # the pool's calls block on its pipes: from a thread, so the gateway keeps serving
        pool = await loop.run_in_executor(None, lambda: ClientPool(url, tokens, procs=procs))
        try:

            def call(cmd: str, **kw: Any) -> Any:
                return loop.run_in_executor(None, lambda: pool.call(cmd, **kw))

            first = await call("open", concurrency=4, timeout=5.0, t0=None)
            assert first["resumed"] == len(users) and first["not_resumed"] == 1
            assert first["ops"] == [3] * len(users) + [0]
            assert [p["clients"] for p in first["per_process"]] == [
                len(range(k, len(tokens), procs)) for k in range(procs)
            ]
            await call("close")
            changed = users[::3]
            await feed(settings, [todo(f"{u}-1", u, "v1") for u in changed])
            for u in changed:
                model[(u, 1)] = "v1"
            storm = await call("open", concurrency=0, timeout=5.0, t0=None)
            assert storm["resumed"] == len(users)
            assert storm["ops"] == [int(u in changed) for u in users] + [0]
            tables = await call("tables")
            for u, t in zip(users, tables, strict=False):
                want = {f"{u}-{k}": model[(u, k)] for k in range(3)}
                assert {k: v["description"] for k, v in t["todos"].items()} == want
            got = await call("collect")
            assert got["mismatches"] == got["protocol_errors"] == 0
            assert got["http_errors"].get("401", 0) >= 2  # the bad token, in both opens
            assert got["completed"] == 2 * len(users)
        finally:
            await loop.run_in_executor(None, pool.quit)
