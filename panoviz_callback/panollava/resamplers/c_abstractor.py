"""PanoLLaVA's ``c_abstractor`` resampler (HEAD): depthwise conv + squeeze-excitation blocks on the token grid."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from panoviz_callback.panollava.resamplers._base import (
    PanoResampler,
    _aligned,
    _factor_grid,
)

__all__ = ["CAbstractorResampler", "SpatialBlock"]


class _LayerNorm2d(nn.Module):
    """LayerNorm over channels of ``(V, C, H, W)`` (keys ``norm.weight/bias``)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _SqueezeExcite(nn.Module):
    """Channel gate: spatial mean -> Linear -> ReLU -> Linear -> sigmoid (keys ``fc.0``, ``fc.2``)."""

    def __init__(self, dim: int, mid: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, mid), nn.ReLU(), nn.Linear(mid, dim), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.fc(x.mean(dim=(2, 3)))[:, :, None, None]  # (V, C, H, W)


class SpatialBlock(nn.Module):
    """``x + pw2(SE(SiLU(pw1(LN2d(dwconv(x))))))`` on ``(V, C, H, W)``.

    Args:
        dim: channels ``C``.
        kernel_size: depthwise kernel (padding ``kernel_size // 2``).
        expand: width factor of the pointwise convolutions.
        se_mid: squeeze-excitation bottleneck width (``max(C * expand // se_reduction, 1)``).
    """

    def __init__(self, dim: int, *, kernel_size: int = 7, expand: int = 4, se_mid: int | None = None) -> None:
        super().__init__()
        inner = dim * expand
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = _LayerNorm2d(dim)
        self.pw1 = nn.Conv2d(dim, inner, 1)
        self.se = _SqueezeExcite(inner, se_mid if se_mid is not None else max(inner // 4, 1))
        self.pw2 = nn.Conv2d(inner, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(V, C, H, W)`` to ``(V, C, H, W)``."""
        return x + self.pw2(self.se(F.silu(self.pw1(self.norm(self.dwconv(x))))))


class CAbstractorResampler(PanoResampler):
    """PanoLLaVA's ``c_abstractor``: ``input_proj``, ``stage1``, optional adaptive pooling, ``stage2``, ``final_norm``, ``readout``.

    The ``N`` tokens (prefix included) are laid on ``(h, w)`` with ``h * w == N``: the square
    when ``N`` is one, else the factor pair with the largest ``h <= sqrt(N)`` (197 tokens give
    a 1 x 197 strip). With ``num_queries > 0`` (a square ``q * q``) the map is adaptive-average
    pooled to ``q x q`` between the stages. ``readout`` is ``Linear(hidden, out)`` followed by
    ``mlp_depth - 1`` pairs ``SiLU, Linear(out, out)`` (keys ``readout.0``, ``readout.2``, ...).

    Args:
        in_dim: encoder feature size.
        out_dim: output size.
        hidden_dim: conv width (``None``: ``out_dim``).
        depth: blocks per stage.
        num_queries: output tokens after pooling (a perfect square) or 0 for no pooling.
        kernel_size: depthwise kernel.
        expand: pointwise width factor.
        se_reduction: squeeze-excitation reduction (bottleneck ``max(hidden * expand // se_reduction, 1)``).
        se_mid: the bottleneck width itself (overrides ``se_reduction``; read from weights).
        mlp_depth: Linear layers of the readout.

    Shape:
        ``(V, N, in_dim) -> (V, N or num_queries, out_dim)``.
    """

    def __init__(
        self, in_dim: int, out_dim: int, *, hidden_dim: int | None = None, depth: int = 3, num_queries: int = 0,
        kernel_size: int = 7, expand: int = 4, se_reduction: int = 4, se_mid: int | None = None, mlp_depth: int = 2,
    ) -> None:
        super().__init__(in_dim, out_dim)
        hd = int(hidden_dim or out_dim)
        self.hidden_dim, self.depth, self.num_queries = hd, int(depth), int(num_queries)
        if self.num_queries > 0 and math.isqrt(self.num_queries) ** 2 != self.num_queries:
            raise ValueError(f"Expected c_abstractor `num_queries` to be 0 or a perfect square, got {num_queries}.")
        mid = se_mid if se_mid is not None else max(hd * expand // se_reduction, 1)
        self.input_proj = nn.Linear(in_dim, hd)
        self.stage1 = nn.Sequential(*(SpatialBlock(hd, kernel_size=kernel_size, expand=expand, se_mid=mid)
                                      for _ in range(depth)))
        self.stage2 = nn.Sequential(*(SpatialBlock(hd, kernel_size=kernel_size, expand=expand, se_mid=mid)
                                      for _ in range(depth)))
        self.final_norm = nn.LayerNorm(hd)
        layers: list[nn.Module] = [nn.Linear(hd, out_dim)]
        for _ in range(mlp_depth - 1):
            layers += [nn.SiLU(), nn.Linear(out_dim, out_dim)]
        self.readout = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(V, N, in_dim)`` to ``(V, M, out_dim)``."""
        v, seq, _ = x.shape
        h, w = _factor_grid(seq)
        x = self.input_proj(x).transpose(1, 2).reshape(v, self.hidden_dim, h, w)  # (V, C, h, w)
        x = self.stage1(x)
        if self.num_queries > 0:
            side = math.isqrt(self.num_queries)
            x = F.adaptive_avg_pool2d(x, (side, side))
        x = self.stage2(x).flatten(2).transpose(1, 2)  # (V, M, C)
        return self.readout(self.final_norm(x))

    def output_grid(self, grid_hw: tuple[int, int], num_prefix_tokens: int = 0) -> tuple[int, int] | None:
        """The pooled ``(q, q)`` or the encoder grid, when PanoLLaVA's reshape is that grid; else ``None``."""
        seq_grid = _factor_grid(int(grid_hw[0]) * int(grid_hw[1]) + num_prefix_tokens)
        if not _aligned(seq_grid, grid_hw, num_prefix_tokens):
            return None
        side = math.isqrt(self.num_queries)
        return (side, side) if self.num_queries > 0 else seq_grid
