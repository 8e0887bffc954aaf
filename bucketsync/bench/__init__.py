"""``bucketsync bench <mode>``: benchmarks, one module per mode, results as JSON + markdown + PNG.

Never timed assertions: these report medians and ratios on a shared, noisy machine. The
package sits above ``pipeline`` and ``gateway`` (it imports both; neither imports it).
"""

from __future__ import annotations

import argparse

from bucketsync.config import Settings
from bucketsync.errors import UserError


def main(settings: Settings, args: argparse.Namespace) -> int:
    if args.which == "ingest":
        from bucketsync.bench.ingest import bench_ingest

        drivers = ["kafka", "faust"] if args.driver == "both" else [args.driver]
        return bench_ingest(settings, args.events or 200_000, args.out, drivers, args.runs)
    if args.which == "compact":
        from bucketsync.bench.compact import bench_compact

        return bench_compact(settings, args.out)
    if args.which == "fanout":
        from bucketsync.bench.fanout import bench_fanout

        return bench_fanout(settings, args.out)
    if args.which == "lookups":
        from bucketsync.bench.lookups import bench_lookups

        return bench_lookups(settings, args.out)
    if args.which == "recovery":
        from bucketsync.bench.recovery import main as recovery_main

        return recovery_main(settings, args)
    if args.which == "soak":
        from bucketsync.bench.soak import main as soak_main

        return soak_main(settings, args)
    if args.which == "cdc":
        from bucketsync.bench.cdc import main as cdc_main

        return cdc_main(settings, args)
    raise UserError(f"unknown benchmark {args.which}")
