"""``bucketsync stack … --source postgres`` without starting anything: templates, the connector
file, preflight errors, status/down on throwaway state dirs (the shared stack is never touched).
The live path (PostgreSQL + Connect + Debezium) is exercised by tests/e2e/test_postgres_e2e.py."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bucketsync import stack
from bucketsync.config import Settings, load_settings
from bucketsync.errors import UserError
from bucketsync.stack import binaries, connect, connector, postgres


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def throwaway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Settings]:
    """Settings with their own state dir and free ports (no BUCKETSYNC_* overrides)."""
    for name in list(os.environ):
        if name.startswith("BUCKETSYNC_"):
            monkeypatch.delenv(name)

    def make(**stack_keys: Any) -> Settings:
        section = {
            "state_dir": "state",
            "kafka_port": _free_port(),
            "kafka_controller_port": _free_port(),
            "redis_port": _free_port(),
            "postgres_port": _free_port(),
            "connect_port": _free_port(),
            "start_timeout_s": 5,
            **stack_keys,
        }
        cfg = tmp_path / "bucketsync.yaml"
        cfg.write_text(yaml.safe_dump({"stack": section}))
        return load_settings(cfg)

    return make


def _java_17(monkeypatch: pytest.MonkeyPatch) -> None:
    """Preflight finds a Java 17 whatever this machine has."""
    monkeypatch.setattr(binaries, "find_java", lambda: "/usr/bin/java")
    monkeypatch.setattr(binaries, "java_major", lambda java: 17)


def _nothing_started(settings: Settings) -> None:
    lay = stack.layout_for(settings)
    for pid_file in (lay.kafka_pid, lay.redis_pid, lay.pg_pid, lay.connect_pid):
        assert not pid_file.exists(), pid_file


# --------------------------------------------------------------------------- templates


@pytest.mark.parametrize(
    "render", [lambda: stack.render_connect_pom("4.1.1"), lambda: stack.render_debezium_pom()]
)
def test_poms_are_well_formed(render: Callable[[], str]) -> None:
    text = render()
    assert not [
        tok for tok in ("@KAFKA_VERSION@", "@LOG4J_VERSION@", "@DEBEZIUM_VERSION@") if tok in text
    ]
    root = ET.fromstring(text)  # a "--" inside an XML comment makes Maven refuse the pom
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    deps = [
        d.findtext("m:artifactId", namespaces=ns) for d in root.iter(f"{{{ns['m']}}}dependency")
    ]
    assert deps


def test_connect_pom_pins_versions() -> None:
    text = stack.render_connect_pom("4.1.1")
    assert "<kafka.version>4.1.1</kafka.version>" in text
    assert "<log4j.version>2.24.3</log4j.version>" in text
    assert "connect-runtime" in text and "connect-json" in text and "log4j-slf4j-impl" in text
    with pytest.raises(UserError, match="not a version"):
        stack.render_connect_pom("4.1.1; rm -rf /")


def test_debezium_pom_excludes_kafka() -> None:
    text = stack.render_debezium_pom()
    assert f"<debezium.version>{stack.DEBEZIUM_VERSION}</debezium.version>" in text
    assert "<groupId>org.apache.kafka</groupId>" in text and "<artifactId>*</artifactId>" in text


def test_worker_properties(throwaway: Callable[..., Settings]) -> None:
    settings = throwaway()
    lay = stack.layout_for(settings)
    props = dict(
        ln.split("=", 1)
        for ln in stack.render_worker_properties(settings).splitlines()
        if ln and not ln.startswith("#")
    )
    assert props["bootstrap.servers"] == f"127.0.0.1:{settings.stack.kafka_port}"
    assert props["listeners"] == f"http://127.0.0.1:{settings.stack.connect_port}"
    assert props["plugin.path"] == str(lay.plugins)
    assert props["offset.storage.file.filename"] == str(lay.connect_offsets)
    assert (
        props["key.converter.schemas.enable"] == props["value.converter.schemas.enable"] == "true"
    )


# --------------------------------------------------------------------------- connector file


def test_connector_file_settings(throwaway: Callable[..., Settings]) -> None:
    settings = throwaway()
    name, cfg = stack.connector_config(settings)
    assert name == cfg["name"] == "bucketsync-app"
    assert not [k for k in cfg if k.startswith("_")]
    assert all(isinstance(v, str) for v in cfg.values())
    assert cfg["database.port"] == str(settings.stack.postgres_port)
    expected = {
        "connector.class": stack.DEBEZIUM_CLASS,
        "plugin.name": "pgoutput",
        "topic.prefix": "app",
        "publication.name": stack.PG_PUBLICATION,
        "publication.autocreate.mode": "disabled",
        "provide.transaction.metadata": "true",
        "skipped.operations": "none",
        "key.converter": "org.apache.kafka.connect.json.JsonConverter",
        "value.converter": "org.apache.kafka.connect.json.JsonConverter",
        "key.converter.schemas.enable": "true",
        "value.converter.schemas.enable": "true",
        "value.converter.replace.null.with.default": "false",
        "database.user": stack.PG_CDC_USER[0],
        "database.dbname": stack.PG_DATABASE,
    }
    assert {k: cfg.get(k) for k in expected} == expected
    assert int(cfg["heartbeat.interval.ms"]) > 0
    assert "public\\.todos" in cfg["table.include.list"]


def test_connector_overrides(throwaway: Callable[..., Settings]) -> None:
    name, cfg = stack.connector_config(
        throwaway(), {"name": "other", "topic.prefix": "t-1", "slot.name": "s1"}
    )
    assert name == cfg["name"] == "other"
    assert cfg["topic.prefix"] == "t-1" and cfg["slot.name"] == "s1"


def test_connector_file_broken(throwaway: Callable[..., Settings], tmp_path: Path) -> None:
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"config": {}}))
    with pytest.raises(UserError, match="not a \\{name, config\\} JSON document"):
        stack.connector_config(throwaway(), path=bad)


# --------------------------------------------------------------------------- postgres helpers


@pytest.mark.parametrize(
    ("text", "major"),
    [
        ("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)", 15),
        ("postgres (PostgreSQL) 17.2", 17),
        ("postgres (PostgreSQL) 9.6.24", 9),
        ("nonsense", None),
    ],
)
def test_parse_pg_major(text: str, major: int | None) -> None:
    assert stack.parse_pg_major(text) == major


def test_psql_argv(throwaway: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres, "pg_bindir", lambda: Path("/pg/bin"))
    monkeypatch.setenv("PGHOST", "elsewhere")
    settings = throwaway()
    argv, env = stack.psql_argv(settings)
    assert argv[0] == "/pg/bin/psql"
    assert argv[argv.index("-h") + 1] == "127.0.0.1"
    assert argv[argv.index("-U") + 1] == "app" and argv[argv.index("-d") + 1] == "app"
    assert env["PGPASSWORD"] == "app" and "PGHOST" not in env
    argv, env = stack.psql_argv(settings, user="postgres", database="postgres")
    assert argv[argv.index("-h") + 1] == str(postgres.pg_socket_dir(settings))
    assert "PGPASSWORD" not in env
    assert stack.postgres_dsn(settings) == (
        f"postgresql://app:app@127.0.0.1:{settings.stack.postgres_port}/app"
    )


def test_socket_dir_falls_back_when_too_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("BUCKETSYNC_"):
            monkeypatch.delenv(name)
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    cfg = tmp_path / "bucketsync.yaml"
    cfg.write_text(yaml.safe_dump({"stack": {"state_dir": str(deep)}}))
    settings = load_settings(cfg)
    sock = postgres.pg_socket_dir(settings)
    assert not str(sock).startswith(str(deep))
    assert len(str(sock / ".s.PGSQL.65535.lock")) <= 100


def test_unreachable_by() -> None:
    if os.getuid() == 65534:
        pytest.skip("running as nobody")
    base = Path(tempfile.mkdtemp(prefix="bs-reach-", dir="/tmp"))
    closed = base / "closed"
    inner = closed / "inner"
    try:
        base.chmod(0o755)
        inner.mkdir(parents=True)
        closed.chmod(0o700)
        nobody = (65534, 65534)
        assert postgres._unreachable_by(inner, *nobody) == closed
        closed.chmod(0o711)
        assert postgres._unreachable_by(inner, *nobody) is None
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- preflight


def test_missing_postgres_is_one_line_with_the_fix(
    throwaway: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "pg_bindir", lambda: None)
    monkeypatch.setattr(binaries, "apt_install", lambda package: False)
    _java_17(monkeypatch)
    settings = throwaway()
    with pytest.raises(stack.SourceUnavailable) as err:
        stack.ensure_up(settings, source="postgres")
    msg = str(err.value)
    assert "\n" not in msg
    assert "apt-get install -y postgresql" in msg and "--source postgres" in msg
    _nothing_started(settings)


def test_too_old_postgres(
    throwaway: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("postgres", "initdb", "psql"):
        (bindir / tool).write_text("#!/bin/sh\necho 'postgres (PostgreSQL) 13.4'\n")
        (bindir / tool).chmod(0o755)
    monkeypatch.setattr(postgres, "pg_bindir", lambda: bindir)
    _java_17(monkeypatch)
    settings = throwaway()
    with pytest.raises(stack.SourceUnavailable, match="PostgreSQL 13; the CDC source needs 15"):
        stack.ensure_up(settings, source="postgres")
    _nothing_started(settings)


@pytest.mark.parametrize("key", ["postgres_port", "connect_port"])
def test_source_port_in_use(
    throwaway: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    _java_17(monkeypatch)
    monkeypatch.setattr(connect, "ensure_connect_libs", lambda settings: False)
    if postgres.pg_bindir() is None:
        pytest.skip("no PostgreSQL binaries here")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        settings = throwaway(**{key: s.getsockname()[1]})
        with pytest.raises(UserError, match=f"already in use.*stack.{key}"):
            stack.ensure_up(settings, source="postgres")
    _nothing_started(settings)


def test_source_port_collides_with_kafka(throwaway: Callable[..., Settings]) -> None:
    port = _free_port()
    settings = throwaway(kafka_port=port, postgres_port=port)
    with pytest.raises(UserError, match=r"stack\.postgres_port .* collides"):
        stack.ensure_up(settings, source="postgres")
    _nothing_started(settings)


def test_unknown_source(throwaway: Callable[..., Settings]) -> None:
    with pytest.raises(UserError, match="unknown source 'mysql'"):
        stack.main(throwaway(), "status", source="mysql", as_json=True)


def test_connect_download_failure_names_the_cause(
    throwaway: Callable[..., Settings], tmp_path: Path
) -> None:
    mvn = tmp_path / "fake-mvn"
    mvn.write_text(
        "#!/bin/sh\necho '[ERROR] Could not transfer artifact: Unknown host repo'\nexit 1\n"
    )
    mvn.chmod(0o755)
    settings = throwaway()
    with pytest.raises(
        UserError, match=r"could not download Kafka Connect 4\.1\.1 jars .*Unknown host"
    ):
        stack.ensure_connect_libs(settings, mvn=str(mvn))
    assert not stack.layout_for(settings).connect_libs.exists()


def test_connect_download_incomplete(throwaway: Callable[..., Settings], tmp_path: Path) -> None:
    mvn = tmp_path / "fake-mvn"
    # "downloads" an empty directory
    mvn.write_text(
        '#!/bin/sh\nfor a in "$@"; do case $a in -DoutputDirectory=*) mkdir -p "${a#*=}";; esac; done\n'
    )
    mvn.chmod(0o755)
    with pytest.raises(UserError, match=r"incomplete \(no connect-runtime-4\.1\.1"):
        stack.ensure_connect_libs(throwaway(), mvn=str(mvn))


# --------------------------------------------------------------------------- status / down


def test_status_with_source_never_started(
    throwaway: Callable[..., Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    settings = throwaway()
    assert stack.main(settings, "status", source="postgres", as_json=True) == 1
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["state"]) for r in rows] == [
        ("kafka", "stopped"),
        ("redis", "stopped"),
        ("postgres", "stopped"),
        ("connect", "stopped"),
        ("debezium", "stopped"),
    ]
    assert rows[2]["address"] == f"127.0.0.1:{settings.stack.postgres_port}"
    assert rows[3]["address"] == f"http://127.0.0.1:{settings.stack.connect_port}"
    # without --source: only the broker and Redis, as before
    assert [r["name"] for r in stack.stack_status(settings)] == ["kafka", "redis"]


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_down_never_signals_foreign_source_processes(
    throwaway: Callable[..., Settings], sleeper: subprocess.Popen[bytes]
) -> None:
    settings = throwaway()
    lay = stack.layout_for(settings)
    for pid_file in (lay.pg_pid, lay.connect_pid):
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{sleeper.pid}\n")
    rows = stack.stack_status(settings, source="postgres")
    assert [r["state"] for r in rows][2:4] == ["stopped", "stopped"]
    stack.down(settings)
    assert sleeper.poll() is None, "down signalled a process that is not ours"
    assert not lay.pg_pid.exists() and not lay.connect_pid.exists()


def test_wait_connector_failed_names_trace_and_log(
    throwaway: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = throwaway()
    trace = (
        "io.debezium.DebeziumException: Creation of replication slot failed\n\tat x.y(Z.java:1)\n"
        "Caused by: org.postgresql.util.PSQLException: FATAL: number of requested standby "
        "connections exceeds max_wal_senders\n\tat a.b(C.java:2)"
    )
    status = {
        "connector": {"state": "RUNNING"},
        "tasks": [{"id": 0, "state": "FAILED", "trace": trace}],
    }
    monkeypatch.setattr(connector, "connector_status", lambda settings, name: status)
    with pytest.raises(UserError) as err:
        stack.wait_connector_running(settings, "c1", timeout=5)
    msg = str(err.value)
    assert "connector c1 FAILED: io.debezium.DebeziumException: Creation of replication slot" in msg
    assert "exceeds max_wal_senders" in msg
    assert str(stack.layout_for(settings).connect_log) in msg


def test_wait_connector_timeout_names_log(
    throwaway: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = throwaway()
    status = {"connector": {"state": "RUNNING"}, "tasks": [{"id": 0, "state": "UNASSIGNED"}]}
    monkeypatch.setattr(connector, "connector_status", lambda settings, name: status)
    with pytest.raises(UserError, match=r"not RUNNING within 0 s .*connect\.log"):
        stack.wait_connector_running(settings, "c1", timeout=0.3)
