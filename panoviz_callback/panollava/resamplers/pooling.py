"""PanoLLaVA's pooling-style resamplers: ``identity``, ``avg``, ``conv``, ``spatial_pool``, ``masked_drop``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from panoviz_callback.panollava.resamplers._base import (
    PanoResampler,
    _aligned,
    _proj_stack,
    _square_grid,
    _TokenWise,
)

__all__ = [
    "IdentityResampler",
    "AvgPoolResampler",
    "ConvNeXtBlock",
    "ConvResampler",
    "SpatialPoolResampler",
    "MaskedDropResampler",
]


class IdentityResampler(_TokenWise):
    """PanoLLaVA's ``identity``: a token-wise ``Linear`` (``proj``), despite the name.

    Shape:
        ``(V, N, in_dim) -> (V, N, out_dim)``.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, out_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(V, N, in_dim)`` to ``(V, N, out_dim)``."""
        return self.proj(x)


class AvgPoolResampler(PanoResampler):
    """PanoLLaVA's ``avg``: the mean of all ``N`` tokens (prefix included), then ``Linear`` (``proj``).

    Shape:
        ``(V, N, in_dim) -> (V, 1, out_dim)``; the output grid is ``(1, 1)``.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, out_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(V, N, in_dim)`` to ``(V, 1, out_dim)``."""
        return self.proj(x.mean(dim=1, keepdim=True))

    def output_grid(self, grid_hw: tuple[int, int], num_prefix_tokens: int = 0) -> tuple[int, int] | None:
        return 1, 1


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block on ``(V, C, H, W)``: depthwise 7x7, LayerNorm(eps=1e-6), Linear 4C, GELU, Linear C, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(V, C, H, W)`` to ``(V, C, H, W)``."""
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (V, H, W, C)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)  # (V, C, H, W)


class ConvResampler(PanoResampler):
    """PanoLLaVA's ``conv``: ConvNeXt stages on the zero-padded square token grid, then a global mean.

    ``input_proj`` (a Linear, only when ``in_dim != out_dim``), then the tokens are laid on an
    ``s x s`` grid with ``s = ceil(sqrt(N))`` (zero-padded), run through
    ``repeated_stages[r][stage][block]`` ConvNeXt blocks, unpadded, ``norm`` (eps 1e-6), averaged
    over all tokens and passed through ``head``. Stochastic depth is inert in eval mode.

    Args:
        in_dim: encoder feature size.
        out_dim: output size (also the conv width).
        depths: blocks per stage (PanoLLaVA's default ``[2, 2]``).
        num_repeats: repetitions of the stage list (PanoLLaVA always uses 1).
        num_tokens: read by PanoLLaVA's config but unused by its forward; kept for the record.

    Shape:
        ``(V, N, in_dim) -> (V, 1, out_dim)``; the output grid is ``(1, 1)``.
    """

    def __init__(
        self, in_dim: int, out_dim: int, *, depths: tuple[int, ...] | list[int] = (2, 2), num_repeats: int = 1,
        num_tokens: int = 144,
    ) -> None:
        super().__init__(in_dim, out_dim)
        self.depths, self.num_repeats, self.num_tokens = tuple(int(d) for d in depths), int(num_repeats), num_tokens
        self.input_proj = nn.Linear(in_dim, out_dim) if in_dim != out_dim else nn.Identity()
        self.repeated_stages = nn.ModuleList(
            nn.ModuleList(nn.ModuleList(ConvNeXtBlock(out_dim) for _ in range(d)) for d in self.depths)
            for _ in range(self.num_repeats)
        )
        self.norm = nn.LayerNorm(out_dim, eps=1e-6)
        self.head = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(V, N, in_dim)`` to ``(V, 1, out_dim)``."""
        v, seq, _ = x.shape
        x = self.input_proj(x)  # (V, N, C)
        side = int(seq ** 0.5)
        side = side if side * side == seq else side + 1
        pad = side * side - seq
        if pad:
            x = torch.cat([x, x.new_zeros(v, pad, self.out_dim)], dim=1)  # (V, s*s, C)
        x = x.view(v, side, side, self.out_dim).permute(0, 3, 1, 2)  # (V, C, s, s)
        for stages in self.repeated_stages:
            for stage in stages:
                for block in stage:
                    x = block(x)
        x = x.permute(0, 2, 3, 1).reshape(v, side * side, self.out_dim)[:, :seq]  # (V, N, C)
        return self.head(self.norm(x).mean(dim=1, keepdim=True))  # (V, 1, C)

    def output_grid(self, grid_hw: tuple[int, int], num_prefix_tokens: int = 0) -> tuple[int, int] | None:
        return 1, 1


class SpatialPoolResampler(PanoResampler):
    """PanoLLaVA's ``spatial_pool``: 2-D pooling of the (padded) token grid, then a projection.

    The ``N`` tokens (prefix included) are zero-padded onto PanoLLaVA's grid (``H = W = isqrt(N)``,
    grown to ``H + 1`` rows of ``ceil(N / (H + 1))`` when short), pooled with kernel = stride =
    ``pool_size`` (``"average"``: ``AvgPool2d``, padded zeros counted; ``"max"``; ``"conv"``: a
    learned ``Conv2d`` at ``pool``), flattened and projected (:func:`_proj_stack`, keys ``proj.*``).

    Args:
        in_dim: encoder feature size.
        out_dim: output size.
        pool_size: kernel and stride.
        pool_mode: ``"average"``, ``"max"`` or ``"conv"``.
        depth: Linear layers of the projection (0: one bare Linear).

    Shape:
        ``(V, N, in_dim) -> (V, floor(H / k) * floor(W / k), out_dim)``.
    """

    def __init__(self, in_dim: int, out_dim: int, *, pool_size: int = 4, pool_mode: str = "average", depth: int = 2) -> None:
        super().__init__(in_dim, out_dim)
        self.pool_size, self.pool_mode, self.depth = int(pool_size), str(pool_mode), int(depth)
        k = self.pool_size
        if pool_mode == "average":
            self.pool: nn.Module = nn.AvgPool2d(kernel_size=k, stride=k)
        elif pool_mode == "max":
            self.pool = nn.MaxPool2d(kernel_size=k, stride=k)
        elif pool_mode == "conv":
            self.pool = nn.Conv2d(in_dim, in_dim, kernel_size=k, stride=k)
        else:
            raise ValueError(f"Argument `pool_mode` must be one of ('average', 'max', 'conv'), got {pool_mode!r}.")
        self.proj = _proj_stack(in_dim, out_dim, self.depth)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(V, N, in_dim)`` to ``(V, M, out_dim)``."""
        v, seq, d = x.shape
        h, w = _square_grid(seq)
        if h * w > seq:
            x = torch.cat([x, x.new_zeros(v, h * w - seq, d)], dim=1)  # (V, H*W, D)
        grid = x.view(v, h, w, d).permute(0, 3, 1, 2)  # (V, D, H, W)
        pooled = self.pool(grid).flatten(2).transpose(1, 2)  # (V, M, D)
        return self.proj(pooled)

    def output_grid(self, grid_hw: tuple[int, int], num_prefix_tokens: int = 0) -> tuple[int, int] | None:
        """``(H // k, W // k)`` when PanoLLaVA's reshape is the encoder grid (no prefix, square), else ``None``."""
        seq_grid = _square_grid(int(grid_hw[0]) * int(grid_hw[1]) + num_prefix_tokens)
        if not _aligned(seq_grid, grid_hw, num_prefix_tokens):
            return None
        return seq_grid[0] // self.pool_size, seq_grid[1] // self.pool_size


class MaskedDropResampler(_TokenWise):
    """PanoLLaVA's ``masked_drop``: a projection, plus random token dropping in training only.

    In eval mode (how a checkpoint is analysed) it is the token-wise projection ``proj``
    (:func:`_proj_stack`). In training mode, per view, a random subset of
    ``max(1, int(N * ratio))`` projected tokens is kept (``ratio = mask_ratio`` in ``"fixed"``
    mode, uniform in ``[ratio_lower, ratio_upper]`` in ``"range"`` mode; the whole batch is left
    unmasked with probability ``skip_percentage``), drawn with torch's RNG (PanoLLaVA draws
    the ratio and the skip with Python's ``random``, so the draws are not reproduced).

    Shape:
        ``(V, N, in_dim) -> (V, N, out_dim)`` in eval mode.
    """

    def __init__(
        self, in_dim: int, out_dim: int, *, mask_ratio: float = 0.5, mask_mode: str = "fixed",
        skip_percentage: float = 0.0, ratio_lower: float = 0.3, ratio_upper: float = 0.7, depth: int = 2,
    ) -> None:
        super().__init__(in_dim, out_dim)
        if mask_mode not in ("fixed", "range"):
            raise ValueError(f"Argument `mask_mode` must be one of ('fixed', 'range'), got {mask_mode!r}.")
        self.mask_ratio, self.mask_mode, self.skip_percentage = float(mask_ratio), mask_mode, float(skip_percentage)
        self.ratio_lower, self.ratio_upper, self.depth = float(ratio_lower), float(ratio_upper), int(depth)
        self.proj = _proj_stack(in_dim, out_dim, self.depth)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(V, N, in_dim)`` to ``(V, N, out_dim)`` (eval) or ``(V, N', out_dim)`` (training)."""
        x = self.proj(x)
        if not self.training or self.skip_percentage > float(torch.rand(())):
            return x
        v, seq, d = x.shape
        if self.mask_mode == "fixed":
            ratios = torch.full((v,), self.mask_ratio)
        else:
            ratios = self.ratio_lower + (self.ratio_upper - self.ratio_lower) * torch.rand(v)
        keeps = [max(1, int(seq * float(r))) for r in ratios]
        order = torch.rand(v, seq, device=x.device).argsort(dim=1)  # (V, N)
        out = x.new_zeros(v, max(keeps), d)
        for i, keep in enumerate(keeps):
            out[i, :keep] = x[i, order[i, :keep]]
        return out
