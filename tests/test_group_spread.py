"""Two processors in one group over Debezium's usual topics (one partition per table): both
get partitions. librdkafka's default assignor (range, per topic) gave every single-partition
topic to the same member, so a second processor stood idle and added no throughput."""

from __future__ import annotations

import re
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


def test_two_kafka_processors_share_single_partition_topics(
    make_settings: Any, create_topic: Any, ns: Any, tmp_path: Path
) -> None:
    tables = ["jobs", "notes", "sites", "regions"]
    topics = {t: ns.topic(f"app.public.{t}") for t in tables}
    for name in topics.values():
        create_topic(name)  # one partition each
    s = make_settings(
        kafka={"topics": list(topics.values())},
        sync_rules=write_rules(tmp_path, RULES),
        compaction={"interval_s": 0},
        processor={"metrics_port": 0, "instance_id": ""},
    )
    create_topic(s.kafka.dead_letter_topic)
    msgs, model = make_backlog(41, topics, 150)
    for t, name in topics.items():
        produce(s.kafka.bootstrap_servers, name, msgs[t])
    ends = end_offsets(s.kafka.bootstrap_servers, [(n, 1) for n in topics.values()])
    cfg = write_config(tmp_path, s, "proc", processor={"batch_max_events": 20})
    logs = [tmp_path / f"proc{i}.log" for i in range(2)]
    files = [p.open("ab") for p in logs]
    procs = [start_processor(cfg, "kafka", f) for f in files]
    try:
        # both in the group before the first assignment settles: wait for a rebalance that
        # gives each member something, or fail after a while
        deadline = time.monotonic() + 60
        owned: list[set[str]] = [set(), set()]
        while time.monotonic() < deadline:
            for i, path in enumerate(logs):
                text = path.read_text(errors="replace")
                last = re.findall(r"assigned (.*)", text)
                parts = last[-1].split(", ") if last else []
                owned[i] = {x.split("@")[0] for x in parts if x.strip()}
            if all(owned) and not (owned[0] & owned[1]):
                break
            time.sleep(0.5)
        assert all(owned), f"a processor got no partition: {owned}"
        assert len(owned[0] | owned[1]) == len(topics)
        wait_applied(redis.Redis.from_url(s.redis.url), s.redis.prefix, ends, timeout=90)
    finally:
        for p in procs:
            stop(p)
        for f in files:
            f.close()
    assert_matches_model(s, model)
    drop_prefix(redis.Redis.from_url(s.redis.url), s.redis.prefix)
