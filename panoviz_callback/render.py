"""Figures of an analysis: the views, the PCA maps under them and the stitched PCA panorama.

Two kinds of output from the same :class:`~panoviz_callback.analysis.AnalysisResult`:

- matplotlib figures for the runner's PNG files (:func:`write_figures`). Figures are
  built with :class:`matplotlib.figure.Figure` directly (Agg canvas, never registered
  with pyplot, never shown), so nothing leaks between calls and no backend is switched.
  Plot functions take ``ax=None`` and return ``(fig, ax)``; a row of views is one image
  (the same mosaic as the logged tensors) in one axes, with a title over every view.
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
_CELL_IN = 2.0  # width of one view in a figure, at most
_MARGIN_IN = 0.1
_TITLE_IN = 0.42  # two lines of 8 pt over every view
_FIGURE_PANO_HW = (256, 512)  # the same geometry as the logged image, so the stitch grid is cached once
_MAX_ROW_PX = 2400  # width budget of an image row
_GAP = 4  # white pixels between views


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


def upsample_pca(
    images: Tensor, size: int | tuple[int, int], mode: Literal["nearest", "bilinear"] = "nearest"
) -> Tensor:
    """Resize ``(V, 3, gh, gw)`` PCA images to the view size.

    ``nearest`` keeps every token a visible block; ``bilinear`` smooths (``align_corners=False``,
    so token centres land where ``x_view = (x_img + 0.5) * S / gw - 0.5`` puts them).

    Returns:
        ``(V, 3, h, w)`` float32 in ``[0, 1]``.
    """
    _check_choice(mode, _UPSAMPLE, "upsample")
    size = (size, size) if isinstance(size, int) else tuple(size)
    images = images.detach().float()
    if mode == "nearest":
        return F.interpolate(images, size=size, mode="nearest-exact")
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


# ----------------------------------------------------------------- mosaics (torch)
def _row(tiles: Sequence[Tensor], gap: int = _GAP) -> Tensor:
    """Concatenate ``(3, h, w)`` tiles horizontally with white gaps: ``(3, h, sum w + gaps)``."""
    spacer = torch.ones(3, tiles[0].shape[1], gap)
    parts: list[Tensor] = []
    for k, tile in enumerate(tiles):
        parts += ([spacer] if k else []) + [tile]
    return torch.cat(parts, dim=2)


def _tile_px(views: Any) -> int:
    """Side of one view in an image row: the view size, shrunk so the row stays within 2400 px."""
    n = len(views)
    return max(16, min(int(views.image_size), (_MAX_ROW_PX - _GAP * (n - 1)) // n))


def _views_row(views: Any) -> Tensor:
    tile = _tile_px(views)
    pixels = views.pixels.detach().float().cpu()
    if tile != pixels.shape[-1]:
        pixels = F.interpolate(pixels, size=(tile, tile), mode="bilinear", antialias=True, align_corners=False)
    return _row([pixels[k].clamp(0, 1) for k in display_order(views)])  # (3, tile, W)


def _pca_row(result: Any, level: str, upsample: str) -> Tensor:
    res = _level(result, level)
    order = display_order(result.views)
    images = res.pca_images.detach().float().cpu()
    if res.spatial:
        tile = _tile_px(result.views)
        return _row(list(upsample_pca(images[order], tile, upsample)))  # (3, tile, W)
    strips = images[order, :, 0, :]  # (V, 3, Q)
    cell = max(2, min(24, _MAX_ROW_PX // strips.shape[-1]))
    return F.interpolate(strips.permute(1, 0, 2)[None], scale_factor=cell, mode="nearest")[0]  # (3, V*c, Q*c)


def _to_uint8(image: Tensor) -> Tensor:
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def views_grid_image(result: Any) -> Tensor:
    """The views in a row (global first) as one ``(3, H, W)`` uint8 image, at most 2400 px wide."""
    return _to_uint8(_views_row(result.views))


def pca_grid_image(
    result: Any, level: str, *, upsample: Literal["nearest", "bilinear"] = "nearest", with_views: bool = False,
) -> Tensor:
    """The PCA maps of a level as one ``(3, H, W)`` uint8 image.

    Grid layouts: a row aligned with :func:`views_grid_image` (stacked under it with
    ``with_views=True``). Query layouts: a ``V x Q`` matrix, one row of query colours
    per view in display order, each cell a square block (``with_views`` is ignored: the
    rows do not align with the views).
    """
    _check_choice(upsample, _UPSAMPLE, "upsample")
    out = _pca_row(result, level, upsample)
    if with_views and result.levels[level].spatial:
        out = torch.cat([_views_row(result.views), torch.ones(3, _GAP, out.shape[2]), out], dim=1)
    return _to_uint8(out)


def pca_panorama_image(
    result: Any, level: str, *, out_hw: tuple[int, int] = _FIGURE_PANO_HW,
    upsample: Literal["nearest", "bilinear"] = "nearest", crop: bool = True,
) -> Tensor | None:
    """The stitched PCA panorama ``(3, H, W)`` uint8 (uncovered areas dark grey); None for query layouts.

    With ``crop`` the rows no view sees (e.g. the poles for pitch-0 tiles) are cut off, keeping
    a thin grey margin; the crop depends only on the cameras, so both levels get the same size.
    """
    stitched = _stitched(result, level, out_hw, upsample)
    if stitched is None:
        return None
    pano, covered = stitched
    top, bottom = _covered_rows(covered) if crop else (0, pano.shape[1])
    return _to_uint8(pano[:, top:bottom])


def _stitched(result: Any, level: str, out_hw: tuple[int, int], upsample: str) -> tuple[Tensor, Tensor] | None:
    from panoviz_callback.correspondence import stitch_equirect

    _check_choice(upsample, _UPSAMPLE, "upsample")
    res = _level(result, level)
    if not res.spatial:
        return None
    views = result.views
    images = upsample_pca(res.pca_images, views.image_size, upsample)  # (V, 3, S, S)
    with torch.no_grad():
        pano, covered = stitch_equirect(images.to(views.pixels.device), views, out_hw=out_hw, mode=upsample)
    pano, covered = pano.float().cpu().clamp(0, 1), covered.cpu()
    return torch.where(covered[None], pano, torch.full_like(pano, _UNCOVERED)), covered


def _covered_rows(covered: Tensor) -> tuple[int, int]:
    """``[top, bottom)`` rows of the latitude band any view sees, with a small grey margin."""
    rows = torch.nonzero(covered.any(dim=1)).flatten()
    if len(rows) == 0:
        return 0, covered.shape[0]
    margin = max(1, covered.shape[0] // 64)
    return max(0, int(rows[0]) - margin), min(covered.shape[0], int(rows[-1]) + 1 + margin)


# ------------------------------------------------------------ figures (matplotlib)
def _hwc(image: Tensor) -> np.ndarray:
    return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _figure_width(n: int) -> float:
    return min(_MAX_WIDTH_IN, 2 * _MARGIN_IN + _CELL_IN * n)


def _new_axes(width_in: float, image_hw: tuple[int, int], top_in: float) -> tuple[Figure, Axes]:
    inner = width_in - 2 * _MARGIN_IN
    height = inner * image_hw[0] / image_hw[1]
    fig = Figure(figsize=(width_in, height + top_in + _MARGIN_IN))
    fig_h = height + top_in + _MARGIN_IN
    return fig, fig.add_axes((_MARGIN_IN / width_in, _MARGIN_IN / fig_h, inner / width_in, height / fig_h))


def _tile_centres(views: Any) -> list[float]:
    tile = _tile_px(views)
    return [k * (tile + _GAP) + (tile - 1) / 2 for k in range(len(views))]


def plot_views(views: Any, ax: Axes | None = None) -> tuple[Figure, Axes]:
    """The views in a row (global view first), each titled ``View k`` and its yaw/pitch.

    Args:
        views: a :class:`~panoviz_callback.views.ViewSet`.
        ax: the axes to draw into (None: a new figure).
    """
    row = _views_row(views)
    if ax is None:
        _, ax = _new_axes(_figure_width(len(views)), tuple(row.shape[1:]), _TITLE_IN)
    ax.imshow(_hwc(row), interpolation="nearest")
    for x, k in zip(_tile_centres(views), display_order(views)):
        ax.text(x, -2, f"View {k}\n{view_title(views.cameras[k])}", ha="center", va="bottom", fontsize=8)
    ax.set_axis_off()
    return ax.figure, ax


def plot_pca_maps(
    result: Any, level: str, ax: Axes | None = None, *, upsample: Literal["nearest", "bilinear"] = "nearest",
) -> tuple[Figure, Axes]:
    """The PCA-RGB maps of a level in :func:`display_order`.

    Grid layouts: one map per view upsampled to the view size (see :func:`upsample_pca`),
    aligned with :func:`plot_views`. Query-token layouts are drawn as they are, without a
    fake square grid: a ``V x Q`` matrix, one row of query colours per view.

    Args:
        result: an :class:`~panoviz_callback.analysis.AnalysisResult`.
        level: ``"vision_encoder"`` or ``"resampled"``.
        ax: the axes to draw into (None: a new figure).
        upsample: ``"nearest"`` (tokens stay visible) or ``"bilinear"``.
    """
    res = _level(result, level)
    row = _pca_row(result, level, upsample)
    if ax is None:
        _, ax = _new_axes(_figure_width(len(result.views)), tuple(row.shape[1:]), 0.1 if res.spatial else 0.4)
    if res.spatial:
        ax.imshow(_hwc(row), interpolation="nearest")
        ax.set_axis_off()
        return ax.figure, ax
    order = display_order(result.views)
    n_views, q = len(order), res.pca_images.shape[-1]
    ax.imshow(_hwc(row), interpolation="nearest", aspect="auto", extent=(-0.5, q - 0.5, n_views - 0.5, -0.5))
    ax.set_yticks(range(n_views), [f"View {k}" for k in order], fontsize=7)
    ax.set_xlabel(f"query token (Q = {q}; queries have no position in the view)", fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return ax.figure, ax


def plot_pca_panorama(
    result: Any, level: str, ax: Axes | None = None, *, out_hw: tuple[int, int] = _FIGURE_PANO_HW,
    upsample: Literal["nearest", "bilinear"] = "nearest", crop: bool = True,
) -> tuple[Figure, Axes]:
    """The PCA maps of all views projected back onto the sphere (equirectangular, longitude -180..180).

    Overlapping regions that agree look seamless; disagreement shows as seams.
    Uncovered areas are dark grey; with ``crop`` the latitudes no view sees are cut off.
    Query-token layouts have no panorama: the axes say so.
    """
    stitched = _stitched(result, level, out_hw, upsample)
    top, bottom = (0, out_hw[0]) if stitched is None or not crop else _covered_rows(stitched[1])
    if ax is None:
        _, ax = _new_axes(8.0, (bottom - top, out_hw[1]), 0.3)
    ax.set_axis_off()
    if stitched is None:
        ax.text(0.5, 0.5, "no PCA panorama: query tokens have no spatial position", ha="center", va="center",
                transform=ax.transAxes, fontsize=8)
        return ax.figure, ax
    h = out_hw[0]
    lat_top, lat_bottom = 90 - 180 * top / h, 90 - 180 * bottom / h
    ax.imshow(_hwc(stitched[0][:, top:bottom]), interpolation="nearest", extent=(-180, 180, lat_bottom, lat_top),
              aspect="auto")
    ax.set_title("PCA panorama: the views projected back onto the sphere (agreement is seamless, "
                 "disagreement shows as seams; grey: seen by no view)", fontsize=8)
    return ax.figure, ax


def views_figure(result: Any) -> Figure:
    """The ``original_views_NAME.png`` figure: the views in a row, global view first."""
    views = result.views
    fig, ax = _new_axes(_figure_width(len(views)), tuple(_views_row(views).shape[1:]), _TITLE_IN + 0.3)
    plot_views(views, ax)
    fig.suptitle(f"{views.strategy}: {len(views)} views, {len(views.pairs)} pairs", fontsize=9,
                 y=1 - 0.05 / fig.get_size_inches()[1], va="top")
    return fig


def pca_figure(
    result: Any, level: str, *, upsample: Literal["nearest", "bilinear"] = "nearest",
    pano_hw: tuple[int, int] = _FIGURE_PANO_HW,
) -> Figure:
    """The ``*_pca_NAME.png`` figure: views, the PCA maps aligned under them, the PCA panorama.

    Query-token levels show the ``V x Q`` colour matrix instead of the maps and no panorama.

    Args:
        result: an :class:`~panoviz_callback.analysis.AnalysisResult`.
        level: ``"vision_encoder"`` or ``"resampled"``.
        upsample: ``"nearest"`` (tokens stay visible) or ``"bilinear"``.
        pano_hw: ``(H, W)`` of the stitched PCA panorama.
    """
    res = _level(result, level)
    views = result.views
    width = _figure_width(len(views))
    inner = width - 2 * _MARGIN_IN
    views_px = _views_row(views).shape[1:]
    row_h = inner * views_px[0] / views_px[1]
    pca_h = row_h if res.spatial else min(max(0.8, 0.2 * len(views)), 3.0)
    pano_w, pano_h = 0.0, 0.0
    if res.spatial:  # the panorama spans the width, cropped to the seen latitudes, at most ~2 view rows high
        top, bottom = _covered_rows(_stitched(result, level, pano_hw, upsample)[1])
        pano_w = inner
        pano_h = pano_w * (bottom - top) / pano_hw[1]
        cap = max(2.5, 1.75 * row_h)
        if pano_h > cap:
            pano_w, pano_h = pano_w * cap / pano_h, cap
    # heights from the bottom: margin, panorama, its title, PCA row, gap, views row, view titles, suptitle
    parts = [_MARGIN_IN if res.spatial else 0.5, pano_h, 0.3 if res.spatial else 0.0, pca_h, 0.1 if res.spatial
             else 0.15, row_h, _TITLE_IN, 0.45]  # suptitle: two lines
    fig_h = sum(parts)
    fig = Figure(figsize=(width, fig_h))
    bottoms = np.cumsum([0.0, *parts[:-1]])

    def box(left_in: float, bottom_in: float, w_in: float, h_in: float) -> Axes:
        return fig.add_axes((left_in / width, bottom_in / fig_h, w_in / width, h_in / fig_h))

    plot_views(views, box(_MARGIN_IN, bottoms[5], inner, row_h))
    label_in = 0.0 if res.spatial else 0.6  # room for the "View k" tick labels of the query matrix
    plot_pca_maps(result, level, box(_MARGIN_IN + label_in, bottoms[3], inner - label_in, pca_h), upsample=upsample)
    if res.spatial:
        plot_pca_panorama(result, level, box((width - pano_w) / 2, bottoms[1], pano_w, pano_h), out_hw=pano_hw,
                          upsample=upsample)
    grid_hw = res.features.grid_hw
    layout = f"{grid_hw[0]}x{grid_hw[1]} tokens" if res.spatial else f"{res.pca_images.shape[-1]} query tokens"
    fig.suptitle(f"{level} PCA ({layout} x {res.features.tokens.shape[-1]} dims per view)\n{_masked_text(result, res)}",
                 fontsize=9, y=1 - 0.05 / fig_h, va="top")
    return fig


def _masked_text(result: Any, res: Any) -> str:
    """``PCA left out (background/outliers) per view: 0% 12% ...``, or why every token was kept."""
    share = getattr(res, "masked_share", None)
    if share is None:
        return ""
    shares = " ".join(f"{100 * share[k]:.0f}%" for k in display_order(result.views))
    note = getattr(res, "bg_note", None)
    kept = " (kept every token: not bimodal)" if note and "not bimodal" in note else ""
    return f"tokens left out of the PCA per view: {shares}{kept}"


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
    dpi: int = _DPI, pano_hw: tuple[int, int] = _FIGURE_PANO_HW,
) -> dict[str, Path]:
    """Write ``original_views_NAME.png``, ``vision_encoder_pca_NAME.png`` and, with a resampler,
    ``resampled_features_pca_NAME.png`` into ``out_dir`` (created if missing).

    Each file is at most about 2200 px wide (``dpi`` 120) and written atomically.

    Args:
        result: an :class:`~panoviz_callback.analysis.AnalysisResult`.
        out_dir: the output folder.
        name: the run name used in the file names.
        upsample: how PCA maps are enlarged to the view size: ``"nearest"`` or ``"bilinear"``.
        dpi: resolution of the PNG files.
        pano_hw: ``(H, W)`` of the stitched PCA panorama.

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
            fig = pca_figure(result, level, upsample=upsample, pano_hw=pano_hw)
            written[level] = save_figure_atomic(fig, path, dpi=dpi)
    return written


def _level(result: Any, level: str) -> Any:
    if level not in result.levels:
        raise ValueError(f"Argument `level` must be one of {tuple(result.levels)}, got {level!r}.")
    return result.levels[level]
