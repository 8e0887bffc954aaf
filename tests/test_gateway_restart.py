"""A gateway SIGKILLed with 1,000 clients connected and restarted: every client reconnects
with its ``after`` positions and downloads exactly what it lacked (the ops written while the
gateway was down, nothing twice), checksums hold, and each ends with its user's rows."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from bucketsync.run import child_argv
from bucketsync.simclient import ClientState, stream_once
from bucketsync.tokens import make_dev_token
from tests.gateway_helpers import feed, todo
from tests.processes import free_port
from tests.test_gateway_protocol import RULES

pytestmark = pytest.mark.stack

USERS = 100
CLIENTS_PER_USER = 10
ROWS_PER_USER = 5


async def _until_ready(session: aiohttp.ClientSession, url: str, proc: Any) -> None:
    for _ in range(300):
        assert proc.poll() is None, "gateway exited"
        try:
            async with session.get(url + "/probes/readiness") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("gateway never ready")


async def _sync_all(
    session: aiohttp.ClientSession, url: str, tokens: list[str], states: list[ClientState]
) -> list[asyncio.Task[int]]:
    """Open every stream; return once each has completed a checkpoint (streams stay open)."""
    done = [asyncio.Event() for _ in states]

    def hook_for(i: int) -> Any:
        def hook(kind: str, st: ClientState) -> bool:
            if kind == "checkpoint_complete":
                done[i].set()
            return False

        return hook

    tasks = [
        asyncio.create_task(
            stream_once(session, url, tokens[i], st, on_line=hook_for(i), client_id=f"c{i}")
        )
        for i, st in enumerate(states)
    ]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in done)), 120)
    return tasks


async def test_gateway_killed_with_1000_clients_they_resume_with_only_what_they_lacked(
    make_settings: Any, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    port = free_port()
    s = make_settings(
        sync_rules=str(rules),
        gateway={"port": port, "max_connections_per_user": CLIENTS_PER_USER},
    )
    rows = {f"t{u}-{k}": (f"u{u}", "v0") for u in range(USERS) for k in range(ROWS_PER_USER)}
    await feed(s, [todo(t, o, text) for t, (o, text) in rows.items()])
    cfg = tmp_path / "bucketsync.yaml"
    cfg.write_text(yaml.safe_dump(s.model_dump(mode="json", exclude={"config_dir"})))
    url = f"http://127.0.0.1:{port}"
    n = USERS * CLIENTS_PER_USER
    users = [f"u{i % USERS}" for i in range(n)]
    tokens = [make_dev_token(s, sub=u) for u in users]
    states = [ClientState() for _ in range(n)]
    conn = aiohttp.TCPConnector(limit=0)
    log = open(tmp_path / "gw.log", "ab")  # noqa: SIM115 - both gateway runs write to it
    gw = subprocess.Popen(child_argv("gateway", str(cfg)), stderr=log)
    try:
        async with aiohttp.ClientSession(connector=conn) as session:
            await _until_ready(session, url, gw)
            tasks = await _sync_all(session, url, tokens, states)
            first_ops = [st.ops for st in states]
            assert all(o == ROWS_PER_USER for o in first_ops)
            first_bytes = sum(st.bytes_received for st in states)

            gw.send_signal(signal.SIGKILL)
            gw.wait(10)
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
            # written while the gateway is down: one row of every other user changes
            changed = {f"u{u}" for u in range(0, USERS, 2)}
            for u in sorted(changed):
                rows[f"t{u[1:]}-0"] = (u, "v1")
            await feed(s, [todo(f"t{u[1:]}-0", u, "v1") for u in sorted(changed)])

            gw = subprocess.Popen(child_argv("gateway", str(cfg)), stderr=log)
            await _until_ready(session, url, gw)
            before = [(st.ops, st.bytes_received) for st in states]
            t0 = time.monotonic()
            tasks = await _sync_all(session, url, tokens, states)
            took = time.monotonic() - t0
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        if gw.poll() is None:
            gw.terminate()
            gw.wait(20)
        log.close()
    resumed_bytes = sum(st.bytes_received - b for st, (_o, b) in zip(states, before, strict=True))
    print(
        f"{n} clients: first sync {first_bytes} bytes, resume {resumed_bytes} bytes "
        f"({resumed_bytes / first_bytes:.2%}), all resumed in {took:.1f}s"
    )
    for i, st in enumerate(states):
        assert st.mismatches == [], st.mismatches
        lacked = 1 if users[i] in changed else 0
        assert st.ops - before[i][0] == lacked, (users[i], st.ops - before[i][0])
        want = {("todos", t): text for t, (o, text) in rows.items() if o == users[i]}
        got = {
            k: json.loads(v[1])["description"]
            for b in st.buckets.values()
            for k, v in b.rows.items()
        }
        assert got == want
    assert resumed_bytes < first_bytes / 2
