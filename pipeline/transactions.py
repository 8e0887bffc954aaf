"""Holding events until their source transaction is complete (architecture invariant 7).

Pure: decoded events go in, in consumption order; what may be applied comes out.
cdc-events.md §5.2: data events of a transaction are staged until its END has been
read and every announced event of the collections we consume has arrived; then the
whole transaction is released at once, so no checkpoint exposes part of it.

Two rules decide what :meth:`TransactionStager.release` hands out:

- **prefix**: per topic-partition only a prefix of the staged events is ever released
  (once a partition holds a held event, everything after it in that partition waits
  too), so the applied offset of a partition never passes an unapplied record and a
  restart re-reads exactly what was still staged;
- **all or nothing**: the staged events of a transaction (BEGIN, data, END, in
  whatever order they were read) are released together or not at all. A complete
  transaction whose events in one partition wait behind a held event (of an
  incomplete transaction) is held in every partition, which may in turn hold other
  complete transactions behind it: the releasable set is computed as a fixpoint.

Complete transactions released together come out in the order their END markers were
read (commit order; the transaction topic has one partition), each in ``total_order``,
as far as the per-partition order allows (a merge of the partitions' prefixes).

Two documented escapes (degraded, logged): beyond ``max_staged_events`` everything
staged is released at once, and a transaction still incomplete ``grace_s`` after its
first event was read is released with what arrived ("unverified"). Such a transaction
has been exposed in part: its later events are released as they come (still whole
per release, still as prefixes) until it completes.

Partitions that are revoked, or sought back and read again (after a rebalance the
driver resumes each assigned partition at the store's applied offset + 1), must be
dropped with :meth:`TransactionStager.forget`, or their staged events would be staged
twice. As a safety net, :meth:`TransactionStager.push` also treats a record at or
below an offset already staged for its partition as a re-read from there and drops
the staged events from that offset on.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from pipeline.cdc import DecodedEvent, KafkaRecord, TxEndEvent

log = logging.getLogger("bucketsync.transactions")

Item = tuple[KafkaRecord, DecodedEvent]

_BEGIN_ORDER = -1
_END_ORDER = 1 << 62


@dataclass
class _Tx:
    first_seen: float
    orders: set[int] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=dict)
    end: TxEndEvent | None = None
    #: position of its END among the END markers read (commit order)
    end_seq: int | None = None
    #: position of its first event among all events read (tie-break without an END)
    first_seq: int = 0
    #: part of it was applied while incomplete (grace period or cap): later events of it
    #: are released as they come
    forced: bool = False


@dataclass(slots=True)
class _Staged:
    rec: KafkaRecord
    ev: DecodedEvent
    txid: str | None
    #: BEGIN -1, data ``total_order``, END 2**62 (release order inside a transaction)
    order: int
    #: what this event added to its transaction's state: ``(total_order, table)`` for a
    #: counted data event, ``"end"`` for the END that completes it, else None
    contrib: tuple[int, str] | str | None


def tx_of(ev: DecodedEvent) -> str | None:
    """The transaction an event belongs to: a marker's ``tx_id``, a row event's ``tx.id``."""
    if ev["action"] == "tx_begin" or ev["action"] == "tx_end":
        return str(ev["tx_id"])
    if ev["action"] == "upsert" or ev["action"] == "delete" or ev["action"] == "truncate":
        tx = ev.get("tx")
        if isinstance(tx, Mapping) and tx.get("id") is not None:
            return str(tx["id"])
    return None


class TransactionStager:
    """:meth:`push` every fresh decoded record in consumption order, then :meth:`release`
    what may be applied in one atomic step; :meth:`forget` partitions that are revoked or
    read again. ``staged`` counts held events, ``degraded`` the cap and grace escapes."""

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
        self._pending: dict[str, deque[_Staged]] = {}
        self._txs: dict[str, _Tx] = {}
        #: recently completed and released transactions: later events of them are replays
        self._done: OrderedDict[str, None] = OrderedDict()
        #: transactions released incomplete and not completed since (bounded like _done)
        self._forced: OrderedDict[str, None] = OrderedDict()
        #: transactions completed since the last :meth:`take_done` (the store keeps them, so
        #: a processor started later still knows their replays: :meth:`remember_done`)
        self._newly_done: list[str] = []
        self._waiting: dict[str, int] = {}  # tx -> its events still staged
        self._seq = 0
        self._end_seq = 0
        self.staged = 0
        self.degraded = 0

    # ------------------------------------------------------------------ input

    def push(self, rec: KafkaRecord, ev: DecodedEvent) -> None:
        tp = f"{rec.topic}/{rec.partition}"
        q = self._pending.get(tp)
        if q and q[-1].rec.offset >= rec.offset:
            log.warning(
                "%s read again from offset %d while events up to %d were staged; "
                "dropping the staged ones from there (call forget() on reassignment)",
                tp,
                rec.offset,
                q[-1].rec.offset,
            )
            self._drop(tp, rec.offset)
            q = self._pending.get(tp)
        self._seq += 1
        txid = tx_of(ev)
        order = 0
        contrib: tuple[int, str] | str | None = None
        if txid is not None and txid in self._done:
            # a replay of an applied transaction: keep its place (offsets) but drop the effect
            ev, txid = {"action": "ignore", "reason": "replayed_transaction"}, None
        elif txid is not None:
            st = self._txs.get(txid)
            if st is None:
                st = self._txs[txid] = _Tx(self.clock(), first_seq=self._seq)
            if ev["action"] == "tx_begin":
                order = _BEGIN_ORDER
            elif ev["action"] == "tx_end":
                order = _END_ORDER
                if st.end is None:
                    st.end = ev
                    self._end_seq += 1
                    st.end_seq = self._end_seq
                    contrib = "end"
            elif ev["action"] == "upsert" or ev["action"] == "delete" or ev["action"] == "truncate":
                order = int(ev["tx"].get("total_order") or 0)
                if order in st.orders:
                    ev = {"action": "ignore", "reason": "duplicate_in_transaction"}
                else:
                    table = str(ev["table"])
                    st.orders.add(order)
                    st.counts[table] = st.counts.get(table, 0) + 1
                    contrib = (order, table)
        if q is None:
            q = self._pending[tp] = deque()
        q.append(_Staged(rec, ev, txid, order, contrib))
        self.staged += 1
        if txid is not None:
            self._waiting[txid] = self._waiting.get(txid, 0) + 1

    def forget(self, partitions: Iterable[str]) -> None:
        """Drop the staged events of ``partitions`` (``"topic/partition"``), as if they had
        never been pushed: call it for partitions that are revoked, and for partitions
        that will be read again from the store's applied offset + 1 (on assignment).
        Released events are not affected (they are applied, so not read again)."""
        for tp in partitions:
            self._drop(tp, None)

    def _drop(self, tp: str, from_offset: int | None) -> None:
        q = self._pending.get(tp)
        if not q:
            return
        keep: deque[_Staged] = deque()
        while q and from_offset is not None and q[0].rec.offset < from_offset:
            keep.append(q.popleft())
        touched: set[str] = set()
        for s in q:
            self.staged -= 1
            if s.txid is None:
                continue
            touched.add(s.txid)
            self._waiting[s.txid] -= 1
            st = self._txs.get(s.txid)
            if st is None:
                continue
            if s.contrib == "end":
                st.end = None
                st.end_seq = None
            elif isinstance(s.contrib, tuple):
                order, table = s.contrib
                st.orders.discard(order)
                st.counts[table] -= 1
        for txid in touched:
            if self._waiting[txid] == 0:
                del self._waiting[txid]
                st = self._txs.get(txid)
                if st is not None and not st.orders and st.end is None and not st.forced:
                    del self._txs[txid]  # nothing of it left: as if never read
        if keep:
            self._pending[tp] = keep
        else:
            del self._pending[tp]

    # ------------------------------------------------------------------ output

    def _complete(self, st: _Tx) -> bool:
        if st.end is None:
            return False
        wanted = st.end.get("data_collections") or {}
        return all(
            st.counts.get(coll, 0) >= int(n) for coll, n in wanted.items() if self.subscribed(coll)
        )

    def _ready(self, txid: str, now: float) -> bool:
        """May this transaction's staged events go out (if all of them can)?"""
        st = self._txs.get(txid)
        if st is None or st.forced or self._complete(st):
            return True
        if now - st.first_seen > self.grace_s:
            log.warning(
                "transaction %s incomplete after %.0fs (END %s); applying what arrived (unverified)",
                txid,
                self.grace_s,
                "seen" if st.end is not None else "missing",
            )
            self.degraded += 1
            self._force(txid, st)
            return True
        return False

    def _force(self, txid: str, st: _Tx) -> None:
        st.forced = True
        self._forced[txid] = None
        self._forced.move_to_end(txid)

    def _releasable(self, now: float) -> dict[str, int]:
        """How many events to release per partition: the fixpoint of both rules."""
        ready = {t for t in self._waiting if self._ready(t, now)}
        prefixes: dict[str, list[str | None]] = {}
        inside: dict[str, int] = {}  # ready tx -> its events inside the prefixes
        first: dict[str, dict[str, int]] = {}  # tp -> ready tx -> index of its first event
        for tp, q in self._pending.items():
            ids: list[str | None] = []
            firsts: dict[str, int] = {}
            for s in q:
                t = s.txid
                if t is not None:
                    if t not in ready:
                        break
                    if t in firsts:
                        inside[t] += 1
                    else:
                        firsts[t] = len(ids)
                        inside[t] = inside.get(t, 0) + 1
                ids.append(t)
            prefixes[tp] = ids
            first[tp] = firsts
        # a ready transaction with an event outside the prefixes is held everywhere: cut
        # every prefix before its first event, which may hold others in turn
        work = [t for t in ready if inside.get(t, 0) < self._waiting[t]]
        while work:
            t = work.pop()
            if t not in ready:
                continue
            ready.discard(t)
            for tp, ids in prefixes.items():
                pos = first[tp].get(t)
                if pos is None or pos >= len(ids):
                    continue
                for u in ids[pos:]:
                    if u is not None:
                        inside[u] -= 1
                        if u in ready:
                            work.append(u)
                del ids[pos:]
        return {tp: len(ids) for tp, ids in prefixes.items() if ids}

    def release(self) -> list[Item]:
        """Everything that may be applied now: per partition a prefix, in order; whole
        transactions, complete ones in END order."""
        now = self.clock()
        if self.staged > self.max_staged:
            log.warning(
                "%d staged events exceed processor.max_staged_events=%d; applying them now "
                "(this checkpoint may expose part of a transaction)",
                self.staged,
                self.max_staged,
            )
            self.degraded += 1
            counts = {tp: len(q) for tp, q in self._pending.items()}
        else:
            counts = self._releasable(now)
        if not counts:
            return []
        lists: list[list[_Staged]] = []
        for tp, n in counts.items():
            q = self._pending[tp]
            lists.append([q.popleft() for _ in range(n)])
            if not q:
                del self._pending[tp]
        out = [(s.rec, s.ev) for s in self._merge(lists)]
        released: set[str] = set()
        for lst in lists:
            self.staged -= len(lst)
            for s in lst:
                if s.txid is not None:
                    released.add(s.txid)
                    self._waiting[s.txid] -= 1
        for txid in released:
            if self._waiting[txid] == 0:
                del self._waiting[txid]
            st = self._txs.get(txid)
            if st is None:
                continue
            if self._complete(st):
                if txid not in self._waiting:
                    # whole and applied: later events of it are replays
                    self._txs.pop(txid)
                    self._forced.pop(txid, None)
                    self._done[txid] = None
                    self._newly_done.append(txid)
                    while len(self._done) > self._remember:
                        self._done.popitem(last=False)
            elif not st.forced:  # released incomplete by the cap: stays open
                self._force(txid, st)
        while len(self._forced) > self._remember:
            old, _ = self._forced.popitem(last=False)
            if old not in self._waiting:
                self._txs.pop(old, None)
            else:
                self._forced[old] = None  # still staged: keep it, evict later
                break
        return out

    @property
    def remember(self) -> int:
        """How many completed transactions are remembered (their later events are replays)."""
        return self._remember

    def take_done(self) -> list[str]:
        """Transactions completed by :meth:`release` since the last call."""
        done, self._newly_done = self._newly_done, []
        return done

    def reset_done(self, txids: Iterable[str]) -> None:
        """The completed transactions are ``txids`` (oldest first): those the store has
        applied, and those on their way to it. Later events of them are replays (a
        restarted Debezium connector sends its last records again).

        Called whenever the processor takes the store's applied offsets as the truth (at
        start, on assignment, after a refused batch or a store outage). Without it a replay
        after a restart was staged as a new transaction and held for ``grace_s``, and
        everything after it on its partitions with it; and after a store outage that lost
        the batch in flight, its transactions, read again, were dropped as replays."""
        self._done = OrderedDict((t, None) for t in txids if t not in self._txs)
        while len(self._done) > self._remember:
            self._done.popitem(last=False)

    def _merge(self, lists: list[list[_Staged]]) -> list[_Staged]:
        """One order for the released events: each partition's order kept; among
        partition heads, events outside transactions first, then the transaction whose
        END was read first (commit order), then ``total_order``."""
        if len(lists) == 1:
            return lists[0]

        def key(s: _Staged) -> tuple[int, int, int]:
            if s.txid is None:
                return (-1, 0, 0)
            st = self._txs.get(s.txid)
            if st is None:
                return (2, 0, s.order)
            if st.end_seq is not None:
                return (0, st.end_seq, s.order)
            return (1, st.first_seq, s.order)

        heap = [(key(lst[0]), i, 0) for i, lst in enumerate(lists) if lst]
        heapq.heapify(heap)
        out: list[_Staged] = []
        while heap:
            _, i, j = heapq.heappop(heap)
            out.append(lists[i][j])
            if j + 1 < len(lists[i]):
                heapq.heappush(heap, (key(lists[i][j + 1]), i, j + 1))
        return out
