"""Where views agree, on the sphere: per-token agreement panoramas, query agreement, attention entropy.

- :func:`agreement_panorama`: the cosine of every matched token pair of every adjacent view
  pair, painted on the equirectangular panorama at the scene point they share.
- :func:`query_agreement`: for each view pair, how much of the same query's attention mass
  falls on the same scene points inside the two views' shared region.
- :func:`attention_entropy`: how spread each attention map is, normalised to ``[0, 1]``.

Geometry goes through :func:`~panoviz_callback.correspondence.patch_correspondence` and
:func:`~panoviz_callback.projection.direction_to_pixel` (the ``Convention:`` of
:mod:`panoviz_callback.projection`); per-geometry tables are cached.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from panoviz_callback._checks import _check_grid, _check_shape
from panoviz_callback.correspondence import patch_correspondence
from panoviz_callback.projection import direction_to_pixel, lonlat_to_direction

if TYPE_CHECKING:
    from panoviz_callback.views import Camera, ViewSet

__all__ = ["attention_entropy", "query_agreement", "token_agreement", "agreement_panorama"]

_CACHE_SIZE = 16


def attention_entropy(attn: Tensor) -> Tensor:
    """Normalised entropy of attention maps: 0 = all mass on one token, 1 = uniform.

    .. math:: H(p) = -\\sum_n p_n \\log p_n \\,/\\, \\log N

    Args:
        attn: ``(..., N)`` non-negative maps (each is normalised to sum 1 first), ``N > 1``.

    Returns:
        ``(...)`` float32 in ``[0, 1]``.

    Example:
        >>> attention_entropy(torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1]])).round(decimals=4)
        tensor([0., 1.])
    """
    if not isinstance(attn, Tensor) or attn.dim() < 1 or attn.shape[-1] < 2:
        raise ValueError(f"Expected `attn` of shape (..., N) with N > 1, got {tuple(getattr(attn, 'shape', ()))}.")
    p = attn.float().clamp_min(0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    h = -(p * p.clamp_min(1e-30).log()).sum(-1)
    return (h / math.log(attn.shape[-1])).clamp(0, 1) + 0.0  # + 0.0: no -0.0 for a one-hot map


def _pairs(views: ViewSet, pairs: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
    return [(int(i), int(j)) for i, j in (views.pairs if pairs is None else pairs)]


def query_agreement(
    attn: Tensor, views: ViewSet, grid_hw: tuple[int, int], pairs: Sequence[tuple[int, int]] | None = None,
) -> Tensor:
    """Overlap of the same query's attention on the scene points two views share.

    For a pair ``(i, j)`` with matched tokens ``(idx_i, idx_j)`` (same scene point), query
    ``q``'s attention restricted to the shared region is normalised in each view and the two
    distributions are intersected:

    .. math:: a_{ij}(q) = \\sum_m \\min\\big(\\hat p^i_q(m), \\hat p^j_q(m)\\big), \\quad
              \\hat p^i_q(m) = A_{i,q,idx_i[m]} / \\sum_{m'} A_{i,q,idx_i[m']}

    1 means the query looks at the same place in both views, 0 at disjoint places. The pair's
    value is the mean over queries.

    Args:
        attn: ``(V, Q, N)`` attention of every query over each view's ``N = gh * gw`` tokens.
        views: the views.
        grid_hw: ``(gh, gw)`` token grid of the attention maps.
        pairs: ``P`` pairs (default ``views.pairs``).

    Returns:
        ``(P,)`` float32 in ``[0, 1]``; NaN for pairs without shared tokens.
    """
    _check_shape(attn, f"{len(views)} Q N", "attn")
    gh, gw = _check_grid(grid_hw, attn.shape[-1])
    out = []
    for i, j in _pairs(views, pairs):
        idx_i, idx_j = patch_correspondence(views, i, j, (gh, gw), device=attn.device)
        if idx_i.numel() == 0:
            out.append(attn.new_tensor(float("nan")))
            continue
        a, b = attn[i][:, idx_i].float(), attn[j][:, idx_j].float()  # (Q, M)
        a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
        b = b / b.sum(-1, keepdim=True).clamp_min(1e-12)
        out.append(torch.minimum(a, b).sum(-1).mean())
    return torch.stack(out) if out else attn.new_zeros(0)


def token_agreement(
    tokens: Tensor, views: ViewSet, grid_hw: tuple[int, int], pairs: Sequence[tuple[int, int]] | None = None,
) -> Tensor:
    """Per-token overlap cosine of every pair, on view ``i``'s grid.

    Args:
        tokens: ``(V, N, D)`` grid tokens (no prefix), ``N = gh * gw``.
        views: the views.
        grid_hw: ``(gh, gw)``.
        pairs: ``P`` pairs (default ``views.pairs``).

    Returns:
        ``(P, N)`` float32: ``cos(tokens[i, n], tokens[j, partner(n)])`` where token ``n`` of view
        ``i`` has a partner in view ``j``, NaN elsewhere.
    """
    _check_shape(tokens, f"{len(views)} N D", "tokens")
    gh, gw = _check_grid(grid_hw, tokens.shape[1])
    units = F.normalize(tokens.float(), dim=-1, eps=1e-12)  # (V, N, D)
    pairs = _pairs(views, pairs)
    out = torch.full((len(pairs), gh * gw), float("nan"), device=tokens.device)
    for p, (i, j) in enumerate(pairs):
        idx_i, idx_j = patch_correspondence(views, i, j, (gh, gw), device=tokens.device)
        out[p, idx_i] = (units[i, idx_i] * units[j, idx_j]).sum(-1)
    return out


@lru_cache(maxsize=_CACHE_SIZE)
def _panorama_lookup(
    cams_i: tuple[Camera, ...], cams_j: tuple[Camera, ...], size: int, gh: int, gw: int, out_h: int, out_w: int,
) -> tuple[Tensor, Tensor]:
    """Per pair and ERP pixel: the token of view ``i`` that sees it and whether both views see it."""
    lon = ((torch.arange(out_w, dtype=torch.float64) + 0.5) / out_w - 0.5) * 360
    lat = (0.5 - (torch.arange(out_h, dtype=torch.float64) + 0.5) / out_h) * 180
    dirs = lonlat_to_direction(*torch.meshgrid(lon, lat, indexing="xy")).reshape(1, -1, 3)  # (1, H*W, 3)
    xy, inside_i = direction_to_pixel(dirs, list(cams_i), size)  # (P, H*W, 2)
    _, inside_j = direction_to_pixel(dirs, list(cams_j), size)
    tx = ((xy[..., 0] + 0.5) * gw / size).floor().long().clamp(0, gw - 1)
    ty = ((xy[..., 1] + 0.5) * gh / size).floor().long().clamp(0, gh - 1)
    return ty * gw + tx, inside_i & inside_j  # (P, H*W) each


def agreement_panorama(
    tokens: Tensor, views: ViewSet, grid_hw: tuple[int, int], out_hw: tuple[int, int] = (256, 512),
    pairs: Sequence[tuple[int, int]] | None = None,
) -> Tensor:
    """Per-token overlap cosine of every adjacent pair, painted on the equirectangular panorama.

    An ERP pixel seen by both views of a pair takes the agreement of the token of view ``i``
    that covers it (:func:`token_agreement`; defined where that token's centre lands inside view
    ``j``); pixels covered by several pairs average them. Global views are left out (they see
    everything).

    Args:
        tokens: ``(V, N, D)`` grid tokens, ``N = gh * gw``.
        views: the views.
        grid_hw: ``(gh, gw)``.
        out_hw: ``(H, W)`` of the panorama.
        pairs: ``P`` pairs (default ``views.pairs``).

    Returns:
        ``(H, W)`` float32 cosine in ``[-1, 1]``; NaN where no pair overlaps.

    Example:
        >>> from panoviz_callback.views import make_views
        >>> vs = make_views(torch.rand(3, 64, 128), "e2p", image_size=32)
        >>> agreement_panorama(torch.rand(8, 16, 5), vs, (4, 4), (16, 32)).shape
        torch.Size([16, 32])
    """
    gh, gw = _check_grid(grid_hw, tokens.shape[1] if isinstance(tokens, Tensor) and tokens.dim() == 3 else None)
    out_h, out_w = (int(s) for s in out_hw)
    pairs = [(i, j) for i, j in _pairs(views, pairs)
             if views.cameras[i].kind != "global" and views.cameras[j].kind != "global"]
    values = token_agreement(tokens, views, (gh, gw), pairs)  # (P, N)
    if not pairs:
        return torch.full((out_h, out_w), float("nan"), device=tokens.device)
    index, both = _panorama_lookup(tuple(views.cameras[i] for i, _ in pairs),
                                   tuple(views.cameras[j] for _, j in pairs), int(views.image_size), gh, gw,
                                   out_h, out_w)
    painted = values.gather(1, index.to(values.device))  # (P, H*W)
    painted = torch.where(both.to(values.device), painted, torch.full_like(painted, float("nan")))
    finite = torch.isfinite(painted)
    total = torch.where(finite, painted, torch.zeros_like(painted)).sum(0)
    count = finite.sum(0)
    pano = torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))
    return pano.reshape(out_h, out_w)
