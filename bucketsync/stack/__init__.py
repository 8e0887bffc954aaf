"""The local dev stack: a real Kafka broker (KRaft, single node) and Redis, no Docker.

``bucketsync stack up | down | status | reset [--source postgres]``; the same as a Python API:
:func:`ensure_up`, :func:`stack_status`, :func:`down`, :func:`reset`.

Kafka is assembled from Maven Central jars, formatted once and started with Java 17+ as a
detached process; Redis is the system's ``redis-server`` with AOF on. With ``--source
postgres`` (see docs/debezium.md) also a CDC source: a PostgreSQL cluster and a Kafka Connect
worker with the Debezium PostgreSQL connector, which is (re-)registered on every ``up``. Every
process we start is recorded in a pid file and is only ever signalled when ``/proc/<pid>``
still shows our command line. All state lives under ``<state_dir>`` (default ``.stack``).

The package, by what each part owns:

- ``component``: the shape every service has (preflight, prepare, command, readiness,
  configure, status, data); ``actions``: ``up``/``down``/``reset``/``status`` as loops over
  components, and which components a ``--source`` adds.
- one module per service: ``kafka``, ``redis``, ``postgres``, ``connect`` (the worker) and
  ``connector`` (the Debezium connector on it, through Connect's REST API).
- shared: ``layout`` (every path, the templates in ``bucketsync/stack_files/``), ``processes``
  (spawn, pid files, recognising and stopping our processes), ``ports``, ``maven`` (jar
  downloads for the broker and Connect), ``binaries`` (Java, apt), ``locking``, ``console``.

Dependencies point one way: shared modules <- service modules <- ``actions`` <- this file,
which only re-exports the public API (what ``bucketsync.cli``, the demo, the benchmarks and
the tests use).
"""

from __future__ import annotations

from bucketsync.stack.actions import SOURCES, down, ensure_up, main, reset, stack_status
from bucketsync.stack.binaries import MIN_JAVA, SourceUnavailable, parse_java_major
from bucketsync.stack.connect import (
    CONNECT_HEAP,
    DEBEZIUM_VERSION,
    ensure_connect_libs,
    render_connect_pom,
    render_debezium_pom,
    render_worker_properties,
)
from bucketsync.stack.connector import (
    CONNECTOR_FILE,
    DEBEZIUM_CLASS,
    connect_url,
    connector_config,
    connector_status,
    delete_connector,
    register_connector,
    remove_connector,
    wait_connector_running,
)
from bucketsync.stack.kafka import (
    KAFKA_JVM_OPTS,
    ensure_libs,
    heap_mib,
    kafka_address,
    new_cluster_id,
    render_pom,
    render_server_properties,
)
from bucketsync.stack.layout import STACK_FILES, Layout, layout_for
from bucketsync.stack.maven import log4j_version_for
from bucketsync.stack.ports import HOST
from bucketsync.stack.postgres import (
    PG_APP_USER,
    PG_CDC_USER,
    PG_DATABASE,
    PG_HEARTBEAT_TABLE,
    PG_MIN_MAJOR,
    PG_PUBLICATION,
    PG_SETTINGS,
    PG_SUPERUSER,
    parse_pg_major,
    postgres_dsn,
    psql,
    psql_argv,
    slot_lag_bytes,
)
from bucketsync.stack.processes import Service
from bucketsync.stack.redis import redis_url, render_redis_conf

__all__ = [
    "CONNECTOR_FILE",
    "CONNECT_HEAP",
    "DEBEZIUM_CLASS",
    "DEBEZIUM_VERSION",
    "HOST",
    "KAFKA_JVM_OPTS",
    "MIN_JAVA",
    "PG_APP_USER",
    "PG_CDC_USER",
    "PG_DATABASE",
    "PG_HEARTBEAT_TABLE",
    "PG_MIN_MAJOR",
    "PG_PUBLICATION",
    "PG_SETTINGS",
    "PG_SUPERUSER",
    "SOURCES",
    "STACK_FILES",
    "Layout",
    "Service",
    "SourceUnavailable",
    "connect_url",
    "connector_config",
    "connector_status",
    "delete_connector",
    "down",
    "ensure_connect_libs",
    "ensure_libs",
    "ensure_up",
    "heap_mib",
    "kafka_address",
    "layout_for",
    "log4j_version_for",
    "main",
    "new_cluster_id",
    "parse_java_major",
    "parse_pg_major",
    "postgres_dsn",
    "psql",
    "psql_argv",
    "redis_url",
    "register_connector",
    "remove_connector",
    "render_connect_pom",
    "render_debezium_pom",
    "render_pom",
    "render_redis_conf",
    "render_server_properties",
    "render_worker_properties",
    "reset",
    "slot_lag_bytes",
    "stack_status",
    "wait_connector_running",
]
