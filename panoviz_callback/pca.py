"""PCA of token features to RGB maps (DINOv2-style), in torch on the features' device.

One PCA is fitted jointly over the tokens of all views, so one colour means one
feature direction across views. Everything runs batched on ``feats.device`` with
autocast and autograd off; inputs are cast to float32 and the outputs are float32.
No global random state is read or advanced: the Krylov iteration draws its start
from its own ``torch.Generator`` with a fixed seed.

Convention:
    - Components are sorted by decreasing variance. A first fit (no previous state)
      makes each component's largest-magnitude loading positive (the first such
      entry on ties). A later fit flips each component so that its dot product with
      the same-index component of the previous basis is >= 0 (``PCAState.basis``).
      ``freeze=True`` reuses the state's basis (and first-PC direction) as is. The
      foreground direction of ``threshold`` mode is oriented by the data on every fit
      (background at the low end, see :func:`pca_rgb`), not by the previous state.
    - Colour range: per component, the 2nd..98th percentiles of the coordinates of
      the foreground tokens map linearly to [0, 1], values outside are clipped. The
      range is data and is recomputed on every call, also with a frozen basis. A
      component with an empty range (all equal) is drawn as 0.5.
    - Channels: ``n_components=1`` gives a grey map (the component on R, G and B),
      ``2`` gives R, G with B = 0, ``>3`` draws the first three and keeps all K in
      the state. Background tokens (``threshold`` mode only) are drawn black.
    - Token ``n`` of a view sits at row ``n // gw``, column ``n % gw`` (row-major).
    - Numerics: the mean is a float64 sum. The Krylov iteration multiplies a few
      rows by the covariance as two float32 products with the centred tokens,
      ``((rows X_c^T) X_c) / (M - 1)``, and does everything else (orthogonalisation,
      Rayleigh-Ritz, the residual test) in float64; the float32 products leave the
      components within ~1e-7 of a float64 ``eigh`` (the residuals stall near 1e-7 of
      the eigengap, far below the test's 1e-5; where they stall above it, the
      iteration goes on with float64 products). The covariance of the ``eigh`` path
      is a float32 product followed by a float64 ``eigh`` (~100x closer to a float64
      reference than a float32 ``eigh``). Where float32 matmuls are set to reduced
      precision (TF32, ``torch.set_float32_matmul_precision("high")``) the float32
      products run in float64 instead.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from panoviz_callback._checks import _check_choice, _check_grid, _check_int, _check_range, _check_shape

__all__ = ["PCAState", "fit_pca", "pca_rgb"]

BgRemoval = Literal["threshold", "remove_first_pc", "outlier_removal", "none"]
_BG_REMOVAL = ("threshold", "remove_first_pc", "outlier_removal", "none")
_METHODS = ("auto", "eigh", "subspace")

_SEED = 0x5EED_C0DE          # the Krylov iteration's own generator
_OVERSAMPLE = 8              # block size k + 8 (rounded up to a multiple of 4)
_TOL = 1e-5                  # stop when residual_j <= _TOL * eigengap_j (sin(angle) bound)
_MAX_ITER = 40               # Krylov steps, then fall back to eigh
_KRYLOV_BLOCKS = 10          # restart when the Krylov basis reaches 10 blocks (and >= 96 vectors)
_KRYLOV_MIN_DIM = 96
_STALL = 0.5                 # residual/gap below 1e-3 and shrinking by less than 2x in a step:
_STALL_BELOW = 1e-3          # the float32 products stall, go on in float64
_GRAM_BLOCKS = 4             # the scatter product in 4 x 4 blocks, upper triangle only
_GRAM_BLOCK_MIN = 256
_AUTO_MIN_DIM = 256          # "auto": Krylov for D >= 256 and k <= 32, else eigh (measured crossover)
_AUTO_MAX_K = 32
_QUANTILES = (0.02, 0.98)
_OUTLIER_PERCENT = 5
_OUTLIER_DIMS = 16
_OUTLIER_ITERS = 4           # float32 Krylov steps on 16 + 4 vectors: the approximate top-16 directions
_OUTLIER_OVERSAMPLE = 4      # rank the same 5% of outliers as a full eigh on ViT-B features
_MAD_TO_STD = 1.4826
_STATE_VERSION = 1


@dataclass(eq=False)
class PCAState:
    """What a fit leaves for the next one (stable colours) or for a frozen reuse.

    Only tensors, strings and ``None``, so it fits a ``weights_only`` checkpoint.

    Attributes:
        mean: ``(D,)`` mean of the tokens the colour basis was fitted on.
        basis: ``(D, K)`` orthonormal colour components, sign-aligned with the previous fit.
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


def fit_pca(
    x: Tensor, k: int, *, method: Literal["auto", "eigh", "subspace"] = "auto", init_basis: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` principal components of the rows of ``x``, deterministic, on ``x.device``.

    The covariance is :math:`(x - \\bar x)^T (x - \\bar x) / (M - 1)`. Either method gives
    the components of a full ``torch.linalg.eigh`` of it to about 1e-5 (up to the sign
    rule below) when the eigengaps around the first ``k`` are not tiny.

    Args:
        x: ``(M, D)`` samples, ``M >= 2``.
        k: number of components, ``1 <= k <= D``.
        method:
            - ``"eigh"``: full eigendecomposition of the ``(D, D)`` covariance (float64 ``eigh``).
            - ``"subspace"``: block Krylov iteration (block Lanczos with full reorthogonalisation,
              blocks of ``k + 8`` vectors, Rayleigh-Ritz each step), stopped when every residual is
              below 1e-5 times the eigengap of its component; without convergence in 40 steps it
              falls back to ``eigh``. Each step multiplies the block by the covariance through the
              tokens (``O(M D (k + 8))``); the ``(D, D)`` covariance is never formed.
            - ``"auto"``: ``"subspace"`` for ``D >= 256`` and ``k <= 32``, else ``"eigh"`` (with
              M = 8 * 196 tokens on one CPU thread the Krylov iteration was measured 2x faster
              than ``eigh`` at D = 256 and 10x at D = 768, and slower at D = 128).
        init_basis: ``(D, K')`` warm start for ``"subspace"`` (e.g. the previous epoch's basis);
            missing columns are random. Not used for signs.
        generator: source of the random start; default a fresh generator with a fixed seed
            (the global RNG is never used).

    Returns:
        ``mean (D,)``, ``basis (D, k)`` orthonormal columns by decreasing variance, each with its
        largest-magnitude loading positive, and ``explained_variance (k,)``. All float32.

    Raises:
        ValueError: bad shapes, ``k`` out of range or an unknown ``method``.
        TypeError: ``x`` is not a floating-point tensor.

    Example:
        >>> x = torch.randn(100, 8, generator=torch.Generator().manual_seed(0)) * torch.arange(8.0, 0, -1)
        >>> mean, basis, var = fit_pca(x, 2)
        >>> basis.shape, bool(var[0] > var[1])
        (torch.Size([8, 2]), True)
    """
    _check_shape(x, "M D", "x")
    _check_floating(x, "x")
    m, d = x.shape
    if m < 2:
        raise ValueError(f"Expected `x` with at least 2 rows, got {m}.")
    _check_int(k, "k", 1, d)
    _check_choice(method, _METHODS, "method")
    if init_basis is not None:
        _check_shape(init_basis, f"{d} K", "init_basis")
    with _numerics(x.device):
        return _fit(x.detach().float(), k, method, init_basis, generator)


def pca_rgb(
    feats: Tensor, grid_hw: tuple[int, int], *, n_components: int = 3, bg_removal: BgRemoval = "threshold",
    bg_threshold: float = 0.5, state: PCAState | None = None, freeze: bool = False,
) -> tuple[Tensor, Tensor, PCAState]:
    """Map token features of all views to RGB images with one joint PCA.

    Args:
        feats: ``(V, N, D)`` token features, ``N = gh * gw``.
        grid_hw: ``(gh, gw)`` token grid (``(1, Q)`` for query tokens: a strip per view).
        n_components: K >= 1 components kept in the state (see the module's Convention).
        bg_removal:
            - ``"threshold"``: the first principal component of all tokens, oriented so that
              the more homogeneous side is background (the side of the mid-range split whose
              tokens have the smaller mean squared distance to their centroid goes to the
              low end), min-max scaled to [0, 1]; tokens below ``bg_threshold`` are background,
              drawn black. The colour PCA is fitted on the foreground only. With fewer than
              K + 1 foreground tokens it falls back to all tokens and records a ``note``.
            - ``"remove_first_pc"``: fit K + 1 components on all tokens, colours from 2..K+1.
            - ``"outlier_removal"``: robust Mahalanobis distance (coordinates on the top 16
              principal directions, standardised per direction by median and MAD, Euclidean
              norm); the 5% farthest tokens are left out of the fit and the colour range but
              still drawn (clipped). ``fg_mask`` marks the inliers.
            - ``"none"``: all tokens, components 1..K.
        bg_threshold: threshold in [0, 1] on the min-max scaled first component.
        state: previous result: warm start, and each new component's sign follows it.
        freeze: reuse ``state``'s basis (and first-PC direction) as is; the colour range,
            foreground and outliers are still computed from ``feats``.

    Returns:
        ``images (V, 3, gh, gw)`` float32 in [0, 1], ``fg_mask (V, N)`` bool (the tokens the
        colour fit and range used) and the new :class:`PCAState`.

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
    if v * n < 2:
        raise ValueError(f"Expected `feats` with at least 2 tokens in all, got {v * n}.")
    _check_state(state, d, n_components, bg_removal, freeze)
    k = n_components
    with _numerics(feats.device):
        x = feats.detach().reshape(v * n, d).float()  # (M, D)
        mom = _Moments(x)
        if not bool(torch.isfinite(mom.mean).all()):  # float64 column sums of float32 values: finite iff all are
            raise ValueError("Expected `feats` to be finite, got NaN or inf values.")
        prev = None if state is None else state.to(x.device)
        note, fg_basis, black, directions = None, None, None, None
        if bg_removal == "threshold":
            fg, fg_basis, note = _threshold_foreground(mom, k, bg_threshold, prev, freeze)
            black = ~fg
        elif bg_removal == "outlier_removal":
            fg, directions = _inliers(mom)
        else:
            fg = torch.ones(v * n, dtype=torch.bool, device=x.device)
        if bg_removal == "remove_first_pc":
            mean, basis, fg_basis = _fit_without_first(mom, k, prev, freeze)
        else:
            mean, basis = _colour_basis(mom, fg, k, prev, freeze, directions)
        coords = _project(x - mean, basis)  # (M, K)
        unit, lo, hi = _unit_range(coords, fg)
        images = _to_images(unit, black, v, gh, gw)
    if note is not None:
        warnings.warn(note, UserWarning, stacklevel=2)
    new_state = PCAState(mean=mean, basis=basis, lo=lo, hi=hi, fg_basis=fg_basis, bg_removal=bg_removal, note=note)
    return images, fg.reshape(v, n), new_state


# ---------------------------------------------------------------- fitting


class _Moments:
    """Mean and centred rows of a set of tokens; the covariance only as an operator.

    A Krylov step multiplies ``b`` rows by the covariance as ``((rows X_c^T) X_c) / (M - 1)``:
    two ``(b, D) x (D, M)``-sized products, far cheaper than forming the ``(D, D)`` scatter
    (``M D^2``) for the few steps a fit takes. The scatter is formed only for ``eigh``.
    """

    def __init__(self, x: Tensor) -> None:
        self.x = x  # (M, D) float32
        self.m, self.d = x.shape
        self.mean = x.mean(0, dtype=torch.float64)  # (D,)
        self._xc: Tensor | None = None
        self._xc64: Tensor | None = None

    @property
    def xc(self) -> Tensor:
        """``(M, D)`` rows centred on :attr:`mean`, in the matmul dtype."""
        if self._xc is None:
            dtype = _matmul_dtype(self.x.device)
            self._xc = self.x.to(dtype) - self.mean.to(dtype)
        return self._xc

    @property
    def xc64(self) -> Tensor:
        """``(M, D)`` float64 rows centred on :attr:`mean`."""
        if self._xc64 is None:
            self._xc64 = self.xc if self.xc.dtype == torch.float64 else self.x.double() - self.mean
        return self._xc64

    def scatter(self) -> Tensor:
        """``(D, D)`` float64 scatter matrix of the centred rows (a matmul-dtype product)."""
        return _gram(self.xc).double()

    def times(self, rows: Tensor, precise: bool = False) -> Tensor:
        """``rows (b, D) @ C`` for the covariance ``C``, in the dtype of ``rows``.

        The two products with the tokens run in the matmul dtype (float32 on the CPU), or in
        float64 with ``precise``.
        """
        xc = self.xc64 if precise else self.xc
        return ((rows.to(xc.dtype) @ xc.T) @ xc).to(rows.dtype) / (self.m - 1)

    def restrict(self, keep: Tensor) -> _Moments:
        """The moments of the rows where ``keep`` is true."""
        if bool(keep.all()):
            return self
        return _Moments(self.x.index_select(0, keep.nonzero()[:, 0]))


def _gram(xc: Tensor) -> Tensor:
    """``xc.T @ xc`` for ``xc (M, D)``: the upper block triangle only, mirrored (exactly symmetric)."""
    d = xc.shape[1]
    if d < _GRAM_BLOCK_MIN:
        return xc.T @ xc
    step = -(-d // _GRAM_BLOCKS)
    out = xc.new_empty(d, d)
    for lo in range(0, d, step):
        out[lo:lo + step, lo:] = xc[:, lo:lo + step].T @ xc[:, lo:]
    for lo in range(step, d, step):
        out[lo:lo + step, :lo] = out[:lo, lo:lo + step].T
    return out


def _fit(x: Tensor, k: int, method: str, init: Tensor | None = None,
         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    return _fit_moments(_Moments(x), k, method, init, generator)


def _fit_moments(mom: _Moments, k: int, method: str, init: Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    if method == "auto":
        method = "subspace" if mom.d >= _AUTO_MIN_DIM and k <= _AUTO_MAX_K else "eigh"
    out = _krylov(mom, k, init, generator) if method == "subspace" else None
    if out is None:
        out = _eigh(mom, k)
    basis, var = out
    return mom.mean.float(), _largest_loading_positive(basis.float()), var.float()


def _eigh(mom: _Moments, k: int) -> tuple[Tensor, Tensor]:
    evals, evecs = torch.linalg.eigh(mom.scatter() / (mom.m - 1))  # ascending
    return evecs[:, -k:].flip(-1), evals[-k:].flip(0).clamp_min(0)  # (D, k), (k,)


def _krylov(mom: _Moments, k: int, init: Tensor | None, generator: torch.Generator | None, *,
            max_iter: int | None = None, exact: bool = True, dtype: torch.dtype = torch.float64,
            oversample: int = _OVERSAMPLE) -> tuple[Tensor, Tensor] | None:
    """Block Krylov (block Lanczos, full reorthogonalisation) with Rayleigh-Ritz at every step.

    Returns the top-``k`` Ritz vectors ``(D, k)`` and values ``(k,)`` once every residual is
    below ``_TOL`` times the Ritz gap of its component; ``None`` when that does not happen in
    ``max_iter`` steps (``exact``) or the Krylov space turns (numerically) invariant. With
    ``exact=False`` the last step's Ritz pairs are returned (then ``dtype=float32`` is enough).
    The Krylov vectors are kept as rows ``(m, D)``, so every product has a wide right-hand side.
    The products with the tokens run in float32 (residuals then stall near 1e-7 of the gap, far
    below ``_TOL``); should they stall above ``_TOL`` (a tiny gap), the iteration goes on in float64.
    """
    d, m = mom.d, mom.m
    max_iter = _MAX_ITER if max_iter is None else max_iter
    b = -(-(k + oversample) // 4) * 4  # block size, a multiple of 4
    if b >= d or k >= m:
        return None  # the full eigh is as cheap, or the spectrum is degenerate
    cap = min(d, max(_KRYLOV_BLOCKS * b, _KRYLOV_MIN_DIM))
    precise, last = False, math.inf
    rows = torch.linalg.qr(_start_block(d, b, init, generator, mom.x.device).to(dtype)).Q.T  # (b, D)
    basis, image = rows, mom.times(rows)  # (m, D) each: the Krylov basis and C times it
    for step in range(max_iter):
        t = basis @ image.T  # (m, m)
        theta, w = torch.linalg.eigh((t + t.T) / 2)
        theta, w = theta.flip(0), w.flip(1)  # decreasing Ritz values
        vecs = w[:, :k].T @ basis  # (k, D) Ritz vectors
        if not exact and step == max_iter - 1:
            return vecs.T, theta[:k].clamp_min(0)
        res = (w[:, :k].T @ image - theta[:k, None] * vecs).norm(dim=1)  # (k,)
        gaps = theta[:-1] - theta[1:]  # gap to the next Ritz value
        gap = torch.minimum(gaps[:k], torch.cat([gaps.new_full((1,), torch.inf), gaps[:k - 1]]))
        if bool((res <= _TOL * gap).all()) or basis.shape[0] >= d:
            return vecs.T, theta[:k].clamp_min(0)
        if step == max_iter - 1:
            return None
        ratio = float((res / gap).max())
        if exact and not precise and _TOL < ratio < _STALL_BELOW and ratio > _STALL * last:  # float32 stalls
            precise = True
            image = mom.times(basis, precise=True)
        last = ratio
        if basis.shape[0] >= cap:  # restart from the leading Ritz vectors
            rows = torch.linalg.qr((w[:, :b].T @ basis).T).Q.T
            basis, image = rows, mom.times(rows, precise)
            continue
        new = image[-b:][: cap - basis.shape[0]]  # C times the newest block, (b', D)
        new = new - (new @ basis.T) @ basis
        new = new - (new @ basis.T) @ basis  # twice is enough (Kahan)
        rows = torch.linalg.qr(new.T).Q.T
        if bool(((rows @ basis.T).abs() > torch.finfo(dtype).eps ** 0.5).any()):
            return None  # breakdown: the Krylov space is (numerically) invariant
        basis, image = torch.cat([basis, rows]), torch.cat([image, mom.times(rows, precise)])
    return None


def _start_block(d: int, p: int, init: Tensor | None, generator: torch.Generator | None,
                 device: torch.device) -> Tensor:
    cols = [] if init is None else [init[:, :p].to(device=device, dtype=torch.float64)]
    n_rand = p - (0 if init is None else cols[0].shape[1])
    if n_rand > 0:
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(_SEED)
        rand = torch.randn(d, n_rand, generator=generator, device=generator.device, dtype=torch.float64)
        cols.append(rand.to(device))
    return torch.cat(cols, 1)  # (D, p)


def _largest_loading_positive(basis: Tensor) -> Tensor:
    idx = basis.abs().argmax(0, keepdim=True)  # (1, K), the first maximum on ties
    sign = torch.where(basis.gather(0, idx) < 0, -1.0, 1.0)
    return basis * sign


def _align_signs(basis: Tensor, ref: Tensor) -> Tensor:
    """Flip the first min(K, K') columns of ``basis (D, K)`` to agree with ``ref (D, K')``."""
    k = min(basis.shape[1], ref.shape[1])
    dots = (basis[:, :k] * ref[:, :k].to(basis.dtype)).sum(0)  # (k,)
    sign = torch.ones(basis.shape[1], dtype=basis.dtype, device=basis.device)
    sign[:k] = torch.where(dots < 0, -1.0, 1.0)
    return basis * sign


# ---------------------------------------------------------------- background modes


def _colour_basis(mom: _Moments, fg: Tensor, k: int, prev: PCAState | None, freeze: bool,
                  directions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The colour fit on the tokens ``fg``, warm-started from the previous basis and then ``directions``."""
    if freeze:
        return prev.mean, prev.basis
    starts = [t for t in (None if prev is None else prev.basis, directions) if t is not None]
    init = torch.cat([t.to(torch.float64) for t in starts], 1) if starts else None
    mean, basis, _ = _fit_moments(mom.restrict(fg), k, "auto", init)
    if prev is not None:
        basis = _align_signs(basis, prev.basis)
    return mean, basis


def _fit_without_first(mom: _Moments, k: int, prev: PCAState | None,
                       freeze: bool) -> tuple[Tensor, Tensor, Tensor]:
    if freeze:
        return prev.mean, prev.basis, prev.fg_basis
    init = None
    if prev is not None:
        init = prev.basis if prev.fg_basis is None else torch.cat([prev.fg_basis[:, None], prev.basis], 1)
    mean, both, _ = _fit_moments(mom, k + 1, "auto", init)
    first, basis = both[:, :1], both[:, 1:]  # (D, 1), (D, K)
    if prev is not None:
        basis = _align_signs(basis, prev.basis)
        if prev.fg_basis is not None:
            first = _align_signs(first, prev.fg_basis[:, None])
    return mean, basis, first[:, 0]


def _threshold_foreground(mom: _Moments, k: int, threshold: float, prev: PCAState | None,
                          freeze: bool) -> tuple[Tensor, Tensor, str | None]:
    if freeze:
        direction = prev.fg_basis
    else:
        init = None if prev is None or prev.fg_basis is None else prev.fg_basis[:, None]
        _, first, _ = _fit_moments(mom, 1, "auto", init)
        direction = _background_low(mom.xc, first[:, 0])
    score = _matmul(mom.xc, direction[:, None])[:, 0]  # (M,)
    low, high = score.aminmax()
    fg = (score - low) / (high - low) >= threshold  # a flat score gives NaN: no foreground
    n_fg = int(fg.sum())
    if n_fg >= k + 1:
        return fg, direction, None
    note = (f"bg_removal='threshold': {n_fg} foreground token(s) at bg_threshold={threshold:g}, fewer than "
            f"n_components + 1 = {k + 1}; used all tokens instead.")
    return torch.ones_like(fg), direction, note


def _background_low(xc: Tensor, direction: Tensor) -> Tensor:
    """Orient ``direction (D,)`` so that the more homogeneous side of the mid-range split is low."""
    score = _matmul(xc, direction[:, None])[:, 0]  # (M,)
    low, high = score.aminmax()
    upper = score >= (low + high) / 2
    if not bool(upper.any()) or bool(upper.all()):
        return direction
    spread_upper, spread_lower = ((s - s.mean(0)).square().sum(1).mean() for s in (xc[upper], xc[~upper]))
    return torch.where(spread_upper < spread_lower, -direction, direction)


def _inliers(mom: _Moments) -> tuple[Tensor, Tensor | None]:
    """Leave out the 5% of tokens with the largest robust (median/MAD) Mahalanobis distance.

    Returns the inlier mask ``(M,)`` and the approximate top directions ``(D, r)`` it used
    (a warm start for the colour fit on the inliers), or None when no token is left out.
    """
    m, d = mom.m, mom.d
    n_out = m * _OUTLIER_PERCENT // 100
    keep = torch.ones(m, dtype=torch.bool, device=mom.x.device)
    if n_out == 0:
        return keep, None
    r = min(_OUTLIER_DIMS, d, m - 1)
    out = _krylov(mom, r, None, None, max_iter=_OUTLIER_ITERS, exact=False, dtype=torch.float32,
                  oversample=_OUTLIER_OVERSAMPLE) or _eigh(mom, r)
    z = _project(mom.xc, out[0])  # (M, r) coordinates on the top-r directions
    dev = (z - z.median(0).values).abs()  # (M, r)
    mad = dev.median(0).values * _MAD_TO_STD  # (r,)
    scale = torch.where(mad > 0, mad, mad.max()).clamp_min(torch.finfo(z.dtype).tiny)
    dist = (dev / scale).norm(dim=1)  # (M,)
    keep[torch.argsort(dist, descending=True, stable=True)[:n_out]] = False
    return keep, out[0]


# ---------------------------------------------------------------- colours


def _unit_range(coords: Tensor, fg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    q = torch.tensor(_QUANTILES, dtype=coords.dtype, device=coords.device)
    lo, hi = torch.quantile(coords[fg], q, dim=0)  # (K,), (K,)
    span = hi - lo
    ok = span > 0
    unit = torch.where(ok, (coords - lo) / torch.where(ok, span, 1.0), 0.5).clamp(0.0, 1.0)  # (M, K)
    return unit, lo, hi


def _to_images(unit: Tensor, black: Tensor | None, v: int, gh: int, gw: int) -> Tensor:
    m, k = unit.shape
    rgb = unit[:, :3]
    if k == 1:
        rgb = rgb.expand(m, 3)
    elif k == 2:
        rgb = torch.cat([rgb, rgb.new_zeros(m, 1)], 1)
    if black is not None:
        rgb = rgb.masked_fill(black[:, None], 0.0)
    return rgb.reshape(v, gh, gw, 3).permute(0, 3, 1, 2).contiguous()  # (V, 3, gh, gw)


# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def _numerics(device: torch.device) -> Iterator[None]:
    """No autograd, no autocast: the float32 math stays float32 whatever the caller set."""
    try:
        autocast = torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):
        autocast = contextlib.nullcontext()
    with torch.no_grad(), autocast:
        yield


def _matmul_dtype(device: torch.device) -> torch.dtype:
    """float64 where float32 matmuls may run at reduced precision (TF32/bf16), else float32."""
    try:
        if device.type == "cuda":
            matmul = torch.backends.cuda.matmul
            precision = getattr(matmul, "fp32_precision", None)
            reduced = matmul.allow_tf32 if precision is None else precision in ("tf32", "bf16")
        else:
            precision = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None)
            reduced = precision in ("tf32", "bf16")
    except RuntimeError:  # mixed legacy/new precision settings: assume reduced
        reduced = True
    return torch.float64 if reduced else torch.float32


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    dtype = _matmul_dtype(a.device)
    return (a.to(dtype) @ b.to(dtype)).float()


def _project(xc: Tensor, basis: Tensor) -> Tensor:
    """``xc (M, D) @ basis (D, K)`` as ``(basis^T xc^T)^T``: the same product, but MKL runs a tall
    matrix times a few columns several times slower than a few rows times a wide matrix."""
    dtype = _matmul_dtype(xc.device)
    return (basis.T.to(dtype) @ xc.to(dtype).T).T.float()  # (M, K)


def _check_floating(x: Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"Expected `{name}` to be a floating-point tensor, got {x.dtype}.")


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
