"""Processes, ports and configs for benchmarks: one way to write a run's config, spawn a
``bucketsync`` command as a child, wait until it listens, stop it, read its (and its worker
processes') RSS and CPU, start private redis-servers, and remove a run's keys."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import redis
import yaml

from bucketsync.config import Settings, load_settings
from pipeline.store import Store, drop_prefix, redis_encoding_args

#: raises the child's open-file limit to its hard limit before the CLI starts (many streams)
_RAISE_NOFILE = (
    "import resource as r; h=r.getrlimit(r.RLIMIT_NOFILE)[1]; r.setrlimit(r.RLIMIT_NOFILE,(h,h))"
)


def raise_nofile() -> None:
    """Raise this process's open-file limit to its hard limit (it holds many sockets)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


#: sync rules of the benchmarks with one bucket per user (``todos.owner_id``)
TODOS_BY_USER_RULES = """
bucket_definitions:
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT * FROM todos WHERE owner_id = bucket.user_id
"""


def own_topics(topics: list[str], group_id: str, dead_letter_topic: str) -> dict[str, Any]:
    """The ``kafka`` section of a run that consumes its own topics only (no pattern)."""
    return {
        "topics": topics,
        "topic_pattern": None,
        "group_id": group_id,
        "dead_letter_topic": dead_letter_topic,
    }


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env() -> dict[str, str]:
    """This environment without ``BUCKETSYNC_*`` overrides, so the child's config file rules."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BUCKETSYNC_")}


def write_config(
    settings: Settings, path: Path, sections: dict[str, dict[str, Any]] | None = None, **top: Any
) -> Settings:
    """``settings`` with ``sections`` updated (``{"redis": {"prefix": ...}}``) and top-level
    keys replaced, written as YAML to ``path``; returns the settings the child will load."""
    data = settings.model_dump(mode="json", exclude={"config_dir"})
    for section, values in (sections or {}).items():
        data[section].update(values)
    data.update(top)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return load_settings(path)


def spawn_cli(
    command: str,
    cfg: Path,
    *extra: str,
    out: IO[bytes] | int = subprocess.DEVNULL,
    err: IO[bytes] | int | None = None,
    raise_nofile: bool = False,
    log: Path | None = None,
) -> subprocess.Popen[bytes]:
    """``bucketsync --config cfg command *extra`` as a child process, stdout to ``out`` and
    stderr to ``err`` (default: same as ``out``; both discarded unless given), or both
    appended to the file ``log``; ``raise_nofile`` for children holding thousands of sockets."""
    if log is not None:
        with log.open("ab") as f:
            return spawn_cli(command, cfg, *extra, out=f, raise_nofile=raise_nofile)
    argv = ["--config", str(cfg), command, *extra]
    if raise_nofile:
        code = f"{_RAISE_NOFILE}; from bucketsync.cli import main; raise SystemExit(main({argv!r}))"
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, "-m", "bucketsync.cli", *argv]
    return subprocess.Popen(cmd, env=child_env(), stdout=out, stderr=out if err is None else err)


def wait_listening(
    port: int, proc: subprocess.Popen[bytes], log: Path | None = None, timeout: float = 60.0
) -> None:
    """Return once something accepts connections on 127.0.0.1:``port``; raise when ``proc``
    exits first or ``timeout`` passes (the message names ``log``)."""
    see = f"; see {log}" if log is not None else ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}){see}")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s{see}")


def wait_for(pred: Callable[[], Any], timeout: float, what: str) -> None:
    """Poll ``pred`` until it is true (Redis errors count as not yet); raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError):
            if pred():
                return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout``; returns the exit code (None: no process)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def kill(*procs: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL what still runs (a crash, as the recovery benchmark wants it)."""
    for p in procs:
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(10)


def rss_kb(pid: int) -> int:
    """Resident set size of a process in KiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(*pids: int) -> float:
    """User + system CPU seconds of processes so far (gone processes count 0)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a gateway's worker processes)."""
    out = [pid]
    for p in out:
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        out.extend(int(k) for k in kids)
    return out


def tree_rss_kb(pid: int) -> int:
    """:func:`rss_kb` summed over a process and its descendants."""
    return sum(rss_kb(p) for p in process_tree(pid))


def tree_cpu_seconds(pid: int) -> float:
    """:func:`cpu_seconds` of a process and its descendants (``--workers`` > 1 forks)."""
    return cpu_seconds(*process_tree(pid))


def _redis_server(folder: Path, port: int, *extra: str) -> subprocess.Popen[bytes] | None:
    """A redis-server without persistence on 127.0.0.1:``port``, working in ``folder``, with
    the store's encoding settings (``REDIS_ENCODING``; None when no redis-server binary is
    installed)."""
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
    argv += ["--save", "", "--appendonly", "no", *redis_encoding_args(), *extra]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _ping(port: int) -> bool:
    r = redis.Redis(port=port)
    try:
        return bool(r.ping())
    finally:
        r.close()


def _replica_up(port: int) -> bool:
    r = redis.Redis(port=port)
    try:
        return bool(r.info("replication")["master_link_status"] == "up")
    finally:
        r.close()


def private_redis(tmp: Path) -> tuple[subprocess.Popen[bytes], str] | None:
    """A redis-server of the benchmark's own (so ``INFO cpu`` counts only its work), with its
    URL; None when no redis-server binary is installed."""
    port = free_port()
    proc = _redis_server(tmp, port)
    if proc is None:
        return None
    try:
        wait_for(lambda: _ping(port), 20, "redis-server")
    except BaseException:
        stop(proc)
        raise
    return proc, f"redis://127.0.0.1:{port}/0"


def primary_and_replica(workdir: Path) -> tuple[list[subprocess.Popen[bytes]], str, str]:
    """A private redis-server primary and a replica of it (no persistence): the processes
    and the two URLs (stop them with :func:`stop`)."""
    pport, rport = free_port(), free_port()
    servers: list[subprocess.Popen[bytes]] = []
    try:
        primary = _redis_server(workdir / "primary", pport)
        if primary is None:
            raise RuntimeError("redis-server is not installed")
        servers.append(primary)
        wait_for(lambda: _ping(pport), 20, "primary")
        replica = _redis_server(workdir / "replica", rport, "--replicaof", "127.0.0.1", str(pport))
        assert replica is not None
        servers.append(replica)
        wait_for(lambda: _replica_up(rport), 30, "replica link")
    except BaseException:
        for srv in servers:
            stop(srv)
        raise
    return servers, f"redis://127.0.0.1:{pport}/0", f"redis://127.0.0.1:{rport}/0"


def delete_prefixes(url: str, prefixes: list[str]) -> None:
    """Remove every key under ``<prefix>:`` for each prefix (a benchmark's leftovers)."""
    for prefix in prefixes:
        drop_prefix(url, prefix)


async def drop_store(store: Store) -> None:
    """Remove every key under the store's prefix, then close it (an async benchmark's end)."""
    try:
        keys = [k async for k in store.r.scan_iter(match=f"{store.prefix}:*", count=5000)]
        for i in range(0, len(keys), 1000):
            await store.r.unlink(*keys[i : i + 1000])
    finally:
        await store.close()


def gateway_metric_lines(port: int) -> list[tuple[str, str]]:
    """``(name with labels, value)`` of each sample on a gateway's /metrics (one worker's,
    with ``--workers`` > 1); empty when it does not answer."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return []
    return [(name, value) for name, _, value in (ln.rpartition(" ") for ln in text.splitlines())]
