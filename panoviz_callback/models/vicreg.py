r"""VICReg on the overlapping tokens of adjacent views (Bardes, Ponce and LeCun, 2022).

For every view pair ``(i, j)`` the loss takes the token pairs that see the same scene
point (``pairing="geometric"``: :func:`panoviz_callback.patch_correspondence`) or the
original tool's column strips (``pairing="strip"``: :func:`strip_correspondence`), and
computes, per panorama and per pair, on the ``M`` paired tokens ``a, b`` of shape ``(M, D)``:

.. math::

    \text{inv} = \frac{1}{M D} \sum_{m, d} (a_{md} - b_{md})^2 \qquad
    \text{var} = \tfrac{1}{2} \big(v(a) + v(b)\big), \;
    v(x) = \frac{1}{D} \sum_d \max\big(0, \gamma - \sqrt{\operatorname{Var}_m x_{md} + \epsilon}\big)

.. math::

    \text{cov} = c(a) + c(b), \;
    c(x) = \frac{1}{D} \sum_{d \ne e} \operatorname{Cov}_m(x)_{de}^2

with the unbiased variance and covariance over the ``M`` tokens, exactly as in the VICReg
reference code (variance averaged over the two sides, covariance summed). The three
terms are averaged over panoramas and pairs (every pair with at least 2 token pairs
counts once) and the loss is ``sim_weight * inv + var_weight * var + cov_weight * cov``.
Everything is computed in float32.

Query-layout features (QFormer, Perceiver) lie on no grid: there, query ``k`` of view
``i`` is paired with query ``k`` of view ``j`` (pass ``correspondences=None``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from panoviz_callback._checks import _check_choice, _check_range, _check_shape

__all__ = ["PAIRINGS", "VICRegOverlapLoss", "strip_correspondence", "vicreg_terms"]

PAIRINGS = ("geometric", "strip")

Correspondences = Mapping[tuple[int, int], tuple[Tensor, Tensor]]


def strip_correspondence(grid_hw: tuple[int, int], overlap: float = 0.5) -> tuple[Tensor, Tensor]:
    """Token pairs of the original column-strip scheme, for comparison with the geometric pairing.

    The last ``k = max(1, int(gw * overlap))`` token columns of view ``i`` are paired with
    the first ``k`` columns of view ``j`` (its right-hand neighbour), row by row. For
    90 deg e2p views at 50 % overlap this is off by one to three tokens near the top and
    bottom rows, where the true overlap is narrower (perspective), see
    :func:`panoviz_callback.patch_correspondence`.

    Args:
        grid_hw: token grid ``(gh, gw)``.
        overlap: fraction of the view width shared with the neighbour, in ``(0, 1]``.

    Returns:
        ``(idx_i, idx_j)``: LongTensors of shape ``(gh * k,)``, row-major token indices.

    Example:
        >>> strip_correspondence((2, 4), 0.5)
        (tensor([2, 3, 6, 7]), tensor([0, 1, 4, 5]))
    """
    gh, gw = (int(s) for s in grid_hw)
    _check_range(gh, "grid_hw[0]", 1)
    _check_range(gw, "grid_hw[1]", 1)
    _check_range(overlap, "overlap", 0.0, 1.0, low_inclusive=False)
    k = max(1, int(gw * overlap))
    rows = torch.arange(gh).unsqueeze(1) * gw  # (gh, 1)
    cols = torch.arange(k).unsqueeze(0)  # (1, k)
    return (rows + (gw - k) + cols).reshape(-1), (rows + cols).reshape(-1)


def vicreg_terms(a: Tensor, b: Tensor, gamma: float = 1.0, eps: float = 1e-4) -> tuple[Tensor, Tensor, Tensor]:
    """The three VICReg terms for batches of paired token sets.

    Args:
        a: ``(P, M, D)`` tokens of the first views (``M >= 2``).
        b: ``(P, M, D)`` the paired tokens of the second views.
        gamma: target standard deviation of the variance hinge.
        eps: added to the variance before the square root.

    Returns:
        ``(invariance, variance, covariance)``, each of shape ``(P,)``.
    """
    inv = (a - b).pow(2).mean(dim=(1, 2))
    return inv, 0.5 * (_variance(a, gamma, eps) + _variance(b, gamma, eps)), _covariance(a) + _covariance(b)


def _variance(x: Tensor, gamma: float, eps: float) -> Tensor:
    std = torch.sqrt(x.var(dim=1) + eps)  # (P, D)
    return F.relu(gamma - std).mean(dim=1)


def _covariance(x: Tensor) -> Tensor:
    m, d = x.shape[1], x.shape[2]
    xc = x - x.mean(dim=1, keepdim=True)
    cov = xc.transpose(1, 2) @ xc / (m - 1)  # (P, D, D)
    off = cov.pow(2).sum(dim=(1, 2)) - torch.diagonal(cov, dim1=1, dim2=2).pow(2).sum(dim=1)
    return off / d


class VICRegOverlapLoss(nn.Module):
    """VICReg between the overlapping tokens of adjacent views (see the module docstring).

    Args:
        sim_weight: weight of the invariance (MSE) term.
        var_weight: weight of the variance hinge.
        cov_weight: weight of the covariance term.
        gamma: target standard deviation per feature.
        eps: numerical floor of the variance.
        pairing: ``"geometric"`` (token pairs that see the same scene point) or ``"strip"``
            (the original column strips, meant for one row of yaw-tiled views: ``e2p``,
            ``sliding_window``, ``anyres_e2p`` with one pitch row). The loss itself takes the
            pairs it is given; :meth:`correspondences` computes them for a view set
            according to ``pairing``.

    Example:
        >>> loss_fn = VICRegOverlapLoss()
        >>> feats = torch.randn(2, 3, 8, 4)  # (B, V, N, D)
        >>> loss, terms = loss_fn(feats, [(0, 1), (1, 2)], None)
        >>> sorted(terms)
        ['covariance', 'invariance', 'variance']
    """

    def __init__(
        self,
        sim_weight: float = 25.0,
        var_weight: float = 25.0,
        cov_weight: float = 1.0,
        gamma: float = 1.0,
        eps: float = 1e-4,
        pairing: Literal["geometric", "strip"] = "geometric",
    ) -> None:
        super().__init__()
        _check_choice(pairing, PAIRINGS, "pairing")
        for name, value in (("sim_weight", sim_weight), ("var_weight", var_weight), ("cov_weight", cov_weight)):
            _check_range(value, name, 0.0)
        _check_range(eps, "eps", 0.0, low_inclusive=False)
        self.sim_weight, self.var_weight, self.cov_weight = sim_weight, var_weight, cov_weight
        self.gamma, self.eps, self.pairing = gamma, eps, pairing

    def correspondences(self, views, grid_hw: tuple[int, int] | None) -> dict[tuple[int, int], tuple[Tensor, Tensor]]:
        """Token pairs for every pair of ``views.pairs`` according to ``self.pairing``.

        Args:
            views: a :class:`~panoviz_callback.views.ViewSet` (only its geometry is used).
            grid_hw: the token grid; ``None`` for query-layout features, which gives ``{}``
                (pass ``correspondences=None`` to :meth:`forward` then).

        Returns:
            ``{(i, j): (idx_i, idx_j)}`` of CPU LongTensors.
        """
        if grid_hw is None:
            return {}
        if self.pairing == "strip":
            overlap = float(views.options.get("overlap", 0.5))
            strip = strip_correspondence(grid_hw, overlap)
            return {tuple(p): strip for p in views.pairs}
        from panoviz_callback.correspondence import patch_correspondence

        return {tuple(p): patch_correspondence(views, p[0], p[1], grid_hw) for p in views.pairs}

    def forward(
        self, feats: Tensor, pairs: Sequence[tuple[int, int]], correspondences: Correspondences | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the loss.

        Args:
            feats: ``(B, V, N, D)`` token features (projector outputs while training).
            pairs: view index pairs ``(i, j)``.
            correspondences: ``{(i, j): (idx_i, idx_j)}`` token indices per pair; pairs
                missing from it or with fewer than 2 token pairs are skipped. ``None``
                pairs token ``k`` with token ``k`` (query layouts).

        Returns:
            ``(loss, {"invariance", "variance", "covariance"})``, scalars. Without any usable
            pair the loss is a zero that still depends on ``feats`` (so ``backward`` works).
        """
        _check_shape(feats, "B V N D", "feats")
        feats = feats.float()
        n = feats.shape[2]
        groups: dict[int, list[tuple[int, int, Tensor, Tensor]]] = defaultdict(list)
        for i, j in pairs:
            if correspondences is None:
                idx_i = idx_j = torch.arange(n)
            elif (i, j) in correspondences:
                idx_i, idx_j = correspondences[(i, j)]
            else:
                continue
            if len(idx_i) >= 2:
                groups[len(idx_i)].append((i, j, idx_i, idx_j))
        if not groups:
            zero = feats.sum() * 0.0
            return zero, {"invariance": zero, "variance": zero, "covariance": zero}
        sums = [feats.new_zeros(()) for _ in range(3)]
        count = 0
        for group in groups.values():
            a, b = self._gather(feats, group)  # (B * P, M, D) each
            for k, term in enumerate(vicreg_terms(a, b, self.gamma, self.eps)):
                sums[k] = sums[k] + term.sum()
            count += a.shape[0]
        inv, var, cov = (s / count for s in sums)
        loss = self.sim_weight * inv + self.var_weight * var + self.cov_weight * cov
        return loss, {"invariance": inv, "variance": var, "covariance": cov}

    @staticmethod
    def _gather(feats: Tensor, group: list[tuple[int, int, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        dev = feats.device
        vi = torch.tensor([g[0] for g in group], device=dev)
        vj = torch.tensor([g[1] for g in group], device=dev)
        ti = torch.stack([g[2] for g in group]).to(dev)  # (P, M)
        tj = torch.stack([g[3] for g in group]).to(dev)
        a = feats[:, vi.unsqueeze(1), ti]  # (B, P, M, D)
        b = feats[:, vj.unsqueeze(1), tj]
        return a.flatten(0, 1), b.flatten(0, 1)
