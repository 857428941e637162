"""The principal-component fit behind the PCA maps: ``fit_pca`` and its moment/Krylov machinery.

Convention:
    - Components are sorted by decreasing variance; a fit makes each component's
      largest-magnitude loading positive (the first such entry on ties).
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
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

from panoviz_callback._checks import _check_choice, _check_int, _check_shape

__all__ = ["fit_pca"]

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
