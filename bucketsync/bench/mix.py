"""A realistic CDC mix for ``bucketsync bench ingest`` (issue 11).

Debezium PostgreSQL events with the JSON converter and ``schemas.enable=true`` (schema and
payload in every key and value, about 1.4 KB a record) over four tables (``lists``,
``todos``, ``comments``, ``tags``); updates that move rows between buckets (owner and list
changes), deletes, and about two bucket outputs per event under :data:`MIX_RULES`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from bucketsync.feed import WORDS as FEED_WORDS

MIX_TABLES = ("todos", "comments", "lists", "tags")
#: share of events per table
MIX_WEIGHTS = (0.5, 0.25, 0.15, 0.10)

MIX_RULES = """
bucket_definitions:
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT * FROM todos WHERE owner_id = bucket.user_id
      - SELECT * FROM lists WHERE owner_id = bucket.user_id
      - SELECT * FROM tags WHERE owner_id = bucket.user_id
  by_list:
    parameters: SELECT request.jwt() ->> 'list' AS list_id
    data:
      - SELECT id, description, completed, priority FROM todos WHERE list_id = bucket.list_id
      - SELECT * FROM comments WHERE list_id = bucket.list_id
      - SELECT id, name FROM lists WHERE id = bucket.list_id
  by_author:
    parameters: SELECT request.user_id() AS author_id
    data:
      - SELECT id, todo_id, body FROM comments WHERE author_id = bucket.author_id
"""

_TS = {"type": "string", "optional": False, "name": "io.debezium.time.ZonedTimestamp"}
_COLUMNS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "lists": [
        ("id", {"type": "string", "optional": False}),
        ("owner_id", {"type": "string", "optional": False}),
        ("name", {"type": "string", "optional": True}),
        ("archived", {"type": "boolean", "optional": False}),
        ("created_at", _TS),
    ],
    "todos": [
        ("id", {"type": "string", "optional": False}),
        ("list_id", {"type": "string", "optional": False}),
        ("owner_id", {"type": "string", "optional": False}),
        ("description", {"type": "string", "optional": True}),
        ("completed", {"type": "boolean", "optional": False}),
        ("priority", {"type": "int32", "optional": False}),
        ("created_at", _TS),
    ],
    "comments": [
        ("id", {"type": "string", "optional": False}),
        ("todo_id", {"type": "string", "optional": False}),
        ("list_id", {"type": "string", "optional": False}),
        ("author_id", {"type": "string", "optional": False}),
        ("body", {"type": "string", "optional": True}),
        ("created_at", _TS),
    ],
    "tags": [
        ("id", {"type": "string", "optional": False}),
        ("owner_id", {"type": "string", "optional": False}),
        ("label", {"type": "string", "optional": False}),
        ("color", {"type": "string", "optional": True}),
    ],
}
_SOURCE_FIELDS = [
    ("version", "string"),
    ("connector", "string"),
    ("name", "string"),
    ("ts_ms", "int64"),
    ("snapshot", "string"),
    ("db", "string"),
    ("schema", "string"),
    ("table", "string"),
    ("txId", "int64"),
    ("lsn", "int64"),
]
# the todo feed's words and a few more
WORDS = [*FEED_WORDS, "pay", "rent", "walk", "dog"]


def _schemas(prefix: str, table: str) -> tuple[bytes, bytes]:
    """The key and value ``schema`` parts of a table, pre-encoded once."""
    cols = [dict(spec, field=name) for name, spec in _COLUMNS[table]]
    name = f"{prefix}.public.{table}"
    row = {"type": "struct", "fields": cols, "optional": True, "name": f"{name}.Value"}
    value = {
        "type": "struct",
        "name": f"{name}.Envelope",
        "optional": False,
        "fields": [
            dict(row, field="before"),
            dict(row, field="after"),
            {
                "type": "struct",
                "field": "source",
                "optional": False,
                "name": "io.debezium.connector.postgresql.Source",
                "fields": [{"type": t, "optional": False, "field": f} for f, t in _SOURCE_FIELDS],
            },
            {"type": "string", "optional": False, "field": "op"},
            {"type": "int64", "optional": True, "field": "ts_ms"},
        ],
    }
    key = {
        "type": "struct",
        "name": f"{name}.Key",
        "optional": False,
        "fields": [{"type": "string", "optional": False, "field": "id"}],
    }
    return orjson.dumps(key), orjson.dumps(value)


@dataclass
class MixFeed:
    """Random but plausible changes over four tables; yields ``(table, key, value)``."""

    prefix: str
    users: int = 1000
    lists: int = 3000
    todos: int = 100_000
    comments: int = 50_000
    tags: int = 2000
    seed: int = 11
    live: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    lsn: int = 1000

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._schema = {t: _schemas(self.prefix, t) for t in MIX_TABLES}
        self.live = {t: {} for t in MIX_TABLES}

    def topic(self, table: str) -> str:
        return f"{self.prefix}.public.{table}"

    def _text(self, k: int) -> str:
        return " ".join(self.rng.choices(WORDS, k=k))

    def _user(self) -> str:
        return f"u{self.rng.randrange(self.users)}"

    def _list(self) -> str:
        return f"l{self.rng.randrange(self.lists)}"

    def _new(self, table: str, rid: str) -> dict[str, Any]:
        now = "2026-01-01T00:00:00Z"
        if table == "lists":
            return {
                "id": rid,
                "owner_id": self._user(),
                "name": self._text(3),
                "archived": False,
                "created_at": now,
            }
        if table == "todos":
            return {
                "id": rid,
                "list_id": self._list(),
                "owner_id": self._user(),
                "description": self._text(8),
                "completed": False,
                "priority": self.rng.randrange(5),
                "created_at": now,
            }
        if table == "comments":
            return {
                "id": rid,
                "todo_id": f"t{self.rng.randrange(self.todos)}",
                "list_id": self._list(),
                "author_id": self._user(),
                "body": self._text(12),
                "created_at": now,
            }
        return {"id": rid, "owner_id": self._user(), "label": self._text(1), "color": "#a0b0c0"}

    def _change(self, table: str, cur: dict[str, Any]) -> dict[str, Any]:
        new = dict(cur)
        dice = self.rng.random()
        if table == "todos":
            if dice < 0.15:
                new["owner_id"] = self._user()  # moves between by_user buckets
            elif dice < 0.2:
                new["list_id"] = self._list()  # moves between by_list buckets
            elif dice < 0.6:
                new["completed"] = not cur["completed"]
            else:
                new["description"] = self._text(8)
        elif table == "lists":
            if dice < 0.15:
                new["owner_id"] = self._user()
            else:
                new["name"] = self._text(3)
        elif table == "comments":
            new["body"] = self._text(12)
        else:
            new["color"] = f"#{self.rng.randrange(1 << 24):06x}"
        return new

    def _envelope(
        self, table: str, op: str, before: dict[str, Any] | None, after: dict[str, Any] | None
    ) -> bytes:
        self.lsn += 1
        now = int(time.time() * 1000)
        payload = orjson.dumps(
            {
                "before": before,
                "after": after,
                "source": {
                    "version": "3.3.0.Final",
                    "connector": "postgresql",
                    "name": self.prefix,
                    "ts_ms": now,
                    "snapshot": "false",
                    "db": "app",
                    "schema": "public",
                    "table": table,
                    "txId": self.lsn,
                    "lsn": self.lsn,
                },
                "op": op,
                "ts_ms": now,
            }
        )
        return b'{"schema":' + self._schema[table][1] + b',"payload":' + payload + b"}"

    #: share of the events on an existing row that delete it
    delete_share = 0.1

    def _pick(self, n: int) -> int:
        """Which of a table's ``n`` row ids the next event touches."""
        return self.rng.randrange(n)

    def next(self) -> tuple[str, bytes, bytes]:
        table = self.rng.choices(MIX_TABLES, MIX_WEIGHTS)[0]
        rid = f"{table[0]}{self._pick(getattr(self, table))}"
        key = b'{"schema":' + self._schema[table][0] + b',"payload":{"id":"' + rid.encode() + b'"}}'
        rows = self.live[table]
        cur = rows.get(rid)
        if cur is None:
            row = rows[rid] = self._new(table, rid)
            return table, key, self._envelope(table, "c", None, row)
        if self.rng.random() < self.delete_share:
            del rows[rid]
            return table, key, self._envelope(table, "d", cur, None)
        new = rows[rid] = self._change(table, cur)
        return table, key, self._envelope(table, "u", cur, new)

    def events(self, n: int) -> Iterator[tuple[str, bytes, bytes]]:
        for _ in range(n):
            yield self.next()
