"""Which tokens / pixels of two views see the same scene point, warps between views, stitching.

Everything goes through the sphere with the cameras of a :class:`~panoviz_callback.views.ViewSet`
(see the ``Convention:`` block of :mod:`panoviz_callback.projection`). Images of any resolution
``h x w`` that cover a view (a token grid, a PCA image) map to view pixels by
``x_view = (x_img + 0.5) * S / w - 0.5``. Geometry (indices, grids, masks) is cached per
(cameras, sizes, device, dtype); the sampling is one batched ``grid_sample`` on the images' device.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from panoviz_callback._checks import _check_choice, _check_int, _check_range, _check_shape
from panoviz_callback.projection import direction_to_pixel, lonlat_to_direction, pixel_to_direction

if TYPE_CHECKING:
    from panoviz_callback.views import Camera, ViewSet

__all__ = ["patch_correspondence", "warp_pairs", "stitch_equirect"]

_MODES = ("bilinear", "nearest")
_CACHE_SIZE = 64
_TIE = 1e-9  # token units: a centre this close below a cell boundary lies on it (float64 error is ~1e-12)


def _image_xy(h: int, w: int, size: int) -> Tensor:
    """View pixel coordinates ``(h * w, 2)`` of the pixel centres of an ``h x w`` image of a view."""
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) * size / w - 0.5
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) * size / h - 0.5
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)  # row-major


def _facing(dirs: Tensor, cam: Camera) -> Tensor:
    """``(N,)`` bool: in front of a perspective camera (any direction for the other kinds)."""
    if cam.kind not in ("tile", "face"):
        return torch.ones(dirs.shape[0], dtype=torch.bool)
    forward = lonlat_to_direction(torch.tensor(cam.yaw_deg, dtype=torch.float64),
                                  torch.tensor(cam.pitch_deg, dtype=torch.float64))
    return dirs @ forward > 1e-9


@lru_cache(maxsize=_CACHE_SIZE)
def _correspondence(cam_i: Camera, cam_j: Camera, size: int, gh: int, gw: int) -> tuple[Tensor, Tensor]:
    dirs, valid = pixel_to_direction(_image_xy(gh, gw, size), cam_i, size)  # (N, 3) float64
    xy, _ = direction_to_pixel(dirs, cam_j, size)  # (N, 2)
    u = (xy[:, 0] + 0.5) * gw / size + _TIE  # token coordinates of view j; cell k is [k, k + 1)
    v = (xy[:, 1] + 0.5) * gh / size + _TIE
    keep = valid & _facing(dirs, cam_j) & (u >= 0) & (u < gw) & (v >= 0) & (v < gh)
    tx = u.floor().long().clamp(0, gw - 1)
    ty = v.floor().long().clamp(0, gh - 1)
    return torch.nonzero(keep).squeeze(1), (ty * gw + tx)[keep]


def _check_grid(grid_hw: Sequence[int]) -> tuple[int, int]:
    if len(grid_hw) != 2:
        raise ValueError(f"Expected `grid_hw` of shape (gh, gw), got {tuple(grid_hw)}.")
    gh, gw = (int(g) for g in grid_hw)
    _check_range(min(gh, gw), "grid_hw", 1)
    return gh, gw


def patch_correspondence(
    views: ViewSet, i: int, j: int, grid_hw: tuple[int, int], *, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Token pairs of views ``i`` and ``j`` that look at the same scene point.

    The centre of every token of view ``i`` is reprojected through the sphere into view ``j``;
    the token of view ``j`` whose cell contains it is its partner. Several tokens of ``i`` may
    share a partner. Tokens in the letterbox bars of a global view ``i`` are skipped. Cached per
    (cameras, image size, grid).

    Tie rule (exact and deterministic on every grid): in token coordinates of view ``j``,
    ``u = (x + 0.5) * gw / S`` (likewise ``v`` for rows), cell ``k`` is the half-open interval
    ``[k, k + 1)`` and view ``j`` covers ``[0, gw) x [0, gh)``, i.e. its pixel extent
    ``[-0.5, S - 0.5)`` (for a perspective view also: in front of the camera). A centre that
    lands on a boundary belongs to the cell above it (the larger index), and one on the far
    edge ``u = gw`` is outside. Geometry runs in float64 (errors ~1e-12 token); a coordinate
    within 1e-9 token below an integer is taken as on it, so float rounding never decides. Thus a
    sliding window whose shift is 13.5 tokens (27 x 27 grid) maps every token by exactly 13
    columns, and an e2p token whose centre lands on the edge pixel centre of the neighbour
    (``x = 0``) keeps its partner in the edge column. Cube faces still have no correspondence on
    token grids coarser than the pixels: token centres lie well inside their own face.

    Args:
        views: the :class:`~panoviz_callback.views.ViewSet` (only cameras and image size are used).
        i: index of the first view.
        j: index of the second view.
        grid_hw: ``(gh, gw)`` token grid of both views.
        device: where the indices go (default CPU).

    Returns:
        ``(idx_i, idx_j)``: LongTensors ``(M,)`` of row-major token indices; may be empty.

    Example:
        >>> from panoviz_callback.views import make_views
        >>> vs = make_views(torch.rand(3, 64, 128), "sliding_window", image_size=28, patch_size=2)
        >>> idx_i, idx_j = patch_correspondence(vs, 0, 1, (14, 14))
        >>> idx_i[:3].tolist(), idx_j[:3].tolist()
        ([7, 8, 9], [0, 1, 2])
    """
    _check_int(i, "i", 0, len(views) - 1)
    _check_int(j, "j", 0, len(views) - 1)
    gh, gw = _check_grid(grid_hw)
    idx_i, idx_j = _correspondence(views.cameras[i], views.cameras[j], int(views.image_size), gh, gw)
    return idx_i.to(device, copy=True), idx_j.to(device, copy=True)


@lru_cache(maxsize=_CACHE_SIZE)
def _warp_grid(
    cams_i: tuple[Camera, ...], cams_j: tuple[Camera, ...], size: int, h: int, w: int, device: str, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    dirs, valid = pixel_to_direction(_image_xy(h, w, size).unsqueeze(0), list(cams_i), size)  # (P, h*w, 3)
    xy, inside = direction_to_pixel(dirs, list(cams_j), size)  # (P, h*w, 2)
    grid = ((xy + 0.5) / size * 2 - 1).reshape(len(cams_i), h, w, 2)  # same for any image resolution
    grid = torch.where(torch.isfinite(grid), grid, torch.full_like(grid, -2.0)).clamp(-2, 2)
    mask = (valid & inside).reshape(len(cams_i), h, w)
    dev = torch.device(device)
    return grid.to(dev, dtype), mask.to(dev)


def _check_images(images: Tensor, views: ViewSet) -> None:
    _check_shape(images, "V C h w", "images")
    if images.shape[0] != len(views):
        raise ValueError(f"Expected `images` to hold one image per view ({len(views)}), got {images.shape[0]}.")
    if not images.is_floating_point():
        raise TypeError(f"Expected `images` to be a floating point tensor, got {images.dtype}.")


def warp_pairs(
    images: Tensor,
    views: ViewSet,
    pairs: Sequence[tuple[int, int]] | None = None,
    *,
    mode: Literal["bilinear", "nearest"] = "bilinear",
) -> tuple[Tensor, Tensor]:
    """Resample view ``j``'s image into view ``i``'s frame for every pair ``(i, j)``.

    Args:
        images: ``(V, C, h, w)`` one image per view at any resolution covering the view (the view
            pixels, a ``gh x gw`` PCA image, ...).
        views: the :class:`~panoviz_callback.views.ViewSet` the images belong to.
        pairs: ``P`` pairs ``(i, j)``; default ``views.pairs``.
        mode: ``"bilinear"`` (default) or ``"nearest"`` (keeps token blocks of a PCA image).

    Returns:
        ``(warped, mask)``: ``warped`` ``(P, C, h, w)`` is image ``j`` seen from view ``i`` (zero
        outside the mask), ``mask`` ``(P, h, w)`` bool marks pixels of view ``i`` that see a point
        strictly inside view ``j``.

    Example:
        >>> from panoviz_callback.views import make_views
        >>> vs = make_views(torch.rand(3, 64, 128), "e2p", image_size=32)
        >>> warped, mask = warp_pairs(vs.pixels, vs)
        >>> warped.shape, mask.shape
        (torch.Size([8, 3, 32, 32]), torch.Size([8, 32, 32]))
    """
    _check_images(images, views)
    _check_choice(mode, _MODES, "mode")
    pairs = list(views.pairs if pairs is None else pairs)
    for i, j in pairs:
        _check_int(i, "pairs", 0, len(views) - 1)
        _check_int(j, "pairs", 0, len(views) - 1)
    v, c, h, w = images.shape
    if not pairs:
        return images.new_zeros(0, c, h, w), torch.zeros(0, h, w, dtype=torch.bool, device=images.device)
    cams_i = tuple(views.cameras[i] for i, _ in pairs)
    cams_j = tuple(views.cameras[j] for _, j in pairs)
    grid, mask = _warp_grid(cams_i, cams_j, int(views.image_size), h, w, str(images.device), images.dtype)
    src = images[[j for _, j in pairs]]  # (P, C, h, w)
    warped = F.grid_sample(src, grid, mode=mode, padding_mode="border", align_corners=False)
    return warped * mask.unsqueeze(1), mask


@lru_cache(maxsize=_CACHE_SIZE)
def _stitch_grid(
    cams: tuple[Camera, ...], size: int, h: int, w: int, out_h: int, out_w: int, device: str, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    lon = ((torch.arange(out_w, dtype=torch.float64) + 0.5) / out_w - 0.5) * 360
    lat = (0.5 - (torch.arange(out_h, dtype=torch.float64) + 0.5) / out_h) * 180
    dirs = lonlat_to_direction(*torch.meshgrid(lon, lat, indexing="xy")).reshape(-1, 3)  # (H*W, 3)
    best = torch.full((dirs.shape[0],), -2.0, dtype=torch.float64)
    choice = torch.full((dirs.shape[0],), -1, dtype=torch.long)
    best_xy = torch.zeros(dirs.shape[0], 2, dtype=torch.float64)
    for k, cam in enumerate(cams):  # a loop over views; every step is vectorised over ERP pixels
        if cam.kind == "global":
            continue
        xy, inside = direction_to_pixel(dirs, cam, size)
        centre = lonlat_to_direction(torch.tensor(cam.yaw_deg, dtype=torch.float64),
                                     torch.tensor(cam.pitch_deg, dtype=torch.float64))
        score = torch.where(inside, dirs @ centre, torch.full_like(best, -3.0))
        better = score > best
        best = torch.where(better, score, best)
        choice = torch.where(better, k, choice)
        best_xy = torch.where(better.unsqueeze(-1), xy, best_xy)
    covered = choice >= 0
    x_img = ((best_xy[:, 0] + 0.5) * w / size - 0.5).clamp(0, w - 1)
    y_img = ((best_xy[:, 1] + 0.5) * h / size - 0.5).clamp(0, h - 1) + choice.clamp(min=0) * h  # atlas row
    grid = torch.stack([(x_img + 0.5) / w * 2 - 1, (y_img + 0.5) / (len(cams) * h) * 2 - 1], dim=-1)
    dev = torch.device(device)
    return grid.reshape(1, out_h, out_w, 2).to(dev, dtype), covered.reshape(out_h, out_w).to(dev)


def stitch_equirect(
    images: Tensor,
    views: ViewSet,
    out_hw: tuple[int, int] = (512, 1024),
    *,
    mode: Literal["bilinear", "nearest"] = "bilinear",
) -> tuple[Tensor, Tensor]:
    """Project every view's image back onto the sphere as one equirectangular image.

    Each ERP pixel takes the colour of the non-global view that sees it (strictly inside its field
    of view) with the view centre closest in angle, so disagreement between overlapping views
    shows as seams.

    Args:
        images: ``(V, C, h, w)`` one image per view at any resolution covering the view.
        views: the :class:`~panoviz_callback.views.ViewSet` the images belong to.
        out_hw: ``(H, W)`` of the output panorama.
        mode: ``"bilinear"`` (default) or ``"nearest"`` within each view's image.

    Returns:
        ``(pano, covered)``: ``pano`` ``(C, H, W)`` (zero where no view sees the pixel) and
        ``covered`` ``(H, W)`` bool.

    Example:
        >>> from panoviz_callback.views import make_views
        >>> vs = make_views(torch.rand(3, 64, 128), "cubemap", image_size=32, faces=6)
        >>> pano, covered = stitch_equirect(vs.pixels, vs, (32, 64))
        >>> pano.shape, bool(covered.all())
        (torch.Size([3, 32, 64]), True)
    """
    _check_images(images, views)
    _check_choice(mode, _MODES, "mode")
    out_h, out_w = (int(s) for s in out_hw)
    _check_range(min(out_h, out_w), "out_hw", 1)
    v, c, h, w = images.shape
    grid, covered = _stitch_grid(
        tuple(views.cameras), int(views.image_size), h, w, out_h, out_w, str(images.device), images.dtype
    )
    atlas = images.transpose(0, 1).reshape(1, c, v * h, w)  # views stacked vertically
    pano = F.grid_sample(atlas, grid, mode=mode, padding_mode="border", align_corners=False)[0]  # (C, H, W)
    return pano * covered, covered
