"""Error paths of ``bucketsync stack`` on throwaway state dirs (the shared stack is never touched)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bucketsync import stack
from bucketsync.config import ConfigError, Settings, load_settings
from bucketsync.errors import UserError
from bucketsync.stack import actions, binaries, maven, processes
from bucketsync.stack import redis as stack_redis
from bucketsync.stack.kafka import KAFKA
from bucketsync.stack.redis import REDIS
from pipeline.store import REDIS_ENCODING


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No BUCKETSYNC_* overrides: they could point a throwaway config at the real stack."""
    for name in list(os.environ):
        if name.startswith("BUCKETSYNC_"):
            monkeypatch.delenv(name)


@pytest.fixture
def throwaway(tmp_path: Path, clean_env: None) -> Callable[..., Settings]:
    """Settings with their own state dir and free ports."""

    def make(**stack_keys: Any) -> Settings:
        section = {
            "state_dir": "state",
            "kafka_port": _free_port(),
            "kafka_controller_port": _free_port(),
            "redis_port": _free_port(),
            "start_timeout_s": 5,
            **stack_keys,
        }
        cfg = tmp_path / "bucketsync.yaml"
        cfg.write_text(yaml.safe_dump({"stack": section}))
        return load_settings(cfg)

    return make


@pytest.fixture
def listening() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield int(s.getsockname()[1])


def _no_processes_started(settings: Settings) -> None:
    lay = stack.layout_for(settings)
    assert not lay.kafka_pid.exists()
    assert not lay.redis_pid.exists()


# --------------------------------------------------------------------------- preflight


@pytest.mark.parametrize("key", ["kafka_port", "kafka_controller_port", "redis_port"])
def test_port_in_use(throwaway: Callable[..., Settings], listening: int, key: str) -> None:
    settings = throwaway(**{key: listening})
    with pytest.raises(UserError) as err:
        stack.ensure_up(settings)
    msg = str(err.value)
    assert f"port {listening} is already in use by another process" in msg
    assert f"stack.{key}" in msg and f"BUCKETSYNC_STACK__{key.upper()}" in msg
    _no_processes_started(settings)


def test_port_bound_but_not_listening(throwaway: Callable[..., Settings]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
        settings = throwaway(kafka_port=port)
        with pytest.raises(UserError, match=f"port {port} is already in use"):
            stack.ensure_up(settings)


def test_same_kafka_ports(throwaway: Callable[..., Settings]) -> None:
    port = _free_port()
    settings = throwaway(kafka_port=port, kafka_controller_port=port)
    with pytest.raises(UserError, match="two different ports"):
        stack.ensure_up(settings)


def test_missing_java(throwaway: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(binaries, "find_java", lambda: None)
    settings = throwaway()
    with pytest.raises(UserError, match=r"java not found on PATH; Kafka needs Java 17\+") as err:
        stack.ensure_up(settings)
    assert "openjdk-17" in str(err.value)
    _no_processes_started(settings)


def test_java_not_runnable(
    throwaway: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(binaries, "find_java", lambda: "/nonexistent/bin/java")
    with pytest.raises(UserError, match="could not run /nonexistent/bin/java"):
        stack.ensure_up(throwaway())


def test_java_too_old(throwaway: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(binaries, "java_major", lambda java: 11)
    with pytest.raises(UserError, match=r"is Java 11, Kafka needs Java 17\+"):
        stack.ensure_up(throwaway())


@pytest.mark.parametrize(
    ("text", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15', 17),
        ('openjdk version "21" 2023-09-19', 21),
        ('java version "1.8.0_292"', 8),
        ('openjdk version "11.0.2" 2019-01-15', 11),
        ("garbage", None),
    ],
)
def test_parse_java_major(text: str, major: int | None) -> None:
    assert stack.parse_java_major(text) == major


def test_missing_redis_server(
    throwaway: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stack_redis, "_find_redis_server", lambda: None)
    monkeypatch.setattr(binaries, "apt_install", lambda package: False)
    settings = throwaway()
    with pytest.raises(UserError, match="redis-server not found on PATH") as err:
        stack.ensure_up(settings)
    assert "apt-get install -y redis-server" in str(err.value)
    _no_processes_started(settings)


def test_unknown_config_key(tmp_path: Path, clean_env: None) -> None:
    cfg = tmp_path / "bucketsync.yaml"
    cfg.write_text("stack:\n  kafka_prot: 9092\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'stack\.kafka_prot'"):
        load_settings(cfg)


def test_bad_heap(throwaway: Callable[..., Settings]) -> None:
    with pytest.raises(UserError, match=r"stack\.kafka_heap"):
        stack.ensure_up(throwaway(kafka_heap="lots"))


# --------------------------------------------------------------------------- maven


def _fake_mvn(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-mvn"
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


GOOD_MVN = """
    import sys, zipfile, pathlib
    out = pathlib.Path(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("-DoutputDirectory=")))
    out.mkdir(parents=True)
    pom = pathlib.Path(sys.argv[sys.argv.index("-f") + 1]).read_text()
    version = pom.split("<kafka.version>")[1].split("<")[0]
    with zipfile.ZipFile(out / f"kafka_2.13-{version}.jar", "w") as z:
        z.writestr("kafka/Kafka.class", b"")
        z.writestr("kafka/tools/StorageTool.class", b"")
    for name in ("kafka-server-1.jar", "log4j-core-2.jar", "log4j-slf4j-impl-2.jar", "slf4j-api-1.jar"):
        (out / name).write_bytes(b"")
"""

FAILING_MVN = """
    import sys
    print("[ERROR] Failed to execute goal on project kafka-broker-classpath: Could not resolve "
          "dependencies: Could not transfer artifact org.apache.kafka:kafka_2.13:pom:4.1.1 from/to "
          "central (https://repo.maven.apache.org/maven2): Unknown host repo.maven.apache.org")
    sys.exit(1)
"""


def test_maven_central_unreachable(throwaway: Callable[..., Settings], tmp_path: Path) -> None:
    settings = throwaway()
    with pytest.raises(UserError) as err:
        stack.ensure_libs(settings, mvn=_fake_mvn(tmp_path, FAILING_MVN))
    msg = str(err.value)
    assert msg.startswith("could not download Kafka jars from Maven Central: ")
    assert "Unknown host repo.maven.apache.org" in msg
    assert msg.endswith("check network/proxy or ~/.m2/settings.xml")
    assert not stack.layout_for(settings).libs.exists()


def test_missing_mvn(throwaway: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maven, "find_mvn", lambda: None)
    with pytest.raises(UserError, match=r"mvn \(Apache Maven\) not found on PATH"):
        stack.ensure_libs(throwaway())


def test_libs_cached_by_pom_stamp(throwaway: Callable[..., Settings], tmp_path: Path) -> None:
    settings = throwaway()
    good, bad = _fake_mvn(tmp_path, GOOD_MVN), str(tmp_path / "no-such-mvn")
    assert stack.ensure_libs(settings, mvn=good) is True
    lay = stack.layout_for(settings)
    assert (lay.libs / "kafka_2.13-4.1.1.jar").is_file()
    assert lay.libs_stamp.read_text().strip() == hashlib.sha256(lay.pom.read_bytes()).hexdigest()
    # second run: nothing to download, mvn is not even looked at
    assert stack.ensure_libs(settings, mvn=bad) is False
    # a different Kafka version changes the pom, so the jars are fetched again
    settings.stack.kafka_version = "4.1.2"
    assert stack.ensure_libs(settings, mvn=good) is True
    assert (lay.libs / "kafka_2.13-4.1.2.jar").is_file()
    assert not (lay.libs / "kafka_2.13-4.1.1.jar").exists()


def test_pom_pins_plugin_and_log4j() -> None:
    pom = stack.render_pom("4.1.1")
    assert "<kafka.version>4.1.1</kafka.version>" in pom
    assert "<log4j.version>2.24.3</log4j.version>" in pom
    assert "<version>3.8.1</version>" in pom and "maven-dependency-plugin" in pom
    assert "log4j-slf4j-impl" in pom
    assert stack.log4j_version_for("4.2.0") == "2.25.3"
    with pytest.raises(UserError):
        stack.render_pom("4.1.1</version><evil>")


# --------------------------------------------------------------------------- rendering


def test_server_properties(throwaway: Callable[..., Settings]) -> None:
    settings = throwaway(kafka_port=19092, kafka_controller_port=19093, kafka_heap="256m")
    props = dict(
        line.split("=", 1)
        for line in stack.render_server_properties(settings).splitlines()
        if line and not line.startswith("#")
    )
    data = stack.layout_for(settings).kafka_data
    assert props["log.dirs"] == str(data) and data.is_absolute()
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:19093"
    assert props["auto.create.topics.enable"] == "true"
    assert props["num.partitions"] == "1"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["log.cleaner.dedupe.buffer.size"] == "33554432"  # small heap


def test_redis_conf(throwaway: Callable[..., Settings]) -> None:
    settings = throwaway(redis_appendfsync="always")
    conf = stack.render_redis_conf(settings)
    assert "appendonly yes\n" in conf and "appendfsync always\n" in conf
    assert f"port {settings.stack.redis_port}\n" in conf and "bind 127.0.0.1\n" in conf
    assert f'dir "{stack.layout_for(settings).redis_dir}"' in conf
    for key, value in REDIS_ENCODING.items():  # the encodings the store is sized for
        assert f"\n{key} {value}\n" in conf
    # a replica syncs at once: Redis 7's default 5 s wait for more replicas was the whole
    # of the replica's readiness timeout, and test_redis_replica_component failed with it
    assert "\nrepl-diskless-sync-delay 0\n" in conf


def test_cluster_id() -> None:
    for _ in range(50):
        cid = stack.new_cluster_id()
        assert len(cid) == 22 and not cid.startswith("-")
        assert len(base64.urlsafe_b64decode(cid + "==")) == 16


@pytest.mark.parametrize(
    ("heap", "mib"), [("512m", 512), ("1g", 1024), ("1G", 1024), ("262144k", 256)]
)
def test_heap_mib(heap: str, mib: int) -> None:
    assert stack.heap_mib(heap) == mib


# --------------------------------------------------------------------------- down / status / readiness


def test_down_never_started_is_noop(throwaway: Callable[..., Settings]) -> None:
    settings = throwaway()
    assert stack.main(settings, "down", source="none", as_json=False) == 0
    stack.down(settings)
    assert not settings.state_dir.exists()


def test_status_never_started(
    throwaway: Callable[..., Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    settings = throwaway()
    assert stack.main(settings, "status", source="none", as_json=True) == 1
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["state"], r["pid"]) for r in rows] == [
        ("kafka", "stopped", None),
        ("redis", "stopped", None),
    ]
    assert rows[0]["address"] == f"127.0.0.1:{settings.stack.kafka_port}"
    assert rows[1]["address"] == f"redis://127.0.0.1:{settings.stack.redis_port}/0"


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_down_never_signals_foreign_process(
    throwaway: Callable[..., Settings], sleeper: subprocess.Popen[bytes]
) -> None:
    settings = throwaway()
    lay = stack.layout_for(settings)
    for pid_file in (lay.kafka_pid, lay.redis_pid):
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{sleeper.pid}\n")
    assert [r["state"] for r in stack.stack_status(settings)] == ["stopped", "stopped"]
    stack.down(settings)
    assert sleeper.poll() is None, "down signalled a process that is not ours"
    assert not lay.kafka_pid.exists() and not lay.redis_pid.exists()  # stale pid files removed


def test_start_failure_shows_log_tail(throwaway: Callable[..., Settings]) -> None:
    settings = throwaway()
    lay = stack.layout_for(settings)
    lay.kafka_dir.mkdir(parents=True)
    processes.spawn(
        ["sh", "-c", "echo 'Socket server failed to bind'; exit 3"],
        cwd=lay.kafka_dir, log=lay.kafka_log, pid_file=lay.kafka_pid,
    )  # fmt: skip
    with pytest.raises(UserError) as err:
        actions.wait_ready(settings, [KAFKA], {"kafka": 0.0})
    msg = str(err.value)
    assert "kafka: the process exited during start-up with exit code 3" in msg
    assert str(lay.kafka_log) in msg and "Socket server failed to bind" in msg


def test_start_timeout_names_log(throwaway: Callable[..., Settings]) -> None:
    settings = throwaway(start_timeout_s=0.5)
    lay = stack.layout_for(settings)
    lay.redis_dir.mkdir(parents=True)
    pid = processes.spawn(
        ["sh", "-c", "echo 'still loading'; exec sleep 60"],
        cwd=lay.redis_dir, log=lay.redis_log, pid_file=lay.redis_pid,
    )  # fmt: skip
    try:
        with pytest.raises(UserError) as err:
            actions.wait_ready(settings, [REDIS], {"redis": 0.0})
        msg = str(err.value)
        assert "redis did not answer at redis://127.0.0.1:" in msg
        assert str(lay.redis_log) in msg and "still loading" in msg
    finally:
        os.kill(pid, 9)
        processes.children.pop(pid).wait()


def test_redis_replica_component(throwaway: Callable[..., Settings]) -> None:
    """``stack.redis_replica_port`` adds a read-only replica of the stack's Redis: started
    after it (stage 1), ready once its link is up, holding what the primary writes."""
    import redis

    from bucketsync.stack.redis import REDIS_REPLICA

    assert REDIS_REPLICA not in actions.components_for("none", throwaway())
    settings = throwaway(redis_replica_port=_free_port())
    assert [c.name for c in actions.components_for("none", settings)] == [
        "kafka", "redis", "redis-replica",
    ]  # fmt: skip
    conf = stack_redis.render_replica_conf(settings)
    assert f"replicaof 127.0.0.1 {settings.stack.redis_port}\n" in conf
    assert "replica-read-only yes\n" in conf
    pids = []
    try:
        for comp in (REDIS, REDIS_REPLICA):
            plan = comp.preflight(settings)
            comp.prepare(settings, plan)
            launch, svc = comp.command(settings, plan), comp.service(settings)
            pids.append(
                processes.spawn(
                    launch.argv, cwd=launch.cwd, log=svc.log_file, pid_file=svc.pid_file
                )
            )
            actions.wait_ready(settings, [comp], {comp.name: 0.0})
        primary = redis.Redis(port=settings.stack.redis_port)
        replica = redis.Redis(port=settings.stack.redis_replica_port)
        primary.set("k", "v")
        primary.wait(1, 5000)
        assert replica.get("k") == b"v"
        with pytest.raises(redis.ReadOnlyError):
            replica.set("k", "w")
        assert REDIS_REPLICA.status(settings)[0]["state"] == "running"
    finally:
        for pid in pids:
            os.kill(pid, 9)
            processes.children.pop(pid).wait()


# --------------------------------------------------------------------------- package shape


def test_public_api_is_reexported() -> None:
    """What cli, demo, run, the benchmarks, scripts and tests import from ``bucketsync.stack``."""
    for name in (
        "ensure_up", "down", "reset", "stack_status", "main", "layout_for", "Layout",
        "kafka_address", "redis_url", "postgres_dsn", "connect_url", "psql", "psql_argv",
        "connector_config", "register_connector", "remove_connector", "delete_connector",
        "wait_connector_running", "connector_status", "slot_lag_bytes", "SourceUnavailable",
        "PG_SUPERUSER", "PG_DATABASE", "PG_PUBLICATION", "PG_CDC_USER", "DEBEZIUM_CLASS",
        "DEBEZIUM_VERSION", "SOURCES", "ensure_libs", "ensure_connect_libs",
    ):  # fmt: skip
        assert hasattr(stack, name), name
    assert set(stack.__all__) <= set(dir(stack))
    assert stack.SOURCES == ("none", "postgres")


def test_every_component_stops_and_resets(throwaway: Callable[..., Settings]) -> None:
    """``down``/``reset`` act on every component; Connect (a later stage) stops first."""
    settings = throwaway()
    names = [c.name for c in actions.ALL]
    assert names == ["kafka", "redis", "redis-replica", "postgres", "connect"]
    order = [[c.name for c in stage] for stage in reversed(actions._stages(actions.ALL))]
    assert order == [["redis-replica", "connect"], ["kafka", "redis", "postgres"]]
    assert all(comp.data(settings) for comp in actions.ALL)


def test_ports_collide_across_services(throwaway: Callable[..., Settings]) -> None:
    port = _free_port()
    settings = throwaway(redis_port=port, connect_port=port)
    with pytest.raises(UserError, match=r"stack\.connect_port .* collides .*stack\.redis_port"):
        stack.ensure_up(settings, source="postgres")
    _no_processes_started(settings)
