"""Matching metrics: Hungarian matching of tokens, its accuracy against the geometry, nearest neighbours."""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from panoviz_callback._checks import _check_shape
from panoviz_callback._imports import require
from panoviz_callback.metrics._common import _check_index_pair, _full_precision, _unit

__all__ = ["hungarian_cosine", "overlap_hungarian", "hungarian_accuracy", "nn_accuracy", "matching_chance",
           "matching_ceiling"]


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

    sim = _unit64(a) @ _unit64(b).T  # (N, M) float64: near-ties must not be decided by float32 rounding
    rows, cols = linear_sum_assignment(sim.detach().cpu().numpy(), maximize=True)
    rows_t = torch.as_tensor(rows, dtype=torch.long, device=a.device)
    cols_t = torch.as_tensor(cols, dtype=torch.long, device=a.device)
    assignment = torch.full((a.shape[0],), -1, dtype=torch.long, device=a.device)
    assignment[rows_t] = cols_t
    return sim[rows_t, cols_t].mean().float(), assignment


def _unit64(x: Tensor) -> Tensor:
    """Unit rows in float64 (the Hungarian matching compares cosines that may differ by < 1e-7)."""
    return _unit(x).double()


def _solve(sim: np.ndarray) -> tuple[float, np.ndarray]:
    """One assignment of the rows of ``sim (n, m)``, ``n <= m``, maximising the total; NumPy/scipy only.

    scipy solves the row-reduced matrix (a constant per row does not change which matching is best,
    every row being assigned), from which its augmenting paths are shorter. For a square matrix the
    columns are reduced too (then every column is assigned as well).
    """
    from scipy.optimize import linear_sum_assignment

    cost = sim.max(1, keepdims=True) - sim  # >= 0, a zero in every row
    if sim.shape[0] == sim.shape[1]:
        cost -= cost.min(0, keepdims=True)
    rows, cols = linear_sum_assignment(cost)  # rows == arange(n) for n <= m
    return float(sim[rows, cols].mean()), cols


def _solve_all(sims: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
    workers = min(torch.get_num_threads(), len(sims))
    if workers > 1:  # scipy releases the GIL while it solves: use the CPU threads torch may use
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(_solve, sims))
    return [_solve(sim) for sim in sims]


@_full_precision
def _hungarian_views(units: Tensor, idx_i: Tensor, idx_j: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`hungarian_cosine` (all tokens) for the pairs ``(idx_i[p], idx_j[p])`` of ``V`` views of unit tokens.

    Used where there is no geometry (query tokens). The ``P`` float64 cosine matrices go to the CPU
    in one transfer; the assignments are solved in a thread pool (:func:`_solve`).

    Args:
        units: ``(V, N, D)`` unit-norm tokens (:func:`_unit`).
        idx_i: ``(P,)`` first view of every pair.
        idx_j: ``(P,)`` second view.

    Returns:
        ``(mean_cos (P,), assignment (P, N))``, as :func:`hungarian_cosine` per pair.
    """
    require("scipy", "Hungarian matching")
    n_pairs, n = len(idx_i), units.shape[1]
    if n_pairs == 0:
        return units.new_zeros(0), torch.zeros(0, n, dtype=torch.long, device=units.device)
    u64 = units.double()
    sims = torch.bmm(u64[idx_i], u64[idx_j].transpose(1, 2))  # (P, N, N)
    solved = _solve_all(list(sims.cpu().numpy()))
    means = torch.tensor([m for m, _ in solved], dtype=torch.float32, device=units.device)
    cols = torch.from_numpy(np.stack([c for _, c in solved])).to(device=units.device, dtype=torch.long)
    return means, cols.reshape(n_pairs, n)


def _overlap_sims(units: Tensor, idx_i: Tensor, idx_j: Tensor, idx_a: Sequence[Tensor],
                  dtype: torch.dtype = torch.float64) -> list[Tensor]:
    """Cosines of view i's overlap tokens against all of view j's tokens, per pair: ``(K_p, N)`` each."""
    out = []
    for p, (i, j) in enumerate(zip(idx_i.tolist(), idx_j.tolist())):
        rows = units[i].index_select(0, idx_a[p].to(device=units.device, dtype=torch.long))  # (K_p, D)
        out.append(rows.to(dtype) @ units[j].to(dtype).T)  # (K_p, N)
    return out


@_full_precision
def _overlap_hungarian_views(sims: Sequence[Tensor], idx_a: Sequence[Tensor],
                             n: int) -> tuple[Tensor, Tensor]:
    """:func:`overlap_hungarian` for ``P`` pairs from their :func:`_overlap_sims`.

    Args:
        sims: ``P`` float64 cosine matrices ``(K_p, N)`` (view i's overlap tokens x all of view j).
        idx_a: ``P`` index tensors ``(K_p,)``, the rows' tokens in view i.
        n: tokens of view i, ``N``.

    Returns:
        ``(mean_cos (P,), assignment (P, N))``: NaN and all ``-1`` for a pair without overlap.
    """
    require("scipy", "Hungarian matching")
    n_pairs = len(sims)
    device = sims[0].device if n_pairs else torch.device("cpu")
    assignment = torch.full((n_pairs, n), -1, dtype=torch.long, device=device)
    means = torch.full((n_pairs,), math.nan, dtype=torch.float32, device=device)
    todo = [p for p in range(n_pairs) if sims[p].shape[0] > 0]
    if not todo:
        return means, assignment
    flat = torch.cat([sims[p].flatten() for p in todo]).cpu().numpy()  # one transfer
    sizes = np.cumsum([0] + [sims[p].numel() for p in todo])
    solved = _solve_all([flat[a:b].reshape(sims[p].shape) for p, a, b in zip(todo, sizes[:-1], sizes[1:])])
    for p, (mean, cols) in zip(todo, solved):
        means[p] = mean
        assignment[p, idx_a[p].to(device=device, dtype=torch.long)] = torch.from_numpy(cols).to(device)
    return means, assignment


def _near(got: Tensor, want: Tensor, gw: int) -> Tensor:
    """``got`` and ``want`` (row-major indices on a grid ``gw`` wide) within one token (Chebyshev), ``got >= 0``."""
    near = (torch.div(got, gw, rounding_mode="floor") - want // gw).abs().le(1)
    return near & (got % gw - want % gw).abs().le(1) & got.ge(0)


def _nn_accuracy_views(sims: Sequence[Tensor], idx_b: Sequence[Tensor], grid_hw: tuple[int, int]) -> Tensor:
    """:func:`nn_accuracy` for ``P`` pairs from their :func:`_overlap_sims`, ``(P,)`` (NaN without overlap)."""
    gw = int(grid_hw[1])
    values = []
    for sim, want in zip(sims, idx_b):
        if sim.shape[0] == 0:
            values.append(sim.new_full((), math.nan, dtype=torch.float32))
            continue
        got = sim.argmax(1)  # (K,) the first maximum on ties
        values.append(_near(got, want.to(device=sim.device, dtype=torch.long), gw).float().mean())
    return torch.stack(values) if values else torch.zeros(0)


def _neighbour_graph(idx_b: Tensor, grid_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``k`` and columns: the tokens within one token (Chebyshev) of ``idx_b[k]`` on the grid."""
    gh, gw = grid_hw
    want = idx_b.cpu().numpy().astype(np.int64)
    dy, dx = np.meshgrid(np.arange(-1, 2), np.arange(-1, 2), indexing="ij")
    y = want[:, None] // gw + dy.reshape(1, 9)
    x = want[:, None] % gw + dx.reshape(1, 9)
    ok = (y >= 0) & (y < gh) & (x >= 0) & (x < gw)
    rows = np.broadcast_to(np.arange(len(want))[:, None], ok.shape)[ok]
    return rows, (y * gw + x)[ok]


def matching_chance(idx_b: Tensor, grid_hw: tuple[int, int]) -> float:
    """Expected :func:`hungarian_accuracy` (and :func:`nn_accuracy`) of features that carry no information.

    A uniformly random one-to-one matching of view i's overlap tokens into the ``N`` tokens of
    view j (or a uniformly random nearest neighbour) gives each token a uniformly random partner
    candidate, so the expected share of hits is the mean, over the overlap tokens, of the number
    of grid tokens within one token of the true partner (9 inside the grid, 6 on an edge, 4 in a
    corner) divided by ``N``: about ``9 / N``.

    Args:
        idx_b: ``(K,)`` the true partners in view j (row-major indices).
        grid_hw: ``(gh, gw)`` token grid of view j.

    Returns:
        A float in ``[0, 1]``; NaN when ``K == 0``.

    Example:
        >>> round(matching_chance(torch.tensor([0, 4]), (3, 3)), 4)
        0.7222
    """
    gh, gw = (int(v) for v in grid_hw)
    _check_index_pair(idx_b, idx_b, gh * gw, gh * gw)
    if len(idx_b) == 0:
        return math.nan
    rows, _ = _neighbour_graph(idx_b, (gh, gw))
    return float(len(rows) / (len(idx_b) * gh * gw))


def matching_ceiling(idx_a: Tensor, idx_b: Tensor, grid_hw: tuple[int, int]) -> float:
    """The best :func:`hungarian_accuracy` any one-to-one matching can reach, from the geometry alone.

    Several overlap tokens of view i may share a partner in view j, while a one-to-one matching
    gives each token of j to one token of i at most. The ceiling is the size of a maximum bipartite
    matching between the overlap tokens of i and the tokens of j, an edge joining token ``idx_a[k]``
    to every token within one token (Chebyshev) of ``idx_b[k]``, divided by ``K`` (scipy's
    Hopcroft-Karp ``maximum_bipartite_matching``). With the rectangular matching of
    :func:`overlap_hungarian` (all of view j's tokens are candidates) it is 1.0 on the e2p and
    sliding-window geometries.

    Args:
        idx_a: ``(K,)`` overlap tokens of view i (distinct).
        idx_b: ``(K,)`` their partners in view j.
        grid_hw: ``(gh, gw)`` token grid of both views.

    Returns:
        A float in ``[0, 1]``; NaN when ``K == 0``.

    Example:
        >>> matching_ceiling(torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0]), (1, 3))  # 2 tokens near 0
        0.6666666666666666
    """
    gh, gw = (int(v) for v in grid_hw)
    _check_index_pair(idx_a, idx_b, gh * gw, gh * gw)
    if len(idx_b) == 0:
        return math.nan
    require("scipy", "the matching ceiling")
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    rows, cols = _neighbour_graph(idx_b, (gh, gw))
    graph = csr_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(len(idx_b), gh * gw))
    matched = maximum_bipartite_matching(graph, perm_type="column")  # (K,) column per row, -1 unmatched
    return float((matched >= 0).sum() / len(idx_b))


def _matching_reference_views(idx_b: Sequence[Tensor], idx_a: Sequence[Tensor],
                              grid_hw: tuple[int, int]) -> tuple[list[float], list[float]]:
    """Chance level and ceiling of every pair (NaN without overlap): ``([chance], [ceiling])``."""
    chance = [matching_chance(b, grid_hw) for b in idx_b]
    ceiling = [matching_ceiling(a, b, grid_hw) for a, b in zip(idx_a, idx_b)]
    return chance, ceiling


@_full_precision
def overlap_hungarian(a: Tensor, b: Tensor, idx_a: Tensor) -> tuple[Tensor, Tensor]:
    r"""Hungarian matching of view i's overlap tokens against **all** of view j's tokens.

    A rectangular assignment (``K <= M``) on float64 cosines: each overlap token of view i gets a
    distinct token of view j maximising the total cosine. View i's tokens outside the overlap do
    not compete, and overlap tokens that share a geometric partner (the correspondence is
    many-to-one) still find free neighbours of it, so a feature map that is a function of the scene
    point alone scores about 1 with :func:`hungarian_accuracy`.

    .. math:: \mathrm{hc} = \max_{\pi\ \mathrm{injective}} \frac{1}{K} \sum_{k} \cos(a_{i_k}, b_{\pi(k)})

    Args:
        a: tokens of view i, ``(N, D)``.
        b: tokens of view j, ``(M, D)``, ``M >= K``.
        idx_a: ``(K,)`` distinct overlap tokens of view i (``patch_correspondence``'s ``idx_i``).

    Returns:
        ``(mean_cos, assignment)``: a scalar float32 tensor (NaN when ``K == 0``) and a LongTensor
        ``(N,)`` with the token of ``b`` matched to every overlap token of ``a``, ``-1`` elsewhere.

    Raises:
        ValueError: bad shapes, repeated or out-of-range indices, or ``K > M``.

    Example:
        >>> x = torch.eye(3)
        >>> cos, cols = overlap_hungarian(x, x[[2, 0, 1]], torch.tensor([0, 2]))
        >>> cos, cols
        (tensor(1.), tensor([ 1, -1,  0]))
    """
    _check_shape(a, "N D", "a")
    _check_shape(b, "M D", "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"Expected `a` and `b` with the same feature dimension D, got {a.shape[1]} and {b.shape[1]}.")
    _check_index_pair(idx_a, idx_a, a.shape[0], a.shape[0])
    if len(idx_a) > b.shape[0] or len(torch.unique(idx_a)) != len(idx_a):
        raise ValueError(f"Expected at most M = {b.shape[0]} distinct indices in `idx_a`, got {len(idx_a)} "
                         f"({len(torch.unique(idx_a))} distinct).")
    sim = _unit64(a).index_select(0, idx_a.to(a.device, torch.long)) @ _unit64(b).T  # (K, M) float64
    means, assignment = _overlap_hungarian_views([sim], [idx_a], a.shape[0])
    return means[0], assignment[0]


def nn_accuracy(a: Tensor, b: Tensor, idx_a: Tensor, idx_b: Tensor, grid_hw: tuple[int, int]) -> float:
    """Share of overlap tokens whose cosine nearest neighbour in view j lies within one token of the partner.

    The correspondence-recall measure of multi-view consistency probes: token ``idx_a[k]`` of
    view i counts when the token of view j with the largest cosine to it (the first one on ties)
    is at Chebyshev distance ``<= 1`` from ``idx_b[k]``. Not one-to-one, so no ceiling below 1;
    its chance level is :func:`matching_chance`. One matrix product and an ``argmax`` on the
    inputs' device.

    Args:
        a: tokens of view i, ``(N, D)``.
        b: tokens of view j, ``(N, D)`` on the same ``(gh, gw)`` grid.
        idx_a: ``(K,)`` overlap tokens of view i.
        idx_b: ``(K,)`` their partners in view j.
        grid_hw: ``(gh, gw)``, ``gh * gw == N``.

    Returns:
        A float in ``[0, 1]``; NaN when ``K == 0``.

    Example:
        >>> x = torch.eye(4)
        >>> nn_accuracy(x, x, torch.tensor([0, 3]), torch.tensor([0, 3]), (2, 2))
        1.0
    """
    _check_shape(a, "N D", "a")
    _check_shape(b, f"{a.shape[0]} {a.shape[1]}", "b")
    gh, gw = (int(v) for v in grid_hw)
    if gh * gw != a.shape[0]:
        raise ValueError(f"Expected `grid_hw` with gh * gw == N = {a.shape[0]}, got {(gh, gw)}.")
    _check_index_pair(idx_a, idx_b, gh * gw, gh * gw)
    sims = _overlap_sims(torch.stack([_unit(a), _unit(b)]), torch.tensor([0]), torch.tensor([1]), [idx_a],
                         torch.float32)
    return float(_nn_accuracy_views(sims, [idx_b], (gh, gw))[0])


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
    hits = torch.zeros(n_pairs, device=device).index_add_(0, pair, _near(got, want, gw).float())
    return hits / lengths.float()  # 0 / 0 = NaN where a pair has no overlap


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
    return float(_near(got, want, gw).float().mean())
