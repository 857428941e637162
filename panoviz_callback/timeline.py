"""How the features evolve: the metric timeline and the first-vs-latest PCA image.

- :func:`plot_timeline` draws every metric per level over the callback's firings (or
  over a series of checkpoints): one small panel per metric, one line per level, one
  marker per firing, the global step on the x-axis and the epochs under it. With VICReg,
  ``overlap_cosine`` of the resampled level climbs while the frozen encoder's line stays
  flat. :func:`timeline_image` draws the same panels with Pillow as a ``(3, H, W)`` uint8
  tensor for loggers and :func:`write_timeline` as a PNG file (a few milliseconds, cheap
  enough for every firing; the matplotlib figure takes about a second).
- :func:`first_vs_latest_image` colours the first firing's tokens and the latest firing's
  tokens with one joint PCA (the latest basis, one colour range), so a colour means the
  same feature direction on both sides of every view.
- :func:`history_from_reports` and :func:`checkpoint_series` turn a folder of checkpoints
  analysed one by one by ``panoviz`` into the same history.

A *history* is a list of ``{"step": int, "epoch": int, "scalars": {"level/metric": value}}``
(the callback's ``history``, saved in its checkpoint state).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "timeline_series",
    "plot_timeline",
    "timeline_image",
    "chart_points",
    "write_timeline",
    "first_vs_latest_image",
    "grid_tokens",
    "history_from_reports",
    "checkpoint_series",
    "write_gif",
]

_LEVEL_STYLE = {"vision_encoder": ("tab:blue", "o", "vision encoder"),
                "resampled": ("tab:orange", "s", "resampled")}
_COLUMNS = 3
_HALF_TILE = 80
_PANEL = (230, 150)  # one metric's panel in the logged image, pixels
_FONT_HEAD, _FONT_TITLE, _FONT_SMALL = 15, 13, 11
_RGB = {"vision_encoder": (31, 119, 180), "resampled": (255, 127, 14)}  # matplotlib's tab:blue / tab:orange


def timeline_series(history: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], tuple[list[int], list[float]]]:
    """``{(level, metric): (steps, values)}`` from a history, in firing order (non-finite values left out)."""
    from panoviz_callback.analysis import LEVELS, METRICS

    series: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
    for entry in history:
        for key, value in (entry.get("scalars") or {}).items():
            level, _, metric = str(key).partition("/")
            if value is None or not math.isfinite(float(value)):
                continue
            steps, values = series.setdefault((level, metric), ([], []))
            steps.append(int(entry.get("step", len(steps))))
            values.append(float(value))
    rank_l = {lv: i for i, lv in enumerate(LEVELS)}
    rank_m = {m: i for i, m in enumerate(METRICS)}
    return dict(sorted(series.items(), key=lambda kv: (rank_m.get(kv[0][1], 99), kv[0][1],
                                                        rank_l.get(kv[0][0], 9), kv[0][0])))


def plot_timeline(history: Sequence[Mapping[str, Any]], fig: Any = None, *, title: str | None = None) -> tuple[Any, Any]:
    """Every metric per level over the firings: one panel per metric, one line per level.

    Args:
        history: ``[{"step", "epoch", "scalars": {"level/metric": value}}]`` in firing order.
        fig: a :class:`matplotlib.figure.Figure` to draw into (None: a new one, never registered
            with pyplot).
        title: the figure title (None: says how many firings and which steps).

    Returns:
        ``(fig, axes)`` with ``axes`` a dict ``{metric: Axes}``; each level is one ``Line2D``
        labelled with the level name, with one point per firing that computed the metric.
    """
    from matplotlib.figure import Figure

    series = timeline_series(history)
    metrics = list(dict.fromkeys(metric for _, metric in series))
    n = max(1, len(metrics))
    cols = min(_COLUMNS, n)
    rows = math.ceil(n / cols)
    if fig is None:
        fig = Figure(figsize=(2.5 * cols + 0.3, 2.0 * rows + 0.8), dpi=100)
    axes: dict[str, Any] = {}
    epochs = {int(h.get("step", 0)): h.get("epoch") for h in history}
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, k + 1)
        axes[metric] = ax
        for (level, name), (steps, values) in series.items():
            if name != metric:
                continue
            color, marker, label = _LEVEL_STYLE.get(level, (None, "^", level))
            ax.plot(steps, values, marker=marker, color=color, label=label, linewidth=1.5, markersize=4)
        ax.set_title(metric + (" (lower = closer)" if metric == "lpips" else ""), fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.set_xlabel("global step", fontsize=7)
    if not metrics:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no metrics recorded yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        handles, names = next(iter(axes.values())).get_legend_handles_labels()
        fig.legend(handles, names, loc="upper right", fontsize=8, ncol=len(names), frameon=False)
    if title is None:
        steps = sorted(epochs)
        span = f"steps {steps[0]}-{steps[-1]}" if len(steps) > 1 else (f"step {steps[0]}" if steps else "")
        last_epoch = epochs.get(steps[-1]) if steps else None
        title = f"panoviz metrics over {len(history)} firing(s)" + (f", {span}" if span else "") + (
            f" (last: epoch {last_epoch})" if last_epoch is not None else "")
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return fig, axes


def timeline_image(history: Sequence[Mapping[str, Any]], *, draw_text: bool = True,
                   title: str | None = None) -> Tensor:
    """The timeline as a ``(3, H, W)`` uint8 image for loggers, drawn with Pillow (a few ms per firing).

    The same content as :func:`plot_timeline`: one panel per metric (3 per row, about 700 px
    wide), one line per level (blue circles: vision encoder; orange squares: resampled), one
    marker per firing, the y range of the panel on its left, the first and last step under it.
    """
    from PIL import Image, ImageDraw

    from panoviz_callback import labels

    series = timeline_series(history)
    metrics = list(dict.fromkeys(metric for _, metric in series))
    cols = max(1, min(_COLUMNS, len(metrics)))
    rows = max(1, math.ceil(len(metrics) / cols))
    head = 2 * (_FONT_HEAD + 5) + 8
    width, height = cols * _PANEL[0] + 8, head + rows * _PANEL[1] + 4
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    points = chart_points(series, metrics, origin=(4, head))
    for k, metric in enumerate(metrics):
        x0, y0 = 4 + (k % cols) * _PANEL[0], head + (k // cols) * _PANEL[1]
        left, top, right, bottom = _plot_box(x0, y0)
        draw.rectangle((left, top, right, bottom), outline=(190, 190, 190))
        for (level, name), pts in points.items():
            if name != metric:
                continue
            color = _RGB.get(level, (40, 160, 40))
            if len(pts) > 1:
                draw.line(pts, fill=color, width=2)
            for x, y in pts:
                box = (x - 3, y - 3, x + 3, y + 3)
                draw.ellipse(box, fill=color) if level == "vision_encoder" else draw.rectangle(box, fill=color)
        if not draw_text:
            continue
        lo, hi = _y_range(series, metric)
        steps = sorted({s for (_, m), (st, _) in series.items() if m == metric for s in st})
        small, bold = labels._font(_FONT_SMALL), labels._font(_FONT_TITLE, bold=True)
        title = metric + (" (lower = closer)" if metric == "lpips" else "")
        draw.text((left, y0 + 2), labels._fit(draw, title, bold, _PANEL[0] - 8), fill=(20, 20, 20), font=bold)
        draw.text((x0 + 2, top - 2), f"{hi:.3g}", fill=(90, 90, 90), font=small)
        draw.text((x0 + 2, bottom - _FONT_SMALL), f"{lo:.3g}", fill=(90, 90, 90), font=small)
        draw.text((left, bottom + 2), f"step {steps[0]}", fill=(90, 90, 90), font=small)
        if len(steps) > 1:
            label = f"{steps[-1]}"
            draw.text((right - draw.textlength(label, font=small), bottom + 2), label, fill=(90, 90, 90), font=small)
    if draw_text:
        head_font, sub_font = labels._font(_FONT_HEAD, bold=True), labels._font(_FONT_HEAD)
        steps = sorted({int(h.get("step", 0)) for h in history})
        epochs = [h.get("epoch") for h in history if h.get("epoch") is not None]
        span = f"steps {steps[0]}-{steps[-1]}" if len(steps) > 1 else (f"step {steps[0]}" if steps else "no firing")
        if title is None:
            title = f"panoviz metrics over {len(history)} firing(s) · {span}" + (
                f" · last epoch {epochs[-1]}" if epochs else "")
        draw.text((4, 4), labels._fit(draw, title, head_font, width - 8), fill=(20, 20, 20), font=head_font)
        x = 4.0
        for level, (_, _, name) in _LEVEL_STYLE.items():
            draw.rectangle((x, 4 + _FONT_HEAD + 9, x + 10, 4 + _FONT_HEAD + 19), fill=_RGB[level])
            draw.text((x + 14, 4 + _FONT_HEAD + 6), name, fill=(20, 20, 20), font=sub_font)
            x += 24 + draw.textlength(name, font=sub_font)
        if not metrics:
            draw.text((8, head + 8), "no metrics recorded yet", fill=(90, 90, 90), font=sub_font)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def chart_points(series: Mapping[tuple[str, str], tuple[list[int], list[float]]], metrics: Sequence[str], *,
                 origin: tuple[int, int] = (0, 0)) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """Pixel positions of every marker of :func:`timeline_image`: ``{(level, metric): [(x, y), ...]}``.

    One point per firing that computed the metric; x follows the global step, y the value,
    within the metric's panel (panels laid out 3 per row from ``origin``).
    """
    cols = max(1, min(_COLUMNS, len(metrics)))
    out: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for k, metric in enumerate(metrics):
        left, top, right, bottom = _plot_box(origin[0] + (k % cols) * _PANEL[0], origin[1] + (k // cols) * _PANEL[1])
        lo, hi = _y_range(series, metric)
        steps = sorted({s for (_, m), (st, _) in series.items() if m == metric for s in st})
        s0, s1 = (steps[0], steps[-1]) if steps else (0, 1)
        for (level, name), (st, values) in series.items():
            if name != metric:
                continue
            xs = [(left + right) / 2 if s1 == s0 else left + 6 + (right - left - 12) * (s - s0) / (s1 - s0) for s in st]
            ys = [bottom - 6 - (bottom - top - 12) * (v - lo) / (hi - lo) for v in values]
            out[(level, name)] = list(zip(xs, ys))
    return out


def _plot_box(x0: int, y0: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the plot area of the panel at ``(x0, y0)``."""
    return x0 + 46, y0 + _FONT_TITLE + 8, x0 + _PANEL[0] - 10, y0 + _PANEL[1] - _FONT_SMALL - 8


def _y_range(series: Mapping[tuple[str, str], tuple[list[int], list[float]]], metric: str) -> tuple[float, float]:
    values = [v for (_, m), (_, vals) in series.items() if m == metric for v in vals]
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        return lo - 0.05, hi + 0.05
    return lo, hi


def write_timeline(history: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Write the timeline as a PNG file (atomically): :func:`timeline_image`, so it matches the logged one
    and costs milliseconds (the runner writes it on every checkpoint with a history).

    Args:
        history: ``[{"step", "epoch", "scalars"}]``.
        path: the PNG file.
        title: replaces the first title line (None: firings and steps).
    """
    from PIL import Image

    from panoviz_callback._io import atomic_path

    image = timeline_image(history, title=title)
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    return path


def _grid_tokens(features: Any) -> tuple[Tensor, tuple[int, int]]:
    """The tokens the PCA maps show and their grid: ``(V, gh*gw, D)`` or ``(V, Q, D)`` with ``(1, Q)``."""
    tokens = features.tokens
    if features.layout == "grid" and features.grid_hw is not None:
        grid = (int(features.grid_hw[0]), int(features.grid_hw[1]))
        prefix = features.num_prefix_tokens if tokens.shape[1] != grid[0] * grid[1] else 0
        return tokens[:, prefix:], grid
    return tokens, (1, tokens.shape[1])


def first_vs_latest_image(first_tokens: Tensor, result: Any, level: str, settings: Mapping[str, Any], *,
                          first: tuple[int | None, int | None], latest: tuple[int | None, int | None],
                          draw_text: bool = True) -> Tensor | None:
    """Each view's PCA map at the first firing beside the latest one, in the same colours.

    Both firings' tokens are coloured by one PCA: the latest firing's basis (stable and
    sign-aligned across firings) with one colour range over both, so a colour means the same
    feature direction on both sides.

    Args:
        first_tokens: the first firing's tokens of ``level`` as :func:`_grid_tokens` gives them,
            ``(V, N, D)``.
        result: the latest :class:`~panoviz_callback.analysis.AnalysisResult`.
        level: ``"vision_encoder"`` or ``"resampled"``.
        settings: :meth:`Analyzer.settings` (``n_components``, ``bg_removal``, ``bg_threshold``).
        first: ``(step, epoch)`` of the first firing.
        latest: ``(step, epoch)`` of the latest firing.
        draw_text: draw the labels.

    Returns:
        ``(3, H, W)`` uint8, or None when the token shapes differ (another model or layer).
    """
    from panoviz_callback import labels
    from panoviz_callback.pca import pca_rgb
    from panoviz_callback.render import display_order

    res = result.levels[level]
    tokens, grid = _grid_tokens(res.features)
    if tuple(first_tokens.shape) != tuple(tokens.shape):
        return None
    both = torch.cat([first_tokens.to(tokens.device, torch.float32), tokens.float()])  # (2V, N, D)
    state = result.pca_states.get(level)
    images, _, _ = pca_rgb(both, grid, n_components=int(settings.get("n_components", 3)),
                           bg_removal=settings.get("bg_removal", "threshold"),
                           bg_threshold=float(settings.get("bg_threshold", 0.5)),
                           state=None if state is None else state.to(tokens.device), freeze=state is not None)
    images = images.float().cpu()  # (2V, 3, gh, gw)
    v = tokens.shape[0]
    order = display_order(result.views)
    if grid[0] == 1 and not res.spatial:  # query strips: a (Q x 1)-cell band per side
        h, w = max(8, _HALF_TILE // 4), _HALF_TILE
    else:
        h = w = _HALF_TILE
    def side(batch: Tensor) -> Tensor:
        return torch.nn.functional.interpolate(batch, size=(h, w), mode="nearest-exact")
    before, after = side(images[:v][order]), side(images[v:][order])
    gap = torch.ones(v, 3, h, 4)
    tiles = torch.cat([before, gap, after], dim=-1)  # (V, 3, h, 2w + 4)
    captions = [labels.view_caption(result.views.cameras[k], k) for k in order]
    title = [f"{labels.LEVEL_TITLES.get(level, level)} PCA: first vs latest, same colours",
             f"left: {labels.stamp(*first)} · right: {labels.stamp(*latest)}"]
    return labels.labelled_grid(tiles, captions, title, draw_text=draw_text)


def grid_tokens(features: Any) -> Tensor:
    """The tokens a level's PCA maps show, ``(V, N, D)`` (prefix tokens dropped for grid layouts)."""
    return _grid_tokens(features)[0]


# ------------------------------------------------------------------ checkpoint folders
_NUMBER = re.compile(r"(step|epoch)=(\d+)")


def checkpoint_series(folder: str | os.PathLike) -> list[Path]:
    """The ``*.ckpt`` files of ``folder`` in training order.

    Order: the ``step=N`` in the name, else ``epoch=N``, else the modification time;
    ``last.ckpt`` (a copy of the newest) comes last.

    Raises:
        ValueError: the folder holds no ``.ckpt`` file.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".ckpt")
    if not files:
        raise ValueError(f"--checkpoint folder '{folder}' holds no .ckpt files")

    def key(path: Path) -> tuple[int, float, float, str]:
        found = dict((k, int(v)) for k, v in _NUMBER.findall(path.stem))
        last = path.stem == "last" or path.stem.startswith("last-")
        number = found.get("step", found.get("epoch", -1))
        return int(last), float(number), path.stat().st_mtime, path.name

    return sorted(files, key=key)


def history_from_reports(reports: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A history from ``similarity_NAME.json`` dicts (one per checkpoint), sorted by step, one entry per step."""
    history: dict[int, dict[str, Any]] = {}
    for k, data in enumerate(reports):
        step = data.get("step")
        step = k if step is None else int(step)
        scalars = {}
        for level, body in (data.get("levels") or {}).items():
            for metric, value in (body.get("metrics") or {}).items():
                mean = value.get("mean") if isinstance(value, Mapping) else None
                if isinstance(mean, int | float) and math.isfinite(mean):
                    scalars[f"{level}/{metric}"] = float(mean)
        history.setdefault(step, {"step": step, "epoch": data.get("epoch"), "scalars": scalars})
    return [history[s] for s in sorted(history)]


def write_gif(frames: Sequence[str | os.PathLike], path: str | os.PathLike, *, duration_ms: int = 800) -> Path | None:
    """An animated GIF of PNG files (e.g. one PCA figure per checkpoint); None with fewer than 2 frames.

    Frames of different sizes are padded with white to the largest.
    """
    from PIL import Image

    from panoviz_callback._io import atomic_path

    images = [Image.open(f).convert("RGB") for f in frames]
    if len(images) < 2:
        return None
    w = max(i.width for i in images)
    h = max(i.height for i in images)
    padded = []
    for image in images:
        canvas = Image.new("RGB", (w, h), "white")
        canvas.paste(image, (0, 0))
        padded.append(canvas)
    path = Path(path)
    with atomic_path(path) as tmp:
        padded[0].save(tmp, format="GIF", save_all=True, append_images=padded[1:], duration=duration_ms, loop=0)
    return path
