"""Log hygiene for values clients control, and rate limiting for repetitive failures."""

from __future__ import annotations

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
