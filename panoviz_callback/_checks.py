"""Boundary validation helpers: check once at the public API, trust inside."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["_check_shape", "_check_choice", "_check_range", "_check_int", "_check_grid"]


def _check_shape(x: Any, dims: str, name: str) -> None:
    """Check that ``x`` is a tensor whose shape matches ``dims``.

    ``dims`` is a space-separated pattern such as ``"V N D"`` or ``"V 3 h w"``:
    letters match any size, digits must match exactly, ``*`` matches any number
    of leading dimensions (only as the first entry).

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: the shape does not match, e.g.
            "Expected `feats` of shape (V, N, D), got (4, 197)."
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, got {type(x).__name__}.")
    parts = dims.split()
    shape = tuple(x.shape)
    pretty = "(" + ", ".join(parts) + ")"
    if parts and parts[0] == "*":
        fixed = parts[1:]
        ok = len(shape) >= len(fixed) and _match(shape[len(shape) - len(fixed):], fixed)
    else:
        ok = len(shape) == len(parts) and _match(shape, parts)
    if not ok:
        raise ValueError(f"Expected `{name}` of shape {pretty}, got {shape}.")


def _match(shape: Sequence[int], parts: Sequence[str]) -> bool:
    return all(not p.isdigit() or int(p) == s for s, p in zip(shape, parts))


def _check_choice(value: Any, choices: Sequence[Any], name: str) -> None:
    """Raise ``ValueError`` "Argument `name` must be one of (...), got 'x'." when not in ``choices``."""
    if value not in choices:
        raise ValueError(f"Argument `{name}` must be one of {tuple(choices)}, got {value!r}.")


def _check_range(
    value: float, name: str, low: float | None = None, high: float | None = None, *, low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise ``ValueError`` naming the option and its allowed range when ``value`` is outside it."""
    ok = True
    if low is not None:
        ok &= value >= low if low_inclusive else value > low
    if high is not None:
        ok &= value <= high if high_inclusive else value < high
    if not ok:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = ("[" if low_inclusive else "(") + f"{lo}, {hi}" + ("]" if high_inclusive else ")")
        raise ValueError(f"Argument `{name}` must be in {interval}, got {value!r}.")


def _check_int(
    value: Any, name: str, low: float | None = None, high: float | None = None, *, allow_none: bool = False
) -> None:
    """Raise ``TypeError`` unless ``value`` is an int (not a bool), then check its range."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an int or None" if allow_none else "an int"
        raise TypeError(f"Expected `{name}` to be {kind}, got {type(value).__name__}.")
    _check_range(value, name, low, high)


def _check_grid(grid_hw: Any, n: int | None = None) -> tuple[int, int]:
    """Check a token grid ``(gh, gw)`` of positive ints (with ``gh * gw == n`` when ``n`` is given)."""
    if not (isinstance(grid_hw, Sequence) and len(grid_hw) == 2
            and all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid_hw)):
        raise ValueError(f"Expected `grid_hw` to be two positive ints (gh, gw), got {grid_hw!r}.")
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    if n is not None and gh * gw != n:
        raise ValueError(f"Expected `grid_hw` with gh * gw == N = {n}, got {(gh, gw)}.")
    return gh, gw
