"""Processes, ports and configs for benchmarks: one way to write a run's config, spawn a
``bucketsync`` command as a child, stop it, read its RSS and CPU, and remove its keys."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import redis
import yaml

from bucketsync.config import Settings, load_settings
from pipeline.store import Store

#: raises the child's open-file limit to its hard limit before the CLI starts (many streams)
_RAISE_NOFILE = (
    "import resource as r; h=r.getrlimit(r.RLIMIT_NOFILE)[1]; r.setrlimit(r.RLIMIT_NOFILE,(h,h))"
)


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
) -> subprocess.Popen[bytes]:
    """``bucketsync --config cfg command *extra`` as a child process, stdout to ``out`` and
    stderr to ``err`` (default: same as ``out``; both discarded unless given);
    ``raise_nofile`` for children holding thousands of sockets."""
    argv = ["--config", str(cfg), command, *extra]
    if raise_nofile:
        code = f"{_RAISE_NOFILE}; from bucketsync.cli import main; raise SystemExit(main({argv!r}))"
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, "-m", "bucketsync.cli", *argv]
    return subprocess.Popen(cmd, env=child_env(), stdout=out, stderr=out if err is None else err)


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


def private_redis(tmp: Path) -> tuple[subprocess.Popen[bytes], str] | None:
    """A redis-server of the benchmark's own (so ``INFO cpu`` counts only its work), with its
    URL; None when no redis-server binary is installed."""
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    r = redis.Redis(port=port)
    for _ in range(100):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    r.close()
    return proc, f"redis://127.0.0.1:{port}/0"


def delete_prefixes(url: str, prefixes: list[str]) -> None:
    """Remove every key under ``<prefix>:`` for each prefix (a benchmark's leftovers)."""
    r = redis.Redis.from_url(url)
    try:
        for prefix in prefixes:
            batch = []
            for key in r.scan_iter(match=f"{prefix}:*", count=5000):
                batch.append(key)
                if len(batch) >= 1000:
                    r.unlink(*batch)
                    batch = []
            if batch:
                r.unlink(*batch)
    finally:
        r.close()


async def drop_store(store: Store) -> None:
    """Remove every key under the store's prefix, then close it (an async benchmark's end)."""
    try:
        keys = [k async for k in store.r.scan_iter(match=f"{store.prefix}:*", count=5000)]
        for i in range(0, len(keys), 1000):
            await store.r.unlink(*keys[i : i + 1000])
    finally:
        await store.close()
