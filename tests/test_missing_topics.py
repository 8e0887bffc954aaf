"""Processors started before their topics exist (a deployment that starts bucketsync before
the Debezium connector has created its topics): once the topics appear and carry events,
both drivers consume them, without a restart, and every bucket ends equal to the model."""

from __future__ import annotations

import time
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
def test_topics_created_after_the_processor_started_are_consumed(
    driver: str, make_settings: Any, create_topic: Any, ns: Any, tmp_path: Path
) -> None:
    tables = ["jobs", "notes"]
    topics = {t: ns.topic(f"app.public.{t}") for t in tables}
    for name in topics.values():
        ns.track(name)
    s = make_settings(
        kafka={"topics": list(topics.values())},
        sync_rules=write_rules(tmp_path, RULES),
        compaction={"interval_s": 0},
        processor={"metrics_port": 0},
    )
    create_topic(s.kafka.dead_letter_topic)
    cfg = write_config(tmp_path, s, "proc", processor={"batch_max_events": 50})
    log = (tmp_path / "proc.log").open("ab")
    p = start_processor(cfg, driver, log)
    try:
        time.sleep(8.0)  # the processor is up and subscribed to topics that do not exist
        assert p.poll() is None
        for name in topics.values():
            create_topic(name)  # one partition (a broker auto-creating them makes one too)
        msgs, model = make_backlog(31, topics, 200)
        for t, name in topics.items():
            produce(s.kafka.bootstrap_servers, name, msgs[t])
        ends = end_offsets(s.kafka.bootstrap_servers, [(n, 1) for n in topics.values()])
        assert len(ends) == len(topics)
        r = redis.Redis.from_url(s.redis.url)
        try:
            # a consumer that only learns of new topics at its 5-minute metadata refresh
            # (aiokafka's default) has applied nothing by then
            wait_applied(r, s.redis.prefix, ends, timeout=90, proc=p)
        except AssertionError:
            print((tmp_path / "proc.log").read_bytes()[-3000:].decode(errors="replace"))
            raise
    finally:
        stop(p)
        log.close()
    assert_matches_model(s, model)
    drop_prefix(redis.Redis.from_url(s.redis.url), s.redis.prefix)
