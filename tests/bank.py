"""Debezium events of a bank (transfers between a user's accounts, each account a row of
``public.accounts``) for the transaction-mode tests: the data events with their transaction
blocks, and the BEGIN/END markers of the transaction topic."""

from __future__ import annotations

from typing import Any

import orjson

BANK_RULES = """
bucket_definitions:
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT id, user_id, balance FROM accounts WHERE user_id = bucket.user_id
"""


def account_event(
    prefix: str, row: dict[str, Any], tx: tuple[str, int] | None, lsn: int
) -> tuple[bytes, bytes]:
    """Key and value of ``row``'s event: a snapshot read without ``tx``, else an update
    that is event ``tx[1]`` (its ``total_order``) of transaction ``tx[0]``."""
    value: dict[str, Any] = {
        "before": None,
        "after": row,
        "source": {
            "connector": "postgresql",
            "name": prefix,
            "schema": "public",
            "table": "accounts",
            "db": "app",
            "lsn": lsn,
            "snapshot": "false" if tx else "true",
        },
        "op": "u" if tx else "r",
        "ts_ms": 1,
    }
    if tx is not None:
        value["transaction"] = {
            "id": f"{tx[0]}:{lsn}",
            "total_order": tx[1],
            "data_collection_order": tx[1],
        }
    return orjson.dumps({"id": row["id"]}), orjson.dumps(value)


def bank_marker(tx: str, lsn: int, n: int | None) -> tuple[bytes, bytes]:
    """Key and value of transaction ``tx``'s BEGIN (``n`` None) or END (``n`` events)."""
    value = {
        "status": "BEGIN" if n is None else "END",
        "id": f"{tx}:{lsn}",  # PostgreSQL: the LSN suffix differs between BEGIN and END
        "event_count": n,
        "data_collections": None
        if n is None
        else [{"data_collection": "public.accounts", "event_count": n}],
        "ts_ms": 1,
    }
    return orjson.dumps({"id": f"{tx}:{lsn}"}), orjson.dumps(value)
