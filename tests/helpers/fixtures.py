"""Loading recorded CDC fixtures (tests/fixtures/cdc/README.md "Record file format")."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from pipeline.cdc.record import KafkaRecord

__all__ = ["CDC_FIXTURES", "load_fixture"]

#: the recorded Debezium records with their expected decodings
CDC_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cdc"


def load_fixture(path: str | Path) -> KafkaRecord:
    """A fixture file as the record a consumer would have handed the decoder."""
    d: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))

    def raw(field: str) -> bytes | None:
        s = d.get(field)
        if s is None:
            return None
        if d.get(field + "_encoding") == "base64":
            return base64.b64decode(s)
        return str(s).encode("utf-8")

    headers = tuple(
        (str(h["key"]), None if h.get("value") is None else str(h["value"]).encode("utf-8"))
        for h in d.get("headers") or ()
    )
    return KafkaRecord(
        topic=d["topic"],
        partition=int(d["partition"]),
        offset=int(d["offset"]),
        key=raw("key"),
        value=raw("value"),
        headers=headers,
        timestamp_ms=d.get("timestamp_ms"),
    )
