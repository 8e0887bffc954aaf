"""The gateway's per-stream log lines in a reconnect storm: "stream opened" lines are
budgeted per second (``gateway.stream_log_per_s``), the streams beyond the budget counted
in one summary line; aiohttp's access log leaves out started streams and keeps the rest."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import aiohttp
import pytest

from gateway import logutil
from gateway.logutil import LogBudget
from tests.gateway_helpers import Client, feed, running_gateway, todo

# ---- LogBudget (pure) ------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _summaries(caplog: pytest.LogCaptureFixture) -> list[int]:
    out = []
    for r in caplog.records:
        m = re.match(r"(\d+) more streams opened within a second", r.getMessage())
        if m:
            out.append(int(m.group(1)))
    return out


def test_budget_lets_per_s_through_and_counts_the_rest(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = _Clock()
    monkeypatch.setattr(logutil.time, "monotonic", clock)
    caplog.set_level(logging.INFO, logger="test.budget")
    b = LogBudget(logging.getLogger("test.budget"), 3, "streams opened", "gateway.x")
    assert [b.allow() for _ in range(10)] == [True] * 3 + [False] * 7
    assert _summaries(caplog) == []  # said when the second is over
    clock.now += 0.5
    assert not b.allow()
    clock.now += 0.6  # a new second: the 8 held back are said, 3 more may pass
    assert [b.allow() for _ in range(4)] == [True, True, True, False]
    assert _summaries(caplog) == [8]
    clock.now += 5
    b.flush()
    assert _summaries(caplog) == [8, 1]
    assert "gateway.x=3" in caplog.records[-1].getMessage()


def test_budget_none_is_unlimited_and_zero_only_counts(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = _Clock()
    monkeypatch.setattr(logutil.time, "monotonic", clock)
    caplog.set_level(logging.INFO, logger="test.budget")
    log = logging.getLogger("test.budget")
    assert all(LogBudget(log, None, "streams opened", "k").allow() for _ in range(1000))
    zero = LogBudget(log, 0, "streams opened", "k")
    assert not any(zero.allow() for _ in range(5))
    clock.now += 1
    assert not zero.allow()
    assert _summaries(caplog) == [5]


async def test_budget_summary_comes_without_a_later_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="test.budget")
    b = LogBudget(logging.getLogger("test.budget"), 1, "streams opened", "k")
    assert [b.allow() for _ in range(4)] == [True, False, False, False]
    for _ in range(40):  # the loop's timer says them at the end of the second
        if _summaries(caplog):
            break
        await asyncio.sleep(0.1)
    assert _summaries(caplog) == [3]


# ---- the gateway ---------------------------------------------------------------------------


async def test_storm_logs_within_budget_and_access_log_skips_started_streams(
    gw_settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    s = gw_settings(stream_log_per_s=2)
    n = 6
    await feed(s, [todo(f"t{i}", f"u{i}") for i in range(n)])
    caplog.set_level(logging.INFO)
    async with running_gateway(s) as url:
        clients = [Client(url, s, f"u{i}") for i in range(n)]
        for c in clients:
            await c.__aenter__()
        try:
            statuses = await asyncio.gather(*(c.sync_until() for c in clients))
            assert statuses == [200] * n
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    url + "/sync/stream", json={}, headers={"Authorization": "Token nope"}
                ) as r,
            ):
                assert r.status == 401
        finally:
            for c in clients:
                await c.__aexit__(None, None, None)
        for _ in range(40):  # the summary of the streams held back
            if _summaries(caplog):
                break
            await asyncio.sleep(0.1)
    messages = [r.getMessage() for r in caplog.records]
    opened = [m for m in messages if m.startswith("stream opened")]
    assert 1 <= len(opened) <= 2 * 2  # the storm may straddle two seconds
    assert len(opened) + sum(_summaries(caplog)) == n  # every stream: a line or counted
    access = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert not any('"POST /sync/stream' in m and '" 200 ' in m for m in access), access
    assert any('"POST /sync/stream' in m and '" 401 ' in m for m in access), access


async def test_every_stream_logged_without_a_budget(
    gw_settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    s = gw_settings(stream_log_per_s=None)
    n = 5
    await feed(s, [todo(f"t{i}", f"u{i}") for i in range(n)])
    caplog.set_level(logging.INFO)
    async with running_gateway(s) as url:
        for i in range(n):
            async with Client(url, s, f"u{i}") as c:
                assert await c.sync_until() == 200
    opened = [r for r in caplog.records if r.getMessage().startswith("stream opened")]
    assert len(opened) == n and _summaries(caplog) == []
