"""Resamplers: map a view's encoder tokens ``(V, N, D)`` to what the language model sees.

Four kinds, built with :func:`build_resampler`:

- ``"identity"``: no resampler, tokens pass through (``output_layout = "grid"``).
- ``"mlp"``: PanoLLaVA's token-wise MLP, ``(V, N, D) -> (V, N, out_dim)`` (``"grid"``).
- ``"qformer"``: ``Q`` learned queries that self-attend and cross-attend the tokens
  (BLIP-2 style), ``(V, N, D) -> (V, Q, out_dim)`` (``output_layout = "queries"``).
- ``"perceiver"``: ``Q`` latents that cross-attend the tokens (keys and values are the
  tokens and the latents, Flamingo style) followed by a self-attention block per layer,
  ``(V, N, D) -> (V, Q, out_dim)`` (``"queries"``).

Every resampler has the attributes ``in_dim``, ``out_dim`` and ``output_layout``; the
query kinds also have ``num_queries``. :func:`panoviz_callback.features.apply_resampler`
reads ``output_layout`` to decide whether the output still lies on the token grid.

State-dict layout of the MLP (the same as PanoLLaVA's ``MLPResampler``, so its weights
load under the prefix ``model.resampler_module.resampler.`` stripped)::

    mlp.0.weight/bias   Linear(in_dim, hidden)
    mlp.1.weight/bias   LayerNorm(hidden, eps=1e-5)
    (mlp.2              GELU, no parameters)
    mlp.3.weight/bias   Linear(hidden, hidden)
    mlp.4.weight/bias   LayerNorm(hidden)
    (mlp.5              GELU)
    mlp.6.weight/bias   Linear(hidden, out_dim)

with ``hidden = max(in_dim, out_dim)`` and ``depth = 3`` Linear layers. Only the MLP
follows PanoLLaVA's layout; the query resamplers here are this package's own (PanoLLaVA's
BERT-based Q-Former weights do not load into them).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from panoviz_callback._checks import _check_choice, _check_range, _check_shape

__all__ = [
    "RESAMPLER_KINDS",
    "IdentityResampler",
    "MLPResampler",
    "QFormerResampler",
    "PerceiverResampler",
    "build_resampler",
]

RESAMPLER_KINDS = ("identity", "mlp", "qformer", "perceiver")


class IdentityResampler(nn.Identity):
    """No resampler: the encoder tokens are the resampled tokens (``out_dim == in_dim``)."""

    output_layout = "grid"

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.in_dim = self.out_dim = in_dim


class MLPResampler(nn.Module):
    """Token-wise MLP: ``depth - 1`` blocks Linear-LayerNorm-GELU, then a final Linear.

    Args:
        in_dim: encoder feature size ``D``.
        out_dim: output feature size.
        hidden_dim: width of the hidden blocks; ``None`` means ``max(in_dim, out_dim)``.
        depth: number of Linear layers (at least 1).

    Shape:
        ``(..., in_dim) -> (..., out_dim)``; for tokens ``(V, N, D) -> (V, N, out_dim)``.
    """

    output_layout = "grid"

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None, depth: int = 3) -> None:
        super().__init__()
        _check_range(depth, "depth", 1)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.hidden_dim = hidden_dim or max(in_dim, out_dim)
        self.depth = depth
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(depth - 1):
            layers += [nn.Linear(width, self.hidden_dim), nn.LayerNorm(self.hidden_dim, eps=1e-5), nn.GELU()]
            width = self.hidden_dim
        layers.append(nn.Linear(width, out_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class _FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, mult * dim), nn.GELU(), nn.Linear(mult * dim, dim))


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        return x + self.attn(h, h, h, need_weights=False)[0]


class _CrossAttention(nn.Module):
    """Queries ``(V, Q, dim)`` attend tokens ``(V, N, in_dim)`` (and themselves when ``with_self``)."""

    def __init__(self, dim: int, in_dim: int, heads: int, with_self: bool = False) -> None:
        super().__init__()
        self.with_self = with_self
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(in_dim)
        self.to_kv = nn.Identity() if in_dim == dim else nn.Linear(in_dim, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, q: Tensor, tokens: Tensor) -> Tensor:
        h = self.norm_q(q)
        kv = self.to_kv(self.norm_kv(tokens))  # (V, N, dim)
        if self.with_self:
            kv = torch.cat([kv, h], dim=1)  # (V, N + Q, dim)
        return q + self.attn(h, kv, kv, need_weights=False)[0]


class _QueryResampler(nn.Module):
    output_layout = "queries"

    def __init__(self, in_dim: int, out_dim: int, num_queries: int, depth: int, heads: int | None) -> None:
        super().__init__()
        _check_range(num_queries, "num_queries", 1)
        _check_range(depth, "depth", 1)
        heads = _default_heads(out_dim) if heads is None else heads
        if out_dim % heads:
            raise ValueError(f"Argument `heads` must divide `out_dim` ({out_dim}), got {heads}.")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.num_queries, self.depth, self.heads = num_queries, depth, heads
        self.queries = nn.Parameter(torch.randn(num_queries, out_dim) * 0.02)
        self.layers = nn.ModuleList(self._make_layer() for _ in range(depth))
        self.norm_out = nn.LayerNorm(out_dim)

    def _make_layer(self) -> nn.ModuleDict:
        raise NotImplementedError

    def forward(self, tokens: Tensor) -> Tensor:
        _check_shape(tokens, f"V N {self.in_dim}", "tokens")
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # (V, Q, out_dim)
        for layer in self.layers:
            q = self._layer_forward(layer, q, tokens)
        return self.norm_out(q)

    def _layer_forward(self, layer: nn.ModuleDict, q: Tensor, tokens: Tensor) -> Tensor:
        raise NotImplementedError


class QFormerResampler(_QueryResampler):
    """Q-Former style: per layer, queries self-attend, cross-attend the tokens, then a feed-forward.

    Args:
        in_dim: encoder feature size ``D``.
        out_dim: width of the queries and of the output.
        num_queries: ``Q`` learned queries.
        depth: number of layers.
        heads: attention heads (must divide ``out_dim``); ``None`` picks the largest of
            8, 4, 2, 1 that divides ``out_dim`` with at least 16 channels per head.

    Shape:
        ``(V, N, in_dim) -> (V, Q, out_dim)``; query ``k`` of every view is the same learned query.
    """

    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 16, depth: int = 2,
                 heads: int | None = None) -> None:
        super().__init__(in_dim, out_dim, num_queries, depth, heads)

    def _make_layer(self) -> nn.ModuleDict:
        return nn.ModuleDict({
            "self_attn": _SelfAttention(self.out_dim, self.heads),
            "cross_attn": _CrossAttention(self.out_dim, self.in_dim, self.heads),
            "ff": _FeedForward(self.out_dim),
        })

    def _layer_forward(self, layer: nn.ModuleDict, q: Tensor, tokens: Tensor) -> Tensor:
        q = layer["self_attn"](q)
        q = layer["cross_attn"](q, tokens)
        return q + layer["ff"](q)


class PerceiverResampler(_QueryResampler):
    """Perceiver style: per layer, latents cross-attend ``[tokens; latents]``, then a self-attention block.

    Args:
        in_dim: encoder feature size ``D``.
        out_dim: width of the latents and of the output.
        num_queries: ``Q`` learned latents.
        depth: number of layers (each: cross-attention + feed-forward + self-attention + feed-forward).
        heads: attention heads, as for :class:`QFormerResampler`.

    Shape:
        ``(V, N, in_dim) -> (V, Q, out_dim)``.
    """

    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 16, depth: int = 2,
                 heads: int | None = None) -> None:
        super().__init__(in_dim, out_dim, num_queries, depth, heads)

    def _make_layer(self) -> nn.ModuleDict:
        return nn.ModuleDict({
            "cross_attn": _CrossAttention(self.out_dim, self.in_dim, self.heads, with_self=True),
            "cross_ff": _FeedForward(self.out_dim),
            "self_attn": _SelfAttention(self.out_dim, self.heads),
            "self_ff": _FeedForward(self.out_dim),
        })

    def _layer_forward(self, layer: nn.ModuleDict, q: Tensor, tokens: Tensor) -> Tensor:
        q = layer["cross_attn"](q, tokens)
        q = q + layer["cross_ff"](q)
        q = layer["self_attn"](q)
        return q + layer["self_ff"](q)


def _default_heads(dim: int) -> int:
    for heads in (8, 4, 2):
        if dim % heads == 0 and dim // heads >= 16:
            return heads
    return 1


def build_resampler(
    kind: Literal["identity", "mlp", "qformer", "perceiver"],
    in_dim: int,
    out_dim: int | None = None,
    *,
    num_queries: int = 16,
    depth: int | None = None,
    heads: int | None = None,
) -> nn.Module:
    """Build a resampler by name.

    Args:
        kind: one of ``"identity"``, ``"mlp"``, ``"qformer"``, ``"perceiver"``.
        in_dim: encoder feature size ``D``.
        out_dim: output feature size; ``None`` means ``in_dim``. ``"identity"`` keeps
            ``in_dim`` and rejects any other value.
        num_queries: ``Q`` for the query kinds (ignored otherwise).
        depth: Linear layers of the MLP (default 3) or layers of the query kinds (default 2).
        heads: attention heads of the query kinds (default: see :class:`QFormerResampler`).

    Returns:
        An ``nn.Module`` mapping ``(V, N, D)`` to ``(V, N, out_dim)`` (``output_layout ==
        "grid"``) or ``(V, Q, out_dim)`` (``output_layout == "queries"``, attribute ``num_queries``).

    Raises:
        ValueError: unknown ``kind``, non-positive sizes, ``identity`` with ``out_dim != in_dim``.

    Example:
        >>> r = build_resampler("mlp", 32, 16)
        >>> r(torch.zeros(4, 9, 32)).shape, r.output_layout
        (torch.Size([4, 9, 16]), 'grid')
        >>> r = build_resampler("qformer", 32, 16, num_queries=5)
        >>> r(torch.zeros(4, 9, 32)).shape, r.output_layout
        (torch.Size([4, 5, 16]), 'queries')
    """
    _check_choice(kind, RESAMPLER_KINDS, "kind")
    _check_range(in_dim, "in_dim", 1)
    out_dim = in_dim if out_dim is None else out_dim
    _check_range(out_dim, "out_dim", 1)
    if kind == "identity":
        if out_dim != in_dim:
            raise ValueError(
                f"Resampler 'identity' keeps the feature size: `out_dim` must equal `in_dim` ({in_dim}), got {out_dim}."
                " Use resampler 'mlp' to change it."
            )
        return IdentityResampler(in_dim)
    if kind == "mlp":
        return MLPResampler(in_dim, out_dim, depth=3 if depth is None else depth)
    cls = QFormerResampler if kind == "qformer" else PerceiverResampler
    return cls(in_dim, out_dim, num_queries=num_queries, depth=2 if depth is None else depth, heads=heads)
