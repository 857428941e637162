"""Figures of an analysis: the views, the PCA maps under them and the stitched PCA panorama.

Two kinds of output from the same :class:`~panoviz_callback.analysis.AnalysisResult`:

- matplotlib figures for the runner's PNG files (:func:`write_figures`). Figures are
  built with :class:`matplotlib.figure.Figure` directly (Agg canvas, never registered
  with pyplot, never shown), so nothing leaks between calls and no backend is switched.
  Plot functions take ``ax=None`` / ``axes=None`` and return ``(fig, ax)``.
- plain image tensors ``(3, H, W)`` uint8 on the CPU for loggers (TensorBoard's
  ``add_image``, W&B): :func:`views_grid_image`, :func:`pca_grid_image`,
  :func:`pca_panorama_image`. They are composed with torch only (no text), which is
  fast enough to run at every callback firing.

Reading the PCA panorama: every view's PCA colours are projected back onto the
sphere (each ERP pixel takes the colour of the nearest-centred view that sees it).
Where overlapping views agree the panorama looks seamless; disagreement shows as
seams at the view borders. Areas no view sees are dark grey; background tokens
(``bg_removal="threshold"``) are black.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from panoviz_callback._checks import _check_choice
from panoviz_callback._io import atomic_path
from panoviz_callback.report import _check_name

__all__ = [
    "FIGURE_FILES",
    "view_title",
    "display_order",
    "upsample_pca",
    "plot_views",
    "plot_pca_maps",
    "plot_pca_panorama",
    "views_figure",
    "pca_figure",
    "views_grid_image",
    "pca_grid_image",
    "pca_panorama_image",
    "save_figure_atomic",
    "write_figures",
]

#: Output file stems per figure: ``{stem}_{NAME}.png``.
FIGURE_FILES = {
    "views": "original_views",
    "vision_encoder": "vision_encoder_pca",
    "resampled": "resampled_features_pca",
}
_UPSAMPLE = ("nearest", "bilinear")
_UNCOVERED = 0.25  # dark grey: ERP pixels that no view sees
_DPI = 120
_MAX_WIDTH_IN = 18.0  # 18 in x 120 dpi = 2160 px at most
_MARGIN_IN = 0.1
_GAP_IN = 0.08
_TITLE_IN = 0.45
_FIGURE_PANO_HW = (360, 720)
_MAX_TILE_PX = 2400  # total width budget of the logged image rows
_GAP = 4


def view_title(camera: Any) -> str:
    """``"yaw 45° pitch 0°"`` for a camera (``"global view"`` for the whole-panorama view)."""
    if camera.kind == "global":
        return "global view"
    return f"yaw {camera.yaw_deg:g}° pitch {camera.pitch_deg:g}°"


def display_order(views: Any) -> list[int]:
    """View indices in display order: the global view first (anyres_e2p), then the others in order."""
    kinds = [c.kind for c in views.cameras]
    return [k for k, kind in enumerate(kinds) if kind == "global"] + [
        k for k, kind in enumerate(kinds) if kind != "global"
    ]


def upsample_pca(images: Tensor, size: int | tuple[int, int], mode: Literal["nearest", "bilinear"] = "nearest") -> Tensor:
    """Resize ``(V, 3, gh, gw)`` PCA images to the view size.

    ``nearest`` keeps every token a visible block; ``bilinear`` smooths (``align_corners=False``,
    so token centres land where ``x_view = (x_img + 0.5) * S / gw - 0.5`` puts them).

    Returns:
        ``(V, 3, h, w)`` float32 in ``[0, 1]``.
    """
    _check_choice(mode, _UPSAMPLE, "upsample")
    size = (size, size) if isinstance(size, int) else tuple(size)
    images = images.float()
    if mode == "nearest":
        return F.interpolate(images, size=size, mode="nearest-exact")
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def _hwc(image: Tensor) -> np.ndarray:
    return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _row_layout(n: int) -> tuple[float, float]:
    """``(cell, width)`` in inches for a row of ``n`` square axes within the width budget."""
    cell = min(2.0, (_MAX_WIDTH_IN - 2 * _MARGIN_IN - _GAP_IN * (n - 1)) / max(n, 1))
    return cell, 2 * _MARGIN_IN + n * cell + _GAP_IN * (n - 1)


def _add_row(fig: Figure, n: int, cell: float, bottom_in: float, height_in: float | None = None) -> list[Axes]:
    """``n`` axes side by side (explicit positions: no layout engine, fast and predictable)."""
    width_in, fig_h = fig.get_size_inches()
    height_in = cell if height_in is None else height_in
    return [
        fig.add_axes((( _MARGIN_IN + k * (cell + _GAP_IN)) / width_in, bottom_in / fig_h, cell / width_in,
                      height_in / fig_h))
        for k in range(n)
    ]


def _new_row_figure(n: int, extra_top: float = _TITLE_IN) -> tuple[Figure, list[Axes]]:
    cell, width = _row_layout(n)
    fig = Figure(figsize=(width, cell + extra_top + _MARGIN_IN))
    return fig, _add_row(fig, n, cell, _MARGIN_IN)


def _check_axes(axes: Sequence[Axes], n: int) -> list[Axes]:
    axes = list(np.ravel(axes))
    if len(axes) != n:
        raise ValueError(f"Expected {n} axes (one per view), got {len(axes)}.")
    return axes


def plot_views(views: Any, axes: Sequence[Axes] | None = None) -> tuple[Figure, list[Axes]]:
    """The views in a row (global view first), each titled ``View k`` and its yaw/pitch.

    Args:
        views: a :class:`~panoviz_callback.views.ViewSet`.
        axes: ``V`` axes to draw into (None: a new figure).
    """
    order = display_order(views)
    fig, axes = _new_row_figure(len(order)) if axes is None else (None, _check_axes(axes, len(order)))
    for ax, k in zip(axes, order):
        ax.imshow(_hwc(views.pixels[k]), interpolation="nearest")
        ax.set_title(f"View {k}\n{view_title(views.cameras[k])}", fontsize=8)
        ax.set_axis_off()
    return axes[0].figure, axes


def plot_pca_maps(
    result: Any, level: str, axes: Sequence[Axes] | None = None, *, upsample: Literal["nearest", "bilinear"] = "nearest",
) -> tuple[Figure, list[Axes]]:
    """The PCA-RGB maps of a level in :func:`display_order`.

    Grid layouts: one map per view upsampled to the view size (see :func:`upsample_pca`),
    ``V`` axes. Query-token layouts are drawn as they are, without a fake square grid:
    one ``V x Q`` matrix (a row of query colours per view) in a single axes.

    Args:
        result: an :class:`~panoviz_callback.analysis.AnalysisResult`.
        level: ``"vision_encoder"`` or ``"resampled"``.
        axes: ``V`` axes (grid) or one axes (queries) to draw into (None: a new figure).
        upsample: ``"nearest"`` (tokens stay visible) or ``"bilinear"``.
    """
    res = _level(result, level)
    views = result.views
    order = display_order(views)
    n = len(order) if res.spatial else 1
    fig, axes = _new_row_figure(n, extra_top=0.1) if axes is None else (None, _check_axes(axes, n))
    if res.spatial:
        images = upsample_pca(res.pca_images, views.image_size, upsample)
        for ax, k in zip(axes, order):
            ax.imshow(_hwc(images[k]), interpolation="nearest")
            ax.set_axis_off()
    else:
        ax = axes[0]
        matrix = res.pca_images[order, :, 0, :].permute(1, 0, 2)  # (3, V, Q)
        ax.imshow(_hwc(matrix), interpolation="nearest", aspect="auto")
        ax.set_yticks(range(len(order)), [f"View {k}" for k in order], fontsize=7)
        ax.set_xlabel(f"query token (Q = {matrix.shape[-1]})", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        for spine in ax.spines.values():
            spine.set_visible(False)
    return axes[0].figure, axes


def _stitched(result: Any, level: str, out_hw: tuple[int, int], upsample: str) -> tuple[Tensor, Tensor] | None:
    from panoviz_callback.correspondence import stitch_equirect

    res = _level(result, level)
    if not res.spatial:
        return None
    views = result.views
    images = upsample_pca(res.pca_images, views.image_size, upsample)  # (V, 3, S, S)
    with torch.no_grad():
        pano, covered = stitch_equirect(images.to(views.pixels.device), views, out_hw=out_hw, mode=upsample)
    pano = pano.float().cpu().clamp(0, 1)
    covered = covered.cpu()
    return torch.where(covered[None], pano, torch.full_like(pano, _UNCOVERED)), covered


def plot_pca_panorama(
    result: Any, level: str, ax: Axes | None = None, *, out_hw: tuple[int, int] = _FIGURE_PANO_HW,
    upsample: Literal["nearest", "bilinear"] = "nearest",
) -> tuple[Figure, Axes]:
    """The PCA maps of all views projected back onto the sphere (equirectangular, longitude -180..180).

    Overlapping regions that agree look seamless; disagreement shows as seams.
    Uncovered areas are dark grey. Query-token layouts have no panorama: the axes
    say so.
    """
    if ax is None:
        fig = Figure(figsize=(8, 4.4))
        ax = fig.add_axes((0.02, 0.02, 0.96, 0.9))
    stitched = _stitched(result, level, out_hw, upsample)
    ax.set_axis_off()
    if stitched is None:
        ax.text(0.5, 0.5, "no PCA panorama: query tokens have no spatial position", ha="center", va="center",
                transform=ax.transAxes, fontsize=8)
        return ax.figure, ax
    ax.imshow(_hwc(stitched[0]), interpolation="nearest", extent=(-180, 180, -90, 90))
    ax.set_title("PCA panorama: views projected back onto the sphere (agreement is seamless, "
                 "disagreement shows as seams; grey: unseen)", fontsize=8)
    return ax.figure, ax


def views_figure(result: Any) -> Figure:
    """The ``original_views_NAME.png`` figure: the views in a row, global view first."""
    fig, _ = plot_views(result.views)
    n = len(result.views)
    fig.suptitle(f"{result.views.strategy}: {n} views, {len(result.views.pairs)} pairs", fontsize=9,
                 y=1 - 0.08 / fig.get_size_inches()[1])
    return fig


def pca_figure(result: Any, level: str, *, upsample: Literal["nearest", "bilinear"] = "nearest") -> Figure:
    """The ``*_pca_NAME.png`` figure: views, the PCA maps aligned under them, the PCA panorama.

    Query-token levels show the ``V x Q`` colour matrix instead of the maps and no panorama.
    """
    res = _level(result, level)
    n = len(result.views)
    cell, width = _row_layout(n)
    inner = width - 2 * _MARGIN_IN
    pca_h = cell if res.spatial else min(cell, max(0.8, 0.22 * n))
    pano_h = min(inner / 2, 3.2 * cell) if res.spatial else 0.0
    heights = [_MARGIN_IN, pano_h, _TITLE_IN if res.spatial else 0.0, pca_h, 0.15 if res.spatial else 0.45,
               cell, _TITLE_IN, _TITLE_IN]  # bottom to top
    fig = Figure(figsize=(width, sum(heights)))
    fig_h = sum(heights)
    y_pano = heights[0]
    y_pca = y_pano + pano_h + heights[2]
    y_views = y_pca + pca_h + heights[4]
    plot_views(result.views, _add_row(fig, n, cell, y_views))
    pca_axes = _add_row(fig, n, cell, y_pca, pca_h) if res.spatial else [
        fig.add_axes((_MARGIN_IN / width + 0.04, y_pca / fig_h, inner / width - 0.04, pca_h / fig_h))]
    plot_pca_maps(result, level, pca_axes, upsample=upsample)
    if res.spatial:
        pano_w = 2 * pano_h
        plot_pca_panorama(result, level, fig.add_axes(((width - pano_w) / 2 / width, y_pano / fig_h, pano_w / width,
                                                       pano_h / fig_h)), upsample=upsample)
    grid_hw = res.features.grid_hw
    layout = f"{grid_hw[0]}x{grid_hw[1]} tokens" if res.spatial else f"{res.pca_images.shape[-1]} query tokens"
    fig.suptitle(f"{level} PCA ({layout} x {res.features.tokens.shape[-1]} dims per view)", fontsize=9,
                 y=1 - 0.08 / fig_h)
    return fig


def _to_uint8(image: Tensor) -> Tensor:
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def _row(tiles: list[Tensor], gap: int = _GAP) -> Tensor:
    """Concatenate ``(3, h, w)`` tiles horizontally with white gaps."""
    spacer = torch.ones(3, tiles[0].shape[1], gap)
    parts: list[Tensor] = []
    for k, tile in enumerate(tiles):
        parts += ([spacer] if k else []) + [tile]
    return torch.cat(parts, dim=2)


def _tile_px(result: Any) -> int:
    n = len(result.views)
    return max(16, min(result.views.image_size, (_MAX_TILE_PX - _GAP * (n - 1)) // n))


def views_grid_image(result: Any) -> Tensor:
    """The views in a row (global first) as one ``(3, H, W)`` uint8 image, at most 2400 px wide."""
    views = result.views
    tile = _tile_px(result)
    pixels = views.pixels.detach().float().cpu()
    if tile != pixels.shape[-1]:
        pixels = F.interpolate(pixels, size=(tile, tile), mode="bilinear", antialias=True, align_corners=False)
    return _to_uint8(_row([pixels[k] for k in display_order(views)]))


def pca_grid_image(
    result: Any, level: str, *, upsample: Literal["nearest", "bilinear"] = "nearest", with_views: bool = False,
) -> Tensor:
    """The PCA maps of a level as one ``(3, H, W)`` uint8 image.

    Grid layouts: a row aligned with :func:`views_grid_image` (stacked under it with
    ``with_views=True``). Query layouts: a ``V x Q`` matrix, one row of query colours
    per view in display order, each cell a square block.
    """
    res = _level(result, level)
    order = display_order(result.views)
    images = res.pca_images.detach().float().cpu()
    if res.spatial:
        tile = _tile_px(result)
        out = _row([t for t in upsample_pca(images[order], tile, upsample).clamp(0, 1)])
        if with_views:
            views = views_grid_image(result).float() / 255
            out = torch.cat([views, torch.ones(3, _GAP, out.shape[2]), out], dim=1)
        return _to_uint8(out)
    strips = images[order, :, 0, :]  # (V, 3, Q)
    q = strips.shape[-1]
    cell = max(2, min(24, _MAX_TILE_PX // q))
    matrix = strips.permute(1, 0, 2)  # (3, V, Q)
    return _to_uint8(F.interpolate(matrix[None], scale_factor=cell, mode="nearest")[0])


def pca_panorama_image(
    result: Any, level: str, *, out_hw: tuple[int, int] = (256, 512), upsample: Literal["nearest", "bilinear"] = "nearest",
) -> Tensor | None:
    """The stitched PCA panorama ``(3, H, W)`` uint8 (uncovered areas dark grey); None for query layouts."""
    stitched = _stitched(result, level, out_hw, upsample)
    return None if stitched is None else _to_uint8(stitched[0])


def save_figure_atomic(fig: Figure, path: str | os.PathLike, *, dpi: int = _DPI) -> Path:
    """Save ``fig`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    An interrupted or failing save leaves neither a partial target nor a temporary file.
    The figure is released afterwards (its artists are cleared), whether saving worked or not.

    Returns:
        The path written.
    """
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png", facecolor="white")
    finally:
        fig.clear()
    return path


def write_figures(
    result: Any, out_dir: str | os.PathLike, name: str, *, upsample: Literal["nearest", "bilinear"] = "nearest",
    dpi: int = _DPI,
) -> dict[str, Path]:
    """Write ``original_views_NAME.png``, ``vision_encoder_pca_NAME.png`` and, with a resampler,
    ``resampled_features_pca_NAME.png`` into ``out_dir`` (created if missing).

    Returns:
        ``{"views" | "vision_encoder" | "resampled": path}`` for the files written.
    """
    _check_name(name)
    _check_choice(upsample, _UPSAMPLE, "upsample")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"views": save_figure_atomic(views_figure(result), out / f"{FIGURE_FILES['views']}_{name}.png", dpi=dpi)}
    for level in ("vision_encoder", "resampled"):
        if level in result.levels:
            path = out / f"{FIGURE_FILES[level]}_{name}.png"
            written[level] = save_figure_atomic(pca_figure(result, level, upsample=upsample), path, dpi=dpi)
    return written


def _level(result: Any, level: str) -> Any:
    if level not in result.levels:
        raise ValueError(f"Argument `level` must be one of {tuple(result.levels)}, got {level!r}.")
    return result.levels[level]
