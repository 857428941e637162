"""The runner's text and JSON reports: ``similarity_analysis_NAME.txt`` and ``similarity_NAME.json``.

Both are built from :meth:`AnalysisResult.to_dict`, so the text and the JSON can
never disagree, and the text can be regenerated from a JSON file alone
(:func:`format_text_report`). Files are written atomically (a temporary file in
the same folder, then ``os.replace``).

JSON schema (``similarity_NAME.json``)::

    {"image": str | null, "checkpoint": str | null, "crop_strategy": str,
     "views": [{"yaw_deg": float, "pitch_deg": float, "fov_deg": float, "kind": str}, ...],
     "pairs": [[i, j], ...],
     "levels": {"vision_encoder": {"token_grid": [gh, gw] | null,
                                   "masked_share": [float, ...],   # per view, left out of the PCA
                                   "bg_note": str | null,          # e.g. "not bimodal: kept every token"
                                   "metrics": {METRIC: {"per_pair": [float | null, ...],
                                                        "mean": float, "std": float,
                                                        "chance": float, "ceiling": float}  # accuracies only
                                                       | {"skipped": "reason"}}},
                "resampled": {...}},
     "settings": {"crop_strategy": str, "image_size": int, "crop_options": {...}, "layer": int,
                  "keep_cls_token": bool, "n_components": int, "bg_removal": str, "bg_threshold": float,
                  "normalize": ..., "metrics": [...], ...},
     "probe": str | null, "step": int | null, "epoch": int | null, "panoviz_version": str}

The last five entries say how the numbers were made (``panoviz compare`` warns when two
runs differ in them); reports written before they existed lack them.

``token_grid`` is null for query-token layouts (QFormer, Perceiver); a ``per_pair``
entry is null for a pair where the metric is undefined (for example a pair of
views that do not overlap while others do); ``std`` is the population standard
deviation over the defined pairs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from panoviz_callback._io import atomic_write_text

__all__ = ["format_text_report", "write_reports", "load_similarity_json", "METRIC_DESCRIPTIONS"]

#: One line per metric, printed under its heading in the text report.
METRIC_DESCRIPTIONS = {
    "token_cosine": "cosine of tokens at the same index (the original tool's metric)",
    "overlap_cosine": "cosine of token pairs that see the same scene point",
    "hungarian_cosine": "mean cosine after optimal one-to-one matching of view i's overlap tokens to all of "
                        "view j's tokens (query tokens: all to all)",
    "hungarian_accuracy": "fraction of matched overlap tokens within one token of their geometric partner",
    "nn_accuracy": "fraction of overlap tokens whose nearest neighbour (cosine) in view j is within one token of "
                   "their geometric partner",
    "linear_cka": "centred linear CKA, rows paired by grid index (a layout score, Kornblith et al. 2019)",
    "debiased_cka": "linear CKA with the unbiased HSIC estimator, rows paired by grid index",
    "overlap_cka": "centred linear CKA over the token pairs that see the same scene point",
    "overlap_debiased_cka": "debiased linear CKA over the token pairs that see the same scene point",
    "ssim": "SSIM of the PCA images over the overlap (view j warped into view i)",
    "lpips": "LPIPS distance of the PCA images over the overlap (lower = more similar)",
}


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.4f}"


def _view_line(index: int, view: dict[str, Any]) -> str:
    kind = view.get("kind", "?")
    if kind == "global":
        return f"  View {index}: global view (whole panorama)"
    return (
        f"  View {index}: yaw {view['yaw_deg']:g}° pitch {view['pitch_deg']:g}° "
        f"fov {view['fov_deg']:g}° ({kind})"
    )


def format_text_report(data: dict[str, Any]) -> str:
    """Format a similarity dict (the JSON schema above) as the text report.

    The layout follows the original tool: a block per level, a block per metric with
    ``View i <-> View j: 0.8732`` lines and ``mean: x +- y``; skipped metrics are
    named with their reason.

    Args:
        data: the output of :meth:`AnalysisResult.to_dict` or :func:`load_similarity_json`.

    Returns:
        The report text, ending with a newline.
    """
    lines = ["Cross-view similarity analysis", "=" * 30]
    lines += [f"WARNING: {w}" for w in data.get("warnings") or []]
    lines.append(f"image:         {data.get('image') or '(synthetic probe / in-memory)'}")
    lines.append(f"checkpoint:    {data.get('checkpoint') or '(none)'}")
    lines.append(f"crop strategy: {data.get('crop_strategy')}")
    if data.get("step") is not None or data.get("epoch") is not None:
        lines.append(f"step / epoch:  {data.get('step')} / {data.get('epoch')}")
    settings = data.get("settings") or {}
    if settings:
        shown = ", ".join(f"{k}={settings[k]}" for k in _SHOWN_SETTINGS if k in settings)
        lines.append(f"settings:      {shown}")
    if data.get("panoviz_version"):
        lines.append(f"panoviz:       {data['panoviz_version']}")
    views = data.get("views") or []
    pairs = [tuple(p) for p in data.get("pairs") or []]
    lines.append(f"views ({len(views)}):")
    lines.extend(_view_line(k, v) for k, v in enumerate(views))
    lines.append(f"pairs ({len(pairs)}): " + (", ".join(f"{i}-{j}" for i, j in pairs) or "none"))
    for level, body in (data.get("levels") or {}).items():
        grid = body.get("token_grid")
        layout = f"token grid {grid[0]}x{grid[1]}" if grid else "query tokens, no spatial layout"
        header = f" {level} ({layout}) "
        lines += ["", f"{header:=^72}"]
        share = body.get("masked_share")
        if share:
            lines.append("PCA tokens left out (background/outliers) per view: "
                         + " ".join(f"{k}: {100 * v:.1f}%" for k, v in enumerate(share)))
        if body.get("bg_note"):
            lines.append(f"PCA note: {body['bg_note']}")
        for metric, value in (body.get("metrics") or {}).items():
            lines += ["", metric, "-" * len(metric)]
            if metric in METRIC_DESCRIPTIONS:
                lines.append(f"({METRIC_DESCRIPTIONS[metric]})")
            if "skipped" in value:
                lines.append(f"skipped: {value['skipped']}")
                continue
            per_pair = value.get("per_pair") or []
            for (i, j), v in zip(pairs, per_pair):
                lines.append(f"View {i} <-> View {j}: {_fmt(v)}")
            lines.append(f"mean: {_fmt(value.get('mean'))} +- {_fmt(value.get('std'))}")
            reference = [f"{key} {_fmt(value[key])}" for key in ("chance", "ceiling") if value.get(key) is not None]
            if reference:
                lines.append("reference (mean over pairs): " + ", ".join(reference))
    return "\n".join(lines) + "\n"


def write_reports(
    result: Any,
    out_dir: str | os.PathLike,
    name: str,
    image: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    warnings: Sequence[str] = (),
    meta: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``similarity_analysis_NAME.txt`` and ``similarity_NAME.json`` into ``out_dir``.

    Args:
        result: an :class:`~panoviz_callback.analysis.AnalysisResult`.
        out_dir: the output folder (created if missing).
        name: the run name used in the file names.
        image: the probe image path recorded in the reports (``None``: in-memory probe).
        checkpoint: the checkpoint path recorded in the reports.
        warnings: caveats every report must carry (``"warnings"`` in the JSON, ``WARNING:`` lines
            on top of the text), e.g. weights that were missing from the checkpoint.
        meta: how the numbers were made: ``{"settings": {...}, "probe": str, "step": int,
            "epoch": int}`` (any of them may be missing); the package version is added.

    Returns:
        ``{"txt": path, "json": path}``.

    Raises:
        ValueError: ``name`` is empty or contains a path separator.
    """
    _check_name(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from panoviz_callback import __version__

    data = result.to_dict(image=image, checkpoint=checkpoint)
    if warnings:
        data["warnings"] = list(warnings)
    meta = dict(meta or {})
    data["settings"] = _plain(meta.get("settings") or {})
    data["probe"] = meta.get("probe", None if image is None else str(image))
    for key in ("step", "epoch"):
        data[key] = None if meta.get(key) is None else int(meta[key])
    data["panoviz_version"] = __version__
    paths = {"txt": out / f"similarity_analysis_{name}.txt", "json": out / f"similarity_{name}.json"}
    atomic_write_text(paths["json"], json.dumps(data, indent=2, allow_nan=False) + "\n")
    atomic_write_text(paths["txt"], format_text_report(data))
    return paths


def load_similarity_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``similarity_NAME.json`` written by :func:`write_reports`.

    Raises:
        ValueError: the file cannot be read, is not JSON, or is not a similarity report.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot be read ({err})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a similarity report (invalid JSON: {err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("levels"), dict):
        raise ValueError(f"{path}: not a similarity report (no 'levels' entry)")
    return data


_SHOWN_SETTINGS = ("image_size", "layer", "n_components", "bg_removal", "keep_cls_token", "crop_options")


def _plain(value: Any) -> Any:
    """``value`` as JSON types (tuples to lists, tensors and numpy values to Python numbers)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"Argument `name` must be a non-empty file name without path separators, got {name!r}.")
