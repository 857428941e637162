"""Tests of panoviz_callback.background: letterbox padding, the robust threshold rule, outlier test."""

from __future__ import annotations

import pytest
import torch

from panoviz_callback.background import padding_tokens
from panoviz_callback.pca import pca_rgb
from panoviz_callback.views import make_views


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("size", "grid"), [(224, 7), (224, 14), (256, 16), (336, 24), (384, 27), (64, 4)])
def test_padding_tokens_match_the_black_bars(size: int, grid: int) -> None:
    """Independent: cut a white panorama; a token is padding iff every pixel of its cell is black."""
    views = make_views(torch.ones(3, 64, 128), "anyres_e2p", image_size=size)
    got = padding_tokens(views, (grid, grid))
    assert got.shape == (len(views), grid * grid)
    lit = views.pixels.amax(1)  # (V, S, S), 0 only in the letterbox bars
    edges = [round(r * size / grid) for r in range(grid + 1)]
    want = torch.zeros(len(views), grid, grid, dtype=torch.bool)
    for r in range(grid):
        for c in range(grid):
            cell = lit[:, edges[r]:edges[r + 1], edges[c]:edges[c + 1]]
            want[:, r, c] = cell.flatten(1).amax(1) == 0
    # cells whose edges fall inside a pixel row count that row on both sides: compare on whole-pixel cells
    exact = torch.tensor([r * size % grid == 0 and (r + 1) * size % grid == 0 for r in range(grid)])
    assert torch.equal(got.reshape(-1, grid, grid)[:, exact], want[:, exact])
    assert got[0].any() and not got[1:].any()  # only the global view has bars


def test_padding_tokens_no_global_view() -> None:
    views = make_views(torch.rand(3, 32, 64), "e2p", image_size=32)
    assert not padding_tokens(views, (4, 4)).any()


def _planted(m: int = 784, d: int = 48, bg_fraction: float = 0.4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    is_fg = torch.rand(m, generator=g) >= bg_fraction
    offset = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0) * 12.0
    varied = torch.randn(m, 8, generator=g) @ torch.linalg.qr(torch.randn(d, 8, generator=g)).Q.T
    x = torch.randn(d, generator=g) + 0.05 * torch.randn(m, d, generator=g)
    x[is_fg] += offset + varied[is_fg]
    return x, is_fg


@pytest.mark.parametrize("push", [-200.0, 20.0, 200.0])
def test_threshold_one_extreme_token_leaves_the_mask_alone(push: float) -> None:
    """Min-max scaling let one token pushed far along PC1 turn every other token into foreground;
    the percentile scaling and the clipped mixture test do not notice it."""
    x, is_fg = _planted()
    _, fg_ref, state = pca_rgb(x.reshape(16, 49, 48), (7, 7))
    assert (fg_ref.reshape(-1) == is_fg).float().mean() > 0.98 and state.note is None
    pushed = x.clone()
    pushed[5] += push * state.fg_basis
    _, fg, state2 = pca_rgb(pushed.reshape(16, 49, 48), (7, 7))
    assert state2.note is None
    assert torch.equal(fg.reshape(-1)[6:], fg_ref.reshape(-1)[6:]) and torch.equal(fg.reshape(-1)[:5],
                                                                                 fg_ref.reshape(-1)[:5])


@pytest.mark.parametrize(("m", "d", "seed"), [(784, 64, 0), (8 * 196, 768, 1), (729, 32, 2)])
def test_gaussian_tokens_keep_nearly_all(m: int, d: int, seed: int) -> None:
    """Clean Gaussian tokens: no background (not bimodal: every token kept, and the note says so), and
    the outlier test removes under 1% of the tokens."""
    x = torch.randn(m, d, generator=_gen(seed)) * torch.linspace(3.0, 0.5, d)
    _, fg, state = pca_rgb(x[None], (1, m))
    assert fg.all() and "not bimodal" in state.note and "kept every token" in state.note
    _, inliers, state = pca_rgb(x[None], (1, m), bg_removal="outlier_removal")
    assert (~inliers).float().mean() < 0.01
    assert state.note is None


def test_outlier_removal_finds_planted_outliers_at_one_percent() -> None:
    g = _gen(4)
    m, d = 1000, 64
    x = torch.randn(m, d, generator=g) * torch.linspace(2.0, 0.5, d)
    planted = torch.zeros(m, dtype=torch.bool)
    planted[torch.randperm(m, generator=g)[:10]] = True
    x[planted] += 12.0 * torch.nn.functional.normalize(torch.randn(10, d, generator=g), dim=1) * 2.0
    _, inliers, _ = pca_rgb(x.reshape(10, 100, d), (10, 10), bg_removal="outlier_removal")
    out = ~inliers.reshape(-1)
    assert out[planted].all()  # every planted outlier is removed
    assert out[~planted].float().mean() < 0.01  # and nearly no clean token


def test_threshold_bimodality_rule_is_reported() -> None:
    """Two modes of equal spread: separated (Ashman's D > 2) masks, overlapping (D < 2) keeps all."""
    g = _gen(7)
    d = 16
    direction = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    base = 0.2 * torch.randn(600, d, generator=g)
    side = torch.arange(600) % 2 == 0
    far = base + torch.where(side, 0.0, 6.0)[:, None] * direction  # D ~ sqrt(2) * 6 / sqrt(2 * 0.04) = 30
    near = base + torch.where(side, 0.0, 0.2)[:, None] * direction  # D ~ 1
    _, fg, state = pca_rgb(far[None], (1, 600))
    assert state.note is None and 0.4 < fg.float().mean() < 0.6
    _, fg, state = pca_rgb(near[None], (1, 600))
    assert fg.all() and "Ashman's D" in state.note


def test_flat_spread_is_not_bimodal():
    """A uniform PC1 has Ashman's D near 3 but no dip between its halves: nothing is masked."""
    from panoviz_callback.background import _ashman_d

    torch.manual_seed(0)
    flat = torch.rand(1568)
    d, small, valley = _ashman_d(flat)
    assert d > 2 and small > 0.4 and valley > 0.8
    two = torch.cat([torch.randn(1000), torch.randn(500) + 6])
    d, small, valley = _ashman_d(two)
    assert d > 2 and valley < 0.1
    feats = torch.randn(2, 16, 4) * 0.01
    feats[..., 0] += torch.rand(2, 16)  # PC1 spreads evenly
    _, fg, state = pca_rgb(feats, (4, 4), bg_removal="threshold")
    assert bool(fg.all()) and "not bimodal" in state.note and "valley ratio" in state.note
