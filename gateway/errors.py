"""The PowerSync-style service error shared by every gateway endpoint.

Error responses carry ``Content-Type: application/json`` and the body
``{"error": {"name": ..., "code": "PSYNC_Sxxxx", "status": N, "description": ...,
"details"?: ...}}`` (sync-protocol.md §2.1). Clients only look at the status; the
body is for logs, so descriptions name the cause in plain words.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

__all__ = [
    "CODE_AUTH_INVALID",
    "CODE_AUTH_LIFETIME",
    "CODE_AUTH_MISSING",
    "CODE_AUTH_WRONG_AUDIENCE",
    "CODE_INTERNAL",
    "CODE_NOT_FOUND",
    "CODE_NO_SYNC_CONFIG",
    "CODE_SHUTTING_DOWN",
    "CODE_TOKEN_EXPIRED",
    "CODE_TOO_MANY_BUCKETS",
    "CODE_TOO_MANY_CONNECTIONS",
    "CODE_VALIDATION",
    "ServiceError",
    "default_error_name",
]

#: 400: request body fails validation.
CODE_VALIDATION = "PSYNC_S2001"
#: 500: any other failure inside a request (the reference's generic internal server error
#: uses the same code as validation, told apart by the status).
CODE_INTERNAL = "PSYNC_S2001"
#: 404: unknown route.
CODE_NOT_FOUND = "PSYNC_S2002"
#: 503: server shutting down.
CODE_SHUTTING_DOWN = "PSYNC_S2003"
#: 401: bad signature, unknown kid, malformed JWT, missing claims, disallowed alg.
CODE_AUTH_INVALID = "PSYNC_S2101"
#: 401: token expired.
CODE_TOKEN_EXPIRED = "PSYNC_S2103"
#: 401: ``exp - iat`` longer than allowed.
CODE_AUTH_LIFETIME = "PSYNC_S2104"
#: 401: ``aud`` missing or not allowed.
CODE_AUTH_WRONG_AUDIENCE = "PSYNC_S2105"
#: 401: no ``Authorization`` header, or not ``Token|Bearer <jwt>``.
CODE_AUTH_MISSING = "PSYNC_S2106"
#: 500: no sync configuration deployed.
CODE_NO_SYNC_CONFIG = "PSYNC_S2302"
#: 400: too many buckets, or too many parameter query results, for one connection.
CODE_TOO_MANY_BUCKETS = "PSYNC_S2305"
#: 429: too many concurrent connections (here: per user, ``gateway.max_connections_per_user``).
CODE_TOO_MANY_CONNECTIONS = "PSYNC_S2304"

_NAMES: Mapping[str, str] = {
    CODE_VALIDATION: "ValidationError",
    CODE_NOT_FOUND: "RouteNotFound",
}


def default_error_name(code: str, status: int) -> str:
    """The ``name`` the reference service reports for ``code`` (its error class name)."""
    if code.startswith("PSYNC_S21") and status == 401:
        return "AuthorizationError"
    if code == CODE_INTERNAL and status >= 500:
        return "InternalServerError"
    return _NAMES.get(code, "ServiceError")


class ServiceError(Exception):
    """An error answered to the client as a PSYNC JSON error body.

    Raise it from a handler (or anything a handler calls) and turn it into a
    response with :meth:`http_response`.
    """

    def __init__(
        self,
        status: int,
        code: str,
        description: str,
        name: str | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(f"[{code}] {description}")
        self.status = status
        self.code = code
        self.description = description
        self.name = name if name is not None else default_error_name(code, status)
        self.details = details

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status}, code={self.code!r}, "
            f"description={self.description!r})"
        )

    def to_json(self) -> dict[str, Any]:
        """The response body as a dict: ``{"error": {name, code, status, description, details?}}``."""
        error: dict[str, Any] = {
            "name": self.name,
            "code": self.code,
            "status": self.status,
            "description": self.description,
        }
        if self.details is not None:
            error["details"] = self.details
        return {"error": error}

    def to_bytes(self) -> bytes:
        """The response body, JSON-encoded (values orjson cannot encode are stringified)."""
        return orjson.dumps(self.to_json(), default=str)

    def http_response(self, *, headers: Mapping[str, str] | None = None) -> web.Response:
        """An aiohttp response with this error's status and JSON body."""
        return web.Response(
            status=self.status,
            body=self.to_bytes(),
            content_type="application/json",
            headers=headers,
        )
