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
import re
import shutil
import signal
import socket
import subprocess
import time
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


def layout_for(settings: Settings) -> Layout:
    return Layout(settings.state_dir.resolve())


def kafka_address(settings: Settings) -> str:
    return f"{HOST}:{settings.stack.kafka_port}"


def redis_url(settings: Settings) -> str:
    return f"redis://{HOST}:{settings.stack.redis_port}/0"


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


def _spawn(cmd: list[str], *, cwd: Path, log: Path, pid_file: Path) -> int:
    _rotate(log)
    with log.open("ab") as fh:
        fh.write(f"\n--- bucketsync stack up {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        fh.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
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
    pom = render_pom(version)
    digest = hashlib.sha256(pom.encode()).hexdigest()
    lay.kafka_dir.mkdir(parents=True, exist_ok=True)
    if not lay.pom.exists() or lay.pom.read_text() != pom:
        lay.pom.write_text(pom)
    try:
        stamp = lay.libs_stamp.read_text().strip()
    except OSError:
        stamp = ""
    if stamp == digest and _libs_problem(lay.libs, version) is None:
        return False
    mvn = mvn or _find_mvn()
    if not mvn:
        raise UserError(
            "mvn (Apache Maven) not found on PATH; it downloads the Kafka jars once: "
            "apt-get install -y maven (or install Maven 3.8+), then run `bucketsync stack up` again"
        )
    _say(f"kafka: downloading Kafka {version} jars from Maven Central (first run, ~1 min)...")
    tmp = lay.kafka_dir / "libs.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        mvn, "-q", "-B", "-f", str(lay.pom), "dependency:copy-dependencies",
        "-DincludeScope=runtime", f"-DoutputDirectory={tmp}",
    ]  # fmt: skip
    t0 = time.monotonic()
    try:
        res = subprocess.run(
            cmd, cwd=lay.kafka_dir, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise UserError(
            f"could not download Kafka jars from Maven Central: mvn timed out after "
            f"{DOWNLOAD_TIMEOUT_S:.0f} s; check network/proxy or ~/.m2/settings.xml"
        ) from None
    except OSError as exc:
        raise UserError(
            f"could not run {mvn} ({exc}); install Maven 3.8+ (apt-get install -y maven)"
        ) from None
    if res.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"could not download Kafka jars from Maven Central: "
            f"{_mvn_reason(res.stdout + res.stderr)}; check network/proxy or ~/.m2/settings.xml"
        )
    problem = _libs_problem(tmp, version)
    if problem:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"Kafka jars from Maven Central are incomplete ({problem}); "
            f"check stack.kafka_version ({version}) is a released 4.x version"
        )
    shutil.rmtree(lay.libs, ignore_errors=True)
    tmp.replace(lay.libs)
    lay.libs_stamp.write_text(digest + "\n")
    n = len(list(lay.libs.glob("*.jar")))
    _say(f"kafka: {n} jars in {lay.libs} ({time.monotonic() - t0:.1f} s)")
    return True


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


def ensure_up(settings: Settings) -> dict[str, str]:
    """Start whatever part of the stack is not running and wait until all of it answers.

    Returns ``{"kafka": "127.0.0.1:9092", "redis": "redis://127.0.0.1:6379/0"}``.
    """
    lay = layout_for(settings)
    st = settings.stack
    kafka, redis_svc = _services(settings)
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
        _wait_ready(settings, [kafka, redis_svc], started)
    return {"kafka": kafka_address(settings), "redis": redis_url(settings)}


def stack_status(settings: Settings) -> list[dict[str, Any]]:
    """One dict per service: name, address, pid, state ("running"/"stopped"), log."""
    rows = []
    for svc in _services(settings):
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
    return rows


def _stop(services: list[Service]) -> None:
    victims: list[tuple[Service, int, float]] = []
    for svc in services:
        pid = _read_pid(svc.pid_file)
        if pid is None:
            continue
        if _alive(pid) and svc.owns(pid):
            _say(f"{svc.name}: stopping (pid {pid})...")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
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
    """Stop the processes named by our pid files (only if they still run our command)."""
    lay = layout_for(settings)
    if not lay.root.exists():
        _say(f"stack: nothing to stop ({lay.root} does not exist)")
        return
    with _locked(lay):
        _stop(_services(settings))


def reset(settings: Settings) -> None:
    """``down``, then delete Kafka and Redis data (the downloaded jars stay)."""
    lay = layout_for(settings)
    if not lay.root.exists():
        _say(f"stack: nothing to reset ({lay.root} does not exist)")
        return
    with _locked(lay):
        _stop(_services(settings))
        for path in (lay.kafka_data, lay.redis_dir):
            shutil.rmtree(path, ignore_errors=True)
        rotated = lay.kafka_log.with_name(lay.kafka_log.name + ".1")
        for path in (lay.cluster_id, lay.kafka_data_info, lay.kafka_log, rotated):
            path.unlink(missing_ok=True)
    _say(f"stack: deleted Kafka and Redis data under {lay.root} (kept {lay.libs.name}/)")


def _print_status(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    cols = ("service", "address", "pid", "state", "log")
    table = [[r["name"], r["address"], str(r["pid"] or "-"), r["state"], r["log"]] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(cols)]
    for row in [list(cols), *table]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def main(settings: Settings, args: argparse.Namespace) -> int:
    """``bucketsync stack ACTION``; returns the exit code."""
    if getattr(args, "source", "none") == "postgres":
        raise UserError("--source postgres is not built yet (issue 6)")
    action = args.action
    if action == "up":
        t0 = time.monotonic()
        addrs = ensure_up(settings)
        _say(
            f"stack: up in {time.monotonic() - t0:.1f} s: kafka {addrs['kafka']}, redis {addrs['redis']}"
        )
        return 0
    if action == "down":
        down(settings)
        return 0
    if action == "reset":
        reset(settings)
        return 0
    if action == "status":
        rows = stack_status(settings)
        _print_status(rows, bool(getattr(args, "json", False)))
        return 0 if all(r["state"] == "running" for r in rows) else 1
    raise UserError(f"unknown stack action '{action}'; use up, down, status or reset")
