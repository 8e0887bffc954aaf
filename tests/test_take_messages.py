"""The faust driver's batching of the conductor's queue (pure asyncio, no services)."""

from __future__ import annotations

import asyncio

from pipeline.processor import take_messages


def test_takes_what_is_queued_up_to_the_limit_in_order() -> None:
    async def go() -> list[list[int]]:
        q: asyncio.Queue[int] = asyncio.Queue()
        for i in range(7):
            q.put_nowait(i)
        return [await take_messages(q, 3, 0.01) for _ in range(4)]

    assert asyncio.run(go()) == [[0, 1, 2], [3, 4, 5], [6], []]


def test_collects_items_delivered_one_at_a_time_and_loses_none() -> None:
    async def go() -> list[int]:
        q: asyncio.Queue[int] = asyncio.Queue(maxsize=4)

        async def produce() -> None:
            for i in range(200):
                await q.put(i)
                if i % 3 == 0:
                    await asyncio.sleep(0)

        task = asyncio.create_task(produce())
        got: list[int] = []
        while len(got) < 200:
            batch = await take_messages(q, 16, 0.05)
            assert len(batch) <= 16
            got += batch
        await task
        return got

    assert asyncio.run(go()) == list(range(200))
