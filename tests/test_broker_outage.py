"""The Kafka broker SIGKILLed in the middle of a backlog and restarted: the processor rides
it out (librdkafka reconnects; the gap guard re-reads anything in doubt) and every bucket
ends equal to the reference model, with events produced before, during the catch-up and
after the restart.

Runs on a private stack (its own state dir and free ports, started with the same
`bucketsync stack` code a user runs), never on the shared one."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from bucketsync import stack
from bucketsync.config import Settings, load_settings
from tests.pipeline_helpers import produce, write_rules
from tests.processes import (
    applied_offsets,
    end_offsets,
    free_port,
    start_processor,
    stop,
    wait_applied,
    write_config,
)
from tests.test_backlog import RULES, TABLES, assert_matches_model, make_backlog

pytestmark = pytest.mark.stack


@pytest.fixture
def private_stack(tmp_path: Path) -> Iterator[Settings]:
    """A second broker + Redis; the shared stack's jars are reused through Maven's cache."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("BUCKETSYNC_")}
    cfg = tmp_path / "bucketsync.yaml"
    section = {
        "state_dir": str(tmp_path / "state"),
        "kafka_port": free_port(),
        "kafka_controller_port": free_port(),
        "redis_port": free_port(),
        "kafka_heap": "384m",
        "start_timeout_s": 120,
    }
    cfg.write_text(yaml.safe_dump({"stack": section}))
    s = load_settings(cfg)
    try:
        stack.ensure_up(s)
        yield s
    finally:
        stack.down(s)
        os.environ.update(saved)


def test_broker_killed_mid_backlog_and_restarted(private_stack: Settings, tmp_path: Path) -> None:
    base = private_stack
    bootstrap = stack.kafka_address(base)
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    topics = {t: f"app.public.{t}" for t in TABLES}
    futs = admin.create_topics([NewTopic(topics[t], p, 1) for t, p in TABLES.items()])
    for f in futs.values():
        f.result(30)
    data = base.model_dump(mode="json", exclude={"config_dir"})
    data["kafka"].update(
        bootstrap_servers=bootstrap, topics=list(topics.values()), group_id="outage"
    )
    data["redis"].update(url=stack.redis_url(base), prefix="outage")
    data["sync_rules"] = write_rules(tmp_path, RULES)
    data["compaction"]["interval_s"] = 0
    data["processor"].update(metrics_port=0, batch_max_events=30)
    s = Settings(config_dir=tmp_path, **data)
    msgs, model = make_backlog(31, topics, 900)
    thirds = {
        t: (m[: len(m) // 3], m[len(m) // 3 : 2 * len(m) // 3], m[2 * len(m) // 3 :])
        for t, m in msgs.items()
    }
    for t, topic in topics.items():
        produce(bootstrap, topic, thirds[t][0])
    cfg = write_config(tmp_path, s, "proc")
    r = redis.Redis.from_url(s.redis.url)
    log = open(tmp_path / "processor.log", "wb")  # noqa: SIM115
    p = start_processor(cfg, "kafka", log)
    try:
        deadline = time.monotonic() + 90
        while sum(applied_offsets(r, "outage").values()) < 300:
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.02)
        for t, topic in topics.items():  # more arrives while the processor catches up
            produce(bootstrap, topic, thirds[t][1])
        pid = int(stack.layout_for(base).kafka_pid.read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        try:  # the broker may be this process's child (started by the fixture): reap it
            os.waitpid(pid, 0)
        except ChildProcessError:
            while Path(f"/proc/{pid}").exists():
                time.sleep(0.05)
        time.sleep(3.0)
        assert p.poll() is None, "the processor exited when the broker went away"
        stack.ensure_up(base)  # the same broker, restarted on its log dirs
        for t, topic in topics.items():
            produce(bootstrap, topic, thirds[t][2])
        ends = end_offsets(bootstrap, [(topics[t], n) for t, n in TABLES.items()])
        wait_applied(r, "outage", ends, timeout=180, proc=p)
    finally:
        stop(p)
        r.close()
        log.close()
    assert_matches_model(s, model)


class _Bootstrap:
    """A TCP relay to the shared broker on a port of its own, opened only on demand: the
    processor's bootstrap address answers nothing until :meth:`open` (the broker advertises
    its own address, so after bootstrapping the clients talk to it directly)."""

    def __init__(self, target: tuple[str, int]) -> None:
        import socket as socket_

        self.target = target
        self.port = free_port()
        self._socket = socket_
        self._server: Any = None

    def open(self) -> None:
        import threading

        srv = self._socket.create_server(("127.0.0.1", self.port))
        self._server = srv

        def pipe(a: Any, b: Any) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    with contextlib.suppress(OSError):
                        s.shutdown(self._socket.SHUT_RDWR)

        def serve() -> None:
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                up = self._socket.create_connection(self.target)
                threading.Thread(target=pipe, args=(conn, up), daemon=True).start()
                threading.Thread(target=pipe, args=(up, conn), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.mark.parametrize("driver", ["kafka", "faust"])
def test_processor_started_while_kafka_is_unreachable_waits_for_it(
    driver: str, make_settings: Any, create_topic: Any, ns: Any, tmp_path: Path
) -> None:
    """Kafka not reachable when the processor starts (started before the broker, or the
    network not up yet): the processor keeps trying instead of exiting, and once the broker
    answers it applies the whole backlog."""
    topics = {t: create_topic(ns.topic(f"app.public.{t}"), partitions=p) for t, p in TABLES.items()}
    s = make_settings(
        kafka={"topics": list(topics.values())},
        sync_rules=write_rules(tmp_path, RULES),
        compaction={"interval_s": 0},
        processor={"metrics_port": 0},
    )
    create_topic(s.kafka.dead_letter_topic)
    msgs, model = make_backlog(41, topics, 150)
    for t, name in topics.items():
        produce(s.kafka.bootstrap_servers, name, msgs[t])
    ends = end_offsets(s.kafka.bootstrap_servers, [(topics[t], p) for t, p in TABLES.items()])
    host, port = s.kafka.bootstrap_servers.split(",")[0].rsplit(":", 1)
    relay = _Bootstrap((host, int(port)))
    cfg = write_config(
        tmp_path,
        s,
        "proc",
        kafka={"bootstrap_servers": f"127.0.0.1:{relay.port}"},
        processor={"batch_max_events": 50},
    )
    log = (tmp_path / "proc.log").open("ab")
    p = start_processor(cfg, driver, log)
    try:
        time.sleep(10.0)  # Faust gives up on an unreachable bootstrap within a few seconds
        assert p.poll() is None, "the processor exited because Kafka was unreachable at start"
        relay.open()
        r = redis.Redis.from_url(s.redis.url)
        try:
            wait_applied(r, s.redis.prefix, ends, timeout=120, proc=p)
        except AssertionError:
            print((tmp_path / "proc.log").read_bytes()[-3000:].decode(errors="replace"))
            raise
    finally:
        stop(p)
        log.close()
        relay.close()
    assert_matches_model(s, model)
