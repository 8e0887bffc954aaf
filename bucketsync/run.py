"""``bucketsync run``: processor (with its compaction schedule) and gateway together, for dev.

Each part runs as its own child process, exactly as ``bucketsync processor`` and
``bucketsync gateway`` would; a signal to ``run`` stops both cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from bucketsync.config import Settings


class Supervisor:
    """Starts child commands, stops them all when one dies or on a signal."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._stopping = False

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        proc = subprocess.Popen(list(argv), env=env)
        self.procs.append((name, proc))
        print(f"bucketsync: started {name} (pid {proc.pid})", flush=True)

    def stop(self, timeout: float = 15.0) -> None:
        if self._stopping:
            return
        self._stopping = True
        for _, p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(
                    f"bucketsync: {name} did not stop in {timeout:.0f}s; killing it",
                    file=sys.stderr,
                )
                p.kill()
                p.wait()

    def install_signals(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def wait_any(self, until: float | None = None) -> int:
        """Block until a child exits (or ``until``); returns its exit code (0 on deadline)."""
        while True:
            for name, p in self.procs:
                rc = p.poll()
                if rc is not None:
                    if not self._stopping:
                        print(
                            f"bucketsync: {name} exited with code {rc}; stopping the rest",
                            file=sys.stderr,
                        )
                    self.stop()
                    return rc
            if until is not None and time.monotonic() >= until:
                return 0
            time.sleep(0.2)


def child_argv(command: str, config_path: str | None, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "bucketsync.cli"]
    if config_path:
        argv += ["--config", config_path]
    return [*argv, command, *extra]


def start_pipeline(
    sup: Supervisor, settings: Settings, config_path: str | None, port: int | None = None
) -> None:
    env = dict(os.environ)
    sup.start("processor", child_argv("processor", config_path), env)
    extra = ["--port", str(port)] if port is not None else []
    sup.start("gateway", child_argv("gateway", config_path, *extra), env)


def main(settings: Settings, *, config_path: str | None, port: int | None = None) -> int:
    """``bucketsync run [--port P]``: processor and gateway as children of this process."""
    sup = Supervisor()
    sup.install_signals()
    start_pipeline(sup, settings, config_path, port)
    try:
        return sup.wait_any()
    finally:
        sup.stop()
