"""``bucketsync gateway --workers N`` as a real process: shared port, graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from bucketsync.simclient import ClientState, stream_once
from bucketsync.tokens import make_dev_token
from tests.gateway_helpers import feed, todo
from tests.processes import child_env, free_port, write_config
from tests.test_gateway_protocol import RULES

pytestmark = pytest.mark.stack


async def test_workers_share_the_port_and_streams_end_cleanly_on_sigterm(
    make_settings, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    port = free_port()
    s = make_settings(sync_rules=str(rules), gateway={"port": port})
    await feed(s, [todo("t1", "u1"), todo("t2", "u2")])
    cfg = write_config(tmp_path, s, "bucketsync")
    env = child_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bucketsync.cli", "--config", str(cfg), "gateway", "--workers", "2"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(url + "/probes/readiness") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
            # both workers up (each logs "gateway listening" once it has bound the port)
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            for _ in range(100):
                if len(children.read_text().split()) >= 2:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(2.0)
            states = [ClientState() for _ in range(6)]
            tokens = [make_dev_token(s, sub=f"u{1 + i % 2}") for i in range(6)]
            synced = [asyncio.Event() for _ in states]

            def hook_for(i: int):
                def hook(kind: str, st: ClientState) -> bool:
                    if kind == "checkpoint_complete":
                        synced[i].set()
                    return False

                return hook

            tasks = [
                asyncio.create_task(
                    stream_once(
                        session, url, tokens[i], states[i], on_line=hook_for(i), timeout_s=60
                    )
                )
                for i in range(len(states))
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in synced)), 30)
            assert all(st.mismatches == [] for st in states)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            statuses = await asyncio.wait_for(asyncio.gather(*tasks), 20)
            assert statuses == [200] * len(states)  # every stream ended, none hung
            assert time.monotonic() - t0 < 15
        assert proc.wait(20) == 0
        err = proc.stderr.read() if proc.stderr else ""
        pids = {
            line.split("(pid ")[1].split(")")[0]
            for line in err.splitlines()
            if "gateway listening" in line
        }
        assert len(pids) == 2, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
