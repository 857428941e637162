"""Shared fixtures: ``device`` (cpu, plus cuda when available) and test panoramas made on the fly."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import pytest
import torch

_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Real photographs next to the repository (../shared/panoramas); tests using them skip when absent.
SHARED_PANORAMAS = Path(__file__).resolve().parents[1].parent / "shared" / "panoramas"


@pytest.fixture(params=_DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


def _erp_directions(height: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Unit directions ``(3, H, 2H)`` of the ERP pixel centres (x right, y up, z forward)."""
    width = 2 * height
    lon = ((torch.arange(width, dtype=dtype) + 0.5) / width - 0.5) * 2 * torch.pi
    lat = (0.5 - (torch.arange(height, dtype=dtype) + 0.5) / height) * torch.pi
    lat, lon = torch.meshgrid(lat, lon, indexing="ij")
    return torch.stack([lat.cos() * lon.sin(), lat.sin(), lat.cos() * lon.cos()])


@lru_cache(maxsize=16)
def _textured(height: int, seed: int, max_freq: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    dirs = _erp_directions(height).reshape(3, -1)  # (3, H*W)
    scale = 1 + (max_freq - 1) * torch.rand(3, 8, 1, generator=gen, dtype=torch.float64)
    freqs = torch.nn.functional.normalize(torch.randn(3, 8, 3, generator=gen, dtype=torch.float64), dim=-1) * scale
    phase = torch.rand(3, 8, 1, generator=gen, dtype=torch.float64) * 2 * torch.pi
    val = torch.sin(freqs @ dirs + phase).sum(dim=1) / 8 ** 0.5  # (3, H*W)
    return torch.sigmoid(1.5 * val).reshape(3, height, 2 * height)


@pytest.fixture
def textured_panorama() -> Callable[..., torch.Tensor]:
    """Factory: a smooth random texture defined on the sphere (seamless at the seam and poles).

    ``textured_panorama(height=128, seed=0, max_freq=6.0) -> (3, H, 2H)`` float64 in [0, 1].
    """

    def make(height: int = 128, seed: int = 0, max_freq: float = 6.0) -> torch.Tensor:
        return _textured(height, seed, float(max_freq)).clone()

    return make


@pytest.fixture
def direction_panorama() -> Callable[..., torch.Tensor]:
    """Factory: ``direction_panorama(height) -> (3, H, 2H)``; each pixel holds ``(d + 1) / 2`` of its direction."""

    def make(height: int = 128) -> torch.Tensor:
        return (_erp_directions(height) + 1) / 2

    return make

