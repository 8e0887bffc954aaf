"""``bucketsync bench <mode>``: benchmarks, one module per mode, results as JSON + markdown + PNG.

Never timed assertions: these report medians and ratios on a shared, noisy machine. The
package sits above ``pipeline`` and ``gateway`` (it imports both; neither imports it).
"""

from __future__ import annotations

import argparse

from bucketsync.config import Settings
from bucketsync.errors import UserError


def drivers_for(choice: str) -> list[str]:
    """``--driver``: ``both`` measures the kafka and the faust driver."""
    return ["kafka", "faust"] if choice == "both" else [choice]


def one_driver(choice: str, settings: Settings) -> str:
    """``--driver`` for a benchmark that runs one processor: ``both`` (the CLI's default)
    means the configured ``processor.driver``."""
    return settings.processor.driver if choice == "both" else choice


def main(settings: Settings, args: argparse.Namespace) -> int:
    """``bucketsync bench <mode>``: the CLI's arguments become each mode's typed ones."""
    if args.which == "ingest":
        from bucketsync.bench.ingest import bench_ingest

        drivers = drivers_for(args.driver)
        return bench_ingest(settings, args.events or 200_000, args.out, drivers, args.runs)
    if args.which == "compact":
        from bucketsync.bench.compact import bench_compact

        return bench_compact(settings, args.out, history=args.history, events=args.events)
    if args.which == "fanout":
        from bucketsync.bench.fanout import bench_fanout

        levels = [int(x) for x in args.levels.split(",")] if args.levels else None
        return bench_fanout(
            settings,
            args.out,
            levels,
            workers=args.gateway_workers,
            client_procs=args.client_procs,
        )
    if args.which == "lookups":
        from bucketsync.bench.lookups import bench_lookups

        return bench_lookups(settings, args.out)
    if args.which == "e2e":
        from bucketsync.bench.e2e import main as e2e_main

        return e2e_main(
            settings,
            clients=2000 if args.clients is None else args.clients,
            rate=5000.0 if args.rate is None else args.rate,
            seconds=args.seconds,
            workers=args.workers,
            batch_wait_ms=args.batch_wait_ms,
            replica=args.replica,
            out=args.out,
        )
    if args.which == "initial-sync":
        from bucketsync.bench.initial_sync import main as initial_sync_main

        return initial_sync_main(
            settings, ops=args.ops, runs=args.runs, node=not args.no_node, out=args.out
        )
    if args.which == "reconnect":
        from bucketsync.bench.reconnect import main as reconnect_main

        return reconnect_main(
            settings,
            clients=2000 if args.clients is None else args.clients,
            workers=args.workers,
            replica=args.replica,
            client_procs=max(1, args.client_procs),
            out=args.out,
        )
    # the older modes' defaults (the new ones choose their own when these are unset)
    rate = 50.0 if args.rate is None else args.rate
    clients = 5000 if args.clients is None else args.clients
    if args.which == "recovery":
        from bucketsync.bench.recovery import main as recovery_main

        return recovery_main(
            settings,
            drivers=drivers_for(args.driver),
            runs=args.runs,
            rate=rate,
            out=args.out,
            consistency=args.consistency,
        )
    if args.which == "soak":
        from bucketsync.bench.soak import main as soak_main

        return soak_main(
            settings,
            minutes=args.minutes,
            clients=clients,
            rate=rate,
            sample_s=args.sample_s,
            rss_bound_mb=args.rss_bound_mb,
            out=args.out,
        )
    if args.which == "cdc":
        from bucketsync.bench.cdc import main as cdc_main

        return cdc_main(
            settings,
            events=args.events or 1000,
            rate=rate,
            driver=one_driver(args.driver, settings),
            connector_overrides=dict(args.connector_set or []),
            out=args.out,
        )
    if args.which == "store-layout":
        from bucketsync.bench.store_layout import main as store_layout_main

        return store_layout_main(buckets=args.buckets, out=args.out)
    raise UserError(f"unknown benchmark {args.which}")
