"""The ``bucketsync`` command line. Thin: parses arguments, loads settings, dispatches.

Each command's implementation lives with the part it belongs to and is imported
lazily, so ``bucketsync --help`` stays fast and a broken optional part does not
break unrelated commands.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bucketsync.config import ConfigError, Settings, load_settings
from bucketsync.errors import UserError

Handler = Callable[[Settings, argparse.Namespace], int]


def _parse_claim(text: str) -> tuple[str, Any]:
    import json

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"claim '{text}' must look like key=value")
    key, raw = text.split("=", 1)
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    from bucketsync.tokens import make_dev_token

    if args.ttl > settings.auth.max_lifetime_s:
        raise UserError(
            f"--ttl {args.ttl} is longer than auth.max_lifetime_s ({settings.auth.max_lifetime_s}): "
            "the gateway would refuse the token (PSYNC_S2104)"
        )
    claims = dict(args.claim or [])
    print(make_dev_token(settings, sub=args.sub, claims=claims, ttl_s=args.ttl))
    return 0


def cmd_stack(settings: Settings, args: argparse.Namespace) -> int:
    from bucketsync import stack

    return stack.main(settings, args.action, source=args.source or "none", as_json=args.json)


def cmd_processor(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.processor import main as processor_main

    return processor_main(settings, driver=args.driver)


def cmd_gateway(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.server import main as gateway_main

    return gateway_main(settings, host=args.host, port=args.port, workers=args.workers)


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from bucketsync.run import main as run_main

    return run_main(settings, config_path=args.config, port=args.port)


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from bucketsync.demo import main as demo_main

    return demo_main(
        settings,
        data_source=args.source,
        no_stack=args.no_stack,
        config_path=args.config,
        duration=args.duration,
    )


def cmd_compact(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.compaction import main as compact_main

    return compact_main(
        settings,
        bucket=args.bucket,
        every_bucket=args.all,
        defragment=args.defragment,
        reappend_budget=args.reappend_budget,
        reappend_target=args.reappend_target,
    )


def cmd_verify(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.compaction import verify_main

    return verify_main(settings, bucket=args.bucket)


def cmd_inspect(settings: Settings, args: argparse.Namespace) -> int:
    from bucketsync.inspect import main as inspect_main

    return inspect_main(settings, bucket=args.bucket, limit=args.limit)


def cmd_loadgen(settings: Settings, args: argparse.Namespace) -> int:
    from bucketsync.feed import loadgen_main

    return loadgen_main(
        settings,
        topic=args.topic,
        events=args.events,
        users=args.users,
        rows=args.rows,
        rate=args.rate,
    )


def cmd_simulate(settings: Settings, args: argparse.Namespace) -> int:
    from bucketsync.simulate import main as simulate_main

    return simulate_main(
        settings,
        url=args.url,
        clients=args.clients,
        users=args.users,
        duration=args.duration,
        ramp=args.ramp,
        reconnect_s=args.reconnect_s,
        report_s=args.report_s,
    )


def cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    from bucketsync.bench import main as bench_main

    return bench_main(settings, args)


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``low`` (argparse names the option)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _number_at_least(low: float, *, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number of at least ``low`` (above it with ``above``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not math.isfinite(value) or value < low or (above and value == low):
            bound = f"above {low:g}" if above else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


def _port(text: str) -> int:
    value = _int_at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {value}")
    return value


def _non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _levels(text: str) -> str:
    """``--levels 1000,5000``: comma-separated stream counts, ascending."""
    try:
        levels = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a comma-separated list of integers"
        ) from None
    if any(n < 1 for n in levels) or levels != sorted(levels):
        raise argparse.ArgumentTypeError(f"'{text}': stream counts must be >= 1 and ascending")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bucketsync",
        description="CDC (Debezium on Kafka) to per-bucket op logs in Redis, "
        "served to PowerSync clients.",
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="PATH",
        help="config file (YAML); default ./bucketsync.yaml, env BUCKETSYNC_* overrides it",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH", help="config file")
        p.set_defaults(handler=handler)
        return p

    p = add("stack", cmd_stack, "Local dev stack: a real Kafka (KRaft) broker and Redis.")
    p.add_argument("action", choices=["up", "down", "status", "reset"], help="what to do")
    p.add_argument(
        "--source",
        choices=["none", "postgres"],
        default="none",
        help="also run a CDC source (PostgreSQL + Kafka Connect with Debezium)",
    )
    p.add_argument("--json", action="store_true", help="status as JSON")

    p = add("token", cmd_token, "Print a development JWT the gateway accepts (HS256).")
    p.add_argument("--sub", required=True, type=_non_empty, help="user id (the token's sub claim)")
    p.add_argument(
        "--claim",
        action="append",
        type=_parse_claim,
        metavar="KEY=VALUE",
        help="extra claim; VALUE parsed as JSON when it is valid JSON (repeatable)",
    )
    p.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")

    p = add("processor", cmd_processor, "Run the stream processor (CDC topics -> Redis op logs).")
    p.add_argument("--driver", choices=["faust", "kafka"], default=None, help="consumer driver")

    p = add("gateway", cmd_gateway, "Run the sync gateway (PowerSync protocol over HTTP).")
    p.add_argument("--port", type=_port, default=None, help="listen port (overrides gateway.port)")
    p.add_argument("--host", default=None, help="listen address (overrides gateway.host)")
    p.add_argument(
        "--workers", type=_int_at_least(1), default=None, help="processes sharing the port"
    )

    p = add("run", cmd_run, "Run processor, gateway and compaction schedule together (dev).")
    p.add_argument("--port", type=_port, default=None, help="gateway port")

    p = add("demo", cmd_demo, "The main job: stack up, pipeline, demo feed and a live demo client.")
    p.add_argument(
        "--source", choices=["feed", "postgres"], default="feed", help="demo data source"
    )
    p.add_argument(
        "--duration",
        type=_number_at_least(0, above=True),
        default=None,
        help="stop after this many seconds",
    )
    p.add_argument("--no-stack", action="store_true", help="do not start the local stack")

    p = add("compact", cmd_compact, "Compact bucket op logs (MOVE/REMOVE/CLEAR prefix -> CLEAR).")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--bucket", help="compact only this bucket")
    g.add_argument("--all", action="store_true", help="compact every bucket, not just marked ones")
    p.add_argument(
        "--defragment", action="store_true", help="also defragment (clients re-download)"
    )
    p.add_argument(
        "--reappend-budget",
        type=_number_at_least(0),
        default=None,
        help="ops folded per live row re-appended (default: compaction.reappend_budget; 0 = off)",
    )
    p.add_argument(
        "--reappend-target",
        type=_number_at_least(0),
        default=None,
        help="ops per live row to bring a bucket back to (default: compaction.reappend_target)",
    )

    p = add(
        "verify", cmd_verify, "Recompute bucket checksums and counts from the logs and compare."
    )
    p.add_argument("--bucket", help="verify only this bucket")

    p = add("inspect", cmd_inspect, "Show store state: checkpoint, offsets, a bucket's ops.")
    p.add_argument("--bucket", help="print this bucket's ops")
    p.add_argument("--limit", type=_int_at_least(0), default=50, help="ops to print")

    p = add("loadgen", cmd_loadgen, "Produce synthetic Debezium events to a topic.")
    p.add_argument("--topic", default=None, help="topic (default: first configured topic)")
    p.add_argument("--events", type=_int_at_least(1), default=10_000, help="number of events")
    p.add_argument("--users", type=_int_at_least(1), default=100, help="distinct owners")
    p.add_argument("--rows", type=_int_at_least(1), default=1_000, help="distinct rows")
    p.add_argument(
        "--rate", type=_number_at_least(0), default=0, help="events/s, 0 = as fast as possible"
    )

    p = add(
        "simulate",
        cmd_simulate,
        "Simulated PowerSync clients against running gateways (checksums checked).",
    )
    p.add_argument(
        "--url",
        action="append",
        metavar="URL",
        help="gateway base URL (repeatable; clients spread over them); "
        "default http://127.0.0.1:<gateway.port>",
    )
    p.add_argument("--clients", type=_int_at_least(1), default=1000, help="concurrent streams")
    p.add_argument(
        "--users", type=_int_at_least(1), default=100, help="distinct users (token sub u1..uN)"
    )
    p.add_argument(
        "--duration", type=_number_at_least(0), default=0, help="seconds, 0 = until stopped"
    )
    p.add_argument(
        "--ramp", type=_number_at_least(0), default=200.0, help="new clients per second, 0 = all"
    )
    p.add_argument(
        "--reconnect-s",
        type=_number_at_least(0),
        default=0,
        help="resume each stream after about this many seconds, 0 = keep it open",
    )
    p.add_argument(
        "--report-s",
        type=_number_at_least(0, above=True),
        default=10.0,
        help="status line interval",
    )

    p = add(
        "bench",
        cmd_bench,
        "Benchmarks; results as JSON, markdown and PNG, and a table on the terminal.",
    )
    p.add_argument(
        "which",
        choices=[
            "ingest",
            "fanout",
            "compact",
            "cdc",
            "recovery",
            "lookups",
            "soak",
            "e2e",
            "initial-sync",
            "reconnect",
            "store-layout",
        ],
        help="benchmark",
    )
    p.add_argument(
        "--driver", choices=["kafka", "faust", "both"], default="both", help="drivers (recovery)"
    )
    p.add_argument("--runs", type=_int_at_least(1), default=3, help="repetitions (recovery)")
    p.add_argument(
        "--consistency",
        choices=["event", "transaction"],
        default="event",
        help="kafka.consistency of the processors (recovery)",
    )
    p.add_argument(
        "--rate",
        type=_number_at_least(0, above=True),
        default=None,
        help="transactions/s (cdc, default 50), events/s (recovery, soak: 50; e2e: 5000)",
    )
    p.add_argument(
        "--minutes", type=_number_at_least(0, above=True), default=30.0, help="duration (soak)"
    )
    p.add_argument(
        "--clients",
        type=_int_at_least(1),
        default=None,
        help="simulated clients (soak: 5000; e2e, reconnect: 2000)",
    )
    p.add_argument(
        "--seconds", type=_number_at_least(0, above=True), default=20.0, help="producing time (e2e)"
    )
    p.add_argument(
        "--workers",
        type=_int_at_least(1),
        default=1,
        help="gateway worker processes (e2e, reconnect)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=_int_at_least(0),
        default=10,
        help="processor.batch_max_wait_ms for the run (e2e)",
    )
    p.add_argument(
        "--ops",
        type=_int_at_least(1),
        default=200_000,
        help="ops in the one big bucket (initial-sync)",
    )
    p.add_argument(
        "--no-node",
        action="store_true",
        help="skip the official Node client's timing (initial-sync)",
    )
    p.add_argument(
        "--replica",
        action="store_true",
        help="a private Redis primary + replica, 2 gateways reading the replica (reconnect, e2e)",
    )
    p.add_argument(
        "--sample-s",
        type=_number_at_least(0, above=True),
        default=5.0,
        help="sampling interval (soak)",
    )
    p.add_argument(
        "--rss-bound-mb",
        type=_number_at_least(0, above=True),
        default=64.0,
        help="most RSS growth per process, start to end, for a passing soak (soak)",
    )
    p.add_argument(
        "--events",
        type=_int_at_least(1),
        default=None,
        help="events (ingest, compact: the mix's events, uniform's ops)",
    )
    p.add_argument(
        "--history",
        choices=["mix", "uniform"],
        default="mix",
        help="compact: realistic todo mix (budget sweep) or 1M uniform ops in one bucket",
    )
    p.add_argument(
        "--levels",
        type=_levels,
        default=None,
        help="comma-separated stream counts, ascending (fanout; default 1000,5000,10000)",
    )
    p.add_argument(
        "--gateway-workers",
        type=_int_at_least(1),
        default=1,
        help="gateway processes sharing the port (fanout)",
    )
    p.add_argument(
        "--client-procs",
        type=_int_at_least(0),
        default=0,
        help="fanout: extra client processes holding idle streams, each from its own "
        "loopback address (one process holds at most its open-files limit); reconnect: the "
        "client processes (default 1)",
    )
    p.add_argument(
        "--connector-set",
        type=_key_value,
        action="append",
        metavar="KEY=VALUE",
        help="override a Debezium connector setting, e.g. poll.interval.ms=500 (cdc)",
    )
    p.add_argument(
        "--buckets",
        type=_int_at_least(1),
        default=20,
        help="buckets one batch of 500 upserts spreads over (store-layout)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="write the JSON result here (the .md and .png beside it); default bench-results/",
    )
    return parser


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"'{text}' must look like key=value")
    return key, value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
        return int(args.handler(settings, args) or 0)
    except (ConfigError, UserError) as exc:
        print(f"bucketsync: error: {exc}", file=sys.stderr)
        return 2
    except (RedisConnectionError, RedisTimeoutError) as exc:
        # long-running commands (processor, gateway) wait for Redis themselves; one-shot
        # commands (compact, verify, ...) end here when it is down
        print(
            f"bucketsync: error: Redis at {settings.redis.url} is unreachable ({exc}); "
            "is it running? (redis.url / BUCKETSYNC_REDIS__URL)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        time.sleep(0)
        return 130
    except BrokenPipeError:
        # `bucketsync inspect | head`: the reader left; no traceback, and none at exit when
        # Python flushes stdout again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
