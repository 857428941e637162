"""PCA of token features to RGB maps (DINOv2-style), in torch on the features' device.

One PCA is fitted jointly over the tokens of all views, so one colour means one
feature direction across views. Everything runs batched on ``feats.device`` with
autocast and autograd off; inputs are cast to float32 and the outputs are float32.
No global random state is read or advanced: the Krylov iteration draws its start
from its own ``torch.Generator`` with a fixed seed.

Convention:
    - Components are sorted by decreasing variance on a first fit (no previous state),
      each with its largest-magnitude loading positive (the first such entry on ties).
    - Stable colours: a later fit is matched to the previous basis (``PCAState.basis``)
      before it is used. First, within every group of components whose variances lie
      within 1% of each other (a near-degenerate subspace, where the eigenvectors are
      arbitrary), the group's columns are rotated by the orthogonal Procrustes solution
      that best matches the previous components most present in that subspace. Then the
      new components are assigned to the previous ones by a maximum-weight matching on
      the absolute correlations (``|b_new . b_prev|``; scipy's ``linear_sum_assignment``)
      and each is flipped to a non-negative correlation. So when two eigenvalues cross
      between firings, each colour stays on its feature; identical tokens give identical
      colours. Components left unmatched (K > K') follow in variance order.
      ``freeze=True`` reuses the state's basis (and first-PC direction) as is. The
      foreground direction of ``threshold`` mode is oriented by the data on every fit
      (background at the low end, see :func:`pca_rgb`), not by the previous state.
    - Colour range: per component, the 2nd..98th percentiles of the coordinates of
      the foreground tokens map linearly to [0, 1], values outside are clipped. The
      range is data and is recomputed on every call, also with a frozen basis. A
      component with an empty range (all equal) is drawn as 0.5.
    - Channels: ``n_components=1`` gives a grey map (the component on R, G and B),
      ``2`` gives R, G with B = 0, ``>3`` draws the first three and keeps all K in
      the state. Background tokens (``threshold`` mode only) are drawn black; tokens
      that see no image (``valid`` false: letterbox padding) are drawn mid-grey and
      take no part in any fit, range or test.
    - Token ``n`` of a view sits at row ``n // gw``, column ``n % gw`` (row-major).
    - Numerics: see :mod:`panoviz_callback._pca_fit`; background tests:
      :mod:`panoviz_callback.background`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from panoviz_callback._checks import _check_choice, _check_grid, _check_int, _check_range, _check_shape
from panoviz_callback._pca_fit import (
    _check_floating,
    _fit_moments,
    _Moments,
    _numerics,
    _project,
    fit_pca,
)
from panoviz_callback.background import _inliers, _threshold_foreground

__all__ = ["PCAState", "fit_pca", "pca_rgb"]

BgRemoval = Literal["threshold", "remove_first_pc", "outlier_removal", "none"]
_BG_REMOVAL = ("threshold", "remove_first_pc", "outlier_removal", "none")
_QUANTILES = (0.02, 0.98)
_DEGENERATE = 1e-2          # components whose variances differ by < 1% form one group
_GREY = 0.5
_STATE_VERSION = 1


@dataclass(eq=False)
class PCAState:
    """What a fit leaves for the next one (stable colours) or for a frozen reuse.

    Only tensors, strings and ``None``, so it fits a ``weights_only`` checkpoint.

    Attributes:
        mean: ``(D,)`` mean of the tokens the colour basis was fitted on.
        basis: ``(D, K)`` orthonormal colour components, matched to the previous fit (see Convention).
        lo: ``(K,)`` colour range, 2nd percentile per component (last call's data).
        hi: ``(K,)`` colour range, 98th percentile per component.
        fg_basis: ``(D,)`` first principal component of all tokens: the foreground
            direction of ``threshold`` mode (background at its low end) or the
            component dropped by ``remove_first_pc``; ``None`` in the other modes.
        bg_removal: the mode that produced the state.
        note: why the fit deviated from the mode (e.g. no foreground), else ``None``.
    """

    mean: Tensor
    basis: Tensor
    lo: Tensor
    hi: Tensor
    fg_basis: Tensor | None = None
    bg_removal: str = "none"
    note: str | None = None

    @property
    def n_components(self) -> int:
        """K, the number of colour components kept."""
        return int(self.basis.shape[1])

    def to(self, device: torch.device | str) -> PCAState:
        """Return a copy with every tensor on ``device``."""
        fg = None if self.fg_basis is None else self.fg_basis.to(device)
        return replace(self, mean=self.mean.to(device), basis=self.basis.to(device), lo=self.lo.to(device),
                       hi=self.hi.to(device), fg_basis=fg)

    def state_dict(self) -> dict[str, Any]:
        """Tensors (detached copies on the CPU, so a checkpoint loads anywhere) and plain values."""
        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to("cpu", copy=True)

        return {"version": _STATE_VERSION, "mean": cpu(self.mean), "basis": cpu(self.basis), "lo": cpu(self.lo),
                "hi": cpu(self.hi), "fg_basis": cpu(self.fg_basis), "bg_removal": self.bg_removal, "note": self.note}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> PCAState:
        """Rebuild a state from :meth:`state_dict` output (tensors stay on the CPU).

        Raises:
            ValueError: keys are missing or the shapes do not fit together.
            TypeError: an entry has the wrong type.
        """
        missing = [key for key in ("mean", "basis", "lo", "hi") if key not in d]
        if missing:
            raise ValueError(f"Expected a PCAState state dict with mean, basis, lo and hi, missing {missing}.")
        _check_shape(d["mean"], "D", "mean")
        _check_shape(d["basis"], f"{d['mean'].shape[0]} K", "basis")
        k = d["basis"].shape[1]
        _check_shape(d["lo"], f"{k}", "lo")
        _check_shape(d["hi"], f"{k}", "hi")
        fg = d.get("fg_basis")
        if fg is not None:
            _check_shape(fg, f"{d['mean'].shape[0]}", "fg_basis")
        bg_removal, note = d.get("bg_removal", "none"), d.get("note")
        if not isinstance(bg_removal, str) or not (note is None or isinstance(note, str)):
            raise TypeError("Expected `bg_removal` to be a str and `note` a str or None.")
        return cls(mean=d["mean"], basis=d["basis"], lo=d["lo"], hi=d["hi"], fg_basis=fg, bg_removal=bg_removal,
                   note=note)


def pca_rgb(
    feats: Tensor, grid_hw: tuple[int, int], *, n_components: int = 3, bg_removal: BgRemoval = "threshold",
    bg_threshold: float = 0.5, state: PCAState | None = None, freeze: bool = False, valid: Tensor | None = None,
) -> tuple[Tensor, Tensor, PCAState]:
    """Map token features of all views to RGB images with one joint PCA.

    Args:
        feats: ``(V, N, D)`` token features, ``N = gh * gw``.
        grid_hw: ``(gh, gw)`` token grid (``(1, Q)`` for query tokens: a strip per view).
        n_components: K >= 1 components kept in the state (see the module's Convention).
        bg_removal:
            - ``"threshold"``: the first principal component of all tokens, oriented so that
              the more homogeneous side is background (the side of the robust mid split whose
              tokens have the smaller mean squared distance to their centroid goes to the
              low end), scaled robustly (2nd..98th percentiles to [0, 1], clipped); when its
              scores are clearly bimodal (:mod:`panoviz_callback.background`), tokens below
              ``bg_threshold`` are background, drawn black, and the colour PCA is fitted on
              the foreground only. Otherwise, or with fewer than K + 1 foreground tokens,
              every token is kept and the state's ``note`` says why.
            - ``"remove_first_pc"``: fit K + 1 components on all tokens, colours from 2..K+1.
            - ``"outlier_removal"``: a robust squared Mahalanobis distance on the top 16
              principal directions; tokens beyond the chi-square 0.999 quantile are left out
              of the fit and the colour range but still drawn (clipped). ``fg_mask`` marks the
              inliers (about 99.9% of Gaussian data).
            - ``"none"``: all tokens, components 1..K.
        bg_threshold: threshold in [0, 1] on the robustly scaled first component.
        state: previous result: warm start, and the new components are matched to it.
        freeze: reuse ``state``'s basis (and first-PC direction) as is; the colour range,
            foreground and outliers are still computed from ``feats``.
        valid: ``(V, N)`` bool, the tokens that see image content (None: all). The others
            (letterbox padding) are left out of every fit, range and test and drawn grey.

    Returns:
        ``images (V, 3, gh, gw)`` float32 in [0, 1], ``fg_mask (V, N)`` bool (the tokens the
        colour fit and range used; False for invalid tokens) and the new :class:`PCAState`.

    Raises:
        ValueError: bad shapes or options, non-finite features, or a ``state`` that does not fit.
        TypeError: ``feats`` is not a floating-point tensor or ``state`` not a ``PCAState``.

    Example:
        >>> feats = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(0))
        >>> images, fg_mask, state = pca_rgb(feats, (2, 3), bg_removal="none")
        >>> images.shape, fg_mask.shape, state.basis.shape
        (torch.Size([4, 3, 2, 3]), torch.Size([4, 6]), torch.Size([16, 3]))
    """
    _check_shape(feats, "V N D", "feats")
    _check_floating(feats, "feats")
    v, n, d = feats.shape
    gh, gw = _check_grid(grid_hw, n)
    _check_choice(bg_removal, _BG_REMOVAL, "bg_removal")
    _check_int(n_components, "n_components", 1, d - 1 if bg_removal == "remove_first_pc" else d)
    _check_range(bg_threshold, "bg_threshold", 0.0, 1.0)
    rows = None
    if valid is not None:
        _check_shape(valid, f"{v} {n}", "valid")
        if valid.dtype != torch.bool:
            raise TypeError(f"Expected `valid` to be a bool tensor, got {valid.dtype}.")
        if not bool(valid.all()):
            rows = valid.to(feats.device).reshape(-1).nonzero()[:, 0]  # (M',)
    m_valid = v * n if rows is None else len(rows)
    if m_valid < 2:
        raise ValueError(f"Expected `feats` with at least 2 (valid) tokens in all, got {m_valid}.")
    _check_state(state, d, n_components, bg_removal, freeze)
    k = n_components
    with _numerics(feats.device):
        x = feats.detach().reshape(v * n, d).float()  # (M, D)
        if rows is not None:
            x = x.index_select(0, rows)  # (M', D): padding tokens take no part
        mom = _Moments(x)
        if not bool(torch.isfinite(mom.mean).all()):  # float64 column sums of float32 values: finite iff all are
            raise ValueError("Expected `feats` to be finite, got NaN or inf values.")
        prev = None if state is None else state.to(x.device)
        note, fg_basis, black, directions = None, None, None, None
        if bg_removal == "threshold":
            fg, fg_basis, note = _threshold_foreground(mom, k, bg_threshold, None if prev is None else prev.fg_basis,
                                                       freeze)
            black = ~fg
        elif bg_removal == "outlier_removal":
            fg, directions = _inliers(mom)
        else:
            fg = torch.ones(mom.m, dtype=torch.bool, device=x.device)
        if bg_removal == "remove_first_pc":
            mean, basis, fg_basis = _fit_without_first(mom, k, prev, freeze)
        else:
            mean, basis = _colour_basis(mom, fg, k, prev, freeze, directions)
        coords = _project(x - mean, basis)  # (M', K)
        unit, lo, hi = _unit_range(coords, fg)
        rgb = _to_rgb(unit, black)  # (M', 3)
        if rows is not None:
            full = rgb.new_full((v * n, 3), _GREY)
            rgb = full.index_copy_(0, rows, rgb)
            fg = torch.zeros(v * n, dtype=torch.bool, device=x.device).index_copy_(0, rows, fg)
        images = rgb.reshape(v, gh, gw, 3).permute(0, 3, 1, 2).contiguous()  # (V, 3, gh, gw)
    if note is not None and "not bimodal" not in note and "flat" not in note:
        warnings.warn(note, UserWarning, stacklevel=2)
    new_state = PCAState(mean=mean, basis=basis, lo=lo, hi=hi, fg_basis=fg_basis, bg_removal=bg_removal, note=note)
    return images, fg.reshape(v, n), new_state


def _align_signs(basis: Tensor, ref: Tensor) -> Tensor:
    """Flip the first min(K, K') columns of ``basis (D, K)`` to agree with ``ref (D, K')``."""
    k = min(basis.shape[1], ref.shape[1])
    dots = (basis[:, :k] * ref[:, :k].to(basis.dtype)).sum(0)  # (k,)
    sign = torch.ones(basis.shape[1], dtype=basis.dtype, device=basis.device)
    sign[:k] = torch.where(dots < 0, -1.0, 1.0)
    return basis * sign


def _degenerate_groups(var: Tensor) -> list[list[int]]:
    """Runs of consecutive components (variances decreasing) whose neighbours differ by < 1% relative."""
    values = var.double().tolist()
    groups, current = [], [0]
    for c in range(1, len(values)):
        top = max(abs(values[c - 1]), abs(values[c]), 1e-300)
        if abs(values[c - 1] - values[c]) < _DEGENERATE * top:
            current.append(c)
        else:
            groups.append(current)
            current = [c]
    groups.append(current)
    return [g for g in groups if len(g) > 1]


def _align_basis(basis: Tensor, var: Tensor, ref: Tensor) -> Tensor:
    """Match ``basis (D, K)`` (variances ``var (K,)``) to ``ref (D, K')``: Procrustes in near-degenerate
    groups, then an assignment on absolute correlations, then signs (the module's Convention)."""
    from scipy.optimize import linear_sum_assignment

    b = basis.double()
    r = ref.to(device=b.device, dtype=torch.float64)
    for group in _degenerate_groups(var):
        cols = torch.tensor(group, device=b.device)
        sub = b[:, cols]  # (D, g)
        weight = (r.T @ sub).square().sum(1)  # (K',) how much of each previous component lies in the span
        chosen = torch.argsort(weight, descending=True, stable=True)[:len(group)]
        target = r[:, chosen]  # (D, g') with g' <= g
        u, _, vh = torch.linalg.svd(sub.T @ target, full_matrices=True)  # (g, g), (g', g')
        g, g2 = len(group), target.shape[1]
        rot = u[:, :g2] @ vh if g2 == g else torch.linalg.qr(torch.cat([u[:, :g2] @ vh, u[:, g2:]], 1)).Q
        if bool((rot - torch.eye(g, dtype=rot.dtype, device=rot.device)).abs().max() > 1e-6):
            b[:, cols] = sub @ rot  # (D, g): the first g' columns best match ``target``
    corr = (r.T @ b).abs().cpu().numpy()  # (K', K)
    prev_idx, new_idx = linear_sum_assignment(corr, maximize=True)
    order = [0] * len(prev_idx)
    for p, c in zip(prev_idx.tolist(), new_idx.tolist()):
        order[p] = c
    rest = [c for c in range(b.shape[1]) if c not in set(order)]
    b = b[:, torch.tensor(order + rest, device=b.device)]
    return _align_signs(b, r).to(basis.dtype)


# ---------------------------------------------------------------- fits per mode


def _colour_basis(mom: _Moments, fg: Tensor, k: int, prev: PCAState | None, freeze: bool,
                  directions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The colour fit on the tokens ``fg``, warm-started from the previous basis and then ``directions``."""
    if freeze:
        return prev.mean, prev.basis
    starts = [t for t in (None if prev is None else prev.basis, directions) if t is not None]
    init = torch.cat([t.to(torch.float64) for t in starts], 1) if starts else None
    mean, basis, var = _fit_moments(mom.restrict(fg), k, "auto", init)
    if prev is not None:
        basis = _align_basis(basis, var, prev.basis)
    return mean, basis


def _fit_without_first(mom: _Moments, k: int, prev: PCAState | None,
                       freeze: bool) -> tuple[Tensor, Tensor, Tensor]:
    if freeze:
        return prev.mean, prev.basis, prev.fg_basis
    init = None
    if prev is not None:
        init = prev.basis if prev.fg_basis is None else torch.cat([prev.fg_basis[:, None], prev.basis], 1)
    mean, both, var = _fit_moments(mom, k + 1, "auto", init)
    first, basis = both[:, :1], both[:, 1:]  # (D, 1), (D, K)
    if prev is not None:
        basis = _align_basis(basis, var[1:], prev.basis)
        if prev.fg_basis is not None:
            first = _align_signs(first, prev.fg_basis[:, None])
    return mean, basis, first[:, 0]


# ---------------------------------------------------------------- colours


def _unit_range(coords: Tensor, fg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    q = torch.tensor(_QUANTILES, dtype=coords.dtype, device=coords.device)
    lo, hi = torch.quantile(coords[fg], q, dim=0)  # (K,), (K,)
    span = hi - lo
    ok = span > 0
    unit = torch.where(ok, (coords - lo) / torch.where(ok, span, 1.0), 0.5).clamp(0.0, 1.0)  # (M, K)
    return unit, lo, hi


def _to_rgb(unit: Tensor, black: Tensor | None) -> Tensor:
    """``(M, K)`` unit coordinates to ``(M, 3)`` colours (grey for K = 1, B = 0 for K = 2, black background)."""
    m, k = unit.shape
    rgb = unit[:, :3]
    if k == 1:
        rgb = rgb.expand(m, 3)
    elif k == 2:
        rgb = torch.cat([rgb, rgb.new_zeros(m, 1)], 1)
    if black is not None:
        rgb = rgb.masked_fill(black[:, None], 0.0)
    return rgb


# ---------------------------------------------------------------- helpers


def _check_state(state: Any, d: int, k: int, bg_removal: str, freeze: bool) -> None:
    if state is None:
        if freeze:
            raise ValueError("Argument `freeze` needs a `state` to reuse, got state=None.")
        return
    if not isinstance(state, PCAState):
        raise TypeError(f"Expected `state` to be a PCAState, got {type(state).__name__}.")
    if state.basis.shape[0] != d:
        raise ValueError(f"Expected `state` fitted on D = {d} features, got D = {state.basis.shape[0]}.")
    if freeze:
        if state.n_components != k:
            raise ValueError(f"Expected a frozen `state` with n_components = {k}, got {state.n_components}.")
        if state.bg_removal != bg_removal:
            raise ValueError(f"Expected a frozen `state` from bg_removal={bg_removal!r}, got {state.bg_removal!r}.")
        if bg_removal in ("threshold", "remove_first_pc") and state.fg_basis is None:
            raise ValueError(f"Expected a frozen `state` with `fg_basis` for bg_removal={bg_removal!r}, got None.")
