"""Sync Streams on the wire (sync-streams.md §1b), against the real Redis store and gateway:
default streams, explicit subscriptions with parameters and ``override_priority``, errors
for unknown streams and bad parameters (never a failed request), ``streams`` and bucket
``priority``/``subscriptions`` in the first checkpoint, data in priority order with
``partial_checkpoint_complete``.

Expected rows and buckets come from an independent model (dicts), not from the rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bucketsync.config import Settings
from bucketsync.simclient import ClientState
from bucketsync.tokens import make_dev_token
from tests.gateway_helpers import feed, running_gateway
from tests.pipeline_helpers import write_rules

pytestmark = pytest.mark.stack

RULES = """
config:
  edition: 3
with:
  my_lists: SELECT list_id FROM memberships WHERE user_id = auth.user_id()
streams:
  my_lists:
    auto_subscribe: true
    priority: 1
    query: SELECT * FROM lists WHERE id IN my_lists
  list_todos:
    query: |
      SELECT * FROM todos
      WHERE list_id = subscription.parameter('list_id') AND list_id IN my_lists
  notes:
    auto_subscribe: true
    query: SELECT * FROM notes WHERE owner_id = auth.user_id()
"""


def ev(table: str, row: dict[str, Any], action: str = "upsert") -> dict[str, Any]:
    return {
        "action": action,
        "table": f"app.public.{table}",
        "source_table": table,
        "source_schema": "public",
        "key": {"id": row["id"]},
        "row": row,
    }


class Model:
    def __init__(self) -> None:
        self.members: dict[str, tuple[str, str]] = {}
        self.lists: dict[str, dict[str, Any]] = {}
        self.todos: dict[str, dict[str, Any]] = {}
        self.notes: dict[str, dict[str, Any]] = {}

    def lists_of(self, user: str) -> set[str]:
        return {lst for u, lst in self.members.values() if u == user}

    def visible(
        self, user: str, defaults: bool, subscribed_lists: list[str]
    ) -> dict[str, dict[str, Any]]:
        mine = self.lists_of(user)
        out: dict[str, dict[str, Any]] = {}
        if defaults:
            out["lists"] = {k: v for k, v in self.lists.items() if k in mine}
            out["notes"] = {k: v for k, v in self.notes.items() if v["owner_id"] == user}
        todos = {
            k: v
            for k, v in self.todos.items()
            if v["list_id"] in mine and v["list_id"] in subscribed_lists
        }
        if todos:
            out["todos"] = todos
        return {k: v for k, v in out.items() if v}


async def seed(s: Settings) -> Model:
    m = Model()
    events = []
    for mid, user, lst in [("m1", "u1", "A"), ("m2", "u1", "B"), ("m3", "u2", "B")]:
        m.members[mid] = (user, lst)
        events.append(ev("memberships", {"id": mid, "user_id": user, "list_id": lst}))
    for lst in ("A", "B", "C"):
        m.lists[lst] = {"id": lst, "name": f"list {lst}"}
        events.append(ev("lists", m.lists[lst]))
    for i, lst in enumerate(["A", "A", "B", "C", "C"]):
        tid = f"t{i}"
        m.todos[tid] = {"id": tid, "list_id": lst, "title": f"todo {i}"}
        events.append(ev("todos", m.todos[tid]))
    for nid, owner in [("n1", "u1"), ("n2", "u2")]:
        m.notes[nid] = {"id": nid, "owner_id": owner, "text": "x"}
        events.append(ev("notes", m.notes[nid]))
    await feed(s, events)
    return m


async def sync(
    url: str, token: str, streams: dict[str, Any]
) -> tuple[int, list[dict[str, Any]], ClientState]:
    """One request up to the first checkpoint_complete; returns the lines and the client."""
    state = ClientState()
    body = state.request_body() | {"streams": streams}
    lines: list[dict[str, Any]] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url + "/sync/stream", json=body, headers={"Authorization": f"Token {token}"}
        ) as resp,
    ):
        if resp.status != 200:
            return resp.status, [await resp.json()], state
        async for raw in resp.content:
            if not raw.strip():
                continue
            state.apply_line(raw)
            line = orjson.loads(raw)
            lines.append(line)
            if "checkpoint_complete" in line:
                break
    return 200, lines, state


@pytest.fixture
def settings(make_settings, tmp_path: Path) -> Settings:
    return make_settings(sync_rules=write_rules(tmp_path, RULES), gateway={"keepalive_s": 20})


async def test_default_streams_only(settings: Settings) -> None:
    m = await seed(settings)
    async with running_gateway(settings) as url:
        status, lines, state = await sync(
            url, make_dev_token(settings, sub="u1"), {"include_defaults": True, "subscriptions": []}
        )
    assert status == 200
    cp = lines[0]["checkpoint"]
    assert cp["streams"] == [
        {"name": "my_lists", "is_default": True, "errors": []},
        {"name": "notes", "is_default": True, "errors": []},
    ]
    buckets = {b["bucket"]: b for b in cp["buckets"]}
    assert set(buckets) == {'1#my_lists|0["A"]', '1#my_lists|0["B"]', '1#notes|0["u1"]'}
    assert buckets['1#my_lists|0["A"]']["priority"] == 1
    assert buckets['1#my_lists|0["A"]']["subscriptions"] == [{"default": 0}]
    assert buckets['1#notes|0["u1"]']["priority"] == 3
    assert buckets['1#notes|0["u1"]']["subscriptions"] == [{"default": 1}]
    assert state.tables() == m.visible("u1", True, [])
    assert state.mismatches == [] and state.protocol_errors == []


async def test_subscriptions_with_parameters_priorities_and_errors(settings: Settings) -> None:
    m = await seed(settings)
    subs = [
        {"stream": "list_todos", "parameters": {"list_id": "A"}, "override_priority": 0},
        {"stream": "list_todos", "parameters": {"list_id": "C"}, "override_priority": None},
        {"stream": "nope", "parameters": None, "override_priority": None},
        {"stream": "list_todos", "parameters": "not an object", "override_priority": None},
        {"stream": "list_todos", "parameters": {"list_id": "B"}, "override_priority": None},
    ]
    async with running_gateway(settings) as url:
        status, lines, state = await sync(
            url,
            make_dev_token(settings, sub="u1"),
            {"include_defaults": True, "subscriptions": subs},
        )
    assert status == 200
    cp = lines[0]["checkpoint"]
    assert cp["streams"] == [
        {"name": "my_lists", "is_default": True, "errors": []},
        {
            "name": "list_todos",
            "is_default": False,
            "errors": [{"subscription": 3, "message": "subscription parameters must be an object"}],
        },
        {"name": "notes", "is_default": True, "errors": []},
        {
            "name": "nope",
            "is_default": False,
            "errors": [{"subscription": 2, "message": "unknown stream 'nope'"}],
        },
    ]
    buckets = {b["bucket"]: b for b in cp["buckets"]}
    # like the reference: one bucket per (subscribed list, list of the user); only equal
    # pairs can hold rows, so list C (u1 is no member) stays empty
    mine = sorted(m.lists_of("u1"))
    todo_buckets = {
        f'1#list_todos|0["{sub}","{lst}"]': (i, prio)
        for i, sub, prio in [(0, "A", 0), (1, "C", 3), (4, "B", 3)]
        for lst in mine
    }
    assert set(buckets) == {
        '1#my_lists|0["A"]',
        '1#my_lists|0["B"]',
        '1#notes|0["u1"]',
        *todo_buckets,
    }
    for b, (i, prio) in todo_buckets.items():
        assert buckets[b]["priority"] == prio
        assert buckets[b]["subscriptions"] == [{"sub": i}]
    assert state.tables() == m.visible("u1", True, ["A", "C", "B"])
    assert state.mismatches == [] and state.protocol_errors == []

    # priority order: 0, then 1, then 3, each lower level closed by a partial complete
    order: list[tuple[str, Any]] = []
    for line in lines[1:]:
        if "data" in line:
            order.append(("data", buckets[line["data"]["bucket"]]["priority"]))
        elif "partial_checkpoint_complete" in line:
            order.append(("partial", line["partial_checkpoint_complete"]["priority"]))
        elif "checkpoint_complete" in line:
            order.append(("complete", None))
    assert order == [
        ("data", 0),
        ("partial", 0),
        ("data", 1),
        ("data", 1),
        ("partial", 1),
        ("data", 3),
        ("data", 3),
        ("complete", None),
    ], order


async def test_without_defaults_only_explicit_subscriptions(settings: Settings) -> None:
    m = await seed(settings)
    async with running_gateway(settings) as url:
        status, lines, state = await sync(
            url,
            make_dev_token(settings, sub="u2"),
            {
                "include_defaults": False,
                "subscriptions": [
                    {
                        "stream": "list_todos",
                        "parameters": {"list_id": "B"},
                        "override_priority": None,
                    },
                    {"stream": "my_lists", "parameters": None, "override_priority": 2},
                ],
            },
        )
    assert status == 200
    cp = lines[0]["checkpoint"]
    assert cp["streams"] == [
        {"name": "my_lists", "is_default": True, "errors": []},
        {"name": "list_todos", "is_default": False, "errors": []},
    ]
    buckets = {b["bucket"]: b for b in cp["buckets"]}
    assert set(buckets) == {'1#list_todos|0["B","B"]', '1#my_lists|0["B"]'}  # u2: only in B
    assert buckets['1#my_lists|0["B"]']["priority"] == 2
    assert buckets['1#my_lists|0["B"]']["subscriptions"] == [{"sub": 1}]
    want = m.visible("u2", True, ["B"])
    want.pop("notes")
    assert state.tables() == want


async def test_membership_change_adds_the_subscribed_bucket(settings: Settings) -> None:
    """A stream subscription over a lookup gains its bucket when the membership appears."""
    await seed(settings)
    token = make_dev_token(settings, sub="u2")
    streams = {
        "include_defaults": False,
        "subscriptions": [
            {"stream": "list_todos", "parameters": {"list_id": "C"}, "override_priority": None}
        ],
    }
    async with running_gateway(settings) as url:
        _, lines, state = await sync(url, token, streams)
        # u2 is in list B only: an empty bucket, no rows
        assert [b["bucket"] for b in lines[0]["checkpoint"]["buckets"]] == [
            '1#list_todos|0["C","B"]'
        ]
        assert state.tables() == {}
        await feed(settings, [ev("memberships", {"id": "m9", "user_id": "u2", "list_id": "C"})])
        _, lines, state = await sync(url, token, streams)
    assert {b["bucket"] for b in lines[0]["checkpoint"]["buckets"]} == {
        '1#list_todos|0["C","B"]',
        '1#list_todos|0["C","C"]',
    }
    assert set(state.tables()["todos"]) == {"t3", "t4"}
