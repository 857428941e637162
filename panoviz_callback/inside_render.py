"""Pictures of :mod:`panoviz_callback.inside`: attention maps, the layer sweep, the agreement panorama.

Files (``{stem}_{NAME}.png``, :data:`INSIDE_FILES`) and logger images (``panoviz/{stem}``,
``(3, H, W)`` uint8) come from the same matplotlib figures (Agg canvas, never pyplot):

- ``query_attention``: rows = views, columns = the most focused queries; each cell is the
  view (grey) under the query's head-averaged cross-attention (bright = attended).
- ``query_attention_sphere``: each of those queries' attention stitched on the panorama:
  a query that tracks one scene region shows one blob, seen the same from every view.
- ``encoder_attention``: the encoder's CLS / probe / mean attention per view, and stitched.
- ``layer_sweep``: metric (y) against layer (x), encoder left, resampler right.
- ``agreement_panorama``: per-token cosine of matched tokens of adjacent views at their scene
  point (green: the views agree, red: they do not; grey: no two views overlap), with a colour bar.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from panoviz_callback.correspondence import stitch_equirect
from panoviz_callback.render import display_order, save_figure_atomic, view_title
from panoviz_callback.report import _check_name

__all__ = [
    "INSIDE_FILES", "query_attention_figure", "query_sphere_figure", "encoder_attention_figure",
    "layer_sweep_figure", "agreement_figure", "inside_figures", "inside_images", "write_inside_figures",
]

#: File stems (and logger tag names) per picture.
INSIDE_FILES = {
    "query_attention": "query_attention",
    "query_sphere": "query_attention_sphere",
    "encoder_attention": "encoder_attention",
    "layer_sweep": "layer_sweep",
    "agreement": "agreement_panorama",
}
_DPI = 100
_CELL_IN = 1.3
_TILE_PX = 96
_HEAT = colormaps["inferno"]
_AGREE = colormaps["RdYlGn"]


def _heat_overlay(grey: Tensor, heat: Tensor) -> np.ndarray:
    """``grey (h, w)`` in [0, 1] under ``heat (h, w)`` normalised to its max: ``(h, w, 3)`` float RGB."""
    h = heat / heat.max().clamp_min(1e-12)
    rgb = _HEAT(h.numpy())[..., :3]
    g = grey.numpy()[..., None]
    return np.clip(0.35 * g + 0.65 * rgb * (0.25 + 0.75 * h.numpy()[..., None]), 0, 1)


def _grey_views(views: Any, size: int) -> Tensor:
    pixels = views.pixels.detach().float().cpu()
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return pixels.mean(1).clamp(0, 1)  # (V, s, s)


def _up(maps: Tensor, size: int) -> Tensor:
    """``(V, gh, gw)`` -> ``(V, size, size)`` bilinear (token centres where the geometry puts them)."""
    return F.interpolate(maps[:, None].float().cpu(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def _grey_pano(views: Any, hw: tuple[int, int]) -> Tensor:
    pano, _ = stitch_equirect(views.pixels.detach().float(), views, hw)
    return pano.mean(0).cpu().clamp(0, 1)  # (H, W)


def _off(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def query_attention_figure(result: Any) -> Figure | None:
    """Views x top queries: each query's cross-attention over each view (None without query attention)."""
    qa = getattr(result.inside, "query_attention", None)
    if qa is None:
        return None
    views, order = result.views, display_order(result.views)
    queries = qa.top(result.inside.options.top_queries)
    grey = _grey_views(views, _TILE_PX)
    fig = Figure(figsize=(_CELL_IN * len(queries) + 1.0, _CELL_IN * len(order) + 0.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(order), len(queries), squeeze=False)
    for col, q in enumerate(queries):
        maps = _up(qa.attn[:, q].reshape(-1, *qa.grid_hw), _TILE_PX)  # (V, s, s)
        for row, v in enumerate(order):
            ax = axes[row, col]
            ax.imshow(_heat_overlay(grey[v], maps[v]))
            _off(ax)
            if row == 0:
                ax.set_title(f"query {q}\nH={float(qa.entropy[q]):.2f}", fontsize=7)
            if col == 0:
                ax.set_ylabel(view_title(views.cameras[v]), fontsize=6)
    fig.suptitle(f"query cross-attention ({qa.site}), heads averaged; bright = attended", fontsize=8)
    fig.subplots_adjust(left=0.08, right=0.99, bottom=0.01, top=1 - 0.75 / fig.get_figheight(), wspace=0.04,
                        hspace=0.04)
    return fig


def query_sphere_figure(result: Any) -> Figure | None:
    """The top queries' attention stitched on the panorama (None without query attention)."""
    qa = getattr(result.inside, "query_attention", None)
    if qa is None:
        return None
    queries = qa.top(result.inside.options.top_queries)
    cols = min(4, len(queries))
    rows = -(-len(queries) // cols)
    grey = _grey_pano(result.views, tuple(qa.sphere.shape[-2:]))
    fig = Figure(figsize=(3.0 * cols, 1.6 * rows + 0.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        _off(ax)
        if k >= len(queries):
            ax.set_axis_off()
            continue
        q = queries[k]
        heat = qa.sphere[q].detach().float().cpu() * qa.covered.cpu()
        ax.imshow(_heat_overlay(grey, heat))
        ax.set_title(f"query {q}: agreement {_nanmean(qa.agreement):.2f} (all queries)" if k == 0 else f"query {q}",
                     fontsize=7)
    fig.suptitle("query attention on the sphere (equirectangular, longitude 0 at the centre)", fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.45 / fig.get_figheight(), wspace=0.03,
                        hspace=0.15)
    return fig


def encoder_attention_figure(result: Any) -> Figure | None:
    """The encoder's attention per view (top) and stitched on the panorama (bottom)."""
    ea = getattr(result.inside, "encoder_attention", None)
    if ea is None:
        return None
    views, order = result.views, display_order(result.views)
    grey = _grey_views(views, _TILE_PX)
    maps = _up(ea.attn.reshape(-1, *ea.grid_hw), _TILE_PX)
    fig = Figure(figsize=(max(_CELL_IN * len(order), 6.0), _CELL_IN + 3.2))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, len(order), height_ratios=[1, 2.2])
    for col, v in enumerate(order):
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(_heat_overlay(grey[v], maps[v]))
        ax.set_title(view_title(views.cameras[v]), fontsize=6)
        _off(ax)
    ax = fig.add_subplot(grid[1, :])
    pano = _grey_pano(views, tuple(ea.sphere.shape))
    ax.imshow(_heat_overlay(pano, ea.sphere.detach().float().cpu() * ea.covered.cpu()))
    _off(ax)
    what = {"probe": "attention-pooling probe", "cls": "CLS token", "mean": "mean received"}[ea.kind]
    fig.suptitle(f"encoder attention ({what}, last block, heads averaged); bright = attended", fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.04, hspace=0.12)
    return fig


def layer_sweep_figure(result: Any) -> Figure | None:
    """Metric against layer: the encoder's hidden states (left) and the resampler's layers (right)."""
    sweep = getattr(result.inside, "layer_sweep", None)
    if sweep is None or not sweep.levels:
        return None
    levels = [lv for lv in ("vision_encoder", "resampled") if lv in sweep.levels]
    fig = Figure(figsize=(4.2 * len(levels), 3.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(levels), squeeze=False)[0]
    for ax, level in zip(axes, levels, strict=True):
        data = sweep.levels[level]
        x = np.arange(len(data["layers"]))
        for metric, values in data["metrics"].items():
            ax.plot(x, values, marker="o", markersize=3, label=metric)
        ax.set_xticks(x, data["layers"], fontsize=7)
        ax.set_xlabel("hidden state (0 = embeddings)" if level == "vision_encoder" else "resampler layer", fontsize=8)
        ax.set_title(level, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("mean over view pairs", fontsize=8)
    fig.suptitle("cross-view consistency through the layers", fontsize=9)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.16, top=0.84, wspace=0.2)
    return fig


def agreement_figure(result: Any) -> Figure | None:
    """The agreement panorama of every level with a token grid, with a colour bar."""
    maps = getattr(result.inside, "agreement", None) or {}
    if not maps:
        return None
    fig = Figure(figsize=(6.0, 2.6 * len(maps) + 0.3), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(maps), 1, squeeze=False)[:, 0]
    cmap = _AGREE.with_extremes(bad=(0.6, 0.6, 0.6))
    image = None
    for ax, (level, pano) in zip(axes, maps.items(), strict=True):
        values = pano.detach().float().cpu().numpy()
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
        mean = np.nanmean(values) if np.isfinite(values).any() else float("nan")
        ax.set_title(f"{level}: mean {mean:.2f}", fontsize=8)
        _off(ax)
    bar = fig.colorbar(image, ax=list(axes), fraction=0.03, pad=0.02)
    bar.set_label("overlap cosine of matched tokens", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle("where adjacent views agree (grey: no overlap)", fontsize=9)
    return fig


def _nanmean(x: Tensor) -> float:
    x = x[torch.isfinite(x)]
    return float(x.mean()) if x.numel() else float("nan")


_BUILDERS = {
    "query_attention": query_attention_figure,
    "query_sphere": query_sphere_figure,
    "encoder_attention": encoder_attention_figure,
    "layer_sweep": layer_sweep_figure,
    "agreement": agreement_figure,
}


def inside_figures(result: Any) -> dict[str, Figure]:
    """``{key of INSIDE_FILES: Figure}`` for every part ``result.inside`` holds (``{}`` when off)."""
    if getattr(result, "inside", None) is None:
        return {}
    figures = {key: build(result) for key, build in _BUILDERS.items()}
    return {key: fig for key, fig in figures.items() if fig is not None}


def _figure_image(fig: Figure, dpi: int = _DPI) -> Tensor:
    fig.set_dpi(dpi)
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    image = torch.from_numpy(np.ascontiguousarray(rgba[..., :3])).permute(2, 0, 1).contiguous()  # (3, H, W)
    fig.clear()
    return image


def inside_images(result: Any, prefix: str = "panoviz") -> dict[str, Tensor]:
    """Logger images ``{"panoviz/STEM": (3, H, W) uint8}`` of :func:`inside_figures`."""
    return {f"{prefix}/{INSIDE_FILES[key]}": _figure_image(fig) for key, fig in inside_figures(result).items()}


def write_inside_figures(result: Any, out_dir: str | os.PathLike, name: str, *, dpi: int = 120) -> dict[str, Path]:
    """Write ``{stem}_{NAME}.png`` for every figure of :func:`inside_figures` (atomically).

    Returns:
        ``{key of INSIDE_FILES: path}`` for the files written.
    """
    _check_name(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {key: save_figure_atomic(fig, out / f"{INSIDE_FILES[key]}_{name}.png", dpi=dpi)
            for key, fig in inside_figures(result).items()}
