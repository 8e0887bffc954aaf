"""The local dev stack: a real Kafka broker (KRaft, single node) and Redis, no Docker.

``bucketsync stack up | down | status | reset``; the same as a Python API:
:func:`ensure_up`, :func:`stack_status`, :func:`down`, :func:`reset`.

Kafka is assembled from Maven Central jars (``mvn dependency:copy-dependencies`` of a
small pom, cached under ``<state_dir>/kafka/libs`` with a sha256 stamp of the pom),
formatted once and started with Java 17+ as a detached process. Redis is the system's
``redis-server`` with AOF on. Every process we start is recorded in a pid file and is
only ever signalled when ``/proc/<pid>`` still shows our command line.

Layout of ``<state_dir>`` (default ``.stack`` next to the config file)::

    stack.lock
    kafka/  pom.xml libs/ libs.sha256 server.properties log4j2.yaml cluster.id
            data/ data.json kafka.pid kafka.log
    redis/  redis.conf redis.pid redis.log appendonlydir/ (the Redis data dir)

With ``--source postgres`` (see docs/debezium.md) also a CDC source: a PostgreSQL cluster
(the system's server binaries, ``initdb`` once, run as the ``postgres`` system user when we
are root) and a Kafka Connect worker in standalone mode (file offsets, REST on
``stack.connect_port``) with the Debezium PostgreSQL connector on its plugin path, both
assembled from Maven Central like the broker. The connector of
``bucketsync/stack_files/debezium-postgres.json`` is (re-)registered on every ``up``::

    postgres/ data/ (the cluster) run/ (socket) postgres.pid postgres.log
              (data/ and run/ go to <tmp>/bucketsync-pg-<hash>/ if the postgres user
              cannot enter the state dir)
    connect/  runtime.pom.xml libs/ libs.sha256 debezium.pom.xml plugins/ plugins.sha256
              worker.properties log4j2.properties offsets/ connect.pid connect.log
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from bucketsync.config import Settings
from bucketsync.errors import UserError

HOST = "127.0.0.1"
STACK_FILES = Path(__file__).resolve().parent / "stack_files"
MIN_JAVA = 17
DOWNLOAD_TIMEOUT_S = 1800.0
FORMAT_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
LOG_ROTATE_BYTES = 20 * 1024 * 1024
LOG_TAIL_LINES = 15

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

#: The CDC source (``--source postgres``): versions and fixed names.
SOURCES = ("none", "postgres")
DEBEZIUM_VERSION = "3.6.1.Final"
CONNECT_HEAP = "512m"
CONNECTOR_FILE = STACK_FILES / "debezium-postgres.json"
PG_DATABASE = "app"
PG_SUPERUSER = "postgres"
#: role the applications write with (owns database ``app`` and its tables)
PG_APP_USER = ("app", "app")
#: role the connector logs in with: REPLICATION, member of ``app`` (so it may read its tables)
PG_CDC_USER = ("debezium", "debezium")
#: publication created by ``stack up`` for every table of schema ``public`` (PostgreSQL 15+:
#: tables created later are included too); the connector uses it, autocreate disabled.
PG_PUBLICATION = "bucketsync_app"
PG_HEARTBEAT_TABLE = "bucketsync_heartbeat"
PG_MIN_MAJOR = 15
PG_SETTINGS = {
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "wal_sender_timeout": "60s",
    "logging_collector": "off",
    "log_min_messages": "warning",
    "log_line_prefix": "%m [%p] ",
}
_PG_FIX = (
    "install the PostgreSQL server (Debian/Ubuntu: apt-get install -y postgresql; "
    "macOS: brew install postgresql@16)"
)


class SourceUnavailable(UserError):
    """A tool the CDC source needs (PostgreSQL server, Java) is missing and cannot be installed."""


_console = Console(stderr=True, highlight=False, soft_wrap=True)
#: Popen objects of processes we started, kept so they are not reaped/warned about by GC.
_children: dict[int, subprocess.Popen[bytes]] = {}


def _say(message: str) -> None:
    _console.print(message, markup=False)


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def lock(self) -> Path:
        return self.root / "stack.lock"

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

    # -- CDC source: PostgreSQL + Kafka Connect with Debezium

    @property
    def pg_dir(self) -> Path:
        return self.root / "postgres"

    @property
    def pg_pid(self) -> Path:
        return self.pg_dir / "postgres.pid"

    @property
    def pg_log(self) -> Path:
        return self.pg_dir / "postgres.log"

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


def kafka_address(settings: Settings) -> str:
    return f"{HOST}:{settings.stack.kafka_port}"


def redis_url(settings: Settings) -> str:
    return f"redis://{HOST}:{settings.stack.redis_port}/0"


def postgres_dsn(settings: Settings, user: str = PG_APP_USER[0]) -> str:
    """libpq URL of database ``app`` (password included: a local dev cluster)."""
    password = dict([PG_APP_USER, PG_CDC_USER]).get(user, "")
    auth = f"{user}:{password}" if password else user
    return f"postgresql://{auth}@{HOST}:{settings.stack.postgres_port}/{PG_DATABASE}"


def connect_url(settings: Settings) -> str:
    return f"http://{HOST}:{settings.stack.connect_port}"


# --------------------------------------------------------------------------- processes


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def _write_pid(path: Path, pid: int) -> None:
    tmp = path.with_suffix(".pid.tmp")
    tmp.write_text(f"{pid}\n")
    tmp.replace(path)


def _alive(pid: int) -> bool:
    """True if ``pid`` is a live (not zombie) process. Reaps it if it is our exited child."""
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").exists():
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            return False
        except OSError:
            pass
        else:
            return bool(fields) and fields[0] not in ("Z", "X", "x")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        raw = b""
    if raw:
        return [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    if Path("/proc/self").exists():
        return []
    try:  # no procfs (macOS): ask ps
        out = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return out.stdout.split()


def _cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


@dataclass(frozen=True)
class Service:
    name: str
    address: str
    pid_file: Path
    log_file: Path
    owns: Callable[[int], bool]
    #: PostgreSQL needs SIGINT ("fast" shutdown); SIGTERM would wait for clients to leave
    stop_signal: int = signal.SIGTERM

    def running_pid(self) -> int | None:
        """The pid from our pid file if it is alive and runs our command; else None."""
        pid = _read_pid(self.pid_file)
        if pid and _alive(pid) and self.owns(pid):
            return pid
        return None


def _services(settings: Settings) -> list[Service]:
    lay = layout_for(settings)
    port = settings.stack.redis_port

    def owns_kafka(pid: int) -> bool:
        cmd = _cmdline(pid)
        return "kafka.Kafka" in cmd and str(lay.server_properties) in cmd

    def owns_redis(pid: int) -> bool:
        # redis-server rewrites its argv into a title like "/usr/bin/redis-server 127.0.0.1:6379"
        joined = " ".join(_cmdline(pid))
        if "redis" not in joined:
            return False
        cwd = _cwd(pid)
        if cwd is not None:
            return cwd == lay.redis_dir
        return f":{port}" in joined

    return [
        Service("kafka", kafka_address(settings), lay.kafka_pid, lay.kafka_log, owns_kafka),
        Service("redis", redis_url(settings), lay.redis_pid, lay.redis_log, owns_redis),
    ]


def _source_services(settings: Settings) -> list[Service]:
    """The CDC source's processes: PostgreSQL and the Kafka Connect worker."""
    lay = layout_for(settings)

    def owns_postgres(pid: int) -> bool:
        # the postmaster keeps its argv; its data dir's postmaster.pid names it
        try:
            data = _pg_data(settings)
            first = (data / "postmaster.pid").read_text().split("\n", 1)[0].strip()
        except OSError:
            first = ""
        cmd = _cmdline(pid)
        return first == str(pid) and str(data) in cmd

    def owns_connect(pid: int) -> bool:
        cmd = _cmdline(pid)
        return (
            "org.apache.kafka.connect.cli.ConnectStandalone" in cmd
            and str(lay.worker_properties) in cmd
        )

    pg_address = f"{HOST}:{settings.stack.postgres_port}"
    return [
        Service("postgres", pg_address, lay.pg_pid, lay.pg_log, owns_postgres, signal.SIGINT),
        Service("connect", connect_url(settings), lay.connect_pid, lay.connect_log, owns_connect),
    ]


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode(errors="replace")
    except OSError:
        return "(no log file)"
    tail = [ln for ln in data.splitlines() if ln.strip()][-lines:]
    return "\n".join("    " + ln for ln in tail) if tail else "(log is empty)"


def _rotate(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.stat().st_size > LOG_ROTATE_BYTES:
            path.replace(path.with_name(path.name + ".1"))


def _spawn(
    cmd: list[str], *, cwd: Path, log: Path, pid_file: Path, user: tuple[int, int] | None = None
) -> int:
    _rotate(log)
    with log.open("ab") as fh:
        fh.write(f"\n--- bucketsync stack up {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        fh.flush()
        as_user: dict[str, Any] = {}
        if user is not None:
            as_user = {"user": user[0], "group": user[1], "extra_groups": []}
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            **as_user,
        )
    _children[proc.pid] = proc
    _write_pid(pid_file, proc.pid)
    return proc.pid


# --------------------------------------------------------------------------- ports


def _port_accepts(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _port_busy(port: int) -> bool:
    if _port_accepts(port):
        return True
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
    except OSError:
        return True
    finally:
        sock.close()
    return False


def _check_ports_free(ports: list[tuple[int, str]]) -> None:
    for port, key in ports:
        if _port_busy(port):
            raise UserError(
                f"port {port} is already in use by another process; "
                f"set stack.{key} / BUCKETSYNC_STACK__{key.upper()}"
            )


# --------------------------------------------------------------------------- java / maven / redis binaries


def _find_java() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home:
        cand = Path(home) / "bin" / "java"
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return shutil.which("java")


def parse_java_major(text: str) -> int | None:
    """Major version from ``java -version`` output (``1.8.0_292`` -> 8, ``17.0.15`` -> 17)."""
    m = re.search(r'version "([^"]+)"', text)
    if not m:
        return None
    ver = m.group(1)
    if ver.startswith("1."):
        ver = ver[2:]
    digits = re.match(r"\d+", ver)
    return int(digits.group()) if digits else None


def _java_major(java: str) -> int | None:
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    return parse_java_major(out.stderr + out.stdout)


_JAVA_FIX = (
    "install Java 17+ (Debian/Ubuntu: apt-get install -y openjdk-17-jre-headless) or set JAVA_HOME"
)


def _check_java() -> str:
    java = _find_java()
    if not java:
        raise UserError(f"java not found on PATH; Kafka needs Java {MIN_JAVA}+: {_JAVA_FIX}")
    try:
        major = _java_major(java)
    except (OSError, subprocess.SubprocessError) as exc:
        raise UserError(f"could not run {java} -version ({exc}); {_JAVA_FIX}") from None
    if major is None:
        raise UserError(f"could not read the version of {java}; {_JAVA_FIX}")
    if major < MIN_JAVA:
        raise UserError(f"{java} is Java {major}, Kafka needs Java {MIN_JAVA}+: {_JAVA_FIX}")
    return java


def _find_mvn() -> str | None:
    return shutil.which("mvn")


def _find_redis_server() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.access(p, os.X_OK)),
        None,
    )


def _apt_install(package: str) -> bool:
    """``apt-get install -y package`` (``apt-get update`` first if that fails); True on success.

    A temporary ``policy-rc.d`` keeps the package from starting a system-wide service
    that would take the port our stack wants.
    """
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not policy.exists():
        with contextlib.suppress(OSError):
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            made_policy = True
    try:
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
        for step in (install, ["apt-get", "update", "-q"], install):
            res = subprocess.run(step, env=env, capture_output=True, text=True, timeout=900)
            if res.returncode == 0 and step is install:
                return True
        return False
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if made_policy:
            with contextlib.suppress(OSError):
                policy.unlink()


def _ensure_redis_server() -> str:
    path = _find_redis_server()
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        _say("redis: redis-server not found; running apt-get install -y redis-server ...")
        if _apt_install("redis-server"):
            path = _find_redis_server()
            if path:
                return path
    raise UserError(
        "redis-server not found on PATH; install it (Debian/Ubuntu: sudo apt-get install -y "
        "redis-server; macOS: brew install redis) and run `bucketsync stack up` again"
    )


# --------------------------------------------------------------------------- kafka assembly


def _template(name: str) -> str:
    return (STACK_FILES / name).read_text(encoding="utf-8")


def log4j_version_for(kafka_version: str) -> str:
    """The Log4j 2 version Kafka itself ships with (2.24.3 up to 4.1.x, 2.25.3 from 4.2)."""
    nums = [int(x) for x in re.findall(r"\d+", kafka_version)[:2]] + [0, 0]
    return "2.25.3" if (nums[0], nums[1]) >= (4, 2) else "2.24.3"


def render_pom(kafka_version: str) -> str:
    if not re.fullmatch(r"[0-9A-Za-z.\-]+", kafka_version):
        raise UserError(f"stack.kafka_version '{kafka_version}' is not a version like 4.1.1")
    return (
        _template("pom.xml")
        .replace("@KAFKA_VERSION@", kafka_version)
        .replace("@LOG4J_VERSION@", log4j_version_for(kafka_version))
    )


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
        _template("server.properties")
        .replace("@KAFKA_PORT@", str(settings.stack.kafka_port))
        .replace("@CONTROLLER_PORT@", str(settings.stack.kafka_controller_port))
        .replace("@LOG_DIRS@", str(lay.kafka_data))
        .replace("@EXTRA@", "\n".join(extra))
    )


def _libs_problem(libs: Path, kafka_version: str) -> str | None:
    """None if ``libs`` holds a usable broker classpath, else what is missing."""
    core = libs / f"kafka_2.13-{kafka_version}.jar"
    if not core.is_file():
        return f"{core.name} missing"
    try:
        with zipfile.ZipFile(core) as zf:
            names = set(zf.namelist())
    except (OSError, zipfile.BadZipFile) as exc:
        return f"{core.name} unreadable ({exc})"
    for cls in ("kafka/Kafka.class", "kafka/tools/StorageTool.class"):
        if cls not in names:
            return f"{cls} not in {core.name}"
    jars = [p.name for p in libs.glob("*.jar")]
    for prefix in ("kafka-server-", "log4j-core-", "log4j-slf4j-impl-", "slf4j-api-"):
        if not any(j.startswith(prefix) for j in jars):
            return f"no {prefix}*.jar"
    return None


def _mvn_reason(output: str) -> str:
    errors = [ln.removeprefix("[ERROR]").strip() for ln in output.splitlines() if "[ERROR]" in ln]
    errors = [e for e in errors if e]
    hint = next(
        (
            e
            for e in errors
            if re.search(r"unknown host|could not transfer|connect|timed out|resolve", e, re.I)
        ),
        None,
    )
    reason = hint or (errors[0] if errors else (output.strip().splitlines() or ["mvn failed"])[-1])
    return reason if len(reason) <= 400 else reason[:397] + "..."


def ensure_libs(settings: Settings, *, mvn: str | None = None) -> bool:
    """Make ``<state_dir>/kafka/libs`` hold the broker classpath; True if it downloaded."""
    lay = layout_for(settings)
    version = settings.stack.kafka_version
    return _assemble(
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


def _write_kafka_config(settings: Settings) -> None:
    lay = layout_for(settings)
    lay.kafka_dir.mkdir(parents=True, exist_ok=True)
    lay.server_properties.write_text(render_server_properties(settings))
    lay.log4j.write_text(_template("log4j2.yaml"))


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
    _say("kafka: formatting storage (once)...")
    cmd = [
        java, "-Xmx256m", f"-Dlog4j2.configurationFile={lay.log4j}",
        "-cp", f"{lay.libs}/*", "kafka.tools.StorageTool",
        "format", "--standalone", "-t", cluster_id, "-c", str(lay.server_properties),
    ]  # fmt: skip
    try:
        res = subprocess.run(
            cmd, cwd=lay.kafka_dir, capture_output=True, text=True, timeout=FORMAT_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise UserError(
            f"kafka: formatting storage timed out after {FORMAT_TIMEOUT_S:.0f} s; "
            "run `bucketsync stack reset` and try again"
        ) from None
    if res.returncode != 0:
        out = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
        last = out[-1] if out else "no output"
        raise UserError(
            f"kafka: formatting storage failed (exit {res.returncode}): {last}; "
            "run `bucketsync stack reset` and try again"
        )
    lay.kafka_data_info.write_text(
        json.dumps(
            {
                "cluster_id": cluster_id,
                "controller_port": cport,
                "kafka_version": settings.stack.kafka_version,
            }
        )
        + "\n"
    )


def _kafka_cmd(settings: Settings, java: str) -> list[str]:
    lay = layout_for(settings)
    heap = settings.stack.kafka_heap.strip()
    heap_mib(heap)
    return [
        java, f"-Xms{heap}", f"-Xmx{heap}", *KAFKA_JVM_OPTS,
        f"-Dlog4j2.configurationFile={lay.log4j}", f"-Dkafka.logs.dir={lay.kafka_dir}",
        "-cp", f"{lay.libs}/*", "kafka.Kafka", str(lay.server_properties),
    ]  # fmt: skip


# --------------------------------------------------------------------------- redis


def _redis_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_redis_conf(settings: Settings) -> str:
    lay = layout_for(settings)
    return "\n".join(
        [
            "# Generated by `bucketsync stack up` on every start; edits here are overwritten.",
            f"bind {HOST}",
            f"port {settings.stack.redis_port}",
            "protected-mode yes",
            "daemonize no",
            f"dir {_redis_quote(str(lay.redis_dir))}",
            'logfile ""',
            "loglevel notice",
            "appendonly yes",
            f"appendfsync {settings.stack.redis_appendfsync}",
            'save ""',
            "",
        ]
    )


# --------------------------------------------------------------------------- CDC source: PostgreSQL


def _pg_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` with the server binaries, else ``PATH``."""
    need = ("postgres", "initdb", "psql")

    def complete(d: Path) -> bool:
        return all(os.access(d / b, os.X_OK) and (d / b).is_file() for b in need)

    found: list[tuple[int, Path]] = []
    for d in Path("/usr/lib/postgresql").glob("*/bin"):
        if d.parent.name.isdigit() and complete(d):
            found.append((int(d.parent.name), d))
    if found:
        return max(found)[1]
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10
            )
            d = Path(out.stdout.strip())
            if out.returncode == 0 and complete(d):
                return d
    server = shutil.which("postgres")
    if server and complete(Path(server).parent):
        return Path(server).parent
    return None


def _ensure_pg_bindir() -> Path:
    found = _pg_bindir()
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        _say("postgres: server binaries not found; running apt-get install -y postgresql ...")
        if _apt_install("postgresql"):
            found = _pg_bindir()
            if found:
                return found
    raise SourceUnavailable(
        "PostgreSQL server binaries (postgres, initdb, psql) not found in /usr/lib/postgresql/*/bin "
        f"or on PATH; {_PG_FIX}, then run `bucketsync stack up --source postgres` again"
    )


def parse_pg_major(text: str) -> int | None:
    """Major version from ``postgres --version`` (``postgres (PostgreSQL) 15.18 (Debian…)`` -> 15)."""
    m = re.search(r"\(PostgreSQL\)\s+(\d+)", text) or re.search(r"\b(\d+)(?:\.\d+)?", text)
    return int(m.group(1)) if m else None


def _check_pg_version(bindir: Path) -> int:
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "--version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise SourceUnavailable(
            f"could not run {bindir / 'postgres'} --version ({exc}); {_PG_FIX}"
        ) from None
    major = parse_pg_major(out.stdout + out.stderr)
    if major is None or major < PG_MIN_MAJOR:
        raise SourceUnavailable(
            f"{bindir / 'postgres'} is PostgreSQL {major or '?'}; the CDC source needs "
            f"{PG_MIN_MAJOR}+ (publications FOR TABLES IN SCHEMA); {_PG_FIX}"
        )
    return major


def _pg_user() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as: ``postgres`` when we are root (initdb refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(PG_SUPERUSER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        _say(f"postgres: creating the system user {PG_SUPERUSER!r} (initdb refuses to run as root)")
        try:
            subprocess.run(
                [useradd, "--system", "--user-group", "--no-create-home",
                 "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", PG_SUPERUSER],
                check=True, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            pw = pwd.getpwnam(PG_SUPERUSER)
        except (OSError, subprocess.SubprocessError, KeyError) as exc:
            raise UserError(
                f"PostgreSQL refuses to run as root and the system user {PG_SUPERUSER!r} could not "
                f"be created ({exc}); create it (useradd --system postgres) or run as a non-root user"
            ) from None
    return pw.pw_uid, pw.pw_gid


def _unreachable_by(path: Path, uid: int, gid: int) -> Path | None:
    """The first directory on the way to ``path`` that ``uid`` may not enter, if any."""
    for d in [*reversed(path.parents), path]:
        try:
            st = d.stat()
        except OSError:
            return d
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return d
    return None


def _pg_home(settings: Settings) -> Path:
    """Where PostgreSQL's own files (``data/``, ``run/``) live: ``<state_dir>/postgres``.

    When we are root, PostgreSQL runs as the ``postgres`` system user; if that user cannot
    enter the state dir (e.g. a checkout under a 0700 home), a directory under the system's
    temp dir, named after the state dir, is used instead (pid file and log stay put).
    """
    lay = layout_for(settings)
    if os.geteuid() != 0:
        return lay.pg_dir
    try:
        pw = pwd.getpwnam(PG_SUPERUSER)
    except KeyError:
        return lay.pg_dir
    if not lay.root.exists() or _unreachable_by(lay.root, pw.pw_uid, pw.pw_gid) is None:
        return lay.pg_dir
    tag = hashlib.sha256(str(lay.root).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"bucketsync-pg-{tag}"


def _pg_data(settings: Settings) -> Path:
    return _pg_home(settings) / "data"


def _pg_socket_dir(settings: Settings) -> Path:
    """``<home>/run``, or a short dir under the temp dir when that path is too long for a socket."""
    run = _pg_home(settings) / "run"
    if len(str(run / f".s.PGSQL.{settings.stack.postgres_port}.lock")) <= 100:
        return run
    tag = hashlib.sha256(str(layout_for(settings).root).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"bucketsync-pgsock-{tag}"


def _own(path: Path, user: tuple[int, int] | None, mode: int | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if mode is not None:
        path.chmod(mode)
    if user is not None:
        os.chown(path, *user)


def _pg_prepare(settings: Settings, bindir: Path, user: tuple[int, int] | None) -> None:
    """``initdb`` once (into a temporary dir, renamed when complete), socket dir, ownership."""
    lay = layout_for(settings)
    lay.root.mkdir(parents=True, exist_ok=True)
    lay.pg_dir.mkdir(parents=True, exist_ok=True)
    home, data = _pg_home(settings), _pg_data(settings)
    if home != lay.pg_dir and user is not None:
        blocked = _unreachable_by(lay.root, *user)
        _say(
            f"postgres: the {PG_SUPERUSER} system user cannot enter {blocked} (PostgreSQL runs as "
            f"that user: initdb refuses root), so its data lives in {home}"
        )
        _own(home, user, 0o700)
    _own(lay.pg_dir if home == lay.pg_dir else home, user)
    _own(_pg_socket_dir(settings), user, 0o755)
    version_file = data / "PG_VERSION"
    if version_file.exists():
        have = version_file.read_text().strip()
        want = str(_check_pg_version(bindir))
        if have != want:
            raise UserError(
                f"the PostgreSQL data in {data} was made by PostgreSQL {have}, the binaries "
                f"in {bindir} are {want}; run `bucketsync stack reset` (deletes the stack's data)"
            )
        return
    tmp = home / "data.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _say(f"postgres: initdb {data} (once)...")
    cmd = [
        str(bindir / "initdb"), "-D", str(tmp), "-U", PG_SUPERUSER, "-E", "UTF8", "--no-locale",
        "--auth-local=trust", "--auth-host=scram-sha-256", "--no-instructions",
    ]  # fmt: skip
    as_user: dict[str, Any] = {}
    if user is not None:
        as_user = {"user": user[0], "group": user[1], "extra_groups": []}
    try:
        res = subprocess.run(
            cmd, cwd=home, capture_output=True, text=True, timeout=FORMAT_TIMEOUT_S, **as_user
        )
    except subprocess.TimeoutExpired:
        raise UserError(f"postgres: initdb timed out after {FORMAT_TIMEOUT_S:.0f} s") from None
    if res.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        out = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
        raise UserError(
            f"postgres: initdb failed (exit {res.returncode}): {out[-1] if out else 'no output'}"
        )
    tmp.rename(data)


def _pg_cmd(settings: Settings, bindir: Path) -> list[str]:
    opts = {
        "port": str(settings.stack.postgres_port),
        "listen_addresses": HOST,
        "unix_socket_directories": str(_pg_socket_dir(settings)),
        **PG_SETTINGS,
    }
    cmd = [str(bindir / "postgres"), "-D", str(_pg_data(settings))]
    for key, value in opts.items():
        cmd += ["-c", f"{key}={value}"]
    return cmd


def _clean_pg_env() -> dict[str, str]:
    """The environment without libpq's PG* variables (they would redirect psql)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {
        "PGCONNECT_TIMEOUT": "5"
    }


def psql_argv(
    settings: Settings, *, user: str = PG_APP_USER[0], database: str = PG_DATABASE
) -> tuple[list[str], dict[str, str]]:
    """``psql`` command line and environment for the stack's PostgreSQL.

    The superuser (``postgres``) connects over the Unix socket (trust); other roles over TCP
    with their password. Unaligned tuples-only output, stop on the first error.
    """
    bindir = _pg_bindir()
    if bindir is None:
        raise SourceUnavailable(f"psql not found; {_PG_FIX}")
    env = _clean_pg_env()
    port = str(settings.stack.postgres_port)
    if user == PG_SUPERUSER:
        host = str(_pg_socket_dir(settings))
    else:
        host = HOST
        env["PGPASSWORD"] = dict([PG_APP_USER, PG_CDC_USER]).get(user, "")
    argv = [
        str(bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
        "-h", host, "-p", port, "-U", user, "-d", database,
    ]  # fmt: skip
    return argv, env


def psql(
    settings: Settings,
    sql: str,
    *,
    user: str = PG_APP_USER[0],
    database: str = PG_DATABASE,
    timeout: float = 60.0,
) -> str:
    """Run ``sql`` (a script: statements run one by one) and return its output; raise on errors."""
    argv, env = psql_argv(settings, user=user, database=database)
    try:
        res = subprocess.run(
            argv, input=sql, capture_output=True, text=True, env=env, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise UserError(f"psql as {user} on {database} timed out after {timeout:.0f} s") from None
    if res.returncode != 0:
        err = [ln for ln in res.stderr.splitlines() if ln.strip()]
        raise UserError(
            f"psql as {user} on {database} failed: {' / '.join(err[-3:]) or res.returncode}"
        )
    return res.stdout


def _pg_answers(settings: Settings) -> bool:
    try:
        out = psql(settings, "SELECT 1", user=PG_SUPERUSER, database="postgres", timeout=10)
    except UserError:
        return False
    return out.strip() == "1"


def _pg_bootstrap(settings: Settings) -> None:
    """Roles, database ``app`` and the publication; idempotent, run on every ``up``."""
    (app, app_pw), (cdc, cdc_pw) = PG_APP_USER, PG_CDC_USER
    su = PG_SUPERUSER
    psql(
        settings,
        f"""
        DO $$ BEGIN
          IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{app}') THEN
            CREATE ROLE {app} LOGIN PASSWORD '{app_pw}';
          END IF;
          IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{cdc}') THEN
            CREATE ROLE {cdc} LOGIN REPLICATION PASSWORD '{cdc_pw}' IN ROLE {app};
          END IF;
        END $$;
        """,
        user=su,
        database="postgres",
    )
    have_db = psql(
        settings, f"SELECT 1 FROM pg_database WHERE datname = '{PG_DATABASE}'", user=su,
        database="postgres",
    ).strip()  # fmt: skip
    if not have_db:
        psql(settings, f"CREATE DATABASE {PG_DATABASE} OWNER {app}", user=su, database="postgres")
    # written by the connector's heartbeat.action.query: a change inside the publication every
    # heartbeat, so the slot's confirmed LSN advances even while only other tables change
    psql(
        settings,
        f"CREATE TABLE IF NOT EXISTS public.{PG_HEARTBEAT_TABLE} (id integer PRIMARY KEY, ts timestamptz)",
    )
    psql(
        settings,
        f"""
        DO $$ BEGIN
          IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = '{PG_PUBLICATION}') THEN
            CREATE PUBLICATION {PG_PUBLICATION} FOR TABLES IN SCHEMA public;
          END IF;
        END $$;
        """,
        user=su,
    )


def slot_lag_bytes(settings: Settings, slot: str) -> int | None:
    """WAL bytes the connector has not yet confirmed on replication slot ``slot`` (None if absent)."""
    if not re.fullmatch(r"[a-z0-9_]+", slot):
        raise UserError(f"replication slot name {slot!r} must be lower-case letters, digits, _")
    out = psql(
        settings,
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint "
        f"FROM pg_replication_slots WHERE slot_name = '{slot}'",
        user=PG_SUPERUSER,
        timeout=10,
    ).strip()
    return int(out) if out.lstrip("-").isdigit() else None


# --------------------------------------------------------------------------- CDC source: Kafka Connect


def render_connect_pom(kafka_version: str) -> str:
    render_pom(kafka_version)  # validates the version
    return (
        _template("connect-runtime.pom.xml")
        .replace("@KAFKA_VERSION@", kafka_version)
        .replace("@LOG4J_VERSION@", log4j_version_for(kafka_version))
    )


def render_debezium_pom(version: str = DEBEZIUM_VERSION) -> str:
    return _template("debezium-postgres.pom.xml").replace("@DEBEZIUM_VERSION@", version)


def _jar_problem(libs: Path, prefix: str, classes: tuple[str, ...]) -> str | None:
    jars = sorted(libs.glob(f"{prefix}*.jar"))
    if not jars:
        return f"no {prefix}*.jar"
    try:
        with zipfile.ZipFile(jars[0]) as zf:
            names = set(zf.namelist())
    except (OSError, zipfile.BadZipFile) as exc:
        return f"{jars[0].name} unreadable ({exc})"
    for cls in classes:
        if cls not in names:
            return f"{cls} not in {jars[0].name}"
    return None


def _connect_libs_problem(libs: Path, kafka_version: str) -> str | None:
    problem = _jar_problem(
        libs,
        f"connect-runtime-{kafka_version}",
        ("org/apache/kafka/connect/cli/ConnectStandalone.class",),
    )
    if problem:
        return problem
    for prefix in ("connect-json-", "kafka-clients-", "log4j-core-", "log4j-slf4j-impl-"):
        if not any(libs.glob(f"{prefix}*.jar")):
            return f"no {prefix}*.jar"
    return None


def _plugin_problem(plugin: Path) -> str | None:
    problem = _jar_problem(
        plugin,
        "debezium-connector-postgres-",
        ("io/debezium/connector/postgresql/PostgresConnector.class",),
    )
    if problem:
        return problem
    if not any(plugin.glob("postgresql-*.jar")):
        return "no postgresql-*.jar (JDBC driver)"
    return None


def _assemble(
    what: str,
    pom: str,
    pom_path: Path,
    out_dir: Path,
    stamp_path: Path,
    problem: Callable[[Path], str | None],
    mvn: str | None,
    *,
    label: str = "connect",
    incomplete_hint: str = "",
) -> bool:
    """``mvn dependency:copy-dependencies`` of ``pom`` into ``out_dir`` unless the stamp matches."""
    digest = hashlib.sha256(pom.encode()).hexdigest()
    pom_path.parent.mkdir(parents=True, exist_ok=True)
    if not pom_path.exists() or pom_path.read_text() != pom:
        pom_path.write_text(pom)
    try:
        stamp = stamp_path.read_text().strip()
    except OSError:
        stamp = ""
    if stamp == digest and problem(out_dir) is None:
        return False
    mvn = mvn or _find_mvn()
    if not mvn:
        raise UserError(
            f"mvn (Apache Maven) not found on PATH; it downloads the {what} jars once: "
            "apt-get install -y maven (or install Maven 3.8+), then run the command again"
        )
    _say(f"{label}: downloading {what} jars from Maven Central (first run, ~1 min)...")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        mvn, "-q", "-B", "-f", str(pom_path), "dependency:copy-dependencies",
        "-DincludeScope=runtime", f"-DoutputDirectory={tmp}",
    ]  # fmt: skip
    t0 = time.monotonic()
    try:
        res = subprocess.run(
            cmd, cwd=pom_path.parent, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise UserError(
            f"could not download {what} jars from Maven Central: mvn timed out after "
            f"{DOWNLOAD_TIMEOUT_S:.0f} s; check network/proxy or ~/.m2/settings.xml"
        ) from None
    except OSError as exc:
        raise UserError(
            f"could not run {mvn} ({exc}); install Maven 3.8+ (apt-get install -y maven)"
        ) from None
    if res.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"could not download {what} jars from Maven Central: "
            f"{_mvn_reason(res.stdout + res.stderr)}; check network/proxy or ~/.m2/settings.xml"
        )
    bad = problem(tmp)
    if bad:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{what} jars from Maven Central are incomplete ({bad}){incomplete_hint}")
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.replace(out_dir)
    stamp_path.write_text(digest + "\n")
    n = len(list(out_dir.glob("*.jar")))
    _say(f"{label}: {n} {what} jars in {out_dir} ({time.monotonic() - t0:.1f} s)")
    return True


def ensure_connect_libs(settings: Settings, *, mvn: str | None = None) -> bool:
    """Connect worker classpath + Debezium plugin under ``<state_dir>/connect``; True if downloaded."""
    lay = layout_for(settings)
    version = settings.stack.kafka_version
    a = _assemble(
        f"Kafka Connect {version}", render_connect_pom(version), lay.connect_pom, lay.connect_libs,
        lay.connect_libs_stamp, lambda d: _connect_libs_problem(d, version), mvn,
    )  # fmt: skip
    b = _assemble(
        f"Debezium PostgreSQL connector {DEBEZIUM_VERSION}", render_debezium_pom(), lay.debezium_pom,
        lay.debezium_plugin, lay.plugins_stamp, _plugin_problem, mvn,
    )  # fmt: skip
    return a or b


def render_worker_properties(settings: Settings) -> str:
    lay = layout_for(settings)
    return (
        _template("connect-standalone.properties")
        .replace("@KAFKA_PORT@", str(settings.stack.kafka_port))
        .replace("@CONNECT_PORT@", str(settings.stack.connect_port))
        .replace("@PLUGIN_PATH@", str(lay.plugins))
        .replace("@OFFSETS_FILE@", str(lay.connect_offsets))
    )


def _write_connect_config(settings: Settings) -> None:
    lay = layout_for(settings)
    lay.connect_offsets.parent.mkdir(parents=True, exist_ok=True)
    lay.worker_properties.write_text(render_worker_properties(settings))
    lay.connect_log4j.write_text(_template("connect-log4j2.properties"))


def _connect_cmd(settings: Settings, java: str) -> list[str]:
    lay = layout_for(settings)
    return [
        java, "-Xms128m", f"-Xmx{CONNECT_HEAP}", *KAFKA_JVM_OPTS,
        f"-Dlog4j2.configurationFile={lay.connect_log4j}", f"-Dkafka.logs.dir={lay.connect_dir}",
        "-cp", f"{lay.connect_libs}/*", "org.apache.kafka.connect.cli.ConnectStandalone",
        str(lay.worker_properties),
    ]  # fmt: skip


_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_json(method: str, url: str, body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
    """One JSON request to the Connect REST API (never through a proxy); (status, body)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method,
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )  # fmt: skip
    try:
        with _no_proxy.open(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        payload = json.loads(raw) if raw else None
    except ValueError:
        payload = raw.decode(errors="replace")
    return status, payload


DEBEZIUM_CLASS = "io.debezium.connector.postgresql.PostgresConnector"


def _connect_answers(settings: Settings) -> bool:
    if not _port_accepts(settings.stack.connect_port):
        return False
    try:
        status, plugins = _http_json("GET", connect_url(settings) + "/connector-plugins", timeout=5)
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


def connector_config(
    settings: Settings, overrides: dict[str, str] | None = None, *, path: Path = CONNECTOR_FILE
) -> tuple[str, dict[str, str]]:
    """(name, config) of the connector file, ``@POSTGRES_PORT@`` filled in, ``overrides`` applied.

    ``overrides`` may also hold ``name``. Keys starting with ``_`` are dropped.
    """
    try:
        doc = json.loads(
            path.read_text().replace("@POSTGRES_PORT@", str(settings.stack.postgres_port))
        )
        name = str(doc["name"])
        config = {str(k): str(v) for k, v in doc["config"].items() if not str(k).startswith("_")}
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise UserError(
            f"connector file {path} is not a {{name, config}} JSON document: {exc}"
        ) from None
    for key, value in (overrides or {}).items():
        if key == "name":
            name = value
        else:
            config[key] = value
    config["name"] = name
    return name, config


def connector_status(settings: Settings, name: str) -> dict[str, Any] | None:
    """The Connect REST ``/connectors/<name>/status`` document, None if not registered."""
    status, body = _http_json("GET", f"{connect_url(settings)}/connectors/{name}/status", timeout=5)
    if status == 404:
        return None
    if status != 200 or not isinstance(body, dict):
        raise UserError(f"connect: GET /connectors/{name}/status answered {status}: {body}")
    return body


def _trace_summary(trace: Any) -> str:
    lines = [ln.strip() for ln in str(trace or "").splitlines() if ln.strip()]
    if not lines:
        return "no trace"
    causes = [ln for ln in lines if ln.startswith("Caused by:")]
    return lines[0] + (f" ({causes[-1]})" if causes else "")


def wait_connector_running(settings: Settings, name: str, timeout: float) -> dict[str, Any]:
    """Poll until the connector and all its tasks are RUNNING; UserError (naming the log) if not."""
    lay = layout_for(settings)
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = connector_status(settings, name)
        except (OSError, UserError) as exc:
            last = str(exc)
        if isinstance(last, dict):
            tasks = last.get("tasks") or []
            states = [last.get("connector", {}).get("state")] + [t.get("state") for t in tasks]
            failed = [t for t in [last.get("connector", {}), *tasks] if t.get("state") == "FAILED"]
            if failed:
                raise UserError(
                    f"connect: connector {name} FAILED: {_trace_summary(failed[-1].get('trace'))}; "
                    f"see {lay.connect_log}"
                )
            if tasks and all(s == "RUNNING" for s in states):
                return last
        if time.monotonic() > deadline:
            raise UserError(
                f"connect: connector {name} not RUNNING within {timeout:.0f} s (status: {last}); "
                f"see {lay.connect_log}; last lines:\n{_log_tail(lay.connect_log)}"
            )
        time.sleep(0.25)


def register_connector(
    settings: Settings, name: str, config: dict[str, str], *, timeout: float | None = None
) -> dict[str, Any]:
    """Create or update connector ``name`` (PUT /connectors/<name>/config); wait until RUNNING."""
    status, body = _http_json(
        "PUT",
        f"{connect_url(settings)}/connectors/{name}/config",
        {**config, "name": name},
        timeout=60,
    )
    if status not in (200, 201):
        msg = body.get("message") if isinstance(body, dict) else body
        raise UserError(f"connect: registering connector {name} failed ({status}): {msg}")
    current = connector_status(settings, name) or {}
    parts = [current.get("connector", {}), *(current.get("tasks") or [])]
    if any(p.get("state") == "FAILED" for p in parts):
        # an unchanged config does not restart a failed connector; ask for it
        _say(f"connect: connector {name} had FAILED; restarting it")
        _http_json(
            "POST",
            f"{connect_url(settings)}/connectors/{name}/restart?includeTasks=true&onlyFailed=true",
            timeout=60,
        )
        time.sleep(1.0)
    return wait_connector_running(settings, name, timeout or settings.stack.start_timeout_s)


def delete_connector(settings: Settings, name: str, timeout: float = 60.0) -> bool:
    """DELETE the connector; True if it existed. Waits until it is gone from the worker."""
    status, body = _http_json(
        "DELETE", f"{connect_url(settings)}/connectors/{name}", timeout=timeout
    )
    if status == 404:
        return False
    if status not in (200, 204):
        raise UserError(f"connect: deleting connector {name} failed ({status}): {body}")
    deadline = time.monotonic() + timeout
    while connector_status(settings, name) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    return True


def remove_connector(settings: Settings, name: str, timeout: float = 60.0) -> None:
    """Stop the connector, forget its source offsets (KIP-875), delete it. Best effort."""
    base = f"{connect_url(settings)}/connectors/{name}"
    status, _ = _http_json("PUT", base + "/stop", timeout=timeout)
    if status == 404:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = connector_status(settings, name)
        if body is None or body.get("connector", {}).get("state") == "STOPPED":
            break
        time.sleep(0.2)
    _http_json("DELETE", base + "/offsets", timeout=timeout)
    delete_connector(settings, name, timeout=timeout)


# --------------------------------------------------------------------------- readiness

_quiet = logging.getLogger("bucketsync.stack.librdkafka")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


def _kafka_answers(port: int) -> bool:
    if not _port_accepts(port):
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


def _redis_answers(port: int) -> bool:
    import redis

    client = redis.Redis(host=HOST, port=port, socket_connect_timeout=1, socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _wait_ready(settings: Settings, services: list[Service], started: dict[str, float]) -> None:
    probes: dict[str, Callable[[], bool]] = {
        "kafka": lambda: _kafka_answers(settings.stack.kafka_port),
        "redis": lambda: _redis_answers(settings.stack.redis_port),
        "postgres": lambda: _pg_answers(settings),
        "connect": lambda: _connect_answers(settings),
    }
    pending = {s.name: s for s in services}
    t0 = time.monotonic()
    deadline = t0 + settings.stack.start_timeout_s
    while pending:
        for name, svc in list(pending.items()):
            pid = _read_pid(svc.pid_file)
            if pid is None or not _alive(pid):
                child = _children.get(pid) if pid else None
                code = f" with exit code {child.returncode}" if child is not None else ""
                raise UserError(
                    f"{name}: the process exited during start-up{code}; see {svc.log_file}, "
                    f"last lines:\n{_log_tail(svc.log_file)}"
                )
            if probes[name]():
                took = time.monotonic() - started.get(name, t0)
                how = f"{took:.1f} s" if name in started else "already running"
                _say(f"{name}: ready at {svc.address} (pid {pid}, {how})")
                del pending[name]
        if not pending:
            break
        if time.monotonic() > deadline:
            name, svc = next(iter(pending.items()))
            raise UserError(
                f"{name} did not answer at {svc.address} within {settings.stack.start_timeout_s:.0f} s "
                f"(pid {_read_pid(svc.pid_file)} still running); see {svc.log_file} or raise "
                f"stack.start_timeout_s; last lines:\n{_log_tail(svc.log_file)}"
            )
        time.sleep(0.25)


# --------------------------------------------------------------------------- locking


@contextlib.contextmanager
def _locked(lay: Layout) -> Iterator[None]:
    """Serialise up/down/reset on one state dir (several test sessions may race)."""
    lay.root.mkdir(parents=True, exist_ok=True)
    with lay.lock.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"stack: waiting for another `bucketsync stack` command on {lay.root} ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- actions


def _check_source(source: str) -> bool:
    if source not in SOURCES:
        raise UserError(f"unknown source '{source}'; use one of: {', '.join(SOURCES)}")
    return source == "postgres"


def ensure_up(settings: Settings, source: str = "none") -> dict[str, str]:
    """Start whatever part of the stack is not running and wait until all of it answers.

    Returns ``{"kafka": "127.0.0.1:9092", "redis": "redis://127.0.0.1:6379/0"}``; with
    ``source="postgres"`` also ``postgres`` (the app user's URL), ``connect`` (REST URL) and
    ``connector`` (the registered connector's name).
    """
    with_source = _check_source(source)
    lay = layout_for(settings)
    st = settings.stack
    kafka, redis_svc = _services(settings)
    pg_svc, connect_svc = _source_services(settings)
    with _locked(lay):
        kafka_pid = kafka.running_pid()
        redis_pid = redis_svc.running_pid()
        # Preflight everything before starting anything, so a failure leaves nothing behind.
        java = redis_bin = None
        if kafka_pid is None:
            if st.kafka_port == st.kafka_controller_port:
                raise UserError(
                    f"stack.kafka_port and stack.kafka_controller_port are both {st.kafka_port}; "
                    "set them to two different ports"
                )
            _check_ports_free(
                [(st.kafka_port, "kafka_port"), (st.kafka_controller_port, "kafka_controller_port")]
            )
            java = _check_java()
            heap_mib(st.kafka_heap)
        if redis_pid is None:
            redis_bin = _ensure_redis_server()
            _check_ports_free([(st.redis_port, "redis_port")])
        pg_bin: Path | None = None
        pg_user: tuple[int, int] | None = None
        connect_java: str | None = None
        if with_source:
            ports = {st.kafka_port, st.kafka_controller_port, st.redis_port}
            for key in ("postgres_port", "connect_port"):
                if getattr(st, key) in ports:
                    raise UserError(
                        f"stack.{key} ({getattr(st, key)}) collides with another stack port"
                    )
                ports.add(getattr(st, key))
            if pg_svc.running_pid() is None:
                pg_bin = _ensure_pg_bindir()
                _check_pg_version(pg_bin)
                pg_user = _pg_user()
                _check_ports_free([(st.postgres_port, "postgres_port")])
            if connect_svc.running_pid() is None:
                try:
                    connect_java = java or _check_java()
                except UserError as exc:  # no usable Java: the source cannot run here
                    raise SourceUnavailable(str(exc)) from None
                _check_ports_free([(st.connect_port, "connect_port")])
                ensure_connect_libs(settings)
            if pg_bin is not None:
                _pg_prepare(settings, pg_bin, pg_user)
        started: dict[str, float] = {}
        if java is not None:
            ensure_libs(settings)
            _write_kafka_config(settings)
            _ensure_formatted(settings, java)
            started["kafka"] = time.monotonic()
            pid = _spawn(
                _kafka_cmd(settings, java),
                cwd=lay.kafka_dir,
                log=lay.kafka_log,
                pid_file=lay.kafka_pid,
            )
            _say(f"kafka: starting (pid {pid}, log {lay.kafka_log})...")
        if redis_bin is not None:
            lay.redis_dir.mkdir(parents=True, exist_ok=True)
            lay.redis_conf.write_text(render_redis_conf(settings))
            started["redis"] = time.monotonic()
            pid = _spawn(
                [redis_bin, str(lay.redis_conf)], cwd=lay.redis_dir, log=lay.redis_log,
                pid_file=lay.redis_pid,
            )  # fmt: skip
            _say(f"redis: starting (pid {pid}, log {lay.redis_log})...")
        if pg_bin is not None:
            started["postgres"] = time.monotonic()
            pid = _spawn(
                _pg_cmd(settings, pg_bin), cwd=_pg_home(settings), log=lay.pg_log, pid_file=lay.pg_pid,
                user=pg_user,
            )  # fmt: skip
            _say(f"postgres: starting (pid {pid}, log {lay.pg_log})...")
        _wait_ready(settings, [kafka, redis_svc, *([pg_svc] if with_source else [])], started)
        if not with_source:
            return {"kafka": kafka_address(settings), "redis": redis_url(settings)}
        _pg_bootstrap(settings)
        if connect_java is not None:
            _write_connect_config(settings)
            started["connect"] = time.monotonic()
            pid = _spawn(
                _connect_cmd(settings, connect_java), cwd=lay.connect_dir, log=lay.connect_log,
                pid_file=lay.connect_pid,
            )  # fmt: skip
            _say(f"connect: starting (pid {pid}, log {lay.connect_log})...")
        _wait_ready(settings, [connect_svc], started)
        name, config = connector_config(settings)
        t0 = time.monotonic()
        register_connector(settings, name, config)
        _say(
            f"debezium: connector {name} RUNNING ({time.monotonic() - t0:.1f} s): "
            f"topics {config.get('topic.prefix')}.<schema>.<table>, slot {config.get('slot.name')}"
        )
    return {
        "kafka": kafka_address(settings),
        "redis": redis_url(settings),
        "postgres": postgres_dsn(settings),
        "connect": connect_url(settings),
        "connector": name,
    }


def _fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(size) < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _connector_row(settings: Settings) -> dict[str, Any]:
    """The Debezium connector as a status row: REST state of connector + tasks, slot lag."""
    lay = layout_for(settings)
    name, config = connector_config(settings)
    row: dict[str, Any] = {
        "name": "debezium",
        "address": f"{connect_url(settings)}/connectors/{name}",
        "pid": None,
        "state": "unknown",
        "log": str(lay.connect_log),
        "detail": "",
    }
    try:
        body = connector_status(settings, name)
    except (OSError, UserError) as exc:
        row["state"], row["detail"] = "unreachable", str(exc)[:120]
        return row
    if body is None:
        row["state"] = "not registered"
        return row
    cstate = str(body.get("connector", {}).get("state", "?"))
    tasks = [str(t.get("state")) for t in body.get("tasks") or []]
    running = cstate == "RUNNING" and bool(tasks) and all(t == "RUNNING" for t in tasks)
    row["state"] = "running" if running else cstate.lower()
    parts = [f"tasks {','.join(tasks) or 'none'}"]
    slot = config.get("slot.name", "")
    with contextlib.suppress(UserError, OSError):
        lag = slot_lag_bytes(settings, slot)
        if lag is not None:
            row["slot_lag_bytes"] = lag
            parts.append(f"slot {slot} lag {_fmt_bytes(lag)} of WAL")
    row["detail"] = "; ".join(parts)
    return row


def stack_status(settings: Settings, source: str = "none") -> list[dict[str, Any]]:
    """One dict per service: name, address, pid, state ("running"/"stopped"), log.

    ``source="postgres"`` adds PostgreSQL, the Connect worker and the Debezium connector
    (its state from Connect's REST API, ``detail`` with task states and replication-slot lag).
    """
    with_source = _check_source(source)
    rows = []
    services = _services(settings) + (_source_services(settings) if with_source else [])
    for svc in services:
        pid = svc.running_pid()
        rows.append(
            {
                "name": svc.name,
                "address": svc.address,
                "pid": pid,
                "state": "running" if pid else "stopped",
                "log": str(svc.log_file),
            }
        )
    if with_source:
        if rows[-1]["state"] == "running":
            rows.append(_connector_row(settings))
        else:
            name, _ = connector_config(settings)
            rows.append(
                {
                    "name": "debezium",
                    "address": f"{connect_url(settings)}/connectors/{name}",
                    "pid": None,
                    "state": "stopped",
                    "log": rows[-1]["log"],
                    "detail": "connect is not running",
                }
            )
    return rows


def _source_running(settings: Settings) -> bool:
    return any(svc.running_pid() for svc in _source_services(settings))


def _stop(services: list[Service]) -> None:
    victims: list[tuple[Service, int, float]] = []
    for svc in services:
        pid = _read_pid(svc.pid_file)
        if pid is None:
            continue
        if _alive(pid) and svc.owns(pid):
            _say(f"{svc.name}: stopping (pid {pid})...")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, svc.stop_signal)
            victims.append((svc, pid, time.monotonic()))
        else:
            # stale: the process is gone, or the pid now belongs to something else
            svc.pid_file.unlink(missing_ok=True)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    pending = list(victims)
    while pending and time.monotonic() < deadline:
        pending = [v for v in pending if _alive(v[1])]
        if pending:
            time.sleep(0.2)
    for svc, pid, _ in pending:
        _say(f"{svc.name}: still running after {STOP_TIMEOUT_S:.0f} s, sending SIGKILL (pid {pid})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        end = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < end:
            time.sleep(0.1)
    for svc, pid, t0 in victims:
        svc.pid_file.unlink(missing_ok=True)
        _children.pop(pid, None)
        _say(f"{svc.name}: stopped (pid {pid}, {time.monotonic() - t0:.1f} s)")


def down(settings: Settings) -> None:
    """Stop the processes named by our pid files (only if they still run our command).

    Order: the Connect worker first (it commits its offsets and releases the replication
    slot), then PostgreSQL (fast shutdown), then Kafka and Redis.
    """
    lay = layout_for(settings)
    if not lay.root.exists():
        _say(f"stack: nothing to stop ({lay.root} does not exist)")
        return
    with _locked(lay):
        pg_svc, connect_svc = _source_services(settings)
        _stop([connect_svc])
        _stop([pg_svc])
        _stop(_services(settings))


def reset(settings: Settings) -> None:
    """``down``, then delete Kafka, Redis, PostgreSQL and Connect-offset data (jars stay)."""
    lay = layout_for(settings)
    if not lay.root.exists():
        _say(f"stack: nothing to reset ({lay.root} does not exist)")
        return
    with _locked(lay):
        pg_svc, connect_svc = _source_services(settings)
        _stop([connect_svc])
        _stop([pg_svc])
        _stop(_services(settings))
        for path in (lay.kafka_data, lay.redis_dir, _pg_data(settings), lay.connect_offsets.parent):
            shutil.rmtree(path, ignore_errors=True)
        rotated = lay.kafka_log.with_name(lay.kafka_log.name + ".1")
        for path in (lay.cluster_id, lay.kafka_data_info, lay.kafka_log, rotated):
            path.unlink(missing_ok=True)
    _say(
        f"stack: deleted Kafka and Redis data under {lay.root} (kept {lay.libs.name}/)"
        + ("; also PostgreSQL data and Connect offsets" if lay.pg_dir.exists() else "")
    )


def _print_status(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    cols = ("service", "address", "pid", "state", "log")

    def state(r: dict[str, Any]) -> str:
        return f"{r['state']} ({r['detail']})" if r.get("detail") else str(r["state"])

    table = [[r["name"], r["address"], str(r["pid"] or "-"), state(r), r["log"]] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(cols)]
    for row in [list(cols), *table]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def main(settings: Settings, args: argparse.Namespace) -> int:
    """``bucketsync stack ACTION [--source postgres]``; returns the exit code."""
    source = getattr(args, "source", "none") or "none"
    _check_source(source)
    action = args.action
    if action == "up":
        t0 = time.monotonic()
        addrs = ensure_up(settings, source=source)
        extra = ""
        if source == "postgres":
            extra = (
                f", postgres {addrs['postgres']}, connect {addrs['connect']} "
                f"(connector {addrs['connector']})"
            )
        _say(
            f"stack: up in {time.monotonic() - t0:.1f} s: kafka {addrs['kafka']}, "
            f"redis {addrs['redis']}{extra}"
        )
        return 0
    if action == "down":
        down(settings)
        return 0
    if action == "reset":
        reset(settings)
        return 0
    if action == "status":
        rows = stack_status(settings, source=source)
        _print_status(rows, bool(getattr(args, "json", False)))
        if source == "none" and _source_running(settings):
            _say("stack: the postgres source runs too; `bucketsync stack status --source postgres`")
        return 0 if all(r["state"] == "running" for r in rows) else 1
    raise UserError(f"unknown stack action '{action}'; use up, down, status or reset")
