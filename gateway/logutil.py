"""Log hygiene for values clients control, and rate limiting for repetitive failures."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

#: Default cut for client-controlled values (``gateway.log_field_max_chars``).
DEFAULT_MAX_CHARS = 200


def clip(value: Any, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """``value`` as text of at most about ``max_chars`` characters, control characters escaped.

    Anything longer is cut and says how long it was, so a client cannot write huge or
    multi-line log records (client ids, ``after`` maps, user agents, bucket names).
    """
    text = value if isinstance(value, str) else repr(value)
    if len(text) > max_chars:
        text = f"{text[:max_chars]}…(+{len(text) - max_chars} chars)"
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
        if len(text) > 4 * max_chars:
            text = text[: 4 * max_chars] + "…"
    return text


class RateLimitedLog:
    """Lets one record per ``interval_s`` through for each key; says how many it held back."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0):
        self.logger = logger
        self.interval_s = interval_s
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def log(self, key: str, level: int, msg: str, *args: Any) -> bool:
        now = time.monotonic()
        with self._lock:
            if now < self._next.get(key, 0.0):
                self._held[key] = self._held.get(key, 0) + 1
                return False
            self._next[key] = now + self.interval_s
            held = self._held.pop(key, 0)
        if held:
            msg += f" ({held} similar messages suppressed in the last {self.interval_s:.0f}s)"
        self.logger.log(level, msg, *args)
        return True


class LogBudget:
    """At most ``per_s`` records a second of one kind (``None``: no limit); the records held
    back are counted and said in one line per second in which some were (``what``, e.g.
    "streams opened", names them; ``setting`` the config key that sets the budget).

    :meth:`allow` is the check before a record is formatted: a clock read and two integer
    operations, so a reconnect storm of thousands of streams a second costs a handful of
    log lines instead of a line per stream."""

    __slots__ = (
        "_held",
        "_scheduled",
        "_used",
        "_window_end",
        "logger",
        "per_s",
        "setting",
        "what",
    )

    def __init__(self, logger: logging.Logger, per_s: int | None, what: str, setting: str):
        self.logger = logger
        self.per_s = per_s
        self.what = what
        self.setting = setting
        self._window_end = 0.0
        self._used = 0
        self._held = 0
        self._scheduled = False

    def allow(self) -> bool:
        per_s = self.per_s
        if per_s is None:
            return True
        now = time.monotonic()
        if now >= self._window_end:
            self.flush()
            self._window_end = now + 1.0
            self._used = 0
        if self._used < per_s:
            self._used += 1
            return True
        self._held += 1
        if not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                pass  # said by the next record after the window
            else:
                self._scheduled = True
                loop.call_at(loop.time() + (self._window_end - now), self._timer)
        return False

    def _timer(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Say how many records were held back since the last summary (if any)."""
        held, self._held = self._held, 0
        if held:
            self.logger.info(
                "%d more %s within a second, not logged one by one (%s=%d)",
                held,
                self.what,
                self.setting,
                self.per_s,
            )
