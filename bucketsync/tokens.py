"""Development tokens (HS256 with the configured secret and audience)."""

from __future__ import annotations

import time
import warnings
from typing import Any

import jwt

from bucketsync.config import Settings
from bucketsync.errors import UserError


def make_dev_token(
    settings: Settings, *, sub: str, claims: dict[str, Any] | None = None, ttl_s: int = 3600
) -> str:
    if not settings.auth.hs256_secret:
        raise UserError("auth.hs256_secret is not set; dev tokens need a shared secret")
    if ttl_s <= 0:
        raise UserError(f"--ttl must be positive, got {ttl_s}")
    now = int(time.time())
    payload: dict[str, Any] = {
        "sub": sub,
        "iat": now,
        "exp": now + ttl_s,
        "aud": settings.auth.audience[0]
        if len(settings.auth.audience) == 1
        else settings.auth.audience,
    }
    payload.update(claims or {})
    with warnings.catch_warnings():
        # short dev secrets are the user's choice; the gateway says so once at start-up
        warnings.simplefilter("ignore")
        return jwt.encode(payload, settings.auth.hs256_secret, algorithm="HS256")
