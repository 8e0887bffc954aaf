"""Where everything of the stack lives: ``<state_dir>`` (default ``.stack`` next to the config).

Owns the path of every file and directory the stack writes, so that ``up``, ``down``,
``reset``, ``status`` and the tests agree on them, and the templates shipped in
``bucketsync/stack_files/`` (package data, see pyproject). One class rather than one per
service: the layout is part of the public API (tests and tools read ``layout_for(s).kafka_pid``
and friends), and a single listing keeps the tree below readable in one place::

    stack.lock
    kafka/    pom.xml libs/ libs.sha256 server.properties log4j2.yaml cluster.id
              data/ data.json kafka.pid kafka.log
    redis/    redis.conf redis.pid redis.log appendonlydir/ (the Redis data dir)
    postgres/ data/ (the cluster) run/ (socket) postgres.pid postgres.log
              (data/ and run/ may move to the temp dir, see bucketsync.stack.postgres)
    connect/  runtime.pom.xml libs/ libs.sha256 debezium.pom.xml plugins/ plugins.sha256
              worker.properties log4j2.properties offsets/ connect.pid connect.log
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bucketsync.config import Settings

#: Templates rendered by the components (kept next to the package: pyproject's package-data).
STACK_FILES = Path(__file__).resolve().parent.parent / "stack_files"


def template(name: str) -> str:
    """The text of ``bucketsync/stack_files/<name>``."""
    return (STACK_FILES / name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def lock(self) -> Path:
        return self.root / "stack.lock"

    # -- Kafka broker

    @property
    def kafka_dir(self) -> Path:
        return self.root / "kafka"

    @property
    def pom(self) -> Path:
        return self.kafka_dir / "pom.xml"

    @property
    def libs(self) -> Path:
        return self.kafka_dir / "libs"

    @property
    def libs_stamp(self) -> Path:
        return self.kafka_dir / "libs.sha256"

    @property
    def server_properties(self) -> Path:
        return self.kafka_dir / "server.properties"

    @property
    def log4j(self) -> Path:
        return self.kafka_dir / "log4j2.yaml"

    @property
    def cluster_id(self) -> Path:
        return self.kafka_dir / "cluster.id"

    @property
    def kafka_data(self) -> Path:
        return self.kafka_dir / "data"

    @property
    def kafka_data_info(self) -> Path:
        return self.kafka_dir / "data.json"

    @property
    def kafka_pid(self) -> Path:
        return self.kafka_dir / "kafka.pid"

    @property
    def kafka_log(self) -> Path:
        return self.kafka_dir / "kafka.log"

    # -- Redis

    @property
    def redis_dir(self) -> Path:
        return self.root / "redis"

    @property
    def redis_conf(self) -> Path:
        return self.redis_dir / "redis.conf"

    @property
    def redis_pid(self) -> Path:
        return self.redis_dir / "redis.pid"

    @property
    def redis_log(self) -> Path:
        return self.redis_dir / "redis.log"

    # -- CDC source: PostgreSQL

    @property
    def pg_dir(self) -> Path:
        return self.root / "postgres"

    @property
    def pg_pid(self) -> Path:
        return self.pg_dir / "postgres.pid"

    @property
    def pg_log(self) -> Path:
        return self.pg_dir / "postgres.log"

    # -- CDC source: Kafka Connect with Debezium

    @property
    def connect_dir(self) -> Path:
        return self.root / "connect"

    @property
    def connect_pom(self) -> Path:
        return self.connect_dir / "runtime.pom.xml"

    @property
    def connect_libs(self) -> Path:
        return self.connect_dir / "libs"

    @property
    def connect_libs_stamp(self) -> Path:
        return self.connect_dir / "libs.sha256"

    @property
    def debezium_pom(self) -> Path:
        return self.connect_dir / "debezium.pom.xml"

    @property
    def plugins(self) -> Path:
        return self.connect_dir / "plugins"

    @property
    def debezium_plugin(self) -> Path:
        return self.plugins / "debezium-connector-postgres"

    @property
    def plugins_stamp(self) -> Path:
        return self.connect_dir / "plugins.sha256"

    @property
    def worker_properties(self) -> Path:
        return self.connect_dir / "worker.properties"

    @property
    def connect_log4j(self) -> Path:
        return self.connect_dir / "log4j2.properties"

    @property
    def connect_offsets(self) -> Path:
        return self.connect_dir / "offsets" / "connect.offsets"

    @property
    def connect_pid(self) -> Path:
        return self.connect_dir / "connect.pid"

    @property
    def connect_log(self) -> Path:
        return self.connect_dir / "connect.log"


def layout_for(settings: Settings) -> Layout:
    return Layout(settings.state_dir.resolve())
