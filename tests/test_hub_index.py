"""The hub's subscriber indexes (a key's one subscriber held directly, a set from two on)
against a plain dict-of-sets model, over random subscribe / re-bucket / unsubscribe steps.
Pure logic: the store is never called."""

from __future__ import annotations

import random

from gateway.hub import CheckpointHub, Subscriber, _members
from pipeline.store import Store


def _index_model(subs: list[Subscriber]) -> dict[str, set[Subscriber]]:
    out: dict[str, set[Subscriber]] = {}
    for s in subs:
        for b in s.buckets:
            out.setdefault(b, set()).add(s)
    return out


def test_index_matches_model() -> None:
    rng = random.Random(12)
    hub = CheckpointHub(Store.from_url("redis://127.0.0.1:1/0", "unused"))
    live: list[Subscriber] = []
    names = [f"b{i}" for i in range(6)]
    for _ in range(2000):
        op = rng.random()
        if op < 0.4 or not live:
            live.append(
                hub.subscribe(rng.sample(names, rng.randint(0, 3)), f"w{rng.randint(0, 3)}")
            )
        elif op < 0.7:
            hub.set_buckets(rng.choice(live), rng.sample(names, rng.randint(0, 3)))
        else:
            sub = live.pop(rng.randrange(len(live)))
            hub.unsubscribe(sub)
        model = _index_model(live)
        assert set(hub._by_bucket) == set(model)
        for b in names:
            assert set(_members(hub._by_bucket, b)) == model.get(b, set())
            entry = hub._by_bucket.get(b)
            # a set only for two or more subscribers
            assert not isinstance(entry, set) or len(entry) >= 2
        wcp: dict[str, set[Subscriber]] = {}
        for s in live:
            wcp.setdefault(s.wcp_key, set()).add(s)
        assert {k: set(_members(hub._by_wcp, k)) for k in hub._by_wcp} == wcp
    assert hub.connections == len(live)
