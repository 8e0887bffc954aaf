"""The Debezium connector on the Connect worker, through Connect's REST API.

Owns the connector file (``bucketsync/stack_files/debezium-postgres.json``, ``@POSTGRES_PORT@``
filled in), registering it (create or update, restart if FAILED, wait until the connector and
all its tasks are RUNNING), removing it with its source offsets, and its status row (REST
state plus the replication slot's lag). Used by ``stack up`` and by the demo, benchmarks and
tests that run their own connectors; the worker process itself is ``bucketsync.stack.connect``.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bucketsync.config import Settings
from bucketsync.errors import UserError
from bucketsync.stack.console import say
from bucketsync.stack.layout import STACK_FILES, layout_for
from bucketsync.stack.ports import HOST
from bucketsync.stack.postgres import slot_lag_bytes
from bucketsync.stack.processes import log_tail

CONNECTOR_FILE = STACK_FILES / "debezium-postgres.json"
DEBEZIUM_CLASS = "io.debezium.connector.postgresql.PostgresConnector"

_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def connect_url(settings: Settings) -> str:
    """Base URL of the Connect worker's REST API."""
    return f"http://{HOST}:{settings.stack.connect_port}"


def http_json(method: str, url: str, body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
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
    status, body = http_json("GET", f"{connect_url(settings)}/connectors/{name}/status", timeout=5)
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
                f"see {lay.connect_log}; last lines:\n{log_tail(lay.connect_log)}"
            )
        time.sleep(0.25)


def register_connector(
    settings: Settings, name: str, config: dict[str, str], *, timeout: float | None = None
) -> dict[str, Any]:
    """Create or update connector ``name`` (PUT /connectors/<name>/config); wait until RUNNING."""
    status, body = http_json(
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
        say(f"connect: connector {name} had FAILED; restarting it")
        http_json(
            "POST",
            f"{connect_url(settings)}/connectors/{name}/restart?includeTasks=true&onlyFailed=true",
            timeout=60,
        )
        time.sleep(1.0)
    return wait_connector_running(settings, name, timeout or settings.stack.start_timeout_s)


def register_stack_connector(settings: Settings) -> str:
    """(Re-)register the connector of :data:`CONNECTOR_FILE` as ``stack up`` does; its name."""
    name, config = connector_config(settings)
    t0 = time.monotonic()
    register_connector(settings, name, config)
    say(
        f"debezium: connector {name} RUNNING ({time.monotonic() - t0:.1f} s): "
        f"topics {config.get('topic.prefix')}.<schema>.<table>, slot {config.get('slot.name')}"
    )
    return name


def delete_connector(settings: Settings, name: str, timeout: float = 60.0) -> bool:
    """DELETE the connector; True if it existed. Waits until it is gone from the worker."""
    status, body = http_json(
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
    status, _ = http_json("PUT", base + "/stop", timeout=timeout)
    if status == 404:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = connector_status(settings, name)
        if body is None or body.get("connector", {}).get("state") == "STOPPED":
            break
        time.sleep(0.2)
    http_json("DELETE", base + "/offsets", timeout=timeout)
    delete_connector(settings, name, timeout=timeout)


def _fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(size) < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def connector_row(settings: Settings, worker_running: bool) -> dict[str, Any]:
    """The stack's connector as a status row: REST state of connector + tasks, slot lag."""
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
    if not worker_running:
        row["state"], row["detail"] = "stopped", "connect is not running"
        return row
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
