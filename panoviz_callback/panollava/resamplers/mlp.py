"""PanoLLaVA's ``mlp`` resampler: a token-wise MLP, optionally pooled along the token sequence."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from panoviz_callback.panollava.resamplers._base import _TokenWise

__all__ = ["MLPResampler"]


class MLPResampler(_TokenWise):
    """``depth - 1`` blocks ``Linear [-> LayerNorm(eps=1e-5)] -> GELU``, then a final ``Linear``.

    State-dict keys (``use_ln=True``, depth 3): ``mlp.0`` Linear, ``mlp.1`` LayerNorm, ``mlp.3``
    Linear, ``mlp.4`` LayerNorm, ``mlp.6`` Linear; with ``use_ln=False`` the Linear layers sit at
    ``mlp.0``, ``mlp.2``, ``mlp.4`` (no norms), which is why the flag changes the key layout.

    ``pool_tokens`` (HEAD only) pools the MLP output with ``adaptive_{avg,max}_pool1d`` along the
    token *sequence* (prefix tokens included, raster order), not over the 2-D grid: a pooled
    token is a run of consecutive tokens. It applies only when ``0 < pool_tokens < N``.

    Args:
        in_dim: encoder feature size ``D``.
        out_dim: output size.
        hidden_dim: hidden width; ``None`` means ``max(in_dim, out_dim)``.
        depth: number of Linear layers (at least 1).
        use_ln: LayerNorm after each hidden Linear.
        pool_tokens: number of output tokens after 1-D pooling, or ``None``.
        pool_type: ``"max"`` for max pooling, anything else average (as PanoLLaVA reads it).

    Shape:
        ``(V, N, in_dim) -> (V, N, out_dim)``, or ``(V, pool_tokens, out_dim)`` when pooling.
    """

    def __init__(
        self, in_dim: int, out_dim: int, *, hidden_dim: int | None = None, depth: int = 3, use_ln: bool = True,
        pool_tokens: int | None = None, pool_type: str = "avg",
    ) -> None:
        super().__init__(in_dim, out_dim)
        if depth < 1:
            raise ValueError(f"Expected the mlp resampler `depth` >= 1, got {depth}.")
        self.hidden_dim = int(hidden_dim or max(in_dim, out_dim))
        self.depth, self.use_ln = int(depth), bool(use_ln)
        self.pool_tokens = None if pool_tokens is None else int(pool_tokens)
        self.pool_type = str(pool_type)
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(depth - 1):
            layers.append(nn.Linear(width, self.hidden_dim))
            if self.use_ln:
                layers.append(nn.LayerNorm(self.hidden_dim, eps=1e-5))
            layers.append(nn.GELU())
            width = self.hidden_dim
        layers.append(nn.Linear(width, out_dim))
        self.mlp = nn.Sequential(*layers)

    def _pools(self, seq: int) -> bool:
        return self.pool_tokens is not None and 0 < self.pool_tokens < seq

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(V, N, in_dim)`` to ``(V, N or pool_tokens, out_dim)``."""
        x = self.mlp(x)  # (V, N, out_dim)
        if self._pools(x.shape[1]):
            pool = F.adaptive_max_pool1d if self.pool_type == "max" else F.adaptive_avg_pool1d
            x = pool(x.transpose(1, 2), self.pool_tokens).transpose(1, 2)  # (V, P, out_dim)
        return x

    def output_grid(self, grid_hw: tuple[int, int], num_prefix_tokens: int = 0) -> tuple[int, int] | None:
        """The grid for an encoder grid; with pooling only when each pooled run is a row segment or whole rows.

        Without pooling the tokens keep the grid (prefix tokens first). With pooling the output
        is a grid only without prefix tokens and when ``gh * gw`` splits into equal runs that
        tile rows (``(gh, gw / run)``) or stack whole rows (``(gh / rows, 1)``); otherwise ``None``.
        """
        gh, gw = int(grid_hw[0]), int(grid_hw[1])
        seq = gh * gw + num_prefix_tokens
        if not self._pools(seq):
            return gh, gw
        pool = int(self.pool_tokens)  # type: ignore[arg-type]
        if num_prefix_tokens or seq % pool:
            return None
        run = seq // pool
        if gw % run == 0:
            return gh, gw // run
        if run % gw == 0 and gh % (run // gw) == 0:
            return gh // (run // gw), 1
        return None

    def output_prefix_tokens(self, num_prefix_tokens: int) -> int:
        return 0 if self.pool_tokens is not None and num_prefix_tokens else int(num_prefix_tokens)
