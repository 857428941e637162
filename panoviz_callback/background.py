"""What the PCA maps leave out: letterbox padding, a first-PC background, outlier tokens.

Three tests, each on the tokens of all views at once, in torch on the tokens' device:

- :func:`padding_tokens`: tokens whose cell lies wholly in the letterbox bars of a global
  view (geometry only). They see no image, so they are left out of every fit and metric and
  drawn grey.
- ``threshold`` background (used by :func:`panoviz_callback.pca.pca_rgb`): the first
  principal component is scaled robustly (its 2nd..98th percentiles to [0, 1], values outside
  clipped) and thresholded, but only when its scores are clearly bimodal. The rule: a
  two-component 1-D Gaussian mixture is fitted by EM to the scores clipped to their 1st..99th
  percentiles (so a few extreme tokens cannot claim a component); the scores are bimodal when
  Ashman's separation ``D = sqrt(2) |mu_1 - mu_2| / sqrt(s_1^2 + s_2^2)`` exceeds 2, the
  smaller component holds at least 5% of the tokens, and the data really dip between the two
  means: a window of a quarter of their distance at the midpoint holds fewer than half the
  tokens of the same window at either mean (a flat, uniform spread has D near 3 but no dip).
  Otherwise every token is kept and the state's ``note`` says so.
- ``outlier_removal``: a robust squared Mahalanobis distance on the coordinates along the top
  16 principal directions, with a location and scatter from deterministic concentration steps
  (the minimum-covariance-determinant idea: the half of the tokens with the smallest distances,
  refitted until the half stops changing, then made consistent with the chi-square median and
  reweighted at its 0.975 quantile). Tokens beyond the 0.999 quantile of the chi-square
  distribution with ``r`` degrees of freedom are outliers: about 0.1% of Gaussian data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from panoviz_callback._checks import _check_grid
from panoviz_callback._pca_fit import _eigh, _fit_moments, _krylov, _matmul, _Moments, _project

if TYPE_CHECKING:
    from panoviz_callback.views import ViewSet

__all__ = ["padding_tokens"]

_CLIP = (0.01, 0.99)          # the mixture is fitted to the PC1 scores clipped to these quantiles
_SCALE = (0.02, 0.98)         # robust PC1 scaling: these quantiles map to 0 and 1
_EM_STEPS = 40
_EM_TOL = 1e-4  # EM stops when the means move less than this share of the clipped range (D moves < 0.02)
_ASHMAN_MIN = 2.0             # bimodal: Ashman's D > 2 ...
_VALLEY_MAX = 0.5             # ... and the midpoint between the modes at most half as dense as either mode
_MIN_WEIGHT = 0.05            # ... and the smaller mode holds >= 5% of the tokens
_OUTLIER_DIMS = 16
_OUTLIER_ITERS = 4            # float32 Krylov steps on 16 + 4 vectors: the approximate top-16 directions
_OUTLIER_OVERSAMPLE = 4
_C_STEPS = 20
_REWEIGHT_Q = 0.975
_OUTLIER_Q = 0.999


def padding_tokens(views: ViewSet, grid_hw: tuple[int, int]) -> Tensor:
    """Tokens that see only letterbox padding (the bars of a global view), ``(V, N)`` bool.

    Token row ``r`` of a ``gh``-row grid covers view pixel rows ``[r S / gh, (r + 1) S / gh)``;
    the global view's image occupies rows ``[top, top + hc)`` (see :mod:`panoviz_callback.projection`).
    A token is padding when its rows and the image's rows do not intersect. Views of other kinds
    have no padding.

    Args:
        views: the :class:`~panoviz_callback.views.ViewSet` (cameras and image size).
        grid_hw: ``(gh, gw)`` token grid of every view.

    Returns:
        ``(V, gh * gw)`` bool on the CPU.

    Example:
        >>> from panoviz_callback.views import make_views
        >>> vs = make_views(torch.rand(3, 32, 64), "anyres_e2p", image_size=32)
        >>> padding_tokens(vs, (4, 4))[0].reshape(4, 4)[:, 0].tolist()
        [True, False, False, True]
    """
    from panoviz_callback.projection import _letterbox

    gh, gw = _check_grid(tuple(int(g) for g in grid_hw))
    size = int(views.image_size)
    top, hc = _letterbox(size)
    rows = torch.arange(gh)
    # row r spans [r S / gh, (r + 1) S / gh): integer comparisons, no rounding
    outside = (rows * size >= (top + hc) * gh) | ((rows + 1) * size <= top * gh)  # (gh,)
    per_row = outside[:, None].expand(gh, gw).reshape(-1)  # (N,)
    glob = torch.tensor([cam.kind == "global" for cam in views.cameras])  # (V,)
    return glob[:, None] & per_row[None]


# ---------------------------------------------------------------- threshold mode


def _quantiles(x: Tensor, qs: tuple[float, ...]) -> Tensor:
    return torch.quantile(x, torch.tensor(qs, dtype=x.dtype, device=x.device))


def _ashman_d(score: Tensor) -> tuple[float, float, float]:
    """Ashman's D, the smaller weight of a 2-component Gaussian mixture fitted by EM to ``score (M,)``, and the
    valley ratio: tokens within a window at the midpoint of the two means over the fewer of those in the same
    window at either mean (about 1 for a flat, unimodal spread; near 0 with a real gap)."""
    lo, hi = _quantiles(score, _CLIP)
    s = score.double().clamp(float(lo), float(hi))
    q1, q3 = _quantiles(s, (0.25, 0.75))
    mu = torch.stack([q1, q3])  # (2,) start at the quartiles
    var = s.var().clamp_min(1e-30).expand(2) / 4
    weight = s.new_full((2,), 0.5)
    for _ in range(_EM_STEPS):
        logp = -0.5 * (s[:, None] - mu).square() / var - 0.5 * var.log() + weight.log()  # (M, 2)
        resp = torch.softmax(logp, dim=1)
        nk = resp.sum(0).clamp_min(1e-12)
        weight = nk / len(s)
        mu_new = (resp * s[:, None]).sum(0) / nk
        var = ((resp * (s[:, None] - mu_new).square()).sum(0) / nk).clamp_min(s.var() * 1e-6 + 1e-30)
        if bool((mu_new - mu).abs().max() <= _EM_TOL * (hi - lo).abs().clamp_min(1e-30)):
            mu = mu_new
            break
        mu = mu_new
    d = float(2**0.5 * (mu[0] - mu[1]).abs() / var.sum().sqrt())
    half = (mu[0] - mu[1]).abs() / 8  # window half-width
    counts = [float(((s - c).abs() <= half).sum()) for c in (mu[0], mu.mean(), mu[1])]
    valley = counts[1] / max(min(counts[0], counts[2]), 1.0)
    return d, float(weight.min()), valley


def _background_low(xc: Tensor, direction: Tensor, score: Tensor) -> Tensor:
    """Orient ``direction (D,)`` so that the more homogeneous side of the robust mid split is low.

    The split is at the middle of the 2nd..98th percentiles of ``score (M,)``; a side's spread is the
    median squared distance of its tokens to their centroid.
    """
    lo, hi = _quantiles(score, _SCALE)
    upper = score >= (lo + hi) / 2
    if not bool(upper.any()) or bool(upper.all()):
        return direction
    # robust spread: the median over the side's tokens of their squared distance to its centroid (a few
    # extreme tokens move the centroid by their offset / side size, and do not count in the median)
    spread_upper, spread_lower = ((s - s.mean(0)).square().sum(1).median() for s in (xc[upper], xc[~upper]))
    return torch.where(spread_upper < spread_lower, -direction, direction)


def _threshold_foreground(mom: _Moments, k: int, threshold: float, prev_direction: Tensor | None,
                          freeze: bool) -> tuple[Tensor, Tensor, str | None]:
    """Foreground mask ``(M,)``, the PC1 direction ``(D,)`` and a note when nothing was masked."""
    if freeze:
        direction = prev_direction
    else:
        init = None if prev_direction is None else prev_direction[:, None]
        _, first, _ = _fit_moments(mom, 1, "auto", init)
        score = _matmul(mom.xc, first)[:, 0]  # (M,)
        direction = _background_low(mom.xc, first[:, 0], score)
    score = _matmul(mom.xc, direction[:, None])[:, 0]  # (M,)
    keep_all = torch.ones(mom.m, dtype=torch.bool, device=score.device)
    lo, hi = _quantiles(score, _SCALE)
    if not bool(hi > lo):
        return keep_all, direction, "bg_removal='threshold': the first component is flat; kept every token."
    d, small, valley = _ashman_d(score)
    if not (d > _ASHMAN_MIN and small >= _MIN_WEIGHT and valley < _VALLEY_MAX):
        return keep_all, direction, (
            f"bg_removal='threshold': the first component is not bimodal (Ashman's D = {d:.2f}, smaller mode "
            f"{small:.1%}, valley ratio {valley:.2f}; masking needs D > {_ASHMAN_MIN:g}, >= {_MIN_WEIGHT:.0%} and "
            f"a valley below {_VALLEY_MAX:g}); kept every token.")
    unit = ((score - lo) / (hi - lo)).clamp(0.0, 1.0)
    fg = unit >= threshold
    n_fg = int(fg.sum())
    if n_fg >= k + 1:
        return fg, direction, None
    return keep_all, direction, (
        f"bg_removal='threshold': {n_fg} foreground token(s) at bg_threshold={threshold:g}, fewer than "
        f"n_components + 1 = {k + 1}; used all tokens instead.")


# ---------------------------------------------------------------- outlier mode


def _chi2_ppf(q: float, dof: int) -> float:
    from scipy.stats import chi2

    return float(chi2.ppf(q, dof))


def _mahalanobis(z: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Squared distances of ``z (M, r)`` from the mean/covariance of ``z[rows]``, and the covariance."""
    sub = z[rows]
    mu = sub.mean(0)
    cov = torch.cov(sub.T).reshape(z.shape[1], z.shape[1])
    ridge = cov.diagonal().mean().clamp_min(1e-300) * 1e-10
    chol, _ = torch.linalg.cholesky_ex(cov + ridge * torch.eye(len(cov), dtype=cov.dtype, device=cov.device))
    w = torch.linalg.solve_triangular(chol, (z - mu).T, upper=False)  # (r, M)
    return w.square().sum(0), cov


def _robust_distances(z: Tensor) -> Tensor:
    """Reweighted-MCD-style squared robust distances of the rows of ``z (M, r)`` (float64)."""
    m, r = z.shape
    h = (m + r + 1) // 2
    med = z.median(0).values
    mad = (z - med).abs().median(0).values * 1.4826
    scale = torch.where(mad > 0, mad, mad.max().clamp_min(1e-300))
    start = ((z - med) / scale).square().sum(1)
    subset = torch.argsort(start, stable=True)[:h]
    for _ in range(_C_STEPS):  # concentration steps: the determinant never grows
        d2, _ = _mahalanobis(z, subset)
        new = torch.argsort(d2, stable=True)[:h]
        if torch.equal(new.sort().values, subset.sort().values):
            break
        subset = new
    d2, _ = _mahalanobis(z, subset)
    d2 = d2 * (_chi2_ppf(0.5, r) / d2.median().clamp_min(1e-300))  # consistent at the Gaussian
    keep = (d2 <= _chi2_ppf(_REWEIGHT_Q, r)).nonzero()[:, 0]
    if len(keep) > r:
        d2, _ = _mahalanobis(z, keep)
        d2 = d2 * (_chi2_ppf(0.5, r) / d2.median().clamp_min(1e-300))
    return d2


def _inliers(mom: _Moments) -> tuple[Tensor, Tensor | None]:
    """The tokens within the chi-square cut-off of the robust distance (module docstring).

    Returns the inlier mask ``(M,)`` and the approximate top directions ``(D, r)`` it used
    (a warm start for the colour fit on the inliers), or ``None`` with too few tokens to test.
    """
    m, d = mom.m, mom.d
    keep = torch.ones(m, dtype=torch.bool, device=mom.x.device)
    r = min(_OUTLIER_DIMS, d, m - 1)
    if m < 2 * r + 2:
        return keep, None
    out = _krylov(mom, r, None, None, max_iter=_OUTLIER_ITERS, exact=False, dtype=torch.float32,
                  oversample=_OUTLIER_OVERSAMPLE) or _eigh(mom, r)
    z = _project(mom.xc, out[0]).double()  # (M, r) coordinates on the top-r directions
    d2 = _robust_distances(z)
    keep = d2 <= _chi2_ppf(_OUTLIER_Q, r)
    return keep, out[0]
