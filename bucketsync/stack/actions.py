"""``bucketsync stack up | down | status | reset``: loops over the components.

Owns which components make up the stack (:data:`BASE` always, plus those of the chosen
``--source``: :data:`SOURCE_COMPONENTS`) and the order of the steps; what each step does for a
service is that component's (``bucketsync.stack.component``). ``up`` runs, under the state
dir's lock: preflight of every component that is not running (ports free, tools present),
then their ``prepare`` (downloads, configs, initdb), and only then starts them stage by stage,
waiting for each stage to answer and configuring it before the next. A failed preflight or
prepare therefore leaves nothing started. Nothing here knows a particular service.
"""

from __future__ import annotations

import json
import shutil
import time
from typing import Any

from bucketsync.config import Settings
from bucketsync.errors import UserError
from bucketsync.stack.component import Component
from bucketsync.stack.connect import CONNECT
from bucketsync.stack.console import say
from bucketsync.stack.kafka import KAFKA
from bucketsync.stack.layout import layout_for
from bucketsync.stack.locking import locked
from bucketsync.stack.ports import check_ports_distinct, check_ports_free
from bucketsync.stack.postgres import POSTGRES
from bucketsync.stack.processes import alive, children, log_tail, read_pid, spawn, stop
from bucketsync.stack.redis import REDIS, REDIS_REPLICA

AnyComponent = Component[Any]

#: what every ``stack up`` runs
BASE: tuple[AnyComponent, ...] = (KAFKA, REDIS)
#: ``--source NAME``: the components a CDC source adds
SOURCE_COMPONENTS: dict[str, tuple[AnyComponent, ...]] = {
    "none": (),
    "postgres": (POSTGRES, CONNECT),
}
SOURCES = tuple(SOURCE_COMPONENTS)
#: every component, for ``down``/``reset`` (which act on whatever runs)
ALL: tuple[AnyComponent, ...] = tuple(
    dict.fromkeys(
        c for comps in (BASE, (REDIS_REPLICA,), *SOURCE_COMPONENTS.values()) for c in comps
    )
)


def components_for(source: str, settings: Settings | None = None) -> list[AnyComponent]:
    """The base components (with the Redis replica when ``stack.redis_replica_port`` is
    set) plus those of ``source``; UserError for an unknown source."""
    if source not in SOURCE_COMPONENTS:
        raise UserError(f"unknown source '{source}'; use one of: {', '.join(SOURCES)}")
    replica = [REDIS_REPLICA] if settings is not None and settings.stack.redis_replica_port else []
    return [*BASE, *replica, *SOURCE_COMPONENTS[source]]


def _stages(components: list[AnyComponent] | tuple[AnyComponent, ...]) -> list[list[AnyComponent]]:
    """``components`` grouped by :attr:`Component.stage`, in start order."""
    return [
        [c for c in components if c.stage == stage]
        for stage in sorted({c.stage for c in components})
    ]


def wait_ready(
    settings: Settings, components: list[AnyComponent], started: dict[str, float]
) -> None:
    """Poll until every component answers; UserError quoting its log if one exits or times out.

    ``started`` holds the start time of the ones this ``up`` started (the others are
    reported as already running).
    """
    pending = {c.name: c for c in components}
    t0 = time.monotonic()
    deadline = t0 + settings.stack.start_timeout_s
    while pending:
        for name, comp in list(pending.items()):
            svc = comp.service(settings)
            pid = read_pid(svc.pid_file)
            if pid is None or not alive(pid):
                child = children.get(pid) if pid else None
                code = f" with exit code {child.returncode}" if child is not None else ""
                raise UserError(
                    f"{name}: the process exited during start-up{code}; see {svc.log_file}, "
                    f"last lines:\n{log_tail(svc.log_file)}"
                )
            if comp.ready(settings):
                took = time.monotonic() - started.get(name, t0)
                how = f"{took:.1f} s" if name in started else "already running"
                say(f"{name}: ready at {svc.address} (pid {pid}, {how})")
                del pending[name]
        if not pending:
            break
        if time.monotonic() > deadline:
            comp = next(iter(pending.values()))
            svc = comp.service(settings)
            raise UserError(
                f"{comp.name} did not answer at {svc.address} within "
                f"{settings.stack.start_timeout_s:.0f} s (pid {read_pid(svc.pid_file)} still "
                f"running); see {svc.log_file} or raise stack.start_timeout_s; last lines:\n"
                f"{log_tail(svc.log_file)}"
            )
        time.sleep(0.25)


def ensure_up(settings: Settings, source: str = "none") -> dict[str, str]:
    """Start whatever part of the stack is not running and wait until all of it answers.

    Returns ``{"kafka": "127.0.0.1:9092", "redis": "redis://127.0.0.1:6379/0"}``; with
    ``source="postgres"`` also ``postgres`` (the app user's URL), ``connect`` (REST URL) and
    ``connector`` (the registered connector's name).
    """
    components = components_for(source, settings)
    check_ports_distinct([port for c in components for port in c.ports(settings)])
    with locked(layout_for(settings)):
        plans: dict[str, Any] = {}
        for comp in components:
            if comp.service(settings).running_pid() is None:
                check_ports_free(comp.ports(settings))
                plans[comp.name] = comp.preflight(settings)
        for comp in components:
            if comp.name in plans:
                comp.prepare(settings, plans[comp.name])
        started: dict[str, float] = {}
        for stage in _stages(components):
            for comp in stage:
                if comp.name not in plans:
                    continue
                svc, launch = comp.service(settings), comp.command(settings, plans[comp.name])
                started[comp.name] = time.monotonic()
                pid = spawn(
                    launch.argv, cwd=launch.cwd, log=svc.log_file, pid_file=svc.pid_file,
                    user=launch.user,
                )  # fmt: skip
                say(f"{comp.name}: starting (pid {pid}, log {svc.log_file})...")
            wait_ready(settings, stage, started)
            for comp in stage:
                comp.configure(settings)
        addresses: dict[str, str] = {}
        for comp in components:
            addresses.update(comp.addresses(settings))
    return addresses


def stack_status(settings: Settings, source: str = "none") -> list[dict[str, Any]]:
    """One dict per service: name, address, pid, state ("running"/"stopped"), log.

    ``source="postgres"`` adds PostgreSQL, the Connect worker and the Debezium connector
    (its state from Connect's REST API, ``detail`` with task states and replication-slot lag).
    """
    return [row for comp in components_for(source, settings) for row in comp.status(settings)]


def _stop_all(settings: Settings) -> None:
    """Stop every component, later stages first (Connect commits its offsets and releases the
    replication slot before PostgreSQL and the broker go)."""
    for stage in reversed(_stages(ALL)):
        stop([c.service(settings) for c in stage])


def down(settings: Settings) -> None:
    """Stop the processes named by our pid files (only if they still run our command).

    Order: the Connect worker first, then PostgreSQL, Kafka and Redis together.
    """
    lay = layout_for(settings)
    if not lay.root.exists():
        say(f"stack: nothing to stop ({lay.root} does not exist)")
        return
    with locked(lay):
        _stop_all(settings)


def reset(settings: Settings) -> None:
    """``down``, then delete Kafka, Redis, PostgreSQL and Connect-offset data (jars stay)."""
    lay = layout_for(settings)
    if not lay.root.exists():
        say(f"stack: nothing to reset ({lay.root} does not exist)")
        return
    with locked(lay):
        _stop_all(settings)
        deleted = []
        for comp in ALL:
            paths = comp.data(settings)
            if any(p.exists() for p in paths):
                deleted.append(comp.name)
            for path in paths:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
    say(
        f"stack: deleted the data of {', '.join(deleted) or 'nothing'} under {lay.root} "
        "(downloaded jars kept)"
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


def _other_sources_running(settings: Settings, source: str) -> list[str]:
    shown = set(components_for(source, settings))
    return [
        name
        for name, comps in SOURCE_COMPONENTS.items()
        if any(c not in shown and c.service(settings).running_pid() for c in comps)
    ]


def main(settings: Settings, action: str, *, source: str = "none", as_json: bool = False) -> int:
    """``bucketsync stack ACTION [--source postgres] [--json]``; returns the exit code."""
    components = components_for(source, settings)
    if action == "up":
        t0 = time.monotonic()
        addresses = ensure_up(settings, source=source)
        parts = ", ".join(c.summary(addresses) for c in components)
        say(f"stack: up in {time.monotonic() - t0:.1f} s: {parts}")
        return 0
    if action == "down":
        down(settings)
        return 0
    if action == "reset":
        reset(settings)
        return 0
    if action == "status":
        rows = stack_status(settings, source=source)
        _print_status(rows, as_json)
        for other in _other_sources_running(settings, source):
            say(f"stack: the {other} source runs too; `bucketsync stack status --source {other}`")
        return 0 if all(r["state"] == "running" for r in rows) else 1
    raise UserError(f"unknown stack action '{action}'; use up, down, status or reset")
