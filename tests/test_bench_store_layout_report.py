"""``bucketsync bench store-layout`` writes its report as every bench mode does: JSON,
markdown and a PNG (it wrote no PNG). A tiny run on a private redis-server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bucketsync.bench.store_layout import main


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_store_layout_writes_json_markdown_and_png(tmp_path: Path) -> None:
    out = tmp_path / "layout.json"
    assert main(requests=5, buckets=2, batches=2, out=str(out)) == 0
    result = json.loads(out.read_text())
    assert result["apply"]["buckets"] == 2 and result["read"]["requests"] == 5
    assert "redis_cpu_ms_per_batch" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
