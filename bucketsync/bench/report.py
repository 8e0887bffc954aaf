"""Writing benchmark results, the same way for every mode: ``<name>.json`` (everything
measured), ``<name>.md`` (the table a report quotes) and ``<name>.png`` (a plot, when
matplotlib is installed), plus the table on the terminal."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

#: draws onto a fresh pyplot figure; gets ``matplotlib.pyplot``
Plot = Callable[[Any], None]


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of ``values``; NaN when there are none."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(len(s) * q) - 1))] if s else float("nan")


def result_path(out: str | Path | None, name: str) -> Path:
    """``out`` as given, else ``bench-results/<name>-<timestamp>.json``."""
    if out:
        return Path(out)
    return Path("bench-results") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)


def rows_markdown(title: str, rows: list[tuple[str, str]]) -> str:
    """A two-column metric/value table under a heading."""
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def write_report(
    result: dict[str, Any], path: Path, markdown: str, plot: Plot | None = None
) -> Path:
    """Write ``path`` with suffixes .json, .md and (given ``plot`` and matplotlib) .png;
    returns the JSON path."""
    path = path.with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    path.with_suffix(".md").write_text(markdown)
    written = [".md"]
    if plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib missing: no PNG")
        else:
            plot(plt)
            fig = plt.gcf()
            fig.tight_layout()
            fig.savefig(path.with_suffix(".png"), dpi=110)
            plt.close(fig)
            written.append(".png")
    print(f"results: {path} (+ {', '.join(written)})")
    return path


def report_rows(
    result: dict[str, Any],
    out: str | Path | None,
    name: str,
    title: str,
    rows: list[tuple[str, str]],
    plot: Plot | None = None,
) -> Path:
    """The common case: a metric/value table on the terminal and in the markdown."""
    print_table(title, rows)
    return write_report(result, result_path(out, name), rows_markdown(title, rows), plot)


def bar_plot(title: str, unit: str, values: dict[str, float]) -> Plot:
    """A horizontal bar per labelled value."""

    def draw(plt: Any) -> None:
        _fig, ax = plt.subplots(figsize=(8, 0.5 + 0.4 * max(1, len(values))))
        labels = list(values)
        ax.barh(labels, [values[k] for k in labels])
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)

    return draw


def cdf_and_series_plot(
    title: str,
    cdfs: dict[str, list[float]],
    series: dict[str, list[tuple[float, float]]],
    *,
    cdf_xlabel: str = "ms",
    series_ylabel: str = "per second",
) -> Plot:
    """Two panels: latency CDFs (values in ms) and throughput over time."""

    def draw(plt: Any) -> None:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
        for label, values in cdfs.items():
            s = sorted(values)
            if s:
                a1.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=label)
        a1.set_xlabel(cdf_xlabel)
        a1.set_ylabel("fraction")
        a1.set_title("latency CDF")
        a1.grid(alpha=0.3)
        if cdfs:
            a1.legend()
        for label, pts in series.items():
            if pts:
                a2.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
        a2.set_xlabel("seconds")
        a2.set_ylabel(series_ylabel)
        a2.set_title("throughput over time")
        a2.grid(alpha=0.3)
        if series:
            a2.legend()
        fig.suptitle(title)

    return draw
