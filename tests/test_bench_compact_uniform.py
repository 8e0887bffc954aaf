"""``bucketsync bench compact --history uniform --events N`` writes N ops (over N/10 rows),
as the README's ``[--events N]`` promises; it ignored ``--events`` and always wrote 1M."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bucketsync.bench.compact import bench_compact

pytestmark = pytest.mark.stack


def test_uniform_history_takes_its_size_from_events(make_settings: Any, tmp_path: Path) -> None:
    out = tmp_path / "compact.json"
    assert bench_compact(make_settings(), str(out), history="uniform", events=2000) == 0
    res = json.loads(out.read_text())
    assert (res["ops_before"], res["rows"]) == (2000, 200)
    assert res["goal_met"] and res["verify_differences"] == []
    assert out.with_suffix(".png").exists() and out.with_suffix(".md").exists()
