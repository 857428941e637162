"""Compare the similarity reports of several runs: a Markdown table and grouped bars.

A *run* is one ``similarity_*.json`` file or a folder holding them (searched
recursively, e.g. a runner output folder with one subfolder per image). When a
folder holds several reports, their means are averaged per metric.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from panoviz_callback._io import atomic_path, atomic_write_text
from panoviz_callback.report import load_similarity_json

__all__ = ["RunSummary", "load_run", "comparison_rows", "format_markdown", "plot_comparison", "write_comparison"]

_LEVELS = ("vision_encoder", "resampled")


@dataclass
class RunSummary:
    """The mean metrics of one run.

    Attributes:
        label: the name shown in the table.
        means: ``{(level, metric): mean}`` averaged over the run's reports.
        sources: the JSON files read.
    """

    label: str
    means: dict[tuple[str, str], float] = field(default_factory=dict)
    sources: list[Path] = field(default_factory=list)


def _find_reports(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(path.rglob("similarity_*.json"))
    raise ValueError(f"{path}: no such file or folder")


def load_run(path: str | os.PathLike, label: str | None = None) -> RunSummary:
    """Read one run (a ``similarity_*.json`` or a folder of them).

    Raises:
        ValueError: the path does not exist, holds no report, or a report is malformed.
    """
    path = Path(path)
    reports = _find_reports(path)
    if not reports:
        raise ValueError(f"{path}: no similarity_*.json report found in this folder")
    sums: dict[tuple[str, str], list[float]] = {}
    for report in reports:
        for level, body in load_similarity_json(report)["levels"].items():
            for metric, value in (body.get("metrics") or {}).items():
                mean = value.get("mean") if isinstance(value, dict) else None
                if isinstance(mean, (int, float)) and math.isfinite(mean):
                    sums.setdefault((level, metric), []).append(float(mean))
    if label is None:
        label = path.stem.removeprefix("similarity_") if path.is_file() else path.resolve().name
    means = {key: sum(vals) / len(vals) for key, vals in sums.items()}
    return RunSummary(label=label, means=means, sources=reports)


def _columns(runs: Sequence[RunSummary]) -> list[tuple[str, str]]:
    keys = {key for run in runs for key in run.means}
    order = {level: i for i, level in enumerate(_LEVELS)}
    metric_order: dict[str, int] = {}
    for run in runs:
        for _, metric in run.means:
            metric_order.setdefault(metric, len(metric_order))
    return sorted(keys, key=lambda k: (order.get(k[0], len(order)), k[0], metric_order[k[1]]))


def comparison_rows(runs: Sequence[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """Return the table header and rows (one per run; ``-`` where a run lacks a metric)."""
    columns = _columns(runs)
    header = ["run", *[f"{level}/{metric}" for level, metric in columns]]
    rows = [[run.label, *[f"{run.means[c]:.4f}" if c in run.means else "-" for c in columns]] for run in runs]
    return header, rows


def format_markdown(runs: Sequence[RunSummary]) -> str:
    """The comparison as a Markdown table (rows = runs, columns = level/metric means)."""
    header, rows = comparison_rows(runs)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_comparison(runs: Sequence[RunSummary], ax: Any = None) -> tuple[Any, Any]:
    """Grouped bars: one group per level/metric, one bar per run. Returns ``(fig, ax)``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    columns = _columns(runs)
    if ax is None:
        fig, ax = plt.subplots(figsize=(min(24.0, 2.0 + 1.1 * max(1, len(columns))), 4.5), dpi=110)
    else:
        fig = ax.figure
    x = np.arange(len(columns))
    width = 0.8 / max(1, len(runs))
    for k, run in enumerate(runs):
        values = [run.means.get(c, np.nan) for c in columns]
        ax.bar(x + (k - (len(runs) - 1) / 2) * width, values, width, label=run.label)
    ax.set_xticks(x, [f"{level}\n{metric}" for level, metric in columns], fontsize=7, rotation=45, ha="right")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_ylabel("mean over view pairs")
    ax.set_title("panoviz comparison")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig, ax


def write_comparison(runs: Sequence[RunSummary], output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``comparison.md`` and ``comparison.png`` atomically into ``output_dir``."""
    import matplotlib.pyplot as plt

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path, png_path = out / "comparison.md", out / "comparison.png"
    fig, _ = plot_comparison(runs)
    try:
        with atomic_path(png_path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    atomic_write_text(md_path, format_markdown(runs))
    return md_path, png_path
