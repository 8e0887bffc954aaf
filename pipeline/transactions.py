"""Holding events until their source transaction is complete (architecture invariant 7).

Pure: decoded events go in, in consumption order; what may be applied comes out.
cdc-events.md §5.2: data events of a transaction are staged until its END has been
read and every announced event of the collections we consume has arrived; then the
whole transaction is released at once, so no checkpoint exposes part of it.

Offsets stay exact: per topic-partition only a prefix is ever released (once a
partition holds a staged event, everything after it in that partition waits too),
so the applied offset of a partition never passes an unapplied record and a restart
re-reads exactly what was still staged.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.cdc import KafkaRecord

log = logging.getLogger("bucketsync.transactions")

Item = tuple[KafkaRecord, Mapping[str, Any]]


@dataclass
class _Tx:
    first_seen: float
    orders: set[int] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=dict)
    end: Mapping[str, Any] | None = None


def tx_of(ev: Mapping[str, Any]) -> str | None:
    if ev.get("action") in ("tx_begin", "tx_end"):
        return str(ev.get("tx_id"))
    tx = ev.get("tx")
    if isinstance(tx, Mapping) and tx.get("id") is not None:
        return str(tx["id"])
    return None


class TransactionStager:
    def __init__(
        self,
        *,
        subscribed: Callable[[str], bool],
        max_staged_events: int = 100_000,
        grace_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        remember: int = 10_000,
    ):
        self.subscribed = subscribed
        self.max_staged = max_staged_events
        self.grace_s = grace_s
        self.clock = clock
        self._remember = remember
        self._pending: dict[str, deque[tuple[KafkaRecord, Mapping[str, Any], str | None]]] = {}
        self._txs: dict[str, _Tx] = {}
        self._done: OrderedDict[str, None] = OrderedDict()
        self._waiting: dict[str, int] = {}  # tx -> its events still pending
        self.staged = 0
        self.degraded = 0

    def push(self, rec: KafkaRecord, ev: Mapping[str, Any]) -> None:
        tp = f"{rec.topic}/{rec.partition}"
        txid = tx_of(ev)
        if txid is not None and txid in self._done:
            # a replay of an applied transaction: keep its place (offsets) but drop the effect
            ev, txid = {"action": "ignore", "reason": "replayed_transaction"}, None
        elif txid is not None:
            st = self._txs.get(txid)
            if st is None:
                st = self._txs[txid] = _Tx(self.clock())
            action = ev.get("action")
            if action == "tx_end":
                st.end = ev
            elif action in ("upsert", "delete", "truncate"):
                order = int(ev["tx"].get("total_order") or 0)
                if order in st.orders:
                    ev = {"action": "ignore", "reason": "duplicate_in_transaction"}
                else:
                    st.orders.add(order)
                    table = str(ev.get("table"))
                    st.counts[table] = st.counts.get(table, 0) + 1
        self._pending.setdefault(tp, deque()).append((rec, ev, txid))
        self.staged += 1
        if txid is not None:
            self._waiting[txid] = self._waiting.get(txid, 0) + 1

    def _complete(self, txid: str, now: float) -> bool:
        st = self._txs.get(txid)
        if st is None:
            return True
        if st.end is not None:
            wanted = st.end.get("data_collections") or {}
            if all(
                st.counts.get(coll, 0) >= int(n)
                for coll, n in wanted.items()
                if self.subscribed(coll)
            ):
                return True
        if now - st.first_seen > self.grace_s:
            log.warning(
                "transaction %s incomplete after %.0fs (END %s); applying what arrived (unverified)",
                txid,
                self.grace_s,
                "seen" if st.end is not None else "missing",
            )
            self.degraded += 1
            return True
        return False

    def release(self) -> list[Item]:
        """Everything that may be applied now, each partition's events in order."""
        now = self.clock()
        flush_all = self.staged > self.max_staged
        if flush_all:
            log.warning(
                "%d staged events exceed processor.max_staged_events=%d; applying them now "
                "(this checkpoint may expose part of a transaction)",
                self.staged,
                self.max_staged,
            )
            self.degraded += 1
        verdict: dict[str, bool] = {}
        out: list[Item] = []
        released_tx: set[str] = set()
        for q in self._pending.values():
            while q:
                rec, ev, txid = q[0]
                if txid is not None and not flush_all:
                    ok = verdict.get(txid)
                    if ok is None:
                        ok = verdict[txid] = self._complete(txid, now)
                    if not ok:
                        break
                q.popleft()
                self.staged -= 1
                out.append((rec, ev))
                if txid is not None:
                    released_tx.add(txid)
                    self._waiting[txid] -= 1
        for txid in released_tx:
            if self._waiting.get(txid) == 0:
                del self._waiting[txid]
            # a transaction forced out by the cap stays open: its later events are not replays
            if verdict.get(txid, False) and txid not in self._waiting:
                self._txs.pop(txid, None)
                self._done[txid] = None
                while len(self._done) > self._remember:
                    self._done.popitem(last=False)
        for tp in [tp for tp, q in self._pending.items() if not q]:
            del self._pending[tp]
        return out
