"""An independent reference model of bucket op logs.

Deliberately written without importing the store or the planner: it replays
normalised row events one at a time and says what every bucket's log, count and
checksum must be (sync-protocol.md §5 and §7, architecture.md §3). Tests compare
Redis against it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

# rows -> [(bucket, object_type, object_id, data_json)]
RulesFn = Callable[[str, dict[str, Any]], list[tuple[str, str, str, str]]]

MOD = 2**32


def checksum_of(text: str) -> int:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little")


def put_cs(object_type: str, object_id: str, data: str) -> int:
    return checksum_of("put." + object_type + "." + object_id + "." + data)


def remove_cs(object_type: str, object_id: str) -> int:
    return checksum_of("delete." + object_type + "/" + object_id)


@dataclass
class ModelOp:
    op_id: int
    op: str
    checksum: int
    object_type: str | None = None
    object_id: str | None = None
    data: str | None = None
    target: int = 0


@dataclass
class ModelBucket:
    ops: dict[int, ModelOp] = field(default_factory=dict)

    @property
    def checksum(self) -> int:
        return sum(o.checksum for o in self.ops.values()) % MOD

    @property
    def count(self) -> int:
        return len(self.ops)

    def live_rows(self) -> dict[tuple[str, str], str]:
        """What a client ends with: the latest PUT per row key, minus REMOVEs."""
        rows: dict[tuple[str, str], str] = {}
        for op_id in sorted(self.ops):
            o = self.ops[op_id]
            if o.op == "CLEAR":
                rows.clear()
            elif o.op == "PUT":
                assert o.object_type is not None and o.object_id is not None and o.data is not None
                rows[(o.object_type, o.object_id)] = o.data
            elif o.op == "REMOVE":
                rows.pop((o.object_type or "", o.object_id or ""), None)
        return rows


class BucketModel:
    def __init__(self, rules: RulesFn):
        self.rules = rules
        self.seq = 0
        self.buckets: dict[str, ModelBucket] = {}
        # (table, key json) -> {(bucket, type, id): (op_id, checksum)}
        self.current: dict[tuple[str, str], dict[tuple[str, str, str], tuple[int, int]]] = {}
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}

    def _bucket(self, name: str) -> ModelBucket:
        return self.buckets.setdefault(name, ModelBucket())

    def _new_op(self, bucket: str, op: ModelOp) -> None:
        self._bucket(bucket).ops[op.op_id] = op

    def _supersede(self, bucket: str, op_id: int, by: int) -> None:
        old = self.buckets[bucket].ops[op_id]
        self.buckets[bucket].ops[op_id] = ModelOp(op_id, "MOVE", old.checksum, target=by)

    def upsert(self, table: str, key: dict[str, Any], row: dict[str, Any]) -> None:
        rk = (table, json.dumps(key, sort_keys=True, separators=(",", ":")))
        self.rows[rk] = row
        cur = self.current.setdefault(rk, {})
        outputs = self.rules(table, row)
        wanted = set()
        for bucket, ot, oid, data in outputs:
            ident = (bucket, ot, oid)
            wanted.add(ident)
            cs = put_cs(ot, oid, data)
            if ident in cur and cur[ident][1] == cs:
                continue
            self.seq += 1
            self._new_op(bucket, ModelOp(self.seq, "PUT", cs, ot, oid, data))
            if ident in cur:
                self._supersede(bucket, cur[ident][0], self.seq)
            cur[ident] = (self.seq, cs)
        for ident in sorted(set(cur) - wanted, key=lambda i: cur[i][0]):
            self._remove(rk, ident)

    def _remove(self, rk: tuple[str, str], ident: tuple[str, str, str]) -> None:
        bucket, ot, oid = ident
        old_id, _ = self.current[rk].pop(ident)
        self.seq += 1
        self._new_op(bucket, ModelOp(self.seq, "REMOVE", remove_cs(ot, oid), ot, oid))
        self._supersede(bucket, old_id, self.seq)

    def delete(self, table: str, key: dict[str, Any]) -> None:
        rk = (table, json.dumps(key, sort_keys=True, separators=(",", ":")))
        self.rows.pop(rk, None)
        cur = self.current.get(rk, {})
        for ident in sorted(cur, key=lambda i: cur[i][0]):
            self._remove(rk, ident)
        self.current.pop(rk, None)

    def truncate(self, table: str) -> None:
        for rk in sorted(rk for rk in self.current if rk[0] == table):
            self.delete(table, json.loads(rk[1]))

    def apply(self, event: dict[str, Any]) -> None:
        action = event["action"]
        if action == "upsert":
            self.upsert(event["table"], event["key"], event["row"])
        elif action == "delete":
            self.delete(event["table"], event["key"])
        elif action == "truncate":
            self.truncate(event["table"])

    def apply_all(self, events: Iterable[dict[str, Any]]) -> None:
        for e in events:
            self.apply(e)

    def compact(self, bucket: str) -> None:
        """Fold the leading MOVE/REMOVE/CLEAR run into one CLEAR (§7)."""
        b = self.buckets[bucket]
        run: list[ModelOp] = []
        for op_id in sorted(b.ops):
            o = b.ops[op_id]
            if o.op not in ("MOVE", "REMOVE", "CLEAR"):
                break
            run.append(o)
        if not run or (len(run) == 1 and run[0].op == "CLEAR"):
            return
        for o in run:
            del b.ops[o.op_id]
        last = run[-1].op_id
        b.ops[last] = ModelOp(last, "CLEAR", sum(o.checksum for o in run) % MOD)
