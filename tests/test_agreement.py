"""Tests of panoviz_callback.agreement: entropy, query agreement and the agreement panorama."""

from __future__ import annotations

import math

import pytest
import torch

from panoviz_callback.agreement import agreement_panorama, attention_entropy, query_agreement, token_agreement
from panoviz_callback.correspondence import patch_correspondence
from panoviz_callback.projection import lonlat_to_direction, pixel_to_direction
from panoviz_callback.views import make_views

_S, _PATCH = 64, 8
_G = _S // _PATCH  # 8 x 8 tokens


def _views():
    return make_views(torch.rand(3, 64, 128), "e2p", image_size=_S, patch_size=_PATCH)  # 8 tiles, 45 deg apart


def _token_dirs(views) -> torch.Tensor:
    """Directions of every view's token centres, (V, N, 3)."""
    c = (torch.arange(_G, dtype=torch.float64) + 0.5) * _S / _G - 0.5
    xy = torch.stack(torch.meshgrid(c, c, indexing="xy"), -1).reshape(1, -1, 2)
    return pixel_to_direction(xy, views.cameras, _S)[0]


def _scene_features(dirs: torch.Tensor, dim: int = 64, seed: int = 0) -> torch.Tensor:
    """A feature that depends on the scene point only (smooth random Fourier features of the direction)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(3, dim // 2, generator=gen, dtype=torch.float64) * 1.5
    b = torch.rand(dim // 2, generator=gen, dtype=torch.float64) * 2 * math.pi
    z = dirs @ w + b
    return torch.cat([z.sin(), z.cos()], -1).float()


def _inside_tile(dirs: torch.Tensor, yaw: float, margin: float = 0.0) -> torch.Tensor:
    """Independent check: strictly inside a 90-degree tile at ``yaw`` (pitch 0), ``margin`` in tan units."""
    a = math.radians(yaw)
    x, y, z = dirs.unbind(-1)
    xc, zc = x * math.cos(a) - z * math.sin(a), x * math.sin(a) + z * math.cos(a)
    zs = torch.where(zc > 1e-9, zc, torch.ones_like(zc))
    lim = 1 - margin
    return (zc > 1e-9) & ((xc / zs).abs() < lim) & ((y / zs).abs() < lim)


def _erp_dirs(h: int, w: int) -> torch.Tensor:
    lon = ((torch.arange(w, dtype=torch.float64) + 0.5) / w - 0.5) * 360
    lat = (0.5 - (torch.arange(h, dtype=torch.float64) + 0.5) / h) * 180
    return lonlat_to_direction(*torch.meshgrid(lon, lat, indexing="xy"))  # (H, W, 3)


# ------------------------------------------------------------------------- entropy
def test_entropy_known_answers():
    attn = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [5, 5, 0, 0]])
    torch.testing.assert_close(attention_entropy(attn), torch.tensor([0.0, 1.0, 0.5, 0.5]))
    with pytest.raises(ValueError, match=r"Expected `attn` of shape \(\.\.\., N\) with N > 1"):
        attention_entropy(torch.ones(3, 1))


# ------------------------------------------------------------------------- query agreement
def test_query_agreement_known_answers():
    views = _views()
    n = _G * _G
    uniform = torch.full((8, 2, n), 1.0 / n)
    torch.testing.assert_close(query_agreement(uniform, views, (_G, _G)), torch.ones(8))
    # query 0 of view 0 looks only at the first half of the shared tokens, view 1 at the second half
    idx_0, idx_1 = patch_correspondence(views, 0, 1, (_G, _G))
    order = torch.argsort(idx_0)
    half = len(order) // 2
    disjoint = torch.full((8, 1, n), 1e-9)
    disjoint[0, 0, idx_0[order[:half]]] = 1.0
    keep = set(idx_1[order[:half]].tolist())
    second = [t for t in idx_1[order[half:]].tolist() if t not in keep]
    disjoint[1, 0, second] = 1.0
    assert float(query_agreement(disjoint, views, (_G, _G), [(0, 1)])[0]) == pytest.approx(0.0, abs=1e-5)


def test_query_agreement_scene_attention_is_high_and_shifted_is_low():
    views = _views()
    target = lonlat_to_direction(torch.tensor(22.5, dtype=torch.float64), torch.tensor(5.0, dtype=torch.float64))
    logits = (_token_dirs(views) @ target) * 40.0  # (V, N): every view attends the same scene point
    attn = torch.softmax(logits.float(), -1).unsqueeze(1)
    assert float(query_agreement(attn, views, (_G, _G), [(0, 1)])[0]) > 0.7  # partners are up to half a token off
    flipped = attn.flip(-1)  # view-local, not scene-bound
    assert float(query_agreement(flipped, views, (_G, _G), [(0, 1)])[0]) < 0.5


# ------------------------------------------------------------------------- agreement panorama
def test_token_agreement_scene_features():
    views = _views()
    feats = _scene_features(_token_dirs(views))
    values = token_agreement(feats, views, (_G, _G))  # (P, N)
    for p, (i, j) in enumerate(views.pairs):
        idx_i, _ = patch_correspondence(views, i, j, (_G, _G))
        defined = torch.isfinite(values[p])
        assert defined.nonzero().squeeze(1).tolist() == sorted(idx_i.tolist())
        assert float(values[p][defined].min()) > 0.9


def test_agreement_panorama_is_high_exactly_where_views_overlap():
    views = _views()
    hw = (64, 128)
    feats = _scene_features(_token_dirs(views))
    pano = agreement_panorama(feats, views, (_G, _G), hw)
    dirs = _erp_dirs(*hw)
    inside = [_inside_tile(dirs, cam.yaw_deg) for cam in views.cameras]
    core = [_inside_tile(dirs, cam.yaw_deg, margin=0.3) for cam in views.cameras]  # a token and a bit inside
    overlap = torch.zeros(hw, dtype=torch.bool)
    overlap_core = torch.zeros(hw, dtype=torch.bool)
    for i, j in views.pairs:
        overlap |= inside[i] & inside[j]
        overlap_core |= core[i] & core[j]
    finite = torch.isfinite(pano)
    assert overlap_core.any() and not (finite & ~overlap).any()  # nothing outside the overlaps
    assert finite[overlap_core].all()  # everything inside them, up to a token at the borders
    assert float(pano[finite].min()) > 0.9  # high: the features are a function of the scene point

    broken = feats.clone()
    broken[3] = torch.randn(broken[3].shape, generator=torch.Generator().manual_seed(3))  # view 3 disagrees
    pano = agreement_panorama(broken, views, (_G, _G), hw)
    with_3 = (inside[2] & inside[3]) | (inside[3] & inside[4])
    without_3 = overlap & ~inside[3]
    assert float(pano[with_3 & torch.isfinite(pano)].mean()) < 0.5
    assert float(pano[without_3 & torch.isfinite(pano)].min()) > 0.9


def test_agreement_panorama_edge_cases():
    views = make_views(torch.rand(3, 64, 128), "cubemap", image_size=32, faces=6, patch_size=8)
    pano = agreement_panorama(torch.rand(6, 16, 4), views, (4, 4), (8, 16))
    assert pano.shape == (8, 16) and not torch.isfinite(pano).any()  # cube faces never overlap
    with pytest.raises(ValueError, match=r"Expected `grid_hw` with gh \* gw == N = 16"):
        agreement_panorama(torch.rand(6, 16, 4), views, (4, 5))
