"""The OpenAPI document of the gateway's HTTP endpoints (served at ``GET /openapi.json``).

It describes what a client may send and what it gets back: the PowerSync sync stream
(``POST /sync/stream``, an NDJSON body of protocol lines), write checkpoints, the probes and
the metrics. Error responses share the PSYNC error body of :mod:`gateway.errors`.
tests/test_gateway_openapi.py runs schemathesis against it.
"""

from __future__ import annotations

from typing import Any

from bucketsync import __version__

#: ``^[0-9]{1,19}$`` and at most 2^63-1 (gateway.protocol.parse_op_id)
_OP_ID = {
    "type": "string",
    "pattern": "^[0-9]{1,19}$",
    "description": "Op id: base-10 digits, 0..2^63-1",
    "example": "0",
}

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["name", "code", "status", "description"],
            "properties": {
                "name": {"type": "string"},
                "code": {"type": "string", "pattern": "^PSYNC_[A-Z][0-9]{4}$"},
                "status": {"type": "integer"},
                "description": {"type": "string"},
                "details": {},
            },
        }
    },
}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


_AUTH_ERRORS = {
    "401": _error(
        "Missing, malformed, expired or otherwise rejected token "
        "(PSYNC_S2101, S2103, S2104, S2105, S2106)"
    ),
}

_STREAM_REQUEST = {
    "type": "object",
    "description": "Unknown fields are ignored.",
    "properties": {
        "buckets": {
            "type": "array",
            "nullable": True,
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "after": _OP_ID},
            },
        },
        "client_id": {"type": "string", "nullable": True},
        "parameters": {"type": "object", "nullable": True, "additionalProperties": True},
        "raw_data": {"type": "boolean"},
        "include_checksum": {"type": "boolean"},
        "streams": {
            "type": "object",
            "nullable": True,
            "properties": {
                "include_defaults": {"type": "boolean"},
                "subscriptions": {
                    "type": "array",
                    "nullable": True,
                    "items": {
                        "type": "object",
                        "properties": {
                            "stream": {"type": "string"},
                            "parameters": {"type": "object", "nullable": True},
                            "override_priority": {"type": "integer", "nullable": True},
                        },
                    },
                },
            },
        },
    },
}

_PROBE = {
    "type": "object",
    "properties": {
        "ready": {"type": "boolean"},
        "rules": {"type": "boolean"},
        "streams": {"type": "integer"},
        "redis": {"type": "string"},
        "reason": {"type": "string"},
    },
}


def openapi_document() -> dict[str, Any]:
    """The gateway's OpenAPI 3.0 document (a fresh dict each call)."""
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "bucketsync gateway",
            "version": __version__,
            "description": (
                "PowerSync sync protocol over per-bucket op logs. Errors are "
                '`{"error": {name, code, status, description, details?}}` with a PSYNC code.'
            ),
        },
        "paths": {
            "/sync/stream": {
                "post": {
                    "operationId": "syncStream",
                    "summary": "Open a sync stream (NDJSON lines until the token expires)",
                    "security": [{"bearer": []}, {"token": []}],
                    "requestBody": {
                        "required": False,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/StreamRequest"}
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": (
                                "One JSON object per line: checkpoint, checkpoint_diff, data, "
                                "checkpoint_complete, partial_checkpoint_complete, "
                                "token_expires_in"
                            ),
                            "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
                        },
                        "400": _error(
                            "Body is not valid JSON or fails validation (PSYNC_S2001); too many "
                            "buckets or parameter results (PSYNC_S2305)"
                        ),
                        **_AUTH_ERRORS,
                        "408": _error("Body not received within gateway.body_timeout_s"),
                        "413": _error("Body larger than the gateway accepts"),
                        "429": _error(
                            "Too many open streams for this user (PSYNC_S2304, "
                            "gateway.max_connections_per_user)"
                        ),
                        "503": _error("Shutting down (PSYNC_S2003)"),
                    },
                },
                "options": {
                    "operationId": "syncStreamPreflight",
                    "summary": "CORS preflight",
                    "responses": {"204": {"description": "CORS headers"}},
                },
            },
            "/write-checkpoint2.json": {
                "get": {
                    "operationId": "writeCheckpoint",
                    "summary": (
                        "A write checkpoint for (sub, client_id), bound to the pipeline's "
                        "position at request time"
                    ),
                    "security": [{"bearer": []}, {"token": []}],
                    "parameters": [
                        {
                            "name": "client_id",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "The write checkpoint id",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["data"],
                                        "properties": {
                                            "data": {
                                                "type": "object",
                                                "required": ["write_checkpoint"],
                                                "properties": {"write_checkpoint": _OP_ID},
                                            }
                                        },
                                    }
                                }
                            },
                        },
                        **_AUTH_ERRORS,
                        "503": _error(
                            "The pipeline's position cannot be read now: Kafka or the source "
                            "database unreachable (PSYNC_S2003)"
                        ),
                    },
                },
                "options": {
                    "operationId": "writeCheckpointPreflight",
                    "summary": "CORS preflight",
                    "responses": {"204": {"description": "CORS headers"}},
                },
            },
            "/probes/liveness": {
                "get": {
                    "operationId": "liveness",
                    "responses": {
                        "200": {
                            "description": "The process answers",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {"alive": {"type": "boolean"}},
                                    }
                                }
                            },
                        }
                    },
                }
            },
            **{
                f"/probes/{name}": {
                    "get": {
                        "operationId": name,
                        "responses": {
                            "200": {
                                "description": "Redis answers (and the replica read, synced), the store has "
                                "this version's key layout, the gateway is not closing",
                                "content": {"application/json": {"schema": _PROBE}},
                            },
                            "400": {
                                "description": "Not ready (Redis unreachable, the replica not synced, a "
                                "store of another key layout, or shutting down)",
                                "content": {"application/json": {"schema": _PROBE}},
                            },
                        },
                    }
                }
                for name in ("readiness", "startup")
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "responses": {
                        "200": {
                            "description": "This document",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": {"Error": _ERROR, "StreamRequest": _STREAM_REQUEST},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "token": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "`Token <jwt>` (the PowerSync clients' form)",
                },
            },
        },
    }
