"""The one analysis pipeline shared by the Lightning callback and the checkpoint runner.

``views -> encoder (-> resampler) -> PCA-RGB images + cross-view metrics``. The
encoder and resampler forwards run under whatever context the caller set (the
callback wraps them in the precision plugin's ``forward_context``); everything
after them runs without autocast, in float32, on the features' device. A number
logged live and a number computed later from a checkpoint therefore come from
the same code.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from panoviz_callback import metrics as _m
from panoviz_callback._checks import _check_choice, _check_range
from panoviz_callback.background import padding_tokens
from panoviz_callback.correspondence import patch_correspondence, warp_pairs
from panoviz_callback.features import TokenFeatures, apply_resampler, extract_layers
from panoviz_callback.inside import InsideOptions, InsideProbe
from panoviz_callback.pca import PCAState, pca_rgb
from panoviz_callback.results import AnalysisResult, LevelResult, MetricResult
from panoviz_callback.views import ViewSet

__all__ = ["METRICS", "LEVELS", "MetricResult", "LevelResult", "AnalysisResult", "Analyzer", "analyze"]

#: Metric names, in report order (the keys of :attr:`LevelResult.metrics`).
METRICS = (
    "token_cosine", "overlap_cosine", "hungarian_cosine", "hungarian_accuracy", "nn_accuracy",
    "linear_cka", "debiased_cka", "overlap_cka", "overlap_debiased_cka", "ssim", "lpips",
)
#: Level names: the encoder's tokens and the resampler's output.
LEVELS = ("vision_encoder", "resampled")
_BG_MODES = ("threshold", "remove_first_pc", "outlier_removal", "none")
_NEEDS_OVERLAP = ("overlap_cosine", "hungarian_cosine", "hungarian_accuracy", "nn_accuracy", "overlap_cka",
                  "overlap_debiased_cka", "ssim", "lpips")
_IMAGE_METRICS = ("ssim", "lpips")

_NO_OVERLAP = "not applicable: the views of this crop strategy do not overlap"
_NO_POSITION = "not applicable: query tokens have no spatial position"
_NO_PAIRS = "not applicable: the crop strategy gives no view pairs"
_METRIC_IMAGE_MIN = 64  # PCA images are upsampled (bilinear) to >= 64 px for SSIM / LPIPS


class _Timer:
    """Wall-clock stage timer; synchronises CUDA first so that stages are not smeared."""

    def __init__(self, device: torch.device, timings: dict[str, float]) -> None:
        self.device = device
        self.timings = timings

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def _float32_numerics(device: torch.device) -> Iterator[None]:
    """Autocast off (CPU and the features' device) and float32 as the default dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with contextlib.ExitStack() as stack:
            for device_type in {"cpu", device.type}:
                with contextlib.suppress(RuntimeError):  # device types without autocast support
                    stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            yield
    finally:
        torch.set_default_dtype(previous)


def _module_device(module: Any) -> torch.device | None:
    if isinstance(module, torch.nn.Module):
        for tensor in (*module.parameters(), *module.buffers()):
            return tensor.device
    return None


def _metric_images(images: Tensor) -> Tensor:
    """Upsample ``(V, 3, gh, gw)`` PCA images (bilinear) so the shorter side is >= 64 px, by an integer factor."""
    gh, gw = images.shape[-2:]
    factor = max(1, math.ceil(_METRIC_IMAGE_MIN / min(gh, gw)))
    return F.interpolate(images, scale_factor=factor, mode="bilinear", align_corners=False).clamp(0, 1)


class Analyzer:
    """Holds the analysis settings and the PCA state across calls (stable colours between epochs).

    Args:
        layer: hidden-state index of the encoder (``-1``: the model's ``last_hidden_state``,
            i.e. after SigLIP's post-layernorm; negative and positive indices work).
        keep_cls_token: keep the prefix tokens (CLS, registers) in the encoder level.
        n_components: PCA components (1 gives a grey map; more than 3 draws the first 3).
        bg_removal: background handling of the PCA, one of
            ``("threshold", "remove_first_pc", "outlier_removal", "none")``.
        bg_threshold: the first-PC threshold of ``"threshold"``, in ``[0, 1]``.
        metrics: the metric names to compute (None: all of :data:`METRICS`; ``()``: none).
        stable_colors: keep each level's PCA state and align the next fit to it.
        freeze_pca: with ``stable_colors``, reuse the first basis instead of refitting.
        normalize: pixel normalisation for the encoder: ``"auto"`` (from the model type),
            ``(mean, std)`` or None (the encoder gets ``[0, 1]`` pixels).
        lpips_metric: an :class:`~panoviz_callback.metrics.LPIPSMetric` to use (None: one is
            built on first use, only if ``"lpips"`` is requested).
        inside: look inside (opt-in, see :mod:`panoviz_callback.inside`): None (off), True
            (attention maps, ``layers="all"`` sweep, agreement panoramas), a dict of
            :class:`~panoviz_callback.inside.InsideOptions` fields or an ``InsideOptions``.

    Raises:
        ValueError: an option is out of range or names an unknown mode or metric.
        TypeError: an option has the wrong type.

    Example::

        >>> from panoviz_callback import make_views, synthetic_panorama  # doctest: +SKIP
        >>> analyzer = Analyzer(metrics=["token_cosine", "overlap_cosine"])  # doctest: +SKIP
        >>> result = analyzer(make_views(synthetic_panorama()), encoder)  # doctest: +SKIP
        >>> result.scalars()  # doctest: +SKIP
        {'vision_encoder/token_cosine': 0.41, 'vision_encoder/overlap_cosine': 0.87}
    """

    def __init__(
        self,
        *,
        layer: int = -1,
        keep_cls_token: bool = False,
        n_components: int = 3,
        bg_removal: Literal["threshold", "remove_first_pc", "outlier_removal", "none"] = "threshold",
        bg_threshold: float = 0.5,
        metrics: Sequence[str] | None = None,
        stable_colors: bool = True,
        freeze_pca: bool = False,
        normalize: Any = "auto",
        lpips_metric: Any = None,
        inside: InsideOptions | dict[str, Any] | bool | None = None,
    ) -> None:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"Expected `layer` to be an int, got {type(layer).__name__}.")
        for flag, name in ((keep_cls_token, "keep_cls_token"), (stable_colors, "stable_colors"),
                           (freeze_pca, "freeze_pca")):
            if not isinstance(flag, bool):
                raise TypeError(f"Expected `{name}` to be a bool, got {type(flag).__name__}.")
        if not isinstance(n_components, int) or isinstance(n_components, bool):
            raise TypeError(f"Expected `n_components` to be an int, got {type(n_components).__name__}.")
        _check_range(n_components, "n_components", 1, None)
        _check_choice(bg_removal, _BG_MODES, "bg_removal")
        _check_range(float(bg_threshold), "bg_threshold", 0.0, 1.0)
        if metrics is None:
            metrics = METRICS
        elif isinstance(metrics, str) or not isinstance(metrics, Sequence | set | frozenset | tuple):
            raise TypeError(f"Expected `metrics` to be a sequence of metric names, got {metrics!r}.")
        for name in metrics:
            _check_choice(name, METRICS, "metrics")
        if not (normalize is None or normalize == "auto" or (isinstance(normalize, Sequence) and len(normalize) == 2)):
            raise ValueError(f"Argument `normalize` must be 'auto', None or a (mean, std) pair, got {normalize!r}.")
        self.layer = layer
        self.keep_cls_token = keep_cls_token
        self.n_components = n_components
        self.bg_removal = bg_removal
        self.bg_threshold = float(bg_threshold)
        self.metrics = tuple(m for m in METRICS if m in set(metrics))
        self.stable_colors = stable_colors
        self.freeze_pca = freeze_pca
        self.normalize = normalize
        self.pca_states: dict[str, PCAState] = {}
        self._lpips = lpips_metric
        self.inside = InsideOptions.from_value(inside)

    # ------------------------------------------------------------------ state
    def settings(self) -> dict[str, Any]:
        """The settings as plain Python types (for checkpoints and reports)."""
        normalize = self.normalize
        if normalize is not None and normalize != "auto":
            normalize = [[float(v) for v in torch.as_tensor(part).flatten()] for part in normalize]
        return {
            "layer": self.layer, "keep_cls_token": self.keep_cls_token, "n_components": self.n_components,
            "bg_removal": self.bg_removal, "bg_threshold": self.bg_threshold, "metrics": list(self.metrics),
            "stable_colors": self.stable_colors, "freeze_pca": self.freeze_pca, "normalize": normalize,
            **({"inside": self.inside.to_dict()} if self.inside is not None else {}),
        }

    def state_dict(self) -> dict[str, Any]:
        """``{"settings": ..., "pca_states": {level: PCAState.state_dict()}}``: tensors and plain types only."""
        return {
            "settings": self.settings(),
            "pca_states": {level: state.state_dict() for level, state in self.pca_states.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the PCA states saved by :meth:`state_dict` (the settings stay those of ``__init__``)."""
        if not isinstance(state, dict) or not isinstance(state.get("pca_states", {}), dict):
            raise TypeError("Expected a dict from `Analyzer.state_dict()` with a 'pca_states' entry.")
        self.pca_states = {
            level: PCAState.from_state_dict(d) for level, d in state.get("pca_states", {}).items() if d is not None
        }

    def reset(self) -> None:
        """Forget the PCA states (the next call fits fresh colours)."""
        self.pca_states = {}

    # --------------------------------------------------------------- analysis
    def __call__(
        self, views: ViewSet, encoder: Callable[..., Any], resampler: Callable[..., Any] | None = None, *,
        device: torch.device | str | None = None,
    ) -> AnalysisResult:
        """Analyse ``views`` with ``encoder`` (and ``resampler``).

        Args:
            views: the probe's views.
            encoder: a transformers vision model or any module/callable mapping
                ``(V, 3, S, S)`` pixels to ``(V, N, D)`` tokens (see ``extract_features``).
            resampler: None, or a module applied to the encoder's last-layer patch tokens.
            device: where the pixels go (default: the encoder's device, else the views').
                The models are not moved.

        Returns:
            An :class:`AnalysisResult`; metric values are float32-computed Python floats.
        """
        if not isinstance(views, ViewSet):
            raise TypeError(f"Expected `views` to be a ViewSet, got {type(views).__name__}.")
        if device is None:
            device = _module_device(encoder) or views.pixels.device
        device = torch.device(device)
        timings: dict[str, float] = {}
        timer = _Timer(device, timings)
        start = time.perf_counter()
        views = views.to(device)

        probe = InsideProbe(self.inside) if self.inside is not None else None
        sweep = probe.encoder_layers(encoder) if probe is not None else []
        # one encoder forward: the analysed layer, the resampler's input (last layer) and the sweep's layers
        wanted = [self.layer, *([-1] if resampler is not None else []), *sweep]
        # a resampler declaring ``input_tokens = "all"`` reads the prefix tokens too (as in its training)
        wants_all = getattr(getattr(resampler, "_orig_mod", resampler), "input_tokens", "patch") == "all"
        with torch.no_grad():
            with timer("encoder"), probe.encoder_forward(encoder) if probe else contextlib.nullcontext():
                full = extract_layers(encoder, views.pixels, wanted, keep_cls_token=self.keep_cls_token or wants_all,
                                      normalize=self.normalize)
            hidden = {k: _patch_only(f) for k, f in full.items()} if wants_all and not self.keep_cls_token else full
            level_feats = {"vision_encoder": hidden[self.layer]}
            resampler_input = None
            if resampler is not None:
                resampler_input = full[-1] if wants_all else _patch_only(full[-1])
                with timer("resampler"), probe.resampler_forward(resampler) if probe else contextlib.nullcontext():
                    level_feats["resampled"] = apply_resampler(resampler, resampler_input)

            levels: dict[str, LevelResult] = {}
            pca_states: dict[str, PCAState] = {}
            inside = None
            with _float32_numerics(device):
                for name, level in level_feats.items():
                    levels[name], pca_states[name] = self._analyse_level(name, _as_float32(level), views, timer)
                if probe is not None:
                    with timer("inside"):
                        inside = probe.finish(views, hidden, resampler_input,
                                              {n: _as_float32(f) for n, f in level_feats.items()}, sweep)
        if self.stable_colors:
            self.pca_states.update(pca_states)
        timings["total"] = time.perf_counter() - start
        return AnalysisResult(views=views, levels=levels, pca_states=pca_states, timings=timings, inside=inside)

    def _analyse_level(
        self, name: str, feats: TokenFeatures, views: ViewSet, timer: _Timer
    ) -> tuple[LevelResult, PCAState]:
        tokens = feats.tokens  # (V, N, D)
        spatial = feats.layout == "grid" and feats.grid_hw is not None
        if spatial:
            grid = tuple(int(v) for v in feats.grid_hw)
            prefix = feats.num_prefix_tokens if tokens.shape[1] != grid[0] * grid[1] else 0
            grid_tokens = tokens[:, prefix:]  # (V, gh*gw, D): prefix tokens kept by keep_cls_token are not drawn
        else:
            grid, grid_tokens = (1, tokens.shape[1]), tokens  # a (1, Q) strip per view

        previous = self.pca_states.get(name) if self.stable_colors else None
        if previous is not None:
            if previous.mean.shape[0] != tokens.shape[-1]:
                previous = None  # another model: start fresh
            else:
                previous = previous.to(tokens.device)
        freeze = self.freeze_pca and previous is not None and previous.n_components == self.n_components and (
            previous.bg_removal == self.bg_removal)
        valid = None
        if spatial:
            padding = padding_tokens(views, grid)  # (V, N): letterbox bars of a global view
            valid = None if not bool(padding.any()) else ~padding.to(tokens.device)
        with timer(f"{name}/pca"):
            images, fg_mask, state = pca_rgb(
                grid_tokens, grid, n_components=self.n_components, bg_removal=self.bg_removal,
                bg_threshold=self.bg_threshold, state=previous, freeze=freeze, valid=valid,
            )
        metrics = self._metrics(name, tokens, grid_tokens if spatial else None, grid if spatial else None,
                                images, views, timer)
        return LevelResult(name=name, features=feats, pca_images=images, fg_mask=fg_mask, metrics=metrics,
                           valid=valid, bg_note=state.note), state

    def _metrics(
        self, name: str, tokens: Tensor, grid_tokens: Tensor | None, grid: tuple[int, int] | None, images: Tensor,
        views: ViewSet, timer: _Timer,
    ) -> dict[str, MetricResult]:
        wanted = self.metrics
        pairs = list(views.pairs)
        if not pairs:
            return {m: MetricResult(skipped=_NO_PAIRS) for m in wanted}
        out: dict[str, MetricResult] = {}
        idx_i = torch.tensor([i for i, _ in pairs], device=tokens.device)
        idx_j = torch.tensor([j for _, j in pairs], device=tokens.device)

        corr: list[tuple[Tensor, Tensor]] | None = None
        if grid is not None and any(m in wanted for m in _NEEDS_OVERLAP):
            with timer(f"{name}/correspondence"):
                corr = [patch_correspondence(views, i, j, grid) for i, j in pairs]
        overlaps = [len(c[0]) > 0 for c in corr] if corr is not None else []
        no_overlap_reason = _NO_POSITION if grid is None else _NO_OVERLAP

        # shared per-view work, computed once by the first stage that needs it (and timed there)
        shared: dict[str, Tensor] = {}

        def units() -> Tensor:
            if "units" not in shared:
                shared["units"] = _m._unit(tokens)  # (V, N, D)
            return shared["units"]

        def grams() -> Tensor:
            if "grams" not in shared:
                shared["grams"] = _m._cka_grams(tokens)  # (V, N, N)
            return shared["grams"]

        if "token_cosine" in wanted:
            with timer(f"{name}/token_cosine"):
                values = _m._token_cosine_views(units(), idx_i, idx_j).tolist()
            out["token_cosine"] = MetricResult.from_values(values, "no finite value")
        if "overlap_cosine" in wanted:
            if corr is None or not any(overlaps):
                out["overlap_cosine"] = MetricResult(skipped=no_overlap_reason)
            else:
                with timer(f"{name}/overlap_cosine"):
                    prefix = tokens.shape[1] - grid_tokens.shape[1]
                    values = _m._overlap_cosine_views(units()[:, prefix:], idx_i, idx_j, [c[0] for c in corr],
                                                      [c[1] for c in corr]).tolist()
                out["overlap_cosine"] = MetricResult.from_values(values, no_overlap_reason)
        out.update(self._matching(name, units, grid_tokens, grid, idx_i, idx_j, corr, overlaps, no_overlap_reason,
                                  timer))
        # CKA: centred Gram matrices once per view (shared by both), unless only the linear CKA
        # is wanted and the feature form is cheaper (N >= D)
        gram_form = "debiased_cka" in wanted or tokens.shape[1] < tokens.shape[2]
        if "linear_cka" in wanted:
            with timer(f"{name}/linear_cka"):
                if gram_form:
                    values = _m._linear_cka_views(grams(), idx_i, idx_j).tolist()
                else:
                    values = _m._linear_cka_features(tokens, idx_i, idx_j).tolist()
            out["linear_cka"] = MetricResult.from_values(values, "no finite value")
        if "debiased_cka" in wanted:
            if tokens.shape[1] <= 3:
                raise ValueError(f"Expected more than 3 samples for `debiased_cka`, got N={tokens.shape[1]}.")
            with timer(f"{name}/debiased_cka"):
                values = _m._debiased_cka_views(grams(), idx_i, idx_j).tolist()
            out["debiased_cka"] = MetricResult.from_values(values, "no finite value")
        if "overlap_cka" in wanted or "overlap_debiased_cka" in wanted:
            out.update(self._overlap_cka(name, tokens, grid_tokens, idx_i, idx_j, corr, overlaps, no_overlap_reason,
                                         timer))
        if any(m in wanted for m in _IMAGE_METRICS):
            out.update(self._image_metrics(name, images, views, pairs, idx_i, corr, overlaps, no_overlap_reason,
                                           timer))
        return {m: out[m] for m in METRICS if m in out}

    def _matching(
        self, name: str, units: Callable[[], Tensor], grid_tokens: Tensor | None, grid: tuple[int, int] | None,
        idx_i: Tensor, idx_j: Tensor, corr: list[tuple[Tensor, Tensor]] | None, overlaps: list[bool], reason: str,
        timer: _Timer,
    ) -> dict[str, MetricResult]:
        """Hungarian cosine/accuracy and nearest-neighbour accuracy (see the README's metric table).

        Grid levels: view i's overlap tokens are matched against all of view j's grid tokens
        (rectangular, float64), the nearest neighbours come from the same cosines. Query tokens
        (no geometry): all tokens against all tokens, and no accuracy.
        """
        wanted = [m for m in ("hungarian_cosine", "hungarian_accuracy", "nn_accuracy") if m in self.metrics]
        if not wanted:
            return {}
        if grid is None:
            out = {m: MetricResult(skipped=reason) for m in wanted if m != "hungarian_cosine"}
            if "hungarian_cosine" in wanted:
                with timer(f"{name}/hungarian_cosine"):
                    cos, _ = _m._hungarian_views(units(), idx_i, idx_j)
                out["hungarian_cosine"] = MetricResult.from_values(cos.tolist(), "no finite value")
            return out
        if corr is None or not any(overlaps):
            return {m: MetricResult(skipped=reason) for m in wanted}
        prefix = units().shape[1] - grid_tokens.shape[1]
        grid_units = units()[:, prefix:]  # (V, gh*gw, D)
        idx_a, idx_b = [c[0] for c in corr], [c[1] for c in corr]
        out: dict[str, MetricResult] = {}
        hungarian = "hungarian_cosine" in wanted or "hungarian_accuracy" in wanted
        with timer(f"{name}/hungarian_cosine" if hungarian else f"{name}/nn_accuracy"):
            sims = _m._overlap_sims(grid_units, idx_i, idx_j, idx_a,
                                    torch.float64 if hungarian else torch.float32)
        if hungarian:
            with timer(f"{name}/hungarian_cosine"):
                cos, assignments = _m._overlap_hungarian_views(sims, idx_a, grid_units.shape[1])
            if "hungarian_cosine" in wanted:
                out["hungarian_cosine"] = MetricResult.from_values(cos.tolist(), reason)
        chance = ceiling = None
        if "hungarian_accuracy" in wanted or "nn_accuracy" in wanted:
            chance, ceiling = _m._matching_reference_views(idx_b, idx_a, grid)
        if "hungarian_accuracy" in wanted:
            with timer(f"{name}/hungarian_accuracy"):
                values = _m._hungarian_accuracy_views(assignments, idx_a, idx_b, grid).tolist()
            out["hungarian_accuracy"] = _with_reference(MetricResult.from_values(values, reason), chance, ceiling)
        if "nn_accuracy" in wanted:
            with timer(f"{name}/nn_accuracy"):
                values = _m._nn_accuracy_views(sims, idx_b, grid).tolist()
            out["nn_accuracy"] = _with_reference(MetricResult.from_values(values, reason), chance, None)
        return out

    def _overlap_cka(
        self, name: str, tokens: Tensor, grid_tokens: Tensor | None, idx_i: Tensor, idx_j: Tensor,
        corr: list[tuple[Tensor, Tensor]] | None, overlaps: list[bool], reason: str, timer: _Timer,
    ) -> dict[str, MetricResult]:
        wanted = [m for m in ("overlap_cka", "overlap_debiased_cka") if m in self.metrics]
        if corr is None or not any(overlaps):
            return {m: MetricResult(skipped=reason) for m in wanted}
        with timer(f"{name}/overlap_cka"):
            lin, deb = _m._overlap_cka_views(grid_tokens, idx_i, idx_j, [c[0] for c in corr], [c[1] for c in corr],
                                             linear="overlap_cka" in wanted,
                                             debiased="overlap_debiased_cka" in wanted)
        small = "not applicable: the overlaps hold too few token pairs"
        out = {}
        if lin is not None:
            out["overlap_cka"] = MetricResult.from_values(lin.tolist(), small)
        if deb is not None:
            out["overlap_debiased_cka"] = MetricResult.from_values(deb.tolist(), small)
        return out

    def _image_metrics(
        self, name: str, images: Tensor, views: ViewSet, pairs: list[tuple[int, int]], idx_i: Tensor,
        corr: list[tuple[Tensor, Tensor]] | None, overlaps: list[bool], reason: str, timer: _Timer,
    ) -> dict[str, MetricResult]:
        wanted = [m for m in _IMAGE_METRICS if m in self.metrics]
        if corr is None or not any(overlaps):
            return {m: MetricResult(skipped=reason) for m in wanted}
        lpips = None
        if "lpips" in wanted:
            if self._lpips is None:
                self._lpips = _m.LPIPSMetric()
            lpips = self._lpips
        with timer(f"{name}/warp"):
            big = _metric_images(images)  # (V, 3, h, w)
            warped, mask = warp_pairs(big, views, pairs)  # (P, 3, h, w), (P, h, w)
            ref = big[idx_i]
        defined = torch.tensor(overlaps, device=mask.device)[:, None, None]
        mask = mask & defined
        out = {}
        if "ssim" in wanted:
            with timer(f"{name}/ssim"):
                values = _m.ssim(ref, warped, mask).tolist()
            out["ssim"] = MetricResult.from_values(values, "not applicable: the overlaps are too small for the "
                                                           "SSIM window")
        if lpips is not None:
            if lpips.skipped is not None:
                out["lpips"] = MetricResult(skipped=lpips.skipped)
            else:
                with timer(f"{name}/lpips"):
                    values = lpips(ref, warped, mask).tolist()
                out["lpips"] = MetricResult.from_values(values, reason)
        return out


def _with_reference(result: MetricResult, chance: list[float] | None,
                    ceiling: list[float] | None) -> MetricResult:
    """Attach the mean chance level / ceiling over the pairs where the metric is defined."""
    if result.skipped is not None:
        return result
    defined = [p for p, v in enumerate(result.per_pair) if math.isfinite(v)]
    for attr, values in (("chance", chance), ("ceiling", ceiling)):
        if values is not None:
            picked = [values[p] for p in defined if math.isfinite(values[p])]
            setattr(result, attr, sum(picked) / len(picked) if picked else None)
    return result


def _patch_only(feats: TokenFeatures) -> TokenFeatures:
    """The patch tokens (prefix dropped), as the resampler saw them in training."""
    p = feats.num_prefix_tokens
    if p == 0 or feats.grid_hw is None or feats.tokens.shape[1] != p + feats.grid_hw[0] * feats.grid_hw[1]:
        return feats
    return TokenFeatures(tokens=feats.tokens[:, p:], grid_hw=feats.grid_hw, num_prefix_tokens=p, layout=feats.layout)


def _as_float32(feats: TokenFeatures) -> TokenFeatures:
    if feats.tokens.dtype == torch.float32:
        return feats
    return TokenFeatures(tokens=feats.tokens.float(), grid_hw=feats.grid_hw,
                         num_prefix_tokens=feats.num_prefix_tokens, layout=feats.layout)


def analyze(
    views: ViewSet, encoder: Callable[..., Any], resampler: Callable[..., Any] | None = None, *,
    device: torch.device | str | None = None, pca_states: dict[str, PCAState] | None = None, **settings: Any,
) -> AnalysisResult:
    """One-shot analysis: ``Analyzer(**settings)(views, encoder, resampler, device=device)``.

    Args:
        views: the probe's views.
        encoder: the vision encoder (see :class:`Analyzer`).
        resampler: optional resampler.
        device: where the pixels go (default: the encoder's device).
        pca_states: ``{level: PCAState}`` from an earlier result, to keep its colours.
        **settings: the keyword arguments of :class:`Analyzer`.
    """
    analyzer = Analyzer(**settings)
    if pca_states:
        analyzer.pca_states = dict(pca_states)
    return analyzer(views, encoder, resampler, device=device)
