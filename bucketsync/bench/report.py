"""Writing benchmark results: JSON, a markdown table, a PNG, and a table on the terminal."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)


def write_json(result: dict[str, Any], out: str | None, name: str) -> None:
    path = (
        Path(out)
        if out
        else Path("bench-results") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"results: {path}")
