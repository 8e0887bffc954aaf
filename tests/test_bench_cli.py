"""``bucketsync bench``'s arguments (pure): every mode the CLI offers has a branch in the
dispatcher, and ``--connector-set`` parses ``key=value`` pairs."""

from __future__ import annotations

import argparse
import inspect

import pytest

import bucketsync.bench
from bucketsync.cli import build_parser


def _bench_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["bench"]


def test_every_bench_mode_is_dispatched() -> None:
    which = next(a for a in _bench_parser()._actions if a.dest == "which")
    source = inspect.getsource(bucketsync.bench.main)
    assert which.choices
    missing = [m for m in which.choices if f'args.which == "{m}"' not in source]
    assert missing == []


def test_connector_set_parses_key_value_pairs() -> None:
    args = build_parser().parse_args(
        ["bench", "cdc", "--connector-set", "poll.interval.ms=500", "--connector-set", "a=b=c"]
    )
    assert dict(args.connector_set) == {"poll.interval.ms": "500", "a": "b=c"}


def test_connector_set_refuses_a_value_without_a_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "cdc", "--connector-set", "novalue"])
    assert "must look like key=value" in capsys.readouterr().err
