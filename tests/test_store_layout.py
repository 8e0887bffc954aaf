"""The store's key layout marker (``P:layout``): a processor never mixes two layouts under
one prefix. A store written by layout 1 (a hash per bucket, tagged PUTs; ops but no marker)
is refused with an error naming the prefix; the demo, whose store is a cache of its topics,
drops it and rebuilds."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis

from pipeline.store import (
    STORE_LAYOUT,
    PlannedBatch,
    Store,
    StoreLayoutMismatch,
    check_layout,
    drop_prefix,
)
from tests.processes import start_processor, write_config
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


def test_the_processor_refuses_an_old_store_with_a_clear_error(
    make_settings: Any, ns: Any, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    s = make_settings(sync_rules=str(rules), kafka={"topics": [ns.topic("todos")]})
    r = redis.Redis.from_url(s.redis.url)
    try:
        r.set(f"{ns.prefix}:seq", "7")
    finally:
        r.close()
    cfg = write_config(tmp_path, s, "p")
    proc = start_processor(cfg, "kafka", log=subprocess.PIPE)  # type: ignore[arg-type]
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    text = out.decode()
    assert "older bucketsync" in text and ns.prefix in text, text[-2000:]
    assert "Traceback" not in text, text[-2000:]
