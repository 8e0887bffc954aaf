"""Pure parts of ``bucketsync bench soak`` (the soak itself is a bench, not a test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bucketsync.bench.soak import _LogWatch, slope_per_min
from bucketsync.cli import build_parser


def test_slope_per_min() -> None:
    assert slope_per_min([0, 60, 120], [100, 101, 102]) == pytest.approx(1.0)
    assert slope_per_min([0, 30, 60, 90], [5, 5, 5, 5]) == 0.0
    assert slope_per_min([10], [1]) == 0.0


def test_log_watch_counts_new_error_lines_only(tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    log.write_text("t INFO x ok\nt WARNING x slow\nt ERROR x boom\n")
    w = _LogWatch(log)
    w.scan()
    assert (w.errors, w.warnings) == (1, 1)
    with log.open("a") as f:
        f.write("Traceback (most recent call last):\nt INFO partial")  # no newline yet
    w.scan()
    assert w.errors == 2
    with log.open("a") as f:
        f.write(" line ERROR\n")
    w.scan()
    assert w.errors == 3 and len(w.first) == 3


def test_cli_wires_soak() -> None:
    args = build_parser().parse_args(["bench", "soak", "--minutes", "3", "--clients", "2000"])
    assert (args.which, args.minutes, args.clients, args.sample_s) == ("soak", 3.0, 2000, 5.0)
    assert args.rss_bound_mb == 64.0


def test_cli_gives_one_driver_to_single_processor_benches() -> None:
    """``bench cdc`` passed the CLI's default ``--driver both`` on to ``bucketsync processor
    --driver both``, which refuses it: the benchmark waited for rows that never came."""
    from bucketsync.bench import drivers_for, one_driver
    from bucketsync.config import Settings

    args = build_parser().parse_args(["bench", "cdc"])
    assert args.driver == "both"
    settings = Settings(processor={"driver": "faust"})
    assert one_driver(args.driver, settings) == "faust"
    assert one_driver("kafka", settings) == "kafka"
    assert drivers_for("both") == ["kafka", "faust"] and drivers_for("faust") == ["faust"]
