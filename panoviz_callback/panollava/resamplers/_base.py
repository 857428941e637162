"""Shared pieces of the PanoLLaVA resamplers: the base class, grid arithmetic and the MLP head."""

from __future__ import annotations

import math
from typing import Literal

from torch import nn

__all__ = ["PanoResampler", "_TokenWise", "_square_grid", "_factor_grid", "_proj_stack", "_aligned"]


class PanoResampler(nn.Module):
    """Base of every PanoLLaVA resampler: ``(V, N, in_dim) -> (V, M, out_dim)``.

    The input is every token the encoder returns, prefix tokens (CLS, registers) included,
    exactly as PanoLLaVA feeds them.

    Attributes:
        in_dim: encoder feature size ``D``.
        out_dim: output feature size (PanoLLaVA's ``latent_dimension``).
        layout: ``"grid"`` when the output tokens can lie on a spatial grid (see
            :meth:`output_grid`), ``"queries"`` for learned queries.
        output_layout: the same value, the name :func:`panoviz_callback.features.apply_resampler` reads.
    """

    layout: Literal["grid", "queries"] = "grid"

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)

    @property
    def output_layout(self) -> str:
        return self.layout

    def output_grid(self, grid_hw: tuple[int, int], num_prefix_tokens: int = 0) -> tuple[int, int] | None:
        """The grid of the output tokens for an encoder grid, or ``None`` when they lie on none.

        Token-wise resamplers return ``grid_hw``: their output keeps the ``num_prefix_tokens``
        prefix tokens first, then ``gh * gw`` tokens in raster order.

        Args:
            grid_hw: the encoder's patch grid ``(gh, gw)``.
            num_prefix_tokens: CLS / register tokens in front of the patch tokens.

        Returns:
            ``(gh', gw')`` or ``None``.
        """
        return None if self.layout == "queries" else (int(grid_hw[0]), int(grid_hw[1]))

    def output_prefix_tokens(self, num_prefix_tokens: int) -> int:
        """How many leading output tokens are the prefix tokens passed through (token-wise resamplers)."""
        return 0


class _TokenWise(PanoResampler):
    """A resampler whose output token ``i`` belongs to input token ``i``."""

    def output_prefix_tokens(self, num_prefix_tokens: int) -> int:
        return int(num_prefix_tokens)


def _square_grid(seq: int) -> tuple[int, int]:
    """PanoLLaVA's spatial_pool / conv grid for ``seq`` tokens: ``H = W = ceil(sqrt)``-ish, zero-padded.

    ``spatial_pool``: ``H = W = isqrt(seq)``; if ``H * W < seq``: ``H += 1``, ``W = ceil(seq / H)``.
    """
    h = w = int(math.sqrt(seq))
    if h * w < seq:
        h += 1
        w = (seq + h - 1) // h
    return h, w


def _factor_grid(seq: int) -> tuple[int, int]:
    """PanoLLaVA's c_abstractor grid: the square, else the factor pair ``h * w == seq`` with ``h <= sqrt``."""
    root = math.isqrt(seq)
    for h in range(root, 0, -1):
        if seq % h == 0:
            return h, seq // h
    return 1, seq


def _proj_stack(in_dim: int, out_dim: int, depth: int) -> nn.Module:
    """The projection of spatial_pool / masked_drop: ``depth`` Linear layers, LN + GELU between.

    Hidden width ``max(in_dim, out_dim)``; ``depth == 0`` is a single bare ``Linear`` (key ``proj.weight``).
    """
    if depth <= 0:
        return nn.Linear(in_dim, out_dim)
    hidden = max(in_dim, out_dim)
    layers: list[nn.Module] = []
    width = in_dim
    for i in range(depth):
        last = i == depth - 1
        nxt = out_dim if last else hidden
        layers.append(nn.Linear(width, nxt))
        if not last:
            layers += [nn.LayerNorm(nxt), nn.GELU()]
        width = nxt
    return nn.Sequential(*layers)


def _aligned(seq_grid: tuple[int, int], grid_hw: tuple[int, int], num_prefix_tokens: int) -> bool:
    """Whether PanoLLaVA's reshape of the token sequence coincides with the encoder's patch grid."""
    return num_prefix_tokens == 0 and tuple(seq_grid) == (int(grid_hw[0]), int(grid_hw[1]))
