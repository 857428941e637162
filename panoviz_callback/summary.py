"""What the runner prints at the end: where the files are, the mean metrics, the skip reasons, live agreement."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["live_agreement", "format_summary"]


def live_agreement(scalars: Mapping[str, float], callback: Mapping[str, Any] | None,
                   step: int | None) -> tuple[int, float] | None:
    """``(number of values, max |difference|)`` against the callback's history at ``step`` (None: no entry)."""
    history = [h for h in (callback or {}).get("history") or [] if step is None or h.get("step") == step]
    if not history:
        return None
    live = history[-1].get("scalars") or {}
    common = [k for k in live if k in scalars]
    if not common:
        return None
    return len(common), max(abs(float(live[k]) - float(scalars[k])) for k in common)


def format_summary(results: Sequence[Any]) -> str:
    """Where the files are and a table of the mean metrics (averaged over the images that worked)."""
    from panoviz_callback.analysis import LEVELS, METRICS

    ok = [r for r in results if r.error is None]
    lines = []
    dirs = list(dict.fromkeys(r.out_dir for r in ok))
    if ok:
        n_files = sum(len(r.files) for r in ok)
        common = os.path.commonpath([str(d) for d in dirs])
        where = str(dirs[0]) if len(dirs) == 1 else f"{common} (one folder per image)"
        lines.append(f"Wrote {n_files} files for {len(ok)} image(s) to {where}")
    failed = [r for r in results if r.error is not None]
    if failed:
        lines.append(f"{len(failed)} of {len(results)} image(s) failed: " + ", ".join(r.source.label for r in failed))
    values: dict[tuple[str, str], list[float]] = {}
    for r in ok:
        for key, value in (r.scalars or {}).items():
            level, _, metric = key.partition("/")
            if metric in METRICS:  # the PCA's masked share is in the reports, not in this table
                values.setdefault((level, metric), []).append(value)
    skipped: dict[tuple[str, str], str] = {}
    for r in ok:
        for key, reason in r.skipped.items():
            level, _, metric = key.partition("/")
            if (level, metric) not in values:
                skipped.setdefault((level, metric), reason)
    if not values:
        if ok:
            lines.append("No metrics computed.")
        return "\n".join(lines + _skipped_lines(skipped))
    levels = [lv for lv in LEVELS if any(k[0] == lv for k in values)]
    metrics = [m for m in METRICS if any(k[1] == m for k in values)]
    title = "Mean metrics" + (f" over {len(ok)} images" if len(ok) > 1 else "")
    width = max(len(m) for m in metrics) + 2
    lines += [f"{title}:", "  " + "metric".ljust(width) + "".join(lv.rjust(16) for lv in levels)]
    for m in metrics:
        cells = []
        for lv in levels:
            vals = [v for v in values.get((lv, m), []) if math.isfinite(v)]
            cells.append((f"{sum(vals) / len(vals):.4f}" if vals else "-").rjust(16))
        lines.append("  " + m.ljust(width) + "".join(cells))
    return "\n".join(lines + _skipped_lines(skipped))


def _skipped_lines(skipped: Mapping[tuple[str, str], str]) -> list[str]:
    """One line per skip reason: ``Skipped lpips (vision_encoder, resampled): reason``."""
    by_reason: dict[tuple[str, str], list[str]] = {}
    for (level, metric), reason in skipped.items():
        by_reason.setdefault((metric, reason), []).append(level)
    return [f"Skipped {metric} ({', '.join(levels)}): {reason}" for (metric, reason), levels in by_reason.items()]
