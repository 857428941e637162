"""Availability flags for optional dependencies (import the library inside the function)."""

from __future__ import annotations

import importlib.util

__all__ = ["_LPIPS_AVAILABLE", "_WANDB_AVAILABLE", "_SCIPY_AVAILABLE", "_TORCHVISION_AVAILABLE", "require"]


def _available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


_LPIPS_AVAILABLE = _available("lpips")
_WANDB_AVAILABLE = _available("wandb")
_SCIPY_AVAILABLE = _available("scipy")
_TORCHVISION_AVAILABLE = _available("torchvision")

_EXTRA_FOR = {"lpips": "lpips", "torchvision": "lpips", "wandb": "wandb"}


def require(name: str, feature: str) -> None:
    """Raise ``ModuleNotFoundError`` naming the pip command when ``name`` is missing."""
    if not _available(name):
        extra = _EXTRA_FOR.get(name)
        hint = f"pip install 'panoviz_callback[{extra}]'" if extra else f"pip install {name}"
        raise ModuleNotFoundError(f"{feature} needs the `{name}` package: {hint}")
