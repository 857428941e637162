"""Similarity metrics between the views of a pair: token features and PCA images.

Pure tensor functions: inputs are cast to float32 (CKA accumulates in float64),
everything stays on the inputs' device and is batched over pairs ``P`` where the
signature says so. Only the Hungarian assignment leaves the device (scipy's
``linear_sum_assignment`` on the CPU). :class:`LPIPSMetric` is the one stateful
shell: it builds its network once and reports itself as skipped when the
``lpips`` package or its backbone weights are not available.

The private ``_*_views`` helpers compute the same metrics for many pairs of the ``V``
views of one probe, doing the per-view work once (unit tokens, centred Gram matrices
shared by both CKAs) instead of once per pair; :mod:`panoviz_callback.analysis` uses them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from panoviz_callback._checks import _check_choice, _check_range, _check_shape
from panoviz_callback._imports import _LPIPS_AVAILABLE, _TORCHVISION_AVAILABLE, require

__all__ = [
    "token_cosine",
    "overlap_cosine",
    "overlap_cosine_pairs",
    "hungarian_cosine",
    "hungarian_accuracy",
    "linear_cka",
    "debiased_cka",
    "ssim",
    "LPIPSMetric",
]

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


@_full_precision
def token_cosine(a: Tensor, b: Tensor) -> Tensor:
    r"""Mean cosine similarity of tokens at the same index, per pair.

    .. math:: \mathrm{tc}(A, B) = \frac{1}{N} \sum_{n=1}^{N} \frac{a_n \cdot b_n}{\lVert a_n \rVert \lVert b_n \rVert}

    Args:
        a: tokens of the first view of every pair, ``(P, N, D)``.
        b: tokens of the second view, ``(P, N, D)``.

    Returns:
        ``(P,)`` float32, in ``[-1, 1]``.

    Raises:
        ValueError: wrong or different shapes.

    Example:
        >>> x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
        >>> token_cosine(x, x.flip(-1))
        tensor([0.])
    """
    _check_shape(a, "P N D", "a")
    _check_shape(b, "P N D", "b")
    _check_same(a, b, "a", "b")
    return (_unit(a) * _unit(b)).sum(-1).mean(-1)


def overlap_cosine(a: Tensor, b: Tensor, idx_a: Tensor, idx_b: Tensor) -> Tensor:
    r"""Mean cosine of corresponding tokens: ``a[idx_a[k]]`` and ``b[idx_b[k]]`` see the same scene point.

    .. math:: \mathrm{oc} = \frac{1}{K} \sum_{k=1}^{K} \cos(a_{i_k}, b_{j_k})

    Args:
        a: tokens of view i, ``(N, D)``.
        b: tokens of view j, ``(M, D)``.
        idx_a: ``(K,)`` integer token indices into ``a`` (from ``patch_correspondence``).
        idx_b: ``(K,)`` integer token indices into ``b``.

    Returns:
        Scalar float32 tensor; NaN when ``K == 0`` (no overlap: not applicable).

    Raises:
        ValueError: wrong shapes, indices of different lengths or out of range.
        TypeError: non-integer indices.

    Example:
        >>> x = torch.eye(3)
        >>> overlap_cosine(x, x.flip(0), torch.tensor([0, 1]), torch.tensor([2, 1]))
        tensor(1.)
    """
    _check_shape(a, "N D", "a")
    _check_shape(b, "M D", "b")
    return overlap_cosine_pairs(a[None], b[None], [idx_a], [idx_b])[0]


@_full_precision
def overlap_cosine_pairs(a: Tensor, b: Tensor, idx_a: Sequence[Tensor], idx_b: Sequence[Tensor]) -> Tensor:
    """:func:`overlap_cosine` for ``P`` pairs at once (one gather, one scatter: no loop over tokens).

    Args:
        a: tokens of the first view of every pair, ``(P, N, D)``.
        b: tokens of the second view, ``(P, M, D)``.
        idx_a: ``P`` integer tensors ``(K_p,)`` of indices into ``a[p]``.
        idx_b: ``P`` integer tensors ``(K_p,)`` of indices into ``b[p]``.

    Returns:
        ``(P,)`` float32; NaN for pairs without correspondences.
    """
    _check_shape(a, "P N D", "a")
    _check_shape(b, "P M D", "b")
    if len(idx_a) != a.shape[0] or len(idx_b) != a.shape[0] or b.shape[0] != a.shape[0]:
        raise ValueError(
            f"Expected `a`, `b`, `idx_a` and `idx_b` to hold the same number of pairs, "
            f"got {a.shape[0]}, {b.shape[0]}, {len(idx_a)} and {len(idx_b)}."
        )
    for ia, ib in zip(idx_a, idx_b):
        _check_index_pair(ia, ib, a.shape[1], b.shape[1])
    device, n_pairs = a.device, a.shape[0]
    lengths = torch.tensor([len(i) for i in idx_a], dtype=torch.long, device=device)
    pair = torch.repeat_interleave(torch.arange(n_pairs, device=device), lengths)  # (sum K,)
    ia = torch.cat([i.to(device=device, dtype=torch.long) for i in idx_a]) if n_pairs else pair
    ib = torch.cat([i.to(device=device, dtype=torch.long) for i in idx_b]) if n_pairs else pair
    cos = (_unit(a)[pair, ia] * _unit(b)[pair, ib]).sum(-1)  # (sum K,)
    sums = torch.zeros(n_pairs, device=device).index_add_(0, pair, cos)
    return sums / lengths.float()  # 0 / 0 = NaN where a pair has no overlap


@_full_precision
def hungarian_cosine(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    r"""Mean cosine after the optimal one-to-one matching of the tokens of two views.

    The assignment :math:`\pi` maximises the total cosine (scipy's
    ``linear_sum_assignment`` on the CPU, the cosine matrix is computed on the device):

    .. math:: \mathrm{hc} = \max_{\pi} \frac{1}{\min(N, M)} \sum_{n} \cos(a_n, b_{\pi(n)})

    It is order-free (it works for query tokens) and at least the token cosine
    when ``N == M``, since the identity is one of the matchings.

    Args:
        a: tokens of view i, ``(N, D)``.
        b: tokens of view j, ``(M, D)``.

    Returns:
        ``(mean_cos, assignment)``: a scalar float32 tensor, and a LongTensor ``(N,)`` on
        the inputs' device with the index in ``b`` matched to every token of ``a``
        (``-1`` for tokens left unmatched when ``N > M``).

    Example:
        >>> x = torch.eye(3)
        >>> cos, cols = hungarian_cosine(x, x[[2, 0, 1]])
        >>> cos, cols
        (tensor(1.), tensor([1, 2, 0]))
    """
    _check_shape(a, "N D", "a")
    _check_shape(b, "M D", "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"Expected `a` and `b` with the same feature dimension D, got {a.shape[1]} and {b.shape[1]}.")
    require("scipy", "Hungarian matching")
    from scipy.optimize import linear_sum_assignment

    sim = _unit(a) @ _unit(b).T  # (N, M)
    rows, cols = linear_sum_assignment(sim.detach().cpu().double().numpy(), maximize=True)
    rows_t = torch.as_tensor(rows, dtype=torch.long, device=a.device)
    cols_t = torch.as_tensor(cols, dtype=torch.long, device=a.device)
    assignment = torch.full((a.shape[0],), -1, dtype=torch.long, device=a.device)
    assignment[rows_t] = cols_t
    return sim[rows_t, cols_t].mean(), assignment


@_full_precision
def _hungarian_views(units: Tensor, idx_i: Tensor, idx_j: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`hungarian_cosine` for the pairs ``(idx_i[p], idx_j[p])`` of ``V`` views of unit tokens.

    The ``P`` cosine matrices go to the CPU in one transfer; scipy then solves each
    assignment on the row- and column-reduced matrix (the same optimum: a constant per row
    or column does not change which matching is best), from which its augmenting paths are
    shorter (about 30% faster on ViT-B tokens than on the raw cosines).

    Args:
        units: ``(V, N, D)`` unit-norm tokens (:func:`_unit`).
        idx_i: ``(P,)`` first view of every pair.
        idx_j: ``(P,)`` second view.

    Returns:
        ``(mean_cos (P,), assignment (P, N))``, as :func:`hungarian_cosine` per pair.
    """
    require("scipy", "Hungarian matching")
    from scipy.optimize import linear_sum_assignment

    n_pairs, n = len(idx_i), units.shape[1]
    if n_pairs == 0:
        return units.new_zeros(0), torch.zeros(0, n, dtype=torch.long, device=units.device)
    sims = units.new_empty(n_pairs, n, n)
    for p, (i, j) in enumerate(zip(idx_i.tolist(), idx_j.tolist())):
        torch.mm(units[i], units[j].T, out=sims[p])  # (N, N), no gathered copies of the tokens
    sims_np = sims.detach().cpu().double().numpy()

    def solve(sim: np.ndarray) -> tuple[float, np.ndarray]:  # NumPy and scipy only (no torch ops in threads)
        cost = sim.max(1, keepdims=True) - sim  # >= 0, a zero in every row
        cost -= cost.min(0, keepdims=True)  # and in every column
        rows, cols = linear_sum_assignment(cost)  # rows == arange(N): the matrix is square
        return float(sim[rows, cols].mean()), cols

    workers = min(torch.get_num_threads(), n_pairs)
    if workers > 1:  # scipy releases the GIL while it solves: use the CPU threads torch may use
        with ThreadPoolExecutor(workers) as pool:
            solved = list(pool.map(solve, sims_np))
    else:
        solved = [solve(sim) for sim in sims_np]
    means = torch.tensor([m for m, _ in solved], dtype=torch.float32, device=units.device)
    cols = torch.from_numpy(np.stack([c for _, c in solved])).to(device=units.device, dtype=torch.long)
    return means, cols.reshape(n_pairs, n)


def _hungarian_accuracy_views(assignments: Tensor, idx_a: Sequence[Tensor], idx_b: Sequence[Tensor],
                              grid_hw: tuple[int, int]) -> Tensor:
    """:func:`hungarian_accuracy` for ``P`` pairs at once: ``assignments (P, N)``, ``(P,)`` (NaN without overlap)."""
    gw = int(grid_hw[1])
    device, n_pairs = assignments.device, assignments.shape[0]
    lengths = torch.tensor([len(i) for i in idx_a], dtype=torch.long, device=device)
    pair = torch.repeat_interleave(torch.arange(n_pairs, device=device), lengths)  # (sum K,)
    ia = torch.cat([i.to(device=device, dtype=torch.long) for i in idx_a]) if n_pairs else pair
    want = torch.cat([i.to(device=device, dtype=torch.long) for i in idx_b]) if n_pairs else pair
    got = assignments[pair, ia]  # (sum K,)
    near = (torch.div(got, gw, rounding_mode="floor") - want // gw).abs().le(1)
    near &= (got % gw - want % gw).abs().le(1) & got.ge(0)
    hits = torch.zeros(n_pairs, device=device).index_add_(0, pair, near.float())
    return hits / lengths.float()  # 0 / 0 = NaN where a pair has no overlap


def _token_cosine_views(units: Tensor, idx_i: Tensor, idx_j: Tensor) -> Tensor:
    """:func:`token_cosine` for the pairs ``(idx_i[p], idx_j[p])`` of ``(V, N, D)`` unit tokens, ``(P,)``."""
    pairs = zip(idx_i.tolist(), idx_j.tolist())
    return torch.stack([torch.linalg.vecdot(units[i], units[j]).mean() for i, j in pairs]) if len(idx_i) else (
        units.new_zeros(0))


def _overlap_cosine_views(units: Tensor, idx_i: Tensor, idx_j: Tensor, idx_a: Sequence[Tensor],
                          idx_b: Sequence[Tensor]) -> Tensor:
    """:func:`overlap_cosine_pairs` on ``(V, N, D)`` unit tokens: pair ``p`` is views ``idx_i[p], idx_j[p]``."""
    device, n_pairs = units.device, len(idx_a)
    lengths = torch.tensor([len(i) for i in idx_a], dtype=torch.long, device=device)
    pair = torch.repeat_interleave(torch.arange(n_pairs, device=device), lengths)  # (sum K,)
    ia = torch.cat([i.to(device=device, dtype=torch.long) for i in idx_a]) if n_pairs else pair
    ib = torch.cat([i.to(device=device, dtype=torch.long) for i in idx_b]) if n_pairs else pair
    cos = (units[idx_i[pair], ia] * units[idx_j[pair], ib]).sum(-1)  # (sum K,)
    sums = torch.zeros(n_pairs, device=device).index_add_(0, pair, cos)
    return sums / lengths.float()  # 0 / 0 = NaN where a pair has no overlap


def hungarian_accuracy(assignment: Tensor, idx_a: Tensor, idx_b: Tensor, grid_hw: tuple[int, int]) -> float:
    """Fraction of overlap tokens whose Hungarian match lies within one token of their geometric partner.

    Token ``idx_a[k]`` of view i sees the same scene point as token ``idx_b[k]`` of
    view j; it counts as correct when ``assignment[idx_a[k]]`` is at Chebyshev
    distance ``<= 1`` from ``idx_b[k]`` on the ``(gh, gw)`` grid (row-major indices).
    Unmatched tokens (``-1``) count as wrong.

    Args:
        assignment: ``(N,)`` from :func:`hungarian_cosine`.
        idx_a: ``(K,)`` token indices of view i.
        idx_b: ``(K,)`` token indices of view j.
        grid_hw: the token grid ``(gh, gw)`` of both views, ``gh * gw == N``.

    Returns:
        A float in ``[0, 1]``; NaN when ``K == 0``.

    Example:
        >>> hungarian_accuracy(torch.tensor([1, 0, 3, 2]), torch.tensor([0, 2]), torch.tensor([0, 2]), (2, 2))
        1.0
    """
    gh, gw = (int(v) for v in grid_hw)
    _check_shape(assignment, "N", "assignment")
    if gh * gw != assignment.shape[0]:
        raise ValueError(f"Expected `grid_hw` with gh * gw == N = {assignment.shape[0]}, got {(gh, gw)}.")
    _check_index_pair(idx_a, idx_b, gh * gw, gh * gw)
    if len(idx_a) == 0:
        return math.nan
    device = assignment.device
    got = assignment[idx_a.to(device=device, dtype=torch.long)]  # (K,)
    want = idx_b.to(device=device, dtype=torch.long)
    near = (torch.div(got, gw, rounding_mode="floor") - want // gw).abs().le(1)
    near &= (got % gw - want % gw).abs().le(1) & got.ge(0)
    return float(near.float().mean())


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _centred(x: Tensor, name: str) -> Tensor:
    _check_shape(x, "N D", name)
    x = x.to(_acc_dtype(x.device))
    return x - x.mean(0, keepdim=True)


@_full_precision
def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    r"""Linear centred kernel alignment (Kornblith et al., 2019).

    With column-centred :math:`X \in \mathbb{R}^{N \times D_1}`, :math:`Y \in \mathbb{R}^{N \times D_2}`:

    .. math::
        \mathrm{CKA}(X, Y) = \frac{\lVert Y^\top X \rVert_F^2}{\lVert X^\top X \rVert_F \, \lVert Y^\top Y \rVert_F}
        = \frac{\langle X X^\top, Y Y^\top \rangle_F}{\lVert X X^\top \rVert_F \, \lVert Y Y^\top \rVert_F}

    (the Gram form, second line, is used when ``N`` is smaller than the feature
    dimension: same value, fewer operations). Invariant to orthogonal maps,
    isotropic scaling and translation of either input, not to general linear maps.
    This estimator is biased upwards when ``N`` is not much larger than ``D``:
    independent Gaussian noise gives about ``D / (D + N)`` (0.82 at ``N=256, D=1152``);
    use :func:`debiased_cka` to compare against 0.

    Args:
        x: ``(N, D1)`` features (rows are samples, e.g. tokens).
        y: ``(N, D2)`` features of the same samples.

    Returns:
        Scalar float32 tensor in ``[0, 1]`` (1 for ``x == y``).

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
        >>> linear_cka(x, 2 * x + 1)
        tensor(1.)
    """
    x, y = _centred(x, "x"), _centred(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"Expected `x` and `y` with the same number of samples N, got {x.shape[0]} and {y.shape[0]}.")
    if x.shape[0] < max(x.shape[1], y.shape[1]):
        kx, ky = x @ x.T, y @ y.T  # (N, N)
        num, den = (kx * ky).sum(), kx.norm() * ky.norm()
    else:
        num, den = (y.T @ x).square().sum(), (x.T @ x).norm() * (y.T @ y).norm()
    return (num / (den + _EPS)).float()


def _unbiased_hsic(k: Tensor, l: Tensor) -> Tensor:
    n = k.shape[0]
    k, l = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)
    k1, l1 = k.sum(1), l.sum(1)  # (N,)
    trace = (k * l).sum()
    return (trace + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k1 @ l1)) / (n * (n - 3))


@_full_precision
def debiased_cka(x: Tensor, y: Tensor) -> Tensor:
    r"""Linear CKA with the unbiased HSIC estimator (Song et al., 2012; Nguyen et al., 2021).

    With linear Gram matrices :math:`K = X X^\top`, :math:`L = Y Y^\top` whose diagonals
    are set to zero (:math:`\tilde K`, :math:`\tilde L`):

    .. math::
        \mathrm{HSIC}_1(K, L) = \frac{1}{N (N - 3)} \Big[ \mathrm{tr}(\tilde K \tilde L)
        + \frac{\mathbf 1^\top \tilde K \mathbf 1 \; \mathbf 1^\top \tilde L \mathbf 1}{(N - 1)(N - 2)}
        - \frac{2}{N - 2} \mathbf 1^\top \tilde K \tilde L \mathbf 1 \Big]

    .. math:: \mathrm{dCKA}(X, Y) = \frac{\mathrm{HSIC}_1(K, L)}{\sqrt{\mathrm{HSIC}_1(K, K) \, \mathrm{HSIC}_1(L, L)}}

    Unlike :func:`linear_cka` it is close to 0 for independent features even when
    ``N`` is small compared to ``D`` (it can be slightly negative).

    Args:
        x: ``(N, D1)`` features, ``N > 3``.
        y: ``(N, D2)`` features of the same samples.

    Returns:
        Scalar float32 tensor (1 for ``x == y``).

    Raises:
        ValueError: ``N <= 3`` or different ``N``.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [1.0, 1.0]])
        >>> debiased_cka(x, -x)
        tensor(1.)
    """
    x, y = _centred(x, "x"), _centred(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"Expected `x` and `y` with the same number of samples N, got {x.shape[0]} and {y.shape[0]}.")
    if x.shape[0] <= 3:
        raise ValueError(f"Expected more than 3 samples for `debiased_cka`, got N={x.shape[0]}.")
    k, l = x @ x.T, y @ y.T  # (N, N)
    den = (_unbiased_hsic(k, k).clamp_min(0) * _unbiased_hsic(l, l).clamp_min(0)).sqrt()
    return (_unbiased_hsic(k, l) / (den + _EPS)).float()


@_full_precision
def _cka_grams(feats: Tensor) -> Tensor:
    """Centred linear Gram matrices ``X_c X_c^T`` of every view, ``(V, N, D) -> (V, N, N)``.

    Centring and product run in float32 for float32 (or lower) inputs: on centred tokens the
    relative error is ~1e-7 (the CKA values move by < 1e-7), and the product is 3x faster on
    the CPU than in float64; float64 inputs stay float64. The sums over the Gram entries then
    run in the accumulation dtype (float64 except on MPS).
    """
    acc = _acc_dtype(feats.device)
    dtype = acc if feats.dtype == torch.float64 else torch.float32
    xc = feats.to(dtype)
    xc = xc - xc.mean(1, keepdim=True)  # (V, N, D)
    v, n, _ = xc.shape
    h = n // 2
    grams = xc.new_empty(v, n, n)
    torch.bmm(xc[:, :h], xc.transpose(1, 2), out=grams[:, :h])  # (V, h, N): the symmetric Gram's top rows
    torch.bmm(xc[:, h:], xc[:, h:].transpose(1, 2), out=grams[:, h:, h:])
    grams[:, h:, :h] = grams[:, :h, h:].transpose(1, 2)  # 3/4 of the products of a full bmm
    return grams.to(acc)


@_full_precision
def _linear_cka_features(feats: Tensor, idx_i: Tensor, idx_j: Tensor) -> Tensor:
    """:func:`linear_cka` in feature form (cheaper when ``N >= D``) for ``(V, N, D)`` tokens, ``(P,)``."""
    acc = _acc_dtype(feats.device)
    dtype = acc if feats.dtype == torch.float64 else torch.float32
    xc = feats.to(dtype) - feats.mean(1, keepdim=True, dtype=acc).to(dtype)  # (V, N, D)
    norms = torch.bmm(xc.transpose(1, 2), xc).to(acc).flatten(1).norm(dim=1)  # (V,) ||X^T X||_F
    cross = torch.bmm(xc[idx_j].transpose(1, 2), xc[idx_i]).to(acc).flatten(1).square().sum(1)  # (P,)
    return (cross / (norms[idx_i] * norms[idx_j] + _EPS)).float()


def _linear_cka_views(grams: Tensor, idx_i: Tensor, idx_j: Tensor) -> Tensor:
    """:func:`linear_cka` (Gram form) for the pairs ``(idx_i[p], idx_j[p])`` of :func:`_cka_grams`, ``(P,)``."""
    flat = grams.flatten(1)  # (V, N * N)
    inner = flat @ flat.T  # (V, V): <K_u, K_v>_F for every two views
    norms = inner.diagonal().clamp_min(0).sqrt()  # (V,)
    return (inner[idx_i, idx_j] / (norms[idx_i] * norms[idx_j] + _EPS)).float()


def _debiased_cka_views(grams: Tensor, idx_i: Tensor, idx_j: Tensor) -> Tensor:
    """:func:`debiased_cka` for the pairs ``(idx_i[p], idx_j[p])`` of :func:`_cka_grams`, ``(P,)``."""
    n = grams.shape[1]
    k = grams.clone()
    k.diagonal(dim1=1, dim2=2).zero_()  # (V, N, N), zero diagonals
    flat = k.flatten(1)
    trace = flat @ flat.T  # (V, V): tr(K_u L_v) (K symmetric)
    k1 = k.sum(2)  # (V, N) row sums
    total = k1.sum(1)  # (V,)
    hsic = (trace + torch.outer(total, total) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k1 @ k1.T)) / (n * (n - 3))
    self_hsic = hsic.diagonal().clamp_min(0)  # (V,)
    den = (self_hsic[idx_i] * self_hsic[idx_j]).sqrt()
    return (hsic[idx_i, idx_j] / (den + _EPS)).float()


def _gaussian_window(sigma: float, device: torch.device) -> Tensor:
    radius = int(3.5 * sigma + 0.5)  # scikit-image's SSIM: truncate=3.5 -> 11 taps for sigma=1.5
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return (w / w.sum()).float().to(device)


@_full_precision
def ssim(
    img_a: Tensor, img_b: Tensor, mask: Tensor | None = None, *, data_range: float = 1.0, sigma: float = 1.5,
    erode_mask: bool = True,
) -> Tensor:
    r"""Mean structural similarity (Wang et al., 2004) per pair, batched.

    Gaussian-weighted statistics (``sigma=1.5``, an 11 x 11 window as scikit-image
    truncates it), ``K1=0.01``, ``K2=0.03``, population covariances; the SSIM map of
    every channel is averaged over channels and over the valid region, i.e. the
    pixels whose window lies inside the image (a border of ``r = 5`` px is left out).
    Without a mask this equals ``skimage.metrics.structural_similarity(a, b,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1,
    channel_axis=-1)``.

    .. math::
        \mathrm{SSIM} = \frac{(2 \mu_a \mu_b + C_1)(2 \sigma_{ab} + C_2)}
        {(\mu_a^2 + \mu_b^2 + C_1)(\sigma_a^2 + \sigma_b^2 + C_2)}

    Mask: the map is averaged over the valid pixels where ``mask`` is true. With
    ``erode_mask=True`` (default) a pixel only counts when the mask is true in its
    whole window, so no window straddles the overlap border and pixels outside the
    overlap (e.g. the zeros of a warped image) never enter the statistics; with
    ``False`` every masked pixel counts. A pair with no pixel left gives NaN.

    Args:
        img_a: ``(P, C, h, w)`` images, ``h, w >= 11``.
        img_b: ``(P, C, h, w)`` images (e.g. view j warped into view i's frame).
        mask: ``(P, h, w)`` bool, the pixels to compare, or None for all.
        data_range: value range of the images (``C1 = (0.01 R)^2``, ``C2 = (0.03 R)^2``).
        sigma: standard deviation of the Gaussian window in pixels.
        erode_mask: shrink the mask by the window radius (see above).

    Returns:
        ``(P,)`` float32, 1 for identical images.

    Example:
        >>> x = torch.linspace(0, 1, 3 * 16 * 16).reshape(1, 3, 16, 16)
        >>> ssim(x, x)
        tensor([1.])
    """
    _check_shape(img_a, "P C h w", "img_a")
    _check_shape(img_b, "P C h w", "img_b")
    _check_same(img_a, img_b, "img_a", "img_b")
    _check_range(data_range, "data_range", 0, None, low_inclusive=False)
    _check_range(sigma, "sigma", 0, None, low_inclusive=False)
    win = _gaussian_window(sigma, img_a.device)
    k, r = win.numel(), win.numel() // 2
    h, w = img_a.shape[2:]
    if h < k or w < k:
        raise ValueError(f"Expected images of at least {k} x {k} px for the SSIM window, got {h} x {w}.")
    _check_mask(mask, img_a)

    a, b = img_a.float(), img_b.float()
    valid = None  # (P, h-2r, w-2r): the valid positions that count
    if mask is not None:
        if erode_mask:
            outside = F.max_pool2d((~mask).float()[:, None], kernel_size=(k, 1), stride=1)  # separable: the same
            valid = F.max_pool2d(outside, kernel_size=(1, k), stride=1)[:, 0] == 0
        else:
            valid = mask[:, r : h - r, r : w - r]
        rows, cols = valid.any(2).any(0).nonzero()[:, 0], valid.any(1).any(0).nonzero()[:, 0]
        if len(rows) == 0:
            return torch.full((a.shape[0],), math.nan, dtype=torch.float32, device=a.device)
        # only the bounding box of the valid positions is filtered (each SSIM value depends on its window only)
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        a, b = a[..., y0 : y1 + 2 * r, x0 : x1 + 2 * r], b[..., y0 : y1 + 2 * r, x0 : x1 + 2 * r]
        valid = valid[:, y0:y1, x0:x1]
    smap = _ssim_map(a, b, win, data_range)  # (P, h', w')
    if valid is None:
        return smap.mean((1, 2))
    valid = valid.float()
    return (smap * valid).sum((1, 2)) / valid.sum((1, 2))  # 0 / 0 = NaN for an empty mask


def _ssim_map(a: Tensor, b: Tensor, win: Tensor, data_range: float) -> Tensor:
    """SSIM map averaged over channels at the valid positions: ``(P, C, h, w) -> (P, h - 2r, w - 2r)``."""
    chans, k = a.shape[1], win.numel()
    stats = torch.cat([a, b, a * a, b * b, a * b], dim=1)  # (P, 5C, h, w)
    groups = stats.shape[1]
    stats = F.conv2d(stats, win.view(1, 1, k, 1).expand(groups, 1, k, 1), groups=groups)
    stats = F.conv2d(stats, win.view(1, 1, 1, k).expand(groups, 1, 1, k), groups=groups)  # (P, 5C, h-2r, w-2r)
    mu_a, mu_b, e_aa, e_bb, e_ab = stats.split(chans, dim=1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    var_a, var_b, cov = e_aa - mu_a * mu_a, e_bb - mu_b * mu_b, e_ab - mu_a * mu_b
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return smap.mean(1)


_LPIPS_NETS = ("alex", "vgg", "squeeze")


def _backbone_checkpoint(net: str) -> str:
    """The file torchvision loads the ImageNet backbone from (``$TORCH_HOME/hub/checkpoints/...``)."""
    from torchvision import models

    weights = {
        "alex": models.AlexNet_Weights.IMAGENET1K_V1,
        "vgg": models.VGG16_Weights.IMAGENET1K_V1,
        "squeeze": models.SqueezeNet1_1_Weights.IMAGENET1K_V1,
    }[net]
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


class LPIPSMetric:
    """LPIPS distance (Zhang et al., 2018) between the images of every pair, built once.

    Lower is more similar (0 for identical images). Inputs in ``[0, 1]`` are mapped
    to ``[-1, 1]`` and upsampled (bilinear) so that the shorter side is at least
    ``min_size`` px (AlexNet needs >= 32). The network runs on the inputs' device,
    without gradients, autocast off.

    Mask: pixels outside the mask are set to mid-grey in both images, so they agree
    there, and each layer's distance map is averaged with the mask (area-resized to
    that layer's resolution) as weights. The value is thus approximately LPIPS over
    the overlap (deep receptive fields near its border still see the grey fill).
    Without a mask it is exactly ``lpips.LPIPS`` with the same network.

    Availability: the linear layers ship inside the ``lpips`` package, the ImageNet
    backbone is loaded by torchvision from ``$TORCH_HOME/hub/checkpoints`` (normally
    downloaded on first use). When the package or that file is missing, or the
    network cannot be built, nothing is downloaded: :attr:`skipped` holds the reason,
    one warning is issued and calls return None.

    Args:
        net: backbone, one of ``("alex", "vgg", "squeeze")``.
        pretrained_backbone: False builds a randomly initialised backbone (seeded, no
            download, global RNG untouched): the full code path, e.g. for tests.
        min_size: minimum length of the shorter side fed to the network.
    """

    higher_is_better = False

    def __init__(self, net: Literal["alex", "vgg", "squeeze"] = "alex", *, pretrained_backbone: bool = True,
                 min_size: int = 64) -> None:
        _check_choice(net, _LPIPS_NETS, "net")
        _check_range(min_size, "min_size", 32, None)
        self.net = net
        self.pretrained_backbone = pretrained_backbone
        self.min_size = int(min_size)
        self._model: torch.nn.Module | None = None
        self.skipped: str | None = self._build()
        if self.skipped is not None:
            warnings.warn(f"LPIPS is skipped: {self.skipped}", UserWarning, stacklevel=2)

    def _build(self) -> str | None:
        if not _LPIPS_AVAILABLE or not _TORCHVISION_AVAILABLE:
            missing = "lpips" if not _LPIPS_AVAILABLE else "torchvision"
            return f"the `{missing}` package is not installed: pip install 'panoviz_callback[lpips]'"
        if self.pretrained_backbone:
            path = _backbone_checkpoint(self.net)
            if not os.path.isfile(path):
                return (
                    f"LPIPS backbone weights ({self.net}) are not available offline: torchvision looks for {path} "
                    f"(TORCH_HOME={os.environ.get('TORCH_HOME', '<unset>')}); put the file there to enable LPIPS"
                )
        import lpips

        try:
            with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
                warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation
                torch.manual_seed(0)
                model = lpips.LPIPS(net=self.net, pretrained=True, pnet_rand=not self.pretrained_backbone,
                                    verbose=False)
        except Exception as err:  # a corrupt or foreign checkpoint must not stop the analysis
            return f"LPIPS ({self.net}) could not be built: {type(err).__name__}: {err}"
        self._model = model.eval().requires_grad_(False)
        return None

    def __call__(self, a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor | None:
        """Distances between ``a[p]`` and ``b[p]``.

        Args:
            a: ``(P, 3, h, w)`` images in ``[0, 1]``.
            b: ``(P, 3, h, w)`` images in ``[0, 1]``.
            mask: ``(P, h, w)`` bool, the pixels to compare, or None for all.

        Returns:
            ``(P,)`` float32 distances (NaN for an empty mask), or None when :attr:`skipped`.
        """
        _check_shape(a, "P 3 h w", "a")
        _check_shape(b, "P 3 h w", "b")
        _check_same(a, b, "a", "b")
        _check_mask(mask, a)
        if self._model is None:
            return None
        model = self._model.to(a.device)
        with torch.no_grad(), torch.autocast(a.device.type, enabled=False):
            x = torch.cat([a, b]).float() * 2 - 1  # (2P, 3, h, w) in [-1, 1]
            weight = None if mask is None else mask.float()[:, None]  # (P, 1, h, w)
            if weight is not None:
                x = x * weight.repeat(2, 1, 1, 1)  # mid-grey (0) outside the mask in both images
            h, w = x.shape[-2:]
            if min(h, w) < self.min_size:
                scale = self.min_size / min(h, w)
                size = (max(self.min_size, round(h * scale)), max(self.min_size, round(w * scale)))
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                if weight is not None:
                    weight = F.interpolate(weight, size=size, mode="bilinear", align_corners=False)
            import lpips

            outs = model.net(model.scaling_layer(x))
            dist = torch.zeros(a.shape[0], device=a.device)
            for layer, out in enumerate(outs):
                f0, f1 = lpips.normalize_tensor(out).chunk(2)
                layer_map = model.lins[layer]((f0 - f1) ** 2)[:, 0]  # (P, hk, wk)
                if weight is None:
                    dist += layer_map.mean((1, 2))
                else:
                    wk = F.interpolate(weight, size=layer_map.shape[-2:], mode="area")[:, 0]
                    dist += (layer_map * wk).sum((1, 2)) / wk.sum((1, 2))
        return dist
