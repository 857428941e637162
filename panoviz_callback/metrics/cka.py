"""Centred kernel alignment (linear and debiased) of the tokens of view pairs.

Two pairings of the rows: :func:`linear_cka` / :func:`debiased_cka` of two whole views pair
the rows by grid index (different scene points: the original tool's layout score), while
:func:`overlap_cka` / :func:`overlap_debiased_cka` pair them by the patch correspondence
(row k of both views sees the same scene point).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from panoviz_callback._checks import _check_shape
from panoviz_callback.metrics._common import _EPS, _acc_dtype, _check_index_pair, _full_precision

__all__ = ["linear_cka", "debiased_cka", "overlap_cka", "overlap_debiased_cka"]


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


def _pair_rows(a: Tensor, b: Tensor, idx_a: Tensor, idx_b: Tensor) -> tuple[Tensor, Tensor]:
    _check_shape(a, "N D", "a")
    _check_shape(b, "M D", "b")
    _check_index_pair(idx_a, idx_b, a.shape[0], b.shape[0])
    return (a.index_select(0, idx_a.to(a.device, torch.long)),
            b.index_select(0, idx_b.to(b.device, torch.long)))  # (K, D1), (K, D2): row k is one scene point


def overlap_cka(a: Tensor, b: Tensor, idx_a: Tensor, idx_b: Tensor) -> Tensor:
    r"""Linear CKA over the token pairs of the geometric correspondence.

    Row ``k`` of :math:`X` is token ``idx_a[k]`` of view i and row ``k`` of :math:`Y` is token
    ``idx_b[k]`` of view j: both see the same scene point (``patch_correspondence``), so
    :math:`\mathrm{CKA}(X, Y)` (:func:`linear_cka`) asks whether the two views represent the
    shared scene points alike, up to a rotation and scale of the feature space. Invariant to a
    joint permutation of the pairs. :func:`linear_cka` of the full views pairs rows by grid
    index instead, i.e. different scene points.

    Args:
        a: tokens of view i, ``(N, D1)``.
        b: tokens of view j, ``(M, D2)``.
        idx_a: ``(K,)`` integer token indices into ``a``.
        idx_b: ``(K,)`` integer token indices into ``b``.

    Returns:
        Scalar float32 tensor; NaN when ``K < 2``.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
        >>> overlap_cka(x, 2 * x.flip(0), torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0]))
        tensor(1.)
    """
    x, y = _pair_rows(a, b, idx_a, idx_b)
    if x.shape[0] < 2:
        return torch.tensor(float("nan"), device=a.device)
    return linear_cka(x, y)


def overlap_debiased_cka(a: Tensor, b: Tensor, idx_a: Tensor, idx_b: Tensor) -> Tensor:
    """Debiased linear CKA (:func:`debiased_cka`) over the token pairs of the geometric correspondence.

    The pairing of :func:`overlap_cka`; close to 0 for features unrelated across the views even when
    the overlap holds fewer tokens than the feature dimension.

    Args:
        a: tokens of view i, ``(N, D1)``.
        b: tokens of view j, ``(M, D2)``.
        idx_a: ``(K,)`` integer token indices into ``a``.
        idx_b: ``(K,)`` integer token indices into ``b``.

    Returns:
        Scalar float32 tensor; NaN when ``K <= 3``.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [1.0, 1.0]])
        >>> overlap_debiased_cka(x, -x, torch.arange(4), torch.arange(4))
        tensor(1.)
    """
    x, y = _pair_rows(a, b, idx_a, idx_b)
    if x.shape[0] <= 3:
        return torch.tensor(float("nan"), device=a.device)
    return debiased_cka(x, y)


@_full_precision
def _overlap_cka_views(feats: Tensor, idx_i: Tensor, idx_j: Tensor, idx_a: Sequence[Tensor],
                       idx_b: Sequence[Tensor], *, linear: bool = True,
                       debiased: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """:func:`overlap_cka` and :func:`overlap_debiased_cka` for ``P`` pairs of ``(V, N, D)`` tokens.

    Pairs with the same overlap size ``K`` are batched: their paired rows are stacked as ``(2G, K, D)``
    and one call of the Gram-matrix helpers serves both CKAs; linear CKA alone takes the feature form
    when ``K >= D``. Returns ``(linear (P,) | None, debiased (P,) | None)``, NaN where the overlap is
    too small (``K < 2``, debiased ``K <= 3``).
    """
    n_pairs = len(idx_a)
    lin = feats.new_full((n_pairs,), float("nan"), dtype=torch.float32)
    deb = lin.clone()
    sizes: dict[int, list[int]] = {}
    for p in range(n_pairs):
        sizes.setdefault(len(idx_a[p]), []).append(p)
    for k, group in sizes.items():
        if k < 2:
            continue
        ia = torch.stack([idx_a[p].to(feats.device, torch.long) for p in group])  # (G, K)
        ib = torch.stack([idx_b[p].to(feats.device, torch.long) for p in group])
        vi, vj = idx_i[group].to(feats.device), idx_j[group].to(feats.device)
        rows = torch.stack([feats[vi[:, None], ia], feats[vj[:, None], ib]], 1).flatten(0, 1)  # (2G, K, D)
        first = torch.arange(0, 2 * len(group), 2, device=feats.device)
        where = torch.tensor(group, device=feats.device)
        if not debiased and k >= feats.shape[2]:
            lin[where] = _linear_cka_features(rows, first, first + 1)
            continue
        grams = _cka_grams(rows)  # (2G, K, K)
        if linear:
            lin[where] = _linear_cka_views(grams, first, first + 1)
        if debiased and k > 3:
            deb[where] = _debiased_cka_views(grams, first, first + 1)
    return (lin if linear else None), (deb if debiased else None)
