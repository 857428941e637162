"""Shared helpers of the metrics: precision guard, unit tokens, input checks, accumulation dtype."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from panoviz_callback._checks import _check_shape

__all__: list[str] = []

_EPS = 1e-8


def _full_precision(fn: Callable) -> Callable:
    """Run ``fn`` with autocast off, so a caller's mixed-precision context cannot lower the metrics to fp16."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)

    return wrapper


def _unit(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1, eps=_EPS)


def _check_same(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"Expected `{name_a}` and `{name_b}` of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}."
        )


def _check_mask(mask: Tensor | None, images: Tensor) -> None:
    if mask is None:
        return
    _check_shape(mask, "P h w", "mask")
    want = (images.shape[0], *images.shape[2:])
    if mask.dtype != torch.bool or mask.shape != want:
        raise ValueError(f"Expected a bool `mask` of shape {want}, got {mask.dtype} {tuple(mask.shape)}.")


def _check_index_pair(idx_a: Tensor, idx_b: Tensor, n_a: int, n_b: int) -> None:
    _check_shape(idx_a, "K", "idx_a")
    _check_shape(idx_b, "K", "idx_b")
    if len(idx_a) != len(idx_b):
        raise ValueError(f"Expected `idx_a` and `idx_b` of the same length, got {len(idx_a)} and {len(idx_b)}.")
    for idx, n, name in ((idx_a, n_a, "idx_a"), (idx_b, n_b, "idx_b")):
        if idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise TypeError(f"Expected `{name}` to be an integer tensor, got {idx.dtype}.")
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"Expected `{name}` in [0, {n}), got values in [{int(idx.min())}, {int(idx.max())}].")


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


