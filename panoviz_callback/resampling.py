"""Image resizing with the separable filters of Pillow's ``Image.resize``, in torch.

Pillow resizes by convolving each axis with a filter whose support grows with the downscaling
factor (so it antialiases): output pixel ``i`` of an axis resized from ``n`` to ``m`` pixels is
centred at input coordinate ``(i + 0.5) * n / m`` (pixel edges at integers), the weights are the
filter at ``(j + 0.5 - centre) / max(n / m, 1)`` for the input pixels ``j`` within the support,
normalised to sum to 1. The horizontal pass runs first, then the vertical one; an axis whose size
does not change is not filtered. On 8-bit images every weight is rounded to a fixed-point integer
(22 fractional bits) and every pass rounds and clips its result to ``0..255``;
``resize_images(..., quantize=True)`` reproduces that arithmetic exactly (float64 sums of integer
products, below 2**53), so it equals Pillow on ``uint8`` images bit for bit.

Pipelines that store intermediate images in 8 bits (py360convert on ``uint8`` arrays, PIL images)
are reproduced with :func:`quantize_8bit` between the steps.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import torch
from torch import Tensor

from panoviz_callback._checks import _check_choice, _check_range, _check_shape

__all__ = ["FILTERS", "resize_images", "quantize_8bit"]

#: Pillow's filters: name -> support (in input pixels at scale 1).
FILTERS = {"bilinear": 1.0, "bicubic": 2.0, "lanczos": 3.0}
_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point weights for 8-bit images
_CACHE_SIZE = 32
_CHUNK_ROWS = 256


def _kernel(name: str, x: float) -> float:
    x = abs(x)
    if name == "bilinear":
        return 1.0 - x if x < 1.0 else 0.0
    if name == "bicubic":  # Keys, a = -0.5
        a = -0.5
        if x < 1.0:
            return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        if x < 2.0:
            return (((x - 5.0) * x + 8.0) * x - 4.0) * a
        return 0.0
    if x >= 3.0:  # lanczos, a = 3
        return 0.0
    if x == 0.0:
        return 1.0
    px = math.pi * x
    return math.sin(px) / px * math.sin(px / 3.0) / (px / 3.0)


@lru_cache(maxsize=_CACHE_SIZE)
def _weights(n_in: int, n_out: int, name: str, fixed_point: bool) -> Tensor:
    """``(n_out, n_in)`` float64 weight matrix of one axis (Pillow's ``precompute_coeffs``); with
    ``fixed_point`` the weights are Pillow's integers (scaled by ``2**22``)."""
    scale = n_in / n_out
    filter_scale = max(scale, 1.0)
    support = FILTERS[name] * filter_scale
    rows = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        w = [_kernel(name, (j + 0.5 - centre) / filter_scale) for j in range(lo, hi)]
        total = sum(w)
        w = [v / total for v in w] if total != 0.0 else w
        if fixed_point:
            one = float(1 << _PRECISION_BITS)
            w = [float(int(v * one - 0.5)) if v < 0 else float(int(v * one + 0.5)) for v in w]
        rows[i, lo:hi] = torch.tensor(w, dtype=torch.float64)
    return rows


def quantize_8bit(images: Tensor) -> Tensor:
    """Round values in ``[0, 1]`` to the nearest of the 256 levels of an 8-bit image (clipped).

    Args:
        images: any shape, floating point.

    Returns:
        The same shape and dtype: ``round(clip(x, 0, 1) * 255) / 255``.
    """
    return images.clamp(0.0, 1.0).mul(255.0).round_().div_(255.0)


def _pass_8bit(x: Tensor, weights: Tensor, dim: int) -> Tensor:
    """One fixed-point pass over ``dim`` (-1 or -2) of 0..255 integer-valued float64 ``x``."""
    out = x @ weights.T if dim == -1 else weights @ x
    return torch.floor((out + float(1 << (_PRECISION_BITS - 1))) / float(1 << _PRECISION_BITS)).clamp_(0, 255)


def _levels(x: Tensor) -> Tensor:
    """``[0, 1]`` floats -> the integer levels ``0..255`` (float64) of an 8-bit image."""
    return quantize_8bit(x).mul_(255.0).round_()


def _horizontal(chunk: Tensor, wx: Tensor, quantize: bool) -> Tensor:
    x = chunk.to(torch.float64)
    return _pass_8bit(_levels(x), wx, -1) if quantize else x @ wx.T


def resize_images(
    images: Tensor,
    out_hw: tuple[int, int],
    filter: Literal["bilinear", "bicubic", "lanczos"] = "lanczos",
    *,
    quantize: bool = False,
) -> Tensor:
    """Resize images the way Pillow's ``Image.resize(size, filter)`` does.

    Args:
        images: ``(N, C, h, w)`` floating point images in ``[0, 1]``.
        out_hw: ``(H, W)`` output size.
        filter: ``"bilinear"`` | ``"bicubic"`` | ``"lanczos"`` (Pillow's ``BILINEAR``, ``BICUBIC``,
            ``LANCZOS``).
        quantize: treat the images as 8-bit (rounded to 1/255 steps first) and reproduce Pillow's
            8-bit fixed-point arithmetic exactly, rounding after each pass; otherwise float weights
            and no rounding (values may overshoot ``[0, 1]`` slightly with bicubic/lanczos).

    Returns:
        ``(N, C, H, W)`` in the input's dtype, on its device.

    Raises:
        ValueError: bad shape, size or filter.

    Example:
        >>> x = torch.rand(1, 3, 8, 8)
        >>> resize_images(x, (4, 6), "bicubic").shape
        torch.Size([1, 3, 4, 6])
        >>> bool(torch.equal(resize_images(x, (8, 8)), x))  # an unchanged size is not filtered
        True
    """
    _check_shape(images, "N C h w", "images")
    _check_choice(filter, tuple(FILTERS), "filter")
    out_h, out_w = (int(s) for s in out_hw)
    _check_range(min(out_h, out_w), "out_hw", 1)
    _, _, h, w = images.shape
    dtype = images.dtype
    if w != out_w:  # in row chunks: a large panorama is never copied whole in float64
        wx = _weights(w, out_w, filter, quantize).to(images.device)
        x = torch.cat([_horizontal(chunk, wx, quantize) for chunk in images.split(_CHUNK_ROWS, dim=2)], dim=2)
    else:
        x = _levels(images.to(torch.float64)) if quantize else images.to(torch.float64)
    if h != out_h:
        wy = _weights(h, out_h, filter, quantize).to(images.device)
        x = _pass_8bit(x, wy, -2) if quantize else wy @ x
    if quantize:
        x = x / 255.0
    return x.to(dtype)
