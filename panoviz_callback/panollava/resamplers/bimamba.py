"""PanoLLaVA's ``bimamba`` resampler in pure torch: bidirectional Mamba (S6) blocks.

PanoLLaVA builds it from ``mamba_ssm.Mamba`` (CUDA kernels). :class:`MambaMixer` has the same
parameters under the same names and computes the same function from the Mamba equations
(Gu & Dao, 2023), on any device:

.. math::

    x, z = \\mathrm{split}(W_{in} u), \\quad x = \\mathrm{SiLU}(\\mathrm{conv1d}_{causal}(x)),
    \\quad (\\delta_{raw}, B, C) = \\mathrm{split}(W_x x), \\quad \\delta = \\mathrm{softplus}(W_\\delta \\delta_{raw} + b_\\delta)

    h_t = e^{\\delta_t A} \\odot h_{t-1} + \\delta_t B_t x_t, \\quad y_t = C_t \\cdot h_t + D x_t,
    \\quad \\mathrm{out} = W_{out}(y \\odot \\mathrm{SiLU}(z)), \\quad A = -e^{A_{log}}
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from panoviz_callback.panollava.resamplers._base import _TokenWise

__all__ = ["MambaMixer", "BiMambaBlock", "BiMambaResampler", "selective_scan"]


def selective_scan(u: Tensor, delta: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor, z: Tensor) -> Tensor:
    """The S6 selective scan, gated: ``y_t = C_t . h_t + D u_t``, times ``SiLU(z_t)``.

    Runs the recurrence ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t`` over the sequence in
    float32 (float64 for float64 inputs), one step at a time, vectorised over views, channels and
    states (``L`` steps of ``(V, E, S)`` work: about 1-2 s per mixer for 8 views x 256 tokens at
    PanoLLaVA's default sizes on one CPU core; the CUDA kernel of ``mamba_ssm`` is far faster).

    Args:
        u: inputs ``(V, L, E)``.
        delta: step sizes after softplus ``(V, L, E)``.
        a: state matrix (negative) ``(E, S)``.
        b: input projections ``(V, L, S)``.
        c: output projections ``(V, L, S)``.
        d: skip weights ``(E,)``.
        z: gate inputs ``(V, L, E)``.

    Returns:
        ``(V, L, E)`` in ``u``'s dtype.
    """
    dtype = u.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    u, delta, a, b, c, z, d = (t.to(work) for t in (u, delta, a, b, c, z, d))
    v, length, e = u.shape
    h = u.new_zeros(v, e, a.shape[1])  # (V, E, S)
    du = delta * u  # (V, L, E)
    ys = []
    for t in range(length):  # (V, E, S) per step stays in cache; batching steps was measured slower
        h = torch.exp(delta[:, t, :, None] * a) * h + du[:, t, :, None] * b[:, t, None, :]  # h_t
        ys.append(torch.einsum("ves,vs->ve", h, c[:, t]))
    y = torch.stack(ys, dim=1) + u * d  # (V, L, E)
    return (y * F.silu(z)).to(dtype)


class MambaMixer(nn.Module):
    """One Mamba (S6) mixer, parameter for parameter ``mamba_ssm.Mamba``.

    Keys: ``in_proj`` ``(2E, D)`` no bias, ``conv1d`` ``(E, 1, d_conv)`` + bias (depthwise, causal),
    ``x_proj`` ``(R + 2S, E)`` no bias, ``dt_proj`` ``(E, R)`` + bias, ``A_log`` ``(E, S)``, ``D`` ``(E,)``,
    ``out_proj`` ``(D, E)`` no bias; ``E = int(expand * D)``, ``R = ceil(D / 16)``.

    Args:
        d_model: width ``D``.
        d_state: state size ``S``.
        d_conv: causal convolution width.
        expand: ``E / D``.
        d_inner: ``E`` itself (overrides ``expand``; read from weights).
        dt_rank: ``R`` (``None``: ``ceil(D / 16)``).

    Shape:
        ``(V, L, D) -> (V, L, D)``.
    """

    def __init__(
        self, d_model: int, *, d_state: int = 16, d_conv: int = 4, expand: float = 2.0, d_inner: int | None = None,
        dt_rank: int | None = None,
    ) -> None:
        super().__init__()
        e = int(d_inner if d_inner is not None else int(expand * d_model))
        r = int(dt_rank if dt_rank is not None else math.ceil(d_model / 16))
        self.d_model, self.d_state, self.d_conv, self.d_inner, self.dt_rank = d_model, d_state, d_conv, e, r
        self.in_proj = nn.Linear(d_model, 2 * e, bias=False)
        self.conv1d = nn.Conv1d(e, e, kernel_size=d_conv, groups=e, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(e, r + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(e, 1))
        self.D = nn.Parameter(torch.ones(e))
        self.out_proj = nn.Linear(e, d_model, bias=False)

    def forward(self, hidden: Tensor) -> Tensor:
        """Map ``(V, L, D)`` to ``(V, L, D)``."""
        length = hidden.shape[1]
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (V, L, E) each
        x = F.silu(self.conv1d(x.transpose(1, 2))[..., :length]).transpose(1, 2)  # (V, L, E)
        dt, b, c = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        work = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        delta = F.softplus(F.linear(dt, self.dt_proj.weight).to(work) + self.dt_proj.bias.to(work))  # (V, L, E)
        a = -torch.exp(self.A_log.to(work))  # (E, S)
        y = selective_scan(x, delta, a, b, c, self.D, z)
        return self.out_proj(y)


class BiMambaBlock(nn.Module):
    """``x + dropout((fwd(n(x)) + flip(bwd(flip(n(x))))) / 2)`` with ``n`` = LayerNorm when ``norm_first``, else
    the sum is normalised afterwards. Keys ``norm``, ``forward_block``, ``backward_block``."""

    def __init__(self, dim: int, *, norm_first: bool = True, dropout: float = 0.0, **mixer: int | float | None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.forward_block = MambaMixer(dim, **mixer)  # type: ignore[arg-type]
        self.backward_block = MambaMixer(dim, **mixer)  # type: ignore[arg-type]
        self.dropout = nn.Dropout(dropout)
        self.norm_first = bool(norm_first)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(V, L, D)`` to ``(V, L, D)``."""
        h = self.norm(x) if self.norm_first else x
        fwd = self.forward_block(h)
        bwd = self.backward_block(h.flip(1)).flip(1)
        out = x + self.dropout(0.5 * (fwd + bwd))
        return out if self.norm_first else self.norm(out)


class BiMambaResampler(_TokenWise):
    """PanoLLaVA's ``bimamba``: ``input_proj``, ``blocks.i`` (:class:`BiMambaBlock`), ``final_norm``, ``output_proj``.

    Token-wise in shape (each output token sits at its input token's place, prefix tokens
    included), but every output mixes the whole sequence in raster order, both ways.

    Args:
        in_dim: encoder feature size.
        out_dim: output size.
        hidden_dim: block width (``None``: ``out_dim``).
        num_layers: blocks.
        d_state, d_conv, expand, d_inner, dt_rank: :class:`MambaMixer` sizes.
        dropout: between the mixers and the residual (inert in eval).
        norm_first: pre-norm (PanoLLaVA's default) or post-norm blocks; weights are the same
            either way, so this comes from the config only.

    Shape:
        ``(V, N, in_dim) -> (V, N, out_dim)``.
    """

    def __init__(
        self, in_dim: int, out_dim: int, *, hidden_dim: int | None = None, num_layers: int = 4, d_state: int = 64,
        d_conv: int = 4, expand: float = 2.0, d_inner: int | None = None, dt_rank: int | None = None,
        dropout: float = 0.0, norm_first: bool = True,
    ) -> None:
        super().__init__(in_dim, out_dim)
        self.hidden_dim, self.num_layers, self.norm_first = int(hidden_dim or out_dim), int(num_layers), bool(norm_first)
        self.input_proj = nn.Linear(in_dim, self.hidden_dim)
        self.blocks = nn.ModuleList(
            BiMambaBlock(self.hidden_dim, norm_first=norm_first, dropout=dropout, d_state=d_state, d_conv=d_conv,
                         expand=expand, d_inner=d_inner, dt_rank=dt_rank)
            for _ in range(self.num_layers)
        )
        self.final_norm = nn.LayerNorm(self.hidden_dim)
        self.output_proj = nn.Linear(self.hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(V, N, in_dim)`` to ``(V, N, out_dim)``."""
        x = self.input_proj(x)
        for block in self.blocks:
            x = block(x)
        return self.output_proj(self.final_norm(x))
