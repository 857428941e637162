"""Labelled images for loggers: every picture says which level, view, direction and step it shows.

TensorBoard's default image card and a W&B media panel show an image about 350-500 px
wide. The images here are composed for that size: views in a grid (at most 4 columns,
tiles of 160 px) instead of one long strip, a caption over every tile (``View k`` and its
yaw / pitch, or ``global view``), and a header band with the level, the global step and
the epoch. Text is drawn with Pillow in DejaVu Sans (shipped with matplotlib; no pyplot
import, no figure), so composing an image costs a few milliseconds at each firing.

All functions return ``(3, H, W)`` uint8 tensors on the CPU.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TILE_PX",
    "LEVEL_TITLES",
    "view_caption",
    "grid_columns",
    "stamp",
    "labelled_grid",
    "views_image",
    "pca_image",
    "panorama_image",
    "query_matrix_image",
]

#: Side of one view tile in pixels.
TILE_PX = 160
#: What each level is called in titles and captions.
LEVEL_TITLES = {"vision_encoder": "vision encoder", "resampled": "resampled features"}
_MAX_COLUMNS = 4
_GAP = 6
_CAPTION_PX = 15
_HEADER_PX = 16
_PAD = 4
_BG = 255  # white bands
_FG = (20, 20, 20)
_MUTED = (90, 90, 90)


@functools.lru_cache(maxsize=8)
def _font(size: int, bold: bool = False) -> Any:
    """DejaVu Sans at ``size`` px from matplotlib's data folder (Pillow's default font as a fallback)."""
    from PIL import ImageFont

    try:
        import matplotlib

        name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
        return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size=size)


def view_caption(camera: Any, index: int) -> tuple[str, str]:
    """The two caption lines of a view: ``("View 3", "yaw 135° pitch 0°")`` (``"global view"`` for anyres)."""
    if camera.kind == "global":
        return f"View {index}", "global view"
    return f"View {index}", f"yaw {camera.yaw_deg:g}° pitch {camera.pitch_deg:g}°"


def grid_columns(n: int) -> int:
    """Columns of a grid of ``n`` tiles: about square, at most 4 (8 views: 3 x 3; 4 views: 2 x 2)."""
    return max(1, min(_MAX_COLUMNS, n, math.ceil(math.sqrt(n))))


def stamp(step: int | None, epoch: int | None) -> str:
    """``"step 96 · epoch 2"`` (parts that are None are left out)."""
    parts = ([] if step is None else [f"step {step}"]) + ([] if epoch is None else [f"epoch {epoch}"])
    return " · ".join(parts)


def _line_px(size: int) -> int:
    return size + 5


def _to_pil(image: Tensor) -> Any:
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))


def _from_pil(image: Any) -> Tensor:
    return _chw(np.asarray(image))


def _chw(array: np.ndarray) -> Tensor:
    """An ``(H, W, 3)`` uint8 array as a ``(3, H, W)`` tensor (a view of a private copy; no reordering copy)."""
    return torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1)


def _uint8(image: Tensor) -> Tensor:
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def _fit(draw: Any, text: str, font: Any, width: int) -> str:
    """``text`` shortened with an ellipsis so that it fits ``width`` pixels."""
    if width <= 0 or draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def labelled_grid(
    tiles: Tensor, captions: Sequence[Sequence[str]], title: Sequence[str], *, columns: int | None = None,
    draw_text: bool = True,
) -> Tensor:
    """Tiles in a grid, each under its caption lines, below a title band.

    Args:
        tiles: ``(V, 3, h, w)`` float in ``[0, 1]`` (or uint8), in display order.
        captions: one sequence of caption lines per tile.
        title: the header lines (the first in bold).
        columns: tiles per row (None: :func:`grid_columns`).
        draw_text: draw the text (False leaves the bands blank: the same layout without labels).

    Returns:
        ``(3, H, W)`` uint8.
    """
    n, _, h, w = tiles.shape
    cols = columns or grid_columns(n)
    rows = math.ceil(n / cols)
    cap_lines = max((len(c) for c in captions), default=0)
    cap_h = cap_lines * _line_px(_CAPTION_PX) + (_PAD if cap_lines else 0)
    head_h = len(title) * _line_px(_HEADER_PX) + 2 * _PAD
    cell_w, cell_h = w + _GAP, h + cap_h + _GAP
    width = cols * cell_w - _GAP + 2 * _PAD
    height = head_h + rows * cell_h
    pixels = tiles if tiles.dtype == torch.uint8 else _uint8(tiles)
    pixels = pixels.cpu().permute(0, 2, 3, 1).numpy()  # (V, h, w, 3)
    canvas = np.full((height, width, 3), _BG, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        y, x = head_h + r * cell_h + cap_h, _PAD + c * cell_w
        canvas[y:y + h, x:x + w] = pixels[k]
    if not draw_text:
        return _chw(canvas)
    from PIL import Image, ImageDraw

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    y = _PAD
    for i, line in enumerate(title):
        font = _font(_HEADER_PX, bold=i == 0)
        draw.text((_PAD, y), _fit(draw, line, font, width - 2 * _PAD), fill=_FG if i == 0 else _MUTED, font=font)
        y += _line_px(_HEADER_PX)
    mask = _caption_mask(tuple(tuple(c) for c in captions), cols, w, cell_w, cell_h, head_h, image.size)
    image.paste(_FG, (0, 0, *image.size), mask)  # the captions repeat every firing: drawn once, then pasted
    return _from_pil(image)


@functools.lru_cache(maxsize=32)
def _caption_mask(captions: tuple[tuple[str, ...], ...], cols: int, w: int, cell_w: int, cell_h: int, head_h: int,
                  size: tuple[int, int]) -> Any:
    """The caption text of a grid as an ``L`` mask of the whole image (cached: the views never change)."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for k, lines in enumerate(captions):
        r, c = divmod(k, cols)
        y, x = head_h + r * cell_h, _PAD + c * cell_w
        for i, line in enumerate(lines):
            font = _font(_CAPTION_PX, bold=i == 0)
            draw.text((x, y + i * _line_px(_CAPTION_PX)), _fit(draw, line, font, w), fill=255, font=font)
    return mask


def _resize(images: Tensor, size: int, mode: str) -> Tensor:
    images = images.detach().float().cpu()
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    if mode == "nearest":
        return F.interpolate(images, size=(size, size), mode="nearest-exact")
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def _order(views: Any) -> list[int]:
    from panoviz_callback.render import display_order

    return display_order(views)


def views_image(result: Any, *, step: int | None = None, epoch: int | None = None, draw_text: bool = True) -> Tensor:
    """The probe's views in a labelled grid (global view first).

    Args:
        result: an :class:`~panoviz_callback.analysis.AnalysisResult`.
        step: the global step named in the title.
        epoch: the epoch named in the title.
        draw_text: draw the labels.
    """
    views = result.views
    order = _order(views)
    tiles = _resize(views.pixels[order], TILE_PX, "bilinear")
    captions = [view_caption(views.cameras[k], k) for k in order]
    title = [f"probe views · {views.strategy}, {len(views)} views of {views.image_size} px",
             stamp(step, epoch) or "the views every PCA map below is aligned with"]
    return labelled_grid(tiles, captions, title, draw_text=draw_text)


def pca_image(result: Any, level: str, *, step: int | None = None, epoch: int | None = None,
              draw_text: bool = True) -> Tensor:
    """The PCA-RGB maps of ``level`` in a labelled grid (query layouts: :func:`query_matrix_image`).

    Tiles are the token maps enlarged with nearest neighbours (one block per token), in the
    same grid positions as :func:`views_image`.
    """
    res = result.levels[level]
    if not res.spatial:
        return query_matrix_image(result, level, step=step, epoch=epoch, draw_text=draw_text)
    views = result.views
    order = _order(views)
    tiles = _resize(res.pca_images[order], TILE_PX, "nearest")
    gh, gw = res.features.grid_hw
    captions = [view_caption(views.cameras[k], k) for k in order]
    title = [f"{LEVEL_TITLES.get(level, level)} PCA · {stamp(step, epoch)}".rstrip(" ·"),
             f"{gh}x{gw} tokens x {res.features.tokens.shape[-1]} dims · same colour = same feature"]
    return labelled_grid(tiles, captions, title, draw_text=draw_text)


def query_matrix_image(result: Any, level: str, *, step: int | None = None, epoch: int | None = None,
                       draw_text: bool = True) -> Tensor:
    """A query-token level as a ``V x Q`` colour matrix, one labelled row per view.

    Query tokens have no position in the view, so they are drawn as they are: row ``k`` holds
    the PCA colours of view ``k``'s ``Q`` queries.
    """
    res = result.levels[level]
    views = result.views
    order = _order(views)
    strips = res.pca_images.detach().float().cpu()[order, :, 0, :]  # (V, 3, Q)
    n, q = strips.shape[0], strips.shape[-1]
    cell = max(4, min(32, 480 // q))
    label_w = 70
    matrix = F.interpolate(strips.permute(1, 0, 2)[None], size=(n * cell, q * cell), mode="nearest")[0]
    head_h = 2 * _line_px(_HEADER_PX) + 2 * _PAD
    width = max(label_w + q * cell + _PAD, 360)
    canvas = torch.ones(3, head_h + n * cell + _PAD, width)
    canvas[:, head_h:head_h + n * cell, label_w:label_w + q * cell] = matrix
    out = _uint8(canvas)
    if not draw_text:
        return out
    from PIL import ImageDraw

    image = _to_pil(out)
    draw = ImageDraw.Draw(image)
    title = [f"{LEVEL_TITLES.get(level, level)} PCA · {stamp(step, epoch)}".rstrip(" ·"),
             f"{q} query tokens per view (no position in the view): one row per view"]
    for i, line in enumerate(title):
        font = _font(_HEADER_PX, bold=i == 0)
        draw.text((_PAD, _PAD + i * _line_px(_HEADER_PX)), _fit(draw, line, font, width - 2 * _PAD),
                  fill=_FG if i == 0 else _MUTED, font=font)
    font = _font(min(_CAPTION_PX, max(8, cell - 2)))
    for row, k in enumerate(order):
        draw.text((_PAD, head_h + row * cell + max(0, (cell - font.size) // 2) - 1), f"View {k}", fill=_FG,
                  font=font)
    return _from_pil(image)


def panorama_image(result: Any, level: str, *, step: int | None = None, epoch: int | None = None,
                   out_hw: tuple[int, int] = (256, 512), draw_text: bool = True) -> Tensor | None:
    """The stitched PCA panorama of ``level`` with a title and the view indices at their yaws.

    Returns:
        ``(3, H, W)`` uint8, or None for a query-token level (no panorama).
    """
    from panoviz_callback.render import pca_panorama_image

    pano = pca_panorama_image(result, level, out_hw=out_hw)
    if pano is None:
        return None
    _, h, w = pano.shape
    head_h = 2 * _line_px(_HEADER_PX) + 2 * _PAD
    foot_h = _line_px(_CAPTION_PX) + 6
    canvas = torch.full((3, head_h + h + foot_h, w), _BG, dtype=torch.uint8)
    canvas[:, head_h:head_h + h] = pano
    if not draw_text:
        return canvas
    from PIL import ImageDraw

    image = _to_pil(canvas)
    draw = ImageDraw.Draw(image)
    title = [f"{LEVEL_TITLES.get(level, level)} PCA panorama · {stamp(step, epoch)}".rstrip(" ·"),
             "seams = views disagree · under it: view index at its yaw"]
    for i, line in enumerate(title):
        font = _font(_HEADER_PX, bold=i == 0)
        draw.text((_PAD, _PAD + i * _line_px(_HEADER_PX)), _fit(draw, line, font, w - 2 * _PAD),
                  fill=_FG if i == 0 else _MUTED, font=font)
    font = _font(_CAPTION_PX)
    y = head_h + h
    at_yaw: dict[float, list[str]] = {}
    for k, camera in enumerate(result.views.cameras):  # view indices under their centre longitude
        if camera.kind != "global":
            at_yaw.setdefault(round(float(camera.yaw_deg) % 360.0, 3), []).append(str(k))
    for yaw, names in at_yaw.items():
        x = (yaw + 180.0) % 360.0 / 360.0 * w  # lon = ((x + 0.5) / W - 0.5) * 360, in drawing coordinates
        label = ",".join(names)
        draw.line([(x, y), (x, y + 4)], fill=_FG, width=1)
        left = min(max(0.0, x - draw.textlength(label, font=font) / 2), w - draw.textlength(label, font=font))
        draw.text((left, y + 4), label, fill=_FG, font=font)
    return _from_pil(image)
