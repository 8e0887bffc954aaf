"""``processor.batch_max_wait_ms: 0`` (the key allows it: "no waiting to fill a batch") on
both drivers: a few events, far fewer than ``batch_max_events``, are applied and end equal to
the model. faust reads ``take_events(within=0)`` as "no timeout" and held them until the
batch was full, i.e. never for a trickle (this test fails before for the faust driver); the
kafka driver quietly waited 50 ms instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis

from tests.pipeline_helpers import produce, write_rules
from tests.processes import (
    drop_prefix,
    end_offsets,
    start_processor,
    stop,
    wait_applied,
    write_config,
)
from tests.test_backlog import RULES, assert_matches_model, make_backlog

pytestmark = pytest.mark.stack


@pytest.mark.parametrize("driver", ["kafka", "faust"])
def test_no_batch_wait_applies_a_trickle(
    driver: str, make_settings: Any, create_topic: Any, ns: Any, tmp_path: Path
) -> None:
    topics = {"jobs": ns.topic("app.public.jobs")}
    for name in topics.values():
        create_topic(name)
    s = make_settings(
        kafka={"topics": list(topics.values())},
        sync_rules=write_rules(tmp_path, RULES),
        compaction={"interval_s": 0},
        processor={"metrics_port": 0, "batch_max_wait_ms": 0, "batch_max_events": 1000},
    )
    create_topic(s.kafka.dead_letter_topic)
    msgs, model = make_backlog(5, topics, 5)
    for t, name in topics.items():
        produce(s.kafka.bootstrap_servers, name, msgs[t])
    ends = end_offsets(s.kafka.bootstrap_servers, [(n, 1) for n in topics.values()])
    cfg = write_config(tmp_path, s, "proc")
    log = (tmp_path / "proc.log").open("ab")
    p = start_processor(cfg, driver, log)
    r = redis.Redis.from_url(s.redis.url)
    try:
        wait_applied(r, s.redis.prefix, ends, timeout=90, proc=p)
    except AssertionError:
        print((tmp_path / "proc.log").read_bytes()[-3000:].decode(errors="replace"))
        raise
    finally:
        stop(p)
        log.close()
    assert_matches_model(s, model)
    drop_prefix(r, s.redis.prefix)
