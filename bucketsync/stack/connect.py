"""The CDC source's Kafka Connect worker: standalone mode, Debezium PostgreSQL on its plugin path.

Owns the worker's classpath and the Debezium plugin (both from Maven Central through
``bucketsync.stack.maven``, cached under ``<state_dir>/connect``), its properties (file offsets,
REST on ``stack.connect_port``), the JVM command line and the readiness probe (REST answers
and lists the Debezium class). Once it answers, it (re-)registers the stack's connector
(``bucketsync.stack.connector``) and reports that connector as an extra status row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bucketsync.config import Settings
from bucketsync.errors import UserError
from bucketsync.stack.binaries import SourceUnavailable, check_java
from bucketsync.stack.component import Component, Launch
from bucketsync.stack.connector import (
    DEBEZIUM_CLASS,
    connect_url,
    connector_config,
    connector_row,
    http_json,
    register_stack_connector,
)
from bucketsync.stack.kafka import java_opts
from bucketsync.stack.layout import layout_for, template
from bucketsync.stack.maven import assemble, jar_problem, missing_jars, render_kafka_pom
from bucketsync.stack.ports import port_accepts
from bucketsync.stack.processes import Service, cmdline

DEBEZIUM_VERSION = "3.6.1.Final"
CONNECT_HEAP = "512m"


def render_connect_pom(kafka_version: str) -> str:
    return render_kafka_pom("connect-runtime.pom.xml", kafka_version)


def render_debezium_pom(version: str = DEBEZIUM_VERSION) -> str:
    return template("debezium-postgres.pom.xml").replace("@DEBEZIUM_VERSION@", version)


def _libs_problem(libs: Path, kafka_version: str) -> str | None:
    return jar_problem(
        libs,
        f"connect-runtime-{kafka_version}*.jar",
        ("org/apache/kafka/connect/cli/ConnectStandalone.class",),
    ) or missing_jars(libs, ("connect-json-", "kafka-clients-", "log4j-core-", "log4j-slf4j-impl-"))


def _plugin_problem(plugin: Path) -> str | None:
    problem = jar_problem(
        plugin,
        "debezium-connector-postgres-*.jar",
        ("io/debezium/connector/postgresql/PostgresConnector.class",),
    )
    if problem:
        return problem
    if not any(plugin.glob("postgresql-*.jar")):
        return "no postgresql-*.jar (JDBC driver)"
    return None


def ensure_connect_libs(settings: Settings, *, mvn: str | None = None) -> bool:
    """Connect worker classpath + Debezium plugin under ``<state_dir>/connect``; True if downloaded."""
    lay = layout_for(settings)
    version = settings.stack.kafka_version
    a = assemble(
        f"Kafka Connect {version}", render_connect_pom(version), lay.connect_pom, lay.connect_libs,
        lay.connect_libs_stamp, lambda d: _libs_problem(d, version), mvn, label="connect",
    )  # fmt: skip
    b = assemble(
        f"Debezium PostgreSQL connector {DEBEZIUM_VERSION}", render_debezium_pom(), lay.debezium_pom,
        lay.debezium_plugin, lay.plugins_stamp, _plugin_problem, mvn, label="connect",
    )  # fmt: skip
    return a or b


def render_worker_properties(settings: Settings) -> str:
    lay = layout_for(settings)
    return (
        template("connect-standalone.properties")
        .replace("@KAFKA_PORT@", str(settings.stack.kafka_port))
        .replace("@CONNECT_PORT@", str(settings.stack.connect_port))
        .replace("@PLUGIN_PATH@", str(lay.plugins))
        .replace("@OFFSETS_FILE@", str(lay.connect_offsets))
    )


class Connect(Component[str]):
    """The worker; its plan is the Java to run it with. Starts after the broker and PostgreSQL."""

    name = "connect"
    stage = 1

    def service(self, settings: Settings) -> Service:
        lay = layout_for(settings)

        def owns(pid: int) -> bool:
            cmd = cmdline(pid)
            return (
                "org.apache.kafka.connect.cli.ConnectStandalone" in cmd
                and str(lay.worker_properties) in cmd
            )

        return Service(self.name, connect_url(settings), lay.connect_pid, lay.connect_log, owns)

    def ports(self, settings: Settings) -> list[tuple[int, str]]:
        return [(settings.stack.connect_port, "connect_port")]

    def preflight(self, settings: Settings) -> str:
        try:
            return check_java()
        except UserError as exc:  # no usable Java: the source cannot run here
            raise SourceUnavailable(str(exc)) from None

    def prepare(self, settings: Settings, plan: str) -> None:
        ensure_connect_libs(settings)
        lay = layout_for(settings)
        lay.connect_offsets.parent.mkdir(parents=True, exist_ok=True)
        lay.worker_properties.write_text(render_worker_properties(settings))
        lay.connect_log4j.write_text(template("connect-log4j2.properties"))

    def command(self, settings: Settings, plan: str) -> Launch:
        lay = layout_for(settings)
        argv = [
            plan, *java_opts("128m", CONNECT_HEAP, lay.connect_log4j, lay.connect_dir),
            "-cp", f"{lay.connect_libs}/*", "org.apache.kafka.connect.cli.ConnectStandalone",
            str(lay.worker_properties),
        ]  # fmt: skip
        return Launch(argv, lay.connect_dir)

    def ready(self, settings: Settings) -> bool:
        if not port_accepts(settings.stack.connect_port):
            return False
        try:
            status, plugins = http_json(
                "GET", connect_url(settings) + "/connector-plugins", timeout=5
            )
        except OSError:
            return False
        if status != 200 or not isinstance(plugins, list):
            return False
        if not any(isinstance(p, dict) and p.get("class") == DEBEZIUM_CLASS for p in plugins):
            lay = layout_for(settings)
            raise UserError(
                f"connect: the worker runs but has no {DEBEZIUM_CLASS} on plugin.path {lay.plugins}; "
                f"see {lay.connect_log}, or delete {lay.plugins_stamp} to download the plugin again"
            )
        return True

    def configure(self, settings: Settings) -> None:
        register_stack_connector(settings)

    def addresses(self, settings: Settings) -> dict[str, str]:
        name, _ = connector_config(settings)
        return {self.name: connect_url(settings), "connector": name}

    def summary(self, addresses: dict[str, str]) -> str:
        return f"connect {addresses['connect']} (connector {addresses['connector']})"

    def status(self, settings: Settings) -> list[dict[str, Any]]:
        [row] = super().status(settings)
        return [row, connector_row(settings, worker_running=row["state"] == "running")]

    def data(self, settings: Settings) -> list[Path]:
        return [layout_for(settings).connect_offsets.parent]


CONNECT = Connect()
