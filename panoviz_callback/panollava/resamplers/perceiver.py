"""PanoLLaVA's ``perceiver`` resampler (HEAD): Flamingo-style latents cross-attending the tokens."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from panoviz_callback.panollava.resamplers._base import PanoResampler

__all__ = ["PerceiverResampler"]


class _LatentAttention(nn.Module):
    """Latents ``(V, Q, D)`` attend the normalised tokens and themselves (keys ``norm_media``, ``norm_latents``,
    ``to_q``, ``to_kv``, ``to_out``; no biases)."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, tokens: Tensor, latents: Tensor) -> Tensor:
        v, q_len, _ = latents.shape
        tokens, latents = self.norm_media(tokens), self.norm_latents(latents)
        q = self.to_q(latents)  # (V, Q, H*Dh)
        k, val = self.to_kv(torch.cat([tokens, latents], dim=1)).chunk(2, dim=-1)  # (V, N+Q, H*Dh)

        def heads(t: Tensor) -> Tensor:
            return t.view(v, t.shape[1], self.heads, -1).transpose(1, 2)  # (V, H, L, Dh)

        q, k, val = heads(q) * self.scale, heads(k), heads(val)
        attn = (q @ k.transpose(-1, -2)).softmax(dim=-1)  # (V, H, Q, N+Q)
        out = (attn @ val).transpose(1, 2).reshape(v, q_len, -1)  # (V, Q, H*Dh)
        return self.to_out(out)


def _feed_forward(dim: int, mult: int) -> nn.Module:
    """Pre-norm FFN ``LayerNorm, Linear(D, D*mult), GELU, Linear(D*mult, D)`` without biases; Identity when ``mult == 0``."""
    if mult <= 0:
        return nn.Identity()
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class _PerceiverCore(nn.Module):
    """Keys ``latents`` ``(Q, D)``, ``layers.i.0`` (attention), ``layers.i.1`` (FFN), ``norm``."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, num_latents: int, ff_mult: int) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([_LatentAttention(dim, heads, dim_head), _feed_forward(dim, ff_mult)]) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor) -> Tensor:
        latents = self.latents.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # (V, Q, D)
        for attn, ff in self.layers:
            latents = attn(tokens, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


class PerceiverResampler(PanoResampler):
    """PanoLLaVA's ``perceiver``: ``perceiver.*`` at width ``in_dim``, then ``proj`` (only when ``in_dim != out_dim``).

    Each layer: ``latents += attn(tokens, latents)`` where the keys/values are the normalised
    tokens concatenated with the normalised latents (scale ``dim_head ** -0.5``), then
    ``latents += ff(latents)``; a final LayerNorm. No positional or frame embeddings.

    Args:
        in_dim: encoder feature size (the perceiver's width).
        out_dim: output size.
        num_latents: learned latents ``Q``.
        depth: layers.
        heads: attention heads.
        dim_head: width per head.
        ff_mult: FFN expansion (0 disables the FFN).

    Shape:
        ``(V, N, in_dim) -> (V, num_latents, out_dim)``.
    """

    layout = "queries"

    def __init__(
        self, in_dim: int, out_dim: int, *, num_latents: int = 64, depth: int = 6, heads: int = 8, dim_head: int = 64,
        ff_mult: int = 4,
    ) -> None:
        super().__init__(in_dim, out_dim)
        self.num_queries = self.num_latents = int(num_latents)
        self.depth, self.heads, self.dim_head, self.ff_mult = int(depth), int(heads), int(dim_head), int(ff_mult)
        self.perceiver = _PerceiverCore(in_dim, self.depth, self.heads, self.dim_head, self.num_latents, self.ff_mult)
        self.proj = nn.Linear(in_dim, out_dim) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(V, N, in_dim)`` to ``(V, Q, out_dim)``."""
        return self.proj(self.perceiver(x))
