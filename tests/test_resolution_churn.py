"""A connection's bucket set resolved while its lookup rows keep changing (memberships
added and removed faster than the confirming reads): whatever the resolver returns must be
one consistent answer. The buckets it grants are the ones whose states it read and that
the connection listens to (the names it handed ``on_buckets`` last); a bucket granted
without its state or its subscription has its later ops skipped by the stream (the client
then fails its checksum: found by scripts/qa-streams.py, rules mode with reconnecting
clients). No bucket is granted that the rows at the returned checkpoint do not grant, and
an answer that could not be confirmed says so (``settled``), so the stream resolves again.
Pure logic: the in-memory store of the gateway tests, no services."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.buckets import Resolution
from pipeline.store import BucketState, LookupRows
from tests.helpers.memory_store import MemoryStore
from tests.test_gateway_core import make_resolver

RULES = """bucket_definitions:
  shared:
    parameters:
      - SELECT id AS list_id FROM lists WHERE owner_id = request.user_id()
      - SELECT list_id FROM memberships WHERE user_id = request.user_id()
    data:
      - SELECT id, owner_id, name FROM lists WHERE id = bucket.list_id
"""


class ChurningStore(MemoryStore):
    """Every confirming read sees the memberships of the next step of ``plan`` (as if a
    batch had been applied just before it): the rows never agree twice in a row."""

    def __init__(self, key: str, plan: Sequence[set[str]]) -> None:
        super().__init__()
        self.key = key
        self.plan = list(plan)
        self.step = 0
        self._set(self.plan[0])

    def _set(self, lists: set[str]) -> None:
        self.lookups[self.key] = {f'["{x}"]'.encode(): 1 for x in lists}

    async def read_checkpoint_with_lookups(
        self, buckets: Sequence[str], keys: Sequence[str]
    ) -> tuple[int, dict[str, BucketState], LookupRows]:
        self.step += 1
        self._set(self.plan[self.step % len(self.plan)])
        self.cp += 1
        return await super().read_checkpoint_with_lookups(buckets, keys)


def _granted_by(lists: set[str]) -> set[str]:
    return {f'shared["{x}"]' for x in lists}


async def _resolve(plan: Sequence[set[str]]) -> tuple[Resolution, list[str], ChurningStore]:
    resolver = make_resolver(RULES)
    members_key = resolver.lookup_keys[1]  # the memberships query's lookup key
    store = ChurningStore(members_key, plan)
    subscribed: list[str] = []

    def on_buckets(names: Sequence[str]) -> None:
        subscribed[:] = names

    res = await resolver.resolve(store, on_buckets)  # type: ignore[arg-type]
    return res, subscribed, store


async def test_rows_changing_on_every_read_give_a_consistent_resolution() -> None:
    plan = [{"L1"}, {"L2"}, {"L1", "L3"}, {"L2", "L3"}]
    res, subscribed, store = await _resolve(plan)
    granted = {g.bucket for g in res.grants}
    assert granted == set(res.states), (granted, sorted(res.states))
    assert granted <= set(subscribed), (granted, subscribed)
    # nothing the memberships at the returned checkpoint do not grant
    at_cp = plan[store.step % len(plan)]
    assert granted <= _granted_by(at_cp), (granted, at_cp)
    assert res.settled is False


async def test_rows_that_settle_give_the_confirmed_set() -> None:
    res, subscribed, _ = await _resolve([{"L1", "L2"}])
    assert {g.bucket for g in res.grants} == _granted_by({"L1", "L2"})
    assert set(subscribed) == _granted_by({"L1", "L2"}) and res.settled is True
