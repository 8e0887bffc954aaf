"""Data-dependent buckets end to end: membership rows on Kafka -> processor -> Redis lookup
index -> gateway -> an open sync stream that gains and loses buckets without reconnecting.

Expected rows come from an independent model (plain dicts of memberships and todos),
never from the rules engine under test. Also: the PSYNC_S2305 limits and the HTTP edge's
error boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bucketsync.config import Settings
from bucketsync.simclient import ClientState
from bucketsync.tokens import make_dev_token
from pipeline.membership import Membership
from pipeline.processor import BatchApplier, DeadLetterSink, KafkaLoopDriver, load_sync_rules
from pipeline.store import Store
from tests.gateway_helpers import feed, running_gateway
from tests.pipeline_helpers import debezium_json, produce, write_rules

pytestmark = pytest.mark.stack

RULES = """
bucket_definitions:
  lists:
    parameters: SELECT list_id FROM memberships WHERE user_id = request.user_id()
    data:
      - SELECT * FROM todos WHERE list_id = bucket.list_id
  mine:
    parameters: SELECT request.user_id() AS uid
    data:
      - SELECT * FROM notes WHERE owner_id = bucket.uid
"""


# --------------------------------------------------------------------------- the model


class Model:
    """What each user may see, by hand: todos of the lists the user is a member of."""

    def __init__(self) -> None:
        self.members: dict[str, tuple[str, str]] = {}
        self.todos: dict[str, dict[str, Any]] = {}

    def lists_of(self, user: str) -> set[str]:
        return {lst for u, lst in self.members.values() if u == user}

    def rows(self, user: str) -> dict[str, dict[str, Any]]:
        mine = self.lists_of(user)
        return {t: r for t, r in self.todos.items() if r["list_id"] in mine}

    def buckets(self, user: str) -> set[str]:
        return {f'lists["{lst}"]' for lst in self.lists_of(user)} | {f'mine["{user}"]'}


def member_msg(mid: str, user: str, lst: str, op: str = "c") -> tuple[bytes, bytes | None]:
    after = None if op == "d" else {"id": mid, "user_id": user, "list_id": lst}
    return debezium_json("memberships", op, {"id": mid}, after)


def todo_msg(tid: str, lst: str, title: str) -> tuple[bytes, bytes | None]:
    return debezium_json("todos", "c", {"id": tid}, {"id": tid, "list_id": lst, "title": title})


def member_ev(mid: str, user: str, lst: str) -> dict[str, Any]:
    return {
        "action": "upsert",
        "table": "app.public.memberships",
        "source_table": "memberships",
        "key": {"id": mid},
        "row": {"id": mid, "user_id": user, "list_id": lst},
    }


def unmember_ev(mid: str) -> dict[str, Any]:
    return {
        "action": "delete",
        "table": "app.public.memberships",
        "source_table": "memberships",
        "key": {"id": mid},
    }


def todo_ev(tid: str, lst: str, title: str = "x") -> dict[str, Any]:
    return {
        "action": "upsert",
        "table": "app.public.todos",
        "source_table": "todos",
        "key": {"id": tid},
        "row": {"id": tid, "list_id": lst, "title": title},
    }


@asynccontextmanager
async def running_processor(settings: Settings) -> AsyncIterator[None]:
    """The real processor (Kafka loop driver) in the background."""
    store = Store.from_settings(settings)
    driver = KafkaLoopDriver(
        settings,
        BatchApplier(
            settings, store, load_sync_rules(settings), dead_letters=DeadLetterSink(settings)
        ),
        Membership(None),
    )
    task = asyncio.create_task(driver.run())
    try:
        yield
    finally:
        driver.stop()
        await asyncio.wait_for(task, 30)
        await store.close()


class Recorder:
    """One sync stream, read line by line into the protocol simulator; a scenario runs a
    step at each completed checkpoint."""

    def __init__(self, url: str, token: str):
        self.url, self.token = url, token
        self.state = ClientState()
        self.lines: list[dict[str, Any]] = []
        self.completes: list[tuple[float, dict[str, Any], set[str]]] = []
        self.requests = 0
        self.status = 0
        self.completed = asyncio.Event()

    def visible(self) -> dict[str, Any]:
        return self.state.tables().get("todos", {})

    async def run(self, timeout_s: float = 60) -> None:
        self.requests += 1
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                self.url + "/sync/stream",
                json=self.state.request_body(),
                headers={"Authorization": f"Token {self.token}"},
            ) as r,
        ):
            self.status = r.status
            if r.status != 200:
                self.lines.append(orjson.loads(await r.read()))
                return
            async with asyncio.timeout(timeout_s):
                async for raw in r.content:
                    if not raw.strip():
                        continue
                    self.lines.append(orjson.loads(raw))
                    kind = self.state.apply_line(raw)
                    if kind == "checkpoint_complete":
                        self.completes.append(
                            (time.monotonic(), dict(self.visible()), set(self.state.buckets))
                        )
                        self.completed.set()

    async def until(self, pred: Any, timeout_s: float = 20) -> tuple[float, dict, set[str]]:
        """The first completed checkpoint (from now on) satisfying ``pred(rows, buckets)``."""
        start = len(self.completes)
        deadline = time.monotonic() + timeout_s
        while True:
            for c in self.completes[start:]:
                if pred(c[1], c[2]):
                    return c
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no such checkpoint; last: {self.completes[-1:]} lines: {self.lines[-5:]}"
                )
            self.completed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.completed.wait(), left)


def diffs_since(rec: Recorder, i: int) -> list[dict[str, Any]]:
    return [line["checkpoint_diff"] for line in rec.lines[i:] if "checkpoint_diff" in line]


# --------------------------------------------------------------------------- Kafka end to end


async def test_member_added_while_connected_gets_the_list_and_loses_it_when_removed(
    make_settings, create_topic, ns, tmp_path: Path
) -> None:
    mt = create_topic(ns.topic("app.public.memberships"))
    tt = create_topic(ns.topic("app.public.todos"))
    s = make_settings(
        kafka={"topics": [mt, tt]},
        sync_rules=write_rules(tmp_path, RULES),
        processor={"batch_max_events": 50, "batch_max_wait_ms": 10},
        compaction={"interval_s": 0},
        gateway={"keepalive_s": 20},
    )
    boot = s.kafka.bootstrap_servers
    m = Model()

    def todo(tid: str, lst: str, title: str) -> tuple[bytes, bytes | None]:
        m.todos[tid] = {"id": tid, "list_id": lst, "title": title}
        return todo_msg(tid, lst, title)

    def join(mid: str, user: str, lst: str) -> tuple[bytes, bytes | None]:
        m.members[mid] = (user, lst)
        return member_msg(mid, user, lst)

    def leave(mid: str) -> list[tuple[bytes, bytes | None]]:
        user, lst = m.members.pop(mid)
        return [
            member_msg(mid, user, lst, "d"),
            debezium_json("memberships", "tombstone", {"id": mid}, None),
        ]

    produce(boot, tt, [todo("a1", "A", "a one"), todo("a2", "A", "a two")])
    produce(boot, tt, [todo(f"s{i}", "shared", f"shared {i}") for i in range(3)])
    produce(boot, tt, [todo("c1", "C", "other list")])
    produce(boot, mt, [join("m1", "u1", "A"), join("m2", "u2", "shared")])

    async with running_processor(s), running_gateway(s) as url:
        rec = Recorder(url, make_dev_token(s, sub="u1"))
        reader = asyncio.create_task(rec.run())
        try:
            _, rows, buckets = await rec.until(lambda r, b: set(r) == set(m.rows("u1")))
            assert rows == m.rows("u1") and buckets == m.buckets("u1")

            # u1 joins the shared list: one diff adds the bucket, its rows come with it
            mark = len(rec.lines)
            t0 = time.monotonic()
            produce(boot, mt, [join("m3", "u1", "shared")])
            t_add, rows, buckets = await rec.until(lambda r, b: 'lists["shared"]' in b)
            assert rows == m.rows("u1") and buckets == m.buckets("u1")
            (diff,) = diffs_since(rec, mark)
            assert [b["bucket"] for b in diff["updated_buckets"]] == ['lists["shared"]']
            assert diff["updated_buckets"][0]["count"] == 3 and diff["removed_buckets"] == []
            # downloaded from the start, in the checkpoint that added the bucket
            first_data = next(line["data"] for line in rec.lines[mark:] if "data" in line)
            assert first_data["bucket"] == 'lists["shared"]' and first_data["after"] == "0"
            kinds = [next(iter(line)) for line in rec.lines[mark:]]
            assert kinds[0] == "checkpoint_diff" and kinds[-1] == "checkpoint_complete"
            assert kinds.count("checkpoint_complete") == 1  # never a partial list

            # a new row in the shared list reaches u1 like any data change
            produce(boot, tt, [todo("s9", "shared", "late")])
            await rec.until(lambda r, b: "s9" in r)

            # u1 leaves: the bucket is removed, its rows vanish, other rows stay
            mark = len(rec.lines)
            produce(boot, mt, leave("m3"))
            _, rows, buckets = await rec.until(lambda r, b: 'lists["shared"]' not in b)
            assert rows == m.rows("u1") and buckets == m.buckets("u1")
            (diff,) = diffs_since(rec, mark)
            assert diff["removed_buckets"] == ['lists["shared"]']
            assert diff["updated_buckets"] == []

            # u2's membership changes never reach u1's stream
            mark = len(rec.lines)
            produce(boot, mt, [join("m4", "u2", "C")])
            produce(boot, mt, [join("m5", "u1", "C")])
            _, rows, _ = await rec.until(lambda r, b: "c1" in r)
            assert rows == m.rows("u1")
            assert len(diffs_since(rec, mark)) == 1
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        assert rec.requests == 1 and rec.status == 200
        assert [next(iter(line)) for line in rec.lines].count("checkpoint") == 1
        assert rec.state.mismatches == [] and rec.state.protocol_errors == []
        print(f"membership add -> checkpoint_complete: {(t_add - t0) * 1000:.0f} ms")


# --------------------------------------------------------------------------- store-fed


@pytest.fixture
def gw(make_settings, tmp_path: Path):
    rules = write_rules(tmp_path, RULES)

    def make(**gateway: Any) -> Settings:
        return make_settings(sync_rules=rules, gateway={"keepalive_s": 20, **gateway})

    return make


async def test_membership_and_new_rows_in_one_batch_arrive_in_one_checkpoint(gw) -> None:
    s = gw()
    await feed(s, [member_ev("m1", "u1", "A"), todo_ev("a1", "A")])
    async with running_gateway(s) as url:
        rec = Recorder(url, make_dev_token(s, sub="u1"))
        reader = asyncio.create_task(rec.run())
        try:
            await rec.until(lambda r, b: "a1" in r)
            mark = len(rec.lines)
            cp = await feed(
                s, [member_ev("m2", "u1", "B"), *(todo_ev(f"b{i}", "B") for i in range(4))]
            )
            _, rows, buckets = await rec.until(lambda r, b: 'lists["B"]' in b)
            assert set(rows) == {"a1", "b0", "b1", "b2", "b3"}
            (diff,) = diffs_since(rec, mark)
            assert diff["last_op_id"] == str(cp)
            assert diff["updated_buckets"][0]["count"] == 4
            kinds = [next(iter(line)) for line in rec.lines[mark:]]
            assert kinds == ["checkpoint_diff", "data", "checkpoint_complete"]
            # a membership for a list with no rows yet: an empty bucket, same checkpoint
            mark = len(rec.lines)
            await feed(s, [member_ev("m3", "u1", "E")])
            _, _, buckets = await rec.until(lambda r, b: 'lists["E"]' in b)
            (diff,) = diffs_since(rec, mark)
            assert diff["updated_buckets"][0] | {"checksum": 0} == {
                "bucket": 'lists["E"]',
                "checksum": 0,
                "count": 0,
                "priority": 3,
                "subscriptions": [{"default": 0}],
            }
            # leaving two lists in one batch: one diff removes both
            mark = len(rec.lines)
            await feed(s, [unmember_ev("m2"), unmember_ev("m3")])
            _, rows, buckets = await rec.until(lambda r, b: 'lists["B"]' not in b)
            assert set(rows) == {"a1"} and buckets == {'lists["A"]', 'mine["u1"]'}
            (diff,) = diffs_since(rec, mark)
            assert sorted(diff["removed_buckets"]) == ['lists["B"]', 'lists["E"]']
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        assert rec.state.mismatches == [] and rec.state.protocol_errors == []


async def test_rejoining_downloads_the_list_again_from_the_start(gw) -> None:
    s = gw()
    await feed(s, [member_ev("m1", "u1", "A"), todo_ev("a1", "A"), todo_ev("a2", "A")])
    async with running_gateway(s) as url:
        rec = Recorder(url, make_dev_token(s, sub="u1"))
        reader = asyncio.create_task(rec.run())
        try:
            await rec.until(lambda r, b: set(r) == {"a1", "a2"})
            await feed(s, [unmember_ev("m1")])
            await rec.until(lambda r, b: not r)
            mark = len(rec.lines)
            await feed(s, [member_ev("m1", "u1", "A")])
            _, rows, _ = await rec.until(lambda r, b: bool(r))
            assert set(rows) == {"a1", "a2"}
            datas = [line["data"] for line in rec.lines[mark:] if "data" in line]
            assert datas[0]["after"] == "0" and sum(len(d["data"]) for d in datas) == 2
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        assert rec.state.mismatches == [] and rec.state.protocol_errors == []


# --------------------------------------------------------------------------- limits


async def post_stream(url: str, token: str) -> tuple[int, str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url + "/sync/stream", json={}, headers={"Authorization": f"Token {token}"}
        ) as r,
    ):
        if r.status == 200:
            return r.status, r.headers["Content-Type"], None
        return r.status, r.headers["Content-Type"], orjson.loads(await r.read())


async def test_too_many_buckets_at_connect_and_while_connected(gw, caplog) -> None:
    s = gw(max_buckets_per_connection=3)
    await feed(s, [member_ev("m1", "u1", "A"), member_ev("m2", "u1", "B"), todo_ev("a1", "A")])
    async with running_gateway(s) as url:
        token = make_dev_token(s, sub="u1")
        rec = Recorder(url, token)
        reader = asyncio.create_task(rec.run())
        await rec.until(lambda r, b: "a1" in r)
        # a third list makes 4 buckets: the open stream ends (the status is already sent)
        with caplog.at_level(logging.INFO, logger="bucketsync.gateway"):
            await feed(s, [member_ev("m3", "u1", "C")])
            await asyncio.wait_for(asyncio.gather(reader, return_exceptions=True), 10)
        assert not any('lists["C"]' in orjson.dumps(line).decode() for line in rec.lines)
        ended = [r for r in caplog.records if "PSYNC_S2305" in r.getMessage()]
        assert len(ended) == 1 and "too many buckets: 4 > 3" in ended[0].getMessage()
        # the client reconnects and gets the protocol's error response
        status, ctype, body = await post_stream(url, token)
        assert (status, ctype) == (400, "application/json")
        assert body["error"]["code"] == "PSYNC_S2305"
        assert "max_buckets_per_connection" in body["error"]["description"]


async def test_too_many_parameter_results(gw) -> None:
    s = gw(max_parameter_query_results=2)
    await feed(s, [member_ev(f"m{i}", "u1", f"L{i}") for i in range(3)])
    async with running_gateway(s) as url:
        status, ctype, body = await post_stream(url, make_dev_token(s, sub="u1"))
        assert (status, ctype) == (400, "application/json")
        assert body["error"]["code"] == "PSYNC_S2305"
        assert "parameter query results: 3 > 2" in body["error"]["description"]
        # another user with fewer memberships is unaffected
        status, _, _ = await post_stream(url, make_dev_token(s, sub="u2"))
        assert status == 200


# --------------------------------------------------------------------------- error boundary


async def test_any_failure_in_a_request_is_a_psync_json_error_and_one_log_line(
    gw, caplog, monkeypatch
) -> None:
    from gateway.buckets import BucketResolver

    s = gw()

    async def broken(self: Any, store: Any, on_buckets: Any = None, **kw: Any) -> Any:
        raise RuntimeError("kaboom")

    async with running_gateway(s) as url:
        token = make_dev_token(s, sub="u1")
        monkeypatch.setattr(BucketResolver, "resolve", broken)
        with caplog.at_level(logging.INFO):
            status, ctype, body = await post_stream(url, token)
        assert (status, ctype) == (500, "application/json")
        assert body["error"]["code"] == "PSYNC_S2001"
        assert body["error"]["name"] == "InternalServerError"
        assert body["error"]["status"] == 500 and "kaboom" in body["error"]["description"]
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "kaboom" in errors[0].getMessage()
        assert errors[0].name == "bucketsync.gateway"

        # an aiohttp HTTP error (body too large) gets the same shape
        async with aiohttp.ClientSession() as session:
            big = b"{" + b" " * 2_000_000 + b"}"
            async with session.post(
                url + "/sync/stream",
                data=big,
                headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
            ) as r:
                assert r.status == 413 and r.headers["Content-Type"] == "application/json"
                assert (await r.json())["error"]["code"] == "PSYNC_S2001"


async def test_a_failure_after_the_stream_started_ends_it_with_one_log_line(
    gw, caplog, monkeypatch
) -> None:
    from gateway.stream import SyncStream

    s = gw()
    await feed(s, [member_ev("m1", "u1", "A"), todo_ev("a1", "A")])

    async def broken(self: Any, states: Any) -> None:
        raise RuntimeError("mid-stream kaboom")

    monkeypatch.setattr(SyncStream, "_serve", broken)
    async with running_gateway(s) as url:
        with caplog.at_level(logging.INFO):
            rec = Recorder(url, make_dev_token(s, sub="u1"))
            await asyncio.wait_for(asyncio.gather(rec.run(), return_exceptions=True), 10)
        assert rec.status == 200
        # queued lines may or may not have left; the stream never completed
        assert "checkpoint_complete" not in [next(iter(line)) for line in rec.lines]
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "PSYNC_S2001" in errors[0].getMessage()
        assert "mid-stream kaboom" in errors[0].getMessage()
