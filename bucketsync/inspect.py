"""``bucketsync inspect``: the store's checkpoint, offsets, buckets, and one bucket's ops."""

from __future__ import annotations

import asyncio

from bucketsync.config import Settings
from pipeline.compaction import refuse_unknown_bucket
from pipeline.store import Store


async def _inspect(settings: Settings, bucket: str | None, limit: int) -> None:
    store = Store.from_settings(settings)
    try:
        if bucket is not None:
            await refuse_unknown_bucket(store, bucket)
        print(f"prefix      {settings.redis.prefix}")
        print(f"checkpoint  {await store.checkpoint()}")
        for tp, off in sorted((await store.applied_offsets()).items()):
            print(f"offset      {tp} = {off}")
        if bucket is None:
            buckets = await store.all_buckets()
            print(f"buckets     {len(buckets)}")
            for b in buckets[:limit]:
                st = await store.bucket_state(b)
                print(f"  {b}  checksum={st.checksum} count={st.count} last_op={st.last_op}")
            if len(buckets) > limit:
                print(f"  ... {len(buckets) - limit} more (--limit)")
            return
        st = await store.bucket_state(bucket)
        print(f"bucket      {bucket} checksum={st.checksum} count={st.count} last_op={st.last_op}")
        for op in (await store.all_ops(bucket))[:limit]:
            target = f"  (target {op.target})" if op.target else ""
            print(f"  {op.wire.decode()}{target}")
    finally:
        await store.close()


def main(settings: Settings, *, bucket: str | None = None, limit: int = 50) -> int:
    """``bucketsync inspect [--bucket B] [--limit N]``."""
    asyncio.run(_inspect(settings, bucket, limit))
    return 0
