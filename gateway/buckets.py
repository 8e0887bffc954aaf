"""A connection's bucket set: from the token and the rules, expanded through the lookup
index when parameter queries read synced tables (memberships and the like).

The set is resolved consistently with a checkpoint (architecture invariant 5): the
lookup rows are read once for all of the request's lookup keys, the bucket set is
computed from them, and then the checkpoint, the buckets' states and the same lookup
rows are read again in one atomic step. When the rows are unchanged, the bucket set is
exactly the one at that checkpoint; otherwise the freshly read rows are used and read
once more (a membership that changes at every try ends the attempts after a few rounds;
the connection then holds the newest set read, and the lookup change that raced it
wakes the connection again).
"""

from __future__ import annotations

import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import Histogram

from gateway.errors import CODE_TOO_MANY_BUCKETS, ServiceError
from gateway.starts import StartReads
from pipeline.rules import SyncRules
from pipeline.rules.evaluate import RequestPlan, StreamSubscription
from pipeline.store import BucketState, LookupRows, Store, decode_lookups

EXPANSION_SECONDS = Histogram(
    "bucketsync_gateway_bucket_expansion_seconds",
    "Time to resolve a connection's bucket set through the lookup index and read its checkpoint",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)

_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class Grant:
    bucket: str
    priority: int
    #: ``("default", <index into the checkpoint's streams>)`` / ``("sub", <subscription index>)``
    subscriptions: tuple[tuple[str, int], ...] = (("default", 0),)


@dataclass(slots=True)
class Resolution:
    cp: int
    grants: list[Grant]
    states: dict[str, BucketState]
    #: the write checkpoints of the stream's key, when read with the states (the stream
    #: then need not read them itself); None: not read
    write_checkpoints: dict[int, dict[str, int]] | None = None
    #: False: the lookup rows changed on every confirming read, so ``grants`` holds only
    #: the buckets granted both by the rows the states were read for and by the rows at
    #: ``cp``; the stream resolves again at once
    settled: bool = True


class ExpansionCache:
    """Bucket expansions by request signature: the lookup rows last read for it and the
    bucket set computed from them (``BucketResolver.grants``). Bounded by the buckets held;
    least recently used first out. A reconnecting client, or a connection whose lookup key
    changed back and forth, skips the evaluation and the separate lookup read."""

    def __init__(self, max_buckets: int = 200_000):
        self.max_buckets = max_buckets
        self.held = 0
        self._entries: OrderedDict[bytes, tuple[LookupRows, list[Grant]]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self._entries.clear()
        self.held = 0

    def get(self, key: bytes) -> tuple[LookupRows, list[Grant]] | None:
        hit = self._entries.get(key)
        if hit is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return hit

    def put(self, key: bytes, rows: LookupRows, grants: list[Grant]) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.held -= len(old[1])
        if len(grants) > self.max_buckets // 4:
            return
        self._entries[key] = (rows, grants)
        self.held += len(grants)
        while self.held > self.max_buckets and self._entries:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.held -= len(dropped)


_CACHES: weakref.WeakKeyDictionary[SyncRules, ExpansionCache] = weakref.WeakKeyDictionary()


def _cache_for(rules: SyncRules) -> ExpansionCache:
    """One cache per compiled rules object (a reload never sees another's expansions)."""
    cache = _CACHES.get(rules)
    if cache is None:
        cache = _CACHES[rules] = ExpansionCache()
    return cache


#: bucket sets up to this size go through the shared read of starting streams (larger
#: ones read on their own, packed: see Store.read_checkpoint)
_SHARED_MAX = 64

_STREAM_LISTS: dict[bytes, list[Any]] = {}


def _interned(streams: list[Any]) -> list[Any]:
    """One shared list per distinct ``streams`` value (most requests list the same streams;
    one list of dicts per connection was about 0.9 KB). Never changed by its users."""
    key = orjson.dumps(streams)
    hit = _STREAM_LISTS.get(key)
    if hit is None:
        if len(_STREAM_LISTS) >= 1024:
            _STREAM_LISTS.clear()
        hit = _STREAM_LISTS[bytes(memoryview(key))] = streams
    return hit


class BucketResolver:
    """Resolves one request's buckets; built once per connection, resolved again when one
    of its lookup keys changes."""

    def __init__(
        self,
        rules: SyncRules,
        payload: Mapping[str, Any],
        parameters: Mapping[str, Any] | None,
        *,
        include_defaults: bool,
        max_buckets: int,
        max_parameter_results: int,
        subscriptions: Sequence[tuple[str, Any, Any]] = (),
    ):
        self.rules = rules
        self.payload = payload
        self.parameters = parameters
        self.include_defaults = include_defaults
        self.max_buckets = max_buckets
        self.max_parameter_results = max_parameter_results
        self._plan: RequestPlan | None = None
        #: defaults (every edition-1 definition, the auto_subscribe streams) and the
        #: request's explicit subscriptions (sync-streams.md §1b); problems of a
        #: subscription are errors in ``streams``, not a failed request
        self._subscriptions = [StreamSubscription(n, p, o) for n, p, o in subscriptions]
        plan = self.plan
        #: the checkpoint's ``streams``, fixed at the first checkpoint (diffs never change it)
        self.stream_names: list[Any] = _interned([st.wire() for st in plan.streams])
        self.lookup_keys: list[str] = plan.lookup_keys
        #: everything the bucket set depends on besides the lookup rows (copied: orjson's
        #: result keeps a 4 KB allocation behind it, per connection)
        self.signature = bytes(
            memoryview(
                orjson.dumps(
                    [
                        payload,
                        parameters,
                        include_defaults,
                        [list(x) for x in subscriptions],
                        max_buckets,
                        max_parameter_results,
                    ],
                    option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS,
                    default=repr,
                )
            )
        )

    @property
    def plan(self) -> RequestPlan:
        """The request's plan (built from the request's inputs; not kept between resolutions:
        about 2.5 KB that an idle connection would hold)."""
        plan = self._plan
        if plan is None:
            plan = self._plan = self.rules.plan_request(
                self.payload,
                self.parameters,
                include_defaults=self.include_defaults,
                subscriptions=self._subscriptions,
            )
        return plan

    def grants(self, lookups: LookupRows | None = None) -> list[Grant]:
        """The bucket set for the given lookup rows (raises the protocol's PSYNC_S2305)."""
        if lookups is not None:
            results = sum(len(v) for v in lookups.values())
            if results > self.max_parameter_results:
                raise ServiceError(
                    400,
                    CODE_TOO_MANY_BUCKETS,
                    f"too many parameter query results: {results} > "
                    f"{self.max_parameter_results} (gateway.max_parameter_query_results)",
                )
        descs = self.plan.buckets(decode_lookups(lookups) if lookups is not None else None)
        # a request has a few distinct reasons (the plan's entries): convert each once
        reasons: dict[tuple[int, ...], tuple[tuple[str, int], ...]] = {}
        out = []
        for d in descs:
            rkey = tuple(map(id, d.subscriptions))
            subs = reasons.get(rkey)
            if subs is None:
                subs = reasons[rkey] = tuple(
                    (k, v) for reason in d.subscriptions for k, v in reason.items()
                )
            out.append(Grant(d.bucket, d.priority, subs))
        if len(out) > self.max_buckets:
            raise ServiceError(
                400,
                CODE_TOO_MANY_BUCKETS,
                f"too many buckets: {len(out)} > {self.max_buckets} "
                "(gateway.max_buckets_per_connection)",
            )
        return out

    async def resolve(
        self,
        store: Store,
        on_buckets: Callable[[Sequence[str]], None] = lambda b: None,
        *,
        starts: StartReads | None = None,
        wcp_key: str | None = None,
    ) -> Resolution:
        """The bucket set and its states at one checkpoint.

        ``on_buckets`` is called with the bucket set before its states are read, so the
        caller can subscribe to their changes first (no change between read and subscribe
        goes unseen). With ``starts`` and ``wcp_key``, a bucket set that needs no lookup
        rows is read in the shared read of streams starting together, with the write
        checkpoints of ``wcp_key`` (``Resolution.write_checkpoints``).
        """
        t0 = time.perf_counter()
        try:
            if not self.lookup_keys:
                grants = self.grants()
                names = [g.bucket for g in grants]
                on_buckets(names)
                if starts is not None and wcp_key is not None and len(names) <= _SHARED_MAX:
                    cp, states, wcps = await starts.read(names, wcp_key)
                    return Resolution(cp, grants, states, wcps)
                cp, states = await store.read_checkpoint(names)
                return Resolution(cp, grants, states)
            cache = _cache_for(self.rules)
            hit = cache.get(self.signature)
            if hit is not None:
                # the expansion of the rows this request saw last: confirmed (or replaced)
                # by the atomic read, so a hit costs one round trip and no evaluation
                rows, grants = hit
            else:
                rows = await store.read_lookups(self.lookup_keys)
                grants = self.grants(rows)
            for attempt in range(_ATTEMPTS):
                names = [g.bucket for g in grants]
                on_buckets(names)
                cp, states, again = await store.read_checkpoint_with_lookups(
                    names, self.lookup_keys
                )
                if again == rows:
                    break
                latest = self.grants(again)
                if attempt == _ATTEMPTS - 1:
                    # never confirmed: grant only what both the rows these states and this
                    # subscription were read for and the rows at cp grant (a bucket granted
                    # without its state or subscription would have its ops skipped)
                    cache.put(self.signature, again, latest)
                    read = set(names)
                    kept = [g for g in latest if g.bucket in read]
                    kept_states = {g.bucket: states[g.bucket] for g in kept}
                    return Resolution(cp, kept, kept_states, settled=False)
                rows, grants = again, latest
            cache.put(self.signature, rows, grants)
            return Resolution(cp, grants, states)
        finally:
            self._plan = None
            EXPANSION_SECONDS.observe(time.perf_counter() - t0)
