"""Tests for panoviz_callback.pca: known answers from a full float64 eigendecomposition."""

from __future__ import annotations

import pytest
import torch

from panoviz_callback import _pca_fit
from panoviz_callback.pca import PCAState, fit_pca, pca_rgb

MODES = ("threshold", "remove_first_pc", "outlier_removal", "none")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spectrum_data(m: int, d: int, scales: list[float], noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """``(m, d)`` rows with planted principal directions of std ``scales``, plus isotropic noise and an offset."""
    g = _gen(seed)
    r = len(scales)
    dirs = torch.linalg.qr(torch.randn(d, r, generator=g)).Q  # (d, r)
    z = torch.randn(m, r, generator=g) * torch.tensor(scales)
    return z @ dirs.T + noise * torch.randn(m, d, generator=g) + 3.0 * torch.randn(d, generator=g)


def _eigh_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and all components (decreasing variance) of the float64 covariance."""
    xd = x.double()
    xc = xd - xd.mean(0)
    evals, evecs = torch.linalg.eigh(xc.T @ xc / (x.shape[0] - 1))
    return xd.mean(0), evecs.flip(-1)


def _max_err_up_to_sign(basis: torch.Tensor, ref: torch.Tensor) -> float:
    basis, ref = basis.double().cpu(), ref.double().cpu()
    sign = torch.sign((basis * ref).sum(0))
    return (basis - ref * sign).abs().max().item()


def _unit_coords(x: torch.Tensor, basis: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Reference colour mapping: 2nd..98th percentiles over ``rows``, clipped."""
    coords = (x.double() - x[rows].double().mean(0)) @ basis.double()
    lo, hi = torch.quantile(coords[rows], torch.tensor([0.02, 0.98], dtype=torch.float64), dim=0)
    return ((coords - lo) / (hi - lo)).clamp(0, 1)


def _planted_fg(v: int, n: int, d: int, bg_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Background tokens near one vector, foreground tokens varied, far from it along one direction."""
    g = _gen(seed)
    m = v * n
    is_fg = torch.zeros(m, dtype=torch.bool)
    is_fg[torch.randperm(m, generator=g)[: round(m * (1 - bg_fraction))]] = True
    bg_vec = torch.randn(d, generator=g)
    offset = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0) * 12.0
    varied = torch.randn(m, 16, generator=g) @ torch.linalg.qr(torch.randn(d, 16, generator=g)).Q.T  # (m, d)
    x = bg_vec + 0.05 * torch.randn(m, d, generator=g)
    x[is_fg] += offset + varied[is_fg]
    return x.reshape(v, n, d), is_fg.reshape(v, n)


@pytest.fixture(scope="module")
def big() -> tuple[torch.Tensor, torch.Tensor]:
    """D = 768 (ViT-B) data with a clear top spectrum and its float64 eigh reference."""
    x = _spectrum_data(600, 768, [10.0 * (i + 1) ** -0.7 for i in range(64)], noise=0.1, seed=3)
    return x, _eigh_reference(x)[1]


# ---------------------------------------------------------------- fit_pca


@pytest.mark.parametrize("method", ["eigh", "subspace", "auto"])
def test_fit_pca_matches_eigh(method: str) -> None:
    x = _spectrum_data(500, 40, [5.0, 3.0, 2.0, 1.2, 0.8], seed=1)
    mean_ref, comps = _eigh_reference(x)
    mean, basis, var = fit_pca(x, 3, method=method)
    assert _max_err_up_to_sign(basis, comps[:, :3]) < 1e-4
    torch.testing.assert_close(mean.double(), mean_ref, atol=1e-5, rtol=0)
    xc = x.double() - mean_ref
    expected_var = ((xc @ comps[:, :3]) ** 2).sum(0) / (x.shape[0] - 1)
    torch.testing.assert_close(var.double(), expected_var, rtol=1e-4, atol=0)
    torch.testing.assert_close(basis.T @ basis, torch.eye(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("method", "k"), [("eigh", 3), ("subspace", 1), ("subspace", 3)])
def test_fit_pca_matches_eigh_d768(big: tuple[torch.Tensor, torch.Tensor], method: str, k: int) -> None:
    x, comps = big
    _, basis, _ = fit_pca(x, k, method=method)
    assert basis.dtype == torch.float32
    assert _max_err_up_to_sign(basis, comps[:, :k]) < 1e-4


@pytest.fixture(scope="module")
def tall() -> tuple[torch.Tensor, torch.Tensor]:
    """M = 1600 tokens > D = 768 (8 ViT-B views): the shape the bench analyses, and its eigh reference."""
    x = _spectrum_data(1600, 768, [10.0 * (i + 1) ** -0.7 for i in range(64)], noise=0.1, seed=11)
    return x, _eigh_reference(x)[1]


@pytest.mark.parametrize("k", [1, 3, 4])
def test_fit_pca_matches_eigh_more_tokens_than_dims(tall: tuple[torch.Tensor, torch.Tensor], k: int) -> None:
    tall, comps = tall
    _, basis, var = fit_pca(tall, k, method="subspace")
    assert _max_err_up_to_sign(basis, comps[:, :k]) < 1e-4
    _, _, var_ref = fit_pca(tall, k, method="eigh")
    torch.testing.assert_close(var, var_ref, rtol=1e-5, atol=0)


def test_fit_pca_float64_products_when_float32_stalls(tall: tuple[torch.Tensor, torch.Tensor],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The switch to float64 products (a float32 residual floor above the tolerance) keeps the result."""
    tall, comps = tall
    monkeypatch.setattr(_pca_fit, "_STALL", 0.0)  # any step below _STALL_BELOW counts as stalled
    monkeypatch.setattr(_pca_fit, "_STALL_BELOW", 1.0)
    precise = []
    real_times = _pca_fit._Moments.times

    def spy(self, rows, precise_=False, **kwargs):
        precise.append(kwargs.get("precise", precise_))
        return real_times(self, rows, kwargs.get("precise", precise_))

    monkeypatch.setattr(_pca_fit._Moments, "times", spy)
    _, basis, _ = fit_pca(tall, 3, method="subspace")
    assert precise[0] is False and precise[-1] is True
    assert _max_err_up_to_sign(basis, comps[:, :3]) < 1e-4


@pytest.mark.parametrize("bg_removal", ["outlier_removal", "threshold"])
def test_pca_rgb_krylov_fits_on_subsets_match_eigh(tall: tuple[torch.Tensor, torch.Tensor], bg_removal: str) -> None:
    """D = 768: the colour fit on the inliers / foreground (warm-started Krylov) is the eigh of that subset."""
    x = tall[0].clone()
    if bg_removal == "threshold":  # two modes along one direction: a background to separate
        x[::3] += 40.0 * torch.nn.functional.normalize(torch.randn(768, generator=_gen(5)), dim=0)
    _, fg_mask, state = pca_rgb(x.reshape(8, 200, 768), (10, 20), bg_removal=bg_removal)
    fg = fg_mask.reshape(-1)
    assert 0 < int(fg.sum()) < len(fg)  # a proper subset
    comps = _eigh_reference(x[fg])[1]
    assert _max_err_up_to_sign(state.basis, comps[:, :3]) < 1e-4


@pytest.mark.parametrize("method", ["eigh", "subspace"])
def test_fit_pca_convention_largest_loading_positive(method: str) -> None:
    x = _spectrum_data(300, 300, [5.0, 3.0, 2.0, 1.0], seed=2)
    _, basis, _ = fit_pca(x, 4, method=method)
    top = basis.gather(0, basis.abs().argmax(0, keepdim=True))
    assert (top > 0).all()


def _count_qr(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real_qr = torch.linalg.qr

    def counting_qr(*args, **kwargs):
        calls[0] += 1
        return real_qr(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "qr", counting_qr)
    return calls


def test_fit_pca_warm_start_converges_in_few_steps(big: tuple[torch.Tensor, torch.Tensor],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    x, comps = big
    previous = x + 0.05 * torch.randn(x.shape, generator=_gen(7))  # last epoch's features
    _, init, _ = fit_pca(previous, 3, method="subspace")
    _, exact, _ = fit_pca(x, 3, method="subspace")
    calls = _count_qr(monkeypatch)  # one QR for the start, then one per step that did not converge
    fit_pca(x, 3, method="subspace")
    cold, calls[0] = calls[0], 0
    _, basis, _ = fit_pca(x, 3, method="subspace", init_basis=init)
    warm, calls[0] = calls[0], 0
    fit_pca(x, 3, method="subspace", init_basis=exact)
    assert calls[0] == 1  # converged at the first check
    assert warm <= 5 and warm < cold  # Krylov converges cold in ~5 steps; the warm start saves at least one
    assert _max_err_up_to_sign(basis, comps[:, :3]) < 1e-4


def test_fit_pca_subspace_falls_back_to_eigh(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _spectrum_data(400, 300, [5.0, 3.0, 2.0, 1.0], seed=4)
    monkeypatch.setattr(_pca_fit, "_MAX_ITER", 1)  # a cold start never converges in one step
    sub = fit_pca(x, 3, method="subspace")
    exact = fit_pca(x, 3, method="eigh")
    for a, b in zip(sub, exact):
        assert torch.equal(a, b)


def test_fit_pca_convention_auto_picks_subspace_for_large_d(monkeypatch: pytest.MonkeyPatch) -> None:
    small, large = _spectrum_data(200, 192, [3.0, 2.0, 1.0]), _spectrum_data(200, 256, [3.0, 2.0, 1.0])
    calls = _count_qr(monkeypatch)
    fit_pca(small, 3)
    assert calls[0] == 0  # D < 256: eigh
    fit_pca(large, 3)
    assert calls[0] > 0  # D >= 256, k small: Krylov iteration


def test_fit_pca_own_generator_leaves_global_rng_alone() -> None:
    x = _spectrum_data(200, 256, [5.0, 3.0, 2.0], seed=5)
    before = torch.get_rng_state()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        a = fit_pca(x, 3, method="subspace")
        torch.manual_seed(2)
        b = fit_pca(x, 3, method="subspace")
    assert torch.equal(before, torch.get_rng_state())
    state = torch.get_rng_state()
    fit_pca(x, 3, method="subspace")
    for bg_removal in MODES:
        pca_rgb(x.reshape(2, 100, 256), (10, 10), bg_removal=bg_removal)
    assert torch.equal(state, torch.get_rng_state())
    for u, w in zip(a, b):
        assert torch.equal(u, w)
    c = fit_pca(x, 3, method="subspace", generator=torch.Generator().manual_seed(123))
    assert _max_err_up_to_sign(c[1], a[1]) < 1e-4


# ---------------------------------------------------------------- pca_rgb


@pytest.mark.parametrize("bg_removal", MODES)
def test_pca_rgb_smoke(device: torch.device, bg_removal: str) -> None:
    feats, _ = _planted_fg(4, 12, 32, 0.5)
    images, fg_mask, state = pca_rgb(feats.to(device), (3, 4), bg_removal=bg_removal)
    assert images.shape == (4, 3, 3, 4) and images.dtype == torch.float32 and images.device.type == device.type
    assert fg_mask.shape == (4, 12) and fg_mask.dtype == torch.bool
    assert 0 <= images.min() and images.max() <= 1
    assert state.basis.shape == (32, 3) and state.lo.shape == (3,) and state.hi.shape == (3,)
    assert state.bg_removal == bg_removal and state.note is None


@pytest.mark.parametrize("bg_removal", MODES)
def test_pca_rgb_deterministic(bg_removal: str) -> None:
    feats, _ = _planted_fg(4, 49, 512, 0.6)  # D = 512: the Krylov iteration
    first = pca_rgb(feats, (7, 7), bg_removal=bg_removal)
    second = pca_rgb(feats.clone(), (7, 7), bg_removal=bg_removal)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert torch.equal(first[2].basis, second[2].basis)


def test_pca_rgb_none_uses_all_tokens() -> None:
    x = _spectrum_data(240, 24, [5.0, 3.0, 2.0, 1.0], seed=6)
    images, fg_mask, state = pca_rgb(x.reshape(4, 60, 24), (6, 10), bg_removal="none")
    comps = _eigh_reference(x)[1]
    assert fg_mask.all()
    assert _max_err_up_to_sign(state.basis, comps[:, :3]) < 1e-4
    expected = _unit_coords(x, state.basis, torch.ones(240, dtype=torch.bool))
    torch.testing.assert_close(images.permute(0, 2, 3, 1).reshape(240, 3).double(), expected, atol=1e-4, rtol=0)


def test_pca_rgb_remove_first_pc_uses_components_2_to_4() -> None:
    x = _spectrum_data(240, 24, [6.0, 4.0, 3.0, 2.0, 1.0], seed=8)
    images, fg_mask, state = pca_rgb(x.reshape(4, 60, 24), (6, 10), bg_removal="remove_first_pc")
    comps = _eigh_reference(x)[1]
    assert fg_mask.all()
    assert _max_err_up_to_sign(state.basis, comps[:, 1:4]) < 1e-4
    assert _max_err_up_to_sign(state.fg_basis[:, None], comps[:, :1]) < 1e-4
    expected = _unit_coords(x, state.basis, torch.ones(240, dtype=torch.bool))
    torch.testing.assert_close(images.permute(0, 2, 3, 1).reshape(240, 3).double(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("bg_fraction", [0.3, 0.6])
def test_pca_rgb_threshold_finds_planted_background(bg_fraction: float) -> None:
    feats, is_fg = _planted_fg(8, 49, 64, bg_fraction)
    images, fg_mask, state = pca_rgb(feats, (7, 7))  # threshold is the default
    assert (fg_mask == is_fg).float().mean() > 0.95  # the homogeneous side is background, large or small
    rgb = images.permute(0, 2, 3, 1)  # (V, gh, gw, 3)
    assert (rgb[~fg_mask.reshape(8, 7, 7)] == 0).all()  # background drawn black
    assert rgb[fg_mask.reshape(8, 7, 7)].amax(-1).gt(0).float().mean() > 0.9
    x = feats.reshape(-1, 64)
    score = x @ state.fg_basis
    assert score[~is_fg.reshape(-1)].mean() < score[is_fg.reshape(-1)].mean()  # background at the low end
    fg = fg_mask.reshape(-1)
    comps = _eigh_reference(x[fg])[1]  # colours are refitted on the foreground only
    assert _max_err_up_to_sign(state.basis, comps[:, :3]) < 1e-4
    assert state.note is None


def test_pca_rgb_threshold_no_foreground_falls_back() -> None:
    feats = torch.ones(2, 4, 8)  # every token the same: no direction, nothing to separate
    images, fg_mask, state = pca_rgb(feats, (2, 2))
    assert fg_mask.all() and "flat" in state.note and "kept every token" in state.note
    assert torch.isfinite(images).all()
    feats, _ = _planted_fg(2, 9, 16, 0.5)
    with pytest.warns(UserWarning, match="bg_threshold=1"):
        _, fg_mask, state = pca_rgb(feats, (3, 3), bg_threshold=1.0)  # only the maximum passes
    assert fg_mask.all() and state.note is not None


def test_pca_rgb_outlier_removal_excludes_planted_outliers() -> None:
    g = _gen(9)
    m, d = 400, 48
    x = _spectrum_data(m, d, [4.0, 3.0, 2.0, 1.5, 1.0], seed=9)
    outliers = torch.zeros(m, dtype=torch.bool)
    outliers[torch.randperm(m, generator=g)[:20]] = True  # exactly 5 %
    x[outliers] += 15.0 * torch.nn.functional.normalize(torch.randn(20, d, generator=g), dim=1)
    images, fg_mask, state = pca_rgb(x.reshape(4, 100, d), (10, 10), bg_removal="outlier_removal")
    assert torch.equal(fg_mask.reshape(-1), ~outliers)
    comps = _eigh_reference(x[~outliers])[1]  # fitted on the inliers
    assert _max_err_up_to_sign(state.basis, comps[:, :3]) < 1e-4
    expected = _unit_coords(x, state.basis, ~outliers)  # range from the inliers, outliers clipped
    torch.testing.assert_close(images.permute(0, 2, 3, 1).reshape(m, 3).double(), expected, atol=1e-4, rtol=0)
    assert images.permute(0, 2, 3, 1).reshape(m, 3)[outliers].amax(-1).gt(0).all()  # drawn, not black


def test_pca_rgb_n_components() -> None:
    feats, _ = _planted_fg(4, 16, 24, 0.5)
    grey, _, state1 = pca_rgb(feats, (4, 4), n_components=1, bg_removal="none")
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 0], grey[:, 2])
    assert state1.basis.shape == (24, 1)
    rg, _, _ = pca_rgb(feats, (4, 4), n_components=2, bg_removal="none")
    assert (rg[:, 2] == 0).all() and rg[:, :2].amax() > 0
    rgb3, _, _ = pca_rgb(feats, (4, 4), n_components=3, bg_removal="none")
    rgb5, _, state5 = pca_rgb(feats, (4, 4), n_components=5, bg_removal="none")
    assert state5.basis.shape == (24, 5) and state5.lo.shape == (5,)
    torch.testing.assert_close(rgb5, rgb3, atol=1e-4, rtol=0)  # the first three of five
    torch.testing.assert_close(rg, torch.cat([rgb3[:, :2], torch.zeros_like(rgb3[:, 2:])], 1), atol=1e-4, rtol=0)


def _flip_case(u: list[float]) -> torch.Tensor:
    """Data whose first principal direction is ``u`` (padded with zeros), same noise for every call."""
    g = _gen(10)
    d = 16
    top = torch.zeros(d)
    top[: len(u)] = torch.tensor(u)
    top = top / top.norm()
    rest = torch.randn(d, 3, generator=g)
    rest = torch.linalg.qr(rest - top[:, None] * (top @ rest)).Q  # (d, 3) orthogonal to the top direction
    z = torch.randn(240, 4, generator=g) * torch.tensor([6.0, 3.0, 2.0, 1.0])
    return (z[:, :1] * top + z[:, 1:] @ rest.T).reshape(4, 60, d)


def test_pca_rgb_sign_alignment_keeps_colours() -> None:
    # the first direction's largest loading flips from entry 0 (+) to entry 1 (-) between the two fits
    feats_a = _flip_case([1.0, -0.85, 0.3])
    feats_b = _flip_case([0.85, -1.0, 0.3])
    img_a, _, state_a = pca_rgb(feats_a, (6, 10), bg_removal="none")
    img_b_fresh, _, fresh = pca_rgb(feats_b, (6, 10), bg_removal="none")
    img_b, _, state_b = pca_rgb(feats_b, (6, 10), bg_removal="none", state=state_a)
    assert (fresh.basis[:, 0] @ state_a.basis[:, 0]) < 0  # the first-fit rule alone would flip red
    assert ((state_b.basis * state_a.basis).sum(0) > 0).all()
    assert (img_b[:, 0] - img_a[:, 0]).abs().mean() < 0.05  # colours stay
    assert (img_b_fresh[:, 0] - img_a[:, 0]).abs().mean() > 0.3


def test_pca_rgb_follows_previous_signs() -> None:
    feats, _ = _planted_fg(4, 16, 24, 0.5)
    _, _, state = pca_rgb(feats, (4, 4))
    flipped = PCAState(mean=state.mean, basis=-state.basis, lo=state.lo, hi=state.hi, fg_basis=state.fg_basis,
                       bg_removal=state.bg_removal)
    _, _, again = pca_rgb(feats, (4, 4), state=flipped)
    torch.testing.assert_close(again.basis, -state.basis, atol=1e-5, rtol=0)


def test_pca_rgb_freeze_reuses_basis() -> None:
    feats, _ = _planted_fg(4, 16, 24, 0.5)
    _, _, state = pca_rgb(feats, (4, 4))
    other = feats + 0.3 * torch.randn(feats.shape, generator=_gen(11))
    _, _, frozen = pca_rgb(other, (4, 4), state=state, freeze=True)
    assert torch.equal(frozen.basis, state.basis) and torch.equal(frozen.fg_basis, state.fg_basis)
    assert not torch.equal(frozen.lo, state.lo)  # the range is data
    _, _, refit = pca_rgb(other, (4, 4), state=state)
    assert not torch.equal(refit.basis, state.basis)


def test_pca_rgb_state_dict_back_and_forth(tmp_path) -> None:
    feats, _ = _planted_fg(4, 16, 24, 0.5)
    images, _, state = pca_rgb(feats, (4, 4), n_components=4)
    path = tmp_path / "pca_state.pt"
    torch.save({"pca": state.state_dict()}, path)
    loaded = PCAState.from_state_dict(torch.load(path, weights_only=True)["pca"])
    for name in ("mean", "basis", "lo", "hi", "fg_basis"):
        assert torch.equal(getattr(loaded, name), getattr(state, name))
    assert loaded.bg_removal == "threshold" and loaded.n_components == 4 and loaded.note is None
    again, _, _ = pca_rgb(feats, (4, 4), n_components=4, state=loaded.to("cpu"), freeze=True)
    assert torch.equal(again, images)


def test_pca_rgb_float32_under_autocast_and_bf16() -> None:
    feats, _ = _planted_fg(4, 16, 24, 0.5)
    ref = pca_rgb(feats, (4, 4), bg_removal="none")[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images = pca_rgb(feats, (4, 4), bg_removal="none")[0]
    assert torch.equal(images, ref)
    images = pca_rgb(feats.bfloat16(), (4, 4), bg_removal="none")[0]
    assert images.dtype == torch.float32


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"n_components": 0}, ValueError, r"Argument `n_components` must be in \[1, 8\], got 0"),
    ({"n_components": 9}, ValueError, r"Argument `n_components` must be in \[1, 8\], got 9"),
    ({"n_components": 8, "bg_removal": "remove_first_pc"}, ValueError, r"`n_components` must be in \[1, 7\]"),
    ({"n_components": 2.0}, TypeError, "Expected `n_components` to be an int"),
    ({"bg_removal": "first_pc"}, ValueError, r"Argument `bg_removal` must be one of \('threshold'"),
    ({"bg_threshold": 1.5}, ValueError, r"Argument `bg_threshold` must be in \[0, 1\]"),
    ({"grid_hw": (2, 3)}, ValueError, r"Expected `grid_hw` with gh \* gw == N = 4, got \(2, 3\)"),
    ({"grid_hw": 4}, ValueError, "Expected `grid_hw` to be two positive ints"),
    ({"freeze": True}, ValueError, "Argument `freeze` needs a `state`"),
    ({"state": "state"}, TypeError, "Expected `state` to be a PCAState"),
    ({"feats": torch.zeros(3, 8)}, ValueError, r"Expected `feats` of shape \(V, N, D\), got \(3, 8\)"),
    ({"feats": torch.zeros(3, 4, 8, dtype=torch.long)}, TypeError, "floating-point"),
    ({"feats": torch.full((3, 4, 8), float("nan"))}, ValueError, "Expected `feats` to be finite"),
])
def test_pca_rgb_exception(kwargs: dict, error: type, match: str) -> None:
    args = {"feats": torch.randn(3, 4, 8, generator=_gen(0)), "grid_hw": (2, 2), **kwargs}
    with pytest.raises(error, match=match):
        pca_rgb(args.pop("feats"), args.pop("grid_hw"), **args)


def test_pca_rgb_exception_state_mismatch() -> None:
    feats = torch.randn(3, 4, 8, generator=_gen(0))
    _, _, state = pca_rgb(feats, (2, 2), bg_removal="none")
    with pytest.raises(ValueError, match="Expected `state` fitted on D = 6 features, got D = 8"):
        pca_rgb(feats[..., :6], (2, 2), state=state)
    with pytest.raises(ValueError, match="Expected a frozen `state` with n_components = 2, got 3"):
        pca_rgb(feats, (2, 2), bg_removal="none", n_components=2, state=state, freeze=True)
    with pytest.raises(ValueError, match="Expected a frozen `state` from bg_removal='threshold', got 'none'"):
        pca_rgb(feats, (2, 2), state=state, freeze=True)
    with pytest.raises(ValueError, match="missing \\['lo', 'hi'\\]"):
        PCAState.from_state_dict({"mean": state.mean, "basis": state.basis})
    with pytest.raises(ValueError, match=r"Expected `lo` of shape \(3\), got \(2,\)"):
        PCAState.from_state_dict({**state.state_dict(), "lo": torch.zeros(2)})


@pytest.mark.parametrize(("args", "kwargs", "error", "match"), [
    ((torch.zeros(5),), {"k": 1}, ValueError, r"Expected `x` of shape \(M, D\), got \(5,\)"),
    ((torch.zeros(1, 5),), {"k": 1}, ValueError, "Expected `x` with at least 2 rows, got 1"),
    ((torch.zeros(4, 5),), {"k": 6}, ValueError, r"Argument `k` must be in \[1, 5\], got 6"),
    ((torch.zeros(4, 5),), {"k": 2, "method": "lanczos"}, ValueError, r"Argument `method` must be one of"),
    ((torch.zeros(4, 5),), {"k": 2, "init_basis": torch.zeros(4, 2)}, ValueError,
     r"Expected `init_basis` of shape \(5, K\), got \(4, 2\)"),
])
def test_fit_pca_exception(args: tuple, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        fit_pca(*args, **kwargs)


# ---------------------------------------------------------------- stable colours across component swaps


def _two_close_components(m: int, d: int, var_1: float, var_2: float, seed: int = 21) -> tuple[torch.Tensor, ...]:
    """Tokens with strong components u1, u2 (variances var_1, var_2) and a weaker u3; returns x, z, dirs."""
    g = _gen(seed)
    dirs = torch.linalg.qr(torch.randn(d, 4, generator=g, dtype=torch.float64)).Q  # (d, 4)
    z = torch.randn(m, 4, generator=g, dtype=torch.float64)
    z = (z - z.mean(0)) / z.std(0)
    z = torch.linalg.qr(z).Q * (m - 1) ** 0.5  # exactly uncorrelated, unit variance columns
    x = z @ torch.diag(torch.tensor([var_1, var_2, 0.5, 0.1], dtype=torch.float64).sqrt()) @ dirs.T
    return x.float(), z, dirs


def test_pca_rgb_convention_colours_follow_features_when_eigenvalues_cross() -> None:
    """Fit 1: var(u1) = 1.0 > var(u2) = 0.97; fit 2: u2 scaled by 1.03 (var 1.03 > 1.0): the first two
    components swap. The percentile colour range absorbs the scale, so after matching the colours of
    every token are those of fit 1; sign/index alignment alone would swap red and green."""
    x1, z, dirs = _two_close_components(600, 32, 1.0, 0.97)
    x2 = x1 + (0.03 * 0.97**0.5 * z[:, 1:2] @ dirs[:, 1:2].T).float()  # u2 coordinate scaled by 1.03
    img1, _, state1 = pca_rgb(x1.reshape(6, 100, 32), (10, 10), bg_removal="none")
    img2, _, state2 = pca_rgb(x2.reshape(6, 100, 32), (10, 10), bg_removal="none", state=state1)
    fresh, _, _ = pca_rgb(x2.reshape(6, 100, 32), (10, 10), bg_removal="none")
    assert (fresh - img1).abs().mean() > 0.1  # without the previous state the channels swap
    assert (img2 - img1).abs().mean() < 1e-3


def test_pca_rgb_convention_degenerate_pair_is_rotated_back() -> None:
    """Equal variances (a degenerate pair): a tiny perturbation turns the eigenvectors anywhere in
    the plane; the Procrustes step within the group brings the colours back (MAE < 1e-3)."""
    x1, z, dirs = _two_close_components(600, 32, 1.0, 1.0 + 1e-6, seed=22)
    x2 = x1 + 1e-4 * torch.randn(x1.shape, generator=_gen(23))
    img1, _, state1 = pca_rgb(x1.reshape(6, 100, 32), (10, 10), bg_removal="none")
    img2, _, _ = pca_rgb(x2.reshape(6, 100, 32), (10, 10), bg_removal="none", state=state1)
    assert (img2 - img1).abs().mean() < 1e-3
    img3, _, _ = pca_rgb(x1.reshape(6, 100, 32), (10, 10), bg_removal="none", state=state1)
    assert (img3 - img1).abs().mean() < 1e-3  # identical tokens, identical colours


# ---------------------------------------------------------------- tokens without image (letterbox padding)


@pytest.mark.parametrize("bg_removal", MODES)
def test_pca_rgb_padding_tokens_take_no_part(bg_removal: str) -> None:
    """A large letterbox (40% of the tokens, all one value) changes nothing: the fit equals the fit on
    the image tokens alone, padding is drawn grey and is never foreground."""
    feats, _ = _planted_fg(4, 50, 24, 0.4, seed=3)
    valid = torch.ones(4, 50, dtype=torch.bool)
    valid[:, :20] = False  # the top rows of every view are padding
    padded = feats.clone()
    padded[~valid] = 7.0  # a black bar: one constant token, far from the image tokens
    images, fg_mask, state = pca_rgb(padded, (5, 10), bg_removal=bg_removal, valid=valid)
    alone, fg_alone, state_alone = pca_rgb(feats[valid][None], (1, 120), bg_removal=bg_removal)
    torch.testing.assert_close(state.basis, state_alone.basis, atol=1e-5, rtol=0)
    torch.testing.assert_close(state.mean, state_alone.mean, atol=1e-5, rtol=0)
    rgb = images.permute(0, 2, 3, 1).reshape(4, 50, 3)
    torch.testing.assert_close(rgb[valid], alone[0].permute(1, 2, 0).reshape(120, 3), atol=1e-5, rtol=0)
    assert (rgb[~valid] == 0.5).all() and not fg_mask[~valid].any()
    assert torch.equal(fg_mask[valid], fg_alone.reshape(-1))


def test_pca_rgb_valid_exceptions() -> None:
    feats = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match=r"Expected `valid` of shape \(2, 4\)"):
        pca_rgb(feats, (2, 2), valid=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="Expected `valid` to be a bool tensor"):
        pca_rgb(feats, (2, 2), valid=torch.ones(2, 4))
    with pytest.raises(ValueError, match="at least 2 \\(valid\\) tokens"):
        pca_rgb(feats, (2, 2), valid=torch.zeros(2, 4, dtype=torch.bool))
