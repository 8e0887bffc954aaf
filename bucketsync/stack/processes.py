"""The stack's processes: start detached, record in a pid file, recognise, stop.

Every process we start is recorded in a pid file and is only ever signalled when the live
process still shows our command line (:attr:`Service.owns`): a pid file outliving its process
must never let ``down`` kill whatever reused the pid. Owns the Popen handles of our children
(:data:`children`) so they are reaped instead of lingering as zombies, the log files (rotated at
:data:`LOG_ROTATE_BYTES`, their tails quoted in errors) and the stop sequence (signal, wait
:data:`STOP_TIMEOUT_S`, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bucketsync.errors import UserError
from bucketsync.stack.console import say

STOP_TIMEOUT_S = 60.0
LOG_ROTATE_BYTES = 20 * 1024 * 1024
LOG_TAIL_LINES = 15

#: Popen objects of processes we started, kept so they are not reaped/warned about by GC.
children: dict[int, subprocess.Popen[bytes]] = {}


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def write_pid(path: Path, pid: int) -> None:
    tmp = path.with_suffix(".pid.tmp")
    tmp.write_text(f"{pid}\n")
    tmp.replace(path)


def alive(pid: int) -> bool:
    """True if ``pid`` is a live (not zombie) process. Reaps it if it is our exited child."""
    child = children.get(pid)
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


def cmdline(pid: int) -> list[str]:
    """The argv of ``pid`` (``/proc``, else ``ps``); [] if unknown."""
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


def cwd_of(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


@dataclass(frozen=True)
class Service:
    """One process of the stack as ``down``/``status`` see it: where its pid and log are."""

    name: str
    address: str
    pid_file: Path
    log_file: Path
    #: True if the live process ``pid`` runs our command (see the module docstring)
    owns: Callable[[int], bool]
    #: PostgreSQL needs SIGINT ("fast" shutdown); SIGTERM would wait for clients to leave
    stop_signal: int = signal.SIGTERM

    def running_pid(self) -> int | None:
        """The pid from our pid file if it is alive and runs our command; else None."""
        pid = read_pid(self.pid_file)
        if pid and alive(pid) and self.owns(pid):
            return pid
        return None


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last non-empty ``lines`` of a log, indented for an error message."""
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


def as_user(user: tuple[int, int] | None) -> dict[str, Any]:
    """``subprocess`` keyword arguments to run as ``(uid, gid)`` (none for ourselves)."""
    if user is None:
        return {}
    return {"user": user[0], "group": user[1], "extra_groups": []}


def spawn(
    cmd: list[str], *, cwd: Path, log: Path, pid_file: Path, user: tuple[int, int] | None = None
) -> int:
    """Start ``cmd`` detached (own session), output appended to ``log``; write its pid file."""
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
            **as_user(user),
        )
    children[proc.pid] = proc
    write_pid(pid_file, proc.pid)
    return proc.pid


def stop(services: list[Service]) -> None:
    """Signal the ones still running our command, wait for all of them, SIGKILL stragglers.

    Pid files naming a dead or foreign process are removed without signalling anything.
    """
    victims: list[tuple[Service, int, float]] = []
    for svc in services:
        pid = read_pid(svc.pid_file)
        if pid is None:
            continue
        if alive(pid) and svc.owns(pid):
            say(f"{svc.name}: stopping (pid {pid})...")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, svc.stop_signal)
            victims.append((svc, pid, time.monotonic()))
        else:
            # stale: the process is gone, or the pid now belongs to something else
            svc.pid_file.unlink(missing_ok=True)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    pending = list(victims)
    while pending and time.monotonic() < deadline:
        pending = [v for v in pending if alive(v[1])]
        if pending:
            time.sleep(0.2)
    for svc, pid, _ in pending:
        say(f"{svc.name}: still running after {STOP_TIMEOUT_S:.0f} s, sending SIGKILL (pid {pid})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        end = time.monotonic() + 10
        while alive(pid) and time.monotonic() < end:
            time.sleep(0.1)
    for svc, pid, t0 in victims:
        svc.pid_file.unlink(missing_ok=True)
        children.pop(pid, None)
        say(f"{svc.name}: stopped (pid {pid}, {time.monotonic() - t0:.1f} s)")


def run_once(
    what: str,
    cmd: list[str],
    *,
    cwd: Path,
    timeout: float,
    user: tuple[int, int] | None = None,
    hint: str = "",
) -> None:
    """Run a one-off step (format storage, initdb) to completion; UserError on timeout/failure.

    ``what`` names the step in the error (``"kafka: formatting storage"``), which quotes the
    last line of output and ends with ``hint``.
    """
    try:
        res = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, **as_user(user)
        )
    except subprocess.TimeoutExpired:
        raise UserError(f"{what} timed out after {timeout:.0f} s{hint}") from None
    if res.returncode != 0:
        out = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
        last = out[-1] if out else "no output"
        raise UserError(f"{what} failed (exit {res.returncode}): {last}{hint}")
