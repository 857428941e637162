"""Known-answer tests for panoviz_callback.metrics (references: skimage, scipy, NumPy CKA)."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity

from panoviz_callback import metrics
from panoviz_callback.correspondence import patch_correspondence
from panoviz_callback.metrics import (
    LPIPSMetric,
    debiased_cka,
    hungarian_accuracy,
    hungarian_cosine,
    linear_cka,
    matching_ceiling,
    matching_chance,
    nn_accuracy,
    overlap_cka,
    overlap_cosine,
    overlap_cosine_pairs,
    overlap_debiased_cka,
    overlap_hungarian,
    ssim,
    token_cosine,
)
from panoviz_callback.projection import pixel_to_direction
from panoviz_callback.views import make_views

def _t(x):
    return torch.as_tensor(np.asarray(x))


# ---------------------------------------------------------------- NumPy references


def _np_linear_cka_hsic(x, y):
    """Biased HSIC with linear kernels and the centring matrix H: tr(K H L H)."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def _np_debiased_cka_ucentre(x, y):
    """Debiased CKA through U-centred Gram matrices (Szekely & Rizzo 2014), not the Song et al. sum formula."""

    def ucentre(g):
        n = g.shape[0]
        g = g.copy()
        np.fill_diagonal(g, 0)
        means = g.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        g -= means[:, None] + means[None, :]
        np.fill_diagonal(g, 0)
        return g

    k, l = ucentre(x @ x.T), ucentre(y @ y.T)
    return (k * l).sum() / (np.linalg.norm(k) * np.linalg.norm(l))


def _np_uncentred_cka(x, y):
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def _skimage_ssim(a, b):
    """a, b: (C, h, w) float64 arrays."""
    return structural_similarity(
        a.transpose(1, 2, 0), b.transpose(1, 2, 0), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=1, channel_axis=-1,
    )


def _smooth(rng, shape):
    p, c, h, w = shape
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    f = rng.uniform(0.5, 3, size=(p, c, 1, 1))
    ph = rng.uniform(0, 6, size=(p, c, 1, 1))
    return 0.5 + 0.4 * np.sin(2 * np.pi * f * (xx + 0.7 * yy) + ph)


# ---------------------------------------------------------------- identical views


def test_smoke_identical_views_give_one(device):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 16, 8, generator=g).to(device)
    idx = torch.arange(16, device=device)
    assert torch.allclose(token_cosine(feats, feats), torch.ones(2, device=device), atol=1e-6)
    assert overlap_cosine(feats[0], feats[0], idx, idx).item() == pytest.approx(1, abs=1e-6)
    cos, cols = hungarian_cosine(feats[0], feats[0])
    assert cos.item() == pytest.approx(1, abs=1e-6)
    assert torch.equal(cols, idx)
    assert linear_cka(feats[0], feats[0]).item() == pytest.approx(1, abs=1e-6)
    assert debiased_cka(feats[0], feats[0]).item() == pytest.approx(1, abs=1e-6)
    img = torch.rand(2, 3, 24, 24, generator=g).to(device)
    assert torch.allclose(ssim(img, img), torch.ones(2, device=device), atol=1e-6)


def test_cardinality_and_dtype(device):
    a = torch.randn(3, 10, 4, dtype=torch.float64, device=device)
    out = token_cosine(a, a.half())
    assert out.shape == (3,) and out.dtype == torch.float32 and out.device.type == device.type
    assert linear_cka(a[0], a[1]).dtype == torch.float32
    assert ssim(torch.rand(3, 1, 12, 12), torch.rand(3, 1, 12, 12)).shape == (3,)


def test_autocast_does_not_lower_precision():
    g = torch.Generator().manual_seed(15)
    a, b = torch.randn(2, 32, 64, generator=g), torch.randn(2, 32, 64, generator=g)
    img_a, img_b = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    want = (hungarian_cosine(a[0], b[0])[0], linear_cka(a[0], b[0]), ssim(img_a, img_b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = (hungarian_cosine(a[0], b[0])[0], linear_cka(a[0], b[0]), ssim(img_a, img_b))
    for g_, w_ in zip(got, want):
        assert g_.dtype == torch.float32 and torch.equal(g_, w_)


# ---------------------------------------------------------------- cosines


def test_token_cosine_known_values():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [3.0, 0.0]]])
    y = torch.tensor([[[0.0, 1.0], [0.0, 5.0]], [[-2.0, -2.0], [-1.0, 0.0]]])
    assert torch.allclose(token_cosine(x, y), torch.tensor([0.5, -1.0]))
    assert token_cosine(torch.zeros(1, 2, 3), torch.ones(1, 2, 3)).item() == 0  # eps, no NaN


def test_overlap_cosine_matches_manual_and_empty_is_nan():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(9, 5, generator=g), torch.randn(7, 5, generator=g)
    ia, ib = torch.tensor([0, 4, 8]), torch.tensor([6, 1, 2])
    want = torch.nn.functional.cosine_similarity(a[ia], b[ib], dim=-1).mean()
    assert overlap_cosine(a, b, ia, ib).item() == pytest.approx(want.item(), abs=1e-6)
    empty = torch.empty(0, dtype=torch.long)
    assert math.isnan(overlap_cosine(a, b, empty, empty).item())


def test_overlap_cosine_pairs_equals_per_pair():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 12, 6, generator=g), torch.randn(3, 12, 6, generator=g)
    ia = [torch.tensor([0, 1, 2]), torch.empty(0, dtype=torch.long), torch.arange(12)]
    ib = [torch.tensor([5, 3, 11]), torch.empty(0, dtype=torch.long), torch.arange(12).flip(0)]
    got = overlap_cosine_pairs(a, b, ia, ib)
    want = [overlap_cosine(a[p], b[p], ia[p], ib[p]).item() for p in range(3)]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    assert math.isnan(got[1].item())
    assert overlap_cosine_pairs(a[:0], b[:0], [], []).shape == (0,)


def test_convention_scene_features_overlap_beats_token_cosine():
    """Features depend only on the viewing direction: view j sees directions shifted by 3 tokens."""
    g = torch.Generator().manual_seed(3)
    scene = torch.randn(40, 32, generator=g)  # one feature per direction along a ring
    a, b = scene[0:16], scene[3:19]  # (N, D) each; token n of b sees direction n + 3
    ia, ib = torch.arange(3, 16), torch.arange(0, 13)
    assert overlap_cosine(a, b, ia, ib).item() == pytest.approx(1, abs=1e-6)
    assert token_cosine(a[None], b[None]).item() < 0.3


# ---------------------------------------------------------------- Hungarian


@pytest.mark.parametrize("seed", range(5))
def test_hungarian_at_least_token_cosine(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(30, 16, generator=g)
    b = a + torch.randn(30, 16, generator=g)
    cos, _ = hungarian_cosine(a, b)
    assert cos.item() >= token_cosine(a[None], b[None]).item() - 1e-6


def test_hungarian_equals_brute_force_5x5():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    sim = (torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T).numpy()
    best = max(itertools.permutations(range(5)), key=lambda p: sum(sim[i, p[i]] for i in range(5)))
    cos, cols = hungarian_cosine(a, b)
    assert cols.tolist() == list(best)
    assert cos.item() == pytest.approx(np.mean([sim[i, best[i]] for i in range(5)]), abs=1e-6)


def test_hungarian_matches_scipy_reference_rectangular():
    rng = np.random.default_rng(5)
    for n, m in ((20, 20), (25, 18), (12, 30)):
        a, b = rng.standard_normal((n, 8)), rng.standard_normal((m, 8))
        sim = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
        rows, cols = linear_sum_assignment(sim, maximize=True)
        cos, assign = hungarian_cosine(_t(a), _t(b))
        assert cos.item() == pytest.approx(sim[rows, cols].mean(), abs=1e-5)
        want = np.full(n, -1)
        want[rows] = cols
        np.testing.assert_array_equal(assign.numpy(), want)
        assert (assign == -1).sum().item() == max(n - m, 0)


def test_hungarian_recovers_neighbour_permutation_and_accuracy():
    gh, gw = 4, 6
    n = gh * gw
    g = torch.Generator().manual_seed(6)
    a = torch.randn(n, 16, generator=g)
    perm = torch.arange(n).view(gh, gw // 2, 2).flip(-1).reshape(n)  # swap horizontal neighbours
    b = a[perm]  # token k of b is token perm[k] of a
    cos, assign = hungarian_cosine(a, b)
    assert cos.item() == pytest.approx(1, abs=1e-6)
    assert torch.equal(perm[assign], torch.arange(n))
    # geometric partner of a-token i is b-token i (same grid position): matches are one token away
    idx = torch.arange(n)
    assert hungarian_accuracy(assign, idx, idx, (gh, gw)) == 1.0
    far = torch.arange(n).roll(3)  # partners three columns away
    assert hungarian_accuracy(assign, idx, far, (gh, gw)) == 0.0
    empty = torch.empty(0, dtype=torch.long)
    assert math.isnan(hungarian_accuracy(assign, empty, empty, (gh, gw)))


def test_hungarian_accuracy_chebyshev_and_unmatched():
    # grid 3x3, centre token 4; assignment sends a-token 0 to 8 (diagonal of 4), 1 to 2 (2 columns from 0), 2 unmatched
    assign = torch.tensor([8, 2, -1, 0, 0, 0, 0, 0, 0])
    assert hungarian_accuracy(assign, torch.tensor([0]), torch.tensor([4]), (3, 3)) == 1.0
    assert hungarian_accuracy(assign, torch.tensor([1]), torch.tensor([0]), (3, 3)) == 0.0
    assert hungarian_accuracy(assign, torch.tensor([2]), torch.tensor([2]), (3, 3)) == 0.0
    # token 5 is (1, 2), token 3 is (1, 0): wrap-around must not count as adjacent
    wrap = torch.tensor([5, 0, 0, 0, 0, 0, 0, 0, 0])
    assert hungarian_accuracy(wrap, torch.tensor([0]), torch.tensor([6]), (3, 3)) == 0.0


# ---------------------------------------------------------------- CKA


def test_cka_golden_values():
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    assert linear_cka(_t(x), _t(y)).item() == pytest.approx(0.55761, abs=1e-4)
    assert debiased_cka(_t(x), _t(y)).item() == pytest.approx(0.51346, abs=1e-4)
    assert linear_cka(_t(x).float(), _t(y).float()).item() == pytest.approx(0.55761, abs=1e-4)


@pytest.mark.parametrize(("n", "d1", "d2"), [(50, 8, 12), (20, 64, 40), (100, 10, 10)])
def test_cka_matches_numpy_kernel_references(n, d1, d2):
    rng = np.random.default_rng(n + d1)
    x = rng.standard_normal((n, d1)) + 2.0
    y = x @ rng.standard_normal((d1, d2)) + rng.standard_normal((n, d2))
    assert linear_cka(_t(x), _t(y)).item() == pytest.approx(_np_linear_cka_hsic(x, y), abs=1e-5)
    assert debiased_cka(_t(x), _t(y)).item() == pytest.approx(_np_debiased_cka_ucentre(x, y), abs=1e-5)


@pytest.mark.parametrize("fn", [linear_cka, debiased_cka])
def test_cka_invariances(fn):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((120, 12))
    y = x @ rng.standard_normal((12, 12)) + 0.5 * rng.standard_normal((120, 12))
    base = fn(_t(x), _t(y)).item()
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    assert fn(_t(x @ q), _t(y)).item() == pytest.approx(base, abs=1e-5)  # orthogonal
    assert fn(_t(7.5 * x), _t(0.1 * y)).item() == pytest.approx(base, abs=1e-5)  # isotropic scaling
    assert fn(_t(x + 3.0), _t(y - rng.standard_normal(12))).item() == pytest.approx(base, abs=1e-5)  # translation
    # an invertible but anisotropic map changes the value clearly
    assert fn(_t(x), _t(x)).item() == pytest.approx(1, abs=1e-6)
    assert fn(_t(x), _t(x @ np.diag(np.logspace(-2, 1, 12)))).item() < 0.8


def test_cka_noise_bias_and_centring():
    """Independent noise at N=256 tokens, D=1152 dims.

    Centred linear CKA is biased towards D / (D + N) = 0.82 when D > N (centring does not
    remove that bias); debiased CKA is near 0. A shared offset (real tokens have one) drives
    the uncentred formula to ~1, while centring makes CKA ignore it.
    """
    rng = np.random.default_rng(8)
    n, d = 256, 1152
    x, y = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    offset = 3.0 * rng.standard_normal(d)
    lin = linear_cka(_t(x), _t(y)).item()
    assert lin == pytest.approx(d / (d + n), abs=0.03)
    assert abs(debiased_cka(_t(x), _t(y)).item()) < 0.05
    assert linear_cka(_t(x + offset), _t(y + offset)).item() == pytest.approx(lin, abs=1e-5)
    assert abs(debiased_cka(_t(x + offset), _t(y + offset)).item()) < 0.05
    assert _np_uncentred_cka(x + offset, y + offset) > 0.99


def test_cka_exceptions():
    with pytest.raises(ValueError, match="same number of samples N, got 5 and 6"):
        linear_cka(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(ValueError, match="more than 3 samples for `debiased_cka`, got N=3"):
        debiased_cka(torch.randn(3, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"Expected `x` of shape \(N, D\), got \(5,\)"):
        linear_cka(torch.randn(5), torch.randn(5, 2))


# ---------------------------------------------------------------- batched over the views of a probe (analysis)


@pytest.mark.parametrize("d", [12, 40])  # N = 20 >= D: feature-form linear CKA; N < D: Gram form
@pytest.mark.parametrize("threads", [1, 2])
def test_views_helpers_equal_per_pair_functions(d, threads):
    g = torch.Generator().manual_seed(16)
    feats = torch.randn(5, 20, d, generator=g) + torch.randn(d, generator=g)  # (V, N, D), a shared offset
    feats[1] = feats[0] + 0.3 * torch.randn(20, d, generator=g)  # one similar pair
    pairs = [(0, 1), (1, 2), (2, 3), (4, 0), (3, 1)]
    ii, jj = torch.tensor([i for i, _ in pairs]), torch.tensor([j for _, j in pairs])
    units = metrics._unit(feats)
    want = torch.stack([token_cosine(feats[i][None], feats[j][None])[0] for i, j in pairs])
    torch.testing.assert_close(metrics._token_cosine_views(units, ii, jj), want, atol=1e-6, rtol=0)

    idx_a = [torch.tensor([0, 5, 7]), torch.empty(0, dtype=torch.long), torch.arange(20), torch.tensor([3]),
             torch.tensor([1, 2])]
    idx_b = [torch.tensor([2, 5, 19]), torch.empty(0, dtype=torch.long), torch.arange(20).flip(0), torch.tensor([3]),
             torch.tensor([0, 9])]
    got = metrics._overlap_cosine_views(units, ii, jj, idx_a, idx_b)
    want = overlap_cosine_pairs(feats[ii], feats[jj], idx_a, idx_b)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0, equal_nan=True)

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # 2: the assignments are solved in a thread pool
    try:
        cos, cols = metrics._hungarian_views(units, ii, jj)
    finally:
        torch.set_num_threads(previous)
    grid = (4, 5)
    for p, (i, j) in enumerate(pairs):
        want_cos, want_cols = hungarian_cosine(feats[i], feats[j])
        assert torch.equal(cols[p], want_cols)
        assert cos[p].item() == pytest.approx(want_cos.item(), abs=1e-6)
    acc = metrics._hungarian_accuracy_views(cols, idx_a, idx_b, grid)
    want = [hungarian_accuracy(cols[p], idx_a[p], idx_b[p], grid) for p in range(len(pairs))]
    np.testing.assert_allclose(acc.numpy(), want, atol=1e-6)

    grams = metrics._cka_grams(feats)
    want_lin = torch.stack([linear_cka(feats[i], feats[j]) for i, j in pairs])
    want_deb = torch.stack([debiased_cka(feats[i], feats[j]) for i, j in pairs])
    torch.testing.assert_close(metrics._linear_cka_views(grams, ii, jj), want_lin, atol=1e-6, rtol=0)
    torch.testing.assert_close(metrics._linear_cka_features(feats, ii, jj), want_lin, atol=1e-6, rtol=0)
    torch.testing.assert_close(metrics._debiased_cka_views(grams, ii, jj), want_deb, atol=1e-6, rtol=0)


def test_views_cka_golden_values():
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    feats = torch.stack([_t(x), _t(y)]).float()  # float32 tokens: float32 Gram products
    grams = metrics._cka_grams(feats)
    ii, jj = torch.tensor([0]), torch.tensor([1])
    assert metrics._linear_cka_views(grams, ii, jj).item() == pytest.approx(0.55761, abs=1e-4)
    assert metrics._linear_cka_features(feats, ii, jj).item() == pytest.approx(0.55761, abs=1e-4)
    assert metrics._debiased_cka_views(grams, ii, jj).item() == pytest.approx(0.51346, abs=1e-4)


# ---------------------------------------------------------------- SSIM


@pytest.mark.parametrize(("size", "kind"), [(32, "random"), (64, "smooth"), (64, "random"), ((40, 57), "smooth"),
                                            (224, "random"), (224, "smooth")])
def test_ssim_matches_skimage(size, kind):
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(h + w)
    shape = (3 if h < 224 else 2, 3, h, w)
    a = rng.random(shape) if kind == "random" else _smooth(rng, shape)
    b = np.clip(a + 0.15 * rng.standard_normal(shape), 0, 1) if kind == "random" else _smooth(rng, shape)
    got = ssim(_t(a), _t(b)).numpy()
    want = [_skimage_ssim(a[p], b[p]) for p in range(shape[0])]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_ssim_single_channel_matches_skimage():
    rng = np.random.default_rng(9)
    a, b = rng.random((1, 1, 30, 30)), rng.random((1, 1, 30, 30))
    want = structural_similarity(a[0, 0], b[0, 0], gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=1)
    assert ssim(_t(a), _t(b)).item() == pytest.approx(want, abs=1e-4)


def test_ssim_mask_is_window_eroded_mean_of_skimage_map():
    rng = np.random.default_rng(10)
    a = _smooth(rng, (1, 3, 48, 48))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    mask = np.zeros((48, 48), bool)
    mask[10:40, 5:30] = True
    _, smap = structural_similarity(a[0].transpose(1, 2, 0), b[0].transpose(1, 2, 0), gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1, channel_axis=-1, full=True)
    smap = smap.mean(-1)
    eroded = np.zeros_like(mask)
    eroded[15:35, 10:25] = True  # window radius 5
    got = ssim(_t(a), _t(b), _t(mask)[None]).item()
    assert got == pytest.approx(smap[eroded].mean(), abs=1e-4)
    got_plain = ssim(_t(a), _t(b), _t(mask)[None], erode_mask=False).item()
    inside = mask.copy()
    inside[:5], inside[-5:], inside[:, :5], inside[:, -5:] = False, False, False, False
    assert got_plain == pytest.approx(smap[inside].mean(), abs=1e-4)


def test_ssim_mask_ignores_outside_and_full_mask_equals_none():
    g = torch.Generator().manual_seed(11)
    a = torch.rand(2, 3, 40, 40, generator=g)
    b = (a + 0.1 * torch.randn(2, 3, 40, 40, generator=g)).clamp(0, 1)
    mask = torch.zeros(2, 40, 40, dtype=torch.bool)
    mask[:, 8:30, 8:30] = True
    b_changed = b.clone()
    b_changed[:, :, :, 30:] = 0  # a warped image is black outside the overlap
    assert torch.allclose(ssim(a, b, mask), ssim(a, b_changed, mask), atol=1e-6)
    assert not torch.allclose(ssim(a, b, mask, erode_mask=False), ssim(a, b_changed, mask, erode_mask=False))
    full = torch.ones(2, 40, 40, dtype=torch.bool)
    assert torch.allclose(ssim(a, b, full), ssim(a, b), atol=1e-6)
    assert torch.allclose(ssim(a, a, mask), torch.ones(2), atol=1e-6)
    tiny = torch.zeros(2, 40, 40, dtype=torch.bool)
    tiny[0, 10:14, 10:14] = True  # smaller than the window: nothing left after erosion
    out = ssim(a, b, tiny)
    assert torch.isnan(out).all()


def test_ssim_masks_differ_per_pair():
    """Each pair gets its own overlap (only the union's bounding box is filtered): batched == one by one."""
    g = torch.Generator().manual_seed(12)
    a = torch.rand(3, 3, 48, 56, generator=g)
    b = (a + 0.2 * torch.randn(3, 3, 48, 56, generator=g)).clamp(0, 1)
    mask = torch.zeros(3, 48, 56, dtype=torch.bool)
    mask[0, 2:30, 30:56] = True
    mask[1, 20:48, 0:25] = True  # pair 2: empty
    for erode in (True, False):
        got = ssim(a, b, mask, erode_mask=erode)
        assert torch.isnan(got[2]) and torch.isfinite(got[:2]).all()
        for p in range(2):
            one = ssim(a[p : p + 1], b[p : p + 1], mask[p : p + 1], erode_mask=erode)
            assert got[p].item() == pytest.approx(one.item(), abs=1e-6)


def test_ssim_exceptions():
    with pytest.raises(ValueError, match="at least 11 x 11 px"):
        ssim(torch.rand(1, 3, 10, 32), torch.rand(1, 3, 10, 32))
    with pytest.raises(ValueError, match="`img_a` and `img_b` of the same shape"):
        ssim(torch.rand(1, 3, 16, 16), torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="bool `mask` of shape"):
        ssim(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), torch.ones(1, 16, 16))
    with pytest.raises(ValueError, match="Argument `data_range` must be in"):
        ssim(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), data_range=0)
    with pytest.raises(TypeError, match="`img_a` to be a torch.Tensor"):
        ssim(np.zeros((1, 3, 16, 16)), torch.rand(1, 3, 16, 16))


# ---------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def random_lpips():
    return LPIPSMetric(pretrained_backbone=False)


def _record(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, caught


def test_lpips_skips_without_backbone_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    metric, caught = _record(LPIPSMetric)
    assert "not available offline" in metric.skipped and str(tmp_path) in metric.skipped
    assert len(caught) == 1 and "LPIPS is skipped" in str(caught[0].message)
    out, caught = _record(lambda: metric(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)))
    assert out is None and not caught


def test_lpips_skips_when_loading_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ckpt = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a checkpoint")
    metric, caught = _record(LPIPSMetric)
    assert metric.skipped.startswith("LPIPS (alex) could not be built:")
    assert len(caught) == 1
    assert metric(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)) is None


def test_lpips_skips_without_package(monkeypatch):
    monkeypatch.setattr(metrics.image, "_LPIPS_AVAILABLE", False)
    metric, caught = _record(lambda: LPIPSMetric(pretrained_backbone=False))
    assert "pip install 'panoviz_callback[lpips]'" in metric.skipped and len(caught) == 1


def test_lpips_random_backbone_known_answers(random_lpips):
    assert random_lpips.skipped is None
    g = torch.Generator().manual_seed(12)
    a, b = torch.rand(3, 3, 14, 14, generator=g), torch.rand(3, 3, 14, 14, generator=g)  # upsampled to 64
    same = random_lpips(a, a)
    assert same.shape == (3,) and torch.allclose(same, torch.zeros(3), atol=1e-7)
    diff = random_lpips(a, b)
    assert (diff > 0).all() and torch.isfinite(diff).all()
    assert torch.allclose(random_lpips(b, a), diff, atol=1e-6)


def test_lpips_without_mask_equals_lpips_package(random_lpips):
    g = torch.Generator().manual_seed(13)
    a, b = torch.rand(2, 3, 64, 80, generator=g), torch.rand(2, 3, 64, 80, generator=g)
    with torch.no_grad():
        want = random_lpips._model(a * 2 - 1, b * 2 - 1).flatten()
    assert torch.allclose(random_lpips(a, b), want, atol=1e-6)


def test_lpips_mask(random_lpips):
    g = torch.Generator().manual_seed(14)
    a, b = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    full = torch.ones(2, 32, 32, dtype=torch.bool)
    assert torch.allclose(random_lpips(a, b, full), random_lpips(a, b), atol=1e-6)
    mask = torch.zeros(2, 32, 32, dtype=torch.bool)
    mask[:, :, :16] = True
    b_left_same = torch.where(mask[:, None], a, b)
    out = random_lpips(a, b_left_same, mask)
    assert torch.allclose(out, torch.zeros(2), atol=1e-7)  # identical over the overlap
    assert (random_lpips(a, b, mask) > 0).all()


def test_lpips_keeps_global_rng():
    state = torch.get_rng_state()
    LPIPSMetric(pretrained_backbone=False)
    assert torch.equal(torch.get_rng_state(), state)


def test_lpips_exceptions(random_lpips):
    with pytest.raises(ValueError, match="Argument `net` must be one of"):
        LPIPSMetric(net="resnet", pretrained_backbone=False)
    with pytest.raises(ValueError, match=r"Expected `a` of shape \(P, 3, h, w\), got \(1, 1, 16, 16\)"):
        random_lpips(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="bool `mask` of shape"):
        random_lpips(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), torch.ones(1, 8, 8, dtype=torch.bool))


# ---------------------------------------------------------------- input validation


def test_exceptions_cosines():
    with pytest.raises(ValueError, match=r"Expected `a` of shape \(P, N, D\), got \(4, 197\)"):
        token_cosine(torch.randn(4, 197), torch.randn(4, 197))
    with pytest.raises(ValueError, match="`a` and `b` of the same shape"):
        token_cosine(torch.randn(1, 4, 3), torch.randn(1, 5, 3))
    with pytest.raises(ValueError, match="`idx_a` and `idx_b` of the same length, got 2 and 1"):
        overlap_cosine(torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"Expected `idx_b` in \[0, 4\)"):
        overlap_cosine(torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0]), torch.tensor([4]))
    with pytest.raises(TypeError, match="`idx_a` to be an integer tensor"):
        overlap_cosine(torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0.0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="same feature dimension D, got 3 and 4"):
        hungarian_cosine(torch.randn(4, 3), torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"gh \* gw == N = 9"):
        hungarian_accuracy(torch.arange(9), torch.tensor([0]), torch.tensor([0]), (2, 4))


# ---------------------------------------------------------------- overlap-paired CKA


def _paired(seed=3, k=60, n=90, d=24):
    g = torch.Generator().manual_seed(seed)
    scene = torch.randn(k, d, generator=g, dtype=torch.float64)  # k shared scene points
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, d + 4, generator=g, dtype=torch.float64)
    idx_a = torch.randperm(n, generator=g)[:k]
    idx_b = torch.randperm(n, generator=g)[:k]
    rot = torch.linalg.qr(torch.randn(d + 4, d + 4, generator=g, dtype=torch.float64)).Q[:d]  # (d, d + 4)
    a[idx_a] = scene
    b[idx_b] = 2.0 * scene @ rot + 0.3 * torch.randn(k, d + 4, generator=g, dtype=torch.float64)
    return a.float(), b.float(), idx_a, idx_b


def test_overlap_cka_matches_numpy_on_paired_rows():
    a, b, idx_a, idx_b = _paired()
    x, y = a[idx_a].double().numpy(), b[idx_b].double().numpy()
    x, y = x - x.mean(0), y - y.mean(0)
    assert overlap_cka(a, b, idx_a, idx_b).item() == pytest.approx(_np_linear_cka_hsic(x, y), abs=1e-5)
    assert overlap_debiased_cka(a, b, idx_a, idx_b).item() == pytest.approx(_np_debiased_cka_ucentre(x, y),
                                                                            abs=1e-5)
    assert overlap_cka(a, b, idx_a, idx_b).item() > 0.9  # the same scene points, rotated and noisy


def test_overlap_cka_invariant_to_joint_permutation_not_to_shuffling():
    a, b, idx_a, idx_b = _paired(seed=4)
    perm = torch.randperm(len(idx_a), generator=torch.Generator().manual_seed(0))
    for fn in (overlap_cka, overlap_debiased_cka):
        ref = fn(a, b, idx_a, idx_b).item()
        assert fn(a, b, idx_a[perm], idx_b[perm]).item() == pytest.approx(ref, abs=1e-6)
        shuffled = fn(a, b, idx_a, idx_b[perm]).item()  # rows of view j paired with other scene points
        assert shuffled < ref - 0.3


def test_overlap_cka_small_overlaps_are_nan_and_batched_equals_per_pair():
    a, b, idx_a, idx_b = _paired(seed=5, d=24)
    assert math.isnan(overlap_cka(a, b, idx_a[:1], idx_b[:1]).item())
    assert math.isnan(overlap_debiased_cka(a, b, idx_a[:3], idx_b[:3]).item())
    feats = torch.stack([a, b[:, :24]])  # (2, N, D)
    ii, jj = torch.tensor([0, 1, 0]), torch.tensor([1, 0, 1])
    ia, ib = [idx_a, idx_b, idx_a[:2]], [idx_b, idx_a, idx_b[:2]]
    lin, deb = metrics._overlap_cka_views(feats, ii, jj, ia, ib)
    for p, (i, j) in enumerate(zip(ii.tolist(), jj.tolist())):
        want_lin = overlap_cka(feats[i], feats[j], ia[p], ib[p]).item()
        want_deb = overlap_debiased_cka(feats[i], feats[j], ia[p], ib[p]).item()
        assert lin[p].item() == pytest.approx(want_lin, abs=1e-6, nan_ok=True)
        assert deb[p].item() == pytest.approx(want_deb, abs=1e-6, nan_ok=True)
    only_lin, none = metrics._overlap_cka_views(feats, ii, jj, ia, ib, debiased=False)  # feature form (K >= D)
    assert none is None
    torch.testing.assert_close(only_lin, lin, atol=1e-6, rtol=0, equal_nan=True)


# ---------------------------------------------------------------- well-posed matching


def test_overlap_hungarian_matches_scipy_rectangular_float64():
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(30, 16, generator=g), torch.randn(30, 16, generator=g)
    idx_a = torch.tensor([1, 4, 5, 9, 12, 20, 21, 29])
    cos, cols = overlap_hungarian(a, b, idx_a)
    an = a.double() / a.double().norm(dim=1, keepdim=True)
    bn = b.double() / b.double().norm(dim=1, keepdim=True)
    sim = (an[idx_a] @ bn.T).numpy()  # (8, 30)
    rows, want = linear_sum_assignment(sim, maximize=True)
    assert cols[idx_a].tolist() == want.tolist()
    assert (cols[[i for i in range(30) if i not in set(idx_a.tolist())]] == -1).all()
    assert cos.item() == pytest.approx(sim[rows, want].mean(), abs=1e-6)
    with pytest.raises(ValueError, match="distinct indices"):
        overlap_hungarian(a, b, torch.tensor([1, 1]))


def test_matching_chance_and_ceiling_known_answers():
    # partners in a 3 x 3 grid: corner (4 neighbours incl. itself) and centre (9): chance (4 + 9) / 2 / 9
    assert matching_chance(torch.tensor([0, 4]), (3, 3)) == pytest.approx(13 / 18)
    # three tokens share partner 0 on a 1 x 4 grid: tokens 0 and 1 are within one of it -> 2 of 3
    assert matching_ceiling(torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0]), (1, 4)) == pytest.approx(2 / 3)
    assert matching_ceiling(torch.tensor([0, 1]), torch.tensor([3, 2]), (1, 4)) == 1.0
    assert math.isnan(matching_chance(torch.empty(0, dtype=torch.long), (2, 2)))
    assert nn_accuracy(torch.eye(4), torch.eye(4).flip(0), torch.tensor([0]), torch.tensor([0]), (1, 4)) == 0.0


def _scene_point_features(views, grid):
    """The viewing direction of every token centre: a pure function of the scene point (on the sphere)."""
    s = views.image_size
    c = (torch.arange(grid, dtype=torch.float64) + 0.5) * s / grid - 0.5
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    xy = torch.stack([xs, ys], -1).reshape(1, -1, 2).expand(len(views), -1, -1)
    dirs, _ = pixel_to_direction(xy, views.cameras, s)
    return dirs.float()  # (V, N, 3)


@pytest.mark.parametrize(("strategy", "size", "grid"), [
    ("e2p", 224, 7), ("e2p", 224, 14), ("e2p", 256, 16), ("e2p", 336, 24), ("e2p", 384, 27),
    ("sliding_window", 224, 14), ("sliding_window", 384, 27),
])
def test_convention_scene_point_features_are_matched(strategy, size, grid):
    """Features that depend only on the scene point: nearest neighbours are all within one token of the
    partner, and the Hungarian matching reaches >= 0.95 (>= 0.95 of the geometric ceiling where the
    e2p edge compression puts the ceiling itself below 1: 24 x 24, 27 x 27). Chance is about 9 / N."""
    views = make_views(torch.rand(3, 64, 128), strategy, image_size=size)
    feats = _scene_point_features(views, grid)
    for i, j in views.pairs[:2]:
        idx_a, idx_b = patch_correspondence(views, i, j, (grid, grid))
        _, cols = overlap_hungarian(feats[i], feats[j], idx_a)
        acc = hungarian_accuracy(cols, idx_a, idx_b, (grid, grid))
        ceiling = matching_ceiling(idx_a, idx_b, (grid, grid))
        assert nn_accuracy(feats[i], feats[j], idx_a, idx_b, (grid, grid)) == pytest.approx(1.0, abs=1e-9)
        assert acc >= 0.95 * ceiling and (acc >= 0.95 or ceiling < 0.96)
        assert matching_chance(idx_b, (grid, grid)) == pytest.approx(9 / grid**2, rel=0.2)
        if grid <= 16:
            assert ceiling == 1.0


def test_views_matching_helpers_equal_per_pair_functions():
    views = make_views(torch.rand(3, 64, 128), "e2p", image_size=224)
    feats = torch.randn(len(views), 196, 12, generator=torch.Generator().manual_seed(2))
    units = metrics._unit(feats)
    pairs = views.pairs[:3]
    ii, jj = torch.tensor([i for i, _ in pairs]), torch.tensor([j for _, j in pairs])
    corr = [patch_correspondence(views, i, j, (14, 14)) for i, j in pairs]
    idx_a, idx_b = [c[0] for c in corr], [c[1] for c in corr]
    sims = metrics._overlap_sims(units, ii, jj, idx_a)
    cos, assign = metrics._overlap_hungarian_views(sims, idx_a, 196)
    nn = metrics._nn_accuracy_views(metrics._overlap_sims(units, ii, jj, idx_a, torch.float32), idx_b, (14, 14))
    for p, (i, j) in enumerate(pairs):
        want_cos, want_cols = overlap_hungarian(feats[i], feats[j], idx_a[p])
        assert torch.equal(assign[p], want_cols)
        assert cos[p].item() == pytest.approx(want_cos.item(), abs=1e-6)
        assert nn[p].item() == pytest.approx(nn_accuracy(feats[i], feats[j], idx_a[p], idx_b[p], (14, 14)))
