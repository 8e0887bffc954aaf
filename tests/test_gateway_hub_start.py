"""A stream that arrives while the hub has not read the change stream's tail yet (Redis or
the replica not ready when the gateway started; the hub retries with a backoff): found by
scripts/qa-streams.py (seed 619, --replica --redis-restart). The stream read its first
checkpoint from the store while changes applied after it reached no hub, so a bucket that
changed in between was moved to a later checkpoint without its ops, and the next change of
that bucket came with a checksum the client could not match. A stream now waits for the hub
to have started. Checked on the real gateway and the real Redis; the client's rows and
checksums are recomputed from the lines it got and compared with the rows fed."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from bucketsync.tokens import make_dev_token
from pipeline.store import Store
from tests.gateway_helpers import feed, running_app, todo
from tests.test_gateway_detach import Raw, _eventually

pytestmark = pytest.mark.stack

RULES = """
bucket_definitions:
  mine:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT * FROM todos WHERE owner_id = bucket.user_id
  done:
    data:
      - SELECT id FROM todos WHERE completed = 1
"""


def replay(lines: list[dict[str, Any]]) -> tuple[dict[str, set[str]], list[str]]:
    """Rows per bucket and the checksum failures, as a client computes them."""
    rows: dict[str, set[str]] = {}
    sums: dict[str, int] = {}
    target: dict[str, int] = {}
    bad: list[str] = []
    for line in lines:
        if "checkpoint" in line:
            target = {b["bucket"]: b["checksum"] for b in line["checkpoint"]["buckets"]}
        elif "checkpoint_diff" in line:
            for b in line["checkpoint_diff"]["updated_buckets"]:
                target[b["bucket"]] = b["checksum"]
        elif "data" in line:
            d = line["data"]
            got = rows.setdefault(d["bucket"], set())
            for op in d["data"]:
                sums[d["bucket"]] = (sums.get(d["bucket"], 0) + int(op["checksum"])) % 2**32
                if op["op"] == "PUT":
                    got.add(op["object_id"])
                elif op["op"] == "REMOVE":
                    got.discard(op["object_id"])
        elif "checkpoint_complete" in line:
            cp = line["checkpoint_complete"]["last_op_id"]
            bad += [f"{b} at {cp}" for b, cs in target.items() if sums.get(b, 0) != cs % 2**32]
    return rows, bad


async def test_a_stream_before_the_hub_started_misses_no_change(
    make_settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    s = make_settings(sync_rules=str(rules), gateway={"keepalive_s": 20})
    ready = False

    async def synced(self: Store) -> bool:  # the hub's start check: a replica still syncing
        return ready

    monkeypatch.setattr(Store, "reader_synced", synced)
    await feed(s, [todo("t1", "u1")])
    async with running_app(s) as (port, gw, _runner):
        c = await Raw.open(port, make_dev_token(s, sub="u1"))
        try:

            def arrived() -> bool:  # the first checkpoint, or the stream waits for the hub
                try:
                    return bool(c.sock.recv(1, socket.MSG_PEEK))
                except BlockingIOError:
                    return bool(gw.hub._cp_waiters)

            await _eventually(arrived)
            await feed(s, [todo("t2", "u1")])  # mine[u1] changes before the hub starts
            ready = True
            await _eventually(lambda: gw.hub.started)
            await feed(s, [todo("t3", "u9", done=1)])  # done[] only: mine[u1] moves along
            last = await feed(s, [todo("t4", "u1")])  # mine[u1] again
            await c.until(lambda r: {"checkpoint_complete": {"last_op_id": str(last)}} in r.lines())
            rows, bad = replay(c.lines())
            assert bad == []
            assert rows['mine["u1"]'] == {"t1", "t2", "t4"}
            assert rows.get("done[]", set()) == {"t3"}
        finally:
            c.close()
