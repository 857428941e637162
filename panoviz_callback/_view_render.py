"""The pixels of a view set: the rendering pipelines behind ``make_views`` options.

Plain options render every view directly from the panorama (:func:`projection.sample_views`).
The options that reproduce a training pipeline render the way that pipeline did, step by step:

- ``central_crop_ratio`` (e2p): each tile rendered at ``S x S``, ``int(S * (1 - ratio) / 2)`` rows
  cut off the top and the bottom, the rest resized back to ``S x S`` with ``resample``.
- ``tile_render_size`` (anyres_e2p): each tile rendered at ``R x R`` and resized to ``S x S`` by
  bilinear interpolation without antialiasing (``F.interpolate(..., align_corners=False)``).
- ``global_render_size`` (anyres_e2p): the ERP resized with Pillow's bicubic filter so that its
  longest side is ``G`` (``round`` of the scaled sides), pasted centred on a black ``G x G``
  square, resized to ``S x S`` by bilinear interpolation without antialiasing.
- ``resample`` (e2p crop, sliding windows): ``"bilinear"`` (torch, antialiased) or Pillow's
  ``"bicubic"`` / ``"lanczos"`` filters (:func:`resampling.resize_images`).
- ``quantize``: every step that an 8-bit pipeline stores as ``uint8`` (the panorama, a rendered
  tile, a Pillow resize) is rounded to 1/255 steps; bilinear ``F.interpolate`` results are not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from panoviz_callback.projection import _window_crops, erp_to_perspective, sample_views
from panoviz_callback.resampling import quantize_8bit, resize_images

__all__ = ["render_views", "crop_rows", "cropped_vfov", "render_size_fov", "letterbox_box"]


def crop_rows(size: int, ratio: float) -> int:
    """Rows cut off the top (and the bottom) of a ``size``-pixel view kept at ``ratio``."""
    return int(size * (1.0 - ratio) / 2)


def cropped_vfov(fov_deg: float, size: int, ratio: float) -> float:
    """Vertical FoV (degrees) of a ``size x size`` perspective view of horizontal FoV ``fov_deg``
    with :func:`crop_rows` rows cut top and bottom and stretched back to ``size`` rows.

    Output row ``y`` samples input row ``(y + 0.5) * (size - 2 cut) / size - 0.5 + cut``; the tangent
    is linear in that row, so the result is a perspective camera with
    ``tan(vfov / 2) = tan(fov / 2) * (size - 2 cut) / size``.
    """
    cut = crop_rows(size, ratio)
    return math.degrees(2 * math.atan(math.tan(math.radians(fov_deg) / 2) * (size - 2 * cut) / size))


def render_size_fov(fov_deg: float, render_size: int, size: int) -> float:
    """FoV (degrees) of a perspective view rendered at ``render_size`` and resized to ``size`` with
    ``align_corners=False``: ``tan(fov' / 2) = tan(fov / 2) * R (S - 1) / (S (R - 1))``."""
    r, s = render_size, size
    return math.degrees(2 * math.atan(math.tan(math.radians(fov_deg) / 2) * r * (s - 1) / (s * (r - 1))))


def letterbox_box(erp_h: int, erp_w: int, size: int) -> tuple[int, int, int, int]:
    """``(left, top, width, height)`` of an ``erp_h x erp_w`` image letterboxed into a
    ``size x size`` square (longest side to ``size``, Python ``round`` of the scaled sides)."""
    scale = size / max(erp_w, erp_h)
    nw, nh = int(round(erp_w * scale)), int(round(erp_h * scale))
    return (size - nw) // 2, (size - nh) // 2, nw, nh


def _resize(images: Tensor, size: int, resample: str, quantize: bool) -> Tensor:
    if resample == "bilinear" and not quantize:
        return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resize_images(images, (size, size), resample, quantize=quantize)


def _perspective(pano: Tensor, cameras: Sequence[Any], size: int, opts: dict[str, Any]) -> Tensor:
    """``(V', 3, S, S)`` pixels of the perspective cameras (all tiles or all faces)."""
    q = quantize_8bit if opts.get("quantize") else (lambda t: t)
    yaws = [c.yaw_deg for c in cameras]
    pitches = [c.pitch_deg for c in cameras]
    ratio = opts.get("central_crop_ratio")
    render = opts.get("tile_render_size")
    if ratio is not None:
        cut = crop_rows(size, ratio)
        img = q(erp_to_perspective(pano, yaws, pitches, opts["fov_deg"], (size, size)))  # (V', 3, S, S)
        if cut == 0:
            return img
        return _resize(img[:, :, cut:size - cut], size, opts.get("resample", "bilinear"), bool(opts.get("quantize")))
    if render is not None:
        img = q(erp_to_perspective(pano, yaws, pitches, opts["fov_deg"], (render, render)))  # (V', 3, R, R)
        return F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return q(sample_views(pano, list(cameras), size))


def _global(pano: Tensor, size: int, opts: dict[str, Any]) -> Tensor:
    """``(3, S, S)`` letterboxed global view rendered at ``global_render_size``."""
    g = opts["global_render_size"]
    _, erp_h, erp_w = pano.shape
    left, top, nw, nh = letterbox_box(erp_h, erp_w, g)
    canvas = pano.new_zeros(1, 3, g, g)
    canvas[:, :, top:top + nh, left:left + nw] = resize_images(
        pano.unsqueeze(0), (nh, nw), "bicubic", quantize=bool(opts.get("quantize"))
    )
    return F.interpolate(canvas, size=(size, size), mode="bilinear", align_corners=False, antialias=False)[0]


def render_views(pano: Tensor, cameras: Sequence[Any], size: int, opts: dict[str, Any]) -> Tensor:
    """Render the views of ``cameras`` from ``pano (3, H, W)`` with the resolved strategy options.

    Args:
        pano: ``(3, H, W)`` float panorama in ``[0, 1]``.
        cameras: ``V`` cameras as built by ``make_views`` for ``opts``.
        size: ``S``.
        opts: the resolved strategy options (see the module docstring).

    Returns:
        ``(V, 3, S, S)`` float32, clamped to ``[0, 1]``.
    """
    plain = not any(opts.get(k) for k in ("quantize", "central_crop_ratio", "tile_render_size", "global_render_size"))
    if plain and opts.get("resample", "bilinear") == "bilinear":
        return sample_views(pano, list(cameras), size).clamp_(0.0, 1.0)
    if opts.get("quantize"):
        pano = quantize_8bit(pano)
    out = pano.new_zeros(len(cameras), 3, size, size)
    persp = [k for k, c in enumerate(cameras) if c.kind in ("tile", "face")]
    if persp:
        out[persp] = _perspective(pano, [cameras[k] for k in persp], size, opts)
    for members, crop in _window_crops(pano, cameras):
        out[members] = _resize(crop, size, opts.get("resample", "bilinear"), bool(opts.get("quantize")))
    glob = [k for k, c in enumerate(cameras) if c.kind == "global"]
    if glob:
        if opts.get("global_render_size"):
            out[glob] = _global(pano, size, opts)
        else:
            view = sample_views(pano, [cameras[glob[0]]], size)
            out[glob] = quantize_8bit(view) if opts.get("quantize") else view
    return out.clamp_(0.0, 1.0)
