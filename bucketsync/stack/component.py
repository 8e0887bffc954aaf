"""The one shape every service of the stack has, so the actions are loops over components.

A component is one process (Kafka broker, Redis, PostgreSQL, Kafka Connect) and says, for
``bucketsync.stack.actions``:

- :meth:`~Component.service`: its pid file, log, address and how to recognise its process;
- :meth:`~Component.ports`: the ports it listens on, as ``(port, settings key)``;
- :meth:`~Component.preflight`: check what starting it needs (tools, versions, settings)
  without writing anything, returning a plan (e.g. the Java to run) for the next steps;
- :meth:`~Component.prepare`: downloads, config files, one-time formatting/initdb;
- :meth:`~Component.command`: the command line to start it (:class:`Launch`);
- :meth:`~Component.ready`: whether it answers (polled after the start);
- :meth:`~Component.configure`: what to do on every ``up`` once it answers (roles, connector);
- :meth:`~Component.addresses`, :meth:`~Component.status`: what ``up`` and ``status`` report;
- :meth:`~Component.data`: what ``reset`` deletes (downloaded jars are never data).

:attr:`~Component.stage` orders start-up: a stage starts once every earlier stage answers
and is configured (Connect needs the broker and PostgreSQL's roles); ``down`` stops the
stages in reverse. A new CDC source (MySQL, MongoDB) is a new module with a component and an
entry in ``actions.SOURCE_COMPONENTS``; the actions do not change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from bucketsync.config import Settings
from bucketsync.stack.processes import Service

#: what :meth:`Component.preflight` found and the later steps use (a Java path, a bindir, ...)
PlanT = TypeVar("PlanT")


@dataclass(frozen=True)
class Launch:
    """How to start a component's process: argv, working directory, (uid, gid) if not us."""

    argv: list[str]
    cwd: Path
    user: tuple[int, int] | None = None


class Component(ABC, Generic[PlanT]):
    #: the service name in messages, status rows and ``ensure_up``'s result
    name: ClassVar[str]
    #: start-up stage (see the module docstring)
    stage: ClassVar[int] = 0

    @abstractmethod
    def service(self, settings: Settings) -> Service: ...

    @abstractmethod
    def ports(self, settings: Settings) -> list[tuple[int, str]]: ...

    @abstractmethod
    def preflight(self, settings: Settings) -> PlanT:
        """UserError if it cannot start here; called only when it is not running."""

    def prepare(self, settings: Settings, plan: PlanT) -> None:
        """Everything on disk the process needs; called after every preflight passed."""

    @abstractmethod
    def command(self, settings: Settings, plan: PlanT) -> Launch: ...

    @abstractmethod
    def ready(self, settings: Settings) -> bool:
        """True once it answers; may raise UserError when it answers wrongly."""

    def configure(self, settings: Settings) -> None:
        """Idempotent set-up on every ``up``, once this stage answers."""

    def addresses(self, settings: Settings) -> dict[str, str]:
        """``ensure_up``'s result entries: ``{name: address}`` by default."""
        return {self.name: self.service(settings).address}

    def summary(self, addresses: dict[str, str]) -> str:
        """This component in ``stack up``'s closing line."""
        return f"{self.name} {addresses[self.name]}"

    def status(self, settings: Settings) -> list[dict[str, Any]]:
        """Status rows: name, address, pid, state ("running"/"stopped"), log (+ detail)."""
        svc = self.service(settings)
        pid = svc.running_pid()
        return [
            {
                "name": svc.name,
                "address": svc.address,
                "pid": pid,
                "state": "running" if pid else "stopped",
                "log": str(svc.log_file),
            }
        ]

    @abstractmethod
    def data(self, settings: Settings) -> list[Path]:
        """Files and directories ``reset`` deletes."""
