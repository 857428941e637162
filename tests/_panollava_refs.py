"""Hand-written reference layers for the PanoLLaVA resampler tests (plain tensor algebra, float64)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["random_weights", "layer_norm", "gelu", "silu", "linear"]


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, Tensor]:
    """Random float32 tensors under PanoLLaVA's exact key names; LayerNorm weights near 1."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=gen) * (0.5 if len(shape) > 1 else 0.2)
        if key.endswith("weight") and len(shape) == 1:
            t = 1 + t
        out[key] = t
    return out


def layer_norm(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    x = x.double()
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w.double() + b.double()


def gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def silu(x: Tensor) -> Tensor:
    return x / (1 + torch.exp(-x))


def linear(x: Tensor, sd: dict[str, Tensor], name: str) -> Tensor:
    y = x.double() @ sd[f"{name}.weight"].double().T
    bias = sd.get(f"{name}.bias")
    return y if bias is None else y + bias.double()
