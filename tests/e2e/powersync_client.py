"""Drive the official PowerSync Node client (``@powersync/node`` 1.1.0) from Python tests.

The client runs as a long-lived Node process (``tests/e2e/client/driver.mjs``) scripted over
JSON lines on stdin/stdout. Typical use in a pytest-asyncio test::

    # in a module under tests/e2e/ (a package: tests/e2e/__init__.py)
    from .powersync_client import PowerSyncNodeClient, require_node_client

    async def test_sync(gateway_url, token):
        require_node_client()                       # skip (loudly) if Node/npm are unavailable
        schema = {"todos": {"description": "text", "completed": "integer"}}
        async with PowerSyncNodeClient(gateway_url, schema) as client:
            await client.connect(token)
            await client.wait_synced(timeout=30)
            rows = await client.query("SELECT id, description FROM todos ORDER BY id")
            await client.wait_for("SELECT id FROM todos ORDER BY id", [{"id": "t1"}], timeout=10)
            assert client.checksum_mismatches == []

See ``tests/e2e/client/README.md`` for the driver's command and event reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
CLIENT_DIR = Path(__file__).resolve().parent / "client"
DRIVER = CLIENT_DIR / "driver.mjs"
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install-node-client.sh"
MIN_NODE_MAJOR = 20

#: Set to 1 to turn "Node client unavailable" skips into failures (CI that must run e2e tests).
REQUIRE_ENV = "BUCKETSYNC_TEST_REQUIRE_NODE"

Schema = Mapping[str, Any]
Row = dict[str, Any]


class DriverError(RuntimeError):
    """A driver command failed (``ok: false``) or the driver process died."""

    def __init__(self, message: str, response: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.response: dict[str, Any] = dict(response or {})


class DriverTimeout(DriverError, TimeoutError):
    """A wait (``wait_synced``, ``wait_for``, ``wait_event``) ran out of time."""


# ------------------------------------------------------------------------------------------------
# Availability / installation


def _node_version(node: str) -> tuple[int, str] | None:
    try:
        out = subprocess.run(
            [node, "-p", "process.versions.node"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    version = out.stdout.strip()
    m = re.match(r"(\d+)\.", version)
    return (int(m.group(1)), version) if out.returncode == 0 and m else None


def _installed() -> bool:
    return (CLIENT_DIR / "node_modules" / "@powersync" / "node" / "package.json").is_file() and (
        CLIENT_DIR / "node_modules" / "better-sqlite3" / "build" / "Release" / "better_sqlite3.node"
    ).is_file()


def node_client_available() -> tuple[bool, str]:
    """Whether the driver can run right now: (ok, reason). Does not install anything."""
    node = shutil.which("node")
    if node is None:
        return False, "node is not on PATH (need Node >= 20 for @powersync/node)"
    if shutil.which("npm") is None:
        return False, "npm is not on PATH"
    ver = _node_version(node)
    if ver is None:
        return False, f"cannot run {node}"
    if ver[0] < MIN_NODE_MAJOR:
        return False, f"node {ver[1]} is too old (need >= {MIN_NODE_MAJOR})"
    if not DRIVER.is_file():
        return False, f"missing {DRIVER}"
    if not _installed():
        return False, f"client not installed: run {INSTALL_SCRIPT.relative_to(REPO_ROOT)}"
    return True, f"node {ver[1]}, client in {CLIENT_DIR}"


def ensure_node_client_installed(timeout: float = 1200.0) -> tuple[bool, str]:
    """Install the client (scripts/install-node-client.sh) if needed: (ok, reason).

    The script is idempotent (stamp file) and serialises concurrent runs; the first install
    compiles better-sqlite3 from source (~1.5-2 minutes).
    """
    ok, reason = node_client_available()
    if ok:
        return ok, reason
    if shutil.which("node") is None or shutil.which("npm") is None or "too old" in reason:
        return False, reason
    try:
        proc = subprocess.run(
            ["bash", str(INSTALL_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO_ROOT,
        )
    except subprocess.TimeoutExpired:
        return False, f"{INSTALL_SCRIPT.name} timed out after {timeout:.0f}s"
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        return False, f"{INSTALL_SCRIPT.name} failed (exit {proc.returncode}):\n{tail}"
    return node_client_available()


def require_node_client() -> None:
    """For tests: install if needed, else ``pytest.skip`` loudly (``pytest.fail`` if
    ``BUCKETSYNC_TEST_REQUIRE_NODE=1``)."""
    import pytest

    ok, reason = ensure_node_client_installed()
    if ok:
        return
    msg = f"OFFICIAL POWERSYNC NODE CLIENT UNAVAILABLE, e2e test not run: {reason}"
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(msg)
    pytest.skip(msg)


# ------------------------------------------------------------------------------------------------
# The client


class PowerSyncNodeClient:
    """One official PowerSync client (its own local SQLite file), driven over JSON lines.

    Use as ``async with PowerSyncNodeClient(endpoint, schema) as c:`` or call ``await start()``
    and ``await close()`` yourself.

    Attributes kept up to date from the driver's events:

    * ``events``: every event (dicts with ``"event"``), in order;
    * ``logs``: every SDK log record emitted (``level``, ``level_name``, ``message``, ...);
    * ``checksum_mismatches``: one dict per "Checksums didn't match" warning
      (``message``, ``buckets``: [{bucket, expected, actual, op_checksum, add_checksum}]);
    * ``statuses``: every status event; ``last_status``: the latest one;
    * ``checkpoints_applied``: complete checkpoints applied by this client process;
    * ``uploads``: ``upload`` events (local writes acknowledged by the connector);
    * ``stderr_lines``: the driver's stderr (diagnostics, Node warnings).
    """

    def __init__(
        self,
        endpoint: str,
        schema: Schema,
        *,
        db_path: str | os.PathLike[str] | None = None,
        log_level: str = "debug",
        retry_delay_ms: int | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
        name: str = "client",
    ):
        self.endpoint = endpoint.rstrip("/")
        self.schema = dict(schema)
        self.log_level = log_level
        self.retry_delay_ms = retry_delay_ms
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.name = name
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        if db_path is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="psclient-")
            self.db_path = Path(self._tmpdir.name) / "client.db"
        else:
            self.db_path = Path(db_path)

        self.events: list[dict[str, Any]] = []
        self.logs: list[dict[str, Any]] = []
        self.checksum_mismatches: list[dict[str, Any]] = []
        self.statuses: list[dict[str, Any]] = []
        self.uploads: list[dict[str, Any]] = []
        self.checkpoints_applied = 0
        self.stdout_noise: list[str] = []
        self.stderr_lines: deque[str] = deque(maxlen=2000)
        self.ready_info: dict[str, Any] = {}

        self._proc: asyncio.subprocess.Process | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._event_cond: asyncio.Condition | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._exit_reason: str | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> PowerSyncNodeClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> PowerSyncNodeClient:
        ok, reason = node_client_available()
        if not ok:
            raise DriverError(f"PowerSync Node client unavailable: {reason}")
        env = dict(os.environ)
        # undici honours HTTP(S)_PROXY; never send loopback traffic through a proxy.
        no_proxy = ",".join(x for x in (env.get("NO_PROXY", ""), "127.0.0.1,localhost,::1") if x)
        env["NO_PROXY"] = env["no_proxy"] = no_proxy
        env.update(self.extra_env)
        cmd = [
            shutil.which("node") or "node",
            str(DRIVER),
            "--endpoint",
            self.endpoint,
            "--db",
            str(self.db_path),
            "--schema",
            json.dumps(self.schema),
            "--log-level",
            self.log_level,
        ]
        if self.retry_delay_ms is not None:
            cmd += ["--retry-delay", str(self.retry_delay_ms)]
        self._event_cond = asyncio.Condition()
        self._proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=str(CLIENT_DIR),
            env=env,
            limit=64 * 1024 * 1024,
        )
        self._tasks = [
            asyncio.create_task(self._read_stdout(), name=f"{self.name}-stdout"),
            asyncio.create_task(self._read_stderr(), name=f"{self.name}-stderr"),
        ]
        try:
            ready = await self.wait_event(
                lambda e: e.get("event") in ("ready", "fatal"), timeout=self.startup_timeout
            )
        except BaseException:
            await self._kill()
            raise
        if ready.get("event") == "fatal":
            await self._kill()
            raise DriverError(f"driver failed to start: {ready.get('message')}", ready)
        self.ready_info = ready
        return self

    async def close(self, timeout: float = 15.0) -> None:
        """Disconnect, close the SDK database, stop the process, remove the temp db dir."""
        if self._closed:
            return
        self._closed = True
        proc = self._proc
        try:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(Exception):
                    await self._command({"cmd": "close"}, timeout=timeout)
                try:
                    await asyncio.wait_for(proc.wait(), timeout=timeout)
                except TimeoutError:
                    await self._kill()
        finally:
            for t in self._tasks:
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                    await asyncio.wait_for(t, timeout=5)
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(DriverError("driver closed"))
            self._pending.clear()
            if self._tmpdir is not None:
                self._tmpdir.cleanup()
                self._tmpdir = None

    async def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), timeout=10)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    # -- I/O ----------------------------------------------------------------------------------

    async def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        reader = self._proc.stdout
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                text = line.decode("utf-8", "replace").strip()
                if not text:
                    continue
                try:
                    msg = json.loads(text)
                except ValueError:
                    self.stdout_noise.append(text)
                    continue
                if not isinstance(msg, dict):
                    self.stdout_noise.append(text)
                    continue
                if "event" in msg:
                    await self._on_event(msg)
                elif msg.get("id") is not None:
                    fut = self._pending.pop(msg["id"], None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                else:
                    self.stdout_noise.append(text)
        finally:
            rc = await self._proc.wait()
            self._exit_reason = f"driver exited with code {rc}"
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(DriverError(f"{self._exit_reason}{self._stderr_tail()}"))
            self._pending.clear()
            await self._on_event({"event": "exit", "returncode": rc})

    async def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        while True:
            line = await self._proc.stderr.readline()
            if not line:
                break
            self.stderr_lines.append(line.decode("utf-8", "replace").rstrip("\n"))

    async def _on_event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        self.events.append(ev)
        if kind == "log":
            self.logs.append(ev)
        elif kind == "checksum_mismatch":
            self.checksum_mismatches.append(ev)
        elif kind == "status":
            self.statuses.append(ev)
        elif kind == "checkpoint_applied":
            self.checkpoints_applied = int(ev.get("count", self.checkpoints_applied + 1))
        elif kind == "upload":
            self.uploads.append(ev)
        assert self._event_cond is not None
        async with self._event_cond:
            self._event_cond.notify_all()

    def _stderr_tail(self, n: int = 15) -> str:
        lines = list(self.stderr_lines)[-n:]
        return ("\n--- driver stderr ---\n" + "\n".join(lines)) if lines else ""

    async def _command(self, req: dict[str, Any], timeout: float | None = 60.0) -> dict[str, Any]:
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise DriverError("driver not started")
        if proc.returncode is not None:
            raise DriverError(f"{self._exit_reason or 'driver exited'}{self._stderr_tail()}")
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        line = json.dumps({"id": rid, **req}, separators=(",", ":")) + "\n"
        try:
            proc.stdin.write(line.encode())
            await proc.stdin.drain()
            return await asyncio.wait_for(fut, timeout=timeout)
        except TimeoutError:
            raise DriverTimeout(
                f"driver did not answer {req.get('cmd')!r} within {timeout}s{self._stderr_tail()}"
            ) from None
        except (BrokenPipeError, ConnectionResetError) as e:
            raise DriverError(f"driver stdin closed: {e}{self._stderr_tail()}") from e
        finally:
            self._pending.pop(rid, None)

    async def command(
        self, cmd: str, *, timeout: float | None = 60.0, **fields: Any
    ) -> dict[str, Any]:
        """Send any driver command; raise DriverError/DriverTimeout unless ``ok``."""
        resp = await self._command({"cmd": cmd, **fields}, timeout=timeout)
        if not resp.get("ok"):
            err = resp.get("error", "unknown error")
            detail = ""
            if resp.get("status") is not None:
                detail += f"\nstatus: {json.dumps(resp['status'])}"
            if resp.get("rows") is not None:
                detail += f"\nlast rows: {json.dumps(resp['rows'])}"
            if resp.get("expect") is not None:
                detail += f"\nexpected:  {json.dumps(resp['expect'])}"
            if self.checksum_mismatches:
                detail += f"\nchecksum mismatches: {len(self.checksum_mismatches)}, last: {self.checksum_mismatches[-1].get('message')}"
            recent = [
                f"  [{r.get('level_name')}] {r.get('message')}" for r in resp.get("last_logs") or []
            ]
            if recent:
                detail += "\nrecent SDK logs:\n" + "\n".join(recent[-10:])
            exc = DriverTimeout if resp.get("error_code") == "timeout" else DriverError
            raise exc(f"{cmd}: {err}{detail}", resp)
        return resp

    # -- API ----------------------------------------------------------------------------------

    async def connect(
        self,
        token: str | None,
        *,
        params: Mapping[str, Any] | None = None,
        retry_delay_ms: int | None = 1000,
        upload_delay_ms: int = 0,
        endpoint: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """``db.connect()`` over HTTP streaming. ``fetchCredentials`` returns the endpoint and the
        current token. ``retry_delay_ms`` defaults to 1000 here (SDK default 5000; pass None)."""
        req: dict[str, Any] = {"token": token, "upload_delay_ms": upload_delay_ms, **options}
        if params is not None:
            req["params"] = dict(params)
        if retry_delay_ms is not None:
            req["retry_delay_ms"] = retry_delay_ms
        if endpoint is not None:
            req["endpoint"] = endpoint
        return await self.command("connect", **req)

    async def subscribe(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        *,
        priority: int | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """``db.syncStream(name, params).subscribe()``; returns once its
        ``waitForFirstSync()`` resolved."""
        return await self.command(
            "subscribe",
            timeout=timeout + 10,
            name=name,
            params=dict(params) if params is not None else None,
            priority=priority,
            timeout_ms=int(timeout * 1000),
        )

    async def wait_first_sync_priority(
        self, priority: int, count_tables: Sequence[str] = (), *, timeout: float = 30.0
    ) -> dict[str, Any]:
        """``db.waitForFirstSync({priority})``; returns the status captured when it resolved
        (``status_at_resolve``, ``status_for_priority``), the row counts of ``count_tables``
        read right after in one read transaction (``counts``, and ``oplog_rows``: the ops the
        client had downloaded by then, all buckets) and the status after them
        (``status_after_counts``)."""
        return await self.command(
            "wait_first_sync_priority",
            timeout=timeout + 10,
            priority=priority,
            count_tables=list(count_tables),
            timeout_ms=int(timeout * 1000),
        )

    async def set_token(self, token: str | None) -> None:
        """Token returned by the next ``fetchCredentials`` call (e.g. after a 401 / expiry)."""
        await self.command("set_token", token=token)

    async def disconnect(self) -> dict[str, Any]:
        return (await self.command("disconnect"))["status"]

    async def disconnect_and_clear(self) -> dict[str, Any]:
        return (await self.command("disconnect_and_clear"))["status"]

    async def status(self) -> dict[str, Any]:
        """Current SDK sync status (snake_case keys, see README) plus driver counters."""
        resp = await self.command("status")
        return {
            **resp["status"],
            **{
                k: resp[k]
                for k in (
                    "checkpoints_applied",
                    "checksum_mismatches",
                    "credentials_fetched",
                    "uploads",
                )
            },
        }

    async def wait_synced(
        self,
        timeout: float = 30.0,
        *,
        new: bool = False,
        this_run: bool = False,
        min_checkpoints: int | None = None,
    ) -> dict[str, Any]:
        """Wait for a synced state; returns the status.

        Default: ``hasSynced`` (immediate for a database that synced in an earlier run).
        ``new=True``: a complete checkpoint applied after this call. ``this_run=True``: at least
        one complete checkpoint applied by this process. ``min_checkpoints=N``: N of them.
        """
        req: dict[str, Any] = {"timeout_ms": int(timeout * 1000)}
        if new:
            req["new"] = True
        if this_run:
            req["this_run"] = True
        if min_checkpoints is not None:
            req["min_checkpoints"] = min_checkpoints
        resp = await self.command("wait_synced", timeout=timeout + 15, **req)
        return resp["status"]

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """``db.getAll(sql, params)``: the rows as dicts."""
        return (await self.command("query", sql=sql, params=list(params)))["rows"]

    async def write(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any]:
        """``db.execute`` a local write; the connector's uploadData acknowledges it, then the
        client requests a write checkpoint from the server."""
        return await self.command("write", sql=sql, params=list(params))

    async def wait_for(
        self,
        sql: str,
        expect: Sequence[Mapping[str, Any]],
        timeout: float = 30.0,
        params: Sequence[Any] = (),
        interval_ms: int = 100,
    ) -> list[Row]:
        """Poll until ``query(sql)`` equals ``expect`` exactly (row order matters: use ORDER BY).
        Raises DriverTimeout (with the last rows and status) otherwise."""
        resp = await self.command(
            "wait_for",
            timeout=timeout + 15,
            sql=sql,
            params=list(params),
            expect=[dict(r) for r in expect],
            timeout_ms=int(timeout * 1000),
            interval_ms=interval_ms,
        )
        return resp["rows"]

    async def tables(self) -> dict[str, list[Row]]:
        """Every schema table's rows, ordered by id."""
        return (await self.command("tables"))["tables"]

    async def dump_state(self) -> dict[str, Any]:
        """The core's ps_buckets / ps_oplog / ps_kv / ps_sync_state tables."""
        return (await self.command("dump_state"))["state"]

    async def client_id(self) -> str:
        return (await self.command("client_id"))["client_id"]

    async def driver_logs(self, since: int = 0, level: str | None = None) -> list[dict[str, Any]]:
        """The driver's buffered SDK log records (same records as ``self.logs``)."""
        req: dict[str, Any] = {"since": since}
        if level:
            req["level"] = level
        return (await self.command("logs", **req))["logs"]

    async def wait_event(
        self,
        predicate: str | Callable[[dict[str, Any]], bool],
        timeout: float = 30.0,
        *,
        start: int = 0,
    ) -> dict[str, Any]:
        """Wait for an event (name or predicate) among ``events[start:]``; returns it."""
        pred: Callable[[dict[str, Any]], bool]
        if isinstance(predicate, str):
            name = predicate

            def pred(e: dict[str, Any]) -> bool:
                return e.get("event") == name
        else:
            pred = predicate
        assert self._event_cond is not None
        deadline = time.monotonic() + timeout
        idx = start
        async with self._event_cond:
            while True:
                while idx < len(self.events):
                    ev = self.events[idx]
                    idx += 1
                    if pred(ev):
                        return ev
                    if ev.get("event") == "exit" and not pred(ev):
                        raise DriverError(
                            f"driver exited while waiting for an event{self._stderr_tail()}"
                        )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DriverTimeout(f"no matching event within {timeout}s{self._stderr_tail()}")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._event_cond.wait(), timeout=remaining)

    async def wait_checksum_mismatch(self, timeout: float = 30.0, start: int = 0) -> dict[str, Any]:
        """Wait for the (start+1)-th checksum_mismatch event."""
        return await self.wait_event(
            lambda e: e.get("event") == "checksum_mismatch" and e.get("index", 0) >= start,
            timeout=timeout,
        )

    def log_messages(self, min_level: int = 0) -> list[str]:
        return [r.get("message", "") for r in self.logs if r.get("level", 0) >= min_level]

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<PowerSyncNodeClient {self.name} {self.endpoint} db={self.db_path} {state}>"
