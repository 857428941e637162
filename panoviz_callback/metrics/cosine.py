"""Cosine metrics of the tokens of view pairs: same index, and over the geometric correspondence."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from panoviz_callback._checks import _check_shape
from panoviz_callback.metrics._common import _check_index_pair, _check_same, _full_precision, _unit

__all__ = ["token_cosine", "overlap_cosine", "overlap_cosine_pairs"]


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
