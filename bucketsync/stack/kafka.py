"""The Kafka broker: KRaft, single node, assembled from Maven Central, run with Java 17+.

Owns the broker's pom (``bucketsync/stack_files/pom.xml``, cached jars under
``<state_dir>/kafka/libs``), its ``server.properties`` (rewritten on every start), the
one-time storage format (the controller port is recorded next to the data, since a formatted
log dir cannot follow a changed port), the JVM command line and the readiness probe (a
metadata request through librdkafka, not just an open port).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import uuid
from pathlib import Path
from typing import Any

from bucketsync.config import Settings
from bucketsync.errors import UserError
from bucketsync.stack.binaries import check_java
from bucketsync.stack.component import Component, Launch
from bucketsync.stack.console import say
from bucketsync.stack.layout import layout_for, template
from bucketsync.stack.maven import assemble, jar_problem, missing_jars, render_kafka_pom
from bucketsync.stack.ports import HOST, port_accepts
from bucketsync.stack.processes import Service, cmdline, run_once

FORMAT_TIMEOUT_S = 180.0

#: JVM flags from upstream's kafka-run-class.sh (heap comes from stack.kafka_heap).
KAFKA_JVM_OPTS = [
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:MaxInlineLevel=15",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
]

_quiet = logging.getLogger("bucketsync.stack.librdkafka")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


def kafka_address(settings: Settings) -> str:
    return f"{HOST}:{settings.stack.kafka_port}"


def render_pom(kafka_version: str) -> str:
    return render_kafka_pom("pom.xml", kafka_version)


def heap_mib(heap: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)\s*", heap)
    if not m:
        raise UserError(f"stack.kafka_heap '{heap}' must look like 512m or 1g")
    n, unit = int(m.group(1)), m.group(2).lower()
    return {"k": n // 1024, "m": n, "g": n * 1024, "": n // (1024 * 1024)}[unit]


def render_server_properties(settings: Settings) -> str:
    lay = layout_for(settings)
    extra = []
    if heap_mib(settings.stack.kafka_heap) < 512:
        # the log cleaner's dedupe buffer takes 128 MiB of heap by default
        extra.append("log.cleaner.dedupe.buffer.size=33554432")
    return (
        template("server.properties")
        .replace("@KAFKA_PORT@", str(settings.stack.kafka_port))
        .replace("@CONTROLLER_PORT@", str(settings.stack.kafka_controller_port))
        .replace("@LOG_DIRS@", str(lay.kafka_data))
        .replace("@EXTRA@", "\n".join(extra))
    )


def _libs_problem(libs: Path, kafka_version: str) -> str | None:
    """None if ``libs`` holds a usable broker classpath, else what is missing."""
    return jar_problem(
        libs,
        f"kafka_2.13-{kafka_version}.jar",
        ("kafka/Kafka.class", "kafka/tools/StorageTool.class"),
    ) or missing_jars(libs, ("kafka-server-", "log4j-core-", "log4j-slf4j-impl-", "slf4j-api-"))


def ensure_libs(settings: Settings, *, mvn: str | None = None) -> bool:
    """Make ``<state_dir>/kafka/libs`` hold the broker classpath; True if it downloaded."""
    lay = layout_for(settings)
    version = settings.stack.kafka_version
    return assemble(
        "Kafka", render_pom(version), lay.pom, lay.libs, lay.libs_stamp,
        lambda d: _libs_problem(d, version), mvn,
        label="kafka",
        incomplete_hint=f"; check stack.kafka_version ({version}) is a released 4.x version",
    )  # fmt: skip


def new_cluster_id() -> str:
    """Like ``kafka-storage random-uuid``: 16 random bytes, base64url, no padding."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def _write_config(settings: Settings) -> None:
    lay = layout_for(settings)
    lay.kafka_dir.mkdir(parents=True, exist_ok=True)
    lay.server_properties.write_text(render_server_properties(settings))
    lay.log4j.write_text(template("log4j2.yaml"))


def _ensure_formatted(settings: Settings, java: str) -> None:
    lay = layout_for(settings)
    cport = settings.stack.kafka_controller_port
    if (lay.kafka_data / "meta.properties").exists():
        try:
            info = json.loads(lay.kafka_data_info.read_text())
        except (OSError, ValueError):
            info = {}
        old = info.get("controller_port")
        if old is not None and old != cport:
            raise UserError(
                f"kafka data in {lay.kafka_data} was formatted for controller port {old}, "
                f"now stack.kafka_controller_port is {cport}; set it back or run "
                f"`bucketsync stack reset` (deletes Kafka and Redis data)"
            )
        return
    if lay.cluster_id.exists():
        cluster_id = lay.cluster_id.read_text().strip()
    else:
        cluster_id = new_cluster_id()
        lay.cluster_id.write_text(cluster_id + "\n")
    lay.kafka_data.mkdir(parents=True, exist_ok=True)
    say("kafka: formatting storage (once)...")
    cmd = [
        java, "-Xmx256m", f"-Dlog4j2.configurationFile={lay.log4j}",
        "-cp", f"{lay.libs}/*", "kafka.tools.StorageTool",
        "format", "--standalone", "-t", cluster_id, "-c", str(lay.server_properties),
    ]  # fmt: skip
    run_once(
        "kafka: formatting storage", cmd, cwd=lay.kafka_dir, timeout=FORMAT_TIMEOUT_S,
        hint="; run `bucketsync stack reset` and try again",
    )  # fmt: skip
    info = {"cluster_id": cluster_id, "controller_port": cport}
    info["kafka_version"] = settings.stack.kafka_version
    lay.kafka_data_info.write_text(json.dumps(info) + "\n")


def java_opts(heap_min: str, heap_max: str, log4j: Path, logs_dir: Path) -> list[str]:
    """JVM options of a Kafka process (the broker and the Connect worker)."""
    return [
        f"-Xms{heap_min}", f"-Xmx{heap_max}", *KAFKA_JVM_OPTS,
        f"-Dlog4j2.configurationFile={log4j}", f"-Dkafka.logs.dir={logs_dir}",
    ]  # fmt: skip


def _answers(port: int) -> bool:
    if not port_accepts(port):
        return False
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    conf: dict[str, Any] = {
        "bootstrap.servers": f"{HOST}:{port}",
        "socket.timeout.ms": 3000,
        "logger": _quiet,
    }
    admin = AdminClient(conf)
    try:
        md = admin.list_topics(timeout=3)
    except KafkaException:
        return False
    return bool(md.brokers)


class Kafka(Component[str]):
    """The broker; its plan is the Java to run it with."""

    name = "kafka"

    def service(self, settings: Settings) -> Service:
        lay = layout_for(settings)

        def owns(pid: int) -> bool:
            cmd = cmdline(pid)
            return "kafka.Kafka" in cmd and str(lay.server_properties) in cmd

        return Service(self.name, kafka_address(settings), lay.kafka_pid, lay.kafka_log, owns)

    def ports(self, settings: Settings) -> list[tuple[int, str]]:
        st = settings.stack
        return [(st.kafka_port, "kafka_port"), (st.kafka_controller_port, "kafka_controller_port")]

    def preflight(self, settings: Settings) -> str:
        java = check_java()
        heap_mib(settings.stack.kafka_heap)
        return java

    def prepare(self, settings: Settings, plan: str) -> None:
        ensure_libs(settings)
        _write_config(settings)
        _ensure_formatted(settings, plan)

    def command(self, settings: Settings, plan: str) -> Launch:
        lay = layout_for(settings)
        heap = settings.stack.kafka_heap.strip()
        argv = [
            plan, *java_opts(heap, heap, lay.log4j, lay.kafka_dir),
            "-cp", f"{lay.libs}/*", "kafka.Kafka", str(lay.server_properties),
        ]  # fmt: skip
        return Launch(argv, lay.kafka_dir)

    def ready(self, settings: Settings) -> bool:
        return _answers(settings.stack.kafka_port)

    def data(self, settings: Settings) -> list[Path]:
        lay = layout_for(settings)
        rotated = lay.kafka_log.with_name(lay.kafka_log.name + ".1")
        return [lay.kafka_data, lay.cluster_id, lay.kafka_data_info, lay.kafka_log, rotated]


KAFKA = Kafka()
