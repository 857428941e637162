"""Compare the similarity reports of several runs: a terminal table, a Markdown table and grouped bars.

A *run* is one ``similarity_*.json`` file or a folder holding them (searched
recursively, e.g. a runner output folder with one subfolder per image). When a
folder holds several reports, their means are averaged per metric.

Reports carry the settings that made them (crop strategy, view size, background
removal, layer, PCA components, probe image, step, epoch, package version):
:func:`setting_differences` names every setting in which the runs differ, so that
numbers made in different ways are never compared silently.
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

__all__ = ["RunSummary", "COMPARED_SETTINGS", "load_run", "setting_differences", "comparison_rows",
           "format_table", "format_markdown", "plot_comparison", "write_comparison"]

_LEVELS = ("vision_encoder", "resampled")
#: Settings that change the numbers: runs that differ in one of them are not comparable as they are.
COMPARED_SETTINGS = ("crop_strategy", "image_size", "crop_options", "bg_removal", "bg_threshold", "layer",
                     "n_components", "keep_cls_token", "normalize", "probe")
_SETTING_NAMES = {"crop_strategy": "crop strategy", "image_size": "view size (image_size)",
                  "crop_options": "crop options", "bg_removal": "bg_removal", "bg_threshold": "bg_threshold",
                  "layer": "layer", "n_components": "n_components", "keep_cls_token": "keep_cls_token",
                  "normalize": "normalize", "probe": "probe image"}


@dataclass
class RunSummary:
    """The mean metrics of one run.

    Attributes:
        label: the name shown in the table.
        means: ``{(level, metric): mean}`` averaged over the run's reports.
        sources: the JSON files read.
        settings: how the first report was made (:data:`COMPARED_SETTINGS` found in it; empty
            for reports written before reports carried settings).
        step: the checkpoint's global step (None: not recorded).
        epoch: the checkpoint's epoch (None: not recorded).
        version: the package version that wrote the first report.
    """

    label: str
    means: dict[tuple[str, str], float] = field(default_factory=dict)
    sources: list[Path] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    step: int | None = None
    epoch: int | None = None
    version: str | None = None


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
    first: dict[str, Any] | None = None
    for report in reports:
        data = load_similarity_json(report)
        first = data if first is None else first
        for level, body in data["levels"].items():
            for metric, value in (body.get("metrics") or {}).items():
                mean = value.get("mean") if isinstance(value, dict) else None
                if isinstance(mean, (int, float)) and math.isfinite(mean):
                    sums.setdefault((level, metric), []).append(float(mean))
    if label is None:
        label = path.stem.removeprefix("similarity_") if path.is_file() else path.resolve().name
    means = {key: sum(vals) / len(vals) for key, vals in sums.items()}
    first = first or {}
    settings: dict[str, Any] = {}
    if isinstance(first.get("settings"), dict):
        recorded = {**first["settings"], "probe": first.get("probe"), "crop_strategy": first.get("crop_strategy")}
        settings = {k: recorded[k] for k in COMPARED_SETTINGS if k in recorded}
    return RunSummary(label=label, means=means, sources=reports, settings=settings, step=first.get("step"),
                      epoch=first.get("epoch"), version=first.get("panoviz_version"))


def setting_differences(runs: Sequence[RunSummary]) -> list[str]:
    """One sentence per setting in which the runs differ (and one for runs that record no settings).

    Example: ``"the runs differ in crop strategy: before=e2p, after=anyres_e2p"``.
    """
    messages = []
    bare = [run.label for run in runs if not run.settings]
    if bare and len(runs) > 1:
        messages.append(f"{', '.join(bare)}: the report records no settings (written by an older panoviz), so "
                        "differences in crop strategy, view size, bg_removal, layer or probe cannot be checked")
    recorded = [run for run in runs if run.settings]
    for key in COMPARED_SETTINGS:
        values = [(run.label, run.settings.get(key)) for run in recorded]
        if len({_canonical(v) for _, v in values}) > 1:
            listed = ", ".join(f"{label}={_show(value)}" for label, value in values)
            messages.append(f"the runs differ in {_SETTING_NAMES[key]}: {listed}")
    versions = {run.version for run in runs if run.version}
    if len(versions) > 1:
        messages.append(f"the reports were written by different panoviz versions: {', '.join(sorted(versions))}")
    return messages


def _canonical(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=str)


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(value.items())) + "}"
    return str(value)


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
    """The comparison as a Markdown table (rows = runs, columns = level/metric means), then the runs'
    step / epoch and any setting differences."""
    header, rows = comparison_rows(runs)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "| run | step | epoch | panoviz |", "|---|---:|---:|---|"]
    lines += [f"| {run.label} | {_dash(run.step)} | {_dash(run.epoch)} | {_dash(run.version)} |" for run in runs]
    differences = setting_differences(runs)
    if differences:
        lines += ["", "**Warning:** these runs were not made the same way:", ""]
        lines += [f"- {message}" for message in differences]
    return "\n".join(lines) + "\n"


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def format_table(runs: Sequence[RunSummary], width: int = 100) -> str:
    """The comparison for a terminal: one block per level, metrics as rows, runs as columns.

    Every line is at most ``width`` characters: long run labels are shortened and, when there
    are more runs than fit, the runs are split over several blocks.
    """
    columns = _columns(runs)
    levels = list(dict.fromkeys(level for level, _ in columns))
    name_w = max([len(m) for _, m in columns] + [len(lv) for lv in levels] + [6]) + 2
    cell = max(10, min(14, max(len(run.label) for run in runs) + 2)) if runs else 10
    per_block = max(1, (width - name_w) // cell)
    lines: list[str] = []
    for start in range(0, len(runs), per_block):
        chunk = runs[start:start + per_block]
        for level in levels:
            head = level.ljust(name_w) + "".join(_cut(run.label, cell - 2).rjust(cell) for run in chunk)
            lines += [head[:width], ("-" * len(head))[:width]]
            for lv, metric in columns:
                if lv != level:
                    continue
                cells = [f"{run.means[(lv, metric)]:.4f}" if (lv, metric) in run.means else "-" for run in chunk]
                lines.append(("  " + metric).ljust(name_w) + "".join(c.rjust(cell) for c in cells))
            lines.append("")
    return "\n".join(lines)


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[:max(1, n - 1)] + "~"


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
