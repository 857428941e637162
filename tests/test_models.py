"""Tests of panoviz_callback.models: resamplers, VICReg, the data module and the training module."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from panoviz_callback.models import VICRegOverlapLoss, build_resampler, strip_correspondence
from panoviz_callback.models.resamplers import MLPResampler
from panoviz_callback.models.vicreg import vicreg_terms


# ---------------------------------------------------------------------------------------------- resamplers
@pytest.mark.parametrize(
    ("kind", "out_dim", "expected_n", "layout"),
    [("identity", 32, 12, "grid"), ("mlp", 24, 12, "grid"), ("qformer", 24, 5, "queries"), ("perceiver", 24, 5, "queries")],
)
def test_resampler_cardinality(kind, out_dim, expected_n, layout):
    torch.manual_seed(0)
    r = build_resampler(kind, 32, out_dim, num_queries=5)
    out = r(torch.randn(3, 12, 32))
    assert out.shape == (3, expected_n, out_dim)
    assert r.output_layout == layout
    assert (r.in_dim, r.out_dim) == (32, out_dim)
    assert torch.isfinite(out).all()
    if layout == "queries":
        assert r.num_queries == 5
        out.sum().backward()
        assert r.queries.grad is not None and r.queries.grad.abs().sum() > 0


def test_resampler_identity_is_identity():
    r = build_resampler("identity", 16)
    x = torch.randn(2, 4, 16)
    assert isinstance(r, nn.Identity) and r(x) is x and r.out_dim == 16


@pytest.mark.parametrize(("in_dim", "out_dim"), [(48, 32), (32, 48)])
def test_mlp_structure_matches_panollava(in_dim, out_dim):
    r = build_resampler("mlp", in_dim, out_dim)
    kinds = [type(m) for m in r.mlp]
    assert kinds == [nn.Linear, nn.LayerNorm, nn.GELU, nn.Linear, nn.LayerNorm, nn.GELU, nn.Linear]
    hidden = max(in_dim, out_dim)
    assert r.hidden_dim == hidden
    shapes = {k: tuple(v.shape) for k, v in r.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (hidden, in_dim), "mlp.0.bias": (hidden,),
        "mlp.1.weight": (hidden,), "mlp.1.bias": (hidden,),
        "mlp.3.weight": (hidden, hidden), "mlp.3.bias": (hidden,),
        "mlp.4.weight": (hidden,), "mlp.4.bias": (hidden,),
        "mlp.6.weight": (out_dim, hidden), "mlp.6.bias": (out_dim,),
    }
    assert r.mlp[1].eps == 1e-5


def test_mlp_loads_a_panollava_state_dict():
    # PanoLLaVA's MLPResampler(vision_dim, latent_dim) layout, written out independently
    hidden = 40
    ref = nn.Sequential(nn.Linear(40, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, hidden),
                        nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, 24))
    ckpt = {f"model.resampler_module.resampler.mlp.{k}": v for k, v in ref.state_dict().items()}
    prefix = "model.resampler_module.resampler."
    r = build_resampler("mlp", 40, 24)
    r.load_state_dict({k[len(prefix):]: v for k, v in ckpt.items()}, strict=True)
    x = torch.randn(2, 6, 40)
    torch.testing.assert_close(r(x), ref(x))


def test_resampler_exceptions():
    with pytest.raises(ValueError, match="Argument `kind` must be one of"):
        build_resampler("mlps", 8, 8)
    with pytest.raises(ValueError, match="`out_dim` must equal `in_dim`"):
        build_resampler("identity", 8, 16)
    with pytest.raises(ValueError, match="`heads` must divide"):
        build_resampler("qformer", 8, 30, heads=4)
    with pytest.raises(ValueError, match="Argument `num_queries` must be in"):
        build_resampler("perceiver", 8, 16, num_queries=0)
    with pytest.raises(ValueError, match=r"Expected `tokens` of shape \(V, N, 8\)"):
        build_resampler("qformer", 8, 16)(torch.zeros(2, 3, 9))


# ---------------------------------------------------------------------------------------------- VICReg
def _reference_terms(a: np.ndarray, b: np.ndarray, gamma=1.0, eps=1e-4):
    """Per-pair VICReg terms written out with NumPy loops (Bardes et al. 2022 reference code)."""
    m, d = a.shape
    inv = ((a - b) ** 2).mean()

    def var(x):
        return np.mean([max(0.0, gamma - math.sqrt(x[:, k].var(ddof=1) + eps)) for k in range(d)])

    def cov(x):
        c = np.cov(x, rowvar=False, ddof=1)
        return sum(c[p, q] ** 2 for p in range(d) for q in range(d) if p != q) / d

    return inv, 0.5 * (var(a) + var(b)), cov(a) + cov(b)


def test_vicreg_terms_known_values():
    x = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])[None]  # decorrelated, var 4/3
    inv, var, cov = vicreg_terms(x, x)
    assert inv.item() == 0.0 and var.item() == 0.0 and cov.item() == pytest.approx(0.0, abs=1e-12)
    inv, _, _ = vicreg_terms(x, x + 1.0)
    assert inv.item() == pytest.approx(1.0)
    const = torch.full((1, 5, 3), 0.7)
    _, var, cov = vicreg_terms(const, const)
    assert var.item() == pytest.approx(1.0 - math.sqrt(1e-4))  # gamma - sqrt(eps) = 0.99 on each side
    assert cov.item() == 0.0
    _, var, _ = vicreg_terms(const, const, gamma=2.0)
    assert var.item() == pytest.approx(1.99)
    y = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])[None]  # fully correlated: cov = [[1, 1], [1, 1]]
    _, _, cov = vicreg_terms(y, y)
    assert cov.item() == pytest.approx(2 * (2 * 1.0**2) / 2)


def test_vicreg_loss_against_numpy_reference():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 3, 6, 4, generator=g, dtype=torch.float64)  # (B, V, N, D)
    pairs = [(0, 1), (1, 2), (2, 0)]
    corr = {(0, 1): (torch.tensor([1, 2, 5]), torch.tensor([0, 3, 4])),
            (1, 2): (torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 4, 5])),
            (2, 0): (torch.tensor([4]), torch.tensor([0]))}  # one token pair only: skipped
    loss_fn = VICRegOverlapLoss(sim_weight=2.0, var_weight=3.0, cov_weight=0.5, gamma=1.5)
    loss, terms = loss_fn(feats, pairs, corr)
    f = feats.numpy()
    ref = np.mean([_reference_terms(f[bb, i][corr[(i, j)][0]], f[bb, j][corr[(i, j)][1]], gamma=1.5)
                   for bb in range(2) for i, j in pairs[:2]], axis=0)
    got = [terms["invariance"].item(), terms["variance"].item(), terms["covariance"].item()]
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert loss.item() == pytest.approx(2.0 * ref[0] + 3.0 * ref[1] + 0.5 * ref[2], rel=1e-5)
    assert loss.dtype == torch.float32


def test_vicreg_query_layout_pairs_same_index():
    feats = torch.randn(1, 2, 5, 3)
    loss_fn = VICRegOverlapLoss()
    _, by_index = loss_fn(feats, [(0, 1)], None)
    ar = torch.arange(5)
    _, explicit = loss_fn(feats, [(0, 1)], {(0, 1): (ar, ar)})
    for k in by_index:
        torch.testing.assert_close(by_index[k], explicit[k])


def test_vicreg_no_overlap_gives_differentiable_zero():
    feats = torch.randn(1, 2, 4, 3, requires_grad=True)
    loss, terms = VICRegOverlapLoss()(feats, [(0, 1)], {(0, 1): (torch.zeros(0, dtype=torch.long),) * 2})
    assert loss.item() == 0.0 and terms["variance"].item() == 0.0
    loss.backward()
    assert feats.grad is not None


def test_vicreg_exceptions():
    with pytest.raises(ValueError, match="Argument `pairing` must be one of"):
        VICRegOverlapLoss(pairing="columns")
    with pytest.raises(ValueError, match="Argument `sim_weight` must be in"):
        VICRegOverlapLoss(sim_weight=-1.0)
    with pytest.raises(ValueError, match=r"Expected `feats` of shape \(B, V, N, D\)"):
        VICRegOverlapLoss()(torch.zeros(2, 4, 8), [(0, 1)], None)


def test_strip_correspondence_convention():
    idx_i, idx_j = strip_correspondence((2, 4), 0.5)
    assert idx_i.tolist() == [2, 3, 6, 7] and idx_j.tolist() == [0, 1, 4, 5]
    idx_i, idx_j = strip_correspondence((3, 7), 0.5)  # k = int(3.5) = 3 columns
    assert idx_i.tolist() == [4, 5, 6, 11, 12, 13, 18, 19, 20]
    assert idx_j.tolist() == [0, 1, 2, 7, 8, 9, 14, 15, 16]
    assert strip_correspondence((2, 4), 0.01)[0].tolist() == [3, 7]  # at least one column
    with pytest.raises(ValueError, match="Argument `overlap` must be in"):
        strip_correspondence((2, 4), 0.0)
