"""Consumer group membership of a processor: static ids for a fast takeover after a crash.

With dynamic membership a SIGKILLed processor keeps its partitions until the broker's
session timeout expires, so its restarted successor applies nothing for that long. With
static membership (KIP-345, ``group.instance.id``) the successor presents the same id and
the coordinator hands it the dead member's partitions at once, without a rebalance.

The id must be stable across restarts of one processor and unique among the processors
running at the same time. ``auto`` gets both without configuration: each processor takes
the first free slot lock (``flock``) under the state dir, and the id is
``<group>-<host>-<slot>-<subscription hash>``. A crashed process's lock is released by the
kernel, so its restart takes the same slot back; two live processors on one host never
share a slot. The subscription (topics or pattern) is part of the id because the
coordinator hands a rejoining static member its previous assignment: a restart with other
topics under the same id would read the old topics (or hang in the join).

The cost of static membership: a member that stops cleanly does not leave the group, so
its partitions move to the others only after the session timeout (or at once when it
comes back).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import IO

MAX_SLOTS = 256


@dataclass
class Membership:
    """The group instance id a processor uses (None: dynamic membership)."""

    instance_id: str | None
    _lock: IO[bytes] | None = None

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the flock
            self._lock = None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:100] or "x"


def claim(configured: str, *, group_id: str, state_dir: Path, subscription: str) -> Membership:
    """Resolve ``processor.instance_id``: ``auto``, empty (dynamic) or an explicit id."""
    if configured == "":
        return Membership(None)
    if configured != "auto":
        return Membership(configured)
    sub = hashlib.sha1(subscription.encode()).hexdigest()[:8]
    folder = state_dir / "processors" / f"{_safe(group_id)}-{sub}"
    folder.mkdir(parents=True, exist_ok=True)
    host = _safe(socket.gethostname())
    for slot in range(MAX_SLOTS):
        f = open(folder / f"{host}-{slot}.lock", "ab")  # noqa: SIM115 - held while running
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        f.truncate(0)
        f.write(f"{os.getpid()}\n".encode())
        f.flush()
        return Membership(f"{group_id}-{host}-{slot}-{sub}", f)
    raise RuntimeError(
        f"more than {MAX_SLOTS} processors of group {group_id!r} on this host; "
        "set processor.instance_id explicitly"
    )
