"""One ``bucketsync stack`` command at a time per state dir.

``up``, ``down`` and ``reset`` hold an exclusive ``flock`` on ``<state_dir>/stack.lock``:
several test sessions (or a demo and a test run) may share one stack and would otherwise
race to start the same broker or delete data under a starting one. ``status`` does not lock.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator

from bucketsync.stack.console import say
from bucketsync.stack.layout import Layout


@contextlib.contextmanager
def locked(lay: Layout) -> Iterator[None]:
    """Serialise up/down/reset on one state dir; says so when it has to wait."""
    lay.root.mkdir(parents=True, exist_ok=True)
    with lay.lock.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"stack: waiting for another `bucketsync stack` command on {lay.root} ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
