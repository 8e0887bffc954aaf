"""``bucketsync bench e2e | initial-sync | reconnect`` run at a tiny size and write their
JSON, markdown and PNG (not timed: the figures are the benches' business, not the tests').
What is asserted is what the benches check themselves: no checksum mismatches, no protocol
errors, every event delivered, no op downloaded twice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bucketsync.cli import build_parser, cmd_bench

pytestmark = pytest.mark.stack


def _run(settings: Any, out: Path, *argv: str) -> dict[str, Any]:
    args = build_parser().parse_args(["bench", *argv, "--out", str(out)])
    assert cmd_bench(settings, args) == 0
    for suffix in (".json", ".md", ".png"):
        assert out.with_suffix(suffix).stat().st_size > 0, suffix
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res: dict[str, Any] = json.loads(out.read_text())
    return res


@pytest.mark.parametrize("replica", [False, True])
def test_bench_e2e_tiny(make_settings: Any, tmp_path: Path, replica: bool) -> None:
    res = _run(
        make_settings(),
        tmp_path / "e2e.json",
        "e2e",
        "--clients", "20", "--rate", "100", "--seconds", "2",
        *(["--replica"] if replica else []),
    )  # fmt: skip
    assert ("replica" in res["topology"]) is replica
    assert res["produced"] == res["applied"] == 200
    assert res["mismatches"] == res["protocol_errors"] == 0
    assert 0 < res["latency_samples"] <= 200
    assert "produce → checkpoint_complete p50" in (tmp_path / "e2e.md").read_text()


@pytest.mark.parametrize(("replica", "procs"), [(False, 1), (True, 1), (False, 2)])
def test_bench_reconnect_tiny(
    make_settings: Any, tmp_path: Path, replica: bool, procs: int
) -> None:
    extra = (["--replica"] if replica else []) + ["--client-procs", str(procs)]
    res = _run(make_settings(), tmp_path / "rc.json", "reconnect", "--clients", "30", *extra)
    assert res["resumed"] == 30 and res["not_resumed"] == 0
    assert res["ops_downloaded"] == res["ops_expected"] == 15
    assert res["ops_twice"] == res["ops_missing"] == res["clients_with_wrong_rows"] == 0
    assert res["mismatches"] == res["protocol_errors"] == 0
    assert ("replica" in res["topology"]) is replica
    assert sorted(k for k in res["cpu_s"] if k.startswith("clients")) == [
        f"clients-{k}" for k in range(procs)
    ]
    assert [p["clients"] for p in res["per_client_process"]] == [30 // procs] * procs


def test_bench_initial_sync_tiny(make_settings: Any, tmp_path: Path) -> None:
    res = _run(
        make_settings(),
        tmp_path / "is.json",
        "initial-sync",
        "--ops", "2000", "--runs", "1", "--no-node",
    )  # fmt: skip
    assert [r["ops"] for r in res["cold_runs"]] == [2000]
    assert res["warm"]["ops"] == 2000
    sim = res["simulator"]
    assert (sim["ops"], sim["rows"], sim["completed"]) == (2000, 2000, 1)
    assert sim["mismatches"] == sim["protocol_errors"] == 0
    assert res["node_client"] == {"skipped": "--no-node"}
    # the gzip run: every op arrives, in fewer bytes
    assert res["gzip"]["ops"] == 2000
    assert res["gzip"]["bytes"] < res["gzip"]["plain_bytes"] / 2
    assert res["node_client_gzip"] == {"skipped": "--no-node"}
