"""The store's key layout marker (``P:layout``): a processor never mixes two layouts under
one prefix. A store written by layout 1 (a hash per bucket, tagged PUTs; ops but no marker)
is refused with an error naming the prefix; the demo, whose store is a cache of its topics,
drops it and rebuilds. A gateway never serves one (its streams would never complete a
checkpoint): it refuses to start on it, and one that started while Redis was down reports
not ready with the reason until the prefix is rebuilt."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from bucketsync.config import Settings
from bucketsync.run import child_argv
from pipeline.store import (
    STORE_LAYOUT,
    PlannedBatch,
    Store,
    StoreLayoutMismatch,
    check_layout,
    drop_prefix,
)
from tests.gateway_helpers import running_gateway
from tests.processes import free_port, start_processor, write_config
from tests.test_gateway_protocol import RULES

pytestmark = pytest.mark.stack


async def test_an_applied_batch_marks_the_layout(make_settings: Any, ns: Any) -> None:
    s = make_settings()
    check_layout(s.redis.url, ns.prefix)  # empty: fine
    store = Store.from_settings(s)
    try:
        b = PlannedBatch(guard={"x/0": 0}, offsets={"x/0": 0})
        assert (await store.apply(b)).status == "ok"
        assert await store.r.get(store.k("layout")) == STORE_LAYOUT.encode()
    finally:
        await store.close()
    check_layout(s.redis.url, ns.prefix)


def test_a_store_of_the_old_layout_is_refused_and_can_be_dropped(
    make_settings: Any, ns: Any
) -> None:
    s = make_settings()
    r = redis.Redis.from_url(s.redis.url)
    try:
        # what layout 1 left: ops, a state hash per bucket, no marker
        r.set(f"{ns.prefix}:seq", "12")
        r.hset(f"{ns.prefix}:bucket:global[]", mapping={"checksum": 5, "count": 2})
        with pytest.raises(StoreLayoutMismatch) as err:
            check_layout(s.redis.url, ns.prefix)
        assert err.value.found == "1" and repr(ns.prefix) in str(err.value)
        assert drop_prefix(s.redis.url, ns.prefix) == 2
        check_layout(s.redis.url, ns.prefix)
        for other in ("2", "4"):  # layout 2 (a hash per row) and a newer one are refused too
            r.set(f"{ns.prefix}:layout", other)
            with pytest.raises(StoreLayoutMismatch) as err:
                check_layout(s.redis.url, ns.prefix)
            assert err.value.found == other
    finally:
        r.close()


def _old_layout(url: str, prefix: str) -> None:
    """What layout 1 left: ops and a state hash per bucket, no marker."""
    r = redis.Redis.from_url(url)
    try:
        r.set(f"{prefix}:seq", "7")
        r.hset(f"{prefix}:bucket:global[]", mapping={"checksum": 5, "count": 2})
    finally:
        r.close()


def _settings(make_settings: Any, ns: Any, tmp_path: Path) -> Settings:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    s: Settings = make_settings(sync_rules=str(rules), kafka={"topics": [ns.topic("todos")]})
    return s


def _assert_refused(returncode: int | None, out: bytes, prefix: str) -> None:
    """Exited non-zero with one error naming the prefix, no traceback."""
    text = out.decode()
    assert returncode not in (0, None), text[-2000:]
    assert "older bucketsync" in text and prefix in text, text[-2000:]
    assert "Traceback" not in text, text[-2000:]


def test_the_processor_refuses_an_old_store_with_a_clear_error(
    make_settings: Any, ns: Any, tmp_path: Path
) -> None:
    s = _settings(make_settings, ns, tmp_path)
    _old_layout(s.redis.url, ns.prefix)
    proc = start_processor(write_config(tmp_path, s, "p"), "kafka", log=subprocess.PIPE)  # type: ignore[arg-type]
    out, _ = proc.communicate(timeout=60)
    _assert_refused(proc.returncode, out, ns.prefix)


def test_the_gateway_refuses_to_start_on_an_old_store(
    make_settings: Any, ns: Any, tmp_path: Path
) -> None:
    s = _settings(make_settings, ns, tmp_path)
    _old_layout(s.redis.url, ns.prefix)
    cfg = write_config(tmp_path, s, "g")
    argv = child_argv("gateway", str(cfg), "--port", str(free_port()))
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    _assert_refused(done.returncode, done.stdout, ns.prefix)


@pytest.mark.parametrize("command", ["verify", "compact"])
def test_verify_and_compact_refuse_an_old_store(
    make_settings: Any, ns: Any, tmp_path: Path, command: str
) -> None:
    """``bucketsync verify`` read an old store's checksums with this layout's keys and
    reported 0 differences; both maintenance commands now refuse it like the processor."""
    s = _settings(make_settings, ns, tmp_path)
    _old_layout(s.redis.url, ns.prefix)
    argv = child_argv(command, str(write_config(tmp_path, s, command)))
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    _assert_refused(done.returncode, done.stdout, ns.prefix)


async def test_a_gateway_on_an_old_store_is_not_ready_until_it_is_rebuilt(
    make_settings: Any, ns: Any, tmp_path: Path
) -> None:
    """The store turned out old after the gateway started (Redis was down at its start, or
    the prefix was restored from an old dump): readiness says why, 400, until the prefix is
    dropped; then ready, and the marker the first batch writes ends the checks."""
    s = _settings(make_settings, ns, tmp_path)
    async with running_gateway(s) as base, aiohttp.ClientSession() as http:

        async def ready() -> tuple[int, dict[str, Any]]:
            async with http.get(f"{base}/probes/readiness") as resp:
                return resp.status, await resp.json()

        assert (await ready())[0] == 200  # an empty prefix is fine
        _old_layout(s.redis.url, ns.prefix)
        status, body = await ready()
        assert status == 400 and body["ready"] is False, body
        assert "older bucketsync" in body["reason"] and repr(ns.prefix) in body["reason"]
        assert drop_prefix(s.redis.url, ns.prefix) == 2
        assert (await ready())[0] == 200
        store = Store.from_settings(s)
        try:
            b = PlannedBatch(guard={"x/0": 0}, offsets={"x/0": 0})
            assert (await store.apply(b)).status == "ok"
        finally:
            await store.close()
        assert (await ready())[0] == 200
